"""The one-class detector: memory bank, coreset, build from good images, card, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from skimage import data

from models.bank import greedy_coreset, nearest_distance
from models.build import build_detector, features_of
from models.data import GoodImage
from models.detector import PatchDetector
from models.errors import InputError
from models.modelfile import default_model_path, load_model


def _product(seed: int = 0) -> np.ndarray:
    """A repeating product from a real photograph: a grid of brick cells with dark streets."""
    cell = data.brick()[:120, :120].astype(np.float32)
    grid = np.full((4 * 136, 4 * 136), 40.0, dtype=np.float32)
    for i in range(4):
        for j in range(4):
            grid[i * 136 + 8 : i * 136 + 128, j * 136 + 8 : j * 136 + 128] = cell
    rng = np.random.default_rng(seed)
    return grid + rng.normal(0, 2.0, grid.shape).astype(np.float32)


def _relative(img: np.ndarray) -> np.ndarray:
    return img / np.float32(np.median(img))


def test_nearest_distance_equals_an_exhaustive_search() -> None:
    gen = torch.Generator().manual_seed(0)
    bank = torch.randn(700, 24, generator=gen)
    queries = torch.randn(5000, 24, generator=gen)
    expected = torch.cdist(queries, bank).min(1).values
    assert torch.allclose(nearest_distance(queries, bank), expected, atol=1e-4)


def test_the_index_of_a_large_bank_finds_the_nearest_neighbour_of_clustered_features() -> None:
    from models.bank import INDEX_MIN_BANK, BankIndex

    rng = np.random.default_rng(3)
    centres = rng.normal(size=(200, 32)).astype(np.float32) * 4
    bank = torch.from_numpy(centres[rng.integers(0, 200, INDEX_MIN_BANK * 2)]
                            + rng.normal(size=(INDEX_MIN_BANK * 2, 32)).astype(np.float32))
    queries = torch.from_numpy(centres[rng.integers(0, 200, 3000)]
                               + rng.normal(size=(3000, 32)).astype(np.float32))
    index = BankIndex(bank)
    assert index.index is not None  # the inverted file, not the exhaustive search
    exact = nearest_distance(queries, bank)
    found = index.distances(queries)
    assert (found >= exact - 1e-3).all()  # never nearer than the true nearest
    assert float((found <= exact + 1e-3).float().mean()) > 0.97


def test_coreset_keeps_a_rare_cluster_a_random_subset_drops() -> None:
    gen = torch.Generator().manual_seed(1)
    common = torch.randn(5000, 8, generator=gen)
    rare = torch.randn(5, 8, generator=gen) * 0.1 + 20.0  # far from everything else
    feats = torch.cat([common, rare])
    chosen = greedy_coreset(feats, 50, seed=0)
    assert len(set(chosen.tolist())) == 50
    assert (chosen >= 5000).any()  # the rare cluster is represented
    # the coreset covers every feature better than its size in random picks would
    cover = nearest_distance(feats, feats[chosen]).max()
    random_cover = nearest_distance(feats, feats[torch.randperm(len(feats))[:50]]).max()
    assert cover < random_cover


def test_coreset_started_from_a_bank_adds_only_what_it_does_not_cover() -> None:
    gen = torch.Generator().manual_seed(2)
    old = torch.randn(200, 8, generator=gen)
    new = torch.cat([old[:100] + 0.001, torch.randn(20, 8, generator=gen) + 30.0])
    chosen = greedy_coreset(new, 20, start=old, seed=0)
    assert (chosen >= 100).all()  # the new, uncovered appearance; not copies of the old


@pytest.mark.slow
def test_features_of_a_large_image_match_the_windowed_inspection_grid() -> None:
    img = _relative(np.tile(data.brick().astype(np.float32), (4, 4)))[:1700, :1800]
    f = features_of(img)
    assert f.shape == (176, -(-1700 // 8), -(-1800 // 8))
    assert torch.isfinite(f).all()
    # windows agree where they meet: no seam in the features along the window boundary
    seam = (f[:, :, 191] - f[:, :, 192]).norm(dim=0).mean()
    inside = (f[:, :, 100] - f[:, :, 101]).norm(dim=0).mean()
    assert seam < 2.0 * inside


@pytest.fixture(scope="module")
def product_model(tmp_path_factory: pytest.TempPathFactory) -> PatchDetector:
    out = tmp_path_factory.mktemp("det") / "product"
    # camera images of the product, inspected against camera images of it: as acquired
    report = build_detector([GoodImage(_relative(_product(0)))], out, pixel_size_um=1.0,
                            augment_camera=False)
    assert report.weights.is_file() and report.card_path.is_file()
    return load_model(out)


def test_a_detector_built_from_one_good_image_finds_painted_defects(
        product_model: PatchDetector) -> None:
    good = _product(1)  # another copy: new camera noise
    bad = good.copy()
    bad[200:216, 60:76] = 400.0  # a bright particle on a brick cell
    bad[329:334, 300:360] = 400.0  # a bright scratch
    thr = product_model.threshold
    a_good = product_model.predict_image(good)["anomaly"]
    a_bad = product_model.predict_image(bad)["anomaly"]
    assert a_good.max() < thr  # the good copy raises no false alarm
    assert a_bad[50:54, 15:19].max() > thr
    assert a_bad[82:84, 75:90].max() > thr
    assert a_bad.max() > 1.5 * a_good.max()


def test_an_image_predicted_whole_is_mirrored_as_its_bank_saw_it(
        product_model: PatchDetector) -> None:
    """The whole-image path (calibration's held-out windows) mirrored with the border pixel
    repeated while the bank's images and inspection's windows do not: a texture's border
    cells scored 10-20 x their distance in the bank."""
    other = np.tile(data.grass()[:136, :136].astype(np.float32), (2, 2))
    x = product_model.normalize(other)
    f = features_of(x)
    bank_view = product_model.index.distances(f.permute(1, 2, 0).reshape(-1, f.shape[0]))
    xp, k = product_model._with_context(x)
    k8 = k * product_model.output_stride // 8
    whole = product_model.distances(xp[None])[0, k8 : k8 + f.shape[1], k8 : k8 + f.shape[2]]
    assert torch.allclose(whole.reshape(-1), bank_view, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("large_bank", [False, True])
def test_a_windows_context_is_not_searched_and_its_kept_maps_are_exact(
        product_model: PatchDetector, large_bank: bool) -> None:
    """Mosaic windows drop ``margin`` map pixels of context on each side: the bank is not
    searched for the cells only they read, and every kept pixel is bit for bit the same."""
    model = product_model
    if large_bank:  # the faiss inverted file instead of the exact search
        gen = torch.Generator().manual_seed(0)
        extra = model.bank[torch.randint(len(model.bank), (5000,), generator=gen)]
        model = PatchDetector(extra + 0.05 * torch.randn(extra.shape, generator=gen),
                              dict(model.card))
        assert model.index.index is not None
    x = _relative(_product(2))[:328, :296][None]  # 82 x 74 map pixels, 41 x 37 cells
    whole = model.predict(x)
    for margin in (1, 2, 7, 8, 13):
        part = model.predict(x, margin=margin)
        keep = (0, slice(margin, 82 - margin), slice(margin, 74 - margin))
        for name in ("anomaly", "uncertainty"):
            assert np.array_equal(part[name][keep], whole[name][keep]), (name, margin)
        if margin >= 4:  # cells only the dropped pixels read were not searched
            assert np.isnan(part["anomaly"][0, 0, 0]) and np.isnan(part["anomaly"][0, -1, -1])
    # the whole map when nothing is dropped
    assert np.array_equal(model.predict(x, margin=0)["anomaly"], whole["anomaly"])


def test_card_records_backbone_calibration_and_warnings(product_model: PatchDetector) -> None:
    card = product_model.card
    assert card["architecture"]["name"] == "PatchCore"
    assert len(card["architecture"]["backbone"]["weights_sha256"]) == 64
    cal = card["calibration"]
    assert cal["held_out"] == "the central quarter of each image"
    assert any("extrapolated" in w for w in cal["warnings"])  # 0.0007 cm² held out
    assert card["threshold"] >= cal["empirical_threshold"]
    assert card["good_scores"]["n"] > 1000
    assert card["sample_edge_seen"] is False  # an image file: no sample edge, no chuck beyond
    maps = product_model.predict_image(_product(2))
    assert np.isfinite(maps["roughness"]).all()  # the roughness network runs beside it
    assert 0.0 <= maps["uncertainty"].min() and maps["uncertainty"].max() <= 1.0


def test_init_extends_a_detector_and_leaves_it_unchanged(
        product_model: PatchDetector, tmp_path: Path) -> None:
    before = Path(product_model.path).read_bytes()
    other = np.tile(data.grass()[:136, :136].astype(np.float32), (4, 4))
    report = build_detector([GoodImage(_relative(other))], tmp_path / "more",
                            init=product_model.path)
    assert Path(product_model.path).read_bytes() == before
    bigger = load_model(report.weights)
    n_old = len(product_model.bank)
    assert len(bigger.bank) > n_old
    assert torch.equal(bigger.bank[:n_old], product_model.bank)
    assert bigger.card["history"][0]["sha256"] == product_model.card["weights_sha256"]
    # the new appearance is now normal
    assert bigger.predict_image(other)["anomaly"].max() < \
        product_model.predict_image(other)["anomaly"].max()


def test_an_extended_model_flags_its_base_good_surface_no_more_than_the_base(
        tmp_path: Path) -> None:
    """Extended with a smoothed gravel, whose good cells lie closer together, a gravel model
    took the new images' lower score reference: the old gravel, as near its kept bank as
    before, scored x1.12 higher and 12 false defects came on 3.5 cm² where the base had none."""
    from scipy import ndimage

    rng = np.random.default_rng(0)
    gravel = data.gravel().astype(np.float32)

    def noisy(img: np.ndarray) -> np.ndarray:
        return _relative(img + rng.normal(0, 3.0, img.shape).astype(np.float32) + 5.0)

    base = build_detector([GoodImage(noisy(gravel[:320, :320]))], tmp_path / "base",
                          augment_camera=False)
    smooth = ndimage.gaussian_filter(gravel, 1.5)
    report = build_detector([GoodImage(noisy(smooth[:320, :320]))], tmp_path / "more",
                            init=base.weights, augment_camera=False)
    old, more = load_model(base.weights), load_model(report.weights)
    good = noisy(gravel[192:, 192:])  # the old product, another crop and noise
    ratio_old = old.predict_image(good)["anomaly"].max() / old.threshold
    ratio_more = more.predict_image(good)["anomaly"].max() / more.threshold
    assert ratio_more <= ratio_old * 1.001, (ratio_old, ratio_more)
    if "init_threshold" in report.card["calibration"]:
        assert any("--init" in w for w in report.warnings)


def test_a_full_bank_extended_learns_the_new_images_and_stays_bounded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model whose bank was full kept its old bank alone when extended (no room): a new
    product then scored as far from everything, and 1 of its 21 defects was found."""
    import models.build as build

    full = build_detector([GoodImage(_relative(_product(0)))], tmp_path / "full",
                          augment_camera=False, bank_max=600)
    old = load_model(full.weights)
    assert len(old.bank) == 600  # full
    other = np.tile(data.grass()[:136, :136].astype(np.float32), (4, 4))
    report = build_detector([GoodImage(_relative(other))], tmp_path / "more",
                            init=full.weights, augment_camera=False, bank_max=600)
    more = load_model(report.weights)
    assert len(more.bank) > 600 and report.card["bank"]["from_init"] == 600
    assert torch.equal(more.bank[:600], old.bank)
    # the grass is normal now: the extended model scores a defect on it as a model of the
    # grass alone does (before: both painted defects under the threshold, at 1.03 and 0.86)
    alone = load_model(build_detector([GoodImage(_relative(other))], tmp_path / "alone",
                                      augment_camera=False, bank_max=600).weights)
    bad = other.copy()
    bad[200:216, 60:76] = 1.5 * other.max()  # a bright particle
    bad[329:334, 300:360] = 1.5 * other.max()  # a bright scratch
    for model in (more, alone):
        a = model.predict_image(bad)["anomaly"]
        assert a[50:54, 15:19].max() > 1.5 * model.threshold
        assert a[82:84, 75:90].max() > 1.5 * model.threshold
    assert np.quantile(more.predict_image(other)["anomaly"], 0.99) < 1.1 * np.quantile(
        alone.predict_image(other)["anomaly"], 0.99)
    # past the cap, the old features that the new ones repeat are dropped, the new ones kept
    monkeypatch.setattr(build, "BANK_MAX_EXTENDED", 700)
    capped = build_detector([GoodImage(_relative(other))], tmp_path / "capped",
                            init=full.weights, augment_camera=False, bank_max=600)
    bank = load_model(capped.weights).bank
    kept = capped.card["bank"]["from_init"]
    assert kept < 600 and len(bank) - kept - capped.card["bank"]["from_held_out"] == 700 - kept


def test_a_damaged_detector_file_is_refused_with_the_file_named(
        product_model: PatchDetector, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    card = dict(product_model.card)
    weights = tmp_path / "m.safetensors"
    save_file({"bank": torch.full((10, 176), float("nan"))}, str(weights))
    card.pop("weights_sha256")
    (tmp_path / "m.json").write_text(json.dumps(card))
    # a card without its checksum: flipped weights were loaded unchecked
    with pytest.raises(InputError, match="weights_sha256: missing"):
        load_model(weights)
    from models.modelfile import _weights_sha256

    card["weights_sha256"] = _weights_sha256(weights)
    (tmp_path / "m.json").write_text(json.dumps(card))
    with pytest.raises(InputError, match="non-finite"):
        load_model(weights)
    card["architecture"] = {**card["architecture"],
                            "backbone": {"weights_sha256": "0" * 64}}
    (tmp_path / "m.json").write_text(json.dumps(card))
    with pytest.raises(InputError, match="backbone"):
        load_model(weights)


def test_cli_trains_on_a_good_image_and_scores_images(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from scanner.cli import app

    good = _product(0).clip(0, 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "good.tif", good)
    test = tmp_path / "test"
    test.mkdir()
    bad = _product(3)
    bad[100:120, 200:220] = 0.0
    tifffile.imwrite(test / "bad.tif", bad.clip(0, 255).astype(np.uint8))
    tifffile.imwrite(test / "ok.tif", _product(4).clip(0, 255).astype(np.uint8))
    runner = CliRunner()
    # a name with a dot: the model written is the one the same name reads back
    result = runner.invoke(app, ["train", "--good", str(tmp_path / "good.tif"), "--out",
                                 str(tmp_path / "coupon_v1.2")])
    assert result.exit_code == 0, result.output
    assert "threshold" in result.output
    assert "taken as 1 µm/px" in result.stderr  # files carry no pixel size: it says so
    assert (tmp_path / "coupon_v1.2.safetensors").is_file()
    card = json.loads((tmp_path / "coupon_v1.2.json").read_text())
    # a die grid: compared die-to-die, no golden image kept; the card says its dies repeat
    # but sets no z threshold from the file (a scan's dies agree less than a file's)
    assert "golden" not in card and card["die_to_die"]["found_grid_repeats"] is True
    assert card["die_to_die"]["dies"] >= 3 and "z_threshold" not in card["die_to_die"]
    assert card["pixel_size_assumed"] is True
    result = runner.invoke(app, ["inspect", str(test), "--model", str(tmp_path / "coupon_v1.2"),
                                 "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    rows = (tmp_path / "o" / "scores.csv").read_text().splitlines()
    scores = {r.split(",")[0]: float(r.split(",")[1]) for r in rows[1:]}
    assert scores["bad.tif"] > scores["ok.tif"]
    result = runner.invoke(app, ["train", "--good", str(tmp_path / "nothing"), "--out",
                                 str(tmp_path / "m2")])
    assert result.exit_code == 2
    assert "nothing" in result.output


def test_a_card_says_when_it_does_not_fit_the_pixel_size_inspected(caplog) -> None:
    from models.card import ModelCard, card_of
    from scanner.inspection.card import _decision_threshold

    shipped = card_of(load_model(None))
    # the PV cell bands span 8-38 um pixels: a 40 um scan is inside the slack, 60 um is not
    assert shipped.pixel_size_warning("pv_cell", 20.0) is None
    assert shipped.pixel_size_warning("pv_cell", 40.0) is None
    assert "8.049-38.179 um/px" in shipped.pixel_size_warning("pv_cell", 60.0)
    assert shipped.pixel_size_warning("wafer", 60.0) is None  # no bands for wafers
    assumed = ModelCard(architecture={}, pixel_size_um=1.0, pixel_size_assumed=True)
    assert assumed.pixel_size_warning(None, 1.1) is None
    assert "--pixel-size" in assumed.pixel_size_warning(None, 2.0)
    assert ModelCard(architecture={}, pixel_size_um=1.0).pixel_size_warning(None, 2.0) is None

    class _Model:  # what inspection holds: a card and a threshold
        card = {"architecture": {}, "pixel_size_um": 1.0, "pixel_size_assumed": True}
        threshold = 0.5

    with caplog.at_level("WARNING", logger="waferscope.inspect"):
        assert _decision_threshold(_Model(), None, "image", 2.0)[0] == 0.5
    assert "runs at this source's 2 um/px" in caplog.text
    # and it does: resampled to the assumed 1 um, a part scanned at 2 or 0.5 um showed 1 of
    # 8 and 0 of 9 of its defects
    from scanner.inspection.maps import grid_pixel_um

    assert grid_pixel_um(_Model(), 2.0) == 2.0 and grid_pixel_um(_Model(), 0.5) == 0.5
    _Model.card = {"architecture": {}, "pixel_size_um": 1.0}
    _Model.pixel_size_um = 1.0
    assert grid_pixel_um(_Model(), 2.0) == 1.0  # a model built at a known size runs at it


def test_camera_variants_blur_an_image_file_and_bring_its_noise_to_each_level() -> None:
    from models.variants import CAMERA_VARIANTS, camera_variants, noise_sigma

    clean = np.full((256, 256), 1.0, dtype=np.float32)
    clean[:, 128:] = 2.0  # an edge: blur must soften it
    variants = camera_variants(clean, np.random.default_rng(0))
    assert len(variants) == len(CAMERA_VARIANTS)
    for (sigma_px, level), v in zip(CAMERA_VARIANTS, variants, strict=True):
        assert noise_sigma(v[:, :100]) == pytest.approx(level, rel=0.25)
        # the edge spread over the blur: a pixel sigma before it has risen a fifth of the step
        assert float(v[:, 128 - int(sigma_px)].mean()) > 1.15
        assert float(v[:, 128 - int(4 * sigma_px)].mean()) < 1.02


def test_a_golden_scan_covers_the_stride_phases_a_second_scan_brings(tmp_path: Path) -> None:
    # the die pitch (136 px) is a multiple of the feature stride, so one scan shows the dies
    # at one phase of the stride-8 grid; a second part lands 3 and 5 px further
    scan = GoodImage(_relative(_product(0)), meta={"acquired": True, "pixel_size_um": 1.0})
    build_detector([scan], tmp_path / "golden", pixel_size_um=1.0)
    model = load_model(tmp_path / "golden")
    second = _relative(_product(1))[3:, 5:]
    anomaly = model.predict_image(second)["anomaly"][4:-4, 4:-4]  # the reach of its borders
    assert float(np.quantile(anomaly, 0.999)) < 0.8 * model.threshold
    assert float(anomaly.max()) < model.threshold  # no false defect on a good second part


def test_an_aligned_part_is_also_modelled_per_position(tmp_path: Path) -> None:
    from scanner.inspection.maps import infer_image

    # 48 good crops of one part at the same place (cells cut to one size): a bright square is
    # normal at one position only
    rng = np.random.default_rng(0)
    part = np.full((128, 128), 100.0, dtype=np.float32)
    part[16:48, 16:48] = 200.0
    goods = [GoodImage(_relative(part * np.float32(1 + rng.normal(0, 0.02))
                                 + rng.normal(0, 3, part.shape).astype(np.float32)))
             for _ in range(48)]
    build_detector(goods, tmp_path / "cells", pixel_size_um=1.0)
    model = load_model(tmp_path / "cells")
    assert model.position is not None and model.card["architecture"]["position"]["grid"] == [8, 8]
    # modelled at three sizes (128 px halved is still 64 px), each kept in the file
    assert [pm.zoom for pm in model.position] == [1.0, 0.75, 0.5]
    assert [z["grid"] for z in model.card["architecture"]["position"]["zooms"]] == [[6, 6], [4, 4]]
    good = part + rng.normal(0, 3, part.shape).astype(np.float32)
    moved = np.full_like(good, 100.0) + rng.normal(0, 3, part.shape).astype(np.float32)
    moved[80:112, 80:112] = 200.0  # the same square where it never is
    a_good = infer_image(model, good).maps["anomaly"]
    a_moved = infer_image(model, moved).maps["anomaly"]
    assert float(a_good.max()) < model.threshold
    assert float(a_moved[20:28, 20:28].max()) > model.threshold  # found at its new place
    # another size is not the aligned part: the bank alone scores it
    assert model.aligned_anomaly(np.ones((120, 128), np.float32)) is None
    # a dark spot is found where it is by the mean map (the coarse zooms place it to a cell)
    spot = good.copy()
    spot[84:100, 60:76] = 30.0
    a_spot = infer_image(model, spot).maps["anomaly"]
    peak = np.unravel_index(int(np.argmax(a_spot)), a_spot.shape)
    assert a_spot.max() > model.threshold and abs(peak[0] - 23) <= 4 and abs(peak[1] - 17) <= 4


def test_gaussians_of_two_image_sets_merge_as_fitted_on_all() -> None:
    from models.gaussian import fit_position_model, merged_position_model

    rng = np.random.default_rng(3)
    dims = torch.arange(6)
    feats = torch.from_numpy(rng.normal(0, 1, (60, 6, 3, 4)).astype(np.float32))
    feats[30:] += 0.5  # the second set a little different: the pooled means move
    held = torch.from_numpy(rng.normal(0, 1, (5, 6, 3, 4)).astype(np.float32))
    desc = held.mean(dim=(2, 3))
    whole = fit_position_model(feats, held, desc, dims, (48, 64))
    a = fit_position_model(feats[:30], held, desc, dims, (48, 64))
    b = fit_position_model(feats[30:], held, desc, dims, (48, 64))
    m = merged_position_model(a, 30, b, 30)
    torch.testing.assert_close(m.mean, whole.mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.precision, whole.precision, atol=1e-3, rtol=1e-3)
    assert len(m.ref_levels) == 10  # the new held-out images first, then the old ones


def test_a_model_of_an_aligned_part_extended_keeps_its_position_model(tmp_path: Path,
                                                                       caplog) -> None:
    from scanner.inspection.maps import infer_image

    rng = np.random.default_rng(0)
    part = np.full((128, 128), 100.0, dtype=np.float32)
    part[16:48, 16:48] = 200.0

    def cells(n: int, shape: tuple[int, int] = (128, 128)) -> list[GoodImage]:
        return [GoodImage(_relative((part * np.float32(1 + rng.normal(0, 0.02))
                                     + rng.normal(0, 3, part.shape))[: shape[0], : shape[1]]
                                    .astype(np.float32))) for _ in range(n)]

    build_detector(cells(48), tmp_path / "base", pixel_size_um=1.0)
    base_bytes = (tmp_path / "base.safetensors").read_bytes()
    moved = np.full_like(part, 100.0) + rng.normal(0, 3, part.shape).astype(np.float32)
    moved[80:112, 80:112] = 200.0  # the square where it never is
    good = part + rng.normal(0, 3, part.shape).astype(np.float32)
    # 12 more cells of the part: its Gaussians take them in (they were dropped: the bank
    # alone scored the extended model's cells, and flagged good ones)
    build_detector(cells(12), tmp_path / "more", init=tmp_path / "base.safetensors")
    more = load_model(tmp_path / "more")
    assert more.position is not None and [pm.zoom for pm in more.position] == [1.0, 0.75, 0.5]
    cal = more.card["position_calibration"]
    assert cal["used"] and cal["from_init_images"] > 0
    assert cal["train_images"] > cal["from_init_images"]
    assert float(infer_image(more, good).maps["anomaly"].max()) < more.threshold
    assert float(infer_image(more, moved).maps["anomaly"][20:28, 20:28].max()) > more.threshold
    # images of another size cannot add to it: kept as it was, and the card says so
    build_detector(cells(10, (120, 128)), tmp_path / "other", init=tmp_path / "base.safetensors")
    other = load_model(tmp_path / "other")
    assert other.position is not None and other.card["position_calibration"]["kept_from_init"]
    assert any("per-position model" in w for w in other.card["calibration"]["warnings"])
    assert float(infer_image(other, moved).maps["anomaly"][20:28, 20:28].max()) > other.threshold
    assert (tmp_path / "base.safetensors").read_bytes() == base_bytes
    # images of another shape inspected with it: said, since the bank scores them
    import logging

    from scanner.inspection.images import inspect_images

    folder = tmp_path / "cells"
    folder.mkdir()
    tifffile.imwrite(folder / "a.tif", (good * 10).astype(np.uint16))
    tifffile.imwrite(folder / "b.tif", (good[:120] * 10).astype(np.uint16))
    with caplog.at_level(logging.WARNING, logger="waferscope.inspect"):
        inspect_images([folder], tmp_path / "out", model=tmp_path / "more.safetensors")
    assert "1 of 2 images are not 128 x 128 px" in caplog.text and "b.tif" in caplog.text


def test_a_position_model_of_one_zoom_loads_as_written_before_zooms() -> None:
    from models.gaussian import fit_position_model, position_from_state, position_record

    rng = np.random.default_rng(2)
    feats = torch.from_numpy(rng.normal(size=(12, 4, 3, 3)).astype(np.float32))
    dims = torch.arange(4)
    one = fit_position_model(feats[:8], feats[8:], feats[8:].mean(dim=(2, 3)), dims, (48, 48))
    state = one.state()
    record = position_record([one])
    assert record["zooms"] == []
    record.pop("zooms")
    record.pop("zoom")  # a card of before zooms
    (loaded,) = position_from_state(record, state)
    assert loaded.zoom == 1.0
    assert torch.equal(loaded.anomaly(feats[:2].repeat_interleave(2, 2).repeat_interleave(2, 3)),
                       one.anomaly(feats[:2].repeat_interleave(2, 2).repeat_interleave(2, 3)))


def test_random_crops_of_a_texture_are_not_taken_for_an_aligned_part(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    tex = data.gravel().astype(np.float32)
    corners = rng.integers(0, tex.shape[0] - 128, (44, 2))
    goods = [GoodImage(_relative(tex[r : r + 128, c : c + 128])) for r, c in corners]
    report = build_detector(goods, tmp_path / "crops", pixel_size_um=1.0)
    assert report.card["architecture"]["position"] is None
    assert report.card["position_calibration"]["used"] is False
    assert report.card["position_calibration"]["variance_ratio"] > 0.85


def test_the_crops_of_one_large_good_scan_also_cover_the_stride_phases(tmp_path: Path) -> None:
    # a large good scan comes as crops (scanner.inspection.goodimages): all at the scan's one phase
    full = _relative(np.tile(_product(0), (2, 3)))
    crops = [GoodImage(full[r : r + 272, c : c + 272].copy(),
                       meta={"acquired": True, "pixel_size_um": 1.0})
             for r in (0, 272, 544, 816) for c in (0, 272, 544, 816, 1088)]
    build_detector(crops, tmp_path / "crops", pixel_size_um=1.0)
    model = load_model(tmp_path / "crops")
    assert model.card["calibration"]["held_out"] == "whole images"
    second = _relative(_product(1))[3:, 5:]
    anomaly = model.predict_image(second)["anomaly"][4:-4, 4:-4]
    assert float(anomaly.max()) < model.threshold  # no false defect on a good second part


def test_a_sample_edge_is_seen_only_in_images_that_reach_beyond_the_sample() -> None:
    from models.build import _sample_edge_seen

    img = np.ones((64, 64), dtype=np.float32)
    edge = np.ones((64, 64), dtype=bool)
    edge[:, 50:] = False  # the chuck beyond the sample's edge, as a scan's mosaic shows it
    assert not _sample_edge_seen([GoodImage(img)])
    assert not _sample_edge_seen([GoodImage(img, usable=np.ones((64, 64), dtype=bool))])
    assert _sample_edge_seen([GoodImage(img), GoodImage(img, usable=edge)])


def test_a_golden_image_shows_comparable_dies_only_where_it_repeats() -> None:
    from scanner.inspection.goodimages import good_image_die_to_die

    product = good_image_die_to_die(_relative(_product(0)), 1.0)
    assert product is not None and product["dies"] == 16 and product["found_grid_repeats"]
    assert product["good_max_z"] < 4.0 and product["z_threshold"] == 7.0
    for picture in (data.camera(), data.moon()):  # photographs with no repeat: no dies
        assert good_image_die_to_die(_relative(picture.astype(np.float32) + 1.0), 1.0) is None


@pytest.mark.slow
def test_a_model_extended_with_image_files_keeps_its_pixel_size(tmp_path: Path) -> None:
    """A 5 um model extended with files and no --pixel-size was written as 1 um (assumed):
    inspected at 5 um, a good image gave 464 defects."""
    from typer.testing import CliRunner

    from scanner.cli import app

    tifffile.imwrite(tmp_path / "good.tif", _product(0).clip(0, 255).astype(np.uint8))
    tifffile.imwrite(tmp_path / "more.tif", _product(4).clip(0, 255).astype(np.uint8))
    runner = CliRunner()
    res = runner.invoke(app, ["train", "--good", str(tmp_path / "good.tif"), "--pixel-size", "5",
                              "--out", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["train", "--init", str(tmp_path / "m"), "--good",
                              str(tmp_path / "more.tif"), "--out", str(tmp_path / "m2")])
    assert res.exit_code == 0, res.output
    card = json.loads((tmp_path / "m2.json").read_text())
    assert card["pixel_size_um"] == 5.0 and card["pixel_size_assumed"] is False
    assert "taken as 1 µm/px" not in res.stderr
    # images of another pixel size do not extend it: its bank's features are of its own
    # scale (a 5 um model extended at 3 um was written as a 3 um model, exit 0)
    res = runner.invoke(app, ["train", "--init", str(tmp_path / "m"), "--good",
                              str(tmp_path / "more.tif"), "--pixel-size", "3",
                              "--out", str(tmp_path / "m3")])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "built at 5 um per pixel" in lines[0], lines
    assert not (tmp_path / "m3.json").exists()


@pytest.mark.slow
def test_files_extending_a_model_of_many_pixel_sizes_are_said_to_be_assumed(
        tmp_path: Path) -> None:
    """The shipped default, built over 0.5-40 um, extended with a gravel photograph and no
    --pixel-size: the file was taken at the default's nominal 1 um without a word and the
    card said the pixel size was not assumed (inspection then warns of no mismatch)."""
    from typer.testing import CliRunner

    from scanner.cli import app

    gravel = data.gravel()[:256, :256].astype(np.float32)
    tifffile.imwrite(tmp_path / "good.tif", gravel.astype(np.uint8))
    res = CliRunner().invoke(app, ["train", "--init", str(default_model_path()), "--good",
                                   str(tmp_path / "good.tif"), "--out", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    assert "taken as 1 µm/px" in res.stderr
    assert json.loads((tmp_path / "m.json").read_text())["pixel_size_assumed"] is True


def test_image_inspection_skips_hidden_files_and_keeps_out_of_the_image_folder(
        tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from scanner.cli import app
    from scanner.inspection.images import list_images

    images = tmp_path / "lot"
    (images / ".thumbs").mkdir(parents=True)
    tifffile.imwrite(images / "a.tif", _product(1).clip(0, 255).astype(np.uint8))
    (images / "._a.tif").write_bytes(b"\x00\x05\x16\x07 Mac OS X resource fork")
    tifffile.imwrite(images / ".thumbs" / "a.tif", np.zeros((8, 8), np.uint8))
    assert [name for name, _ in list_images([images])] == ["a.tif"]
    # train reads the same folder as inspect does (it stopped on "._a.tif": cannot read)
    from models.data import load_good_images
    from scanner.inspection.goodimages import load_good

    assert [g.source for g in load_good([images])[0]] == ["a.tif"]
    assert [g.source for g in load_good_images([images])] == ["a.tif"]
    (images / "defects.csv").write_text("the user's own list\n")
    res = CliRunner().invoke(app, ["inspect", str(images), "--out", str(images)])
    assert res.exit_code == 2 and "is the folder of images inspected" in res.stderr
    assert (images / "defects.csv").read_text() == "the user's own list\n"


def test_a_pixel_size_that_would_fill_the_memory_is_named(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from scanner.errors import UserError
    from scanner.inspection.maps import infer_image

    model = SimpleNamespace(card={}, pixel_size_um=5.0, output_stride=4, context_px=32)
    with pytest.raises(UserError, match="check --pixel-size"):
        infer_image(model, np.zeros((1024, 1024), np.float32), pixel_size_um=1000.0)


def test_the_border_band_is_held_out_in_the_middle_of_each_side_never_a_corner() -> None:
    from models import edgeband
    from models.build import _held_block

    usable = np.ones((120, 100), dtype=bool)
    usable[:, 90:] = False  # the part ends before the image does
    band = edgeband.band(usable)
    assert band[0, 50] and band[60, 89 - edgeband.EDGE_CELLS + 1] and not band[60, 50]
    # a crop of a larger image: only the part's own border is an edge
    crop = edgeband.band(usable, image_border=False)
    assert not crop[0, 50] and crop[60, 85] and not crop[60, 5]
    rows, cols, _ = _held_block(usable)
    seg = edgeband.held_segments(band, rows, cols)
    assert seg[60, 0] and seg[0, 45] and seg[119, 45] and seg[60, 89]
    for r, c in ((0, 0), (0, 89), (119, 0), (119, 89)):  # no corner
        assert not seg[max(r - 10, 0):r + 10, max(c - 10, 0):c + 10].any()
    assert not (seg & ~band).any()
    assert edgeband.edge_factor(np.ones(10), np.ones(10)) is None  # too few cells to say
    cal = edgeband.edge_factor(np.linspace(0, 1, 5000), np.linspace(0, 1.3, 500))
    assert cal["factor"] == pytest.approx(1.3, rel=0.01) and cal["band_px"] == 64
    # a border scoring lower than the inside is not made more sensitive
    assert edgeband.edge_factor(np.linspace(0, 1, 5000), np.linspace(0, 0.5, 500))[
        "factor"] == 1.0


def _plain(seed: int, n: int = 1024) -> np.ndarray:
    """A plain textured coupon (1 % relief) with 0.6 % camera noise, relative reflectance."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    tex = ndimage.gaussian_filter(rng.normal(size=(n, n)), 2)
    img = 0.6 + tex / tex.std() * 0.01 + rng.normal(0, 0.006, (n, n))
    return (img / 0.6).astype(np.float32)


@pytest.mark.slow
def test_a_plain_parts_border_is_calibrated_apart_and_raises_no_false_alarm(
        tmp_path: Path) -> None:
    # a plain part's border scores higher than its inside, which the threshold is calibrated
    # on (the centre of one good image): second copies peaked over the threshold there
    from scanner.inspection.maps import infer_image

    report = build_detector([GoodImage(_plain(0), source="good", meta={"acquired": True})],
                            tmp_path / "plain", pixel_size_um=1.0)
    edge = report.card["calibration"]["edge"]
    assert edge["factor"] > 1.05 and edge["edge_cells"] > 1000
    model = load_model(report.weights)
    flat = load_model(report.weights)
    flat.card["calibration"].pop("edge")
    b = edge["band_px"] // 4
    for seed in (1, 2):
        image = _plain(seed) * 1000
        a = infer_image(model, image).maps["anomaly"]
        a0 = infer_image(flat, image).maps["anomaly"]
        inner = (slice(b, -b), slice(b, -b))
        np.testing.assert_array_equal(a[inner], a0[inner])  # only the band changes
        ring = np.ones(a.shape, dtype=bool)
        ring[inner] = False
        assert a0[ring].max() > a0[inner].max()  # the border is where the map peaks
        np.testing.assert_allclose(a[ring], a0[ring] / edge["factor"], rtol=1e-5)
        assert a.max() < model.threshold  # a good copy: nothing over the threshold


@pytest.mark.slow
def test_a_good_image_file_of_any_height_builds(tmp_path: Path) -> None:
    # an image file's variants (shifted by half a cell) have a row of cells more than the
    # image itself at heights of 8k + 1 and 8k + 2 px: the border band's calibration indexed
    # past its grid ("IndexError: index 147 is out of bounds", train exit 1 on 1178 px)
    image = _plain(3, 784)[:778] * 1000  # 778 = 8 x 97 + 2
    report = build_detector([GoodImage(image, source="good.tif")], tmp_path / "m",
                            pixel_size_um=1.0)
    assert report.card["calibration"]["edge"]["edge_cells"] > 0


def test_traced_backbone_gives_the_eager_features() -> None:
    """The backbone is traced without torch's trace check (it cost 4 s of CPU at every
    load): the traced, frozen module is what runs, and its float32 features are the eager
    module's (to 1e-4)."""
    from efficientnet_lite_pytorch import EfficientNet

    from models.backbone import (
        BACKBONE,
        FeatureExtractor,
        _optimized,
        backbone_weights_path,
    )

    net = EfficientNet.from_name(BACKBONE)
    net.load_state_dict(torch.load(backbone_weights_path(), map_location="cpu",
                                   weights_only=True))
    eager = FeatureExtractor(net).eval().to(memory_format=torch.channels_last)
    for p in eager.parameters():
        p.requires_grad_(False)
    traced = _optimized(eager, torch.float32)
    assert isinstance(traced, torch.jit.ScriptModule)
    x = torch.from_numpy(np.random.default_rng(0).uniform(0.5, 1.5, (1, 1, 96, 128))
                         .astype(np.float32)).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        want, got = eager(x), traced(x)
    assert got.shape == want.shape == (1, 176, 12, 16)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_the_init_floor_gives_the_rate_at_the_threshold_it_keeps() -> None:
    """Raised to its base's threshold, an extended model's card kept the false-alarm rate of
    the lower threshold calibrated on the new images: a bound, not the rate it has."""
    from types import SimpleNamespace

    from models.build import _Calibrated, _threshold_of_init
    from models.thresholds import calibrate_threshold

    maps = []
    for peak in (1.0, 1.1, 1.2):  # three good images, one spot each, far apart
        m = np.full((40, 40), 0.2, dtype=np.float32)
        m[20, 20] = peak
        maps.append(m)
    area = 1.0
    cal = calibrate_threshold(maps, area, 3.0, scores="distance")
    assert cal.components_at_threshold == 3
    calibrated = _Calibrated(cal, 1.0, 0.1, np.concatenate([m.ravel() for m in maps]), area,
                             None, [], maps)
    base = SimpleNamespace(card={"score_reference": 1.0, "threshold": 1.15})
    kept = _threshold_of_init(base, "base.safetensors", calibrated)
    assert kept is not None and cal.threshold == pytest.approx(1.15)
    assert cal.components_at_threshold == 1  # only the 1.2 spot is above 1.15
    assert cal.rate_at_threshold_per_cm2 == pytest.approx(1.0)


def test_the_default_extended_keeps_its_kinds_and_pixel_bands_calibration(
        tmp_path: Path) -> None:
    """The shipped default extended with a photograph dropped its thresholds per sample kind
    and pixel band and its 0.5-40 um range: wafers and PV cells were judged with the new
    pooled threshold (wafers 83.6 -> 72.1 in nearest-bank distance: more false alarms; PV
    cells at 10 um 65.8 -> 72.1: defects missed), and every scan was resampled to 1 um."""
    from models.card import card_of

    base = load_model(default_model_path())
    before = Path(base.path).read_bytes()
    gravel = data.gravel()[:256, :256].astype(np.float32)
    report = build_detector([GoodImage(_relative(gravel))], tmp_path / "more",
                            init=base.path, augment_camera=False)
    assert Path(base.path).read_bytes() == before
    more = load_model(report.weights)
    assert more.pixel_size_range_um == base.pixel_size_range_um
    ref_base, ref_more = base.card["score_reference"], more.card["score_reference"]
    for kind, pixel in (("wafer", 10.0), ("pv_cell", 10.0), ("pv_cell", 30.0),
                        ("rectangle", 5.0)):
        t_base, src_base = card_of(base).threshold_for(kind, pixel, base.card["threshold"])
        t_more, src_more = card_of(more).threshold_for(kind, pixel, more.card["threshold"])
        assert src_more == src_base
        assert t_more * ref_more == pytest.approx(t_base * ref_base, rel=1e-6)
        s_base = card_of(base).good_scores_for(kind, pixel, base.card["good_scores"])[0]
        s_more = card_of(more).good_scores_for(kind, pixel, more.card["good_scores"])[0]
        assert s_more["n"] == s_base["n"]
        assert s_more["q99"] * ref_more == pytest.approx(s_base["q99"] * ref_base, rel=1e-6)
    line_base = card_of(base).line_threshold_for("wafer", "model card (wafer)", 10.0)
    line_more = card_of(more).line_threshold_for("wafer", "model card (wafer)", 10.0)
    assert line_more * ref_more == pytest.approx(line_base * ref_base, rel=1e-6)


def test_an_extension_leaves_the_kind_of_its_new_images_to_their_calibration() -> None:
    """The base's thresholds per kind are kept rescaled to the new score reference, except
    for the kind the new good images are of: those calibrate it."""
    from types import SimpleNamespace

    from models.build import _calibrations_of_init

    band = {"pixel_size_um": [8.0, 13.5], "threshold": 1.0, "area_cm2": 40.0, "line": 0.8,
            "good_scores": {"n": 10, "q50": 0.5}}
    base = SimpleNamespace(card={
        "score_reference": 60.0, "pixel_size_range_um": [0.5, 40.0],
        "thresholds_by_sample_kind": {"wafer": 1.2, "pv_cell": 0.9},
        "thresholds_by_pixel_size": {"pv_cell": [band], "wafer": [band]}})
    kept = _calibrations_of_init(base, 40.0, None, {"pv_cell"})
    assert kept["thresholds_by_sample_kind"] == {"wafer": pytest.approx(1.8)}
    assert list(kept["thresholds_by_pixel_size"]) == ["wafer"]
    wafer = kept["thresholds_by_pixel_size"]["wafer"][0]
    assert wafer["threshold"] == pytest.approx(1.5) and wafer["line"] == pytest.approx(1.2)
    assert wafer["good_scores"] == {"n": 10, "q50": pytest.approx(0.75)}
    assert kept["pixel_size_range_um"] == [0.5, 40.0]
