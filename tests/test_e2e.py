"""End-to-end scans on the simulated microscope, checked against the simulator's ground truth."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from skimage.registration import phase_cross_correlation
from typer.testing import CliRunner

from scanner.cli import app
from scanner.ngff import open_mosaic
from scanner.pipeline import run_scan
from scanner.recipe import load_recipe

runner = CliRunner()
pytestmark = pytest.mark.slow


def _rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "tiles.csv", newline="") as f:
        return list(csv.DictReader(f))


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def test_image_sample_mosaic_matches_source(write_recipe, coupon_tif: Path, tmp_path: Path):
    repeat = 2.0
    recipe = load_recipe(write_recipe(
        "sample: {kind: image, path: coupon.tif, pixel_size_um: 1.0, origin_um: [1000, 2000]}\n"
        "microscope: {kind: simulated, camera: {width: 256, height: 256, pixel_size_um: 1.0},"
        f" stage: {{repeatability_um: {repeat}}}}}\n"
        "scan: {overlap: 0.15}\n"
    ))
    result = run_scan(recipe, tmp_path / "scan")
    assert result.status == "complete"
    folder = result.folder
    rows = _rows(folder)
    assert len(rows) == result.n_tiles == result.n_acquired >= 20
    source = tifffile.imread(coupon_tif).astype(float)

    # every tile shows the source where the simulator says the stage really was
    tiles = zarr.open_array(folder / "tiles.zarr", mode="r")
    errors = []
    for row in rows:
        tile = tiles[int(row["index"])].astype(float)
        xt, yt = float(row["x_true_um"]) - 1000, float(row["y_true_um"]) - 2000
        # tile pixel (r, c) images stage (x - 127.5 + c, y - 127.5 + r)
        c0, r0 = round(xt - 127.5), round(yt - 127.5)
        if c0 < 0 or r0 < 0 or c0 + 256 > source.shape[1] or r0 + 256 > source.shape[0]:
            continue  # edge tiles see past the image
        crop = source[r0:r0 + 256, c0:c0 + 256]
        shift, _, _ = phase_cross_correlation(crop, tile, upsample_factor=10)
        errors.append(np.hypot(*shift))
        assert _ncc(crop, tile) > 0.95
        # the reported position is off from the truth by the repeatability error only
        dx = float(row["x_um"]) - float(row["x_true_um"])
        dy = float(row["y_um"]) - float(row["y_true_um"])
        assert np.hypot(dx, dy) < 6 * repeat
    assert errors and max(errors) < 0.75  # sub-pixel: rounding of the true position only

    # the mosaic sits at the right stage coordinates, within the stage's repeatability
    levels, transforms = open_mosaic(folder / "mosaic.ome.zarr")
    scale = transforms[0][0]["scale"]
    ty, tx = transforms[0][1]["translation"]
    assert scale == [1.0, 1.0]
    mosaic = levels[0][:].astype(float)
    # mosaic pixel (r, c) is at stage (tx + c, ty + r) = source pixel (ty + r - 2000, tx + c - 1000)
    r_off, c_off = round(ty - 2000), round(tx - 1000)
    assert abs(r_off) <= 256 and abs(c_off) <= 256
    rs, cs = max(0, -r_off), max(0, -c_off)
    h = min(mosaic.shape[0] - rs, source.shape[0] - (rs + r_off)) - 20
    w = min(mosaic.shape[1] - cs, source.shape[1] - (cs + c_off)) - 20
    m = mosaic[rs + 10: rs + h, cs + 10: cs + w]
    s = source[rs + r_off + 10: rs + r_off + h, cs + c_off + 10: cs + c_off + w]
    shift, _, _ = phase_cross_correlation(s, m, upsample_factor=10)
    assert np.hypot(*shift) <= 2 * repeat
    assert _ncc(s, m) > 0.9

    scan = json.loads((folder / "scan.json").read_text())
    assert scan["status"] == "complete"
    assert scan["timings"]["acquire"]["hardware_s"] > 0
    assert scan["recipe"]["sample"]["path"] == str(coupon_tif.resolve())
    assert "pymmcore-plus" in scan["versions"]


def test_wafer_scan_end_to_end(write_recipe, tmp_path: Path):
    path = write_recipe(
        "sample: {kind: wafer, diameter_mm: 12, edge_exclusion_mm: 1, die_pitch_mm: [2, 2],"
        " orientation: flat, flat_length_mm: 4, center_um: [3000, -2000],"
        " defects: {count: 8, seed: 5}}\n"
        "microscope: {kind: simulated, camera: {width: 512, height: 512, pixel_size_um: 5.0},"
        " stage: {repeatability_um: 3.0}}\n"
    )
    out = tmp_path / "wafer"
    result = runner.invoke(app, ["run", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert str(out.resolve()) in result.stdout
    assert "mosaic.ome.zarr" in result.stdout

    rows = _rows(out)
    scan = json.loads((out / "scan.json").read_text())
    assert scan["status"] == "complete"
    assert len(rows) == scan["plan"]["n_tiles"] == scan["acquired_tiles"]
    assert all(r["status"] == "ok" for r in rows)
    # serpentine order: each row is swept in one go, in the opposite direction to the last
    rc = np.array([(int(r["row"]), int(r["col"])) for r in rows])
    row_changes = np.flatnonzero(np.diff(rc[:, 0]) != 0)
    assert np.all(np.abs(np.diff(rc[:, 0])) <= 1)
    assert len(np.unique(rc[:, 0])) == len(row_changes) + 1  # no row visited twice
    directions = [np.sign(np.diff(seg[:, 1])).mean() for seg in np.split(rc, row_changes + 1)
                  if len(seg) > 1]
    assert all(np.abs(d) == 1 for d in directions)
    assert all(a == -b for a, b in zip(directions, directions[1:], strict=False))

    truth = json.loads((out / "truth.json").read_text())
    assert len(truth["defects"]) == 8
    for d in truth["defects"]:
        assert np.hypot(d["x_um"] - 3000, d["y_um"] + 2000) < 5000  # inside the usable area

    levels, transforms = open_mosaic(out / "mosaic.ome.zarr")
    mosaic = levels[0][:]
    ty, tx = transforms[0][1]["translation"]
    p = transforms[0][0]["scale"][0]
    assert p == 5.0
    assert len(levels) >= 2

    def at(x_um: float, y_um: float) -> float:
        r, c = round((y_um - ty) / p), round((x_um - tx) / p)
        return float(mosaic[r - 3:r + 4, c - 3:c + 4].mean())

    # the wafer is brighter than the chuck around it, at the right place on the stage
    inside = np.mean([at(3000 + dx, -2000 + dy) for dx, dy in [(-2000, 0), (2000, 0), (0, -2000)]])
    outside = np.mean([at(3000 - 5800, -2000 - 5800), at(3000 + 5800, -2000 - 5800)])
    assert inside > 2 * outside

    # the mosaic agrees with the simulator's noiseless rendering of the same area
    from devices.sample_factory import sample_for_recipe

    sample = sample_for_recipe(load_recipe(path).sample)
    rows_, cols_ = mosaic.shape
    truth_img = sample.render(tx, ty, (rows_, cols_), p)
    covered = mosaic > 0
    assert _ncc(mosaic[covered].astype(float), truth_img[covered].astype(float)) > 0.9


def test_stage_progress_is_signalled(tmp_path: Path) -> None:
    # the CLI's progress bars are slots of these psygnal signals; so can anyone's be
    from conftest import SMALL_WAFER

    from scanner.events import StageEvents
    from scanner.recipe import parse_recipe

    events = StageEvents()
    seen: list[tuple] = []
    events.stageStarted.connect(lambda stage, total: seen.append(("start", stage, total)))
    events.stageAdvanced.connect(lambda stage, n: seen.append(("step", stage, n)))
    events.stageFinished.connect(lambda stage: seen.append(("end", stage)))
    result = run_scan(parse_recipe(SMALL_WAFER, tmp_path, "w"), tmp_path / "w", events=events)
    assert result.status == "complete"
    starts = [s for s in seen if s[0] == "start"]
    assert ("start", "acquire", result.n_tiles) in starts and len(starts) >= 2
    assert sum(s[2] for s in seen if s[:2] == ("step", "acquire")) == result.n_tiles
    for stage in {s[1] for s in starts}:  # each stage that starts also ends, after its steps
        assert seen.index(("end", stage)) > max(i for i, s in enumerate(seen) if s[1] == stage
                                                 and s[0] != "end")
