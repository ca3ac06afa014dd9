"""Robust focal-surface fits and focus-point layouts."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from shapely.geometry import Point, Polygon

from scanner.acquisition.focus.surface import FocusSurface, fit_focus_surface, focus_points_layout

R = 40_000.0  # µm: half-width of the sampled area


def _plane(x, y):
    return 12.0 + 2e-3 * x - 1e-3 * y


def _bowl(x, y):
    return 5.0 + 1e-3 * x + 15.0 * (x**2 + y**2) / R**2


def _wavy(x, y):
    return 3e-4 * x + 4.0 * np.sin(x / 9000.0) + 3.0 * np.cos(y / 7000.0 + 1.0)


def _points(fn, n=60, seed=0, noise=0.3, outlier_frac=0.2, outlier_um=50.0):
    rng = np.random.default_rng(seed)
    x, y = rng.uniform(-R, R, n), rng.uniform(-R, R, n)
    z = fn(x, y) + rng.normal(0.0, noise, n)
    out = np.zeros(n, bool)
    out[rng.choice(n, int(round(outlier_frac * n)), replace=False)] = True
    z[out] += outlier_um
    return x, y, z, out


def _grid_error(surface, fn):
    gx, gy = np.meshgrid(np.linspace(-0.9 * R, 0.9 * R, 25), np.linspace(-0.9 * R, 0.9 * R, 25))
    return surface.predict(gx, gy) - fn(gx, gy)


@pytest.mark.parametrize(("fn", "model"), [(_plane, "plane"), (_bowl, "quadratic")])
def test_recovers_surface_and_flags_outliers(fn, model):
    for seed in range(3):
        x, y, z, out = _points(fn, seed=seed)
        s = fit_focus_surface(x, y, z, model)
        assert s.model == model
        assert np.all(~s.inliers[out]), "a +50 µm outlier was kept"
        # a 3-sigma cut loses ~0.3 % of good points to noise
        assert (~s.inliers & ~out).sum() <= 2
        err = _grid_error(s, fn)
        assert np.sqrt(np.mean(err**2)) < 0.2
        assert np.abs(err).max() < 0.5
        assert s.rms_um < 0.5
        np.testing.assert_allclose(s.residuals_um, z - s.predict(x, y), atol=1e-9)


def test_tps_beats_plane_and_quadratic_on_wavy_surface():
    x, y, z, out = _points(_wavy, seed=1)
    tps = fit_focus_surface(x, y, z, "tps")
    assert np.all(~tps.inliers[out])
    rms = {m: np.sqrt(np.mean(_grid_error(fit_focus_surface(x, y, z, m), _wavy) ** 2))
           for m in ("plane", "quadratic")}
    rms_tps = np.sqrt(np.mean(_grid_error(tps, _wavy) ** 2))
    assert rms_tps < 1.5
    assert rms_tps < rms["plane"] / 2 and rms_tps < rms["quadratic"] / 2


@pytest.mark.parametrize(("fn", "expected"), [(_plane, "plane"), (_bowl, "quadratic"),
                                              (_wavy, "tps")])
def test_auto_picks_the_right_model(fn, expected):
    x, y, z, out = _points(fn, seed=2)
    s = fit_focus_surface(x, y, z)
    assert s.model == expected
    assert np.all(~s.inliers[out])


def test_few_points():
    s = fit_focus_surface([0.0, 1000.0], [0.0, 0.0], [3.0, 5.0])
    assert s.model == "constant"
    assert s.predict(500.0, 9.0) == pytest.approx(4.0)
    s = fit_focus_surface([0.0, 1000.0, 0.0], [0.0, 0.0, 1000.0], [1.0, 2.0, 3.0])
    assert s.model == "plane"
    assert s.predict(1000.0, 1000.0) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="needs >= 6"):
        fit_focus_surface([0, 1, 2, 3], [0, 1, 0, 1], [0, 0, 0, 0], "quadratic")
    with pytest.raises(ValueError):
        fit_focus_surface([0, 1], [0, 1, 2], [0, 0, 0])


def test_non_finite_points_are_outliers():
    x, y, z, _ = _points(_plane, n=20, outlier_frac=0.0, seed=3)
    z[4] = np.nan
    s = fit_focus_surface(x, y, z, "plane")
    assert not s.inliers[4] and np.isnan(s.residuals_um[4])
    assert np.sqrt(np.mean(_grid_error(s, _plane) ** 2)) < 0.3


def test_fixed_outlier_threshold():
    x, y, z, out = _points(_plane, outlier_um=3.0, seed=4)
    s = fit_focus_surface(x, y, z, "plane", outlier_threshold_um=1.5)
    assert np.array_equal(~s.inliers, out)
    assert s.threshold_um == 1.5


@pytest.mark.parametrize("model", ["plane", "quadratic", "tps"])
def test_to_dict_is_json_and_round_trips(model):
    x, y, z, _ = _points(_wavy, n=30, seed=5)
    s = fit_focus_surface(x, y, z, model)
    d = json.loads(json.dumps(s.to_dict()))
    assert d["model"] == model
    assert len(d["inliers"]) == len(d["residuals_um"]) == 30
    assert set(d["points"]) == {"x_um", "y_um", "z_um"}
    back = FocusSurface.from_dict(d)
    np.testing.assert_allclose(back.predict(x, y), s.predict(x, y), atol=1e-9)


def _wafer(radius=50_000.0, notch=True):
    ang = np.linspace(0, 2 * math.pi, 180, endpoint=False)
    pts = np.stack([radius * np.cos(ang), radius * np.sin(ang)], axis=1)
    poly = Polygon(pts)
    if notch:
        poly = poly.difference(Point(0, radius).buffer(2000))
    return np.asarray(poly.exterior.coords)[:-1]


@pytest.mark.parametrize("layout", ["grid", "rings"])
@pytest.mark.parametrize("n", [1, 5, 13, 40])
def test_layout_points_inside_polygon(layout, n):
    verts = _wafer()
    pts = focus_points_layout(verts, n, layout, margin_um=3000)
    assert pts.shape[1] == 2
    assert abs(len(pts) - n) <= max(2, 0.1 * n)
    poly = Polygon(verts)
    for p in pts:
        assert poly.contains(Point(p))
        assert poly.exterior.distance(Point(p)) >= 3000 - 1e-6
    # spread out, not clumped: nearest neighbours are comparable to the ideal spacing
    if n >= 5:
        d = np.hypot(*(pts[:, None] - pts[None]).transpose(2, 0, 1))
        np.fill_diagonal(d, np.inf)
        assert d.min(axis=1).min() > 0.3 * math.sqrt(poly.area / n)


def test_layout_on_rectangle_and_errors():
    rect = np.array([[0, 0], [156_000, 0], [156_000, 156_000], [0, 156_000]], float)
    pts = focus_points_layout(rect, 16)
    assert len(pts) == 16
    assert np.all((pts > 0) & (pts < 156_000))
    with pytest.raises(ValueError):
        focus_points_layout(rect, 0)
    with pytest.raises(ValueError):
        focus_points_layout(rect, 4, margin_um=80_000)
    with pytest.raises(ValueError):
        focus_points_layout(rect[:2], 4)
