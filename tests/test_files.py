"""Durable writes (iota_cli.core.files): a file is there whole or not at all, and no temp file stays."""

from __future__ import annotations

import os
import stat

import pytest

from iota_cli.core.files import atomic_write, atomic_writer, commit


def test_atomic_write_replaces_whole_with_the_mode_asked(tmp_path):
    path = tmp_path / "sub" / "f"
    atomic_write(path, b"old")
    atomic_write(path, b"new", mode=0o644)
    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert os.listdir(path.parent) == ["f"]


def test_a_stream_that_fails_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"old")
    with pytest.raises(ValueError), atomic_writer(path) as f:
        f.write(b"half of the new")
        raise ValueError("the source broke off")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f"]


def test_a_stream_appears_only_when_done_and_temp_files_can_live_elsewhere(tmp_path):
    path, tmp_dir = tmp_path / "f", tmp_path / ".tmp"
    tmp_dir.mkdir()
    with atomic_writer(path, durable=False, tmp_dir=tmp_dir) as f:
        f.write(b"a")
        assert not path.exists() and len(os.listdir(tmp_dir)) == 1
        f.write(b"b")
    assert path.read_bytes() == b"ab" and os.listdir(tmp_dir) == []


def test_commit_moves_a_finished_part_over_the_destination(tmp_path):
    part, dest = tmp_path / "w.part", tmp_path / "w"
    dest.write_bytes(b"old")
    part.write_bytes(b"verified")
    commit(part, dest)
    assert dest.read_bytes() == b"verified" and not part.exists()
