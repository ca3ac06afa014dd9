"""A tilted, bowed sample scanned with a focus map: tiles land within the depth of field."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from scanner.pipeline import run_scan
from scanner.recipe import load_recipe
from scanner.tilestore import read_tiles_csv

pytestmark = pytest.mark.slow

RECIPE = """\
sample:
  kind: wafer
  diameter_mm: 8
  edge_exclusion_mm: 0.5
  die_pitch_mm: [1, 1]
  scribe_width_um: 40
  defects: {{count: 3, seed: 2}}
  surface: {{tilt_um_per_mm: [3.0, -2.0], bow_um: 8, waviness_um: 0.5}}
microscope:
  kind: simulated
  camera: {{width: 512, height: 512, pixel_size_um: 2.0}}
  objective: {{numerical_aperture: 0.3}}
  focus: {{z_um: 0, range_um: [-100, 100]}}
scan:
  overlap: 0.1
  focus: {{strategy: {strategy}, points: 9, layout: rings}}
"""


def _errors(folder: Path) -> tuple[np.ndarray, float]:
    rows = read_tiles_csv(folder)
    dof = json.loads((folder / "scan.json").read_text())["microscope"]["depth_of_field_um"]
    return np.array([abs(r.z_um - r.z_true_um) for r in rows]) / dof, dof


def test_focus_map_keeps_tiles_in_focus(write_recipe, tmp_path: Path) -> None:
    mapped = run_scan(load_recipe(write_recipe(RECIPE.format(strategy="focus_map"))),
                      tmp_path / "map")
    fixed = run_scan(load_recipe(write_recipe(RECIPE.format(strategy="none"), "none.yaml")),
                     tmp_path / "none")
    err_map, dof = _errors(mapped.folder)
    err_none, _ = _errors(fixed.folder)
    assert err_none.max() > 2.0  # the surface really spans several depths of field
    assert np.median(err_map) <= 0.2
    assert np.percentile(err_map, 95) <= 0.5
    assert err_map.max() <= 1.0
    micro = json.loads((mapped.folder / "scan.json").read_text())["microscope"]
    assert micro["depth_of_field_um"] == pytest.approx(0.55 / 0.3**2)  # the optical one
    # 2 um pixels are coarser than NA 0.3 resolves: the camera sees a deeper focus
    assert micro["effective_depth_of_field_um"] == pytest.approx(0.55 / 0.09 + 2.0 / 0.3,
                                                                 abs=1e-3)
    focus = json.loads((mapped.folder / "focus_map.json").read_text())
    assert focus["autofocus_images"] / focus["autofocus_runs"] <= 8
    assert (mapped.folder / "focus_map.png").stat().st_size > 1000
    # the focus map costs little hardware time next to the scan itself
    hw_map = mapped.timings["acquire"]["hardware_s"]
    hw_none = fixed.timings["acquire"]["hardware_s"]
    assert hw_map < hw_none * 2.5


def test_too_few_points_for_the_chosen_model_do_not_fail_the_scan(write_recipe,
                                                                  tmp_path: Path) -> None:
    """9 points cannot carry a thin-plate spline (>= 10): the map falls back to auto."""
    text = RECIPE.format(strategy="focus_map")
    text = text.replace("layout: rings}", "layout: rings, model: tps}")
    result = run_scan(load_recipe(write_recipe(text)), tmp_path / "tps")
    assert result.status == "complete"
    focus = json.loads((result.folder / "focus_map.json").read_text())
    assert focus["surface"]["model"] in ("plane", "quadratic")
    err, _ = _errors(result.folder)
    assert err.max() <= 1.0


def test_focus_moves_and_snaps_get_the_scans_retries(tmp_path: Path, monkeypatch) -> None:
    """A stuck-busy move or a camera timeout during the focus map is retried as a tile's is
    (it failed the whole scan), and a point whose move never clears is left out of the map."""
    import yaml

    from devices.core import build_microscope
    from devices.errors import HardwareTimeout
    from scanner.acquisition.acquire import _focus_controller
    from scanner.pipeline import make_plan
    from scanner.recipe import parse_recipe

    data = yaml.safe_load(RECIPE.format(strategy="focus_map").replace("{{", "{")
                          .replace("}}", "}"))
    recipe = parse_recipe(data, tmp_path, "flaky")
    handle = build_microscope(recipe)
    plan = make_plan(recipe, handle)
    core = handle.core
    faults = {"setXYPosition": 2, "setPosition": 3, "snapImage": 2}

    def flaky(name: str):
        real = getattr(core, name)

        def call(*args):
            if faults[name] > 0:
                faults[name] -= 1
                raise HardwareTimeout(f"{name}: controller busy")
            return real(*args)
        return call

    for name in faults:
        monkeypatch.setattr(core, name, flaky(name))
    focus = _focus_controller(handle, recipe, plan)
    assert faults == {"setXYPosition": 0, "setPosition": 0, "snapImage": 0}
    assert len(focus.map_points) == 9 and all(p["ok"] for p in focus.map_points)
    # a focus-map point the stage cannot reach is left out; the scan goes on
    real_xy = core.setXYPosition

    def refused(x: float, y: float) -> None:
        if abs(x) < 1.0 and abs(y) < 1.0:
            raise RuntimeError("XY target refused by the controller")
        real_xy(x, y)

    monkeypatch.setattr(core, "setXYPosition", refused)
    focus = _focus_controller(handle, recipe, plan)
    assert 7 <= len(focus.map_points) <= 8
    handle.close()


def test_a_focus_map_of_a_sample_hardly_larger_than_a_field_lays_its_points_on_it(
        write_recipe, tmp_path: Path) -> None:
    """A 1.5 x 1 mm coupon under a 1 mm field: no point lies half a field inside it, and the
    scan failed after its folder was made ("no area left inside the polygon after the
    margin"; with --overwrite the earlier scan was gone)."""
    text = """
sample: {kind: rectangle, width_mm: 1.5, height_mm: 1.0, defects: {count: 0}}
microscope:
  kind: simulated
  camera: {width: 512, height: 512, pixel_size_um: 2.0}
scan: {overlap: 0.1, focus: {strategy: focus_map}}
"""
    result = run_scan(load_recipe(write_recipe(text)), tmp_path / "coupon")
    assert result.status == "complete"
    points = json.loads((result.folder / "focus_map.json").read_text())["points"]
    assert len(points) >= 3 and all(p["ok"] for p in points)
    assert all(abs(p["x_um"]) <= 750 and abs(p["y_um"]) <= 500 for p in points)


def test_hardware_autofocus_on_a_microscope_without_one_is_refused_before_the_stage_moves(
        write_recipe, tmp_path: Path) -> None:
    """Every tile's autofocus failed ("Error (code 43)") and the scan ended complete with no
    tile focused."""
    from typer.testing import CliRunner

    from scanner.cli import app

    path = write_recipe("""
sample: {kind: rectangle, width_mm: 1.5, height_mm: 1.0}
microscope: {kind: simulated, camera: {width: 512, height: 512, pixel_size_um: 2.0}}
scan: {focus: {strategy: every_tile, method: hardware}}
""")
    for command in (["validate", str(path)], ["run", str(path), "--out", str(tmp_path / "s")]):
        res = CliRunner().invoke(app, command)
        assert res.exit_code == 2 and "scan.focus.method" in res.output, res.output
    assert not (tmp_path / "s").exists()


def test_focus_map_points_stay_inside_the_travel(write_recipe, tmp_path: Path, caplog) -> None:
    # a sample narrower than a field: the tile grid sits flush with its corner, half a field
    # from its centre, where the focus points were; with the travel ending between the two
    # the points lay outside it (the serial driver refused the moves and the map fell back
    # to the fixed focus; a C++ stage without limits of its own would have driven there)
    recipe = load_recipe(write_recipe("""\
sample: {kind: rectangle, width_mm: 0.3, height_mm: 0.3, center_um: [0, 0]}
microscope:
  kind: simulated
  camera: {width: 1024, height: 1024, pixel_size_um: 2.0}
  stage: {travel_x_um: [500, 100000], travel_y_um: [-100000, -500], driver: prior}
scan: {overlap: 0.1, focus: {strategy: focus_map, points: 5}}
"""))
    result = run_scan(recipe, tmp_path / "scan")
    assert "left out" not in caplog.text and "outside the travel" not in caplog.text
    points = json.loads((result.folder / "focus_map.json").read_text())["points"]
    tiles = read_tiles_csv(result.folder)
    assert points and all(p["ok"] for p in points)
    for p in points:  # inside the travel, and where the tiles are
        assert p["x_um"] >= 500 and p["y_um"] <= -500
        assert min(t.x_um for t in tiles) <= p["x_um"] <= max(t.x_um for t in tiles)
