"""Drift of good-surface scores, and the die grid found from a repeating layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from shapely.geometry import box
from skimage import data

from models.drift import drift_verdict, score_summary
from scanner.diegrid import DieGrid, estimate_grid
from scanner.errors import UserError
from scanner.inspection.drift import check_drift, good_surface_scores


class _Model:
    def __init__(self, scores: dict) -> None:
        self.card = {"good_scores": scores, "weights_sha256": "abc"}


def _scan(folder: Path, scores: dict, sha: str = "abc") -> Path:
    folder.mkdir()
    (folder / "scan.json").write_text(json.dumps(
        {"inspection": {"good_scores": scores, "model": {"weights_sha256": sha}}}))
    return folder


def test_good_surface_scores_leave_out_flagged_and_uninspected_pixels() -> None:
    rng = np.random.default_rng(0)
    a = rng.uniform(0.5, 1.0, (300, 300)).astype(np.float32)
    a[:50] = 0.0  # outside the inspected area
    a[100:110, 100:110] = 5.0  # a defect
    s = good_surface_scores(a, threshold=2.0)
    assert s["n"] == 250 * 300 - 100
    assert 0.5 < s["q50"] < 1.0 and s["q99.9"] < 1.0


def test_drift_is_reported_when_good_scores_move_and_not_otherwise(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    reference = score_summary(rng.gamma(4.0, 0.2, 100_000))
    same = score_summary(rng.gamma(4.0, 0.2, 100_000))
    moved = score_summary(1.6 * rng.gamma(4.0, 0.2, 100_000))
    assert drift_verdict(reference, [same])[0] is False
    drifted, move = drift_verdict(reference, [moved, moved])
    assert drifted and move == pytest.approx(1.6, rel=0.05)
    scans = [_scan(tmp_path / "a", same), _scan(tmp_path / "b", moved),
             _scan(tmp_path / "c", moved), _scan(tmp_path / "other", moved, sha="zzz")]
    report = check_drift(scans, _Model(reference), tmp_path / "out")
    assert report.drifted
    assert len(report.scans) == 3 and "other" in report.skipped[0]
    assert report.plot is not None and report.plot.is_file()
    assert report.verdict().startswith("DRIFT")


def test_drift_command_names_a_model_without_good_scores(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from models.modelfile import network_model_path
    from scanner.cli import app

    scan = _scan(tmp_path / "s", {"n": 10, "q50": 1.0})
    # the shipped network's card has no good scores
    res = CliRunner().invoke(app, ["drift", str(scan), "--model", str(network_model_path())])
    assert res.exit_code == 2 and "--model" in res.output and "Traceback" not in res.output


def _die_grid(pitch: int, street: int, n: int, seed: int = 0) -> np.ndarray:
    cell = data.coins()[:pitch - street, :pitch - street].astype(np.float32)
    img = np.full((n * pitch + 20, n * pitch + 20), 20.0, dtype=np.float32)
    for i in range(n):
        for j in range(n):
            r, c = 10 + i * pitch + street // 2, 10 + j * pitch + street // 2
            img[r : r + pitch - street, c : c + pitch - street] = cell
    return img + np.random.default_rng(seed).normal(0, 2.0, img.shape).astype(np.float32)


def test_the_die_grid_of_a_repeating_layout_is_found_to_a_fraction_of_a_pixel() -> None:
    img = _die_grid(pitch=96, street=12, n=8)
    grid = estimate_grid(img, 2.0, (100.0, -50.0))  # 2 µm pixels, pixel (0, 0) at (100, -50)
    assert grid is not None
    assert grid.pitch_um == pytest.approx((192.0, 192.0), abs=0.5)
    # the grid's lines run in the street: between cells, not through them
    x_street = 100.0 + 2.0 * (10 + 96 - 6)  # a street centre, in stage µm
    offset = (grid.origin_um[0] - x_street) % 192.0
    assert min(offset, 192.0 - offset) < 2.0 * 12


@pytest.mark.parametrize("turn_deg", [2.0, -3.0])
def test_the_die_grid_of_a_part_placed_turned_is_found_with_its_turn(turn_deg: float) -> None:
    # a coupon placed by hand lies a degree or two off the stage's axes: along the image's
    # axes its repeat is 9 px off at 2 degrees of a 256 px pitch, and no grid was found (a
    # camera-photo die grid turned 2 degrees: 0.86 of its defects from its good scan, 27
    # false ones on a second good scan from its good image; 1.00 and none with its turn)
    from skimage.transform import rotate

    img = _die_grid(pitch=96, street=12, n=12)
    # turned about the image's centre (skimage: counter-clockwise as displayed, rows down,
    # so from +x towards -y), cropped to where the layout covers the image
    turned = rotate(img, turn_deg, order=3, preserve_range=True)[60:-60, 60:-60]
    grid = estimate_grid(turned.astype(np.float32), 1.0, (0.0, 0.0))
    assert grid is not None
    assert grid.rotation_deg == pytest.approx(-turn_deg, abs=0.1)
    assert grid.pitch_um == pytest.approx((96.0, 96.0), abs=0.3)
    # every cell the grid puts inside the image holds the same picture: the cells' corners
    # follow the turned layout to a pixel or two over 10 cells (an unturned grid drifts off
    # it by 3 px a cell at 2 degrees)
    c = (img.shape[0] - 1) / 2
    th = np.radians(turn_deg)

    def street_at(col: int, row: int) -> float:  # pixel (x, y) of a corner -> the source
        x, y = grid.corner(col, row)
        x, y = x + 60 - c, y + 60 - c
        return ((np.cos(th) * x - np.sin(th) * y + c - 10) % 96,
                (np.sin(th) * x + np.cos(th) * y + c - 10) % 96)

    corners = np.array([street_at(col, row) for col, row, full in
                        grid.cells_in(box(0, 0, *turned.shape[::-1])) if full])
    assert len(corners) >= 49
    spread = np.abs(corners - np.median(corners, axis=0))
    assert np.minimum(spread, 96 - spread).max() < 2.0


def test_no_grid_is_found_in_a_texture_or_a_single_photograph() -> None:
    assert estimate_grid(data.camera().astype(np.float32), 1.0, (0.0, 0.0)) is None
    assert estimate_grid(data.grass().astype(np.float32), 1.0, (0.0, 0.0)) is None
    assert estimate_grid(data.brick().astype(np.float32), 1.0, (0.0, 0.0)) is None


def _texture_twice(surround: int = 0) -> np.ndarray:
    """A 160 px crop of a texture repeated 2 x 2, in a darker, flat surround of ``surround`` px."""
    tile = data.gravel()[:160, :160].astype(np.float32)
    img = np.full((320 + 2 * surround,) * 2, 5.0, dtype=np.float32)
    img[surround : surround + 320, surround : surround + 320] = np.tile(tile, (2, 2))
    return img + np.random.default_rng(1).normal(0, 2.0, img.shape).astype(np.float32)


def test_a_layout_repeated_only_twice_is_found_with_cells_that_fit_the_image() -> None:
    grid = estimate_grid(_texture_twice(), 1.0, (0.0, 0.0))
    assert grid is not None and grid.pitch_um == pytest.approx((160.0, 160.0), abs=0.5)
    # a texture has no street: the cells start where two whole ones fit (pixel 0's lower edge)
    assert grid.origin_um == pytest.approx((-0.5, -0.5), abs=1.5)


@pytest.mark.parametrize("short", [1, 3])
def test_a_layout_of_two_repeats_a_few_pixels_short_of_them_is_found_whole(short: int) -> None:
    # a 2 x 2 layout whose image (a scan's pyramid level) ends a pixel or three before the
    # second repeat does: the repeat, cells from the image's start, and four whole dies
    img = _texture_twice()[: 320 - short, : 320 - short]
    grid = estimate_grid(img, 2.0, (0.0, 0.0))
    assert grid is not None and grid.pitch_um == pytest.approx((320.0, 320.0), abs=1.0)
    assert grid.origin_um == pytest.approx((-1.0, -1.0), abs=2.0)
    extent = (320 - short) * 2.0
    image = box(-1.0, -1.0, extent - 1.0, extent - 1.0)
    assert sum(full for _, _, full in grid.cells_in(image)) == 4
    # an exact grid (a recipe's) a pixel over the image has no whole die there
    exact = DieGrid(grid.pitch_um, grid.origin_um)
    assert sum(full for _, _, full in exact.cells_in(image)) == 1


def test_the_surround_of_an_image_sample_is_left_out_of_its_layout() -> None:
    img = _texture_twice(surround=60)
    assert estimate_grid(img, 1.0, (0.0, 0.0)) is None  # the flat surround hides the repeat
    valid = np.zeros(img.shape, bool)
    valid[60:380, 60:380] = True
    grid = estimate_grid(img, 1.0, (0.0, 0.0), valid)
    assert grid is not None and grid.pitch_um == pytest.approx((160.0, 160.0), abs=0.5)
    assert grid.origin_um == pytest.approx((59.5, 59.5), abs=1.5)


def _windows(image: np.ndarray, size: int = 64) -> list[np.ndarray]:
    return [image[r:r + size, c:c + size] for r in range(0, image.shape[0] - size + 1, size)
            for c in range(0, image.shape[1] - size + 1, size)]


def test_image_quality_sees_less_light_and_lost_focus_not_another_good_image() -> None:
    """The detector reads windows relative to their level, so a scan with 16 x less light or
    150 um out of focus scored as its calibration did (drift said "no drift") while most of
    its defects went unfound."""
    from scipy import ndimage as ndi

    from models.drift import image_drifted, image_quality, image_ratios

    surface = 0.6 + 0.4 * data.camera()[:384, :384].astype(np.float64) / 255.0

    def snap(light: float, blur: float = 0.8, seed: int = 0) -> np.ndarray:
        rng = np.random.default_rng(seed)
        electrons = rng.poisson(ndi.gaussian_filter(surface, blur) * 4000.0 * light)
        return (electrons / 4.0 + rng.normal(0, 3.0, surface.shape)).clip(0)

    good = image_quality(_windows(snap(1.0)))
    assert good["n"] == 36
    assert image_drifted(image_ratios(good, image_quality(_windows(snap(1.0, seed=1))))) == []
    dim = image_ratios(good, image_quality(_windows(snap(1 / 16))))
    assert dim["noise"] > 2.5 and 0.7 < dim["sharpness"] < 1.4, dim
    assert image_drifted(dim) == ["level", "noise"]
    blurred = image_ratios(good, image_quality(_windows(snap(1.0, blur=3.0))))
    assert blurred["sharpness"] < 0.4 and 0.8 < blurred["noise"] < 1.25, blurred
    assert image_drifted(blurred) == ["sharpness"]
    # a chuck or a surround not scanned is not the surface
    framed = snap(1.0)
    framed[:, :128] = 0.0
    assert image_quality(_windows(framed))["n"] == 24


def test_drift_is_judged_on_the_newest_scans(tmp_path: Path) -> None:
    """The verdict was the median over every scan given: three drifted scans after five
    good ones read "no drift"."""
    rng = np.random.default_rng(2)
    reference = score_summary(rng.gamma(4.0, 0.2, 50_000))
    good = score_summary(rng.gamma(4.0, 0.2, 50_000))
    moved = score_summary(1.6 * rng.gamma(4.0, 0.2, 50_000))
    scans = []
    for i, scores in enumerate([good] * 5 + [moved] * 3):
        folder = _scan(tmp_path / f"s{i}", scores)
        record = json.loads((folder / "scan.json").read_text())
        record["started"] = f"2026-12-0{i + 1}T10:00:00+01:00"
        (folder / "scan.json").write_text(json.dumps(record))
        scans.append(folder)
    report = check_drift(scans[::-1], _Model(reference))  # given newest first: by start time
    assert report.drifted and report.move == pytest.approx(1.6, rel=0.05)
    assert [Path(r["scan"]).name for r in report.scans] == [f"s{i}" for i in range(8)]
    assert not check_drift(scans[:6], _Model(reference)).drifted


@pytest.mark.parametrize(("second", "named"), [
    ({"recipe": {"sample": {"kind": "pv_cell"}}, "mosaic": {"pixel_size_um": 5.0}},
     "(wafer) and"),
    ({"recipe": {"sample": {"kind": "wafer"}}, "mosaic": {"pixel_size_um": 20.0}},
     "(5.0 um pixels) and")])
def test_drift_refuses_scans_of_different_products(tmp_path: Path, second: dict,
                                                   named: str) -> None:
    """A PV cell at 30 um beside wafers at 10 and 20 um read "DRIFT ... sharpness x1.55"."""
    rng = np.random.default_rng(3)
    scores = score_summary(rng.gamma(4.0, 0.2, 50_000))
    scans = []
    for i, extra in enumerate([{"recipe": {"sample": {"kind": "wafer"}},
                                "mosaic": {"pixel_size_um": 5.0}}, second]):
        folder = _scan(tmp_path / f"s{i}", scores)
        record = json.loads((folder / "scan.json").read_text())
        (folder / "scan.json").write_text(json.dumps({**record, **extra}))
        scans.append(folder)
    with pytest.raises(UserError, match="drift compares scans of one product") as info:
        check_drift(scans, _Model(scores))
    assert named in str(info.value) and "s1" in str(info.value)
    # the same product at a pixel size within 1 %: compared
    record = json.loads((scans[1] / "scan.json").read_text())
    record.update({"recipe": {"sample": {"kind": "wafer"}}, "mosaic": {"pixel_size_um": 5.02}})
    (scans[1] / "scan.json").write_text(json.dumps(record))
    assert not check_drift(scans, _Model(scores)).drifted


@pytest.mark.slow
def test_drift_names_a_scan_with_less_light_or_out_of_focus(tmp_path: Path) -> None:
    """Through the commands: scans of one small wafer, good, then with 16 x less light, then
    150 um out of focus; drift said "no drift" for both."""
    import yaml
    from conftest import SMALL_WAFER
    from typer.testing import CliRunner

    from scanner.cli import app

    def scan(name: str, seed: int = 1, exposure_ms: float | None = None, z0_um: float = 0.0):
        recipe = json.loads(json.dumps(SMALL_WAFER))
        recipe["name"] = name
        recipe["sample"].update(diameter_mm=10, die_pitch_mm=[2.0, 2.0],
                                surface={"z0_um": z0_um})
        recipe["microscope"]["seed"] = seed
        if exposure_ms is not None:
            recipe["scan"]["exposure_ms"] = exposure_ms
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(recipe))
        res = CliRunner().invoke(app, ["run", str(tmp_path / f"{name}.yaml"),
                                       "--out", str(tmp_path / name)])
        assert res.exit_code == 0, res.output
        return str(tmp_path / name)

    good, again = scan("good"), scan("again", seed=2)
    dim, blurred = scan("dim", exposure_ms=10.0 / 16), scan("blurred", z0_um=150.0)
    runner = CliRunner()
    res = runner.invoke(app, ["drift", good, again])
    assert res.exit_code == 0 and res.output.strip().splitlines()[-1].startswith("no drift")
    for drifted, moved in ((dim, "noise"), (blurred, "sharpness")):
        res = runner.invoke(app, ["drift", good, drifted, "--out", str(tmp_path / "d")])
        assert res.exit_code == 0, res.output
        verdict = res.output.strip().splitlines()[-1]
        assert verdict.startswith("DRIFT") and f"{moved} x" in verdict, verdict
        assert f"{moved} x" in next(line for line in res.output.splitlines()
                                   if line.strip().startswith(Path(drifted).name))
        assert (tmp_path / "d" / "drift.png").is_file()


def _inspected(folder: Path, scores: dict, image: dict | None, started: str | None,
               sha: str = "abc") -> Path:
    folder.mkdir()
    inspection = {"good_scores": scores, "model": {"weights_sha256": sha}}
    if image is not None:
        inspection["surface_image"] = image
    record = {"inspection": inspection}
    if started is not None:
        record["started"] = started
    (folder / "scan.json").write_text(json.dumps(record))
    return folder


GOOD_IMAGE = {"n": 200, "level": 1700.0, "noise": 0.014, "sharpness": 0.46,
              "structure": 1200.0}


def test_drift_follows_the_oldest_scan_not_a_calibration_on_another_scale(
        tmp_path: Path) -> None:
    """A model built from a good scan calibrates on held-out variants that score higher than
    scans of the product do: its good scans read DRIFT x0.79. One dark scan after good ones
    read DRIFT too (the median of two was their mean)."""
    rng = np.random.default_rng(3)
    calibration = score_summary(1.3 * rng.gamma(4.0, 0.2, 50_000))
    good = [score_summary(rng.gamma(4.0, 0.2, 50_000)) for _ in range(3)]
    dark = {**GOOD_IMAGE, "level": 110.0, "noise": 0.05}
    g = [_inspected(tmp_path / f"g{i}", s, GOOD_IMAGE, f"2026-12-0{i + 1}T08:00:00+00:00")
         for i, s in enumerate(good)]
    d1 = _inspected(tmp_path / "d1", good[0], dark, "2026-12-05T08:00:00+00:00")
    d2 = _inspected(tmp_path / "d2", good[1], dark, "2026-12-06T08:00:00+00:00")
    report = check_drift(g, _Model(calibration))
    assert not report.drifted and report.move == pytest.approx(1.0, abs=0.03)
    assert report.calibration_move == pytest.approx(1 / 1.3, rel=0.05)
    assert "x0.77 the calibration's" in report.verdict()
    # one scan alone is judged against the calibration, for a rise only, and says so (the
    # shipped coupon recipe's first scan read "DRIFT x0.71": good scans score below the
    # held-out surface)
    alone = check_drift(g[:1], _Model(calibration))
    assert not alone.drifted and "give earlier scans" in alone.verdict()
    assert "above it only" in alone.verdict()
    risen = check_drift(g[:1], _Model(score_summary(0.7 * rng.gamma(4.0, 0.2, 50_000))))
    assert risen.drifted and risen.verdict().startswith("DRIFT")
    # one scan of three moved: not yet drift; most of them: drift, and the folder given twice
    # counts once
    assert not check_drift([g[0], g[1], d1, d1], _Model(calibration)).drifted
    report = check_drift([d2, g[0], d1], _Model(calibration))  # by start time, not as given
    assert report.drifted and report.image_moved == ["level", "noise"]
    assert report.image["noise"] == pytest.approx(0.05 / 0.014)


def test_drift_is_seen_when_most_scans_moved_each_on_its_own(tmp_path: Path) -> None:
    """Scans of a grass-photograph coupon: after a good one, one lost light (level x0.55),
    the next focus (sharpness x0.15, noise x0.27), the next gained noise (x1.93); each
    measure's median over the three stayed near 1 and drift said "no drift"."""
    rng = np.random.default_rng(4)
    scores = [score_summary(rng.gamma(4.0, 0.2, 50_000)) for _ in range(5)]
    images = [GOOD_IMAGE, {**GOOD_IMAGE, "level": 0.55 * GOOD_IMAGE["level"]},
              {**GOOD_IMAGE, "noise": 0.27 * GOOD_IMAGE["noise"],
               "sharpness": 0.15 * GOOD_IMAGE["sharpness"]},
              {**GOOD_IMAGE, "noise": 1.93 * GOOD_IMAGE["noise"]},
              {**GOOD_IMAGE, "noise": 1.02 * GOOD_IMAGE["noise"]}]
    names = ["good", "dim", "blurred", "noisy", "again"]
    scans = [_inspected(tmp_path / n, s, im, f"2026-12-0{i + 1}T08:00:00+00:00")
             for i, (n, s, im) in enumerate(zip(names, scores, images, strict=True))]
    model = _Model(scores[0])
    report = check_drift(scans[:4], model)
    assert report.drifted and report.image_moved == []
    verdict = report.verdict()
    assert verdict.startswith("DRIFT") and "3 of the newest 3 scans moved" in verdict
    assert "dim (level x0.55)" in verdict and "blurred (noise x0.27, sharpness x0.15)" in verdict
    # two of three moved: drift; one of three, or one of two: not yet
    assert check_drift([scans[0], scans[1], scans[2], scans[4]], model).drifted
    assert not check_drift([scans[0], scans[1], scans[4], scans[4]], model).drifted
    assert not check_drift([scans[0], scans[1], scans[4]], model).drifted
    assert not check_drift([scans[0], scans[4]], model).drifted


def test_drift_says_what_it_could_not_compare(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    calibration = score_summary(rng.gamma(4.0, 0.2, 50_000))
    scores = score_summary(rng.gamma(4.0, 0.2, 50_000))
    plain = {**GOOD_IMAGE, "sharpness": 0.001, "structure": 5.0}  # a plain coupon
    textured = {**GOOD_IMAGE, "sharpness": 0.05, "structure": 120.0}  # rough, or a defect
    a = _inspected(tmp_path / "a", scores, plain, "2026-12-01T08:00:00+00:00")
    b = _inspected(tmp_path / "b", scores, textured, "2026-12-02T08:00:00+00:00")
    report = check_drift([a, b], _Model(calibration))
    assert not report.drifted and "sharpness" not in report.image
    assert "sharpness not compared" in report.verdict()
    old = _inspected(tmp_path / "old", scores, None, None)  # before images were recorded
    verdict = check_drift([old, b], _Model(calibration)).verdict()
    assert "image not compared" in verdict and "order given: old records no start" in verdict


@pytest.mark.parametrize("field, value", [
    ("level", -1735.0), ("level", 0), ("noise", float("nan")), ("sharpness", float("inf")),
    ("sharpness", True), ("level", "abc"), ("n", "many"), ("n", -5)])
def test_a_damaged_surface_image_record_is_refused_naming_it(tmp_path: Path, field: str,
                                                           value: object) -> None:
    from typer.testing import CliRunner

    from scanner.cli import app

    default = Path(__file__).resolve().parents[1] / "models" / "default.safetensors"
    sha = json.loads(default.with_suffix(".json").read_text())["weights_sha256"]
    scores = score_summary(np.random.default_rng(5).gamma(4.0, 0.2, 10_000))
    a = _inspected(tmp_path / "a", scores, GOOD_IMAGE, "2026-12-01T08:00:00+00:00", sha)
    b = _inspected(tmp_path / "b", scores, {**GOOD_IMAGE, field: value},
                   "2026-12-02T08:00:00+00:00", sha)
    where = f"{b / 'scan.json'} inspection.surface_image"
    res = CliRunner().invoke(app, ["drift", str(a), str(b), "--model", str(default)])
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and where in lines[0], res.output
    assert f"{field}" in lines[0].split(where)[1]


def test_a_drift_verdict_says_when_a_scan_given_was_not_compared(tmp_path: Path) -> None:
    """The newest scan, inspected with another model, was skipped on a line of its own and the
    verdict ("no drift", about the other scans alone) did not say so."""
    from typer.testing import CliRunner

    from scanner.cli import app

    default = Path(__file__).resolve().parents[1] / "models" / "default.safetensors"
    sha = json.loads(default.with_suffix(".json").read_text())["weights_sha256"]
    scores = score_summary(np.random.default_rng(5).gamma(4.0, 0.2, 10_000))
    a = _inspected(tmp_path / "a", scores, GOOD_IMAGE, "2026-12-01T08:00:00+00:00", sha)
    b = _inspected(tmp_path / "b", scores, GOOD_IMAGE, "2026-12-02T08:00:00+00:00", sha)
    c = _inspected(tmp_path / "c", scores, GOOD_IMAGE, "2026-12-03T08:00:00+00:00", "other")
    res = CliRunner().invoke(app, ["drift", str(a), str(b), str(c), "--model", str(default)])
    assert res.exit_code == 0, res.output
    verdict = res.stdout.strip().splitlines()[-1]
    assert verdict.startswith("no drift") and "1 scan given was not compared" in verdict
    assert "skipped" in res.stderr and str(c) in res.stderr


def test_drift_leaves_out_the_scans_a_model_was_built_from(tmp_path: Path) -> None:
    """Its training scan, in its bank, scored low: as the oldest scan it made good scans of a
    PV cell read DRIFT x1.37 and of a coupon x1.45."""
    rng = np.random.default_rng(6)
    trained_on = score_summary(0.7 * rng.gamma(4.0, 0.2, 50_000))
    good = [score_summary(rng.gamma(4.0, 0.2, 50_000)) for _ in range(3)]
    g0 = _inspected(tmp_path / "g0", trained_on, GOOD_IMAGE, "2026-12-01T08:00:00+00:00")
    copy = _inspected(tmp_path / "copy", trained_on, GOOD_IMAGE, "2026-12-01T08:00:00+00:00")
    g = [_inspected(tmp_path / f"g{i + 1}", s, GOOD_IMAGE, f"2026-12-0{i + 2}T08:00:00+00:00")
         for i, s in enumerate(good)]
    model = _Model(good[0])
    assert check_drift([g0, *g], model).drifted  # taken as the product's reference
    model.card["good_scans"] = [{"path": str(g0.resolve()), "started": None, "name": None}]
    report = check_drift([g0, *g], model)
    assert not report.drifted and "built from it" in report.skipped[0]
    # a copy of it is recognised by its start time and recipe name
    for folder in (g0, copy):
        record = json.loads((folder / "scan.json").read_text())
        record["recipe"] = {"name": "golden"}
        (folder / "scan.json").write_text(json.dumps(record))
    model.card["good_scans"] = [{"path": "/elsewhere", "started": "2026-12-01T08:00:00+00:00",
                                 "name": "golden"}]
    assert not check_drift([copy, *g], model).drifted


def test_drift_reads_a_lost_sharpness_and_only_known_score_quantiles(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    scores = score_summary(rng.gamma(4.0, 0.2, 50_000))
    a = _inspected(tmp_path / "a", {**scores, "q75": "abc"},  # an extra key is not read
                   GOOD_IMAGE, "2026-12-01T08:00:00+00:00")
    b = _inspected(tmp_path / "b", scores, {**GOOD_IMAGE, "sharpness": None},
                   "2026-12-02T08:00:00+00:00")
    report = check_drift([a, b], _Model(scores))
    assert report.drifted and report.image["sharpness"] == 0.0  # nothing sharp left
    alone = check_drift([a], _Model(scores)).verdict()
    assert "image not compared (one scan" in alone
    for damage in ({"q50": "1.0"}, {"q99": True}, {"n": 2.5}):
        c = _inspected(tmp_path / f"c{len(damage)}{list(damage)[0]}", {**scores, **damage},
                       GOOD_IMAGE, "2026-12-03T08:00:00+00:00")
        with pytest.raises(Exception, match="inspection.good_scores"):
            check_drift([a, c], _Model(scores))
        shutil.rmtree(c)
    tiny = _inspected(tmp_path / "tiny", scores, {**GOOD_IMAGE, "level": 1e-320},
                      "2026-12-03T08:00:00+00:00")
    with pytest.raises(Exception, match="surface_image"):
        check_drift([a, tiny], _Model(scores))


@pytest.mark.parametrize("damage", [{"q99.9": 0.0}, {"q50": -5.0}, {"q90": 0.1},
                                    {"mean": None, "q50": None, "q90": None}])
def test_score_quantiles_no_inspection_writes_are_refused_not_compared(
        tmp_path: Path, damage: dict) -> None:
    # negative, falling or missing quantiles were compared as "x0.00" or "xnan" and the
    # verdict was "no drift" (exit 0)
    rng = np.random.default_rng(8)
    scores = score_summary(rng.gamma(4.0, 0.2, 50_000))
    edited = {k: v for k, v in {**scores, **damage}.items() if v is not None}
    scan = _scan(tmp_path / "a", edited)
    with pytest.raises(Exception, match="inspection.good_scores"):
        check_drift([scan], _Model(scores))
    # and a card whose quantiles are all 0 has nothing to compare with
    zeros = {**scores, **{k: 0.0 for k in scores if k.startswith("q")}}
    with pytest.raises(Exception, match="good_scores"):
        check_drift([_scan(tmp_path / "b", scores)], _Model(zeros))


def test_a_ratio_beside_a_limit_is_not_rounded_onto_it() -> None:
    # "DRIFT ... x0.80 (limits x0.80-x1.25)": the ratio 0.7996 read as the limit itself
    from scanner.inspection.drift import DriftReport

    report = DriftReport(drifted=True, move=1.2504, scans=[{}], skipped=[], plot=None)
    assert "x1.2504 the calibration's (limits x0.80-x1.25" in report.verdict()
    report = DriftReport(drifted=True, move=0.7996, scans=[{}, {}], skipped=[], plot=None,
                         reference="a")
    assert "x0.7996 (limits x0.80-x1.25" in report.verdict()
    report = DriftReport(drifted=False, move=0.87, scans=[{}], skipped=[], plot=None,
                         image={"level": 1.0004})
    line = report.verdict()
    assert "are x0.87 the" in line and "level x1.00" in line


def test_one_scan_is_compared_with_its_kinds_and_pixel_bands_calibration(
        tmp_path: Path) -> None:
    # the shipped default's thresholds are per kind and pixel band, and so are its
    # held-out scores: a PV cell compared with the pooled ones moved by what kind it is
    from models.drift import score_summary
    from scanner.inspection.drift import check_drift

    rng = np.random.default_rng(8)
    base = rng.gamma(4.0, 0.2, 50_000)
    folder = tmp_path / "pv"
    folder.mkdir()
    (folder / "scan.json").write_text(json.dumps({
        "recipe": {"sample": {"kind": "pv_cell"}}, "mosaic": {"pixel_size_um": 30.0},
        "inspection": {"good_scores": score_summary(1.5 * base),
                       "model": {"weights_sha256": "abc"}}}))
    model = _Model(score_summary(base))
    assert check_drift([folder], model).drifted  # x1.5 the pooled scores
    model.card["good_scores_by_sample_kind"] = {"pv_cell": score_summary(1.45 * base),
                                                "wafer": score_summary(0.5 * base)}
    report = check_drift([folder], model)
    assert not report.drifted and "(pv_cell;" in report.verdict()
    model.card["thresholds_by_pixel_size"] = {"pv_cell": [
        {"pixel_size_um": [8, 20], "threshold": 1.0, "good_scores": score_summary(base)},
        {"pixel_size_um": [20, 40], "threshold": 0.9,
         "good_scores": score_summary(1.52 * base)}]}
    report = check_drift([folder], model)
    assert not report.drifted and "(pv_cell, 20-40 um pixels;" in report.verdict()
    assert report.move == pytest.approx(1.5 / 1.52, rel=0.02)


def test_drift_refuses_a_folder_in_the_plots_place_before_comparing(tmp_path: Path) -> None:
    """``--out DIR`` with DIR/drift.png a folder: "failed: IsADirectoryError" (exit 1) after
    the comparison, and no verdict at all."""
    from typer.testing import CliRunner

    from scanner.cli import app

    default = Path(__file__).resolve().parents[1] / "models" / "default.safetensors"
    sha = json.loads(default.with_suffix(".json").read_text())["weights_sha256"]
    scores = score_summary(np.random.default_rng(5).gamma(4.0, 0.2, 10_000))
    a = _inspected(tmp_path / "a", scores, GOOD_IMAGE, "2026-12-01T08:00:00+00:00", sha)
    b = _inspected(tmp_path / "b", scores, GOOD_IMAGE, "2026-12-02T08:00:00+00:00", sha)
    (tmp_path / "out" / "drift.png").mkdir(parents=True)
    (tmp_path / "out" / "drift.png" / "mine.txt").write_text("kept")
    res = CliRunner().invoke(app, ["drift", str(a), str(b), "--model", str(default),
                                   "--out", str(tmp_path / "out")])
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert "--out" in lines[0] and "drift.png" in lines[0] and "Error" not in lines[0]
    assert (tmp_path / "out" / "drift.png" / "mine.txt").read_text() == "kept"


def test_a_record_missing_its_quantiles_is_named_by_its_own_field(tmp_path: Path) -> None:
    """A good_scores record with n but no quantiles was refused as "...good_scores: recipe:
    n is 100 but ...": no recipe is involved."""
    scores = score_summary(np.random.default_rng(9).gamma(4.0, 0.2, 10_000))
    scan = _scan(tmp_path / "a", {"n": 100})
    with pytest.raises(UserError) as info:
        check_drift([scan], _Model(scores))
    assert "inspection.good_scores: n is 100" in str(info.value)
    assert "recipe" not in str(info.value)
    with pytest.raises(UserError) as info:
        check_drift([_scan(tmp_path / "b", scores)], _Model({"n": 3}))
    assert "good_scores: n is 3" in str(info.value) and "recipe" not in str(info.value)


def test_a_scan_that_does_not_say_which_model_scored_it_is_refused(tmp_path: Path) -> None:
    """A scan whose inspection record lost its model (weights_sha256) was compared as if
    the --model had scored it: a scan inspected with the default, against a model built for
    the product, read "no drift ... x1.09" on scores of another scale."""
    rng = np.random.default_rng(3)
    scores = score_summary(rng.gamma(4.0, 0.2, 10_000))
    ok = _inspected(tmp_path / "a", scores, GOOD_IMAGE, "2026-12-01T08:00:00+00:00")
    lost = tmp_path / "b"
    lost.mkdir()
    (lost / "scan.json").write_text(json.dumps(
        {"started": "2026-12-02T08:00:00+00:00",
         "inspection": {"good_scores": score_summary(1.6 * rng.gamma(4.0, 0.2, 10_000)),
                        "surface_image": GOOD_IMAGE}}))
    with pytest.raises(UserError, match=r"b/scan\.json inspection\.model\.weights_sha256"):
        check_drift([ok, lost], _Model(scores))


def test_a_die_grid_in_a_surround_a_pixel_short_of_whole_pitches_starts_its_cells_in_the_street(
        ) -> None:
    # 5 x 5 dies of 54 px and 8 px streets in a flat surround; the scan spans 7.98 pitches, so
    # the cells fit one more repeat only with the slack. The slack's rule (cells from the
    # image's start) cut every die in two, though a street lies elsewhere (probe P21: a
    # camera-photo die grid turned 0.3 deg, 2 of 22 defects found)
    die = data.camera()[100:154, 200:254].astype(np.float32)
    pitch, o = 62, 97
    img = np.full((int(7.98 * pitch),) * 2, 20.0, dtype=np.float32)
    for i in range(5):
        for j in range(5):
            r, c = o + i * pitch + 4, o + j * pitch + 4
            img[r:r + 54, c:c + 54] = die
    img += np.random.default_rng(1).normal(0, 2.0, img.shape).astype(np.float32)
    grid = estimate_grid(img, 1.0, (0.0, 0.0))
    assert grid is not None and grid.pitch_um == pytest.approx((pitch, pitch), abs=0.5)
    # the streets run over pixels o - 4 .. o + 3 (modulo the pitch): the cells start there
    for start in grid.origin_um:
        assert abs((start + 0.5 - o + pitch / 2) % pitch - pitch / 2) <= 4.5


def test_one_scan_is_compared_with_the_image_of_the_good_scan_the_model_was_built_from(
        tmp_path: Path) -> None:
    """A golden sample trained once (``train --good GOLDEN_SCAN``) and parts inspected one by
    one: ``drift PART`` compared the part's good-surface scores with the calibration, for a
    rise only, and its image with nothing ("image not compared"), so a part scanned with
    16 x less light, whose scores stay where they were while its defects go unfound, read
    "no drift". The card now records the good scan's image and one scan's is compared with
    it."""
    rng = np.random.default_rng(8)
    calibration = score_summary(1.3 * rng.gamma(4.0, 0.2, 50_000))
    good = score_summary(rng.gamma(4.0, 0.2, 50_000))
    model = _Model(calibration)
    model.card["good_scans"] = [{"path": str(tmp_path / "golden"), "started": None,
                                 "name": "golden", "pixel_size_um": 1.0,
                                 "surface_image": GOOD_IMAGE}]
    dark = {**GOOD_IMAGE, "level": 110.0, "noise": 0.05}
    part = _inspected(tmp_path / "part", good, dark, "2026-12-05T08:00:00+00:00")
    report = check_drift([part], model)
    assert report.drifted and report.image_moved == ["level", "noise"]
    assert report.image["level"] == pytest.approx(110.0 / 1700.0)
    verdict = report.verdict()
    assert verdict.startswith("DRIFT") and "level x0.06 (moved)" in verdict
    assert "built from (golden)" in verdict
    # a part imaged as the golden was: no drift, its image compared
    same = _inspected(tmp_path / "same", good, {**GOOD_IMAGE, "level": 1650.0},
                      "2026-12-05T09:00:00+00:00")
    report = check_drift([same], model)
    assert not report.drifted and report.image["level"] == pytest.approx(1650.0 / 1700.0)
    # at another pixel size the image cannot be compared (noise and sharpness are per pixel),
    # and the line says so
    record = json.loads((part / "scan.json").read_text())
    record["mosaic"] = {"pixel_size_um": 1.1}
    (part / "scan.json").write_text(json.dumps(record))
    report = check_drift([part], model)
    assert not report.image and "imaged at 1 um pixels, this scan at 1.1" in report.verdict()
    # a damaged record in the card is refused naming it
    model.card["good_scans"][0]["surface_image"] = {"n": 3, "level": "bright"}
    with pytest.raises(UserError, match=r"good_scans\[0\]\.surface_image"):
        check_drift([same], model)


def test_train_records_the_image_of_each_good_scan(tmp_path: Path) -> None:
    """What ``drift`` compares a part's image with: the good scan's level (the simulated
    camera puts a reflectance of 1 at 80 % of its 12-bit range), noise and sharpness, as
    inspection measures a scan's."""
    from conftest import scan_of_image

    from models.drift import image_ratios
    from scanner.cli_tools import _scan_identities

    surface = 0.5 + 0.2 * data.camera()[:400, :400].astype(np.float64) / 255.0
    folder = scan_of_image(tmp_path, surface, camera_px=256)
    [record] = _scan_identities([folder, tmp_path / "sample.tif"])
    assert record["path"] == str(folder.resolve()) and record["pixel_size_um"] == 1.0
    image = record["surface_image"]
    assert image["n"] >= 16
    assert image["level"] == pytest.approx(0.8 * 4095 * float(np.median(surface)), rel=0.1)
    assert 0.002 < image["noise"] < 0.05
    (tmp_path / "again").mkdir()
    again = scan_of_image(tmp_path / "again", surface, camera_px=256, seed=3)
    ratios = image_ratios(image, _scan_identities([again])[0]["surface_image"])
    assert all(0.9 < v < 1.1 for v in ratios.values()), ratios
