"""Sharpness re-check of a focus map: the maths, a planted bump, and featureless fields."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy import ndimage

from scanner.acquisition.focus.recheck import (
    BandEnergy,
    PairNoise,
    band_energy,
    calibrate,
    estimate_defocus_sq,
    strip_energies,
)
from scanner.pipeline import run_scan
from scanner.recipe import load_recipe
from scanner.tilestore import read_tiles_csv
from simulators.camera import CameraModel, Optics
from simulators.surface import FocalSurface

OPTICS = Optics()
DOF = OPTICS.depth_of_field_um
CAM = CameraModel(width=256, height=256, pixel_size_um=1.0)


def _scene(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = ndimage.gaussian_filter(rng.random((256, 256)), 1.5)
    return 0.2 + 0.6 * (t - t.min()) / (t.max() - t.min())


def _frame(scene: np.ndarray, dz_dof: float, seed: int = 0) -> np.ndarray:
    blurred = OPTICS.apply(scene, dz_dof * DOF, CAM.pixel_size_um)
    return CAM.digitise(blurred, CAM.exposure_ref_ms, np.random.default_rng(seed))


# ----------------------------------------------------------------------------- maths


def test_band_energy_falls_with_defocus_and_ignores_noise():
    scene = _scene()
    e = [band_energy(_frame(scene, dz, seed=k)).signal for k, dz in enumerate((0, 1, 2))]
    assert e[0] > e[1] > e[2] > 0
    flat = CAM.digitise(np.full((256, 256), 0.5), CAM.exposure_ref_ms, np.random.default_rng(1))
    be = band_energy(flat)
    assert not be.usable  # noise alone is not detail
    assert abs(be.signal) < 0.5 * be.noise


def test_strips_of_overlapping_tiles_agree_in_focus():
    scene = _scene(3)
    frame = _frame(scene, 0.0)
    left = frame[:, :160]
    right = frame[:, 100:]  # 60 px shared
    a = strip_energies(left, (60, 0))["right"]
    b = strip_energies(right, (60, 0))["left"]
    assert a.usable and b.usable
    assert abs(math.log(a.signal / b.signal)) < 0.05
    assert set(strip_energies(frame, (60, 60))) == {"left", "right", "top", "bottom"}
    assert strip_energies(frame, (0, 0)) == {}  # no overlap, nothing to compare


def test_calibration_recovers_the_falloff_of_the_simulated_optics():
    sweeps = []
    for k in range(4):
        scene = _scene(k)
        sweeps.append([(dz, band_energy(_frame(scene, dz, seed=k)))
                       for dz in (-2.0, -1.0, -0.3, 0.4, 1.2, 2.0)])
    cal = calibrate(sweeps, tolerance_dof=0.75)
    assert cal.enabled, cal.reason
    assert cal.n_points == 4
    # one defocus of 1 DOF at 1 um pixels and NA 0.3 removes a good part of the fine band
    e0 = band_energy(_frame(_scene(9), 0.0)).signal
    e1 = band_energy(_frame(_scene(9), 1.0)).signal
    assert cal.c_per_dof2 == pytest.approx(math.log(e0 / e1), rel=0.35)
    assert 0 < cal.ratio_threshold < 1


def test_calibration_refuses_without_evidence():
    too_few = calibrate([[(0.0, BandEnergy(1.0, 0.01)), (1.0, BandEnergy(0.9, 0.01))]])
    assert not too_few.enabled and "focus points" in too_few.reason
    flat = [[(dz, BandEnergy(1.0 - 0.001 * dz * dz, 0.01)) for dz in (-2, -1, 0, 1, 2)]] * 5
    blind = calibrate(flat)
    assert not blind.enabled and "changes the fine detail" in blind.reason


def test_defocus_estimate_from_neighbours():
    c = 0.4
    sharp, blurred = BandEnergy(1.0, 0.01), BandEnergy(math.exp(-c * 4.0), 0.01)
    assert estimate_defocus_sq([(blurred, sharp, 0.0)], c) == pytest.approx(4.0)
    assert estimate_defocus_sq([(sharp, sharp, 0.0)], c) == pytest.approx(0.0)
    # sharper than its neighbour: never a negative squared defocus
    assert estimate_defocus_sq([(sharp, blurred, 0.0)], c) == 0.0
    # the neighbour's own defocus is carried over only when it is significant
    assert estimate_defocus_sq([(sharp, sharp, 0.1)], c, noise=0.05) == 0.0
    assert estimate_defocus_sq([(sharp, sharp, 2.0)], c, noise=0.05) == pytest.approx(2.0)
    # a neighbour strip without detail says nothing
    bare = BandEnergy(0.001, 0.01)
    assert estimate_defocus_sq([(bare, bare, 0.0)], c) is None
    # detail the neighbour shows and the tile lost entirely: large but finite
    assert 5.0 < estimate_defocus_sq([(bare, sharp, 0.0)], c) < 50.0


def test_pair_noise_is_robust_to_defocused_pairs():
    noise = PairNoise(prior=0.1, min_pairs=5)
    assert noise.sigma == 0.1
    for v in (0.02, -0.03, 0.01, -0.02, 0.025, 0.015, 2.0):
        noise.add(v)
    assert 0.01 < noise.sigma < 0.05


def test_surface_bump_is_local():
    surf = FocalSurface(bumps=((1000.0, -500.0, 20.0, 800.0),))
    assert surf(1000.0, -500.0) == pytest.approx(20.0)
    assert surf(1400.0, -500.0) == pytest.approx(10.0)  # half height at half the radius
    assert surf(1000.0, 300.0) == pytest.approx(0.0)
    assert surf(5000.0, 5000.0) == 0.0
    dent = FocalSurface(bumps=((0.0, 0.0, -5.0, 100.0),))
    assert dent(0.0, 0.0) == pytest.approx(-5.0)


# ----------------------------------------------------------------------------- scans

BUMP = (1600.0, 0.0, 24.0, 1400.0)  # x, y, height, radius: between the 9 rings points

BUMP_RECIPE = """\
sample:
  kind: wafer
  diameter_mm: 10
  edge_exclusion_mm: 0.5
  die_pitch_mm: [1, 1]
  scribe_width_um: 40
  defects: {{count: 3, seed: 2}}
  surface:
    tilt_um_per_mm: [3.0, -2.0]
    bow_um: 8
    waviness_um: 0.5
    bumps: [{{center_um: [{x}, {y}], height_um: {h}, radius_um: {r}}}]
microscope:
  kind: simulated
  camera: {{width: 512, height: 512, pixel_size_um: 2.0}}
  objective: {{numerical_aperture: 0.3}}
  focus: {{z_um: 0, range_um: [-100, 100]}}
scan:
  overlap: 0.1
  focus: {{strategy: focus_map, points: 9, layout: rings}}
"""


@pytest.mark.slow
def test_recheck_finds_a_bump_the_map_cannot_see(write_recipe, tmp_path: Path) -> None:
    x, y, h, r = BUMP
    result = run_scan(load_recipe(write_recipe(BUMP_RECIPE.format(x=x, y=y, h=h, r=r))),
                      tmp_path / "bump")
    focus = json.loads((result.folder / "focus_map.json").read_text())
    dof = focus["depth_of_field_um"]
    recheck = focus["recheck"]
    assert recheck["enabled"], recheck["reason"]
    # no focus point lies on the bump: the map alone cannot know it
    assert all(math.hypot(p["x_um"] - x, p["y_um"] - y) > r for p in focus["points"])
    rows = read_tiles_csv(result.folder)
    bump = FocalSurface(bumps=((x, y, h, r),))
    on_bump = {t.index for t in rows if bump(t.x_true_um, t.y_true_um) > dof}
    remeasured = {e["index"]: e for e in recheck["remeasured"] if e["ok"]}
    assert len(on_bump) >= 2
    by_index = {t.index: t for t in rows}
    for i in on_bump:
        t = by_index[i]
        assert t.focus_source == "remeasured", f"tile {i} on the bump was not re-measured"
        assert abs(remeasured[i]["z_map_um"] - t.z_true_um) > dof  # the map was off there
    err = np.array([abs(t.z_um - t.z_true_um) for t in rows]) / dof
    assert err.max() <= 1.0
    assert np.median(err) <= 0.2
    off_bump = [i for i in remeasured if i not in on_bump]
    assert len(off_bump) <= 0.1 * (len(rows) - len(on_bump))


FLAT_RECIPE = """\
sample:
  kind: image
  path: flat.tif
  pixel_size_um: 1.0
  region_px: [300, 300, 500, 500]
  surface: {{tilt_um_per_mm: [20.0, -10.0], bow_um: 5}}
microscope:
  kind: simulated
  camera: {{width: 256, height: 256, pixel_size_um: 1.0}}
  focus: {{z_um: 7.5, range_um: [-100, 100]}}
scan:
  overlap: 0.1
  focus: {{strategy: {strategy}, points: 5}}
"""


@pytest.mark.parametrize("strategy", ["every_tile", "focus_map"])
def test_featureless_sample_does_not_drive_focus_away(write_recipe, tmp_path: Path,
                                                      strategy: str) -> None:
    """A bare field has nothing to focus on: focus stays where it was, nothing is re-measured."""
    # the tiles stay inside the flat image: its border would be a feature
    tifffile.imwrite(tmp_path / "flat.tif", np.full((1100, 1100), 30000, np.uint16))
    recipe = load_recipe(write_recipe(FLAT_RECIPE.format(strategy=strategy)))
    result = run_scan(recipe, tmp_path / strategy)
    rows = read_tiles_csv(result.folder)
    assert len(rows) >= 4
    assert all(t.z_um == pytest.approx(7.5, abs=0.02) for t in rows)  # never driven away
    assert all(t.focus_source in ("neighbour", "fixed") for t in rows)
    focus = json.loads((result.folder / "focus_map.json").read_text())
    assert focus["remeasured_tiles"] == 0
    if strategy == "focus_map":
        assert focus["points"] and not any(p["ok"] for p in focus["points"])
