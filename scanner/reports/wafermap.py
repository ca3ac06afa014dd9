"""``wafermap.png``: one picture of the sample and its defects, readable at a glance.

Wafers: outline with the notch or flat, the edge-exclusion ring, the tested dies (failing
dies shaded, with their defect count), die column/row indices around the wafer, and every
defect at its position, coloured by class (large ones also with their bounding box). PV
cells: the cell with its busbars, fingers and edge band, and the defects. Other samples: the
scanned region and the defects. A side panel gives the lot, wafer, scan, recipe and model,
and the counts by class (and dies or regions).

The view is the mosaic's: x to the right, y (stage +y) **down**, so a wafer's notch is at
6 o'clock, as in napari and on the mosaic. Drawn with matplotlib's object API on an Agg
canvas (no pyplot state, no display needed).
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from shapely.geometry import Polygon, box

from scanner.defectlist import CLASSES, Defect
from scanner.reports.style import CLASS_COLORS, REPEATER_COLOR

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from scanner.reports.locate import ScanContext

WAFERMAP = "wafermap.png"

_PASS_FACE, _FAIL_FACE, _PARTIAL_FACE = "#ffffff", "#f6b3b3", "#eeeeee"
_EDGE = "#bdbdbd"
#: edge exclusion ring (wafers) and edge band (PV cells)
_EXCLUSION = {"facecolor": "#aab2bd", "edgecolor": "#7d8794", "hatch": "////", "alpha": 0.35}
#: a PV cell's area the tiles never imaged (a band scan, lost tiles)
_UNSCANNED = {"facecolor": "#ffffff", "edgecolor": "#9aa3ad", "hatch": "..", "alpha": 0.85}


def wafer_outline_mm(diameter_mm: float, orientation: str, flat_length_mm: float,
                     notch_depth_mm: float = 1.0) -> Polygon:
    """Wafer outline in mm from its centre, with its notch or flat towards +y: the planner's
    and the simulator's outline (:func:`scanner.geometry.wafer_outline`), in mm."""
    from shapely import affinity

    from scanner.geometry import wafer_outline

    um = wafer_outline(diameter_mm, orientation, flat_length_mm, (0.0, 0.0), n_vertices=512,
                       notch_depth_mm=notch_depth_mm)
    return affinity.scale(um, 1e-3, 1e-3, origin=(0.0, 0.0))


def _fill(ax: Axes, poly: Any, **kwargs: Any) -> list[Any]:
    """Fill a shapely (multi)polygon, holes included; returns the patches."""
    from matplotlib.patches import PathPatch
    from matplotlib.path import Path as MplPath

    patches = []
    for g in getattr(poly, "geoms", [poly]):
        if g.is_empty or g.geom_type != "Polygon":
            continue
        rings = [np.asarray(g.exterior.coords)] + [np.asarray(i.coords) for i in g.interiors]
        verts = np.concatenate(rings)
        codes = np.concatenate(
            [[MplPath.MOVETO] + [MplPath.LINETO] * (len(r) - 2) + [MplPath.CLOSEPOLY]
             for r in rings]
        )
        patches.append(ax.add_patch(PathPatch(MplPath(verts, codes), **kwargs)))
    return patches


def _outline(ax: Axes, poly: Any, **kwargs: Any) -> None:
    for g in getattr(poly, "geoms", [poly]):
        if g.geom_type == "Polygon":
            x, y = np.asarray(g.exterior.coords).T
            ax.plot(x, y, **kwargs)


def _marker_area(size_um: float) -> float:
    """Scatter marker area (pt²): grows with the defect size, bounded to stay readable."""
    return float(np.clip(14.0 + 14.0 * math.log10(max(size_um, 1.0)) ** 2, 18.0, 140.0))


def _draw_defects(ax: Axes, defects: list[Defect], to_xy: Any, extent_mm: float) -> None:
    """Defects as class-coloured markers; large ones also with their bounding box."""
    from matplotlib.patches import Rectangle

    if not defects:
        return
    order = sorted(defects, key=lambda d: -d.size_um)  # small ones drawn on top
    colours = [CLASS_COLORS.get(d.defect_class, CLASS_COLORS["other"]) for d in order]
    for d, colour in zip(order, colours, strict=True):
        x0, y0, x1, y1 = d.bbox_um
        w, h = (x1 - x0) / 1000.0, (y1 - y0) / 1000.0
        if np.isfinite(w) and max(w, h) > 0.015 * extent_mm:
            bx, by = to_xy(x0, y0)
            ax.add_patch(Rectangle((bx, by), w, h, fill=False, edgecolor=colour, lw=1.2,
                                   zorder=4))
    xy = np.array([to_xy(d.x_um, d.y_um) for d in order])
    ax.scatter(xy[:, 0], xy[:, 1], s=[_marker_area(d.size_um) for d in order], c=colours,
               edgecolors="black", linewidths=[1.4 if d.review else 0.6 for d in order],
               zorder=5)


def _draw_repeaters(ax: Axes, repeaters: list[Defect], to_xy: Any) -> None:
    """Repeater defects (one in-die position in many dies) as small brown crosses."""
    if not repeaters:
        return
    xy = np.array([to_xy(d.x_um, d.y_um) for d in repeaters])
    ax.scatter(xy[:, 0], xy[:, 1], s=16, marker="x", c=REPEATER_COLOR, linewidths=0.9, zorder=4.5)


def wafer_frame_mm(ctx: ScanContext) -> Callable[[np.ndarray], np.ndarray]:
    """Stage points ``(N, 2)`` µm to the wafer's own frame in mm, as the defect list's
    ``wafer_x_mm``/``wafer_y_mm`` (:meth:`ScanContext.to_wafer_um`: from the measured centre,
    along the measured axes), for many points at once."""
    from scanner.acquisition.alignrecord import Alignment

    if ctx.alignment:
        a = Alignment.model_validate(ctx.alignment)
        centre, th = np.asarray(a.center_um, float), math.radians(a.rotation_deg)
    else:
        centre, th = np.asarray(ctx.sample.get("center_um", (0.0, 0.0)), float), 0.0
    c, s = math.cos(th), math.sin(th)

    def to_mm(xy: np.ndarray) -> np.ndarray:
        d = np.asarray(xy, float).reshape(-1, 2) - centre
        return np.column_stack([c * d[:, 0] + s * d[:, 1], -s * d[:, 0] + c * d[:, 1]]) / 1e3

    return to_mm


def _wafer(ax: Axes, ctx: ScanContext, header: dict[str, Any], defects: list[Defect],
           repeaters: list[Defect], unscanned: Any) -> None:
    """The wafer in its own frame: outline, usable area, tested dies and defects all put
    there from the stage by the measured centre and rotation, as the defects' wafer mm are
    (a wafer placed off the recipe's centre or turned is drawn where its defects say)."""
    import shapely
    from matplotlib.collections import PolyCollection

    sample = ctx.sample
    frame = wafer_frame_mm(ctx)
    outline = wafer_outline_mm(float(sample["diameter_mm"]), sample.get("orientation", "notch"),
                               float(sample.get("flat_length_mm", 32.5)),
                               float(sample.get("notch_depth_mm", 1.0)))
    usable = shapely.transform(ctx.usable_polygon(), frame)
    if sample.get("orientation") == "notch":
        # the planner's usable area is round; the exclusion also follows the notch
        usable = usable.intersection(outline.buffer(-float(sample["edge_exclusion_mm"])))
    wafer_patch = _fill(ax, outline, facecolor="#dfe3e8", edgecolor="none", zorder=0)[0]
    # the exclusion ring goes over the dies (partial dies reach into it), translucent
    _fill(ax, outline.difference(usable), lw=0, zorder=2.5, **_EXCLUSION)
    grid = ctx.die_grid()
    if grid is None:  # not a wafer
        raise ValueError("_wafer: the scan's sample has no die grid")
    tested = (header.get("dies") or {}).get("tested") or []
    pitch = (grid.pitch_um[0] / 1000.0, grid.pitch_um[1] / 1000.0)
    small = max(pitch) < 0.045 * float(sample["diameter_mm"])
    cells, faces = [], []
    for die in tested:
        corners = frame(np.asarray(grid.cell_polygon(die["col"], die["row"]).exterior.coords)
                        [:4])
        cells.append(corners)
        faces.append(_FAIL_FACE if not die["pass"]
                     else (_PASS_FACE if die["full"] else _PARTIAL_FACE))
        if not die["pass"] and not small:
            x0, y0 = corners[0] + 0.06 * (corners[2] - corners[0])
            ax.text(x0, y0, str(die["defects"]), fontsize=6.5, color="#a01818", ha="left",
                    va="top", zorder=3)
    # one collection of plain vertices: a 300 mm wafer of small dies has thousands of them
    dies = ax.add_collection(PolyCollection(cells, facecolors=faces, edgecolors=_EDGE,
                                            linewidths=0.6 if not small else 0.3, zorder=2))
    dies.set_clip_path(wafer_patch)
    if unscanned is not None:
        # a band scan, or tiles lost: dies the tiles never imaged are not drawn as tested
        _fill(ax, shapely.transform(unscanned, frame), lw=0, zorder=2.6, **_UNSCANNED)
    _outline(ax, usable, color="#6c7a89", lw=0.9, ls="--", zorder=3)
    _outline(ax, outline, color="#2f3b48", lw=1.6, zorder=3)
    _die_indices(ax, tested, grid, frame, float(sample["diameter_mm"]) / 2.0)

    def to_mm(x: float, y: float) -> tuple[float, float]:
        u, v = frame(np.array([x, y]))[0]
        return float(u), float(v)

    _draw_repeaters(ax, repeaters, to_mm)
    _draw_defects(ax, defects, to_mm, float(sample["diameter_mm"]))
    r = float(sample["diameter_mm"]) / 2.0
    pad = 0.09 * r
    ax.set_xlim(-r - pad, r + pad)
    ax.set_ylim(r + pad, -r - pad)  # y down: the notch at 6 o'clock, as on the mosaic
    ax.set_xlabel("wafer x (mm)")
    ax.set_ylabel("wafer y (mm, stage +y down)")


def _die_indices(ax: Axes, tested: list[dict[str, Any]], grid: Any,
                 frame: Callable[[np.ndarray], np.ndarray], radius_mm: float) -> None:
    """Column numbers above the wafer and row numbers left of it, at their dies' centres."""
    if not tested:
        return
    cols = sorted({d["col"] for d in tested})
    rows = sorted({d["row"] for d in tested})
    step = max(1, math.ceil(max(len(cols), len(rows)) / 25))
    px, py = grid.pitch_um
    mid_c, mid_r = cols[len(cols) // 2], rows[len(rows) // 2]
    for c in cols[::step]:
        x = frame(np.array(grid.to_stage((c + 0.5) * px, (mid_r + 0.5) * py)))[0, 0]
        ax.text(x, -radius_mm * 1.045, str(c), fontsize=6, color="#55606e",
                ha="center", va="bottom")
    for r in rows[::step]:
        y = frame(np.array(grid.to_stage((mid_c + 0.5) * px, (r + 0.5) * py)))[0, 1]
        ax.text(-radius_mm * 1.045, y, str(r), fontsize=6, color="#55606e",
                ha="right", va="center")


def _pv_cell(ax: Axes, ctx: ScanContext, defects: list[Defect], unscanned: Any) -> None:
    from matplotlib.patches import Rectangle

    s = ctx.sample
    from scanner.reports.locate import PV_EDGE_BAND_MM

    w, h = float(s["width_mm"]), float(s["height_mm"])
    ax.add_patch(Rectangle((-w / 2, -h / 2), w, h, facecolor="#dfe3e8", edgecolor="none",
                           zorder=0))
    band = PV_EDGE_BAND_MM
    ring = box(-w / 2, -h / 2, w / 2, h / 2).difference(
        box(-w / 2 + band, -h / 2 + band, w / 2 - band, h / 2 - band))
    _fill(ax, ring, lw=0, zorder=2.5, **_EXCLUSION)
    pitch = float(s.get("finger_pitch_mm", 2.0))
    ys = -h / 2 + pitch / 2 + np.arange(int(h // pitch)) * pitch
    ax.hlines(ys, -w / 2, w / 2, colors="#b4bcc6", lw=0.4, zorder=1)
    n = int(s.get("busbars", 0))
    bw = float(s.get("busbar_width_mm", 1.2))
    for k in range(n):
        xk = -w / 2 + (k + 0.5) * w / n
        ax.add_patch(Rectangle((xk - bw / 2, -h / 2), bw, h, facecolor="#4a5563",
                               edgecolor="none", zorder=2))
        ax.text(xk, -h / 2 - 0.02 * h, f"BB{k + 1}", ha="center", va="bottom", fontsize=7,
                color="#4a5563")
    ax.add_patch(Rectangle((-w / 2, -h / 2), w, h, fill=False, edgecolor="#2f3b48", lw=1.6,
                           zorder=3))
    # the cell's own frame as aligned (its measured centre and turn), as the defects' regions
    # are found: from the recipe's centre, a cell placed off it or turned was drawn with
    # defects on the wrong busbar
    frame = wafer_frame_mm(ctx)
    if unscanned is not None:
        # a band scan, or tiles lost: what the tiles never imaged is not drawn as inspected
        import shapely

        _fill(ax, shapely.transform(unscanned, frame), lw=0, zorder=2.6, **_UNSCANNED)
    _draw_defects(ax, defects, lambda x, y: tuple(frame(np.array([x, y]))[0]), max(w, h))
    pad = 0.06 * max(w, h)
    ax.set_xlim(-w / 2 - pad, w / 2 + pad)
    ax.set_ylim(h / 2 + pad, -h / 2 - pad)
    ax.set_xlabel("cell x (mm from centre)")
    ax.set_ylabel("cell y (mm, stage +y down)")


def _unscanned(ctx: ScanContext) -> Any:
    """The part of the usable area the acquired tiles never imaged (stage µm; None: none)."""
    usable, inspected = ctx.usable_polygon(), ctx.inspected_polygon()
    if usable is None or inspected is None or inspected.equals(usable):
        return None
    # an opening by a hundredth of the field drops slivers of rounding along the tiles'
    # edges (0.02 mm2 along a complete PV cell read "not scanned"); a lost tile or an
    # unscanned band is a field or more across
    w = 0.01 * min(ctx.fov_um) if min(ctx.fov_um) > 0 else 0.0
    missing = usable.difference(inspected)
    if w > 0 and not missing.is_empty:
        missing = missing.buffer(-w).buffer(w).intersection(usable)
    return None if missing.is_empty or missing.area < 1e-6 * usable.area else missing


def _other(ax: Axes, ctx: ScanContext, defects: list[Defect]) -> None:
    """Image or rectangle samples: the sample (rectangles), the scanned extent (dashed) and
    the defects, in stage mm."""
    from matplotlib.patches import Rectangle

    fw, fh = ctx.fov_um
    if len(ctx.tiles):
        x0, y0 = ctx.tiles[:, 1].min() - fw / 2, ctx.tiles[:, 2].min() - fh / 2
        x1, y1 = ctx.tiles[:, 1].max() + fw / 2, ctx.tiles[:, 2].max() + fh / 2
    else:
        x0, y0, x1, y1 = 0.0, 0.0, fw, fh
    ax.add_patch(Rectangle((x0 / 1000, y0 / 1000), (x1 - x0) / 1000, (y1 - y0) / 1000,
                           fill=False, edgecolor="#6c7a89", lw=0.9, ls="--", zorder=3))
    s = ctx.sample
    if ctx.kind == "rectangle":
        cx, cy = (float(v) / 1000.0 for v in s.get("center_um", (0.0, 0.0)))
        w, h = float(s["width_mm"]), float(s["height_mm"])
        ax.add_patch(Rectangle((cx - w / 2, cy - h / 2), w, h, facecolor="#dfe3e8",
                               edgecolor="#2f3b48", lw=1.4, zorder=0))
        x0, y0 = min(x0, (cx - w / 2) * 1000), min(y0, (cy - h / 2) * 1000)
        x1, y1 = max(x1, (cx + w / 2) * 1000), max(y1, (cy + h / 2) * 1000)
    extent = max(x1 - x0, y1 - y0) / 1000.0
    _draw_defects(ax, defects, lambda x, y: (x / 1000.0, y / 1000.0), extent)
    pad = 0.05 * extent
    ax.set_xlim(x0 / 1000 - pad, x1 / 1000 + pad)
    ax.set_ylim(y1 / 1000 + pad, y0 / 1000 - pad)
    ax.set_xlabel("stage x (mm)")
    ax.set_ylabel("stage y (mm, down)")


def _when(iso: str | None) -> str:
    if not iso:
        return "-"
    try:
        return _dt.datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return str(iso)


def _panel(ax: Axes, ctx: ScanContext, header: dict[str, Any], defects: list[Defect],
           repeaters: list[Defect], unscanned: Any) -> None:
    """Side panel: identity of the scan, counts by class, dies or regions."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    ax.axis("off")
    info = header.get("sample") or {}
    s = ctx.sample
    if ctx.kind == "wafer":
        title = f"Lot {info.get('lot_id', '-')}   Wafer {info.get('wafer_id', '-')}"
        mark = {"notch": "notch", "flat": "flat", "none": "no mark"}[s.get("orientation", "notch")]
        what = (f"{float(s['diameter_mm']):g} mm wafer, {mark} at 6 o'clock\n"
                f"edge exclusion {float(s['edge_exclusion_mm']):g} mm, die "
                f"{float(s['die_pitch_mm'][0]):g} x {float(s['die_pitch_mm'][1]):g} mm\n"
                "die columns above the wafer, rows at its left")
    elif ctx.kind == "pv_cell":
        title = f"PV cell  {info.get('name', '')}"
        what = (f"{float(s['width_mm']):g} x {float(s['height_mm']):g} mm, "
                f"{int(s.get('busbars', 0))} busbars")
    else:
        title = f"{ctx.kind}  {info.get('name', '')}"
        what = "dashed: the scanned area"
    model = header.get("model") or {}
    model_txt = model.get("id") or "-"
    if model.get("sha256"):
        model_txt += f" ({str(model['sha256'])[:10]})"
    lines = [
        what,
        f"scan {_when(header.get('scan_started'))} ({header.get('scan_status') or '-'})",
        f"recipe {info.get('name', '-')} ({str(header.get('recipe_sha256', ''))[:10]})",
        f"model {model_txt}",
    ]
    ax.text(0.0, 1.0, title, fontsize=13, fontweight="bold", va="top", transform=ax.transAxes)
    ax.text(0.0, 0.945, "\n".join(lines), fontsize=8.5, va="top", linespacing=1.5,
            color="#333333", transform=ax.transAxes)

    counts = {c: 0 for c in CLASSES}
    for d in defects:
        counts[d.defect_class] += 1
    handles = [Line2D([], [], marker="o", ls="none", markersize=8, markerfacecolor=CLASS_COLORS[c],
                      markeredgecolor="black", markeredgewidth=0.6, label=f"{c}  {n}")
               for c, n in counts.items() if n]
    if any(d.review for d in defects):
        handles.append(Line2D([], [], marker="o", ls="none", markersize=8, markerfacecolor="white",
                              markeredgecolor="black", markeredgewidth=1.6,
                              label=f"to review  {sum(d.review for d in defects)}"))
    summary = [f"defects  {len(defects)}"]
    if ctx.kind == "wafer":
        dies = header.get("dies") or {}
        n, failed = int(dies.get("n_tested", 0)), int(dies.get("n_failed", 0))
        region = ctx.inspected_polygon()
        area_cm2 = region.area * 1e-8 if region is not None else 0.0
        if area_cm2:
            summary.append(f"density  {len(defects) / area_cm2:.2f} /cm²")
        if n:
            summary.append(f"dies tested  {n}   failing  {failed}")
            summary.append(f"die yield  {100.0 * (n - failed) / n:.1f} %")
        if repeaters:
            groups = (header.get("repeaters") or {}).get("groups", "?")
            handles.append(Line2D([], [], marker="x", ls="none", markersize=6,
                                  markeredgecolor=REPEATER_COLOR, markeredgewidth=1.2,
                                  label=f"repeater  {len(repeaters)} ({groups} in-die positions)"))
        handles += [Patch(facecolor=_PASS_FACE, edgecolor=_EDGE, label="die: pass"),
                    Patch(facecolor=_FAIL_FACE, edgecolor=_EDGE, label="die: fail (count)"),
                    Patch(facecolor=_PARTIAL_FACE, edgecolor=_EDGE, label="partial edge die"),
                    Patch(lw=0, label="edge exclusion", **_EXCLUSION)]
        if unscanned is not None:
            handles.append(Patch(lw=0, label="not scanned", **_UNSCANNED))
    elif ctx.kind == "pv_cell":
        summary.append("by region:")
        for name, n in (header.get("regions") or {}).items():
            summary.append(f"    {name}  {n}")
        handles += [Patch(lw=0, label="edge band", **_EXCLUSION)]
        if unscanned is not None:
            handles.append(Patch(lw=0, label="not scanned", **_UNSCANNED))
    ax.text(0.0, 0.76, "\n".join(summary), fontsize=10, va="top", linespacing=1.6,
            transform=ax.transAxes, family="DejaVu Sans")
    ax.legend(handles=handles, loc="lower left", bbox_to_anchor=(0.0, 0.0), frameon=False,
              fontsize=9, title="defect classes", title_fontsize=9, alignment="left",
              labelspacing=0.7)


def draw_wafermap(path: Path, ctx: ScanContext, header: dict[str, Any],
                  defects: list[Defect], dpi: int = 150,
                  repeaters: list[Defect] | None = None) -> Path:
    """Draw the map of a located defect list and save it as PNG (atomically).

    Parameters
    ----------
    path : Path
        Output PNG.
    ctx : ScanContext
        The scan (sample geometry, tiles).
    header : dict
        The defect list's header (ids, tested dies, counts).
    defects : list of Defect
        Located defects.
    dpi : int
        Resolution.
    repeaters : list of Defect, optional
        Wafer defects the repeater analysis took out of the list (drawn as brown crosses).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11.0, 8.0), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(1, 2, width_ratios=(2.6, 1.0))
    ax = fig.add_subplot(grid[0, 0])
    ax.set_aspect("equal")
    ax.tick_params(labelsize=8)
    # once for the map and its legend: tiles unioned, slivers opened (see _unscanned)
    unscanned = _unscanned(ctx)
    if ctx.kind == "wafer":
        _wafer(ax, ctx, header, defects, repeaters or [], unscanned)
    elif ctx.kind == "pv_cell":
        _pv_cell(ax, ctx, defects, unscanned)
    else:
        _other(ax, ctx, defects)
    ax.set_axisbelow(True)
    _panel(fig.add_subplot(grid[0, 1]), ctx, header, defects, repeaters or [], unscanned)
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=dpi, facecolor="white", bbox_inches="tight", pad_inches=0.15)
    tmp.replace(path)
    return path
