"""Tiled inference: no seams, streaming over a chunked mosaic, geometry, masking, CLI on images."""

from __future__ import annotations

import csv
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile
import torch
import zarr
from scipy import ndimage
from shapely.geometry import box
from typer.testing import CliRunner

from models import InspectionModel
from models.network import InspectionNet
from scanner.cli import app
from scanner.defectlist import read_defects
from scanner.inspection.maps import infer_image, infer_mosaic
from scanner.ngff import create_multiscale, finish_multiscale, open_mosaic

runner = CliRunner()


@pytest.fixture(scope="module")
def net_model() -> InspectionModel:
    """The real network, randomly initialised (seeded): inference maths, not trained results."""
    torch.manual_seed(0)
    net = InspectionNet()
    return InspectionModel(net, {"pixel_size_um": 1.0, "threshold": 0.5})


def _texture(shape, seed=0):
    rng = np.random.default_rng(seed)
    img = ndimage.gaussian_filter(rng.random(shape), 2.0)
    return (img * 3000 + 1000).astype(np.uint16)


def _one_window(model, img: np.ndarray, level: float) -> dict[str, np.ndarray]:
    """The whole image as one window, with the same mirrored context as tiled inference."""
    ctx = 96
    h, w = img.shape
    pad = np.pad(img.astype(np.float32), ((ctx, ctx + (-h) % 32), (ctx, ctx + (-w) % 32)),
                 mode="reflect")
    out = model.predict(model.normalize(pad, level)[None])
    c = ctx // 4
    mh, mw = -(-h // 4), -(-w // 4)
    return {k: out[k][0, c:c + mh, c:c + mw] for k in ("anomaly", "roughness", "uncertainty")}


@pytest.mark.slow
def test_tiled_inference_has_no_seams(net_model):
    img = _texture((700, 900))
    maps = infer_image(net_model, img, core_px=256)  # 3 x 4 windows with blended borders
    assert maps.stats.windows == 12
    ref = _one_window(net_model, img, maps.stats.extra["level"])
    for name in ("anomaly", "roughness", "uncertainty"):
        assert maps.maps[name].shape == (175, 225)
        scale = float(np.abs(ref[name]).max())
        np.testing.assert_allclose(maps.maps[name], ref[name], atol=5e-3 * scale, rtol=0)


def _write_mosaic(path: Path, img: np.ndarray, pixel_um: float, origin: tuple[float, float],
                  chunk: int = 256) -> None:
    tmp, arrays = create_multiscale(path, img.shape, chunk=chunk, dtype=img.dtype)
    arrays[0][:] = img
    from scanner.ngff import build_pyramid

    build_pyramid(arrays, chunk)
    finish_multiscale(tmp, path, len(arrays), pixel_um, origin, "mosaic")


@pytest.mark.slow
def test_streaming_over_a_chunked_mosaic_writes_ome_maps(net_model, tmp_path):
    img = _texture((700, 1100), seed=1)
    mosaic = tmp_path / "mosaic.ome.zarr"
    _write_mosaic(mosaic, img, 1.0, (5000.0, -2000.0))
    maps = infer_mosaic(net_model, mosaic, tmp_path, core_px=256)
    ref = infer_image(net_model, img, core_px=256)
    for name, file in (("anomaly", "anomaly.ome.zarr"), ("roughness", "roughness.ome.zarr"),
                       ("uncertainty", "uncertainty.ome.zarr")):
        levels, transforms = open_mosaic(tmp_path / file)
        assert levels[0].shape == (175, 275)
        assert levels[0].chunks == (56, 56)  # core of 224 px: 1100 px in 5 even windows
        assert len(levels) == 2  # 275 > 256: one coarser level
        scale, trans = transforms[0][0]["scale"], transforms[0][1]["translation"]
        assert scale == [4.0, 4.0]
        # map pixel (0, 0) summarises mosaic pixels 0..3: its centre is 1.5 px in
        assert trans == pytest.approx([-2000 + 1.5, 5000 + 1.5])
        np.testing.assert_allclose(levels[0][:], ref.maps[name], atol=1e-4)
    assert maps.stats.windows == 4 * 5


def test_outside_the_sample_is_not_computed_and_zero(net_model, tmp_path):
    img = _texture((1024, 1024), seed=2)
    mosaic = tmp_path / "mosaic.ome.zarr"
    _write_mosaic(mosaic, img, 1.0, (0.0, 0.0))
    poly = box(0, 0, 400, 1023)  # the left part only
    maps = infer_mosaic(net_model, mosaic, tmp_path, polygon=poly, edge_um=0, core_px=256)
    assert maps.stats.skipped > 0
    an = np.asarray(maps.maps["anomaly"])
    assert np.all(an[:, 102:] == 0)  # map column 102 is centred at 409.5 µm
    assert np.all(an[:, :99] > 0)


def test_a_model_that_never_saw_a_sample_edge_leaves_a_band_along_it(tmp_path):
    # a model built from image files only: its features at the edge reach onto the chuck,
    # which its good images never showed (scanner.inspection.inspect.EDGE_CONTEXT_PX)
    from scanner.inspection.inspect import EDGE_CONTEXT_PX, inspect_mosaic

    torch.manual_seed(0)
    mosaic = tmp_path / "mosaic.ome.zarr"
    _write_mosaic(mosaic, _texture((1024, 1024), seed=5), 1.0, (0.0, 0.0))
    poly = box(0, 0, 1023, 1023)
    bands = {}
    for seen in (True, False, None):
        card = {"pixel_size_um": 1.0, "threshold": 0.5}
        if seen is not None:
            card["sample_edge_seen"] = seen
        out = tmp_path / f"out-{seen}"
        inspect_mosaic(mosaic, out, model=InspectionModel(InspectionNet(), card), threshold=0.5,
                       polygon=poly, scan={})
        header, _ = read_defects(out)
        bands[seen] = header["edge_band_um"]
        an = np.asarray(zarr.open_array(out / "anomaly.ome.zarr" / "0")[:])
        # map pixel i is centred at 4 i + 1.5 um: the band's pixels are 0, the rest computed
        inner = slice(14, an.shape[0] - 14)
        assert np.all(an[inner, inner] > 0)
        assert np.all(an[:11, :] == 0) == (seen is False)
    assert bands == {True: 0.0, False: float(EDGE_CONTEXT_PX), None: 0.0}


def test_mosaic_pixels_no_tile_covered_are_not_inspected(net_model, tmp_path):
    # the stage landed the last tile row short: a strip of the mosaic is 0 (no tile there)
    from scanner.inspection.inspect import inspect_mosaic

    img = _texture((1024, 1024), seed=4)
    img[900:, 300:800] = 0
    mosaic = tmp_path / "mosaic.ome.zarr"
    _write_mosaic(mosaic, img, 1.0, (0.0, 0.0))
    maps = infer_mosaic(net_model, mosaic, tmp_path, core_px=256)
    an = np.asarray(maps.maps["anomaly"])
    assert np.all(an[225:, 75:200] == 0)  # map pixels 4i..4i+3: wholly in the strip
    assert np.all(an[225:, 201:] > 0) and np.all(an[:224] > 0)
    # the defect list says how much of the usable area was not inspected, and finds nothing
    # there (read as data, the black strip scored as anything the network had not seen)
    res = inspect_mosaic(mosaic, tmp_path / "out", model=net_model, threshold=0.5,
                         polygon=box(0, 0, 1023, 1023), scan={})
    header, defects = read_defects(tmp_path / "out")
    assert header["not_scanned_mm2"] == pytest.approx(0.124 * 0.5, rel=0.05)
    assert not [d for d in defects if d.y_um > 905 and 305 < d.x_um < 795]
    assert res.n_defects == len(defects)


def test_reflectance_at_map_resolution_from_the_pyramid_or_the_model_grid(net_model, tmp_path):
    import dataclasses

    from models.thresholds import map_resolution
    from scanner.inspection.maps import reflectance_at_map

    img = _texture((1100, 1030), seed=5)
    mosaic = tmp_path / "mosaic.ome.zarr"
    _write_mosaic(mosaic, img, 1.0, (0.0, 0.0))
    maps = infer_mosaic(net_model, mosaic, tmp_path, core_px=256)
    level = maps.stats.extra["level"]
    want = map_resolution(img.astype(np.float32) / level, 4, maps.maps["anomaly"].shape)
    from_pyramid = reflectance_at_map(maps)  # level 2 of the mosaic: 4 x 4 means
    from_grid = reflectance_at_map(dataclasses.replace(maps, source_levels=None), chunk_rows=64)
    assert from_pyramid.shape == from_grid.shape == want.shape
    # the pyramid is stored in the mosaic's dtype (rounded 4 x 4 means); edges are padded
    np.testing.assert_allclose(from_pyramid[:-1, :-1], want[:-1, :-1], atol=1.5 / level)
    np.testing.assert_allclose(from_grid, want, rtol=1e-5)


def test_resampling_when_the_mosaic_pixel_differs(net_model, tmp_path):
    img = _texture((800, 600), seed=3)
    mosaic = tmp_path / "mosaic.ome.zarr"
    _write_mosaic(mosaic, img, 0.5, (10.0, 20.0))  # twice the model's resolution
    maps = infer_mosaic(net_model, mosaic, tmp_path, core_px=256)
    levels, transforms = open_mosaic(tmp_path / "anomaly.ome.zarr")
    assert levels[0].shape == (100, 75)  # 400 x 300 model pixels of 1 µm, stride 4
    assert transforms[0][0]["scale"] == [4.0, 4.0]
    assert transforms[0][1]["translation"] == pytest.approx([21.5, 11.5])
    assert maps.reader.shape == (400, 300)


def test_cli_inspect_image_folder_writes_scores(tmp_path):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    tex = _texture((300, 400), seed=4)
    tifffile.imwrite(folder / "a16.tif", tex)
    rgb = np.stack([tex >> 4] * 3, axis=-1).astype(np.uint8)
    iio.imwrite(folder / "sub" / "b.png", rgb)
    iio.imwrite(folder / "c.jpg", (tex >> 4).astype(np.uint8)[:250, :333])
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    res = runner.invoke(app, ["inspect", str(folder), "--out", str(out)])
    assert res.exit_code == 0, res.output
    with open(out / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["image"] for r in rows) == ["a16.tif", "c.jpg", "sub/b.png"]
    assert all(np.isfinite(float(r["score"])) for r in rows)
    with open(out / "defects.csv", newline="") as f:
        assert csv.DictReader(f).fieldnames[:2] == ["image", "id"]
    assert (out / "defects.json").is_file()
    import json

    from models import load_model

    header = json.loads((out / "defects.json").read_text())["header"]
    assert header["threshold_source"] == "model card"  # plain images: the pooled threshold
    # the threshold of a kind of sample, when asked for
    res = runner.invoke(app, ["inspect", str(folder / "a16.tif"), "--out", str(tmp_path / "w"),
                              "--sample-kind", "wafer"])
    assert res.exit_code == 0, res.output
    card = load_model(None).card
    header = json.loads((tmp_path / "w" / "defects.json").read_text())["header"]
    want = card.get("thresholds_by_sample_kind", {}).get("wafer", card["threshold"])
    assert header["threshold"] == pytest.approx(want)


def test_cli_inspect_bad_inputs_exit_2(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    for args in (["inspect", str(bad)], ["inspect", str(tmp_path / "missing.tif")],
                 ["inspect", str(tmp_path), "--model", str(tmp_path / "nope.safetensors")]):
        res = runner.invoke(app, [*args, "--out", str(tmp_path / "o")])
        assert res.exit_code == 2, (args, res.output)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert runner.invoke(app, ["inspect", str(empty)]).exit_code == 2
    res = runner.invoke(app, ["inspect", str(empty), "--sample-kind", "moon"])
    assert res.exit_code == 2 and "--sample-kind" in res.output
    # two mosaics (or a mosaic and images) at once: named, not "no image files found"
    for name in ("a", "c"):
        (tmp_path / name / "mosaic.ome.zarr").mkdir(parents=True)
    res = runner.invoke(app, ["inspect", str(tmp_path / "a" / "mosaic.ome.zarr"),
                              str(tmp_path / "c" / "mosaic.ome.zarr"), "--out",
                              str(tmp_path / "o2")])
    assert res.exit_code == 2 and "batch" in res.output and "no image files" not in res.output
    assert not (tmp_path / "o2").exists()


def test_images_of_the_same_name_in_two_lots_keep_their_own_results(tmp_path):
    # results are filed by image name: two lots holding the same file names were filed under
    # one name, and the second image's (empty) defect list replaced the first one's
    import json

    from scanner.inspection.images import list_images

    tex = _texture((256, 256), seed=4)
    bad = tex.copy()
    bad[100:130, 100:130] = 0  # a dark square: defects in lot A only
    for lot, img in (("lotA", bad), ("lotB", tex)):
        (tmp_path / "dup" / lot).mkdir(parents=True)
        tifffile.imwrite(tmp_path / "dup" / lot / "img001.tif", img)
    targets = [tmp_path / "dup" / "lotA", tmp_path / "dup" / "lotB"]
    assert [n for n, _ in list_images(targets)] == ["lotA/img001.tif", "lotB/img001.tif"]
    # one folder: names stay relative to it, as before
    assert [n for n, _ in list_images(targets[:1])] == ["img001.tif"]
    out = tmp_path / "out"
    res = runner.invoke(app, ["inspect", *map(str, reversed(targets)), "--out", str(out)])
    assert res.exit_code == 0, res.output
    images = json.loads((out / "defects.json").read_text())["images"]
    assert sorted(images) == ["lotA/img001.tif", "lotB/img001.tif"]
    assert images["lotA/img001.tif"] and not images["lotB/img001.tif"]


def test_inspect_out_into_another_scan_or_a_mosaic_is_refused(tmp_path):
    from scanner.errors import UserError
    from scanner.inspection.inspect import inspect_target

    other = tmp_path / "other_scan"
    other.mkdir()
    (other / "scan.json").write_text("{}")
    (other / "defects.json").write_text("{}")
    image = tmp_path / "a.tif"
    tifffile.imwrite(image, _texture((64, 64)))
    with pytest.raises(UserError, match="another scan folder"):
        inspect_target([image], other)
    mosaic = tmp_path / "m.ome.zarr"
    mosaic.mkdir()
    with pytest.raises(UserError, match="inside the mosaic"):
        inspect_target([mosaic], mosaic / "maps")
    assert (other / "defects.json").read_text() == "{}"
    res = runner.invoke(app, ["inspect", str(image), "--out", str(other)])
    assert res.exit_code == 2 and "--out" in res.output


def test_sample_kinds_of_the_cli_are_the_recipes() -> None:
    from scanner import recipe
    from scanner.cli import SAMPLE_KINDS

    kinds = {m.model_fields["kind"].default for m in
             (recipe.WaferSample, recipe.PVCellSample, recipe.RectangleSample,
              recipe.ImageSample)}
    assert set(SAMPLE_KINDS) == kinds
def test_a_model_trained_over_a_pixel_range_runs_at_the_source_pixel(net_model):
    from scanner.inspection.maps import grid_pixel_um

    assert grid_pixel_um(net_model, 5.0) == 1.0  # one pixel size: resample to it
    card = dict(net_model.card, pixel_size_range_um=[0.5, 8.0])
    ranged = InspectionModel(InspectionNet(), card)
    assert grid_pixel_um(ranged, 5.0) == 5.0
    assert grid_pixel_um(ranged, 20.0) == 8.0
    assert grid_pixel_um(ranged, 0.1) == 0.5


def test_card_threshold_is_chosen_by_sample_kind() -> None:
    from scanner.inspection.card import card_threshold

    card = {"pixel_size_um": 1.0, "threshold": 0.7,
            "thresholds_by_sample_kind": {"wafer": 0.9, "pv_cell": 0.5}}
    model = InspectionModel(InspectionNet(), card)
    assert card_threshold(model, "wafer") == (0.9, "model card (wafer)")
    assert card_threshold(model, "pv_cell")[0] == 0.5
    assert card_threshold(model, "image") == (0.7, "model card")  # a kind not calibrated
    assert card_threshold(model, None) == (0.7, "model card")


def test_thresholds_follow_the_band_of_the_scans_pixel_size() -> None:
    from scanner.inspection.card import card_threshold, context_thresholds

    card = {"pixel_size_um": 1.0, "threshold": 0.7,
            "thresholds_by_sample_kind": {"wafer": 0.9, "pv_cell": 0.5},
            "thresholds_quiet_by_sample_kind": {"pv_cell": 0.3},
            "thresholds_by_pixel_size": {"pv_cell": [
                {"pixel_size_um": [8.0, 16.0], "threshold": 0.8, "quiet": 0.6},
                {"pixel_size_um": [16.0, 40.0], "threshold": 0.45, "quiet": 0.28,
                 "plain": 0.2}]}}
    model = InspectionModel(InspectionNet(), card)
    assert card_threshold(model, "pv_cell", 10.0) == (0.8, "model card (pv_cell, 8-16 um pixels)")
    assert card_threshold(model, "pv_cell", 30.0)[0] == 0.45
    assert card_threshold(model, "pv_cell", 5.0)[0] == 0.8  # outside: the nearest band
    assert card_threshold(model, "pv_cell", 60.0)[0] == 0.45
    assert card_threshold(model, "pv_cell")[0] == 0.5  # pixel size unknown: the kind's
    assert card_threshold(model, "wafer", 10.0)[0] == 0.9  # a kind without bands
    assert context_thresholds(model, "pv_cell", "model card", 10.0) == {
        "quiet": 0.6, "plain": None, "plain_near_structure": None, "line": None}
    assert context_thresholds(model, "pv_cell", "model card", 20.0)["plain"] == 0.2
    assert context_thresholds(model, "pv_cell", "model card")["quiet"] == 0.3
    assert context_thresholds(model, "pv_cell", "user", 10.0)["quiet"] is None


def test_context_thresholds_come_from_the_card_unless_the_user_sets_one() -> None:
    from scanner.inspection.card import context_thresholds

    card = {"pixel_size_um": 1.0, "threshold": 0.7,
            "thresholds_by_sample_kind": {"wafer": 0.9},
            "thresholds_quiet_by_sample_kind": {"wafer": 0.75},
            "thresholds_plain_by_sample_kind": {"wafer": 0.3},
            "thresholds_plain_near_structure_by_sample_kind": {"wafer": 0.5}}
    model = InspectionModel(InspectionNet(), card)
    assert context_thresholds(model, "wafer", "model card (wafer)") == {
        "quiet": 0.75, "plain": 0.3, "plain_near_structure": 0.5, "line": None}
    none = {"quiet": None, "plain": None, "plain_near_structure": None, "line": None}
    assert context_thresholds(model, "wafer", "user") == none
    assert context_thresholds(model, "pv_cell", "model card") == none
    assert context_thresholds(model, None, "model card") == none


def test_a_window_reaching_far_past_the_image_is_mirrored_not_flat():
    # a window holding 40 rows of the image and reaching 200 rows past it: the edge row
    # repeated made a flat band the detector's bank never saw (a photograph's last map rows
    # at 1.37 against 0.80 inside); mirrored, the rows past the edge read the image's
    from scanner.inspection.tiled import GridReader

    rng = np.random.default_rng(0)
    img = rng.random((100, 60)).astype(np.float32)
    win = GridReader(img, 1.0).read(60, -10, 240, 80)
    np.testing.assert_array_equal(win[:40, 10:70], img[60:])
    np.testing.assert_array_equal(win[40:79, 10:70], img[98:59:-1])  # mirrored about row 99
    assert win[40:].std(axis=0).min() > 0.1  # no column of it is flat
    np.testing.assert_array_equal(win[:40, :10], img[60:, 10:0:-1])


def test_image_lists_name_each_file_once_and_refuse_what_is_not_an_image(tmp_path):
    from scanner.errors import UserError
    from scanner.inspection.images import list_images

    d1, d2 = tmp_path / "d1", tmp_path / "d2"
    d1.mkdir()
    d2.mkdir()
    tifffile.imwrite(d2 / "x.tif", _texture((64, 64)))
    (d1 / "x.tif").symlink_to(d2 / "x.tif")
    # a folder and a file in it: listed once (it was scored and listed twice)
    assert [n for n, _ in list_images([d2, d2 / "x.tif"])] == ["x.tif"]
    # a link is named where the user put it, not after its target's folder
    assert sorted(n for n, _ in list_images([d1, d2])) == ["d1/x.tif", "d2/x.tif"]
    (d1 / "gone.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(UserError, match="broken link"):
        list_images([d1])
    (d1 / "gone.png").unlink()
    from models.data import read_image

    (d1 / "empty.png").write_bytes(b"")
    with pytest.raises(UserError, match="empty file"):
        read_image(d1 / "empty.png")
    img = _texture((64, 64)).astype(np.float32)
    shifted = (img - img.mean()) / img.std()  # standardised: half of it below zero
    tifffile.imwrite(d1 / "neg.tif", shifted)
    with pytest.raises(UserError, match="0 or more"):
        read_image(d1 / "neg.tif")
    res = runner.invoke(app, ["inspect", str(d2), "--model", str(d2 / "x.tif"), "--out",
                              str(tmp_path / "o")])
    assert res.exit_code == 2 and "x.tif: not a model" in res.output, res.output
    # a folder given as the model: named as given (it said "d2.safetensors: not found")
    res = runner.invoke(app, ["inspect", str(d2), "--model", str(d2), "--out",
                              str(tmp_path / "o")])
    assert res.exit_code == 2 and f"{d2}: a folder, not a model" in res.output, res.output


def test_too_few_small_good_images_are_refused_before_any_work(tmp_path):
    from models.build import build_detector
    from models.data import GoodImage
    from models.errors import InputError

    goods = [GoodImage(_texture((128, 128), seed=k).astype(np.float32) / 2500) for k in range(3)]
    with pytest.raises(InputError, match="8 or more good images, or images of at least 129"):
        build_detector(goods, tmp_path / "m")
    assert not list(tmp_path.iterdir())


def test_results_of_another_kind_of_target_in_the_same_out_are_removed(tmp_path):
    """A mosaic inspected into the --out of image files left their scores.csv, defects.csv and
    review pictures beside its own defect list; image files after it left its maps."""
    tex = _texture((300, 400), seed=5)
    tex[100:130, 150:180] = 200  # a dark patch: a defect, so a review picture is drawn
    tifffile.imwrite(tmp_path / "a.tif", tex)
    _write_mosaic(tmp_path / "m.ome.zarr", tex, 1.0, (0.0, 0.0))
    out = tmp_path / "out"
    (out / "notes.txt").parent.mkdir()
    (out / "notes.txt").write_text("mine")
    res = runner.invoke(app, ["inspect", str(tmp_path / "a.tif"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert {"scores.csv", "defects.csv", "overlays"} <= {p.name for p in out.iterdir()}
    res = runner.invoke(app, ["inspect", str(tmp_path / "m.ome.zarr"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == [
        "anomaly.ome.zarr", "defects.json", "notes.txt", "roughness.ome.zarr",
        "uncertainty.ome.zarr"]
    res = runner.invoke(app, ["inspect", str(tmp_path / "a.tif"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert not any(p.name.endswith(".ome.zarr") for p in out.iterdir())
    assert (out / "notes.txt").read_text() == "mine"
