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

    def advance(self, seconds: float) -> None:
        """Spend ``seconds`` of hardware time."""
        if seconds <= 0:
            return
        with self._lock:
            self._elapsed_s += seconds
        if self.realtime:
            time.sleep(seconds)
