"""Inspection of plain image files: each image whole (tiled if large), one score per image.

``scores.csv`` has one row per image (``image``, ``score``, ``n_defects``, ``n_review``),
``defects.csv`` one row per defect with its ``image``, and ``defects.json`` the same per
image. The image score is the peak of the anomaly map after a light Gaussian smoothing (sigma
one map pixel), so a single noisy map pixel does not decide it: higher is more defective, on
the scale of the model's threshold.
"""

from __future__ import annotations

import csv
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from models.data import IMAGE_SUFFIXES as MODEL_IMAGE_SUFFIXES
from models.data import INSPECTION_SCORES, image_files, read_image
from models.heap import reused_heap
from scanner.defectlist import CSV_COLUMNS, InspectionResult
from scanner.errors import UserError
from scanner.inspection.card import (
    ModelRef,
    _decision_threshold,
    _defects_from,
    context_thresholds,
    evidence_threshold,
    load_inspection_model,
    log,
    model_info,
    threshold_record,
)
from scanner.inspection.dietodie_geometry import MosaicGrid
from scanner.inspection.golden import (
    GOLDEN,
    golden_evidence,
    say_golden_unplaced,
    uses_golden,
)
from scanner.inspection.maps import infer_image
from scanner.inspection.pixelsize import images_pixel_um
from scanner.scanfolder import now_iso, write_json

IMAGE_SUFFIXES = tuple(sorted(MODEL_IMAGE_SUFFIXES))  # one list: what the model reads
SCORES_CSV = INSPECTION_SCORES  # (models.data: image folders holding it are outputs)


def list_images(targets: Sequence[Path]) -> list[tuple[str, Path]]:
    """``(name, path)`` of every image among files and folders (folders searched recursively).

    Raises
    ------
    UserError
        A target that does not exist, a file that is not an image, or no image at all.
    """
    found: list[tuple[str, Path]] = []
    for target in targets:
        target = Path(target)
        if target.is_dir():
            # hidden files and folders are skipped: macOS's "._name.png" resource forks
            # (unreadable as pictures) stopped a whole folder's inspection
            found += [(p.relative_to(target).as_posix(), p) for p in image_files(target)]
        elif target.is_file():
            if target.suffix.lower() not in IMAGE_SUFFIXES:
                raise UserError(f"{target}: not an image file (expected "
                                f"{', '.join(IMAGE_SUFFIXES)})")
            found.append((target.name, target))
        else:
            raise UserError(f"{target}: file or folder not found")
    if not found:
        raise UserError(f"{', '.join(str(t) for t in targets)}: no image files found")
    # a file given twice (a folder and a file in it) is inspected and listed once; paths as
    # given, links not followed: a link is its own image, named where the user put it
    unique: dict[str, tuple[str, Path]] = {}
    for name, p in found:
        unique.setdefault(os.path.normpath(p.absolute()), (name, p))
    found = list(unique.values())
    if len({name for name, _ in found}) < len(found):
        # two folders (lots) holding the same file names: results are filed by name, so each
        # is named by its path from the folder the targets share instead
        full = {p: Path(key) for key, (_, p) in unique.items()}
        base = Path(os.path.commonpath([full[p].parent for _, p in found]))
        found = [(full[p].relative_to(base).as_posix(), p) for _, p in found]
    return found


def image_score(anomaly: np.ndarray) -> float:
    """Score of a whole image: peak of the anomaly map smoothed with sigma = 1 map pixel."""
    return float(ndimage.gaussian_filter(np.asarray(anomaly, np.float32), 1.0).max())


def covered(img: np.ndarray) -> np.ndarray:
    """An image file's pixels as a mosaic's: every pixel of a file is surface, while 0 in a
    mosaic means "no tile landed here" and is never compared, so a file's black pixels are
    raised to the least positive value, as fusion raises a scan's (a black 20 x 20 px square
    on a photograph was left out of the golden comparison and not found)."""
    return np.where(img == 0, np.float32(np.finfo(np.float32).tiny), img).astype(np.float32)


@reused_heap()
def inspect_images(
    targets: Sequence[Path],
    out_dir: Path,
    *,
    model: ModelRef = None,
    threshold: float | None = None,
    pixel_size_um: float | None = None,
    sample_kind: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> InspectionResult:
    """Inspect image files: ``scores.csv``, ``defects.csv`` and ``defects.json`` in ``out_dir``.

    Parameters
    ----------
    targets : sequence of Path
        Image files and folders of images.
    out_dir : Path
        Output folder (created).
    model, threshold
        As in :func:`inspect_mosaic`.
    pixel_size_um : float, optional
        Pixel size of the images (default: the size the files state, else the model's; images
        are resampled to the model's where it differs).
        Defect coordinates are in µm from the centre of each image's pixel (0, 0).
    progress : callable, optional
        ``progress(done, total)`` images.
    """
    images = list_images(targets)
    # every image is read once before any is inspected: a damaged one among thousands is
    # refused in seconds, not after the hours spent on those before it (decoding is a few
    # per cent of the network's time, and nothing is kept)
    shapes = {name: read_image(path).shape for name, path in images}
    # a microscope's file states its pixel size: taken where --pixel-size is not given
    pixel_size_um = images_pixel_um([path for _, path in images], pixel_size_um)
    t0 = time.perf_counter()
    model = load_inspection_model(model)
    _warn_about_shapes(model, shapes)
    thr, thr_source = _decision_threshold(model, threshold, sample_kind, pixel_size_um)
    contexts = context_thresholds(model, sample_kind, thr_source, pixel_size_um)
    evidence_thr = evidence_threshold(model, thr, thr_source, sample_kind, pixel_size_um)
    out_dir = Path(out_dir)
    rows, all_defects, per_image = [], [], {}
    network_s = 0.0
    n_px = 0
    compared_with: dict[str | None, int] = {}
    unplaced: list[str] = []
    for k, (name, path) in enumerate(images):
        img = read_image(path)
        n_px += img.size
        maps = infer_image(model, img, pixel_size_um=pixel_size_um)
        network_s += maps.stats.network_s
        reference, difference, dies = _compared(model, img, float(pixel_size_um or
                                                                  model.pixel_size_um),
                                                maps, evidence_thr, sample_kind)
        compared_with[reference] = compared_with.get(reference, 0) + 1
        if reference is None and uses_golden(model, sample_kind):
            unplaced.append(name)  # nor compared die to die: the model alone judges it
        defects = _defects_from(maps, model, thr, maps.stats.extra["level"], contexts,
                                difference=difference, dies=dies)
        score = image_score(maps.maps["anomaly"])
        rows.append({"image": name, "score": round(score, 6), "n_defects": len(defects),
                     "n_review": sum(d.review for d in defects),
                     "height": img.shape[0], "width": img.shape[1]})
        per_image[name] = [d.to_dict() for d in defects]
        all_defects += [(name, d) for d in defects]
        if progress is not None:
            progress(k + 1, len(images))
    if unplaced:
        say_golden_unplaced(unplaced, len(images))
    wall = time.perf_counter() - t0
    out_dir.mkdir(parents=True, exist_ok=True)  # (an input refused on the way leaves none)
    _write_csv(out_dir / SCORES_CSV, ["image", "score", "n_defects", "n_review", "height",
                                      "width"], rows)
    defect_rows = []
    for name, d in all_defects:
        row = d.to_dict()
        xmin, ymin, xmax, ymax = row.pop("bbox_um")
        row.update(bbox_xmin_um=xmin, bbox_ymin_um=ymin, bbox_xmax_um=xmax, bbox_ymax_um=ymax,
                   tiles="")
        defect_rows.append({"image": name, **{c: row.get(c) for c in CSV_COLUMNS}})
    _write_csv(out_dir / "defects.csv", ["image", *CSV_COLUMNS], defect_rows)
    header = {"created": now_iso(), "model": model_info(model),
              **threshold_record(thr, thr_source, contexts),
              "score": "peak of the anomaly map smoothed with a Gaussian of sigma 1 map pixel",
              "pixel_size_um": float(pixel_size_um or model.pixel_size_um),
              **({"golden": {"images_compared": compared_with.get(GOLDEN, 0)}}
                 if uses_golden(model, sample_kind) else {}),
              "die_to_die": {"images_compared": compared_with.get(DIE_TO_DIE, 0)},
              "timings": {"wall_s": round(wall, 3), "network_s": round(network_s, 3),
                          "megapixels": round(n_px / 1e6, 3)}}
    write_json(out_dir / "defects.json", {"header": header, "images": per_image})
    return InspectionResult(
        out_dir, len(all_defects), header["timings"],
        {"scores": out_dir / SCORES_CSV, "defects": out_dir / "defects.csv",
         "defects json": out_dir / "defects.json"},
        [d for _, d in all_defects], {r["image"]: r["score"] for r in rows})


#: what the header counts an image compared die to die (or cell to cell) under
DIE_TO_DIE = "die to die"


def _compared(model: Any, img: np.ndarray, pixel_um: float, maps: Any, thr: float,
              kind: str | None) -> tuple[str | None, Any, Any]:
    """Compare an image file with a reference and raise its anomaly map where they differ:
    the model's golden image where it keeps one and finds it in the image, else the image's
    own dies where it repeats (the repeat found in the image: die to die, or cell to cell for
    a repeat finer than a die). Returns the reference compared with (None: none), the
    difference reader and the ``dies`` masks :func:`scanner.inspection.card._defects_from`
    takes.

    The golden image first, unlike a scan (whose golden image is only a single good image
    of a design without a repeat): a median of several good files of a die grid is a better
    reference than the image's own neighbouring dies (camera die grid, four good files: 1.00
    of the painted defects found against the median, 0.95 die to die).

    Die to die only under a model whose good images showed that the product repeats
    (:func:`scanner.inspection.inspect.repeats`), and not an image of the aligned part the
    model judges per position (its positions are the reference). A die grid's file judged by
    the bank alone found 0.77 of a camera die grid's painted defects, the same product
    scanned and compared die to die 1.00.
    """
    from scanner.inspection.inspect import die_to_die_step, image_grid, image_levels, repeats

    geometry = MosaicGrid((0.0, 0.0), pixel_um, tuple(img.shape))
    seen = covered(img)
    card = (getattr(model, "card", None) or {}).get("die_to_die") or {}
    aligned_part = tuple(img.shape[:2]) == _part_shape(model)
    result: tuple[dict[str, Any], Any, Any, Any] = ({}, None, None, None)
    reference = None
    if uses_golden(model, kind):
        result = golden_evidence(model, [seen], geometry, maps, thr, say_unplaced=False)
        reference = GOLDEN if result[2] is not None else None
    if reference is None and img.ndim == 2 and not aligned_part and repeats(card):
        levels = image_levels(seen)
        grid = image_grid(levels, pixel_um)
        if grid is not None:
            step = die_to_die_step(levels, geometry, grid, "found in the image",
                                   geometry.outline(), kind or "image", thr,
                                   card.get("z_threshold"), card.get("texture_z_threshold"))
            result = step(maps)
            reference = DIE_TO_DIE if result[2] is not None else None
    _, difference, compared, repeated = result
    return reference, difference, None if compared is None else (compared, repeated)


#: images thinner than this (px) are scored mostly on their mirrored context: a good 8-10 px
#: strip of gravel read 1-3 false defects where 48 px strips read none
MIN_SIDE_PX = 32


def _warn_about_shapes(model: Any, shapes: dict[str, tuple[int, ...]]) -> None:
    """Say which images a model scores on another footing than the rest: not the shape of the
    aligned part it models per position (the memory bank alone scores them, on its own
    scale: a cell cut 4 px short ranked defects 0.95 instead of 1.00 against good ones), or
    thinner than :data:`MIN_SIDE_PX`."""
    part = _part_shape(model)
    if part is not None:
        other = [name for name, shape in shapes.items() if tuple(shape[:2]) != part]
        if other:
            log.warning("%d of %d images are not %d x %d px, the aligned part the model was "
                        "built on (e.g. %s): the memory bank alone scores them, on another "
                        "scale than the part's", len(other), len(shapes), part[1], part[0],
                        other[0])
    thin = [name for name, shape in shapes.items() if min(shape[:2]) < MIN_SIDE_PX]
    if thin:
        log.warning("%d images are thinner than %d px (e.g. %s): scored mostly on mirrored "
                    "context, expect false defects", len(thin), MIN_SIDE_PX, thin[0])


def _part_shape(model: Any) -> tuple[int, ...] | None:
    """The shape of the aligned part a model judges per position (None: it has no such
    model)."""
    position = getattr(model, "position", None)
    return tuple(position[0].image_shape) if position else None


def _write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    """Write a CSV atomically (None as empty)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if row.get(c) is None else row.get(c) for c in columns])
    tmp.replace(path)
