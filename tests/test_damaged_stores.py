"""Damaged stores of a scan folder are refused naming the file, never read as data, and a
resume that takes damaged tiles again says so (the damage probe of the scan folder)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from scanner.cli import app
from scanner.pipeline import resume_scan, run_scan
from scanner.recipe import parse_recipe

# one small inspected scan (some 10 s), then commands on copies of it
pytestmark = pytest.mark.slow

runner = CliRunner()

SMALL_RECTANGLE = {
    "sample": {"kind": "rectangle", "width_mm": 2, "height_mm": 1.5,
               "center_um": [10000, -5000], "defects": {"count": 4, "seed": 3}},
    "microscope": {"kind": "simulated",
                   "camera": {"width": 512, "height": 512, "pixel_size_um": 2.0}},
    "scan": {"overlap": 0.12},
}


@pytest.fixture(scope="module")
def inspected(tmp_path_factory) -> Path:
    """A complete, inspected scan of 2 x 3 tiles (mosaic of 4 levels, maps of 2)."""
    root = tmp_path_factory.mktemp("inspected")
    result = run_scan(parse_recipe(SMALL_RECTANGLE, root, "small"), root / "scan",
                      inspect=True)
    assert result.status == "complete"
    assert (result.folder / "anomaly.ome.zarr/0/c/0/0").is_file()
    return result.folder


def _copy(scan: Path, tmp_path: Path, name: str = "scan") -> Path:
    folder = tmp_path / name
    shutil.copytree(scan, folder)
    return folder


def _truncate(chunk: Path) -> None:
    assert chunk.is_file(), chunk
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in (".waferscope.lock", "scan.json")}


def test_undecodable_mosaic_chunk_is_refused_naming_its_file(inspected: Path,
                                                             tmp_path: Path) -> None:
    # a chunk of pyramid level 2 cut in half: zarr's error names only its codec ("Zstd
    # decompression error: invalid input data"); the line named the scan folder and offered
    # both stitch and resume
    folder = _copy(inspected, tmp_path)
    chunk = folder / "mosaic.ome.zarr/2/c/0/0"
    _truncate(chunk)
    before = _files(folder)
    result = runner.invoke(app, ["inspect", str(folder)])
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1, line
    assert str(chunk) in line, line
    assert f"waferscope stitch {folder}" in line and "resume" not in line, line
    assert _files(folder) == before  # nothing written, nothing destroyed


def test_undecodable_map_chunk_names_the_map_and_inspect(inspected: Path,
                                                         tmp_path: Path) -> None:
    # a flipped byte in an anomaly map (the viewer reads it): re-stitching, the advice
    # before, leaves the map as damaged as it was
    from scanner.integrity import damaged_data_message

    folder = _copy(inspected, tmp_path)
    chunk = folder / "anomaly.ome.zarr/1/c/0/0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(Exception) as caught:
        np.asarray(zarr.open_array(str(folder / "anomaly.ome.zarr/1"), mode="r")[:])
    line = damaged_data_message(caught.value, str(folder))
    assert line.startswith(f"{chunk}: "), line
    assert f"waferscope inspect {folder}" in line and "stitch" not in line, line
    # and a raw tile's chunk is named as the tile to take again
    tile = folder / "tiles.zarr/c/4/0/0"
    shutil.copy(inspected / "anomaly.ome.zarr/1/c/0/0", chunk)
    _truncate(tile)
    line = damaged_data_message(caught.value, str(folder))
    assert line.startswith(f"{tile}: ") and "raw tile 4" in line, line
    assert f"waferscope resume {folder}" in line, line


def test_missing_map_chunk_says_reinspect_not_restitch(inspected: Path,
                                                       tmp_path: Path) -> None:
    from scanner.errors import UserError
    from scanner.napari._reader import read_scan

    folder = _copy(inspected, tmp_path)
    (folder / "roughness.ome.zarr/0/c/0/0").unlink()
    with pytest.raises(UserError) as caught:
        read_scan(str(folder))
    message = str(caught.value)
    assert "roughness.ome.zarr level 0" in message and "missing" in message, message
    assert "waferscope inspect" in message and "stitch" not in message, message


def test_stitch_refuses_a_record_without_the_pixel_size(inspected: Path,
                                                        tmp_path: Path) -> None:
    # scan.json's microscope section removed by hand: stitch failed with exit 1,
    # "KeyError: 'microscope'"
    folder = _copy(inspected, tmp_path)
    record = json.loads((folder / "scan.json").read_text())
    del record["microscope"]
    (folder / "scan.json").write_text(json.dumps(record))
    before = _files(folder)
    for command in ("stitch", "resume"):
        if command == "resume":  # a stopped scan, so that resume gets that far
            record["status"] = "interrupted"
            (folder / "scan.json").write_text(json.dumps(record))
        result = runner.invoke(app, [command, str(folder)])
        assert result.exit_code == 2, (command, result.output)
        assert "scan.json: records no microscope.pixel_size_um" in result.stderr, result.stderr
        assert _files(folder) == before, command


def test_resume_says_which_damaged_tiles_it_takes_again(inspected: Path, tmp_path: Path,
                                                        caplog) -> None:
    # a complete scan whose tile 2 was cut in half and tile 3's chunk deleted: resume takes
    # them again (the mosaic is fused anew from whole tiles), and says so; before, it did it
    # without a word
    folder = _copy(inspected, tmp_path)
    _truncate(folder / "tiles.zarr/c/2/0/0")
    (folder / "tiles.zarr/c/3/0/0").unlink()
    with caplog.at_level(logging.WARNING):
        result = resume_scan(folder)
    assert result.status == "complete"
    said = [r.getMessage() for r in caplog.records if "taken again" in r.getMessage()]
    assert len(said) == 1, caplog.text
    assert "tiles 2 (row 1, col 2: cannot be decoded), 3 (row 0, col 2: missing)" in said[0]
    assert str(folder / "tiles.zarr") in said[0]
    resumed = json.loads((folder / "scan.json").read_text())["resumed"][-1]
    assert resumed["tiles_damaged"] == [2, 3] and resumed["tiles_missing"] == 2
    tiles = zarr.open_array(str(folder / "tiles.zarr"), mode="r")
    assert tiles[2].any() and tiles[3].any()  # taken again, decodable


@pytest.mark.parametrize("damage", ["chunk", "map", "mosaic"])
def test_resume_redoes_a_damaged_mosaic_or_map_from_the_intact_tiles(
        inspected: Path, tmp_path: Path, caplog, damage: str) -> None:
    # a complete scan whose mosaic or map is damaged: `inspect` sends the user to `stitch`
    # or `resume`, and resume said "the scan is complete; nothing to resume"
    from scanner.errors import UserError

    folder = _copy(inspected, tmp_path)
    if damage == "chunk":
        named = folder / "mosaic.ome.zarr/1/c/0/0"
        _truncate(named)
    elif damage == "map":
        (folder / "uncertainty.ome.zarr/0/c/0/0").unlink()
        named = folder / "uncertainty.ome.zarr"  # "... level 0: chunk (0, 0) is missing"
    else:
        named = folder / "mosaic.ome.zarr"
        shutil.rmtree(named)
    with caplog.at_level(logging.WARNING):
        result = resume_scan(folder)
    assert result.status == "complete"
    said = [r.getMessage() for r in caplog.records if "again from the intact" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(str(named)), caplog.text
    # written again whole, as the first run wrote it
    for k in range(4):
        again = zarr.open_array(str(folder / f"mosaic.ome.zarr/{k}"), mode="r")[:]
        first = zarr.open_array(str(inspected / f"mosaic.ome.zarr/{k}"), mode="r")[:]
        np.testing.assert_array_equal(again, first)
    assert (folder / "uncertainty.ome.zarr/0/c/0/0").is_file()
    with pytest.raises(UserError, match="nothing to resume"):
        resume_scan(folder)


def test_a_tile_store_edited_to_another_type_is_refused_naming_its_metadata(
        inspected: Path, tmp_path: Path, caplog) -> None:
    # tiles.zarr/zarr.json's data_type edited from uint16 to int16: stitch and resume read
    # every tile's bytes as int16 (bright pixels wrapped to negative) and exited 0
    record = json.loads((inspected / "scan.json").read_text())
    assert record["microscope"]["camera_dtype"] == "uint16"  # recorded with the camera
    folder = _copy(inspected, tmp_path)
    meta = folder / "tiles.zarr/zarr.json"
    store = json.loads(meta.read_text())
    assert store["data_type"] == "uint16"
    meta.write_text(json.dumps({**store, "data_type": "int16"}))
    for command in ("stitch", "resume"):
        if command == "resume":  # a stopped scan, so that resume gets to its tiles
            (folder / "scan.json").write_text(json.dumps({**record, "status": "interrupted"}))
        before = _files(folder)
        result = runner.invoke(app, [command, str(folder)])
        assert result.exit_code == 2, (command, result.output)
        line = result.stderr.strip()
        assert len(line.splitlines()) == 1, line
        assert line.startswith(f"error: {meta}: holds int16 tiles but the camera took uint16"), line
        assert "scan.json microscope.camera_dtype" in line, line
        assert _files(folder) == before, command
    # inspect reads no raw tile: it goes on, and says so
    with caplog.at_level(logging.WARNING):
        result = runner.invoke(app, ["inspect", str(folder)])
    assert result.exit_code == 0, result.output
    assert f"{meta}: holds int16 tiles" in caplog.text
    # a scan written before the type was recorded is read as before
    old = _copy(inspected, tmp_path, "old")
    del record["microscope"]["camera_dtype"]
    (old / "scan.json").write_text(json.dumps(record))
    result = runner.invoke(app, ["stitch", str(old)])
    assert result.exit_code == 0, result.output


def test_inspect_warns_of_a_cut_raw_tile_and_goes_on(inspected: Path, tmp_path: Path,
                                                     caplog) -> None:
    # a raw tile's chunk cut in half after stitching: the mosaic is whole, so inspect reads it
    # as before, but said nothing of the damage (found only at the next stitch); it now names
    # the chunk and what takes it again. report, which reads only the defect list, goes on
    # without decoding every tile
    folder = _copy(inspected, tmp_path)
    chunk = folder / "tiles.zarr/c/2/0/0"
    _truncate(chunk)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        result = runner.invoke(app, ["inspect", str(folder)])
    assert result.exit_code == 0, result.output
    said = [r.getMessage() for r in caplog.records if "cannot be decoded" in r.getMessage()]
    assert len(said) == 1 and len(said[0].splitlines()) == 1, caplog.text
    assert said[0].startswith(f"{chunk}: raw tile 2 cannot be decoded"), said[0]
    assert f"waferscope resume {folder}" in said[0], said[0]
    assert runner.invoke(app, ["report", str(folder)]).exit_code == 0
    # what they wrote is what the whole scan gives
    got = json.loads((folder / "defects.json").read_text())["defects"]
    assert got == json.loads((inspected / "defects.json").read_text())["defects"]
    # an intact scan: not a word
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        result = runner.invoke(app, ["inspect", str(_copy(inspected, tmp_path, "whole"))])
    assert result.exit_code == 0 and "cannot be decoded" not in caplog.text, caplog.text


def test_the_napari_reader_names_an_undecodable_chunk(inspected: Path, tmp_path: Path) -> None:
    # napari calls read_scan itself and shows the exception's text: it was zarr's codec
    # error, "Zstd decompression error: invalid input data", which names no file
    from scanner.errors import UserError
    from scanner.napari._reader import read_scan

    folder = _copy(inspected, tmp_path)
    chunk = folder / "mosaic.ome.zarr/1/c/0/0"  # the level its contrast limits are read from
    _truncate(chunk)
    with pytest.raises(UserError) as caught:
        read_scan(str(folder))
    message = str(caught.value)
    assert message.startswith(f"{chunk}: a compressed chunk cannot be decoded"), message
    assert f"waferscope stitch {folder}" in message, message
