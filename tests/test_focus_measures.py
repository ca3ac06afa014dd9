"""Focus measures and texture strength on simulated defocus sweeps."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from scanner.acquisition.focus import (
    DEFAULT_MEASURE,
    MEASURES,
    estimate_noise_sigma,
    tenengrad,
    texture_strength,
)
from scanner.acquisition.focus.measures import NOISE_GAIN, noise_floor
from simulators.camera import CameraModel, Optics

OPTICS = Optics()
DOF = OPTICS.depth_of_field_um
CAM = CameraModel(width=256, height=256, pixel_size_um=1.0)


def _texture(shape: tuple[int, int], seed: int = 0, sigma: float = 2.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = ndimage.gaussian_filter(rng.random(shape), sigma)
    t = (t - t.min()) / (t.max() - t.min())
    return 0.2 + 0.6 * t


def _frame(reflectance: np.ndarray, defocus_um: float, rng: np.random.Generator) -> np.ndarray:
    blurred = OPTICS.apply(reflectance, defocus_um, CAM.pixel_size_um)
    return CAM.digitise(blurred, CAM.exposure_ref_ms, rng)


@pytest.fixture(scope="module")
def sweep() -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(1)
    ref = _texture((256, 256))
    dz = np.arange(-4.0, 4.01, 0.5)
    return dz, [_frame(ref, d * DOF, rng) for d in dz]


@pytest.mark.parametrize("name", sorted(MEASURES))
def test_measure_peaks_at_focus_and_falls_off(name, sweep):
    dz, frames = sweep
    v = np.array([MEASURES[name](f) for f in frames])
    i = int(np.argmax(v))
    assert abs(dz[i]) <= 0.5
    # falls off on both sides: far frames clearly below the peak, and no rise moving away
    # from focus beyond the noise of the measure (1 %)
    assert v[0] < 0.9 * v[i] and v[-1] < 0.9 * v[i]
    assert np.all(np.diff(v[: i + 1]) > -0.01 * v[i])
    assert np.all(np.diff(v[i:]) < 0.01 * v[i])


def test_default_measure_is_registered():
    assert DEFAULT_MEASURE in MEASURES
    assert set(NOISE_GAIN) == set(MEASURES)


@pytest.mark.parametrize("name", sorted(MEASURES))
def test_measures_accept_integer_frames(name, sweep):
    frame = sweep[1][8]
    f = MEASURES[name]
    assert f(frame) == pytest.approx(f(frame.astype(np.float64)), rel=1e-4)
    small = (frame // 16).astype(np.uint8)
    assert f(small) == pytest.approx(f(small.astype(np.float32)), rel=1e-4)
    assert np.isfinite(f(np.zeros((64, 64), np.uint16)))  # dark frame: no division by zero


def test_measures_reject_bad_shapes():
    with pytest.raises(ValueError):
        tenengrad(np.zeros(100))
    with pytest.raises(ValueError):
        tenengrad(np.zeros((3, 100)))


def test_measures_are_exposure_invariant(sweep):
    frame = sweep[1][8].astype(np.float64)
    for f in MEASURES.values():
        assert f(frame * 3.0) == pytest.approx(f(frame), rel=1e-4)  # float32 arithmetic


@pytest.mark.parametrize("name", sorted(MEASURES))
def test_noise_floor_matches_flat_field(name):
    rng = np.random.default_rng(2)
    flat = CAM.digitise(np.full((256, 256), 0.5), CAM.exposure_ref_ms, rng)
    sigma = estimate_noise_sigma(flat)
    floor = noise_floor(name, sigma, float(flat.mean()))
    assert MEASURES[name](flat) == pytest.approx(floor, rel=0.06)


def test_noise_sigma_estimate():
    rng = np.random.default_rng(3)
    noise = rng.normal(1000.0, 20.0, (512, 512))
    assert estimate_noise_sigma(noise) == pytest.approx(20.0, rel=0.05)
    # smooth texture barely affects it
    textured = noise + 3000 * _texture((512, 512), seed=4, sigma=3.0)
    assert estimate_noise_sigma(textured) == pytest.approx(20.0, rel=0.1)


def test_texture_strength_separates_texture_from_noise(sweep):
    dz, frames = sweep
    rng = np.random.default_rng(5)
    flat = CAM.digitise(np.full((256, 256), 0.5), CAM.exposure_ref_ms, rng)
    bright = CAM.digitise(np.full((256, 256), 0.9), CAM.exposure_ref_ms, rng)
    in_focus = frames[int(np.argmin(np.abs(dz)))]
    assert texture_strength(flat) < 1.4
    assert texture_strength(bright) < 1.4
    assert texture_strength(in_focus) > 10
    # defocus removes resolvable texture
    assert texture_strength(frames[0]) < texture_strength(in_focus) / 3
    # a known noise sigma gives the same answer as the estimate
    sigma = estimate_noise_sigma(flat)
    assert texture_strength(flat, noise_sigma=sigma) == pytest.approx(texture_strength(flat))


def test_texture_strength_sees_a_sparse_feature():
    rng = np.random.default_rng(6)
    img = np.full((256, 256), 0.5)
    img[:, 120:124] = 0.2  # one line across an otherwise bare field
    frame = CAM.digitise(img, CAM.exposure_ref_ms, rng)
    assert texture_strength(frame) > 3


def test_tenengrad_threshold_suppresses_noise():
    rng = np.random.default_rng(7)
    flat = CAM.digitise(np.full((128, 128), 0.5), CAM.exposure_ref_ms, rng)
    sigma = estimate_noise_sigma(flat)
    floor = noise_floor("tenengrad", sigma, float(flat.mean()))
    assert tenengrad(flat, threshold=20 * floor) < 0.01 * tenengrad(flat)
