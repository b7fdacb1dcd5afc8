"""How long this process went without the CPU, for latency bounds on a shared machine.

A thread sleeps `TICK_S` at a time and records how late it woke: lateness is time the process was
not scheduled (other processes, other test workers), which no timeout in the code under test can
help. A bound then allows, for each timed call, the stalls that fell within it:

    with Stalls() as stalls:
        ... timed calls: (started, ended) by time.monotonic() ...
    assert ended - started - stalls.within(started, ended) <= BOUND_S

Code that blocks its own event loop still fails such a bound: the meter's thread keeps waking on
time (the interpreter switches threads every few milliseconds).
"""

from __future__ import annotations

import threading
import time

TICK_S = 0.005
NOISE_S = 0.002  # waking this late is ordinary scheduling, not a stall


class Stalls:
    def __init__(self) -> None:
        self.seen: list[tuple[float, float]] = []  # (woke at, seconds late), by time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            before = time.monotonic()
            time.sleep(TICK_S)
            woke = time.monotonic()
            late = woke - before - TICK_S
            if late > NOISE_S:
                self.seen.append((woke, late))

    def within(self, started: float, ended: float) -> float:
        """Seconds of stall that ended between `started` and `ended` (a stall ending a call
        counts in full: the call could not run through it either)."""
        return sum(late for woke, late in self.seen if started < woke <= ended + TICK_S)

    def __enter__(self) -> Stalls:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(1)
