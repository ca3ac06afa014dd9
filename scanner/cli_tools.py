"""The ``waferscope`` commands around scans: train a detector, drift of scans' scores,
camera calibration, review in napari (registered on :data:`scanner.cli.app`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.progress import TaskID
from rich.table import Table

from scanner.cli_common import (
    RecipeArg,
    _duration,
    _friendly,
    _progress,
    app,
    check_output,
    err,
    out,
)
from scanner.errors import UserError

if TYPE_CHECKING:
    from models.data import GoodImage

#: the most false alarms per cm² a threshold may be calibrated to (one per 100 x 100 µm): beyond
#: it the threshold would sit in the good surface's own noise
MAX_FALSE_ALARMS_PER_CM2 = 1e4


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
    seed: Annotated[int, typer.Option(min=0, max=2**64 - 1, help="Seed: same data and seed "
                                      "give the same model.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing model file.")] = False,
) -> None:
    """Build a detector from good images and calibrate its threshold on held-out good surface."""
    from models.build import build_detector
    from scanner.inspection.goodimages import load_good
    from scanner.inspection.pixelsize import resolved_pixel_um

    paths = list(good or []) + list(more_good or [])
    target, variants = _checked_train_options(paths, model_out, overwrite, init, pixel_size_um,
                                              false_alarms_per_cm2, camera_variants)
    images, scan_pixel = load_good(paths)
    if scan_pixel is None:
        # a microscope's files state their pixel size: taken where --pixel-size is not given
        pixel_size_um = resolved_pixel_um({im.source: im.meta.get("stated_pixel_um")
                                           for im in images}, pixel_size_um)
    if scan_pixel is not None and pixel_size_um is not None and \
            abs(pixel_size_um - scan_pixel) > 0.01 * scan_pixel:
        # the scans' pixels were relabelled: a bank of 8 um pixels carded as 3 um, and every
        # mosaic then resampled to 3 um for it
        raise UserError(f"--pixel-size {pixel_size_um:g}: the good scans' pixels are "
                        f"{scan_pixel:g} µm (their mosaics say so); give --pixel-size for image "
                        "files only")
    if scan_pixel is not None and any(not im.meta.get("acquired") for im in images):
        err.print(f"[yellow]warning:[/] the good image files are taken at the scans' pixel "
                  f"size, {scan_pixel:g} µm", highlight=False, soft_wrap=True)
    assumed = pixel_size_um is None and scan_pixel is None
    if assumed and init is not None:
        # files extending a model are at its pixel size (a model of 5 um pixels extended as
        # 1 um gave 464 defects on a good image): the base card's, assumed as it was
        from models.card import card_of
        from models.modelfile import load_model

        base = card_of(load_model(init))
        if base.pixel_size_um:
            pixel_size_um = float(base.pixel_size_um)
            # a model built over a range of pixel sizes (the shipped default: 0.5-40 um)
            # has no one pixel size the files could be at: its nominal one is a guess too
            lo, hi = base.pixel_size_range_um or (pixel_size_um, pixel_size_um)
            assumed = bool(base.pixel_size_assumed) or not math.isclose(lo, hi, rel_tol=0.01)
    pixel = float(pixel_size_um or scan_pixel or 1.0)
    if assumed:
        # image files carry no pixel size: say what was taken, since scans at another pixel
        # size are resampled to it (and the false-alarm area is counted at it)
        err.print("[yellow]warning:[/] the good images are files with no pixel size: taken as "
                  f"{pixel:g} µm/px (give --pixel-size if they are not)", highlight=False,
                  soft_wrap=True)
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

        extra: dict[str, Any] = {"good": [str(p) for p in paths],
                                 "good_scans": _scan_identities(paths),
                                 "pixel_size_assumed": assumed}
        files_d2d = _files_die_to_die(images, pixel)
        d2d = _good_die_to_die(paths, init) or files_d2d
        if d2d is not None:
            extra["die_to_die"] = d2d
        # a file is judged by its own dies, not by the scans of a model it extends
        files = bool(images) and not images[0].meta.get("acquired", False)
        golden, record = _golden_for_model(images, files_d2d if files else d2d, pixel, init)
        if record is not None:
            extra["golden"] = record
        report = build_detector(images, target, pixel_size_um=pixel,
                                false_alarms_per_cm2=false_alarms_per_cm2, init=init,
                                seed=seed, augment_camera=variants,
                                progress=on_progress, card_extra=extra, golden=golden)
    _print_model(report, len(images), pixel, false_alarms_per_cm2)


def _good_die_to_die(paths: list[Path], init: Path | None) -> dict[str, Any] | None:
    """The die-to-die calibration of the good scan folders among ``paths`` (the largest
    z-score their dies reach and the z threshold set from it: :func:`scanner.inspection.
    inspect.good_scan_die_to_die`); without such scans, the one ``init``'s card holds.

    Not from image files: their dies compared as a scan would show them (blur, noise) agreed
    far better than a scan's do (a cell die grid: z 2.3 against its good scan's 12.1, a coin
    grid's texture 1.7 against 7.9), and the z threshold set from them reported a false
    defect on each of those good scans."""
    from scanner.inspection.dietodie import calibrated_z_threshold
    from scanner.inspection.inspect import good_scan_die_to_die
    from scanner.scanfolder import MOSAIC, SCAN_JSON

    found = [good_scan_die_to_die(p) for p in paths
             if p.is_dir() and (p / MOSAIC).exists() and (p / SCAN_JSON).is_file()]
    found = [f for f in found if f is not None]
    if found:
        z = max(f["good_max_z"] for f in found)
        zt = max(f["texture_good_max_z"] for f in found)
        out = {"good_max_z": z, "dies": sum(f["dies"] for f in found), "scans": len(found),
               "z_threshold": round(calibrated_z_threshold(z), 2),
               "texture_good_max_z": zt,
               "texture_z_threshold": round(calibrated_z_threshold(zt), 2)}
        if any(f.get("mode") for f in found):
            out["mode"] = next(f["mode"] for f in found if f.get("mode"))
        repeats = [f["found_grid_repeats"] for f in found if "found_grid_repeats" in f]
        if repeats:
            out["found_grid_repeats"] = all(repeats)
        return out
    if init is not None:
        import json

        from models.modelfile import card_path_for, resolve_model_path

        card = card_path_for(resolve_model_path(init))
        if card.is_file():
            return (json.loads(card.read_text()) or {}).get("die_to_die")
    return None


def _files_die_to_die(images: Sequence[GoodImage], pixel_um: float
                      ) -> dict[str, Any] | None:
    """Whether good image files (fewer than a model per position takes) show a repeat whose
    dies compare alike, judged on the first as a scan would show it (:func:`scanner.
    inspection.goodimages.good_image_die_to_die`): the card's ``die_to_die`` record, without
    z thresholds (the file's dies agree far better than a scan's: see
    :func:`_good_die_to_die`), so that inspection leaves a repeat found in a product that
    has none (``found_grid_repeats`` false); None when no repeat is found, or they are no
    such files."""
    from models.build import POSITION_MIN_IMAGES
    from scanner.inspection.golden import GOLDEN_KINDS
    from scanner.inspection.goodimages import good_image_die_to_die

    if not 1 <= len(images) < POSITION_MIN_IMAGES or any(
            im.kind != "user" or im.meta.get("acquired", False)
            or im.meta.get("sample_kind") not in GOLDEN_KINDS for im in images):
        return None
    found = good_image_die_to_die(images[0].image, pixel_um)
    if found is None:
        return None
    return {"source": f"good image file {images[0].source}",
            **{k: found[k] for k in ("good_max_z", "texture_good_max_z", "dies",
                                     "found_grid_repeats", "mode") if k in found}}


def _golden_for_model(images: Sequence[GoodImage], d2d: dict[str, Any] | None,
                      pixel_um: float, init: Path | None
                      ) -> tuple[Any, dict[str, Any] | None]:
    """The golden image a model keeps and its card record (``(None, None)``: none): the good
    image of :func:`_golden_of`, else the golden image of the model it extends, else the
    median of a few good image files (:func:`_stacked_golden_of`)."""
    from scanner.inspection.golden import golden_pixels, golden_record

    golden = _golden_of(images, d2d, pixel_um)
    if golden is not None:
        return golden_pixels(golden.image, golden.usable), golden_record(
            golden.image, golden.source, bool(golden.meta.get("acquired", False)))
    if init is not None:
        inherited = _inherited_golden(init, pixel_um)
        if inherited[0] is not None:  # an extended model keeps the golden image it had
            return inherited
    stacked = _stacked_golden_of(images, pixel_um)
    return stacked if stacked is not None else (None, None)


def _stacked_golden_of(images: Sequence[GoodImage], pixel_um: float
                       ) -> tuple[Any, dict[str, Any]] | None:
    """The golden image (pixels, card record) of a few good image files of one part: their
    registered median (:mod:`scanner.inspection.goldenstack`); None when they are no such
    files, or do not show one part alike. A part whose dies repeat keeps one too: image files
    are compared with it before their own dies, scans die to die first. From as many
    images as a model per position needs (``models.build.POSITION_MIN_IMAGES``), that model
    judges."""
    from models.build import POSITION_MIN_IMAGES
    from scanner.inspection.golden import GOLDEN_KINDS, golden_pixels, golden_record
    from scanner.inspection.goldenstack import stacked_golden

    if not 2 <= len(images) < POSITION_MIN_IMAGES or any(
            im.kind != "user" or im.meta.get("acquired", False) or im.usable is not None
            or im.meta.get("sample_kind") not in GOLDEN_KINDS for im in images):
        return None
    found = stacked_golden([im.image for im in images])
    if found is None:
        return None
    median, z_threshold = found
    record = golden_record(median, f"median of {len(images)} good images "
                           f"({images[0].source}, ...)", False, z_threshold)
    return golden_pixels(median, None), {**record, "images": len(images)}


def _golden_of(images: Sequence[GoodImage], d2d: dict[str, Any] | None, pixel_um: float
               ) -> GoodImage | None:
    """The good image a model keeps as its golden reference (:mod:`scanner.inspection.
    golden`): the one good image (a file, or a good scan's whole mosaic of an ``image``
    sample) of a design that shows no repeat: a good scan without die-to-die calibration or
    whose found "grid" is no layout, a file in which no grid of comparable dies is found
    (:func:`scanner.inspection.goodimages.good_image_die_to_die`). Not a scan of a wafer, a
    PV cell or a coupon: no two of those show the same grains, haze or texture, which a
    golden comparison would flag everywhere."""
    from scanner.inspection.golden import GOLDEN_KINDS

    if len(images) != 1 or images[0].kind != "user" or \
            images[0].meta.get("sample_kind") not in GOLDEN_KINDS:
        return None
    if d2d is not None and d2d.get("found_grid_repeats", True) is not False:
        return None
    return images[0]


def _inherited_golden(init: Path, pixel_um: float) -> tuple[Any, dict[str, Any] | None]:
    """The golden image (pixels, card record) of the model ``init`` names, for a model that
    extends it at the same pixel size; ``(None, None)`` when it keeps none."""
    from models.modelfile import load_model

    base = load_model(init)
    pixels = getattr(base, "golden", None)
    if pixels is None or abs(float(base.pixel_size_um) - pixel_um) > 1e-6 * pixel_um:
        return None, None
    return pixels, dict(base.card.get("golden") or {})


def _scan_identities(paths: list[Path]) -> list[dict[str, Any]]:
    """The good scan folders among ``paths``, as ``drift`` recognises them later (a copy
    included): folder, start time and recipe name. A scan a model was built from is in its
    bank and scores low; ``drift`` does not take it as the product's reference."""
    from scanner.inspection.drift import surface_image
    from scanner.ngff import open_mosaic
    from scanner.scanfolder import MOSAIC, SCAN_JSON, scan_json_if_any

    found = []
    for path in paths:
        scan = scan_json_if_any(path) if (Path(path) / SCAN_JSON).is_file() else None
        if scan is not None:
            mosaic = scan.get("mosaic") if isinstance(scan.get("mosaic"), dict) else {}
            pixel = mosaic.get("pixel_size_um")
            # its image (level, noise, sharpness), as inspection records a scan's: ``drift``
            # compares a later part's with it when there is no earlier scan to compare with
            image = surface_image(open_mosaic(Path(path) / MOSAIC)[0][0]) \
                if (Path(path) / MOSAIC).is_dir() else {"n": 0}
            found.append({"path": str(Path(path).resolve()), "started": scan.get("started"),
                          "name": (scan.get("recipe") or {}).get("name"),
                          "pixel_size_um": float(pixel) if isinstance(pixel, int | float)
                          else None, "surface_image": image})
    return found


def _checked_train_options(paths: list[Path], model_out: Path, overwrite: bool,
                           init: Path | None, pixel_size_um: float | None,
                           false_alarms_per_cm2: float, camera_variants: str
                           ) -> tuple[Path, bool | str]:
    """``train``'s options checked before anything is read: the model file to write and the
    camera variants (``"auto"``, True, False)."""
    if not paths:
        raise UserError("--good: give good images, folders of them, or good scan folders")
    from models.modelfile import card_path_for, weights_path

    # a folder given as --out (a scan folder, "models/") would get its weights beside it,
    # named after it
    check_output(model_out, "--out", folder=False)
    target = weights_path(model_out)
    # the card is written too: `--out cal.json` wrote over a calibration file of that name
    # (no cal.safetensors yet: nothing was said), as `--out m` over an m.json
    for written in (target, card_path_for(target)):
        check_output(written, "--out", folder=False)
        if written.exists() and not overwrite:
            raise UserError(f"{written}: exists (use --overwrite to replace it)")
    if init is not None and weights_path(init).resolve() == target.resolve():
        raise UserError(f"--init {init}: give another --out (the model extended is kept)")
    from devices.calibration import MAX_PIXEL_SIZE_UM

    if pixel_size_um is not None and not (0 < pixel_size_um <= MAX_PIXEL_SIZE_UM):
        # a recipe's camera and a calibration take no coarser pixel: a model of 1 km pixels
        # was built, and every scan inspected with it resampled a billionfold
        raise UserError(f"--pixel-size: must be a positive number of µm, at most "
                        f"{MAX_PIXEL_SIZE_UM:g} (got {pixel_size_um:g})")
    if not (false_alarms_per_cm2 > 0 and math.isfinite(false_alarms_per_cm2)):
        raise UserError(f"--false-alarms-per-cm2: must be a positive number, got "
                        f"{false_alarms_per_cm2}")
    if false_alarms_per_cm2 > MAX_FALSE_ALARMS_PER_CM2:
        raise UserError(f"--false-alarms-per-cm2: {false_alarms_per_cm2:g} is more than one per "
                        f"100 x 100 µm (must be at most {MAX_FALSE_ALARMS_PER_CM2:g})")
    variants = {"auto": "auto", "on": True, "off": False}.get(camera_variants)
    if variants is None:
        raise UserError("--camera-variants: auto, on or off")
    if init is not None:  # a damaged model to extend is refused before anything is read
        from models.modelfile import read_model_files

        read_model_files(init)
    return target, variants


def _print_model(report: Any, n_images: int, pixel: float, false_alarms_per_cm2: float
                 ) -> None:
    """What ``train`` built: files, bank, threshold, time; the build's warnings on stderr."""
    card = report.card
    cal = card["calibration"]
    out.print(f"model: {report.weights.resolve()}")
    out.print(f"  card       {report.card_path.resolve()}")
    out.print(f"  bank       {card['bank']['features']} features of {n_images} good "
              f"image(s) at {pixel:g} µm/px")
    out.print(f"  threshold  {card['threshold']:.4f} (target {false_alarms_per_cm2:g} false "
              f"alarm/cm² on {cal['area_cm2']:.3g} cm² of held-out good surface, "
              f"{cal['held_out']})")
    d2d = card.get("die_to_die")
    if d2d and "z_threshold" not in d2d:  # good image files: whether their dies repeat
        verdict = ("its dies are compared with one another in images and scans of it"
                   if d2d.get("found_grid_repeats") else "die-to-die off: its 'dies' differ "
                   "beyond any threshold, the repeat found is no layout")
        if d2d.get("mode") == "cell to cell":  # a repeat finer than a die
            if d2d.get("found_grid_repeats"):
                verdict = "its cells are compared with one another in images and scans of it"
            out.print(f"  cell grid  a repeat finer than a die found in {d2d['source']} (z up "
                      f"to {d2d['good_max_z']:g}): {verdict}")
        else:
            out.print(f"  die grid   found in {d2d['source']} ({d2d['dies']} dies, z up to "
                      f"{d2d['good_max_z']:g}): {verdict}")
    elif d2d:
        texture = (f"; texture {d2d['texture_z_threshold']:g} (reach "
                   f"{d2d['texture_good_max_z']:g})" if "texture_z_threshold" in d2d else "")
        if d2d.get("mode") == "cell to cell":
            out.print(f"  cell-to-cell z threshold {d2d['z_threshold']:g} (a repeat finer than a "
                      f"die, each cell against its neighbours; the good scan reaches z "
                      f"{d2d['good_max_z']:g}){texture}")
        else:
            out.print(f"  die-to-die z threshold {d2d['z_threshold']:g} (the good scan's dies "
                      f"reach z {d2d['good_max_z']:g}, {d2d['dies']} dies){texture}")
        if d2d.get("found_grid_repeats") is False:
            out.print("  die-to-die off: the repeat found in the good scan is no layout (its "
                      "'dies' differ beyond any threshold)")
    golden = card.get("golden")
    if golden and golden.get("images"):
        out.print(f"  golden     {golden['source']} ({golden['shape'][1]} x {golden['shape'][0]} "
                  f"px): the good images show one part alike, so images and scans of it are "
                  f"compared with their registered median (z threshold "
                  f"{golden['z_threshold']:g}, set on the good images)")
    elif golden:
        out.print(f"  golden     {golden['source']} ({golden['shape'][1]} x {golden['shape'][0]} "
                  f"px): no repeat of dies that can be compared was found (none, or finer "
                  f"than die-to-die compares), so scans of it are compared with this image "
                  f"(z threshold {golden['z_threshold']:g})")
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
    """Whether the newest scans' good-surface scores or image (level, noise, sharpness) moved
    from the oldest scan's (one scan: its scores from the model's calibration)."""
    import numpy as np

    from models.drift import image_drifted
    from scanner.inspection.drift import check_drift
    from scanner.inspection.inspect import load_inspection_model

    check_output(out_dir, "--out", folder=True)
    if out_dir is not None:  # a folder in the plot's place failed after the comparison
        check_output(Path(out_dir) / "drift.png", "--out", folder=False)
    report = check_drift(scans, load_inspection_model(model), out_dir)
    if not report.scans:  # nothing to judge: a verdict would only hide why
        more = len(report.skipped) - 1
        raise UserError(f"drift: no scan can be compared with the model's calibration: "
                        f"{report.skipped[0]}" + (f" (and {more} more)" if more else ""))
    for skipped in report.skipped:
        err.print(f"skipped {escape(skipped)}", highlight=False, soft_wrap=True)
    for row in report.scans:
        # the scores against the oldest scan (one scan: against the calibration)
        since = row.get("since_oldest")
        ratios = ", ".join(f"{k} x{v:.2f}" for k, v in (since or row["ratios"]).items())
        if since is not None and row["ratios"]:
            ratios += f" (x{float(np.median(list(row['ratios'].values()))):.2f} the calibration's)"
        image = row.get("image_ratios") or {}
        if image:  # against the oldest scan's image
            moved = image_drifted(image)
            ratios += "; image " + ", ".join(f"{k} x{v:.2f}" + (" (moved)" if k in moved else "")
                                             for k, v in image.items())
        out.print(f"  {escape(Path(row['scan']).name)}: {ratios}", highlight=False)
    if report.plot is not None:
        out.print(f"plot: {report.plot.resolve()}")
    verdict = report.verdict()
    if report.skipped:  # the verdict is not about them: the newest given may be one
        n = len(report.skipped)
        verdict += (f" ({n} scan{'s' if n > 1 else ''} given {'were' if n > 1 else 'was'} "
                    "not compared: skipped above)")
    out.print(verdict, highlight=False)


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
    from scanner.recipe import load_recipe
    from scanner.stitching.cameracalibration import calibrate_recipe

    check_output(out_file, "--out", folder=False)
    if out_file.exists() and not overwrite:
        raise UserError(f"{out_file}: exists; pass --overwrite to replace it")
    from devices.spec import MAX_COORDINATE

    if at is not None and not all(math.isfinite(v) and abs(v) <= MAX_COORDINATE for v in at):
        # (1e300 was echoed back later as a 300-digit number of µm)
        raise UserError(f"--at: must be stage coordinates within {MAX_COORDINATE:.0e} um, got "
                        f"{at[0]:g} {at[1]:g}")
    if not (0 < step <= 1):
        raise UserError(f"--step: must be in (0, 1], got {step}")
    rec = load_recipe(recipe)
    with _progress() as progress:
        task = progress.add_task("calibrating", total=None)
        result = calibrate_recipe(
            rec, centre_um=at, grid=grid, step_fraction=step,
            progress=lambda d, t: progress.update(task, completed=d, total=t),
        )
    out_file.parent.mkdir(parents=True, exist_ok=True)  # as `devices --save` does
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
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --screenshot file.")
                         ] = False,
) -> None:
    # (the backslash keeps rich from reading "[napari]" as markup in --help)
    """Review a scan in napari: mosaic, inspection maps and defects (needs waferscope\\[napari])."""
    from scanner.napari.viewer import view as open_view

    if screenshot is not None:
        # checked before napari starts: a .jpg failed after the window opened (RGBA), leaving
        # an empty file, and any other suffix got PNG bytes under its name
        if screenshot.suffix.lower() != ".png":
            raise UserError(f"--screenshot {screenshot}: give a .png file name")
        check_output(screenshot, "--screenshot", folder=False)
        if screenshot.exists() and not overwrite:  # (it may be a scan's own wafermap.png)
            raise UserError(f"--screenshot {screenshot}: exists (use --overwrite to replace it)")
    saved = open_view(scan, screenshot=screenshot, canvas_only=not window)
    if saved is not None:
        out.print(f"screenshot: {saved.resolve()}")
