"""Building a detector from good images: memory bank, held-out calibration, card.

The user's good images (files, folders, or the mosaic of a good scan, as relative reflectance)
are cut into stride-8 cells with pretrained features (:mod:`models.backbone`). Part of the good
surface is held out: whole images when there are enough of them, else one quarter of each
image. The rest is reduced to a greedy coreset (:func:`models.bank.greedy_coreset`): the
memory bank. The held-out surface is then scored like an inspection would score it, which
gives the score scale (``score_reference``), the threshold for the false-alarm rate per cm²
the user asked for (:func:`models.thresholds.calibrate_threshold`), the uncertainty's scale and
the distribution of good scores that drift checks compare scans with.

Nothing here needs a defect: no synthetic anomalies are painted, nothing is trained by
gradient descent.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from . import edgeband
from .backbone import FEATURE_DIM, FEATURE_STRIDE
from .bank import BankIndex, greedy_coreset
from .card import within_pixel_sizes
from .data import GoodImage
from .detector import OUTPUT_STRIDE, PatchDetector, features_of, save_detector
from .drift import score_summary
from .errors import InputError
from .gaussian import (
    PositionModel,
    choose_dims,
    descriptor,
    fit_position_model,
    merged_position_model,
    pooled,
    top_level,
    zoomed,
    zooms_for,
)
from .heap import reused_heap
from .lines import calibrate_line_threshold
from .modelfile import card_path_for
from .thresholds import (
    DEFECT_MERGE_MAP_PX,
    MIN_BAND_AREA_CM2,
    PIXEL_BANDS,
    calibrate_threshold,
    count_components,
    pixel_bands,
)
from .variants import variants_of

#: most bank features; the search costs bank size x 176 multiply-adds per stride-8 cell
BANK_MAX = 16384
#: most bank features of an extended model (``--init``): extending adds to the bank what a
#: model built from the new images alone would hold, and past this size the old features the
#: new ones repeat are dropped (the search's cost grows with the bank)
BANK_MAX_EXTENDED = 4 * BANK_MAX
#: fewest bank features (a small good image keeps all of its cells up to this)
BANK_MIN = 2048
#: share of the candidate cells kept by the coreset (PatchCore keeps 1-10 %)
BANK_FRACTION = 0.1
#: candidate cells drawn at random before the coreset (the greedy search is linear in them)
CANDIDATES_MAX = 80_000
#: with at least this many good images, whole images are held out; with fewer, a quarter of
#: each image
MIN_IMAGES_TO_HOLD_OUT = 8
#: with at least this many good images of one shape (and nothing masked), the part is taken
#: as aligned and also modelled per position (:mod:`models.gaussian`)
POSITION_MIN_IMAGES = 40
#: ... and only when the features vary less across the images at one position than across
#: positions: the mean per-position variance over the total is 0.57 for real EL cells, 0.11
#: for one die imaged again, 0.97-0.98 for random crops of a texture (brick, gravel, grass),
#: where a position means nothing
ALIGNED_MAX_VARIANCE_RATIO = 0.85
HOLD_OUT_FRACTION = 0.2
#: images held out by their centre get their border calibrated on its own
#: (:mod:`models.edgeband`) from this many cells a side (768 px): on smaller ones the border
#: band is most of what the bank learns from
EDGE_MIN_CELLS = 96
#: stride-8 cells left out of the bank around a held-out quarter, so that the bank does not
#: see the held-out surface through the features' receptive field
GAP_CELLS = 4
#: the score reference: this quantile of held-out good cell distances
REFERENCE_QUANTILE = 0.99
#: the threshold extrapolated to the user's false-alarm rate is never more than this many
#: times the highest held-out peak. Measured on second copies of 7 products (14 models from a
#: good scan or a good image file, products bench 2026-12-04): their good surface peaked at
#: 0.86-1.12 x the held-out maximum (one map at 1.24 x, where die-to-die's veto cleared it:
#: the threshold there is unchanged), while the tail, extrapolated from 0.002-0.03 cm² to 1 cm²,
#: put thresholds on photographs without a repeat at 1.6-4.4 x it, and they found 0 of 10
#: painted defects (at the held-out maximum: 3-9 of 10). A quarter of one image held out is
#: content the bank never saw; a later copy of the product shows content it holds
MAX_OVER_HELD_OUT = 1.15
Progress = Callable[[str, int, int], None]


@dataclass
class BuildReport:
    """What :func:`build_detector` did."""

    weights: Path
    card_path: Path
    card: dict[str, Any]
    build_time_s: float
    warnings: list[str] = field(default_factory=list)


def _usable_cells(usable: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray:
    """Stride-8 cells wholly inside a usable area (all when none is given)."""
    if usable is None:
        return np.ones(shape, dtype=bool)
    u = np.asarray(usable, dtype=bool)
    h, w = shape
    pad = np.zeros((h * FEATURE_STRIDE, w * FEATURE_STRIDE), dtype=bool)
    pad[: u.shape[0], : u.shape[1]] = u
    return pad.reshape(h, FEATURE_STRIDE, w, FEATURE_STRIDE).all(axis=(1, 3))


@dataclass
class _HeldOut:
    """The held-out part of one image: its features and usable cells, and its area (µm²)."""

    features: torch.Tensor  # (D, h, w)
    usable: np.ndarray  # (h, w) bool
    area_um2: float
    #: which usable cells lie in the image's border band (:func:`models.edgeband.band`)
    edge: np.ndarray | None = None


@dataclass
class _Border:
    """A held-out segment of one image's border band (:mod:`models.edgeband`): its features
    and cells, and the image's cells whose bank features it is scored without (the segment
    and :data:`GAP_CELLS` around it), so that it is new to the bank as the held-out block is
    without taking those cells out of the bank."""

    features: torch.Tensor  # (n, D): the segments' cells
    image: int
    zone: np.ndarray  # (H, W) bool over the whole image


def _split_image(feat: torch.Tensor, usable: np.ndarray, pixel_um: float, image: int,
                 image_border: bool = True
                 ) -> tuple[torch.Tensor, np.ndarray, _HeldOut, _Border | None]:
    """Bank candidates and their cells, the held-out central block (half the rows and half
    the columns: a quarter of the area) of one image's cells, and the held-out segments of
    its border band (:func:`models.edgeband.held_segments`; none on images under
    :data:`EDGE_MIN_CELLS` cells a side, where the band is most of what is left).
    ``image_border`` false: the image is a crop of a larger one, whose border is no edge.

    The centre, not a corner quarter: a corner quarter holds one of the image's four corners,
    which no other part of the image shows (the bank never learns it), so the corner alone
    set the threshold of a model built from one good scan.
    """
    rows, cols, keep = _held_block(usable)
    band = edgeband.band(usable, image_border)
    held = _HeldOut(feat[:, rows, cols].clone(), usable[rows, cols].copy(),
                    float(usable[rows, cols].sum()) * (FEATURE_STRIDE * pixel_um) ** 2,
                    band[rows, cols].copy())
    border = None
    if min(usable.shape) >= EDGE_MIN_CELLS:
        segments = edgeband.held_segments(band, rows, cols)
        if segments.any():
            border = _Border(feat.permute(1, 2, 0)[torch.from_numpy(segments)].clone(), image,
                             ndimage.maximum_filter(segments, size=2 * GAP_CELLS + 1))
    return feat.permute(1, 2, 0)[torch.from_numpy(keep)], np.argwhere(keep), held, border


def _held_block(usable: np.ndarray) -> tuple[slice, slice, np.ndarray]:
    """The rows and columns of cells :func:`_split_image` holds out, and the usable cells it
    keeps for the bank (beyond :data:`GAP_CELLS` of the held-out block)."""
    h, w = usable.shape
    rows, cols = slice(h // 4, h // 4 + max(h // 2, 1)), slice(w // 4, w // 4 + max(w // 2, 1))
    keep = usable.copy()
    g = GAP_CELLS
    keep[max(rows.start - g, 0) : rows.stop + g, max(cols.start - g, 0) : cols.stop + g] = False
    return rows, cols, keep


def _check_room_to_learn(images: Sequence[GoodImage]) -> None:
    """Refuse, before any features are computed, good images too few and too small to keep
    anything for the bank once the centre of each is held out (it failed after the work,
    naming no size)."""
    if len(images) >= MIN_IMAGES_TO_HOLD_OUT:
        return
    if any(_held_block(np.ones((-(-g.image.shape[0] // FEATURE_STRIDE),
                                -(-g.image.shape[1] // FEATURE_STRIDE)), bool))[2].any()
           for g in images):
        return
    h, w = max(g.image.shape[0] for g in images), max(g.image.shape[1] for g in images)
    # the side from which every larger square image keeps cells (the held-out block's
    # rounding leaves none at some sizes above the first that keeps any)
    cells = 1 + max(n for n in range(1, 64) if not _held_block(np.ones((n, n), bool))[2].any())
    side = (cells - 1) * FEATURE_STRIDE + 1
    raise InputError(f"--good: {len(images)} image(s) of at most {h} x {w} px: with fewer "
                     f"than {MIN_IMAGES_TO_HOLD_OUT} good images the centre of each is held "
                     "out to calibrate on, and nothing is left to learn from; give "
                     f"{MIN_IMAGES_TO_HOLD_OUT} or more good images, or images of at least "
                     f"{side} px a side")


def _held_out_images(n: int, seed: int) -> set[int]:
    """Indices of the whole images held out (stable under adding images: a hash of the index
    and the seed decides, so each image keeps its role)."""
    if n < MIN_IMAGES_TO_HOLD_OUT:
        return set()
    ranked = sorted(range(n), key=lambda i: zlib.crc32(f"{seed}:{i}".encode()))
    return set(ranked[: max(2, round(HOLD_OUT_FRACTION * n))])


@reused_heap()
def build_detector(
    images: Sequence[GoodImage],
    out: str | Path,
    *,
    pixel_size_um: float = 1.0,
    pixel_size_range_um: tuple[float, float] | None = None,
    false_alarms_per_cm2: float = 1.0,
    init: str | Path | None = None,
    seed: int = 0,
    bank_max: int = BANK_MAX,
    card_extra: dict[str, Any] | None = None,
    companion_from: str | Path | None = None,
    augment_camera: bool | str = "auto",
    progress: Progress | None = None,
    golden: np.ndarray | None = None,
) -> BuildReport:
    """Build a detector from good images and calibrate its threshold; write it to ``out``.

    Parameters
    ----------
    images : sequence of GoodImage
        Good images as relative reflectance (``models.data``), with their usable areas.
    out : path
        Weights to write (``.safetensors``; the card goes beside it).
    pixel_size_um : float
        Pixel size of the images (the model runs at it; other scans are resampled to it).
    pixel_size_range_um : tuple, optional
        Pixel sizes the images span (the default's banks): scans inside it run at their own.
    false_alarms_per_cm2 : float
        Target of the threshold calibration on the held-out good surface.
    init : path, optional
        A detector to extend: its bank is kept, what it does not cover of the new images is
        added (the file at ``init`` is not changed).
    seed, bank_max : int
        Seed of every random choice; most features in the bank.
    card_extra : dict, optional
        More entries for the card (provenance).
    companion_from : path, optional
        Model whose roughness network goes beside (default: ``init``, else the default's).
    augment_camera : bool or "auto"
        Let image files (``GoodImage.meta["acquired"]`` false) enter the bank also as a
        microscope would see them (:mod:`models.variants`), held out on every variant.
        ``"auto"``: with fewer than :data:`MIN_IMAGES_TO_HOLD_OUT` images only (a golden image
        or two; many images are taken as camera images of the kind they will inspect).
    progress : callable, optional
        ``progress(stage, done, total)`` with stages ``features``, ``bank``, ``calibrate``.
    golden : ndarray, optional
        The one good image of a design that does not repeat (relative reflectance, at
        ``pixel_size_um``), kept in the model as the reference a scan of it is compared
        with (:mod:`scanner.inspection.golden`).
    """
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    base = _checked_inputs(images, false_alarms_per_cm2, init, pixel_size_um)
    _check_room_to_learn(images)
    base_position = base.position if base is not None else None
    held_images, augmenting, dims = _roles(images, seed, augment_camera, base_position)
    zooms = tuple(m.zoom for m in base_position) if base_position and dims is not None else None
    seen = _collect_features(images, held_images, augmenting, dims, rng, pixel_size_um,
                             progress, zooms)
    start = base.bank if base is not None else None
    bank, from_init, chosen = _choose_bank(
        seen.pool, int(seen.total_cells * (1 - len(held_images) / len(images))), bank_max,
        start, seed, progress)
    cal = _calibrate(bank, seen.held, false_alarms_per_cm2, progress)
    kept = _threshold_of_init(base, init, cal)
    sources = np.concatenate([np.full((from_init, 3), -1), seen.sources[chosen.numpy()]])
    edge = _edge_calibration(bank, sources, cal, seen.held, seen.borders)
    warnings = _calibration_warnings(cal.result.to_dict(), len(images), len(held_images))
    if kept is not None:
        warnings.append(kept["why"])
    if dims is not None:
        position, position_cal = _position_model(
            seen.position, dims, images[0].image.shape, cal.area_cm2, false_alarms_per_cm2,
            cal.result.threshold, base)
    elif base_position:
        position, position_cal, why = _kept_position_model(base, cal.result.threshold)
        warnings.append(why)
    else:
        position, position_cal = None, None
    if progress is not None:
        progress("calibrate", 1, 1)
    # an extended model has the room a model of the new images alone would have
    bank, extra = _with_held_out(bank, seen.held, bank_max + from_init, seed)
    card = _card(Path(out).stem, pixel_size_um, pixel_size_range_um, seed, cal, {
        **cal.result.to_dict(), "held_out_images": len(seen.held), "warnings": warnings,
        "held_out": "whole images" if held_images else "the central quarter of each image",
        **({"edge": edge} if edge is not None else {}),
        **({"init_threshold": {k: v for k, v in kept.items() if k != "why"}}
           if kept is not None else {})})
    card.update(bank={"features": int(len(bank)), "candidates": int(len(seen.pool)),
                      "from_held_out": extra, "from_init": from_init,
                      "images": len(images) - len(held_images)},
                init=str(init) if init is not None else None, **(card_extra or {}))
    card["sample_edge_seen"] = _sample_edge_seen(images) or bool(
        base is not None and base.card.get("sample_edge_seen", True))
    if base is not None:
        card["history"] = _history(base)
        card.update(_calibrations_of_init(
            base, cal.reference, pixel_size_range_um,
            {str(im.meta["sample_kind"]) for im in images if im.meta.get("sample_kind")}))
    if position_cal is not None:
        card["position_calibration"] = position_cal
    weights = save_detector(bank, card, out, companion=_companion(companion_from, init),
                            position=position, golden=golden)
    written = json.loads(card_path_for(weights).read_text(encoding="utf-8"))  # hash included
    return BuildReport(weights, card_path_for(weights), written, time.perf_counter() - t0,
                       warnings)


def _roles(images: Sequence[GoodImage], seed: int, augment_camera: bool | str,
           base: list[PositionModel] | None = None
           ) -> tuple[set[int], bool, torch.Tensor | None]:
    """The images held out whole (none: the centre of each is held out), whether image
    files also enter as a microscope would see them, and the channels of a position model
    (None unless the images show one aligned part: same shape, no usable masks, enough of
    them held out). Extending a model of an aligned part (``base``, its position models),
    new images of its shape add to its Gaussians, however few (with its channels)."""
    held_images = _held_out_images(len(images), seed)
    augmenting = bool(augment_camera) and not (
        augment_camera == "auto" and len(images) >= MIN_IMAGES_TO_HOLD_OUT)
    shapes = {g.image.shape for g in images}
    aligned = (len(held_images) >= 2 and not augmenting and len(shapes) == 1
               and all(g.usable is None for g in images))
    if base:
        aligned = aligned and shapes == {tuple(base[0].image_shape)}
        return held_images, augmenting, base[0].dims.clone() if aligned else None
    aligned = aligned and len(images) >= POSITION_MIN_IMAGES
    return held_images, augmenting, choose_dims(FEATURE_DIM, seed) if aligned else None


def _sample_edge_seen(images: Sequence[GoodImage]) -> bool:
    """Whether a good image shows a sample's edge with what lies beyond it (the chuck),
    as a scan does: a mosaic or a simulated window whose usable area is not all of it."""
    return any(g.usable is not None and not bool(np.all(g.usable)) for g in images)


def _history(base: PatchDetector) -> list[dict[str, Any]]:
    """The card's record of the models a detector was extended from, the last one added."""
    return [*base.card.get("history", []),
            {"model": str(base.path), "sha256": base.card.get("weights_sha256"),
             "bank": int(len(base.bank))}]


#: the card's thresholds per sample kind, on the scale of its score reference
_KIND_THRESHOLD_KEYS = ("thresholds_by_sample_kind", "thresholds_line_by_sample_kind")


def _calibrations_of_init(base: PatchDetector, reference: float,
                          pixel_size_range_um: tuple[float, float] | None,
                          new_kinds: set[str]) -> dict[str, Any]:
    """What an extended model keeps of its base's calibration per sample kind and pixel band
    (thresholds, line thresholds, good-surface scores), rescaled from the base's score
    reference to ``reference``, and the base's range of pixel sizes; empty without them.
    The kinds of sample of the new good images (``new_kinds``, scans') are left to the new
    calibration.

    The extended bank holds the base's, so a kind's good surface lies as near it as before:
    its threshold in nearest-bank distance keeps the rate the base was calibrated to. They
    were dropped: the shipped default extended with 3 small photographs judged wafers and PV
    cells at every pixel size with the one new pooled threshold (wafers 83.6 -> 72.1 in
    distance, PV cells at 10 um 65.8 -> 72.1) and ran only at 1 um (range 0.5-40 -> 1-1)."""
    ref = base.card.get("score_reference")
    if not isinstance(ref, int | float) or not ref > 0 or not reference > 0:
        return {}
    k = float(ref) / float(reference)

    def scaled(value: Any) -> Any:
        return float(value) * k if isinstance(value, int | float) and \
            not isinstance(value, bool) else value

    def scores(record: Any) -> Any:
        return {key: (v if key == "n" else scaled(v)) for key, v in record.items()} \
            if isinstance(record, dict) else record

    out: dict[str, Any] = {}
    for key in _KIND_THRESHOLD_KEYS:
        if base.card.get(key):
            out[key] = {kind: scaled(t) for kind, t in base.card[key].items()
                        if kind not in new_kinds}
    if base.card.get("good_scores_by_sample_kind"):
        out["good_scores_by_sample_kind"] = {
            kind: scores(s) for kind, s in base.card["good_scores_by_sample_kind"].items()
            if kind not in new_kinds}
    if base.card.get("thresholds_by_pixel_size"):
        out["thresholds_by_pixel_size"] = {
            kind: [{**band, "threshold": scaled(band.get("threshold")),
                    "line": scaled(band.get("line")),
                    "good_scores": scores(band.get("good_scores"))} for band in bands]
            for kind, bands in base.card["thresholds_by_pixel_size"].items()
            if kind not in new_kinds}
    span = base.card.get("pixel_size_range_um")
    if pixel_size_range_um is None and isinstance(span, list | tuple) and len(span) == 2:
        out["pixel_size_range_um"] = [float(span[0]), float(span[1])]
    return out


def _card(name: str, pixel_size_um: float, pixel_size_range_um: tuple[float, float] | None,
          seed: int, cal: _Calibrated, calibration: dict[str, Any]) -> dict[str, Any]:
    """The card of a detector: method, geometry, scores, threshold and its calibration."""
    return {
        "name": name,
        "kind": "detector",
        "method": "PatchCore: nearest-neighbour distance to a greedy coreset of pretrained "
                  "EfficientNet-Lite0 patch features of good images",
        "pixel_size_um": float(pixel_size_um),
        "pixel_size_range_um": list(pixel_size_range_um or (pixel_size_um, pixel_size_um)),
        "normalization": {"method": "relative", "formula": "x / level, level = median of the "
                          "image or mosaic; colour converted to luminance (Rec. 709)"},
        "score": "nearest-bank distance / score_reference",
        "score_reference": cal.reference,
        "threshold": float(cal.result.threshold),
        "line_threshold": cal.line,
        "uncertainty_log_scale": cal.tau,
        "seed": int(seed),
        "calibration": calibration,
        "good_scores": score_summary(cal.values),
    }


def _checked_inputs(images: Sequence[GoodImage], false_alarms_per_cm2: float,
                    init: str | Path | None, pixel_size_um: float) -> PatchDetector | None:
    """The detector ``init`` names (None without one), once the inputs are usable.

    Raises
    ------
    InputError
        No images, a false-alarm target that is not a positive number, an ``init`` that is
        not a detector or was built at other pixel sizes than the new images'.
    """
    from .modelfile import load_model

    if not images:
        raise InputError("--good: no good images to build the model from")
    if false_alarms_per_cm2 <= 0 or not math.isfinite(false_alarms_per_cm2):
        raise InputError("--false-alarms-per-cm2: must be a positive number")
    base = load_model(init) if init is not None else None
    if base is not None and not isinstance(base, PatchDetector):
        raise InputError(f"--init {init}: not a detector (a network-only model cannot be "
                         "extended; build a new one)")
    if base is not None:
        # its bank holds features of its own scale: new ones of another would mix the two
        # (a 2 um model extended with 3 um images was written as a 3 um model)
        card = base.card
        lo, hi = card.get("pixel_size_range_um") or [card.get("pixel_size_um")] * 2
        if lo is not None and hi is not None and not within_pixel_sizes(pixel_size_um, lo, hi):
            built = f"{lo:g} um" if lo == hi else f"{lo:g}-{hi:g} um"
            raise InputError(f"--init {init}: built at {built} per pixel, the new good images "
                             f"are at {pixel_size_um:g} um; give images at its pixel size "
                             "(--pixel-size) or build a new model")
    return base


@dataclass
class _Features:
    """What the good images gave: bank candidates, held-out surface, and the pooled features
    (by held out or not) and descriptors of held-out images for a position model."""

    pool: torch.Tensor
    held: list[_HeldOut]
    position: dict[float, _Aligned]
    total_cells: int
    #: (image, row, col) of each pool feature's cell
    sources: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), dtype=np.int64))
    borders: list[_Border] = field(default_factory=list)


@dataclass
class _Aligned:
    """Pooled features of an aligned part's images at one zoom (by held out or not) and the
    descriptors of the held-out ones."""

    features: dict[bool, list[torch.Tensor]]
    held_descriptors: list[torch.Tensor]


def _collect_features(images: Sequence[GoodImage], held_images: set[int], augmenting: bool,
                      dims: torch.Tensor | None, rng: np.random.Generator,
                      pixel_size_um: float, progress: Progress | None,
                      zooms: tuple[float, ...] | None = None) -> _Features:
    """Features of every version of every good image, split into bank candidates (a random
    share, so that at most :data:`CANDIDATES_MAX` cells are kept) and held-out surface;
    with ``dims``, also at each of ``zooms`` (default :func:`zooms_for` the images) for a
    position model."""
    if dims is None:
        zooms = ()
    elif zooms is None:
        zooms = zooms_for(images[0].image.shape)
    seen = _Features(torch.zeros(0, FEATURE_DIM), [],
                     {z: _Aligned({True: [], False: []}, []) for z in zooms},
                     sum(-(-g.image.shape[0] // FEATURE_STRIDE) * -(-g.image.shape[1] //
                         FEATURE_STRIDE) for g in images))
    per_cell_keep = min(1.0, CANDIDATES_MAX / max(seen.total_cells, 1))
    candidates: list[torch.Tensor] = []
    sources: list[np.ndarray] = []
    for k, image in enumerate(images):
        p = float(image.meta.get("pixel_size_um", pixel_size_um))
        image_border = not image.meta.get("cropped", False)  # a crop's border is no edge
        variants = variants_of(image, augmenting, rng, k, k in held_images)
        n_bank = sum(v.bank for v in variants)
        n_held = sum(v.held for v in variants)
        for v in variants:
            feat = features_of(v.image)
            for z, aligned in seen.position.items():
                fz = feat if z == 1.0 else features_of(zoomed(v.image, z))
                aligned.features[k in held_images].append(pooled(fz[None], dims)[0])
                if k in held_images:
                    aligned.held_descriptors.append(descriptor(fz[None])[0])
            usable = _usable_cells(v.usable, tuple(feat.shape[1:]))
            if k in held_images:
                if v.held:
                    seen.held.append(_HeldOut(feat, usable, float(usable.sum()) / n_held
                                              * (FEATURE_STRIDE * p) ** 2,
                                              edgeband.band(usable, image_border)))
                continue
            if not held_images:
                cand, cells, h, border = _split_image(feat, usable, p, k, image_border)
                if v.held:
                    h.area_um2 /= n_held
                    seen.held.append(h)
                    if border is not None:
                        seen.borders.append(border)
            else:
                cand, cells = feat.permute(1, 2, 0)[torch.from_numpy(usable)], np.argwhere(usable)
            if not v.bank:
                continue
            keep = per_cell_keep / n_bank
            if keep < 1.0 and len(cand):
                drawn = rng.random(len(cand)) < keep
                cand, cells = cand[torch.from_numpy(drawn)], cells[drawn]
            candidates.append(cand.reshape(-1, FEATURE_DIM))
            sources.append(np.column_stack([np.full(len(cells), k), cells]))
        if progress is not None:
            progress("features", k + 1, len(images))
    if candidates:
        seen.pool = torch.cat(candidates)
        seen.sources = np.concatenate(sources).astype(np.int64)
    if not len(seen.pool):
        raise InputError("--good: the good images hold no usable surface to build from")
    return seen


def _choose_bank(pool: torch.Tensor, n_cells: int, bank_max: int, start: torch.Tensor | None,
                 seed: int, progress: Progress | None
                 ) -> tuple[torch.Tensor, int, torch.Tensor]:
    """The memory bank (a greedy coreset of the candidates, a share of the cells the bank
    images hold), how many of its features come from the extended model's bank ``start``
    (they come first) and which candidates the others are.

    Extending adds what a model of the new images alone would hold, chosen after the old bank
    (what the old bank covers is taken last), so that a full bank still learns a new
    appearance: given no room, a model extended with one image of a new product kept the old
    bank alone, scored the whole product as far from it, and found 1 of its 21 defects. Past
    :data:`BANK_MAX_EXTENDED` the old features that the new ones repeat most are dropped.
    """
    size = int(min(bank_max, max(BANK_MIN, BANK_FRACTION * n_cells), len(pool)))
    if progress is not None:
        progress("bank", 0, 1)
    chosen = greedy_coreset(pool, size, start=start, seed=seed) if size else \
        torch.zeros(0, dtype=torch.long)
    bank = pool[chosen]
    kept = 0
    if start is not None:
        room = max(0, BANK_MAX_EXTENDED - len(bank))
        if len(start) > room:
            start = start[greedy_coreset(start, room, start=bank, seed=seed)]
        bank, kept = torch.cat([start, bank]), len(start)
    if progress is not None:
        progress("bank", 1, 1)
    return bank, kept, chosen


@dataclass
class _Calibrated:
    """The bank's calibration on the held-out surface."""

    result: Any  # models.thresholds.Calibration
    reference: float  # score_reference: the REFERENCE_QUANTILE of held-out distances
    tau: float  # uncertainty_log_scale
    values: np.ndarray  # held-out anomaly scores over the usable surface
    area_cm2: float
    line: float | None  # line threshold (models.lines; None: too little held-out area)
    distances: list[torch.Tensor]  # the held-out cells' nearest-bank distances (h, w)
    maps: list[np.ndarray]  # the held-out anomaly maps, 0 outside the usable area


def _calibrate(bank: torch.Tensor, held: list[_HeldOut], false_alarms_per_cm2: float,
               progress: Progress | None) -> _Calibrated:
    """Score the held-out surface as inspection would (at the output stride) and set the
    threshold for the false-alarm rate asked for, the score reference and the uncertainty's
    log scale (the spread of the highest good scores)."""
    detector = PatchDetector(bank, {"score_reference": 1.0})
    distances, masks = [], []
    for h in held:
        q = h.features.permute(1, 2, 0).reshape(-1, FEATURE_DIM)
        distances.append(detector.index.distances(q).view(h.features.shape[1:]))
        masks.append(h.usable)
    good = torch.cat([d[torch.from_numpy(m)] for d, m in zip(distances, masks, strict=True)])
    if not len(good):
        raise InputError("--good: no usable good surface left to calibrate on")
    reference = float(torch.quantile(good[torch.randperm(len(good))[:1_000_000]],
                                     REFERENCE_QUANTILE))
    reference = reference if reference > 0 else 1.0
    maps = []
    for d, m in zip(distances, masks, strict=True):
        a = detector.anomaly_from_distances(d[None] / reference, (2 * d.shape[0],
                                                                 2 * d.shape[1]))[0].numpy()
        a[~np.repeat(np.repeat(m, 2, 0), 2, 1)] = 0.0  # outside the usable area: not inspected
        maps.append(a)
    area_cm2 = sum(h.area_um2 for h in held) * 1e-8
    if progress is not None:
        progress("calibrate", 0, 1)
    cal = calibrate_threshold(maps, area_cm2, false_alarms_per_cm2, scores="distance",
                              max_over_empirical=MAX_OVER_HELD_OUT)
    values = np.concatenate([a[np.repeat(np.repeat(m, 2, 0), 2, 1)] for a, m in
                             zip(maps, masks, strict=True)])
    q99, q999 = np.quantile(values, [0.99, 0.999])
    tau = float(max(0.02, np.log(max(q999, 1e-6) / max(q99, 1e-6))))
    line = calibrate_line_threshold(maps, area_cm2, false_alarms_per_cm2, cal.threshold)
    return _Calibrated(cal, reference, tau, values, area_cm2, line, distances, maps)


def _threshold_of_init(base: PatchDetector | None, init: str | Path | None,
                       cal: _Calibrated) -> dict[str, Any] | None:
    """Keep an extended model's threshold at least its base's, in nearest-bank distance;
    what was kept (None: the new calibration stands, or there is no base).

    Only the new good images are held out, and their score reference rescales every score:
    a new appearance whose good cells lie closer together (a smoother surface) lowered the
    reference, so the base's own good surface, as near its (kept) bank as before, scored
    x1.12 higher, and a gravel model extended with a smoothed gravel flagged 12 false defects
    on 3.5 cm² of the old gravel where the base had flagged none. The extended bank holds
    the base's, so a distance threshold at least the base's keeps the base's calibrated rate
    on its good surface."""
    if base is None:
        return None
    ref, threshold = base.card.get("score_reference"), base.card.get("threshold")
    if not isinstance(ref, int | float) or not isinstance(threshold, int | float) or \
            not ref > 0 or not threshold > 0:
        return None
    floor = float(threshold) * float(ref) / cal.reference
    calibrated = float(cal.result.threshold)
    if floor <= calibrated:
        return None
    # the card's rate is the one at the threshold it keeps, not at the one it replaced
    count = count_components(cal.maps, floor, DEFECT_MERGE_MAP_PX)
    cal.result.threshold = floor
    cal.result.components_at_threshold = count
    cal.result.rate_at_threshold_per_cm2 = count / cal.area_cm2
    return {"threshold": floor, "calibrated_on_new_images": calibrated,
            "model_threshold": float(threshold), "model_score_reference": float(ref),
            "why": f"threshold {floor:.4g}, not the {calibrated:.4g} calibrated on the new "
                   f"images: --init {init}'s threshold ({float(threshold):.4g} of its score "
                   f"reference {float(ref):.4g}) on this model's scale, so that its good "
                   "surface flags no more than it did"}


def _edge_calibration(bank: torch.Tensor, sources: np.ndarray, cal: _Calibrated,
                      held: list[_HeldOut], borders: list[_Border]) -> dict[str, Any] | None:
    """The border band's calibration (:func:`models.edgeband.edge_factor`): held-out cells'
    scores on the border (held-out images' bands, and the held-out segments of images held
    out by their centre) against those inside (the rest of the held-out surface).

    A segment is scored against the bank without the features of its own image's cells near
    it (``_Border.zone``; ``sources``: the image, row and column of each bank feature, -1 for
    an extended model's), as if they had been held out as the central block is.
    """
    inside, edge = [], []
    for h, d in zip(held, cal.distances, strict=True):
        band = h.edge if h.edge is not None else np.zeros_like(h.usable)
        inside.append(d[torch.from_numpy(h.usable & ~band)])
        edge.append(d[torch.from_numpy(h.usable & band)])
    for k in sorted({b.image for b in borders}):
        of_k = [b for b in borders if b.image == k]
        mine = np.flatnonzero(sources[:, 0] == k)
        near = np.zeros(len(sources), dtype=bool)
        # the image's variants (shifted by half a cell) can have a row or column of cells
        # more than the one whose zone this is (an image 1178 px high: 148 against 147):
        # such a cell is taken as its neighbour within the zone's grid
        zone = of_k[0].zone
        near[mine] = zone[np.minimum(sources[mine, 1], zone.shape[0] - 1),
                          np.minimum(sources[mine, 2], zone.shape[1] - 1)]
        if near.all():
            continue
        scorer = BankIndex(bank[torch.from_numpy(~near)].contiguous())
        edge += [scorer.distances(b.features) for b in of_k]
    return edgeband.edge_factor(torch.cat(inside).numpy() / cal.reference,
                                torch.cat(edge).numpy() / cal.reference)


def _with_held_out(bank: torch.Tensor, held: list[_HeldOut], bank_max: int, seed: int
                   ) -> tuple[torch.Tensor, int]:
    """The bank grown by what the held-out surface shows that it does not, and how many
    features that added.

    Once it has served the calibration, the held-out surface joins the bank: the scores that
    set the threshold are added, so the final model knows all of the good surface and its
    threshold errs on the side of fewer false alarms."""
    held_cells = torch.cat([h.features.permute(1, 2, 0)[torch.from_numpy(h.usable)]
                            for h in held])
    if len(held_cells) > CANDIDATES_MAX:
        held_cells = held_cells[torch.randperm(len(held_cells))[:CANDIDATES_MAX]]
    extra = int(min(max(0, bank_max - len(bank)), BANK_FRACTION * len(held_cells)))
    if extra:
        bank = torch.cat([bank, held_cells[greedy_coreset(held_cells, extra, start=bank,
                                                          seed=seed)]])
    return bank, extra


def _companion(companion_from: str | Path | None, init: str | Path | None) -> Any:
    """The roughness network that goes beside the detector (None: roughness is NaN)."""
    from .modelfile import load_network

    try:
        return load_network(companion_from if companion_from is not None else init)[0]
    except InputError:
        return None


def variance_ratio(feats: torch.Tensor) -> float:
    """Mean per-position variance of features ``(N, D, h, w)`` over their total variance:
    near 0 for one part imaged again and again, near 1 where positions mean nothing."""
    f = feats.float()
    total = f.permute(1, 0, 2, 3).reshape(f.shape[1], -1).var(dim=1).mean()
    return float(f.var(dim=0).mean() / total.clamp_min(1e-12))


def _position_model(aligned: dict[float, _Aligned], dims: torch.Tensor,
                    shape: tuple[int, int], area_cm2: float, target_per_cm2: float,
                    threshold: float, base: PatchDetector | None = None
                    ) -> tuple[list[PositionModel] | None, dict[str, Any]]:
    """The position models of an aligned part (one per zoom), their mean map scaled so that
    the card's ``threshold`` gives the false-alarm rate asked for on the held-out images.

    Each held-out image's level comes from the *other* held-out images, as an unseen
    image's will. Extending ``base`` (a model of this part), its Gaussians and the new
    images' are pooled (:func:`merged_position_model`)."""
    train = torch.stack(aligned[1.0].features[False])
    ratio = variance_ratio(train)
    old = {m.zoom: m for m in (base.position or [])} if base is not None else {}
    n_old = int(((base.card.get("position_calibration") or {}).get("train_images")) or 0) \
        if old else 0
    if ratio >= ALIGNED_MAX_VARIANCE_RATIO and not old:
        return None, {"used": False, "variance_ratio": ratio,
                      "why": "the images are not aligned: features vary as much at one "
                             "position as across positions"}
    models, maps = [], []
    for zoom, seen in aligned.items():
        held = torch.stack(seen.features[True])
        desc = torch.stack(seen.held_descriptors)
        model = fit_position_model(torch.stack(seen.features[False]), held, desc, dims,
                                   tuple(shape), zoom)
        if zoom in old:
            # a card without its count of images: weighed as its held-out references
            n = n_old or len(old[zoom].ref_levels)
            model = merged_position_model(old[zoom], n, model, len(train))
            model.ref_levels[: len(held)] = top_level(model.distances_pooled(held))
        a16 = model.distances_pooled(held) / model.levels(desc, exclude_self=True)[:, None, None]
        maps.append(model.output_map(a16, OUTPUT_STRIDE))
        models.append(model)
    cal = calibrate_threshold(list(torch.stack(maps).mean(dim=0).numpy()), area_cm2,
                              target_per_cm2, scores="distance")
    for model in models:  # the mean of scaled maps is the scaled mean
        model.scale = float(threshold / max(cal.threshold, 1e-9))
    return models, {"used": True, "variance_ratio": ratio, **cal.to_dict(),
                    "scale": models[0].scale, "zooms": [m.zoom for m in models],
                    "train_images": len(train) + n_old, "held_out_images": len(maps[0]),
                    **({"from_init_images": n_old} if old else {})}


def _kept_position_model(base: PatchDetector, threshold: float
                         ) -> tuple[list[PositionModel], dict[str, Any], str]:
    """An extended model's position models kept as they were, when the new images cannot
    add to them (another shape, masks, too few to hold any out), rescaled to the new card's
    threshold (the same maps, the same false-alarm rate), and what the user is told."""
    ratio = threshold / max(float(base.threshold), 1e-9)
    kept = [dataclasses.replace(m, scale=m.scale * ratio) for m in base.position or []]
    shape = "x".join(str(v) for v in kept[0].image_shape)
    cal = dict(base.card.get("position_calibration") or {})
    cal.update(used=True, scale=kept[0].scale, kept_from_init=True)
    why = (f"the per-position model of the extended model (images of {shape} px) is kept as "
           "it was: the new images cannot add to it (give 8 or more unmasked images of "
           f"{shape} px); images of other sizes are scored by the memory bank")
    return kept, cal, why


def _calibration_warnings(cal: dict[str, Any], n_images: int, n_held_images: int) -> list[str]:
    """What the user should know about the calibration (too little held-out surface)."""
    out = []
    allowed = cal["target_per_cm2"] * cal["area_cm2"]
    if allowed < 1.0:
        out.append(f"held-out good area {cal['area_cm2']:.3g} cm² is less than the "
                   f"{1 / cal['target_per_cm2']:.3g} cm² in which one false alarm is allowed: "
                   "the threshold is extrapolated from the tail of good scores; add good "
                   "images for a measured one")
    tail = cal.get("tail_threshold")
    if tail is not None and tail > 1.001 * cal["threshold"]:
        # (a tail a hair above the bound read "extrapolated to 1.24, held to ...: 1.24")
        out.append(f"the tail of held-out scores extrapolated to {tail:.4g}, "
                   f"held to {MAX_OVER_HELD_OUT:g} x their highest peak "
                   f"({cal['empirical_threshold']:.4g}): {cal['threshold']:.4g}; the rate "
                   "asked for is not measured on so little surface")
    if n_held_images == 0:
        out.append(f"only {n_images} good image(s): the central quarter of each was held out for "
                   "calibration (give 8 or more good images to hold out whole ones)")
    return out


def held_out_map(detector: PatchDetector, image: GoodImage) -> np.ndarray:
    """The anomaly map inspection would give a good image: 0 outside its usable area."""
    # the image is relative reflectance already: its level is 1
    x = detector.normalize(image.image, 1.0)
    a = detector.predict_image_normalized(x)["anomaly"]
    if image.usable is not None:
        s = detector.output_stride
        u = np.asarray(image.usable, dtype=bool)[::s, ::s][: a.shape[0], : a.shape[1]]
        a = np.where(u, a, np.float32(0.0))
    return a


def calibrate_by_kind(detector: PatchDetector, images: Sequence[GoodImage],
                      false_alarms_per_cm2: float, pixel_size_um: float = 1.0,
                      progress: Progress | None = None) -> dict[str, dict[str, Any]]:
    """A threshold per sample kind, each on held-out good images of that kind only, and per
    band of pixel sizes where a kind's images span them.

    ``images`` carry their kind (``GoodImage.kind``) and pixel size (``meta``); their area is
    what they cover. Returns ``{kind: Calibration.to_dict()}``, each with ``pixel_bands``
    (:func:`calibrate_pixel_bands`; empty when the kind has none) and ``line``, the line
    evidence's threshold (:func:`models.lines.calibrate_line_threshold`; None: none).
    """
    held: dict[str, list[tuple[float, np.ndarray, float]]] = {}
    for k, image in enumerate(images):
        p = float(image.meta.get("pixel_size_um", pixel_size_um))
        usable = image.usable
        px = float(np.count_nonzero(usable)) if usable is not None else float(image.image.size)
        held.setdefault(image.kind, []).append(
            (p, held_out_map(detector, image), px * p * p * 1e-8))
        if progress is not None:
            progress("calibrate", k + 1, len(images))
    out = {}
    for kind, rows in held.items():
        maps, area = [m for _, m, _ in rows], sum(a for _, _, a in rows)
        cal = calibrate_threshold(maps, area, false_alarms_per_cm2, scores="distance")
        out[kind] = {**cal.to_dict(),
                     "good_scores": good_scores_below(maps, cal.threshold),
                     "pixel_bands": calibrate_pixel_bands(rows, false_alarms_per_cm2),
                     "line": calibrate_line_threshold(maps, area, false_alarms_per_cm2,
                                                      cal.threshold)}
    return out


def good_scores_below(maps: Sequence[np.ndarray], threshold: float) -> dict[str, Any]:
    """:func:`models.drift.score_summary` of held-out maps as an inspected scan records its
    own (``scanner.inspection.drift.good_surface_scores``): the surface scored (not 0) and
    below the threshold. Per kind and pixel band, since their scores differ as their
    thresholds do: a rough coupon's fresh scan scored x0.71 the pooled calibration's, and
    drift said "DRIFT" on the first scan of an unchanged product."""
    values = np.concatenate([np.asarray(m, dtype=np.float32).ravel() for m in maps])
    return score_summary(values[(values != 0) & (values < threshold)])


def calibrate_pixel_bands(held: Sequence[tuple[float, np.ndarray, float]],
                          false_alarms_per_cm2: float) -> list[dict[str, Any]]:
    """Thresholds of one kind per band of pixel sizes (card ``thresholds_by_pixel_size``).

    ``held``: ``(pixel size um, anomaly map, area cm2)`` of each held-out image. One
    threshold for a kind holds the rate over all its area, which the coarse pixels hold most
    of (a 1024 px window at 40 um is 16.8 cm², at 8 um 0.7 cm²), while a map pixel of a fine
    pixel size covers less of the sample: the same scores give more false alarms per cm².
    The default's PV-cell threshold, 0.941 over 8-38 um, is 1.04 on its 8-13.5 um windows
    and 0.913 on its 22.6-38 um ones; at 0.941 the benchmark's PV cells at 30 um had 0.13
    false defects per cm² and 10 of 15 defects found, at 0.91 0.30 and 13. Empty when the
    sizes span less than 1.5 x or a band would hold under :data:`MIN_BAND_AREA_CM2`.
    """
    sizes = np.array([p for p, _, _ in held])
    if len(sizes) == 0 or sizes.max() < 1.5 * sizes.min():
        return []
    edges, band_of = pixel_bands(sizes, PIXEL_BANDS)
    bands = []
    for b in range(PIXEL_BANDS):
        rows = [h for h, k in zip(held, band_of, strict=True) if k == b]
        area = sum(a for _, _, a in rows)
        if area < MIN_BAND_AREA_CM2:
            return []
        maps = [m for _, m, _ in rows]
        cal = calibrate_threshold(maps, area, false_alarms_per_cm2, scores="distance")
        bands.append({"pixel_size_um": [round(float(edges[b]), 3), round(float(edges[b + 1]), 3)],
                      "threshold": float(cal.threshold), "area_cm2": round(area, 2),
                      "good_scores": good_scores_below(maps, cal.threshold),
                      "extrapolated": cal.extrapolated,
                      "line": calibrate_line_threshold(maps, area, false_alarms_per_cm2,
                                                       cal.threshold)})
    return bands
