"""The report stage: from ``defects.json`` to every output a fab uses.

Reads the scan folder only (``scan.json``, ``tiles.csv``, ``defects.json``), so it can be
re-run at any time without re-acquiring (``waferscope report SCAN``). Rewriting is
idempotent: running it twice gives the same ``defects.json`` and ``defects.csv``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scanner.defectlist import DEFECTS_CSV, DEFECTS_JSON, Defect, read_defects, write_defects
from scanner.errors import UserError
from scanner.recipe import OutputSpec, recorded
from scanner.reports.klarf import KLARF, KLARF_VERSIONS, write_klarf
from scanner.reports.locate import ScanContext, build_header, locate, tested_dies
from scanner.reports.repeaters import (
    REPEATERS_JSON,
    find_repeaters,
    read_repeaters,
    write_repeaters,
)
from scanner.reports.wafermap import WAFERMAP, draw_wafermap
from scanner.scanfolder import SCAN_JSON, read_scan_json, write_json


@dataclass
class ReportResult:
    """What the report stage wrote.

    Attributes
    ----------
    folder : Path
        Scan folder.
    outputs : dict of str to Path
        Written files by name (``defects``, ``defects csv``, ``klarf``, ``wafer map``).
    n_defects : int
        Number of defects in the list.
    wall_s : float
        Wall time of the stage.
    """

    folder: Path
    outputs: dict[str, Path] = field(default_factory=dict)
    n_defects: int = 0
    wall_s: float = 0.0


def report(folder: Path, *, lot_id: str | None = None, wafer_id: str | None = None,
           record: bool = True, klarf_version: str | None = None,
           full_dies_only: bool = False, out: Path | None = None) -> ReportResult:
    """Locate the defects of a scan folder and write all report outputs.

    Parameters
    ----------
    folder : Path
        Scan folder with ``scan.json``, ``tiles.csv`` and ``defects.json``.
    out : Path, optional
        The folder ``waferscope inspect SCAN --out`` wrote the scan's ``defects.json`` to:
        its defects are located with the scan's geometry and the reports written there
        (nothing is recorded in the scan folder).
    lot_id, wafer_id : str, optional
        Override the recipe's lot and wafer ids (KLARF ``LotID`` / ``WaferID``).
    record : bool
        Record the stage's wall time and outputs in ``scan.json``.
    klarf_version : {"1.2", "1.8"}, optional
        KLARF version of ``defects.klarf`` (default: the recipe's ``output.klarf_version``).
    full_dies_only : bool
        Leave the partial edge dies out of the test plan and the yield (the KLARF's
        ``SampleTestPlan`` and summary, ``dies`` in the header and the wafer map); their
        defects stay in ``defects.json`` but not in the KLARF, whose defects lie in tested
        dies.

    Raises
    ------
    UserError
        If the folder is not a scan folder or has no readable ``defects.json``.
    """
    t0 = time.perf_counter()
    ctx = ScanContext.load(Path(folder))
    folder = Path(out) if out is not None else Path(folder)
    record = record and out is None
    for name in (DEFECTS_JSON, DEFECTS_CSV, REPEATERS_JSON, KLARF, WAFERMAP):
        if (folder / name).is_dir():  # found after the first outputs were replaced (exit 1)
            raise UserError(f"{folder / name}: a folder where the report writes its file; "
                            "move it away")
    previous, defects = read_defects(folder)
    created = previous.get("created")
    # defects an earlier run of this stage moved to repeaters.json take part again
    defects = sorted(defects + read_repeaters(folder, created), key=lambda d: d.id)
    defects = locate(defects, ctx)
    groups: list = []
    map_px = previous.get("map_pixel_size_um")
    tolerance = 3.0 * float(map_px) if map_px else 50.0
    if ctx.kind == "wafer":
        n_full = sum(1 for die in tested_dies(ctx, []) if die["full"])
        defects, groups = find_repeaters(defects, n_full, tolerance)
    if klarf_version is None:
        klarf_version = recorded(ctx.scan, OutputSpec).klarf_version
    if klarf_version not in KLARF_VERSIONS:
        raise UserError(f"--klarf-version: {klarf_version} is not one of "
                        f"{', '.join(KLARF_VERSIONS)}")
    header = build_header(ctx, defects, previous, lot_id=lot_id, wafer_id=wafer_id,
                          full_dies_only=full_dies_only)
    header["n_defects"] = len(defects)
    if ctx.kind == "wafer":
        header["repeaters"] = {"groups": len(groups),
                               "defects": sum(len(g.defects) for g in groups),
                               "file": REPEATERS_JSON}
    write_defects(folder, defects, header)
    result = ReportResult(folder, n_defects=len(defects))
    result.outputs["defects"] = folder / DEFECTS_JSON
    result.outputs["defects csv"] = folder / DEFECTS_CSV
    if groups or (folder / REPEATERS_JSON).exists():
        result.outputs["repeaters"] = write_repeaters(folder, groups, created, tolerance)
    if ctx.kind == "wafer":
        result.outputs["klarf"] = _klarf(folder, ctx, header, defects, full_dies_only,
                                         klarf_version)
    result.outputs["wafer map"] = draw_wafermap(
        folder / WAFERMAP, ctx, header, defects,
        repeaters=[d for g in groups for d in g.defects])
    result.wall_s = time.perf_counter() - t0
    if record:
        scan = read_scan_json(folder)
        scan.setdefault("timings", {})["report"] = {"wall_s": round(result.wall_s, 3)}
        scan["report"] = {"outputs": sorted(p.name for p in result.outputs.values()),
                          "n_defects": len(defects),
                          **{k: v for k in ("lot_id", "wafer_id")
                             if (v := header["sample"].get(k)) is not None}}
        write_json(folder / SCAN_JSON, scan)
    return result


def _klarf(folder: Path, ctx: ScanContext, header: dict[str, Any], defects: list[Defect],
           full_dies_only: bool, klarf_version: str) -> Path:
    """Write a wafer's ``defects.klarf``: the defects in the test plan (the dies the header
    lists as tested with ``full_dies_only``, else all) over the inspected area."""
    region = ctx.inspected_polygon()
    micro = ctx.scan.get("microscope") or {}
    station = ("WAFERSCOPE", str(micro.get("kind", "microscope")).upper(),
               str(header.get("versions", {}).get("waferscope", "0")))
    tested = {(d["col"], d["row"]) for d in (header.get("dies") or {}).get("tested", [])}
    in_plan = [d for d in defects if (d.die_col, d.die_row) in tested] \
        if full_dies_only else defects
    area = region.area if region is not None else 0.0
    if full_dies_only and region is not None:
        area = float(len(tested) * ctx.die_area_um2())
    return write_klarf(folder / KLARF, header, in_plan, ctx.sample, area, station=station,
                       version=klarf_version)
