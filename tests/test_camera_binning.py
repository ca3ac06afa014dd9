"""Camera binning (issue 22): the simulated camera's ``Binning`` property (1, 2, 4; each
pixel the sum of its b x b block, the core's pixel size b times the calibrated one) and the
alignment's binned edge fields (die fields and the scan's tiles unbinned)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_align import WAFER, _recipe

from scanner.recipe import parse_recipe

#: an edge field of the test wafer (20 mm, centre (1500, -800) µm): chuck and wafer in view
EDGE = (11500.0, -800.0)


def _snap(core, xy: tuple[float, float]) -> np.ndarray:
    core.setXYPosition(*xy)
    core.waitForDevice(core.getXYStageDevice())
    core.snapImage()
    return core.getImage()


def test_simulated_camera_offers_binning_and_sums_blocks(tmp_path: Path) -> None:
    from devices.core import build_microscope

    recipe = _recipe(tmp_path)
    plain, binned = build_microscope(recipe), build_microscope(recipe)
    core = binned.core
    cam = core.getCameraDevice()
    assert core.getAllowedPropertyValues(cam, "Binning") == ("1", "2", "4")
    assert not core.isPropertyReadOnly(cam, "Binning")
    assert core.getPixelSizeUm() == pytest.approx(10.0)
    core.setProperty(cam, "Binning", 2)
    assert core.getPixelSizeUm() == pytest.approx(20.0)
    assert (core.getImageWidth(), core.getImageHeight()) == (256, 256)
    full = _snap(plain.core, EDGE)
    half = _snap(core, EDGE)
    assert full.shape == (512, 512) and half.shape == (256, 256)
    assert half.dtype == full.dtype
    # the sum of each 2 x 2 block, as a CCD or DemoCamera reports it: the noise is keyed by
    # the commanded position and visit, so both frames carry the same noise, exactly
    blocks = full.reshape(256, 2, 256, 2).astype(np.int64)
    np.testing.assert_array_equal(half, blocks.sum(axis=(1, 3)))
    np.testing.assert_allclose(half / 4.0, blocks.mean(axis=(1, 3)))
    # the edge in view: chuck and wafer both there
    assert half.min() < 0.2 * half.max()
    # exposure and readout as unbinned: the same hardware time
    assert binned.hardware_time_s() == pytest.approx(plain.hardware_time_s())
    # 4 (given as a string, as a .cfg's config group does), not 3
    core.setProperty(cam, "Binning", "4")
    assert core.getPixelSizeUm() == pytest.approx(40.0)
    assert _snap(core, (EDGE[0], EDGE[1] + 5000)).shape == (128, 128)
    with pytest.raises(ValueError, match="not allowed"):
        core.setProperty(cam, "Binning", 3)


def test_binning_one_again_gives_the_frames_of_before(tmp_path: Path) -> None:
    from devices.core import build_microscope

    recipe = _recipe(tmp_path)
    plain, toggled = build_microscope(recipe), build_microscope(recipe)
    cam = toggled.core.getCameraDevice()
    toggled.core.setProperty(cam, "Binning", 4)
    toggled.core.setProperty(cam, "Binning", 1)
    assert toggled.core.getPixelSizeUm() == pytest.approx(10.0)
    np.testing.assert_array_equal(_snap(toggled.core, EDGE), _snap(plain.core, EDGE))


def test_camera_binnings_reads_the_property() -> None:
    from scanner.acquisition.align import camera_binnings

    class Core:
        def __init__(self, allowed: tuple[str, ...], read_only: bool = False,
                     has: bool = True) -> None:
            self.allowed, self.read_only, self.has = allowed, read_only, has

        def getCameraDevice(self) -> str:
            return "Camera"

        def hasProperty(self, label: str, name: str) -> bool:
            return self.has

        def isPropertyReadOnly(self, label: str, name: str) -> bool:
            return self.read_only

        def getAllowedPropertyValues(self, label: str, name: str) -> tuple[str, ...]:
            return self.allowed

    assert camera_binnings(Core(("1", "2", "4"))) == {1: 1, 2: 2, 4: 4}
    # adapters that name it "2x2" are set with that name; a rectangular one is not square
    assert camera_binnings(Core(("1x1", "2x2", "1x2"))) == {1: "1x1", 2: "2x2"}
    assert camera_binnings(Core(("1", "2"), read_only=True)) == {}
    assert camera_binnings(Core((), has=False)) == {}


def _spy_snaps(monkeypatch) -> list[tuple[str, tuple[int, ...], float]]:
    """Record ``(kind, frame shape, pixel µm)`` of every alignment field."""
    from scanner.acquisition import align

    taken: list[tuple[str, tuple[int, ...], float]] = []
    snap = align._Scope.snap

    def spy(self, kind, x, y, binned=False):
        image, p = snap(self, kind, x, y, binned)
        taken.append((kind, image.shape, p))
        return image, p

    monkeypatch.setattr(align._Scope, "snap", spy)
    return taken


@pytest.mark.parametrize("seed", [1, 2])
def test_alignment_takes_edge_fields_binned_and_restores_binning(
        tmp_path: Path, monkeypatch, seed: int) -> None:
    from devices.core import build_microscope
    from scanner.acquisition.align import align

    taken = _spy_snaps(monkeypatch)
    recipe = _recipe(tmp_path, {"random": True, "seed": seed})
    handle = build_microscope(recipe)
    result = align(handle, recipe, tmp_path)
    truth = handle.truth["placement"]
    assert np.hypot(*(np.array(result.center_um) - truth["center_um"])) <= 5.0
    assert abs(result.rotation_deg - truth["rotation_deg"]) <= 0.01
    assert result.die_grid is not None
    assert result.edge_binning == 2
    # edge and notch fields 2x binned at twice the pixel, die fields at the full resolution
    assert {(k, s, p) for k, s, p in taken if k != "die"} == {
        ("edge", (256, 256), 20.0), ("notch", (256, 256), 20.0)}
    assert {(s, p) for k, s, p in taken if k == "die"} == {((512, 512), 10.0)}
    # the scan's tiles are unbinned
    core = handle.core
    assert int(core.getProperty(core.getCameraDevice(), "Binning")) == 1
    assert core.getPixelSizeUm() == pytest.approx(10.0)
    assert handle.fov_um() == pytest.approx((5120.0, 5120.0))


def test_binning_is_restored_when_the_alignment_is_refused(tmp_path: Path) -> None:
    from devices.core import build_microscope
    from scanner.acquisition.align import AlignmentError, align

    recipe = _recipe(tmp_path, {"offset_um": [6000, 0]})
    handle = build_microscope(recipe)
    with pytest.raises(AlignmentError, match="no wafer edge found"):
        align(handle, recipe, tmp_path)
    core = handle.core
    assert int(core.getProperty(core.getCameraDevice(), "Binning")) == 1


def test_a_camera_without_binning_aligns_unbinned(tmp_path: Path, monkeypatch) -> None:
    from devices.core import build_microscope
    from scanner.acquisition import align

    monkeypatch.setattr(align, "camera_binnings", lambda core: {})
    taken = _spy_snaps(monkeypatch)
    recipe = _recipe(tmp_path, {"random": True, "seed": 1})
    handle = build_microscope(recipe)
    result = align.align(handle, recipe)
    assert result.edge_binning == 1
    assert {(s, p) for _, s, p in taken} == {((512, 512), 10.0)}
    truth = handle.truth["placement"]
    assert np.hypot(*(np.array(result.center_um) - truth["center_um"])) <= 5.0


def test_a_flat_wafer_aligns_with_binned_edge_fields_and_an_unbinned_flat(
        tmp_path: Path, monkeypatch) -> None:
    """A flat's field is no arc: with binned edge fields (a larger residual, a larger
    tolerance) its points near their median depth joined the circle and put the centre
    0.14 mm off. And a flat crossing fewer than two binned rows gave its angle 0.013° off:
    it stays unbinned."""
    from devices.core import build_microscope
    from scanner.acquisition.align import align

    taken = _spy_snaps(monkeypatch)
    data = json.loads(json.dumps(WAFER))
    data["sample"].update(diameter_mm=30, orientation="flat", flat_length_mm=10.0,
                          placement={"offset_um": [-230, 310], "rotation_deg": -0.4})
    recipe = parse_recipe(data, tmp_path, "flat")
    handle = build_microscope(recipe)
    result = align(handle, recipe)
    truth = handle.truth["placement"]
    assert result.edge_binning == 2 and result.mark == "flat"
    assert {(k, p) for k, _, p in taken} == {("edge", 20.0), ("flat", 10.0), ("die", 10.0)}
    assert np.hypot(*(np.array(result.center_um) - truth["center_um"])) <= 5.0
    assert abs(result.edge_rotation_deg - truth["rotation_deg"]) <= 0.005
    assert abs(result.rotation_deg - truth["rotation_deg"]) <= 0.01
