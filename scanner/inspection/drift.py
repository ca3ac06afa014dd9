"""Drift of a production process, seen in the anomaly scores of surface nobody flagged.

Inspection records, in ``scan.json`` (``inspection.good_scores``), the quantiles of the
anomaly map over the inspected surface below the decision threshold
(:func:`good_surface_scores`). ``waferscope drift SCAN... --model M`` compares them with the
good scores the model was calibrated on (its card's ``good_scores``), scan by scan, draws the
ratios, and gives a one-line verdict (:func:`models.drift.drift_verdict`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import ValidationError

from models.drift import DRIFT_FACTOR, GoodScores, drift_ratios, drift_verdict, score_summary
from scanner.errors import UserError
from scanner.recipe import format_validation_error
from scanner.scanfolder import SCAN_JSON, read_scan_json

if TYPE_CHECKING:
    from scanner.inspection.tiled import Model

#: windows read from a map for its good-surface scores (a grid of them, whatever its size)
GRID = 16
WINDOW = 64


def good_surface_scores(anomaly: Any, threshold: float) -> dict[str, Any]:
    """Quantiles of an anomaly map over the inspected surface that was not flagged.

    A grid of :data:`GRID` x :data:`GRID` windows of :data:`WINDOW` map pixels is read (a few
    chunks, whatever the map's size); pixels outside the inspected area (exactly 0) and at or
    above ``threshold`` are left out.
    """
    h, w = (int(n) for n in anomaly.shape)
    if h * w <= (GRID * WINDOW) ** 2:
        values = np.asarray(anomaly[...], dtype=np.float32).ravel()
    else:
        rows = np.unique(np.concatenate([np.arange(WINDOW) + max(0, min(h - WINDOW, int(
            (i + 0.5) * h / GRID) - WINDOW // 2)) for i in range(GRID)]))
        cols = np.unique(np.concatenate([np.arange(WINDOW) + max(0, min(w - WINDOW, int(
            (j + 0.5) * w / GRID) - WINDOW // 2)) for j in range(GRID)]))
        block = anomaly.oindex[rows, cols] if hasattr(anomaly, "oindex") else \
            np.asarray(anomaly)[np.ix_(rows, cols)]
        values = np.asarray(block, dtype=np.float32).ravel()
    values = values[(values != 0) & np.isfinite(values) & (values < threshold)]
    return score_summary(values)


@dataclass
class DriftReport:
    """The verdict of :func:`check_drift` and what it rests on."""

    drifted: bool
    move: float
    scans: list[dict[str, Any]]
    skipped: list[str]
    plot: Path | None

    def verdict(self) -> str:
        """One line for the terminal."""
        n = len(self.scans)
        if not n:
            return "drift: no scan inspected with this model records good-surface scores"
        word = "DRIFT" if self.drifted else "no drift"
        return (f"{word}: good-surface scores of {n} scan(s) are x{self.move:.2f} the "
                f"calibration's (limits x{1 / DRIFT_FACTOR:.2f}-x{DRIFT_FACTOR:.2f})")


def check_drift(scans: Sequence[Path], model: Model, out_dir: Path | None = None,
                factor: float = DRIFT_FACTOR) -> DriftReport:
    """Compare scans' good-surface scores with a model's calibration; plot into ``out_dir``.

    Scans inspected with another model (another weights hash) are skipped and named.

    Raises
    ------
    UserError
        A folder that is not a scan, or a model card without good-surface scores.
    """
    reference = _checked((getattr(model, "card", {}) or {}).get("good_scores"),
                         "--model: its card's good_scores")
    if not reference or not reference.get("n"):
        raise UserError("--model: its card records no good-surface scores (build it with "
                        "waferscope train)")
    sha = model.card.get("weights_sha256")
    rows, skipped = [], []
    for folder in scans:
        scan = read_scan_json(Path(folder))
        inspection = scan.get("inspection") or {}
        where = f"{Path(folder) / SCAN_JSON} inspection.good_scores"
        if not isinstance(inspection, dict):
            raise UserError(f"{Path(folder) / SCAN_JSON} inspection: not a mapping")
        scores = _checked(inspection.get("good_scores"), where)
        used = (inspection.get("model") or {}).get("weights_sha256")
        if not scores or not scores.get("n"):
            skipped.append(f"{folder} (not inspected, or before good scores were recorded)")
            continue
        if sha and used and used != sha:
            skipped.append(f"{folder} (inspected with another model)")
            continue
        rows.append({"scan": str(folder), "created": scan.get("created"),
                     "ratios": drift_ratios(reference, scores), "scores": scores})
    drifted, move = drift_verdict(reference, [r["scores"] for r in rows], factor)
    plot = _plot(rows, reference, out_dir, factor) if out_dir is not None and rows else None
    return DriftReport(drifted, move, rows, skipped, plot)


def _checked(scores: Any, where: str) -> dict[str, Any] | None:
    """``scores`` (a recorded :func:`models.drift.score_summary`, or None) once it fits
    :class:`models.drift.GoodScores`.

    Raises
    ------
    UserError
        Naming ``where`` and the field that does not fit.
    """
    if scores is None:
        return None
    if not isinstance(scores, dict):
        raise UserError(f"{where}: a mapping of score quantiles is expected, got "
                        f"{str(scores)[:40]!r}")
    try:
        GoodScores.model_validate(scores)
    except ValidationError as exc:
        raise UserError(f"{where}: {format_validation_error(exc)}") from None
    return scores


def _plot(rows: list[dict[str, Any]], reference: dict[str, Any], out_dir: Path,
          factor: float) -> Path:
    """Each scan's quantile ratios against the calibration, in scan order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = [k for k in reference if k.startswith("q")]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * len(rows) + 3), 3.5), dpi=120)
    x = np.arange(len(rows))
    for key in keys:
        ax.plot(x, [r["ratios"].get(key, math.nan) for r in rows], "o-", label=key)
    ax.axhspan(1 / factor, factor, color="0.9", zorder=0, label="no drift")
    ax.axhline(1.0, color="0.5", lw=0.8)
    ax.set_xticks(x, [Path(r["scan"]).name for r in rows], rotation=45, ha="right",
                  fontsize=7)
    ax.set_ylabel("good-surface score / calibration")
    ax.legend(fontsize=7, ncol=len(keys) + 1)
    fig.tight_layout()
    path = out_dir / "drift.png"
    fig.savefig(path)
    plt.close(fig)
    return path
