"""Benchmark of the inspection network alone: detection, roughness, uncertainty, speed.

Test data come from the simulators with seeds never used in training (the training seeds are
drawn from ``default_rng(seed)`` of the training run; these use fixed seeds from 900001 on):

- defective wafers (2 and 5 µm pixels) and PV cells (30 µm): 512 x 512 windows centred near
  each true defect, rendered with and without the defects (same seed, same layout), the
  difference being the defect mask; the camera adds noise as in a scan;
- good windows of the same samples (no defects) for false alarms;
- rough surfaces (1 µm pixels) with Sa from 0.5 to 25 nm varying across the sample.

Prints a table: per-cell AUROC (stride 4) per sample kind, defect recall at the calibrated
threshold, false components per cm² on good windows, roughness R² (per window and per 64 px
block) against the true Sa, Spearman rank correlation between uncertainty and error for the head
ensemble and for MC dropout, and ``predict`` throughput with 2 threads.

Usage: ``python bench/bench_model.py [MODEL] [--quick]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from scipy.stats import spearmanr
from skimage.measure import label

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import load_model  # noqa: E402
from models.train import auroc  # noqa: E402
from simulators.camera import CameraModel  # noqa: E402
from simulators.roughness import RoughnessField  # noqa: E402
from simulators.samples import PVCellSample, RectangleSample, WaferSample  # noqa: E402
from simulators.samples.shapes import pixel_axes  # noqa: E402

SIZE = 512


def _camera(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return CameraModel(width=SIZE, height=SIZE, bit_depth=12).digitise(img, 10.0, rng)


def defect_windows(kind: str, p: float, seed: int, n_max: int):
    """(raw image, defect mask, good raw image) per true defect of one simulated sample."""
    if kind == "wafer":
        make = lambda n: WaferSample(diameter_mm=50.0, die_pitch_mm=(5.0, 5.0), n_defects=n,  # noqa: E731
                                     seed=seed)
        level_sample = make(0)
    else:
        make = lambda n: PVCellSample(n_defects=n, seed=seed)  # noqa: E731
        level_sample = make(0)
    bad, good = make(25), level_sample
    rng = np.random.default_rng(seed)
    out = []
    for d in bad.defects()[:n_max]:
        half = SIZE * p / 2
        # the defect somewhere in the window, not always in the middle
        ox = d.x_um - half + rng.uniform(-0.3, 0.3) * half
        oy = d.y_um - half + rng.uniform(-0.3, 0.3) * half
        a = bad.render(ox, oy, (SIZE, SIZE), p)
        b = good.render(ox, oy, (SIZE, SIZE), p)
        mask = np.abs(a - b) > 0.02
        if mask.sum() < 4:
            continue
        out.append((_camera(a, rng), mask, _camera(b, rng), d.kind, d.size_um / p))
    return out


def evaluate_detection(model, kind: str, p: float, seeds: list[int], n_max: int) -> dict:
    scores, labels, recall_hits, sizes, kinds = [], [], [], [], []
    good_components, good_area = 0, 0.0
    s = model.output_stride
    for seed in seeds:
        for raw, mask, good_raw, dkind, size_px in defect_windows(kind, p, seed, n_max):
            level = model.brightness_level(good_raw)
            m = model.predict(model.normalize(raw, level)[None])["anomaly"][0]
            g = model.predict(model.normalize(good_raw, level)[None])["anomaly"][0]
            t = F.max_pool2d(torch.from_numpy(mask[None, None].astype(np.float32)), s)[0, 0]
            t = t.numpy() > 0
            scores += [m.ravel(), g.ravel()]
            labels += [t.ravel(), np.zeros(g.size, bool)]
            near = F.max_pool2d(torch.from_numpy(t[None, None].astype(np.float32)), 3, 1, 1)
            hit = bool((m[near[0, 0].numpy() > 0] > model.threshold).any())
            if size_px >= 4:
                recall_hits.append(hit)
            sizes.append(size_px)
            kinds.append(dkind)
            above = g > model.threshold
            good_components += int(label(above, connectivity=2).max()) if above.any() else 0
            good_area += SIZE * SIZE * p * p / 1e8
    return {
        "auroc": auroc(np.concatenate(scores), np.concatenate(labels)),
        "recall": float(np.mean(recall_hits)) if recall_hits else float("nan"),
        "n_defects": len(recall_hits),
        "false_per_cm2": good_components / good_area if good_area else float("nan"),
        "good_area_cm2": good_area,
    }


def _blocks16(a: np.ndarray, b: int = 16) -> np.ndarray:
    """Means of b x b blocks of a map (its remainder rows/columns dropped)."""
    h, w = (a.shape[0] // b) * b, (a.shape[1] // b) * b
    return a[:h, :w].reshape(h // b, b, w // b, b).mean((1, 3)).ravel()


def evaluate_roughness(model, seeds: list[int], windows: int) -> dict:
    est, true, blk_est, blk_true, sig, err = [], [], [], [], [], []
    s = model.output_stride
    for seed in seeds:
        rng = np.random.default_rng(seed)
        sample = RectangleSample(20.0, 20.0, n_defects=0, seed=seed)
        field = RoughnessField(sa_nm=float(rng.uniform(0.5, 25.0)),
                               variation=float(rng.uniform(0.0, 0.6)),
                               variation_period_mm=1.0, seed=seed)
        for _ in range(windows):
            ox, oy = rng.uniform(-9000, 8000, size=2)
            xs, ys = pixel_axes(ox, oy, (SIZE, SIZE), 1.0)
            img = field.apply(sample.render(ox, oy, (SIZE, SIZE), 1.0), xs, ys, 1.0)
            raw = _camera(img, rng)
            out = model.predict(model.normalize(raw)[None])
            r, rs = out["roughness"][0], out["roughness_sigma"][0]
            sa = field.sa_map(xs, ys)[::s, ::s][: r.shape[0], : r.shape[1]]
            c = model.context_px // s  # away from the window border
            r, rs, sa = r[c:-c, c:-c], rs[c:-c, c:-c], sa[c:-c, c:-c]
            est.append(float(r.mean()))
            true.append(float(sa.mean()))
            blk = _blocks16  # 64 px blocks
            blk_est += list(blk(r))
            blk_true += list(blk(sa))
            sig += list(blk(rs))
            err += list(np.abs(blk(r) - blk(sa)))

    def r2(a, b):
        a, b = np.asarray(a), np.asarray(b)
        return 1 - np.sum((a - b) ** 2) / np.sum((b - b.mean()) ** 2)

    return {
        "r2_window": r2(est, true),
        "r2_block": r2(blk_est, blk_true),
        "mae_block_nm": float(np.mean(err)),
        "spearman_sigma_err": float(spearmanr(sig, err).statistic),
        "n_windows": len(est),
    }


def evaluate_uncertainty(model, seeds: list[int], n_max: int) -> dict:
    """Rank correlation between uncertainty and |anomaly - truth| per map cell.

    Three candidates: the entropy of the ensemble's mean probability (what inspection writes),
    the heads' spread alone, and the entropy of the mean of 8 MC-dropout passes.
    """
    s = model.output_stride
    res = {"entropy": ([], []), "spread": ([], []), "mc_dropout": ([], [])}
    for seed in seeds:
        for raw, mask, _good, _k, _sz in defect_windows("wafer", 2.0, seed, n_max):
            x = model.normalize(raw)[None]
            t = F.max_pool2d(torch.from_numpy(mask[None, None].astype(np.float32)), s)[0, 0]
            t = t.numpy()
            for name, mc, key in (("entropy", 0, "uncertainty"), ("spread", 0, "spread"),
                                  ("mc_dropout", 8, "uncertainty")):
                out = model.predict(x, mc_samples=mc)
                res[name][0].append(out[key][0].ravel())
                res[name][1].append(np.abs(out["anomaly"][0] - t).ravel())
    return {name: float(spearmanr(np.concatenate(u), np.concatenate(e)).statistic)
            for name, (u, e) in res.items()}


def throughput(model, threads: int = 2, batch: int = 4, size: int = 512) -> float:
    model.num_threads = threads
    x = np.random.default_rng(0).standard_normal((batch, size, size)).astype(np.float32)
    model.predict(x)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < 5.0:
        model.predict(x)
        n += 1
    return batch * size * size * n / (time.perf_counter() - t0) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    model = load_model(args.model)
    n = 2 if args.quick else 4
    seeds = list(range(900001, 900001 + n))
    rows = []
    t0 = time.perf_counter()
    for kind, p in (("wafer", 2.0), ("wafer", 5.0), ("pv_cell", 30.0)):
        r = evaluate_detection(model, kind, p, seeds, n_max=6 if args.quick else 12)
        rows.append((f"{kind} @ {p:g} µm", r))
    rough = evaluate_roughness(model, seeds, windows=3 if args.quick else 6)
    unc = evaluate_uncertainty(model, seeds[:2], n_max=6)
    mps = throughput(model)
    print(f"model: {model.path}  threshold {model.threshold:.4f}  "
          f"(evaluated in {time.perf_counter() - t0:.0f} s)")
    print(f"{'data':<18}{'cell AUROC':>11}{'recall>=4px':>12}{'defects':>9}"
          f"{'false/cm²':>11}{'good cm²':>10}")
    for name, r in rows:
        print(f"{name:<18}{r['auroc']:>11.4f}{r['recall']:>12.3f}{r['n_defects']:>9d}"
              f"{r['false_per_cm2']:>11.2f}{r['good_area_cm2']:>10.3f}")
    print(f"roughness @ 1 µm: R² per window {rough['r2_window']:.3f}, per 64 px block "
          f"{rough['r2_block']:.3f}, block MAE {rough['mae_block_nm']:.2f} nm "
          f"({rough['n_windows']} windows); Spearman(sigma, |error|) "
          f"{rough['spearman_sigma_err']:.3f}")
    print(f"uncertainty vs |anomaly error| Spearman per cell: entropy of the ensemble mean "
          f"{unc['entropy']:.3f}, heads' spread {unc['spread']:.3f}, MC dropout (8 passes, "
          f"entropy) {unc['mc_dropout']:.3f}")
    print(f"predict throughput, 2 threads, 4 x 512²: {mps:.2f} MP/s")


if __name__ == "__main__":
    main()
