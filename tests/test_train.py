"""Training: threshold calibration maths, synthetic anomalies, and a tiny run that learns."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from scipy import ndimage

from models.synth import _is_flat, add_anomalies
from models.thresholds import calibrate_threshold, count_components, review_level
from models.train import select_epoch


def _blobs(shape: tuple[int, int], peaks: list[tuple[int, int, float]]) -> np.ndarray:
    m = np.full(shape, 0.01, np.float32)
    for r, c, v in peaks:
        m[r:r + 2, c:c + 2] = v
    return m


def test_count_components_uses_8_connectivity() -> None:
    m = np.zeros((10, 10), np.float32)
    m[1, 1] = m[2, 2] = 0.9  # diagonal neighbours: one component
    m[6, 6] = 0.8
    assert count_components([m], 0.5) == 2
    assert count_components([m], 0.85) == 1
    assert count_components([m, m], 0.5) == 4


def test_calibration_meets_the_target_rate_exactly_when_area_allows() -> None:
    # 40 maps with one false peak each, peaks 0.50, 0.51, ... 0.89; 10 cm² in all
    maps = [_blobs((32, 32), [(10, 10, 0.5 + 0.01 * i)]) for i in range(40)]
    cal = calibrate_threshold(maps, area_cm2=10.0, target_per_cm2=2.0)
    # 2 per cm² over 10 cm² allows 20 components: the 20 highest peaks stay above
    assert cal.components_at_threshold <= 20
    assert count_components(maps, cal.threshold) <= 20
    assert cal.threshold <= 0.70 + 1e-6  # and not much stricter than needed
    assert count_components(maps, cal.threshold - 0.02) > 20 or cal.threshold < 0.7
    assert not cal.extrapolated


def test_calibration_raises_the_threshold_when_components_split() -> None:
    # one base-level component holds two peaks (0.9 and 0.8, saddle 0.5), two more stand alone
    m = np.full((40, 40), 0.01, np.float32)
    m[5, 5:12] = [0.9, 0.7, 0.5, 0.5, 0.5, 0.7, 0.8]
    m[20, 20], m[30, 30] = 0.7, 0.6
    cal = calibrate_threshold([m], area_cm2=1.0, target_per_cm2=2.0, merge_map_px=0)
    # at 0.6 the ridge splits in two (3 components > 2 allowed): the threshold must rise to
    # 0.7, where two remain, not jump to the map's maximum
    assert count_components([m], cal.threshold) <= 2
    assert cal.threshold == pytest.approx(0.7)


def test_calibration_counts_fragments_of_one_defect_once() -> None:
    # two fragments 4 map px apart (inspection reports one defect), a third 20 px away
    m = np.full((40, 40), 0.01, np.float32)
    m[10, 10] = m[10, 15] = 0.9
    m[30, 30] = 0.8
    assert count_components([m], 0.5) == 3
    assert count_components([m], 0.5, merge_map_px=6) == 2
    # one false defect allowed: counted as reported, 0.8 leaves one (the merged pair)
    assert calibrate_threshold([m], area_cm2=1.0, target_per_cm2=1.0).threshold == (
        pytest.approx(0.8))
    # counted as fragments, the pair is two: only the map's maximum leaves one or none
    assert calibrate_threshold([m], area_cm2=1.0, target_per_cm2=1.0,
                               merge_map_px=0).threshold >= 0.9 - 1e-6


def test_calibration_extrapolates_the_tail_on_small_areas() -> None:
    # 297 component peaks whose logits follow an exponential tail exactly (ideal order
    # statistics): rank i has z_i = -4 + 0.8 ln(297 / i)
    n = 297
    z = -4.0 + 0.8 * np.log(n / np.arange(1, n + 1))
    peaks = 1 / (1 + np.exp(-z))
    maps = [_blobs((64, 64), [(8 + 16 * (k % 3), 8 + 16 * (k // 3), float(p))
                              for k, p in enumerate(peaks[i:i + 9])]) for i in range(0, n, 9)]
    cal = calibrate_threshold(maps, area_cm2=0.05, target_per_cm2=1.0)
    # 0.05 allowed components: the empirical answer is the top peak, the tail goes beyond it
    assert cal.empirical_threshold == pytest.approx(float(peaks.max()), abs=1e-6)
    assert cal.extrapolated and cal.threshold > cal.empirical_threshold
    assert cal.components_at_threshold == 0
    # the fitted tail agrees with the generating law: count(z > t) = 297 exp(-(t + 4) / 0.8)
    z_thr = np.log(cal.threshold / (1 - cal.threshold))
    expected = -4.0 + 0.8 * np.log(n / 0.05)
    assert z_thr == pytest.approx(expected, abs=0.3)


def test_an_extrapolated_threshold_is_held_to_a_bound_over_the_empirical_one() -> None:
    # distances whose top peaks spread wide (a heavy tail, 40 peaks 1.0-1.8): extrapolated
    # from 0.002 cm² to 1 cm² the tail goes far past every peak seen
    peaks = np.linspace(1.0, 1.8, 40) ** 3 / 1.8**2
    maps = [_blobs((64, 64), [(8 + 16 * (k % 3), 8 + 16 * (k // 3), float(p))
                              for k, p in enumerate(peaks[i:i + 9])]) for i in range(0, 40, 9)]
    free = calibrate_threshold(maps, area_cm2=0.002, scores="distance")
    held = calibrate_threshold(maps, area_cm2=0.002, scores="distance", max_over_empirical=1.15)
    assert free.extrapolated and free.threshold > 1.15 * free.empirical_threshold
    assert held.threshold == pytest.approx(1.15 * held.empirical_threshold)
    assert held.tail_threshold == pytest.approx(free.threshold)
    assert free.tail_threshold is None
    # a tail that stays under the bound is left as it is
    mild = calibrate_threshold(maps, area_cm2=0.002, scores="distance", max_over_empirical=9.0)
    assert mild.threshold == pytest.approx(free.threshold) and mild.tail_threshold is None


def test_a_bound_tail_is_said_only_where_it_was_bound() -> None:
    from models.build import _calibration_warnings

    cal = {"target_per_cm2": 1.0, "area_cm2": 5.0, "empirical_threshold": 0.62,
           "threshold": 1.24, "tail_threshold": 1.2401}
    # a tail a hair above the bound read "extrapolated to 1.24, held to ...: 1.24"
    assert not any("tail" in w for w in _calibration_warnings(cal, 10, 3))
    said = _calibration_warnings({**cal, "tail_threshold": 1.9}, 10, 3)
    assert any("extrapolated to 1.9, held to" in w and ": 1.24;" in w for w in said), said


def test_synthetic_anomalies_mark_what_changed() -> None:
    rng = np.random.default_rng(3)
    good = np.ones((96, 96), np.float32) + 0.01 * rng.standard_normal((96, 96)).astype(np.float32)
    seen = 0
    for _ in range(30):
        img, target = add_anomalies(good, rng)
        assert img.shape == good.shape and target.shape == good.shape
        # visibly changed: over 4 % of the level once the 1 % pixel noise is smoothed away (a
        # faint 5 % stain is one region even where single noisy pixels dip under 4 %)
        diff = img - good
        changed = (np.abs(diff) > 0.04) | (np.abs(ndimage.gaussian_filter(diff, 1.0)) > 0.04)
        if target.any():
            seen += 1
            # target pixels changed visibly, or lie next to pixels that did (closing, grain)
            near = ndimage.binary_dilation(changed, iterations=2)
            assert near[target > 0].mean() > 0.97
        # (a grain fill marks its whole region, pixels whose draw was small included)
        assert (target[~changed] > 0).mean() < 0.08 if (~changed).any() else True
    assert seen >= 25


def test_flat_areas_are_not_flattened_but_patterned_ones_are() -> None:
    rng = np.random.default_rng(0)
    plain = np.ones((64, 64), np.float32) + 0.005 * rng.standard_normal((64, 64)).astype(
        np.float32)
    lines = plain.copy()
    lines[:, ::4] = 0.6  # a line pattern: structure a "flat" fill would remove
    mask = np.zeros((64, 64), np.float32)
    mask[16:48, 16:48] = 1.0
    assert _is_flat(plain, mask, 1.0)
    assert not _is_flat(lines, mask, 1.0)


def test_epoch_selection_weighs_auroc_and_guards_roughness() -> None:
    h = [
        {"val_loss": 1.30, "val_auroc": 0.70, "val_sa_mae_nm": 3.6},
        {"val_loss": 1.40, "val_auroc": 0.82, "val_sa_mae_nm": 3.8},  # better detection
        {"val_loss": 1.35, "val_auroc": 0.90, "val_sa_mae_nm": 6.0},  # roughness diverged
    ]
    assert select_epoch(h) == 2
    assert select_epoch(h[:1]) == 1
    assert select_epoch([]) == 0
    no_sa = [{**e, "val_sa_mae_nm": float("nan")} for e in h]
    assert select_epoch(no_sa) == 3  # no roughness known: detection decides


@pytest.mark.slow
def test_tiny_training_run_learns_and_writes_a_calibrated_model(tmp_path: Path) -> None:
    from models import load_model, train_model

    rng = np.random.default_rng(0)
    folder = tmp_path / "good"
    folder.mkdir()
    for i in range(10):  # a fine, even texture: the kind of sample to learn
        tex = ndimage.gaussian_filter(rng.standard_normal((160, 160)), 1.5)
        img = 2000 + 400 * tex / tex.std() + rng.normal(0, 20, (160, 160))
        tifffile.imwrite(folder / f"good_{i}.tif", img.astype(np.uint16))
    report = train_model([folder], tmp_path / "tiny", epochs=3, steps_per_epoch=25,
                         batch_size=8, patch=64, simulated=False, seed=1, lr=5e-3,
                         pixel_size_um=2.0)
    assert report.weights.is_file() and report.card_path.is_file()
    card = json.loads(report.card_path.read_text())
    assert card["training"]["user_images"] == 10 and card["training"]["user_val_images"] >= 1
    assert card["pixel_size_um"] == 2.0 and 0 < card["threshold"] < 1
    assert card["calibration"]["held_out"] == "user"
    model = load_model(report.weights)
    # a planted dark blob scores above the good area around it
    tex = ndimage.gaussian_filter(rng.standard_normal((160, 160)), 1.5)
    test = 2000 + 400 * tex / tex.std()
    test[60:80, 90:110] = 900
    maps = model.predict_image(test.astype(np.uint16))
    a = maps["anomaly"]
    blob = np.zeros(a.shape, bool)
    blob[15:20, 22:28] = True
    assert a[16:19, 23:27].mean() > np.quantile(a[~blob], 0.95)
    review = card["uncertainty"]["review"]  # a 75-step model may find no defect to calibrate on
    assert {"false_defects", "true_defects", "review_uncertainty"} <= set(review)
    if review["review_uncertainty"] is not None:
        assert card["review_uncertainty"] == review["review_uncertainty"]
    # fine-tuning starts from the saved weights: a negligible learning rate keeps them
    # (batch-norm running statistics still move with the new batches)
    tuned = train_model([folder], tmp_path / "tuned", epochs=1, steps_per_epoch=2,
                        batch_size=4, patch=64, simulated=False, seed=2, lr=1e-12,
                        pixel_size_um=2.0, init=report.weights)
    card2 = json.loads(tuned.card_path.read_text())
    assert card2["training"]["init"]["weights_sha256"] == card["weights_sha256"]
    from models.modelfile import load_network

    start, tuned_net = load_network(report.weights)[0], load_network(tuned.weights)[0]
    learned = {k: v for k, v in start.state_dict().items() if "running" not in k
               and "num_batches" not in k}
    tuned_state = tuned_net.state_dict()
    assert all(torch.allclose(v, tuned_state[k], atol=1e-6) for k, v in learned.items())


def test_train_command_rejects_bad_input_with_one_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from scanner.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["train", "--out", str(tmp_path / "m")])
    assert res.exit_code == 2 and "--good" in res.output
    res = runner.invoke(app, ["train", "--good", str(tmp_path / "missing"), "--out",
                              str(tmp_path / "m")])
    assert res.exit_code == 2 and "missing" in res.output and "Traceback" not in res.output
    # a folder as --out got the model written beside it, named after it (exit 0)
    (tmp_path / "models").mkdir()
    res = runner.invoke(app, ["train", "--good", str(tmp_path), "--out",
                              str(tmp_path / "models")])
    assert res.exit_code == 2 and "is a folder; give a file name" in res.output
    assert not (tmp_path / "models.safetensors").exists()
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    res = runner.invoke(app, ["train", "--good", str(bad), "--out", str(tmp_path / "m")])
    assert res.exit_code == 2 and "bad.png" in res.output
    (tmp_path / "m.safetensors").write_bytes(b"x")
    res = runner.invoke(app, ["train", "--good", str(bad), "--out", str(tmp_path / "m")])
    assert res.exit_code == 2 and "--overwrite" in res.output
    img = tmp_path / "good.tif"
    tifffile.imwrite(img, np.random.default_rng(0).integers(900, 1100, (64, 64), np.uint16))
    res = runner.invoke(app, ["train", "--good", str(img), "--out", str(tmp_path / "n"),
                              "--init", str(tmp_path / "nothing.safetensors")])
    assert res.exit_code == 2 and "nothing.safetensors" in res.output
    for option in ("--pixel-size", "--false-alarms-per-cm2"):
        res = runner.invoke(app, ["train", "--good", str(img), "--out", str(tmp_path / "p"),
                                  option, "-1"])
        assert res.exit_code == 2 and option in res.output
    res = runner.invoke(app, ["train", "--good", str(img), "--out", str(tmp_path / "p"),
                              "--false-alarms-per-cm2", "1e308"])
    assert res.exit_code == 2 and "--false-alarms-per-cm2" in res.output
    assert "at most 10000" in res.output
    assert not (tmp_path / "p.safetensors").exists()
    assert "Traceback" not in res.output


def test_structured_windows_sit_on_busbar_edges_and_die_corners() -> None:
    from models.data import _structured_window
    from simulators.samples import PVCellSample, WaferSample

    rng = np.random.default_rng(1)
    cell = PVCellSample(n_defects=0, seed=1, busbars=3)
    poly = cell.usable_polygon_um()
    x0, _, x1, _ = cell.bounds_um()
    bars = x0 + (np.arange(3) + 0.5) * (x1 - x0) / 3
    half = 1000.0
    cx, cy = float(poly[:, 0].mean()) + 17_000.0, float(poly[:, 1].mean())
    moved = [_structured_window(cell, "pv_cell", cx, cy, half, poly, rng) for _ in range(40)]
    on_bar = [abs(x - bars).min() < half + cell.busbar_width_mm * 500.0 for x, _ in moved]
    assert 0.25 < np.mean(on_bar) < 0.8  # about half of the windows hold a busbar edge
    wafer = WaferSample(die_pitch_mm=(5.0, 5.0), n_defects=0, seed=2)
    wpoly = wafer.usable_polygon_um()
    wx, wy = wafer.center_um[0] + 2_400.0, wafer.center_um[1] + 2_400.0
    pts = [_structured_window(wafer, "wafer", wx, wy, 600.0, wpoly, rng) for _ in range(40)]
    ox = wafer.center_um[0] + wafer.die_origin_mm[0] * 1000.0
    corner = [((x - ox) % 5000.0) < 1250.0 + 1e-6 or ((x - ox) % 5000.0) > 5000.0 - 400.0
              for x, _ in pts if (x, _) != (wx, wy)]
    assert corner and all(corner)


class _BrightnessNet(torch.nn.Module):
    """Scores each 4 x 4 cell by its brightness: the hardest good crop is the brightest."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"anomaly_logits": torch.nn.functional.avg_pool2d(x, 4).repeat(1, 2, 1, 1)}


def test_hard_negative_mining_returns_the_crops_the_model_scores_highest() -> None:
    from models.data import GoodImage
    from models.train import make_batch, mine_hard_crops

    rng = np.random.default_rng(0)
    images = [GoodImage(np.ones((256, 256), np.float32)) for _ in range(3)]
    images[1].image[100:110, 150:160] = 3.0  # one bright spot among flat images
    hard = mine_hard_crops(_BrightnessNet(), images, 64, rng, candidates=200, keep=10)
    assert len(hard) == 10
    for i, r0, c0 in hard[:3]:  # the top crops all overlap the spot
        assert i == 1 and r0 < 110 and r0 + 64 > 100 and c0 < 160 and c0 + 64 > 150
    batch = make_batch(images, 32, 64, rng, anomaly_fraction=0.0, hard=hard[:1],
                       hard_fraction=1.0)
    assert (batch["x"].amax(dim=(1, 2, 3)) > 3.0).all()  # every crop drawn from the hard one


def test_review_level_separates_false_from_true_defects() -> None:
    # false defects are the uncertain ones: the level flags them all and no true one
    assert review_level([0.8, 0.9, 0.95], [0.2, 0.3, 0.5]) == pytest.approx(0.8)
    # overlap: the best split flags 2/3 of the false and 1/4 of the true defects
    level = review_level([0.6, 0.7, 0.2], [0.1, 0.3, 0.4, 0.65])
    assert level == pytest.approx(0.6)
    assert review_level([], [0.3]) is None and review_level([0.3], []) is None


@pytest.mark.slow
def test_review_calibration_counts_painted_anomalies_as_true_defects() -> None:
    from models.data import simulated_good_images
    from models.modelfile import load_model
    from models.train import _defects_of, calibrate_review, held_out_maps

    model = load_model(None)
    held_out = simulated_good_images(4, 512, 2.0, seed=4242, kinds=("wafer", "rough"))
    maps = held_out_maps(model, held_out)
    review = calibrate_review(model, held_out, maps, model.threshold, np.random.default_rng(3))
    assert review["true_defects"] > 0
    # every defect on the good images is a false one (5 here), plus those off the painted ones
    on_good = sum(len(_defects_of(m, model.threshold)) for m in maps)
    assert review["false_defects"] >= on_good > 0
    assert review["review_uncertainty"] is not None  # both kinds seen: a level exists
    # the shares are of the counts, and the level flags more of the false than of the true
    for kind in ("false", "true"):
        flagged = review[f"{kind}_flagged"] * review[f"{kind}_defects"]
        assert flagged == pytest.approx(round(flagged), abs=0.01)
    assert review["false_flagged"] > review["true_flagged"]


def test_batches_are_reproducible_and_split_over_workers() -> None:
    from models.data import GoodImage
    from models.train import EpochBatches, epoch_loader, warmup_cosine

    rng = np.random.default_rng(0)
    images = [GoodImage(image=(1.0 + 0.1 * rng.standard_normal((96, 96))).astype(np.float32),
                        sa_nm=None, source=f"img{i}", kind="user") for i in range(3)]

    def run(workers: int) -> list[torch.Tensor]:
        data = EpochBatches(images, steps=5, batch_size=2, patch=32, seed=7, epoch=1)
        return [torch.from_numpy(b["x"]) for b in epoch_loader(data, workers)]

    one, again, two = run(0), run(0), run(2)
    assert len(one) == len(two) == 5
    assert all(torch.equal(a, b) for a, b in zip(one, again, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(run(2), two, strict=True))
    # schedule: warm-up to the peak, then down to near zero at the end
    assert warmup_cosine(0, 100) < 0.01 and warmup_cosine(15, 100) == pytest.approx(1.0)
    assert warmup_cosine(100, 100) < 0.01


def test_a_time_limit_cuts_the_epochs_after_the_first(tmp_path: Path) -> None:
    from models.train import train_model

    rng = np.random.default_rng(5)
    folder = tmp_path / "good"
    folder.mkdir()
    for i in range(4):
        img = 2000 + 300 * ndimage.gaussian_filter(rng.standard_normal((96, 96)), 1.5)
        tifffile.imwrite(folder / f"g{i}.tif", img.astype(np.uint16))
    report = train_model([folder], tmp_path / "m", epochs=6, steps_per_epoch=2, batch_size=2,
                         patch=64, simulated=False, time_limit_s=1e-6, pixel_size_um=1.0)
    assert report.epochs_run == 1 and report.card["training"]["epochs_max"] == 1


def test_quiet_calibration_counts_only_quiet_areas():
    from models.thresholds import calibrate_contexts_on

    def calibrate_quiet(maps, areas, target_per_cm2=1.0):
        return calibrate_contexts_on(maps, None, areas, target_per_cm2)["quiet"]

    rng = np.random.default_rng(0)
    maps = []
    for _ in range(4):
        m = np.full((256, 256), 0.005, np.float32)
        m[:, :128] = rng.uniform(0, 0.95, (256, 128))  # busy half, high peaks
        m[rng.integers(0, 256, 3), rng.integers(160, 256, 3)] = 0.4  # rare quiet peaks
        maps.append(m)
    full = calibrate_threshold(maps, area_cm2=4.0, target_per_cm2=1.0)
    quiet = calibrate_quiet(maps, [1.0] * 4, target_per_cm2=1.0)
    assert quiet is not None
    assert quiet.area_cm2 < 4.0
    assert quiet.threshold < full.threshold
    assert calibrate_quiet(maps, [0.025] * 4) is None  # too little quiet area to count on
    # each map's quiet share counts at its own area (held-out images differ in pixel size)
    assert calibrate_quiet(maps, [4.0, 0, 0, 0]).area_cm2 == pytest.approx(quiet.area_cm2)


def test_plain_calibration_counts_only_plain_and_quiet_areas():
    from models.thresholds import calibrate_contexts_on

    rng = np.random.default_rng(0)
    maps, images = [], []
    for _ in range(4):
        m = np.full((256, 256), 0.005, np.float32)
        img = np.ones((256, 256), np.float32)
        img[:, 128:192] += (np.arange(64) % 8 < 4) * 0.5  # structure the network finds quiet
        m[rng.integers(0, 256, 3), rng.integers(130, 190, 3)] = 0.6  # its moderate peaks
        m[rng.integers(0, 256, 3), rng.integers(208, 256, 3)] = 0.2  # rare plain peaks
        maps.append(m)
        images.append(img)
    cals = calibrate_contexts_on(maps, images, [1.0] * 4)
    quiet, plain = cals["quiet"], cals["plain"]
    assert quiet is not None and plain is not None
    assert plain.area_cm2 < quiet.area_cm2
    assert plain.threshold < 0.6 <= quiet.threshold


def test_plain_near_structure_reaches_a_scratch_beside_a_pad_column():
    """Bare silicon beside a die's last column of pads, with a thin scratch on it 2 map px
    from the pads: never plain in the wide sense (the pads are within reach), plain near
    structure; the pads are in neither context, the far bare silicon in both."""
    from models.thresholds import context_masks

    img = np.ones((160, 160), np.float32)
    anomaly = np.full(img.shape, 0.005, np.float32)
    for r in range(4, 160, 12):
        img[r:r + 6, 60:66] = 1.8  # pads
    anomaly[:, 48:70] = 0.06  # the network's moderate scores over the die's edge
    img[78, 68:86] = 0.85  # a thin dark scratch on the bare silicon beside it
    anomaly[77:80, 67:87] = 0.6
    masks = context_masks(anomaly, img)
    near, plain = masks["plain_near_structure"], masks["plain"]
    assert near[78, 72:86].all() and not plain[78, 68:86].any()
    assert not near[:, 60:66].any()  # the pads themselves
    assert near[:, 130:].all() and plain[:, 150:].all()


def test_pixel_bands_give_finer_pixels_their_own_higher_threshold(monkeypatch):
    """Held-out PV windows from 10 to 30 µm whose false alarms per cm² grow at finer pixels
    (as the network's do): each band of pixel sizes gets the threshold that holds the rate
    on its own windows, higher at the fine end; too little area per band: no bands."""
    import models.train_calibration as train  # MIN_BAND_AREA_CM2 is read there
    from models.data import GoodImage

    rng = np.random.default_rng(2)
    images, maps = [], []
    for px in np.repeat(np.geomspace(10.0, 30.0, 6), 3):
        m = np.full((64, 64), 0.01, np.float32)
        for _ in range(60):  # as many per window (per pixel) at every pixel size
            r, c = rng.integers(2, 62, 2)
            m[r, c] = rng.uniform(0.2, 0.9)
        images.append(GoodImage(image=np.ones((256, 256), np.float32), kind="pv_cell",
                                meta={"pixel_size_um": float(px), "edge": False}))
        maps.append({"anomaly": m})
    monkeypatch.setattr(train, "MIN_BAND_AREA_CM2", 0.1)
    bands = train.calibrate_pixel_bands(images, maps, 10.0, 1.0, None, {})["pv_cell"]
    assert len(bands) == train.PIXEL_BANDS
    assert bands[0]["pixel_size_um"][0] == pytest.approx(10.0)
    assert bands[-1]["pixel_size_um"][1] == pytest.approx(30.0)
    assert bands[0]["threshold"] > bands[-1]["threshold"]
    # a band only raises the kind's thresholds, and has only the contexts the kind has
    floor = {"threshold": (bands[0]["threshold"] + bands[-1]["threshold"]) / 2, "quiet": 0.95}
    raised = train.calibrate_pixel_bands(images, maps, 10.0, 1.0, None,
                                         {"pv_cell": floor})["pv_cell"]
    assert raised[0]["threshold"] == bands[0]["threshold"]
    assert raised[-1]["threshold"] == floor["threshold"]
    assert all(b["quiet"] == 0.95 and "plain" not in b for b in raised)
    monkeypatch.setattr(train, "MIN_BAND_AREA_CM2", 100.0)
    assert train.calibrate_pixel_bands(images, maps, 10.0, 1.0, None, {}) == {}


def test_detector_bands_hold_the_rate_per_cm2_at_each_pixel_size(monkeypatch) -> None:
    """The detector's per-kind windows from 10 to 30 um, as many false peaks per window at
    every size: a finer band covers less area, so it needs a higher threshold to hold 1 per
    cm², the coarse band a lower one than the kind's; no bands on one size or too little
    area."""
    import models.build as build

    rng = np.random.default_rng(3)
    held = []
    for px in np.repeat(np.geomspace(10.0, 30.0, 6), 4):
        m = np.full((64, 64), 0.01, np.float32)
        for _ in range(40):
            r, c = rng.integers(2, 62, 2)
            m[r, c] = rng.uniform(0.2, 0.9)
        held.append((float(px), m, 1024 * 1024 * px * px * 1e-8))  # 1024 px windows
    monkeypatch.setattr(build, "MIN_BAND_AREA_CM2", 0.1)
    bands = build.calibrate_pixel_bands(held, 1.0)
    assert len(bands) == build.PIXEL_BANDS
    assert bands[0]["pixel_size_um"][0] == pytest.approx(10.0)
    assert bands[-1]["pixel_size_um"][1] == pytest.approx(30.0)
    kind = calibrate_threshold([m for _, m, _ in held], sum(a for _, _, a in held), 1.0,
                               scores="distance").threshold
    assert bands[0]["threshold"] > kind > bands[-1]["threshold"]
    for k, band in enumerate(bands):  # each holds the rate on its own windows
        lo, hi = band["pixel_size_um"]
        last = k == len(bands) - 1
        rows = [h for h in held if lo - 1e-6 <= h[0] and (h[0] < hi - 1e-6 or last)]
        area = sum(a for _, _, a in rows)
        assert count_components([m for _, m, _ in rows], band["threshold"], 6.0) <= area
    assert build.calibrate_pixel_bands([(10.0, m, a) for _, m, a in held], 1.0) == []
    monkeypatch.setattr(build, "MIN_BAND_AREA_CM2", 100.0)
    assert build.calibrate_pixel_bands(held, 1.0) == []


def test_recalibrate_rewrites_every_threshold_of_a_card(tmp_path: Path) -> None:
    import shutil

    from models.modelfile import load_model, network_model_path
    from models.train import recalibrate

    src = network_model_path()
    shutil.copy(src, tmp_path / "m.safetensors")
    card = json.loads(src.with_suffix(".json").read_text())
    card["thresholds_by_sample_kind"] = {"wafer": 0.01, "pv_cell": 0.01, "rectangle": 0.01}
    (tmp_path / "m.json").write_text(json.dumps(card))
    new = recalibrate(tmp_path / "m.safetensors", 1, seed=4321)
    model = load_model(tmp_path / "m.safetensors")  # the card still loads (checksum kept)
    kinds = model.card["thresholds_by_sample_kind"]
    assert kinds == new["thresholds_by_sample_kind"]
    assert set(kinds) == {"wafer", "pv_cell", "rectangle"}
    assert all(0.01 < t < 1.0 for t in kinds.values())  # the planted values are gone
    assert "seed 4321" in model.card["calibration"]["held_out"]
