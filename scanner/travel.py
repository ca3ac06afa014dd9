"""Where the stage and the focus drive may go: the recipe's travel, narrowed by a driver's own.

A recipe gives the XY travel (``microscope.stage.travel_x_um``/``travel_y_um``) and the focus
range (``microscope.focus.range_um``). A controller may know narrower limits of its own
(``TravelXMin_um``... on its XY stage, ``TravelMin_um``/``TravelMax_um`` on its focus
drive): the devices layer narrows the XY ones to the recipe's, and what is left is where a
move is safe. Every position a scan will drive to (its tiles, the alignment's fields) is
checked against these limits before the first move, so a plan the hardware would refuse
half-way (tiles lost at the edge, a focus search stopped at the drive's end) is refused
whole, in one line that names the recipe's field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class AxisLimits:
    """One axis's safe range and where it comes from."""

    lo: float
    hi: float
    #: the recipe field that sets this axis (named in errors)
    field: str
    #: the device whose own limits narrowed the recipe's (None: the recipe's alone)
    narrowed_by: str | None = None

    def refusal(self, value: float, what: str) -> str | None:
        """Why ``value`` may not be driven to (None: it may), in one line naming the field."""
        if self.lo <= value <= self.hi:
            return None
        by = f", the {self.narrowed_by} controller's own limits" if self.narrowed_by else ""
        return (f"{self.field}: {what} at {value:.0f} µm, outside the travel "
                f"[{self.lo:.0f}, {self.hi:.0f}] µm{by}")


def travel_limits(recipe: Any, core: Any = None) -> dict[str, AxisLimits]:
    """``{"x", "y", "z"}`` safe ranges of a recipe's stage and focus drive (µm), narrowed by
    the drivers' own limits where ``core`` (a built microscope) reports them."""
    stage = recipe.microscope.stage
    out = {
        "x": AxisLimits(*stage.travel_x_um, "microscope.stage.travel_x_um"),
        "y": AxisLimits(*stage.travel_y_um, "microscope.stage.travel_y_um"),
        "z": AxisLimits(*recipe.microscope.focus.range_um, "microscope.focus.range_um"),
    }
    if core is None:
        return out
    xy = _device(core, "getXYStageDevice")
    z = _device(core, "getFocusDevice")
    for axis, device, low, high in (("x", xy, "TravelXMin_um", "TravelXMax_um"),
                                    ("y", xy, "TravelYMin_um", "TravelYMax_um"),
                                    ("z", z, "TravelMin_um", "TravelMax_um")):
        own = _own_limits(core, device, low, high)
        if own is None:
            continue
        given = out[axis]
        lo, hi = max(given.lo, own[0]), min(given.hi, own[1])
        if (lo, hi) != (given.lo, given.hi):
            out[axis] = AxisLimits(lo, hi, given.field, device)
    return out


def check_positions(limits: dict[str, AxisLimits],
                    positions: list[tuple[str, float, float]]) -> str | None:
    """The first ``(what, x, y)`` stage position outside ``limits``, as one line (None: all
    inside)."""
    for what, x, y in positions:
        for axis, value in (("x", x), ("y", y)):
            why = limits[axis].refusal(value, f"{what} needs {axis}")
            if why:
                return why
    return None


def _device(core: Any, getter: str) -> str | None:
    try:
        return str(getattr(core, getter)()) or None
    except Exception:  # noqa: BLE001 - no such role loaded
        return None


def _own_limits(core: Any, device: str | None, low: str, high: str
                ) -> tuple[float, float] | None:
    if not device:
        return None
    try:
        if not (core.hasProperty(device, low) and core.hasProperty(device, high)):
            return None
        lo, hi = float(core.getProperty(device, low)), float(core.getProperty(device, high))
    except Exception:  # noqa: BLE001 - a driver that cannot say: the recipe's limits stand
        return None
    return (lo, hi) if lo < hi else None
