"""Locating defects and the report stage: die grid maths, PV regions, tiles, header, CLI."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from shapely.geometry import Point
from typer.testing import CliRunner

from scanner.cli import app
from scanner.defectlist import CLASSES, Defect, read_defects
from scanner.diegrid import DieGrid
from scanner.pipeline import ScanResult
from scanner.reports import report
from scanner.reports.locate import ScanContext, pv_region, tiles_containing
from scanner.reports.style import CLASS_COLORS
from scanner.tilestore import read_tiles_csv

runner = CliRunner()


# --------------------------------------------------------------------------- unit: maths


def test_die_grid_index_and_position_follow_the_recipe_convention():
    grid = DieGrid.from_sample({"die_pitch_mm": [3.0, 2.5], "die_origin_mm": [-1.0, -2.0],
                                "center_um": [1500.0, -800.0]})
    assert grid.origin_um == (500.0, -2800.0)
    assert grid.index(500.0, -2800.0) == (0, 0)  # the lower corner of die (0, 0)
    assert grid.index(499.9, -2800.1) == (-1, -1)
    assert grid.index(500.0 + 3000 * 2 + 10, -2800.0 - 2500 * 3 + 5) == (2, -3)
    dx, dy = grid.in_die(500.0 - 100.0, -2800.0 + 2500.0 + 40.0)
    assert (dx, dy) == pytest.approx((2900.0, 40.0))
    assert grid.cell_box(-1, 1) == (-2500.0, -300.0, 500.0, 2200.0)


def test_cells_in_a_disc_full_and_partial_match_a_brute_force_count():
    grid = DieGrid((2000.0, 1500.0), (-700.0, 300.0))
    disc = Point(0, 0).buffer(10_000, quad_segs=256)
    cells = {(c, r): full for c, r, full in grid.cells_in(disc)}
    for col in range(-8, 8):
        for row in range(-9, 9):
            x0, y0, x1, y1 = grid.cell_box(col, row)
            corners = [math.hypot(x, y) for x in (x0, x1) for y in (y0, y1)]
            nearest = math.hypot(np.clip(0, x0, x1), np.clip(0, y0, y1))
            if max(corners) < 9_990:
                assert cells.get((col, row)) is True
            elif nearest > 10_010:
                assert (col, row) not in cells
            elif min(corners) > 10_010 and nearest < 9_990:
                assert cells.get((col, row)) is False


def test_pv_regions_are_listed_busbar_by_busbar():
    from scanner.reports.locate import region_order

    names = ["finger area", "busbar 10", "edge", "busbar 2", "busbar 1"]
    assert sorted(names, key=region_order) == ["busbar 1", "busbar 2", "busbar 10", "edge",
                                               "finger area"]


def test_pv_regions_edge_busbars_and_fingers():
    cell = {"width_mm": 30.0, "height_mm": 30.0, "busbars": 3, "busbar_width_mm": 1.0,
            "center_um": [100.0, 0.0]}
    # busbars at -10, 0, +10 mm from the centre (k - 0.5) * 30 / 3 - 15
    assert pv_region(100.0 - 10_000.0, 0.0, cell) == "busbar 1"
    assert pv_region(100.0 + 400.0, 5000.0, cell) == "busbar 2"
    assert pv_region(100.0 + 10_490.0, -3000.0, cell) == "busbar 3"
    assert pv_region(100.0 + 5000.0, 0.0, cell) == "finger area"
    assert pv_region(100.0 + 14_000.0, 0.0, cell) == "edge"  # within 2 mm of the border
    assert pv_region(100.0 - 10_000.0, 14_500.0, cell) == "edge"  # edge wins over the busbar
    assert pv_region(100.0, 0.0, {**cell, "busbars": 0}) == "finger area"


def test_tiles_containing_uses_the_field_of_view_around_tile_centres():
    tiles = np.array([[0, 0.0, 0.0], [1, 900.0, 0.0], [5, 0.0, 900.0]])
    assert tiles_containing(450.0, 10.0, tiles, (1000.0, 1000.0)) == [0, 1]
    assert tiles_containing(-499.0, 450.0, tiles, (1000.0, 1000.0)) == [0, 5]
    assert tiles_containing(2000.0, 0.0, tiles, (1000.0, 1000.0)) == []
    assert tiles_containing(0.0, 0.0, np.zeros((0, 3)), (1000.0, 1000.0)) == []


def test_every_class_has_a_colour():
    assert set(CLASS_COLORS) == set(CLASSES)


# --------------------------------------------------------------------------- report stage


@pytest.mark.slow
def test_wafer_defects_are_located_against_the_truth(reported_wafer: Path):
    header, defects = read_defects(reported_wafer)
    truth = json.loads((reported_wafer / "truth.json").read_text())["defects"]
    scan = json.loads((reported_wafer / "scan.json").read_text())
    sample = scan["recipe"]["sample"]
    cx, cy = sample["center_um"]
    ox, oy = cx + sample["die_origin_mm"][0] * 1000, cy + sample["die_origin_mm"][1] * 1000
    px, py = (v * 1000 for v in sample["die_pitch_mm"])
    tiles = {r.index: r for r in read_tiles_csv(reported_wafer)}
    assert len(defects) == len(truth) > 5
    # the scan aligned (scan.align: auto): the wafer frame is the measured one, a few µm
    # (the stage's repeatability) from the exact placement the simulator used
    tol = 5.0 if scan.get("alignment") else 1e-3
    for d, t in zip(defects, truth, strict=True):
        assert d.wafer_x_mm == pytest.approx((t["x_um"] - cx) / 1000, abs=tol / 1000)
        assert d.wafer_y_mm == pytest.approx((t["y_um"] - cy) / 1000, abs=tol / 1000)
        # the die's cell contains the defect, and the position is measured from its corner
        assert ox + d.die_col * px - tol <= t["x_um"] < ox + (d.die_col + 1) * px + tol
        assert oy + d.die_row * py - tol <= t["y_um"] < oy + (d.die_row + 1) * py + tol
        assert d.die_x_um == pytest.approx(t["x_um"] - ox - d.die_col * px, abs=tol)
        assert d.die_y_um == pytest.approx(t["y_um"] - oy - d.die_row * py, abs=tol)
        assert d.region is None
        # listed tiles really imaged the defect (their true field of view contains it)
        assert d.tiles
        for i in d.tiles:
            assert abs(tiles[i].x_true_um - t["x_um"]) <= 2560 + 10
            assert abs(tiles[i].y_true_um - t["y_um"]) <= 2560 + 10


@pytest.mark.slow
def test_wafer_header_block(reported_wafer: Path):
    header, defects = read_defects(reported_wafer)
    scan = json.loads((reported_wafer / "scan.json").read_text())
    canonical = json.dumps(scan["recipe"], sort_keys=True, separators=(",", ":"),
                           ensure_ascii=False)
    assert header["recipe_sha256"] == hashlib.sha256(canonical.encode()).hexdigest()
    assert header["sample"]["lot_id"] == "LOT42" and header["sample"]["wafer_id"] == "W07"
    assert header["model"] == {"id": "ground-truth", "sha256": "0" * 64}
    assert header["scan_started"] == scan["started"] and header["scan_finished"] == scan["finished"]
    assert header["versions"]["python"] and header["versions"]["waferscope"]
    counts = {c: sum(d.defect_class == c for d in defects) for c in CLASSES}
    assert header["counts"] == {**counts, "total": len(defects)}
    dies = header["dies"]
    tested = {(d["col"], d["row"]): d for d in dies["tested"]}
    assert dies["n_tested"] == len(tested) and any(d["full"] for d in tested.values())
    assert any(not d["full"] for d in tested.values())  # partial edge dies count as tested
    for d in defects:  # simulated defects lie in the usable area: their die was tested
        assert tested[(d.die_col, d.die_row)]["pass"] is False
    failing = {k for k, v in tested.items() if not v["pass"]}
    assert failing == {(d.die_col, d.die_row) for d in defects}
    assert dies["n_failed"] == len(failing)
    for die in tested.values():
        assert die["defects"] == sum((d.die_col, d.die_row) == (die["col"], die["row"])
                                     for d in defects)
    assert scan["report"]["n_defects"] == len(defects)
    assert {"defects.json", "defects.csv", "wafermap.png"} <= set(scan["report"]["outputs"])
    # the report's wall time spans its outputs, from the defect list to the wafer map (drawn
    # last); 0.02 s for the file system's clock tick
    first, last = ((reported_wafer / n).stat().st_mtime for n in ("defects.json", "wafermap.png"))
    assert last > first and scan["timings"]["report"]["wall_s"] >= last - first - 0.02


@pytest.mark.slow
def test_report_is_idempotent_and_keeps_the_csv_in_step(reported_wafer: Path):
    before = {n: (reported_wafer / n).read_bytes() for n in ("defects.json", "defects.csv")}
    report(reported_wafer)
    for name, content in before.items():
        assert (reported_wafer / name).read_bytes() == content, name
    lines = (reported_wafer / "defects.csv").read_text().splitlines()
    _, defects = read_defects(reported_wafer)
    assert len(lines) == len(defects) + 1
    assert lines[1].startswith(f"{defects[0].id},")


@pytest.mark.slow
def test_pv_cell_defects_get_regions(pv_scan: Path, tmp_path: Path):
    folder = tmp_path / "pv"
    shutil.copytree(pv_scan, folder)
    result = report(folder)
    assert set(result.outputs) == {"defects", "defects csv", "wafer map"}  # no KLARF for a cell
    header, defects = read_defects(folder)
    sample = json.loads((folder / "scan.json").read_text())["recipe"]["sample"]
    for d in defects:
        assert d.region == pv_region(d.x_um, d.y_um, sample)
        assert d.die_col is None and d.wafer_x_mm is None and d.tiles
    assert sum(header["regions"].values()) == len(defects)
    assert "dies" not in header


def test_a_rectangle_with_a_die_grid_gets_die_indices(tmp_path: Path):
    from conftest import _scan_with_truth_defects

    folder = _scan_with_truth_defects(tmp_path, "rect", {
        "sample": {"kind": "rectangle", "width_mm": 6, "height_mm": 4,
                   "center_um": [1000, -500], "die_pitch_mm": [1.5, 1.0],
                   "die_origin_mm": [0.25, 0.0], "defects": {"count": 8, "seed": 4}},
        "microscope": {"kind": "simulated",
                       "camera": {"width": 256, "height": 256, "pixel_size_um": 20.0}, "seed": 3},
        "scan": {"overlap": 0.1}})
    report(folder)
    header, defects = read_defects(folder)
    assert defects
    corner = (1000 - 3000 + 250, -500 - 2000)  # the lower corner, moved by die_origin_mm
    for d in defects:
        u, v = d.x_um - corner[0], d.y_um - corner[1]
        assert (d.die_col, d.die_row) == (math.floor(u / 1500), math.floor(v / 1000))
        assert (d.die_x_um, d.die_y_um) == pytest.approx((u % 1500, v % 1000), abs=1e-3)
        assert d.wafer_x_mm is None and d.region is None  # not a wafer, not a cell
    # the CSV carries them too
    rows = (folder / "defects.csv").read_text().splitlines()
    col = rows[0].split(",").index("die_col")
    assert [int(r.split(",")[col]) for r in rows[1:]] == [d.die_col for d in defects]


def test_a_stale_repeaters_file_in_a_cell_scan_is_emptied_not_a_crash(pv_scan: Path,
                                                                      tmp_path: Path):
    # a repeaters.json left in a folder that now holds a PV-cell scan: its defects take part
    # again (none here), and the file is rewritten without groups
    folder = tmp_path / "pv"
    shutil.copytree(pv_scan, folder)
    n = len(read_defects(folder)[1])
    (folder / "repeaters.json").write_text(json.dumps(
        {"source_created": None, "tolerance_um": 60.0, "n_groups": 0, "n_defects": 0,
         "groups": []}))
    result = report(folder)
    assert "repeaters" in result.outputs
    assert json.loads((folder / "repeaters.json").read_text())["n_groups"] == 0
    assert len(read_defects(folder)[1]) == n


@pytest.mark.slow
def test_report_command_with_lot_and_wafer(wafer_scan: Path, tmp_path: Path):
    folder = tmp_path / "scan"
    shutil.copytree(wafer_scan, folder)
    res = runner.invoke(app, ["report", str(folder), "--lot", "L-9", "--wafer", "W-3"])
    assert res.exit_code == 0, res.output
    for name in ("defects.json", "defects.csv", "defects.klarf", "wafermap.png"):
        assert (folder / name).is_file()
        assert name in res.output
    header, _ = read_defects(folder)
    assert (header["sample"]["lot_id"], header["sample"]["wafer_id"]) == ("L-9", "W-3")
    klarf = (folder / "defects.klarf").read_text()
    assert 'LotID "L-9";' in klarf and 'WaferID "W-3";' in klarf
    # a later report without ids keeps the ones given on the command line
    assert runner.invoke(app, ["report", str(folder)]).exit_code == 0
    assert 'LotID "L-9";' in (folder / "defects.klarf").read_text()
    # ... and so does one after inspection wrote a new defect list (a header without them)
    from conftest import truth_defects

    from scanner.defectlist import write_defects

    write_defects(folder, truth_defects(folder), {"model": {"id": "again", "sha256": "1" * 64}})
    assert runner.invoke(app, ["report", str(folder)]).exit_code == 0
    klarf = (folder / "defects.klarf").read_text()
    assert 'LotID "L-9";' in klarf and 'WaferID "W-3";' in klarf
    outputs = ScanResult(folder, "complete", 1, 1, {}).outputs
    assert {"defects", "defects csv", "klarf", "wafer map"} <= set(outputs)


def test_report_command_errors_are_one_line_and_exit_2(tmp_path: Path):
    res = runner.invoke(app, ["report", str(tmp_path / "nowhere")])
    assert res.exit_code == 2 and f"{tmp_path / 'nowhere'}: no such folder" in res.output
    (tmp_path / "empty").mkdir()
    res = runner.invoke(app, ["report", str(tmp_path / "empty")])
    assert res.exit_code == 2 and "not a scan folder" in res.output
    (tmp_path / "scan.json").write_text(json.dumps({"recipe": {"sample": {"kind": "wafer"}}}))
    (tmp_path / "tiles.csv").write_text("index,row,col,x_um,y_um,z_um,time_s\n")
    res = runner.invoke(app, ["report", str(tmp_path)])
    assert res.exit_code == 2 and "defects.json" in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_locate_leaves_inspection_fields_alone(wafer_scan: Path):
    ctx = ScanContext.load(wafer_scan)
    d = Defect(id=7, x_um=1500.0, y_um=-800.0, bbox_um=(1490, -810, 1510, -790), area_um2=300,
               size_um=28.0, defect_class="pit", score=0.9, roughness=2.0, uncertainty=0.3,
               review=True)
    from scanner.reports.locate import locate

    (out,) = locate([d], ctx)
    assert (out.id, out.score, out.defect_class, out.review) == (7, 0.9, "pit", True)
    # the aligned scan's wafer frame is the measured one (within the stage's few µm)
    assert (out.wafer_x_mm, out.wafer_y_mm) == pytest.approx((0.0, 0.0), abs=0.005)
    assert (out.die_col, out.die_row) == (0, 0)  # die origin (-1, -2) mm: centre in die (0, 0)
    assert (out.die_x_um, out.die_y_um) == pytest.approx((1000.0, 2000.0), abs=5.0)
    assert d.die_col is None  # the input is not modified


def test_model_identity_from_the_inspection_header():
    from scanner.reports.locate import _model_info

    inspection = {"model": {"file": "m.safetensors", "name": "wafer-cnn",
                            "weights_sha256": "ab" * 32, "pixel_size_um": 5.0}}
    info = _model_info(inspection, {})
    assert (info["id"], info["sha256"]) == ("wafer-cnn", "ab" * 32)
    assert info["pixel_size_um"] == 5.0 and info["file"] == "m.safetensors"
    assert _model_info({}, {"inspection": inspection})["id"] == "wafer-cnn"
    assert _model_info({}, {}) == {"id": None, "sha256": None}
    # re-reading a header the report wrote gives the same identity (idempotent)
    assert _model_info({"model": info}, {}) == info


@pytest.mark.slow
def test_run_scan_reports_when_inspection_left_a_defect_list(tmp_path: Path, monkeypatch):
    """The report stage runs at the end of run_scan once defects.json exists (written here
    right after stitching, where the inspect stage will write it)."""
    from conftest import truth_defects

    import scanner.pipeline as pipeline
    from scanner.defectlist import write_defects
    from scanner.recipe import parse_recipe

    stitch_stage = pipeline._stitch_stage

    def stitch_then_inspect(folder, *args, **kwargs):
        stitch_stage(folder, *args, **kwargs)
        write_defects(folder, truth_defects(folder), {})

    monkeypatch.setattr(pipeline, "_stitch_stage", stitch_then_inspect)
    recipe = parse_recipe({
        "sample": {"kind": "wafer", "diameter_mm": 12, "edge_exclusion_mm": 1,
                   "die_pitch_mm": [2, 2], "defects": {"count": 5, "seed": 1}},
        "microscope": {"kind": "simulated",
                       "camera": {"width": 512, "height": 512, "pixel_size_um": 8.0}},
    }, tmp_path, "small")
    result = pipeline.run_scan(recipe, tmp_path / "scan")
    assert {"defects", "defects csv", "klarf", "wafer map"} <= set(result.outputs)
    assert "report" in result.timings
    _, defects = read_defects(result.folder)
    assert len(defects) == 5 and all(d.die_col is not None and d.tiles for d in defects)


@pytest.mark.slow
def test_a_cell_report_keeps_the_lot_and_id_it_is_given(pv_scan: Path, tmp_path: Path):
    """`report --lot L --wafer W` on a PV cell exited 0 and wrote them nowhere."""
    folder = tmp_path / "scan"
    shutil.copytree(pv_scan, folder)
    res = runner.invoke(app, ["report", str(folder), "--lot", "L-9", "--wafer", "C-3"])
    assert res.exit_code == 0, res.output
    header, _ = read_defects(folder)
    assert (header["sample"]["lot_id"], header["sample"]["wafer_id"]) == ("L-9", "C-3")
    assert runner.invoke(app, ["report", str(folder)]).exit_code == 0  # they stick
    header, _ = read_defects(folder)
    assert (header["sample"]["lot_id"], header["sample"]["wafer_id"]) == ("L-9", "C-3")
    assert json.loads((folder / "scan.json").read_text())["report"]["lot_id"] == "L-9"
    # a cell given none has none
    shutil.rmtree(folder)
    shutil.copytree(pv_scan, folder)
    assert runner.invoke(app, ["report", str(folder)]).exit_code == 0
    assert "lot_id" not in read_defects(folder)[0]["sample"]


def test_an_image_files_review_picture_outlines_its_defects_in_their_class_colours(tmp_path):
    import json

    import imageio.v3 as iio
    import tifffile

    from scanner.reports.overlays import MAX_SIDE_PX, OVERLAYS, overlay, write_overlays
    from scanner.reports.style import CLASS_COLORS

    img = np.full((300, 400), 1000.0, dtype=np.float32)
    img[200:, :] = 2000.0  # not blank: a blank image is refused as nothing imaged
    scratch = {"bbox_um": [100.0, 50.0, 160.0, 54.0], "defect_class": "scratch",
               "review": False}  # at 2 um/px: columns 50-80, rows 25-27
    pic = overlay(img, [scratch], 2.0)
    blue = np.array([int(CLASS_COLORS["scratch"][i : i + 2], 16) for i in (1, 3, 5)])
    assert pic.shape == (300, 400, 3) and pic.dtype == np.uint8
    assert (pic[25, 48] == blue).all() and (pic[25, 82] == blue).all()  # the box's sides
    assert not (pic[26, 65] == blue).all()  # the defect itself is left to be seen
    # a small defect gets a box of 16 px at least; a large image is scaled down
    spot = {"bbox_um": [400.0, 400.0, 402.0, 402.0], "defect_class": "particle"}
    big = overlay(np.ones((5000, 3000), np.float32), [spot], 1.0)
    assert max(big.shape[:2]) == MAX_SIDE_PX
    marked = np.argwhere((big != big[0, 0]).any(axis=2))
    assert 16 <= np.ptp(marked[:, 0]) <= 24 and 16 <= np.ptp(marked[:, 1]) <= 24
    # written for the images with defects only
    tifffile.imwrite(tmp_path / "a.tif", img.astype(np.uint16))
    tifffile.imwrite(tmp_path / "b.tif", img.astype(np.uint16))
    doc = {"header": {"pixel_size_um": 2.0}, "images": {"a.tif": [scratch], "b.tif": []}}
    (tmp_path / "defects.json").write_text(json.dumps(doc))
    folder = write_overlays(tmp_path / "defects.json", [("a.tif", tmp_path / "a.tif"),
                                                        ("b.tif", tmp_path / "b.tif")])
    assert folder == tmp_path / OVERLAYS
    assert sorted(p.name for p in folder.iterdir()) == ["a.tif.png"]
    assert (iio.imread(folder / "a.tif.png") == pic).all()
    # inspected again into the same folder: b now has the defect and a none; a's picture of
    # the first inspection, whose box the new list no longer holds, is gone
    doc["images"] = {"a.tif": [], "b.tif": [scratch]}
    (tmp_path / "defects.json").write_text(json.dumps(doc))
    write_overlays(tmp_path / "defects.json", [("a.tif", tmp_path / "a.tif"),
                                               ("b.tif", tmp_path / "b.tif")])
    assert sorted(p.name for p in folder.iterdir()) == ["b.tif.png"]
    doc["images"] = {"a.tif": [], "b.tif": []}
    (tmp_path / "defects.json").write_text(json.dumps(doc))
    assert write_overlays(tmp_path / "defects.json", [("a.tif", tmp_path / "a.tif"),
                                                      ("b.tif", tmp_path / "b.tif")]) is None
    assert not list(folder.glob("*.png"))
