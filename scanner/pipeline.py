"""The whole flow for one recipe: plan → acquire → stitch, with ``scan.json`` kept current."""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from devices.core import MicroscopeHandle, build_microscope
from devices.errors import HardwareError
from devices.inventory import inventory_json
from scanner.acquisition.acquire import acquire, camera_dtype
from scanner.acquisition.align import (
    ALIGNMENT_PNG,
    REFUSED_ALIGNMENT_PNG,
    AlignmentError,
    align,
    wants_alignment,
)
from scanner.acquisition.alignrefine import camera_turn, refine_alignment
from scanner.acquisition.focusreport import write_focus_outputs
from scanner.acquisition.plan import ScanPlan, overlap_warning, resolve_plan
from scanner.defectlist import DEFECTS_JSON, MAP_NAMES
from scanner.errors import UserError
from scanner.events import StageEvents
from scanner.integrity import damaged_output, planned_tiles, recorded_pixel_size
from scanner.recipe import (
    OutputSpec,
    Recipe,
    RecipeError,
    StageSpec,
    StitchSpec,
    parse_recipe,
    recorded,
)
from scanner.scanfolder import (
    RUNNING,
    SCAN_JSON,
    TRUTH_JSON,
    discard,
    effective_status,
    file_sha256,
    hold,
    now_iso,
    prepare_folder,
    put_back,
    read_scan_json,
    set_aside_path,
    software_versions,
    this_process,
    write_json,
)
from scanner.stitching.registration.live import LiveRegistrar, LiveResults
from scanner.stitching.stitch import MOSAIC, camera_geometry, stitch_scan
from scanner.tilestore import (
    TILES_CSV,
    TILES_ZARR,
    TileRecord,
    check_journal_kept,
    check_recorded_camera,
    decodable_tiles,
    open_tiles,
    read_tiles_csv,
    stored_tiles,
)

if TYPE_CHECKING:
    from scanner.inspection.card import ModelRef

log = logging.getLogger("waferscope.pipeline")


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


def make_plan(recipe: Recipe, handle: MicroscopeHandle,
              alignment: dict[str, Any] | None = None) -> ScanPlan:
    """Plan the scan for a built microscope (where the alignment found the sample, if it
    ran) and refuse it if it leaves the travel range or its die grid is too fine for the
    camera."""
    focus = recipe.scan.focus
    if focus.strategy != "none" and focus.method == "hardware" and \
            not handle.core.getAutoFocusDevice():
        # every autofocus then failed, and the scan ended "complete" with no tile focused
        raise RecipeError("scan.focus.method: hardware, but the microscope has no autofocus "
                          "device (Core AutoFocus role); use method: image or configure one")
    return resolve_plan(recipe, handle.fov_um(), alignment,
                        pixel_size_um=float(handle.core.getPixelSizeUm()), core=handle.core)


def plan_warnings(recipe: Recipe, handle: MicroscopeHandle) -> list[str]:
    """What in a recipe that can be scanned will likely spoil the scan (see
    :func:`scanner.acquisition.plan.overlap_warning`)."""
    found = overlap_warning(recipe, handle.fov_um(), float(handle.core.getPixelSizeUm()))
    return [found] if found else []


def run_scan(
    recipe: Recipe,
    out: Path | None = None,
    *,
    overwrite: bool = False,
    events: StageEvents | None = None,
    inspect: bool = False,
    model: ModelRef = None,
    cluster: Any = None,
) -> ScanResult:
    """Scan a recipe's sample into a new scan folder.

    Everything that can be refused (recipe, plan, output folder) is checked before the
    stage moves. ``scan.json`` is written before acquisition starts and updated after each
    stage, so an interrupted scan leaves a folder that says how far it got and that
    :func:`resume_scan` can finish. With ``inspect`` (what ``waferscope run`` asks for unless
    ``--no-inspect``) the mosaic is then inspected with ``model`` (a path, a loaded model, or
    None for the shipped default). With ``cluster`` (:class:`scanner.cluster.Cluster`) fusion
    and inspection run as dask tasks (the same mosaic; see :mod:`scanner.cluster`).
    """
    events = events or StageEvents()
    # the hardware is released however the scan ends (see MicroscopeHandle.close)
    with build_microscope(recipe) as handle:
        try:
            plan = make_plan(recipe, handle)
            for warning in plan_warnings(recipe, handle):
                log.warning("%s", warning)
            folder, aside = prepare_folder(out, recipe.output.root,
                                           recipe.output.name or recipe.name, overwrite)
        except KeyboardInterrupt:  # no scan to resume
            raise KeyboardInterrupt("stopped before the scan began; nothing was written") \
                from None
        with hold(folder):
            try:
                scan, plan = _start_scan(folder, recipe, handle, plan, events, inspect, model)
            except BaseException as exc:
                if aside is None or not aside.is_dir():
                    raise
                # refused before its first tile: the earlier scan stays
                raise _kept_earlier_scan(folder, aside, exc) from None
            try:
                # the earlier scan goes at the new scan's first tile stored, not before: a
                # camera that gives no frame (every tile lost) or a stop before the first
                # tile replaced a complete scan with one that had acquired nothing
                return _finish_scan(folder, scan, recipe, events, model, handle=handle,
                                    plan=plan, cluster=cluster, replaces=aside)
            except BaseException as exc:
                if aside is None or not aside.is_dir():
                    raise
                raise _kept_earlier_scan(folder, aside, exc, aligned=True) from None


def _kept_earlier_scan(folder: Path, aside: Path, exc: BaseException, *,
                       aligned: bool = False) -> BaseException:
    """Put back the earlier scan a ``run --overwrite`` refused before its first tile set
    aside, and the error to raise: ``exc``, saying that scan is kept, and where the picture of
    a refused alignment (which the error cites) now is: in the earlier scan, as
    :data:`REFUSED_ALIGNMENT_PNG` (its own ``alignment.png`` is left as it was). ``aligned``:
    the new scan's alignment was not what stopped it (no tile was stored after it)."""
    seen = folder / ALIGNMENT_PNG
    kept = seen.is_file() and not isinstance(exc, KeyboardInterrupt) and not aligned
    if kept:
        seen.replace(aside / REFUSED_ALIGNMENT_PNG)
    put_back(folder, aside)
    if isinstance(exc, KeyboardInterrupt):  # not this scan to resume: the old one
        return KeyboardInterrupt(f"stopped before the first tile; the earlier scan in {folder} "
                                 "is kept as it was")
    if isinstance(exc, HardwareError) and not isinstance(exc, UserError):
        # not this scan to resume either (it acquired nothing): the old one is back
        said = "; ".join(part for part in str(exc).split("; ")
                         if "resume" not in part and "tiles taken are kept" not in part)
        return HardwareError(f"{said}; no tile was stored and the earlier scan in {folder} is "
                             "kept as it was (put the hardware right and run again)")
    if not (isinstance(exc, UserError) and kept):
        return exc
    picture = folder / REFUSED_ALIGNMENT_PNG
    message = str(exc).replace(f"see {ALIGNMENT_PNG}", f"see {picture}")
    if str(picture) not in message:
        message += f" (what it saw: {picture})"
    return UserError(f"{message}; the earlier scan in {folder} is kept as it was")


def _sample_picture(recipe: Recipe) -> dict[str, str] | None:
    """The picture an ``image`` sample is made from, and its SHA-256 (None for other
    samples): a resume checks that its missing tiles show the same picture."""
    path = getattr(recipe.sample, "path", None)
    if getattr(recipe.sample, "kind", None) != "image" or path is None:
        return None
    path = Path(path).resolve()
    return {"path": str(path), "sha256": file_sha256(path)} if path.is_file() else None


def _check_sample_picture(folder: Path, scan: dict[str, Any]) -> None:
    """Refuse to resume a scan of an ``image`` sample whose picture changed since it started:
    the new tiles would show another part than those taken (mixed without a word)."""
    recorded = scan.get("sample_file")
    if not isinstance(recorded, dict) or not recorded.get("path"):
        return
    path = Path(recorded["path"])
    if path.is_file() and file_sha256(path) != recorded.get("sha256"):
        raise UserError(f"sample.path: {path} changed since the scan started; the tiles taken "
                        "show the earlier picture (scan the new one with `waferscope run`)")


def _start_scan(folder: Path, recipe: Recipe, handle: MicroscopeHandle, plan: ScanPlan,
                events: StageEvents, inspect: bool, model: ModelRef
                ) -> tuple[dict[str, Any], ScanPlan]:
    """The new scan's record written and its sample aligned (when asked): what
    :func:`run_scan` does before the first tile."""
    pixel_size = handle.core.getPixelSizeUm()
    model_path = getattr(model, "path", model)
    scan: dict[str, Any] = {
        "status": "acquiring",
        "started": now_iso(),
        "finished": None,
        "process": this_process(),
        "recipe": recipe.model_dump(mode="json"),
        # what `resume` needs to finish the scan exactly as `run` would have
        "options": {"inspect": bool(inspect),
                    "model": str(Path(model_path).resolve()) if model_path else None},
        "versions": software_versions(),
        "microscope": {
            "kind": handle.kind,
            "pixel_size_um": pixel_size,
            "camera_shape": [handle.core.getImageHeight(), handle.core.getImageWidth()],
            # what the raw tiles are stored as: a store whose zarr.json was edited to another
            # type (int16) read every tile's bytes as that type, wrapped
            "camera_dtype": str(camera_dtype(handle.core)),
            "depth_of_field_um": handle.depth_of_field_um,
            **{k: v for k, v in handle.info.items() if k != "labels"},
            "devices": inventory_json(handle.core),
        },
        "plan": plan.summary(),
        "acquired_tiles": 0,
        "timings": {},
    }
    picture = _sample_picture(recipe)
    if picture is not None:
        scan["sample_file"] = picture
    if wants_alignment(recipe):
        scan["status"] = "aligning"
    write_json(folder / SCAN_JSON, scan)
    if handle.truth is not None:
        write_json(folder / TRUTH_JSON, handle.truth)
    if wants_alignment(recipe):
        plan = _align_stage(folder, scan, recipe, handle, events)
    return scan, plan


def _align_stage(folder: Path, scan: dict[str, Any], recipe: Recipe, handle: MicroscopeHandle,
                 events: StageEvents) -> ScanPlan:
    """Find where the sample lies, record it in ``scan`` and plan the scan there.

    A refused alignment (or a plan that now leaves the travel) ends the scan as ``failed``
    before any tile is taken, with ``alignment.png`` beside ``scan.json``.
    """
    events.stageStarted.emit("align", 1)
    try:
        try:
            alignment = align(handle, recipe, folder).model_dump(mode="json")
        except AlignmentError as exc:
            # `auto` aligns where it can: a mark or die site it cannot read (a field smaller
            # than the notch, a die pattern it cannot lock on) leaves the recipe's placement,
            # said in scan.json and the log. A sample not where the recipe puts it (no edge)
            # is refused whatever the setting, and `align: true` refuses every failure.
            if recipe.scan.align != "auto" or str(exc).startswith("sample.center_um:"):
                raise
            log.warning("alignment skipped, the recipe's placement is used: %s", exc)
            scan["alignment_skipped"] = str(exc)
            alignment = None
        else:
            scan["alignment"] = alignment
            scan["timings"]["align"] = {"hardware_s": alignment["hardware_s"]}
            if alignment.get("die_sites_skipped"):
                mark = getattr(recipe.sample, "orientation", "none")
                log.warning("die sites skipped, the wafer is placed by its edge%s: %s",
                            "" if mark == "none" else f" and {mark}",
                            alignment["die_sites_skipped"])
        plan = make_plan(recipe, handle, alignment)
    except BaseException as exc:
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):  # Ctrl-C, SIGTERM: resumable
            scan.update(status="interrupted", finished=now_iso())
        else:
            scan.update(status="failed", finished=now_iso(),
                        error=f"{type(exc).__name__}: {exc}")
        write_json(folder / SCAN_JSON, scan)
        raise
    finally:
        events.stageFinished.emit("align")
    scan["plan"] = plan.summary()
    scan["status"] = "acquiring"
    write_json(folder / SCAN_JSON, scan)
    return plan


def resume_scan(folder: Path, *, events: StageEvents | None = None,
                cluster: Any = None) -> ScanResult:
    """Finish a scan that stopped (Ctrl-C, SIGTERM, ``kill -9``, lost tiles, a full disk).

    The journal is the truth: only planned tiles without an ``ok`` row whose data is in the
    store are acquired (a tile in the store without its row, or lost, is taken again), then
    the scan is stitched, inspected and reported as ``run`` would have done, with the options
    ``run`` recorded.

    Raises
    ------
    UserError
        If the folder is not a scan, is complete with every tile in its store, is still
        running, or its recipe or plan no longer match.
    """
    events = events or StageEvents()
    folder = Path(folder)
    scan = read_scan_json(folder)  # not a scan: refused before a lock file is made in it
    planned_tiles(folder, scan)
    with hold(folder):
        return _resume(folder, events, cluster)


def _resume(folder: Path, events: StageEvents, cluster: Any) -> ScanResult:
    """:func:`resume_scan` with the folder held."""
    scan = read_scan_json(folder)
    status = effective_status(scan, others_hold=False)  # (this process holds the folder)
    if status in RUNNING:
        raise UserError(f"{folder}: the scan is still {status} (process "
                        f"{scan.get('process', {}).get('pid')} is alive)")
    n = planned_tiles(folder, scan)  # before anything reads the plan: one line, not KeyError
    check_journal_kept(folder)  # refused before the scan is marked as resumed
    done = _acquired(folder, n, decode=True)  # every raw tile read once, here only
    if status == "complete" and len(done) == n:
        damage = damaged_output(folder)
        if damage is None:
            raise UserError(f"{folder}: the scan is complete; nothing to resume")
        # what a later stage wrote is damaged, its raw tiles whole: written again from them
        log.warning("%s; stitched, inspected and reported again from the intact raw tiles",
                    damage)
    # a complete scan that has since lost tiles (a journal row or a tile's data gone) is
    # resumed like a stopped one: the lost tiles are taken again
    try:
        recipe = parse_recipe(scan.get("recipe"), base_dir=folder)
    except RecipeError as exc:
        raise UserError(f"{folder / SCAN_JSON}: cannot resume, the recorded recipe is not "
                        f"valid now: {exc}") from None
    recorded_pixel_size(folder, scan)  # what the stitch stage places the tiles with
    if len(done) < n:
        _check_sample_picture(folder, scan)
    options = scan.get("options") or {"inspect": False, "model": None}
    model = options.get("model")
    if options.get("inspect"):
        from scanner.inspection.inspect import load_inspection_model

        # before the stage moves, as `run` does: a model file gone since was found only
        # after every missing tile had been taken and stitched
        model = load_inspection_model(model)
    handle = plan = None
    try:  # the hardware is released however the resume ends
        if wants_alignment(recipe) and not scan.get("alignment") \
                and not scan.get("alignment_skipped"):
            # stopped while aligning: nothing was tiled yet, so align (and plan) now
            handle = build_microscope(recipe)
            plan = _align_stage(folder, scan, recipe, handle, events)
            n = len(plan.tiles)  # planned again where the sample was found
            done = _acquired(folder, n, decode=True)
        if len(done) < n and plan is None:
            handle = build_microscope(recipe)
            # the recorded alignment, not a new one: the tiles taken lie where it put them
            plan = make_plan(recipe, handle, scan.get("alignment"))
            recorded = {k: scan["plan"].get(k) for k in ("n_tiles", "n_rows", "n_cols")}
            now = {k: plan.summary()[k] for k in recorded}
            if now != recorded:
                raise UserError(f"{folder}: cannot resume, the plan changed ({recorded} recorded, "
                                f"{now} now)")
            _check_same_optics(folder, scan, plan, float(handle.core.getPixelSizeUm()))
        # the scan this one replaced (`run --overwrite`), when that run was killed before
        # it could delete it: this scan goes on, so it goes (said: `run --overwrite` again
        # would have put it back)
        aside = set_aside_path(folder)
        if aside.is_dir():
            log.warning("the earlier scan this one replaced (kept in %s) is deleted: this one "
                        "is resumed", aside)
        discard(aside, folder)
        damaged = _say_damaged_tiles(folder, n, done)
        scan.setdefault("resumed", []).append({"at": now_iso(), "previous_status": status,
                                               "tiles_missing": n - len(done),
                                               **({"tiles_damaged": damaged} if damaged else {})})
        scan.update(status="acquiring", process=this_process(), finished=None)
        scan.pop("error", None)
        write_json(folder / SCAN_JSON, scan)
        return _finish_scan(folder, scan, recipe, events, model,
                            handle=handle, plan=plan, only=set(range(n)) - done,
                            inspect=bool(options.get("inspect")), cluster=cluster)
    finally:
        if handle is not None:
            handle.close()


#: relative change of the pixel size or field past which a resume is refused
OPTICS_TOLERANCE = 1e-3


def _check_same_optics(folder: Path, scan: dict[str, Any], plan: ScanPlan,
                       pixel_size_um: float) -> None:
    """Refuse a resume whose microscope images at another scale than the scan recorded (an
    objective changed, a pixel-size preset or calibration file edited): the missing tiles
    were taken at 10.3 um/px on a grid moved for it, into a mosaic of 10 um pixels."""
    checks = [("pixel size", scan.get("microscope", {}).get("pixel_size_um"), pixel_size_um,
               "um"),
              ("field of view", scan.get("plan", {}).get("fov_um"), list(plan.fov_um), "um"),
              ("tile step", scan.get("plan", {}).get("step_um"), list(plan.step_um), "um")]
    for what, was, now, unit in checks:
        try:
            a, b = np.atleast_1d(np.asarray(was, float)), np.atleast_1d(np.asarray(now, float))
            same = a.shape == b.shape and bool(np.all(np.abs(a - b) <= OPTICS_TOLERANCE * abs(b)))
        except (TypeError, ValueError):
            same = False
        if not same:
            raise UserError(f"{folder}: cannot resume, the microscope's {what} changed ({was} "
                            f"{unit} recorded, {now} {unit} now: another objective, pixel-size "
                            "preset or calibration file); put it back as it was, or scan again")


def _say_damaged_tiles(folder: Path, n_planned: int, done: set[int]) -> list[int]:
    """Warn of the tiles a resume takes again because their data is damaged: journaled
    ``ok`` but their chunk missing or not decodable (read as such, never as black). A resume
    that redoes damaged data says so: the scan then holds tiles of two sessions. Returns
    their indices."""
    journaled = {r.index: r for r in read_tiles_csv(folder)
                 if r.status == "ok" and 0 <= r.index < n_planned}
    damaged = sorted(set(journaled) - done)
    if damaged:
        stored = stored_tiles(open_tiles(folder))
        named = ", ".join(f"{i} (row {journaled[i].row}, col {journaled[i].col}: "
                          f"{'cannot be decoded' if i in stored else 'missing'})"
                          for i in damaged[:5])
        more = f" and {len(damaged) - 5} more" if len(damaged) > 5 else ""
        log.warning("%s: the data of journaled tile%s %s%s is damaged; taken again",
                    folder / TILES_ZARR, "s" if len(damaged) > 1 else "", named, more)
    return damaged


def _acquired(folder: Path, n_planned: int, decode: bool = False) -> set[int]:
    """Plan indices with an ``ok`` journal row and their data in the store (with ``decode``,
    data that decodes: a resume reads every tile once, so that one cut short by a crash is
    taken again rather than stopping the stitch)."""
    if not (folder / TILES_CSV).is_file():
        return set()
    array = open_tiles(folder)
    if decode:  # the tiles read as the camera took them, or not at all
        check_recorded_camera(folder, array)
    stored = stored_tiles(array)
    done = {r.index for r in read_tiles_csv(folder)
            if r.status == "ok" and r.index in stored and 0 <= r.index < n_planned}
    return decodable_tiles(array, done) if decode else done


def _finish_scan(
    folder: Path,
    scan: dict[str, Any],
    recipe: Recipe,
    events: StageEvents,
    model: ModelRef,
    *,
    handle: MicroscopeHandle | None,
    plan: ScanPlan | None,
    only: set[int] | None = None,
    inspect: bool | None = None,
    cluster: Any = None,
    replaces: Path | None = None,
) -> ScanResult:
    """Acquire (what is missing), stitch, inspect and report, keeping ``scan.json`` current.

    Whatever stops the scan, ``scan.json`` ends as ``interrupted`` (Ctrl-C, SIGTERM) or
    ``failed`` (an error), with the number of tiles acquired. ``replaces``: the earlier scan
    a ``run --overwrite`` set aside, deleted once this scan stored its first tile (left
    where it is when none was: the caller puts it back).
    """
    if inspect is None:
        inspect = bool(scan["options"]["inspect"])
    n_tiles = int(scan["plan"]["n_tiles"])
    live = None
    try:
        if handle is not None and plan is not None:
            # the pairs of the tiles are registered and the flat-field's thumbnails computed
            # while the stage moves (the stitch stage computes what is missing), see
            # scanner.stitching.registration.live
            live = _start_live(scan, handle, plan, only)
            try:
                with _responsive_gil(live is not None):
                    _acquire_stage(folder, scan, recipe, handle, plan, events, only,
                                   on_tile=_replacing(replaces, folder, _counting_tiles(
                                       folder, scan, plan, only,
                                       live.feed if live is not None else None)))
            finally:  # the stage, camera and ports are free while the mosaic is made
                handle.close()
        last_tile = time.perf_counter()  # what follows is the wait after the stage stopped
        if not _acquired(folder, n_tiles):
            # a scan shorter than the lost-in-a-row limit lost every tile: nothing to stitch
            raise HardwareError(
                f"acquisition: none of the {n_tiles} planned tiles was acquired (every one "
                "lost, see the log above); put the hardware right and run `waferscope "
                "resume` on the scan folder")
        precomputed = _finish_live(live)
        if precomputed is not None:
            _record_live(scan, precomputed.stats)
        else:  # nothing was processed during this run's acquisition (if it had one)
            scan.pop("during_acquisition", None)
            scan["timings"].pop("during_acquisition", None)
        _set_status(folder, scan, "stitching")
        pixel_size = recorded_pixel_size(folder, scan)
        _stitch_stage(folder, scan, pixel_size, recipe.output.chunk_px, events, cluster,
                      precomputed=precomputed)
        # acquisition is over: the journal no longer changes (read once)
        n_acquired = len(_acquired(folder, n_tiles))
        if inspect:
            _set_status(folder, scan, "inspecting")
            inspect_stage(folder, scan, model=model, events=events, cluster=cluster)
        if (folder / DEFECTS_JSON).is_file():
            # the reports' header carries how the scan ended, known before they are written
            scan.update(outcome="complete" if n_acquired == n_tiles else "incomplete",
                        finished=now_iso())
            _set_status(folder, scan, "reporting")
            _report_stage(folder, events)
            scan.update({k: v for k, v in read_scan_json(folder).items()
                         if k not in ("status", "process")})
    except BaseException as exc:
        if live is not None:
            live.abort()
        interrupted = isinstance(exc, (KeyboardInterrupt, SystemExit))
        scan.update(status="interrupted" if interrupted else "failed", finished=now_iso(),
                    acquired_tiles=len(_acquired(folder, n_tiles)))
        if not interrupted:
            scan["error"] = f"{type(exc).__name__}: {exc}"
        write_json(folder / SCAN_JSON, scan)
        raise
    scan["timings"]["after_last_tile"] = {"wall_s": round(time.perf_counter() - last_tile, 3)}
    scan.update(status="complete" if n_acquired == n_tiles else "incomplete",
                finished=now_iso(), acquired_tiles=n_acquired)
    write_json(folder / SCAN_JSON, scan)
    return ScanResult(folder, scan["status"], n_tiles, n_acquired, scan["timings"])


def _replacing(aside: Path | None, folder: Path,
               on_tile: Callable[[np.ndarray, TileRecord], None]
               ) -> Callable[[np.ndarray, TileRecord], None]:
    """``on_tile`` that first deletes the earlier scan ``aside`` (``run --overwrite``) once,
    at the first tile stored: until then the new scan has acquired nothing."""
    if aside is None:
        return on_tile
    pending = [aside]

    def first_discards(image: np.ndarray, record: TileRecord) -> None:
        if pending:
            discard(pending.pop(), folder)
        on_tile(image, record)

    return first_discards


#: how often (s) ``scan.json``'s ``acquired_tiles`` follows the acquisition
COUNT_EVERY_S = 2.0


def _counting_tiles(folder: Path, scan: dict[str, Any], plan: ScanPlan, only: set[int] | None,
                    on_tile: Callable[[np.ndarray, TileRecord], None] | None
                    ) -> Callable[[np.ndarray, TileRecord], None]:
    """``on_tile`` that also keeps ``scan.json``'s ``acquired_tiles`` current (every
    :data:`COUNT_EVERY_S`): a scan killed -9 while acquiring said 0 until it was resumed."""
    done = {t.index for t in plan.tiles} - only if only is not None else set()
    last = -math.inf  # the first tile is counted at once

    def counted(image: np.ndarray, record: TileRecord) -> None:
        nonlocal last
        done.add(record.index)
        if on_tile is not None:
            on_tile(image, record)
        if time.monotonic() - last >= COUNT_EVERY_S:
            last = time.monotonic()
            scan["acquired_tiles"] = len(done)
            write_json(folder / SCAN_JSON, scan)

    return counted


#: Interpreter switch interval (s) while the background works during acquisition.
_ACQUIRE_SWITCH_S = 0.0005


@contextmanager
def _responsive_gil(on: bool) -> Iterator[None]:
    """A shorter interpreter switch interval while background threads compute.

    The acquisition thread hands the GIL back and forth many times a tile (the watchdog's
    threads, device waits, the store's writes); each time a busy background thread holds it,
    it waits up to the switch interval (5 ms by default) to get it back. Demo wafer without
    realtime (2 shared cores): 26-27 s to the mosaic with 5 ms, 13-20 s with 0.5 ms, 17.5-18 s
    all after acquisition. The interval is restored after.
    """
    if not on:
        yield
        return
    before = sys.getswitchinterval()
    sys.setswitchinterval(min(before, _ACQUIRE_SWITCH_S))
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def _finish_live(live: LiveRegistrar | None) -> LiveResults | None:
    """What was registered during acquisition (None if nothing, or if that failed)."""
    if live is None:
        return None
    try:
        return live.finish()
    except Exception:  # the stitch stage measures it all, as it would have
        log.exception("registration during acquisition failed")
        return None


def _record_live(scan: dict[str, Any], stats: dict[str, Any]) -> None:
    """What was processed during acquisition: counts in ``during_acquisition``, seconds (the
    workers' busy time, and the wait for their queue after the last tile) in the timings."""
    scan["during_acquisition"] = {k: v for k, v in stats.items() if not k.endswith("_s")}
    scan["timings"]["during_acquisition"] = {k: v for k, v in stats.items()
                                             if k.endswith("_s")}


def _set_status(folder: Path, scan: dict[str, Any], status: str) -> None:
    scan["status"] = status
    write_json(folder / SCAN_JSON, scan)


def _stitch_settings(scan: dict[str, Any]) -> dict[str, Any]:
    """The stitch stage's settings from the recipe recorded in ``scan``."""
    stitch = recorded(scan, StitchSpec)
    calibration = (scan.get("recipe", {}).get("microscope") or {}).get("calibration")
    return {
        "repeatability_um": recorded(scan, StageSpec).repeatability_um,
        "registration": stitch.registration,
        "flatfield": stitch.flatfield,
        "calibration": Path(calibration) if calibration else None,
        "max_shift_um": stitch.max_shift_um,
        "min_ncc": stitch.min_confidence,
    }


def _start_live(scan: dict[str, Any], handle: MicroscopeHandle, plan: ScanPlan,
                only: set[int] | None) -> LiveRegistrar | None:
    """The registrar fed the tiles during acquisition with the stitch stage's settings, or
    None (registration and flat-field off; anything that stops it starting is logged, never
    fatal)."""
    try:
        settings = _stitch_settings(scan)
        if not settings["registration"] and not settings["flatfield"]:
            return None
        pixel_size = float(scan["microscope"]["pixel_size_um"])
        camera = camera_geometry(settings["calibration"], pixel_size)
        return LiveRegistrar(
            (handle.core.getImageHeight(), handle.core.getImageWidth()), camera,
            settings["repeatability_um"], max_shift_um=settings["max_shift_um"],
            min_ncc=settings["min_ncc"],
            planned=[(t.index, t.row, t.col, t.x_um, t.y_um) for t in plan.tiles],
            coming=[t.index for t in plan.tiles if only is None or t.index in only],
            register=settings["registration"], thumbnails=settings["flatfield"])
    except Exception:  # the stitch stage does it all, as it would have
        log.exception("registration during acquisition could not start")
        return None


def _acquire_stage(
    folder: Path, scan: dict[str, Any], recipe: Recipe, handle: MicroscopeHandle,
    plan: ScanPlan, events: StageEvents, only: set[int] | None,
    on_tile: Callable[[np.ndarray, TileRecord], None] | None = None,
) -> None:
    """Acquire into the folder and record how it went in ``scan``; ``on_tile`` is called
    with each stored tile (see :func:`scanner.acquisition.acquire.acquire`)."""
    total = len(plan.tiles) if only is None else len(only)
    events.stageStarted.emit("acquire", total)
    progress = handle.core.mda.events.frameReady.connect(
        lambda *_: events.stageAdvanced.emit("acquire", 1))
    try:
        result = acquire(handle, plan, recipe, folder, only=only, on_tile=on_tile)
    finally:
        handle.core.mda.events.frameReady.disconnect(progress)
        events.stageFinished.emit("acquire")
    timing = {"hardware_s": round(result.hardware_s, 3), "wall_s": round(result.wall_s, 3)}
    if only is not None:  # a resume adds its time to what the first run spent
        before = scan["timings"].get("acquire", {})
        timing = {k: round(v + float(before.get(k, 0.0)), 3) for k, v in timing.items()}
    scan["timings"]["acquire"] = timing
    scan["acquired_tiles"] = result.n_acquired
    scan["retried_actions"] = int(scan.get("retried_actions", 0)) + result.retried
    scan["focus"] = {k: v for k, v in result.focus.items() if k not in ("points", "surface")}
    if recipe.scan.focus.strategy != "none":
        write_focus_outputs(folder, result.focus, read_tiles_csv(folder))
    if result.lost:
        scan["lost_tiles"] = {str(k): v for k, v in result.lost.items()}
    else:
        scan.pop("lost_tiles", None)


def _stitch_stage(
    folder: Path, scan: dict[str, Any], pixel_size: float, chunk: int, events: StageEvents,
    cluster: Any = None, precomputed: LiveResults | None = None,
) -> None:
    """Fuse the mosaic and record it (and the stage's wall time) in ``scan``.

    ``precomputed``: what was registered during acquisition (the same result as without it).
    """
    t0 = time.perf_counter()
    started: set[str] = set()

    def on_step(step: str, done: int, total: int) -> None:
        stage = "register" if step == "register" else "stitch"
        if stage not in started:
            events.stageStarted.emit(stage, total)
            started.add(stage)
        events.stageAdvanced.emit(stage, 1)

    settings = _stitch_settings(scan)
    result = stitch_scan(folder, pixel_size, **settings, chunk=chunk, progress=on_step,
                         cluster=cluster, precomputed=precomputed)
    info = result.mosaic
    for stage in started:
        events.stageFinished.emit(stage)
    scan.setdefault("timings", {})["stitch"] = {"wall_s": round(time.perf_counter() - t0, 3),
                                                **result.timings}
    scan["registration"] = result.registration
    scan["flatfield"] = result.flatfield
    calibration = (scan.get("recipe", {}).get("microscope") or {}).get("calibration")
    measured = (result.registration or {}).get("camera_measured") or {}
    scan["stitch_camera"] = {"pixel_size_um": result.camera.pixel_size_um,
                             "rotation_deg": result.camera.rotation_deg,
                             "calibration": calibration,
                             "source": "calibration file" if calibration else
                             "measured on this scan's tiles" if measured.get("rotation_applied")
                             or measured.get("pixel_size_applied") else "nominal"}
    scan["mosaic"] = {"path": MOSAIC, "shape": list(info.shape), "levels": info.n_levels,
                      "pixel_size_um": info.pixel_size_um, "origin_um": list(info.origin_um)}
    if scan.get("alignment"):
        # the die grid and rotation from the registered mosaic (free of the stage's landing
        # error); the plan keeps the pre-alignment the tiles were taken with
        fine = refine_alignment(folder / MOSAIC, scan)
        # a rotation read off the fields' images (a PV cell's sides) is off by the camera's
        # turn the fields did not know of: without a calibration, a camera turned 2 deg put
        # an unturned cell at -2 deg, its regions and usable area with it
        scan["alignment"] = {**scan["alignment"],
                             "refined": None if fine is None else fine.model_dump(mode="json"),
                             # a camera left nominal measured nothing (the alignment may
                             # have found its turn in the edge fields: scanner.acquisition.align)
                             "camera_turn_deg": None if scan["stitch_camera"]["source"]
                             == "nominal" else camera_turn(scan["alignment"],
                                                           result.camera.rotation_deg)}
    write_json(folder / SCAN_JSON, scan)


def _report_stage(folder: Path, events: StageEvents) -> None:
    """Locate the defects and write defects.json/csv, the KLARF and the wafer map."""
    from scanner.reports import report

    events.stageStarted.emit("report", 1)
    report(folder)
    events.stageAdvanced.emit("report", 1)
    events.stageFinished.emit("report")


def restitch(folder: Path, events: StageEvents | None = None, cluster: Any = None
             ) -> ScanResult:
    """Re-run the stitch stage on an existing scan folder."""
    events = events or StageEvents()
    scan = read_scan_json(folder)
    pixel_size = recorded_pixel_size(folder, scan)  # one line, not KeyError
    chunk = recorded(scan, OutputSpec).chunk_px
    _stitch_stage(Path(folder), scan, pixel_size, chunk, events, cluster)
    n = int(scan.get("plan", {}).get("n_tiles", 0))
    return ScanResult(Path(folder), scan.get("status", "unknown"), n,
                      int(scan.get("acquired_tiles", n)), scan["timings"])


def inspect_stage(
    folder: Path,
    scan: dict[str, Any] | None = None,
    *,
    model: ModelRef = None,
    threshold: float | None = None,
    events: StageEvents | None = None,
    cluster: Any = None,
) -> Any:
    """Inspect the scan folder's mosaic: maps, ``defects.json``/``.csv``, ``scan.json`` timings."""
    from scanner.inspection.inspect import inspect_scan

    events = events or StageEvents()
    started, last = False, 0

    def on_window(done: int, total: int) -> None:
        nonlocal started, last
        if not started:
            events.stageStarted.emit("inspect", total)
            started = True
        if done > last:
            events.stageAdvanced.emit("inspect", done - last)
            last = done

    try:
        return inspect_scan(Path(folder), model=model, threshold=threshold, scan=scan,
                            progress=on_window, cluster=cluster)
    finally:
        events.stageFinished.emit("inspect")
