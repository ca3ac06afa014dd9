"""The ``waferscope`` commands of a scan: validate, devices, run, resume, stitch, inspect,
batch, report (registered on :data:`scanner.cli.app`)."""

from __future__ import annotations

import math
import shutil
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from scanner.cli_common import (
    SAMPLE_KINDS,
    AllowIncomplete,
    DaskOption,
    RecipeArg,
    _cluster,
    _duration,
    _friendly,
    _print_result,
    _progress,
    app,
    check_dask,
    check_output,
    err,
    for_workers,
    out,
    stage_bars,
)
from scanner.errors import UserError


@app.command()
@_friendly
def validate(recipe: RecipeArg) -> None:
    """Check a recipe and print its plan (tiles, area, estimated hardware time); moves nothing."""
    from collections import Counter

    from devices.core import build_microscope
    from scanner.acquisition.align import (
        alignment_fields,
        edge_binning,
        estimate_alignment_time_s,
        wants_alignment,
    )
    from scanner.errors import PlanError
    from scanner.pipeline import make_plan, plan_warnings
    from scanner.recipe import load_recipe
    from scanner.travel import check_positions, travel_limits

    rec = load_recipe(recipe)
    with build_microscope(rec) as handle:
        plan = make_plan(rec, handle)
        warnings = plan_warnings(rec, handle)
        fov = handle.fov_um()
        binned = edge_binning(handle.core) if wants_alignment(rec) else 1
        outside = check_positions(travel_limits(rec, handle.core), [
            (f"the {kind} alignment field", x, y) for kind, x, y in alignment_fields(rec, fov)
        ]) if wants_alignment(rec) else None
    if outside and rec.scan.align is True:
        raise PlanError(f"{outside}; the alignment cannot be taken (scan.align: true)")
    if outside:
        warnings.append(f"{outside}: the alignment will be skipped and the recipe's "
                        "placement used (scan.align: auto)")
    summary = plan.summary()
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
        fields = alignment_fields(rec, fov)
        kinds = Counter(kind for kind, _, _ in fields)
        align_s = estimate_alignment_time_s(rec, fov)
        table.add_row("alignment", f"{len(fields)} fields ("
                      + ", ".join(f"{n} {k}" for k, n in kinds.items()) + ")")
        for kind, x, y in fields:
            table.add_row("", f"{kind} at ({x / 1000:.2f}, {y / 1000:.2f}) mm")
        # where the camera offers binning (the time is the same: the simulated camera reads
        # a binned frame out no faster)
        if binned > 1 and rec.sample.kind == "wafer":
            table.add_row("", f"edge fields binned {binned}x")
        share = align_s / summary["estimated_hardware_s"] if summary[
            "estimated_hardware_s"] > 0 else 0.0
        table.add_row("est. alignment time", f"{_duration(align_s)} ({share:.0%} of the scan)")
    out.print(table)
    for warning in warnings:
        out.print(f"[yellow]warning:[/yellow] {warning}")
    out.print("recipe OK" if not warnings else "recipe OK, with the warning above")


@app.command()
@_friendly
def devices(
    recipe: RecipeArg,
    save: Annotated[Path | None, typer.Option(
        "--save", help="Write the test image to this TIFF file (.tif or .tiff).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --save file.")] = False,
) -> None:
    """List the recipe's microscope: devices, roles, positions and limits; snap one image."""
    import numpy as np

    from devices.core import build_microscope
    from devices.inventory import inventory
    from scanner.recipe import load_recipe
    from scanner.travel import travel_limits

    _check_save(save, overwrite)
    rec = load_recipe(recipe)
    with build_microscope(rec) as handle:
        core = handle.core
        table = Table(title=f"{recipe.name}: {rec.microscope.kind} microscope")
        for column in ("label", "role", "library", "device", "port"):
            table.add_column(column)
        for d in inventory(core):
            table.add_row(d.label, d.role or "-", d.library or "-", d.name, d.port or "-")
        out.print(table)
        # where scans may go: the recipe's travel narrowed by the drivers' own limits
        limits = travel_limits(rec, core)

        def span(axis: str) -> str:
            a = limits[axis]
            by = f" ({a.narrowed_by}'s own limits)" if a.narrowed_by else ""
            return f"[{a.lo:g}, {a.hi:g}] µm{by}"

        x, y = core.getXYPosition()
        out.print(f"XY stage at ({x:.2f}, {y:.2f}) µm; travel x {span('x')}, y {span('y')}")
        out.print(f"focus at {core.getPosition():.2f} µm; range {span('z')}")
        out.print(f"pixel size {core.getPixelSizeUm():.4g} µm; exposure {core.getExposure():g} ms")
        core.snapImage()
        image = core.getImage()
        out.print(f"test image: {image.shape[1]} x {image.shape[0]} px {image.dtype}, "
                  f"min {int(image.min())}, mean {float(np.mean(image)):.1f}, "
                  f"max {int(image.max())}")
        if save is not None:
            import tifffile

            save.parent.mkdir(parents=True, exist_ok=True)
            # the pixel size goes into the file (pixels per cm, which every reader takes and
            # train / inspect read back: scanner.inspection.pixelsize)
            p = float(core.getPixelSizeUm())
            tifffile.imwrite(save, image, **({"resolution": (1e4 / p, 1e4 / p),
                                              "resolutionunit": "CENTIMETER"} if p > 0 else {}))
            out.print(f"saved: {save.resolve()}")


def _check_save(save: Path | None, overwrite: bool) -> None:
    """Refuse, before the microscope is loaded, a ``--save`` file that would be written wrongly.

    The image is written as TIFF whatever the name says, so another suffix would be a file
    that lies about its format; an existing file may be the recipe itself, so it is replaced
    only when asked.

    Raises
    ------
    UserError
        Naming ``--save`` and the path.
    """
    if save is None:
        return
    check_output(save, "--save", folder=False)
    if save.suffix.lower() not in (".tif", ".tiff"):
        raise UserError(f"--save {save}: the test image is written as TIFF; give a .tif or "
                        f".tiff file name, not {save.suffix or 'no suffix'!r}")
    if save.exists() and not overwrite:
        raise UserError(f"--save {save}: exists (use --overwrite to replace it)")


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
    from scanner.pipeline import run_scan
    from scanner.recipe import load_recipe

    check_dask(dask)
    rec = load_recipe(recipe)
    if dask is not None:  # the scan folder's path as workers of a running cluster see it
        out_dir = for_workers(out_dir, dask) if out_dir is not None else None
        rec = rec.model_copy(update={"output": rec.output.model_copy(
            update={"root": for_workers(rec.output.root, dask)})})
    loaded = None
    if inspect_:
        from scanner.inspection.inspect import load_inspection_model

        loaded = load_inspection_model(model)  # a bad model fails before the stage moves
    with _cluster(dask) as cluster, _progress() as progress:
        result = run_scan(rec, out_dir, overwrite=overwrite, events=stage_bars(progress),
                          inspect=inspect_, model=loaded, cluster=cluster)
    _print_scan(result)


def _print_scan(result: Any) -> None:
    """Print where a scan's outputs are; exit 1 when tiles are missing (it can be resumed)."""
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
    from scanner.pipeline import resume_scan

    check_dask(dask)
    with _cluster(dask) as cluster, _progress() as progress:
        result = resume_scan(for_workers(scan, dask), events=stage_bars(progress),
                             cluster=cluster)
    _print_scan(result)


@app.command()
@_friendly
def stitch(
    scan: Annotated[Path, typer.Argument(help="Scan folder.")],
    allow_incomplete: AllowIncomplete = False,
    dask: DaskOption = None,
) -> None:
    """Re-stitch the mosaic of an existing scan folder."""
    from scanner.integrity import claim
    from scanner.pipeline import restitch

    check_dask(dask)  # before the folder is claimed: a refused option changes nothing
    scan = for_workers(scan, dask)
    with claim(scan, "stitch", allow_incomplete=allow_incomplete), _cluster(dask) as cluster, \
            _progress() as progress:
        result = restitch(scan, events=stage_bars(progress), cluster=cluster)
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
    from scanner.inspection.inspect import inspect_target
    from scanner.integrity import claim, require_ready
    from scanner.scanfolder import SCAN_JSON

    check_output(out_dir, "--out", folder=True)
    check_dask(dask)  # before a scan folder is claimed: a refused option changes nothing
    target = _scan_for_store(target, out_dir)
    scan = target[0] if len(target) == 1 and (target[0] / SCAN_JSON).is_file() else None
    if dask is not None:
        if scan is None and not (len(target) == 1 and target[0].name.endswith(".zarr")):
            err.print("[yellow]warning:[/] --dask: image files are inspected in this process")
            dask = None
        else:
            target = [for_workers(t, dask) for t in target]
            scan = target[0] if scan is not None else None
            out_dir = for_workers(out_dir, dask) if out_dir is not None else None
    for path in target:  # a scan inspected alone is checked as it is held (claim, below)
        if path is not scan and (path / SCAN_JSON).is_file():
            require_ready(path, "inspect", allow_incomplete=allow_incomplete)
    # a scan inspected into its own folder gets its reports made again from the new defects
    # (as `run` does), not left describing the earlier ones
    into_scan = scan is not None and (out_dir is None or out_dir.resolve() == scan.resolve())

    if sample_kind is not None and sample_kind not in SAMPLE_KINDS:
        raise UserError(f"--sample-kind: one of {', '.join(SAMPLE_KINDS)}, got {sample_kind!r}")
    if threshold is not None and not (threshold > 0 and math.isfinite(threshold)):
        raise UserError(f"--threshold: must be a positive finite number, got {threshold}")
    if pixel_size is not None and not (pixel_size > 0 and math.isfinite(pixel_size)):
        raise UserError(f"--pixel-size: must be a positive finite number, got {pixel_size}")
    if pixel_size is not None and (scan is not None or target[0].name.endswith(".zarr")):
        # it was accepted and ignored: a mosaic's own metadata places its pixels
        raise UserError("--pixel-size: for image files only; a scan or mosaic carries its "
                        "pixel size in its metadata")
    with ExitStack() as stack:
        working = None
        if scan is not None:
            working = stack.enter_context(claim(scan, "inspect", write=into_scan,
                                                allow_incomplete=allow_incomplete))
        cluster = stack.enter_context(_cluster(dask))
        progress = stack.enter_context(_progress())
        task = None

        def on_progress(done: int, total: int) -> None:
            nonlocal task
            if task is None:
                task = progress.add_task("inspecting", total=total)
            progress.update(task, completed=done)

        result = inspect_target(target, out_dir, model=model, threshold=threshold,
                                pixel_size_um=pixel_size, sample_kind=sample_kind,
                                progress=on_progress, cluster=cluster)
        outputs = {name: Path(path) for name, path in result.outputs.items()}
        if "scores" in outputs:  # image files: a review picture of each with defects
            from scanner.inspection.images import list_images
            from scanner.reports.overlays import write_overlays

            pictures = write_overlays(outputs["defects json"], list_images(target))
            if pictures is not None:
                outputs["overlays"] = pictures
        if scan is not None:
            from scanner.reports import report as run_report

            if into_scan and working is not None:
                working("reporting")
                outputs.update(run_report(scan).outputs)
            elif out_dir is not None:
                # inspected into another folder: its defects located with the scan's
                # geometry (wafer mm, dies, regions) and reported there, as in the scan's own
                outputs.update(run_report(scan, out=out_dir).outputs)
    if out_dir is not None and not into_scan:
        _remove_other_results(out_dir, outputs.values())
    out.print(f"defects: {result.n_defects}")
    for name, path in outputs.items():
        out.print(f"  {name:<16} {path.resolve()}")
    out.print("  inspect time: " + ", ".join(
        f"{k.removesuffix('_s')} {_duration(v) if k.endswith('_s') else v}"
        for k, v in result.timings.items()))


def _remove_other_results(out_dir: Path, written: Any) -> None:
    """Remove from ``--out`` what an earlier inspection of another kind of target left there
    and this one did not write again (a scan's KLARF and wafer map beside a mosaic's defect
    list, image files' scores and review pictures beside a scan's): only waferscope's own
    output names."""
    from models.data import INSPECTION_SCORES, OVERLAYS_FOLDER
    from scanner.defectlist import DEFECTS_CSV, DEFECTS_JSON, MAP_NAMES
    from scanner.reports.klarf import KLARF
    from scanner.reports.repeaters import REPEATERS_JSON
    from scanner.reports.wafermap import WAFERMAP

    kept = {Path(p).resolve() for p in written}
    for name in (INSPECTION_SCORES, OVERLAYS_FOLDER, DEFECTS_JSON, DEFECTS_CSV, KLARF,
                 WAFERMAP, REPEATERS_JSON, *MAP_NAMES.values()):
        path = Path(out_dir) / name
        if path.resolve() in kept or not path.exists():
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def _scan_for_store(target: list[Path], out_dir: Path | None) -> list[Path]:
    """The scan folder for a store inside one whose outputs would go into it: its mosaic is
    inspected as the scan is (held, its reports made again), not written over it bare."""
    from scanner.scanfolder import MOSAIC, SCAN_JSON

    if len(target) != 1 or not target[0].name.endswith(".zarr"):
        return target
    folder = target[0].parent
    if not (folder / SCAN_JSON).is_file() or (
            out_dir is not None and out_dir.resolve() != folder.resolve()):
        return target
    if target[0].resolve() != (folder / MOSAIC).resolve():
        raise UserError(f"{target[0]}: not the mosaic of the scan {folder}, whose outputs "
                        f"would be written over; give --out DIR")
    return [folder]


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
    from scanner.batch import run_batch

    check_dask(dask)

    def said(item: Any) -> None:  # as each scan ends: a batch stopped later keeps them said
        if item.ok:
            out.print(f"{item.folder.resolve()}: {item.n_defects} defects "
                      f"({_duration(item.wall_s)})")
        else:
            err.print(f"[red]{escape(str(item.folder.resolve()))}: failed:[/] "
                      f"{escape(str(item.error))}",
                      highlight=False, soft_wrap=True)

    with _cluster(dask) as cluster, _progress() as progress:
        items = run_batch([for_workers(s, dask) for s in scans], model=model, cluster=cluster,
                          events=stage_bars(progress), allow_incomplete=allow_incomplete,
                          on_item=said)
    failed = [item for item in items if not item.ok]
    if failed:  # 2 when every failure is the folders' own (bad input), as for one folder
        raise typer.Exit(2 if all(item.bad_input for item in failed) else 1)


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
    from scanner.integrity import claim
    from scanner.reports import report as run_report
    from scanner.reports.klarf import KLARF_VERSIONS

    if klarf_version is not None and klarf_version not in KLARF_VERSIONS:
        raise UserError(f"--klarf-version: {klarf_version} is not one of "
                        f"{', '.join(KLARF_VERSIONS)}")
    from scanner.recipe import klarf_id_problem

    for option, value in (("--lot", lot), ("--wafer", wafer)):
        problem = klarf_id_problem(value) if value is not None else None
        if problem:
            raise UserError(f"{option}: {problem}")
    with claim(scan, "report", allow_incomplete=allow_incomplete):
        result = run_report(scan, lot_id=lot, wafer_id=wafer, klarf_version=klarf_version,
                            full_dies_only=full_dies_only)
    out.print(f"scan folder: {result.folder.resolve()}  ({result.n_defects} defects)")
    for name, path in result.outputs.items():
        out.print(f"  {name:<16} {path.resolve()}")
    out.print(f"  report time: {_duration(result.wall_s)}")
