"""A user's golden sample, through the README's commands: scan a good copy of a product nobody
simulated, build a detector from that scan, scan a defective copy with it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from skimage import data
from typer.testing import CliRunner

from scanner.cli import app

pytestmark = pytest.mark.slow


def _product() -> np.ndarray:
    """A die grid of coin photographs: 4 x 4 cells of 224 px on a 256 px pitch, dark streets."""
    cell = data.coins()[40:264, 60:284].astype(np.float32) * 200.0
    img = np.full((1056, 1056), 4000.0, dtype=np.float32)
    for i in range(4):
        for j in range(4):
            r, c = 32 + i * 256 + 16, 32 + j * 256 + 16
            img[r : r + 224, c : c + 224] = cell
    return img


def _write_copies(folder: Path, good: np.ndarray, bad: np.ndarray, camera_px: int) -> None:
    """good.tif / bad.tif (16-bit) and recipes scanning each as an ``image`` sample at 1 um/px.

    The defective copy is scanned as a second part would be, on another day: the simulated
    microscope's seed differs (camera noise, stage landing, hence the stitch and where the
    dies fall on the features' stride-8 grid)."""
    for seed, (name, img) in enumerate((("good", good), ("bad", bad))):
        tifffile.imwrite(folder / f"{name}.tif", img.astype(np.uint16))
        (folder / f"{name}.yaml").write_text(
            f"sample: {{kind: image, path: {name}.tif, pixel_size_um: 1.0, origin_um: [0, 0]}}\n"
            f"microscope: {{kind: simulated, seed: {seed}, camera: {{width: {camera_px}, "
            f"height: {camera_px}, pixel_size_um: 1.0}}}}\nscan: {{overlap: 0.1}}\n")


def test_a_detector_from_one_good_scan_finds_the_defects_of_a_defective_copy(
        tmp_path: Path) -> None:
    good = _product()
    bad = good.copy()
    # a dark spot on the brightest part of a coin (a dark spot on the dark ground between
    # coins changes nothing), a bright particle, and a die's pattern missing
    block = good[304 + 16 : 528 - 16, 560 + 16 : 784 - 16]
    means = np.lib.stride_tricks.sliding_window_view(block, (16, 16)).mean(axis=(2, 3))
    r, c = np.unravel_index(int(np.argmax(means)), means.shape)
    painted = {"dark spot": (304 + 16 + int(r), 560 + 16 + int(c), 16),
               "bright particle": (700, 180, 12), "missing pattern": (600, 860, 48)}
    for kind, (r, c, size) in painted.items():
        value = {"dark spot": 0.0, "bright particle": 60000.0}.get(kind, 4000.0)
        bad[r : r + size, c : c + size] = value
    _write_copies(tmp_path, good, bad, 512)
    runner = CliRunner()
    res = runner.invoke(app, ["run", str(tmp_path / "good.yaml"), "--no-inspect", "--out",
                              str(tmp_path / "good_scan")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["train", "--good", str(tmp_path / "good_scan"), "--out",
                              str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    card = json.loads((tmp_path / "m.json").read_text())
    assert card["calibration"]["held_out"] == "the central quarter of each image"
    assert card["sample_edge_seen"] is True  # the scan shows the chuck beyond the coupon
    # the scan it was built from, as drift recognises it (it is in the bank: it scores low)
    good_scan = json.loads((tmp_path / "good_scan" / "scan.json").read_text())
    [record] = card["good_scans"]
    assert {k: record[k] for k in ("path", "started", "name", "pixel_size_um")} == {
        "path": str((tmp_path / "good_scan").resolve()), "started": good_scan["started"],
        "name": good_scan["recipe"]["name"], "pixel_size_um": 1.0}
    assert record["surface_image"]["n"] > 0  # its image, for drift to compare a part with
    # the die-to-die z threshold is set on the good scan's own dies
    d2d = card["die_to_die"]
    assert d2d["dies"] >= 9 and 0 < d2d["good_max_z"] and 7.0 <= d2d["z_threshold"] <= 13.0
    assert d2d["z_threshold"] == pytest.approx(min(13.0, max(7.0, 1.5 * d2d["good_max_z"])),
                                               abs=0.01)
    res = runner.invoke(app, ["run", str(tmp_path / "bad.yaml"), "--model", str(tmp_path / "m"),
                              "--out", str(tmp_path / "bad_scan")])
    assert res.exit_code == 0, res.output
    found = json.loads((tmp_path / "bad_scan" / "defects.json").read_text())
    header, defects = found["header"], found["defects"]
    assert header["die_to_die"]["grid"]["source"] == "found in the mosaic"
    assert header["die_to_die"]["z_threshold"] == d2d["z_threshold"]
    assert header["die_to_die"]["grid"]["pitch_um"] == pytest.approx([256, 256], abs=1.0)
    for kind, (r, c, size) in painted.items():
        x, y = c + size / 2, r + size / 2
        assert any(d["bbox_um"][0] - 4 <= x <= d["bbox_um"][2] + 4
                   and d["bbox_um"][1] - 4 <= y <= d["bbox_um"][3] + 4 for d in defects), kind
    assert len(defects) <= len(painted) + 1  # at most one false defect on 0.011 cm²
    assert header["edge_band_um"] == 0.0  # a model that saw the edge judges all of it
    scan = json.loads((tmp_path / "bad_scan" / "scan.json").read_text())
    assert scan["inspection"]["good_scores"]["n"] > 1000  # for drift checks


def test_a_design_that_does_not_repeat_is_compared_with_its_golden_image(tmp_path: Path) -> None:
    """One good image of a design with no repeat (a photograph): the model keeps it, and a
    scan of a defective copy is compared with it (scanner.inspection.golden)."""
    good = data.camera().astype(np.float32) * 150.0 + 2000.0
    bad = good.copy()
    # on the sky and on the coat: a dark spot, a bright scratch, a faint stain
    painted = {"dark spot": (40, 240, 10, 10, 0.6), "bright scratch": (80, 290, 4, 50, 1.3),
               "stain": (300, 200, 24, 24, 0.85)}
    for r, c, h, w, factor in painted.values():
        bad[r : r + h, c : c + w] *= factor
    _write_copies(tmp_path, good, bad, 256)
    runner = CliRunner()
    res = runner.invoke(app, ["train", "--good", str(tmp_path / "good.tif"), "--out",
                              str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    assert "golden" in res.output
    card = json.loads((tmp_path / "m.json").read_text())
    assert card["golden"]["shape"] == [512, 512] and card.get("die_to_die") is None
    found = {}
    for name in ("good", "bad"):
        res = runner.invoke(app, ["run", str(tmp_path / f"{name}.yaml"), "--model",
                                  str(tmp_path / "m"), "--out", str(tmp_path / name)])
        assert res.exit_code == 0, res.output
        found[name] = json.loads((tmp_path / name / "defects.json").read_text())
    assert found["bad"]["header"]["golden"]["placed"] is True
    assert found["good"]["defects"] == []  # a good copy differs from its golden image nowhere
    _assert_found(found["bad"]["defects"], painted)
    # image files of the copies (no scan): compared with it too
    res = runner.invoke(app, ["inspect", str(tmp_path / "good.tif"), str(tmp_path / "bad.tif"),
                              "--model", str(tmp_path / "m"), "--out", str(tmp_path / "files")])
    assert res.exit_code == 0, res.output
    files = json.loads((tmp_path / "files" / "defects.json").read_text())
    assert files["header"]["golden"]["images_compared"] == 2
    assert files["images"]["good.tif"] == []
    _assert_found(files["images"]["bad.tif"], painted)
    # extended with two more good images (which would not make one golden image), the model
    # keeps the golden image it was built with
    res = runner.invoke(app, ["train", "--init", str(tmp_path / "m"), "--good",
                              str(tmp_path / "good.tif"), str(tmp_path / "good.tif"), "--out",
                              str(tmp_path / "m2")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "m2.json").read_text())["golden"] == card["golden"]
    res = runner.invoke(app, ["inspect", str(tmp_path / "bad.tif"), "--model",
                              str(tmp_path / "m2"), "--out", str(tmp_path / "files2")])
    assert res.exit_code == 0, res.output
    _assert_found(json.loads((tmp_path / "files2" / "defects.json").read_text())["images"][
        "bad.tif"], painted)


def test_image_files_of_a_die_grid_are_compared_die_to_die(tmp_path: Path) -> None:
    """One good image file of a product whose dies repeat, and image files to inspect (no
    scan): each file's dies are compared with one another, as a scan's are. Judged by the
    memory bank alone, none of these faint defects was found."""
    rng = np.random.default_rng(0)
    good = _product()

    def shot(img: np.ndarray) -> np.ndarray:  # a camera's noise, 16 bits
        return np.clip(img + rng.normal(0, 300, img.shape), 0, 65535).astype(np.uint16)

    bad = good.copy()
    # a faint stain on a coin, a dim spot, a small bright particle on a street
    painted = {"stain": (620, 360, 20, 20, 0.8), "dim spot": (830, 830, 10, 10, 0.7),
               "particle": (290, 500, 6, 6, 1.5)}
    for r, c, h, w, factor in painted.values():
        bad[r : r + h, c : c + w] *= factor
    for name, img in (("good.tif", good), ("good2.tif", good), ("bad.tif", bad)):
        tifffile.imwrite(tmp_path / name, shot(img))
    runner = CliRunner()
    res = runner.invoke(app, ["train", "--good", str(tmp_path / "good.tif"), "--out",
                              str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    card = json.loads((tmp_path / "m.json").read_text())
    assert "golden" not in card and card["die_to_die"]["found_grid_repeats"] is True
    res = runner.invoke(app, ["inspect", str(tmp_path / "bad.tif"), str(tmp_path / "good2.tif"),
                              "--model", str(tmp_path / "m"), "--out", str(tmp_path / "files")])
    assert res.exit_code == 0, res.output
    files = json.loads((tmp_path / "files" / "defects.json").read_text())
    assert files["header"]["die_to_die"]["images_compared"] == 2
    assert files["images"]["good2.tif"] == []
    _assert_found(files["images"]["bad.tif"], painted)
    # a review picture of the image with defects, none of the good one
    assert [p.name for p in (tmp_path / "files" / "overlays").iterdir()] == ["bad.tif.png"]
    # the shipped model knows nothing of this product: no die-to-die on its say (the "dies"
    # found in real EL cells, their busbars' repeat, are no copies of one another)
    res = runner.invoke(app, ["inspect", str(tmp_path / "bad.tif"), "--out",
                              str(tmp_path / "shipped")])
    assert res.exit_code == 0, res.output
    shipped = json.loads((tmp_path / "shipped" / "defects.json").read_text())
    assert shipped["header"]["die_to_die"]["images_compared"] == 0
    # the defective copy as a bare OME-NGFF mosaic (stitched elsewhere: no scan.json, no
    # recipe): its repeat is found and compared die to die too
    from scanner.ngff import build_pyramid, create_multiscale, finish_multiscale

    mosaic = tmp_path / "bare" / "mosaic.ome.zarr"
    mosaic.parent.mkdir()
    img = tifffile.imread(tmp_path / "bad.tif").astype(np.float32)
    tmp, arrays = create_multiscale(mosaic, img.shape, chunk=256, dtype=img.dtype)
    arrays[0][:] = img
    build_pyramid(arrays, 256)
    finish_multiscale(tmp, mosaic, len(arrays), 1.0, (0.0, 0.0), "mosaic")
    res = runner.invoke(app, ["inspect", str(mosaic), "--model", str(tmp_path / "m"), "--out",
                              str(tmp_path / "bare_out")])
    assert res.exit_code == 0, res.output
    bare = json.loads((tmp_path / "bare_out" / "defects.json").read_text())
    assert bare["header"]["die_to_die"]["grid"]["source"] == "found in the mosaic"
    _assert_found(bare["defects"], painted)


def _assert_found(defects: list[dict], painted: dict[str, tuple]) -> None:
    """Each painted defect ``(row, col, height, width, ...)`` in px (1 um/px from 0, 0) lies in
    a reported box, and at most one more defect was reported."""
    for kind, (r, c, h, w, _) in painted.items():
        x, y = c + w / 2, r + h / 2
        assert any(d["bbox_um"][0] - 4 <= x <= d["bbox_um"][2] + 4
                   and d["bbox_um"][1] - 4 <= y <= d["bbox_um"][3] + 4 for d in defects), kind
    assert len(defects) <= len(painted) + 1


def test_a_repeat_that_holds_no_whole_die_leaves_the_comparison_to_the_golden_image() -> None:
    """A fine grating's lines were found as a "die grid" (14 x 299 um, no die to compare),
    and the golden image, which the model kept, was not compared: 15 false defects on a
    second good copy of the grating (3 with it)."""
    from scanner.inspection.golden import GOLDEN
    from scanner.inspection.inspect import _Refinement

    ran: list[str] = []
    compared = np.ones((4, 4), bool)

    def die_to_die(dies: int):
        def step(maps):
            ran.append("die-to-die")
            return ({"dies": dies}, None, compared if dies else None,
                    np.zeros((4, 4), bool) if dies else None)
        return step

    def golden(maps):
        ran.append("golden")
        return {"reference": GOLDEN, "placed": True}, "reader", compared, ~compared

    nothing = _Refinement(die_to_die(0), False, None, None, 1.0, fallback=golden)
    nothing(None)
    assert ran == ["die-to-die", "golden"]
    assert nothing.d2d == {"dies": 0} and nothing.golden["placed"] is True
    assert nothing.compared is compared and nothing.difference == "reader"
    ran.clear()
    dies = _Refinement(die_to_die(9), False, None, None, 1.0, fallback=golden)
    dies(None)
    assert ran == ["die-to-die"] and dies.golden == {} and dies.d2d == {"dies": 9}
