"""Tensors from the orchestrator's blobs: download verified, decode, and drop the file.

The worker reads its items' inputs this way, and the validator the blobs of a check. Anything but
valid tensors is the sender's fault: StageInputError.

    python -c "from iota_cli.train import fetch; help(fetch.tensor)"
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from iota_cli.core import wire
from iota_cli.core.backend import StageInputError
from iota_cli.core.protocol import BlobRef
from iota_cli.core.tensors import RawTensor, TensorDict, TensorFormatError, decode
from iota_cli.train.api import SwarmApi


def tensors(api: SwarmApi, ref: BlobRef, work_dir: Path) -> TensorDict:
    """Download a verified blob into a temp dir under work_dir, decode it, delete the file."""
    work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        path = api.download(ref, Path(tmp) / "blob")
        try:
            return decode(wire.unpack(path.read_bytes()))[0]
        except TensorFormatError as e:
            raise StageInputError(f"not a valid tensor container: {e}") from None


def tensor(api: SwarmApi, ref: BlobRef | None, name: str, work_dir: Path) -> RawTensor:
    """The one tensor called name in a blob (anything else in it, or no blob: StageInputError)."""
    if ref is None:
        raise StageInputError(f"no {name} to read")
    got = tensors(api, ref, work_dir)
    if set(got) != {name}:
        raise StageInputError(f"expected exactly {{{name!r}}} in the blob, got {sorted(got)[:4]}")
    return got[name]
