"""Drift of a production process, seen in the anomaly scores of surface nobody flagged and
in the surface's image.

Inspection records, in ``scan.json``, the quantiles of the anomaly map over the inspected
surface below the decision threshold (``inspection.good_scores``,
:func:`good_surface_scores`) and the level, noise and sharpness of the mosaic's surface
(``inspection.surface_image``, :func:`surface_image`). ``waferscope drift SCAN... --model M``
compares the newest scans' scores and images with the oldest scan's (one scan: its scores with
those the model was calibrated on, its card's ``good_scores``, and its image with that of the
good scan the model was built from, its card's ``good_scans``), draws the ratios, and gives a
one-line verdict (:func:`check_drift`).
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ValidationError

from models.card import card_of
from models.drift import (
    DRIFT_FACTOR,
    IMAGE_FACTOR,
    IMAGE_KEYS,
    RECENT,
    GoodScores,
    ImageQuality,
    drift_ratios,
    drift_verdict,
    image_drifted,
    image_quality,
    image_ratios,
    score_summary,
    steady_median,
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
        rows = np.unique(np.concatenate([np.arange(a, a + WINDOW) for a in _spread(h)]))
        cols = np.unique(np.concatenate([np.arange(a, a + WINDOW) for a in _spread(w)]))
        values = _read(anomaly, rows, cols).astype(np.float32).ravel()
    values = values[(values != 0) & np.isfinite(values) & (values < threshold)]
    return score_summary(values)


def surface_image(mosaic: Any) -> dict[str, Any]:
    """:func:`models.drift.image_quality` of a mosaic (its level 0), read in a grid of
    :data:`GRID` x :data:`GRID` windows of :data:`WINDOW` pixels (a few chunks, whatever its
    size)."""
    rows = _window_spans(int(mosaic.shape[-2]))
    cols = _window_spans(int(mosaic.shape[-1]))
    block = _read(mosaic, np.concatenate([np.arange(a, a + n) for a, n in rows]),
                  np.concatenate([np.arange(a, a + n) for a, n in cols]))
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
    return [(a, WINDOW) for a in _spread(n)]


def _spread(n: int) -> list[int]:
    """Starts of :data:`GRID` windows of :data:`WINDOW` pixels spread evenly along ``n``
    pixels (overlapping when ``n`` holds fewer)."""
    return [max(0, min(n - WINDOW, int((i + 0.5) * n / GRID) - WINDOW // 2))
            for i in range(GRID)]


def _read(array: Any, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """The rows x cols of a (Zarr or numpy) 2-D array, each chunk read once."""
    if hasattr(array, "oindex"):
        return np.asarray(array.oindex[rows, cols])
    return np.asarray(array)[np.ix_(rows, cols)]


def _times(ratio: float, factor: float) -> str:
    """A ratio as ``x0.87``, with as many decimals as it takes not to read as one of the
    limits ``1 / factor`` and ``factor`` it is not ("DRIFT ... x0.80 (limits x0.80-x1.25)")."""
    for digits in range(2, 7):
        text = f"{ratio:.{digits}f}"
        limits = (f"{1 / factor:.{digits}f}", f"{factor:.{digits}f}")
        if text not in limits or ratio in (1 / factor, factor):
            return "x" + text
    return f"x{ratio:.6f}"


@dataclass
class DriftReport:
    """The verdict of :func:`check_drift` and what it rests on.

    With two scans or more, the newest :data:`models.drift.RECENT` scans (the oldest left
    out) are compared with the oldest scan, their good-surface scores as their image: a
    card's calibration is measured on held-out variants of its good images, which score
    higher than scans of the product do (a model built from a good wafer scan: its good
    scans at x0.72-0.87 of the card's scores), so it cannot tell a move from where a product
    starts. One scan alone is compared with the calibration (its kind's and pixel band's
    where the card has them), for a rise only.
    """

    drifted: bool
    #: the median score ratio of the scans judged (to the oldest scan, or the calibration)
    move: float
    scans: list[dict[str, Any]]
    skipped: list[str]
    plot: Path | None
    #: the judged scans' image against the oldest scan's (median ratio per quantity), and
    #: which of it moved too far
    image: dict[str, float] = field(default_factory=dict)
    image_moved: list[str] = field(default_factory=list)
    #: the scan the others are compared with (None: the calibration, one scan)
    reference: str | None = None
    #: how many scans the verdict rests on
    judged: int = 0
    #: what the verdict could not use, said with it
    notes: list[str] = field(default_factory=list)
    #: the judged scans' scores against the calibration (median ratio)
    calibration_move: float = float("nan")
    #: what the calibration's scores are of (a kind of sample and pixel band; "": the
    #: model's own, pooled)
    calibrated_on: str = ""

    def verdict(self) -> str:
        """One line for the terminal."""
        if not self.scans:
            return "drift: no scan inspected with this model records good-surface scores"
        word = "DRIFT" if self.drifted else "no drift"
        limits = f"limits x{1 / DRIFT_FACTOR:.2f}-x{DRIFT_FACTOR:.2f}"
        move = _times(self.move, DRIFT_FACTOR)
        if self.reference is None:
            on = self.calibrated_on + "; " if self.calibrated_on else ""
            if self.move < 1.0:
                limits = (f"one scan is judged against the calibration above it only, to "
                          f"x{DRIFT_FACTOR:.2f}: good scans score below held-out ones")
            line = (f"{word}: good-surface scores of the one scan are {move} the "
                    f"calibration's ({on}{limits}; give earlier scans of the product to "
                    "follow it)")
        else:
            line = (f"{word}: the newest {self.judged} of {len(self.scans)} scans against the "
                    f"oldest ({Path(self.reference).name}): good-surface scores "
                    f"{move} ({limits}; x{self.calibration_move:.2f} the calibration's)")
        if self.image:
            line += ("; image " + ", ".join(
                f"{k} {_times(v, IMAGE_FACTOR)}" + (" (moved)" if k in self.image_moved else "")
                for k, v in self.image.items())
                + f" (limits x{1 / IMAGE_FACTOR:.2f}-x{IMAGE_FACTOR:.2f})")
        return line + "".join(f"; {note}" for note in self.notes)


def check_drift(scans: Sequence[Path], model: Model, out_dir: Path | None = None,
                factor: float = DRIFT_FACTOR) -> DriftReport:
    """Whether the newest scans' good-surface scores or image moved from the oldest scan's
    (one scan: its scores from the model's calibration); plot into ``out_dir``.

    Scans inspected with another model (another weights hash) are skipped and named; a
    folder given twice is taken once. The scans are taken in the order they were started.

    Raises
    ------
    UserError
        A folder that is not a scan, a damaged record, or a model card without good-surface
        scores.
    """
    pooled = _checked((getattr(model, "card", {}) or {}).get("good_scores"),
                      "--model: its card's good_scores", GoodScores)
    if not pooled or not pooled.get("n"):
        raise UserError("--model: its card records no good-surface scores (build it with "
                        "waferscope train)")
    sha = model.card.get("weights_sha256")
    built_from = model.card.get("good_scans") or []
    rows, skipped, seen = [], [], set()
    for folder in scans:
        if Path(folder).resolve() in seen:
            continue
        seen.add(Path(folder).resolve())
        row = _row(Path(folder), sha)
        if isinstance(row, str):
            skipped.append(row)
        elif _built_from(row, built_from):
            skipped.append(f"{folder} (the model was built from it: in its bank, it scores "
                           "lower than the product's other scans)")
        else:
            rows.append(row)
    _one_product(rows)
    reference, calibrated_on = _calibration_of(model, rows, pooled)
    for r in rows:
        r["ratios"] = drift_ratios(reference, r["scores"])
    rows, notes = _oldest_first(rows)
    oldest, judged = (rows[0], rows[1:][-RECENT:]) if len(rows) >= 2 else (None, rows)
    scores = [r["scores"] for r in judged]
    calibration = drift_verdict(reference, scores, factor)
    drifted, move = calibration
    if oldest is None and move < 1.0:
        # one scan against the calibration tells a rise only: held-out variants of good
        # images score higher than scans of the product do (the shipped coupon's first scan
        # read "DRIFT x0.71"; a model's own good scans x0.72-0.87), while surface that lost
        # light or focus scores as before (the image's record shows that, scan to scan)
        drifted = False
    if oldest is not None:
        for r in rows:
            r["since_oldest"] = drift_ratios(oldest["scores"], r["scores"])
        drifted, move = drift_verdict(oldest["scores"], scores, factor)
    image, moved = _image_drift(rows, oldest, judged, notes,
                                None if oldest is not None else _built_from_image(built_from))
    if oldest is not None and not drifted and not moved:
        drifted = _most_moved(oldest, judged, factor, notes)
    plot = _plot(rows, out_dir, factor) if out_dir is not None and rows else None
    return DriftReport(
        drifted or bool(moved), move, rows, skipped, plot, image, moved,
        None if oldest is None else oldest["scan"], len(judged), notes, calibration[1],
        calibrated_on)


def _moved_alone(oldest: dict[str, Any], row: dict[str, Any], factor: float) -> list[str]:
    """What of one scan moved beyond the limits from the oldest scan's (its good-surface
    scores, as :func:`models.drift.drift_verdict` judges them, and its image's quantities)."""
    out = []
    moved, move = drift_verdict(oldest["scores"], [row["scores"]], factor)
    if moved:
        out.append(f"scores {_times(move, factor)}")
    image = row.get("image_ratios") or {}
    out += [f"{k} {_times(image[k], IMAGE_FACTOR)}" for k in image_drifted(image)]
    return out


def _most_moved(oldest: dict[str, Any], judged: list[dict[str, Any]], factor: float,
                notes: list[str]) -> bool:
    """Whether most of the judged scans moved, each on its own measure (one lost light,
    the next focus: the median of each measure over the scans stays near 1, while no scan
    is like the oldest); said in ``notes``. Like the medians, one odd scan of three, or
    half of them, is not yet drift."""
    moved = {Path(r["scan"]).name: m for r in judged if (m := _moved_alone(oldest, r, factor))}
    if 2 * len(moved) <= len(judged):
        return False
    notes.append(f"{len(moved)} of the newest {len(judged)} scans moved each on its own: "
                 + ", ".join(f"{name} ({', '.join(m)})" for name, m in moved.items()))
    return True


def _calibration_of(model: Model, rows: list[dict[str, Any]], pooled: dict[str, Any]
                    ) -> tuple[dict[str, Any], str]:
    """The card's held-out good scores for the scans' product: those of its kind of sample
    and pixel band where the card has them (the default's are per kind and band, as its
    thresholds are), else ``pooled``; and what they are of."""
    kind = next((r["kind"] for r in rows if r.get("kind")), None)
    pixel = next((r["pixel_size_um"] for r in rows if r.get("pixel_size_um")), None)
    scores, source = card_of(model).good_scores_for(kind, pixel, pooled)
    if scores is pooled:
        return pooled, source
    return _checked(scores, f"--model: its card's good scores ({source})", GoodScores), source


def _one_product(rows: list[dict[str, Any]]) -> None:
    """Refuse scans of different kinds of sample or at different pixel sizes (more than 1 %
    apart): their scores and images differ by what they show, not by drift (a PV cell at 30
    um beside wafers at 10 and 20 um read "DRIFT ... sharpness x1.55")."""
    for key, unit in (("kind", ""), ("pixel_size_um", " um pixels")):
        known = [r for r in rows if r.get(key) is not None]
        for r in known[1:]:
            first = known[0]
            if r[key] != first[key] if key == "kind" else \
                    abs(r[key] - first[key]) > 0.01 * first[key]:
                raise UserError(f"drift compares scans of one product: {first['scan']} "
                                f"({first[key]}{unit}) and {r['scan']} ({r[key]}{unit}) "
                                "differ; give the scans of one recipe")


def _built_from(row: dict[str, Any], built_from: list[Any]) -> bool:
    """Whether a scan is one a model was built from (its card's ``good_scans``): the same
    folder, or a copy of it (the same start time and recipe name)."""
    for scan in built_from:
        if not isinstance(scan, dict):
            continue
        if scan.get("path") and Path(str(scan["path"])) == Path(row["scan"]).resolve():
            return True
        if scan.get("started") and (scan.get("started"), scan.get("name")) == (
                row["started"], row["name"]):
            return True
    return False


def _row(folder: Path, sha: str | None) -> dict[str, Any] | str:
    """What drift reads of one scan folder, or why it is skipped."""
    scan = read_scan_json(folder)
    inspection = scan.get("inspection") or {}
    if not isinstance(inspection, dict):
        raise UserError(f"{folder / SCAN_JSON} inspection: not a mapping")
    where = f"{folder / SCAN_JSON} inspection"
    scores = _checked(inspection.get("good_scores"), f"{where}.good_scores", GoodScores)
    used = (inspection.get("model") or {}).get("weights_sha256")
    if not scores or not scores.get("n"):
        return f"{folder} (not inspected, or before good scores were recorded)"
    if sha and not used:
        # every inspection that records good scores records its model's hash: without it
        # the scores may be another model's, on another scale (a scan inspected with the
        # default, its model record lost, was compared with one built for the product)
        raise UserError(f"{where}.model.weights_sha256: not recorded, so which model scored "
                        "its good surface cannot be told; inspect the scan again with --model")
    if sha and used != sha:
        return f"{folder} (inspected with another model)"
    image = _checked(inspection.get("surface_image"), f"{where}.surface_image", ImageQuality)
    recipe, mosaic = scan.get("recipe"), scan.get("mosaic")
    sample = recipe.get("sample") if isinstance(recipe, dict) else None
    pixel = mosaic.get("pixel_size_um") if isinstance(mosaic, dict) else None
    return {"scan": str(folder), "started": scan.get("started"),
            "kind": sample.get("kind") if isinstance(sample, dict) else None,
            "pixel_size_um": float(pixel) if isinstance(pixel, int | float) else None,
            "name": (scan.get("recipe") or {}).get("name") if isinstance(
                scan.get("recipe"), dict) else None,
            "scores": scores,
            "image": image if image and image.get("n") else None}


def _oldest_first(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """The scans in the order they were started (``scan.json`` ``started``), or as given when
    one of them does not say (then said in the notes)."""
    started = [_start_time(r["started"]) for r in rows]
    odd = next((r for r, t in zip(rows, started, strict=True) if t is None), None)
    try:
        if odd is None:
            return [rows[i] for i in sorted(range(len(rows)), key=lambda i: started[i])], []
        why = f"{Path(odd['scan']).name} records no start time"
    except TypeError as exc:  # times with and without an offset
        why = f"their start times cannot be compared ({exc})"
    return rows, [f"scans taken in the order given: {why}"] if len(rows) > 1 else []


def _start_time(value: Any) -> _dt.datetime | None:
    """A recorded start time, None when it is none."""
    try:
        return _dt.datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return None


def _built_from_image(built_from: list[Any]) -> dict[str, Any] | None:
    """The image (:func:`surface_image`) of the first good scan a model was built from whose
    card entry records one (``train`` measures it on the scan's mosaic), with its folder's
    name as ``scan`` and its pixel size; None when none does (image files, older cards)."""
    for i, scan in enumerate(built_from):
        if not isinstance(scan, dict) or scan.get("surface_image") is None:
            continue
        image = _checked(scan["surface_image"],
                         f"--model: its card's good_scans[{i}].surface_image", ImageQuality)
        pixel = scan.get("pixel_size_um")
        if image and image.get("n"):
            return {"scan": str(scan.get("path") or "the good scan"), "image": image,
                    "pixel_size_um": float(pixel) if isinstance(pixel, int | float) else None}
    return None


def _image_drift(rows: list[dict[str, Any]], oldest: dict[str, Any] | None,
                 judged: list[dict[str, Any]], notes: list[str],
                 good: dict[str, Any] | None = None) -> tuple[dict[str, float], list[str]]:
    """The judged scans' image against the oldest scan's: the steady median ratio of each
    quantity (:func:`models.drift.steady_median`) and those beyond
    :data:`models.drift.IMAGE_FACTOR`; why not, in ``notes``, when it cannot be compared.

    With no earlier scan, ``good`` (:func:`_built_from_image`: the good scan the model was
    built from) is the reference when it was imaged at the judged scans' pixel size: a
    golden sample trained once and parts inspected one by one had their light and focus
    compared with nothing: a part scanned with half or a sixteenth of the light, or a
    wafer at 5 um pixels 40 um out of focus, read "no drift" (probe P23)."""
    if oldest is None:
        pixel = next((r["pixel_size_um"] for r in judged if r.get("pixel_size_um")), None)
        if good is not None and judged and (good["pixel_size_um"] is None or pixel is None
                                            or abs(pixel - good["pixel_size_um"])
                                            <= 0.01 * good["pixel_size_um"]):
            notes.append(f"image against the good scan the model was built from "
                         f"({Path(good['scan']).name})")
            oldest = good
        elif good is not None and judged:
            notes.append(f"image not compared: the good scan the model was built from was "
                         f"imaged at {good['pixel_size_um']:g} um pixels, this scan at "
                         f"{pixel:g} (give earlier scans of the product)")
            return {}, []
        else:
            if judged:
                notes.append("image not compared (one scan: give earlier scans of the "
                             "product)")
            return {}, []
    if not oldest["image"]:
        notes.append(f"image not compared: {Path(oldest['scan']).name} records none (inspected "
                     "before images were recorded)")
        return {}, []
    for r in rows:
        if r["image"]:
            r["image_ratios"] = image_ratios(oldest["image"], r["image"])
    ratios = [r["image_ratios"] for r in judged if r["image"]]
    if len(ratios) < len(judged):
        notes.append(f"image of {len(judged) - len(ratios)} scan(s) not recorded")
    if not ratios:
        return {}, []
    keys = [k for k in ratios[0] if all(k in n for n in ratios)]
    if "sharpness" not in keys:
        which = "the good scan" if oldest is good else "the oldest scan"
        notes.append("sharpness not compared (" + (
            f"{which} shows too little structure to measure it on)"
            if isinstance(oldest["image"].get("sharpness"), int | float)
            else f"not measured on {which})"))
    image = {k: steady_median([n[k] for n in ratios]) for k in keys}
    return image, image_drifted(image)


def _checked(record: Any, where: str, schema: type[BaseModel]) -> dict[str, Any] | None:
    """``record`` (a recorded :func:`models.drift.score_summary` or
    :func:`models.drift.image_quality`, or None) once it fits ``schema``.

    Raises
    ------
    UserError
        Naming ``where`` and the field that does not fit.
    """
    if record is None:
        return None
    if not isinstance(record, dict):
        raise UserError(f"{where}: a mapping is expected, got {str(record)[:40]!r}")
    try:
        schema.model_validate(record)
    except ValidationError as exc:
        raise UserError(f"{where}: {format_validation_error(exc, root='')}") from None
    return record


def _plot(rows: list[dict[str, Any]], out_dir: Path, factor: float) -> Path:
    """Each scan's score quantiles and image against the oldest scan's (one scan: its scores
    against the calibration), in scan order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    against = "since_oldest" if len(rows) >= 2 else "ratios"
    keys = list(rows[0][against])
    fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * len(rows) + 3), 3.5), dpi=120)
    x = np.arange(len(rows))
    for key in keys:
        ax.plot(x, [r[against].get(key, math.nan) for r in rows], "o-", label=f"score {key}")
    for key in IMAGE_KEYS:
        values = [(r.get("image_ratios") or {}).get(key, math.nan) for r in rows]
        if not all(math.isnan(v) for v in values):
            ax.plot(x, values, "s--", label=f"image {key}")
    ax.axhspan(1 / factor, factor, color="0.9", zorder=0, label="no drift (scores)")
    ax.axhline(1.0, color="0.5", lw=0.8)
    ax.set_xticks(x, [Path(r["scan"]).name for r in rows], rotation=45, ha="right",
                  fontsize=7)
    ax.set_ylabel("/ oldest scan" if against == "since_oldest" else "/ calibration")
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    path = out_dir / "drift.png"
    fig.savefig(path)
    plt.close(fig)
    return path
