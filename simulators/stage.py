"""Stage mechanics: travel limits, trapezoidal motion time, settling and repeatability."""

from __future__ import annotations

import math
import time

import numpy as np

from .clock import HardwareClock
from .randomness import KeyedRandom


class TravelLimitError(RuntimeError):
    """A move was asked for outside the stage's travel range; the stage did not move."""


def axis_move_time_s(distance_um: float, speed_um_s: float, accel_um_s2: float) -> float:
    """Time for one axis to travel ``distance_um`` with a trapezoidal velocity profile.

    Parameters
    ----------
    distance_um : float
        Distance to travel (sign ignored).
    speed_um_s : float
        Maximum speed.
    accel_um_s2 : float
        Acceleration and deceleration.

    Returns
    -------
    float
        Seconds from start to stop (settling not included).
    """
    d = abs(distance_um)
    if d == 0:
        return 0.0
    d_ramp = speed_um_s**2 / accel_um_s2  # distance spent accelerating and decelerating
    if d <= d_ramp:  # triangular profile: never reaches full speed
        return 2.0 * math.sqrt(d / accel_um_s2)
    return 2.0 * speed_um_s / accel_um_s2 + (d - d_ramp) / speed_um_s


def xy_move_time_s(
    dx_um: float, dy_um: float, speed_um_s: float, accel_um_s2: float
) -> float:
    """Time for an XY move with both axes moving at once (the slower axis decides)."""
    return max(
        axis_move_time_s(dx_um, speed_um_s, accel_um_s2),
        axis_move_time_s(dy_um, speed_um_s, accel_um_s2),
    )


class StageAxes:
    """Mechanics of a motorized stage with one or more axes (XY: 2, focus: 1).

    The *commanded* position is what the controller reports back (quantised to its encoder
    step); the *true* position is where the stage really stops: the commanded one plus a
    random repeatability error drawn at each move.

    Parameters
    ----------
    limits_um : sequence of (min, max)
        Travel range of each axis.
    speed_um_s, accel_um_s2 : float
        Motion profile.
    settle_s : float
        Settling time after each move.
    repeatability_um : float
        Standard deviation of the landing error on each axis.
    clock : HardwareClock
        Clock that moves and settling are charged to.
    rng : numpy.random.Generator or KeyedRandom
        Random source for the landing error; a :class:`KeyedRandom` draws it per target and
        visit, so a resumed scan lands where an uninterrupted one would have.
    encoder_step_um : float
        Resolution of the reported position.
    """

    def __init__(
        self,
        limits_um: list[tuple[float, float]],
        speed_um_s: float,
        accel_um_s2: float,
        settle_s: float,
        repeatability_um: float,
        clock: HardwareClock,
        rng: np.random.Generator | KeyedRandom,
        encoder_step_um: float = 0.01,
        start_um: list[float] | None = None,
    ) -> None:
        self.limits_um = [tuple(map(float, lim)) for lim in limits_um]
        self.speed_um_s = speed_um_s
        self.accel_um_s2 = accel_um_s2
        self.settle_s = settle_s
        self.repeatability_um = repeatability_um
        self.clock = clock
        self.rng = rng
        self.encoder_step_um = encoder_step_um
        start = start_um if start_um is not None else [
            min(max(0.0, lo), hi) for lo, hi in self.limits_um
        ]
        self.commanded = np.asarray(start, dtype=float)
        self.true = self.commanded.copy()
        self.moves = 0
        self._busy_until_s = 0.0
        self._wall_until_s = 0.0  # perf_counter() when the last started move ends (real time)

    def check(self, target_um: np.ndarray) -> None:
        """Raise :class:`TravelLimitError` if ``target_um`` is outside the travel range."""
        for axis, (value, (lo, hi)) in enumerate(zip(target_um, self.limits_um, strict=True)):
            if not lo <= value <= hi:
                raise TravelLimitError(
                    f"axis {'XYZ'[axis] if len(self.limits_um) > 1 else 'Z'} target {value:.1f} µm "
                    f"is outside the travel range [{lo:.1f}, {hi:.1f}] µm"
                )

    def move_to(self, *target_um: float) -> float:
        """Move to an absolute position; returns the hardware time spent (also on the clock)."""
        self.wait()  # a move started earlier finishes first
        seconds = self._move(np.asarray(target_um, dtype=float))
        self.clock.advance(seconds)
        return seconds

    def _move(self, target: np.ndarray) -> float:
        """Land at ``target`` (with the repeatability error); the move's time in seconds."""
        self.check(target)
        delta = target - self.true
        seconds = max(
            axis_move_time_s(float(d), self.speed_um_s, self.accel_um_s2) for d in delta
        )
        if np.any(target != self.commanded):
            seconds += self.settle_s
            rng = self.rng.rng(*target) if isinstance(self.rng, KeyedRandom) else self.rng
            error = rng.normal(0.0, self.repeatability_um, size=target.shape)
            self.true = target + error
            self.moves += 1
        self.commanded = target
        return seconds

    def start_move_to(self, *target_um: float) -> None:
        """Start a move and return at once, as a motion controller does.

        The move's time is not charged yet: it runs while other devices work (the XY stage
        and the focus drive are separate controllers that move at the same time) and is
        charged by :meth:`wait`, from when the axis was last free. Raises
        :class:`TravelLimitError` before moving, like :meth:`move_to`.
        """
        start = max(self.clock.elapsed_s, self._busy_until_s)
        seconds = self._move(np.asarray(target_um, dtype=float))
        self._busy_until_s = start + seconds
        # in real time the move runs on the wall clock while the caller computes
        self._wall_until_s = max(time.perf_counter(), self._wall_until_s) + seconds

    def wait(self) -> None:
        """Charge the clock until the last started move has finished and settled."""
        remaining = self._busy_until_s - self.clock.elapsed_s
        self.clock.advance(remaining, since=self._wall_until_s - remaining)
        self.clock.sleep_until(self._wall_until_s)

    def reported(self) -> np.ndarray:
        """The position the controller reports: commanded, quantised to the encoder step."""
        step = self.encoder_step_um
        return np.round(self.commanded / step) * step
