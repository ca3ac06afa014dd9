"""Fine alignment after stitching: the die grid and the rotation from the registered mosaic.

The pre-alignment (:mod:`scanner.acquisition.align`) measures a few fields before the scan; each
lands with the stage's repeatability error, which the stage does not report (3 µm on the demo
stage: two die sites 25 mm apart give the rotation to about 0.01° at one sigma, the edge
circle the centre to a few micrometres). The stitched mosaic no longer carries that error:
registration places every tile from its overlaps with a prior on each stage position, so the
mosaic's frame is the mean of a hundred landings and every die corner in it lies where it
really is, to a fraction of a pixel.

So, once the mosaic exists, every corner where four whole dies meet (dozens, spread over the
wafer) is measured in it at the place the pre-alignment's grid predicts (the middle of its two
scribe lanes, :func:`scanner.acquisition.align.lane_cross`), and a turned grid of the recipe's pitch
is fitted to all of them (least squares, outliers dropped): its origin and rotation replace the
pre-alignment's for everything downstream of stitching (die-to-die comparison, die indices,
wafer coordinates, KLARF). On a patterned wafer the wafer frame is the design's: its centre
is where the recipe's ``die_origin_mm`` puts it from the measured grid (the edge fit stays in
the record as ``edge_center_um``). The plan keeps the pre-alignment: the tiles were taken
where it put them, and ``resume`` must plan the same tiles.

Why not :func:`scanner.diegrid.estimate_grid` (the repeat finder inspection uses when a
recipe gives no grid): it has no rotation, puts the origin on a whole pixel of a ~1k-pixel
pyramid level (80 µm on the demo wafer), and on the demo layout its first strong repeat is
the pads' (290 µm), not the die's. The fitted similarity's scale is the pitch check instead
(1 when the recipe's pitch is right; ``scale`` in the record).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from scanner.acquisition.align import lane_cross
from scanner.diegrid import DieGrid

#: half side (mosaic pixels) of the window read around each predicted die corner
CORNER_WINDOW_PX = 64
#: fewest corners a fine alignment needs (fewer: the pre-alignment stays)
MIN_CORNERS = 6
#: a corner off the fitted grid by more than this many robust sigmas is dropped
OUTLIER_SIGMAS = 4.0
#: a fit whose corners lie farther (rms, mosaic pixels) from its grid measured no grid: the
#: pre-alignment stays (good fits: 0.02-0.17 px; a camera turned 2 deg that a one-row band
#: could not measure left the mosaic's fields turned, the fit 4.5 px rms, and it moved a
#: 1.4 um-right grid 174 um off)
MAX_RESIDUAL_PX = 1.0


class Refinement(BaseModel):
    """The fine alignment (``scan.json``'s ``alignment.refined``)."""

    model_config = ConfigDict(frozen=True)

    source: str = "registered mosaic"
    center_um: tuple[float, float]
    edge_center_um: tuple[float, float]
    rotation_deg: float
    die_grid: dict[str, Any]
    n_corners: int
    n_dropped: int
    residual_um: float
    scale: float


def camera_turn(record: dict[str, Any], camera_rotation_deg: float) -> float | None:
    """The turn (deg) an alignment's rotation needs once stitching measured the camera at
    ``camera_rotation_deg`` (:attr:`Alignment.camera_turn_deg`; None: none)."""
    if not record.get("rotation_seen_in_image"):
        return None
    turn = float(camera_rotation_deg) - float(record.get("camera_rotation_deg") or 0.0)
    return turn if abs(turn) > 1e-4 else None


def effective_alignment(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """The alignment that coordinates use: the fine one when stitching refined it, else the
    pre-alignment with its rotation corrected by the camera's turn stitching measured.

    The plan (and ``resume``) use the record as it is: the tiles lie where it put them.
    """
    if not record:
        return record
    if not record.get("refined"):
        turn = record.get("camera_turn_deg")
        if not turn:
            return record
        # a cell's sides (or a flat) read with a camera turned more than the fields assumed
        return {**record, "rotation_deg": float(record["rotation_deg"]) + float(turn)}
    fine = record["refined"]
    return {**record, "center_um": list(fine["center_um"]),
            "rotation_deg": float(fine["rotation_deg"]), "die_grid": fine["die_grid"]}


def fit_turned_grid(cells: np.ndarray, points: np.ndarray, pitch_um: tuple[float, float]
                    ) -> tuple[np.ndarray, float, float, np.ndarray]:
    """Grid origin and rotation that put die corners ``cells`` (col, row) at ``points``.

    A similarity ``p = o + s R(theta) (c * px, r * py)`` is fitted by linear least squares
    (``a = s cos``, ``b = s sin``); the rotation is its angle, the scale is returned as a
    check of the pitch (1 when the recipe's pitch is right), and the origin is refitted with
    the scale held at 1 (the recipe's pitch). Returns ``(origin, rotation_deg, scale,
    residuals)``, residuals in µm per corner.
    """
    u = cells[:, 0] * pitch_um[0]
    v = cells[:, 1] * pitch_um[1]
    n = len(cells)
    design = np.zeros((2 * n, 4))
    design[0::2] = np.c_[np.ones(n), np.zeros(n), u, -v]
    design[1::2] = np.c_[np.zeros(n), np.ones(n), v, u]
    sol, *_ = np.linalg.lstsq(design, points.reshape(-1), rcond=None)
    a, b = sol[2], sol[3]
    theta = math.atan2(b, a)
    c, s = math.cos(theta), math.sin(theta)
    turned = np.c_[c * u - s * v, s * u + c * v]
    origin = np.mean(points - turned, axis=0)
    residuals = np.hypot(*(points - origin - turned).T)
    return origin, math.degrees(theta), float(math.hypot(a, b)), residuals


def _corners(grid: DieGrid, region: Any) -> list[tuple[int, int]]:
    """Corners where four whole dies of the usable area meet (by the lower-right die)."""
    full = {(c, r) for c, r, f in grid.cells_in(region) if f}
    return sorted((c, r) for c, r in full
                  if {(c - 1, r - 1), (c, r - 1), (c - 1, r)} <= full)


def _corner_points(windows: list[np.ndarray], lanes: list[tuple[float, float] | None],
                   origins: np.ndarray) -> np.ndarray | None:
    """Mosaic pixel ``(col, row)`` of each window's die corner.

    Every corner shows the same layout, so each window's shift against one template
    (upsampled phase correlation) places it to a few hundredths of a pixel; the lanes'
    middles (a tenth of a pixel each, biased alike by the layout around them) give the
    template's own corner as their median over all windows.
    """
    from skimage.registration import phase_cross_correlation

    if not any(lane is not None for lane in lanes):
        return None
    t = next(i for i, lane in enumerate(lanes) if lane is not None)
    template = windows[t] - float(np.mean(windows[t]))
    rel = np.zeros((len(windows), 2))
    for k, window in enumerate(windows):
        shift, _, _ = phase_cross_correlation(template, window - float(np.mean(window)),
                                              upsample_factor=50, normalization=None)
        rel[k] = -shift[1], -shift[0]  # (col, row) of the template's content in window k
    placed = origins + rel  # each window's corner, up to the template's own corner
    seen = [k for k, lane in enumerate(lanes) if lane is not None]
    corner = np.median([origins[k] + np.asarray(lanes[k]) - placed[k] for k in seen], axis=0)
    return placed + corner


def refine_alignment(mosaic: Path, scan: dict[str, Any]) -> Refinement | None:
    """Fit the die grid to the corners seen in the registered mosaic (see the module
    docstring); None when the scan did not align a patterned wafer or too few corners were
    seen (the pre-alignment then stays as it is)."""
    from scanner.geometry import usable_polygon
    from scanner.ngff import level_transform, open_mosaic
    from scanner.recipe import recorded_sample

    record = scan.get("alignment")
    sample = (scan.get("recipe") or {}).get("sample") or {}
    if not record or record.get("kind") != "wafer" or not record.get("die_grid") \
            or sample.get("kind") != "wafer":
        return None
    wafer = recorded_sample(scan, mosaic.parent)
    grid = DieGrid.from_sample(sample, record)
    region = usable_polygon(wafer, alignment=record)
    levels, transforms = open_mosaic(mosaic)
    scale, trans = level_transform(transforms, 0)
    p = float(scale[1])
    x0, y0 = float(trans[1]), float(trans[0])  # stage position of pixel (0, 0)'s centre
    level0 = levels[0]
    h, w = level0.shape[-2:]
    half = CORNER_WINDOW_PX
    cells, origins, windows, lanes = [], [], [], []
    for c, r in _corners(grid, region):
        x, y = grid.corner(c, r)
        col, row = int(round((x - x0) / p)), int(round((y - y0) / p))
        if not (half <= col < w - half and half <= row < h - half):
            continue
        window = np.asarray(level0[row - half: row + half, col - half: col + half],
                            dtype=np.float32)
        if (window == 0).mean() > 0.01:  # an unscanned or lost tile's zeros
            continue
        cells.append((c, r))
        origins.append((col - half, row - half))
        windows.append(window)
        lanes.append(lane_cross(window, float(wafer.scribe_width_um), p))
    points = _corner_points(windows, lanes, np.asarray(origins, float))
    if points is None or len(cells) < MIN_CORNERS:
        return None
    points = np.c_[x0 + points[:, 0] * p, y0 + points[:, 1] * p]
    cells_a, points_a = np.asarray(cells, float), np.asarray(points, float)
    keep = np.ones(len(cells_a), bool)
    for _ in range(3):
        origin, rotation, sim_scale, res = fit_turned_grid(cells_a[keep], points_a[keep],
                                                           grid.pitch_um)
        th = math.radians(rotation)
        u, v = cells_a[:, 0] * grid.pitch_um[0], cells_a[:, 1] * grid.pitch_um[1]
        pred = origin + np.c_[math.cos(th) * u - math.sin(th) * v,
                              math.sin(th) * u + math.cos(th) * v]
        all_res = np.hypot(*(points_a - pred).T)
        sigma = 1.4826 * float(np.median(res)) + 0.05 * p
        new = all_res <= OUTLIER_SIGMAS * sigma
        if new.sum() < MIN_CORNERS or (new == keep).all():
            break
        keep = new
    residual = float(np.sqrt(np.mean(res ** 2)))
    if residual > MAX_RESIDUAL_PX * p:
        return None
    fine = DieGrid(grid.pitch_um, (float(origin[0]), float(origin[1])), rotation)
    # the design's centre: die (0, 0)'s corner lies at die_origin_mm from it
    ox, oy = (float(v) * 1000.0 for v in wafer.die_origin_mm)
    centre = fine.to_stage(-ox, -oy)
    return Refinement(
        center_um=(round(centre[0], 3), round(centre[1], 3)),
        edge_center_um=tuple(record["center_um"]),  # type: ignore[arg-type]
        rotation_deg=rotation,
        die_grid={"pitch_um": list(grid.pitch_um), "origin_um": [fine.origin_um[0],
                                                                 fine.origin_um[1]],
                  "rotation_deg": rotation},
        n_corners=int(keep.sum()), n_dropped=int((~keep).sum()),
        residual_um=round(residual, 3), scale=round(sim_scale, 7))
