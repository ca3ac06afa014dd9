"""The whole flow for one recipe: plan → acquire → stitch, with ``scan.json`` kept current."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from devices.core import MicroscopeHandle, build_microscope

from .acquire import acquire
from .defectlist import DEFECTS_JSON, MAP_NAMES
from .focusreport import write_focus_outputs
from .plan import ScanPlan, check_travel, estimate_hardware_time_s, exposure_for, plan_scan
from .recipe import Recipe
from .scanfolder import (
    SCAN_JSON,
    TRUTH_JSON,
    now_iso,
    prepare_folder,
    read_scan_json,
    software_versions,
    write_json,
)
from .stitch import MOSAIC, stitch_scan
from .tilestore import read_tiles_csv


class Observer(Protocol):
    """Receives progress of the stages (the CLI draws progress bars from it)."""

    def stage_started(self, stage: str, total: int) -> None: ...

    def advance(self, stage: str, done: int) -> None: ...

    def stage_finished(self, stage: str) -> None: ...


class _Silent:
    def stage_started(self, stage: str, total: int) -> None:
        pass

    def advance(self, stage: str, done: int) -> None:
        pass

    def stage_finished(self, stage: str) -> None:
        pass


@dataclass
class ScanResult:
    """Where a scan's outputs are and how it went."""

    folder: Path
    status: str
    n_tiles: int
    n_acquired: int
    timings: dict[str, dict[str, float]]

    @property
    def outputs(self) -> dict[str, Path]:
        """Output files that exist in the scan folder."""
        names = {"scan": SCAN_JSON, "tiles": "tiles.csv", "raw tiles": "tiles.zarr",
                 "mosaic": MOSAIC, "truth": TRUTH_JSON, "focus map": "focus_map.json",
                 "focus plot": "focus_map.png", "defects": "defects.json",
                 "defects csv": "defects.csv", "klarf": "defects.klarf",
                 "wafer map": "wafermap.png", "flat-field": "flatfield.npy",
                 **{f"{name} map": file for name, file in MAP_NAMES.items()}}
        return {k: self.folder / v for k, v in names.items() if (self.folder / v).exists()}


def plan_summary(plan: ScanPlan, recipe: Recipe) -> dict[str, Any]:
    """What ``validate`` prints and ``scan.json`` records about the plan."""
    return {
        "n_tiles": len(plan.tiles),
        "n_rows": plan.n_rows,
        "n_cols": plan.n_cols,
        "fov_um": list(plan.fov_um),
        "step_um": list(plan.step_um),
        "region_area_mm2": round(plan.region_area_mm2, 4),
        "scanned_area_mm2": round(plan.scanned_area_mm2, 4),
        "exposure_ms": exposure_for(recipe),
        "estimated_hardware_s": round(estimate_hardware_time_s(plan, recipe), 3),
    }


def make_plan(recipe: Recipe, handle: MicroscopeHandle) -> ScanPlan:
    """Plan the scan for a built microscope and refuse it if it leaves the travel range."""
    plan = plan_scan(recipe, handle.fov_um())
    check_travel(plan, recipe)
    return plan


def run_scan(
    recipe: Recipe,
    out: Path | None = None,
    *,
    overwrite: bool = False,
    observer: Observer | None = None,
    inspect: bool = False,
    model: Any = None,
) -> ScanResult:
    """Scan a recipe's sample into a new scan folder.

    Everything that can be refused (recipe, plan, output folder) is checked before the
    stage moves. ``scan.json`` is written before acquisition starts and updated after each
    stage, so an interrupted scan leaves a folder that says how far it got. With ``inspect``
    (what ``waferscope run`` asks for unless ``--no-inspect``) the mosaic is then inspected
    with ``model`` (a path, a loaded model, or None for the shipped default).
    """
    observer = observer or _Silent()
    handle = build_microscope(recipe)
    plan = make_plan(recipe, handle)
    folder = prepare_folder(out, recipe.output.root, recipe.output.name or recipe.name, overwrite)
    pixel_size = handle.core.getPixelSizeUm()
    scan: dict[str, Any] = {
        "status": "acquiring",
        "started": now_iso(),
        "finished": None,
        "recipe": recipe.model_dump(mode="json"),
        "versions": software_versions(),
        "microscope": {
            "kind": handle.kind,
            "pixel_size_um": pixel_size,
            "camera_shape": [handle.core.getImageHeight(), handle.core.getImageWidth()],
            "depth_of_field_um": handle.depth_of_field_um,
            **{k: v for k, v in handle.info.items() if k != "labels"},
        },
        "plan": plan_summary(plan, recipe),
        "timings": {},
    }
    write_json(folder / SCAN_JSON, scan)
    if handle.truth is not None:
        write_json(folder / TRUTH_JSON, handle.truth)

    observer.stage_started("acquire", len(plan.tiles))
    handle.core.mda.events.frameReady.connect(lambda *_: observer.advance("acquire", 1))
    try:
        result = acquire(handle, plan, recipe, folder)
    except BaseException as exc:
        scan.update(status="failed", error=f"{type(exc).__name__}: {exc}", finished=now_iso())
        write_json(folder / SCAN_JSON, scan)
        raise
    finally:
        observer.stage_finished("acquire")
    scan["timings"]["acquire"] = {"hardware_s": round(result.hardware_s, 3),
                                  "wall_s": round(result.wall_s, 3)}
    scan["acquired_tiles"] = result.n_acquired
    scan["focus"] = {k: v for k, v in result.focus.items() if k not in ("points", "surface")}
    if recipe.scan.focus.strategy != "none":
        write_focus_outputs(folder, result.focus, read_tiles_csv(folder))
    if result.lost:
        scan["lost_tiles"] = {str(k): v for k, v in result.lost.items()}
    scan["status"] = "stitching"
    write_json(folder / SCAN_JSON, scan)

    _stitch_stage(folder, scan, pixel_size, recipe.output.chunk_px, observer)
    if inspect:
        scan["status"] = "inspecting"
        write_json(folder / SCAN_JSON, scan)
        inspect_stage(folder, scan, model=model, observer=observer)
    scan["status"] = "complete" if result.complete else "incomplete"
    scan["finished"] = now_iso()
    write_json(folder / SCAN_JSON, scan)
    if (folder / DEFECTS_JSON).is_file():
        _report_stage(folder, observer)
        scan = read_scan_json(folder)
    return ScanResult(folder, scan["status"], len(plan.tiles), result.n_acquired, scan["timings"])


def _stitch_stage(
    folder: Path, scan: dict[str, Any], pixel_size: float, chunk: int, observer: Observer
) -> None:
    """Fuse the mosaic and record it (and the stage's wall time) in ``scan``."""
    t0 = time.perf_counter()
    started: set[str] = set()

    def on_step(step: str, done: int, total: int) -> None:
        stage = "register" if step == "register" else "stitch"
        if stage not in started:
            observer.stage_started(stage, total)
            started.add(stage)
        observer.advance(stage, 1)

    recipe = scan.get("recipe", {})
    options = recipe.get("stitch", {}) or {}
    microscope = recipe.get("microscope", {}) or {}
    calibration = microscope.get("calibration")
    result = stitch_scan(
        folder,
        pixel_size,
        repeatability_um=float((microscope.get("stage") or {}).get("repeatability_um", 2.0)),
        registration=bool(options.get("registration", True)),
        flatfield=bool(options.get("flatfield", True)),
        calibration=Path(calibration) if calibration else None,
        max_shift_um=options.get("max_shift_um"),
        min_ncc=float(options.get("min_confidence", 0.3)),
        chunk=chunk,
        progress=on_step,
    )
    info = result.mosaic
    for stage in started:
        observer.stage_finished(stage)
    scan.setdefault("timings", {})["stitch"] = {"wall_s": round(time.perf_counter() - t0, 3),
                                                **result.timings}
    scan["registration"] = result.registration
    scan["flatfield"] = result.flatfield
    scan["stitch_camera"] = {"pixel_size_um": result.camera.pixel_size_um,
                             "rotation_deg": result.camera.rotation_deg,
                             "calibration": calibration}
    scan["mosaic"] = {"path": MOSAIC, "shape": list(info.shape), "levels": info.n_levels,
                      "pixel_size_um": info.pixel_size_um, "origin_um": list(info.origin_um)}
    write_json(folder / SCAN_JSON, scan)


def _report_stage(folder: Path, observer: Observer) -> None:
    """Locate the defects and write defects.json/csv, the KLARF and the wafer map."""
    from .reports import report

    observer.stage_started("report", 1)
    report(folder)
    observer.advance("report", 1)
    observer.stage_finished("report")


def restitch(folder: Path, observer: Observer | None = None) -> ScanResult:
    """Re-run the stitch stage on an existing scan folder."""
    observer = observer or _Silent()
    scan = read_scan_json(folder)
    pixel_size = float(scan["microscope"]["pixel_size_um"])
    chunk = int(scan["recipe"].get("output", {}).get("chunk_px", 1024))
    _stitch_stage(Path(folder), scan, pixel_size, chunk, observer)
    n = int(scan.get("plan", {}).get("n_tiles", 0))
    return ScanResult(Path(folder), scan.get("status", "unknown"), n,
                      int(scan.get("acquired_tiles", n)), scan["timings"])


def inspect_stage(
    folder: Path,
    scan: dict[str, Any] | None = None,
    *,
    model: Any = None,
    threshold: float | None = None,
    observer: Observer | None = None,
) -> Any:
    """Inspect the scan folder's mosaic: maps, ``defects.json``/``.csv``, ``scan.json`` timings."""
    from .inspection import inspect_scan

    observer = observer or _Silent()
    started, last = False, 0

    def on_window(done: int, total: int) -> None:
        nonlocal started, last
        if not started:
            observer.stage_started("inspect", total)
            started = True
        if done > last:
            observer.advance("inspect", done - last)
            last = done

    try:
        return inspect_scan(Path(folder), model=model, threshold=threshold, scan=scan,
                            progress=on_window)
    finally:
        observer.stage_finished("inspect")
