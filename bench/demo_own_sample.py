"""User workflow on a sample type the shipped model never saw: brushed metal.

Generates a set of brushed-metal images (strongly anisotropic grain at a random angle, with
slow shading and camera noise, 16-bit TIFF), trains with ``waferscope train --good`` on the
good ones only, then runs ``waferscope inspect`` on a test set of good and defective images
(dents, cross scratches, corrosion spots, inclusions; drawn here, not by the simulators) and
prints the image AUROC and the defect recall / false defects from ``defects.csv``.

Run: ``nice -n 10 .venv/bin/python bench/demo_own_sample.py [--n-good 200] [--epochs N]``.
"""

from __future__ import annotations

import argparse
import csv
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
WS = str(ROOT / ".venv" / "bin" / "waferscope")
SIZE = 512


def brushed_metal(rng: np.random.Generator) -> np.ndarray:
    """A brushed-metal surface in [0, 1]: fine streaks along one direction, slow shading."""
    noise = rng.normal(size=(SIZE * 2, SIZE * 2))
    streaks = ndimage.gaussian_filter(noise, sigma=(0.6, 18.0))  # long along x
    angle = rng.uniform(-20, 20)
    streaks = ndimage.rotate(streaks, angle, reshape=False, order=1)
    c = SIZE // 2
    streaks = streaks[c : c + SIZE, c : c + SIZE]
    streaks /= streaks.std() + 1e-9
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    shade = 1 + 0.08 * np.sin(2 * math.pi * (xx * rng.uniform(0.3, 1) + rng.uniform()))
    return np.clip((0.55 + 0.04 * streaks) * shade, 0, 1)


def add_defect(img: np.ndarray, rng: np.random.Generator) -> dict:
    """Draw one defect on ``img`` in place; returns its kind and centre (pixels)."""
    kind = rng.choice(["dent", "cross_scratch", "corrosion", "inclusion"])
    cy, cx = rng.uniform(60, SIZE - 60, 2)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    if kind == "dent":  # a shallow depression: dark on one side, bright on the other
        r = rng.uniform(6, 20)
        g = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
        img += 0.12 * np.gradient(g, axis=1) * r
    elif kind == "cross_scratch":  # a line across the grain
        a = rng.uniform(0, math.pi)
        length = rng.uniform(60, 200)
        d = np.abs((xx - cx) * math.sin(a) - (yy - cy) * math.cos(a))
        t = (xx - cx) * math.cos(a) + (yy - cy) * math.sin(a)
        img += 0.15 * np.exp(-d**2 / 2.0) * (np.abs(t) < length / 2)
    elif kind == "corrosion":  # a blotchy darker spot
        r = rng.uniform(10, 30)
        blot = ndimage.gaussian_filter(rng.random((SIZE, SIZE)), 3) > 0.5
        disk = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
        img -= 0.12 * ndimage.gaussian_filter((blot & disk).astype(float), 1.5)
    else:  # inclusion: a small bright speck
        r = rng.uniform(2, 5)
        img += 0.3 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
    return {"kind": str(kind), "x": float(cx), "y": float(cy)}


def to_tiff(img: np.ndarray, rng: np.random.Generator, path: Path) -> None:
    counts = np.clip(img, 0, 1) * 40000 + rng.normal(0, 150, img.shape) + 1000
    tifffile.imwrite(path, np.clip(counts, 0, 65535).astype(np.uint16))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-good", type=int, default=200)
    parser.add_argument("--n-test", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--keep", type=Path, default=None, help="keep the images here")
    parser.add_argument("--init", default=None,
                        help="fine-tune this model (default: the shipped one) instead of "
                             "training from scratch")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(2026)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        good, test = root / "good", root / "test"
        good.mkdir(parents=True, exist_ok=True)
        test.mkdir(parents=True, exist_ok=True)
        for k in range(args.n_good):
            to_tiff(brushed_metal(rng), rng, good / f"good_{k:03d}.tif")
        truth = {}
        for k in range(args.n_test):
            img = brushed_metal(rng)
            to_tiff(img, rng, test / f"ok_{k:03d}.tif")
            img = brushed_metal(rng)
            truth[f"bad_{k:03d}.tif"] = add_defect(img, rng)
            to_tiff(img, rng, test / f"bad_{k:03d}.tif")
        cmd = [WS, "train", "--good", str(good), "--out", str(root / "metal")]
        if args.epochs:
            cmd += ["--epochs", str(args.epochs)]
        if args.init:
            cmd += ["--init", args.init]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        subprocess.run([WS, "inspect", str(test), "--model", str(root / "metal.safetensors"),
                        "--out", str(root / "out")], check=True)
        inspect_s = time.perf_counter() - t0
        with open(root / "out" / "scores.csv", newline="") as f:
            scores = {r["image"]: float(r["score"]) for r in csv.DictReader(f)}
        with open(root / "out" / "defects.csv", newline="") as f:
            found = list(csv.DictReader(f))
    from scipy.stats import rankdata

    names = sorted(scores)
    y = np.array([n.startswith("bad_") for n in names])
    r = rankdata([scores[n] for n in names])
    auc = (r[y].sum() - y.sum() * (y.sum() + 1) / 2) / (y.sum() * (~y).sum())
    hit = 0
    for name, t in truth.items():
        near = [math.hypot(float(d["x_um"]) - t["x"], float(d["y_um"]) - t["y"])
                for d in found if d["image"] == name]
        hit += bool(near) and min(near) < 30
    false_ok = sum(1 for d in found if d["image"].startswith("ok_"))
    print(f"brushed metal, {args.n_good} good {SIZE}x{SIZE} images for training "
          f"({train_s:.0f} s), {len(names)} test images ({inspect_s:.0f} s)")
    print("| image AUROC | defects found | defects on good images |")
    print(f"| {auc:.3f} | {hit}/{len(truth)} | {false_ok} on {args.n_test} |")


if __name__ == "__main__":
    main(sys.argv[1:])
