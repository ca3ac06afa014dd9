"""Benchmark of the user workflow on a sample type nobody designed the model for.

"Micro-LED array": a hexagonal lattice of round emitters of slightly varying brightness and
size on a dark, faintly grainy substrate (written here, not in ``simulators/``; neither the
shipped model nor the training code has seen it).

1. Writes ``N`` good 512 x 512 images (TIFF, 12-bit counts with camera noise) to a folder:
   windows of one large image of the array seen through the simulator's ``image`` sample.
2. Trains on them with the default options (``train_model(good, out)``, the same as
   ``waferscope train --good DIR --out MODEL``) and times it.
3. Makes defective images of the same type: another large image of the array loaded as an
   ``image`` sample of the simulator (the same rendering path) with synthetic defects
   (particles, scratches, pits, stains) whose truth gives the defect masks.
4. Prints per-cell AUROC and recall at the calibrated threshold for the trained model and for
   the shipped default model, and the false components per cm² on unseen good images.

Usage: ``python bench/bench_train.py [--n 200] [--epochs E] [--init default]`` (``--init``:
fine-tune the shipped model instead of training from scratch, as ``train --init``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import torch
import torch.nn.functional as F  # noqa: N812
from skimage.measure import label

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import load_model, train_model  # noqa: E402
from models.train import auroc  # noqa: E402
from simulators.camera import CameraModel  # noqa: E402
from simulators.samples import ImageSample  # noqa: E402
from simulators.samples.texture import fractal_noise, hash_uniform  # noqa: E402

PITCH = 14.0  # µm between emitters
PIX = 1.0


def led_array(x0: float, y0: float, shape: tuple[int, int]) -> np.ndarray:
    """Reflectance of the micro-LED array on a pixel grid (coordinate-deterministic)."""
    h, w = shape
    xs = x0 + np.arange(w) * PIX
    ys = y0 + np.arange(h) * PIX
    row_h = PITCH * np.sqrt(3) / 2
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    j = np.round(yy / row_h)
    i = np.round((xx - (j % 2) * PITCH / 2) / PITCH)
    best = np.full(shape, np.inf)
    bi, bj = i.copy(), j.copy()
    for dj in (-1, 0, 1):
        for di in (-1, 0, 1):
            jj, ii = j + dj, i + di
            cx = ii * PITCH + (jj % 2) * PITCH / 2
            cy = jj * row_h
            d = np.hypot(xx - cx, yy - cy)
            closer = d < best
            best = np.where(closer, d, best)
            bi, bj = np.where(closer, ii, bi), np.where(closer, jj, bj)
    bright = 0.7 + 0.15 * hash_uniform(bi.astype(np.int64), bj.astype(np.int64), 77)
    radius = 4.0 + 0.6 * hash_uniform(bi.astype(np.int64), bj.astype(np.int64), 78)
    dot = np.clip(radius - best + 0.5, 0, 1)
    base = 0.18 + fractal_noise(xs, ys, PIX, [(40.0, 0.04), (6.0, 0.03)], seed=5)
    return (base + (bright - base) * dot).astype(np.float32)


def _array_sample(folder: Path, name: str, origin: tuple[float, float], side: int,
                  n_defects: int = 0, seed: int = 424242) -> ImageSample:
    """A large image of the array loaded as the simulator's ``image`` sample."""
    path = folder / f"{name}.tif"
    if not path.exists():
        tifffile.imwrite(path, (led_array(*origin, (side, side)) * 60000).astype(np.uint16))
    kinds = ["particle", "scratch", "pit", "stain"]
    return ImageSample(path, PIX, n_defects=n_defects, seed=seed, defect_kinds=kinds)


def write_good(folder: Path, n: int, rng: np.random.Generator) -> None:
    """Good training images: windows of another part of the array, rendered through the same
    ``image`` sample and camera as the test windows (a different rendering path would be a
    domain shift the model rightly flags)."""
    sample = _array_sample(folder.parent, "array_train", (-777_000.0, 333_000.0), 4096)
    cam = CameraModel(width=512, height=512, bit_depth=12)
    for k in range(n):
        ox, oy = rng.uniform(0, 4096 - 512, size=2)
        img = cam.digitise(sample.render(float(ox), float(oy), (512, 512), PIX), 10.0, rng)
        tifffile.imwrite(folder / f"good_{k:03d}.tif", img)


def defect_set(folder: Path, rng: np.random.Generator, n_windows: int):
    """(raw, mask, good raw) windows around simulated defects on the array."""
    bad = _array_sample(folder, "array_test", (123_456.0, 654_321.0), 3072, n_windows)
    good = _array_sample(folder, "array_test", (123_456.0, 654_321.0), 3072)
    cam = CameraModel(width=512, height=512, bit_depth=12)
    out = []
    for d in bad.defects():
        ox = float(np.clip(d.x_um - 256 + rng.uniform(-80, 80), 0, 3072 - 512))
        oy = float(np.clip(d.y_um - 256 + rng.uniform(-80, 80), 0, 3072 - 512))
        a = bad.render(ox, oy, (512, 512), PIX)
        b = good.render(ox, oy, (512, 512), PIX)
        mask = np.abs(a - b) > 0.02
        if mask.sum() >= 4:
            out.append((cam.digitise(a, 10.0, rng), mask, cam.digitise(b, 10.0, rng)))
    return out


def score(model, windows) -> dict:
    s = model.output_stride
    scores, labels, hits, comps = [], [], [], 0
    for raw, mask, good in windows:
        level = model.brightness_level(good)
        m = model.predict(model.normalize(raw, level)[None])["anomaly"][0]
        g = model.predict(model.normalize(good, level)[None])["anomaly"][0]
        t = F.max_pool2d(torch.from_numpy(mask[None, None].astype(np.float32)), s)[0, 0].numpy()
        scores += [m.ravel(), g.ravel()]
        labels += [t.ravel() > 0, np.zeros(g.size, bool)]
        near = F.max_pool2d(torch.from_numpy(t[None, None]), 3, 1, 1)[0, 0].numpy() > 0
        hits.append(bool((m[near] > model.threshold).any()))
        above = g > model.threshold
        comps += int(label(above, connectivity=2).max()) if above.any() else 0
    area = len(windows) * 512 * 512 * PIX**2 / 1e8
    return {"auroc": auroc(np.concatenate(scores), np.concatenate(labels)),
            "recall": float(np.mean(hits)), "false_per_cm2": comps / area, "n": len(windows)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--init", default=None,
                        help="fine-tune this model ('default': the shipped one), lr 1e-3")
    args = parser.parse_args()
    rng = np.random.default_rng(2026)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "good").mkdir()
        write_good(tmp / "good", args.n, rng)
        opts = {} if args.epochs is None else {"epochs": args.epochs}
        if args.init:
            opts.update(init=args.init, lr=1e-3)
        t0, c0 = time.perf_counter(), time.process_time()
        report = train_model([tmp / "good"], tmp / "led", pixel_size_um=PIX, **opts)
        t_train, c_train = time.perf_counter() - t0, time.process_time() - c0
        windows = defect_set(tmp, rng, 40)
        trained = score(load_model(report.weights), windows)
        default = score(load_model(None), windows)
    # CPU time over the 2 cores bounds the wall time on an idle machine from below; on a
    # shared machine the wall time is longer (the load average is printed for that reason)
    how = f"fine-tuned from {args.init}" if args.init else "from scratch"
    print(f"micro-LED array: {args.n} good 512² images, {how}, training "
          f"{t_train / 60:.1f} min wall, "
          f"{c_train / 60:.1f} min CPU ({report.epochs_run} epochs, best {report.best_epoch}), "
          f"load average {os.getloadavg()[0]:.1f}, threshold {report.card['threshold']:.4f}")
    print(f"{'model':<22}{'cell AUROC':>11}{'recall':>8}{'false/cm²':>11}{'windows':>9}")
    for name, r in (("trained on its goods", trained), ("shipped default", default)):
        print(f"{name:<22}{r['auroc']:>11.4f}{r['recall']:>8.3f}{r['false_per_cm2']:>11.2f}"
              f"{r['n']:>9d}")


if __name__ == "__main__":
    main()
