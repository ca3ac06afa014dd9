"""Camera calibration: the stage→pixel fit and `waferscope calibrate` on the simulator."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import smooth_texture
from typer.testing import CliRunner

from scanner.cli import app
from scanner.stitching.cameracalibration import auto_grid, expected_error_rel
from scanner.stitching.registration.scan import CameraGeometry
from scanner.stitching.registration.selfcal import fit_camera_matrix, matrix_geometry
from scanner.stitching.stitch import load_calibration


def test_fit_recovers_rotation_and_pixel_size():
    rng = np.random.default_rng(0)
    truth = CameraGeometry(pixel_size_um=1.37, rotation_deg=-0.8).stage_to_px()
    stage = rng.uniform(-500, 500, (30, 2))
    pixels = stage @ truth.T + (12.0, -7.0)
    a, res, _ = fit_camera_matrix(stage, pixels)
    pixel, theta, px_x, px_y, skew = matrix_geometry(a)
    assert pixel == pytest.approx(1.37, rel=1e-9)
    assert theta == pytest.approx(-0.8, abs=1e-9)
    assert px_x == pytest.approx(1.37, rel=1e-9) and px_y == pytest.approx(1.37, rel=1e-9)
    assert abs(skew) < 1e-6
    assert np.abs(res).max() < 1e-9


def test_auto_grid_meets_the_expected_error():
    n = auto_grid(2.0, 768.0)
    assert expected_error_rel(2.0, 768.0, n) <= 3e-4 < expected_error_rel(2.0, 768.0, n - 1)
    assert auto_grid(0.0, 100.0) == 5


@pytest.fixture
def textured_recipe(tmp_path: Path, write_recipe):
    img = (smooth_texture((1400, 1400), seed=5, sigma=5.0) * 60000 + 2000).astype(np.uint16)
    tifffile.imwrite(tmp_path / "tex.tif", img)
    return write_recipe(
        "sample: {kind: image, path: tex.tif, pixel_size_um: 1.0, origin_um: [0, 0]}\n"
        "microscope: {kind: simulated, camera: {width: 192, height: 192, pixel_size_um: 1.0,"
        " pixel_size_error: 0.01, rotation_deg: 0.3, vignetting: 0.1},"
        " stage: {repeatability_um: 0.5, travel_x_um: [-100, 5000]}}\n"
    )


@pytest.mark.slow
def test_calibrate_command_recovers_the_simulated_camera(textured_recipe: Path, tmp_path: Path):
    out = tmp_path / "rig" / "calib.json"  # a folder not made yet (failed after the stage moved)
    runner = CliRunner()
    res = runner.invoke(app, ["calibrate", str(textured_recipe), "--out", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert abs(data["pixel_size_um"] / 1.01 - 1) < 1e-3  # target: within 0.1 %
    assert abs(data["rotation_deg"] - 0.3) < 0.05  # target: within 0.05°
    assert data["truth"]["pixel_size_um"] == pytest.approx(1.01)
    assert data["residual_rms_um"] == pytest.approx(0.5, rel=0.5)  # the stage's scatter
    cam = load_calibration(out)
    assert cam.pixel_size_um == data["pixel_size_um"]
    assert math.isclose(cam.rotation_deg, data["rotation_deg"])

    # an existing file is not replaced without --overwrite; travel is checked before moving
    again = runner.invoke(app, ["calibrate", str(textured_recipe), "--out", str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert json.loads(out.read_text()) == data
    far = runner.invoke(app, ["calibrate", str(textured_recipe), "--out", str(tmp_path / "x.json"),
                              "--at", "-200", "700"])
    assert far.exit_code == 2 and "travel_x_um" in far.output


def test_calibrate_refuses_a_plain_area(write_recipe, tmp_path: Path):
    img = np.full((600, 600), 30000, dtype=np.uint16)
    tifffile.imwrite(tmp_path / "plain.tif", img)
    recipe = write_recipe(
        "sample: {kind: image, path: plain.tif, pixel_size_um: 1.0, origin_um: [0, 0]}\n"
        "microscope: {kind: simulated, camera: {width: 128, height: 128}}\n"
    )
    res = CliRunner().invoke(app, ["calibrate", str(recipe), "--out", str(tmp_path / "c.json"),
                                   "--grid", "3"])
    assert res.exit_code == 2
    assert "textured" in res.output
    assert not (tmp_path / "c.json").exists()


@pytest.mark.parametrize(("grid", "named"), [("100000", "travel_x_um"), ("41", "--grid 41")])
def test_calibrate_refuses_a_huge_grid_before_listing_its_frames(write_recipe, tmp_path: Path,
                                                                  grid: str, named: str):
    # 10^10 frames used to fill the memory before the travel was checked; a grid within the
    # travel but of thousands of frames would hold them all
    recipe = write_recipe(
        "sample: {kind: rectangle, width_mm: 1, height_mm: 1, defects: {count: 0}}\n"
        "microscope: {kind: simulated, camera: {width: 64, height: 64, pixel_size_um: 1.0},"
        " stage: {travel_x_um: [-1e5, 1e5], travel_y_um: [-1e5, 1e5]}}\n")
    res = CliRunner().invoke(app, ["calibrate", str(recipe), "--out", str(tmp_path / "c.json"),
                                   "--grid", grid])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], lines
    assert not (tmp_path / "c.json").exists()


def test_the_automatic_grid_keeps_its_frames_on_the_sample(tmp_path: Path):
    """The shipped emulated rig (a 20 mm wafer, 10 mm fields): the automatic 5 x 5 grid of
    7.7 mm steps spanned 41 mm, its outer frames saw the bare chuck and calibration was
    refused; the grid now stays on the wafer, and the pixel size is found."""
    import shutil

    from scanner.recipe import load_recipe
    from scanner.stitching.cameracalibration import calibrate_recipe

    root = Path(__file__).resolve().parents[1] / "recipes"
    for name in ("emulated_rig.yaml", "emulated_rig.cfg"):
        shutil.copy(root / name, tmp_path / name)
    result = calibrate_recipe(load_recipe(tmp_path / "emulated_rig.yaml"))
    assert result.n_frames == 9
    assert result.pixel_size_um == pytest.approx(10.0, rel=5e-4)


def test_calibrate_retries_serial_faults_as_a_scan_does(write_recipe, tmp_path: Path, caplog):
    # the calibration moved and snapped without the scan's retries: one garbled reply from
    # the stage controller (5 % of them here) failed it, where `run` retries and goes on
    text = """\
sample: {kind: wafer, diameter_mm: 20, edge_exclusion_mm: 1.0, die_pitch_mm: [3.0, 2.5],
         defects: {count: 4, seed: 3}}
microscope:
  kind: simulated
  camera: {width: 512, height: 512, pixel_size_um: 10.0}
  stage: {driver: prior, port: "waferscope-emu://prior?faults=lost,garbled,error"}
  faults: {serial_error_rate: 0.05, seed: 3}
scan: {retries: %d}
"""
    res = CliRunner().invoke(app, ["calibrate", str(write_recipe(text % 3)),
                                   "--out", str(tmp_path / "c.json")])
    assert res.exit_code == 0, res.output
    assert "failed (attempt 1/4)" in caplog.text  # a fault came, and was retried
    assert json.loads((tmp_path / "c.json").read_text())["pixel_size_um"] == pytest.approx(
        10.0, rel=1e-3)
    res = CliRunner().invoke(app, ["calibrate", str(write_recipe(text % 0, "none.yaml")),
                                   "--out", str(tmp_path / "c0.json")])
    assert res.exit_code == 1 and "after 1 attempts" in res.output, res.output


MIRRORED_CAMERA = '''
import numpy as np
from devices.simulated import SimCamera


class MirrorXCamera(SimCamera):
    """The simulated camera mounted mirrored: its columns count against the stage's x."""

    def snap(self, buffer):
        frame = np.empty_like(buffer)
        meta = super().snap(frame)
        buffer[:] = frame[:, ::-1]
        return meta
'''


def test_a_grid_registered_along_one_axis_only_is_refused(tmp_path: Path):
    """A camera mounted mirrored in x: every pair along y matched, none along x, and the x
    scale came back as the nominal one: a calibration of 10.000 um and 0.004 degrees was
    written for a camera whose image runs against the stage."""
    import shutil

    root = Path(__file__).resolve().parents[1] / "recipes"
    shutil.copy(root / "emulated_rig.yaml", tmp_path / "emulated_rig.yaml")
    cfg = (root / "emulated_rig.cfg").read_text()
    assert "devices.simulated,SimCamera" in cfg
    (tmp_path / "emulated_rig.cfg").write_text(
        cfg.replace("devices.simulated,SimCamera", "mirrorx_cam_for_test,MirrorXCamera"))
    (tmp_path / "mirrorx_cam_for_test.py").write_text(MIRRORED_CAMERA)
    out = tmp_path / "c.json"
    res = CliRunner().invoke(app, ["calibrate", str(tmp_path / "emulated_rig.yaml"),
                                   "--out", str(out)])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "no frame pair a step apart along the stage's x" in lines[0], \
        res.stderr
    assert not out.exists()
