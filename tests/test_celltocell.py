"""Cell-to-cell comparison of a repeat finer than a die (scanner.inspection.celltocell)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from shapely.geometry import box
from typer.testing import CliRunner

from scanner.cli import app
from scanner.diegrid import DieGrid, estimate_grid
from scanner.inspection.celltocell import cell_comparison, fine_axes, largest_cell_z
from scanner.inspection.dietodie import MosaicGrid, calibrated_z_threshold
from scanner.inspection.dietodie_maps import pair_opening

PERIOD = 11.3  # not a whole number of pixels


def _vias(shape: tuple[int, int], seed: int, phase: tuple[float, float] = (0.0, 0.0)
          ) -> np.ndarray:
    """A field of round vias (bright on a dark ground) on a square lattice, camera noise."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(float)
    u = (xx + phase[1]) % PERIOD - PERIOD / 2
    v = (yy + phase[0]) % PERIOD - PERIOD / 2
    img = 1000.0 + 1500.0 * (np.hypot(u, v) < 3.2)
    img = ndimage.gaussian_filter(img, 1.0)
    return img + np.random.default_rng(seed).normal(0.0, 10.0, shape)


def _seamed(seed: int) -> np.ndarray:
    """A mosaic of via fields whose right part lies 0.4 of a period off (a tile the stage
    placed), with a seam down the middle."""
    img = _vias((600, 600), seed)
    img[:, 300:] = _vias((600, 300), seed + 100, phase=(0.0, 0.4 * PERIOD))
    return img


DEFECTS = {"dark stain": (150, 150, 30), "bright particle": (420, 120, 8),
           "missing vias": (300, 450, 24), "near the seam": (480, 304, 14)}


def _defective(img: np.ndarray) -> np.ndarray:
    out = img.copy()
    yy, xx = np.mgrid[0:img.shape[0], 0:img.shape[1]]
    for kind, (r, c, size) in DEFECTS.items():
        disc = np.hypot(yy - r, xx - c) < size / 2
        if kind == "dark stain":
            out[disc] *= 0.75
        elif kind == "bright particle":
            out[disc] = 3200.0
        else:
            out[disc] = 1000.0
    return out


def _comparison(img: np.ndarray):
    mosaic = MosaicGrid((0.0, 0.0), 1.0, img.shape)
    grid = estimate_grid(img, 1.0, (0.0, 0.0))
    assert grid is not None and abs(grid.pitch_um[0] - PERIOD) < 0.1
    area = box(-0.5, -0.5, img.shape[1] - 0.5, img.shape[0] - 0.5)
    return cell_comparison(mosaic, grid, area), area


def _z(img: np.ndarray) -> np.ndarray:
    cells, area = _comparison(img)
    z = np.zeros(img.shape, np.float32)
    for r0, c0, tile in cells.scored(img, area):
        z[r0:r0 + tile.shape[0], c0:c0 + tile.shape[1]] = pair_opening(tile)
    return z


def test_a_repeat_finer_than_a_die_is_compared_cell_to_cell_and_a_die_grid_is_not():
    assert len(fine_axes(DieGrid((12.0, 12.0), (0.0, 0.0)), 1.0)) == 2
    # a grating: one fine axis; the other's "period" too long to compare
    assert len(fine_axes(DieGrid((8.0, 340.0), (0.0, 0.0)), 1.0)) == 1
    assert fine_axes(DieGrid((256.0, 256.0), (0.0, 0.0)), 1.0) == []  # dies: die-to-die


def test_cell_to_cell_finds_defects_of_a_via_field_and_not_its_seams():
    good = _seamed(0)
    cells, area = _comparison(good)
    reached = largest_cell_z(good, cells, area)
    assert reached is not None
    z_good, zt_good, tiles = reached
    assert tiles >= 9 and z_good < 7.0 and zt_good < 7.0  # the seam is not a defect
    threshold = calibrated_z_threshold(max(z_good, zt_good))
    z = _z(_defective(_seamed(1)))  # another copy: other noise
    edge = int(np.ceil(PERIOD)) + 2  # the part's border is left out
    assert z[:edge].max() == 0 and z[:, -edge:].max() == 0
    found = np.zeros(z.shape, bool)
    yy, xx = np.mgrid[0:z.shape[0], 0:z.shape[1]]
    for kind, (r, c, size) in DEFECTS.items():
        # (the coarsest scale, a Gaussian of 6 px, spreads a difference about 12 px)
        near = np.hypot(yy - r, xx - c) < size / 2 + 16
        assert z[near].max() > threshold, kind
        found |= near
    assert z[~found].max() < threshold


@pytest.mark.slow
def test_a_via_array_scanned_as_a_golden_sample_finds_the_defects_of_a_copy(tmp_path: Path):
    """Through the README's commands: the stage lands tiles a fraction of a period apart on
    a pattern no overlap can register; tiles are placed on its lattice, the model's card
    holds the cell-to-cell calibration, and a defective copy's defects are found."""
    import tifffile

    good = _vias((560, 560), 0)
    bad = _defective(good)
    for seed, (name, img) in enumerate((("good", good), ("bad", bad))):
        tifffile.imwrite(tmp_path / f"{name}.tif", np.clip(img * 16, 0, 65535).astype(np.uint16))
        (tmp_path / f"{name}.yaml").write_text(
            f"sample: {{kind: image, path: {name}.tif, pixel_size_um: 1.0, origin_um: [0, 0]}}\n"
            f"microscope: {{kind: simulated, seed: {seed}, camera: {{width: 256, height: 256, "
            f"pixel_size_um: 1.0}}}}\nscan: {{overlap: 0.15}}\n")
    runner = CliRunner()
    res = runner.invoke(app, ["run", str(tmp_path / "good.yaml"), "--no-inspect", "--out",
                              str(tmp_path / "good_scan")])
    assert res.exit_code == 0, res.output
    reg = json.loads((tmp_path / "good_scan" / "scan.json").read_text())["registration"]
    assert reg["lattice_placed_tiles"] > 0
    res = runner.invoke(app, ["train", "--good", str(tmp_path / "good_scan"), "--out",
                              str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    d2d = json.loads((tmp_path / "m.json").read_text())["die_to_die"]
    assert d2d["mode"] == "cell to cell" and d2d["z_threshold"] < 13
    res = runner.invoke(app, ["run", str(tmp_path / "bad.yaml"), "--model", str(tmp_path / "m"),
                              "--out", str(tmp_path / "bad_scan")])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "bad_scan" / "defects.json").read_text())
    assert doc["header"]["die_to_die"]["mode"] == "cell to cell"
    defects = doc["defects"]
    for kind, (r, c, _) in DEFECTS.items():
        assert any(d["bbox_um"][0] - 4 <= c <= d["bbox_um"][2] + 4
                   and d["bbox_um"][1] - 4 <= r <= d["bbox_um"][3] + 4 for d in defects), kind
    assert len(defects) <= len(DEFECTS) + 1


def test_a_grating_is_a_layout_uniform_along_its_lines():
    yy, xx = np.mgrid[0:400, 0:400]
    rng = np.random.default_rng(0)
    grating = 1000.0 + 500.0 * np.sin(2 * np.pi * xx / 9.4) + rng.normal(0, 5, xx.shape)
    grid = estimate_grid(grating, 1.0, (0.0, 0.0))
    assert grid is not None and grid.uniform_axes == (False, True)
    assert abs(grid.pitch_um[0] - 9.4) < 0.05 and grid.rotation_deg == 0.0
    # compared along both axes: across the lines at their period, along them anywhere
    axes = fine_axes(grid, 1.0)
    assert len(axes) == 2 and abs(axes[0][1] - 9.4) < 0.05 and axes[1][1] == 0.0
    # a smoothly shaded image does not change much along either axis: no layout
    assert estimate_grid(1000.0 + 0.5 * yy + 0.2 * xx, 1.0, (0.0, 0.0)) is None


def test_tiles_of_a_grating_are_placed_on_its_lines_period_and_keep_the_stage_along_them(
        tmp_path: Path):
    from conftest import scan_of_image

    from scanner.tilestore import read_tiles_csv

    yy, xx = np.mgrid[0:640, 0:640]
    folder = scan_of_image(tmp_path, 0.5 + 0.3 * np.sin(2 * np.pi * xx / 7.0), camera_px=256,
                           overlap=0.15, seed=1)
    reg = json.loads((folder / "scan.json").read_text())["registration"]
    # (an overlap across the lines may pass as an edge measured across it: its tiles are
    # placed by the solve, the others from them)
    assert reg["lattice_placed_tiles"] > 0 and reg["unplaced_tiles"] == []
    records = [r for r in read_tiles_csv(folder) if r.status == "ok"]
    dx = np.array([r.x_reg_um - r.x_true_um for r in records])
    assert np.abs((dx - dx[0]) / 7.0 - np.round((dx - dx[0]) / 7.0)).max() * 7.0 < 0.5
    # along the lines nothing is measured: the stage's place is kept
    np.testing.assert_allclose([r.y_reg_um for r in records], [r.y_um for r in records],
                               atol=1e-3)


def test_a_good_image_file_of_a_fine_repeat_records_its_cells_not_a_golden_image():
    """A good image file of a repeat finer than a die (a 30 px face array) was kept as the
    model's golden image: die-to-die found no die in it, and inspection then compared files
    with the golden image within +-3 px, where the array's own edges hid a 27 % scratch (16
    of 20 painted defects found; cell to cell, as a good scan of it is compared: 19)."""
    from scanner.inspection.goodimages import good_image_die_to_die

    found = good_image_die_to_die(_vias((400, 400), 0) / 2500.0, 1.0)
    assert found is not None and found["mode"] == "cell to cell"
    assert found["found_grid_repeats"] is True and found["good_max_z"] < 7.0


@pytest.mark.slow
def test_image_files_of_a_via_array_are_compared_cell_to_cell(tmp_path: Path):
    """Through the README's commands with image files only: a model built from one good file
    of a via array compares a defective file cell to cell (not with a golden image)."""
    import tifffile

    good = _vias((560, 560), 0)
    for name, img in (("good", good), ("bad", _defective(_vias((560, 560), 1)))):
        tifffile.imwrite(tmp_path / f"{name}.tif", np.clip(img * 16, 0, 65535).astype(np.uint16))
    runner = CliRunner()
    res = runner.invoke(app, ["train", "--good", str(tmp_path / "good.tif"), "--out",
                              str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    card = json.loads((tmp_path / "m.json").read_text())
    assert "golden" not in card and card["die_to_die"]["mode"] == "cell to cell"
    res = runner.invoke(app, ["inspect", str(tmp_path / "bad.tif"), str(tmp_path / "good.tif"),
                              "--model", str(tmp_path / "m"), "--out", str(tmp_path / "files")])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "files" / "defects.json").read_text())
    assert doc["header"]["die_to_die"]["images_compared"] == 2
    assert doc["images"]["good.tif"] == []
    defects = doc["images"]["bad.tif"]
    for kind, (r, c, _) in DEFECTS.items():
        assert any(d["bbox_um"][0] - 4 <= c <= d["bbox_um"][2] + 4
                   and d["bbox_um"][1] - 4 <= r <= d["bbox_um"][3] + 4 for d in defects), kind
    assert len(defects) <= len(DEFECTS) + 1
