"""Image and rectangle samples placed off their nominal place (probe P21): ``sample.placement``
as on a wafer or PV cell, rendered by the one placement wrapper, recorded in the truth."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import tifffile

from scanner.recipe import parse_recipe

CAMERA = {"kind": "simulated", "camera": {"width": 128, "height": 128, "pixel_size_um": 1.0},
          "seed": 1}


def _image(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    img = (rng.random((200, 300)) * 60000).astype(np.uint16)
    img[90:110, 140:160] = 65535  # a bright square to find
    path = tmp_path / "part.tif"
    tifffile.imwrite(path, img)
    return path


def _image_recipe(tmp_path: Path, placement: dict | None):
    sample = {"kind": "image", "path": str(_image(tmp_path)), "pixel_size_um": 1.0,
              "origin_um": [1000.0, 2000.0], "defects": {"count": 3, "seed": 2}}
    if placement is not None:
        sample["placement"] = placement
    return parse_recipe({"sample": sample, "microscope": CAMERA}, tmp_path, "placed")


def _rectangle_recipe(tmp_path: Path, placement: dict | None):
    sample = {"kind": "rectangle", "width_mm": 1.0, "height_mm": 0.6,
              "center_um": [-500.0, 300.0], "defects": {"count": 4, "seed": 5}}
    if placement is not None:
        sample["placement"] = placement
    return parse_recipe({"sample": sample, "microscope": CAMERA}, tmp_path, "placed")


def test_image_placement_moves_the_picture_and_its_truth(tmp_path: Path) -> None:
    from devices.sample_factory import sample_for_recipe

    nominal = sample_for_recipe(_image_recipe(tmp_path, None).sample)
    placed = sample_for_recipe(_image_recipe(tmp_path, {"offset_um": [30, -20]}).sample)
    # pixel (0, 0) at the origin; the image spans 300 x 200 um: its centre is (1149.5, 2099.5)
    a = nominal.render(1100.0, 2050.0, (100, 100), 1.0)
    b = placed.render(1130.0, 2030.0, (100, 100), 1.0)
    np.testing.assert_allclose(a, b, atol=1e-6)
    truth = placed.truth()
    assert truth["placement"]["offset_um"] == [30.0, -20.0]
    assert truth["placement"]["center_um"] == pytest.approx([1179.5, 2079.5])
    for d, n in zip(truth["defects"], nominal.truth()["defects"], strict=True):
        assert (d["sample_x_um"], d["sample_y_um"]) == (n["x_um"], n["y_um"])
        assert (d["x_um"], d["y_um"]) == pytest.approx((n["x_um"] + 30, n["y_um"] - 20))


def test_rectangle_placement_turns_the_coupon_and_its_defects(tmp_path: Path) -> None:
    from devices.core import build_microscope

    truth = build_microscope(_rectangle_recipe(
        tmp_path, {"offset_um": [200, -100], "rotation_deg": 0.8})).truth
    assert truth["placement"]["rotation_deg"] == 0.8
    assert truth["placement"]["center_um"] == [-300.0, 200.0]
    th = math.radians(0.8)
    assert truth["defects"]
    for d in truth["defects"]:
        u, v = d["sample_x_um"] + 500, d["sample_y_um"] - 300
        assert d["x_um"] == pytest.approx(-300 + math.cos(th) * u - math.sin(th) * v)
        assert d["y_um"] == pytest.approx(200 + math.sin(th) * u + math.cos(th) * v)


def test_random_placement_of_an_image(tmp_path: Path) -> None:
    from devices.sample_factory import sample_for_recipe

    truth = sample_for_recipe(_image_recipe(
        tmp_path, {"random": True, "seed": 3, "max_offset_um": 40}).sample).truth()
    assert truth["placement"]["random"] is True
    assert max(abs(v) for v in truth["placement"]["offset_um"]) <= 40


@pytest.mark.parametrize(("placement", "field"), [
    ({"rotation_deg": 20}, "sample.placement.rotation_deg"),
    ({"random": True, "offset_um": [1, 2]}, "sample.placement.offset_um"),
    ({"offset": [1, 2]}, "sample.placement.offset"),
])
def test_placement_errors_name_the_field(tmp_path: Path, placement: dict, field: str) -> None:
    from scanner.errors import RecipeError

    for make in (_image_recipe, _rectangle_recipe):
        with pytest.raises(RecipeError) as info:
            make(tmp_path, placement)
        message = str(info.value)
        assert "\n" not in message and field in message, message


def _write_mosaic(path: Path, img: np.ndarray, pixel_um: float) -> None:
    from scanner.ngff import build_pyramid, create_multiscale, finish_multiscale

    tmp, arrays = create_multiscale(path, img.shape, chunk=256, dtype=img.dtype)
    arrays[0][:] = img
    build_pyramid(arrays, 256)
    finish_multiscale(tmp, path, len(arrays), pixel_um, (0.0, 0.0), "mosaic")


@pytest.mark.parametrize("turn_deg", [1.0, -0.7])
def test_a_parts_recipe_grid_is_turned_as_the_mosaic_shows_it(tmp_path: Path, turn_deg) -> None:
    # an image or rectangle sample has no alignment: a part laid down turned was compared on
    # the recipe's grid square to the stage, its far dies pitch * n * sin(turn) off their
    # cells (a camera-photo die grid turned 1 deg: 15 false defects on the defective copy,
    # 22 on a good one, all in edge dies)
    from types import SimpleNamespace

    from scipy import ndimage
    from shapely.geometry import box
    from skimage.transform import rotate

    from scanner.inspection.inspect import _die_grid

    n, die, street, pad, p = 7, 120, 16, 40, 2.0
    pitch = die + street
    rng = np.random.default_rng(3)
    design = ndimage.gaussian_filter(rng.normal(size=(die, die)), 2.0)
    design = 600 + 300 * design / design.std()
    side = n * pitch + 2 * pad
    img = np.full((side, side), 200.0)
    for r in range(n):
        for c in range(n):
            y, x = pad + r * pitch + street // 2, pad + c * pitch + street // 2
            img[y:y + die, x:x + die] = design
    # skimage turns counter-clockwise on screen: the layout turns by -turn_deg in (x, y)
    turned = rotate(img, -turn_deg, order=1, mode="edge", preserve_range=True).astype(np.float32)
    mosaic = tmp_path / "mosaic.ome.zarr"
    _write_mosaic(mosaic, turned, p)
    # the recipe's grid: cells start half a street before each die (pixel centres at i * p)
    sample = SimpleNamespace(kind="image", die_to_die=True, origin_um=(0.0, 0.0),
                             die_pitch_mm=(pitch * p / 1000, pitch * p / 1000),
                             die_origin_mm=((pad - 0.5) * p / 1000, (pad - 0.5) * p / 1000))
    polygon = box(-0.5 * p, -0.5 * p, (side - 0.5) * p, (side - 0.5) * p)
    _, grid, source = _die_grid(mosaic, sample, polygon, None)
    assert source == "recipe"
    assert grid.rotation_deg == pytest.approx(turn_deg, abs=0.1)
    c0 = (side - 1) / 2
    t = math.radians(turn_deg)
    for row in range(n):
        for col in range(n):
            # where the cell's corner really lies: the recipe's corner turned about the centre
            u, v = pad - 0.5 + col * pitch - c0, pad - 0.5 + row * pitch - c0
            x, y = (c0 + math.cos(t) * u - math.sin(t) * v) * p, \
                (c0 + math.sin(t) * u + math.cos(t) * v) * p
            assert math.dist(grid.corner(col, row), (x, y)) < 2 * p, (col, row)
