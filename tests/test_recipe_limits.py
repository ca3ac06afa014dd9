"""Recipe values out of any sane range: refused by `validate` in one line naming the field
(exit 2), before anything is built, drawn or moved."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from scanner.cli import app
from scanner.errors import RecipeError
from scanner.recipe import load_recipe

runner = CliRunner()

RECTANGLE = "sample: {kind: rectangle, width_mm: 1.5, height_mm: 1.0}\n"
SIMULATED = "microscope: {kind: simulated, camera: {width: 256, height: 256, pixel_size_um: 2.0}}\n"


def _refused(path: Path, expected: str) -> None:
    """``validate`` prints one line holding ``expected`` and exits 2, without a traceback."""
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert expected in str(info.value), str(info.value)
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert "Traceback" not in result.output


# --------------------------------------------------------------------------- F01


@pytest.mark.parametrize(("calibration", "expected"), [
    ('{"pixel_size_um": NaN, "rotation_deg": 0}', "pixel_size_um must be a finite number > 0"),
    ('{"pixel_size_um": 0, "rotation_deg": 0}', "pixel_size_um must be a finite number > 0"),
    ('{"pixel_size_um": -2.0, "rotation_deg": 0}', "(got -2.0)"),
    ('{"pixel_size_um": Infinity, "rotation_deg": 0}', "(got inf)"),
    ('{"pixel_size_um": 1e12}', "<= 1000 µm"),
    ('{"pixel_size_um": true}', "not a calibration file"),
    ('{"pixel_size_um": 2.0, "rotation_deg": NaN}', "rotation_deg must be a finite number"),
    ('{"pixel_size_um": 2.0, "rotation_deg": 90}', "within +-45 (got 90.0)"),
])
def test_a_calibration_file_with_values_out_of_range_names_the_recipes_field(
        write_recipe, tmp_path: Path, calibration: str, expected: str) -> None:
    # NaN failed inside the plan ("cannot convert float NaN"), 0 divided by zero, a negative
    # pixel emptied the plan ("sample: the scan region is empty"), a NaN rotation moved the
    # stage to nowhere in `run` after `validate` passed
    (tmp_path / "cal.json").write_text(calibration)
    path = write_recipe(RECTANGLE + "microscope: {kind: simulated, calibration: cal.json}\n")
    _refused(path, "microscope.calibration: ")
    _refused(path, expected)
    assert "cal.json" in str(pytest.raises(RecipeError, load_recipe, path).value)


def test_a_calibration_file_in_range_still_sets_the_pixel_size(write_recipe,
                                                               tmp_path: Path) -> None:
    from devices.calibration import read_camera_calibration

    (tmp_path / "cal.json").write_text(json.dumps({"pixel_size_um": 2.01, "rotation_deg": -0.3}))
    assert read_camera_calibration(tmp_path / "cal.json") == (2.01, -0.3)
    path = write_recipe(RECTANGLE + "microscope: {kind: simulated, calibration: cal.json}\n")
    assert load_recipe(path).microscope.calibration == (tmp_path / "cal.json").resolve()


# --------------------------------------------------------------------------- F05, F06


def test_a_device_timeout_beyond_an_hour_is_refused(write_recipe) -> None:
    # 1e10 s overflowed the thread wait in `run` ("timestamp out of range")
    _refused(write_recipe(RECTANGLE + "scan: {device_timeout_s: 1e10}\n"),
             "scan.device_timeout_s: must be <= 3600")
    load_recipe(write_recipe(RECTANGLE + "scan: {device_timeout_s: 3600}\n"))


@pytest.mark.parametrize(("text", "field"), [
    ("sample: {kind: rectangle, width_mm: 1.5, height_mm: 1, surface: {seed: -1}}\n",
     "sample.surface.seed"),
    (RECTANGLE + "microscope: {kind: simulated, faults: {seed: -1}}\n", "microscope.faults.seed"),
    (RECTANGLE + "microscope: {kind: simulated, seed: -1}\n", "microscope.seed"),
    ("sample: {kind: rectangle, width_mm: 1.5, height_mm: 1, defects: {seed: -1}}\n",
     "sample.defects.seed"),
    ("sample: {kind: rectangle, width_mm: 1.5, height_mm: 1, roughness: {seed: -1}}\n",
     "sample.roughness.seed"),
    ("sample: {kind: wafer, placement: {random: true, seed: -1}}\n", "sample.placement.seed"),
])
def test_a_negative_seed_is_refused_naming_it(write_recipe, text: str, field: str) -> None:
    # numpy's "expected non-negative integer" crashed `validate` with no field named
    _refused(write_recipe(text), f"{field}: must be >= 0 (got -1)")


@pytest.mark.parametrize(("text", "expected"), [
    ("sample: {kind: rectangle, width_mm: 1, height_mm: 1, center_um: [1.0e+19, 0]}\n",
     "sample.center_um.0: must be <="),
    ("sample: {kind: wafer, diameter_mm: 50, center_um: [0, -1.0e+300]}\n",
     "sample.center_um.1: must be >="),
    ("sample: {kind: rectangle, width_mm: 1, height_mm: 1}\n"
     "microscope: {kind: simulated, stage: {travel_x_um: [-1.0e+308, 1.0e+308]}}\n",
     "microscope.stage.travel_x_um.0: must be >="),
])
def test_a_coordinate_beyond_a_kilometre_is_refused_naming_it(write_recipe, text: str,
                                                                expected: str) -> None:
    # a polygon of one point (1e19 + 500 um is 1e19) was refused deep in the plan by
    # pydantic in four lines naming no field of the recipe (exit 1)
    _refused(write_recipe(text), expected)


# --------------------------------------------------------------------------- F08


@pytest.mark.parametrize(("sample", "expected"), [
    # 1e6 mm hung `validate` drawing the simulated die; 5000 mm passed with no die grid
    ("{kind: wafer, diameter_mm: 50, die_pitch_mm: [1e6, 1e6]}", "larger than the 50 mm wafer"),
    ("{kind: wafer, diameter_mm: 50, die_pitch_mm: [5000, 5000]}", "larger than the 50 mm"),
    ("{kind: wafer, diameter_mm: 50, die_pitch_mm: [5, 51]}", "[5.0, 51.0] mm is larger"),
    # a coupon or an image may be a piece of one large die: refused past 10 times its extent
    ("{kind: rectangle, width_mm: 1.5, height_mm: 1, die_pitch_mm: [500, 500]}",
     "over 10 times the rectangle (1.5 x 1 mm"),
    ("{kind: rectangle, width_mm: 1.5, height_mm: 1, die_pitch_mm: [1, 12]}",
     "over 10 times the rectangle"),
    # coupon.tif: 1200 x 900 px of 1 µm
    ("{kind: image, path: coupon.tif, pixel_size_um: 1, die_pitch_mm: [13, 0.5]}",
     "over 10 times the image (1.2 x 0.9 mm"),
])
def test_a_die_pitch_larger_than_the_sample_is_refused_before_anything_is_drawn(
        write_recipe, coupon_tif: Path, sample: str, expected: str) -> None:
    path = write_recipe(f"sample: {sample}\n" + SIMULATED)
    began = time.perf_counter()
    _refused(path, "sample.die_pitch_mm: ")
    _refused(path, expected)
    assert time.perf_counter() - began < 20


def test_a_die_pitch_as_large_as_the_sample_is_still_accepted(write_recipe,
                                                              coupon_tif: Path) -> None:
    load_recipe(write_recipe("sample: {kind: wafer, diameter_mm: 50, die_pitch_mm: [50, 50]}\n"))
    load_recipe(write_recipe("sample: {kind: rectangle, width_mm: 1.5, height_mm: 1, "
                             "die_pitch_mm: [1.5, 1]}\n"))
    load_recipe(write_recipe("sample: {kind: image, path: coupon.tif, pixel_size_um: 1, "
                             "die_pitch_mm: [1.2, 0.9]}\n"))
    # a coupon cut from a die of 5 mm: its die coordinates come from the die's pitch
    load_recipe(write_recipe("sample: {kind: rectangle, width_mm: 1.5, height_mm: 1, "
                             "die_pitch_mm: [5, 5]}\n"))


# --------------------------------------------------------------------------- F09


@pytest.mark.parametrize(("text", "field"), [
    ("sample: {kind: wafer, diameter_mm: 50, die_pitch_mm: [true, true]}\n",
     "sample.die_pitch_mm"),
    ("sample: {kind: wafer, center_um: [true, 0]}\n", "sample.center_um"),
    ("sample: {kind: wafer}\nmicroscope: {kind: simulated, focus: {range_um: [false, true]}}\n",
     "microscope.focus.range_um"),
    ("sample: {kind: wafer}\nscan: {region: {band_mm: [false, true]}}\n", "scan.region.band_mm"),
    ("sample: {kind: wafer, surface: {bumps: [{center_um: [true, 0], height_um: 5, "
     "radius_um: 100}]}}\n", "sample.surface.bumps.0.center_um"),
    ("sample: {kind: image, path: coupon.tif, pixel_size_um: 1, region_px: [0, 0, true, 5]}\n",
     "sample.region_px"),
])
def test_true_or_false_in_a_pair_of_numbers_is_refused(write_recipe, coupon_tif: Path,
                                                        text: str, field: str) -> None:
    # pydantic's lax mode took [true, true] for a 1 mm die pitch
    _refused(write_recipe(text), f"{field}: numbers, not true/false")


# --------------------------------------------------------------------------- F10


@pytest.mark.parametrize(("surface", "expected"), [
    # each passed `validate`; `run` then ran out of memory (TiB) or hung
    ("surface: {tilt_um_per_mm: [1e12, 0]}", "sample.surface.tilt_um_per_mm.0: must be <= 50"),
    ("surface: {tilt_um_per_mm: [0, -51]}", "sample.surface.tilt_um_per_mm.1: must be >= -50"),
    ("surface: {waviness_um: 1e12}", "sample.surface.waviness_um: must be <= 100"),
    ("surface: {bow_um: 1e6}", "sample.surface.bow_um: must be <= 1000"),
    ("surface: {bow_um: -1e6}", "sample.surface.bow_um: must be >= -1000"),
    ("roughness: {sa_nm: 5, variation: 0.5, variation_period_mm: 1e-12}",
     "sample.roughness.variation_period_mm: must be >= 0.1"),
])
def test_a_simulated_surface_beyond_reason_is_refused(write_recipe, surface: str,
                                                      expected: str) -> None:
    _refused(write_recipe(f"sample: {{kind: rectangle, width_mm: 1.5, height_mm: 1, {surface}}}\n"),
             expected)


def test_the_shipped_focus_surfaces_stay_valid(write_recipe) -> None:
    # the steepest surface the focus tests use
    load_recipe(write_recipe("sample: {kind: wafer, diameter_mm: 10, surface: "
                             "{tilt_um_per_mm: [20.0, -10.0], bow_um: 5, waviness_um: 0.5}}\n"))


def test_the_simulated_blur_kernel_is_capped() -> None:
    from simulators.camera import Optics

    # a surface 1e12 µm out of focus asked for a kernel of terabytes
    image = np.random.default_rng(0).random((64, 64), dtype=np.float32)
    began = time.perf_counter()
    out = Optics().apply(image, 1e12, 1.0)
    assert time.perf_counter() - began < 5
    assert out.shape == image.shape and np.isfinite(out).all()
    assert out.std() < 0.1 * image.std()  # an even grey


def test_a_noise_lattice_finer_than_the_pixels_is_not_built() -> None:
    from simulators.samples.texture import value_noise

    # a cell of 1e-9 µm under 5 µm pixels: a lattice of 1e25 points
    xs = np.arange(256) * 5.0
    began = time.perf_counter()
    noise = value_noise(xs, xs, 1e-9, 3)
    assert time.perf_counter() - began < 5 and noise.shape == (256, 256)
    # the same values as the lattice gives, wherever the pixels lie
    xs, ys = np.arange(300) + 5.3, np.arange(250) - 7.1
    full = value_noise(xs, ys, 1.0, 5)
    few = value_noise(xs[[0, 7, 299]], ys[[0, 3, 249]], 1.0, 5)
    assert np.array_equal(full[np.ix_([0, 3, 249], [0, 7, 299])], few)


# --------------------------------------------------------------------------- F11


@pytest.mark.parametrize(("text", "expected"), [
    # reported as sample.flat_length_mm (the flat's default made from it was 0)
    ("sample: {kind: wafer, diameter_mm: 1e-12}\n",
     "sample.diameter_mm: 1e-12 mm is no wafer (must be 1 to 450 mm)"),
    # reported as sample.die_pitch_mm (too many dies)
    ("sample: {kind: wafer, diameter_mm: 1e12}\n", "sample.diameter_mm: 1e+12 mm is no wafer"),
    # reported as sample.die_pitch_mm (a die under one pixel)
    ("sample: {kind: wafer, diameter_mm: 50}\nmicroscope: {kind: simulated, camera: "
     "{pixel_size_um: 1e12}}\n", "microscope.camera.pixel_size_um: must be <= 1000"),
])
def test_an_out_of_range_value_is_named_itself(write_recipe, text: str, expected: str) -> None:
    _refused(write_recipe(text), expected)


def test_a_port_on_a_micromanager_stage_names_the_port(write_recipe, tmp_path: Path) -> None:
    # reported as microscope.stage.driver, which the recipe did not give
    (tmp_path / "rig.cfg").write_text("Property,Core,Initialize,0\n")
    path = write_recipe(RECTANGLE + "microscope: {kind: micromanager, config: rig.cfg, stage: "
                        "{travel_x_um: [-5e4, 5e4], travel_y_um: [-5e4, 5e4], port: abc}}\n")
    _refused(path, "microscope.stage.port: only for kind: simulated")


def test_the_default_die_pitch_on_a_small_wafer_is_still_accepted(write_recipe) -> None:
    # the default 10 mm pitch (which scan.json's dumped recipe gives explicitly) on an 8 mm
    # wafer: a bare wafer, as before
    load_recipe(write_recipe("sample: {kind: wafer, diameter_mm: 8, edge_exclusion_mm: 0.5}\n"))
    load_recipe(write_recipe("sample: {kind: wafer, diameter_mm: 8, edge_exclusion_mm: 0.5, "
                             "die_pitch_mm: [10, 10]}\n"))
