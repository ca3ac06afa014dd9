"""Calibration of a trained network's card on held-out good images.

The pooled threshold and one per sample kind, the neighbourhood-context thresholds, the
thresholds per band of pixel sizes and the review level of a defect's uncertainty, each to
the false-alarm rate asked for (:mod:`models.thresholds` does the counting):
:func:`calibrate_card` for :func:`models.train.train_model`, :func:`recalibrate` for a trained
model's card.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .data import PIXEL_RANGES_UM, GoodImage, simulated_good_images
from .modelfile import InspectionModel, card_path_for, load_model
from .network import OUTPUT_STRIDE
from .synth import add_anomalies
from .thresholds import (
    CONTEXT_CARD_KEYS,
    MIN_BAND_AREA_CM2,
    PIXEL_BANDS,
    Calibration,
    calibrate_contexts_on,
    calibrate_threshold,
    kind_contexts,
    map_resolution,
    pixel_bands,
    review_level,
)

#: ``progress(stage, done, total, info)``: the progress callback of training and calibration
Progress = Callable[[str, int, int, dict], None]


def held_out_maps(
    model: InspectionModel, held_out: Sequence[GoodImage], notify: Progress | None = None,
) -> list[dict[str, np.ndarray]]:
    """The model's maps of held-out good images (up to 2048 x 2048 px of each)."""
    maps = []
    for i, g in enumerate(held_out):
        maps.append(model.predict_image(g.image[:2048, :2048]))
        if notify:
            notify("calibrate", i + 1, len(held_out), {})
    return maps


def calibrate_on(
    model: InspectionModel,
    held_out: Sequence[GoodImage],
    pixel_size_um: float,
    false_alarms_per_cm2: float,
    notify: Progress | None = None,
    maps: Sequence[dict[str, np.ndarray]] | None = None,
) -> Calibration:
    """Calibrate a model's threshold on held-out good images (up to 2048 x 2048 px of each).

    ``pixel_size_um`` is the pixel size of images whose ``meta`` does not give one; ``maps``
    are the model's maps of ``held_out`` when already computed (:func:`held_out_maps`).
    """
    if maps is None:
        maps = held_out_maps(model, held_out, notify)
    return calibrate_threshold([m["anomaly"] for m in maps],
                               held_out_area_cm2(held_out, pixel_size_um), false_alarms_per_cm2)


def held_out_area_cm2(held_out: Sequence[GoodImage], pixel_size_um: float) -> float:
    """Sample area (cm²) the maps of :func:`held_out_maps` cover (up to 2048 x 2048 px each).

    ``pixel_size_um`` is the pixel size of images whose ``meta`` does not give one.
    """
    return sum(g.image[:2048, :2048].size * g.meta.get("pixel_size_um", pixel_size_um) ** 2
               for g in held_out) / 1e8


def _indices_by_kind(held_out: Sequence[GoodImage]) -> dict[str, list[int]]:
    """Indices of the simulated held-out images of each recipe sample kind (:data:`SAMPLE_KIND`)."""
    return {SAMPLE_KIND[kind]: [i for i, g in enumerate(held_out) if g.kind == kind]
            for kind in sorted({g.kind for g in held_out} & set(SAMPLE_KIND))}


#: recipe sample kind of each simulated kind (``scanner.recipe``: plain rough surfaces are
#: imaged as rectangle coupons)
SAMPLE_KIND = {"wafer": "wafer", "pv_cell": "pv_cell", "rough": "rectangle"}


def calibrate_by_kind(
    model: InspectionModel,
    held_out: Sequence[GoodImage],
    maps: Sequence[dict[str, np.ndarray]],
    pixel_size_um: float,
    false_alarms_per_cm2: float,
) -> dict[str, Calibration]:
    """One calibration per recipe sample kind of simulated held-out images.

    A pooled calibration counts false alarms over the pooled area, and the kinds differ in
    both: PV-cell windows at 30 µm pixels hold 36 times the area of wafer windows at 5 µm,
    so the pooled threshold let wafers have several false defects per cm² while PV cells had
    a twentieth of one. Calibrating each kind on its own held-out images gives every kind
    the asked-for rate. User images (kind ``"user"``) get no entry: their pooled threshold is
    their own.
    """
    return {kind: calibrate_on(model, [held_out[i] for i in idx], pixel_size_um,
                               false_alarms_per_cm2, maps=[maps[i] for i in idx])
            for kind, idx in _indices_by_kind(held_out).items()}


def inspected_anomaly(image: GoodImage, anomaly: np.ndarray, stride: int = OUTPUT_STRIDE,
                      edge_px: int = 2) -> np.ndarray:
    """A held-out anomaly map as inspection of a scan would see it: 0 outside the sample.

    Inspection masks a scan to the sample's usable area, eroded by two map pixels
    (``scanner.inspection.maps.infer_mosaic``), and the quiet and plain masks count that border as
    busy; the chuck or background of an edge window must not count as plain area that cannot
    hold a false alarm.
    """
    if image.usable is None:
        return anomaly
    from scipy import ndimage

    inside = map_resolution(image.usable[:2048, :2048].astype(np.float32), stride,
                            anomaly.shape) > 0.5
    inside = ndimage.binary_erosion(inside, iterations=edge_px)
    return np.where(inside, anomaly, 0.0).astype(np.float32)


def calibrate_contexts(
    held_out: Sequence[GoodImage],
    maps: Sequence[dict[str, np.ndarray]],
    pixel_size_um: float,
    false_alarms_per_cm2: float,
    thresholds_by_kind: dict[str, float],
    default: float,
) -> dict[str, dict[str, Calibration]]:
    """The thresholds of each neighbourhood context per recipe sample kind (``{"quiet": ...,
    "plain": ..., "plain_near_structure": ...}``).

    :func:`models.thresholds.calibrate_contexts_on` each kind's held-out maps as inspection
    sees them (:func:`inspected_anomaly`). Each is kept only below the one it refines
    (:data:`CONTEXT_REFINES`; the kind's threshold where that one was not kept): quiet and
    plain near structure below the kind's threshold (``thresholds_by_kind``, else
    ``default``: the pooled one), plain below the kind's quiet threshold; kinds with too
    little area of a context in their held-out images get no entry for it, and each kind
    only its own contexts (:func:`models.thresholds.kind_contexts`).
    """
    out: dict[str, dict[str, Calibration]] = {context: {} for context in CONTEXT_CARD_KEYS}
    for kind, idx in _indices_by_kind(held_out).items():
        areas = [held_out_area_cm2([held_out[i]], pixel_size_um) for i in idx]
        amaps = [inspected_anomaly(held_out[i], maps[i]["anomaly"]) for i in idx]
        images = [map_resolution(held_out[i].image[:2048, :2048], OUTPUT_STRIDE, a.shape)
                  for i, a in zip(idx, amaps, strict=True)]
        cals = calibrate_contexts_on(amaps, images, areas, false_alarms_per_cm2,
                                     contexts=kind_contexts(kind))
        ceiling = {"kind": thresholds_by_kind.get(kind, default)}
        for context, refines in CONTEXT_REFINES.items():
            cal = cals.get(context)
            if cal is not None and cal.threshold < ceiling.get(refines, ceiling["kind"]):
                out[context][kind] = cal
                ceiling[context] = cal.threshold
    return out


#: the context (or the kind's own threshold) each context's threshold must stay below:
#: plain areas are quiet ones, plain ones near structure need not be
CONTEXT_REFINES = {"quiet": "kind", "plain": "quiet", "plain_near_structure": "kind"}


def calibrate_pixel_bands(
    held_out: Sequence[GoodImage],
    maps: Sequence[dict[str, np.ndarray]],
    pixel_size_um: float,
    false_alarms_per_cm2: float,
    model: InspectionModel,
    floors: dict[str, dict[str, float]],
) -> dict[str, list[dict[str, Any]]]:
    """Thresholds of each kind per band of pixel sizes (card ``thresholds_by_pixel_size``).

    A kind's threshold holds the asked-for rate per cm² over all its held-out area, and the
    windows at coarse pixels hold most of it (a 1024 px PV window at 40 µm is 16 cm², at
    8 µm 0.7 cm²), while a finer pixel puts more of the network's false alarms in each cm²:
    defect-free PV cells inspected at 10 µm had 3.5-4.3 false defects per cm² at the pooled
    PV threshold, at 30 µm 0.56. Each band gets the kind's threshold and its context
    thresholds (:func:`calibrate_contexts`) from its own windows; inspection takes the band of
    the scan's pixel size. ``{kind: [{"pixel_size_um": [lo, hi], "threshold": t, "quiet": t,
    ...}, ...]}``; kinds whose bands would rest on too little area
    (:data:`MIN_BAND_AREA_CM2`) get none and keep their one threshold.

    A band only raises its kind's thresholds (``floors``: ``{kind: {"threshold": t,
    "quiet": t, ...}}``, the kind's own), never lowers them, and has only the contexts its
    kind has. Each context holds the rate on its own area, so the rates of a scan's contexts
    add up; a band's own lower threshold, right for its context alone, let whole scans
    exceed the target: the 23-40 µm PV band's own quiet threshold (0.23 against the kind's
    0.29) put defect-free PV cells at 30 µm at 1.2 false defects per cm² instead of 0.5,
    the benchmark's at 1.5-1.6 instead of 0.9-1.0.
    """
    out: dict[str, list[dict[str, Any]]] = {}
    for kind, idx in _indices_by_kind(held_out).items():
        sizes = np.array([float(held_out[i].meta.get("pixel_size_um", pixel_size_um))
                          for i in idx])
        if sizes.max() <= sizes.min() * 1.01:
            continue  # one pixel size: nothing to band
        edges, band_of = pixel_bands(sizes, PIXEL_BANDS)
        bands = []
        for b in range(PIXEL_BANDS):
            band = [i for i, k in zip(idx, band_of, strict=True) if k == b]
            whole = [i for i in band if not held_out[i].meta.get("edge")]
            area = held_out_area_cm2([held_out[i] for i in whole], pixel_size_um)
            if area < MIN_BAND_AREA_CM2:
                bands = []
                break
            cal = calibrate_on(model, [held_out[i] for i in whole], pixel_size_um,
                               false_alarms_per_cm2, maps=[maps[i] for i in whole])
            contexts = calibrate_contexts([held_out[i] for i in band], [maps[i] for i in band],
                                          pixel_size_um, false_alarms_per_cm2,
                                          {kind: cal.threshold}, cal.threshold)
            floor = floors.get(kind, {})
            own = {c: v[kind].threshold for c, v in contexts.items() if kind in v}
            bands.append({"pixel_size_um": [round(float(edges[b]), 3),
                                             round(float(edges[b + 1]), 3)],
                          "threshold": max(cal.threshold, floor.get("threshold", 0.0)),
                          "area_cm2": round(area, 2),
                          **{c: max(own.get(c, t), t) for c, t in floor.items()
                             if c != "threshold"}})
        if bands:
            out[kind] = bands
    return out


def recalibrate(model_path: str | Path, n_per_kind: int, seed: int,
                false_alarms_per_cm2: float = 1.0, contexts_only: bool = False,
                ) -> dict[str, Any]:
    """Calibrate a trained model's card again on new simulated held-out images.

    ``n_per_kind`` new 1024 px windows of each kind (seed ``seed``: one never used in the
    model's training). The pooled and per-kind thresholds and the review level come from the
    windows wholly on the sample (as in training); the quiet and plain thresholds from all of
    them, windows over a sample's edge masked to its usable area as inspection masks a scan
    (:func:`inspected_anomaly`): plain area lies mostly at a wafer's rim, and without those
    windows a wafer's plain threshold rested on 1.8 cm² instead of 4.4. With ``contexts_only``
    only the context thresholds per kind are written (the per-kind ones and the bands of
    pixel sizes kept as they are: run it without to renew the bands too). Returns the card's
    new entries.
    """
    model = load_model(model_path)
    ranges = PIXEL_RANGES_UM if model.card.get("pixel_size_range_um") else None
    pixel_size_um = float(model.pixel_size_um)
    images = simulated_calibration_images(n_per_kind, pixel_size_um, seed, ranges)
    maps = held_out_maps(model, images)
    held = (f"simulated, {n_per_kind} images per kind, seed {seed} "
            f"(models.train.simulated_calibration_images)")
    path = card_path_for(Path(model.path))
    card = json.loads(path.read_text(encoding="utf-8"))
    if contexts_only:
        cals = calibrate_contexts(images, maps, pixel_size_um, false_alarms_per_cm2,
                                  card.get("thresholds_by_sample_kind") or {},
                                  float(card["threshold"]))
        new, records = _context_entries(cals, held)
        card.setdefault("calibration", {}).update(records)
    else:
        new = calibrate_card(model, images, pixel_size_um, false_alarms_per_cm2, "simulated",
                             seed, maps=maps)
        new["calibration"]["held_out"] = held
        card.setdefault("uncertainty", {})["review"] = new.pop("review")
        # entries calibrate_card leaves out when it finds none must not survive from before
        for key in ("thresholds_by_sample_kind", "thresholds_by_pixel_size",
                    "review_uncertainty", *CONTEXT_CARD_KEYS.values()):
            card.pop(key, None)
    card.update(new)
    path.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return new


def simulated_calibration_images(n_per_kind: int, pixel_size_um: float, seed: int,
                                 ranges: dict[str, tuple[float, float]] | None,
                                 size: int = 1024) -> list[GoodImage]:
    """Held-out simulated windows for calibration only: ``n_per_kind`` of each kind.

    Larger than the validation windows: a wafer window of 512 x 512 px at 2 µm is 0.01 cm²,
    and a per-kind rate of 1 per cm² needs a few cm² of each kind to count on.
    """
    kinds = tuple(SAMPLE_KIND)
    return simulated_good_images(n_per_kind * len(kinds), size, pixel_size_um,
                                 seed + 2_000_003, kinds=kinds, pixel_ranges_um=ranges)


def calibrate_card(
    model: InspectionModel,
    held_out: Sequence[GoodImage],
    pixel_size_um: float,
    false_alarms_per_cm2: float,
    source: str,
    seed: int,
    notify: Progress | None = None,
    maps: Sequence[dict[str, np.ndarray]] | None = None,
) -> dict[str, Any]:
    """Everything a card says about calibration, from held-out good images.

    The pooled threshold, one per sample kind of simulated held-out images
    (:func:`calibrate_by_kind`; not for ``source == "user"``), and the review level of a
    defect's uncertainty (:func:`calibrate_review`). Returns the card's ``threshold``,
    ``calibration``, ``thresholds_by_sample_kind``, ``review_uncertainty`` (when found) and
    ``review`` (the review calibration's summary, for the card's uncertainty section).
    ``maps`` are the model's maps of ``held_out`` when already computed.

    Simulated windows over a sample's edge (``meta["edge"]``: wafer rim and chuck, cell
    border) count for the quiet and plain thresholds only, masked to the sample's usable area
    as inspection masks a scan (:func:`calibrate_contexts`): plain area lies mostly near a
    wafer's rim (without them a wafer's plain threshold rested on 1.8 cm² of 384 windows
    instead of 4.4). The other calibrations count whole-image areas, so they use the windows
    wholly on the sample.
    """
    if maps is None:
        maps = held_out_maps(model, held_out, notify)
    all_images, all_maps = held_out, maps
    whole = [i for i, g in enumerate(held_out) if not g.meta.get("edge")] or list(
        range(len(held_out)))
    held_out, maps = [held_out[i] for i in whole], [maps[i] for i in whole]
    cal = calibrate_on(model, held_out, pixel_size_um, false_alarms_per_cm2, maps=maps)
    by_kind = (calibrate_by_kind(model, held_out, maps, pixel_size_um, false_alarms_per_cm2)
               if source != "user" else {})
    contexts = (calibrate_contexts(all_images, all_maps, pixel_size_um, false_alarms_per_cm2,
                                   {k: c.threshold for k, c in by_kind.items()}, cal.threshold)
                if source != "user" else {})
    floors = {kind: {"threshold": c.threshold,
                     **{context: cals[kind].threshold for context, cals in contexts.items()
                        if kind in cals}}
              for kind, c in by_kind.items()}
    bands = (calibrate_pixel_bands(all_images, all_maps, pixel_size_um, false_alarms_per_cm2,
                                   model, floors) if source != "user" else {})
    review = calibrate_review(model, held_out, maps, cal.threshold,
                              np.random.default_rng(seed + 11))
    thresholds, records = _context_entries(contexts)
    out: dict[str, Any] = {
        "threshold": cal.threshold,
        "calibration": {**cal.to_dict(), "held_out": source,
                        "held_out_images": len(held_out),
                        "by_sample_kind": {k: c.to_dict() for k, c in by_kind.items()},
                        **records},
        "review": review,
    }
    if by_kind:
        out["thresholds_by_sample_kind"] = {k: c.threshold for k, c in by_kind.items()}
    if bands:
        out["thresholds_by_pixel_size"] = bands
    out.update({key: t for key, t in thresholds.items() if t})
    if review["review_uncertainty"] is not None:
        out["review_uncertainty"] = review["review_uncertainty"]
    return out


def _context_entries(contexts: dict[str, dict[str, Calibration]], held_out: str | None = None
                     ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, Any]]]:
    """A card's entries for context calibrations (:func:`calibrate_contexts`): the thresholds
    under :data:`CONTEXT_CARD_KEYS` and the records for its ``calibration`` section
    (``quiet_by_sample_kind``, ...), each noting ``held_out`` when given."""
    note = {"held_out": held_out} if held_out else {}
    thresholds = {CONTEXT_CARD_KEYS[context]: {k: c.threshold for k, c in cals.items()}
                  for context, cals in contexts.items()}
    records = {f"{context}_by_sample_kind": {**{k: c.to_dict() for k, c in cals.items()},
                                             **note}
               for context, cals in contexts.items()}
    return thresholds, records


@dataclass
class _MapDefect:
    """A defect of one image's maps: its box (image pixels) and uncertainty at its peak."""

    bbox_um: tuple[float, float, float, float]
    uncertainty: float


def _defects_of(maps: dict[str, np.ndarray], threshold: float) -> list[_MapDefect]:
    """Defects of one image's maps as inspection groups them (``scanner.inspection.defects``: the
    hysteresis extent halfway from the map's median to the threshold, fragments closer than
    the merge distance joined), with boxes in image pixels."""
    from scipy import ndimage

    from .thresholds import DEFECT_MERGE_MAP_PX, label_defects

    a = np.asarray(maps["anomaly"], dtype=np.float32)
    high = a > threshold
    if not high.any():
        return []
    low = a > 0.5 * (float(np.median(a)) + threshold)
    labels = label_defects(low, high, DEFECT_MERGE_MAP_PX)
    s = OUTPUT_STRIDE
    out = []
    for k, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        region = np.where(labels[sl] == k, a[sl], -np.inf)
        peak = np.unravel_index(int(np.argmax(region)), region.shape)
        unc = float(np.asarray(maps["uncertainty"])[sl][peak])
        out.append(_MapDefect((sl[1].start * s, sl[0].start * s, sl[1].stop * s - 1,
                               sl[0].stop * s - 1), unc))
    return out


def calibrate_review(
    model: InspectionModel,
    held_out: Sequence[GoodImage],
    good_maps: Sequence[dict[str, np.ndarray]],
    threshold: float,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """The review level of a defect's uncertainty, from held-out data.

    False defects: every defect on the held-out good images, and defects off the painted
    anomalies on the same images with synthetic anomalies added; true defects: those on a
    painted anomaly. The level best separates the two (:func:`models.thresholds.review_level`).
    """
    false_u = [d.uncertainty for m in good_maps for d in _defects_of(m, threshold)]
    true_u: list[float] = []
    for g in held_out:
        image, target = add_anomalies(g.image[:1024, :1024], rng)
        for d in _defects_of(model.predict_image(image), threshold):
            x0, y0, x1, y1 = (int(round(v)) for v in d.bbox_um)
            pad = OUTPUT_STRIDE
            hit = target[max(y0 - pad, 0):y1 + pad + 1, max(x0 - pad, 0):x1 + pad + 1].any()
            (true_u if hit else false_u).append(d.uncertainty)
    level = review_level(false_u, true_u)

    def share(u: list[float]) -> float | None:
        return None if level is None else round(float(np.mean(np.asarray(u) >= level)), 3)

    return {"review_uncertainty": level, "false_defects": len(false_u),
            "true_defects": len(true_u), "false_flagged": share(false_u),
            "true_flagged": share(true_u)}
