"""The ``waferscope`` command line.

Exit codes: 0 done, 2 bad input (one clear line on stderr), 1 anything else.
"""

from __future__ import annotations

import errno
import functools
import logging
import math
import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from models.errors import InputError

from .errors import UserError

app = typer.Typer(
    name="waferscope",
    help="Scan wafers and solar cells under a motorized microscope and find their defects.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Paths are printed whole (no wrapping) so that they can be copied from the terminal.
out = Console(soft_wrap=True)
err = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])

#: the recipe's sample kinds (``scanner.recipe``), for ``inspect --sample-kind``
SAMPLE_KINDS = ("wafer", "pv_cell", "rectangle", "image")


#: errors of a full, over-quota, read-only or forbidden destination (exit 2, one line)
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES,
                   errno.EPERM}


def _friendly(func: F) -> F:
    """Turn bad input (UserError, a full disk) into one line + exit 2, anything else into one
    line + exit 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            try:
                return func(*args, **kwargs)
            except OSError as exc:
                if exc.errno not in _STORAGE_ERRNOS or os.environ.get("WAFERSCOPE_DEBUG"):
                    raise
                # a full or read-only disk: the user can act on it, as on bad input
                where = f"{exc.filename}: " if exc.filename else ""
                err.print(f"[bold red]error:[/] {escape(where)}cannot write ({exc.strerror}); "
                          "free space or choose another folder (a stopped scan continues with "
                          "`waferscope resume SCAN`)", highlight=False, soft_wrap=True)
                raise typer.Exit(2) from None
        except InputError as exc:  # ours and the model package's bad input (UserError derives)
            # escaped: a message may hold brackets ("waferscope[napari]") that are not markup
            err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("interrupted; what was acquired is kept in the scan folder "
                      "(continue with `waferscope resume SCAN`)")
            raise typer.Exit(130) from None
        except typer.Exit:
            raise
        except Exception as exc:
            if os.environ.get("WAFERSCOPE_DEBUG"):
                raise
            err.print(
                f"[bold red]failed:[/] {type(exc).__name__}: {exc} "
                "(set WAFERSCOPE_DEBUG=1 for the traceback)",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


class RichObserver:
    """Progress bars for the stages of a scan."""

    _LABELS = {"acquire": "acquiring tiles", "stitch": "stitching mosaic",
               "register": "registering tiles", "inspect": "inspecting",
               "images": "inspecting images", "report": "writing reports"}

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[str, TaskID] = {}

    def stage_started(self, stage: str, total: int) -> None:
        self.tasks[stage] = self.progress.add_task(self._LABELS.get(stage, stage), total=total)

    def advance(self, stage: str, done: int) -> None:
        if stage in self.tasks:
            self.progress.advance(self.tasks[stage], done)

    def stage_finished(self, stage: str) -> None:
        if stage in self.tasks:
            self.progress.stop_task(self.tasks[stage])


class RateColumn(ProgressColumn):
    """Items per second (tiles, chunks)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:6.1f}/s" if speed else "     -/s", style="cyan")


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description:<17}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("left"),
        TimeRemainingColumn(),
        console=err,
        transient=False,
        disable=not err.is_terminal and not os.environ.get("WAFERSCOPE_PROGRESS"),
    )


RecipeArg = Annotated[Path, typer.Argument(help="Scan recipe (YAML).", show_default=False)]


@app.command()
@_friendly
def validate(recipe: RecipeArg) -> None:
    """Check a recipe and print its plan (tiles, area, estimated hardware time); moves nothing."""
    from collections import Counter

    from devices.core import build_microscope

    from .align import alignment_fields, edge_binning, estimate_alignment_time_s, wants_alignment
    from .pipeline import make_plan, plan_summary
    from .recipe import load_recipe

    rec = load_recipe(recipe)
    handle = build_microscope(rec)
    plan = make_plan(rec, handle)
    summary = plan_summary(plan, rec)
    table = Table(title=f"{recipe.name}: plan", show_header=False)
    table.add_row("sample", rec.sample.kind)
    table.add_row("microscope", rec.microscope.kind)
    table.add_row("tiles", f"{summary['n_tiles']} ({summary['n_rows']} rows x "
                  f"{summary['n_cols']} cols)")
    table.add_row("field of view", f"{summary['fov_um'][0]:.0f} x {summary['fov_um'][1]:.0f} µm")
    table.add_row("sample region", f"{summary['region_area_mm2']:.2f} mm²")
    table.add_row("scanned area", f"{summary['scanned_area_mm2']:.2f} mm²")
    table.add_row("est. hardware time", _duration(summary["estimated_hardware_s"]))
    if wants_alignment(rec):
        # the nominal plan: the fields move with the sample, the time hardly does
        fields = alignment_fields(rec, handle.fov_um())
        kinds = Counter(kind for kind, _, _ in fields)
        align_s = estimate_alignment_time_s(rec, handle.fov_um())
        table.add_row("alignment", f"{len(fields)} fields ("
                      + ", ".join(f"{n} {k}" for k, n in kinds.items()) + ")")
        for kind, x, y in fields:
            table.add_row("", f"{kind} at ({x / 1000:.2f}, {y / 1000:.2f}) mm")
        # where the camera offers binning (the time is the same: the simulated camera reads
        # a binned frame out no faster)
        binned = edge_binning(handle.core)
        if binned > 1 and rec.sample.kind == "wafer":
            table.add_row("", f"edge fields binned {binned}x")
        share = align_s / summary["estimated_hardware_s"] if summary[
            "estimated_hardware_s"] > 0 else 0.0
        table.add_row("est. alignment time", f"{_duration(align_s)} ({share:.0%} of the scan)")
    out.print(table)
    out.print("recipe OK")


@app.command()
@_friendly
def devices(
    recipe: RecipeArg,
    save: Annotated[Path | None, typer.Option(
        "--save", help="Write the test image to this TIFF file.")] = None,
) -> None:
    """List the recipe's microscope: devices, roles, positions and limits; snap one image."""
    import numpy as np

    from devices.core import build_microscope
    from devices.inventory import inventory

    from .recipe import load_recipe

    rec = load_recipe(recipe)
    handle = build_microscope(rec)
    core = handle.core
    table = Table(title=f"{recipe.name}: {rec.microscope.kind} microscope")
    for column in ("label", "role", "library", "device", "port"):
        table.add_column(column)
    for d in inventory(core):
        table.add_row(d.label, d.role or "-", d.library or "-", d.name, d.port or "-")
    out.print(table)
    stage = rec.microscope.stage
    x, y = core.getXYPosition()
    out.print(f"XY stage at ({x:.2f}, {y:.2f}) µm; travel x {list(stage.travel_x_um)} µm, "
              f"y {list(stage.travel_y_um)} µm")
    focus = rec.microscope.focus
    out.print(f"focus at {core.getPosition():.2f} µm; range {list(focus.range_um)} µm")
    out.print(f"pixel size {core.getPixelSizeUm():.4g} µm; exposure {core.getExposure():g} ms")
    core.snapImage()
    image = core.getImage()
    out.print(f"test image: {image.shape[1]} x {image.shape[0]} px {image.dtype}, "
              f"min {int(image.min())}, mean {float(np.mean(image)):.1f}, max {int(image.max())}")
    if save is not None:
        import tifffile

        tifffile.imwrite(save, image)
        out.print(f"saved: {save.resolve()}")


DaskOption = Annotated[str | None, typer.Option(
    "--dask", help="Run fusion and inspection as dask tasks: local:N (a local cluster of N "
    "worker processes) or the address of a running dask scheduler (tcp://HOST:PORT).")]


@contextmanager
def _cluster(spec: str | None) -> Iterator[Any]:
    """The dask cluster of ``--dask`` (None without it: nothing changes)."""
    if spec is None:
        yield None
        return
    from .cluster import ClusterSpec, open_cluster

    with open_cluster(ClusterSpec.parse(spec)) as cluster:  # refused before anything starts
        yield cluster


@app.command()
@_friendly
def run(
    recipe: RecipeArg,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Scan folder (default: output.root/NAME-TIME).")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Replace an existing scan folder given with --out.")
    ] = False,
    model: Annotated[
        Path | None, typer.Option("--model", help="Inspection model (default: the shipped one).")
    ] = None,
    inspect_: Annotated[
        bool, typer.Option("--inspect/--no-inspect", help="Inspect the mosaic after stitching.")
    ] = True,
    dask: DaskOption = None,
) -> None:
    """Scan a recipe's sample: plan, acquire, stitch, inspect; print where the outputs are."""
    from .pipeline import run_scan
    from .recipe import load_recipe

    rec = load_recipe(recipe)
    loaded = None
    if inspect_:
        from .inspection import load_inspection_model

        loaded = load_inspection_model(model)  # a bad model fails before the stage moves
    with _cluster(dask) as cluster, _progress() as progress:
        result = run_scan(rec, out_dir, overwrite=overwrite, observer=RichObserver(progress),
                          inspect=inspect_, model=loaded, cluster=cluster)
    _print_result(result)
    if result.status != "complete":
        err.print(f"[yellow]warning:[/] scan {result.status}: {result.n_acquired} of "
                  f"{result.n_tiles} tiles acquired (see scan.json)")
        raise typer.Exit(1)


@app.command()
@_friendly
def resume(scan: Annotated[Path, typer.Argument(help="Scan folder of a stopped scan.")],
           dask: DaskOption = None) -> None:
    """Finish a stopped scan: acquire only the missing tiles, then stitch, inspect, report."""
    from .pipeline import resume_scan

    with _cluster(dask) as cluster, _progress() as progress:
        result = resume_scan(scan, observer=RichObserver(progress), cluster=cluster)
    _print_result(result)
    if result.status != "complete":
        err.print(f"[yellow]warning:[/] scan {result.status}: {result.n_acquired} of "
                  f"{result.n_tiles} tiles acquired (see scan.json)")
        raise typer.Exit(1)


AllowIncomplete = Annotated[bool, typer.Option(
    "--allow-incomplete", help="Accept a scan that did not acquire every planned tile.")]


@app.command()
@_friendly
def stitch(
    scan: Annotated[Path, typer.Argument(help="Scan folder.")],
    allow_incomplete: AllowIncomplete = False,
    dask: DaskOption = None,
) -> None:
    """Re-stitch the mosaic of an existing scan folder."""
    from .integrity import require_ready
    from .pipeline import restitch

    require_ready(scan, "stitch", allow_incomplete=allow_incomplete)
    with _cluster(dask) as cluster, _progress() as progress:
        result = restitch(scan, observer=RichObserver(progress), cluster=cluster)
    _print_result(result)


@app.command()
@_friendly
def inspect(
    target: Annotated[list[Path], typer.Argument(
        help="Scan folder, mosaic (.ome.zarr), or image files/folders.", show_default=False)],
    model: Annotated[
        Path | None, typer.Option("--model", help="Inspection model (default: the shipped one).")
    ] = None,
    out_dir: Annotated[Path | None, typer.Option(
        "--out", help="Output folder (default: the scan folder; ./inspection for images).")
    ] = None,
    threshold: Annotated[float | None, typer.Option(
        help="Decision threshold on the anomaly map (default: the model's calibrated one).")
    ] = None,
    pixel_size: Annotated[float | None, typer.Option(
        "--pixel-size", help="Pixel size of plain images in µm (default: the model's).")
    ] = None,
    sample_kind: Annotated[str | None, typer.Option(
        "--sample-kind", help="Use the model card's threshold for this kind of sample: "
        + ", ".join(SAMPLE_KINDS) + " (default: the scan's recipe; plain images: pooled).")
    ] = None,
    allow_incomplete: AllowIncomplete = False,
    dask: DaskOption = None,
) -> None:
    """Find the defects of a scan folder, a mosaic, or image files (writes scores.csv)."""
    from .inspection import inspect_target
    from .integrity import require_ready
    from .scanfolder import SCAN_JSON

    for path in target:
        if (path / SCAN_JSON).is_file():
            require_ready(path, "inspect", allow_incomplete=allow_incomplete)

    if sample_kind is not None and sample_kind not in SAMPLE_KINDS:
        raise UserError(f"--sample-kind: one of {', '.join(SAMPLE_KINDS)}, got {sample_kind!r}")
    if threshold is not None and not (threshold > 0 and math.isfinite(threshold)):
        raise UserError(f"--threshold: must be a positive finite number, got {threshold}")
    if pixel_size is not None and not (pixel_size > 0 and math.isfinite(pixel_size)):
        raise UserError(f"--pixel-size: must be a positive finite number, got {pixel_size}")
    with _cluster(dask) as cluster, _progress() as progress:
        task = None

        def on_progress(done: int, total: int) -> None:
            nonlocal task
            if task is None:
                task = progress.add_task("inspecting", total=total)
            progress.update(task, completed=done)

        result = inspect_target(target, out_dir, model=model, threshold=threshold,
                                pixel_size_um=pixel_size, sample_kind=sample_kind,
                                progress=on_progress, cluster=cluster)
    out.print(f"defects: {result.n_defects}")
    for name, path in result.outputs.items():
        out.print(f"  {name:<16} {Path(path).resolve()}")
    out.print("  inspect time: " + ", ".join(
        f"{k.removesuffix('_s')} {_duration(v) if k.endswith('_s') else v}"
        for k, v in result.timings.items()))


@app.command()
@_friendly
def batch(
    scans: Annotated[list[Path], typer.Argument(help="Scan folders.", show_default=False)],
    model: Annotated[
        Path | None, typer.Option("--model", help="Inspection model (default: the shipped one).")
    ] = None,
    allow_incomplete: AllowIncomplete = False,
    dask: DaskOption = None,
) -> None:
    """Stitch, inspect and report many scan folders (on a dask cluster with --dask)."""
    from .batch import run_batch

    with _cluster(dask) as cluster, _progress() as progress:
        items = run_batch(scans, model=model, cluster=cluster, observer=RichObserver(progress),
                          allow_incomplete=allow_incomplete)
    for item in items:
        if item.ok:
            out.print(f"{item.folder.resolve()}: {item.n_defects} defects "
                      f"({_duration(item.wall_s)})")
        else:
            err.print(f"[red]{item.folder}: failed:[/] {item.error}")
    if not all(item.ok for item in items):
        raise typer.Exit(1)


@app.command()
@_friendly
def report(
    scan: Annotated[Path, typer.Argument(help="Scan folder (with defects.json).")],
    lot: Annotated[str | None, typer.Option("--lot", help="Lot id (default: the recipe's).")]
    = None,
    wafer: Annotated[
        str | None, typer.Option("--wafer", help="Wafer id (default: the recipe's).")
    ] = None,
    allow_incomplete: AllowIncomplete = False,
    klarf_version: Annotated[str | None, typer.Option(
        "--klarf-version", help="KLARF version of defects.klarf: 1.2 or 1.8 (default: the "
        "recipe's output.klarf_version, else 1.2).")] = None,
    full_dies_only: Annotated[bool, typer.Option(
        "--full-dies-only", help="Leave partial edge dies out of the test plan and the yield "
        "(their defects stay in defects.json, not in the KLARF).")] = False,
) -> None:
    """Regenerate the reports of a scan folder: located defects.json/csv, KLARF, wafer map."""
    from .integrity import require_ready
    from .reports import report as run_report
    from .reports.klarf import KLARF_VERSIONS

    if klarf_version is not None and klarf_version not in KLARF_VERSIONS:
        raise UserError(f"--klarf-version: {klarf_version} is not one of "
                        f"{', '.join(KLARF_VERSIONS)}")
    require_ready(scan, "report", allow_incomplete=allow_incomplete)
    result = run_report(scan, lot_id=lot, wafer_id=wafer, klarf_version=klarf_version,
                        full_dies_only=full_dies_only)
    out.print(f"scan folder: {result.folder.resolve()}  ({result.n_defects} defects)")
    for name, path in result.outputs.items():
        out.print(f"  {name:<16} {path.resolve()}")
    out.print(f"  report time: {_duration(result.wall_s)}")


@app.command()
@_friendly
def train(
    more_good: Annotated[
        list[Path] | None,
        typer.Argument(help="More good images/folders (so that --good A B C works).",
                       show_default=False),
    ] = None,
    good: Annotated[
        list[Path] | None,
        typer.Option("--good", help="Good images: files, folders of images, good scan folders."),
    ] = None,
    model_out: Annotated[
        Path, typer.Option("--out", help="Model to write (MODEL.safetensors + MODEL.json).")
    ] = Path("model.safetensors"),
    false_alarms_per_cm2: Annotated[
        float, typer.Option(help="Threshold calibration target on held-out good surface.")
    ] = 1.0,
    pixel_size_um: Annotated[
        float | None,
        typer.Option("--pixel-size", help="Pixel size of the good images in µm (default: the "
                                          "good scan's, else 1.0)."),
    ] = None,
    init: Annotated[
        Path | None,
        typer.Option("--init", help="Extend this model with the new good images (it is left "
                                    "as it is; the result goes to --out)."),
    ] = None,
    simulated: Annotated[
        int, typer.Option(min=0, help="Also add this many simulated good windows of wafers "
                                      "and PV cells at the same pixel size.")
    ] = 0,
    camera_variants: Annotated[
        str, typer.Option(help="Let image files enter the bank also blurred and noisy as a "
                               "microscope sees them: auto (with fewer than 8 images), on, off.")
    ] = "auto",
    seed: Annotated[int, typer.Option(help="Seed: same data and seed give the same model.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing model file.")] = False,
) -> None:
    """Build a detector from good images and calibrate its threshold on held-out good surface."""
    from models.build import build_detector

    from .goodimages import load_good

    paths = list(good or []) + list(more_good or [])
    if not paths:
        raise UserError("--good: give good images, folders of them, or good scan folders")
    target = model_out if model_out.suffix == ".safetensors" else model_out.with_suffix(
        ".safetensors")
    if target.exists() and not overwrite:
        raise UserError(f"{target}: exists (use --overwrite to replace it)")
    if init is not None and init.resolve().with_suffix(".safetensors") == target.resolve():
        raise UserError(f"--init {init}: give another --out (the model extended is kept)")
    if pixel_size_um is not None and not (pixel_size_um > 0 and math.isfinite(pixel_size_um)):
        raise UserError("--pixel-size: must be a positive number of µm")
    if not (false_alarms_per_cm2 > 0 and math.isfinite(false_alarms_per_cm2)):
        raise UserError(f"--false-alarms-per-cm2: must be a positive number, got "
                        f"{false_alarms_per_cm2}")
    variants = {"auto": "auto", "on": True, "off": False}.get(camera_variants)
    if variants is None:
        raise UserError("--camera-variants: auto, on or off")
    images, scan_pixel = load_good(paths)
    pixel = float(pixel_size_um or scan_pixel or 1.0)
    if simulated:
        from models.data import simulated_good_images

        images += simulated_good_images(simulated, 512, pixel, seed, kinds=("wafer", "pv_cell"))
    with _progress() as progress:
        tasks: dict[str, TaskID] = {}
        labels = {"features": "features of good images", "bank": "memory bank (coreset)",
                  "calibrate": "calibrating"}

        def on_progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(labels.get(stage, stage), total=total)
            progress.update(tasks[stage], completed=done, total=total)

        report = build_detector(images, target, pixel_size_um=pixel,
                                false_alarms_per_cm2=false_alarms_per_cm2, init=init,
                                seed=seed, augment_camera=variants,
                                progress=on_progress,
                                card_extra={"good": [str(p) for p in paths]})
    card = report.card
    cal = card["calibration"]
    out.print(f"model: {report.weights.resolve()}")
    out.print(f"  card       {report.card_path.resolve()}")
    out.print(f"  bank       {card['bank']['features']} features of {len(images)} good "
              f"image(s) at {pixel:g} µm/px")
    out.print(f"  threshold  {card['threshold']:.4f} (target {false_alarms_per_cm2:g} false "
              f"alarm/cm² on {cal['area_cm2']:.3g} cm² of held-out good surface, "
              f"{cal['held_out']})")
    out.print(f"  time       {_duration(report.build_time_s)}")
    for warning in report.warnings:
        err.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)


@app.command()
@_friendly
def drift(
    scans: Annotated[list[Path], typer.Argument(help="Inspected scan folders, oldest first.")],
    model: Annotated[
        Path | None, typer.Option("--model", help="The model they were inspected with "
                                                  "(default: the shipped one).")
    ] = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Folder for drift.png (default: no plot).")
    ] = None,
) -> None:
    """Whether recent scans' good-surface scores moved beyond the model's calibration."""
    from .drift import check_drift
    from .inspection import load_inspection_model

    report = check_drift(scans, load_inspection_model(model), out_dir)
    for skipped in report.skipped:
        err.print(f"skipped {escape(skipped)}", highlight=False, soft_wrap=True)
    for row in report.scans:
        ratios = ", ".join(f"{k} x{v:.2f}" for k, v in row["ratios"].items())
        out.print(f"  {escape(Path(row['scan']).name)}: {ratios}", highlight=False)
    if report.plot is not None:
        out.print(f"plot: {report.plot.resolve()}")
    out.print(report.verdict(), highlight=False)


@app.command()
@_friendly
def calibrate(
    recipe: RecipeArg,
    out_file: Annotated[
        Path, typer.Option("--out", "-o", help="Calibration file to write (JSON).")
    ] = Path("calibration.json"),
    at: Annotated[
        tuple[float, float] | None,
        typer.Option("--at", help="Stage X Y (µm) of a textured area (default: sample centre)."),
    ] = None,
    grid: Annotated[
        int | None, typer.Option(help="Frames per side (default: enough for 0.03 % error).")
    ] = None,
    step: Annotated[float, typer.Option(help="Step between frames, fraction of the FOV.")] = 0.75,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing calibration file.")] = False,
) -> None:
    """Measure the camera's pixel size and rotation by moving the stage by known steps."""
    from .calibrate import calibrate_recipe
    from .recipe import load_recipe

    if out_file.exists() and not overwrite:
        raise UserError(f"{out_file}: exists; pass --overwrite to replace it")
    if at is not None and not all(map(math.isfinite, at)):
        raise UserError(f"--at: must be finite stage coordinates, got {at}")
    if not (0 < step <= 1):
        raise UserError(f"--step: must be in (0, 1], got {step}")
    rec = load_recipe(recipe)
    with _progress() as progress:
        task = progress.add_task("calibrating", total=None)
        result = calibrate_recipe(
            rec, centre_um=at, grid=grid, step_fraction=step,
            progress=lambda d, t: progress.update(task, completed=d, total=t),
        )
    result.write(out_file)
    data = result.to_json()
    table = Table(title=f"{recipe.name}: camera calibration", show_header=False)
    table.add_row("pixel size", f"{result.pixel_size_um:.5f} µm "
                  f"(± {100 * result.pixel_size_sigma_rel:.3f} %; nominal "
                  f"{result.nominal_pixel_size_um:g} µm)")
    table.add_row("rotation", f"{result.rotation_deg:+.4f}° (± {result.rotation_sigma_deg:.4f}°)")
    table.add_row("pixel x / y", f"{result.pixel_size_x_um:.5f} / {result.pixel_size_y_um:.5f} µm")
    table.add_row("skew", f"{result.skew_deg:+.4f}°")
    table.add_row("stage scatter", f"{result.residual_rms_um:.2f} µm RMS")
    table.add_row("frames / pairs", f"{result.n_frames} / {result.n_pairs_used} of "
                  f"{result.n_pairs}")
    if "truth" in data:
        t = data["truth"]
        table.add_row("vs simulator truth", f"pixel {t['pixel_size_error_pct']:+.4f} %, "
                      f"rotation {t['rotation_error_deg']:+.4f}°")
    out.print(table)
    out.print(f"wrote {out_file.resolve()}; use it with `microscope: {{calibration: "
              f"{out_file.name}}}`")



@app.command()
@_friendly
def view(
    scan: Annotated[Path, typer.Argument(help="Scan folder.")],
    screenshot: Annotated[
        Path | None,
        typer.Option(help="Save a screenshot of the viewer's canvas (PNG) and exit."),
    ] = None,
    window: Annotated[
        bool, typer.Option("--window", help="Screenshot the whole window, not only the canvas.")
    ] = False,
) -> None:
    """Review a scan in napari: mosaic, inspection maps and defects (needs waferscope[napari])."""
    from .napari.viewer import view as open_view

    saved = open_view(scan, screenshot=screenshot, canvas_only=not window)
    if saved is not None:
        out.print(f"screenshot: {saved.resolve()}")


def _duration(seconds: float) -> str:
    minutes, sec = divmod(seconds, 60)
    hours, minutes = divmod(int(minutes), 60)
    return f"{hours}h {minutes:02d}m {sec:04.1f}s" if hours else f"{minutes}m {sec:04.1f}s"


def _print_result(result: Any) -> None:
    out.print(f"scan folder: {result.folder.resolve()}")
    for name, path in result.outputs.items():
        out.print(f"  {name:<16} {path.resolve()}")
    for stage, t in result.timings.items():
        parts = [f"{k.removesuffix('_s')} {_duration(v) if k.endswith('_s') else v}"
                 for k, v in t.items()]
        out.print(f"  {stage} time: " + ", ".join(parts))


def _terminate(signum: int, frame: Any) -> None:
    """SIGTERM is handled like Ctrl-C: the scan stops cleanly and can be resumed."""
    raise KeyboardInterrupt


def main() -> None:
    """Entry point for ``python -m scanner``."""
    signal.signal(signal.SIGTERM, _terminate)
    # a log file that cannot be written (a full disk) must not bury the one line that says so
    logging.raiseExceptions = False
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # pymmcore-plus sets its own logger to DEBUG (for its log file); its records reach the root
    # handler whatever the root's level, so the handler itself must filter them.
    for handler in logging.getLogger().handlers:
        handler.setLevel(logging.WARNING)
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
