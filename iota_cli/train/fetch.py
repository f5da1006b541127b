"""Tensors from the orchestrator's blobs: download verified, decode, and drop the file.

The worker reads its items' inputs this way, and the validator the blobs of a check. Anything but
valid tensors is the sender's fault: StageInputError. Bytes that came inline in a claim's reply
(BlobRef.data) are verified as a download is, and never touch the disk.

    python -c "from iota_cli.train import fetch; help(fetch.tensor)"
"""

from __future__ import annotations

import base64
import hashlib
import tempfile
from pathlib import Path

from iota_cli.core import wire
from iota_cli.core.backend import StageInputError
from iota_cli.core.protocol import BlobRef
from iota_cli.core.tensors import RawTensor, TensorDict, TensorFormatError, decode
from iota_cli.train.api import SwarmApi
from iota_cli.train.errors import IntegrityError


def tensors(api: SwarmApi, ref: BlobRef, work_dir: Path) -> TensorDict:
    """A verified blob's tensors: inline ones, or downloaded into a temp dir under work_dir (deleted)."""
    if ref.data is not None:
        return _decode(inline(ref))
    work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        path = api.download(ref, Path(tmp) / "blob")
        return _decode(path.read_bytes())


def inline(ref: BlobRef) -> bytes:
    """The bytes a ref carries, checked against its sha256 and size (IntegrityError: give the item back)."""
    try:
        data = base64.b64decode(ref.data or "", validate=True)
    except ValueError:  # binascii.Error, or a non-ASCII character
        raise IntegrityError("inline blob is not valid base64") from None
    if len(data) != ref.size or hashlib.sha256(data).hexdigest() != ref.sha256:
        raise IntegrityError(f"inline blob does not match its sha256 {ref.sha256} and size {ref.size}")
    return data


def _decode(data: bytes) -> TensorDict:
    try:
        return decode(wire.unpack(data))[0]
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
