"""The words a worker's state shows: why it waits, why it ended, and what its session did.

    waiting("stage 1 has no worker")  # 'waiting for work: stage 1 has no worker' (X-Iota-Wait)
    s = Session.start(state)          # when the Worker is built (state: its restored LoopState)
    s.credited(0.42)                  # each completed item's credits
    s.summary("run finished", end)    # 'run finished: 40 steps, 81,920 tokens, 15.08 credits'

The steps and tokens count from the restored state, so a resumed worker reports this session's share;
the orchestrator's total of the contributor's credits (every run, every session) is added when it
differs from what this session earned.
"""

from __future__ import annotations

from dataclasses import dataclass

from iota_cli.train.checkpoint import LoopState


@dataclass
class Session:
    step: int  # the state's counters when the session began
    tokens: int
    credits: float = 0.0  # earned in this session (sum of the items' credits)

    @classmethod
    def start(cls, state: LoopState) -> Session:
        return cls(step=state.step, tokens=state.tokens)

    def credited(self, credits: float) -> None:
        self.credits += credits

    def summary(self, ending: str, state: LoopState) -> str:
        steps, tokens = state.step - self.step, state.tokens - self.tokens
        line = f"{ending}: {_count(steps, 'step')}, {_count(tokens, 'token')}, {self.credits:.2f} credits"
        if round(state.credits_seen, 2) != round(self.credits, 2):
            line += f" ({state.credits_seen:.2f} credits in all)"
        return line


def ending(finished: bool, moving: bool, reached: int | None, stopped: bool) -> str:
    """Why a worker's loop ended, in the words its last state shows (the first that holds); `reached` is
    the --max-steps the worker reached, if it did. An error ends it "stopped" (the error says why)."""
    if finished:
        return "run finished"
    if moving:
        return "moving to another stage"
    if reached is not None:
        return f"reached --max-steps {reached}"
    return "stopped by you" if stopped else "stopped"


def waiting(why: str | None) -> str:
    """The state of a claim that got no work; `why` is the orchestrator's reason (None from older ones).

    A reason that is itself a wait ("waiting for the merge round of stage 0 ...") is shown as it is."""
    if not why:
        return "waiting for work"
    return why if why.startswith("waiting") else f"waiting for work: {why}"


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'s' * (n != 1)}"
