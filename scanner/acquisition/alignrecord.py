"""The pre-alignment's record: where the sample lies on the stage (``scan.json``'s
``alignment``), the fields it was measured on, and the error that refuses a scan.

Apart from :mod:`scanner.acquisition.align` (which measures it) so that readers of ``scan.json``
(the wafer frame of :mod:`scanner.reports.locate`) need none of the measuring.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from scanner.errors import UserError


class AlignmentError(UserError):
    """The sample is not where the recipe expects it, its mark is missing, or sites disagree."""


class Site(BaseModel):
    """One alignment field: where it was taken and what it gave."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["edge", "notch", "flat", "die", "side"]
    x_um: float
    y_um: float
    n_points: int = 0
    residual_um: float | None = None
    die: tuple[int, int] | None = None


class Alignment(BaseModel):
    """Where the sample lies on the stage (recorded in ``scan.json`` as ``alignment``).

    The wafer frame has its origin at ``center_um`` and its axes turned by ``rotation_deg``
    from the stage's (from +x towards +y), so the notch lies towards the frame's +y as in
    the recipe: ``wafer = R(-rotation) @ (stage - center)``.
    """

    model_config = ConfigDict(frozen=True)

    kind: Literal["wafer", "pv_cell"]
    nominal_center_um: tuple[float, float]
    center_um: tuple[float, float]
    rotation_deg: float
    edge_rotation_deg: float | None = None
    mark: Literal["notch", "flat", "none", "edges"] = "none"
    mark_angle_deg: float | None = None
    radius_um: float | None = None
    edge_residual_um: float
    n_edge_points: int
    die_grid: dict[str, Any] | None = None
    die_residual_um: float | None = None
    #: why the die sites did not refine the edge's alignment (``scan.align: auto``: the edge
    #: and mark's centre and rotation are kept; None: refined, or not asked for)
    die_sites_skipped: str | None = None
    sites: tuple[Site, ...] = ()
    hardware_s: float | None = None
    #: camera binning of the edge and notch fields (1: unbinned; a flat's and the die
    #: fields always are)
    edge_binning: int = 1
    #: the camera's rotation against the stage the fields were read with (a calibration's;
    #: 0 without one)
    camera_rotation_deg: float = 0.0
    #: whether ``rotation_deg`` is a direction seen in the fields' images (a flat, a PV
    #: cell's sides: a camera turned by c reads it c less) rather than a position on the
    #: stage (die sites, a notch's place on the circle: no camera turn moves them)
    rotation_seen_in_image: bool = False
    #: turn to add to ``rotation_deg`` once the scan's own tiles measured the camera's
    #: rotation (stitching): that rotation less ``camera_rotation_deg``, for a rotation seen
    #: in the image (None: none needed)
    camera_turn_deg: float | None = None

    @property
    def offset_um(self) -> tuple[float, float]:
        """Measured centre less the nominal one."""
        return (self.center_um[0] - self.nominal_center_um[0],
                self.center_um[1] - self.nominal_center_um[1])

    def to_wafer(self, x_um: float, y_um: float) -> tuple[float, float]:
        """A stage point in the sample's own frame (µm from its centre, notch towards +y)."""
        th = math.radians(self.rotation_deg)
        dx, dy = x_um - self.center_um[0], y_um - self.center_um[1]
        return math.cos(th) * dx + math.sin(th) * dy, -math.sin(th) * dx + math.cos(th) * dy

    def to_stage(self, u_um: float, v_um: float) -> tuple[float, float]:
        """A point of the sample's frame on the stage."""
        th = math.radians(self.rotation_deg)
        return (self.center_um[0] + math.cos(th) * u_um - math.sin(th) * v_um,
                self.center_um[1] + math.sin(th) * u_um + math.cos(th) * v_um)


def to_wafer_frame(alignment: dict[str, Any] | None, center: tuple[float, float],
                   x_um: float, y_um: float) -> tuple[float, float]:
    """Wafer-frame µm of a stage point: with ``scan.json``'s alignment, else from ``center``."""
    if not alignment:
        return x_um - center[0], y_um - center[1]
    return Alignment.model_validate(alignment).to_wafer(x_um, y_um)

