"""Planning: tile positions that cover the sample, checked against the stage's travel.

The plan is computed from the recipe and the camera's field of view only; nothing moves.
The recipe is resolved here once (:func:`resolve_plan`) into a frozen :class:`ScanPlan`:
tiles, exposure, the travel check and the hardware-time estimate. The later stages read the
plan rather than deriving these from the recipe again.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import useq
from shapely import union_all
from shapely.geometry import Polygon, box

from scanner.errors import PlanError
from scanner.geometry import usable_polygon
from scanner.recipe import Recipe, die_count_problem
from simulators.stage import xy_move_time_s

_ORDER_MODES = {"serpentine": "row_wise_snake", "raster": "row_wise"}


@dataclass(frozen=True)
class Tile:
    """One planned field of view: its centre on the stage and its place in the grid."""

    index: int
    row: int
    col: int
    x_um: float
    y_um: float
    z_um: float


@dataclass(frozen=True)
class ScanPlan:
    """The tiles of a scan, in acquisition order, what they cover and what they cost.

    Attributes
    ----------
    tiles : tuple of Tile
        The fields of view in acquisition order.
    fov_um, step_um : (float, float)
        Field of view and grid step (x, y) at the sample.
    region : Polygon
        The part of the sample the tiles cover (stage µm).
    n_rows, n_cols : int
        Size of the tile grid.
    recipe_name : str
        The recipe's name (the MDA sequence's metadata).
    exposure_ms : float
        Exposure of every tile (:func:`exposure_for`).
    estimated_hardware_s : float
        Moves, settling, exposures and readout (:func:`estimate_hardware_time_s`).
    travel_checked : bool
        Whether every tile was checked against the stage's and focus drive's travel
        (:func:`resolve_plan` checks; :func:`plan_scan` alone does not).
    """

    tiles: tuple[Tile, ...]
    fov_um: tuple[float, float]
    step_um: tuple[float, float]
    region: Polygon
    n_rows: int
    n_cols: int
    recipe_name: str = ""
    exposure_ms: float = 10.0
    estimated_hardware_s: float = 0.0
    travel_checked: bool = False

    @property
    def region_area_mm2(self) -> float:
        """Area of the sample region to be scanned."""
        return float(self.region.area) / 1e6

    @property
    def scanned_area_mm2(self) -> float:
        """Area the tiles cover on the stage (overlaps counted once)."""
        w, h = self.fov_um
        boxes = [box(t.x_um - w / 2, t.y_um - h / 2, t.x_um + w / 2, t.y_um + h / 2)
                 for t in self.tiles]
        return float(union_all(boxes).area) / 1e6

    def positions_um(self) -> np.ndarray:
        """(N, 2) array of tile centres (x, y)."""
        return np.array([(t.x_um, t.y_um) for t in self.tiles], dtype=float)

    def summary(self) -> dict[str, Any]:
        """What ``validate`` prints and ``scan.json`` records about the plan."""
        return {
            "n_tiles": len(self.tiles),
            "n_rows": self.n_rows,
            "n_cols": self.n_cols,
            "fov_um": list(self.fov_um),
            "step_um": list(self.step_um),
            "region_area_mm2": round(self.region_area_mm2, 4),
            "scanned_area_mm2": round(self.scanned_area_mm2, 4),
            "exposure_ms": self.exposure_ms,
            "estimated_hardware_s": round(self.estimated_hardware_s, 3),
        }


def _scanned_part(region: Polygon, recipe: Recipe) -> Polygon:
    """The part of the sample's region that ``scan.region`` asks for (all of it by default).

    Raises
    ------
    PlanError
        If the band misses the sample.
    """
    spec = recipe.scan.region
    if spec is None or spec.band_mm is None:
        return region
    x0, y_min, x1, y_max = region.bounds
    mid = (y_min + y_max) / 2
    part = region.intersection(box(x0, mid + spec.band_mm[0] * 1000.0,
                                   x1, mid + spec.band_mm[1] * 1000.0))
    if part.is_empty or part.geom_type != "Polygon":
        raise PlanError(f"scan.region.band_mm: {list(spec.band_mm)} mm from the middle of the "
                        f"sample (which spans {(y_max - y_min) / 1000:g} mm in y) "
                        + ("misses it" if part.is_empty else "cuts it in pieces"))
    return part


def plan_scan(recipe: Recipe, fov_um: tuple[float, float],
              alignment: dict | None = None) -> ScanPlan:
    """Cover the recipe's sample region with overlapping tiles.

    Uses useq-schema's ``GridFromPolygon`` so the grid is the same one a Micro-Manager user
    would get; only tiles that touch the region are kept.

    Parameters
    ----------
    recipe : Recipe
        Validated recipe.
    fov_um : (float, float)
        Field of view (width, height) in µm at the sample.
    alignment : dict, optional
        Where the sample was found (``scanner.acquisition.align``'s record): the tiles cover it
        there.

    Raises
    ------
    PlanError
        If the plan is empty or larger than ``scan.max_tiles``.
    """
    region = _scanned_part(usable_polygon(recipe.sample, notch=False, alignment=alignment),
                           recipe)
    overlap_pct = recipe.scan.overlap * 100.0
    # the tiles over the region's bounding box, counted before useq lists them: a region of
    # 10^10 tiles (a pixel size off by 1000) would fill the memory before the limit below
    x_min, y_min, x_max, y_max = region.bounds
    sx, sy = (f * (1 - recipe.scan.overlap) for f in fov_um)
    around = ((x_max - x_min) / sx + 2) * ((y_max - y_min) / sy + 2)  # float: may be inf
    if around > max(100 * recipe.scan.max_tiles, 10_000_000):
        raise PlanError(
            f"scan.max_tiles: the plan needs about {around:.3g} tiles, more than the limit "
            f"{recipe.scan.max_tiles} (check the sample's size and the camera's pixel size)")
    grid = useq.GridFromPolygon(
        vertices=[tuple(v) for v in np.asarray(region.exterior.coords)[:-1]],
        overlap=overlap_pct,
        mode=_ORDER_MODES[recipe.scan.order],
        fov_width=fov_um[0],
        fov_height=fov_um[1],
    )
    n = grid.num_positions()
    if n == 0:
        raise PlanError("sample: the scan region is empty")
    if n > recipe.scan.max_tiles:
        raise PlanError(
            f"scan.max_tiles: the plan needs {n} tiles, more than the limit "
            f"{recipe.scan.max_tiles} (raise it, or scan a smaller region)"
        )
    step = (fov_um[0] * (1 - recipe.scan.overlap), fov_um[1] * (1 - recipe.scan.overlap))
    raw = list(grid.iter_grid_positions())
    xs = np.array([p.x for p in raw])
    ys = np.array([p.y for p in raw])
    # our rows grow with +y (image rows); useq counts rows from the top of a y-up frame
    rows = np.rint((ys - ys.min()) / step[1]).astype(int)
    cols = np.rint((xs - xs.min()) / step[0]).astype(int)
    z = recipe.microscope.focus.z_um
    tiles = tuple(
        Tile(i, int(r), int(c), float(x), float(y), float(z))
        for i, (r, c, x, y) in enumerate(zip(rows, cols, xs, ys, strict=True))
    )
    plan = ScanPlan(
        tiles=tiles,
        fov_um=fov_um,
        step_um=step,
        region=region,
        n_rows=int(rows.max()) + 1,
        n_cols=int(cols.max()) + 1,
        recipe_name=recipe.name,
        exposure_ms=exposure_for(recipe),
    )
    return replace(plan, estimated_hardware_s=estimate_hardware_time_s(plan, recipe))


#: two tiles land apart from plan by up to this many standard deviations of the difference
#: of two landings (sqrt(2) x the stage's repeatability)
LANDING_SIGMAS = 3.0
#: narrowest overlap registration measures (camera pixels; ``registration.pairwise``)
MIN_REGISTERED_OVERLAP_PX = 8


def overlap_warning(recipe: Recipe, fov_um: tuple[float, float], pixel_size_um: float
                    ) -> str | None:
    """A warning when the tiles' overlap is not wider than the stage's landing error (None:
    it is).

    Two tiles then often overlap by less than registration can measure, or leave a gap: a
    coin die grid scanned with 5 % overlap of a 640 x 480 px camera (24 um) on a stage of
    5 um repeatability had tiles placed 9 um off and half its reports false; with 10 %, none.
    """
    overlap_um = recipe.scan.overlap * min(fov_um)
    rep = recipe.microscope.stage.repeatability_um
    landing_um = LANDING_SIGMAS * math.sqrt(2.0) * rep
    needed_um = landing_um + MIN_REGISTERED_OVERLAP_PX * pixel_size_um
    if overlap_um >= needed_um:
        return None
    suggest = math.ceil(20.0 * needed_um / min(fov_um)) / 20.0
    return (f"scan.overlap: {recipe.scan.overlap:g} leaves {overlap_um:.0f} µm between "
            f"neighbouring tiles, but the stage lands two of them up to {landing_um:.0f} µm "
            f"nearer to or farther from each other than planned ({LANDING_SIGMAS:g} sigma of "
            f"microscope.stage.repeatability_um {rep:g}): some pairs will overlap too little "
            f"to register, or not at all; use an overlap of at least {min(suggest, 0.5):.2f}")


def check_die_grid(recipe: Recipe, pixel_size_um: float) -> None:
    """Refuse a die grid that no report or die-to-die comparison can use on this camera.

    A die smaller than a camera pixel cannot be told from its neighbours; one smaller than
    the die-to-die comparison's least die (``MIN_DIE_PX`` pixels,
    :mod:`scanner.diegrid`) is never compared on a wafer, so ``die_to_die: true`` asks for
    what cannot run there; and a grid of more than :data:`scanner.recipe.MAX_DIES` cells would
    fill the memory when the dies are listed (the recipe refuses that for a wafer or a
    rectangle, whose extent it knows; an image's is known once its file is read). Checked
    before anything moves, not after the scan.

    Parameters
    ----------
    recipe : Recipe
        Validated recipe.
    pixel_size_um : float
        The camera's pixel size at the sample (the mosaic's).

    Raises
    ------
    PlanError
        Naming ``sample.die_pitch_mm``.
    """
    # the very limit the comparison applies, so that validation and inspection agree
    from scanner.diegrid import MIN_DIE_PX, sample_grid

    sample = recipe.sample
    grid = sample_grid(sample)
    if grid is None:
        return
    given = f"sample.die_pitch_mm: {[float(v) for v in sample.die_pitch_mm]} mm"
    if pixel_size_um > 0:
        pitch_px = min(grid.pitch_um) / pixel_size_um
        if pitch_px < 1:
            raise PlanError(f"{given} is {pitch_px:.3g} camera pixels ({pixel_size_um:g} µm) "
                            "a die: a die must span at least one pixel (the pitch is in mm)")
        # only when asked for: a wafer's die_to_die defaults to true, and inspection leaves
        # dies that small to the detector alone, as it always has (an image's or a
        # rectangle's are compared cell to cell: scanner.inspection.celltocell)
        if sample.die_to_die is True and "die_to_die" in sample.model_fields_set \
                and pitch_px < MIN_DIE_PX and sample.kind == "wafer":
            raise PlanError(f"{given} is {pitch_px:.3g} camera pixels ({pixel_size_um:g} µm) "
                            f"a die, fewer than the {MIN_DIE_PX} die-to-die comparison needs; "
                            "set sample.die_to_die: false or use a finer camera")
    x0, y0, x1, y1 = usable_polygon(sample, notch=False).bounds
    problem = die_count_problem(sample.die_pitch_mm, ((x1 - x0) / 1000.0, (y1 - y0) / 1000.0))
    if problem:
        raise PlanError(f"sample.{problem}")


def resolve_plan(recipe: Recipe, fov_um: tuple[float, float],
                 alignment: dict | None = None, pixel_size_um: float | None = None,
                 core: Any = None) -> ScanPlan:
    """The recipe resolved once for a scan: :func:`plan_scan`, refused by
    :func:`check_travel` if any tile leaves the travel range (before anything moves) and,
    given the camera's ``pixel_size_um``, by :func:`check_die_grid` if its die grid
    cannot be used.

    Raises
    ------
    PlanError
        If the plan is empty, too large, or needs a position outside the travel, or the
        die grid is too fine.
    """
    check_exposure(recipe)
    if pixel_size_um is not None:
        check_die_grid(recipe, pixel_size_um)
        check_finger_pitch(recipe, pixel_size_um)
    plan = plan_scan(recipe, fov_um, alignment)
    if pixel_size_um is not None:
        check_region_size(plan, pixel_size_um)
    check_travel(plan, recipe, core)
    return replace(plan, travel_checked=True)


def check_exposure(recipe: Recipe) -> None:
    """Refuse an exposure (and the camera's readout) that the watchdog would never wait for:
    3 s exposures under a 2 s ``scan.device_timeout_s`` timed out on every snap, each retry
    starting a snap while the last one still ran, and the scan ended with no tile (its
    recorded recipe cannot change for a resume).

    Raises
    ------
    PlanError
        Naming ``scan.device_timeout_s``.
    """
    camera = getattr(recipe.microscope, "camera", None)
    snap_s = (exposure_for(recipe) + float(getattr(camera, "readout_ms", 0.0) or 0.0)) / 1000
    timeout = recipe.scan.device_timeout_s
    if snap_s >= timeout:
        raise PlanError(f"scan.device_timeout_s: {timeout:g} s is shorter than one snap "
                        f"({snap_s:g} s of exposure and readout): give a longer watchdog, or a "
                        "shorter scan.exposure_ms")


def check_finger_pitch(recipe: Recipe, pixel_size_um: float) -> None:
    """Refuse a PV cell whose finger pitch is under a camera pixel, as a die pitch is (0.002
    mm, a pitch given in µm for mm, was scanned at 30 µm as a uniform grey cell).

    Raises
    ------
    PlanError
        Naming ``sample.finger_pitch_mm``.
    """
    sample = recipe.sample
    if sample.kind != "pv_cell" or pixel_size_um <= 0:
        return
    pitch_px = sample.finger_pitch_mm * 1000.0 / pixel_size_um
    if pitch_px < 1:
        raise PlanError(f"sample.finger_pitch_mm: {sample.finger_pitch_mm:g} mm is "
                        f"{pitch_px:.3g} camera pixels ({pixel_size_um:g} µm): the fingers' "
                        "pitch must span at least one pixel (the pitch is in mm)")


def check_region_size(plan: ScanPlan, pixel_size_um: float) -> None:
    """Refuse a scanned region narrower than the least image inspection takes
    (:data:`simulators.picture.MIN_IMAGE_PX` camera pixels a side): a sample of 0.01 mm under
    20 µm pixels was scanned, inspected by no window and reported without a defect.

    Raises
    ------
    PlanError
        Naming the sample and its size in camera pixels.
    """
    from simulators.picture import MIN_IMAGE_PX

    if pixel_size_um <= 0:
        return
    x0, y0, x1, y1 = plan.region.bounds
    w_px, h_px = (x1 - x0) / pixel_size_um, (y1 - y0) / pixel_size_um
    if min(w_px, h_px) < MIN_IMAGE_PX:
        raise PlanError(
            f"sample: the scanned region is {(x1 - x0) / 1000:.3g} x {(y1 - y0) / 1000:.3g} mm, "
            f"{w_px:.3g} x {h_px:.3g} camera pixels of {pixel_size_um:g} µm: too small to "
            f"inspect ({MIN_IMAGE_PX} pixels a side at least); check the sample's size (mm) "
            "and pixel size, or use a finer camera pixel")


def check_travel(plan: ScanPlan, recipe: Recipe, core: Any = None) -> None:
    """Refuse a plan with any position outside the stage's or focus drive's travel (the
    recipe's, narrowed by the drivers' own limits when ``core`` is given:
    :func:`scanner.travel.travel_limits`).

    Called before the first move, so a bad plan never drives the stage into its limits.

    Raises
    ------
    PlanError
        Naming the first offending tile and the limit it breaks.
    """
    from scanner.travel import travel_limits

    limits = travel_limits(recipe, core)
    for t in plan.tiles:
        for axis, value in (("x", t.x_um), ("y", t.y_um), ("z", t.z_um)):
            why = limits[axis].refusal(value, f"tile {t.index} (row {t.row}, col {t.col}) "
                                              f"needs {axis}")
            if why:
                hint = ("move sample.center_um/origin_um or scan a smaller region"
                        if axis != "z" else "move the focus range inside the drive's travel")
                raise PlanError(f"{why}; {hint}")
    z = limits["z"]
    if z.narrowed_by:
        # focusing searches the whole range: a drive that stops short of it fails mid-scan
        lo, hi = recipe.microscope.focus.range_um
        raise PlanError(f"{z.field}: [{lo:g}, {hi:g}] µm reaches outside the {z.narrowed_by} "
                        f"drive's own travel; give a range inside [{z.lo:g}, {z.hi:g}] µm")


#: frames an image-based autofocus typically takes (:mod:`scanner.acquisition.focus.search`)
AUTOFOCUS_FRAMES = 6


def estimate_hardware_time_s(plan: ScanPlan, recipe: Recipe) -> float:
    """Hardware time of the scan: moves, settling, exposures and readout (no computing), and
    the image-based autofocus the focus strategy runs (:func:`autofocus_time_s`).

    The stage starts from the travel position nearest the origin.
    """
    stage = recipe.microscope.stage
    exposure_ms = plan.exposure_ms
    readout_ms = getattr(getattr(recipe.microscope, "camera", None), "readout_ms", 0.0)
    x = min(max(0.0, stage.travel_x_um[0]), stage.travel_x_um[1])
    y = min(max(0.0, stage.travel_y_um[0]), stage.travel_y_um[1])
    total, (x, y) = autofocus_time_s(plan, recipe, (x, y))
    for t in plan.tiles:
        total += xy_move_time_s(t.x_um - x, t.y_um - y, stage.speed_um_s, stage.acceleration_um_s2)
        if (t.x_um, t.y_um) != (x, y):
            total += stage.settle_ms / 1000
        total += (exposure_ms + readout_ms) / 1000
        x, y = t.x_um, t.y_um
    return total


def autofocus_time_s(plan: ScanPlan, recipe: Recipe, start_xy: tuple[float, float]
                     ) -> tuple[float, tuple[float, float]]:
    """Hardware time of the image-based autofocus a scan runs, and where it leaves the stage.

    ``every_tile`` focuses at each tile, ``every_n_tiles`` at one in ``every_n``, and
    ``focus_map`` at its points before the first tile (the stage's tour over them, from
    ``start_xy``, counted too); each autofocus takes :data:`AUTOFOCUS_FRAMES` frames, each a
    focus step of half the search span, its settling, an exposure and a readout. An
    autofocus device's time (``method: hardware``) is not known and not counted. A focus map
    of 400 points on a 4-tile coupon was estimated at 1 s and took 2 minutes.
    """
    from scanner.acquisition.focus.points import focus_map_points, inside_tiles, tour_order

    focus = recipe.scan.focus
    if focus.strategy == "none" or focus.method == "hardware" or not plan.tiles:
        return 0.0, start_xy
    drive = recipe.microscope.focus
    objective = getattr(recipe.microscope, "objective", None)
    span = focus.search_span_um or (4.0 * objective.depth_of_field_um if objective else 0.0)
    camera = getattr(recipe.microscope, "camera", None)
    frame_s = (span / 2 / drive.speed_um_s + drive.settle_ms / 1000
               + (plan.exposure_ms + getattr(camera, "readout_ms", 0.0)) / 1000)
    if focus.strategy != "focus_map":
        runs = len(plan.tiles) if focus.strategy == "every_tile" else \
            math.ceil(len(plan.tiles) / focus.every_n)
        return runs * AUTOFOCUS_FRAMES * frame_s, start_xy
    stage = recipe.microscope.stage
    first = (plan.tiles[0].x_um, plan.tiles[0].y_um)
    try:
        points = inside_tiles(
            focus_map_points(plan.region, min(plan.fov_um), focus.points, focus.layout),
            np.array([(t.x_um, t.y_um) for t in plan.tiles]))
    except ValueError:  # nothing inside the region: the scan says so
        return 0.0, start_xy
    total, (x, y) = 0.0, start_xy
    for px, py in points[tour_order(points, start_xy, first)]:
        total += xy_move_time_s(px - x, py - y, stage.speed_um_s, stage.acceleration_um_s2)
        total += stage.settle_ms / 1000 + AUTOFOCUS_FRAMES * frame_s
        x, y = px, py
    return total, (x, y)


def exposure_for(recipe: Recipe) -> float:
    """Exposure of the scan: the scan section's, else the camera's, else 10 ms."""
    if recipe.scan.exposure_ms is not None:
        return recipe.scan.exposure_ms
    camera = getattr(recipe.microscope, "camera", None)
    return camera.exposure_ms if camera is not None else 10.0


def to_sequence(plan: ScanPlan, tiles: Sequence[Tile] | None = None) -> useq.MDASequence:
    """The useq sequence that the MDA runner executes: one event per tile.

    ``tiles`` (default: all of the plan's, in order) lets a resumed scan take only the
    missing ones; the position index of an event is then its place in ``tiles``.
    """
    positions = [
        useq.AbsolutePosition(x=t.x_um, y=t.y_um, z=t.z_um, name=f"tile{t.index:05d}")
        for t in (plan.tiles if tiles is None else tiles)
    ]
    return useq.MDASequence(
        stage_positions=positions,
        axis_order="p",
        metadata={"waferscope": {"recipe": plan.recipe_name, "n_tiles": len(plan.tiles)}},
    )
