"""Shared fixtures: small recipes written into a temporary folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml

#: the end-to-end scans shared by tests: a test that uses one is marked slow here (``make
#: test-fast`` leaves the slow tests out; ``make test`` and CI run everything). Tests that take
#: over about 3 s on their own carry ``@pytest.mark.slow`` themselves
SESSION_SCANS = frozenset({"wafer_scan", "reported_wafer", "pv_scan", "aligned_scan"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SESSION_SCANS & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


#: a small simulated wafer recipe (20 mm, 8 defects, 10 µm pixels) that scans in seconds, for
#: the resume and pipelining tests
SMALL_WAFER = {
    "sample": {"kind": "wafer", "diameter_mm": 20, "edge_exclusion_mm": 1.0,
               "die_pitch_mm": [3.0, 2.5], "defects": {"count": 8, "seed": 3}},
    "microscope": {"kind": "simulated",
                   "camera": {"width": 512, "height": 512, "pixel_size_um": 10.0}, "seed": 1},
    "scan": {"overlap": 0.1},
}


@pytest.fixture
def write_recipe(tmp_path: Path):
    """Write a recipe dict (or raw text) to tmp_path and return its path."""

    def _write(content: dict | str, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        text = content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False)
        path.write_text(text, encoding="utf-8")
        return path

    return _write


def smooth_texture(shape: tuple[int, int], seed: int = 0, sigma: float = 3.0) -> np.ndarray:
    """A band-limited random texture in [0, 1] (good for registration and comparisons)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    img = ndimage.gaussian_filter(rng.random(shape), sigma)
    img -= img.min()
    return img / img.max()


@pytest.fixture
def coupon_tif(tmp_path: Path) -> Path:
    """A 900 x 1200 16-bit TIFF with smooth texture: the sample of image-based recipes."""
    img = (smooth_texture((900, 1200), seed=3, sigma=8.0) * 60000 + 2000).astype(np.uint16)
    path = tmp_path / "coupon.tif"
    tifffile.imwrite(path, img)
    return path


# --------------------------------------------------------------------------- reports (issue 6)

#: simulator defect kinds -> defect-list classes (for defect lists made from the ground truth)
TRUTH_CLASSES = {"missing_pattern": "pattern", "dark_area": "stain",
                 "finger_interruption": "other"}


def scan_of_image(root: Path, image: np.ndarray, *, camera_px: int = 512,
                  overlap: float = 0.1, seed: int = 0) -> Path:
    """Scan a picture (values in [0, 1], 1 um per pixel) as an ``image`` sample through the
    simulated microscope (a square camera of ``camera_px`` at 1 um); the scan folder."""
    import tifffile

    from scanner.pipeline import run_scan
    from scanner.recipe import parse_recipe

    tifffile.imwrite(root / "sample.tif", np.round(image * 65535).astype(np.uint16))
    recipe = {"sample": {"kind": "image", "path": "sample.tif", "pixel_size_um": 1.0,
                         "origin_um": [0.0, 0.0]},
              "microscope": {"kind": "simulated", "seed": seed,
                             "camera": {"width": camera_px, "height": camera_px,
                                        "pixel_size_um": 1.0}},
              "scan": {"overlap": overlap}}
    return run_scan(parse_recipe(recipe, root, "image"), root / "scan").folder


def truth_defects(folder: Path) -> list:
    """A scan's true defects as contract rows (a stand-in for inspection's output in tests).

    Only the stage-coordinate fields are filled, as inspection fills them; score, roughness,
    uncertainty and review are deterministic made-up values.
    """
    import json

    from scanner.defectlist import Defect

    truth = json.loads((folder / "truth.json").read_text(encoding="utf-8"))
    rows = []
    for t in truth["defects"]:
        x0, y0, x1, y1 = t["bbox_um"]
        i = int(t["id"])
        rows.append(Defect(
            id=i + 1, x_um=t["x_um"], y_um=t["y_um"], bbox_um=(x0, y0, x1, y1),
            area_um2=0.5 * (x1 - x0) * (y1 - y0), size_um=t["size_um"],
            defect_class=TRUTH_CLASSES.get(t["kind"], t["kind"]), score=0.5 + 0.01 * i,
            roughness=1.0 + 0.1 * i, uncertainty=0.05 * (i % 5), review=i % 5 == 4,
        ))
    return rows


def _scan_with_truth_defects(root: Path, name: str, recipe: dict) -> Path:
    from scanner.defectlist import write_defects
    from scanner.pipeline import run_scan
    from scanner.recipe import parse_recipe

    result = run_scan(parse_recipe(recipe, root, name), root / name)
    folder = result.folder
    write_defects(folder, truth_defects(folder),
                  {"model": {"id": "ground-truth", "sha256": "0" * 64}})
    return folder


@pytest.fixture(scope="session")
def wafer_scan(tmp_path_factory) -> Path:
    """A small simulated wafer scan (off-centre, notch, odd die origin) with its true defects
    in defects.json, not yet reported."""
    root = tmp_path_factory.mktemp("wafer_scan")
    return _scan_with_truth_defects(root, "wafer", {
        "sample": {"kind": "wafer", "diameter_mm": 20, "orientation": "notch",
                   "edge_exclusion_mm": 1.0, "die_pitch_mm": [3.0, 2.5],
                   "die_origin_mm": [-1.0, -2.0], "center_um": [1500, -800],
                   "lot_id": "LOT42", "wafer_id": "W07", "defects": {"count": 14, "seed": 3}},
        "microscope": {"kind": "simulated",
                       "camera": {"width": 512, "height": 512, "pixel_size_um": 10.0},
                       "seed": 1},
        "scan": {"overlap": 0.1},
    })


@pytest.fixture(scope="session")
def reported_wafer(wafer_scan: Path, tmp_path_factory) -> Path:
    """A copy of ``wafer_scan`` after the report stage (located defects, KLARF, wafer map)."""
    from scanner.reports import report

    folder = tmp_path_factory.mktemp("reported") / "wafer"
    shutil.copytree(wafer_scan, folder)
    report(folder)
    return folder


@pytest.fixture(scope="session")
def pv_scan(tmp_path_factory) -> Path:
    """A small simulated PV-cell scan with its true defects in defects.json."""
    root = tmp_path_factory.mktemp("pv_scan")
    return _scan_with_truth_defects(root, "pv", {
        "sample": {"kind": "pv_cell", "width_mm": 30, "height_mm": 30, "busbars": 3,
                   "busbar_width_mm": 1.0, "finger_pitch_mm": 2.0,
                   "defects": {"count": 10, "seed": 5}},
        "microscope": {"kind": "simulated",
                       "camera": {"width": 512, "height": 512, "pixel_size_um": 20.0},
                       "seed": 2},
        "scan": {"overlap": 0.1},
    })
