"""The roughness simulator: the Sa it promises, how it renders, and how recipes reach it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from simulators.roughness import RoughnessField, RoughSample
from simulators.samples import make_sample
from simulators.samples.shapes import pixel_axes


@pytest.mark.parametrize("sa", [0.8, 4.0, 17.0])
def test_height_field_has_the_promised_sa(sa: float) -> None:
    field = RoughnessField(sa_nm=sa, correlation_um=2.0, seed=11)
    xs, ys = pixel_axes(-3000.0, 2500.0, (768, 768), 0.25)  # fine sampling: 96 x 96 µm
    h = field.height_nm(xs, ys, 0.25)
    measured = float(np.mean(np.abs(h - h.mean())))
    assert measured == pytest.approx(sa, rel=0.08)


def test_sa_map_varies_smoothly_within_bounds() -> None:
    field = RoughnessField(sa_nm=10.0, variation=0.5, variation_period_mm=2.0, seed=3)
    xs, ys = pixel_axes(0.0, 0.0, (200, 200), 50.0)  # 10 mm x 10 mm
    sa = field.sa_map(xs, ys)
    assert sa.min() >= 5.0 - 1e-4 and sa.max() <= 15.0 + 1e-4
    assert sa.max() - sa.min() > 4.0  # it does vary across the sample
    assert np.abs(np.diff(sa, axis=1)).max() < 1.0  # and smoothly (50 µm steps)


def test_rendering_is_tile_independent_and_contrast_grows_with_sa() -> None:
    field = RoughnessField(sa_nm=8.0, seed=5)
    xs, ys = pixel_axes(100.0, 200.0, (64, 64), 1.0)
    a = field.apply(np.full((64, 64), 0.5, np.float32), xs, ys, 1.0)
    xs2, ys2 = pixel_axes(100.0 + 16, 200.0 + 16, (64, 64), 1.0)
    b = field.apply(np.full((64, 64), 0.5, np.float32), xs2, ys2, 1.0)
    # np.gradient differs at the window border only
    np.testing.assert_allclose(a[17:-1, 17:-1], b[1:-17, 1:-17], atol=1e-6)
    contrasts = []
    means = []
    for sa in (1.0, 4.0, 12.0):
        img = RoughnessField(sa_nm=sa, seed=5).apply(
            np.full((256, 256), 0.5, np.float32), *pixel_axes(0.0, 0.0, (256, 256), 1.0), 1.0)
        contrasts.append(img.std() / img.mean())
        means.append(img.mean())
    assert contrasts[0] < contrasts[1] < contrasts[2]
    assert means[0] > means[1] > means[2]  # specular loss: rougher is darker


def test_make_sample_wraps_and_records_truth() -> None:
    plain = make_sample("rectangle", width_mm=2.0, height_mm=2.0, n_defects=2, seed=1)
    rough = make_sample("rectangle", width_mm=2.0, height_mm=2.0, n_defects=2, seed=1,
                        roughness={"sa_nm": 6.0, "variation": 0.3, "seed": 2})
    assert isinstance(rough, RoughSample)
    truth = rough.truth()
    assert truth["roughness"]["sa_nm"] == 6.0
    assert truth["defects"] == plain.truth()["defects"]
    json.dumps(truth)
    a = plain.render(-500.0, -500.0, (128, 128), 1.0)
    b = rough.render(-500.0, -500.0, (128, 128), 1.0)
    assert not np.allclose(a, b)
    assert rough.bounds_um() == plain.bounds_um()
    with pytest.raises(ValueError, match="roughness"):
        make_sample("rectangle", width_mm=2.0, height_mm=2.0, roughness={"sa": 1.0})


def test_default_rendering_unchanged_without_roughness() -> None:
    a = make_sample("wafer", diameter_mm=50.0, n_defects=3, seed=4)
    b = make_sample("wafer", diameter_mm=50.0, n_defects=3, seed=4, roughness=None)
    np.testing.assert_array_equal(a.render(0.0, 0.0, (64, 64), 2.0),
                                  b.render(0.0, 0.0, (64, 64), 2.0))


def test_recipe_roughness_section(write_recipe) -> None:
    from devices.sample_factory import sample_for_recipe
    from scanner.errors import RecipeError
    from scanner.recipe import load_recipe

    rec = load_recipe(write_recipe({
        "sample": {"kind": "rectangle", "width_mm": 3, "height_mm": 3,
                   "roughness": {"sa_nm": 4.5, "variation": 0.2}},
    }))
    sample = sample_for_recipe(rec.sample)
    assert isinstance(sample, RoughSample)
    assert sample.truth()["roughness"]["sa_nm"] == 4.5
    with pytest.raises(RecipeError, match="roughness.variation"):
        load_recipe(write_recipe({
            "sample": {"kind": "rectangle", "width_mm": 3, "height_mm": 3,
                       "roughness": {"sa_nm": 4.5, "variation": 2.0}},
        }))
