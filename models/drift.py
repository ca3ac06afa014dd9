"""The distribution of anomaly scores on good surface, and whether recent scans drifted from it.

A model card records the scores of the held-out good surface it was calibrated on
(``good_scores``); every inspected scan records the scores of its own surface that was not
flagged (``scan.json`` -> ``inspection.good_scores``). A process that drifts (a new resist, a
worn polishing pad, another camera gain) shows up as good surface scoring higher than the
calibration's before defects are missed or invented.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, FiniteFloat

#: quantiles recorded of the good-surface scores
QUANTILES = (0.5, 0.9, 0.99, 0.999)
#: a scan drifted when the median of its good-surface score quantiles, relative to the
#: calibration's, moved by more than this factor (the 99th percentile of good scores moves by
#: a few per cent between good scans of one product; see docs/model.md)
DRIFT_FACTOR = 1.25


def score_summary(values: np.ndarray) -> dict[str, Any]:
    """Quantiles, mean and count of good-surface anomaly scores (finite values only)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if not v.size:
        return {"n": 0}
    q = np.quantile(v, QUANTILES)
    return {"n": int(v.size), "mean": float(v.mean()),
            **{f"q{100 * k:g}": float(x) for k, x in zip(QUANTILES, q, strict=True)}}


class GoodScores(BaseModel):
    """The record :func:`score_summary` writes (in a card and in ``scan.json``): what is read
    back is checked against it, so a damaged record is refused, never compared."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    n: int = Field(ge=0)
    mean: FiniteFloat | None = None
    q50: FiniteFloat | None = None
    q90: FiniteFloat | None = None
    q99: FiniteFloat | None = None
    q99_9: FiniteFloat | None = Field(None, alias="q99.9")


def drift_ratios(reference: dict[str, Any], scan: dict[str, Any]) -> dict[str, float]:
    """Each recorded quantile of a scan divided by the reference's (missing ones left out)."""
    out = {}
    for key, ref in reference.items():
        if key.startswith("q") and key in scan and ref and ref > 0:
            out[key] = float(scan[key]) / float(ref)
    return out


def drift_verdict(reference: dict[str, Any], scans: Sequence[dict[str, Any]],
                  factor: float = DRIFT_FACTOR) -> tuple[bool, float]:
    """Whether the scans' good-surface scores moved beyond the calibration's, and by what.

    The move is the median over scans of the median over quantiles of the ratio scan /
    reference (1: no change); drift when it is above ``factor`` or below ``1 / factor``.
    """
    moves = [float(np.median(list(r.values()))) for r in
             (drift_ratios(reference, s) for s in scans) if r]
    if not moves:
        return False, float("nan")
    move = float(np.median(moves))
    return bool(move > factor or move < 1.0 / factor), move
