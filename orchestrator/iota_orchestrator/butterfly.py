"""The reducing phase of a merge round: partitions, owners, the plan they follow and the parts they send.

When the contribute phase ends (rounds.due) the stage's flat vector is cut into R partitions over the R
contributors (sorted by id), partition p owned by contributors p and p+1 (core.flat.partitions/owners),
and the sha256 of every byte range an owner will read is taken from the stored blobs (the uploads'
"update" ranges and the epoch-E momentum range). An owner reads its ranges with HTTP Range, reduces them
with core.outer and sends a part blob back; the first valid result is kept and the second owner's is
compared with it by sha256 (merge_parts.agreed). No single owner decides a partition: publish.py makes
epoch E+1 once every part is confirmed, reducing a disputed one (or one whose second owner is gone or
late) itself, and an owner whose result differs from the orchestrator's fails a check (settle).

    GET /v1/merge/plan?run_id=R&stage=S&epoch=E&wait_s=10   (api/merge.py)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Connection, delete, insert, select, update

from iota_cli.core import flat, outer
from iota_cli.core.protocol import MergePart, MergePartDone, MergePartReply, MergePlan, MergeSlice
from iota_cli.core.tensors import read_header
from iota_orchestrator import db, ledger, rounds, standing
from iota_orchestrator.blobs import BlobStore
from iota_orchestrator.errors import BadRequest, Conflict, Forbidden
from iota_orchestrator.faults import Rejected
from iota_orchestrator.integrity import Checked
from iota_orchestrator.runs import RunCtx, weights_key

MC, MP, R, B = db.merge_contribs, db.merge_parts, db.merge_rounds, db.blobs
ORCHESTRATOR = "orchestrator"  # first_by of a part the orchestrator computed itself (publish.fallback)


def _sha_range(path: Path, offset: int, length: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        left = length
        while left > 0:
            chunk = f.read(min(left, 1 << 20))
            if not chunk:
                raise OSError(f"{path.name} ends before byte {offset + length}")
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def data_start(blobs: BlobStore, key: str) -> int:
    """Where the data section of a stored (sealed, so unchanging) safetensors blob begins."""
    if key not in _starts:
        _starts[key] = read_header(blobs.path(key)).data_start
    return _starts[key]


_starts: dict[str, int] = {}


def momentum_of(conn: Connection, run_id: str, stage: int, epoch: int) -> str | None:
    """The key of the stage's outer momentum as of epoch (the latest one published before it), if kept."""
    row = conn.execute(
        select(R.c.momentum_key)
        .select_from(R.join(B, B.c.key == R.c.momentum_key))
        .where(R.c.run_id == run_id, R.c.stage == stage, R.c.epoch < epoch, B.c.quarantined.is_(False))
        .order_by(R.c.epoch.desc())
        .limit(1)
    ).first()
    return row[0] if row else None


# --- fixing the partitions --------------------------------------------------------------------------


@dataclass(frozen=True)
class Fixed:
    """A round's partitions and the hashes of the ranges handed out, taken outside the lock."""

    contributors: tuple[str, ...]
    ranges: list[tuple[int, int]]
    spans: dict[str, list[tuple[int, int, str]]]  # contributor -> (offset, length, sha256) per partition
    momentum: list[str | None]
    scales: dict[str, float]  # contributor -> its norm clip (core.outer.clip_scales)


def hash_ranges(
    ctx: RunCtx,
    blobs: BlobStore,
    stage: int,
    contribs: Sequence[Any],
    momentum: str | None,
    steps: Sequence[int] = (),
) -> Fixed:
    """Cut the stage's vector over these contributions, hash each range an owner will read, and fix each
    contribution's norm clip from its whole update and its counted steps (steps: merge_checks)."""
    ranges = flat.partitions(rounds.flat_size(ctx, stage), len(contribs))
    spans, norms = {}, []
    for c in contribs:
        path = blobs.path(c.blob_key)
        header = read_header(path)
        out = []
        for start, stop in ranges:
            offset, length = flat.update_span(header, start, stop)
            out.append((offset, length, _sha_range(path, offset, length)))
        spans[c.contributor_id] = out
        offset, length = flat.update_span(header, 0, ranges[-1][1])
        u = flat.from_wire(path.read_bytes()[offset : offset + length], ctx.manifest.merge.wire_dtype).astype(
            np.float64
        )
        norms.append(float(np.sqrt(np.dot(u, u))))
    clip = outer.clip_scales(norms, list(steps) or [1] * len(norms))
    scales = {c.contributor_id: s for c, s in zip(contribs, clip, strict=True)}
    moms: list[str | None] = [None] * len(ranges)
    if momentum is not None and ctx.manifest.merge.strategy == "diloco":
        base, width = data_start(blobs, momentum), flat.WIRE_SIZES[ctx.manifest.merge.wire_dtype]
        moms = [_sha_range(blobs.path(momentum), base + a * width, (b - a) * width) for a, b in ranges]
    return Fixed(tuple(c.contributor_id for c in contribs), ranges, spans, moms, scales)


def spans_of(c: Any) -> list[list[Any]]:
    """A contribution's (offset, length, sha256) per partition, as start_reducing stored them (a bare
    list: stored before norm clips, scale 1)."""
    stored = json.loads(c.slices)
    return list(stored["spans"] if isinstance(stored, dict) else stored)


def scale_of(c: Any) -> float:
    return float(s.get("scale", 1.0)) if isinstance(s := json.loads(c.slices), dict) else 1.0


def start_reducing(conn: Connection, ctx: RunCtx, stage: int, epoch: int, fixed: Fixed, now: float) -> bool:
    """Write the partitions and move the round to reducing, if it is still open with these contributors."""
    rnd = rounds.get_round(conn, ctx.run_id, stage, epoch)
    contribs = rounds.contributions(conn, ctx.run_id, stage, epoch)
    if rnd is None or rnd.state != "open" or tuple(c.contributor_id for c in contribs) != fixed.contributors:
        return False  # someone came in meanwhile: the next tick hashes again
    ids = fixed.contributors
    for cid, spans in fixed.spans.items():
        conn.execute(
            update(MC)
            .where(
                MC.c.run_id == ctx.run_id,
                MC.c.stage == stage,
                MC.c.epoch == epoch,
                MC.c.contributor_id == cid,
            )
            .values(slices=json.dumps({"spans": spans, "scale": fixed.scales.get(cid, 1.0)}))
        )
    for p, (start, stop) in enumerate(fixed.ranges):
        conn.execute(
            insert(MP).values(
                run_id=ctx.run_id,
                stage=stage,
                epoch=epoch,
                part=p,
                start=start,
                stop=stop,
                owners=json.dumps([ids[i] for i in flat.owners(p, len(ids))]),
                momentum_sha=fixed.momentum[p],
            )
        )
    where = (R.c.run_id == ctx.run_id, R.c.stage == stage, R.c.epoch == epoch)
    conn.execute(update(R).where(*where).values(state="reducing", reducing=now))
    return True


# --- the plan ---------------------------------------------------------------------------------------


def plan(
    conn: Connection, ctx: RunCtx, blobs: BlobStore, contributor_id: str, stage: int, epoch: int
) -> MergePlan:
    """The round of (stage, epoch) as this contributor should see it (see MergePlan)."""
    rnd = rounds.get_round(conn, ctx.run_id, stage, epoch) if 0 <= stage < ctx.n_stages else None
    size = rounds.flat_size(ctx, stage)
    out = MergePlan(stage=stage, epoch=epoch, state="gone", size=size, round_index=epoch)
    if rnd is None:
        return out
    if rnd.state == "open":
        return out.model_copy(update={"state": "open"})
    rows = rounds.parts(conn, ctx.run_id, stage, epoch)
    if rnd.state == "closed":
        return _closed(conn, ctx, blobs, out, rows, epoch)
    contribs = rounds.contributions(conn, ctx.run_id, stage, epoch)
    momentum = momentum_of(conn, ctx.run_id, stage, epoch)
    parts = []
    for p in rows:
        part = MergePart(part=p.part, start=p.start, stop=p.stop, owned=contributor_id in rounds.owners(p))
        if part.owned and contributor_id not in (p.first_by, p.second_by):
            part = _to_reduce(ctx, blobs, part, p, contribs, contributor_id, momentum)
        parts.append(part)
    return out.model_copy(update={"state": "reducing", "parts": parts})


def _to_reduce(
    ctx: RunCtx,
    blobs: BlobStore,
    part: MergePart,
    p: Any,
    contribs: Sequence[Any],
    contributor_id: str,
    momentum: str | None,
) -> MergePart:
    sources = []
    for c in contribs:
        offset, length, sha = spans_of(c)[p.part]
        sources.append(
            MergeSlice(url=blobs.download_url(c.blob_key), offset=offset, length=length, sha256=sha)
        )
    ids = [c.contributor_id for c in contribs]
    mom = None
    if momentum is not None and p.momentum_sha is not None:
        width = flat.WIRE_SIZES[ctx.manifest.merge.wire_dtype]
        offset = data_start(blobs, momentum) + p.start * width
        mom = MergeSlice(
            url=blobs.download_url(momentum),
            offset=offset,
            length=(p.stop - p.start) * width,
            sha256=p.momentum_sha,
        )
    key = rounds.part_key(ctx.run_id, p.stage, p.epoch, p.part, contributor_id)
    return part.model_copy(
        update={
            "sources": sources,
            "weights": rounds.round_weights(list(contribs)),
            "scales": [scale_of(c) for c in contribs],
            "mine": ids.index(contributor_id) if contributor_id in ids else None,
            "momentum": mom,
            "upload": blobs.upload_ref(key, rounds.part_max_size(ctx, p.stop - p.start)),
        }
    )


def _closed(
    conn: Connection, ctx: RunCtx, blobs: BlobStore, out: MergePlan, rows: list[Any], epoch: int
) -> MergePlan:
    key = weights_key(ctx.run_id, out.stage, epoch + 1)
    b = conn.execute(select(B).where(B.c.key == key)).first()
    if b is None or b.quarantined or not rows or rows[0].published_sha is None:
        return out  # superseded, aborted unmerged or no longer kept: gone
    start, url = data_start(blobs, key), blobs.download_url(key)
    parts = [
        MergePart(
            part=p.part,
            start=p.start,
            stop=p.stop,
            result=MergeSlice(
                url=url, offset=start + 4 * p.start, length=4 * (p.stop - p.start), sha256=p.published_sha
            ),
        )
        for p in rows
    ]
    return out.model_copy(
        update={"state": "closed", "parts": parts, "weights": blobs.ref(key, b.sha256, b.size)}
    )


# --- part results -----------------------------------------------------------------------------------


def find_part(conn: Connection, run_id: str, stage: int, epoch: int, part: int) -> Any:
    q = select(MP).where(MP.c.run_id == run_id, MP.c.stage == stage, MP.c.epoch == epoch, MP.c.part == part)
    return conn.execute(q).first()


def check_part(ctx: RunCtx, path: Path, n: int) -> Checked:
    """A part blob read through (core.flat.read_part: exactly weights F32 [n] and, diloco, momentum)."""
    m = ctx.manifest.merge
    try:
        data = path.read_bytes()
    except OSError as e:
        return Checked("", 0, f"cannot be read: {e}")
    try:
        flat.read_part(data, n, m.wire_dtype, m.strategy == "diloco")
    except ValueError as e:
        return Checked(hashlib.sha256(data).hexdigest(), len(data), str(e))
    return Checked(hashlib.sha256(data).hexdigest(), len(data), None)


def report_part(
    conn: Connection, ctx: RunCtx, contributor_id: str, done: MergePartDone, checked: Checked, now: float
) -> tuple[MergePartReply, list[str]]:
    """Take an owner's result for a partition; return the reply and blob keys nobody needs any more.

    The first result is held until the second owner's agrees with it (publish.py settles a dispute by
    reducing the partition itself); one that differs from a result the orchestrator computed is wrong."""
    rnd = rounds.get_round(conn, ctx.run_id, done.stage, done.epoch)
    p = find_part(conn, ctx.run_id, done.stage, done.epoch, done.part)
    if rnd is None or p is None:
        raise Conflict(
            f"no merge round has partition {done.part} of stage {done.stage} at epoch {done.epoch}"
        )
    if contributor_id not in rounds.owners(p):
        raise Forbidden(f"you do not own partition {done.part} of this round")
    if contributor_id in (p.first_by, p.second_by):
        return MergePartReply(accepted=p.result_sha == done.sha256, state=rnd.state), []
    key = rounds.part_key(ctx.run_id, done.stage, done.epoch, done.part, contributor_id)
    b = conn.execute(select(B).where(B.c.key == key)).first()
    if b is None:
        raise BadRequest("upload your part result to the partition's upload URL first")
    if b.sha256 != done.sha256 or b.size != done.size:
        raise BadRequest("the uploaded part result does not match the sha256 and size you sent")
    if checked.sha256 != b.sha256:
        raise Conflict("the uploaded part result changed while it was checked; report it again")
    if checked.problem:
        raise Rejected(f"part result rejected: {checked.problem}", ctx.run_id)
    where = (
        MP.c.run_id == ctx.run_id,
        MP.c.stage == done.stage,
        MP.c.epoch == done.epoch,
        MP.c.part == done.part,
    )
    if p.result_sha is None and rnd.state == "reducing":
        conn.execute(update(B).where(B.c.key == key).values(sealed=True))
        conn.execute(
            update(MP).where(*where).values(result_key=key, result_sha=b.sha256, first_by=contributor_id)
        )
        return MergePartReply(accepted=True, state=rnd.state), []
    # A second result (or one after the round closed): compare it, keep the first.
    agreed = p.result_sha == b.sha256
    conn.execute(
        update(MP).where(*where).values(second_by=contributor_id, second_sha=b.sha256, agreed=agreed)
    )
    if not agreed and p.first_by == ORCHESTRATOR:  # the orchestrator's own reduction is the reference
        basis = ledger.work_credits(ctx.gflops[done.stage], ctx.tokens_per_sample, "backward", False)
        ref = f"part:{done.stage}:{done.epoch}:{done.part}:{contributor_id}"
        detail = f"partition {done.part} of stage {done.stage} epoch {done.epoch} reduced wrong"
        standing.failed(conn, ctx, contributor_id, ref, basis, detail, now)
    conn.execute(delete(B).where(B.c.key == key))
    return MergePartReply(accepted=agreed, state=rnd.state), [key]


def record_result(
    conn: Connection, ctx: RunCtx, part: Any, key: str, sha: str, size: int, now: float
) -> bool:
    """A part the orchestrator computed itself (publish.fallback), unless an owner's result came first."""
    fresh = find_part(conn, ctx.run_id, part.stage, part.epoch, part.part)
    if fresh is None or fresh.result_sha is not None:
        return False
    _take(conn, ctx, part, key, sha, size, now)
    return True


def unconfirmed(part: Any) -> bool:
    """An owner's result no second owner confirmed yet (a lone replica's own partition needs none)."""
    return (
        part.result_sha is not None
        and part.first_by != ORCHESTRATOR
        and not part.agreed
        and len(rounds.owners(part)) > 1
    )


def settle(
    conn: Connection, ctx: RunCtx, part: Any, key: str, sha: str, size: int, now: float
) -> tuple[list[str], set[str]]:
    """The orchestrator's own result for a disputed or unconfirmed partition: it confirms the first
    owner's (the orchestrator is then its second), or replaces it; each owner whose result differs
    failed a check (standing.failed). Returns (blob keys nobody needs, the wake-up keys of a ban's
    given-back work); nothing is changed when the partition was settled meanwhile."""
    fresh = find_part(conn, ctx.run_id, part.stage, part.epoch, part.part)
    if fresh is None or not unconfirmed(fresh):
        return [key], set()
    where = (
        MP.c.run_id == ctx.run_id,
        MP.c.stage == part.stage,
        MP.c.epoch == part.epoch,
        MP.c.part == part.part,
    )
    confirms = fresh.result_sha == sha
    dead = [key] if confirms else [fresh.result_key] if fresh.result_key else []
    conn.execute(delete(B).where(B.c.key.in_(dead)))
    wake: set[str] = set()
    basis = ledger.work_credits(ctx.gflops[part.stage], ctx.tokens_per_sample, "backward", False)
    for who, theirs in ((fresh.first_by, fresh.result_sha), (fresh.second_by, fresh.second_sha)):
        if who and theirs and theirs != sha:
            ref = f"part:{part.stage}:{part.epoch}:{part.part}:{who}"
            detail = f"partition {part.part} of stage {part.stage} epoch {part.epoch} reduced wrong"
            wake |= standing.failed(conn, ctx, who, ref, basis, detail, now)
    if confirms:
        conn.execute(update(MP).where(*where).values(agreed=True, second_by=ORCHESTRATOR, second_sha=sha))
    else:
        _take(conn, ctx, part, key, sha, size, now)
    return dead, wake


def _take(conn: Connection, ctx: RunCtx, part: Any, key: str, sha: str, size: int, now: float) -> None:
    conn.execute(insert(B).values(key=key, sha256=sha, size=size, created=now, sealed=True))
    where = (
        MP.c.run_id == ctx.run_id,
        MP.c.stage == part.stage,
        MP.c.epoch == part.epoch,
        MP.c.part == part.part,
    )
    conn.execute(update(MP).where(*where).values(result_key=key, result_sha=sha, first_by=ORCHESTRATOR))
