"""Pre-alignment: find where the sample really lies on the chuck before it is tiled.

A loader or a hand puts a wafer down a few hundred micrometres off and a fraction of a degree
turned. Before the scan, a few fields are taken through the Micro-Manager core (the same moves
and snaps as the scan, with its retries):

1. **Edge** (wafers): fields on the expected edge (three 120° apart; two with a notch, whose
   own field shows the circle beside it) and one on the notch or flat; the edge and notch
   fields binned 2x where the camera offers it (its ``Binning`` property; binning 1 again
   for a flat, the die fields and the scan; ``edge_binning`` in the record). Along rays
   from the nominal centre the outermost crossing from the dark chuck to the sample is
   found to a fraction of a pixel (the level halfway between the chuck and the sample next
   to it, per ray); a circle fitted to the edge points (least squares, outliers dropped)
   gives the centre and radius.
2. **Notch or flat**: in the mark's field, rays from the fitted centre give the edge's depth
   below the circle; the notch's axis is the depth-weighted mean direction (the V is
   symmetric about it), a flat's normal that of a line fitted to its points. Their angle
   less the nominal one (+y, 6 o'clock) is the rotation.
3. **Die grid** (patterned wafers): two die corners far apart on the row nearest the centre
   (each where four whole dies meet). The first corner's field is the template; the second's
   shift against it comes from phase correlation (a fraction of a pixel), and each corner's
   absolute place from the middle of its scribe lanes. The vector between the corners gives
   the rotation to a few thousandths of a degree, the corners the grid's origin.

A PV cell is aligned by its four edges (a field at the middle of each side; a line fitted to
each with RANSAC, as rays that end on a finger or a busbar miss the edge; the centre where the
mid-lines cross, the rotation from the lines' directions).

The mosaic stays in stage axes (a stage has no rotation axis and OME-NGFF 0.5 carries only
scale and translation); the measured centre and rotation move the plan and the usable area
and turn the die grid and the wafer coordinates (:meth:`Alignment.to_wafer`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict
from scipy import ndimage, optimize

from .errors import UserError

ALIGNMENT_PNG = "alignment.png"

#: nominal direction of a wafer's notch or flat (+y: 6 o'clock), as the recipe's frame has it
MARK_ANGLE_DEG = 90.0
#: a die-grid rotation further than this from the edge's is a disagreement
MAX_DIE_EDGE_DISAGREEMENT_DEG = 0.15
#: die sites disagree when their measured distance differs from the pitch's by more than this
#: many standard deviations of the stage's landing noise (plus the measurement floor below)
SITE_SIGMAS = 5.0
#: what the lane and the correlation measure a corner to, in pixels, whatever the stage
SITE_FLOOR_PX = 2.0
#: die sites must lie at least this share of the wafer's diameter apart
MIN_DIE_LEVER = 0.3
#: edge points a field must give to count as "edge found"
MIN_EDGE_POINTS = 20
#: a PV cell side's RANSAC line takes points this many of the field's pixels off it: the
#: edge is found to a fraction of a pixel (the demo cell's sides: 1-3.4 µm rms on 30 µm
#: pixels), a ray that ends on a finger or a busbar ends one to hundreds of pixels inside
SIDE_INLIER_PX = 2.0
#: a side whose line keeps less than this share of its edge points is refused (the demo cell
#: keeps 93-100 %, 20 placements)
MIN_SIDE_INLIERS = 0.5
#: camera binning of the edge and notch fields where the camera offers it (else none).
#: Measured on the demo wafer (10 random placements each, pre-alignment): the centre (to
#: 7.3 µm, the stage's landing error) and a notch's angle (0.010° rms) are the same at 1, 2
#: and 4, but a flat's angle is 0.0010° rms unbinned, 0.0033° at 2 and 0.016° at 4, and
#: 0.02° at 2 where the flat crosses fewer than two binned rows (a 0.4° turn over a 20 µm
#: pixel field: sub-pixel edges lean towards the pixel grid), so a flat's field stays unbinned
EDGE_BINNING = 2
#: fewest pixels across a binned edge field keeps (less binning where it would keep fewer)
MIN_BINNED_FIELD_PX = 128
#: Micro-Manager's camera binning property
BINNING = "Binning"


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
    sites: tuple[Site, ...] = ()
    hardware_s: float | None = None
    #: camera binning of the edge and notch fields (1: unbinned; a flat's and the die
    #: fields always are)
    edge_binning: int = 1

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


# --------------------------------------------------------------------------- planning


def wants_alignment(recipe: Any) -> bool:
    """Whether the scan aligns first (``scan.align``; auto: wafers and PV cells)."""
    setting = recipe.scan.align
    kind = recipe.sample.kind
    if setting == "auto":
        return kind in ("wafer", "pv_cell")
    if setting and kind not in ("wafer", "pv_cell"):
        raise UserError(f"scan.align: true needs a wafer or pv_cell sample (got {kind})")
    return bool(setting)


def site_tolerance_um(repeatability_um: float, pixel_um: float) -> float:
    """Largest disagreement of two die sites' distance from the pitch's that is still the
    stage's landing noise, not a wrong site.

    Each field lands with an error of ``repeatability_um`` (one sigma per axis) that the
    stage does not report, so the distance between two sites carries the difference of two
    landings: one sigma of sqrt(2) * repeatability along the line between them. A fixed
    tolerance refused good wafers (bench_align seed 5: two landings 14.3 µm apart along x,
    3.4 sigma of a 3 µm stage, against a fixed 8 µm); a wrong site (another lane, another
    die, a wrong pitch) is off by a lane's width or more.
    """
    return SITE_SIGMAS * math.sqrt(2.0) * repeatability_um + SITE_FLOOR_PX * pixel_um


def _u(deg: float) -> tuple[float, float]:
    return math.cos(math.radians(deg)), math.sin(math.radians(deg))


def edge_fields(sample: Any) -> list[tuple[str, float, float, float]]:
    """``(kind, x, y, angle_deg)`` of the edge fields, in the order they are taken.

    Wafers: fields on the circle (three 120° apart with a flat or no mark; with a notch,
    two: opposite it and 60° past it, the notch's field giving the third arc) and one on
    the mark (:func:`plan_route` orders them). PV cells: the middle of each side.
    """
    cx, cy = sample.center_um
    if sample.kind == "pv_cell":
        hw, hh = sample.width_mm * 500.0, sample.height_mm * 500.0
        return [("side", cx + hw, cy, 0.0), ("side", cx, cy + hh, 90.0),
                ("side", cx - hw, cy, 180.0), ("side", cx, cy - hh, 270.0)]
    r = sample.diameter_mm * 500.0
    mark = MARK_ANGLE_DEG
    fields = []
    # a notch's field shows the circle beside the V: with it, two edge fields (opposite
    # the mark and 60° past it) leave the three arcs spread over 180°, enough for the centre
    # to a few µm (the fine alignment on the mosaic takes it further); the field at mark -
    # 60° cost about a second of stage moves, 3 % of the demo's scan. A flat's field shows
    # little arc beside the flat, so a flat (or no mark) keeps three.
    angles = ((mark - 180.0, mark + 60.0) if sample.orientation == "notch"
              else (mark - 60.0, mark - 180.0, mark + 60.0))
    for a in angles:
        ux, uy = _u(a)
        fields.append(("edge", cx + r * ux, cy + r * uy, a % 360.0))
    if sample.orientation != "none":
        ux, uy = _u(mark)
        depth = r - _flat_distance(sample) if sample.orientation == "flat" else 0.0
        fields.insert(1, (sample.orientation, cx + (r - depth) * ux, cy + (r - depth) * uy,
                          mark))
    return fields


def _flat_distance(sample: Any) -> float:
    r = sample.diameter_mm * 500.0
    half = min(sample.flat_length_mm * 500.0, 0.99 * r)
    return math.sqrt(r * r - half * half)


def die_site_pairs(sample: Any) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Candidate pairs of die sites: the two ends of each row of corners where four whole
    dies meet, at least :data:`MIN_DIE_LEVER` of the diameter apart (the pair's lever on
    the rotation), the row nearest the centre first."""
    from .diegrid import DieGrid
    from .geometry import usable_polygon

    nominal = DieGrid.from_sample(sample.model_dump(mode="json"))
    region = usable_polygon(sample)
    full = {(c, r) for c, r, f in nominal.cells_in(region) if f}
    by_row: dict[int, list[int]] = {}
    for c, r in full:
        if {(c - 1, r - 1), (c, r - 1), (c - 1, r)} <= full:
            by_row.setdefault(r, []).append(c)
    cy = sample.center_um[1]
    lever = MIN_DIE_LEVER * sample.diameter_mm * 1000.0
    out = []
    for r in sorted(by_row, key=lambda r: (abs(nominal.corner(0, r)[1] - cy), -len(by_row[r]))):
        cols = sorted(by_row[r])
        if (cols[-1] - cols[0]) * nominal.pitch_um[0] >= lever:
            out.append(((cols[0], r), (cols[-1], r)))
    return out


class Route(BaseModel):
    """The alignment's fields in the order they are taken (``validate`` shows it)."""

    model_config = ConfigDict(frozen=True)

    edges: tuple[tuple[str, float, float, float], ...]
    dies: tuple[tuple[int, int], ...] = ()
    seconds: float = 0.0

    def fields(self, sample: Any) -> list[tuple[str, float, float]]:
        """``(kind, x, y)`` of every field, die sites where the nominal grid puts them."""
        out = [(k, x, y) for k, x, y, _ in self.edges]
        if self.dies:
            from .diegrid import DieGrid

            grid = DieGrid.from_sample(sample.model_dump(mode="json"))
            out += [("die", *grid.corner(c, r)) for c, r in self.dies]
        return out


def plan_route(recipe: Any, start: tuple[float, float],
               first_tile: tuple[float, float] | None) -> Route:
    """The order of the alignment's fields (and the pair of die sites) that costs the least
    stage time from ``start`` through them to the scan's first tile.

    The edge and mark fields come first in any order (the die sites are predicted from the
    centre and rotation they give), then the two die sites in either order. Moves dominate
    (25 mm at the demo stage's 25 mm/s is a second; a snap is 50 ms), so ending near the
    first tile saves most: the scan would have moved there from the start anyway, so only
    the detour counts (``seconds``).
    """
    from itertools import permutations

    from simulators.stage import xy_move_time_s

    from .diegrid import DieGrid
    from .plan import exposure_for

    sample, stage = recipe.sample, recipe.microscope.stage
    camera = getattr(recipe.microscope, "camera", None)
    per_field = stage.settle_ms / 1000 + (exposure_for(recipe) + (
        camera.readout_ms if camera else 0.0)) / 1000.0

    def move(a: tuple[float, float], b: tuple[float, float]) -> float:
        return xy_move_time_s(b[0] - a[0], b[1] - a[1], stage.speed_um_s,
                              stage.acceleration_um_s2)

    def cost(points: list[tuple[float, float]]) -> float:
        total, here = 0.0, start
        for q in points:
            total += move(here, q) + per_field
            here = q
        if first_tile is not None:
            total += move(here, first_tile) - move(start, first_tile)
        return total

    edges = edge_fields(sample)
    pairs: list[tuple[tuple[int, int], ...]] = [()]
    corner_at: dict[tuple[int, int], tuple[float, float]] = {}
    if sample.kind == "wafer" and getattr(sample, "die_to_die", True):
        grid = DieGrid.from_sample(sample.model_dump(mode="json"))
        found = die_site_pairs(sample)
        if found:
            pairs = [pair for a, b in found for pair in ((a, b), (b, a))]
            corner_at = {c: grid.corner(*c) for pair in found for c in pair}
    best: Route | None = None
    for order in permutations(edges):
        head = [(x, y) for _, x, y, _ in order]
        for pair in pairs:
            seconds = cost(head + [corner_at[c] for c in pair])
            if best is None or seconds < best.seconds:
                best = Route(edges=order, dies=pair, seconds=seconds)
    assert best is not None
    return best


def _nominal_route(recipe: Any, fov_um: tuple[float, float] | None = None) -> Route:
    """:func:`plan_route` from the stage's start (the travel position nearest the origin,
    as the simulated stage and :func:`scanner.plan.estimate_hardware_time_s` have it) to the
    first tile of the plan where the recipe puts the sample."""
    from .plan import plan_scan

    stage = recipe.microscope.stage
    start = (min(max(0.0, stage.travel_x_um[0]), stage.travel_x_um[1]),
             min(max(0.0, stage.travel_y_um[0]), stage.travel_y_um[1]))
    first = None
    if fov_um is not None:
        tiles = plan_scan(recipe, fov_um).tiles
        first = (tiles[0].x_um, tiles[0].y_um) if tiles else None
    return plan_route(recipe, start, first)


def alignment_fields(recipe: Any, fov_um: tuple[float, float] | None = None
                     ) -> list[tuple[str, float, float]]:
    """``(kind, x, y)`` of the nominal alignment fields in the order they are taken
    (``validate``'s alignment plan; ``fov_um`` routes them to the plan's first tile)."""
    return _nominal_route(recipe, fov_um).fields(recipe.sample)


def estimate_alignment_time_s(recipe: Any, fov_um: tuple[float, float] | None = None
                              ) -> float:
    """Hardware time the alignment adds to the scan: its moves and snaps, and the detour
    from the start through its fields to the first tile (with ``fov_um``)."""
    return _nominal_route(recipe, fov_um).seconds


# --------------------------------------------------------------------------- image measures


def ray_edges(image: np.ndarray, field_xy: tuple[float, float], pixel_um: float,
              centre: tuple[float, float], angles_deg: np.ndarray, r_out: float,
              r_in: float) -> np.ndarray:
    """Radius of the outermost chuck-to-sample crossing along each ray (NaN: none).

    Rays start at ``centre + r_out * u`` and run inwards to ``r_in``, sampled every half
    pixel (bilinear). A first pass finds the crossing of the field's Otsu level; the level is
    then the mean of the chuck's and the sample's medians just outside and inside it on the
    same ray (so a pattern, vignetting or a dim edge die does not move it), and the crossing
    is interpolated between the two samples around it.
    """
    from skimage.filters import threshold_otsu

    img = np.asarray(image, dtype=np.float32)
    h, w = img.shape
    step = 0.5 * pixel_um
    radii = np.arange(r_out, r_in, -step)
    ang = np.radians(np.asarray(angles_deg, dtype=float))
    xs = centre[0] + radii[None, :] * np.cos(ang)[:, None]
    ys = centre[1] + radii[None, :] * np.sin(ang)[:, None]
    cols = (xs - field_xy[0]) / pixel_um + (w - 1) / 2
    rows = (ys - field_xy[1]) / pixel_um + (h - 1) / 2
    v = ndimage.map_coordinates(img, [rows, cols], order=1, cval=np.nan)
    inside = (cols >= 0) & (cols <= w - 1) & (rows >= 0) & (rows <= h - 1)
    v[~inside] = np.nan
    t0 = float(threshold_otsu(img[::4, ::4]))
    out = np.full(len(ang), np.nan)
    near, far = 6, 24  # half-pixel steps: clear of the edge's blur, still local
    for k in range(len(ang)):
        prof = v[k]
        ok = np.flatnonzero(np.isfinite(prof))
        if len(ok) < 2 * far:
            continue
        first = ok[0]
        if prof[first] >= t0:
            continue  # the ray starts on the sample: its edge lies beyond the field
        above = np.flatnonzero(prof[first:] >= t0)
        if len(above) == 0:
            continue
        j = first + int(above[0])
        lo = prof[max(first, j - far): j - near]
        hi = prof[j + near: j + far]
        if len(lo) < 4 or len(hi) < 4 or not np.isfinite(hi).all():
            continue
        t = 0.5 * (float(np.median(lo)) + float(np.median(hi)))
        seg = prof[max(first, j - near): j + near]
        cross = np.flatnonzero((seg[:-1] < t) & (seg[1:] >= t))
        if len(cross) == 0:
            continue
        i = max(first, j - near) + int(cross[0])
        a, b = prof[i], prof[i + 1]
        out[k] = radii[i] - step * (t - a) / (b - a)
    return out


def fit_circle(points: np.ndarray, start: tuple[float, float, float],
               clip_um: float) -> tuple[float, float, float, float, np.ndarray]:
    """Least-squares circle through edge points, dropping those off it by more than 3 sigma
    (or ``clip_um``): ``(cx, cy, r, rms, kept)``."""
    keep = np.ones(len(points), bool)
    params = np.asarray(start, float)
    for _ in range(4):
        p = points[keep]

        def resid(q: np.ndarray, p: np.ndarray = p) -> np.ndarray:
            return np.hypot(p[:, 0] - q[0], p[:, 1] - q[1]) - q[2]

        params = optimize.least_squares(resid, params, method="lm").x
        res = np.hypot(points[:, 0] - params[0], points[:, 1] - params[1]) - params[2]
        rms = float(np.sqrt(np.mean(res[keep] ** 2)))
        new = np.abs(res) <= max(3 * rms, 1e-6) if rms > clip_um / 3 else np.abs(res) <= clip_um
        new |= np.abs(res) <= 3 * rms
        if (new == keep).all():
            break
        keep = new
    return float(params[0]), float(params[1]), float(params[2]), rms, keep


def fit_circle_radius(points: np.ndarray, start: tuple[float, float], radius: float,
                      clip_um: float) -> tuple[float, float, float, np.ndarray]:
    """:func:`fit_circle` with the radius held: ``(cx, cy, rms, kept)``."""
    keep = np.ones(len(points), bool)
    params = np.asarray(start, float)
    for _ in range(4):
        p = points[keep]

        def resid(q: np.ndarray, p: np.ndarray = p) -> np.ndarray:
            return np.hypot(p[:, 0] - q[0], p[:, 1] - q[1]) - radius

        params = optimize.least_squares(resid, params, method="lm").x
        res = np.hypot(points[:, 0] - params[0], points[:, 1] - params[1]) - radius
        rms = float(np.sqrt(np.mean(res[keep] ** 2)))
        new = (np.abs(res) <= max(3 * rms, 1e-6)) | (np.abs(res) <= clip_um)
        if (new == keep).all():
            break
        keep = new
    return float(params[0]), float(params[1]), rms, keep


def fit_line(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Total least squares line: ``(point, unit direction, rms distance)``."""
    mean = points.mean(axis=0)
    _, s, vt = np.linalg.svd(points - mean, full_matrices=False)
    return mean, vt[0], float(s[-1] / math.sqrt(len(points)))


def fit_side(points: np.ndarray, pixel_um: float
             ) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
    """A PV cell's side: ``(point, unit direction, rms distance, inliers)`` of a RANSAC line
    through its edge points (:data:`SIDE_INLIER_PX`), refitted by least squares on the
    inliers.

    Rays that end on a finger or a busbar (dark lines meeting the edge) cross the sample's
    level inside the cell, up to millimetres from the edge; a plain least-squares line leans
    towards them (the demo cell, placement seed 7: 167 µm and 0.87° off). A 2-point sample is
    all inliers a quarter of the time at the least share a side keeps
    (:data:`MIN_SIDE_INLIERS`), so 100 trials miss the edge with a chance below 1e-12; a fixed
    seed gives the same line every time.
    """
    from skimage.measure import LineModelND, ransac

    _, inliers = ransac(points, LineModelND, min_samples=2,
                        residual_threshold=SIDE_INLIER_PX * pixel_um, max_trials=100, rng=0)
    return (*fit_line(points[inliers]), inliers)


def lane_middle(profile: np.ndarray, approx: float, half_width_px: float) -> float | None:
    """Middle (sub-pixel) of the quiet run (a scribe lane) nearest ``approx`` in a profile of
    per-column (or per-row) spread; None when no clear lane is there."""
    n = len(profile)
    lo_i = max(int(approx - 3 * half_width_px) - 4, 1)
    hi_i = min(int(approx + 3 * half_width_px) + 4, n - 2)
    if hi_i - lo_i < 4:
        return None
    window = profile[lo_i:hi_i]
    quiet = float(np.min(window))
    # a die's seal ring and pads flank its lane, busy at any pixel size (a die's core may
    # average to grey at a coarse one)
    busy = float(np.percentile(window, 90))
    if busy <= quiet * 2 + 1e-9:
        return None
    t = 0.5 * (quiet + busy)
    j = lo_i + int(np.argmin(window))
    a = j
    while a > 0 and profile[a - 1] < t:
        a -= 1
    b = j
    while b < n - 1 and profile[b + 1] < t:
        b += 1
    if a == 0 or b == n - 1:
        return None
    # crossings interpolated on each side of the run
    left = a - 1 + (t - profile[a - 1]) / (profile[a] - profile[a - 1])
    right = b + (profile[b] - t) / (profile[b] - profile[b + 1])
    return 0.5 * (left + right)


def lane_cross(image: np.ndarray, lane_um: float, pixel_um: float) -> tuple[float, float] | None:
    """Pixel ``(col, row)`` where a vertical and a horizontal scribe lane cross, near the
    field's centre (None: not seen)."""
    img = np.asarray(image, dtype=np.float32)
    # interquartile range per column/row: a die varies, a lane does not (a particle on the
    # lane moves a few pixels of a column, not its quartiles)
    q = np.percentile(img, [25, 75], axis=0)
    cols = q[1] - q[0]
    q = np.percentile(img, [25, 75], axis=1)
    rows = q[1] - q[0]
    half = 0.5 * lane_um / pixel_um
    h, w = img.shape
    c = lane_middle(cols, (w - 1) / 2, max(half, 2.0))
    r = lane_middle(rows, (h - 1) / 2, max(half, 2.0))
    return None if c is None or r is None else (c, r)


# --------------------------------------------------------------------------- measuring


def camera_binnings(core: Any) -> dict[int, Any]:
    """Binnings the current camera offers, ``{factor: value to set}`` (``{}``: none).

    From the camera's ``Binning`` property: writable, its allowed values ``"2"`` or
    ``"2x2"`` (square binnings only). A camera without it (or a read-only one, as a Python
    camera that implements no setter) offers none.
    """
    import re

    cam = core.getCameraDevice()
    if not cam or not core.hasProperty(cam, BINNING) or core.isPropertyReadOnly(cam, BINNING):
        return {}
    out: dict[int, Any] = {}
    for value in core.getAllowedPropertyValues(cam, BINNING):
        m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", str(value))
        if m and (m[2] is None or m[2] == m[1]) and int(m[1]) > 0:
            out[int(m[1])] = int(m[1]) if m[2] is None else str(value)
    return out


def edge_binning(core: Any) -> int:
    """The binning the edge and notch fields are taken at: :data:`EDGE_BINNING` where the
    camera offers it and the binned frame keeps :data:`MIN_BINNED_FIELD_PX` pixels across;
    else 1 (also where the camera is binned already: then the scan's tiles are too)."""
    offered = camera_binnings(core)
    b = EDGE_BINNING
    if b not in offered or _binning_now(core, core.getCameraDevice()) != 1:
        return 1
    short = min(core.getImageWidth(), core.getImageHeight())
    return b if short // b >= MIN_BINNED_FIELD_PX else 1


def _binning_now(core: Any, cam: str) -> int:
    import re

    m = re.match(r"\s*(\d+)", str(core.getProperty(cam, BINNING)))
    return int(m[1]) if m else 1


class _Scope:
    """Moves and snaps through the Micro-Manager core, with the scan's retries.

    Edge and notch fields are taken binned where the camera offers it (:func:`edge_binning`):
    a b x b sum has a b times coarser pixel and b times the signal-to-noise, and the edge (a
    step across the field) is still found to a fraction of the coarser pixel. The
    die fields stay unbinned (their lanes and pattern need the full resolution), and
    :meth:`unbin` puts the camera back before the scan's tiles.
    """

    def __init__(self, handle: Any, recipe: Any) -> None:
        from .acquire import ScanEngine, _TileLost

        self.core = handle.core
        self.engine = ScanEngine(self.core, retries=recipe.scan.retries,
                                 timeout_s=recipe.scan.device_timeout_s)
        self.lost = _TileLost
        self.pixel_um = float(self.core.getPixelSizeUm())
        #: one sigma per axis of where a field really lands (the stage reports the command)
        self.repeatability_um = float(recipe.microscope.stage.repeatability_um)
        #: ``(kind, x, y, image, pixel_um)`` of every field taken
        self.images: list[tuple[str, float, float, np.ndarray, float]] = []
        self.edge_binning = edge_binning(self.core)
        self._values = camera_binnings(self.core) if self.edge_binning > 1 else {}
        self._binning = 1
        self._field_pixel_um = self.pixel_um
        #: the binning fields were taken at (the record's ``edge_binning``)
        self.used_binning = 1

    def _set_binning(self, b: int) -> None:
        if b == self._binning:
            return
        cam = self.core.getCameraDevice()
        self.core.setProperty(cam, BINNING, self._values.get(b, b))
        self._binning = b
        # the core scales the calibrated pixel size (and affine) by the camera's binning
        self._field_pixel_um = float(self.core.getPixelSizeUm())

    def unbin(self) -> None:
        """Binning 1 again (the scan's tiles and the die fields are unbinned)."""
        from devices.errors import HardwareError

        if self._binning == 1:
            return
        try:
            self._set_binning(1)
        except Exception as exc:
            # not an AlignmentError: `auto` must not go on to scan binned tiles
            raise HardwareError(f"camera: binning 1 could not be restored after the "
                                f"alignment's edge fields ({exc})") from exc

    def snap(self, kind: str, x: float, y: float, binned: bool = False
             ) -> tuple[np.ndarray, float]:
        """The field at ``(x, y)`` and its pixel size (µm); ``binned``: at the edge fields'
        binning."""
        core = self.core
        xy = core.getXYStageDevice()
        if binned:
            self._set_binning(self.edge_binning)
            self.used_binning = self.edge_binning
        else:
            self.unbin()
        try:
            self.engine._retry(lambda: (core.setXYPosition(x, y), core.waitForDevice(xy)),
                               f"alignment move to ({x:.0f}, {y:.0f}) µm")
            self.engine._retry(core.snapImage, "alignment snap")
        except self.lost as exc:
            raise AlignmentError(f"scan.align: {exc}") from None
        image = np.asarray(core.getImage(), dtype=np.float32)
        p = self._field_pixel_um
        self.images.append((kind, x, y, image, p))
        return image, p


def align(handle: Any, recipe: Any, folder: Path | None = None) -> Alignment:
    """Measure where the recipe's wafer or PV cell lies (see the module docstring).

    Raises
    ------
    AlignmentError
        No edge where the recipe expects the sample, no notch or flat, or alignment sites
        that disagree; ``alignment.png`` in ``folder`` shows what was seen.
    """
    from .plan import plan_scan

    scope = _Scope(handle, recipe)
    t0 = handle.hardware_time_s()
    seen: list[tuple[float, float]] = []
    # from where the stage is, through the fields, to the first tile the nominal plan has
    # (the sample moves by a fraction of a tile, the first tile hardly)
    tiles = plan_scan(recipe, handle.fov_um()).tiles
    route = plan_route(recipe, tuple(scope.core.getXYPosition()),
                       (tiles[0].x_um, tiles[0].y_um) if tiles else None)
    try:
        try:
            if recipe.sample.kind == "pv_cell":
                result = _align_cell(scope, recipe.sample, seen, route)
            else:
                result = _align_wafer(scope, recipe.sample, seen, route)
        finally:
            scope.unbin()
    except AlignmentError:
        if folder is not None:
            draw_alignment(folder / ALIGNMENT_PNG, scope, seen, None)
        raise
    t1 = handle.hardware_time_s()
    result = result.model_copy(update={"hardware_s": None if t0 is None or t1 is None
                                       else round(t1 - t0, 3),
                                       "edge_binning": scope.used_binning})
    if folder is not None:
        draw_alignment(folder / ALIGNMENT_PNG, scope, seen, result)
    return result


def _edge_points(p: float, image: np.ndarray, fx: float, fy: float,
                 centre: tuple[float, float], angle: float, r_nom: float
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Edge points (stage µm) of one field of ``p`` µm pixels along rays through it:
    ``(angles, points)``."""
    h, w = image.shape
    half = 0.5 * math.hypot(h, w) * p
    span = math.degrees(half / r_nom)
    angles = angle + np.linspace(-span, span, 2 * max(h, w))
    r = ray_edges(image, (fx, fy), p, centre, angles, r_nom + half, r_nom - half)
    ok = np.isfinite(r)
    ang = np.radians(angles[ok])
    pts = np.c_[centre[0] + r[ok] * np.cos(ang), centre[1] + r[ok] * np.sin(ang)]
    return angles[ok], pts


def _align_wafer(scope: _Scope, sample: Any, seen: list[tuple[float, float]],
                 route: Route) -> Alignment:
    nominal = tuple(float(v) for v in sample.center_um)
    r_nom = sample.diameter_mm * 500.0
    sites: list[Site] = []
    circle_pts = []
    mark_field = None
    p = scope.pixel_um  # the edge fields' pixel (the circle's points)
    for kind, fx, fy, angle in route.edges:
        # edge and notch fields binned where the camera offers it; a flat's angle needs the
        # full resolution (see EDGE_BINNING)
        image, pf = scope.snap(kind, fx, fy, binned=kind != "flat")
        _, pts = _edge_points(pf, image, fx, fy, nominal, angle, r_nom)
        seen.extend(map(tuple, pts))
        if kind == "edge":
            p = pf
            # an edge through the field crosses most rays; a corner of one, a few
            if len(pts) < max(MIN_EDGE_POINTS, 0.25 * 2 * max(image.shape)):
                raise AlignmentError(
                    f"sample.center_um: no wafer edge found in the field at ({fx:.0f}, "
                    f"{fy:.0f}) µm (the wafer is not where the recipe puts it, within "
                    f"{0.5 * image.shape[1] * p:.0f} µm; see {ALIGNMENT_PNG})")
            circle_pts.append(pts)
            sites.append(Site(kind="edge", x_um=fx, y_um=fy, n_points=len(pts)))
        else:
            mark_field = (kind, fx, fy, angle, image, pf)
    pts = np.concatenate(circle_pts)
    if len(circle_pts) >= 3:
        cx, cy, r, rms, keep = fit_circle(pts, (*nominal, r_nom), clip_um=3 * p)
    else:
        # two arcs hardly fix a radius: the nominal one places the centre near enough to
        # tell the notch's arc from its V, and the fit below frees the radius again
        cx, cy, rms, keep = fit_circle_radius(pts, nominal, r_nom, clip_um=3 * p)
        r = r_nom
    if mark_field is not None and mark_field[0] == "notch":
        # the notch's field shows the circle beside the V too: another arc, so that each
        # field's landing error (the stage's repeatability) weighs less in the centre. Not
        # a flat's: its field is mostly flat, whose points near their median depth passed
        # for an arc once the tolerance grew with binned edge fields (their residual; the
        # centre 0.14-0.36 mm off along the flat's normal)
        kind, fx, fy, angle, image, pm = mark_field
        _, more = _edge_points(pm, image, fx, fy, (cx, cy), angle, r)
        res = np.hypot(more[:, 0] - cx, more[:, 1] - cy) - r
        # relative to the arc's own level: a wafer's radius off the nominal (two arcs) moves
        # the whole arc, the V lies far inside it
        level = float(np.median(res)) if len(res) else 0.0
        on_circle = np.abs(res - level) < max(4 * rms, 2 * pm)
        if on_circle.sum() >= MIN_EDGE_POINTS:
            pts = np.concatenate([pts, more[on_circle]])
            cx, cy, r, rms, keep = fit_circle(pts, (cx, cy, r), clip_um=3 * p)
    n_edge = int(keep.sum())
    rotation = 0.0
    mark_angle = None
    if mark_field is not None:
        kind, fx, fy, angle, image, pm = mark_field
        mark_angle, n_mark = _mark_angle(pm, sample, kind, image, fx, fy, (cx, cy), r)
        rotation = mark_angle - MARK_ANGLE_DEG
        sites.insert(1, Site(kind=kind, x_um=fx, y_um=fy, n_points=n_mark))
    edge_rotation = rotation
    grid = None
    die_rms = None
    if getattr(sample, "die_to_die", True):
        refined = _align_dies(scope, sample, (cx, cy), rotation, sites, route.dies)
        if refined is not None:
            grid, rotation, die_rms = refined
            if mark_field is not None and abs(rotation - edge_rotation) \
                    > MAX_DIE_EDGE_DISAGREEMENT_DEG:
                raise AlignmentError(
                    f"scan.align: the die grid is turned {rotation:.3f}° but the "
                    f"{sample.orientation} {edge_rotation:.3f}° (sites disagree beyond "
                    f"{MAX_DIE_EDGE_DISAGREEMENT_DEG}°; see {ALIGNMENT_PNG})")
    return Alignment(
        kind="wafer", nominal_center_um=nominal, center_um=(cx, cy), rotation_deg=rotation,
        edge_rotation_deg=edge_rotation if mark_field is not None else None,
        mark=sample.orientation, mark_angle_deg=mark_angle, radius_um=r,
        edge_residual_um=rms, n_edge_points=n_edge, die_grid=grid, die_residual_um=die_rms,
        sites=tuple(sites))


def _mark_angle(p: float, sample: Any, kind: str, image: np.ndarray, fx: float,
                fy: float, centre: tuple[float, float], radius: float) -> tuple[float, int]:
    """Direction (deg) of the notch's axis or the flat's normal, seen from the centre
    (``p``: the field's pixel size, µm)."""
    angles, pts = _edge_points(p, image, fx, fy, centre, MARK_ANGLE_DEG, radius)
    depth = radius - np.hypot(pts[:, 0] - centre[0], pts[:, 1] - centre[1])
    if kind == "notch":
        nominal_depth = min(sample.notch_depth_mm * 1000.0, 0.5 * radius)
        if len(depth) == 0 or depth.max() < 0.5 * nominal_depth:
            raise AlignmentError(
                f"sample.orientation: no notch found in the field at ({fx:.0f}, {fy:.0f}) µm "
                f"(deepest edge point {max(depth.max(), 0.0) if len(depth) else 0:.0f} µm "
                f"below the circle, the notch is {nominal_depth:.0f} µm deep; see "
                f"{ALIGNMENT_PNG})")
        # the V is symmetric about its axis: weights growing with the depth below a level
        # near its mouth average to the axis (rays from the centre, evenly spaced in angle)
        wts = np.clip(depth - 0.25 * nominal_depth, 0.0, None)
        return float(np.sum(angles * wts) / np.sum(wts)), int(np.count_nonzero(wts))
    sagitta = radius - _flat_distance(sample)
    on_flat = depth > 0.2 * sagitta
    if on_flat.sum() < MIN_EDGE_POINTS:
        raise AlignmentError(
            f"sample.orientation: no flat found in the field at ({fx:.0f}, {fy:.0f}) µm "
            f"(see {ALIGNMENT_PNG})")
    _, direction, _ = fit_line(pts[on_flat])
    normal = math.degrees(math.atan2(direction[0], -direction[1]))
    # the normal that points away from the centre
    mid = pts[on_flat].mean(axis=0)
    outward = math.degrees(math.atan2(mid[1] - centre[1], mid[0] - centre[0]))
    if abs(((normal - outward + 180) % 360) - 180) > 90:
        normal += 180.0
    normal = outward + ((normal - outward + 180) % 360 - 180)
    return float(normal), int(on_flat.sum())


def _align_dies(scope: _Scope, sample: Any, centre: tuple[float, float], rotation: float,
                sites: list[Site], corners: tuple[tuple[int, int], ...]
                ) -> tuple[dict[str, Any], float, float] | None:
    """Refine the rotation and the grid's origin at two die corners far apart."""
    from skimage.registration import phase_cross_correlation

    if len(corners) < 2:
        return None
    px, py = (v * 1000.0 for v in sample.die_pitch_mm)
    ox, oy = (v * 1000.0 for v in sample.die_origin_mm)
    th = math.radians(rotation)
    p = scope.pixel_um

    def predicted(c: int, r: int, th: float) -> tuple[float, float]:
        u, v = ox + c * px, oy + r * py
        return (centre[0] + math.cos(th) * u - math.sin(th) * v,
                centre[1] + math.sin(th) * u + math.cos(th) * v)

    measured = []
    template = None
    for c, r in corners:
        x, y = predicted(c, r, th)
        image, _ = scope.snap("die", x, y)
        h, w = image.shape
        cross = lane_cross(image, sample.scribe_width_um, p)
        if cross is None:
            raise AlignmentError(
                f"sample.die_origin_mm: no scribe-lane crossing seen at die ({c}, {r}) "
                f"corner ({x:.0f}, {y:.0f}) µm (see {ALIGNMENT_PNG})")
        absolute = np.array([x + (cross[0] - (w - 1) / 2) * p, y + (cross[1] - (h - 1) / 2) * p])
        if template is None:
            template = image
            relative = np.zeros(2)
        else:
            # shift of this corner's field against the first's: the same corner of the die
            shift, _, _ = phase_cross_correlation(template, image, upsample_factor=50,
                                                  normalization=None)
            relative = -np.array([shift[1], shift[0]]) * p
        measured.append((c, r, np.array([x, y]), absolute, relative))
    # absolute places from the lanes, relative ones from the correlation: the first corner's
    # place is the mean that both agree on
    first = np.mean([a - (pos - measured[0][2]) - rel for _, _, pos, a, rel in measured],
                    axis=0)
    places = [measured[0][2] + (pos - measured[0][2]) + rel + (first - measured[0][2])
              for _, _, pos, _, rel in measured]
    (c0, r0), (c1, r1) = corners[0], corners[-1]
    d = places[-1] - places[0]
    nominal_vec = np.array([(c1 - c0) * px, (r1 - r0) * py])
    turned = math.degrees(math.atan2(d[1], d[0]) - math.atan2(nominal_vec[1], nominal_vec[0]))
    turned = (turned + 180.0) % 360.0 - 180.0  # the sites in either order
    mismatch = abs(float(np.hypot(*d)) - float(np.hypot(*nominal_vec)))
    tolerance = site_tolerance_um(scope.repeatability_um, p)
    lane_rms = float(np.sqrt(np.mean([np.sum((a - pl) ** 2)
                                      for (_, _, _, a, _), pl in zip(measured, places,
                                                                      strict=True)])))
    for (c, r, pos, _, _), pl in zip(measured, places, strict=True):
        sites.append(Site(kind="die", x_um=float(pos[0]), y_um=float(pos[1]), die=(c, r),
                          residual_um=round(float(np.hypot(*(pl - pos))), 3)))
    if mismatch > tolerance:
        raise AlignmentError(
            f"scan.align: die corners ({c0}, {r0}) and ({c1}, {r1}) lie "
            f"{np.hypot(*d):.1f} µm apart, the die pitch puts them {np.hypot(*nominal_vec):.1f}"
            f" µm apart (sites disagree beyond {tolerance:.1f} µm, {SITE_SIGMAS:g} sigma of "
            f"the stage's repeatability; see {ALIGNMENT_PNG})")
    tr = math.radians(turned)
    origin = np.mean([pl - np.array([math.cos(tr) * c * px - math.sin(tr) * r * py,
                                     math.sin(tr) * c * px + math.cos(tr) * r * py])
                      for (c, r, *_), pl in zip(measured, places, strict=True)], axis=0)
    grid = {"pitch_um": [px, py], "origin_um": [float(origin[0]), float(origin[1])],
            "rotation_deg": turned}
    return grid, turned, max(lane_rms, mismatch)


def _align_cell(scope: _Scope, sample: Any, seen: list[tuple[float, float]],
                route: Route) -> Alignment:
    """A PV cell by its four sides: a line per side (:func:`fit_side`), centre and rotation
    from the lines."""
    nominal = tuple(float(v) for v in sample.center_um)
    sites = []
    lines = []
    n_inliers = 0
    for kind, fx, fy, angle in route.edges:
        # unbinned: with the RANSAC line, 2x binned gives the same centre (the stage's
        # landing error) but the rotation 0.021° max, 0.0055° rms against 0.0014° and
        # 0.0005° unbinned (demo cell, 20 placements: a side turned a little leans towards
        # the coarser pixel grid, as a flat does)
        image, p = scope.snap(kind, fx, fy)
        dist = math.hypot(fx - nominal[0], fy - nominal[1])
        _, pts = _edge_points(p, image, fx, fy, nominal, angle, dist)
        seen.extend(map(tuple, pts))
        if len(pts) < MIN_EDGE_POINTS:
            raise AlignmentError(
                f"sample.center_um: no cell edge found in the field at ({fx:.0f}, {fy:.0f}) "
                f"µm (the cell is not where the recipe puts it; see {ALIGNMENT_PNG})")
        point, direction, rms, inliers = fit_side(pts, p)
        kept = int(inliers.sum())
        if kept < max(MIN_EDGE_POINTS, MIN_SIDE_INLIERS * len(pts)):
            raise AlignmentError(
                f"sample.center_um: no straight cell edge in the field at ({fx:.0f}, "
                f"{fy:.0f}) µm (a line within {SIDE_INLIER_PX * p:.0f} µm holds {kept} of "
                f"{len(pts)} edge points; see {ALIGNMENT_PNG})")
        n_inliers += kept
        lines.append((point, direction, rms, angle))
        sites.append(Site(kind="side", x_um=fx, y_um=fy, n_points=kept,
                          residual_um=round(rms, 3)))
    # each side's direction, turned back to the x axis, gives the rotation
    turns = []
    for _, direction, _, angle in lines:
        a = math.degrees(math.atan2(direction[1], direction[0])) - (angle + 90.0)
        turns.append((a + 90.0) % 180.0 - 90.0)
    rotation = float(np.mean(turns))
    # the centre: where the mid-lines between opposite sides cross (a side's points sit at
    # its middle only up to the cell's shift along it)
    lines.sort(key=lambda ln: ln[3])  # right, bottom, left, top: opposite sides 2 apart
    cx, cy = _midline_cross(lines)
    return Alignment(kind="pv_cell", nominal_center_um=nominal, center_um=(cx, cy),
                     rotation_deg=rotation, mark="edges",
                     edge_residual_um=float(np.sqrt(np.mean([ln[2] ** 2 for ln in lines]))),
                     n_edge_points=n_inliers, sites=tuple(sites),
                     edge_rotation_deg=rotation)


def _midline_cross(lines: list[tuple[np.ndarray, np.ndarray, float, float]]
                   ) -> tuple[float, float]:
    """Where the line halfway between the left and right sides crosses the one halfway
    between the top and bottom sides."""
    def offset_line(a: tuple, b: tuple) -> tuple[np.ndarray, np.ndarray]:
        da, db = a[1], b[1] if np.dot(a[1], b[1]) > 0 else -b[1]
        d = (da + db) / np.linalg.norm(da + db)
        n = np.array([-d[1], d[0]])
        # the mid-line: points whose distances to both sides agree
        off = 0.5 * (np.dot(n, a[0]) + np.dot(n, b[0]))
        return n, np.array(off)

    n1, o1 = offset_line(lines[0], lines[2])
    n2, o2 = offset_line(lines[1], lines[3])
    x, y = np.linalg.solve(np.array([n1, n2]), np.array([o1, o2]))
    return float(x), float(y)


# --------------------------------------------------------------------------- picture


def draw_alignment(path: Path, scope: _Scope, seen: list[tuple[float, float]],
                   result: Alignment | None) -> None:
    """``alignment.png``: each field taken, with the edge points found on it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(scope.images), 1)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.6), squeeze=False)
    pts = np.asarray(seen, dtype=float).reshape(-1, 2)
    for ax, (kind, x, y, image, p) in zip(axes[0], scope.images, strict=False):
        h, w = image.shape
        extent = (x - w / 2 * p, x + w / 2 * p, y + h / 2 * p, y - h / 2 * p)
        ax.imshow(image, cmap="gray", extent=extent)
        inside = ((np.abs(pts[:, 0] - x) <= w / 2 * p) & (np.abs(pts[:, 1] - y) <= h / 2 * p))
        ax.plot(pts[inside, 0], pts[inside, 1], ",", color="tab:red")
        binned = f", {round(p / scope.pixel_um)}x binned" if p > 1.01 * scope.pixel_um else ""
        ax.set_title(f"{kind} ({x / 1000:.1f}, {y / 1000:.1f}) mm{binned}", fontsize=8)
        ax.tick_params(labelsize=6)
    if result is None:
        fig.suptitle("alignment refused: what the fields showed (edge points in red)",
                     fontsize=9)
    else:
        fig.suptitle(f"centre ({result.center_um[0]:.1f}, {result.center_um[1]:.1f}) µm, "
                     f"rotation {result.rotation_deg:.4f}°", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)

