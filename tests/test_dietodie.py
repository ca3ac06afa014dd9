"""Die-to-die comparison: alignment, difference scores, die selection, fusion into the map."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import ndimage
from shapely.geometry import box
from typer.testing import CliRunner

from scanner.diegrid import DieGrid
from scanner.inspection.dietodie import (
    DieToDie,
    MosaicGrid,
    alike_dies,
    apply_patches,
    block_shift,
    compare_dies,
    die_to_die_patches,
    difference_z,
    full_dies,
    global_shift,
    match_levels,
    nearest_dies,
    z_to_score,
)


def _design(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A die-like pattern: rectangles of several levels on a field, plus a fine grating."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w), 1000.0)
    for _ in range(60):
        y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
        dy, dx = rng.integers(4, h // 4), rng.integers(4, w // 4)
        img[y:y + dy, x:x + dx] = rng.choice([600.0, 1400.0, 1800.0])
    img[h // 2:h // 2 + 40, :] += 300.0 * (np.arange(w) % 4 < 2)
    return ndimage.gaussian_filter(img, 0.8)


def test_block_shift_recovers_a_subpixel_shift_and_rejects_a_flat_block():
    a = _design(128, 128, seed=1)
    moved = ndimage.shift(a, (1.3, -0.6), order=3, mode="nearest")
    est = block_shift(a, moved, max_shift_px=4.0)
    assert est is not None
    assert est == pytest.approx([-1.3, 0.6], abs=0.15)
    assert block_shift(np.ones((64, 64)), a[:64, :64], 4.0) is None


def test_global_shift_of_a_die_of_fine_gratings_is_not_a_period_off():
    # a die mostly covered by a line grating of 8.5 px period (memory arrays at a coarse pixel
    # size), with two pads and its border; averaged down without smoothing, the grating
    # aliases into a moire that moves 17 times as far as the die, and phase correlation follows
    # it (before: (0, 0) and (4, -6) for the two shifts below)
    h, w = 1280, 1420
    cols = np.arange(w)
    die = np.full((h, w), 1000.0) + 600.0 * (np.sin(2 * np.pi * cols / 8.5) > 0)[None, :]
    die[200:240, 300:340] = die[900:940, 1000:1040] = 300.0
    die[:, :30] = die[:30, :] = 1500.0
    die = ndimage.gaussian_filter(die, 0.8)
    rng = np.random.default_rng(3)
    for true in [(0.0, 0.0), (2.0, -3.0), (-5.0, 6.0)]:
        moved = ndimage.shift(die, true, order=1, mode="nearest") + rng.normal(0, 5, die.shape)
        # the shift that aligns the moved die back onto the die
        assert global_shift(die, moved, 16) == pytest.approx([-true[0], -true[1]], abs=0.5)


def test_difference_z_flags_a_faint_spot_and_tolerates_noise_and_misalignment():
    rng = np.random.default_rng(3)
    big = _design(220, 260)
    design = big[10:-10, 10:-10]

    def moved(shift) -> np.ndarray:  # shifted, cropped so that no border is made up
        return ndimage.shift(big, shift, order=1)[10:-10, 10:-10] \
            + rng.normal(0, 15, design.shape)

    refs = np.stack([moved(rng.uniform(-1.5, 1.5, 2)) for _ in range(3)])
    test = moved((0.8, -1.2))
    clean = difference_z(test, refs, DieToDie().scales_px)
    # a 7 px particle, 20 % brighter, on a flat part of the design (next to an edge the
    # comparison tolerates a few pixels of misalignment, so a faint spot there hides)
    span = ndimage.maximum_filter(design, 21) - ndimage.minimum_filter(design, 21)
    span[:20], span[-20:], span[:, :20], span[:, -20:] = np.inf, np.inf, np.inf, np.inf
    cy, cx = np.unravel_index(np.argmin(span), span.shape)
    yy, xx = np.mgrid[:200, :240]
    spot = (yy - cy) ** 2 + (xx - cx) ** 2 <= 3 ** 2
    z = difference_z(np.where(spot, test * 1.2, test), refs, DieToDie().scales_px)
    thr = DieToDie().z_threshold
    assert z[spot].max() > thr
    assert clean.max() < thr  # noise, sub-pixel shifts and a grating are not defects
    far = ndimage.distance_transform_edt(~spot) > 12
    assert z[far].max() < thr


def test_a_reference_with_a_defect_where_the_test_has_one_is_outvoted():
    """A faint stain on the test die, and a stain of its own on one of four references at
    the same place: the envelope of the references held the test's stain, which was not
    seen; the other three outvote that reference (inside the die)."""
    from scanner.inspection.dietodie_maths import _difference_z, matched

    rng = np.random.default_rng(5)
    design = _design(200, 240)
    refs = np.stack([design + rng.normal(0, 10, design.shape) for _ in range(4)])
    yy, xx = np.mgrid[:200, :240]
    stain = (yy - 100) ** 2 + (xx - 120) ** 2 <= 30 ** 2
    test = np.where(stain, design * 1.10, design) + rng.normal(0, 10, design.shape)
    refs[2] = np.where(stain, refs[2] * 1.12, refs[2])  # the same stain on one reference
    t, r, level = matched(test, refs, None)
    scales, tol = DieToDie().scales_px, DieToDie().tolerance_px
    hidden = _difference_z(t, r, level, scales, tol, None)
    outvoted = _difference_z(t, r, level, scales, tol, None, arbitrate=True)
    thr = DieToDie().z_threshold
    assert hidden[stain].max() < thr < outvoted[stain].max()
    # nothing else rises: the clean test against the same references
    clean = design + rng.normal(0, 10, design.shape)
    t, r, level = matched(clean, refs, None)
    assert _difference_z(t, r, level, scales, tol, None, arbitrate=True).max() < thr


@pytest.mark.parametrize("surface", ["two_levels", "flat"])
def test_match_levels_finds_the_gain_between_dies(surface):
    """Lines on a dark ground cover half the window (the median jumps between the two
    levels), a flat surface (choosing bright pixels by a reference's own noise biases the
    gain), a reference reaching the dark chuck on a tenth of the window, a bright defect
    in the test: the gains stay within 0.3 %."""
    rng = np.random.default_rng(5)
    h, w = 256, 256
    if surface == "two_levels":
        base = np.where((np.arange(w) // 6) % 2 == 0, 400.0, 1600.0)[None, :].repeat(h, 0)
    else:
        base = np.full((h, w), 1000.0)
    gains = np.array([1.0, 1.06, 0.95])  # illumination of each reference relative to test

    def die() -> np.ndarray:
        return base + rng.normal(0, 20, base.shape)

    test = die()
    test[100:120, 100:120] *= 1.4  # a defect in the test die
    refs = np.stack([die() * g for g in gains])
    refs[2, :, :26] = 30.0  # the chuck beside the wafer
    level, matched = match_levels(test, refs)
    assert level > 0
    for i, g in enumerate(gains):
        measured = float(np.median(matched[i, :, 30:] / (refs[i, :, 30:] / g)))
        assert measured == pytest.approx(1.0, abs=0.003)


def test_z_to_score_puts_the_z_threshold_on_the_decision_threshold():
    z = np.array([0.0, 3.0, 13.0, 26.0, 1e6])
    s = z_to_score(z, 13.0, 0.8)
    assert s[2] == pytest.approx(0.8)
    assert np.all(np.diff(s) > 0)
    assert s[0] == 0.0 and s[-1] == pytest.approx(1.0, abs=1e-4)


def test_nearest_dies_are_the_closest_other_dies():
    cells = [(c, r) for r in range(3) for c in range(3)]
    near = nearest_dies(cells, 4)
    assert sorted(near[(1, 1)]) == [(0, 1), (1, 0), (1, 2), (2, 1)]
    assert (0, 0) not in near[(0, 0)] and len(near[(0, 0)]) == 4


def _mosaic(n: int = 3, die_px: int = 160, defect: tuple[int, int] | None = (1, 1),
            blank: tuple[int, int] | None = None, seed: int = 0, drift_px: int = 0):
    """A stitched-looking mosaic of n x n dies of one design with noise; one die defective.

    ``drift_px``: the dies lie this much further apart than the grid's pitch (a recipe pitch
    a little off), so die (c, r) is ``(r, c) * drift_px`` away from where the grid puts it.
    """
    rng = np.random.default_rng(seed)
    design = _design(die_px, die_px, seed=5)
    pad = 60
    size = n * die_px + 2 * pad
    img = np.full((size, size), 1000.0)
    for r in range(n):
        for c in range(n):
            die = design if (c, r) != blank else np.full_like(design, 1000.0)
            y, x = pad + r * (die_px + drift_px), pad + c * (die_px + drift_px)
            img[y:y + die_px, x:x + die_px] = die
    img += rng.normal(0, 10, img.shape)
    truth = None
    if defect is not None:  # a missing piece of pattern in one die
        r0 = pad + defect[1] * (die_px + drift_px) + 50
        c0 = pad + defect[0] * (die_px + drift_px) + 70
        img[r0:r0 + 12, c0:c0 + 16] = 1000.0 + rng.normal(0, 10, (12, 16))
        truth = (r0 + 6, c0 + 8)
    p = 2.0
    geometry = MosaicGrid((0.0, 0.0), p, img.shape)
    grid = DieGrid((die_px * p, die_px * p), (pad * p, pad * p))
    usable = box(-1.0, -1.0, img.shape[1] * p, img.shape[0] * p)
    return img.astype(np.float32), geometry, grid, usable, truth


@pytest.mark.parametrize("drift_px", [0, 5])
def test_compare_dies_finds_the_defect_in_its_own_die_only(drift_px):
    # a drift of 5 px a die puts the far dies 10 px from the anchor's grid position: beyond
    # the block search, found by the whole-die alignment
    img, geometry, grid, usable, truth = _mosaic(drift_px=drift_px)
    cells = full_dies(grid, usable, geometry, margin_px=8)
    assert len(cells) == 9
    hot = []
    for cell, r0, c0, z in compare_dies(img, geometry, grid, cells, DieToDie(block_px=64)):
        if z.max() > DieToDie().z_threshold:
            rr, cc = np.unravel_index(np.argmax(z), z.shape)
            hot.append((cell, r0 + rr, c0 + cc))
    assert [h[0] for h in hot] == [(1, 1)]  # not in the dies that use it as a reference
    assert math.hypot(hot[0][1] - truth[0], hot[0][2] - truth[1]) < 12


def test_a_whole_die_shift_worse_than_the_grid_position_is_not_kept(monkeypatch):
    # the coarse correlation can lock onto a moire that differs from die to die (3.5 um
    # pixels on fine gratings: one die 11 px off); the shift must then leave the die less
    # alike the anchor than the grid's position does, and is dropped
    import scanner.inspection.dietodie as dietodie

    img, geometry, grid, usable, _ = _mosaic(defect=None)
    cells = full_dies(grid, usable, geometry, margin_px=8)
    settings = DieToDie(block_px=64)
    monkeypatch.setattr(dietodie, "global_shift", lambda *a, **k: np.array([11.0, -5.0]))
    fields = dietodie.shift_fields(img, geometry, grid, cells, (1, 1), settings)
    for cell in cells:
        assert np.abs(fields[cell]).max() < 1.0, cell
    for *_, z in compare_dies(img, geometry, grid, cells, settings):
        assert z.max() < settings.z_threshold


def test_a_die_unlike_the_others_is_neither_compared_nor_a_reference():
    img, geometry, grid, usable, _ = _mosaic(defect=None, blank=(2, 0))
    cells = full_dies(grid, usable, geometry, margin_px=8)
    alike, anchor = alike_dies(img, geometry, grid, cells)
    assert (2, 0) not in alike and len(alike) == 8 and anchor in alike
    for cell, *_ , z in compare_dies(img, geometry, grid, cells, DieToDie(block_px=64)):
        assert cell != (2, 0)
        assert z.max() < DieToDie().z_threshold
    # fewer than three comparable dies: nothing is compared
    two = [(0, 0), (1, 0)]
    assert list(compare_dies(img, geometry, grid, two)) == []


def test_fuse_raises_the_anomaly_map_at_the_defect_only():
    img, geometry, grid, usable, truth = _mosaic()
    stride = 4
    shape = (img.shape[0] // stride, img.shape[1] // stride)
    anomaly = np.full(shape, 0.2, dtype=np.float32)
    origin = ((stride - 1) / 2 * geometry.pixel_size_um,) * 2
    patches, stats, comparison = die_to_die_patches(
        origin, stride * geometry.pixel_size_um, img, geometry, grid, usable, threshold=0.7,
        settings=DieToDie(block_px=64))
    apply_patches(anomaly, patches)
    assert stats.dies == 9 and stats.pixels_over > 0
    over = np.argwhere(anomaly >= 0.7)
    assert len(over) > 0
    centre = over.mean(axis=0) * stride + (stride - 1) / 2
    assert math.hypot(centre[0] - truth[0], centre[1] - truth[1]) < 2 * stride
    assert np.all(np.abs(over * stride - np.array(truth)) < 20)
    # the difference image around the defect: the missing piece (12 x 16 px) alone stands out
    r0, c0 = truth[0] - 20, truth[1] - 20
    diff, z = comparison.difference(img, r0, c0, 40, 40)
    assert z.max() > DieToDie().z_threshold
    # a window of the same die without the defect: the neighbours show the same there
    _, z_clean = comparison.difference(img, r0 + 60, c0 - 50, 40, 40)
    assert z_clean.max() < 4.0
    strong = np.abs(diff) > 100.0  # the design's levels differ by 400-800, the noise is 10
    rows, cols = np.nonzero(strong)
    assert 0 < strong.sum() <= 12 * 16
    assert rows.min() >= 20 - 6 and rows.max() < 20 + 6 and cols.min() >= 20 - 8 \
        and cols.max() < 20 + 8
    assert np.abs(diff[~strong]).std() < 25
    # outside the compared dies (the plain border) there is nothing to subtract
    assert comparison.difference(img, 0, 0, 40, 40) is None


def test_a_defects_difference_is_scored_on_its_surroundings_only_and_the_same(monkeypatch):
    """A defect's difference window is read with as much around it as the window is wide
    (the levels matched are the surroundings'), and its z-scores were computed over all of
    that: 5 s and 1 GB for one 600 x 1,176 px window of a 533-tile wafer. They are scored on
    the window and the reach of the filters only, with the same result."""
    from scanner.inspection import dietodie

    img, geometry, grid, usable, truth = _mosaic()
    _, _, comparison = die_to_die_patches(
        (0.0, 0.0), 8.0, img, geometry, grid, usable, threshold=0.7,
        settings=DieToDie(block_px=64))
    scored: list[tuple[int, int]] = []
    band = dietodie._matched_band_z

    def spy(test, *args, **kwargs):
        scored.append(test.shape)
        return band(test, *args, **kwargs)

    monkeypatch.setattr(dietodie, "_matched_band_z", spy)
    # in die (1, 1), rows and columns 220-380: around the defect, beside it, a small one
    windows = [(230, 232, 110, 140), (225, 227, 120, 131), (truth[0] - 5, truth[1] - 7, 13, 17)]
    cropped = [comparison.difference(img, *win) for win in windows]
    crop_shapes = list(scored)
    monkeypatch.setattr(dietodie, "_context_px", lambda settings: 10_000)  # the whole read
    whole = [comparison.difference(img, *win) for win in windows]
    for (d1, z1), (d2, z2), win in zip(cropped, whole, windows, strict=True):
        assert np.array_equal(z1, z2) and np.array_equal(d1, d2)
        assert z1.shape == win[2:]
    assert cropped[0][1].max() > DieToDie().z_threshold  # the defect is in the first
    # the large windows were scored on less than their read (their side on each side)
    assert crop_shapes[0][0] < 110 + 2 * 140 and crop_shapes[1][1] < 131 + 2 * 131
    assert scored[len(windows):][:2] == [(110 + 2 * 140, 140 + 2 * 140),
                                         (120 + 2 * 131, 131 + 2 * 131)]


@pytest.mark.slow
@pytest.mark.parametrize("edge_dies", ["bare", "patterned"])
def test_wafer_scan_finds_missing_pattern_by_die_to_die(write_recipe, tmp_path, edge_dies,
                                                        caplog):
    """A simulated wafer whose defects are all missing pattern inside dies (edge dies too
    when they carry the pattern)."""
    from scanner.cli import app
    from scanner.defectlist import read_defects

    p = 5.0
    side = 3 * 512 * p / 1000
    recipe = write_recipe({
        "sample": {"kind": "wafer", "diameter_mm": round(side * 1.5, 3),
                   "edge_exclusion_mm": 0.2, "die_pitch_mm": [round(side / 4, 3)] * 2,
                   "die_origin_mm": [0.0, 0.0], "edge_dies": edge_dies,
                   "defects": {"count": 3, "kinds": ["missing_pattern"], "seed": 41}},
        "microscope": {"kind": "simulated", "seed": 41,
                       "camera": {"width": 512, "height": 512, "pixel_size_um": p}},
        "scan": {"overlap": 0.1},
    })
    out = tmp_path / "scan"
    res = CliRunner().invoke(app, ["run", str(recipe), "--out", str(out)])
    assert res.exit_code == 0, res.output
    header, found = read_defects(out)
    assert header["die_to_die"]["dies"] >= 3
    # the bare edge dies are unlike the others: not compared
    assert (header["die_to_die"]["partial_dies"] > 0) == (edge_dies == "patterned")
    from models import load_model

    quiet = load_model(None).card.get("thresholds_quiet_by_sample_kind", {}).get("wafer")
    assert header["threshold_quiet"] == quiet  # the card's, for the recipe's kind
    truth = json.loads((out / "truth.json").read_text())["defects"]
    assert truth
    # the network alone finds 1 of these 3 (checked with die_to_die: false)
    assert len(found) <= len(truth) + 1
    for t in truth:
        assert any(d.bbox_um[0] - 2 * p <= t["x_um"] <= d.bbox_um[2] + 2 * p
                   and d.bbox_um[1] - 2 * p <= t["y_um"] <= d.bbox_um[3] + 2 * p
                   for d in found), t
    for d in found:  # a defect's size fits its box (a box of 80 x 70 um read 288 um across)
        x0, y0, x1, y1 = d.bbox_um
        assert d.size_um <= math.hypot(x1 - x0, y1 - y0) + 2 * p, d
    if edge_dies == "bare":
        # a user's --threshold cuts the die-to-die evidence as it cuts the model's map: above
        # every score nothing is reported (the evidence was put at the user's threshold, and
        # the same defects came back at any threshold, their scores rescaled)
        strict = tmp_path / "strict"
        top = max(d.score for d in found)
        res = CliRunner().invoke(app, ["inspect", str(out), "--threshold", f"{top * 1.05:.4f}",
                                       "--out", str(strict)])
        assert res.exit_code == 0, res.output
        assert read_defects(strict)[1] == []
        # another kind's threshold is used when asked, and said (it was silently)
        with caplog.at_level(logging.WARNING, logger="waferscope"):
            res = CliRunner().invoke(app, ["inspect", str(out), "--sample-kind", "pv_cell",
                                           "--out", str(tmp_path / "as_pv")])
        assert res.exit_code == 0, res.output
        assert "--sample-kind pv_cell: the scan's recipe says wafer" in caplog.text


def test_many_small_dies_smaller_than_a_block():
    """48 px dies on a 12 x 12 grid: blocks, bands and thumbnails all larger than a die."""
    img, geometry, grid, usable, truth = _mosaic(n=12, die_px=48, defect=None, seed=3)
    r, c = 60 + 5 * 48 + 20, 60 + 7 * 48 + 20  # a missing piece in die (7, 5)
    img[r:r + 6, c:c + 8] = 1000.0
    cells = full_dies(grid, usable, geometry, margin_px=8)
    # the plain border around the 12 x 12 dies holds grid cells too: unlike the dies
    alike, _ = alike_dies(img, geometry, grid, cells)
    assert sorted(alike) == sorted((cc, rr) for rr in range(12) for cc in range(12))
    hot = {cell for cell, *_, z in compare_dies(img, geometry, grid, cells) if z.max() > 13}
    assert hot == {(7, 5)}


def test_apply_patches_matches_patch_by_patch_and_clips_at_the_border():
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 0.5, (50, 40)).astype(np.float32)
    patches = [(0, 0, rng.uniform(0, 1, (10, 12)).astype(np.float32)),
               (8, 30, rng.uniform(0, 1, (20, 20)).astype(np.float32)),  # past the right edge
               (45, 5, rng.uniform(0, 1, (10, 5)).astype(np.float32))]  # past the bottom
    expected = base.copy()
    for i0, j0, sc in patches:
        h, w = min(sc.shape[0], 50 - i0), min(sc.shape[1], 40 - j0)
        expected[i0:i0 + h, j0:j0 + w] = np.maximum(expected[i0:i0 + h, j0:j0 + w], sc[:h, :w])
    got = base.copy()
    apply_patches(got, patches, band_rows=7)
    np.testing.assert_array_equal(got, expected)


def test_dies_of_a_few_pixels_are_not_compared():
    img, geometry, _, usable, _ = _mosaic(n=3, die_px=160, defect=None)
    tiny = DieGrid((20 * geometry.pixel_size_um,) * 2, (120.0, 120.0))  # 20 px dies
    anomaly = np.zeros((img.shape[0] // 4, img.shape[1] // 4), np.float32)
    patches, stats, comparison = die_to_die_patches((3.0, 3.0), 8.0, img, geometry, tiny,
                                                    usable, 0.7)
    apply_patches(anomaly, patches)
    assert stats.dies == 0 and not anomaly.any() and comparison is None


def test_an_edge_die_is_compared_on_its_usable_part():
    """4 x 4 dies under a round usable area that cuts the four corner dies."""
    from shapely.geometry import Point

    img, geometry, grid, _, truth = _mosaic(n=4, defect=(0, 0), blank=(3, 3))
    p = geometry.pixel_size_um
    centre = (60 + 2 * 160) * p
    usable = Point(centre, centre).buffer(400 * p)
    # the wafer ends 10 px beyond the usable area: the dark chuck there
    rr, cc = np.mgrid[:img.shape[0], :img.shape[1]]
    off = np.hypot(rr - centre / p, cc - centre / p) > 410
    img[off] = 200.0 + np.random.default_rng(1).normal(0, 10, off.sum())
    cells = full_dies(grid, usable, geometry, margin_px=8)
    corners = [(0, 0), (3, 0), (0, 3), (3, 3)]
    assert sorted(cells) == sorted((c, r) for r in range(4) for c in range(4)
                                   if (c, r) not in corners)
    assert math.hypot(truth[0] - centre / p, truth[1] - centre / p) < 400 - 20  # usable part
    settings = DieToDie(block_px=64)
    hot, seen = [], set()
    for cell, r0, c0, z in compare_dies(img, geometry, grid, cells, settings, corners, usable):
        seen.add(cell)
        if z.max() > settings.z_threshold:
            rr, cc = np.unravel_index(np.argmax(z), z.shape)
            hot.append((cell, r0 + rr, c0 + cc))
    # the blank corner die is unlike the anchor where it is usable: not compared; the chuck
    # beyond the usable area of the others is no defect
    assert seen == set(cells) | {(0, 0), (3, 0), (0, 3)}
    assert [h[0] for h in hot] == [(0, 0)]
    assert math.hypot(hot[0][1] - truth[0], hot[0][2] - truth[1]) < 12
    # full dies only: the defect in the edge die is not seen
    assert all(z.max() <= settings.z_threshold
               for *_, z in compare_dies(img, geometry, grid, cells, settings))
    # the defect list's header counts the edge dies compared
    _, stats, _ = die_to_die_patches((0.0, 0.0), 4 * p, img, geometry, grid, usable, 0.7,
                                  settings)
    assert (stats.dies, stats.partial_dies) == (12, 3)


@pytest.mark.parametrize("size", [1, 2, 4, 5])
def test_opened_max_at_the_map_pixels_equals_scipys_filters(size):
    from scanner.inspection.dietodie import opened_max_at

    rng = np.random.default_rng(size)
    z = rng.random((41, 53)).astype(np.float32)
    # the union of the openings by the two-pixel elements {centre, neighbour}
    openings = []
    for d in [(0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2)]:
        pair = np.zeros((3, 3), dtype=bool)
        pair[1, 1] = pair[d] = True
        openings.append(ndimage.grey_opening(z, footprint=pair, mode="nearest"))
    full = np.max(openings, axis=0)
    full = ndimage.maximum_filter(full, size=size, mode="nearest") if size > 1 else full
    # inside (scipy's border treatment of a one-sided element is not an opening's)
    rows = np.array([3, 7, 20, 37])
    cols = np.array([3, 13, 26, 49])
    np.testing.assert_allclose(opened_max_at(z, rows, cols, size), full[np.ix_(rows, cols)])


def test_the_opening_keeps_a_line_one_pixel_wide_and_drops_a_lone_pixel():
    from scanner.inspection.dietodie import opened_max_at

    z = np.zeros((40, 40), dtype=np.float32)
    for k in range(5, 35):
        z[k, k] = 30.0  # a diagonal scratch one pixel wide
    z[30, 8] = 50.0  # a lone pixel
    every = np.arange(40)
    out = opened_max_at(z, every, every, 1)
    assert out[20, 20] == 30.0 and out[30, 8] == 0.0


def test_a_layout_repeated_only_2x2_is_compared_on_a_padded_mosaic() -> None:
    # every die of a 2 x 2 product touches the image's border, and the scan ends 2 px past
    # it: no die has room to be aligned, so nothing was compared; padded, all four are
    from skimage import data

    from scanner.diegrid import estimate_grid
    from scanner.inspection.inspect import _with_room

    tile = data.brick()[:200, :200].astype(np.float32) + 20.0
    product = np.tile(tile, (2, 2))
    product[250:268, 300:318] *= 0.3  # a dark spot in die (1, 1)
    img = np.pad(product, 2, mode="constant", constant_values=5.0)  # the surround scanned
    rng = np.random.default_rng(0)
    img = (img + rng.normal(0, 1.0, img.shape)).astype(np.float32)
    geometry = MosaicGrid((-2.0, -2.0), 1.0, img.shape)  # product pixel (0, 0) at (0, 0) µm
    usable = box(-0.5, -0.5, 399.5, 399.5)
    valid = np.zeros(img.shape, bool)
    valid[2:402, 2:402] = True
    grid = estimate_grid(img, 1.0, (-2.0, -2.0), valid)
    assert grid is not None and grid.pitch_um == pytest.approx((200.0, 200.0), abs=0.5)
    _, stats, _ = die_to_die_patches((0.0, 0.0), 4.0, img, geometry, grid, usable, 0.7,
                                     settings=DieToDie(block_px=64))
    assert stats.dies == 0  # as it was
    image, pyramid, area, pad = _with_room([img], geometry, grid, usable)
    assert pad > 0 and image.shape == (img.shape[0] + 2 * pad, img.shape[1] + 2 * pad)
    padded = MosaicGrid((-2.0 - pad, -2.0 - pad), 1.0, image.shape)
    anomaly = np.zeros((101, 101), np.float32)  # map pixel (i, j): product (4i + 1.5, 4j + 1.5)
    patches, stats, _ = die_to_die_patches((1.5, 1.5), 4.0, image, padded, grid, area, 0.7,
                                           settings=DieToDie(block_px=64))
    apply_patches(anomaly, patches)
    assert stats.dies == 4
    over = np.argwhere(anomaly >= 0.7)
    assert len(over) and np.all(np.abs(over * 4 + 1.5 - (259, 309)) < 24)


def test_a_2x2_layout_found_a_few_pixels_off_still_has_room_for_every_die() -> None:
    # a grid found in a coarse pyramid level is good to a pixel of that level (4 um at
    # level 2 of a 2,200 px mosaic): the lower dies then reach 4 um past the image, where
    # the scan ended 2 px past it. Padded by the alignment margin alone they had no room
    # (a mirrored grass texture: 2 dies, nothing compared)
    from scanner.diegrid import DieGrid
    from scanner.inspection.dietodie import _margin, full_dies
    from scanner.inspection.inspect import _search_level, _with_room

    side = 1100
    img = np.pad(np.ones((2 * side, 2 * side), np.float32), 2, constant_values=0.1)
    geometry = MosaicGrid((-2.0, -2.0), 1.0, img.shape)
    usable = box(-0.5, -0.5, 2 * side - 0.5, 2 * side - 0.5)
    levels = [img, img[::2, ::2], img[::4, ::4]]
    assert _search_level(levels) == 2
    grid = DieGrid(pitch_um=(float(side), float(side)), origin_um=(0.0, 4.0))
    margin = _margin(DieToDie())
    assert len(full_dies(grid, usable, geometry, margin_px=margin)) < 3  # no room as scanned
    image, _, area, pad = _with_room(levels, geometry, grid, usable)
    padded = MosaicGrid((-2.0 - pad, -2.0 - pad), 1.0, image.shape)
    assert len(full_dies(grid, area, padded, margin_px=margin)) == 4


def test_mosaic_pixels_no_tile_covered_are_not_compared(monkeypatch) -> None:
    # the stage landed the last tile row a few micrometres short: the mosaic's last rows
    # inside the image are 0 over part of its width (no tile covered them)
    from skimage import data

    import scanner.inspection.dietodie as dietodie
    from scanner.diegrid import estimate_grid
    from scanner.inspection.inspect import _with_room

    tile = data.brick()[:200, :200].astype(np.float32) + 20.0
    product = np.tile(tile, (2, 2))
    product[250:268, 300:318] *= 0.3  # a dark spot in die (1, 1)
    img = np.pad(product, 2, mode="constant", constant_values=5.0)
    rng = np.random.default_rng(0)
    img = (img + rng.normal(0, 1.0, img.shape)).astype(np.float32)
    img[397:, 230:380] = 0.0  # not scanned: the product's last 3 rows there, and beyond
    geometry = MosaicGrid((-2.0, -2.0), 1.0, img.shape)
    usable = box(-0.5, -0.5, 399.5, 399.5)
    valid = np.zeros(img.shape, bool)
    valid[2:402, 2:402] = True
    grid = estimate_grid(img, 1.0, (-2.0, -2.0), valid)
    image, _, area, pad = _with_room([img], geometry, grid, usable)
    padded = MosaicGrid((-2.0 - pad, -2.0 - pad), 1.0, image.shape)

    def flagged() -> np.ndarray:
        anomaly = np.zeros((101, 101), np.float32)
        patches, stats, _ = die_to_die_patches((1.5, 1.5), 4.0, image, padded, grid, area, 0.7,
                                               settings=DieToDie(block_px=64))
        assert stats.dies == 4
        apply_patches(anomaly, patches)
        return np.argwhere(anomaly >= 0.7) * 4 + 1.5  # product (row, col) of flagged pixels

    over = flagged()
    assert len(over) and np.all(np.abs(over - (259, 309)) < 24)  # the spot, and only it
    # read as data, the zeros were a line of false defects along the strip
    monkeypatch.setattr(dietodie, "scanned_mask", lambda test, mask: mask)
    assert np.any(flagged()[:, 0] > 380)


def test_largest_z_of_a_good_mosaic_sets_the_z_threshold_a_defect_exceeds():
    from scanner.inspection.dietodie import calibrated_z_threshold, largest_z

    img, geometry, grid, usable, _ = _mosaic(defect=None)
    good = largest_z(img, geometry, grid, usable, DieToDie(block_px=64))
    assert good is not None
    z_good, zt_good, dies = good
    assert dies == 9 and 0 < z_good < 13 and 0 < zt_good < 13
    bad, geometry, grid, usable, _ = _mosaic(defect=(1, 1))
    z_bad, _, _ = largest_z(bad, geometry, grid, usable, DieToDie(block_px=64))
    assert z_bad > calibrated_z_threshold(z_good)
    # the calibration: 1.5 x the good scan's largest z, within [7, the default 13]
    assert calibrated_z_threshold(2.0) == 7.0
    assert calibrated_z_threshold(6.0) == 9.0
    assert calibrated_z_threshold(20.0) == 13.0
    # fewer than three dies: nothing to calibrate on
    two = DieGrid(grid.pitch_um, grid.origin_um)
    small = box(0, 0, 2 * grid.pitch_um[0] + 130, grid.pitch_um[1] + 130)
    assert largest_z(img, geometry, two, small, DieToDie(block_px=64)) is None


def test_texture_z_finds_a_flat_patch_that_the_intensity_envelope_hides():
    from scipy import ndimage

    from scanner.inspection.dietodie import band_z, difference_z, texture_z

    rng = np.random.default_rng(3)
    # a grass-like texture: fine detail of +-30 % around a level of 1000
    base = 1000 * (1 + 0.3 * ndimage.gaussian_filter(rng.normal(size=(200, 200)), 1.2) / 0.2)
    shots = [np.roll(base, (dy, dx), (0, 1)) + rng.normal(0, 5, base.shape)
             for dy, dx in ((0, 0), (1, 0), (0, 1), (-1, 0), (0, -1))]  # 1 px misalignment
    test, refs = shots[0].astype(np.float32), np.stack(shots[1:]).astype(np.float32)
    patch = (slice(80, 110), slice(90, 120))
    test[patch] = float(np.mean(base))  # the texture missing, filled with the level
    settings = DieToDie()
    z = difference_z(test, refs, settings.scales_px, settings.tolerance_px)
    zt = texture_z(test, refs)
    inside = (slice(88, 102), slice(98, 112))
    assert z[inside].max() < settings.z_threshold  # inside the references' envelope
    assert zt[inside].min() > 1.5 * settings.texture_z_threshold
    away = (slice(10, 60), slice(10, 60))
    assert zt[away].max() < 7.0  # misalignment by a pixel is not a texture difference
    # put on the intensity's scale by the ratio of the thresholds
    both = band_z(test, refs, DieToDie(z_threshold=8.0, texture_z_threshold=16.0))
    assert np.allclose(both[inside], np.maximum(z, zt * 0.5)[inside])


def test_a_found_grid_whose_good_dies_differ_far_beyond_any_threshold_is_left(monkeypatch):
    from scanner.inspection import inspect as ins

    calls = []
    monkeypatch.setattr(ins, "scan_json_if_any", lambda folder: {})
    monkeypatch.setattr(ins, "_saved_sample", lambda folder, scan: object())
    monkeypatch.setattr(ins, "_usable_polygon", lambda sample, alignment=None: object())
    monkeypatch.setattr(ins, "_compared_image",
                        lambda *a: (None, None, None, None, 0))
    monkeypatch.setattr(ins, "_mosaic_grid", lambda mosaic: None)

    def grid(source):
        return lambda *a: ([None], object(), source)

    for source, z in (("found in the mosaic", 38.5), ("found in the mosaic", 14.3),
                      ("recipe", 38.5)):
        monkeypatch.setattr(ins, "_die_grid", grid(source))
        monkeypatch.setattr("scanner.inspection.dietodie.largest_z",
                            lambda *a, z=z, **k: (z, 1.0, 8))
        out = ins.good_scan_die_to_die(Path("scan"))
        calls.append(out.get("found_grid_repeats"))
        assert out["z_threshold"] == 13.0
    assert calls == [False, True, None]  # a recipe's grid is the user's word: kept
    # inspection then leaves a found grid, not a declared one
    monkeypatch.setattr(ins, "_die_grid", grid("found in the mosaic"))
    assert ins._die_to_die(Path("m"), object(), object(), 1.0, found_grid=False) is None
    assert ins._die_to_die(Path("m"), object(), object(), 1.0, found_grid=True) is not None
    monkeypatch.setattr(ins, "_die_grid", grid("recipe"))
    assert ins._die_to_die(Path("m"), object(), object(), 1.0, found_grid=False) is not None


def _star_field(phase: tuple[float, float], rng: np.random.Generator, sigma: float = 0.8,
                shape: tuple[int, int] = (200, 240)) -> np.ndarray:
    """One die of a field of point-like features (the same 40 in every die) sampled at a
    sub-pixel ``phase``, with 1 % noise."""
    layout = np.random.default_rng(5)
    ys, xs = layout.uniform(12, shape[0] - 12, 40), layout.uniform(12, shape[1] - 12, 40)
    amp = layout.uniform(300, 1500, 40)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    img = np.full(shape, 1000.0)
    for y, x, a in zip(ys + phase[0], xs + phase[1], amp, strict=True):
        img += a * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * sigma ** 2))
    return img + rng.normal(0, 10, shape)


def test_point_features_sampled_at_another_phase_are_not_defects(monkeypatch):
    # the camera samples each die at its own sub-pixel phase: a point feature centred on a
    # pixel peaks 20-30 % higher than one centred on a pixel corner (a Hubble-field die grid:
    # 2 false defects on stars and galaxies of the defective scan, z 8-9 against 7)
    import scanner.inspection.dietodie_maths as maths

    rng = np.random.default_rng(1)
    refs = np.stack([_star_field((0.5, 0.5), rng) for _ in range(4)])
    test = _star_field((0.0, 0.0), rng)
    yy, xx = np.mgrid[:200, :240]
    spot = (yy - 100) ** 2 + (xx - 30) ** 2 <= 4 ** 2  # 8 px, 15 % darker, on the background
    scales = DieToDie().scales_px
    z = difference_z(test, refs, scales)
    z_spot = difference_z(np.where(spot, test * 0.85, test), refs, scales)
    assert z.max() < 7.0  # MIN_Z_THRESHOLD: the lowest a good scan can set
    assert z_spot[spot].max() > DieToDie().z_threshold
    monkeypatch.setattr(maths, "PHASE_TOLERANCE_PX", 0.0)
    assert difference_z(test, refs, scales).max() > 7.0  # what the tolerance is for


def _grid_cut_through_structure(n: int = 4, die_px: int = 160, pad: int = 60):
    """A mosaic of n x n dies whose cells cut through the design (no street: rectangles of
    several levels reach every border), each die at its own sub-pixel offset."""
    rng = np.random.default_rng(0)
    layout = np.random.default_rng(5)
    big = np.full((die_px + 40, die_px + 40), 1000.0)
    for _ in range(40):
        y, x = layout.integers(0, die_px + 32, 2)
        dy, dx = layout.integers(4, (die_px + 40) // 3, 2)
        big[y:y + dy, x:x + dx] = layout.choice([400.0, 1600.0, 2200.0])
    img = np.full((n * die_px + 2 * pad,) * 2, 1000.0)
    for r in range(n):
        for c in range(n):
            die = ndimage.shift(big, rng.uniform(-0.7, 0.7, 2), order=1)[20:-20, 20:-20]
            y, x = pad + r * die_px, pad + c * die_px
            img[y:y + die_px, x:x + die_px] = die
    img = (ndimage.gaussian_filter(img, 1.0) + rng.normal(0, 10, img.shape)).astype(np.float32)
    p = 2.0
    geometry = MosaicGrid((0.0, 0.0), p, img.shape)
    grid = DieGrid((die_px * p, die_px * p), (pad * p, pad * p))
    usable = box(-1.0, -1.0, img.shape[1] * p, img.shape[0] * p)
    return img, geometry, grid, full_dies(grid, usable, geometry, margin_px=8)


def test_a_die_border_cutting_through_structure_is_not_a_defect_and_one_there_is():
    # scored with each die mirrored at its border, the references' envelope there saw one
    # side only: this good mosaic's sub-pixel offsets scored z 18.6 along die edges (a line
    # one map pixel wide: a false scratch); with the neighbours as context, 2.1
    img, geometry, grid, cells = _grid_cut_through_structure()
    assert len(cells) == 16
    settings = DieToDie(block_px=64)
    assert max(float(z.max()) for *_, z in compare_dies(img, geometry, grid, cells, settings)) < 7.0
    # an 8 px spot 40 % darker, one pixel inside die (1, 2)'s left border
    y, x = 60 + 2 * 160 + 70, 60 + 160 + 1
    img[y:y + 8, x:x + 8] *= 0.6
    hot = [cell for cell, _, _, z in compare_dies(img, geometry, grid, cells, settings)
           if z.max() > settings.z_threshold]
    assert hot == [(1, 2)]


@pytest.mark.parametrize("inside_px", [2, 10])
def test_the_same_defect_in_two_neighbouring_dies_near_their_border_is_found_in_both(inside_px):
    # each die is the other's reference: along a die's border the z in context left the
    # odd reference in, its spot held the test's inside the envelope, and both were missed
    # (z under 4 up to 10 px inside); arbitrated there too, as inside the die, z over 40
    img, geometry, grid, cells = _grid_cut_through_structure()
    settings = DieToDie(block_px=64)
    for col in (1, 2):  # an 8 px spot 40 % darker, inside_px inside dies (1, 2) and (2, 2)
        y, x = 60 + 2 * 160 + 70, 60 + col * 160 + inside_px
        img[y:y + 8, x:x + 8] *= 0.6
    hot = [cell for cell, _, _, z in compare_dies(img, geometry, grid, cells, settings)
           if z.max() > settings.z_threshold]
    assert hot == [(1, 2), (2, 2)]


@pytest.mark.parametrize("n", [1575, 551, 300, 100])
def test_no_alignment_block_is_a_thin_strip(n):
    # a die 1,575 px high left a block row of 39 px under its last 256 px blocks: aligned on
    # its own it chose a shift 1.5 px off the die's on a brick wall's mortar line, and the
    # good scan scored z 43 there. The remainder joins the last block; rows index blocks
    # with min(row // b, count - 1), as the comparison reads them
    from scanner.inspection.dietodie_geometry import _blocks

    b = 256
    blocks = _blocks(n, b)
    assert blocks[0][0] == 0 and blocks[-1][1] == n
    assert all(hi == lo for (_, hi), (lo, _) in zip(blocks[:-1], blocks[1:], strict=True))
    assert all(hi - lo >= min(n, b / 2) for lo, hi in blocks)
    rows = np.arange(n)
    index = np.minimum(rows // b, len(blocks) - 1)
    for k, (lo, hi) in enumerate(blocks):
        assert np.all(index[lo:hi] == k)


def _turned_part_on_a_chuck(turn_deg: float = 2.0, n: int = 5, die_px: int = 160,
                            street_px: int = 24, pad: int = 90) -> tuple[np.ndarray, Any]:
    """A part of n x n dies (one design, bright streets) laid ``turn_deg`` turned on a dark
    chuck that the image shows around it; and the part's outline in image pixels."""
    from shapely import affinity
    from skimage.transform import rotate

    pitch = die_px + street_px
    side = n * pitch + 2 * pad
    img = np.full((side, side), 400.0)  # the chuck
    img[pad:pad + n * pitch, pad:pad + n * pitch] = 1000.0  # the part's streets
    design = _design(die_px, die_px, seed=5)
    for r in range(n):
        for c in range(n):
            y, x = pad + r * pitch + street_px // 2, pad + c * pitch + street_px // 2
            img[y:y + die_px, x:x + die_px] = design
    turned = rotate(img, turn_deg, order=1, mode="constant", cval=400.0, preserve_range=True)
    outline = box(pad - 0.5, pad - 0.5, pad + n * pitch - 0.5, pad + n * pitch - 0.5)
    # skimage turns the picture counter-clockwise on screen: clockwise in (column, row) axes
    outline = affinity.rotate(outline, -turn_deg, origin=((side - 1) / 2, (side - 1) / 2))
    return turned.astype(np.float32), outline


def test_a_part_turned_on_its_chuck_is_compared_on_the_part_only():
    # the chuck fills a sliver of the edge dies, which still correlate with the others: before
    # on_part they were compared there, and the good part's dies differed far beyond any
    # threshold (its found layout judged no repeat). (Since the found grid's cells start in
    # its street, the chuck no longer reaches into whole dies here: on_part's own test follows.)
    from scanner.inspection.goodimages import good_image_die_to_die

    img, outline = _turned_part_on_a_chuck()
    pixel = 2.0
    record = good_image_die_to_die(img, pixel)
    assert record is not None and record["found_grid_repeats"]
    assert record["good_max_z"] < 13.0 and record["dies"] >= 25


def test_on_part_leaves_out_the_chuck_but_not_a_defect_inside_the_part():
    from shapely import affinity

    from scanner.diegrid import estimate_grid
    from scanner.inspection.dietodie_alike import on_part

    img, outline = _turned_part_on_a_chuck()
    img[500:530, 480:520] = 1000.0  # a missing piece of pattern, well inside the part
    pixel = 2.0
    part_um = affinity.scale(outline, pixel, pixel, origin=(0, 0))
    geometry = MosaicGrid((0.0, 0.0), pixel, img.shape)
    usable = box(-1.0, -1.0, img.shape[1] * pixel - 1.0, img.shape[0] * pixel - 1.0)
    small = ndimage.zoom(img, 0.5, order=1)
    grid = estimate_grid(small, 2 * pixel, (0.5 * pixel, 0.5 * pixel))
    assert grid is not None and abs(abs(grid.rotation_deg) - 2.0) < 0.3
    kept = on_part(img, geometry, grid, usable)
    surround = usable.difference(part_um)
    # most of the surround is left out, almost none of the part
    assert kept.intersection(surround).area < 0.2 * surround.area
    assert part_um.difference(kept).area < 0.03 * part_um.area
    assert kept.contains(box(480 * pixel, 500 * pixel, 520 * pixel, 530 * pixel))
    # a part filling the image: nothing is left out
    full = img[200:700, 200:700].copy()
    g2 = MosaicGrid((200 * pixel, 200 * pixel), pixel, full.shape)
    u2 = box(199 * pixel, 199 * pixel, 699 * pixel, 699 * pixel)
    # (blocks of the thumbnails that the image's border cuts read part zeros: before they were
    # taken for surround, and strips along the border and a corner, 1.1 % of the part, were
    # left out once the found grid's cells started in the street)
    assert on_part(full, g2, grid, u2).area > 0.999 * u2.area


def test_die_to_die_on_a_band_counts_only_the_dies_the_band_holds():
    # a band across a 100 mm wafer: the wafer's whole usable area counted 89 dies where none had
    # room, so the band's dies were neither compared on their part nor left to the repeaters
    from shapely.geometry import Point

    from scanner.inspection.dietodie_geometry import full_dies
    from scanner.inspection.inspect import _scanned_part

    wafer = Point(0.0, 0.0).buffer(47_000.0, 256)
    band = MosaicGrid((-48_000.0, -5_730.0), 5.0, (1947, 19200))  # y -5730 .. 4000 um
    grid = DieGrid((8000.0, 8000.0), (-4000.0, -4000.0))
    part = _scanned_part(wafer, band)
    assert part.bounds[1] == pytest.approx(-5_732.5) and part.bounds[3] == pytest.approx(4_002.5)
    assert len(grid.cells_in(part)) <= 39 < 100 < len(grid.cells_in(wafer))  # 3 rows of 13
    assert not full_dies(grid, part, band, margin_px=8)  # row 0 ends 2.5 um from the band's edge


def _band_of_partial_dies(defect: tuple[int, int] | None = (1, 1),
                          blank: tuple[int, int] | None = None):
    """A band across 4 x 4 dies of 160 px, narrower than two dies and holding none whole:
    die row 1 cut at its in-die row 40, die row 2 at its row 120 (the mosaic is the band
    and 5 px beyond it, as a band scan's)."""
    img, _, grid, _, truth = _mosaic(n=4, defect=defect, blank=blank)
    p = 2.0
    r0 = 250  # mosaic rows 250-504: die row 1 from its row 30, die row 2 to its row 125
    band = img[r0:505]
    geometry = MosaicGrid((0.0, r0 * p), p, band.shape)
    usable = box(-1.0, (60 + 160 + 40) * p, img.shape[1] * p, (60 + 320 + 120) * p)
    truth = None if truth is None else (truth[0] - r0, truth[1])
    return band, geometry, grid, usable, truth


def test_a_band_holding_no_whole_die_compares_the_dies_it_cuts_alike():
    # a band narrower than a die (a 76 mm wafer's band of 6 mm, dies 4.8 mm high cut by it):
    # no full die, so nothing was compared and the network alone missed every in-band defect
    from scanner.inspection.dietodie import calibrated_z_threshold, largest_z

    band, geometry, grid, usable, truth = _band_of_partial_dies()
    settings = DieToDie(block_px=64)
    assert not full_dies(grid, usable, geometry, margin_px=8)
    partial = [(c, r) for c, r, _ in grid.cells_in(usable)]
    hot, seen = [], set()
    for cell, r0, c0, z in compare_dies(band, geometry, grid, [], settings, partial, usable):
        seen.add(cell)
        if z.max() > settings.z_threshold:
            rr, cc = np.unravel_index(np.argmax(z), z.shape)
            hot.append((cell, r0 + rr, c0 + cc))
    assert seen == {(c, r) for c in range(4) for r in (1, 2)}
    assert [h[0] for h in hot] == [(1, 1)]  # the defect, in its own die only
    assert math.hypot(hot[0][1] - truth[0], hot[0][2] - truth[1]) < 12
    patches, stats, comparison = die_to_die_patches((0.0, geometry.origin_um[1]), 8.0, band,
                                                    geometry, grid, usable, 0.7, settings)
    assert (stats.dies, stats.partial_dies) == (0, 8) and comparison is not None and patches
    # the defect list measures the defect on its difference from the same row's dies
    r, c = truth
    z_at = [float(np.nanmax(comparison.difference(band, r - 16, c - 16 + dc, 32, 32)[1]))
            for dc in (0, 160)]  # the defect, and the same place of the next die
    assert z_at[0] > settings.z_threshold and z_at[1] < 4.0
    # the calibration on a good band: the same comparison, its largest z under a defect's
    good, geometry, grid, usable, _ = _band_of_partial_dies(defect=None)
    z_good, zt_good, dies = largest_z(good, geometry, grid, usable, settings)
    assert dies == 8 and 0 < z_good < 13 and 0 < zt_good < 13
    z_bad, _, _ = largest_z(band, geometry, grid, usable, settings)
    assert z_bad > calibrated_z_threshold(z_good)
    # a blank die of a row is neither compared nor a reference of its row's dies
    blank, geometry, grid, usable, _ = _band_of_partial_dies(defect=None, blank=(2, 1))
    out = list(compare_dies(blank, geometry, grid, [], settings, partial, usable))
    assert {c for c, *_ in out} == seen - {(2, 1)}
    assert max(float(z.max()) for *_, z in out) < settings.z_threshold
    # the dies of each die row are cut alike: one group per row; the empty surround beside
    # the dies (columns -1 and 4, in the band too) is unlike them
    from scanner.inspection.dietodie_alike import partial_die_groups
    from scanner.inspection.dietodie_geometry import UsableArea

    groups, _, _ = partial_die_groups(band, geometry, grid, partial,
                                      UsableArea(usable, geometry, settings.tolerance_px))
    assert sorted(sorted(g) for g, _ in groups) == [[(c, 1) for c in range(4)],
                                                     [(c, 2) for c in range(4)]]


def test_a_band_holding_no_whole_die_is_compared_unpadded():
    # padding a band by mirroring makes no die whole; compared in the mirror, a die row's
    # dies, mirrored at rows a pixel apart, differed there (false scratches along the band)
    from scanner.inspection.inspect import _with_room

    band, geometry, grid, usable, _ = _band_of_partial_dies()
    image, pyramid, area, pad = _with_room([band], geometry, grid, usable)
    assert pad == 0 and image is band and area is usable and pyramid == [band]


def test_room_is_made_again_when_the_parts_surround_leaves_too_few_dies(monkeypatch):
    # a staggered layout found at another phase: 4 whole dies had room to be aligned until
    # the part's surround (the empty ends of its rows) was left out; then 2, and nothing was
    # compared, without a word
    import scanner.inspection.dietodie_alike as alike
    import scanner.inspection.inspect as ins
    from scanner.inspection.dietodie import _margin, full_dies

    # a 3 x 2 die product reaching the mosaic's left and lower borders, its surround scanned
    # above it and to its right
    img = np.pad(np.ones((400, 600), np.float32), ((60, 0), (0, 260)), constant_values=0.1)
    geometry = MosaicGrid((0.0, -60.0), 1.0, img.shape)
    scanned = box(-0.5, -60.5, 859.5, 399.5)
    part = box(-0.5, -0.5, 600.5, 400.5)  # as on_part leaves it (a found grid's precision)
    grid = DieGrid(pitch_um=(200.0, 200.0), origin_um=(0.0, 0.0))
    margin = _margin(DieToDie())
    assert len(full_dies(grid, scanned, geometry, margin_px=margin)) == 3  # one in the surround
    assert len(full_dies(grid, part, geometry, margin_px=margin)) == 2
    monkeypatch.setattr(alike, "on_part", lambda level0, mosaic, grid, polygon, pyramid=None:
                        part)
    image, padded, _, area, pad = ins._compared_image(geometry, [img], grid, scanned, "image")
    assert pad > 0 and image.shape == (img.shape[0] + 2 * pad, img.shape[1] + 2 * pad)
    assert len(full_dies(grid, area, padded, margin_px=margin)) == 6


def test_many_dies_are_each_judged_against_a_sample_of_the_others(monkeypatch):
    # a repeat of a few pixels found in an image sample made 32,000 "dies": their n x n
    # correlation matrix took 4 GB and minutes; each die now meets at most MAX_COMPARED
    import scanner.inspection.dietodie_alike as alike_module

    rng = np.random.default_rng(0)
    design = rng.random((16, 16)).astype(np.float32)
    img = np.tile(design, (30, 30)) + rng.normal(0, 0.02, (480, 480)).astype(np.float32)
    img[16 * 7:16 * 8, 16 * 11:16 * 12] = rng.random((16, 16))  # one die of another design
    geometry = MosaicGrid((0.0, 0.0), 1.0, img.shape)
    grid = DieGrid(pitch_um=(16.0, 16.0), origin_um=(-0.5, -0.5))
    cells = [(c, r) for r in range(30) for c in range(30)]
    monkeypatch.setattr(alike_module, "MAX_COMPARED", 100)
    kept, anchor = alike_dies(img, geometry, grid, cells)
    assert (11, 7) not in kept and len(kept) == len(cells) - 1 and anchor in kept


def test_a_defect_crossing_a_die_border_is_bridged_and_one_die_alone_is_not():
    from scanner.inspection.dietodie_maps import bridge_die_borders

    grid = DieGrid((40.0, 40.0), (0.0, 0.0))  # lines every 40 map px (1 um map pixels)
    anomaly = np.zeros((120, 120), np.float32)
    anomaly[50:60, 30:37] = 2.0  # a stain's left part, dipping towards the line at x = 40
    anomaly[50:60, 44:50] = 1.8  # ... and its right part
    anomaly[90:100, 72:78] = 2.0  # one die's defect beside the line at x = 80, nothing across
    compared = np.ones(anomaly.shape, bool)
    raised = bridge_die_borders(anomaly, compared, grid, (0.0, 0.0), 1.0, gap_px=3)
    assert raised > 0
    assert (anomaly[50:60, 37:44] == 1.8).all()  # across the line: what both sides hold
    assert anomaly[90:100, 78:90].max() == 0.0  # not carried across
    assert anomaly[:50].max() == 0.0 and anomaly[60:90].max() == 0.0
    # outside the dies compared nothing moves
    again = np.zeros((120, 120), np.float32)
    again[50:60, 30:37], again[50:60, 44:50] = 2.0, 1.8
    assert bridge_die_borders(again, np.zeros(again.shape, bool), grid, (0.0, 0.0), 1.0, 3) == 0


def test_partial_dies_cut_by_the_left_border_are_read_where_their_design_lies():
    # an image file of a texture tile repeated without a street, its repeat found with the
    # dies' corners on pixel edges and a pitch a hair long: the full dies' corners rounded up
    # (x 265.5026 -> 266), those of the dies cut by the left border down (-246.5026 -> -247),
    # and that column of partial dies, compared a pixel off its references, scored false
    # defects 4-8 px from the border (z 29-34)
    rng = np.random.default_rng(3)
    tile = ndimage.gaussian_filter(rng.normal(1000.0, 300.0, (256, 256)), 1.0, mode="wrap")
    img = np.tile(tile, (5, 5))[:1200, :1200].astype(np.float32)
    geometry = MosaicGrid((0.0, 0.0), 1.0, img.shape)
    grid = DieGrid(pitch_um=(256.0026, 256.0021), origin_um=(9.5, 1.5))
    anomaly = np.zeros((300, 300), np.float32)
    patches, stats, _ = die_to_die_patches((1.5, 1.5), 4.0, img, geometry, grid,
                                           geometry.outline(), 1.0)
    assert stats.dies == 9 and stats.partial_dies > 0
    apply_patches(anomaly, patches)
    assert anomaly.max() < 1.0


def _turned_dies_beside_bare_ones(turn_deg: float, n: int = 5, die_px: int = 160,
                                  street_px: int = 4, pad: int = 90
                                  ) -> tuple[np.ndarray, DieGrid, set[tuple[int, int]]]:
    """n x n cells of one design with narrow streets, the last column's unexposed (bare) but
    for its middle die, as a round wafer's edge staggers, all turned ``turn_deg`` about the
    image centre; the grid (stage = pixels x 2 um) and the bare cells."""
    from skimage.transform import rotate

    pitch = die_px + street_px
    side = n * pitch + 2 * pad
    img = np.full((side, side), 1000.0)  # the streets; bare dies darker (unexposed)
    design = _design(die_px, die_px, seed=5)
    bare = {(n - 1, r) for r in range(n) if r != n // 2}
    for r in range(n):
        for c in range(n):
            y, x = pad + r * pitch + street_px // 2, pad + c * pitch + street_px // 2
            img[y:y + die_px, x:x + die_px] = 300.0 if (c, r) in bare else design
    turned = rotate(img, turn_deg, order=1, mode="edge", preserve_range=True)
    # skimage turns counter-clockwise on screen: the grid turns by -turn_deg in (x, y)
    p, c0 = 2.0, (side - 1) / 2
    t = math.radians(-turn_deg)
    ox, oy = pad - 0.5 - c0, pad - 0.5 - c0
    origin = (c0 + math.cos(t) * ox - math.sin(t) * oy, c0 + math.sin(t) * ox + math.cos(t) * oy)
    grid = DieGrid(pitch_um=(pitch * p, pitch * p), origin_um=(origin[0] * p, origin[1] * p),
                   rotation_deg=-turn_deg)
    return turned.astype(np.float32), grid, bare


@pytest.mark.parametrize("turn_deg", [0.0, 1.5])
def test_dies_beside_bare_ones_on_a_turned_grid_are_not_defects(turn_deg):
    # a die's stage-aligned box holds wedges of its neighbours on a turned grid, each die its
    # own neighbour's: beside a bare edge die the test's wedge was bare where its references'
    # were patterned (or the other way round), and scored z 27-100 along the die's border
    # (five false "scratches" on a 50 mm wafer placed 0.7 deg turned)
    img, grid, bare = _turned_dies_beside_bare_ones(turn_deg)
    geometry = MosaicGrid((0.0, 0.0), 2.0, img.shape)
    cells = [(c, r) for r in range(5) for c in range(5) if (c, r) not in bare]
    settings = DieToDie(block_px=64)
    worst = max(float(z.max()) for *_, z in compare_dies(img, geometry, grid, cells, settings))
    assert worst <= settings.z_threshold, worst


def _unlike_by_every_pixel(plan: Any, cell: tuple[int, int], refs: list[tuple[int, int]],
                           r0: int, c0: int, h: int, w: int) -> np.ndarray | None:
    """``_unlike_neighbours`` as it was written first: the cell coordinates of every pixel."""
    grid, mosaic = plan.grid, plan.mosaic
    p = mosaic.pixel_size_um
    px, py = grid.pitch_um
    x = mosaic.origin_um[0] + (c0 + np.arange(w)) * p
    y = mosaic.origin_um[1] + (r0 + np.arange(h)) * p
    turn = math.radians(grid.rotation_deg)
    cs, sn = math.cos(turn), math.sin(turn)
    dx, dy = x[None, :] - grid.origin_um[0], y[:, None] - grid.origin_um[1]
    u = cs * dx + sn * dy - cell[0] * px
    v = -sn * dx + cs * dy - cell[1] * py
    dc = np.where(u < -p, -1, np.where(u >= px + p, 1, 0))
    dr = np.where(v < -p, -1, np.where(v >= py + p, 1, 0))
    out = np.zeros((h, w), dtype=bool)
    for i in (-1, 0, 1):
        for j in (-1, 0, 1):
            if (i, j) != (0, 0) and any((c[0] + i, c[1] + j) not in plan.fields
                                        for c in [cell, *refs]):
                out |= (dc == i) & (dr == j)
    return out if out.any() else None


@pytest.mark.parametrize("turn_deg", [0.7, -0.0011, -0.4, 3.0])
def test_unlike_neighbours_found_by_bisection_as_by_every_pixel(turn_deg: float) -> None:
    """The wedges of neighbouring cells not compared are the pixels the cell coordinates of
    every pixel give (found by bisection along rows and columns), and a die amid compared
    dies has none."""
    from types import SimpleNamespace

    from scanner.inspection.dietodie import _unlike_neighbours

    p = 2.5
    geometry = MosaicGrid((-37.3, 12.9), p, (4000, 4000))
    grid = DieGrid((1000.0, 750.0), (3.1, 40.7), rotation_deg=turn_deg)
    compared = {(c, r) for c in range(1, 8) for r in range(1, 10)} - {(4, 5)}
    plan = SimpleNamespace(grid=grid, mosaic=geometry, fields=dict.fromkeys(compared))
    ctx = 22
    cases = 0
    for cell, refs in [((3, 3), [(2, 3), (4, 3), (3, 2), (3, 4)]),  # amid compared dies
                       ((4, 4), [(3, 4), (5, 4), (4, 3)]),  # a reference beside (4, 5)
                       ((1, 1), [(2, 1), (1, 2)]),  # at the corner of the compared dies
                       ((7, 9), [(6, 9), (7, 8)])]:
        r0 = int(round((grid.origin_um[1] + cell[1] * 750.0 - geometry.origin_um[1]) / p)) - ctx
        c0 = int(round((grid.origin_um[0] + cell[0] * 1000.0 - geometry.origin_um[0]) / p)) - ctx
        for h, w in [(300 + 2 * ctx, 400 + 2 * ctx), (57, 400 + 2 * ctx)]:
            want = _unlike_by_every_pixel(plan, cell, refs, r0, c0, h, w)
            got = _unlike_neighbours(plan, cell, refs, r0, c0, h, w)
            assert (want is None) == (got is None), (cell, h, w)
            if want is not None:
                assert np.array_equal(got, want), (cell, h, w)
                cases += 1
    assert cases >= 4
    assert _unlike_neighbours(plan, (3, 3), [(2, 3), (4, 3), (3, 2), (3, 4)], 0, 0, 64,
                              64) is None


def test_a_stain_covering_a_small_die_is_not_scaled_away_as_its_illumination():
    """48 px dies (a fine array): a 13 % stain over most of one die moved that die's own
    bright pixels' median, so matching the references' gain on the die alone took the stain
    for the illumination and scaled it away. Matched over the die and the context read
    around it, the stain stands out and only that die is hot."""
    img, geometry, grid, usable, _ = _mosaic(n=12, die_px=48, defect=None, seed=3)
    cy, cx = 60 + 5 * 48 + 24, 60 + 7 * 48 + 24  # the centre of die (7, 5)
    yy, xx = np.mgrid[: img.shape[0], : img.shape[1]]
    stain = ndimage.gaussian_filter(((yy - cy) ** 2 + (xx - cx) ** 2 < 19.5 ** 2).astype(float),
                                    1.5)
    img = (img * (1.0 + 0.13 * stain)).astype(np.float32)
    cells = full_dies(grid, usable, geometry, margin_px=8)
    zmax = {cell: float(z.max()) for cell, *_, z in compare_dies(img, geometry, grid, cells)}
    hot = {cell for cell, z in zmax.items() if z > DieToDie().z_threshold}
    assert hot == {(7, 5)}, sorted(zmax.items(), key=lambda kv: -kv[1])[:3]


def test_a_difference_window_reaching_past_its_dies_border_gives_the_dies_part():
    """A defect 12 px inside a die's border: the window its measurement reads (the blurred
    map region and a margin) reaches into the street and the next die. It got no difference
    at all and was measured on the image, where a missing pattern's surroundings (the
    design) stand out more than the hole. Now the die's part of the window is compared (the
    rest NaN), and the difference of the next die's part is that die's against its own
    references (probe P22: a stain across a street was boxed over one die's part of it)."""
    img, geometry, grid, usable, _ = _mosaic(defect=None)
    r0, c0 = 60 + 160 + 6, 60 + 160 + 70  # a dark spot 6 px inside die (1, 1)'s top
    img[r0:r0 + 12, c0:c0 + 16] -= 400.0
    _, _, comparison = die_to_die_patches(
        (0.0, 0.0), 8.0, img, geometry, grid, usable, threshold=0.7,
        settings=DieToDie(block_px=64))
    got = comparison.difference(img, r0 - 20, c0 - 12, 52, 40)  # 14 px past the border
    assert got is not None
    diff, z = got
    assert diff.shape == z.shape == (52, 40)
    assert np.isnan(z[:14]).all() and not np.isnan(z[14:]).any()  # the die's part decides
    assert np.abs(diff[:14]).max() < 100.0  # the die above, against its own references
    assert np.nanmax(z[20:32, 12:28]) > DieToDie().z_threshold
    whole = comparison.difference(img, r0 - 6, c0 - 12, 38, 40)  # inside the die: as before
    assert whole is not None and np.array_equal(whole[1], z[14:])
    # the same defect reaching across the border into the die above: both parts show it
    img[r0 - 12:r0 - 8, c0:c0 + 16] -= 400.0
    _, _, comparison = die_to_die_patches(
        (0.0, 0.0), 8.0, img, geometry, grid, usable, threshold=0.7,
        settings=DieToDie(block_px=64))
    diff, z = comparison.difference(img, r0 - 20, c0 - 12, 52, 40)
    assert np.max(diff[8:12, 14:26]) < -300.0


@pytest.mark.parametrize("shape", [(64, 80), (9, 40), (40, 3), (2, 2)])
@pytest.mark.parametrize("size", [2, 3, 5, 9])
def test_extreme_filter_is_scipys(shape, size):
    """The envelope's minimum and maximum filters (dietodie_maths.extreme_filter, done as
    running extremes for speed) give scipy's values exactly, border (reflect) included, and
    the same for several images at once as one by one (texture_energy on a stack)."""
    from scanner.inspection.dietodie_maths import extreme_filter, texture_energy

    a = np.random.default_rng(size).normal(0.0, 1.0, shape).astype(np.float32)
    for op, ref in ((np.minimum, ndimage.minimum_filter), (np.maximum, ndimage.maximum_filter)):
        out = extreme_filter(a, size, op)
        assert out.dtype == a.dtype and np.array_equal(out, ref(a, size))
        holed = a.copy()
        holed[0, 0] = np.nan  # (scipy's result then depends on its order: scipy's own)
        assert np.array_equal(extreme_filter(holed, size, op), ref(holed, size), equal_nan=True)
    stack = np.random.default_rng(1).normal(100.0, 5.0, (3, 32, 40)).astype(np.float32)
    for f in (1, 2):
        one_by_one = np.stack([texture_energy(img, f) for img in stack])
        assert np.array_equal(texture_energy(stack, f), one_by_one)


def test_dies_among_more_bare_cells_than_dies_are_kept():
    # a part of 5 x 5 dies scanned with its plain surround: 56 of the grid's 81 cells are bare.
    # Each die's median correlation over all the cells was that with bare ones, near 0, and
    # no die was kept (probe P21: a camera-photo grid of 25 dies among 49 cells)
    rng = np.random.default_rng(4)
    design = rng.random((40, 40)).astype(np.float32)
    img = np.full((360, 360), 0.5, dtype=np.float32)
    img[80:280, 80:280] = np.tile(design, (5, 5))
    img += rng.normal(0, 0.01, img.shape).astype(np.float32)
    geometry = MosaicGrid((0.0, 0.0), 1.0, img.shape)
    grid = DieGrid(pitch_um=(40.0, 40.0), origin_um=(-0.5, -0.5))
    cells = [(c, r) for r in range(9) for c in range(9)]
    kept, anchor = alike_dies(img, geometry, grid, cells)
    assert sorted(kept) == sorted((c, r) for r in range(2, 7) for c in range(2, 7))
    assert anchor == (4, 4)
