"""Broken input files: one line naming the file, exit code 2, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from scanner.cli import app

runner = CliRunner()


def _refused_in_one_line(args: list[str], *named: str) -> str:
    """Run the CLI and check that it refused (exit 2) in one line naming each of ``named``."""
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and all(word in lines[0] for word in named), lines
    return lines[0]


def _plain():
    """A plain surface as a camera gives it: level 1000 with noise (a blank image, every pixel
    one value, is refused as nothing imaged)."""
    import numpy as np

    return np.random.default_rng(0).integers(900, 1100, (64, 64), dtype=np.uint16)


@pytest.mark.parametrize("command", [["inspect", "IMGS", "--out", "OUT"],
                                     ["train", "--good", "IMGS", "--out", "OUT/m"]])
def test_a_file_that_is_not_an_image_is_one_line(tmp_path: Path, command: list[str]) -> None:
    images = tmp_path / "imgs"
    images.mkdir()
    (images / "broken.png").write_bytes(b"not a png at all")
    out = tmp_path / "out"
    args = [str(images) if a == "IMGS" else a.replace("OUT", str(out)) for a in command]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    # named as what it is, not as imageio's "Could not find a backend to open"
    assert len(lines) == 1 and "broken.png: not a picture: no decoder knows its content" \
        in lines[0], lines
    assert not (out / "defects.json").exists() and not (out / "m.safetensors").exists()


def test_a_damaged_image_among_good_ones_is_refused_before_any_is_inspected(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tifffile

    import scanner.inspection.images as images_module

    images = tmp_path / "imgs"
    images.mkdir()
    tifffile.imwrite(images / "a_good.tif", _plain())
    tifffile.imwrite(images / "b_good.tif", _plain())
    data = (images / "b_good.tif").read_bytes()
    (images / "c_cut.tif").write_bytes(data[: len(data) // 2])  # truncated: pixels lost
    inspected = []
    monkeypatch.setattr(images_module, "infer_image",
                        lambda *a, **k: inspected.append(1) or (_ for _ in ()).throw(
                            AssertionError("inspected before every image was read")))
    out = tmp_path / "out"
    result = runner.invoke(app, ["inspect", str(images), "--out", str(out)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "c_cut.tif" in lines[0]
    assert not inspected and not (out / "scores.csv").exists()


@pytest.mark.parametrize("record, field", [
    ({"status": "complete", "acquired_tiles": "many"}, "acquired_tiles"),
    ({"status": "complete", "timings": {"acquire": 12.0}}, "timings.acquire"),
    ([1, 2, 3], "not a scan record"),
    ({"status": "bogus"}, "status"),
    # more tiles than the plan has: a record changed by hand, or another scan's
    ({"status": "complete", "plan": {"n_tiles": 4}, "acquired_tiles": 9}, "acquired_tiles"),
    # a check of the whole record names its top-level field as scan.json has it (it was
    # "recipe.acquired_tiles", "recipe: alignment.center_um")
    ({"status": "complete", "alignment": {"center_um": "x"}}, "alignment.center_um"),
    # numbers the stages compute with, edited by hand: `batch` and `stitch` exited 1
    ({"status": "complete", "microscope": {"pixel_size_um": "abc"}}, "microscope.pixel_size_um"),
    ({"status": "complete", "microscope": {"pixel_size_um": 0}}, "microscope.pixel_size_um"),
    ({"status": "complete", "microscope": {"camera_shape": [512, True]}},
     "microscope.camera_shape"),
    ({"status": "complete", "plan": {"n_tiles": 4, "fov_um": [1.0, float("inf")]}},
     "plan.fov_um"),
    # what resume and drift read back: a model given as a number failed resume ("expected
    # str ... not int"), one given as a word failed drift ("'str' object has no attribute
    # 'get'"), both exit 1; "yes" was taken for true
    ({"status": "interrupted", "options": {"inspect": True, "model": 5}}, "options.model"),
    ({"status": "interrupted", "options": {"inspect": "yes"}}, "options.inspect"),
    ({"status": "complete", "inspection": {"model": "abc"}}, "inspection.model"),
])
def test_a_scan_record_of_the_wrong_shape_is_one_line_naming_the_field(
        tmp_path: Path, record: object, field: str) -> None:
    import json

    folder = tmp_path / "scan"
    folder.mkdir()
    (folder / "scan.json").write_text(json.dumps(record))
    before = (folder / "scan.json").read_bytes()
    result = runner.invoke(app, ["report", str(folder)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "scan.json" in lines[0] and field in lines[0], lines
    if isinstance(record, dict):  # the field, as scan.json names it, right after the file
        assert f"scan.json: {field}" in lines[0], lines
    assert (folder / "scan.json").read_bytes() == before  # nothing written over it


@pytest.mark.parametrize(("key", "value", "named"), [
    ("thresholds_by_sample_kind", {"wafer": "high"}, "thresholds_by_sample_kind.wafer"),
    # a line threshold of 0 or less would make every faint region a defect
    ("line_threshold", -1.0, "line_threshold"),
    ("thresholds_line_by_sample_kind", {"pv_cell": 0.0}, "thresholds_line_by_sample_kind"),
    # NaN flags nothing and says nothing; a negative threshold flags everything
    ("threshold", float("nan"), "threshold"),
    ("threshold", -1.0, "threshold"),
    # an edited card's number in quotes, or a boolean, is not read as a number
    ("threshold", "1.2", "threshold"),
    ("thresholds_by_sample_kind", {"wafer": True}, "thresholds_by_sample_kind.wafer"),
    ("kind", "banana", "kind"),
    # a card format this waferscope does not know (a newer one's): refused, not guessed at
    ("version", 999, "version"),
])
def test_a_model_card_with_a_field_of_the_wrong_type_is_one_line_naming_it(
        tmp_path: Path, key: str, value: object, named: str) -> None:
    import json
    import shutil

    from models.modelfile import default_model_path

    weights = default_model_path()
    shutil.copyfile(weights, tmp_path / "m.safetensors")
    card = json.loads(weights.with_suffix(".json").read_text())
    card[key] = value
    (tmp_path / "m.json").write_text(json.dumps(card))
    images = tmp_path / "imgs"
    images.mkdir()
    import tifffile

    tifffile.imwrite(images / "a.tif", _plain())
    result = runner.invoke(app, ["inspect", str(images), "--model", str(tmp_path / "m"),
                                 "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "m.json" in lines[0], lines
    assert named in lines[0]


@pytest.mark.parametrize("header, field", [
    ({"threshold": "high"}, "header.threshold"),
    ({"counts": {"particle": 1.5}}, "header.counts.particle"),
    ([], "header: a JSON object"),
])
def test_a_defect_list_header_of_the_wrong_shape_is_refused_naming_the_field(
        tmp_path: Path, header: object, field: str) -> None:
    import json

    from scanner.defectlist import Defect, read_defects, write_defects
    from scanner.errors import UserError

    row = Defect(1, 10.0, 20.0, (5.0, 15.0, 15.0, 25.0), 80.0, 12.0, "particle", 1.5)
    (tmp_path / "defects.json").write_text(json.dumps({"header": header,
                                                       "defects": [row.to_dict()]}))
    with pytest.raises(UserError, match=field.replace(".", r"\.")):
        read_defects(tmp_path)
    # and what the stages write is held to the same record: nothing is written
    with pytest.raises(UserError, match=field.replace(".", r"\.")):
        write_defects(tmp_path / "new", [row], header)  # type: ignore[arg-type]
    assert not (tmp_path / "new").exists()
    write_defects(tmp_path, [row], {"threshold": 1.2, "counts": {"particle": 1}})
    got_header, got = read_defects(tmp_path)
    assert got_header["threshold"] == 1.2 and got[0].defect_class == "particle"


def test_resume_of_a_scan_whose_recorded_recipe_no_longer_validates_is_one_line(
        tmp_path: Path) -> None:
    import json

    folder = tmp_path / "scan"
    folder.mkdir()
    record = {"status": "interrupted", "plan": {"n_tiles": 4},
              "recipe": {"name": "w", "sample": {"kind": "wafer", "diameter_mm": "big"}}}
    (folder / "scan.json").write_text(json.dumps(record))
    before = (folder / "scan.json").read_bytes()
    result = runner.invoke(app, ["resume", str(folder)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot resume" in lines[0] and "diameter_mm" in lines[0], lines
    assert (folder / "scan.json").read_bytes() == before


@pytest.mark.parametrize("command, option", [
    (["inspect", "IMG", "--out", "FILE"], "--out"),
    (["train", "--good", "IMG", "--out", "FILE/m"], "--out"),
])
def test_an_output_that_is_a_file_is_refused_before_any_work(
        tmp_path: Path, command: list[str], option: str) -> None:
    import numpy as np
    import tifffile

    image = tmp_path / "good.tif"
    tifffile.imwrite(image, (np.random.default_rng(0).random((96, 96)) * 4000).astype("u2"))
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    args = [str(image) if a == "IMG" else a.replace("FILE", str(blocker)) for a in command]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and option in lines[0] and "a_file" in lines[0], lines
    assert blocker.read_text() == "keep me"


def test_a_recipe_giving_a_key_twice_is_refused_naming_it(tmp_path: Path) -> None:
    recipe = tmp_path / "twice.yaml"
    recipe.write_text("sample: {kind: rectangle, width_mm: 1, height_mm: 1}\n"
                      "microscope: {kind: simulated}\n"
                      "sample: {kind: rectangle, width_mm: 9, height_mm: 9}\n")
    result = runner.invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 2, result.output
    assert "'sample' appears twice" in result.stderr and "line 3" in result.stderr


@pytest.mark.parametrize("case", ["fine camera", "huge image pixels"])
def test_a_plan_of_billions_of_tiles_is_refused_before_it_is_listed(
        tmp_path: Path, case: str) -> None:
    import numpy as np
    import tifffile
    import yaml

    stage = {"travel_x_um": [-2e5, 2e5], "travel_y_um": [-2e5, 2e5]}
    if case == "fine camera":  # 200 mm at 1.6 um a tile: 10^10 tiles
        data = {"sample": {"kind": "rectangle", "width_mm": 200, "height_mm": 200},
                "microscope": {"kind": "simulated", "stage": stage,
                               "camera": {"width": 16, "height": 16, "pixel_size_um": 0.1}}}
    else:  # an image placed at 1e300 um a pixel
        tifffile.imwrite(tmp_path / "img.tif", np.full((32, 32), 900, "u2"))
        data = {"sample": {"kind": "image", "path": "img.tif", "pixel_size_um": 1e300},
                "microscope": {"kind": "simulated", "stage": stage}}
    recipe = tmp_path / "huge.yaml"
    recipe.write_text(yaml.safe_dump(data))
    result = runner.invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "scan.max_tiles" in lines[0], lines


def test_true_is_not_taken_for_a_number_in_a_recipe(tmp_path: Path) -> None:
    recipe = tmp_path / "yes.yaml"
    recipe.write_text("sample: {kind: rectangle, width_mm: 1, height_mm: 1}\n"
                      "microscope: {kind: simulated, camera: {pixel_size_um: true}}\n")
    result = runner.invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 2, result.output
    assert "pixel_size_um" in result.stderr and "not true/false" in result.stderr
    recipe.write_text("sample: {kind: rectangle, width_mm: 1, height_mm: 1}\n"
                      "microscope: {kind: simulated, camera: {pixel_size_um: 1}}\n")
    assert runner.invoke(app, ["validate", str(recipe)]).exit_code == 0


@pytest.mark.parametrize("value", ["5", "null", "[a]"])
def test_a_path_that_is_not_text_is_named_in_plain_words(tmp_path: Path, value: str) -> None:
    recipe = tmp_path / "p.yaml"
    recipe.write_text(f"sample: {{kind: image, path: {value}, pixel_size_um: 1}}\n"
                      "microscope: {kind: simulated}\n")
    result = runner.invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "sample.path: a file path (text)" in lines[0], lines


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_an_image_with_non_finite_pixels_is_refused_by_inspect_and_train(
        tmp_path: Path, bad: float) -> None:
    import numpy as np
    import tifffile

    images = tmp_path / "imgs"
    images.mkdir()
    tifffile.imwrite(images / "a_good.tif", np.random.default_rng(0).uniform(
        0.4, 0.6, (64, 64)).astype(np.float32))
    damaged = np.full((64, 64), 0.5, np.float32)
    damaged[10, 20] = bad
    tifffile.imwrite(images / "b_damaged.tif", damaged)
    for args in (["inspect", str(images), "--out", str(tmp_path / "out")],
                 ["train", "--good", str(images), "--out", str(tmp_path / "m")]):
        _refused_in_one_line(args, "b_damaged.tif", "non-finite")
    assert not (tmp_path / "out" / "scores.csv").exists()
    assert not list(tmp_path.glob("m*.safetensors"))


@pytest.mark.parametrize("shape, named", [((64, 64), "32-bit floats"), ((3, 3), "too small")])
def test_pixels_beyond_float32_and_an_image_of_a_few_pixels_are_named(
        tmp_path: Path, shape: tuple[int, int], named: str) -> None:
    # float64 pixels of 1e300 were cast to infinity and inspected (a score of 2.9e17, exit
    # 0); a 3 x 3 image was "not a 2-D image"
    import numpy as np
    import tifffile

    path = tmp_path / "a.tif"
    tifffile.imwrite(path, np.random.default_rng(0).uniform(1e300, 1.7e308, shape))
    result = runner.invoke(app, ["inspect", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "a.tif" in lines[0] and named in lines[0], lines
    assert not (tmp_path / "out" / "scores.csv").exists()


def _damaged_copy(scan: Path, tmp_path: Path, damage) -> Path:
    import shutil

    folder = tmp_path / "scan"
    shutil.copytree(scan, folder)
    damage(folder)
    return folder


def _random_bytes(path: Path) -> None:
    import numpy as np

    path.write_bytes(np.random.default_rng(0).integers(0, 256, 3000, np.uint8).tobytes())


def _edit_json(path: Path, edit) -> None:
    import json

    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _edit_csv_cell(path: Path, row: int, column: str, value: str) -> None:
    """Set one cell of a CSV file (``row`` 1: the first row after the header)."""
    import csv

    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    rows[row][rows[0].index(column)] = value
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def _flip_bits(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 64):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def _garbled_journal(folder: Path) -> None:
    lines = (folder / "tiles.csv").read_text().splitlines()
    cells = lines[2].split(",")
    cells[0] = "abc"  # the tile's index
    lines[2] = ",".join(cells)
    (folder / "tiles.csv").write_text("\n".join(lines) + "\n")


def _edit_lines(path: Path, edit) -> None:
    path.write_text("\n".join(edit(path.read_text().splitlines())) + "\n")


def _zero_scale(data: dict) -> None:
    data["attributes"]["ome"]["multiscales"][0]["datasets"][0][
        "coordinateTransformations"][0]["scale"] = [0, 0]


@pytest.mark.parametrize(("command", "damage", "named"), [
    ("stitch", lambda f: _random_bytes(f / "scan.json"), "scan.json: unreadable"),
    ("stitch", _garbled_journal, "tiles.csv, line 3"),
    # a journal that lost its header, or a row cut short before others, was read as fewer
    # acquired tiles ("0 of 9": resume then took every stored tile again)
    ("stitch", lambda f: _edit_lines(f / "tiles.csv", lambda ls: ls[1:]), "header lacks"),
    ("resume", lambda f: _edit_lines(f / "tiles.csv", lambda ls: ls[1:]), "header lacks"),
    ("stitch", lambda f: _edit_lines(f / "tiles.csv", lambda ls: ls[:3] + [ls[3][:20]]
                                     + ls[4:]), "tiles.csv, line 4"),
    ("resume", lambda f: (f / "tiles.csv").unlink(), "tiles.csv is missing"),
    # a read-back position edited 10 m away: a mosaic 5 million pixels wide was stitched
    ("stitch", lambda f: _edit_lines(f / "tiles.csv", lambda ls: ls[:2] + [
        ",".join(c if k != 3 else str(float(c) + 1e7) for k, c in enumerate(ls[2].split(",")))]
        + ls[3:]), "from its plan"),
    ("stitch", lambda f: __import__("shutil").rmtree(f / "tiles.zarr"), "tiles.zarr"),
    ("stitch", lambda f: (f / "tiles.zarr" / "zarr.json").write_text("{bad"), "tiles.zarr"),
    # zarr's Zstd checksum: a flipped bit in a raw tile is damage, not data
    ("stitch", lambda f: _flip_bits(f / "tiles.zarr" / "c" / "4" / "0" / "0"), "damaged"),
    ("inspect", lambda f: _edit_json(f / "mosaic.ome.zarr" / "zarr.json", _zero_scale),
     "scale"),
    ("inspect", lambda f: _flip_bits(next(p for p in sorted(
        (f / "mosaic.ome.zarr" / "0").rglob("*")) if p.is_file() and p.name != "zarr.json"
        and p.stat().st_size > 200)), "damaged"),
    # a wafer's die grid read the mosaic before its checked opening: exit 1, a traceback's line
    ("inspect", lambda f: (f / "mosaic.ome.zarr" / "zarr.json").unlink(), "mosaic.ome.zarr"),
    ("inspect", lambda f: _edit_json(f / "mosaic.ome.zarr" / "zarr.json",
                                     lambda d: d.update(attributes={})), "OME-NGFF"),
    ("inspect", lambda f: _edit_json(f / "mosaic.ome.zarr" / "0" / "zarr.json",
                                     lambda d: d.update(codecs=d["codecs"][:1])), "damaged"),
    # a level's shape edited: a 100 x 100 corner was inspected as the whole (exit 0, 0 of
    # 3 defects); with every level edited alike, the scan's record tells
    ("inspect", lambda f: _edit_json(f / "mosaic.ome.zarr" / "0" / "zarr.json",
                                     lambda d: d.update(shape=[100, 100])), "levels disagree"),
    ("inspect", lambda f: [_edit_json(f / "mosaic.ome.zarr" / str(k) / "zarr.json",
                                      lambda d, k=k: d.update(shape=[-(-100 // 2**k)] * 2))
                           for k in range(len(list((f / "mosaic.ome.zarr").glob("[0-9]*"))))],
     "the scan recorded"),
    ("inspect", lambda f: _edit_json(f / "scan.json", lambda d: d.pop("recipe")),
     "records no recipe"),
    ("inspect", lambda f: _edit_json(
        f / "scan.json", lambda d: d["recipe"]["sample"].update(diameter_mm=float("nan"))),
     "recipe: sample"),
    # an alignment edited by hand: report failed with exit 1 ("string indices must be
    # integers")
    ("report", lambda f: _edit_json(f / "scan.json", lambda d: d.setdefault(
        "alignment", {"center_um": [0, 0], "rotation_deg": 0}).update(refined="x")),
     "alignment.refined: not a mapping"),
    # a defect list edited by hand: a NaN centre crashed the die index (exit 1) or was
    # written as an empty report cell (exit 0); ids given twice were carried into the reports
    ("report", lambda f: _edit_json(f / "defects.json",
                                    lambda d: d["defects"][0].update(x_um=None)), "x_um"),
    ("report", lambda f: _edit_json(f / "defects.json",
                                    lambda d: d["defects"][0].update(bbox_um=[0, 1, 2])),
     "bbox_um"),
    ("report", lambda f: _edit_json(f / "defects.json",
                                    lambda d: d["defects"][0].update(review="no")), "review"),
    ("report", lambda f: _edit_json(f / "defects.json",
                                    lambda d: d["defects"][1].update(id=d["defects"][0]["id"])),
     "given twice"),
    # a registered position edited a kilometre away: the report took every defect's tile from
    # it and rewrote the lists (exit 0)
    ("report", lambda f: _edit_csv_cell(f / "tiles.csv", 1, "x_reg_um", "1e9"),
     "registered at"),
    # a row and column beyond the plan's: the tile was stitched without its neighbours, and
    # the mosaic changed shape (exit 0)
    ("stitch", lambda f: _edit_csv_cell(f / "tiles.csv", 1, "row", "77"), "row 77 is not in"),
    ("stitch", lambda f: _edit_csv_cell(f / "tiles.csv", 1, "col", "-1"), "col -1 is not in"),
    ("report", lambda f: _edit_json(f / "defects.json",
                                    lambda d: d["defects"][0].update(tiles=["a"])),
     "tiles: ['a'] is not a list of tile indices"),
    # "tile 0 is damaged ... run `waferscope resume`", which then refused the store's shape
    ("stitch", lambda f: _edit_json(f / "tiles.zarr" / "zarr.json", lambda d: d.update(
        shape=[d["shape"][0], d["shape"][1] // 2, d["shape"][2] // 2],
        chunk_grid={**d["chunk_grid"], "configuration": {"chunk_shape": [
            1, d["shape"][1] // 2, d["shape"][2] // 2]}})), "zarr.json is damaged"),
    # read as no defect at all: the report rewrote both lists empty and exited 0
    ("report", lambda f: _edit_json(f / "defects.json", lambda d: d.update(defects="")),
     "defects: a JSON list"),
    ("report", lambda f: _edit_json(f / "defects.json", lambda d: d.update(defects={})),
     "defects: a JSON list"),
    # values no inspection writes were written back as given (exit 0)
    ("report", lambda f: _edit_json(f / "defects.json",
                                    lambda d: d["defects"][0].update(size_um=-1)), "size_um"),
    ("report", lambda f: _edit_json(f / "defects.json", lambda d: d["defects"][0].update(
        bbox_um=d["defects"][0]["bbox_um"][2:] + d["defects"][0]["bbox_um"][:2])), "bbox_um"),
    ("report", lambda f: _edit_json(f / "defects.json",
                                    lambda d: d["defects"][0].update(x_um=1e300)), "stage origin"),
    ("report", lambda f: _edit_json(f / "defects.json",
                                    lambda d: d["header"].update(threshold=-1)), "threshold"),
    # a scan folder that lost its record is not inspected as a bare mosaic over its results
    ("inspect", lambda f: (f / "scan.json").unlink(), "not a scan folder"),
    # a folder where a report file goes: found after defects.json and .csv were replaced
    ("report", lambda f: (f / "wafermap.png").mkdir(), "a folder where the report writes"),
])
def test_a_damaged_scan_folder_is_one_line_and_keeps_its_results(
        wafer_scan: Path, tmp_path: Path, command: str, damage, named: str) -> None:
    import json

    from scanner.scanfolder import read_scan_json, write_json

    def elsewhere(f: Path) -> None:  # as if another host's process had run the scan
        write_json(f / "scan.json", {**read_scan_json(f),
                                     "process": {"pid": 1, "host": "acquisition-pc"}})

    folder = _damaged_copy(wafer_scan, tmp_path, lambda f: (elsewhere(f), damage(f)))
    before = (folder / "defects.json").read_bytes()
    record = folder / "scan.json"

    def recorded() -> object:
        try:
            return json.loads(record.read_text())
        except (OSError, ValueError):  # gone, or the damage itself
            return record.read_bytes() if record.is_file() else None

    record_before = recorded()
    bytes_before = record.read_bytes() if record.is_file() else None
    mtime_before = record.stat().st_mtime_ns if record.is_file() else None
    result = runner.invoke(app, [command, str(folder)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], lines
    assert (folder / "defects.json").read_bytes() == before
    # the scan's record says what it said: its status, and the process that ran it (a
    # refused stitch or inspect left its own process id there)
    assert recorded() == record_before
    if bytes_before is not None and record.is_file() and record.read_bytes() == bytes_before:
        assert record.stat().st_mtime_ns == mtime_before  # not even touched
    # nothing half-written is left behind (refused inspections left their maps' .tmp stores)
    assert not [p.name for p in folder.iterdir() if ".tmp" in p.name]


def test_batch_of_folders_that_are_not_scans_exits_2(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["batch", "a", str(tmp_path / "b")])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and "not a scan folder" in lines[0], lines
    assert "b: no such folder" in lines[1], lines  # a missing folder is named as missing
    # each scan is named by its whole path, as the scans done are (a relative one was named
    # as given when it failed, resolved when it succeeded)
    assert lines[0].startswith(f"{tmp_path.resolve() / 'a'}: failed"), lines


def test_a_batch_names_the_scan_with_damaged_tiles_and_goes_on(wafer_scan: Path,
                                                              tmp_path: Path) -> None:
    # a damaged chunk raised past the batch's per-scan handling: the whole batch stopped on
    # one unnamed line, and the scans after it were never processed
    import shutil

    bad = _damaged_copy(wafer_scan, tmp_path,
                        lambda f: _flip_bits(f / "tiles.zarr" / "c" / "4" / "0" / "0"))
    bad = bad.rename(tmp_path / "lot7_w3")
    good = tmp_path / "good"
    shutil.copytree(wafer_scan, good)
    result = runner.invoke(app, ["batch", str(bad), str(good)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "lot7_w3" in lines[0] and "damaged" in lines[0], lines
    assert (good / "defects.json").stat().st_mtime > (bad / "defects.json").stat().st_mtime


def test_more_local_workers_than_cores_are_refused() -> None:
    import os

    from scanner.cluster import ClusterSpec
    from scanner.errors import UserError

    with pytest.raises(UserError, match="cores"):
        ClusterSpec.parse(f"local:{len(os.sched_getaffinity(0)) + 1}")
    assert ClusterSpec.parse("local:1").local_workers == 1


def test_a_pixel_size_that_would_resample_an_image_beyond_reason_is_refused(
        tmp_path: Path) -> None:
    import tifffile

    tifffile.imwrite(tmp_path / "a.tif", _plain())
    result = runner.invoke(app, ["inspect", str(tmp_path / "a.tif"), "--pixel-size", "1e30",
                                 "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--pixel-size" in lines[0], lines


@pytest.mark.parametrize("key", ["threshold", "score_reference", "feature_dim"])
def test_a_model_card_without_its_threshold_is_refused(tmp_path: Path, key: str) -> None:
    import json
    import shutil

    import tifffile

    from models.modelfile import default_model_path

    weights = default_model_path()
    shutil.copyfile(weights, tmp_path / "m.safetensors")
    card = json.loads(weights.with_suffix(".json").read_text())
    if key == "feature_dim":  # edited: it was read past
        card["architecture"]["backbone"][key] = 99
    else:  # without its score scale, raw distances were compared with the threshold
        card.pop(key)
    (tmp_path / "m.json").write_text(json.dumps(card))
    tifffile.imwrite(tmp_path / "a.tif", _plain())
    for command in (["inspect", str(tmp_path / "a.tif"), "--model", str(tmp_path / "m"),
                     "--out", str(tmp_path / "out")],
                    ["train", "--good", str(tmp_path / "a.tif"), "--init", str(tmp_path / "m"),
                     "--out", str(tmp_path / "m2")]):
        result = runner.invoke(app, command)
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and (f"{key}: missing" in lines[0] or f"{key}: 99" in lines[0]), \
            lines
    assert not (tmp_path / "out").exists() and not (tmp_path / "m2.json").exists()


def test_drift_with_no_scan_to_compare_is_one_line(tmp_path: Path) -> None:
    import json

    folder = tmp_path / "scan"
    folder.mkdir()
    (folder / "scan.json").write_text(json.dumps({"status": "complete"}))  # never inspected
    result = runner.invoke(app, ["drift", str(folder)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no scan can be compared" in lines[0], lines


def test_a_recorded_recipe_whose_sample_file_moved_is_not_damage(tmp_path: Path) -> None:
    from scanner.errors import UserError
    from scanner.integrity import check_recorded_recipe

    moved = {"recipe": {"sample": {"kind": "image", "path": "gone.tif", "pixel_size_um": 1}}}
    check_recorded_recipe(tmp_path, moved)  # the stages that read the file say so themselves
    # a moved file beside a field that no longer validates is damage all the same
    both = {"recipe": {"sample": {"kind": "image", "path": "gone.tif", "pixel_size_um": -1}}}
    with pytest.raises(UserError, match="pixel_size_um"):
        check_recorded_recipe(tmp_path, both)
    # a text that merely says "file not found" is not taken for a moved file
    named = {"recipe": {"sample": {"kind": "wafer", "diameter_mm": "file not found"}}}
    with pytest.raises(UserError, match="diameter_mm"):
        check_recorded_recipe(tmp_path, named)


def test_a_blank_image_is_refused_by_inspect_and_train(tmp_path: Path) -> None:
    import numpy as np
    import tifffile

    images = tmp_path / "imgs"
    images.mkdir()
    tifffile.imwrite(images / "a_good.tif", _plain())
    tifffile.imwrite(images / "b_blank.tif", np.zeros((64, 64), np.uint16))  # lamp off
    for args in (["inspect", str(images), "--out", str(tmp_path / "out")],
                 ["train", "--good", str(images), "--out", str(tmp_path / "m")]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "b_blank.tif" in lines[0] and "blank" in lines[0], lines
    assert not (tmp_path / "out" / "scores.csv").exists()
    assert not list(tmp_path.glob("m*.safetensors"))


def test_a_sample_image_that_is_not_an_image_and_a_file_that_is_not_yaml_are_named(
        tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not an image")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("sample: {kind: image, path: notes.txt, pixel_size_um: 1}\n"
                      "microscope: {kind: simulated}\n")
    result = runner.invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "sample.path: cannot read image" in lines[0], lines
    recipe.write_bytes(b"\x00\x01junk")
    result = runner.invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == f"error: {recipe}: not valid YAML"


@pytest.mark.parametrize("name, named", [("old.tif", "exists"), ("snap.png", ".png"),
                                         ("recipe.yaml", ".yaml")])
def test_devices_save_keeps_an_existing_file_and_refuses_a_name_that_is_not_tiff(
        write_recipe, tmp_path: Path, name: str, named: str) -> None:
    recipe = write_recipe({
        "sample": {"kind": "rectangle", "width_mm": 1.0, "height_mm": 0.8},
        "microscope": {"kind": "simulated",
                       "camera": {"width": 64, "height": 64, "pixel_size_um": 2.0}}})
    target = tmp_path / name
    if not target.exists():
        target.write_text("keep me")
    before = target.read_bytes()
    result = runner.invoke(app, ["devices", str(recipe), "--save", str(target)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--save" in lines[0] and named in lines[0], lines
    assert target.read_bytes() == before
    # asked for, an existing TIFF is replaced
    tiff = tmp_path / "snap.tif"
    tiff.write_text("old")
    result = runner.invoke(app, ["devices", str(recipe), "--save", str(tiff), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert tiff.read_bytes()[:2] in (b"II", b"MM")
    from scanner.inspection.pixelsize import stated_pixel_um

    assert stated_pixel_um(tiff) == pytest.approx(2.0)  # train and inspect read it back


@pytest.mark.parametrize("status", ["complete", "interrupted"])
@pytest.mark.parametrize("plan", [None, {"n_tiles": "four"}])
def test_resume_of_a_scan_that_records_no_plan_is_one_line(tmp_path: Path, status: str,
                                                          plan: dict | None) -> None:
    import json

    folder = tmp_path / "scan"
    folder.mkdir()
    record = {"status": status, "recipe": {
        "name": "r", "sample": {"kind": "rectangle", "width_mm": 1, "height_mm": 1},
        "microscope": {"kind": "simulated", "camera": {"width": 64, "height": 64}}}}
    if plan is not None:
        record["plan"] = plan
    (folder / "scan.json").write_text(json.dumps(record))
    before = (folder / "scan.json").read_bytes()
    # as stitch, inspect and report say it (resume failed with KeyError: 'plan', exit 1)
    for command in ("resume", "stitch"):
        result = runner.invoke(app, [command, str(folder)])
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "records no plan; not a waferscope scan" in lines[0], lines
    assert (folder / "scan.json").read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["scan.json"]


@pytest.mark.parametrize(("column", "value"), [(3, "nan"), (3, "inf"), (3, ""),
                                               (-1, "banana")])  # -1: the tile's status
def test_a_tile_position_that_is_not_a_finite_number_is_a_damaged_journal(
        tmp_path: Path, column: int, value: str) -> None:
    import json

    import numpy as np

    from scanner.tilestore import TileRecord, TileStore

    folder = tmp_path / "scan"
    folder.mkdir()
    (folder / "scan.json").write_text(json.dumps({
        "status": "interrupted", "plan": {"n_tiles": 2, "n_rows": 1, "n_cols": 2},
        "microscope": {"kind": "simulated", "pixel_size_um": 1.0, "camera_shape": [8, 8]},
        "recipe": {
        "name": "r", "sample": {"kind": "rectangle", "width_mm": 1, "height_mm": 1},
        "microscope": {"kind": "simulated", "camera": {"width": 64, "height": 64}}}}))
    store = TileStore(folder, 2, (8, 8), np.dtype("u2"))
    for i in (0, 1):
        store.write(np.full((8, 8), 900 + i, "u2"), TileRecord(i, 0, i, 100.0 * i, 0, 0, i))
    store.close()
    lines = (folder / "tiles.csv").read_text().splitlines()
    cells = lines[2].split(",")
    cells[column] = value  # x_um of tile 1: stitch failed on "cannot convert float NaN to
    # integer"; a status a scan never writes was read as a tile still to take
    lines[2] = ",".join(cells)
    (folder / "tiles.csv").write_text("\n".join(lines) + "\n")
    before = (folder / "tiles.csv").read_bytes()
    for command in ("stitch", "resume"):
        result = runner.invoke(app, [command, str(folder)])
        assert result.exit_code == 2, result.output
        out = result.stderr.strip().splitlines()
        named = "x_um" if column == 3 else "status"
        assert len(out) == 1 and f"tiles.csv, line 3: {named}" in out[0] \
            and "damaged" in out[0], out
    assert (folder / "tiles.csv").read_bytes() == before


def test_a_file_that_may_not_be_read_is_named_as_unreadable(tmp_path: Path,
                                                            monkeypatch) -> None:
    """A calibration (or .cfg, or model) made unreadable was reported as a failed write
    ("cal.json: cannot write (Permission denied); free space or choose another folder")."""
    import os

    cal = tmp_path / "cal.json"
    cal.write_text('{"pixel_size_um": 1.0, "rotation_deg": 0.0}')
    recipe = tmp_path / "r.yaml"
    recipe.write_text("sample: {kind: rectangle, width_mm: 1.0, height_mm: 1.0}\n"
                      "microscope: {kind: simulated, calibration: cal.json}\n")
    real_open, real_access = open, os.access

    def forbidden(path, *args, **kwargs):  # what a file with mode 000 gives a user (not root)
        if Path(path) == cal:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", forbidden)
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: forbidden(self).read()
                        if self == cal else real_open(self, encoding="utf-8").read())
    monkeypatch.setattr(os, "access", lambda path, mode, *a, **k: False if Path(path) == cal
                        else real_access(path, mode, *a, **k))
    res = CliRunner().invoke(app, ["validate", str(recipe)])
    assert res.exit_code == 2
    assert "cal.json: cannot read (Permission denied)" in res.output
    assert "cannot write" not in res.output


def test_a_full_disk_met_inside_a_library_names_the_commands_destination(
        tmp_path: Path, monkeypatch) -> None:
    """A write that fails inside a library raises an OSError naming no file: the message
    named nothing ("cannot write (No space left on device); free space ...")."""
    import errno

    import scanner.inspection.inspect as inspect_module

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(inspect_module, "inspect_target", full)
    image = tmp_path / "a.png"
    import numpy as np
    from skimage import io

    io.imsave(image, np.full((64, 64), 128, np.uint8), check_contrast=False)
    res = CliRunner().invoke(app, ["inspect", str(image), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    assert f"{tmp_path / 'out'}: cannot write (No space left on device)" in " ".join(
        res.output.split()), res.output


def test_a_journal_saved_with_a_byte_order_mark_is_read(wafer_scan: Path,
                                                        tmp_path: Path) -> None:
    """A spreadsheet's "CSV UTF-8" puts a BOM before the header: its first column was not
    "index", every row was dropped, and resume took every stored tile again."""
    from scanner.tilestore import read_tiles_csv

    folder = _damaged_copy(wafer_scan, tmp_path, lambda f: (f / "tiles.csv").write_bytes(
        b"\xef\xbb\xbf" + (f / "tiles.csv").read_bytes()))
    assert read_tiles_csv(folder) == read_tiles_csv(wafer_scan)
    assert len(read_tiles_csv(folder)) > 0


@pytest.mark.parametrize(("args", "named"), [
    (["run"], "Missing argument 'recipe'"),
    (["inspect", "--threshold", "abc", "x"], "'--threshold'"),
    (["nosuch"], "No such command 'nosuch'"),
    (["run", "--bogus", "x"], "No such option: --bogus"),
])
def test_a_usage_error_is_one_line_from_the_command_line(args: list[str], named: str) -> None:
    """click drew a usage block and a boxed panel of 3-5 lines for these."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "scanner", *args], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0] and "--help" in lines[0], lines


def test_calibrate_at_a_point_beyond_any_stage_is_refused_in_one_short_line(
        tmp_path: Path) -> None:
    # 1e300 um was echoed back as a 300-digit number of um
    recipe = tmp_path / "r.yaml"
    recipe.write_text("sample: {kind: rectangle, width_mm: 1.0, height_mm: 1.0}\n"
                      "microscope: {kind: simulated}\n")
    res = runner.invoke(app, ["calibrate", str(recipe), "--at", "1e300", "0",
                              "--out", str(tmp_path / "cal.json")])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "--at" in lines[0] and "1e+300" in lines[0], lines
    assert len(lines[0]) < 200
    assert not (tmp_path / "cal.json").exists()


def _png(path: Path, rows: list[bytes], width: int, height: int, interlace: int = 0) -> None:
    """A grey 8-bit PNG of ``rows`` (each a filter byte and its pixels), written by hand."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, interlace)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))


def test_a_png_whose_pixel_data_stops_short_is_refused_not_read_as_black(
        tmp_path: Path) -> None:
    # checksums and the compressed stream are whole, but it holds 150 of the 300 rows its
    # header declares: Pillow filled the rest with 0 and inspection reported a "crack" where
    # the data stopped (exit 0), and train learnt the black half as good
    import numpy as np

    pixels = np.random.default_rng(0).integers(20, 220, (300, 400), dtype=np.uint8)
    images = tmp_path / "imgs"
    images.mkdir()
    _png(images / "cut.png", [b"\x00" + r.tobytes() for r in pixels[:150]], 400, 300)
    for args in (["inspect", str(images / "cut.png"), "--out", str(tmp_path / "out")],
                 ["train", "--good", str(images), "--out", str(tmp_path / "m")]):
        _refused_in_one_line(args, "cut.png", "150 of its 300 rows")
    assert not (tmp_path / "out" / "scores.csv").exists()


def test_whole_pngs_interlaced_or_of_any_depth_are_read_as_pillow_decodes_them(
        tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    from models.data import read_image

    rng = np.random.default_rng(1)
    pixels = rng.integers(20, 220, (37, 53), dtype=np.uint8)
    # Adam7: seven passes over sub-grids of the picture, each row after its filter byte
    passes = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4),
              (1, 0, 2, 2), (0, 1, 1, 2))
    rows = [b"\x00" + row.tobytes() for x0, y0, dx, dy in passes
            for row in pixels[y0::dy, x0::dx] if row.size]
    _png(tmp_path / "adam7.png", rows, 53, 37, interlace=1)
    with Image.open(tmp_path / "adam7.png") as im:
        assert np.array_equal(np.asarray(im), pixels)
    assert np.array_equal(read_image(tmp_path / "adam7.png"), pixels.astype(np.float32))
    for mode, array in (("I;16", rng.integers(0, 65535, (40, 30), dtype=np.uint16)),
                        ("1", rng.random((40, 30)) > 0.5), ("RGB", rng.integers(
                            0, 255, (40, 30, 3), dtype=np.uint8))):
        Image.fromarray(array).save(tmp_path / f"{mode[:1]}.png")
        assert read_image(tmp_path / f"{mode[:1]}.png").shape == (40, 30)


@pytest.mark.parametrize("shape", [(1, 1), (1, 100), (1, 1, 3), (100, 1)])
def test_a_picture_one_pixel_thin_is_too_small_not_shapeless(tmp_path: Path,
                                                            shape: tuple[int, ...]) -> None:
    # a 1 x 1 picture was "not a 2-D image (shape ())", a 1 x 100 one "(shape (100,))"
    import numpy as np
    from PIL import Image

    path = tmp_path / "thin.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)).save(path)
    _refused_in_one_line(["inspect", str(path), "--out", str(tmp_path / "out")], "thin.png",
                         "too small")


@pytest.mark.parametrize("compression", ["lzw", "zlib", "zstd", "jpeg"])
def test_compressed_tiffs_as_fiji_and_cameras_write_them_are_read(
        tmp_path: Path, compression: str) -> None:
    # an LZW TIFF was refused: "<COMPRESSION.LZW: 5> requires the 'imagecodecs' package"
    import numpy as np
    import tifffile

    from models.data import read_image

    pixels = np.random.default_rng(0).integers(20, 220, (64, 80), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "a.tif", pixels, compression=compression)
    read = read_image(tmp_path / "a.tif")
    if compression == "jpeg":  # lossy
        assert read.shape == pixels.shape and np.abs(read - pixels).mean() < 8
    else:
        assert np.array_equal(read, pixels.astype(np.float32))


def test_inspection_results_inside_an_image_folder_are_not_read_as_its_images(
        tmp_path: Path) -> None:
    # `inspect C --out C/results` (or `inspect C/a.png --out C`), then `inspect C`: the
    # overlays (boxes drawn on a copy of a.png) were inspected as images, and `train --good C`
    # learnt them as good
    import numpy as np
    import tifffile

    from models.data import image_files

    images = tmp_path / "C"
    images.mkdir()
    tifffile.imwrite(images / "a.tif", np.random.default_rng(0).integers(
        20, 220, (96, 96), dtype=np.uint8))
    assert runner.invoke(app, ["inspect", str(images), "--out", str(images / "results"),
                               "--threshold", "0.01"]).exit_code == 0
    assert runner.invoke(app, ["inspect", str(images / "a.tif"), "--out", str(images),
                               "--threshold", "0.01"]).exit_code == 0
    assert list((images / "results" / "overlays").iterdir())  # defects drawn: pictures exist
    assert list((images / "overlays").iterdir())
    assert image_files(images) == [images / "a.tif"]
    result = runner.invoke(app, ["inspect", str(images), "--out", str(tmp_path / "D")])
    assert result.exit_code == 0, result.output
    rows = (tmp_path / "D" / "scores.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith("a.tif,"), rows
    # a folder of the user's own that is merely called "overlays" is read
    (images / "sub" / "overlays").mkdir(parents=True)
    tifffile.imwrite(images / "sub" / "overlays" / "b.tif", np.full((16, 16), 9, np.uint8))
    assert images / "sub" / "overlays" / "b.tif" in image_files(images)


@pytest.mark.slow
def test_a_scan_whose_sample_picture_has_moved_is_refused_naming_it(tmp_path: Path) -> None:
    # the whole mosaic, the chuck around the picture included, was inspected without the
    # sample's outline and without a word (a defect reported outside the sample)
    import numpy as np

    from tests.conftest import scan_of_image

    picture = 0.4 + 0.2 * np.random.default_rng(0).random((300, 400))
    folder = scan_of_image(tmp_path, picture, camera_px=256)
    (tmp_path / "sample.tif").rename(tmp_path / "moved.tif")
    for args in (["inspect", str(folder), "--out", str(tmp_path / "out")],
                 ["train", "--good", str(folder), "--out", str(tmp_path / "m")]):
        _refused_in_one_line(args, "sample.tif", "put the file back")
    (tmp_path / "moved.tif").rename(tmp_path / "sample.tif")
    result = runner.invoke(app, ["inspect", str(folder), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output


def test_a_pixel_size_refused_part_way_leaves_no_output_folder(tmp_path: Path) -> None:
    # the refusal (exit 2) left an empty --out folder behind
    import numpy as np
    import tifffile

    path = tmp_path / "a.tif"
    tifffile.imwrite(path, np.random.default_rng(0).integers(20, 220, (64, 64), np.uint8))
    result = runner.invoke(app, ["inspect", str(path), "--out", str(tmp_path / "out"),
                                 "--pixel-size", "1e9"])
    assert result.exit_code == 2, result.output
    assert "--pixel-size" in result.stderr and not (tmp_path / "out").exists()


def test_an_error_logged_from_background_work_is_one_line() -> None:
    """A full disk while a tile was processed during acquisition printed its traceback (12
    lines) above the one line saying what to do; WAFERSCOPE_DEBUG=1 still shows it."""
    import logging
    import os
    import subprocess
    import sys

    from scanner.cli import OneLineFormatter

    record = None
    try:
        raise OSError(28, "No space left on device")
    except OSError:
        record = logging.LogRecord("waferscope.acquire", logging.ERROR, __file__, 1,
                                   "processing of tile %d failed", (16,), sys.exc_info())
    line = OneLineFormatter("%(levelname)s %(name)s: %(message)s").format(record)
    assert line == ("ERROR waferscope.acquire: processing of tile 16 failed: OSError: "
                    "[Errno 28] No space left on device")
    # the command line installs it on the handler its logging writes through
    code = ("import logging, sys; from scanner.cli import OneLineFormatter, main; "
            "sys.argv = ['waferscope', '--help']; "
            "import contextlib, io\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try: main()\n"
            "    except SystemExit: pass\n"
            "print(all(isinstance(h.formatter, OneLineFormatter) "
            "for h in logging.getLogger().handlers))")
    for debug, expected in (("", "True"), ("1", "False")):
        env = {k: v for k, v in os.environ.items() if k != "WAFERSCOPE_DEBUG"}
        if debug:
            env["WAFERSCOPE_DEBUG"] = debug
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=env, timeout=120)
        assert out.stdout.strip().splitlines()[-1] == expected, out.stdout + out.stderr


def test_an_inspections_map_is_not_inspected_as_a_mosaic(tmp_path: Path) -> None:
    # its scores were read as a mosaic and "inspected" (exit 0)
    (tmp_path / "anomaly.ome.zarr").mkdir()
    _refused_in_one_line(["inspect", str(tmp_path / "anomaly.ome.zarr"), "--out",
                          str(tmp_path / "out")], "anomaly.ome.zarr", "not a mosaic")
    assert not (tmp_path / "out").exists()


def test_resume_is_offered_for_a_failed_write_only_where_a_scan_was_started(
        tmp_path: Path) -> None:
    """`run --out` on a read-only disk was told "a stopped scan continues with `waferscope
    resume SCAN`", with nothing there to resume; train and report were told the same."""
    import errno

    from scanner.cli_common import _storage_message

    started = tmp_path / "scan"
    (started / "tiles.zarr").mkdir(parents=True)
    (started / "scan.json").write_text("{}")
    full = OSError(errno.ENOSPC, "No space left on device", str(started / "tiles.zarr" / "c"))
    refused = OSError(errno.EROFS, "Read-only file system", str(tmp_path / "new" / "scan.json"))
    assert "waferscope resume" in _storage_message(full, acquiring=True)
    assert "waferscope resume" not in _storage_message(refused, acquiring=True)
    assert "waferscope resume" not in _storage_message(full, acquiring=False)


def test_a_pixel_size_given_for_a_mosaic_is_refused_not_ignored(tmp_path: Path) -> None:
    (tmp_path / "m.ome.zarr").mkdir()
    _refused_in_one_line(["inspect", str(tmp_path / "m.ome.zarr"), "--pixel-size", "2",
                          "--out", str(tmp_path / "out")], "--pixel-size", "image files only")


def test_a_pixel_size_given_for_good_scans_is_refused_not_a_relabel(wafer_scan: Path,
                                                                     tmp_path: Path) -> None:
    # the scans' pixels were carded at the given size: a bank of 8 um pixels labelled 3 um
    _refused_in_one_line(["train", "--good", str(wafer_scan), "--pixel-size", "0.123",
                          "--out", str(tmp_path / "m")], "--pixel-size 0.123",
                         "the good scans' pixels are")
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.safetensors").exists()


def test_help_keeps_the_brackets_of_an_install_extra() -> None:
    # rich read "[napari]" as markup and printed "needs waferscope" alone
    for args in (["--help"], ["view", "--help"]):
        res = runner.invoke(app, args, env={"COLUMNS": "200"})
        assert res.exit_code == 0, res.output
        assert "waferscope[napari]" in res.output, res.output


@pytest.mark.parametrize("layout", ["strips", "tiles", "uncompressed"])
@pytest.mark.parametrize("index", ["offsets", "bytecounts"])
def test_a_tiff_missing_a_strip_or_tile_is_refused_not_read_as_black(
        tmp_path: Path, layout: str, index: str) -> None:
    # a TIFF whose index gives a strip or tile no place in the file (offset or byte count 0:
    # written cut short, or its index damaged) was read with that band black: a recipe's
    # image sample validated and scanned, `inspect` scored it and `train` learnt it as good
    import struct

    import numpy as np
    import tifffile

    from models.data import read_image
    from scanner.errors import UserError
    from simulators.samples.image import ImageSample

    rng = np.random.default_rng(0)
    pixels = rng.integers(20000, 40000, (256, 256), dtype=np.uint16)
    good = tmp_path / "good.tif"
    options = {"strips": {"rowsperstrip": 32, "compression": "zlib"},
               "tiles": {"tile": (64, 64), "compression": "zlib"},
               "uncompressed": {"rowsperstrip": 32}}[layout]
    tifffile.imwrite(good, pixels, **options)
    assert np.array_equal(read_image(good), pixels.astype(np.float32))
    name = ("Tile" if layout == "tiles" else "Strip") + \
        ("Offsets" if index == "offsets" else "ByteCounts")
    with tifffile.TiffFile(good) as tif:
        tag = tif.pages[0].tags[name]
        at, size = tag.valueoffset, struct.calcsize({3: "H", 4: "I", 16: "Q"}[int(tag.dtype)])
    data = bytearray(good.read_bytes())
    data[at + 2 * size: at + 3 * size] = bytes(size)  # the third segment's entry is 0
    images = tmp_path / "imgs"
    images.mkdir()
    damaged = images / "damaged.tif"
    damaged.write_bytes(bytes(data))
    with pytest.raises(UserError, match="damaged.tif.*holds no data"):
        read_image(damaged)
    with pytest.raises(ValueError, match="holds no data"):
        ImageSample(damaged, pixel_size_um=1.0)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"sample: {{kind: image, path: {damaged}, pixel_size_um: 1.0, origin_um: [0, 0]}}\n"
        "microscope: {kind: simulated, camera: {width: 128, height: 128, pixel_size_um: 1.0}}\n"
        "scan: {overlap: 0.1}\n")
    _refused_in_one_line(["validate", str(recipe)], "sample.path", "damaged.tif", "no data")
    _refused_in_one_line(["inspect", str(damaged), "--out", str(tmp_path / "out")],
                         "damaged.tif", "no data")
    _refused_in_one_line(["train", "--good", str(images), "--out", str(tmp_path / "m")],
                         "damaged.tif", "no data")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("m.*"))


@pytest.mark.parametrize("case", ["too many fields", "beyond the travel"])
def test_an_image_sample_too_big_to_plan_is_refused_from_its_header(tmp_path: Path,
                                                                     case: str) -> None:
    """A TIFF declaring 200,000 x 200,000 px was read whole (40 GB, minutes; here its header
    alone, and the whole array allocated) before the plan could refuse it: refused from the
    header, naming the limit it breaks."""
    import os

    import numpy as np
    import tifffile
    import yaml

    tifffile.imwrite(tmp_path / "huge.tif", shape=(200_000, 200_000), dtype=np.uint8)
    os.truncate(tmp_path / "huge.tif", 4096)  # the header only: never read past it
    sample = {"kind": "image", "path": "huge.tif", "pixel_size_um": 4.0, "origin_um": [0, 0]}
    if case == "beyond the travel":  # a part of it, placed past the stage's reach
        sample.update(origin_um=[150_000.0, 0.0], region_px=[0, 0, 600, 600])
    recipe = tmp_path / "huge.yaml"
    recipe.write_text(yaml.safe_dump({"sample": sample, "microscope": {
        "kind": "simulated", "camera": {"width": 256, "height": 256, "pixel_size_um": 4.0}}}))
    line = _refused_in_one_line(["validate", str(recipe)], "huge.yaml")
    assert "cannot read" not in line
    named = "scan.max_tiles" if case == "too many fields" else "microscope.stage.travel_x_um"
    assert named in line and ("200000 x 200000 px" in line or "600 x 600 px" in line)


def test_a_scan_name_too_long_for_a_folder_is_refused_naming_output_name(
        tmp_path: Path) -> None:
    """A 300-character output.name was accepted, and the run failed making its folder
    ("File name too long", exit 1); so did a recipe file of a long name without one."""
    import yaml

    data = {"sample": {"kind": "rectangle", "width_mm": 1, "height_mm": 1},
            "microscope": {"kind": "simulated"}, "output": {"name": "x" * 300}}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(data))
    _refused_in_one_line(["validate", str(recipe)], "output.name", "too long")
    data["output"]["name"] = "é" * 115  # 230 bytes: fits with the time stamp
    recipe.write_text(yaml.safe_dump(data))
    assert runner.invoke(app, ["validate", str(recipe)]).exit_code == 0
    # a recipe file's name too long for a folder gives the default name, as one with a '/'
    from scanner.recipe import load_recipe

    del data["output"]
    long_file = tmp_path / ("r" * 240 + ".yaml")
    long_file.write_text(yaml.safe_dump(data))
    assert load_recipe(long_file).name == "scan"


def test_an_out_path_whose_name_is_too_long_is_one_line(tmp_path: Path) -> None:
    """--out with a 300-character folder name: exit 1 "failed: OSError" before."""
    import tifffile

    images = tmp_path / "imgs"
    images.mkdir()
    tifffile.imwrite(images / "a.tif", _plain())
    out = tmp_path / ("o" * 300)
    _refused_in_one_line(["inspect", str(images), "--out", str(out)], "name too long")


@pytest.mark.parametrize(("option", "value"), [("--pixel-size", "1e9"), ("--seed", "-1"),
                                               ("--seed", str(2**70))])
def test_train_refuses_a_pixel_size_or_seed_out_of_range_before_any_work(
        tmp_path: Path, option: str, value: str) -> None:
    """--pixel-size 1e9 built a model of 1 km pixels (a recipe's camera and a calibration take
    at most 1000 µm); --seed -1 and 2**70 failed in the build (exit 1, "expected non-negative
    integer", "Overflow when unpacking long long": torch takes seeds below 2**64)."""
    import tifffile

    images = tmp_path / "imgs"
    images.mkdir()
    tifffile.imwrite(images / "a.tif", _plain())
    model = tmp_path / "m.safetensors"
    result = runner.invoke(app, ["train", "--good", str(images), "--out", str(model), option,
                                 value])
    assert result.exit_code == 2, result.output  # a usage error for --seed: one line in main
    assert option in result.stderr and "Traceback" not in result.output
    assert not model.exists()


def test_train_refuses_a_scan_folder_without_its_record_as_inspect_does(
        tmp_path: Path) -> None:
    """A folder holding a mosaic but no scan.json (a scan that lost its record) was learnt
    from as a bare mosaic, its chuck and sample edge taken for good surface, where inspect
    refuses it."""
    import numpy as np

    from scanner.ngff import build_pyramid, create_multiscale, finish_multiscale

    folder = tmp_path / "scan"
    folder.mkdir()
    img = np.random.default_rng(0).integers(900, 1100, (256, 256), dtype=np.uint16)
    tmp, arrays = create_multiscale(folder / "mosaic.ome.zarr", img.shape, chunk=128,
                                    dtype=img.dtype)
    arrays[0][:] = img
    build_pyramid(arrays, 128)
    finish_multiscale(tmp, folder / "mosaic.ome.zarr", len(arrays), 4.0, (0.0, 0.0), "mosaic")
    model = tmp_path / "m.safetensors"
    _refused_in_one_line(["train", "--good", str(folder), "--out", str(model)],
                         "no scan.json", "mosaic.ome.zarr")
    assert not model.exists()


def test_a_card_of_a_later_version_says_a_newer_waferscope_wrote_it(tmp_path: Path) -> None:
    """A card of version 2 was refused as "version: Input should be less than or equal to
    1", which said neither what the number is nor what to do."""
    import json
    import shutil

    from models.modelfile import default_model_path

    weights = default_model_path()
    shutil.copyfile(weights, tmp_path / "m.safetensors")
    card = json.loads(weights.with_suffix(".json").read_text())
    card["version"] = 2
    (tmp_path / "m.json").write_text(json.dumps(card))
    images = tmp_path / "imgs"
    images.mkdir()
    import tifffile

    tifffile.imwrite(images / "a.tif", _plain())
    _refused_in_one_line(["inspect", str(images), "--model", str(tmp_path / "m"), "--out",
                          str(tmp_path / "out")], "m.json: version: 2", "upgrade waferscope")
