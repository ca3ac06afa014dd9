"""The inspection model and what its card says: which model, which threshold for which
sample, and the defect list of maps at those thresholds.

A card may hold one threshold per recipe sample kind (``thresholds_by_sample_kind``), per
band of pixel sizes (``thresholds_by_pixel_size``) and per neighbourhood context (quiet,
plain, plain near structure); the user's ``--threshold`` overrides them all.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from models.card import card_of
from scanner.defectlist import Defect
from scanner.inspection.defects import (
    DEFAULT_REVIEW_UNCERTAINTY,
    MapGeometry,
    extract_defects,
    local_thresholds,
)
from scanner.inspection.maps import MapSet, reflectance_at_map
from scanner.inspection.tiled import Model

log = logging.getLogger("waferscope.inspect")

#: what a command is given as its model: a loaded one (:class:`scanner.inspection.tiled.Model`),
#: the path of one, or None for the shipped default (:func:`load_inspection_model` resolves it)
ModelRef = Model | str | Path | None


def load_inspection_model(model: ModelRef = None) -> Model:
    """The model to use: an already loaded one, a path, or None for the shipped default."""
    if model is not None and hasattr(model, "predict"):
        return model
    from models import load_model

    return load_model(model)


def model_info(model: Model) -> dict[str, Any]:
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
        "thresholds_by_sample_kind": dict(card_of(model).thresholds_by_sample_kind),
    }
    if not info["weights_sha256"] and path and Path(path).is_file():
        info["weights_sha256"] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return info


def card_threshold(model: Model, sample_kind: str | None = None,
                   pixel_size_um: float | None = None) -> tuple[float, str]:
    """The model's calibrated threshold for a kind of sample, and where it comes from.

    A card may hold one threshold per recipe sample kind (``thresholds_by_sample_kind``,
    each calibrated on held-out images of that kind), and for some kinds one per band of
    pixel sizes (taken when the pixel size is known); any other kind, or none known (plain
    images), gets the pooled ``threshold`` (:meth:`models.card.ModelCard.threshold_for`).
    """
    return card_of(model).threshold_for(sample_kind, pixel_size_um, model.threshold)


def _decision_threshold(model: Model, threshold: float | None, sample_kind: str | None,
                        pixel_size_um: float | None = None) -> tuple[float, str]:
    """The user's threshold when given, else the card's for the kind (:func:`card_threshold`).

    A detector's uncertainty map is centred on it (``decision_threshold``): a defect just over
    the threshold applied is the uncertain one, not one near the card's pooled threshold.
    """
    why = card_of(model).pixel_size_warning(None if threshold is not None else sample_kind,
                                            pixel_size_um)
    if why:  # the result is still given: the user may know better (a rebuilt model is theirs)
        log.warning("%s", why)
    thr, source = ((float(threshold), "user") if threshold is not None
                   else card_threshold(model, sample_kind, pixel_size_um))
    if hasattr(model, "decision_threshold"):
        model.decision_threshold = thr
    return thr, source


def evidence_threshold(model: Model, threshold: float, threshold_source: str,
                       sample_kind: str | None, pixel_size_um: float | None = None) -> float:
    """The anomaly-map score that die-to-die, golden-image and plain-surface evidence puts its
    own threshold at: the card's threshold for the kind, also when the user gave
    ``--threshold``, so that the user's threshold cuts that evidence as it cuts the model's
    map. Put at the user's threshold, every difference the comparison finds passed any
    threshold: a die-to-die wafer gave the same defects at ``--threshold 3`` and ``1e30``,
    their scores only rescaled."""
    if threshold_source != "user":
        return threshold
    return card_threshold(model, sample_kind, pixel_size_um)[0]


def context_thresholds(model: Model, sample_kind: str | None, threshold_source: str,
                       pixel_size_um: float | None = None) -> dict[str, float | None]:
    """The card's thresholds beside the decision threshold, for a kind of sample.

    ``{"quiet": t, "plain": t, "plain_near_structure": t, "line": t}``: the neighbourhood
    contexts' (:meth:`models.card.ModelCard.context_thresholds`) and the line evidence's
    (:meth:`models.card.ModelCard.line_threshold_for`), None where none applies: the card
    has none for the kind, or the user set the threshold (a user's threshold applies
    everywhere). A kind calibrated per band of pixel sizes takes its band's.
    """
    card = card_of(model)
    return {**card.context_thresholds(sample_kind, threshold_source, pixel_size_um),
            "line": card.line_threshold_for(sample_kind, threshold_source, pixel_size_um)}


def threshold_record(thr: float, source: str, contexts: dict[str, float | None]
                     ) -> dict[str, Any]:
    """The thresholds a defect list's header records (``contexts``: :func:`context_thresholds`)."""
    return {"threshold": thr, "threshold_source": source,
            "threshold_quiet": contexts["quiet"], "threshold_plain": contexts["plain"],
            "threshold_plain_near_structure": contexts["plain_near_structure"],
            "threshold_line": contexts["line"]}


def _review_level(model: Model) -> float:
    card = getattr(model, "card", {}) or {}
    return float(card.get("review_uncertainty", DEFAULT_REVIEW_UNCERTAINTY))


def _local_threshold(maps: MapSet, threshold: float, contexts: dict[str, float | None],
                     reflectance: np.ndarray | None = None) -> np.ndarray | None:
    """Per map pixel threshold of :func:`scanner.inspection.defects.local_thresholds` (None:
    uniform).

    ``reflectance``: the input at map resolution when already computed."""
    from models.thresholds import CONTEXT_CARD_KEYS, IMAGE_CONTEXTS, context_masks

    lower = {k: v for k, v in contexts.items()
             if k in CONTEXT_CARD_KEYS and v is not None and v < threshold}
    if not lower:
        return None

    anomaly = np.asarray(maps.maps["anomaly"][:])
    needs_image = any(context in lower for context in IMAGE_CONTEXTS)
    if needs_image and reflectance is None:
        reflectance = reflectance_at_map(maps)
    masks = context_masks(anomaly, reflectance if needs_image else None)
    return local_thresholds(threshold, [(masks[k], v) for k, v in lower.items()],
                            anomaly.shape)


def _defects_from(maps: MapSet, model: Model, threshold: float, level: float,
                  contexts: dict[str, float | None] | None = None,
                  reflectance: np.ndarray | None = None,
                  difference: Callable[[int, int, int, int],
                                       tuple[np.ndarray, np.ndarray] | None] | None = None,
                  dies: tuple[np.ndarray, np.ndarray] | None = None,
                  ) -> list[Defect]:
    """The defect list of refined maps. ``difference``: the die-to-die difference image of a
    mosaic window and its z-scores (None outside the compared dies; see ``extract_defects``
    and ``scanner.inspection.dietodie.Comparison.difference``); ``dies``: the map pixels of
    the dies compared and those of them that the neighbouring dies repeat."""
    from models.modelfile import to_luminance

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
                           line_threshold=(contexts or {}).get("line"),
                           difference=relative_difference if difference is not None else None,
                           dies=dies)
