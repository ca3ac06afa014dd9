"""The inspect stage: maps and defect list of a scan folder, a mosaic, or plain image files.

* A **scan folder** (or its ``mosaic.ome.zarr``): the maps go next to the mosaic as OME-NGFF
  images (:data:`scanner.defectlist.MAP_NAMES`), the defects to ``defects.json`` /
  ``defects.csv``, the timings and model to ``scan.json``. Only the sample's usable area (from
  the recipe saved in ``scan.json``) is inspected, so the chuck and the sample's edge are not
  defects. On a wafer the dies are also compared with their neighbours
  (``scanner.dietodie``) and that evidence is added to the anomaly map before defects are
  extracted; quiet and plain neighbourhoods get the card's thresholds for them for the
  sample kind (:func:`context_thresholds`).
* **Image files or folders**: each image is inspected whole (tiled if large); ``scores.csv``
  has one row per image (``image``, ``score``, ``n_defects``, ``n_review``), ``defects.csv``
  one row per defect with its ``image``, and ``defects.json`` the same per image. The image
  score is the peak of the anomaly map after a light Gaussian smoothing (sigma one map
  pixel), so a single noisy map pixel does not decide it: higher is more defective, on the
  scale of the model's threshold.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from models.data import read_image

from .alignrefine import effective_alignment
from .defectlist import CSV_COLUMNS, MAP_NAMES, Defect, write_defects
from .defects import DEFAULT_REVIEW_UNCERTAINTY, MapGeometry, extract_defects, local_thresholds
from .errors import UserError
from .inspect import MapSet, infer_image, infer_mosaic, reflectance_at_map
from .scanfolder import MOSAIC, SCAN_JSON, now_iso, write_json

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")
SCORES_CSV = "scores.csv"


@dataclass
class InspectionResult:
    """What an inspection wrote and how long it took."""

    folder: Path
    n_defects: int
    timings: dict[str, float]
    outputs: dict[str, Path] = field(default_factory=dict)
    defects: list[Defect] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)


def load_inspection_model(model: Any = None) -> Any:
    """The model to use: an already loaded one, a path, or None for the shipped default."""
    if model is not None and hasattr(model, "predict"):
        return model
    from models import load_model

    return load_model(model)


def model_info(model: Any) -> dict[str, Any]:
    """Identity of a model for the headers of outputs (name, file, weights hash, pixel size)."""
    card = dict(getattr(model, "card", {}) or {})
    path = getattr(model, "path", None)
    info = {
        "file": str(path) if path else None,
        "name": card.get("name") or (Path(path).stem if path else None),
        "weights_sha256": card.get("weights_sha256"),
        "pixel_size_um": float(model.pixel_size_um),
        "output_stride": int(model.output_stride),
        "calibrated_threshold": float(model.threshold),
        "thresholds_by_sample_kind": dict(_card_by_kind(model, "thresholds_by_sample_kind")),
    }
    if not info["weights_sha256"] and path and Path(path).is_file():
        info["weights_sha256"] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return info


def _card_by_kind(model: Any, key: str) -> dict[str, float]:
    """A card's per-sample-kind table (``thresholds_by_sample_kind`` and the like; {} if none)."""
    return (getattr(model, "card", {}) or {}).get(key) or {}


def pixel_band(model: Any, sample_kind: str | None, pixel_size_um: float | None
               ) -> dict[str, Any] | None:
    """The card's calibration band of a kind of sample at a pixel size (None: none).

    Cards may hold thresholds per band of pixel sizes (``thresholds_by_pixel_size``, see
    :func:`models.train.calibrate_pixel_bands`); a pixel size outside every band gets the
    nearest one.
    """
    bands = _card_by_kind(model, "thresholds_by_pixel_size").get(sample_kind or "")
    if not bands or not pixel_size_um or pixel_size_um <= 0:
        return None
    for band in bands:
        lo, hi = band["pixel_size_um"]
        if lo <= pixel_size_um <= hi:
            return band
    return bands[0] if pixel_size_um < bands[0]["pixel_size_um"][0] else bands[-1]


def card_threshold(model: Any, sample_kind: str | None = None,
                   pixel_size_um: float | None = None) -> tuple[float, str]:
    """The model's calibrated threshold for a kind of sample, and where it comes from.

    A card may hold one threshold per recipe sample kind (``thresholds_by_sample_kind``,
    each calibrated on held-out images of that kind), and for some kinds one per band of
    pixel sizes (:func:`pixel_band`, taken when the pixel size is known); any other kind, or
    none known (plain images), gets the pooled ``threshold``.
    """
    band = pixel_band(model, sample_kind, pixel_size_um)
    if band is not None:
        lo, hi = band["pixel_size_um"]
        return float(band["threshold"]), f"model card ({sample_kind}, {lo:g}-{hi:g} um pixels)"
    by_kind = _card_by_kind(model, "thresholds_by_sample_kind")
    if sample_kind in by_kind:
        return float(by_kind[sample_kind]), f"model card ({sample_kind})"
    return float(model.threshold), "model card"


def _decision_threshold(model: Any, threshold: float | None, sample_kind: str | None,
                        pixel_size_um: float | None = None) -> tuple[float, str]:
    """The user's threshold when given, else the card's for the kind (:func:`card_threshold`).

    A detector's uncertainty map is centred on it (``decision_threshold``): a defect just over
    the threshold applied is the uncertain one, not one near the card's pooled threshold.
    """
    thr, source = ((float(threshold), "user") if threshold is not None
                   else card_threshold(model, sample_kind, pixel_size_um))
    if hasattr(model, "decision_threshold"):
        model.decision_threshold = thr
    return thr, source


def _mosaic_pixel_size_um(mosaic: Path) -> float | None:
    """The pixel size of a mosaic's level 0 (µm), None when it cannot be read."""
    from .mosaic import level_transform, open_mosaic

    try:
        _, transforms = open_mosaic(mosaic)
        return float(level_transform(transforms)[0][-1])
    except Exception:  # inspection reads the mosaic again and reports what is wrong with it
        return None


def _saved_sample(folder: Path, scan: dict[str, Any] | None) -> Any:
    """The sample of the recipe saved in ``scan.json`` (None if unknown or unreadable)."""
    if not scan or "recipe" not in scan:
        return None
    from .recipe import parse_recipe

    try:
        return parse_recipe(scan["recipe"], base_dir=folder).sample
    except Exception:  # an unreadable recipe must not stop inspection: inspect everything
        return None


def context_thresholds(model: Any, sample_kind: str | None, threshold_source: str,
                       pixel_size_um: float | None = None) -> dict[str, float | None]:
    """The card's thresholds for the neighbourhood contexts of a kind of sample.

    ``{"quiet": t, "plain": t, "plain_near_structure": t}``, None where none applies: the
    card has none for the kind, or the user set the threshold (a user's threshold applies
    everywhere). A kind calibrated per band of pixel sizes takes its band's (:func:`pixel_band`).
    """
    from models.calibrate import CONTEXT_CARD_KEYS

    band = pixel_band(model, sample_kind, pixel_size_um)
    out: dict[str, float | None] = {}
    for context, key in CONTEXT_CARD_KEYS.items():
        value = None
        if threshold_source != "user" and sample_kind:
            value = (band.get(context) if band is not None
                     else _card_by_kind(model, key).get(sample_kind))
        out[context] = float(value) if value is not None else None
    return out


def _review_level(model: Any) -> float:
    card = getattr(model, "card", {}) or {}
    return float(card.get("review_uncertainty", DEFAULT_REVIEW_UNCERTAINTY))


def _local_threshold(maps: MapSet, threshold: float, contexts: dict[str, float | None],
                     reflectance: np.ndarray | None = None) -> np.ndarray | None:
    """Per map pixel threshold of :func:`scanner.defects.local_thresholds` (None: uniform).

    ``reflectance``: the input at map resolution when already computed."""
    lower = {k: v for k, v in contexts.items() if v is not None and v < threshold}
    if not lower:
        return None
    from models.calibrate import IMAGE_CONTEXTS, context_masks

    anomaly = np.asarray(maps.maps["anomaly"][:])
    needs_image = any(context in lower for context in IMAGE_CONTEXTS)
    if needs_image and reflectance is None:
        reflectance = reflectance_at_map(maps)
    masks = context_masks(anomaly, reflectance if needs_image else None)
    return local_thresholds(threshold, [(masks[k], v) for k, v in lower.items()],
                            anomaly.shape)


def _defects_from(maps: MapSet, model: Any, threshold: float, level: float,
                  contexts: dict[str, float | None] | None = None,
                  reflectance: np.ndarray | None = None,
                  difference: Callable[[int, int, int, int],
                                       tuple[np.ndarray, np.ndarray] | None] | None = None
                  ) -> list[Defect]:
    """The defect list of refined maps. ``difference``: the die-to-die difference image of a
    mosaic window and its z-scores (None outside the compared dies; see ``extract_defects``
    and ``scanner.dietodie.Comparison.difference``)."""
    from models.inspection import to_luminance

    def image(r0: int, c0: int, h: int, w: int) -> np.ndarray:
        # relative reflectance: a defect's contrast in units of the surface level
        return to_luminance(maps.reader.read(r0, c0, h, w)) * np.float32(1.0 / level) - 1.0

    def relative_difference(r0: int, c0: int, h: int, w: int
                            ) -> tuple[np.ndarray, np.ndarray] | None:
        compared = difference(r0, c0, h, w) if difference is not None else None
        return None if compared is None else (compared[0] * np.float32(1.0 / level),
                                              compared[1])

    geom = MapGeometry(maps.origin_um, maps.pixel_size_um, maps.stride)
    return extract_defects(maps.maps, geom, threshold=threshold, image=image,
                           review_uncertainty=_review_level(model),
                           local_threshold=_local_threshold(maps, threshold, contexts or {},
                                                            reflectance),
                           difference=relative_difference if difference is not None else None)


def _usable_polygon(sample: Any, alignment: dict[str, Any] | None = None) -> Any:
    """A saved sample's usable polygon, where the alignment found it (None if unknown)."""
    if sample is None:
        return None
    from .geometry import usable_polygon

    try:
        return usable_polygon(sample, alignment=alignment)
    except Exception:  # an odd sample must not stop inspection: inspect everything
        return None


def _die_to_die(mosaic: Path, sample: Any, polygon: Any, threshold: float,
                alignment: dict[str, Any] | None = None
                ) -> Callable[[MapSet], tuple[dict[str, Any], Any]] | None:
    """The map refinement that adds die-to-die evidence, or None when there is no die grid.

    Wafers with ``die_to_die`` use the recipe's grid; image and rectangle samples the grid
    their recipe gives, else the repeat found in the mosaic (:func:`scanner.diegrid.
    estimate_grid`) when ``die_to_die`` is true or auto. It runs after the model, not beside
    it: on the 2-core reference machine a thread running it during inference slowed both
    (demo wafer: inspection 18.2 -> 22.8 s). Returns what it did (dies compared, seconds,
    the grid) and the reader of difference images and z-scores of the dies compared
    (``difference(r0, c0, h, w)`` on the mosaic's level 0: ``Comparison.difference``; None
    when none were, or when the maps are not on the mosaic's own grid).
    """
    kind = getattr(sample, "kind", None)
    if sample is None or polygon is None or kind not in ("wafer", "image", "rectangle") \
            or getattr(sample, "die_to_die", False) is False:
        return None
    from .diegrid import sample_grid
    from .dietodie import MosaicGrid, apply_patches, die_to_die_patches
    from .mosaic import level_transform, open_mosaic

    levels, transforms = open_mosaic(mosaic)
    grid, source = sample_grid(sample, alignment), "alignment" if alignment else "recipe"
    if grid is None:
        grid, source = _found_grid(levels, transforms, polygon), "found in the mosaic"
    if grid is None:
        return None

    def refine(maps: MapSet) -> tuple[dict[str, Any], Any]:
        scale, trans = level_transform(transforms)
        geometry = MosaicGrid((float(trans[1]), float(trans[0])), float(scale[1]),
                              tuple(levels[0].shape))
        patches, stats, comparison = die_to_die_patches(
            maps.origin_um, maps.pixel_size_um, levels[0], geometry, grid, polygon, threshold,
            pyramid=levels)
        apply_patches(maps.maps["anomaly"], patches)
        difference = None
        if comparison is not None and not maps.reader.resample and levels[0].ndim == 2:
            difference = functools.partial(comparison.difference, levels[0])
        return {**stats.to_dict(), "grid": {"pitch_um": list(grid.pitch_um),
                                             "origin_um": list(grid.origin_um),
                                             "rotation_deg": grid.rotation_deg,
                                             "source": source}}, difference

    return refine


#: side (px) of the pyramid level the repeat of a layout is looked for in
GRID_SEARCH_PX = 1100


def _found_grid(levels: list[Any], transforms: list[Any], polygon: Any = None) -> Any:
    """The repeat found in a mosaic's pyramid level of about :data:`GRID_SEARCH_PX` a side,
    over the sample's usable ``polygon`` where one is given (None: no clear repeat).

    The polygon matters: a scan reaches past an image sample's edges, and the surround,
    scanned but not part of the product, would be read as part of its layout."""
    from .diegrid import estimate_grid
    from .mosaic import level_transform
    from .polygonmask import polygon_mask

    k = next((i for i, a in enumerate(levels) if max(a.shape) <= GRID_SEARCH_PX),
             len(levels) - 1)
    image = np.asarray(levels[k][...], dtype=np.float32)
    if image.ndim != 2:
        return None
    scale, trans = level_transform(transforms, k)
    origin, pixel = (float(trans[1]), float(trans[0])), float(scale[1])
    valid = image != 0
    if polygon is not None:
        inside = polygon_mask(polygon, origin, pixel)(0, 0, *image.shape)
        valid &= inside if inside is not None else False
    return estimate_grid(image, pixel, origin, valid)


#: sample kinds whose surface can be plain (polished wafers between and around dies, blank
#: coupons): a PV cell's grains are never plain, and an image sample may show anything, with
#: no die grid to tell a large uniform structure of its design from a stain
PLAIN_SURFACE_KINDS = ("wafer", "rectangle")


def _plain_surface(maps: MapSet, reflectance: np.ndarray, sample: Any, polygon: Any,
                   threshold: float) -> dict[str, Any]:
    """Add large faint defects on plain surface to the anomaly map (see
    :mod:`scanner.plainsurface`); returns what it found."""
    from .plainsurface import apply_plain_surface, die_pitch_in_map_px, plain_surface_defects
    from .polygonmask import polygon_mask

    t0 = time.perf_counter()
    shape = tuple(int(n) for n in maps.maps["anomaly"].shape)
    usable = None
    if polygon is not None:
        usable = polygon_mask(polygon, maps.origin_um, maps.pixel_size_um,
                              2 * maps.pixel_size_um)(0, 0, *shape)
        if usable is None:
            usable = np.zeros(shape, dtype=bool)
    found = plain_surface_defects(reflectance, usable,
                                  die_pitch_in_map_px(sample, maps.pixel_size_um))
    raised = apply_plain_surface(maps.maps["anomaly"], found, threshold)
    return {"regions": len(found), "map_pixels_raised": raised,
            "seconds": round(time.perf_counter() - t0, 3)}


def inspect_mosaic(
    mosaic: Path,
    out_dir: Path | None = None,
    *,
    model: Any = None,
    threshold: float | None = None,
    polygon: Any = None,
    scan: dict[str, Any] | None = None,
    sample_kind: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    cluster: Any = None,
) -> InspectionResult:
    """Inspect a mosaic: write the maps and the defect list into ``out_dir``.

    Parameters
    ----------
    mosaic : Path
        ``mosaic.ome.zarr``.
    out_dir : Path, optional
        Where maps and defects go (default: the mosaic's folder).
    model : InspectionModel or path, optional
        Default: the shipped model.
    threshold : float, optional
        Decision threshold (default: the model's calibrated one for the scan's sample kind,
        see :func:`card_threshold`).
    polygon : shapely Polygon, optional
        Usable area of the sample (stage µm); default: from ``scan.json`` next to the mosaic.
    scan : dict, optional
        The scan's ``scan.json`` (read from the mosaic's folder when not given); when the
        outputs go to the scan folder it is updated with the inspection's timings.
    sample_kind : str, optional
        Kind of sample whose calibrated threshold to use (default: the recipe's in
        ``scan.json``; none known: the model's pooled threshold).
    progress : callable, optional
        ``progress(done, total)`` windows.
    cluster : scanner.cluster.Cluster, optional
        Compute the maps as dask tasks (see :mod:`scanner.cluster`); refinement and defects
        run here.
    """
    mosaic = Path(mosaic)
    if not mosaic.exists():
        raise UserError(f"{mosaic}: mosaic not found")
    folder = mosaic.parent
    out_dir = Path(out_dir) if out_dir is not None else folder
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = load_inspection_model(model)
    if scan is None and (folder / SCAN_JSON).is_file():
        try:
            scan = json.loads((folder / SCAN_JSON).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            scan = None
    saved = _saved_sample(folder, scan)  # the recipe is parsed once, for both uses
    # where the sample really lies (scanner.align; refined on the mosaic after stitching)
    alignment = effective_alignment((scan or {}).get("alignment"))
    if polygon is None:
        polygon = _usable_polygon(saved, alignment)
    kind = sample_kind or (str(saved.kind) if saved is not None else None)
    pixel_um = _mosaic_pixel_size_um(mosaic)
    thr, thr_source = _decision_threshold(model, threshold, kind, pixel_um)
    contexts = context_thresholds(model, kind, thr_source, pixel_um)
    d2d: dict[str, Any] = {}
    difference: list[Any] = []  # the die-to-die difference reader, when there is one
    plain: dict[str, Any] = {}
    reflectance: list[np.ndarray] = []  # at map resolution, computed once for two uses
    die_to_die = _die_to_die(mosaic, saved, polygon, thr, alignment)
    plain_kind = kind in PLAIN_SURFACE_KINDS

    def refine(maps: MapSet) -> None:
        if die_to_die is not None:
            stats, diff = die_to_die(maps)
            d2d.update(stats)
            difference.append(diff)
        if plain_kind:
            reflectance.append(reflectance_at_map(maps))
            plain.update(_plain_surface(maps, reflectance[0], saved, polygon, thr))

    maps = infer_mosaic(model, mosaic, out_dir, polygon=polygon, progress=progress,
                        refine=refine, cluster=cluster)
    t_maps = time.perf_counter() - t0
    t1 = time.perf_counter()
    defects = _defects_from(maps, model, thr, maps.stats.extra["level"], contexts,
                            reflectance[0] if reflectance else None,
                            difference[0] if difference else None)
    t_defects = time.perf_counter() - t1
    from .drift import good_surface_scores

    good_scores = good_surface_scores(maps.maps["anomaly"], thr)
    mp = maps.stats.extra.get("mosaic_px", 0)
    timings = {
        "wall_s": round(time.perf_counter() - t0, 3),
        "maps_s": round(t_maps, 3),
        "network_s": round(maps.stats.network_s, 3),
        "defects_s": round(t_defects, 3),
    }
    if d2d.get("dies"):  # part of maps_s
        timings["die_to_die_s"] = round(float(d2d["seconds"]), 3)
    if plain:
        timings["plain_surface_s"] = plain["seconds"]
    header = {
        "source": str(mosaic),
        "created": now_iso(),
        "model": model_info(model),
        "threshold": thr,
        "threshold_source": thr_source,
        "threshold_quiet": contexts["quiet"],
        "threshold_plain": contexts["plain"],
        "threshold_plain_near_structure": contexts["plain_near_structure"],
        "maps": {k: v.name for k, v in maps.paths.items()},
        "map_pixel_size_um": maps.pixel_size_um,
        "masked_to_usable_area": polygon is not None,
        "windows": maps.stats.windows,
        "windows_skipped": maps.stats.skipped,
        "timings": timings,
        "die_to_die": d2d or None,
        "plain_surface": plain or None,
        "n_defects": len(defects),
        "good_scores": good_scores,
    }
    write_defects(out_dir, defects, header)
    if scan is not None and out_dir.resolve() == folder.resolve():
        scan.setdefault("timings", {})["inspect"] = {"wall_s": timings["wall_s"]}
        scan["inspection"] = {
            "model": header["model"], "threshold": thr, "n_defects": len(defects),
            "n_review": sum(d.review for d in defects), "maps": header["maps"],
            "mosaic_megapixels": round(mp / 1e6, 3) if mp else None, **timings,
            "die_to_die": d2d or None, "good_scores": good_scores,
        }
        write_json(folder / SCAN_JSON, scan)
    outputs = {k: v for k, v in maps.paths.items()}
    outputs["defects"] = out_dir / "defects.json"
    return InspectionResult(out_dir, len(defects), timings, outputs, defects)


def inspect_scan(
    folder: Path,
    *,
    model: Any = None,
    threshold: float | None = None,
    out_dir: Path | None = None,
    scan: dict[str, Any] | None = None,
    sample_kind: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    cluster: Any = None,
) -> InspectionResult:
    """Inspect the mosaic of a scan folder (see :func:`inspect_mosaic`)."""
    folder = Path(folder)
    if not (folder / MOSAIC).exists():
        raise UserError(f"{folder}: no {MOSAIC} (stitch the scan first)")
    return inspect_mosaic(folder / MOSAIC, out_dir, model=model, threshold=threshold,
                          scan=scan, sample_kind=sample_kind, progress=progress,
                          cluster=cluster)


# --------------------------------------------------------------------------- plain images


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
            for p in sorted(target.rglob("*")):
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
                    found.append((p.relative_to(target).as_posix(), p))
        elif target.is_file():
            if target.suffix.lower() not in IMAGE_SUFFIXES:
                raise UserError(f"{target}: not an image file (expected "
                                f"{', '.join(IMAGE_SUFFIXES)})")
            found.append((target.name, target))
        else:
            raise UserError(f"{target}: file or folder not found")
    if not found:
        raise UserError(f"{', '.join(str(t) for t in targets)}: no image files found")
    return found


def image_score(anomaly: np.ndarray) -> float:
    """Score of a whole image: peak of the anomaly map smoothed with sigma = 1 map pixel."""
    return float(ndimage.gaussian_filter(np.asarray(anomaly, np.float32), 1.0).max())


def inspect_images(
    targets: Sequence[Path],
    out_dir: Path,
    *,
    model: Any = None,
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
        Pixel size of the images (default: the model's; images are resampled otherwise).
        Defect coordinates are in µm from the centre of each image's pixel (0, 0).
    progress : callable, optional
        ``progress(done, total)`` images.
    """
    images = list_images(targets)
    t0 = time.perf_counter()
    model = load_inspection_model(model)
    thr, thr_source = _decision_threshold(model, threshold, sample_kind, pixel_size_um)
    contexts = context_thresholds(model, sample_kind, thr_source, pixel_size_um)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, all_defects, per_image = [], [], {}
    network_s = 0.0
    n_px = 0
    for k, (name, path) in enumerate(images):
        img = read_image(path)
        n_px += img.size
        maps = infer_image(model, img, pixel_size_um=pixel_size_um)
        network_s += maps.stats.network_s
        defects = _defects_from(maps, model, thr, maps.stats.extra["level"], contexts)
        score = image_score(maps.maps["anomaly"])
        rows.append({"image": name, "score": round(score, 6), "n_defects": len(defects),
                     "n_review": sum(d.review for d in defects),
                     "height": img.shape[0], "width": img.shape[1]})
        per_image[name] = [d.to_dict() for d in defects]
        all_defects += [(name, d) for d in defects]
        if progress is not None:
            progress(k + 1, len(images))
    wall = time.perf_counter() - t0
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
    header = {"created": now_iso(), "model": model_info(model), "threshold": thr,
              "threshold_source": thr_source, "threshold_quiet": contexts["quiet"],
              "threshold_plain": contexts["plain"],
              "threshold_plain_near_structure": contexts["plain_near_structure"],
              "score": "peak of the anomaly map smoothed with a Gaussian of sigma 1 map pixel",
              "pixel_size_um": float(pixel_size_um or model.pixel_size_um),
              "timings": {"wall_s": round(wall, 3), "network_s": round(network_s, 3),
                          "megapixels": round(n_px / 1e6, 3)}}
    write_json(out_dir / "defects.json", {"header": header, "images": per_image})
    return InspectionResult(
        out_dir, len(all_defects), header["timings"],
        {"scores": out_dir / SCORES_CSV, "defects": out_dir / "defects.csv",
         "defects json": out_dir / "defects.json"},
        [d for _, d in all_defects], {r["image"]: r["score"] for r in rows})


def _write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    """Write a CSV atomically (None as empty)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if row.get(c) is None else row.get(c) for c in columns])
    tmp.replace(path)


def inspect_target(
    target: Sequence[Path],
    out_dir: Path | None = None,
    *,
    model: Any = None,
    threshold: float | None = None,
    pixel_size_um: float | None = None,
    sample_kind: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    cluster: Any = None,
) -> InspectionResult:
    """Inspect a scan folder, a mosaic (``.ome.zarr``) or image files/folders.

    ``sample_kind`` chooses the model card's threshold for that kind of sample
    (:func:`card_threshold`); by default a scan's recipe says, and plain images get the pooled
    threshold.
    """
    targets = [Path(t) for t in target]
    if not targets:
        raise UserError("inspect: give a scan folder, a mosaic or image files")
    first = targets[0]
    if len(targets) == 1 and first.is_dir() and (first / MOSAIC).exists():
        return inspect_scan(first, model=model, threshold=threshold, out_dir=out_dir,
                            sample_kind=sample_kind, progress=progress, cluster=cluster)
    if len(targets) == 1 and first.name.endswith(".zarr"):
        return inspect_mosaic(first, out_dir, model=model, threshold=threshold,
                              sample_kind=sample_kind, progress=progress, cluster=cluster)
    if len(targets) == 1 and first.is_dir() and (first / SCAN_JSON).is_file():
        raise UserError(f"{first}: scan folder has no {MOSAIC} (stitch it first)")
    out = Path(out_dir) if out_dir is not None else Path.cwd() / "inspection"
    return inspect_images(targets, out, model=model, threshold=threshold,
                          pixel_size_um=pixel_size_um, sample_kind=sample_kind,
                          progress=progress)


__all__ = [
    "InspectionResult", "MAP_NAMES", "image_score", "inspect_images", "inspect_mosaic",
    "inspect_scan", "inspect_target", "list_images", "read_image",
]
