"""The worker's progress display: a tqdm bar in a terminal, steady plain log lines otherwise.

    p = Progress("tail", total=1000, notifier=notifier)
    p.update(step=12, tokens=49152, loss=4.1, credits=3.5, state="training")
    p.close()

    p.close(state="run finished", summary="run finished: 40 steps, 81,920 tokens, 15.08 credits")

The same facts go to sd_notify STATUS= (see notify.py) so `systemctl status iota` shows them, and to
the live file (livefile.py, `live=`) that `iota status --watch` reads.
`tokens` is the worker's cumulative token count; tokens/s is measured over the last `window_s` up to
now, so it falls toward 0 while no tokens come. In a terminal a ticker redraws the bar every `tick_s`:
tqdm redraws only on a step, and a worker waiting for work would show a frozen clock and rate.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from iota_cli.headless.livefile import LiveFile
from iota_cli.headless.logs import under_systemd
from iota_cli.headless.notify import Notifier

log = logging.getLogger("iota.progress")


@dataclass
class Facts:
    step: int = 0
    tokens: int = 0
    tokens_per_s: float | None = None
    loss: float | None = None
    credits: float | None = None
    state: str = "starting"


def si(x: float) -> str:
    """3100 -> '3.1k'; short enough for a status line."""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.1f}{suffix}"
    return f"{x:.0f}" if float(x).is_integer() or abs(x) >= 100 else f"{x:.1f}"


def describe(f: Facts, with_step: bool = True) -> str:
    """'step 12, 3.1k tok/s, loss 4.10, 3.5 credits, training' (ASCII: journals may not be UTF-8)."""
    parts = [f"step {f.step}"] if with_step else []
    if f.tokens_per_s is not None:
        parts.append(f"{si(f.tokens_per_s)} tok/s")
    if f.loss is not None:
        parts.append(f"loss {f.loss:.3f}")
    if f.credits is not None:
        parts.append(f"{si(f.credits)} credits")
    parts.append(f.state)
    return ", ".join(parts)


class Progress:
    """One worker's progress; `interactive=None` decides from the terminal and systemd.

    update() and close() may come from any thread (the loop, the heartbeat, the client's waits)."""

    def __init__(
        self,
        label: str,
        interactive: bool | None = None,
        interval_s: float = 10.0,
        total: int | None = None,
        notifier: Notifier | None = None,
        position: int | None = None,
        stream: TextIO | None = None,
        window_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        tick_s: float = 1.0,
        live: LiveFile | None = None,
    ) -> None:
        self.label = label
        self.live = live
        self.stream = sys.stderr if stream is None else stream
        if interactive is None:
            interactive = not under_systemd() and self.stream.isatty()
        self.interactive = interactive
        self.interval_s = interval_s
        self.notifier = notifier
        self.window_s = window_s
        self.facts = Facts()
        self._clock = clock
        self._lock = threading.RLock()
        self._samples: deque[tuple[float, int]] = deque()
        self._last_line: float | None = None
        self._last_text = ""
        self._last_status: float | None = None
        self._stack = contextlib.ExitStack()
        self._bar: Any = None
        self._closed = False
        self._ticking = threading.Event()
        self._ticker: threading.Thread | None = None
        if interactive:
            from tqdm.auto import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._bar = tqdm(
                total=total,
                desc=label,
                unit="step",
                position=position,
                file=self.stream,
                dynamic_ncols=True,
                # tqdm writes a postfix as ", text" (nothing when empty): inside the brackets, as its own
                # bars do, that is "[00:16, training]", never a stray comma after "]".
                bar_format="{desc}: {n_fmt}"
                + ("/{total_fmt}" if total else "")
                + " steps [{elapsed}{postfix}]",
            )
            # Log records print above the bar instead of tearing it.
            self._stack.enter_context(logging_redirect_tqdm())
            self._ticker = threading.Thread(
                target=self._tick_loop, args=(tick_s,), name="iota-bar", daemon=True
            )
            self._ticker.start()

    def _rate(self, now: float) -> float | None:
        """Tokens per second over the window ending now (not at the last sample): it decays while none come.

        The newest sample at or before the window's start stays as the baseline."""
        s = self._samples
        while len(s) > 1 and s[1][0] <= now - self.window_s:
            s.popleft()
        if not s:
            return None
        (t0, n0), (_, n1) = s[0], s[-1]
        return (n1 - n0) / (now - t0) if now > t0 else self.facts.tokens_per_s

    def update(
        self,
        *,
        step: int | None = None,
        tokens: int | None = None,
        loss: float | None = None,
        credits: float | None = None,
        state: str | None = None,
    ) -> None:
        """Record new facts (only those given change) and show them if it is time."""
        with self._lock:
            if self._closed:
                return  # a late wait message after the end must not redraw a closed bar
            now = self._clock()
            f = self.facts
            state_changed = state is not None and state != f.state
            if step is not None:
                f.step = step
            if tokens is not None:
                self._samples.append((now, tokens))
                f.tokens = tokens
            f.tokens_per_s = self._rate(now)
            if loss is not None:
                f.loss = loss
            if credits is not None:
                f.credits = credits
            if state is not None:
                f.state = state
            self._show(now, state_changed)

    def tick(self) -> None:
        """Bring the rate up to now and redraw the bar (its clock too); the ticker calls it in a terminal."""
        with self._lock:
            if self._closed:
                return
            now = self._clock()
            self.facts.tokens_per_s = self._rate(now)
            if self._bar is not None:
                self._bar.set_postfix_str(describe(self.facts, with_step=False), refresh=False)
                self._bar.refresh()

    def _tick_loop(self, every_s: float) -> None:
        while not self._ticking.wait(every_s):
            self.tick()

    def _show(self, now: float, state_changed: bool, final: bool = False) -> None:
        text = describe(self.facts)
        if self._bar is not None:
            self._bar.set_postfix_str(describe(self.facts, with_step=False), refresh=False)
            if self.facts.step != self._bar.n:
                self._bar.update(self.facts.step - self._bar.n)  # refreshes at tqdm's own pace
            elif state_changed or final:
                self._bar.refresh()
        elif (
            (final and text != self._last_text)
            or state_changed
            or self._last_line is None
            or now - self._last_line >= self.interval_s
        ):
            self._last_line, self._last_text = now, text
            log.info("%s: %s", self.label, text)
        if self.live is not None:
            self.live.write(self.facts, force=final)
        if self.notifier is not None and (
            final or state_changed or self._last_status is None or now - self._last_status >= 1.0
        ):
            self._last_status = now
            self.notifier.status(f"{self.label}: {text}")

    def interrupted(self) -> None:
        """A Ctrl-C was pressed: wipe the '^C' the terminal echoed after the bar and redraw it."""
        with self._lock:
            if self._bar is not None:
                self._wipe()
                self._bar.refresh()

    def _wipe(self) -> None:
        # Only a bar on the cursor's own line (position 0) can be wiped without moving the cursor.
        if getattr(self._bar, "pos", 0) == 0:
            self.stream.write("\r\x1b[K")

    def close(self, state: str | None = None, summary: str | None = None) -> None:
        """Show the final facts once more, release the terminal on a clean line, then print the summary
        (one line, a log record: a terminal and a worker's log both show it). Only the first call counts."""
        with self._lock:
            if self._closed:
                return
            if state is not None:
                self.facts.state = state
            self.facts.tokens_per_s = self._rate(self._clock())
            self._show(self._clock(), state_changed=False, final=True)
            self._closed = True
            if self._bar is not None:
                self._wipe()
                self._bar.close()  # draws the final bar and a newline
                self._bar = None
            self._stack.close()
        self._ticking.set()
        if self._ticker is not None:
            self._ticker.join(timeout=2.0)
        if summary:
            log.info("%s", summary)
            if self.notifier is not None:
                self.notifier.status(summary)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
