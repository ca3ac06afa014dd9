"""Pairwise registration and the global solve on synthetic tiles with known offsets."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from scanner.stitching.registration.flatfield import (
    choose_flatfield,
    estimate_flatfield,
    fit_overlap_gain,
    median_thumbnail,
    overlap_blocks,
)
from scanner.stitching.registration.pairwise import PairResult, register_pair
from scanner.stitching.registration.solve import solve_positions
from simulators.camera import CameraModel


def smooth_texture(shape: tuple[int, int], seed: int = 0, sigma: float = 3.0) -> np.ndarray:
    """A band-limited random texture in [0, 1]."""
    img = ndimage.gaussian_filter(np.random.default_rng(seed).random(shape), sigma)
    img -= img.min()
    return img / img.max()


SCENE = smooth_texture((700, 700), seed=11, sigma=3.0)


def _tile(scene: np.ndarray, x: float, y: float, n: int = 192, noise: float = 0.01,
          seed: int = 0) -> np.ndarray:
    """Tile whose pixel (r, c) sees scene (y + r, x + c) (cubic interpolation), with noise."""
    rr, cc = np.mgrid[0:n, 0:n].astype(float)
    t = ndimage.map_coordinates(scene, [y + rr, x + cc], order=3, mode="nearest")
    rng = np.random.default_rng(seed)
    return (t + rng.normal(0, noise, t.shape)).astype(np.float32)


@pytest.mark.parametrize("axis", ["x", "y"])
def test_known_subpixel_shifts_are_recovered(axis: str):
    rng = np.random.default_rng(1)
    errors = []
    for k in range(12):
        err = rng.uniform(-8, 8, 2)  # stage error of tile b, px
        step = (160.0, 0.0) if axis == "x" else (0.0, 160.0)
        a = _tile(SCENE, 300, 300, seed=2 * k)
        true = np.array(step) + err
        b = _tile(SCENE, 300 + true[0], 300 + true[1], seed=2 * k + 1)
        r = register_pair(a, b, step, max_shift_px=12.0)
        assert r.ok and r.ncc > 0.9
        errors.append(np.hypot(r.dx - true[0], r.dy - true[1]))
    assert np.sqrt(np.mean(np.square(errors))) < 0.05
    assert max(errors) < 0.15


def test_periodic_pattern_does_not_snap_to_another_period():
    # a die-like pattern repeating every 24 px; the stage error is 7 px, the window 10 px
    period = 24
    rr, cc = np.mgrid[0:700, 0:700]
    cell = ((rr % period) < 6) | ((cc % period) < 4) | (((rr + 2 * cc) % period) < 3)
    scene = ndimage.gaussian_filter(cell.astype(float), 1.0) * 0.7 + 0.1
    scene += 0.02 * smooth_texture((700, 700), seed=4, sigma=2.0)  # weak non-periodic texture
    true = np.array([152.0 + 7.3, -6.6])
    a = _tile(scene, 300, 300)
    b = _tile(scene, 300 + true[0], 300 + true[1], seed=1)
    r = register_pair(a, b, (152.0, 0.0), max_shift_px=10.0)
    assert r.ok
    assert np.hypot(r.dx - true[0], r.dy - true[1]) < 0.3
    # searched over a window wider than the period, the choice is ambiguous: not trusted
    wide = register_pair(a, b, (152.0, 0.0), max_shift_px=30.0)
    assert not wide.ok or np.hypot(wide.dx - true[0], wide.dy - true[1]) < 0.3
    assert wide.peak_ratio < 1.3


def test_blank_tiles_give_no_pair():
    rng = np.random.default_rng(0)
    a = (0.5 + rng.normal(0, 0.01, (192, 192))).astype(np.float32)
    b = (0.5 + rng.normal(0, 0.01, (192, 192))).astype(np.float32)
    r = register_pair(a, b, (160.0, 0.0), max_shift_px=10.0)
    assert not r.ok
    assert r.texture < 0.25
    # vignetting alone (a smooth gradient) is not texture either
    gain = CameraModel(width=192, height=192, vignetting=0.15).vignetting_gain()
    r2 = register_pair(a * gain, b * gain, (160.0, 0.0), max_shift_px=10.0)
    assert not r2.ok


def _grid_pairs(truth: np.ndarray, n: int, blank: set[int], noise: float, outlier: bool,
                rng: np.random.Generator) -> list[PairResult]:
    pairs = []
    for r in range(n):
        for c in range(n):
            k = r * n + c
            for j in ([k + 1] if c + 1 < n else []) + ([k + n] if r + 1 < n else []):
                if k in blank or j in blank:
                    pairs.append(PairResult(k, j, np.nan, np.nan, 0.0, 0.0, 0.0, False))
                    continue
                d = truth[j] - truth[k] + rng.normal(0, noise, 2)
                pairs.append(PairResult(k, j, d[0], d[1], 0.95, 3.0, 5.0, True))
    if outlier:
        p = pairs[5]
        pairs[5] = PairResult(p.a, p.b, p.dx + 24.0, p.dy, 0.6, 1.5, 5.0, True)
    return pairs


def test_solve_agrees_with_pairs_rejects_outliers_and_keeps_blank_priors():
    rng = np.random.default_rng(3)
    n, sigma = 6, 5.0
    ideal = np.array([(c * 200.0, r * 200.0) for r in range(n) for c in range(n)])
    truth = ideal + rng.normal(0, sigma, ideal.shape)
    prior = ideal.copy()  # the stage reports where it was asked to go
    blank = {14}
    pairs = _grid_pairs(truth, n, blank, noise=0.05, outlier=True, rng=rng)
    res = solve_positions(prior, sigma, pairs)
    assert [(q.a, q.b) for q in res.rejected] == [(pairs[5].a, pairs[5].b)]
    err = res.positions - truth
    rel = err - err[[i for i in range(n * n) if i not in blank]].mean(axis=0)
    keep = [i for i in range(n * n) if i not in blank]
    assert np.sqrt(np.mean(np.sum(rel[keep] ** 2, axis=1))) < 0.1
    assert not res.constrained[14]
    np.testing.assert_allclose(res.positions[14], prior[14])  # featureless: keeps its prior


def test_flatfield_recovers_vignetting():
    cam = CameraModel(width=256, height=256, vignetting=0.12)
    gain = cam.vignetting_gain()
    rng = np.random.default_rng(0)
    tiles = np.stack([
        (smooth_texture((256, 256), seed=s, sigma=3.0) * 0.6 + 0.4) * gain * 3000
        + rng.normal(0, 20, (256, 256)) for s in range(100)
    ]).astype(np.float32)
    ff = estimate_flatfield(tiles, range(100))
    assert ff is not None
    truth = gain / gain.mean()
    assert np.abs(ff - truth).max() < 0.02
    assert estimate_flatfield(tiles[:3], range(3)) is None  # too few tiles to tell


def _die_grid_scan(gain: np.ndarray, rows: int, cols: int, step: int = 230
                   ) -> tuple[np.ndarray, dict[int, tuple[float, float]]]:
    """Tiles of a repeating product (one textured die of 200 px on a 256 px pitch, dark
    streets) under ``gain``, ``step`` px apart, and their pixel origins."""
    n = gain.shape[0]
    die = smooth_texture((200, 200), seed=5, sigma=2.0) * 0.7 + 0.3
    cell = np.full((256, 256), 0.15)
    cell[28:228, 28:228] = die
    product = np.tile(cell, (rows * step // 256 + 2, cols * step // 256 + 2))
    rng = np.random.default_rng(4)
    tiles, origins = [], {}
    for i in range(rows):
        for j in range(cols):
            y, x = i * step + int(rng.integers(-3, 4)), j * step + int(rng.integers(-3, 4))
            y, x = max(y, 0), max(x, 0)
            t = product[y:y + n, x:x + n] * gain * 3000 + rng.normal(0, 10, (n, n))
            origins[len(tiles)] = (float(y), float(x))
            tiles.append(t)
    return np.stack(tiles).astype(np.float32), origins


def test_flatfield_of_a_repeating_product_comes_from_the_overlaps():
    # a die grid puts the same content at the same few sensor positions of every tile: the
    # tiles' median shows the product, while the overlaps, which image the same points at
    # two sensor positions, show the illumination alone
    gain = CameraModel(width=256, height=256, vignetting=0.15).vignetting_gain()
    truth = gain / gain.mean()
    tiles, origins = _die_grid_scan(gain, 5, 5)
    samples = overlap_blocks(tiles, origins)
    fitted = fit_overlap_gain(samples, (256, 256))
    assert fitted is not None
    error = np.sqrt(np.mean((fitted / truth - 1) ** 2))
    median_fit = estimate_flatfield(tiles, range(len(tiles)), min_tiles=4)
    median_error = np.sqrt(np.mean((median_fit / truth - 1) ** 2))
    assert error < 0.003 and error < 0.3 * median_error  # the leak this avoids
    med = median_thumbnail(tiles, range(len(tiles)), min_tiles=4)
    chosen, name, scores = choose_flatfield(med, (256, 256), samples)
    assert name.startswith("overlaps") and np.array_equal(chosen, fitted)
    assert scores[name] < scores["none"] and scores[name] < scores[
        "tile median, polynomial order 4"]
    # one row of tiles says nothing about the gain from top to bottom: no overlap fit
    one_row, row_origins = _die_grid_scan(gain, 1, 6)
    assert fit_overlap_gain(overlap_blocks(one_row, row_origins), (256, 256)) is None


@pytest.mark.parametrize("angle_deg", [0.0, 30.0])
def test_edge_only_overlap_is_measured_across_the_edge(angle_deg: float):
    # a wafer rim or scribe line: one straight edge, no other texture (the aperture problem)
    rr, cc = np.mgrid[0:700, 0:700].astype(float)
    th = np.deg2rad(angle_deg)
    normal = np.array([np.cos(th), np.sin(th)])  # (x, y)
    dist = (cc - 472) * normal[0] + (rr - 350) * normal[1]
    scene = 0.2 + 0.6 / (1 + np.exp(-dist / 1.5))
    true = np.array([152.0 + 3.4, -5.2])
    a = _tile(scene, 300, 300, noise=0.01)
    b = _tile(scene, 300 + true[0], 300 + true[1], noise=0.01, seed=1)
    r = register_pair(a, b, (152.0, 0.0), max_shift_px=12.0)
    assert r.ok and r.is_edge
    xx, xy, yy = r.info
    np.testing.assert_allclose([xx, xy, yy], [normal[0] ** 2, normal[0] * normal[1],
                                              normal[1] ** 2], atol=0.02)
    across = (np.array([r.dx, r.dy]) - true) @ normal
    assert abs(across) < 0.1


def test_solve_takes_edge_pairs_across_only_and_rejects_impossible_pairs():
    prior = np.array([(0.0, 0.0), (200.0, 0.0), (0.0, 200.0)])
    truth = prior + [(0.0, 0.0), (3.0, -2.0), (-1.0, 2.5)]
    # tile 1 is linked by a vertical edge: x measured, y not (its y is garbage)
    edge = PairResult(0, 1, truth[1, 0] - truth[0, 0], 37.0, 0.95, np.inf, 5.0, True,
                      (1.0, 0.0, 0.0))
    # tile 2 by a pair 30 px off the stage's expectation: 6 sigma of a 2.5 px stage
    wrong = PairResult(0, 2, truth[2, 0], truth[2, 1] + 30.0, 0.6, 2.0, 5.0, True)
    res = solve_positions(prior, 2.5, [edge, wrong])
    assert res.rejected == [wrong]
    assert res.used == [edge]
    assert res.positions[1, 0] - res.positions[0, 0] == pytest.approx(truth[1, 0], abs=0.05)
    # along the edge the stage decides: both tiles stay at their (equal) prior y
    assert abs(res.positions[1, 1]) < 0.05 and abs(res.positions[0, 1]) < 0.05
    np.testing.assert_allclose(res.positions[2], prior[2])


def test_a_texture_that_nearly_repeats_is_registered_where_it_matches_to_the_noise():
    # bricks seen at 0.65 um per pixel: the wall repeats its mortar lines nearly, so the wrong
    # period correlates at 0.8 while the right shift matches to the camera's noise; the
    # correlations' ratio alone (under 1.5) called 41 of 84 such pairs of a scan ambiguous, and
    # their tiles kept the stage's error (up to 6 px)
    from skimage import data

    wall = np.pad(data.brick().astype(float) / 255.0, (0, 512), mode="symmetric")
    scene = ndimage.zoom(wall, 1.0 / 0.65, order=3)  # 1,575 px a side
    rng = np.random.default_rng(5)
    found = []
    for k in range(6):
        x, y = rng.uniform(20, 560, 2)
        err = rng.uniform(-6, 6, 2)
        step = (460.0, 0.0) if k % 2 else (0.0, 460.0)
        true = np.array(step) + err
        a = _tile(scene, x, y, n=512, seed=2 * k)
        b = _tile(scene, x + true[0], y + true[1], n=512, seed=2 * k + 1)
        # a window wide enough that the wrong period lies where the stage could have landed
        # (in a 26 px window it lies in the outer third: no rival, see _plausible_rivals)
        r = register_pair(a, b, step, max_shift_px=40.0)
        found.append((r.ok, float(np.hypot(r.dx - true[0], r.dy - true[1])), r.peak_ratio))
    assert all(ok and e < 0.2 for ok, e, _ in found), found
    assert min(ratio for *_, ratio in found) < 1.5  # the case: a close second period


def test_a_faint_die_grid_registers_every_pair_the_stage_could_have_landed_on(tmp_path):
    # coins dies at 10 % contrast under 1.5 % camera noise: strips along the streets matched
    # right at NCC 0.86-0.93 but had a peak 19-23 px off (the window's edge) at 0.67-0.83, so
    # seven of 24 pairs were called ambiguous and a corner tile kept the stage's error (3.8 um)
    from conftest import scan_of_image
    from skimage import data

    from scanner.scanfolder import read_scan_json
    from scanner.tilestore import read_tiles_csv

    die = np.full((256, 256), 0.1)
    die[16:240, 16:240] = data.coins()[40:264, 40:264] / 255.0
    folder = scan_of_image(tmp_path, 0.45 + 0.1 * np.tile(die, (7, 7)))
    reg = read_scan_json(folder)["registration"]
    assert reg["n_unconstrained_tiles"] == 0 and reg["n_pairs_used"] >= 22, reg
    rows = read_tiles_csv(folder)
    err = np.array([(r.x_reg_um - r.x_true_um, r.y_reg_um - r.y_true_um) for r in rows])
    err -= np.median(err, axis=0)  # the mosaic's frame is the tiles' median placement
    assert np.abs(err).max() < 0.5, np.abs(err).max()


def test_a_far_peak_rivals_the_best_when_the_best_is_far_from_the_stage_too():
    from scanner.stitching.registration.pairwise import _plausible_rivals

    scored = [(0.93, 0, 461, None), (0.80, 0, 480, None), (0.78, 9, 461, None)]
    # the best where the stage put the tile: the peak 19 px off (of a 19 px window) is none
    near = _plausible_rivals(scored, 0.2, 461.3, (0, 461), (19.0, 19.0))
    assert [c[2] for c in near] == [461, 461]
    # the best 8 px off: the stage landed far, so every peak stays a rival
    assert _plausible_rivals(scored, 8.0, 469.0, (0, 461), (19.0, 19.0)) == scored


def test_structure_strong_across_and_repeating_along_is_measured_across():
    # strong lines across x (streets, die edges) and a faint pattern repeating every 9 px in
    # y: the rivals lie along y only, so x is measured, as an edge's (y left to the others);
    # refused whole, such pairs left a die grid's columns at their stage places in x
    rr, cc = np.mgrid[0:700, 0:700]
    lines = ndimage.gaussian_filter(((cc % 37) < 5).astype(float), 1.0)
    scene = 0.6 * lines + 0.07 * np.sin(2 * np.pi * rr / 9.0) + 0.2
    true = np.array([-4.4, 160.0 + 3.2])  # tile b below tile a, the stage 4.4 px off in x
    a = _tile(scene, 300, 300)
    b = _tile(scene, 300 + true[0], 300 + true[1], seed=1)
    r = register_pair(a, b, (0.0, 160.0), max_shift_px=12.0)
    assert r.ok and r.is_edge
    assert abs(r.dx - true[0]) < 0.3  # across the lines: measured
    xx, _, yy = r.info
    assert xx > 0.9 and yy < 1e-4  # along them: left to the other pairs and the stage


def test_tiles_that_no_overlap_measures_along_an_axis_are_named():
    from scanner.stitching.registration.scan import _off_the_main_chain

    def pair(a: int, b: int, info: tuple[float, float, float]) -> PairResult:
        return PairResult(a, b, 0.0, 0.0, 0.99, 9.0, 50.0, True, info)

    # 2 x 2 tiles over streets: left-right overlaps measure y only, top-bottom x only
    only_y, only_x, both = (0.0, 0.0, 1.0), (1.0, 0.0, 0.0), (1.0, 0.0, 1.0)
    used = [pair(0, 1, only_y), pair(2, 3, only_y), pair(0, 2, only_x), pair(1, 3, only_x)]
    assert len(_off_the_main_chain(4, used, "x")) == 2  # the columns: placed by the stage
    assert len(_off_the_main_chain(4, used, "y")) == 2
    used[0] = pair(0, 1, both)  # one overlap with texture both ways links them
    assert _off_the_main_chain(4, used, "x") == [] and _off_the_main_chain(4, used, "y") == [2, 3]


def _line_grating(shape: tuple[int, int], period: float = 6.0) -> np.ndarray:
    """Bright lines along y, half a period wide, every ``period`` px along x (PV fingers,
    metal lines), softened by a 0.7 px blur as optics would."""
    xx = np.arange(shape[1])
    lines = np.where((xx % period) < period / 2, 0.7, 0.12)
    return ndimage.gaussian_filter1d(np.tile(lines, (shape[0], 1)), 0.7, axis=1)


@pytest.mark.parametrize("turn", [False, True])
def test_a_fine_line_grating_is_texture_not_blank(turn: bool):
    # every neighbour along x differs by the lines' contrast: taken for noise, the strip was
    # called blank and its tiles left where the stage landed, the lines broken at every seam.
    # Its overlap matches at every period across the lines (a refused pair, placed on the
    # lattice), with the NCC of a clean match
    scene = _line_grating((700, 700))
    a, b = _tile(scene, 100.0, 100.0, seed=1), _tile(scene, 260.0, 100.0, seed=2)
    expected = (160.0, 0.0)
    if turn:  # the lines along x, the neighbour below
        a, b, expected = a.T.copy(), b.T.copy(), (0.0, 160.0)
    r = register_pair(a, b, expected, max_shift_px=10.0)
    assert r.texture > 5.0
    assert r.ncc > 0.9
    across = r.dx if not turn else r.dy
    assert abs((across - 160.0 + 3.0) % 6.0 - 3.0) < 0.1  # in phase: whole periods off at most


def test_groups_the_solve_placed_apart_are_put_in_phase_on_the_lattice():
    # a grating's overlaps: a few pairs (the part's edge) are kept by the solve, the rest match
    # at several periods. Tiles 0-1 and 2-3 are two groups of kept pairs, each where its
    # stages landed on average, 2.5 px (not a whole period) apart; the refused pair 1-2
    # matches in phase. The larger group stays, the other moves as a whole onto the lattice
    from scanner.stitching.registration.lattice import place_on_lattice

    scene = _line_grating((192, 192))
    true = np.array([(0.0, 0.0), (160.0, 0.0), (320.0, 0.0), (480.0, 0.0), (640.0, 0.0)])
    prior = true + np.array([(0.0, 0.0), (0.0, 0.0), (2.5, 0.0), (2.5, 0.0), (1.0, 0.0)])
    positions = prior.copy()
    placed = np.array([True, True, True, True, False])
    kept = [PairResult(0, 1, 160.0, 0.0, 0.99, np.inf, 40.0, True, (1.0, 0.0, 0.0)),
            PairResult(2, 3, 160.0, 0.0, 0.99, np.inf, 40.0, True, (1.0, 0.0, 0.0))]
    refused = [PairResult(1, 2, 166.0, 0.0, 0.99, 1.01, 40.0, False, (1.0, 0.0, 0.0)),
               PairResult(3, 4, 154.0, 0.0, 0.99, 1.01, 40.0, False, (1.0, 0.0, 0.0))]
    done = place_on_lattice(positions, placed, prior, kept + refused, lambda k: scene, 10.0)
    rel = positions[:, 0] - true[:, 0]
    # (the period as found in one tile: within a hundredth of a pixel over a few periods)
    assert np.abs((rel - rel[0] + 3.0) % 6.0 - 3.0).max() < 0.05, rel
    assert done.tolist() == [False, False, True, True, True]
    # a whole period nearest where the stage put each: the moved group 0.5 px back
    np.testing.assert_allclose(rel, [0.0, 0.0, 0.0, 0.0, 0.0], atol=0.05)
