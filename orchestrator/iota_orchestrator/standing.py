"""A contributor's standing in a run: checks passed and failed, what a failure costs, and the ban.

Standing is `pass_reward * passes - fail_penalty * fails` (IOTA's +1 / -3). Work earns credits as it is
accepted; a passed check vets everything the contributor earned up to the item it checked, and a failed
check claws back all it earned since the last vetted item and costs `fail_penalty` times the failed
item's credits on top. A standing below zero bans the contributor from the run: its claims are given
back, and every further request for the run is refused (403). See docs/trust.md.

    python -c "from iota_orchestrator import standing; print(standing.score(2, 1, 1, 3))"
"""

from __future__ import annotations

import random
from typing import Any

from sqlalchemy import Connection, case, func, select, update

from iota_orchestrator import db, faults, ledger
from iota_orchestrator.errors import Forbidden
from iota_orchestrator.runs import RunCtx

A, L = db.assignments, db.ledger
BANNED = "banned"
EARNED = ("forward", "backward")  # the ledger kinds that work earns; a failure's rows are "clawback"


def score(passes: int, fails: int, reward: int, penalty: int) -> int:
    return reward * passes - penalty * fails


def of(ctx: RunCtx, a: Any) -> int:
    t = ctx.manifest.trust
    return score(a.passes, a.fails, t.pass_reward, t.fail_penalty)


def refuse_banned(a: Any) -> None:
    """Every request a banned contributor makes for the run ends here."""
    if a is not None and a.state == BANNED:
        raise Forbidden(
            f"you are banned from this run: {a.fails} of your results failed validation (docs/trust.md)"
        )


def sample_rate(ctx: RunCtx, a: Any) -> float:
    """How likely the contributor's next forward item is checked: always until it passed once (no
    credit without a check, and a fresh identity gains nothing), more often once it has failed."""
    t = ctx.manifest.trust
    if a.passes == 0:
        return 1.0
    return t.suspect_rate if a.fails else t.sample_rate


def may_merge(ctx: RunCtx, a: Any) -> bool:
    """Whether the contributor's update may enter a merge round."""
    if a is None or a.state == BANNED:
        return False
    return a.passes > 0 or not ctx.manifest.trust.merge_requires_pass


SYSTEM_RNG = random.SystemRandom()  # unpredictable draws: a contributor cannot tell which items count


def draw(ctx: RunCtx, a: Any) -> bool:
    """Check this item (or merge update)?"""
    return SYSTEM_RNG.random() < sample_rate(ctx, a)


def _where(run_id: str, contributor_id: str) -> tuple[Any, ...]:
    return (A.c.run_id == run_id, A.c.contributor_id == contributor_id)


def passed(conn: Connection, ctx: RunCtx, contributor_id: str, mark: int) -> None:
    """A check passed: standing rises, and credits up to ledger id `mark` are vetted."""
    conn.execute(
        update(A)
        .where(*_where(ctx.run_id, contributor_id))
        .values(
            passes=A.c.passes + 1, vetted_mark=case((A.c.vetted_mark > mark, A.c.vetted_mark), else_=mark)
        )
    )


def unpaid(
    conn: Connection, ctx: RunCtx, contributor_id: str, ref: str, amount: float, detail: str, now: float
) -> None:
    """Take back credits for work whose product was refused, without judging its worker: a merge update
    that raised the held-out loss (its replica may have trained on what a cheater sent it). Standing is
    not touched; the fault is counted for operators."""
    a = conn.execute(select(A.c.stage).where(*_where(ctx.run_id, contributor_id))).first()
    if a is None or conn.execute(select(L.c.id).where(L.c.work_id == ref)).first() is not None:
        return
    ledger.record(conn, ctx.run_id, contributor_id, ref, "clawback", a.stage, 0, -round(amount, 6), now)
    faults.charge(conn, ctx.run_id, contributor_id, "harmful_update", detail[:500], now)


def failed(
    conn: Connection, ctx: RunCtx, contributor_id: str, ref: str, basis: float, detail: str, now: float
) -> set[str]:
    """A check failed: claw back the unvetted credits, charge the penalty, ban when standing < 0.

    ref names the check (unique per check: it keys the ledger rows); basis is the credits of the checked
    item (a merge update: of one item of its stage). Returns the wake-up keys of a ban's given-back work.
    """
    a = conn.execute(select(A).where(*_where(ctx.run_id, contributor_id))).first()
    if a is None:
        return set()
    unvetted = conn.execute(
        select(func.coalesce(func.sum(L.c.credits), 0.0)).where(
            L.c.run_id == ctx.run_id,
            L.c.contributor_id == contributor_id,
            L.c.kind.in_(EARNED),
            L.c.id > a.vetted_mark,
        )
    ).scalar_one()
    cost = float(unvetted) + ctx.manifest.trust.fail_penalty * basis
    mark = conn.execute(select(func.max(L.c.id))).scalar_one() or 0
    ledger.record(conn, ctx.run_id, contributor_id, ref, "clawback", a.stage, 0, -round(cost, 6), now)
    conn.execute(
        update(A).where(*_where(ctx.run_id, contributor_id)).values(fails=A.c.fails + 1, vetted_mark=mark)
    )
    faults.charge(conn, ctx.run_id, contributor_id, "failed_check", detail[:500], now)
    if score(a.passes, a.fails + 1, ctx.manifest.trust.pass_reward, ctx.manifest.trust.fail_penalty) >= 0:
        return set()
    from iota_orchestrator import lease  # it refuses banned contributors with refuse_banned: import late

    keys = lease.release(conn, ctx, contributor_id, now, BANNED) if a.state == "active" else set()
    conn.execute(update(A).where(*_where(ctx.run_id, contributor_id)).values(state=BANNED))
    return keys
