"""Stage kinematics, simulated stage behaviour, and scan planning."""

from __future__ import annotations

import math

import numpy as np
import pytest
from shapely.geometry import box

from scanner.acquisition.plan import (
    check_travel,
    estimate_hardware_time_s,
    overlap_warning,
    plan_scan,
    resolve_plan,
)
from scanner.errors import PlanError
from scanner.recipe import parse_recipe
from simulators.clock import HardwareClock
from simulators.stage import StageAxes, TravelLimitError, axis_move_time_s


def test_trapezoid_and_triangle_profiles() -> None:
    # long move: accelerate 0.1 s (1000 µm), cruise, decelerate 0.1 s
    assert axis_move_time_s(10_000, 10_000, 100_000) == pytest.approx(0.2 + 0.9)
    # short move never reaches full speed: t = 2 sqrt(d / a)
    assert axis_move_time_s(100, 10_000, 100_000) == pytest.approx(2 * math.sqrt(1e-3))
    assert axis_move_time_s(0, 10_000, 100_000) == 0.0
    assert axis_move_time_s(-500, 1e4, 1e5) == axis_move_time_s(500, 1e4, 1e5)


def _stage(repeat: float = 2.0) -> StageAxes:
    return StageAxes([(-1000, 1000), (-500, 500)], 10_000, 100_000, 0.05, repeat,
                     HardwareClock(), np.random.default_rng(0))


def test_stage_refuses_moves_outside_travel_without_moving() -> None:
    stage = _stage()
    stage.move_to(100, 100)
    before = stage.true.copy()
    with pytest.raises(TravelLimitError):
        stage.move_to(0, 600)
    np.testing.assert_array_equal(stage.true, before)


def test_stage_repeatability_and_clock() -> None:
    stage = _stage(repeat=3.0)
    errors = []
    for i in range(400):
        target = (float(i % 7) * 100 - 300, float(i % 5) * 100 - 200)
        stage.move_to(*target)
        np.testing.assert_allclose(stage.reported(), target, atol=0.01)
        errors.append(stage.true - np.array(target))
    errors = np.array(errors)
    assert 2.5 < errors.std() < 3.5  # lands with the configured repeatability error
    assert abs(errors.mean()) < 0.5
    # every move costs motion + 50 ms settling on the hardware clock
    assert stage.clock.elapsed_s > 400 * 0.05


def _recipe(sample: dict, camera: dict | None = None, **extra) -> object:
    data = {"sample": sample, "microscope": {"kind": "simulated",
                                            "camera": camera or {"width": 500, "height": 400}}}
    data.update(extra)
    return parse_recipe(data, base_dir=None)


def test_rectangle_plan_covers_region_in_serpentine_order() -> None:
    recipe = _recipe({"kind": "rectangle", "width_mm": 2.0, "height_mm": 1.0,
                      "center_um": [500, -200]}, scan={"overlap": 0.1})
    plan = plan_scan(recipe, (500.0, 400.0))
    assert plan.step_um == pytest.approx((450.0, 360.0))
    # every point of the region is seen by some tile
    tiles = [box(t.x_um - 250, t.y_um - 200, t.x_um + 250, t.y_um + 200) for t in plan.tiles]
    from shapely import union_all

    assert union_all(tiles).contains(plan.region)
    # serpentine: consecutive tiles are neighbours (no flyback across the sample)
    pos = plan.positions_um()
    steps = np.abs(np.diff(pos, axis=0))
    assert np.all((steps[:, 0] < 451) & (steps[:, 1] < 361))
    # rows grow with y, cols with x
    for t in plan.tiles:
        assert t.x_um == pytest.approx(pos[:, 0].min() + t.col * 450.0)
        assert t.y_um == pytest.approx(pos[:, 1].min() + t.row * 360.0)


def test_wafer_plan_keeps_only_tiles_touching_usable_area() -> None:
    recipe = _recipe({"kind": "wafer", "diameter_mm": 20, "edge_exclusion_mm": 2,
                      "die_pitch_mm": [2, 2]}, camera={"width": 1000, "height": 1000,
                                                        "pixel_size_um": 1.0})
    plan = plan_scan(recipe, (1000.0, 1000.0))
    usable_r = 8000.0
    for t in plan.tiles:
        # nearest point of the tile to the centre must be inside the usable disk
        nx = max(abs(t.x_um) - 500, 0)
        ny = max(abs(t.y_um) - 500, 0)
        assert math.hypot(nx, ny) <= usable_r + 1e-6
    # and the disk is covered: about area / step^2 tiles
    expected = math.pi * usable_r**2 / 900.0**2
    assert expected < len(plan.tiles) < expected * 1.5


def test_an_overlap_within_the_stage_landing_error_is_named() -> None:
    # 5 % of 480 um is 24 um; a stage of 5 um repeatability lands two tiles up to 21 um
    # nearer or farther: on a coin die grid, tiles 9 um off and half the reports false
    sample = {"kind": "rectangle", "width_mm": 2, "height_mm": 2}
    camera = {"width": 640, "height": 480, "pixel_size_um": 1.0}
    stage = {"repeatability_um": 5.0}
    tight = parse_recipe({"sample": sample, "microscope": {"kind": "simulated", "camera": camera,
                                                           "stage": stage},
                          "scan": {"overlap": 0.05}}, base_dir=None)
    said = overlap_warning(tight, (640.0, 480.0), 1.0)
    assert said is not None and said.startswith("scan.overlap: 0.05 leaves 24 µm")
    assert "repeatability_um 5" in said and said.endswith("at least 0.10")
    # enough with a better stage, or with a wider overlap
    assert overlap_warning(_recipe(sample, camera, scan={"overlap": 0.05}), (640.0, 480.0),
                           1.0) is None
    wide = parse_recipe({"sample": sample, "microscope": {"kind": "simulated", "camera": camera,
                                                          "stage": stage},
                         "scan": {"overlap": 0.1}}, base_dir=None)
    assert overlap_warning(wide, (640.0, 480.0), 1.0) is None


def test_travel_check_names_tile_and_axis() -> None:
    recipe = parse_recipe({"sample": {"kind": "rectangle", "width_mm": 1, "height_mm": 1,
                                      "center_um": [0, 49_800]},
                           "microscope": {"kind": "simulated",
                                          "stage": {"travel_y_um": [-50_000, 50_000]}}},
                          base_dir=None)
    plan = plan_scan(recipe, (300.0, 300.0))
    with pytest.raises(PlanError, match=r"travel_y_um: tile \d+ .* needs y at "):
        check_travel(plan, recipe)
    # the plan a scan runs is resolved with the check: it cannot exist unchecked
    with pytest.raises(PlanError, match=r"travel_y_um: tile \d+ .* needs y at "):
        resolve_plan(recipe, (300.0, 300.0))
    assert not plan.travel_checked


class _DriverLimits:
    """A core whose XY stage and focus drive know travel limits of their own."""

    def __init__(self, props: dict[str, dict[str, float]]) -> None:
        self.props = props

    def getXYStageDevice(self) -> str:  # noqa: N802 - Micro-Manager's name
        return "XY"

    def getFocusDevice(self) -> str:  # noqa: N802
        return "Z"

    def hasProperty(self, device: str, name: str) -> bool:  # noqa: N802
        return name in self.props.get(device, {})

    def getProperty(self, device: str, name: str) -> str:  # noqa: N802
        return str(self.props[device][name])


def test_a_drivers_narrower_limits_refuse_the_plan_before_anything_moves() -> None:
    from scanner.travel import travel_limits

    recipe = parse_recipe({"sample": {"kind": "rectangle", "width_mm": 4, "height_mm": 4,
                                      "center_um": [99_000, 0]},
                           "microscope": {"kind": "simulated",
                                          "stage": {"travel_x_um": [-150_000, 150_000]}}},
                          base_dir=None)
    plan = plan_scan(recipe, (1000.0, 1000.0))
    check_travel(plan, recipe)  # inside the recipe's travel
    prior = _DriverLimits({"XY": {"TravelXMin_um": -100_000, "TravelXMax_um": 100_000}})
    limits = travel_limits(recipe, prior)
    assert (limits["x"].lo, limits["x"].hi, limits["x"].narrowed_by) == (-100_000, 100_000, "XY")
    assert limits["y"].narrowed_by is None  # the driver says nothing of y
    # tiles past the controller's own limit were lost one by one during the scan
    with pytest.raises(PlanError, match=r"travel_x_um: tile .* the XY controller's own"):
        check_travel(plan, recipe, prior)
    # a focus drive that stops short of the focus range would fail the first focus search
    short_z = _DriverLimits({"Z": {"TravelMin_um": -20, "TravelMax_um": 20}})
    with pytest.raises(PlanError, match=r"focus.range_um: .* inside \[-20, 20\]"):
        check_travel(plan_scan(recipe.model_copy(update={"sample": recipe.sample.model_copy(
            update={"center_um": (0.0, 0.0)})}), (1000.0, 1000.0)), recipe, short_z)


def test_alignment_fields_outside_the_travel_are_never_driven_to(tmp_path) -> None:
    import json

    import yaml
    from typer.testing import CliRunner

    from scanner.cli import app
    from scanner.pipeline import run_scan

    # a 20 mm wafer whose 4 tiles fit a 12 mm travel, its edge fields (at 10 mm) do not
    data = {"sample": {"kind": "wafer", "diameter_mm": 20, "edge_exclusion_mm": 1.0,
                       "die_pitch_mm": [3.0, 2.5],
                       "defects": {"count": 0}},
            "microscope": {"kind": "simulated", "seed": 1,
                           "camera": {"width": 256, "height": 256, "pixel_size_um": 40.0},
                           "stage": {"travel_x_um": [-6000, 6000],
                                     "travel_y_um": [-6000, 6000]}},
            "scan": {"overlap": 0.1}}
    path = tmp_path / "w.yaml"
    path.write_text(yaml.safe_dump(data))
    res = CliRunner().invoke(app, ["validate", str(path)])
    assert res.exit_code == 0 and "alignment will be skipped" in res.output
    result = run_scan(parse_recipe(data, tmp_path, "w"), tmp_path / "scan")
    scan = json.loads((result.folder / "scan.json").read_text())
    assert "edge alignment field needs y at -10000" in scan["alignment_skipped"]
    assert result.status == "complete"
    data["scan"]["align"] = True
    path.write_text(yaml.safe_dump(data))
    res = CliRunner().invoke(app, ["validate", str(path)])
    assert res.exit_code == 2 and "travel_y_um" in res.stderr


def test_estimate_counts_moves_settle_and_exposure() -> None:
    recipe = parse_recipe({"sample": {"kind": "rectangle", "width_mm": 1, "height_mm": 1},
                           "microscope": {"kind": "simulated",
                                          "camera": {"exposure_ms": 10, "readout_ms": 20},
                                          "stage": {"settle_ms": 50}}}, base_dir=None)
    plan = plan_scan(recipe, (400.0, 400.0))
    est = estimate_hardware_time_s(plan, recipe)
    n = len(plan.tiles)
    assert est > n * (0.03 + 0.05) - 0.05
    assert est < n * (0.03 + 0.05 + 0.2)
    # resolved once: the plan carries the exposure and the estimate that later stages read
    resolved = resolve_plan(recipe, (400.0, 400.0))
    assert resolved.travel_checked and resolved.exposure_ms == 10.0
    assert resolved.estimated_hardware_s == pytest.approx(est)
    assert resolved.summary()["estimated_hardware_s"] == round(est, 3)


@pytest.mark.parametrize("focus", [{"strategy": "every_tile"},
                                   {"strategy": "focus_map", "points": 25}])
def test_estimate_counts_the_autofocus_the_scan_runs(focus: dict, tmp_path,
                                                    coupon_tif) -> None:
    import json

    from scanner.pipeline import run_scan

    # validate said the same with and without focusing: 2m 14s for every_tile against the
    # 5m 22s it took, 1 s for a 400-point map on 4 tiles that took 2 minutes
    # textured all over: a featureless field is tried again elsewhere (not estimated)
    data = {"sample": {"kind": "image", "path": coupon_tif.name, "pixel_size_um": 1.0},
            "microscope": {"kind": "simulated", "seed": 3,
                           "camera": {"width": 256, "height": 256, "pixel_size_um": 2.0,
                                      "exposure_ms": 20}},
            "scan": {"overlap": 0.1, "focus": focus}}
    recipe = parse_recipe(data, tmp_path, "f")
    plan = resolve_plan(recipe, (512.0, 512.0))
    without = estimate_hardware_time_s(plan, parse_recipe(
        {**data, "scan": {"overlap": 0.1}}, tmp_path, "f"))
    result = run_scan(recipe, tmp_path / "scan")
    took = json.loads((result.folder / "scan.json").read_text())["timings"]["acquire"]
    assert plan.estimated_hardware_s > 2 * without
    assert 0.7 < plan.estimated_hardware_s / took["hardware_s"] < 1.3, (plan.summary(), took)


def test_realtime_clock_sleeps_only_what_is_left_after_computing() -> None:
    import time

    from simulators.clock import HardwareClock

    clock = HardwareClock(realtime=True)
    t0 = time.perf_counter()
    clock.advance(0.2, since=t0)
    assert time.perf_counter() - t0 >= 0.2  # the hardware time is spent on the wall clock
    # an action that already spent its hardware time computing does not wait again
    t1 = time.perf_counter()
    clock.advance(0.5, since=t1 - 10.0)
    assert time.perf_counter() - t1 < 0.4
    assert clock.elapsed_s == pytest.approx(0.7)


def test_acquisition_refuses_a_plan_not_checked_against_the_travel(tmp_path) -> None:
    from devices.core import build_microscope
    from scanner.acquisition.acquire import acquire

    recipe = parse_recipe({"sample": {"kind": "rectangle", "width_mm": 1, "height_mm": 1},
                           "microscope": {"kind": "simulated"}}, base_dir=None)
    handle = build_microscope(recipe)
    before = handle.core.getXYPosition()
    with pytest.raises(PlanError, match="not checked against the stage's travel"):
        acquire(handle, plan_scan(recipe, handle.fov_um()), recipe, tmp_path)
    assert handle.core.getXYPosition() == before and not any(tmp_path.iterdir())
