"""Recipes: validation, defaults, relative paths, and one clear line for every mistake."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from typer.testing import CliRunner

from scanner.cli import app
from scanner.errors import RecipeError
from scanner.recipe import load_recipe

runner = CliRunner()

MINIMAL = """\
sample: {kind: image, path: coupon.tif, pixel_size_um: 1.0, origin_um: [0, 0]}
microscope: {kind: simulated, camera: {width: 512, height: 512, pixel_size_um: 1.0}}
scan: {overlap: 0.1}
"""


def test_minimal_recipe_resolves_relative_path(write_recipe, coupon_tif: Path) -> None:
    recipe = load_recipe(write_recipe(MINIMAL))
    assert recipe.sample.path == coupon_tif.resolve()
    assert recipe.microscope.camera.width == 512
    assert recipe.scan.order == "serpentine"
    assert recipe.name == "recipe"


def test_shipped_recipes_validate() -> None:
    recipes = sorted(Path(__file__).parents[1].joinpath("recipes").glob("*.yaml"))
    assert len(recipes) >= 3
    for path in recipes:
        load_recipe(path)


BROKEN = [
    ("sample: {kind: wafer, diameter_mm: -5}\n", "sample.diameter_mm: must be > 0"),
    ("sample: {kind: wafer, diamter_mm: 100}\n", "sample.diamter_mm: unknown key"),
    ("sample: {kind: disk}\n", "sample.kind: must be one of"),
    ("sample: {kind: Wafer}\n", "sample.kind: must be one of 'wafer', 'pv_cell', 'image', "
     "'rectangle' (got 'Wafer')"),
    ("sample: {diameter_mm: 100}\n", "sample: needs a 'kind'"),
    ("microscope: {kind: simulated}\n", "sample: required"),
    ("sample: {kind: image, path: nope.tif, pixel_size_um: 1}\n", "sample.path: file not found"),
    ("sample: {kind: image, path: coupon.tif}\n", "sample.pixel_size_um: required"),
    ("sample: {kind: wafer}\nscan: {overlap: 1.5}\n", "scan.overlap: must be < 0.9"),
    ("sample: {kind: wafer}\nscan: {order: spiral}\n", "scan.order: must be one of"),
    ("sample: {kind: wafer, diameter_mm: 10, edge_exclusion_mm: 6}\n",
     "sample.edge_exclusion_mm: leaves no usable area"),
    ("sample: {kind: wafer}\nmicroscope: {kind: simulated, camera: {bit_depth: 11}}\n",
     "microscope.camera.bit_depth: must be one of"),
    ("sample: {kind: wafer}\nmicroscope: {kind: simulated, stage: {travel_x_um: [5, -5]}}\n",
     "microscope.stage.travel_x_um: must be (min, max)"),
    ("sample: {kind: wafer}\nmicroscope: {kind: micromanager, config: missing.cfg}\n",
     "microscope.config: file not found"),
    ("sample: {kind: wafer, die_pitch_mm: ten}\n", "sample.die_pitch_mm: must be a list"),
    ("sample: {kind: wafer}\nmicroscope: {kind: simulated, focus: {z_um: 900}}\n",
     "microscope.focus.z_um: 900.0 is outside range_um"),
    ("sample: {kind: wafer, diameter_mm: .inf}\n", "sample.diameter_mm: must be a finite number"),
    ("sample: {kind: wafer, center_um: [.nan, 0]}\n", "sample.center_um.0: must be a finite"),
    ("sample: {kind: image, path: coupon.tif, pixel_size_um: 1, origin_um: [0, .inf]}\n",
     "sample.origin_um.1: must be a finite number"),
    ("sample: {kind: image, path: coupon.tif, pixel_size_um: .inf}\n",
     "sample.pixel_size_um: must be a finite number"),
    ("sample: {kind: wafer}\nmicroscope: {kind: simulated, stage: {travel_x_um: [-.inf, .inf]}}\n",
     "microscope.stage.travel_x_um.0: must be a finite number"),
    ("sample: {kind: wafer}\noutput: {name: ../../x}\n", "output.name: must be a plain folder"),
    ("sample: {kind: wafer}\noutput: {name: /tmp/x}\n", "output.name: must be a plain folder"),
    ("sample: {kind: wafer, diameter_mm: 10, die_origin_mm: [1.0e+8, -1.0e+8]}\n",
     "sample.die_origin_mm: [100000000.0, -100000000.0] lies 1.414e+08 mm from the centre"),
    # the top-level name is the folder's when output.name is not given: it wrote outside root
    ("sample: {kind: wafer}\nname: ../escaped\n", "name: must be a plain folder"),
    ("sample: {kind: wafer}\nname: \"a\\nb\"\n", "name: must be a plain folder"),
    ("sampel: {kind: wafer}\n", "sampel: unknown key (did you mean 'sample'?)"),
    ("sample: {kind: wafer}\nscan: {focus: {strategi: none}}\n",
     "scan.focus.strategi: unknown key (did you mean 'strategy'?)"),
    ("sample: {kind: wafer}\nscan: {align: maybe}\n",
     "scan.align: must be true or false or 'auto' (got 'maybe')"),
    ("sample: {kind: wafer, diameter_mm: 8, notch_depth_mm: 3}\n",
     "sample.notch_depth_mm: 3 mm is deeper than a 8 mm wafer allows"),
    ("sample: {kind: wafer, die_pitch_mm: [0.05, 0.05]}\n",
     "sample.scribe_width_um: 80 µm leaves no die"),
    # a pitch given in µm for mm: millions of dies, refused before any is listed or drawn
    ("sample: {kind: wafer, die_pitch_mm: [0.05, 0.05], scribe_width_um: 10}\n",
     "sample.die_pitch_mm: [0.05, 0.05] mm puts about 4.01e+06 dies"),
    ("sample: {kind: rectangle, width_mm: 1, height_mm: 0.8, die_pitch_mm: [0.0001, 0.0001]}\n",
     "sample.die_pitch_mm: [0.0001, 0.0001] mm puts about 8e+07 dies"),
    # PV layouts that cannot be drawn: busbars wider than their spacing, fingers that fill
    # their pitch, a pitch longer than the cell (all ran, on an all-busbar or all-dark cell)
    ("sample: {kind: pv_cell, width_mm: 40, busbars: 12, busbar_width_mm: 4}\n",
     "sample.busbar_width_mm: 4 mm busbars do not fit 12 to a 40 mm cell"),
    ("sample: {kind: pv_cell, width_mm: 40, busbars: 1, busbar_width_mm: 45}\n",
     "sample.busbar_width_mm: 45 mm busbars do not fit 1"),
    ("sample: {kind: pv_cell, finger_pitch_mm: 2, finger_width_um: 3000}\n",
     "sample.finger_width_um: 3000 µm fingers fill their 2 mm pitch"),
    ("sample: {kind: pv_cell, height_mm: 40, finger_pitch_mm: 100}\n",
     "sample.finger_pitch_mm: 100 mm leaves no finger pattern"),
    ("sample: [kind, wafer\n", "line"),
    ("- just\n- a list\n", "recipe: must be a mapping"),
    ("", "recipe is empty"),
]


@pytest.mark.parametrize(("text", "expected"), BROKEN)
def test_broken_recipe_gives_one_line_and_exit_2(
    text: str, expected: str, write_recipe, coupon_tif: Path
) -> None:
    path = write_recipe(text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert expected in str(info.value)
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    assert expected.split(":")[0] in lines[0]


def test_yaml_merge_keys_give_defaults_and_a_key_twice_is_still_refused(write_recipe) -> None:
    # the loader that refuses a key given twice read "<<:" as an unknown tag
    recipe = load_recipe(write_recipe(
        "sample: {kind: rectangle, width_mm: 3, height_mm: 3}\n"
        "microscope: {kind: simulated, camera: {<<: {width: 256, height: 256}, height: 128}}\n"))
    assert (recipe.microscope.camera.width, recipe.microscope.camera.height) == (256, 128)
    with pytest.raises(RecipeError, match="'height' appears twice"):
        load_recipe(write_recipe(
            "sample: {kind: rectangle, width_mm: 3, height_mm: 3}\n"
            "microscope: {kind: simulated, camera: {<<: {width: 64}, height: 8, height: 9}}\n"))


@pytest.mark.parametrize("sample", [
    "{kind: rectangle, width_mm: 0.01, height_mm: 0.01}",  # half a camera pixel
    "{kind: image, path: coupon.tif, pixel_size_um: 0.01}",  # an image of a few um
])
def test_a_sample_a_few_camera_pixels_wide_is_refused_before_the_scan(
        sample: str, write_recipe, coupon_tif: Path) -> None:
    # it was scanned, inspected by no window and reported without a defect (exit 0)
    path = write_recipe(f"sample: {sample}\n"
                        "microscope: {kind: simulated, camera: {width: 256, height: 256, "
                        "pixel_size_um: 20}}\n")
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "sample: the scanned region" in lines[0] \
        and "too small to inspect" in lines[0], lines


def test_a_finger_pitch_under_a_camera_pixel_is_refused(write_recipe) -> None:
    # 0.002 mm (a pitch in um for mm) was scanned at 30 um as a uniform grey cell
    path = write_recipe("sample: {kind: pv_cell, width_mm: 20, height_mm: 20, "
                        "finger_pitch_mm: 0.002, finger_width_um: 1}\n"
                        "microscope: {kind: simulated, camera: {pixel_size_um: 30}}\n")
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    assert "sample.finger_pitch_mm: 0.002 mm is 0.0667 camera pixels" in result.stderr


def test_an_exposure_the_watchdog_would_not_wait_for_is_refused(write_recipe) -> None:
    # 3 s exposures under a 2 s watchdog: every snap timed out and the scan took no tile
    path = write_recipe("sample: {kind: rectangle, width_mm: 5, height_mm: 5}\n"
                        "microscope: {kind: simulated, camera: {exposure_ms: 3000}}\n"
                        "scan: {device_timeout_s: 2}\n")
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and "scan.device_timeout_s: 2 s" in result.stderr
    ok = write_recipe("sample: {kind: rectangle, width_mm: 5, height_mm: 5}\n"
                      "microscope: {kind: simulated, camera: {exposure_ms: 3000}}\n"
                      "scan: {device_timeout_s: 4}\n", "ok.yaml")
    assert runner.invoke(app, ["validate", str(ok)]).exit_code == 0


def test_missing_recipe_file(tmp_path: Path) -> None:
    result = runner.invoke(app, ["run", str(tmp_path / "none.yaml")])
    assert result.exit_code == 2
    assert "recipe file not found" in result.stderr
    # a folder named like a recipe was called "not found"
    (tmp_path / "folder.yaml").mkdir()
    result = runner.invoke(app, ["validate", str(tmp_path / "folder.yaml")])
    assert result.exit_code == 2 and "folder.yaml: a folder, not a recipe file" in result.stderr


def test_plan_outside_travel_is_refused_before_moving(write_recipe, tmp_path: Path) -> None:
    path = write_recipe(
        "sample: {kind: rectangle, width_mm: 4, height_mm: 4, center_um: [9000, 0]}\n"
        "microscope: {kind: simulated, camera: {width: 256, height: 256},"
        " stage: {travel_x_um: [-10000, 10000], travel_y_um: [-10000, 10000]}}\n"
    )
    out = tmp_path / "scan"
    result = runner.invoke(app, ["run", str(path), "--out", str(out)])
    assert result.exit_code == 2
    assert "microscope.stage.travel_x_um" in result.stderr
    assert "outside the travel" in result.stderr
    assert not out.exists()  # refused before the scan folder (or any move) existed


def test_existing_output_is_not_destroyed(write_recipe, tmp_path: Path) -> None:
    out = tmp_path / "scan"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    path = write_recipe(
        "sample: {kind: rectangle, width_mm: 0.3, height_mm: 0.3}\n"
        "microscope: {kind: simulated, camera: {width: 256, height: 256}}\n"
    )
    result = runner.invoke(app, ["run", str(path), "--out", str(out)])
    assert result.exit_code == 2
    assert "not empty" in result.stderr
    assert (out / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize("args", [
    ["inspect", ".", "--threshold", "inf"],
    ["inspect", ".", "--pixel-size", "nan"],
    ["train", "--good", ".", "--false-alarms-per-cm2", "inf"],
    ["train", "--good", ".", "--pixel-size", "-inf"],
])
def test_non_finite_command_line_numbers_exit_2(args: list[str]) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_a_scans_recorded_settings_are_read_back_by_their_own_models() -> None:
    from scanner.errors import RecipeError
    from scanner.recipe import OutputSpec, StageSpec, StitchSpec, recorded

    scan = {"recipe": {"stitch": {"min_confidence": 0.5}, "microscope": {"kind": "simulated"}}}
    # what the record holds, and the model's own defaults where it holds nothing
    assert recorded(scan, StitchSpec).min_confidence == 0.5
    assert recorded(scan, StitchSpec).registration is StitchSpec().registration
    assert recorded(scan, StageSpec).repeatability_um == StageSpec().repeatability_um
    assert recorded({}, OutputSpec).chunk_px == OutputSpec().chunk_px
    with pytest.raises(RecipeError, match=r"recipe\.output.*klarf_version"):
        recorded({"recipe": {"output": {"klarf_version": "9"}}}, OutputSpec)
    # `klarf_version: 1.8` unquoted is a number to YAML: "must be one of '1.2' or '1.8' (got
    # 1.8)"
    assert OutputSpec(klarf_version=1.8).klarf_version == "1.8"
    assert OutputSpec(klarf_version=1.2).klarf_version == "1.2"
    with pytest.raises(ValueError):
        OutputSpec(klarf_version=1.5)


def test_a_flat_wafer_gets_the_flat_of_its_diameter(tmp_path: Path) -> None:
    from scanner.recipe import parse_recipe

    def flat(**sample):
        data = {"sample": {"kind": "wafer", "orientation": "flat", **sample},
                "microscope": {"kind": "simulated"}}
        return parse_recipe(data, base_dir=tmp_path).sample.flat_length_mm

    assert flat(diameter_mm=100) == 32.5 and flat(diameter_mm=150) == 57.5  # SEMI M1
    # 100 mm's flat would be longer than a 30 mm wafer is wide (and cut it in half)
    assert flat(diameter_mm=30) == pytest.approx(9.75)
    assert flat(diameter_mm=30, flat_length_mm=8) == 8
    with pytest.raises(RecipeError, match="flat_length_mm"):
        flat(diameter_mm=30, flat_length_mm=40)


@pytest.mark.parametrize(("sample", "expected"), [
    # 0.05 mm at 10 µm pixels: 5 px a die, which the die-to-die comparison never compares
    # (asked for: a wafer's default die_to_die leaves such dies to the detector alone)
    ({"kind": "wafer", "diameter_mm": 4, "edge_exclusion_mm": 0.5, "die_pitch_mm": [0.05, 0.05],
      "scribe_width_um": 10, "die_to_die": True},
     "fewer than the 32 die-to-die comparison needs"),
    ({"kind": "rectangle", "width_mm": 1, "height_mm": 1, "die_pitch_mm": [0.005, 0.005]},
     "a die must span at least one pixel"),
    # an image's extent is known from its file: 1000 x 1000 px of 30 µm, 12 µm dies
    ({"kind": "image", "path": "big.tif", "pixel_size_um": 30.0,
      "die_pitch_mm": [0.012, 0.012], "die_to_die": False}, "more than 2000000"),
])
def test_a_die_pitch_the_camera_cannot_resolve_is_refused_before_the_scan(
        write_recipe, tmp_path: Path, sample: dict, expected: str) -> None:
    import numpy as np
    import tifffile

    tifffile.imwrite(tmp_path / "big.tif", np.random.default_rng(0).integers(
        900, 1100, (1000, 1000), dtype=np.uint16))
    path = write_recipe({
        "sample": sample,
        "microscope": {"kind": "simulated", "stage": {
            "travel_x_um": [-1e5, 1e5], "travel_y_um": [-1e5, 1e5]},
            "camera": {"width": 256, "height": 256, "pixel_size_um": 10.0}}})
    for command in (["validate", str(path)],
                    ["run", str(path), "--out", str(tmp_path / "scan"), "--no-inspect"]):
        result = runner.invoke(app, command)
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "sample.die_pitch_mm" in lines[0] and expected in lines[0], \
            lines
    assert not (tmp_path / "scan").exists()


def test_a_defect_kind_the_sample_cannot_show_names_the_recipes_field(write_recipe) -> None:
    path = write_recipe("sample: {kind: pv_cell, defects: {kinds: [missing_pattern]}}\n")
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    # the simulator's parameter is defect_kinds; the recipe's field is named
    assert "recipe.yaml: sample.defects.kinds: 'missing_pattern' cannot be drawn on a " \
        "pv_cell" in result.stderr


def test_a_micromanager_config_that_cannot_be_read_names_the_recipe_file(
        write_recipe, tmp_path) -> None:
    (tmp_path / "rig.cfg").write_text("garbage line here\n")
    path = write_recipe("sample: {kind: rectangle, width_mm: 2, height_mm: 2}\n"
                        "microscope: {kind: micromanager, config: rig.cfg, pixel_size_um: 5}\n",
                        name="my_rig.yaml")
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: my_rig.yaml: microscope.config: "), \
        lines


@pytest.mark.parametrize("shape", [(1, 1), (7, 64)])
def test_a_sample_image_too_small_to_inspect_is_refused_before_the_scan(
        write_recipe, tmp_path, shape) -> None:
    tifffile.imwrite(tmp_path / "tiny.tif", np.full(shape, 100, np.uint8))
    path = write_recipe("sample: {kind: image, path: tiny.tif, pixel_size_um: 1}\n")
    for command in (["validate", str(path)], ["run", str(path), "--out", str(tmp_path / "s")]):
        result = runner.invoke(app, command)
        assert result.exit_code == 2, result.output
        assert f"recipe.yaml: sample.path: {shape[0]} x {shape[1]} px is too small" in \
            result.stderr
    assert not (tmp_path / "s").exists()


def test_a_sample_region_too_small_to_inspect_is_refused(write_recipe, tmp_path) -> None:
    tifffile.imwrite(tmp_path / "part.tif", np.full((64, 64), 100, np.uint8))
    path = write_recipe("sample: {kind: image, path: part.tif, pixel_size_um: 1, "
                        "region_px: [0, 0, 2, 40]}\n")
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    assert "recipe.yaml: sample.region_px: 2 x 40 px is too small" in result.stderr


def test_a_simulated_cell_may_be_monocrystalline(tmp_path: Path) -> None:
    from devices.sample_factory import sample_for_recipe
    from scanner.recipe import RecipeError, parse_recipe

    # the simulator and the training data have mono cells (grain size 0); a recipe could not
    # ask for one ("sample.grain_size_mm: unknown key")
    base = {"microscope": {"kind": "simulated"}}
    mono = parse_recipe({"sample": {"kind": "pv_cell", "width_mm": 20, "height_mm": 20,
                                    "grain_size_mm": 0}, **base}, tmp_path)
    multi = parse_recipe({"sample": {"kind": "pv_cell", "width_mm": 20, "height_mm": 20},
                          **base}, tmp_path)
    assert sample_for_recipe(mono.sample).grain_size_mm == 0.0
    assert sample_for_recipe(multi.sample).grain_size_mm == 5.0
    with pytest.raises(RecipeError, match="sample.grain_size_mm"):
        parse_recipe({"sample": {"kind": "pv_cell", "grain_size_mm": -1}, **base}, tmp_path)


def test_a_recipe_not_in_utf8_is_named_with_its_line_and_a_binary_file_as_not_text(
        tmp_path: Path) -> None:
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("# wafer of lot 7\nsample: {kind: wafer, diameter_mm: 50}\n"
                       "# opérateur: Zoë\n".encode("latin-1"))
    with pytest.raises(RecipeError) as info:
        load_recipe(latin1)
    assert str(info.value) == (f"{latin1}: line 3: byte 0xe9 is not UTF-8 (save the recipe "
                               "as UTF-8 text)")
    binary = tmp_path / "scan.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    with pytest.raises(RecipeError, match=r"scan\.yaml: not a text file$"):
        load_recipe(binary)
    result = runner.invoke(app, ["validate", str(latin1)])
    assert result.exit_code == 2 and "line 3: byte 0xe9" in result.output
