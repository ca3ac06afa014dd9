"""End to end: an image sample scanned with 5 µm stage repeatability, registered and fused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from skimage.registration import phase_cross_correlation
from typer.testing import CliRunner

from scanner.cli import app
from scanner.ngff import open_mosaic
from scanner.pipeline import run_scan
from scanner.recipe import load_recipe
from scanner.tilestore import read_tiles_csv

pytestmark = pytest.mark.slow
REPEAT_UM = 5.0


def test_registered_mosaic_matches_source(write_recipe, coupon_tif: Path, tmp_path: Path):
    recipe = load_recipe(write_recipe(
        # the scanned region stays inside the image: tiles that see its straight border are
        # registered along the border only as well as the stage (see the notes)
        "sample: {kind: image, path: coupon.tif, pixel_size_um: 1.0, origin_um: [1000, 2000],"
        " region_px: [60, 60, 780, 1080]}\n"
        "microscope: {kind: simulated, camera: {width: 256, height: 256, pixel_size_um: 1.0,"
        f" vignetting: 0.12}}, stage: {{repeatability_um: {REPEAT_UM}}}}}\n"
        "scan: {overlap: 0.2}\n"
    ))
    result = run_scan(recipe, tmp_path / "scan")
    folder = result.folder
    records = read_tiles_csv(folder)
    reg = np.array([(r.x_reg_um, r.y_reg_um) for r in records])
    true = np.array([(r.x_true_um, r.y_true_um) for r in records])
    rep = np.array([(r.x_um, r.y_um) for r in records])
    assert np.all(np.isfinite(reg))

    # relative placement (what the images can tell): sub-pixel against the truth
    err = reg - true
    offset = err.mean(axis=0)
    rel = np.hypot(*(err - offset).T)
    assert np.sqrt(np.mean(rel**2)) <= 0.3
    assert rel.max() <= 1.0
    # the common offset is the mean of the stage errors (no image can tell it)
    assert np.hypot(*offset) < 3 * REPEAT_UM / np.sqrt(len(records))
    stage_rel = np.hypot(*((rep - true) - (rep - true).mean(axis=0)).T)
    assert np.sqrt(np.mean(stage_rel**2)) > 10 * np.sqrt(np.mean(rel**2))

    scan = json.loads((folder / "scan.json").read_text())
    timings = scan["timings"]["stitch"]
    assert {"register_s", "flatfield_s", "fuse_s"} <= timings.keys()
    assert scan["registration"]["n_pairs_used"] >= 0.9 * scan["registration"]["n_pairs"]
    assert scan["flatfield"]["path"] == "flatfield.npy"
    # fitted to the overlaps, under which the overlapping tiles agree best
    assert scan["flatfield"]["model"].startswith("overlaps")
    assert scan["flatfield"]["overlap_mismatch"][scan["flatfield"]["model"]] == min(
        scan["flatfield"]["overlap_mismatch"].values())
    ff = np.load(folder / "flatfield.npy")
    assert ff.shape == (256, 256)
    corners = np.mean([ff[:20, :20].mean(), ff[:20, -20:].mean(), ff[-20:, :20].mean(),
                       ff[-20:, -20:].mean()])
    assert corners < 0.97 * ff[118:138, 118:138].mean()  # the 12 % corner falloff is seen

    # the mosaic is the source, moved by the common offset only, everywhere
    source = tifffile.imread(coupon_tif).astype(float)
    levels, transforms = open_mosaic(folder / "mosaic.ome.zarr")
    ty, tx = transforms[0][1]["translation"]
    mosaic = levels[0][:].astype(float)
    shifts, nccs = [], []
    for r0 in range(100, mosaic.shape[0] - 250, 150):
        for c0 in range(100, mosaic.shape[1] - 250, 150):
            sr, sc = round(ty + r0 - 2000), round(tx + c0 - 1000)
            if sr < 0 or sc < 0 or sr + 128 > source.shape[0] or sc + 128 > source.shape[1]:
                continue
            m = mosaic[r0:r0 + 128, c0:c0 + 128]
            s = source[sr:sr + 128, sc:sc + 128]
            shift, _, _ = phase_cross_correlation(s, m, upsample_factor=20)
            # the window's own rounding of the translation is a known part of the shift
            shifts.append(shift - [ty + r0 - 2000 - sr, tx + c0 - 1000 - sc])
            a, b = s - s.mean(), m - m.mean()
            nccs.append((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))
    shifts = np.array(shifts)
    assert len(shifts) >= 12
    spread = np.hypot(*(shifts - np.median(shifts, axis=0)).T)
    assert np.percentile(spread, 90) < 0.3  # no tile off by a sub-pixel amount, no seam shift
    assert min(nccs) > 0.97

    # flat-fielded: the mosaic's brightness matches the source's without vignetting ripple
    rows = mosaic[50:-50, 50:-50]
    assert rows.std(axis=0).std() < 0.2 * rows.std()

    # `waferscope stitch` re-runs the stage on the folder
    cli = CliRunner().invoke(app, ["stitch", str(folder)])
    assert cli.exit_code == 0, cli.output
    again = read_tiles_csv(folder)
    np.testing.assert_allclose([(r.x_reg_um, r.y_reg_um) for r in again], reg, atol=1e-3)


def test_wafer_registration_textured_subpixel_bare_keeps_stage(write_recipe, tmp_path: Path):
    """A small simulated wafer: dies, scribe lines, rim, bare areas; 5 µm repeatability."""
    from scanner.stitching.registration.accuracy import position_accuracy
    from scanner.stitching.registration.scan import CameraGeometry, register_tiles
    from scanner.tilestore import open_tiles

    recipe = load_recipe(write_recipe(
        "sample: {kind: wafer, diameter_mm: 4, orientation: notch, edge_exclusion_mm: 0.1,"
        " die_pitch_mm: [1, 1], die_origin_mm: [-0.5, -0.5], scribe_width_um: 40,"
        " defects: {count: 5, seed: 2}}\n"
        "microscope: {kind: simulated, camera: {width: 256, height: 256, pixel_size_um: 2.0},"
        f" stage: {{repeatability_um: {REPEAT_UM}}}, seed: 4}}\n"
        "scan: {overlap: 0.15}\n"
        "stitch: {flatfield: false}\n"
    ))
    folder = run_scan(recipe, tmp_path / "wafer").folder
    records = [r for r in read_tiles_csv(folder) if r.status == "ok"]
    centres, summary, _, classes = register_tiles(open_tiles(folder), records,
                                                  CameraGeometry(2.0), REPEAT_UM)
    true = np.array([(r.x_true_um, r.y_true_um) for r in records])
    stage = np.array([(r.x_um, r.y_um) for r in records])
    acc = position_accuracy(centres, true, stage, classes, 2.0)
    assert acc.counts["textured"] >= 0.3 * len(records)
    assert acc.rms_px["textured"] <= 0.3 and acc.worst_px["textured"] <= 1.0
    # bare tiles keep their stage position exactly; tiles fixed across an edge only gain
    assert acc.featureless_worse_than_stage == 0
    if acc.counts["partial"]:
        assert acc.rms_px["partial"] <= acc.stage_rms_px["partial"]
    # what the stitch stage wrote is the same registration
    reg = np.array([(r.x_reg_um, r.y_reg_um) for r in records])
    np.testing.assert_allclose(reg, centres, atol=1e-3)  # csv keeps 0.1 nm
    scan = json.loads((folder / "scan.json").read_text())
    assert scan["registration"]["n_textured_tiles"] == acc.counts["textured"]


def test_tiles_whose_overlaps_match_only_ambiguously_are_placed_on_the_patterns_lattice(
        tmp_path: Path, caplog):
    # a grating finer than the stage's error: every overlap matches at several periods, so no
    # pair measures its tiles' offset; each tile is placed from its neighbours on the
    # pattern's lattice nearest where the stage landed: off by whole periods at most, never a
    # fraction (left where the stage landed, tiles 3-6 um apart showed the pattern twice,
    # out of phase, along every seam)
    import logging

    from conftest import scan_of_image

    yy, xx = np.mgrid[0:640, 0:640]
    grating = 0.5 + 0.3 * np.sin(2 * np.pi * xx / 7.0) * np.sin(2 * np.pi * yy / 7.0)
    with caplog.at_level(logging.WARNING):
        folder = scan_of_image(tmp_path, grating, camera_px=256, overlap=0.15, seed=1)
    reg = json.loads((folder / "scan.json").read_text())["registration"]
    assert reg["n_pairs_used"] == 0
    assert reg["lattice_placed_tiles"] == reg["n_tiles"] and reg["unplaced_tiles"] == []
    assert not any("matched no neighbour unambiguously" in m for m in caplog.messages)
    records = [r for r in read_tiles_csv(folder) if r.status == "ok"]
    error = np.array([(r.x_reg_um - r.x_true_um, r.y_reg_um - r.y_true_um) for r in records])
    landed = np.array([(r.x_um - r.x_true_um, r.y_um - r.y_true_um) for r in records])
    # every tile in phase with the first (the pattern repeats every 3.5 um along a diagonal
    # and 7 um along the axes: a whole translation is a multiple of 3.5 um along each axis)
    relative = error - error[0]
    assert np.abs(relative / 3.5 - np.round(relative / 3.5)).max() * 3.5 < 0.5, relative
    # the stage left tiles out of phase
    off = landed - landed[0]
    assert (np.abs(off / 3.5 - np.round(off / 3.5)) * 3.5).max() > 1.0


@pytest.mark.parametrize("blur_px", [0.7, 0.0])
def test_a_fine_line_grating_is_stitched_with_its_lines_in_phase(tmp_path: Path,
                                                                 blur_px: float):
    # bright lines 3 um wide every 6 um along y (PV fingers, metal lines), finer than the
    # stage's error. Seen through optics (blur 0.7 px), each neighbour along x differed by the
    # lines' contrast, which was taken for noise: the overlaps were called blank and the tiles
    # left where the stage landed, up to half a period apart (on a 1.5 mm grating, 6 false
    # defects along a seam). Sharp, the few pairs that the part's edge let the solve keep made
    # groups each left where its stages landed, 0.6 um apart. Every tile now lies whole
    # periods from the truth
    from conftest import scan_of_image
    from scipy import ndimage

    xx = np.arange(1300)
    lines = ndimage.gaussian_filter1d(np.where(xx % 6 < 3, 0.7, 0.12), blur_px) if blur_px \
        else np.where(xx % 6 < 3, 0.7, 0.12)
    folder = scan_of_image(tmp_path, np.tile(lines, (1300, 1)), camera_px=512, seed=1)
    records = [r for r in read_tiles_csv(folder) if r.status == "ok"]
    error = np.array([r.x_reg_um - r.x_true_um for r in records])
    landed = np.array([r.x_um - r.x_true_um for r in records])
    relative = error - error[0]
    assert np.abs((relative + 3.0) % 6.0 - 3.0).max() < 0.2, relative
    off = landed - landed[0]  # the stage alone left them out of phase
    assert np.abs((off + 3.0) % 6.0 - 3.0).max() > 1.0
    reg = json.loads((folder / "scan.json").read_text())["registration"]
    assert reg["n_blank_pairs"] == 0 and reg["unplaced_tiles"] == []
