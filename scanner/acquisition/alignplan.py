"""Planning the pre-alignment: whether a scan aligns, which fields it takes and in which
order (the route with the least stage time to the scan's first tile), and what that costs.

Read by ``validate`` (the alignment plan and its time) before any hardware exists, and by
:func:`scanner.acquisition.align.align` for the route it then takes.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict

from scanner.errors import UserError

#: nominal direction of a wafer's notch or flat (+y: 6 o'clock), as the recipe's frame has it
MARK_ANGLE_DEG = 90.0
#: die sites must lie at least this share of the wafer's diameter apart
MIN_DIE_LEVER = 0.3


def wants_alignment(recipe: Any) -> bool:
    """Whether the scan aligns first (``scan.align``; auto: wafers and PV cells)."""
    setting = recipe.scan.align
    kind = recipe.sample.kind
    if setting == "auto":
        return kind in ("wafer", "pv_cell")
    if setting and kind not in ("wafer", "pv_cell"):
        raise UserError(f"scan.align: true needs a wafer or pv_cell sample (got {kind})")
    return bool(setting)


def _u(deg: float) -> tuple[float, float]:
    """Unit vector at ``deg`` degrees from +x towards +y."""
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
    """Distance (µm) of a wafer's flat from its centre (half the flat at most 0.99 radii)."""
    r = sample.diameter_mm * 500.0
    half = min(sample.flat_length_mm * 500.0, 0.99 * r)
    return math.sqrt(r * r - half * half)


def die_site_pairs(sample: Any) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Candidate pairs of die sites: the two ends of each row of corners where four whole
    dies meet, at least :data:`MIN_DIE_LEVER` of the diameter apart (the pair's lever on
    the rotation), the row nearest the centre first."""
    from scanner.diegrid import DieGrid
    from scanner.geometry import usable_polygon

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
            from scanner.diegrid import DieGrid

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

    from scanner.acquisition.plan import exposure_for
    from scanner.diegrid import DieGrid
    from simulators.stage import xy_move_time_s

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
    as the simulated stage and :func:`scanner.acquisition.plan.estimate_hardware_time_s` have it) to
    the first tile of the plan where the recipe puts the sample."""
    from scanner.acquisition.plan import plan_scan

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

