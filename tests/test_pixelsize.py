"""The pixel size image files state (OME, ImageJ, TIFF resolution, PNG dpi): read, trusted only
where it is a measurement, and taken by train and inspect where --pixel-size is not given."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from skimage import data
from typer.testing import CliRunner

from scanner.cli import app
from scanner.errors import UserError
from scanner.inspection.pixelsize import resolved_pixel_um, stated_pixel_um

runner = CliRunner()
IMG = (np.random.default_rng(0).random((64, 80)) * 200).astype(np.uint8)


@pytest.mark.parametrize(("name", "write", "expected"), [
    ("imagej.tif", lambda p: tifffile.imwrite(p, IMG, imagej=True, resolution=(2.0, 2.0),
                                              metadata={"unit": "um"}), 0.5),
    ("fiji.tif", lambda p: tifffile.imwrite(p, IMG, imagej=True, resolution=(4.0, 4.0),
                                            metadata={"unit": "micron"}), 0.25),
    ("ome.tif", lambda p: tifffile.imwrite(
        p, IMG, ome=True, metadata={"PhysicalSizeX": 650, "PhysicalSizeY": 650,
                                    "PhysicalSizeXUnit": "nm", "PhysicalSizeYUnit": "nm"}),
     0.65),
    ("cm.tif", lambda p: tifffile.imwrite(p, IMG, resolution=(1e4 / 3, 1e4 / 3),
                                          resolutionunit="CENTIMETER"), 3.0),
    ("dpi.tif", lambda p: tifffile.imwrite(p, IMG, resolution=(25400, 25400),
                                           resolutionunit="INCH"), 1.0),
    ("dpi.png", lambda p: Image.fromarray(IMG).save(p, dpi=(5080, 5080)), 5.0),
    # a program's default for screens and printers is no measurement
    ("screen.tif", lambda p: tifffile.imwrite(p, IMG, resolution=(72, 72),
                                              resolutionunit="INCH"), None),
    ("print.png", lambda p: Image.fromarray(IMG).save(p, dpi=(300, 300)), None),
    ("plain.tif", lambda p: tifffile.imwrite(p, IMG), None),
    ("plain.png", lambda p: Image.fromarray(IMG).save(p), None),
    ("imagej_uncalibrated.tif", lambda p: tifffile.imwrite(p, IMG, imagej=True), None),
    ("not_square.tif", lambda p: tifffile.imwrite(p, IMG, resolution=(1e4 / 3, 1e4 / 6),
                                                  resolutionunit="CENTIMETER"), None),
])
def test_the_pixel_size_a_file_states(tmp_path: Path, name: str, write, expected) -> None:
    path = tmp_path / name
    write(path)
    got = stated_pixel_um(path)
    assert got == (None if expected is None else pytest.approx(expected, rel=1e-6))


def test_a_damaged_file_states_nothing(tmp_path: Path) -> None:
    path = tmp_path / "cut.tif"
    path.write_bytes(b"II*\x00garbage")
    assert stated_pixel_um(path) is None  # the pixels' reader names the damage, not this


def test_one_pixel_size_is_taken_for_a_run(caplog) -> None:
    assert resolved_pixel_um({"a.tif": None, "b.png": None}, None) is None
    assert resolved_pixel_um({"a.tif": 0.5, "b.tif": 0.5001}, None) == 0.5
    with caplog.at_level(logging.WARNING, logger="waferscope"):
        assert resolved_pixel_um({"a.tif": 0.5, "b.png": None}, None) == 0.5
    assert "b.png" in caplog.text and "state no pixel size" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="waferscope"):
        assert resolved_pixel_um({"a.tif": 0.5}, 2.0) == 2.0  # the option wins, said
    assert "a.tif" in caplog.text and "--pixel-size is taken" in caplog.text
    with pytest.raises(UserError, match=r"b.tif: states 1 µm pixels, a.tif 0.5 µm"):
        resolved_pixel_um({"a.tif": 0.5, "b.tif": 1.0}, None)


def _grid(seed: int) -> np.ndarray:
    """A die grid of a real photograph's texture, with camera noise."""
    cell = data.brick()[:120, :120].astype(np.float32)
    grid = np.full((4 * 136, 4 * 136), 40.0, dtype=np.float32)
    for i in range(4):
        for j in range(4):
            grid[i * 136 + 8 : i * 136 + 128, j * 136 + 8 : j * 136 + 128] = cell
    return grid + np.random.default_rng(seed).normal(0, 2.0, grid.shape).astype(np.float32)


def _imagej(path: Path, img: np.ndarray, pixel_um: float) -> None:
    tifffile.imwrite(path, img.clip(0, 255).astype(np.uint8), imagej=True,
                     resolution=(1 / pixel_um, 1 / pixel_um), metadata={"unit": "um"})


@pytest.mark.slow
def test_train_and_inspect_take_the_pixel_size_the_files_state(tmp_path: Path) -> None:
    _imagej(tmp_path / "good.tif", _grid(0), 0.5)
    test = tmp_path / "test"
    test.mkdir()
    bad = _grid(3)
    bad[100:120, 200:220] = 0.0  # a 20 px (10 µm) dark defect centred at (210, 110) px
    _imagej(test / "bad.tif", bad, 0.5)
    result = runner.invoke(app, ["train", "--good", str(tmp_path / "good.tif"), "--out",
                                 str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert "taken as 1 µm/px" not in result.stderr
    card = json.loads((tmp_path / "m.json").read_text())
    assert card["pixel_size_um"] == pytest.approx(0.5) and card["pixel_size_assumed"] is False
    result = runner.invoke(app, ["inspect", str(test), "--model", str(tmp_path / "m"),
                                 "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    found = json.loads((tmp_path / "o" / "defects.json").read_text())
    assert found["header"]["pixel_size_um"] == pytest.approx(0.5)
    (defect,) = [d for d in found["images"]["bad.tif"] if d["area_um2"] > 50]
    assert defect["x_um"] == pytest.approx(105.0, abs=3.0)
    assert defect["y_um"] == pytest.approx(55.0, abs=3.0)
    # files of two pixel sizes in one run: refused in one line naming them, nothing written
    _imagej(test / "other.tif", _grid(4), 1.0)
    result = runner.invoke(app, ["inspect", str(test), "--model", str(tmp_path / "m"),
                                 "--out", str(tmp_path / "o2")])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "other.tif" in lines[0] and "--pixel-size" in lines[0], lines
    assert not (tmp_path / "o2").exists()
