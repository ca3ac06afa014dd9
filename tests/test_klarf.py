"""KLARF 1.2 output read back by two independent parsers from PyPI (klarf-reader, klarfio)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scanner.defectlist import CLASSES, Defect, read_defects
from scanner.reports.klarf import klarf_text

klarf_reader = pytest.importorskip("klarf_reader.klarf", reason="test extra: klarf-reader")
klarfio = pytest.importorskip("klarfio.klarfio", reason="test extra: klarfio")


@pytest.mark.slow
def test_klarf_reader_round_trip_matches_defects_json(reported_wafer: Path):
    header, defects = read_defects(reported_wafer)
    sample = json.loads((reported_wafer / "scan.json").read_text())["recipe"]["sample"]
    px, py = (v * 1000 for v in sample["die_pitch_mm"])
    k = klarf_reader.Klarf.load_from_file(reported_wafer / "defects.klarf")
    assert k.file_version == 1.2 and k.sample_type == "WAFER"
    assert (k.lot_id, k.wafers[0].id) == ("LOT42", "W07")
    assert k.sample_size == 20
    assert k.sample_orientation_mark_type == "NOTCH" and k.orientation_mark_location == "DOWN"
    assert (k.die_pitch.x, k.die_pitch.y) == pytest.approx((px, py))
    (wafer,) = k.wafers
    assert len(wafer.defects) == len(defects) > 5
    for d, kd in zip(defects, wafer.defects, strict=True):
        assert kd.id == d.id
        # die index and relative position, in KLARF's frame (y up)
        assert (kd.x_index, kd.y_index) == (d.die_col, -d.die_row)
        assert kd.x_rel == pytest.approx(d.die_x_um, abs=2e-3)
        assert kd.y_rel == pytest.approx(py - d.die_y_um, abs=2e-3)
        # the reader's wafer coordinates: our wafer mm, y flipped
        assert kd.point[0] == pytest.approx(d.wafer_x_mm * 1000, abs=5e-3)
        assert kd.point[1] == pytest.approx(-d.wafer_y_mm * 1000, abs=5e-3)
        x0, y0, x1, y1 = d.bbox_um
        assert (kd.x_size, kd.y_size) == pytest.approx((x1 - x0, y1 - y0), abs=2e-3)
        assert kd.area == pytest.approx(d.area_um2, abs=2e-3)
        assert kd.d_size == pytest.approx(d.size_um, abs=2e-3)
        assert kd.class_number == CLASSES[d.defect_class] and kd.test_id == 1
    tested = header["dies"]["tested"]
    plan = set(zip(k.sample_plan_test.x, k.sample_plan_test.y, strict=True))
    assert plan == {(t["col"], -t["row"]) for t in tested}
    assert wafer.summary.number_of_defects == len(defects)
    assert wafer.summary.number_of_dies == len(tested)
    assert wafer.summary.number_of_def_dies == header["dies"]["n_failed"]
    assert wafer.tests[0].area > 0
    # density per cm² over the tested area
    assert wafer.summary.defect_density == pytest.approx(
        len(defects) / (wafer.tests[0].area * 1e-8), rel=1e-5)


@pytest.mark.slow
def test_klarfio_reads_the_same_defect_table(reported_wafer: Path):
    _, defects = read_defects(reported_wafer)
    data = klarfio.klarf(str(reported_wafer / "defects.klarf")).data["FileRecord_1.2"]
    columns = [c["Column"] for c in data["DefectList"]["Columns"]]
    assert columns[:11] == ["DEFECTID", "XREL", "YREL", "XINDEX", "YINDEX", "XSIZE", "YSIZE",
                            "DEFECTAREA", "DSIZE", "CLASSNUMBER", "TEST"]
    assert len(columns) == 17 and columns[-1] == "IMAGELIST"
    rows = [dict(zip(columns, r, strict=True)) for r in data["DefectList"]["Data"]]
    assert len(rows) == len(defects)
    for d, r in zip(defects, rows, strict=True):
        assert r["DEFECTID"] == d.id
        assert (r["XINDEX"], r["YINDEX"]) == (d.die_col, -d.die_row)
        assert r["XREL"] == pytest.approx(d.die_x_um, abs=2e-3)
        assert r["CLASSNUMBER"] == CLASSES[d.defect_class]
        assert r["REVIEWSAMPLE"] == int(d.review)
    assert data["FileVersion"] == [1, 2] and data["SampleType"] == ["WAFER"]
    assert data["SummaryShortList"][1] == len(defects)


def test_record_order_and_flat_orientation():
    defect = Defect(id=1, x_um=0, y_um=0, bbox_um=(-5, -5, 5, 5), area_um2=78.5, size_um=10,
                    defect_class="scratch", die_col=2, die_row=-1, die_x_um=10.0,
                    die_y_um=4000.0, wafer_x_mm=0.0, wafer_y_mm=0.0)
    header = {"sample": {"name": "r", "lot_id": "A", "wafer_id": "B"},
              "scan_started": "2026-01-02T03:04:05+00:00",
              "dies": {"tested": [{"col": 2, "row": -1, "full": True, "defects": 1,
                                   "pass": False}]}}
    sample = {"diameter_mm": 150, "orientation": "flat", "die_pitch_mm": [10, 10],
              "die_origin_mm": [-5, -3]}
    text = klarf_text(header, [defect], sample, 1.5e10, created="2026-01-02T05:00:00+00:00")
    names = [line.split()[0].rstrip(";") for line in text.splitlines() if line[:1] != " "]
    assert names == [
        "FileVersion", "FileTimestamp", "InspectionStationID", "SampleType", "ResultTimestamp",
        "LotID", "SampleSize", "DeviceID", "SetupID", "StepID", "SampleOrientationMarkType",
        "OrientationMarkLocation", "DiePitch", "DieOrigin", "WaferID", "Slot",
        "SampleCenterLocation", "ClassLookup", "InspectionTest", "SampleTestPlan",
        "AreaPerTest", "DefectRecordSpec", "DefectList", "SummarySpec", "SummaryList",
        "EndOfFile",
    ]
    assert "SampleOrientationMarkType FLAT;" in text
    assert "ResultTimestamp 01-02-26 03:04:05;" in text
    assert "SampleSize 1 150;" in text
    # die (0, 0)'s lower-left corner in KLARF's frame: x = -5 mm, y = +3 mm - 10 mm
    assert "SampleCenterLocation 5.0000000000e+03 7.0000000000e+03;" in text
    assert " 1 10.000 6000.000 2 1 10.000 10.000 78.500 10.000 2 1 0 2 0 0 0 0;" in text
    assert "SampleTestPlan 1\n 2 1;" in text


def test_a_clean_wafer_still_parses(tmp_path: Path):
    header = {"sample": {"name": "r", "lot_id": "A", "wafer_id": "B"},
              "scan_started": "2026-01-02T03:04:05+00:00",
              "dies": {"tested": [{"col": 0, "row": 0, "full": True, "defects": 0,
                                   "pass": True}]}}
    sample = {"diameter_mm": 100, "orientation": "notch", "die_pitch_mm": [10, 10]}
    path = tmp_path / "clean.klarf"
    path.write_text(klarf_text(header, [], sample, 7.0e9))
    k = klarf_reader.Klarf.load_from_file(path)
    assert k.wafers[0].defects == [] and k.wafers[0].summary.number_of_defects == 0
    assert k.wafers[0].summary.number_of_dies == 1
    assert "DefectList;" in path.read_text()


def _one_defect_header() -> tuple[dict, list[Defect], dict]:
    defect = Defect(id=1, x_um=0, y_um=0, bbox_um=(-5, -5, 5, 5), area_um2=78.5, size_um=10,
                    defect_class="scratch", die_col=2, die_row=-1, die_x_um=10.0,
                    die_y_um=4000.0, wafer_x_mm=0.0, wafer_y_mm=0.0, review=True)
    header = {"sample": {"name": "r", "lot_id": "A", "wafer_id": "B"},
              "scan_started": "2026-01-02T03:04:05+00:00",
              "dies": {"tested": [{"col": 2, "row": -1, "full": True, "defects": 1,
                                   "pass": False},
                                  {"col": 3, "row": -1, "full": False, "defects": 0,
                                   "pass": True}]}}
    sample = {"diameter_mm": 150, "orientation": "flat", "die_pitch_mm": [10, 10],
              "die_origin_mm": [-5, -3]}
    return header, [defect], sample


def test_klarf18_nested_records_read_back_by_klarfio(tmp_path: Path):
    from scanner.reports.klarf import klarf18_text

    header, defects, sample = _one_defect_header()
    path = tmp_path / "d.klarf"
    path.write_text(klarf18_text(header, defects, sample, 1.5e10,
                                 created="2026-01-02T05:00:00+00:00"))
    assert klarfio.identify_klarf_version(str(path)) == "1.8"
    data = klarfio.klarf(str(path)).data["FileRecord_1.8"]
    assert data["FileTimestamp"] == ["01-02-2026", "05:00:00"]
    lot = data["LotRecord_A"]
    assert lot["SampleOrientationMarkType"] == ["FLAT"] and lot["SampleSize"] == [1, 150]
    assert lot["DiePitch"] == [10000.0, 10000.0]
    classes = {row[0]: row[1] for row in lot["ClassLookupList"]["Data"]}
    assert classes[0] == "UNCLASSIFIED" and classes[CLASSES["scratch"]] == "SCRATCH"
    wafer = lot["WaferRecord_B"]
    # the same frame as 1.2: die (0, 0)'s lower-left corner at x = -5 mm, y = +3 - 10 mm
    assert wafer["SampleCenterLocation"] == [5000.0, 7000.0]
    test = wafer["TestRecord_1"]
    assert test["AreaPerTest"] == [1.5e10]
    assert sorted(map(tuple, test["SampleTestPlanList"]["Data"])) == [(2, 1), (3, 1)]
    columns = [c["Column"] for c in wafer["DefectList"]["Columns"]]
    (row,) = wafer["DefectList"]["Data"]
    r = dict(zip(columns, row, strict=True))
    assert (r["DEFECTID"], r["XINDEX"], r["YINDEX"]) == (1, 2, 1)
    assert (r["XREL"], r["YREL"]) == (10.0, 6000.0)
    assert r["CLASSNUMBER"] == CLASSES["scratch"] and r["REVIEWSAMPLE"] == 1
    summary = dict(zip([c["Column"] for c in wafer["SummaryRecord"]["TestSummaryList"][
        "Columns"]], wafer["SummaryRecord"]["TestSummaryList"]["Data"][0], strict=True))
    assert (summary["NDEFECT"], summary["NDIE"], summary["NDEFDIE"]) == (1, 2, 1)


def test_klarf18_of_a_clean_wafer_parses(tmp_path: Path):
    from scanner.reports.klarf import write_klarf

    header, _, sample = _one_defect_header()
    path = write_klarf(tmp_path / "c.klarf", header, [], sample, 7.0e9, version="1.8")
    wafer = klarfio.klarf(str(path)).data["FileRecord_1.8"]["LotRecord_A"]["WaferRecord_B"]
    assert wafer["DefectList"]["Data"] == []
    with pytest.raises(ValueError, match="KLARF version"):
        write_klarf(tmp_path / "x.klarf", header, [], sample, 7.0e9, version="2.0")


@pytest.mark.slow
def test_report_klarf18_with_full_dies_only(reported_wafer: Path, tmp_path: Path):
    import shutil

    from typer.testing import CliRunner

    from scanner.cli import app

    folder = tmp_path / "wafer"
    shutil.copytree(reported_wafer, folder)
    runner = CliRunner()
    bad = runner.invoke(app, ["report", str(folder), "--klarf-version", "1.9"])
    assert bad.exit_code == 2 and "--klarf-version" in bad.output
    res = runner.invoke(app, ["report", str(folder), "--klarf-version", "1.8",
                              "--full-dies-only"])
    assert res.exit_code == 0, res.output
    header, defects = read_defects(folder)
    tested = header["dies"]["tested"]
    assert header["dies"]["full_dies_only"] and tested and all(t["full"] for t in tested)
    full = {(t["col"], t["row"]) for t in tested}
    data = klarfio.klarf(str(folder / "defects.klarf")).data["FileRecord_1.8"]
    (lot,) = [v for k, v in data.items() if k.startswith("LotRecord_")]
    (wafer,) = [v for k, v in lot.items() if k.startswith("WaferRecord_")]
    plan = {(i, -j) for i, j in wafer["TestRecord_1"]["SampleTestPlanList"]["Data"]}
    assert plan == full
    # defects on partial dies stay in defects.json, not in the KLARF
    ids = {row[0] for row in wafer["DefectList"]["Data"]}
    assert ids == {d.id for d in defects if (d.die_col, d.die_row) in full}
    assert len(defects) > len(ids) or all((d.die_col, d.die_row) in full for d in defects)


def test_numbers_have_no_negative_zero():
    from scanner.reports.klarf import _fixed, _sci

    # a die origin of -0.0 mm (x = 0 written as a negated product) read "-0.0000000000e+00"
    assert _sci(-0.0) == "0.0000000000e+00" and _sci(-1.5) == "-1.5000000000e+00"
    assert _fixed(-0.0001) == "0.000"


def test_ids_a_klarf_cannot_carry_are_refused_naming_the_option(reported_wafer: Path):
    from typer.testing import CliRunner

    from scanner.cli import app
    from scanner.recipe import RecipeError, parse_recipe

    before = (reported_wafer / "defects.klarf").read_bytes()
    # written, "MY LOT;1" became MY LOT_1 (1.2) or MY_LOT_1 (1.8) without a word
    res = CliRunner().invoke(app, ["report", str(reported_wafer), "--lot", "MY LOT;1"])
    assert res.exit_code == 2 and "--lot" in res.output and "';'" in res.output
    assert (reported_wafer / "defects.klarf").read_bytes() == before
    # a KLARF is ASCII: "Łódź" was written "??d?", and two wafers "晶圆7", "硅片7" both "??7";
    # a tab went in raw
    for option, value, shown in (("--lot", "Łódź", "'Ł'"), ("--wafer", "晶圆7", "'晶'"),
                                 ("--lot", "A\tB", "'\\t'"),
                                 # 300 characters squeezed the wafer map into a corner
                                 ("--lot", "x" * 300, "at most 64"),
                                 # " W1" and "W1": two wafers to a fab, one on the map
                                 ("--wafer", " W1", "starts or ends with a space")):
        res = CliRunner().invoke(app, ["report", str(reported_wafer), option, value])
        assert res.exit_code == 2 and option in res.output and shown in res.output, res.output
    assert (reported_wafer / "defects.klarf").read_bytes() == before
    with pytest.raises(RecipeError, match="wafer_id"):
        parse_recipe({"sample": {"kind": "wafer", "diameter_mm": 100, "wafer_id": "W{1}"},
                      "microscope": {"kind": "simulated"}}, reported_wafer)
