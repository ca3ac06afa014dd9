"""Drift of a production process, seen in the anomaly scores of surface nobody flagged and
in the surface's image.

Inspection records, in ``scan.json``, the quantiles of the anomaly map over the inspected
surface below the decision threshold (``inspection.good_scores``,
:func:`good_surface_scores`) and the level, noise and sharpness of the mosaic's surface
(``inspection.surface_image``, :func:`surface_image`). ``waferscope drift SCAN... --model M``
compares the scores with those the model was calibrated on (its card's ``good_scores``) and the
images with the oldest scan's, scan by scan, draws the ratios, and gives a one-line verdict on
the newest scans (:func:`models.drift.drift_verdict`).
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import ValidationError

from models.drift import (
    DRIFT_FACTOR,
    IMAGE_FACTOR,
    RECENT,
    GoodScores,
    drift_ratios,
    drift_verdict,
    image_drifted,
    image_quality,
    image_ratios,
    score_summary,
)
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


def surface_image(mosaic: Any) -> dict[str, Any]:
    """:func:`models.drift.image_quality` of a mosaic (its level 0), read in a grid of
    :data:`GRID` x :data:`GRID` windows of :data:`WINDOW` pixels (a few chunks, whatever its
    size)."""
    rows = _window_spans(int(mosaic.shape[-2]))
    cols = _window_spans(int(mosaic.shape[-1]))
    r_index = np.concatenate([np.arange(a, a + n) for a, n in rows])
    c_index = np.concatenate([np.arange(a, a + n) for a, n in cols])
    block = np.asarray(mosaic.oindex[r_index, c_index] if hasattr(mosaic, "oindex")
                       else np.asarray(mosaic)[np.ix_(r_index, c_index)])
    r_at = np.cumsum([0] + [n for _, n in rows])
    c_at = np.cumsum([0] + [n for _, n in cols])
    return image_quality([block[r_at[i]:r_at[i + 1], c_at[j]:c_at[j + 1]]
                          for i in range(len(rows)) for j in range(len(cols))])


def _window_spans(n: int) -> list[tuple[int, int]]:
    """(start, length) of the windows read along an axis of ``n`` pixels: :data:`GRID` spread
    evenly, or as many side by side as fit (one of ``n`` when shorter than a window)."""
    if n <= WINDOW:
        return [(0, n)]
    if n < GRID * WINDOW:
        return [(a, WINDOW) for a in range(0, n - WINDOW + 1, WINDOW)]
    return [(max(0, min(n - WINDOW, int((i + 0.5) * n / GRID) - WINDOW // 2)), WINDOW)
            for i in range(GRID)]


@dataclass
class DriftReport:
    """The verdict of :func:`check_drift` and what it rests on."""

    drifted: bool
    move: float
    scans: list[dict[str, Any]]
    skipped: list[str]
    plot: Path | None
    #: the newest scans' image against the oldest scan's (:func:`models.drift.image_ratios`,
    #: median over the newest scans), and which of it moved too far
    image: dict[str, float] = field(default_factory=dict)
    image_moved: list[str] = field(default_factory=list)
    image_reference: str | None = None

    def verdict(self) -> str:
        """One line for the terminal."""
        n = len(self.scans)
        if not n:
            return "drift: no scan inspected with this model records good-surface scores"
        word = "DRIFT" if self.drifted else "no drift"
        recent = min(n, RECENT)
        line = (f"{word}: good-surface scores of the newest {recent} of {n} scan(s) are "
                f"x{self.move:.2f} the calibration's (limits x{1 / DRIFT_FACTOR:.2f}-"
                f"x{DRIFT_FACTOR:.2f})")
        if self.image:
            line += ("; their image against the oldest scan's "
                     f"({Path(self.image_reference or '').name}): "
                     + ", ".join(f"{k} x{v:.2f}" + (" (moved)" if k in self.image_moved else "")
                                 for k, v in self.image.items())
                     + f" (limits x{1 / IMAGE_FACTOR:.2f}-x{IMAGE_FACTOR:.2f})")
        return line


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
        image = inspection.get("surface_image")
        rows.append({"scan": str(folder), "started": scan.get("started"),
                     "ratios": drift_ratios(reference, scores), "scores": scores,
                     "image": image if isinstance(image, dict) and image.get("n") else None})
    rows = _oldest_first(rows)
    recent = rows[-RECENT:]
    drifted, move = drift_verdict(reference, [r["scores"] for r in recent], factor)
    image, moved, oldest = _image_drift(rows, recent)
    plot = _plot(rows, reference, out_dir, factor) if out_dir is not None and rows else None
    return DriftReport(drifted or bool(moved), move, rows, skipped, plot, image, moved, oldest)


def _oldest_first(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The scans in the order they were started (``scan.json`` ``started``), or as given when
    one of them does not say."""
    try:
        started = [_dt.datetime.fromisoformat(r["started"]) for r in rows]
        order = sorted(range(len(rows)), key=lambda i: started[i])
    except (TypeError, ValueError):  # not recorded, not a time, or with and without offsets
        return rows
    return [rows[i] for i in order]


def _image_drift(rows: list[dict[str, Any]], recent: list[dict[str, Any]]
                 ) -> tuple[dict[str, float], list[str], str | None]:
    """The newest scans' image against the oldest scan's that records one: the median ratio
    of each quantity, those beyond :data:`models.drift.IMAGE_FACTOR`, and the oldest scan."""
    with_image = [r for r in rows if r["image"]]
    if len(with_image) < 2:
        return {}, [], None
    oldest = with_image[0]
    for r in with_image:
        r["image_ratios"] = image_ratios(oldest["image"], r["image"])
    newest = [r["image_ratios"] for r in recent if r["image"] and r is not oldest]
    if not newest:
        return {}, [], None
    keys = [k for k in newest[0] if all(k in n for n in newest)]
    image = {k: float(np.median([n[k] for n in newest])) for k in keys}
    return image, image_drifted(image), oldest["scan"]


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
    for key in ("noise", "sharpness", "level"):
        values = [(r.get("image_ratios") or {}).get(key, math.nan) for r in rows]
        if not all(math.isnan(v) for v in values):
            ax.plot(x, values, "s--", label=f"image {key}")
    ax.axhspan(1 / factor, factor, color="0.9", zorder=0, label="no drift")
    ax.axhline(1.0, color="0.5", lw=0.8)
    ax.set_xticks(x, [Path(r["scan"]).name for r in rows], rotation=45, ha="right",
                  fontsize=7)
    ax.set_ylabel("score / calibration; image / oldest")
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    path = out_dir / "drift.png"
    fig.savefig(path)
    plt.close(fig)
    return path
