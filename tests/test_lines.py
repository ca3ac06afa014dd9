"""Faint long lines (models.lines): line evidence, its calibration on good maps, and the
defects it decides, on synthetic anomaly maps whose truth is drawn."""

from __future__ import annotations

import numpy as np
from skimage.draw import line

from models.card import ModelCard
from models.lines import (
    LINE_LENGTH_MAP_PX,
    calibrate_line_threshold,
    line_evidence,
    line_seeds,
)
from models.thresholds import calibrate_threshold
from scanner.inspection.defects import MapGeometry, extract_defects

GEOM = MapGeometry(origin_um=(0.0, 0.0), pixel_size_um=4.0, stride=4)


def _good_map(seed: int, shape=(256, 256)) -> np.ndarray:
    """A good surface's map: smooth noise around 0.55 with rare isolated peaks."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    a = 0.55 + 0.35 * ndimage.gaussian_filter(rng.normal(0, 1, shape), 1.0)
    return np.clip(a, 0.01, None).astype(np.float32)


def _maps(anomaly: np.ndarray) -> dict[str, np.ndarray]:
    return {"anomaly": anomaly, "roughness": np.zeros_like(anomaly),
            "uncertainty": np.zeros_like(anomaly)}


def test_line_evidence_is_the_mean_along_the_best_segment():
    from scipy import ndimage

    for end in ((50, 60), (60, 20), (34, 62), (62, 33)):  # lines at 4 angles, 3 px wide
        a = np.zeros((64, 64), np.float32)
        rr, cc = line(10 if end[0] != 34 else 30, 5 if end[1] != 33 else 30, *end)
        a[rr, cc] = 1.0
        ev = line_evidence(ndimage.grey_dilation(a, footprint=np.ones((3, 3))))
        # a segment at one of 16 directions lies within the line along its whole length
        assert ev[rr[10:-10], cc[10:-10]].min() > 0.98
    assert line_evidence(a)[5, 60] == 0.0  # far from it
    spot = np.zeros((64, 64), np.float32)
    spot[32, 32] = 1.0  # one pixel: diluted over the segment's length
    assert line_evidence(spot).max() < 1.1 / LINE_LENGTH_MAP_PX


def test_line_seeds_in_chunks_equal_the_whole():
    a = _good_map(3, (300, 120))
    t = float(np.quantile(line_evidence(a), 0.99))
    import models.lines as lines

    small = lines.LINE_CHUNK_VALUES
    try:  # chunks of 64 - 2 x 15 = 34 rows
        lines.LINE_CHUNK_VALUES = 64 * lines.LINE_ORIENTATIONS * a.shape[1]
        assert np.array_equal(line_seeds(a, t), line_evidence(a) >= t)
    finally:
        lines.LINE_CHUNK_VALUES = small


def test_faint_scratch_under_the_threshold_is_found_and_the_good_surface_is_not():
    good = [_good_map(s) for s in range(24)]
    area = 24 * 0.4  # cm2 of held-out surface: allows 9.6 false alarms at 1 per cm2
    thr = calibrate_threshold(good, area, 1.0, scores="distance").threshold
    line_thr = calibrate_line_threshold(good, area, 1.0, thr)
    assert line_thr is not None and line_thr < thr
    test = _good_map(99)
    rr, cc = line(40, 30, 200, 220)
    test[rr, cc] = 0.97 * thr  # every pixel just under the threshold
    for dr in (-1, 1):  # three pixels wide, as a scratch on the map is
        test[rr + dr, cc] = np.maximum(test[rr + dr, cc], 0.9 * thr)
    found = extract_defects(_maps(test), GEOM, threshold=thr, line_threshold=line_thr)
    on_line = [d for d in found if 30 * 4 <= d.x_um <= 220 * 4 and 40 * 4 <= d.y_um <= 200 * 4
               and d.size_um > 60 * 4]
    assert len(on_line) == 1
    without = extract_defects(_maps(test), GEOM, threshold=thr)
    assert not [d for d in without if d.size_um > 60 * 4]
    # on good surfaces the line evidence adds no more than the budget allowed
    new_good = [_good_map(s) for s in range(200, 212)]
    extra = sum(len(extract_defects(_maps(m), GEOM, threshold=thr, line_threshold=line_thr))
                - len(extract_defects(_maps(m), GEOM, threshold=thr)) for m in new_good)
    assert extra <= 3


def test_too_little_held_out_area_gives_no_line_threshold():
    good = [_good_map(s) for s in range(4)]
    assert calibrate_line_threshold(good, 0.01, 1.0, 0.9) is None


def test_card_line_threshold_follows_the_decision_thresholds_source():
    card = ModelCard.model_validate({
        "architecture": {}, "threshold": 1.0, "line_threshold": 0.8,
        "thresholds_by_sample_kind": {"pv_cell": 0.9, "wafer": 1.2},
        "thresholds_line_by_sample_kind": {"pv_cell": 0.7},
        "thresholds_by_pixel_size": {"pv_cell": [
            {"pixel_size_um": [8, 20], "threshold": 0.95, "line": 0.75},
            {"pixel_size_um": [20, 40], "threshold": 0.91}]}})
    assert card.line_threshold_for("pv_cell", "model card", 10.0) == 0.75
    assert card.line_threshold_for("pv_cell", "model card", 30.0) is None  # band has none
    assert card.line_threshold_for("pv_cell", "model card") == 0.7
    assert card.line_threshold_for("wafer", "model card") is None  # kind has none
    assert card.line_threshold_for(None, "model card") == 0.8
    assert card.line_threshold_for("pv_cell", "user", 10.0) is None
