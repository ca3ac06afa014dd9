"""napari review: the npe2 reader (no display), the plugin registration, and a real viewer's
screenshot on a virtual X screen (Xvfb)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import zarr

from scanner.defectlist import MAP_NAMES, read_defects
from scanner.napari._reader import get_reader, read_scan
from scanner.reports import report
from scanner.reports.style import CLASS_COLORS, class_rgba

HAS_NAPARI = importlib.util.find_spec("napari") is not None
needs_napari = pytest.mark.skipif(not HAS_NAPARI, reason="needs waferscope[napari]")


def _write_map(path: Path, data: np.ndarray, pixel_um: float, origin_yx: tuple[float, float]):
    """A two-level OME-NGFF 0.5 map, as inspection writes them next to the mosaic."""
    from scanner.ngff import ome_attributes

    root = zarr.open_group(str(path), mode="w")
    for k, level in enumerate((data, data[::2, ::2])):
        # every chunk stored, as inspection stores them (a missing one is damage)
        root.create_array(str(k), data=level.astype(np.float32), chunks=(64, 64),
                          config={"write_empty_chunks": True})
    root.attrs["ome"] = ome_attributes(path.name, 2, pixel_um, (origin_yx[1], origin_yx[0]))


@pytest.fixture(scope="module")
def review_scan(wafer_scan: Path, tmp_path_factory) -> Path:
    """The small wafer scan, reported, with anomaly/roughness/uncertainty maps at 4x coarser
    pixels (Gaussian blobs at the defects, so the maps line up with the markers)."""
    folder = tmp_path_factory.mktemp("review") / "wafer"
    shutil.copytree(wafer_scan, folder)
    report(folder)
    mosaic = json.loads((folder / "scan.json").read_text())["mosaic"]
    p = mosaic["pixel_size_um"] * 4
    x0, y0 = mosaic["origin_um"]
    rows, cols = (s // 4 for s in mosaic["shape"])
    yy, xx = np.mgrid[0:rows, 0:cols]
    _, defects = read_defects(folder)
    blob = np.zeros((rows, cols))
    for d in defects:
        r, c = (d.y_um - y0) / p, (d.x_um - x0) / p
        blob += np.exp(-((yy - r) ** 2 + (xx - c) ** 2) / (2 * 3.0**2))
    for name, filename in MAP_NAMES.items():
        _write_map(folder / filename, blob * (1 + list(MAP_NAMES).index(name)), p, (y0, x0))
    return folder


def test_reader_layers_are_lazy_and_in_stage_micrometres(review_scan: Path):
    assert get_reader(str(review_scan)) is read_scan
    assert get_reader(str(review_scan / "scan.json")) is read_scan
    assert get_reader(str(review_scan.parent)) is None
    layers = read_scan(str(review_scan))
    by_name = {kw["name"]: (data, kw, kind) for data, kw, kind in layers}
    assert [kw["name"] for _, kw, _ in layers] == [
        "mosaic", "anomaly", "roughness", "uncertainty", "die grid", "defects"]
    scan = json.loads((review_scan / "scan.json").read_text())
    data, kw, kind = by_name["mosaic"]
    assert kind == "image" and kw["multiscale"]
    assert len(data) == scan["mosaic"]["levels"] and all(isinstance(a, da.Array) for a in data)
    assert list(data[0].shape) == scan["mosaic"]["shape"]
    x0, y0 = scan["mosaic"]["origin_um"]
    p = scan["microscope"]["pixel_size_um"]
    assert kw["scale"] == pytest.approx((p, p)) and kw["translate"] == pytest.approx((y0, x0))
    for name in MAP_NAMES:
        data, kw, kind = by_name[name]
        assert kind == "image" and kw["visible"] is False and 0 < kw["opacity"] < 1
        assert kw["scale"] == pytest.approx((4 * p, 4 * p))
        assert kw["translate"] == pytest.approx((y0, x0))
    _, defects = read_defects(review_scan)
    coords, kw, kind = by_name["defects"]
    assert kind == "points"
    np.testing.assert_allclose(coords, [(d.y_um, d.x_um) for d in defects])
    assert list(kw["features"]["class"]) == [d.defect_class for d in defects]
    assert list(kw["features"]["die"]) == [f"{d.die_col},{d.die_row}" for d in defects]
    np.testing.assert_allclose(kw["features"]["score"], [d.score for d in defects])
    np.testing.assert_allclose(kw["face_color"], [class_rgba(d.defect_class) for d in defects])
    # each defect's marker lies on the mosaic, where its anomaly blob peaks
    anomaly, akw, _ = by_name["anomaly"]
    for d in defects:
        r = round((d.y_um - akw["translate"][0]) / akw["scale"][0])
        c = round((d.x_um - akw["translate"][1]) / akw["scale"][1])
        assert float(anomaly[0][r, c]) > 0.9
    rects, kw, kind = by_name["die grid"]
    header, _ = read_defects(review_scan)
    assert kind == "shapes" and len(rects) == header["dies"]["n_tested"] and not kw["visible"]


def test_die_grid_layer_follows_the_alignment_and_a_clean_scan_opens(review_scan: Path,
                                                                     tmp_path: Path):
    from shapely.geometry import Point, Polygon

    # a wafer the alignment found 150 um off and turned 0.4 deg: the layer drew the recipe's
    # grid, up to 270 um from the dies the list names
    folder = tmp_path / "turned"
    shutil.copytree(review_scan, folder)
    scan = json.loads((folder / "scan.json").read_text())
    sample = scan["recipe"]["sample"]
    cx, cy = (v + d for v, d in zip(sample.get("center_um", (0, 0)), (150.0, -90.0),
                                    strict=True))
    scan["alignment"] = {"kind": "wafer", "nominal_center_um": sample.get("center_um", [0, 0]),
                         "center_um": [cx, cy], "rotation_deg": 0.4, "mark": "notch",
                         "edge_residual_um": 1.0, "n_edge_points": 40}
    (folder / "scan.json").write_text(json.dumps(scan))
    report(folder)
    layers = {kw["name"]: (data, kw) for data, kw, _ in read_scan(str(folder))}
    shapes, kw = layers["die grid"]
    assert kw["shape_type"] == "polygon"
    outline = {die: Polygon(np.asarray(yx)[:, ::-1]) for die, yx in
               zip(kw["features"]["die"], shapes, strict=True)}
    _, defects = read_defects(folder)
    placed = [d for d in defects if d.die_col is not None]
    assert placed
    for d in placed:  # each defect inside the outline of the die the list names
        assert outline[f"{d.die_col},{d.die_row}"].buffer(1.0).contains(Point(d.x_um, d.y_um))
    # a clean scan: no defects layer (an empty one with colour arrays failed in napari)
    header = json.loads((folder / "defects.json").read_text())
    header["defects"] = []
    (folder / "defects.json").write_text(json.dumps(header))
    names = [kw["name"] for _, kw, _ in read_scan(str(folder))]
    assert "mosaic" in names and "defects" not in names


@needs_napari
def test_plugin_is_registered_and_layers_are_valid_for_napari(review_scan: Path):
    import npe2
    from napari.layers import Layer

    manager = npe2.PluginManager.instance()
    manager.discover()
    assert manager.get_manifest("waferscope").contributions.readers
    layers = npe2.read([str(review_scan)], plugin_name="waferscope", stack=False)
    made = {kw["name"]: Layer.create(data, kw, kind) for data, kw, kind in layers}
    mosaic, points = made["mosaic"], made["defects"]
    scan = json.loads((review_scan / "scan.json").read_text())
    x0, y0 = scan["mosaic"]["origin_um"]
    p = scan["microscope"]["pixel_size_um"]
    np.testing.assert_allclose(mosaic.data_to_world([10, 20]), [y0 + 10 * p, x0 + 20 * p])
    assert not made["anomaly"].visible
    _, defects = read_defects(review_scan)
    d = defects[0]
    status = points.get_status(position=(d.y_um, d.x_um), world=True, view_direction=None,
                               dims_displayed=[0, 1])
    assert f"class: {d.defect_class}" in status["coordinates"]  # shown on hover
    assert f"die: {d.die_col},{d.die_row}" in status["coordinates"]


@pytest.fixture(scope="module")
def x_display():
    """An X display: the session's, or a private Xvfb started for these tests."""
    if os.environ.get("DISPLAY"):
        yield os.environ["DISPLAY"]
        return
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        if os.environ.get("CI"):
            pytest.fail("Xvfb not found: .ci/run installs it (apt-get install xvfb)")
        pytest.skip("no DISPLAY and no Xvfb (apt-get install xvfb)")
    read, write = os.pipe()
    proc = subprocess.Popen([xvfb, "-displayfd", str(write), "-screen", "0", "1600x1200x24",
                             "-nolisten", "tcp"], pass_fds=(write,),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(write)
    with os.fdopen(read) as f:
        number = f.readline().strip()
    try:
        yield f":{number}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@needs_napari
@pytest.mark.slow
def test_viewer_screenshot_shows_mosaic_and_defect_markers(review_scan: Path, x_display: str,
                                                           tmp_path: Path):
    import imageio.v3 as iio

    shot = tmp_path / "shot.png"
    env = {k: v for k, v in os.environ.items() if k != "QT_QPA_PLATFORM"}
    env["DISPLAY"] = x_display
    res = subprocess.run([sys.executable, "-m", "scanner", "view", str(review_scan),
                          "--screenshot", str(shot)], env=env, capture_output=True, text=True,
                         timeout=240)
    assert res.returncode == 0, res.stderr[-2000:]
    img = iio.imread(shot)[..., :3].astype(int)
    assert img.shape[0] > 400 and img.shape[1] > 400
    # the mosaic: a large area of grey (wafer, dies) with structure, not a black canvas
    grey = (np.abs(img - img.mean(axis=-1, keepdims=True)).max(axis=-1) < 8) & (img[..., 0] > 40)
    assert grey.mean() > 0.25
    assert img[grey].std() > 10
    # the markers: every class in the list shows in its colour
    _, defects = read_defects(review_scan)
    for cls in {d.defect_class for d in defects}:
        rgb = np.array([int(CLASS_COLORS[cls][i:i + 2], 16) for i in (1, 3, 5)])
        near = (np.abs(img - rgb).max(axis=-1) <= 20).sum()
        assert near > 40, (cls, near)


def test_view_without_napari_or_display_is_a_clear_error(review_scan: Path, monkeypatch):
    from typer.testing import CliRunner

    from scanner.cli import app

    runner = CliRunner()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "napari" else real(name, *a))
    res = runner.invoke(app, ["view", str(review_scan)])
    assert res.exit_code == 2 and "pip install 'waferscope[napari]'" in res.output
    monkeypatch.setattr(importlib.util, "find_spec", real)
    for var in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM"):
        monkeypatch.delenv(var, raising=False)
    if HAS_NAPARI and sys.platform.startswith("linux"):
        res = runner.invoke(app, ["view", str(review_scan)])
        assert res.exit_code == 2 and "no display" in res.output
    res = runner.invoke(app, ["view", str(review_scan.parent)])
    assert res.exit_code == 2
    # a screenshot that could not be written: refused before napari starts, nothing left
    (review_scan.parent / "file").write_text("x")
    for shot in (review_scan.parent / "shot.jpg", review_scan.parent / "file" / "shot.png"):
        res = runner.invoke(app, ["view", str(review_scan), "--screenshot", str(shot)])
        assert res.exit_code == 2 and "--screenshot" in res.output, res.output
        assert not shot.exists()
    # an existing file (here the scan's own wafer map) is replaced only with --overwrite
    kept = review_scan / "wafermap.png"
    before = kept.read_bytes()
    res = runner.invoke(app, ["view", str(review_scan), "--screenshot", str(kept)])
    assert res.exit_code == 2 and "--overwrite" in res.output, res.output
    assert kept.read_bytes() == before


def test_reader_imports_no_napari_or_qt():
    code = ("import sys, scanner.napari._reader, scanner.napari.viewer, scanner.cli; "
            "bad = [m for m in ('napari', 'qtpy', 'PyQt6', 'vispy') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def test_repeaters_get_their_own_layer_while_they_belong_to_the_inspection(review_scan: Path,
                                                                           tmp_path: Path):

    from scanner.napari._reader import repeater_points
    from scanner.reports.repeaters import RepeaterGroup, write_repeaters

    folder = tmp_path / "scan"
    shutil.copytree(review_scan, folder)
    header, defects = read_defects(folder)
    assert repeater_points(folder) is None
    group = RepeaterGroup(10.0, 20.0, [(0, 0), (1, 0)], defects[:2])
    write_repeaters(folder, [group], header.get("created"), 30.0)
    coords, kw, kind = repeater_points(folder)
    assert kind == "points" and kw["name"] == "repeaters"
    np.testing.assert_allclose(coords, [(d.y_um, d.x_um) for d in defects[:2]])
    names = [k["name"] for _, k, _ in read_scan(str(folder))]
    assert names.index("repeaters") == names.index("defects") - 1
    try:
        from napari.layers import Layer
    except ImportError:
        pass
    else:
        assert len(Layer.create(coords, kw, kind).data) == 2
    # a repeaters.json of an earlier inspection is not shown
    write_repeaters(folder, [group], "an older run", 30.0)
    assert repeater_points(folder) is None


@pytest.mark.parametrize("image", ["mosaic.ome.zarr", "anomaly.ome.zarr"])
def test_an_image_with_a_missing_chunk_is_refused_not_shown_black(review_scan: Path,
                                                                  tmp_path: Path, image: str):
    from scanner.errors import UserError

    folder = tmp_path / "wafer"
    shutil.copytree(review_scan, folder)
    (folder / image / "0" / "c" / "0" / "0").unlink()
    with pytest.raises(UserError, match=f"{image} level 0: chunk"):
        read_scan(str(folder))


def test_an_inspection_written_elsewhere_opens_with_its_scans_mosaic(review_scan: Path,
                                                                    tmp_path: Path):
    # `inspect SCAN --out DIR` leaves the mosaic in SCAN; `view DIR` was refused as "not a
    # scan folder"
    out = tmp_path / "review_out"
    out.mkdir()
    for name in ("defects.json", *MAP_NAMES.values()):
        src = review_scan / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, out / name)
    doc = json.loads((out / "defects.json").read_text())
    doc["header"]["source"] = str((review_scan / "mosaic.ome.zarr").resolve())
    (out / "defects.json").write_text(json.dumps(doc))
    assert get_reader(str(out)) is read_scan
    layers = {kw["name"]: (data, kw) for data, kw, _ in read_scan(str(out))}
    assert layers["mosaic"][1]["metadata"]["path"] == doc["header"]["source"]
    assert {"anomaly", "defects", "die grid"} <= set(layers)
    assert len(layers["defects"][0]) == len(doc["defects"])
    # a source that is gone: nothing to show, as for any folder without a mosaic
    doc["header"]["source"] = str(tmp_path / "gone" / "mosaic.ome.zarr")
    (out / "defects.json").write_text(json.dumps(doc))
    assert get_reader(str(out)) is None
