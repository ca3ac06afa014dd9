"""Paths as a user types them on the command line: ``.``, ``..``, ``sub/..``, ``~`` quoted
(the shell leaves it), the scan folder the command runs in. Each either works as meant or is
refused in one line with exit code 2 (probe P24)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml
from conftest import smooth_texture
from typer.testing import CliRunner

from scanner.cli import app
from scanner.scanfolder import MOSAIC, SCAN_JSON

runner = CliRunner()

#: a 1 mm plain coupon, a few tiles of 256 px: a scan in a few seconds
TINY = {
    "sample": {"kind": "rectangle", "width_mm": 1, "height_mm": 1,
               "defects": {"count": 3, "seed": 3}},
    "microscope": {"kind": "simulated",
                   "camera": {"width": 256, "height": 256, "pixel_size_um": 4.0}, "seed": 1},
    "scan": {"overlap": 0.1},
}


@pytest.fixture(scope="module")
def tiny_scan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An inspected scan of :data:`TINY` (made once; copy it before writing into it)."""
    base = tmp_path_factory.mktemp("typed")
    recipe = base / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(TINY), encoding="utf-8")
    res = runner.invoke(app, ["run", str(recipe), "--out", str(base / "scan")])
    assert res.exit_code == 0, res.output
    return base / "scan"


def _one_line_error(res) -> str:
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and "failed:" not in res.output, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    return lines[0]


@pytest.mark.parametrize("given", [".", "sub/.."])
def test_a_model_given_as_dot_is_refused_as_a_folder(tmp_path, monkeypatch, given) -> None:
    # `--model .` failed with "ValueError: PosixPath('.') has an empty name", exit 1
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(TINY), encoding="utf-8")
    for args in (["run", "tiny.yaml", "--model", given, "--out", "never"],
                 ["drift", "nowhere", "--model", given],
                 ["train", "--good", "tiny.yaml", "--init", given, "--out", "m"]):
        line = _one_line_error(runner.invoke(app, args))
        assert f"{tmp_path}: a folder, not a model" in line, (args, line)
    assert not (tmp_path / "never").exists() and not (tmp_path / "m.safetensors").exists()


def test_a_model_path_with_no_name_is_taken_whole(tmp_path, monkeypatch) -> None:
    # the library's own readers, as the command line's: a folder refused as one
    from models.errors import InputError
    from models.modelfile import read_model_files, weights_path

    (tmp_path / "a" / "b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a")
    assert weights_path(Path(".")) == tmp_path / "a.safetensors"
    assert weights_path("b/..") == tmp_path / "a.safetensors"
    for given in (".", "b/.."):
        with pytest.raises(InputError, match="a folder, not a model"):
            read_model_files(given)


def test_a_quoted_tilde_is_the_home_folder(tmp_path, monkeypatch) -> None:
    # `devices R --save "~/x.tif"` wrote ./~/x.tif: a folder named "~" in the working folder
    home = tmp_path / "home"
    home.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    (work / "tiny.yaml").write_text(yaml.safe_dump(TINY), encoding="utf-8")
    res = runner.invoke(app, ["devices", "tiny.yaml", "--save", "~/shots/x.tif"])
    assert res.exit_code == 0, res.output
    assert (home / "shots" / "x.tif").is_file()
    assert list(work.iterdir()) == [work / "tiny.yaml"]  # no "~" folder made here
    # an input too: the recipe named from the home folder is found there
    (home / "r.yaml").write_text(yaml.safe_dump(TINY), encoding="utf-8")
    res = runner.invoke(app, ["validate", "~/r.yaml"])
    assert res.exit_code == 0, res.output


@pytest.mark.slow  # a scan of its own (about 5 s)
def test_dot_inside_a_scans_mosaic_is_that_scan(tiny_scan, tmp_path, monkeypatch) -> None:
    # `waferscope inspect .` inside mosaic.ome.zarr said ".: no image files found";
    # `drift .` in a scan folder printed its row with an empty name
    import shutil

    scan = tmp_path / "wafer ü 1"
    shutil.copytree(tiny_scan, scan)
    before = json.loads((scan / "defects.json").read_text(encoding="utf-8"))
    (scan / "defects.json").unlink()
    monkeypatch.chdir(scan / MOSAIC)
    res = runner.invoke(app, ["inspect", "."])
    assert res.exit_code == 0, res.output
    after = json.loads((scan / "defects.json").read_text(encoding="utf-8"))
    assert len(after["defects"]) == len(before["defects"]) > 0
    assert not (scan / MOSAIC / "inspection").exists()
    monkeypatch.chdir(scan)
    res = runner.invoke(app, ["drift", "."])
    assert res.exit_code == 0, res.output
    assert "  wafer ü 1: q50" in res.stdout, res.stdout


@pytest.mark.slow
@pytest.mark.parametrize("here, given", [(".", "."), ("sub", ".."), (".", "../scan")])
def test_run_overwrite_of_the_folder_it_runs_in_is_refused(tiny_scan, tmp_path, monkeypatch,
                                                           here, given) -> None:
    # `run R --out . --overwrite` inside a scan: "failed: OSError: [Errno 16] Device or
    # resource busy: '.'", exit 1; by name, the scan was moved away under the shell
    import shutil

    scan = tmp_path / "scan"
    shutil.copytree(tiny_scan, scan)
    (scan / "sub").mkdir()
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY), encoding="utf-8")
    record = (scan / SCAN_JSON).read_bytes()
    monkeypatch.chdir(scan / here)
    res = runner.invoke(app, ["run", str(tmp_path / "tiny.yaml"), "--out", given,
                              "--overwrite", "--no-inspect"])
    line = _one_line_error(res)
    assert "the working folder is inside it" in line
    assert (scan / SCAN_JSON).read_bytes() == record  # the earlier scan is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan", "tiny.yaml"]


@pytest.mark.parametrize("given", ["cal.json", "cal"])
def test_train_keeps_a_file_in_the_cards_place(tmp_path, monkeypatch, given) -> None:
    # `train --out cal.json` (or `--out cal` beside a cal.json) wrote the model's card over
    # the calibration file of that name, exit 0, since only cal.safetensors was looked for
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cal.json").write_text('{"pixel_size_um": 2.0}', encoding="utf-8")
    tifffile.imwrite(tmp_path / "good.tif",
                     (smooth_texture((256, 256)) * 60000).astype(np.uint16))
    line = _one_line_error(runner.invoke(app, ["train", "--good", "good.tif", "--out", given,
                                               "--pixel-size", "2"]))
    assert "cal.json: exists (use --overwrite to replace it)" in line
    assert (tmp_path / "cal.json").read_text(encoding="utf-8") == '{"pixel_size_um": 2.0}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal.json", "good.tif"]
