"""The offline check of a Micro-Manager ``.cfg`` (devices/mmconfig.py) on syntax real files use."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from devices.mmconfig import check_config
from scanner.cli import app

runner = CliRunner()

# as pymmcore-plus writes a file with save_system_config(prefix_py_devices=False), CRLF
# line ends as saved on Windows: UniMMCore loads these lines with or without "#py "
UNPREFIXED = (
    "# waferscope's emulated rig, Python devices unprefixed\r\n"
    "pyDevice,Camera,devices.simulated,SimCamera\r\n"
    "pyDevice,XYStage,devices.serial_stage,PriorXYStage\r\n"
    "pyDevice,Focus,devices.simulated,SimFocus\r\n"
    "pyDevice,SimClock,devices.simulated,SimClock\r\n"
    "Property,XYStage,Port,waferscope-emu://prior?stage=waferscope\r\n"
    "Property,Core,Initialize,1\r\n"
    "Property,Core,Camera,Camera\r\n"
    "Property,Core,XYStage,XYStage\r\n"
    "Property,Core,Focus,Focus\r\n"
    "Property,Core,AutoShutter,0\r\n"
    "ConfigPixelSize,Res10x,Camera,Binning,1\r\n"
    "PixelSize_um,Res10x,10\r\n"
)

RECIPE = """\
sample: {kind: rectangle, width_mm: 1, height_mm: 1, center_um: [0, 0]}
microscope:
  kind: micromanager
  config: rig.cfg
  stage: {travel_x_um: [-50000, 50000], travel_y_um: [-50000, 50000]}
"""


def _write(tmp_path: Path, cfg: str) -> Path:
    (tmp_path / "rig.cfg").write_bytes(cfg.encode())
    (tmp_path / "rig.yaml").write_text(RECIPE)
    return tmp_path / "rig.cfg"


def test_unprefixed_python_devices_are_read(tmp_path: Path) -> None:
    # refused before: "cannot be read (Invalid command name: 'pyDevice')"
    summary = check_config(_write(tmp_path, UNPREFIXED))
    assert summary.devices == {}
    assert summary.py_devices == {
        "Camera": ("devices.simulated", "SimCamera"),
        "XYStage": ("devices.serial_stage", "PriorXYStage"),
        "Focus": ("devices.simulated", "SimFocus"),
        "SimClock": ("devices.simulated", "SimClock")}
    assert summary.roles == {"camera": "Camera", "xy_stage": "XYStage", "focus": "Focus"}
    assert summary.pixel_presets == {"Res10x": (10.0, None, [("Camera", "Binning", "1")])}
    res = runner.invoke(app, ["validate", str(tmp_path / "rig.yaml")])
    assert res.exit_code == 0 and "recipe OK" in res.stdout, res.output


def test_a_line_the_parser_refuses_is_named_by_number(tmp_path: Path) -> None:
    cfg = ("# garbled copy\nProperty,Core,Initialize,0\n"
           "Device,Camera,DemoCamera,DCam\nProper_y,Camera,Mode,1\n")
    _write(tmp_path, cfg)
    res = runner.invoke(app, ["validate", str(tmp_path / "rig.yaml")])
    assert res.exit_code == 2, res.output
    assert res.stderr.strip() == (
        "error: rig.yaml: microscope.config: rig.cfg: cannot be read (line 4 "
        "'Proper_y,Camera,Mode,1': Invalid command name: 'Proper_y')")


def test_every_problem_of_the_file_is_named_in_one_line(tmp_path: Path) -> None:
    # before, only the adapters were named: installing them revealed the next problem
    cfg = ("Device,Camera,DemoCamera,DCam\r\n"
           "Device,XY,ASIStage,XYStage\r\n"
           "Parent,XY,Camera\r\n"
           "Equipment,Camera,Demo,Model 1\r\n"
           "#py pyDevice,Wheel,devices.nowhere,Wheel\r\n"
           "Property,Core,Initialize,1\r\n"
           "Property,Core,Focus,Z\r\n")
    _write(tmp_path, cfg)
    res = runner.invoke(app, ["validate", str(tmp_path / "rig.yaml")])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    assert lines[0] == (
        "error: rig.yaml: microscope.config: rig.cfg needs device adapters not installed "
        "here: ASIStage, DemoCamera (run `mmcore install`, or set microscope.adapter_path); "
        "rig.cfg: Python devices that cannot be imported: Wheel (devices.nowhere.Wheel); "
        "rig.cfg: Core,Focus,Z names no device of the file (devices: Camera, Wheel, XY; or "
        "set microscope.roles.focus)")
