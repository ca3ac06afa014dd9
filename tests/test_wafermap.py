"""wafermap.png: the picture shows the sample, the failing dies and every class's defects."""

from __future__ import annotations

import shutil
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest

from scanner.defectlist import read_defects
from scanner.reports import report
from scanner.reports.style import CLASS_COLORS
from scanner.reports.wafermap import _FAIL_FACE, wafer_outline_mm

pytestmark = pytest.mark.slow


def _rgb(hex_colour: str) -> np.ndarray:
    h = hex_colour.lstrip("#")
    return np.array([int(h[i:i + 2], 16) for i in (0, 2, 4)])


def _pixels_like(img: np.ndarray, hex_colour: str, tol: int = 12) -> int:
    return int((np.abs(img[..., :3].astype(int) - _rgb(hex_colour)).max(axis=-1) <= tol).sum())


def test_wafer_map_shows_classes_and_failing_dies(wafer_scan: Path, tmp_path: Path):
    folder = tmp_path / "wafer"
    shutil.copytree(wafer_scan, folder)
    report(folder)
    img = iio.imread(folder / "wafermap.png")
    assert img.shape[0] > 900 and img.shape[1] > 1200
    _, defects = read_defects(folder)
    for cls in {d.defect_class for d in defects}:  # each class present is drawn in its colour
        assert _pixels_like(img, CLASS_COLORS[cls]) > 30, cls
    for cls in set(CLASS_COLORS) - {d.defect_class for d in defects}:
        assert _pixels_like(img, CLASS_COLORS[cls]) == 0, cls  # no stray legend entries
    assert _pixels_like(img, _FAIL_FACE, tol=6) > 2000  # failing dies shaded


def test_pv_map_shows_busbars_and_defects(pv_scan: Path, tmp_path: Path):
    folder = tmp_path / "pv"
    shutil.copytree(pv_scan, folder)
    report(folder)
    img = iio.imread(folder / "wafermap.png")
    _, defects = read_defects(folder)
    assert _pixels_like(img, "#4a5563", tol=4) > 3000  # three busbars across the cell
    for cls in {d.defect_class for d in defects}:
        assert _pixels_like(img, CLASS_COLORS[cls]) > 30, cls


def test_wafer_outline_notch_and_flat_point_to_plus_y():
    notch = wafer_outline_mm(100.0, "notch", 32.5)
    flat = wafer_outline_mm(100.0, "flat", 32.5)
    disc = wafer_outline_mm(100.0, "none", 32.5)
    assert notch.bounds[3] == pytest.approx(50.0, abs=0.05)  # the rim beside the notch
    assert not notch.contains(_point(0.0, 49.5)) and notch.contains(_point(0.0, -49.5))
    assert flat.bounds[3] == pytest.approx(np.sqrt(50**2 - 16.25**2), abs=1e-6)
    assert flat.bounds[1] == pytest.approx(-50.0, abs=0.05)
    assert disc.area > notch.area > flat.area
    deep = wafer_outline_mm(100.0, "notch", 32.5, notch_depth_mm=4.0)  # the recipe's depth
    assert not deep.contains(_point(0.0, 46.5)) and deep.contains(_point(0.0, 45.5))


def _point(x: float, y: float):
    from shapely.geometry import Point

    return Point(x, y)


def test_rectangle_sample_gets_a_defect_map_and_no_klarf(tmp_path: Path):
    from conftest import _scan_with_truth_defects

    folder = _scan_with_truth_defects(tmp_path, "coupon", {
        "sample": {"kind": "rectangle", "width_mm": 6, "height_mm": 4, "center_um": [2000, 0],
                   "defects": {"count": 6, "seed": 2}},
        "microscope": {"kind": "simulated",
                       "camera": {"width": 256, "height": 256, "pixel_size_um": 10.0}},
    })
    result = report(folder)
    assert set(result.outputs) == {"defects", "defects csv", "wafer map"}
    header, defects = read_defects(folder)
    assert all(d.region is None and d.die_col is None and d.tiles for d in defects)
    img = iio.imread(folder / "wafermap.png")
    for cls in {d.defect_class for d in defects}:
        assert _pixels_like(img, CLASS_COLORS[cls]) > 30, cls


def test_repeaters_are_drawn_as_brown_crosses_with_a_legend_entry(wafer_scan: Path,
                                                                  tmp_path: Path):
    from scanner.reports.locate import ScanContext
    from scanner.reports.style import REPEATER_COLOR
    from scanner.reports.wafermap import draw_wafermap

    folder = tmp_path / "wafer"
    shutil.copytree(wafer_scan, folder)
    report(folder)
    header, defects = read_defects(folder)
    ctx = ScanContext.load(folder)
    plain = iio.imread(draw_wafermap(tmp_path / "plain.png", ctx, header, defects[2:]))
    marked = iio.imread(draw_wafermap(tmp_path / "marked.png", ctx,
                                      {**header, "repeaters": {"groups": 1}}, defects[2:],
                                      repeaters=defects[:2]))
    assert _pixels_like(plain, REPEATER_COLOR, tol=8) == 0
    assert _pixels_like(marked, REPEATER_COLOR, tol=8) > 20


@pytest.mark.parametrize("alignment", [
    None,
    {"kind": "wafer", "nominal_center_um": [1500.0, -800.0], "center_um": [1980.0, -1280.0],
     "rotation_deg": 1.0, "edge_residual_um": 1.0, "n_edge_points": 40},
])
def test_the_map_puts_stage_points_where_the_defect_list_does(tmp_path: Path, alignment):
    from scanner.reports.locate import ScanContext
    from scanner.reports.wafermap import wafer_frame_mm

    # a wafer placed off the recipe's centre and turned: the map's frame is the measured one
    sample = {"kind": "wafer", "diameter_mm": 25, "center_um": [1500.0, -800.0],
              "die_pitch_mm": [3.0, 2.5]}
    scan = {"recipe": {"sample": sample}, "alignment": alignment}
    ctx = ScanContext(tmp_path, scan, sample, (5120.0, 5120.0), np.zeros((0, 3)))
    points = np.array([[1500.0, -800.0], [-6000.0, 4000.0], [9000.0, -7000.0]])
    drawn = wafer_frame_mm(ctx)(points)
    listed = np.array([ctx.to_wafer_um(x, y) for x, y in points]) / 1000.0
    np.testing.assert_allclose(drawn, listed, atol=1e-9)
    if alignment is not None:  # 0.68 mm off the recipe's centre, as the helper found it drawn
        assert np.abs(drawn - (points - sample["center_um"]) / 1000.0).max() > 0.4


def test_a_cell_placed_off_centre_and_turned_is_drawn_in_its_measured_frame(tmp_path: Path,
                                                                            monkeypatch):
    from scanner.reports import wafermap
    from scanner.reports.locate import ScanContext

    sample = {"kind": "pv_cell", "width_mm": 30, "height_mm": 30, "busbars": 3,
              "busbar_width_mm": 1.0, "center_um": [0.0, 0.0]}
    alignment = {"kind": "pv_cell", "nominal_center_um": [0.0, 0.0],
                 "center_um": [450.0, -380.0], "rotation_deg": 0.9, "edge_residual_um": 1.0,
                 "n_edge_points": 40}
    ctx = ScanContext(tmp_path, {"recipe": {"sample": sample}, "alignment": alignment}, sample,
                      (5120.0, 5120.0), np.zeros((0, 3)))
    drawn = []
    monkeypatch.setattr(wafermap, "_draw_defects",
                        lambda ax, defects, to_xy, extent: drawn.append(to_xy))
    wafermap.draw_wafermap(tmp_path / "m.png", ctx, {}, [])
    (to_xy,) = drawn
    for x, y in ((-13000.0, 9000.0), (450.0, -380.0), (12000.0, -14000.0)):
        listed = np.array(ctx.to_wafer_um(x, y)) / 1000.0  # where the region was found
        np.testing.assert_allclose(to_xy(x, y), listed, atol=1e-9)
    assert abs(to_xy(-13000.0, 9000.0)[0] - (-13.0)) > 0.3  # not the recipe's frame


def test_a_cell_scanned_in_a_band_shows_what_was_not_scanned(tmp_path: Path, monkeypatch):
    from scanner.reports import wafermap
    from scanner.reports.locate import ScanContext

    sample = {"kind": "pv_cell", "width_mm": 30, "height_mm": 30, "busbars": 3,
              "busbar_width_mm": 1.0, "center_um": [0.0, 0.0]}
    # three 10 mm tiles across the middle: a band 10 mm high of a 30 mm cell
    tiles = np.array([[0, -10_000.0, 0.0], [1, 0.0, 0.0], [2, 10_000.0, 0.0]])
    ctx = ScanContext(tmp_path, {"recipe": {"sample": sample}}, sample, (10_000.0, 10_000.0),
                      tiles)
    missing = wafermap._unscanned(ctx)
    assert missing is not None
    assert missing.area == pytest.approx(ctx.usable_polygon().area * 2 / 3, rel=0.02)
    whole = ScanContext(tmp_path, {"recipe": {"sample": sample}}, sample, (40_000.0, 40_000.0),
                        np.array([[0, 0.0, 0.0]]))
    assert wafermap._unscanned(whole) is None
    # a complete scan whose registered tiles fall 3 um short of the cell's sides: slivers
    # of rounding, not "not scanned"
    grid = [(k, x, y) for k, (x, y) in enumerate(
        (x, y) for x in (-9_997.0, 0.0, 9_997.0) for y in (-9_997.0, 0.0, 9_997.0))]
    tight = ScanContext(tmp_path, {"recipe": {"sample": sample}}, sample, (10_000.0, 10_000.0),
                        np.array(grid))
    assert wafermap._unscanned(tight) is None
    drawn = iio.imread(wafermap.draw_wafermap(tmp_path / "band.png", ctx, {}, []))
    plain = iio.imread(wafermap.draw_wafermap(tmp_path / "whole.png", whole, {}, []))
    assert drawn.shape == plain.shape and np.abs(drawn.astype(int) - plain).sum() > 0


def test_a_wafer_scanned_in_a_band_shows_what_was_not_scanned(tmp_path: Path):
    from scanner.reports import wafermap
    from scanner.reports.locate import ScanContext

    sample = {"kind": "wafer", "diameter_mm": 30, "edge_exclusion_mm": 1.0,
              "orientation": "notch", "center_um": [0.0, 0.0], "die_pitch_mm": [5.0, 5.0]}
    band = np.array([[k, x, 0.0] for k, x in enumerate((-10_000.0, 0.0, 10_000.0))])
    ctx = ScanContext(tmp_path, {"recipe": {"sample": sample}}, sample, (10_000.0, 10_000.0),
                      band)
    missing = wafermap._unscanned(ctx)
    assert missing is not None and missing.area > 0.4 * ctx.usable_polygon().area
    whole = ScanContext(tmp_path, {"recipe": {"sample": sample}}, sample, (40_000.0, 40_000.0),
                        np.array([[0, 0.0, 0.0]]))
    drawn = iio.imread(wafermap.draw_wafermap(tmp_path / "band.png", ctx, {}, []))
    plain = iio.imread(wafermap.draw_wafermap(tmp_path / "whole.png", whole, {}, []))
    # the hatch covers the wafer above and below the band (it was drawn as the whole wafer)
    assert drawn.shape == plain.shape and np.abs(drawn.astype(int) - plain).sum() > 0
