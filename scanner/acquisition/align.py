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

The record lives in :mod:`scanner.acquisition.alignrecord`, the route in
:mod:`scanner.acquisition.alignplan` and the measures on one field's image in
:mod:`scanner.acquisition.alignimage`; this module takes the fields and combines them.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from scanner.acquisition.alignimage import (
    fit_circle,
    fit_circle_radius,
    fit_line,
    lane_cross,
    ray_edges,
)
from scanner.acquisition.alignplan import MARK_ANGLE_DEG, Route, _flat_distance, plan_route
from scanner.acquisition.alignplan import (
    alignment_fields as alignment_fields,  # the CLI's `validate`
)
from scanner.acquisition.alignplan import estimate_alignment_time_s as estimate_alignment_time_s
from scanner.acquisition.alignplan import wants_alignment as wants_alignment
from scanner.acquisition.alignrecord import Alignment, AlignmentError, Site
from scanner.acquisition.alignrecord import (
    to_wafer_frame as to_wafer_frame,  # scanner.reports.locate
)
from scanner.travel import check_positions, travel_limits

log = logging.getLogger("waferscope.align")

ALIGNMENT_PNG = "alignment.png"
#: the picture of a `run --overwrite` whose alignment was refused, kept in the earlier scan it
#: left in place (the refusal cites it)
REFUSED_ALIGNMENT_PNG = "alignment_refused.png"

#: a die-grid rotation further than this from the edge's is a disagreement
MAX_DIE_EDGE_DISAGREEMENT_DEG = 0.15
#: die sites disagree when their measured distance differs from the pitch's by more than this
#: many standard deviations of the stage's landing noise (plus the measurement floor below)
SITE_SIGMAS = 5.0
#: what the lane and the correlation measure a corner to, in pixels, whatever the stage
SITE_FLOOR_PX = 2.0
#: a mark seen farther than this share of its field's side from the field's middle is taken
#: again where the fitted circle puts it
MARK_OFF_MIDDLE = 0.15
#: a wafer's edge points lie on their circle within this many edge-field pixels (about 0.2
#: on the simulated wafers, a few where the stage lands each field microns off) ...
EDGE_FIT_PIXELS = 5.0
#: ... or this many micrometres (fine pixels: the fields' landing errors dominate)
EDGE_FIT_MIN_UM = 25.0
#: edge points a field must give to count as "edge found"
MIN_EDGE_POINTS = 20
#: the largest camera turn (deg) looked for in the edge fields when none is calibrated and
#: their points fit no circle as read (the turns stitching looks for, see README)
MAX_CAMERA_TURN_DEG = 5.0
#: a PV cell side's RANSAC line takes points this many of the field's pixels off it: the
#: edge is found to a fraction of a pixel (the demo cell's sides: 1-3.4 µm rms on 30 µm
#: pixels), a ray that ends on a finger or a busbar ends one to hundreds of pixels inside
SIDE_INLIER_PX = 2.0
#: share of a PV cell side's half-length (either side of its middle) its rays may reach
SIDE_MIDDLE = 0.6
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


def camera_rotation_deg(core: Any) -> float:
    """The camera's rotation (deg) in the core's pixel-to-stage affine (0: none set)."""
    try:
        a = [float(v) for v in core.getPixelSizeAffine()]
    except Exception:  # noqa: BLE001 - no pixel configuration: the camera is not turned
        return 0.0
    if len(a) < 4 or not any(a[:2]) or not all(math.isfinite(v) for v in a[:4]):
        return 0.0
    return math.degrees(math.atan2(a[3], a[0]))


def _turned(dx: float, dy: float, deg: float) -> np.ndarray:
    """``(dx, dy)`` turned by ``deg`` (from +x towards +y)."""
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([c * dx - s * dy, s * dx + c * dy])


class _Scope:
    """Moves and snaps through the Micro-Manager core, with the scan's retries.

    Edge and notch fields are taken binned where the camera offers it (:func:`edge_binning`):
    a b x b sum has a b times coarser pixel and b times the signal-to-noise, and the edge (a
    step across the field) is still found to a fraction of the coarser pixel. The
    die fields stay unbinned (their lanes and pattern need the full resolution), and
    :meth:`unbin` puts the camera back before the scan's tiles.
    """

    def __init__(self, handle: Any, recipe: Any) -> None:
        from scanner.acquisition.acquire import ScanEngine, _TileLost

        self.core = handle.core
        self.engine = ScanEngine(self.core, retries=recipe.scan.retries,
                                 timeout_s=recipe.scan.device_timeout_s)
        self.lost = _TileLost
        self.pixel_um = float(self.core.getPixelSizeUm())
        #: the camera's rotation against the stage (deg, from +x towards +y) as a calibration
        #: set it in the core's pixel affine (0 without one): a die's lanes lie at the
        #: wafer's rotation less this in the image, and a pixel offset is turned by it
        self.camera_rotation_deg = camera_rotation_deg(self.core)
        #: where the stage may go (every field is checked before the stage moves to it)
        self.travel = travel_limits(recipe, self.core)
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
        outside = check_positions(self.travel, [(f"the {kind} alignment field", x, y)])
        if outside:
            # never driven there: a stage without limits of its own would go
            raise AlignmentError(outside)
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
    from scanner.acquisition.plan import plan_scan

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
                result = _align_wafer(scope, recipe.sample, seen, route,
                                      strict=recipe.scan.align != "auto")
        finally:
            scope.unbin()
    except AlignmentError:
        if folder is not None:
            draw_alignment(folder / ALIGNMENT_PNG, scope, seen, None)
        raise
    t1 = handle.hardware_time_s()
    result = result.model_copy(update={"hardware_s": None if t0 is None or t1 is None
                                       else round(t1 - t0, 3),
                                       "edge_binning": scope.used_binning,
                                       "camera_rotation_deg": scope.camera_rotation_deg})
    if folder is not None:
        draw_alignment(folder / ALIGNMENT_PNG, scope, seen, result)
    return result


def _edge_points(p: float, image: np.ndarray, fx: float, fy: float,
                 centre: tuple[float, float], angle: float, r_nom: float, cam: float = 0.0,
                 max_span_deg: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Edge points (stage µm) of one field of ``p`` µm pixels along rays through it:
    ``(angles, points)``; rays at most ``max_span_deg`` either side of ``angle``."""
    h, w = image.shape
    half = 0.5 * math.hypot(h, w) * p
    span = math.degrees(half / r_nom)
    if max_span_deg is not None:
        span = min(span, max_span_deg)
    angles = angle + np.linspace(-span, span, 2 * max(h, w))
    r = ray_edges(image, (fx, fy), p, centre, angles, r_nom + half, r_nom - half, cam)
    ok = np.isfinite(r)
    ang = np.radians(angles[ok])
    pts = np.c_[centre[0] + r[ok] * np.cos(ang), centre[1] + r[ok] * np.sin(ang)]
    return angles[ok], pts


def _align_wafer(scope: _Scope, sample: Any, seen: list[tuple[float, float]],
                 route: Route, strict: bool = True) -> Alignment:
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
        _, pts = _edge_points(pf, image, fx, fy, nominal, angle, r_nom,
                              scope.camera_rotation_deg)
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
    def fit(pts: np.ndarray) -> tuple[float, float, float, float, np.ndarray]:
        if len(circle_pts) >= 3:
            return fit_circle(pts, (*nominal, r_nom), clip_um=3 * p)
        # two arcs hardly fix a radius: the nominal one places the centre near enough to
        # tell the notch's arc from its V, and the fit below frees the radius again
        cx, cy, rms, keep = fit_circle_radius(pts, nominal, r_nom, clip_um=3 * p)
        return cx, cy, r_nom, rms, keep

    pts = np.concatenate(circle_pts)
    cx, cy, r, rms, keep = fit(pts)
    limit = max(EDGE_FIT_PIXELS * p, EDGE_FIT_MIN_UM)
    if not rms <= limit and scope.camera_rotation_deg == 0.0:
        # no calibration: a camera turned against the stage moves each field's points about
        # its middle, by the turn times their distance from it (4 deg on an 8 mm field: the
        # rim 280 µm off, a good wafer refused); the turn that puts them on a circle is the
        # camera's
        fields = [(site.x_um, site.y_um) for site in sites]
        turn = _camera_turn(fields, circle_pts, fit, limit)
        if turn is not None:
            cam, pts, (cx, cy, r, rms, keep) = turn
            scope.camera_rotation_deg = cam
            log.warning("the edge fields fit the wafer's circle with the camera turned "
                        "%.2f deg against the stage (no microscope.calibration); the "
                        "alignment reads the fields so (waferscope calibrate measures it)",
                        cam)
    if not rms <= limit:
        # enough "edge points" on a field of bare chuck (its blotches), but on no circle: a
        # wafer 20 mm off its place was aligned to a 476 um residual and scanned (exit 0)
        raise AlignmentError(
            f"sample.center_um: no wafer edge found where the recipe puts the wafer: the edge "
            f"fields' points lie {rms:.0f} µm from the best circle (a wafer's edge, within "
            f"{limit:.0f} µm); see {ALIGNMENT_PNG}")
    if mark_field is not None:
        mark_field = _mark_in_view(scope, sample, mark_field, (cx, cy), r)
    if mark_field is not None and mark_field[0] == "notch":
        # the notch's field shows the circle beside the V too: another arc, so that each
        # field's landing error (the stage's repeatability) weighs less in the centre. Not
        # a flat's: its field is mostly flat, whose points near their median depth passed
        # for an arc once the tolerance grew with binned edge fields (their residual; the
        # centre 0.14-0.36 mm off along the flat's normal)
        kind, fx, fy, angle, image, pm = mark_field
        _, more = _edge_points(pm, image, fx, fy, (cx, cy), angle, r, scope.camera_rotation_deg)
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
        mark_angle, n_mark = _mark_angle(pm, sample, kind, image, fx, fy, (cx, cy), r,
                                         scope.camera_rotation_deg)
        rotation = mark_angle - MARK_ANGLE_DEG
        sites.insert(1, Site(kind=kind, x_um=fx, y_um=fy, n_points=n_mark))
    edge_rotation = rotation
    grid = None
    die_rms = None
    skipped = None
    if getattr(sample, "die_to_die", True):
        try:
            refined = _align_dies(scope, sample, (cx, cy), rotation, sites, route.dies)
            if refined is not None and mark_field is not None and \
                    abs(refined[1] - edge_rotation) > MAX_DIE_EDGE_DISAGREEMENT_DEG:
                raise AlignmentError(
                    f"scan.align: the die grid is turned {refined[1]:.3f}° but the "
                    f"{sample.orientation} {edge_rotation:.3f}° (sites disagree beyond "
                    f"{MAX_DIE_EDGE_DISAGREEMENT_DEG}°; see {ALIGNMENT_PNG})")
        except AlignmentError as exc:
            if strict:
                raise
            # `auto`: the edge and the mark placed the wafer; throwing that away for the
            # recipe's placement put a wafer turned 1.4° 300 µm off in every coordinate
            refined, skipped = None, str(exc)
            sites[:] = [site for site in sites if site.kind != "die"]
        if refined is not None:
            grid, rotation, die_rms = refined
    return Alignment(
        kind="wafer", nominal_center_um=nominal, center_um=(cx, cy), rotation_deg=rotation,
        edge_rotation_deg=edge_rotation if mark_field is not None else None,
        mark=sample.orientation, mark_angle_deg=mark_angle, radius_um=r,
        edge_residual_um=rms, n_edge_points=n_edge, die_grid=grid, die_residual_um=die_rms,
        die_sites_skipped=skipped, sites=tuple(sites),
        rotation_seen_in_image=grid is None and sample.orientation == "flat")


def _camera_turn(fields: list[tuple[float, float]], points: list[np.ndarray],
                 fit: Any, limit: float) -> tuple[float, np.ndarray, tuple] | None:
    """The camera turn (deg, within :data:`MAX_CAMERA_TURN_DEG`) under which the edge
    fields' ``points`` (read unturned, one array per field centred at ``fields``) fit a
    circle within ``limit``: ``(turn, points turned, fit(points turned))`` (None: none)."""
    from scipy.optimize import minimize_scalar

    def turned(deg: float) -> np.ndarray:
        c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
        rot = np.array([[c, -s], [s, c]])
        return np.concatenate([f + (pts - f) @ rot.T
                               for f, pts in zip(np.asarray(fields), points, strict=True)])

    def rms(deg: float) -> float:
        return fit(turned(deg))[3]

    grid = np.arange(-MAX_CAMERA_TURN_DEG, MAX_CAMERA_TURN_DEG + 1e-9, 0.25)
    best = float(grid[int(np.argmin([rms(d) for d in grid]))])
    found = minimize_scalar(rms, bounds=(max(best - 0.25, -MAX_CAMERA_TURN_DEG),
                                         min(best + 0.25, MAX_CAMERA_TURN_DEG)),
                            method="bounded", options={"xatol": 1e-3})
    deg = float(found.x)
    pts = turned(deg)
    result = fit(pts)
    return (deg, pts, result) if result[3] <= limit else None


def _mark_in_view(scope: _Scope, sample: Any, field: tuple, centre: tuple[float, float],
                  radius: float) -> tuple:
    """The mark's field, taken again where the fitted circle puts the mark when the first
    one, at the recipe's placement, saw it off its middle.

    A wafer placed 2.5 mm off in a 5 mm field showed only part of the notch's V, and its
    angle came out 0.84° (the die sites then disagreed and the alignment was dropped).
    """
    kind, fx, fy, angle, image, pf = field
    depth = radius - _flat_distance(sample) if kind == "flat" else 0.0
    th = math.radians(MARK_ANGLE_DEG)
    ex = centre[0] + (radius - depth) * math.cos(th)
    ey = centre[1] + (radius - depth) * math.sin(th)
    if math.hypot(ex - fx, ey - fy) <= MARK_OFF_MIDDLE * min(image.shape) * pf:
        return field
    image, pf = scope.snap(kind, ex, ey, binned=kind != "flat")
    return kind, ex, ey, angle, image, pf


def _mark_angle(p: float, sample: Any, kind: str, image: np.ndarray, fx: float,
                fy: float, centre: tuple[float, float], radius: float, cam: float = 0.0
                ) -> tuple[float, int]:
    """Direction (deg) of the notch's axis or the flat's normal, seen from the centre
    (``p``: the field's pixel size, µm; ``cam``: the camera's rotation, deg)."""
    angles, pts = _edge_points(p, image, fx, fy, centre, MARK_ANGLE_DEG, radius, cam)
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
        # only about the V (its 90 deg opening is twice its depth wide): a field many
        # millimetres wide read with a camera turned 2 deg that nothing measured has its
        # arc a quarter of the notch's depth below the circle at one side, and weighed
        # there the notch's axis came out 7.4 deg off (probe P16)
        bottom = float(np.median(angles[depth >= 0.75 * depth.max()]))
        half = math.degrees(2.0 * nominal_depth / radius)
        wts[np.abs(angles - bottom) > half] = 0.0
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
    cam = scope.camera_rotation_deg  # pixel offsets are turned by it onto the stage
    for c, r in corners:
        x, y = predicted(c, r, th)
        image, _ = scope.snap("die", x, y)
        h, w = image.shape
        cross = lane_cross(image, sample.scribe_width_um, p, rotation - cam)
        if cross is None:
            raise AlignmentError(
                f"sample.die_origin_mm: no scribe-lane crossing seen at die ({c}, {r}) "
                f"corner ({x:.0f}, {y:.0f}) µm (see {ALIGNMENT_PNG})")
        absolute = np.array([x, y]) + _turned((cross[0] - (w - 1) / 2) * p,
                                              (cross[1] - (h - 1) / 2) * p, cam)
        if template is None:
            template = image
            relative = np.zeros(2)
        else:
            # shift of this corner's field against the first's: the same corner of the die
            shift, _, _ = phase_cross_correlation(template, image, upsample_factor=50,
                                                  normalization=None)
            # a field holding more than one die repeats itself a pitch away, and the
            # correlation's peak may be any of the repeats: the corners were snapped where
            # the edge alignment puts them, far closer than half a pitch, so the nearest
            # repeat is the shift (a 2.2 mm pitch in 5 mm fields measured one pitch short)
            period = np.array([py, px]) / p
            shift = shift - np.round(shift / period) * period
            relative = -_turned(shift[1] * p, shift[0] * p, cam)
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
    if lane_rms > tolerance:
        # the lanes and the correlation place the same corners apart: a "lane" that is none
        # (lanes of a pixel or two in fields holding several dies: both sites 2.3 mm off
        # alike passed the distance check, and every die index of the scan was one row off)
        raise AlignmentError(
            f"scan.align: the scribe-lane crossings at die corners ({c0}, {r0}) and ({c1}, "
            f"{r1}) lie {lane_rms:.1f} µm (rms) from where the fields' correlation puts "
            f"them (beyond {tolerance:.1f} µm; see {ALIGNMENT_PNG})")
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
        # rays on the side's middle only: a field wider than a small coupon also holds the
        # sides beside it, whose points are no line with this one's
        along = (sample.height_mm if angle % 180.0 == 0.0 else sample.width_mm) * 500.0
        reach = math.degrees(math.atan2(SIDE_MIDDLE * along, dist))
        _, pts = _edge_points(p, image, fx, fy, nominal, angle, dist, scope.camera_rotation_deg,
                              max_span_deg=reach)
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
                     edge_rotation_deg=rotation, rotation_seen_in_image=True)


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

