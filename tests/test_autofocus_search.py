"""Autofocus search against the simulated optics and camera."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from scipy import ndimage

from scanner.acquisition.focus import autofocus
from simulators.camera import CameraModel, Optics

OPTICS = Optics()
DOF = OPTICS.depth_of_field_um
CAM = CameraModel(width=256, height=256, pixel_size_um=1.0)
Z_RANGE = (-200.0, 200.0)


def _texture(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = ndimage.gaussian_filter(rng.random((256, 256)), 2.0)
    return 0.2 + 0.6 * (t - t.min()) / (t.max() - t.min())


def _dies(seed: int) -> np.ndarray:
    """Sparse: two dark streets and a few bright pads on a bare die."""
    rng = np.random.default_rng(seed)
    img = np.full((256, 256), 0.6)
    r, c = rng.integers(20, 230, 2)
    img[r : r + 4, :] = 0.15
    img[:, c : c + 4] = 0.15
    for _ in range(3):
        y, x = rng.integers(0, 240, 2)
        img[y : y + 10, x : x + 10] = 0.9
    return img


class Scope:
    """A field under the simulated objective; records every Z it is asked for."""

    def __init__(self, reflectance: np.ndarray, z_true: float, seed: int = 0) -> None:
        self.reflectance = reflectance
        self.z_true = z_true
        self.rng = np.random.default_rng(seed)
        self.calls: list[float] = []

    def __call__(self, z: float) -> np.ndarray:
        self.calls.append(z)
        blurred = OPTICS.apply(self.reflectance, z - self.z_true, CAM.pixel_size_um)
        return CAM.digitise(blurred, CAM.exposure_ref_ms, self.rng)


def _trials(field: Callable[[int], np.ndarray], n: int, measure: str = "tenengrad"):
    rng = np.random.default_rng(42)
    errors, images = [], []
    for k in range(n):
        z_true = rng.uniform(-50, 50)
        start = z_true + rng.uniform(-5, 5) * DOF
        scope = Scope(field(k), z_true, seed=k)
        res = autofocus(scope, start, DOF, Z_RANGE, measure=measure)
        assert res.ok, res.reason
        assert res.n_images == len(scope.calls) == len(res.samples)
        assert 0.3 <= res.confidence <= 1.0
        errors.append(abs(res.z_um - z_true) / DOF)
        images.append(res.n_images)
    return np.array(errors), np.array(images)


@pytest.mark.parametrize("field", [_texture, _dies], ids=["texture", "dies"])
def test_reaches_quarter_dof_with_few_images(field):
    errors, images = _trials(field, 10)
    assert errors.max() <= 0.25
    assert images.mean() <= 8


@pytest.mark.parametrize("measure", ["normalized_variance", "brenner"])
def test_other_measures_work_too(measure):
    errors, images = _trials(_texture, 4, measure)
    assert errors.max() <= 0.25
    assert images.mean() <= 8


def test_featureless_field_is_refused_and_focus_not_moved():
    for k, level in enumerate((0.5, 0.9, 0.05)):  # bare wafer, busbar, dark
        scope = Scope(np.full((256, 256), level), z_true=0.0, seed=k)
        res = autofocus(scope, 12.3, DOF, Z_RANGE)
        assert not res.ok
        assert res.confidence < 0.3
        assert res.z_um == 12.3
        assert "featureless" in res.reason
        assert res.n_images <= 5  # refused early, without a long walk


def test_all_black_frames_are_refused():
    res = autofocus(lambda z: np.zeros((64, 64), np.uint16), 1.0, DOF, Z_RANGE)
    assert not res.ok and res.z_um == 1.0 and res.confidence < 0.3


@pytest.mark.parametrize(("z_true", "start"), [(195.0, 185.0), (-198.0, -190.0), (230.0, 195.0)])
def test_never_samples_outside_z_range(z_true, start):
    scope = Scope(_texture(3), z_true)
    res = autofocus(scope, start, DOF, Z_RANGE, max_images=12)
    assert scope.calls, "no frame taken"
    assert all(Z_RANGE[0] <= z <= Z_RANGE[1] for z in scope.calls)
    assert len(scope.calls) <= 12
    if Z_RANGE[0] < z_true - DOF and z_true + DOF < Z_RANGE[1]:
        assert res.ok and abs(res.z_um - z_true) <= 0.25 * DOF
    if z_true > Z_RANGE[1]:  # focus beyond the drive's reach: refused, not clamped
        assert not res.ok and res.z_um == start


def test_far_start_expands_the_search():
    scope = Scope(_texture(4), z_true=10.0)
    res = autofocus(scope, 10.0 + 9 * DOF, DOF, Z_RANGE, max_images=12)
    assert res.ok
    assert abs(res.z_um - 10.0) <= 0.25 * DOF
    assert res.n_images <= 12


def test_max_images_is_a_hard_limit():
    scope = Scope(_texture(5), z_true=0.0)
    res = autofocus(scope, 20 * DOF, DOF, Z_RANGE, max_images=5)
    assert len(scope.calls) <= 5
    assert not res.ok and res.z_um == 20 * DOF


def test_search_span_sets_the_first_bracket():
    scope = Scope(_texture(6), z_true=0.0)
    autofocus(scope, 0.0, DOF, Z_RANGE, search_span_um=2 * DOF)
    assert scope.calls[:3] == pytest.approx([-DOF, 0.0, DOF])


def test_bad_arguments():
    snap = Scope(_texture(7), 0.0)
    with pytest.raises(ValueError):
        autofocus(snap, 0.0, 0.0, Z_RANGE)
    with pytest.raises(ValueError):
        autofocus(snap, 0.0, DOF, (5.0, -5.0))
    with pytest.raises(ValueError):
        autofocus(snap, 0.0, DOF, Z_RANGE, max_images=2)
    with pytest.raises(ValueError, match="unknown measure"):
        autofocus(snap, 0.0, DOF, Z_RANGE, measure="nope")
