"""Real-rig paths: Micro-Manager configurations, device faults survived through the emulator."""

from __future__ import annotations

import collections
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from skimage.registration import phase_cross_correlation
from typer.testing import CliRunner

from scanner.cli import app
from scanner.pipeline import run_scan
from scanner.recipe import load_recipe, parse_recipe

runner = CliRunner()
RECIPES = Path(__file__).parents[1] / "recipes"

WAFER = {"kind": "wafer", "diameter_mm": 20, "edge_exclusion_mm": 1.0,
         "die_pitch_mm": [3.0, 2.5], "defects": {"count": 8, "seed": 3}}


def _sim(**extra) -> dict:
    return {"sample": WAFER,
            "microscope": {"kind": "simulated", "seed": 1,
                           "camera": {"width": 512, "height": 512, "pixel_size_um": 10.0},
                           **extra},
            "scan": {"overlap": 0.1}}


def _journal(folder: Path) -> list[dict]:
    with open(folder / "tiles.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_faulty_serial_line_and_camera_still_give_every_tile_once(tmp_path: Path) -> None:
    clean = run_scan(parse_recipe(_sim(stage={"driver": "prior"}), tmp_path, "clean"),
                     tmp_path / "clean")
    # seed 5: the faults must fall in the scan's own moves and snaps (retried_actions), not
    # only in the alignment's fields before it (seed 4 did, once a notch needed one field less)
    faulty = run_scan(parse_recipe(_sim(stage={"driver": "prior"}, faults={
        "serial_error_rate": 0.05, "camera_timeout_rate": 0.02, "seed": 5}), tmp_path, "faulty"),
        tmp_path / "faulty")
    assert clean.status == faulty.status == "complete"
    scan = json.loads((faulty.folder / "scan.json").read_text())
    assert scan["retried_actions"] > 0  # the faults happened and were retried
    ok = collections.Counter(int(r["index"]) for r in _journal(faulty.folder)
                             if r["status"] == "ok")
    assert sorted(ok) == list(range(faulty.n_tiles)) and set(ok.values()) == {1}
    a = zarr.open_array(clean.folder / "mosaic.ome.zarr" / "0")[:].astype(np.float64)
    b = zarr.open_array(faulty.folder / "mosaic.ome.zarr" / "0")[:].astype(np.float64)
    assert a.shape == b.shape
    shift, _, _ = phase_cross_correlation(a, b, upsample_factor=20)
    assert np.hypot(*shift) <= 0.3
    # tile by tile too: each tile placed where the fault-free run placed it
    clean_rows = {r["index"]: r for r in _journal(clean.folder)}
    for r in _journal(faulty.folder):
        c = clean_rows[r["index"]]
        dx = (float(r["x_reg_um"]) - float(r["x_true_um"])) - (
            float(c["x_reg_um"]) - float(c["x_true_um"]))
        dy = (float(r["y_reg_um"]) - float(r["y_true_um"])) - (
            float(c["y_reg_um"]) - float(c["y_true_um"]))
        assert np.hypot(dx, dy) / 10.0 <= 0.3, r["index"]


def test_serial_faults_without_a_serial_stage_are_refused(tmp_path: Path) -> None:
    from scanner.errors import RecipeError

    with pytest.raises(RecipeError, match="microscope.faults.serial_error_rate"):
        parse_recipe(_sim(faults={"serial_error_rate": 0.1}), tmp_path)


@pytest.mark.slow
def test_shipped_config_drives_the_emulated_prior_stage(tmp_path: Path) -> None:
    recipe = load_recipe(RECIPES / "emulated_rig.yaml")
    result = run_scan(recipe, tmp_path / "scan")
    assert result.status == "complete" and result.n_acquired == result.n_tiles
    scan = json.loads((result.folder / "scan.json").read_text())
    assert scan["microscope"]["kind"] == "micromanager"
    xy = next(d for d in scan["microscope"]["devices"] if d["role"] == "xy_stage")
    assert (xy["name"], xy["library"]) == ("PriorXYStage", "devices.serial_stage")
    assert xy["port"].startswith("waferscope-emu://prior")
    # the .cfg's simulated camera renders the recipe's sample: its truth is written
    assert json.loads((result.folder / "truth.json").read_text())["defects"]
    res = runner.invoke(app, ["devices", str(RECIPES / "emulated_rig.yaml")])
    assert res.exit_code == 0, res.output
    assert "PriorXYStage" in res.output and "test image" in res.output


def _rig(tmp_path: Path, cfg: str, microscope: str = "") -> Path:
    shutil.copy(RECIPES / "emulated_rig.yaml", tmp_path / "rig.yaml")
    (tmp_path / "rig.cfg").write_text(cfg)
    text = (tmp_path / "rig.yaml").read_text().replace("emulated_rig.cfg", "rig.cfg")
    if microscope:
        text = text.replace("  pixel_size_um: 10.0\n", f"  pixel_size_um: 10.0\n{microscope}")
    (tmp_path / "rig.yaml").write_text(text)
    return tmp_path / "rig.yaml"


BAD_RIGS = [
    ("Device,Camera,DemoCamera,DCam\nDevice,XY,ASIStage,XYStage\n",
     "", "needs device adapters not installed here: ASIStage, DemoCamera"),
    ("#py pyDevice,Camera,devices.nowhere,Cam\n", "", "Camera (devices.nowhere.Cam)"),
    ((RECIPES / "emulated_rig.cfg").read_text(), "  roles: {camera: Cam2}\n",
     "microscope.roles.camera: 'Cam2' is not a device"),
]


@pytest.mark.parametrize(("cfg", "extra", "expected"), BAD_RIGS)
def test_bad_configurations_are_named_in_one_line(tmp_path: Path, cfg: str, extra: str,
                                                  expected: str) -> None:
    path = _rig(tmp_path, cfg, extra)
    res = runner.invoke(app, ["validate", str(path)])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], res.stderr


def test_micromanager_stage_travel_is_required(tmp_path: Path) -> None:
    path = _rig(tmp_path, (RECIPES / "emulated_rig.cfg").read_text())
    text = path.read_text().replace(
        "  stage: {travel_x_um: [-50000, 50000], travel_y_um: [-50000, 50000]}\n",
        "  stage: {travel_x_um: [-50000, 50000]}\n")
    path.write_text(text)
    res = runner.invoke(app, ["validate", str(path)])
    assert res.exit_code == 2
    assert "microscope.stage.travel_y_um: required for kind: micromanager" in res.stderr


def test_a_serial_port_that_does_not_exist_is_one_line_naming_it(tmp_path: Path) -> None:
    import subprocess
    import sys

    port = str(tmp_path / "ttyNOPE")
    cfg = (RECIPES / "emulated_rig.cfg").read_text()
    assert "waferscope-emu://prior?stage=waferscope" in cfg
    path = _rig(tmp_path, cfg.replace("waferscope-emu://prior?stage=waferscope", port))
    # the real command: pymmcore-plus logged the failure's traceback on the terminal, then
    # validate said "recipe OK" and run failed at the first move with "not initialized"
    res = subprocess.run([sys.executable, "-m", "scanner", "validate", str(path)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert f"cannot open serial port {port!r}: No such file or directory" in lines[0]
    assert "XYStage" in lines[0] and "recipe OK" not in res.stdout
    out = tmp_path / "scan"
    res = runner.invoke(app, ["run", str(path), "--out", str(out), "--no-inspect"])
    assert res.exit_code == 2 and port in res.stderr, res.output
    assert not out.exists()


# --------------------------------------------------------------------------- .cfg files

RIG_CFG = (RECIPES / "emulated_rig.cfg").read_text()


def test_roles_name_the_configs_python_devices(tmp_path: Path) -> None:
    from devices.core import build_microscope

    # the shipped drivers under other labels, the roles given by the recipe: setting them as
    # Core properties reached only the C++ core ("invalid value \"Cam1\"")
    cfg = "".join(line.replace(",Camera,", ",Cam1,").replace(",XYStage,", ",Stage-A,")
                  .replace(",Focus,", ",ZDrive,") + "\n"
                  for line in RIG_CFG.splitlines() if "Property,Core,Camera" not in line
                  and "Property,Core,XYStage" not in line and "Property,Core,Focus" not in line)
    path = _rig(tmp_path, cfg, "  roles: {camera: Cam1, xy_stage: Stage-A, focus: ZDrive}\n")
    with build_microscope(load_recipe(path)) as handle:
        core = handle.core
        assert (core.getCameraDevice(), core.getXYStageDevice(), core.getFocusDevice()) == (
            "Cam1", "Stage-A", "ZDrive")
        core.setXYPosition(1000.0, -500.0)
        core.waitForDevice("Stage-A")
        assert core.getXYPosition() == pytest.approx((1000.0, -500.0), abs=5.0)
        core.snapImage()
        assert core.getImage().shape == (core.getImageHeight(), core.getImageWidth())
    # a role on a device of another type: one line naming the field
    path = _rig(tmp_path, cfg, "  roles: {camera: Stage-A, xy_stage: Stage-A, focus: ZDrive}\n")
    res = runner.invoke(app, ["validate", str(path)])
    assert res.exit_code == 2, res.output
    assert res.stderr.strip() == "error: rig.yaml: microscope.roles.camera: 'Stage-A' is not " \
                                 "a camera (its type: XYStageDevice)"


def test_a_pixel_size_preset_on_a_python_camera_is_used(tmp_path: Path) -> None:
    from devices.core import build_microscope

    # the C++ core matches presets on its own devices only: "Camera Binning 1" on the
    # emulated rig's (#py) camera never matched, and the file's size was said to be missing
    cfg = RIG_CFG + "ConfigPixelSize,Res10x,Camera,Binning,1\nPixelSize_um,Res10x,5\n"
    path = _rig(tmp_path, cfg)
    path.write_text(path.read_text().replace("  pixel_size_um: 10.0\n", ""))
    with build_microscope(load_recipe(path)) as handle:
        assert handle.core.getPixelSizeUm() == 5.0
    # a binned preset listed first: the simulated camera rendered its 20 um pixels while the
    # core said 10 um (the scope was made from the file's first preset)
    binned = RIG_CFG + ("ConfigPixelSize,Res20x,Camera,Binning,2\nPixelSize_um,Res20x,20\n"
                        "ConfigPixelSize,Res10x,Camera,Binning,1\nPixelSize_um,Res10x,10\n")
    path = _rig(tmp_path, binned)
    path.write_text(path.read_text().replace("  pixel_size_um: 10.0\n", ""))
    with build_microscope(load_recipe(path)) as handle:
        core = handle.core
        assert core.getPixelSizeUm() == 10.0
        camera = core.getCameraDevice()
        assert float(core.getProperty(camera, "SimTruePixelSize_um")) == pytest.approx(10.0)
    # a preset that the devices do not show is named, not called missing
    path = _rig(tmp_path, cfg.replace("Binning,1", "Binning,4"))
    path.write_text(path.read_text().replace("  pixel_size_um: 10.0\n", ""))
    res = runner.invoke(app, ["validate", str(path)])
    assert res.exit_code == 2, res.output
    assert "none of rig.cfg's pixel size presets (Res10x: Camera Binning = 4)" in res.stderr


@pytest.mark.parametrize(("affine", "expected"), [
    ("-10,0,0,0,10,0", "mirrors the image against the stage"),
    ("0,10,0,10,0,0", "mirrors the image against the stage"),  # transposed
    ("-10,0,0,0,-10,0", "turns the image +180 degrees"),  # mounted upside down
    ("0,-10,0,10,0,0", "turns the image +90 degrees"),
])
def test_a_pixel_affine_that_mirrors_or_turns_the_camera_is_refused(
        tmp_path: Path, affine: str, expected: str) -> None:
    # the alignment read the affine's 180 degrees, the stitching placed the tiles unturned:
    # "complete", with every defect millimetres off; a mirror failed the alignment as a
    # wafer "not where the recipe puts it"
    cfg = RIG_CFG + ("ConfigPixelSize,Res10x,Camera,Binning,1\nPixelSize_um,Res10x,10\n"
                     f"PixelSizeAffine,Res10x,{affine}\n")
    path = _rig(tmp_path, cfg)
    path.write_text(path.read_text().replace("  pixel_size_um: 10.0\n", ""))
    res = runner.invoke(app, ["validate", str(path)])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], res.stderr
    assert "pixel size preset Res10x's affine" in lines[0]
    # turned within what the stitching measures and corrects, it is used
    path = _rig(tmp_path, cfg.replace(affine, "9.99,-0.17,0,0.17,9.99,0"))
    path.write_text(path.read_text().replace("  pixel_size_um: 10.0\n", ""))
    assert runner.invoke(app, ["validate", str(path)]).exit_code == 0


def _preset_core(kind: str):
    import pymmcore
    from pymmcore_plus.experimental.unicore import UniMMCore

    core = pymmcore.CMMCore() if kind == "cpp" else UniMMCore()
    # a preset on a Core property stands in for "Objective,Label,10X" (no adapters here)
    core.definePixelSizeConfig("Res10x", "Core", "AutoShutter", "1")
    core.setPixelSizeUm("Res10x", 1.0)
    core.definePixelSizeConfig("Res20x", "Core", "AutoShutter", "0")
    core.setPixelSizeUm("Res20x", 0.5)
    core.setAutoShutter(True)
    return core


@pytest.mark.parametrize("kind", ["cpp", "unicore"])
def test_a_calibration_is_what_the_core_uses_beside_a_matching_preset(
        tmp_path: Path, kind: str) -> None:
    import math

    from devices.core import apply_calibration

    core = _preset_core(kind)
    assert core.getPixelSizeUm() == 1.0
    cal = tmp_path / "cal.json"
    cal.write_text(json.dumps({"pixel_size_um": 5.2, "rotation_deg": 0.5}))
    apply_calibration(core, cal)
    # the .cfg's matching preset won over a preset of waferscope's own: 1.0, not 5.2
    assert core.getPixelSizeUm() == pytest.approx(5.2)
    th = math.radians(0.5)
    assert core.getPixelSizeAffine() == pytest.approx(
        (5.2 * math.cos(th), -5.2 * math.sin(th), 0.0, 5.2 * math.sin(th), 5.2 * math.cos(th),
         0.0))
    core.setAutoShutter(False)  # another objective: its own preset, not this calibration
    assert core.getPixelSizeUm() == pytest.approx(0.5)


def test_a_calibration_wins_over_the_configs_preset(tmp_path: Path) -> None:
    from devices.core import build_microscope

    cfg = RIG_CFG + "ConfigPixelSize,Res10x,Core,AutoShutter,0\nPixelSize_um,Res10x,1.0\n"
    (tmp_path / "cal.json").write_text(json.dumps({"pixel_size_um": 5.2, "rotation_deg": 0.0}))
    path = _rig(tmp_path, cfg, "  calibration: cal.json\n")
    with build_microscope(load_recipe(path)) as handle:
        assert handle.core.getPixelSizeUm() == pytest.approx(5.2)
        assert handle.fov_um()[0] == pytest.approx(5.2 * handle.core.getImageWidth())


def test_a_config_line_error_keeps_its_cause(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = _rig(tmp_path, RIG_CFG + "#py Property,XYStage,AnswerTimout_s,0.2\n")
    line = len(RIG_CFG.splitlines()) + 1
    # the real command: it also aborted after the line ("FATAL: exception not rethrown")
    res = subprocess.run([sys.executable, "-m", "scanner", "validate", str(path)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stderr.strip().splitlines() == [
        f"error: rig.yaml: microscope.config: cannot load rig.cfg: line {line} "
        "'Property,XYStage,AnswerTimout_s,0.2': Device 'XYStage' has no property "
        "'AnswerTimout_s'."]


@pytest.mark.parametrize(("adapter", "cause"), [
    ("libmmgr_dal_DemoCamera.so.0", 'Failed to load device adapter "DemoCamera"'),
    ("libmmgr_dal_DemoCamera.so", "'DemoCamera' is not a known Micro-manager DeviceAdapter"),
])
def test_an_adapter_that_does_not_load_suggests_installing_them(
        tmp_path: Path, adapter: str, cause: str) -> None:
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    (adapters / adapter).write_bytes(b"")  # present, but no library
    path = _rig(tmp_path, "Device,Camera,DemoCamera,DCam\n",
                f"  adapter_path: {adapters}\n")
    res = runner.invoke(app, ["validate", str(path)])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert f"line 1 'Device,Camera,DemoCamera,DCam': {cause}" in lines[0], res.stderr
    assert lines[0].endswith("(are the Micro-Manager device adapters installed? run "
                             "`mmcore install`)")


@pytest.mark.parametrize(("raw", "expected"), [
    # a Latin-1 "µ" in a comment: comments are not parsed
    (b"# objective 10x 0.5\xb5m pixel\n" + RIG_CFG.encode(), None),
    (b"\xef\xbb\xbf" + RIG_CFG.encode(), None),  # saved with a byte-order mark
    (RIG_CFG.encode().replace(b"stage=waferscope", b"stage=wafer\xb5scope"),
     "microscope.config: rig.cfg: line 10 is not UTF-8 text (byte 0xb5); save the file as "
     "UTF-8"),
    (RIG_CFG.encode().replace(b"Core,Focus,Focus", b"Core,Focus,Z"),
     "microscope.config: rig.cfg: Core,Focus,Z names no device of the file (devices: "
     "Camera, Focus, SimClock, XYStage; or set microscope.roles.focus)"),
])
def test_config_file_text(tmp_path: Path, raw: bytes, expected: str | None) -> None:
    path = _rig(tmp_path, "")
    (tmp_path / "rig.cfg").write_bytes(raw)
    res = runner.invoke(app, ["validate", str(path)])
    if expected is None:
        assert res.exit_code == 0 and "recipe OK" in res.stdout, res.output
    else:
        assert res.exit_code == 2, res.output
        assert res.stderr.strip() == f"error: rig.yaml: {expected}"
