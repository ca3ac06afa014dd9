"""Locate defects on the sample and build the defect list's header.

Inspection hands over defects in stage coordinates only. Locating adds, per defect, what a
person or a yield system needs to find it again: wafer millimetres from the wafer centre, the
die (column, row) and the position inside the die (wafers), the cell region (PV cells), and
the tiles whose field of view contains it. Everything comes from the scan folder (the resolved
recipe in ``scan.json`` and ``tiles.csv``), so locating can be re-run at any time and gives
the same rows.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from shapely.geometry import Polygon

from scanner.defectlist import CLASSES, Defect
from scanner.diegrid import DieGrid
from scanner.errors import UserError
from scanner.geometry import usable_polygon
from scanner.scanfolder import read_scan_json, software_versions
from scanner.tilestore import TILES_CSV, check_positions, read_tiles_csv

#: width of the band along a PV cell's border reported as region "edge" (mm)
PV_EDGE_BAND_MM = 2.0

#: how the coordinates of the defect list are defined (copied into its header)
COORDINATES = (
    "x_um, y_um, bbox_um: stage micrometres, x grows with the mosaic column and y with the "
    "mosaic row; wafer_x_mm, wafer_y_mm: millimetres in the wafer's own frame, from its "
    "centre (the measured one when the scan aligned) along its axes (turned with the wafer; "
    "the notch or flat lies towards +y); die_col, die_row: index on the die grid (the "
    "aligned one when the scan aligned), (0, 0) is the die whose lower corner (smallest "
    "wafer x and y) is die_origin_mm from the wafer centre (for an image sample from the "
    "stage position of its pixel (0, 0), for a rectangle from its lower corner); die_x_um, "
    "die_y_um: from that lower corner of the die, along the wafer's axes."
)


@dataclass
class ScanContext:
    """What locating needs from a scan folder.

    Attributes
    ----------
    folder : Path
        Scan folder.
    scan : dict
        ``scan.json``.
    sample : dict
        The resolved recipe's ``sample`` section.
    fov_um : (float, float)
        Camera field of view (width, height) at the sample.
    tiles : ndarray, shape (n, 3)
        ``index, x_um, y_um`` of each acquired tile centre (registered positions where
        registration ran, as the mosaic uses them).
    """

    folder: Path
    scan: dict[str, Any]
    sample: dict[str, Any]
    fov_um: tuple[float, float]
    tiles: np.ndarray

    @classmethod
    def load(cls, folder: Path) -> ScanContext:
        """Read ``scan.json`` and ``tiles.csv`` of a scan folder.

        Raises
        ------
        UserError
            If the folder is not a scan folder or lacks the recipe or the tiles journal.
        """
        folder = Path(folder)
        scan = read_scan_json(folder)
        sample = (scan.get("recipe") or {}).get("sample")
        if not isinstance(sample, dict) or "kind" not in sample:
            raise UserError(f"{folder / 'scan.json'}: no resolved recipe with a sample section")
        fov = (scan.get("plan") or {}).get("fov_um")
        if not fov:
            micro = scan.get("microscope") or {}
            rows, cols = micro.get("camera_shape", (0, 0))
            p = float(micro.get("pixel_size_um", 0.0))
            fov = (cols * p, rows * p)
        if not (folder / TILES_CSV).is_file():
            raise UserError(f"{folder}: no {TILES_CSV} (the scan never acquired)")
        records = read_tiles_csv(folder)
        check_positions(folder, records)
        rows_ok = [r for r in records if r.status == "ok"]
        tiles = np.array(
            [(r.index, *((r.x_reg_um, r.y_reg_um) if np.isfinite(r.x_reg_um) else (r.x_um, r.y_um)))
             for r in rows_ok],
            dtype=float,
        ).reshape(-1, 3)
        return cls(folder, scan, sample, (float(fov[0]), float(fov[1])), tiles)

    @property
    def kind(self) -> str:
        """Sample kind: ``wafer``, ``pv_cell``, ``image`` or ``rectangle``."""
        return str(self.sample["kind"])

    def usable_polygon(self) -> Polygon | None:
        """The sample's usable area in stage µm (wafers and PV cells; None for others)."""
        if self.kind not in ("wafer", "pv_cell"):
            return None
        from scanner.recipe import RecipeError, recorded_sample

        try:
            sample = recorded_sample(self.scan, self.folder)
        except RecipeError as exc:
            raise UserError(f"{self.folder}/{exc}") from None  # ".../scan.json recipe.sample: ..."
        return usable_polygon(sample, alignment=self.alignment)

    def inspected_polygon(self) -> Polygon | None:
        """The usable area that the acquired tiles cover (stage µm; None as
        :meth:`usable_polygon`): all of it for a whole scan, the band of a band scan
        (``scan.region``), what was acquired of an incomplete one. Dies and areas outside it
        were never imaged and are not reported as tested."""
        return self._inspected

    @cached_property
    def _inspected(self) -> Polygon | None:
        # once per report: the union of a large scan's thousands of tiles is not free, and
        # the die list, the KLARF and the wafer map all ask
        usable = self.usable_polygon()
        if usable is None or not len(self.tiles):
            return usable
        from shapely import box, unary_union

        w, h = self.fov_um
        imaged = unary_union([box(x - w / 2, y - h / 2, x + w / 2, y + h / 2)
                              for _, x, y in self.tiles])
        if imaged.covers(usable):  # a whole scan: the usable area exactly as it is
            return usable
        part = usable.intersection(imaged)
        return part if not part.is_empty else None

    @property
    def alignment(self) -> dict[str, Any] | None:
        """Where the alignment found the sample (``scan.json``; None: not aligned), refined
        on the registered mosaic when stitching could (:mod:`scanner.acquisition.alignrefine`)."""
        from scanner.acquisition.alignrefine import effective_alignment

        return effective_alignment(self.scan.get("alignment")) or None

    def die_grid(self) -> DieGrid | None:
        """The die grid: a wafer's (the aligned one when the scan aligned), or the one an
        image or rectangle recipe gives with ``die_pitch_mm`` (None: no grid given)."""
        if self.kind == "wafer":
            return DieGrid.from_sample(self.sample, self.alignment)
        if self.kind not in ("image", "rectangle") or not self.sample.get("die_pitch_mm"):
            return None
        from scanner.diegrid import sample_grid
        from scanner.recipe import RecipeError, recorded_sample

        try:
            return sample_grid(recorded_sample(self.scan, self.folder))
        except RecipeError as exc:
            raise UserError(f"{self.folder}/{exc}") from None

    def die_area_um2(self) -> float:
        """Area of one die cell (the die pitch's rectangle; wafers only)."""
        px, py = (float(v) * 1000.0 for v in self.sample["die_pitch_mm"])
        return px * py

    def to_wafer_um(self, x_um: float, y_um: float) -> tuple[float, float]:
        """A stage point in the wafer's own frame: µm from its (measured) centre, along its
        (measured) axes, the notch or flat towards +y."""
        from scanner.acquisition.align import to_wafer_frame

        centre = tuple(float(v) for v in self.sample.get("center_um", (0.0, 0.0)))
        return to_wafer_frame(self.alignment, centre, x_um, y_um)  # type: ignore[arg-type]


def recipe_sha256(recipe: dict[str, Any]) -> str:
    """SHA-256 of a resolved recipe as canonical JSON (sorted keys, no whitespace, UTF-8)."""
    text = json.dumps(recipe, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tiles_containing(x_um: float, y_um: float, tiles: np.ndarray,
                     fov_um: tuple[float, float]) -> list[int]:
    """Indices of the tiles whose field of view contains a stage point.

    Parameters
    ----------
    x_um, y_um : float
        Stage point.
    tiles : ndarray, shape (n, 3)
        ``index, x_um, y_um`` of the tile centres.
    fov_um : (float, float)
        Field of view (width, height).
    """
    if len(tiles) == 0:
        return []
    inside = ((np.abs(tiles[:, 1] - x_um) <= fov_um[0] / 2)
              & (np.abs(tiles[:, 2] - y_um) <= fov_um[1] / 2))
    return sorted(int(i) for i in tiles[inside, 0])


def region_order(name: str) -> tuple[str, int]:
    """Sort key of a PV region: busbars in their order ("busbar 2" before "busbar 10"), not
    as text."""
    stem = name.rstrip("0123456789")
    return stem, int(name[len(stem):] or 0)


def pv_region(x_um: float, y_um: float, sample: dict[str, Any],
              edge_band_mm: float = PV_EDGE_BAND_MM) -> str:
    """Region of a PV cell a stage point lies in: ``"edge"``, ``"busbar N"`` or ``"finger area"``.

    Busbars run along y and are numbered 1, 2, ... from the smallest x, centred at
    ``(k - 0.5) * width / busbars`` from the cell's left edge (the simulator's and the
    usual layout). The edge band wins over a busbar (a busbar runs out to the edge).
    Points outside the cell are ``"edge"`` too (a defect detected there is at the cut edge).
    """
    cx, cy = (float(v) for v in sample.get("center_um", (0.0, 0.0)))
    hw, hh = float(sample["width_mm"]) * 500.0, float(sample["height_mm"]) * 500.0
    dx, dy = x_um - cx, y_um - cy
    band = edge_band_mm * 1000.0
    if abs(dx) > hw - band or abs(dy) > hh - band:
        return "edge"
    n = int(sample.get("busbars", 0))
    if n > 0:
        spacing = 2 * hw / n
        half = float(sample.get("busbar_width_mm", 0.0)) * 500.0
        k = int(np.clip(np.floor((dx + hw) / spacing), 0, n - 1))
        centre = -hw + (k + 0.5) * spacing
        if abs(dx - centre) <= half:
            return f"busbar {k + 1}"
    return "finger area"


def locate(defects: list[Defect], ctx: ScanContext) -> list[Defect]:
    """Fill the location fields of each defect (a new list; the input is left as it is).

    Wafer fields are filled for wafers, die fields for wafers and for image and rectangle
    samples whose recipe gives a die grid, ``region`` for PV cells; ``tiles`` for all. Ids are
    kept; fields that do not apply to the sample are set to None.
    """
    grid = ctx.die_grid()
    wafer = ctx.kind == "wafer"
    out = []
    for d in defects:
        fields: dict[str, Any] = {
            "tiles": tiles_containing(d.x_um, d.y_um, ctx.tiles, ctx.fov_um),
            "wafer_x_mm": None, "wafer_y_mm": None, "die_col": None, "die_row": None,
            "die_x_um": None, "die_y_um": None, "region": None,
        }
        if grid is not None:
            col, row = grid.index(d.x_um, d.y_um)
            dx, dy = grid.in_die(d.x_um, d.y_um)
            fields.update(die_col=col, die_row=row, die_x_um=round(dx, 3), die_y_um=round(dy, 3))
        if wafer:
            wx, wy = ctx.to_wafer_um(d.x_um, d.y_um)
            fields.update(wafer_x_mm=round(wx / 1000.0, 6), wafer_y_mm=round(wy / 1000.0, 6))
        elif ctx.kind == "pv_cell":
            # the cell's regions in its own frame (turned and shifted as aligned)
            wx, wy = ctx.to_wafer_um(d.x_um, d.y_um)
            cx, cy = (float(v) for v in ctx.sample.get("center_um", (0.0, 0.0)))
            fields["region"] = pv_region(cx + wx, cy + wy, ctx.sample)
        out.append(replace(d, **fields))
    return out


def tested_dies(ctx: ScanContext, defects: list[Defect]) -> list[dict[str, Any]]:
    """Dies fully or partly inside the inspected area (the usable area the tiles covered),
    with their defect count and pass/fail.

    A die fails when at least one defect's centre lies in its cell. Returns an empty list for
    samples without a die grid.
    """
    grid, region = ctx.die_grid(), ctx.inspected_polygon()
    if grid is None or region is None:
        return []
    counts: dict[tuple[int, int], int] = {}
    for d in defects:
        if d.die_col is not None and d.die_row is not None:
            counts[(d.die_col, d.die_row)] = counts.get((d.die_col, d.die_row), 0) + 1
    return [
        {"col": col, "row": row, "full": full, "defects": counts.get((col, row), 0),
         "pass": counts.get((col, row), 0) == 0}
        for col, row, full in grid.cells_in(region)
    ]


_MODEL_ID_KEYS = ("id", "name", "model_id")
_MODEL_HASH_KEYS = ("sha256", "weights_sha256", "hash", "model_sha256")


def _model_info(previous: dict[str, Any], scan: dict[str, Any]) -> dict[str, Any]:
    """Model id and hash as inspection recorded them (header first, then ``scan.json``).

    Returns ``{"id", "sha256", ...}`` with inspection's other model fields (file, pixel size,
    threshold) kept beside them.
    """
    sources = (previous, scan.get("inspection") or {}, scan.get("inspect") or {}, scan)
    for source in sources:
        model = source.get("model")
        if isinstance(model, dict) and model:
            ident = next((model[k] for k in _MODEL_ID_KEYS if model.get(k)), None)
            digest = next((model[k] for k in _MODEL_HASH_KEYS if model.get(k)), None)
            rest = {k: v for k, v in model.items() if k not in ("id", "sha256")}
            return {"id": ident, "sha256": digest, **rest}
        if source.get("model_id") or isinstance(model, str):
            return {"id": source.get("model_id") or model,
                    "sha256": source.get("model_sha256") or source.get("model_hash")}
    return {"id": None, "sha256": None}


def build_header(
    ctx: ScanContext,
    defects: list[Defect],
    previous: dict[str, Any] | None = None,
    *,
    lot_id: str | None = None,
    wafer_id: str | None = None,
    full_dies_only: bool = False,
) -> dict[str, Any]:
    """The defect list's header.

    Keys inspection wrote (``previous``) are kept; the report's own keys are (re)computed:
    ``sample``, ``recipe_sha256``, ``model``, ``versions``, ``scan_started``,
    ``scan_finished``, ``coordinates``, ``counts``, and for wafers ``dies``.

    Lot and wafer ids: the arguments (command line) win, then the ids an earlier report
    wrote into ``previous``, then the recipe's. ``full_dies_only``: the partial edge dies
    are not tested (``dies.tested`` holds the full ones only).
    """
    previous = dict(previous or {})
    scan, sample = ctx.scan, ctx.sample
    recipe = scan.get("recipe") or {}
    versions = {**(scan.get("versions") or {}), **(previous.get("versions") or {})}
    report_versions = software_versions()
    versions.setdefault("waferscope", report_versions.get("waferscope", "unknown"))
    versions["report"] = report_versions.get("waferscope", "unknown")
    info = _sample_info(ctx, recipe, previous, lot_id, wafer_id)

    counts = {name: 0 for name in CLASSES}
    for d in defects:
        counts[d.defect_class] += 1
    header = {
        **previous,
        "sample": info,
        "recipe_sha256": recipe_sha256(recipe),
        "model": _model_info(previous, scan),
        "versions": versions,
        "scan_started": scan.get("started"),
        "scan_finished": scan.get("finished"),
        "scan_status": scan.get("outcome", scan.get("status")),
        "coordinates": COORDINATES,
        "counts": {**counts, "total": len(defects)},
    }
    if ctx.kind == "pv_cell":
        regions: dict[str, int] = {}
        for d in defects:
            regions[d.region or "unknown"] = regions.get(d.region or "unknown", 0) + 1
        header["regions"] = dict(sorted(regions.items(), key=lambda kv: region_order(kv[0])))
    if ctx.kind == "wafer":
        dies = tested_dies(ctx, defects)
        if full_dies_only:
            dies = [d for d in dies if d["full"]]
        if ctx.alignment:
            header["alignment"] = _alignment_entry(ctx)
        header["dies"] = {
            "pitch_mm": list(sample["die_pitch_mm"]),
            "origin_mm": list(sample.get("die_origin_mm", (0.0, 0.0))),
            "full_dies_only": full_dies_only,
            "n_tested": len(dies),
            "n_failed": sum(not d["pass"] for d in dies),
            "tested": dies,
        }
    else:
        header.pop("dies", None)
    return header


def _sample_info(ctx: ScanContext, recipe: dict[str, Any], previous: dict[str, Any],
                 lot_id: str | None, wafer_id: str | None) -> dict[str, Any]:
    """The header's ``sample``: kind and name, a wafer's ids and geometry, a PV cell's."""
    sample = ctx.sample
    info: dict[str, Any] = {"kind": ctx.kind, "name": recipe.get("name") or ctx.folder.name}
    # ids given to an earlier report stick: its defect list's header, or scan.json's report
    # record when inspection has since written a new defect list; a PV cell or coupon
    # carries them too when given (`report --lot`), it has no recipe keys for them
    old = previous.get("sample") or {}
    kept = ctx.scan.get("report") or {}
    ids = {key: given or old.get(key) or kept.get(key) or sample.get(key)
           for key, given in (("lot_id", lot_id), ("wafer_id", wafer_id))}
    if ctx.kind == "wafer":
        info.update(
            **ids,
            diameter_mm=sample.get("diameter_mm"), orientation=sample.get("orientation"),
            edge_exclusion_mm=sample.get("edge_exclusion_mm"),
        )
    else:
        info.update({k: v for k, v in ids.items() if v is not None})
    if ctx.kind == "pv_cell":
        info.update(width_mm=sample.get("width_mm"), height_mm=sample.get("height_mm"),
                    busbars=sample.get("busbars"), edge_band_mm=PV_EDGE_BAND_MM)
    return info


def _alignment_entry(ctx: ScanContext) -> dict[str, Any]:
    """The header's ``alignment`` of an aligned wafer: the pre-alignment's figures, the fine
    alignment's (None without one) and die (0, 0)'s corner in the wafer frame."""
    entry = {k: ctx.alignment.get(k) for k in (
        "center_um", "nominal_center_um", "rotation_deg", "edge_rotation_deg", "mark",
        "mark_angle_deg", "radius_um", "edge_residual_um", "die_residual_um")}
    fine = ctx.alignment.get("refined")
    entry["refined"] = None if not fine else {k: fine.get(k) for k in (
        "source", "edge_center_um", "n_corners", "n_dropped", "residual_um", "scale")}
    # die (0, 0)'s lower corner in the wafer frame, as measured (KLARF's die origin)
    grid = ctx.die_grid()
    if grid is not None:
        entry["die_origin_um"] = [round(v, 3) for v in ctx.to_wafer_um(*grid.corner(0, 0))]
    return entry
