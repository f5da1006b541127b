"""How a worker's upload becomes a blob row, whichever store took the bytes.

With the directory store the PUT comes through api/blobs.py, which checks the body's sha256 and size as it
arrives and records the upload (`admit`, `record`). With an object store the PUT goes to the store, so
every report about an upload (a completed item, a merge update or partition, an audit's weights) first
awaits `receive`: the store copies the upload into place and hashes it (S3Store.take_in, off the event
loop), and it is recorded the same way. The checks that follow see the same row with either store.

    await uploads.receive(state, row.output_key, ctx.act_max_size)   # then check and seal as before

A small result may also come inline in its complete (WorkComplete.data, directory store only):
`inline_result` decodes and verifies it, and `store_inline` records it as a PUT would, in the complete's
own transaction.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import time
from typing import Any

from sqlalchemy import Connection, bindparam, insert, select, update

from iota_cli.core.protocol import WorkComplete
from iota_orchestrator import db, runs, scheduler
from iota_orchestrator.errors import BadRequest, Conflict, Gone, TooLarge
from iota_orchestrator.state import State

log = logging.getLogger("iota_orchestrator")
B = db.blobs
_LOOKUP = select(B.c.sha256, B.c.size, B.c.sealed, B.c.quarantined).where(B.c.key == bindparam("key"))


def lookup(conn: Connection, key: str) -> Any:
    """key's blob row (sha256, size, sealed, quarantined), or None."""
    return conn.execute(_LOOKUP, {"key": key}).first()


def admit(row: Any, key: str, sha256: str, size: int) -> None:
    """Refuse an upload for key that may not replace what is stored: a sealed (accepted) blob with other
    content (409), a quarantined one (410). An unsealed upload may be replaced by a corrected one."""
    if row is not None and row.sealed and (row.sha256, row.size) != (sha256, size):
        raise Conflict(f"blob {key} is sealed (already accepted) with different content")
    if row is not None and row.quarantined:
        raise Gone(f"blob {key} is quarantined")


def record(conn: Connection, row: Any, key: str, sha256: str, size: int) -> None:
    """Store (or replace) key's unsealed row; row is what lookup found."""
    values = {"sha256": sha256, "size": size, "created": time.time()}
    if row is None:
        conn.execute(insert(B).values(key=key, sealed=False, **values))
    else:
        conn.execute(update(B).where(B.c.key == key).values(**values))


async def receive(state: State, key: str, max_size: int) -> None:
    """Bring in what a worker uploaded straight to the object store for key, and record it; nothing to
    do for the directory store, for a blob already accepted (a repeated report) or a quarantined one."""
    if not state.blobs.presigned:
        return
    row = await state.in_tx(lambda conn: lookup(conn, key))
    if row is not None and (row.sealed or row.quarantined):
        return
    stored = await asyncio.to_thread(state.blobs.take_in, key, max_size)
    if stored is None:
        return  # nothing uploaded: the report's check says so

    def write(conn: Connection) -> None:
        now_row = lookup(conn, key)
        if now_row is not None and now_row.sealed:  # a repeated report sealed it meanwhile
            if (now_row.sha256, now_row.size) != (stored.sha256, stored.size):
                log.warning("blob %s: a different upload arrived after it was sealed", key)
            return
        admit(now_row, key, stored.sha256, stored.size)
        record(conn, now_row, key, stored.sha256, stored.size)

    await state.in_tx(write)


async def receive_result(state: State, work_id: str, contributor_id: str) -> None:
    """receive() for the result of a claimed work item (its output key, the run's activation limit)."""
    if not state.blobs.presigned:
        return

    def find(conn: Connection) -> tuple[str | None, int]:
        row = scheduler.load_item(conn, work_id, contributor_id)
        if row.state != "claimed" or not row.output_key:
            return None, 0  # done already, or re-issued: completing it answers without reading a blob
        return row.output_key, runs.context(conn, row.run_id).act_max_size

    key, limit = await state.in_tx(find)
    if key is not None:
        await receive(state, key, limit)


def inline_result(state: State, report: WorkComplete) -> bytes | None:
    """A complete's inline result, decoded and checked against its sha256 and size (None: none came)."""
    if report.data is None:
        return None
    if state.blobs.presigned:
        raise BadRequest("this orchestrator keeps blobs in an object store: PUT the result to its URL")
    try:
        data = base64.b64decode(report.data, validate=True)
    except ValueError:  # binascii.Error, or a non-ASCII character
        raise BadRequest("data is not valid base64") from None
    got = hashlib.sha256(data).hexdigest()
    if report.sha256 != got or report.size != len(data):
        raise BadRequest(f"the inline result hashes to {got} ({len(data)} bytes), not what the report says")
    return data


def store_inline(conn: Connection, state: State, key: str, data: bytes, sha: str, max_size: int) -> None:
    """Write an inline result (sha: what inline_result checked) under key as a PUT of it would, with the
    same refusals, unless it is there already."""
    if len(data) > max_size:
        raise TooLarge(f"result of {len(data)} bytes exceeds its limit of {max_size} bytes")
    row = lookup(conn, key)
    if row is not None and (row.sha256, row.size) == (sha, len(data)) and state.blobs.exists(key):
        return
    admit(row, key, sha, len(data))
    state.blobs.write(key, data)
    record(conn, row, key, sha, len(data))
