"""The simulated hardware clock: what the scan would have cost on the real instrument."""

from __future__ import annotations

import threading
import time


class HardwareClock:
    """Accumulates simulated hardware time (moves, settling, exposures, readout).

    Parameters
    ----------
    realtime : bool
        If True, every advance also sleeps for that long, so the simulated microscope runs at
        the speed of the hardware it imitates.
    """

    def __init__(self, realtime: bool = False) -> None:
        self.realtime = realtime
        self._elapsed_s = 0.0
        self._lock = threading.Lock()

    @property
    def elapsed_s(self) -> float:
        """Simulated seconds since the clock was created."""
        return self._elapsed_s

    def advance(self, seconds: float, since: float | None = None) -> None:
        """Spend ``seconds`` of hardware time.

        In real time, the call returns ``seconds`` after ``since`` (a ``time.perf_counter()``
        reading; default now): an action that began at ``since`` and spent wall time computing
        (rendering a frame) sleeps only what is left, so the wall clock equals the hardware
        clock whenever the machine keeps up, instead of adding the two.
        """
        if seconds <= 0:
            return
        with self._lock:
            self._elapsed_s += seconds
        if self.realtime:
            self.sleep_until((time.perf_counter() if since is None else since) + seconds)

    def sleep_until(self, wall_s: float) -> None:
        """In real time, sleep until ``time.perf_counter()`` reaches ``wall_s``."""
        if self.realtime:
            lag = wall_s - time.perf_counter()
            if lag > 0:
                time.sleep(lag)
