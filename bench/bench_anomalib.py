"""Side by side with anomalib (DRAEM, trained from scratch): image AUROC and throughput.

Both get the same images: good 256 x 256 crops of simulated wafers for training, and a test set
of good crops and crops holding a defect (the simulator's truth says which), written as PNG
files. waferscope trains with ``models.train_model`` on the good crops (when the model helper's
training exists; otherwise the shipped model is used and the table says so) and scores the
test images with ``inspect_images``; anomalib's DRAEM trains on the same good crops in its own
environment (``bench/setup_anomalib.sh``) and scores the same test images.

Run: ``nice -n 10 .venv/bin/python bench/bench_anomalib.py [--epochs N] [--n-train N]``.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ANOMALIB_PY = ROOT / "bench" / ".venv-anomalib" / "bin" / "python"
CROP = 256

# Runs inside the anomalib environment: train DRAEM on train/good, score test/*, time it.
_ANOMALIB_SCRIPT = r'''
import json, sys, time
from pathlib import Path
import numpy as np, torch
torch.set_num_threads(2)
from anomalib.data import Folder
from anomalib.engine import Engine
from anomalib.models import Draem
root, epochs = Path(sys.argv[1]), int(sys.argv[2])
dm = Folder(name="sim", root=root, normal_dir="train/good", abnormal_dir="test/defect",
            normal_test_dir="test/good", train_batch_size=8, eval_batch_size=8, num_workers=0)
# no download: an empty anomaly-source folder makes DRAEM synthesise its anomalies from noise
(root / "no_dtd").mkdir(exist_ok=True)
model = Draem(dtd_dir=str(root / "no_dtd"))
engine = Engine(max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
                default_root_dir=str(root / "anomalib"))
t0 = time.perf_counter()
engine.fit(model=model, datamodule=dm)
train_s = time.perf_counter() - t0
t0 = time.perf_counter()
preds = engine.predict(model=model, datamodule=dm)
pred_s = time.perf_counter() - t0
scores = {}
for batch in preds:
    for path, score in zip(batch.image_path, batch.pred_score.flatten().tolist()):
        scores[str(Path(path).relative_to(root / "test"))] = float(score)
json.dump({"scores": scores, "train_s": train_s, "predict_s": pred_s}, sys.stdout)
'''


def make_images(root: Path, pixel_um: float, n_train: int, n_test: int, seed: int) -> dict:
    """Good training crops and labelled test crops of simulated wafers, as 8-bit PNG."""
    import imageio.v3 as iio

    from simulators.samples import make_sample

    rng = np.random.default_rng(seed)
    side = CROP * pixel_um

    def render(sample, x: float, y: float) -> np.ndarray:
        img = sample.render(x, y, (CROP, CROP), pixel_um)
        img = img + rng.normal(0, 0.01, img.shape)  # camera noise
        return np.clip(img * 255, 0, 255).astype(np.uint8)

    def good_crops(sample, n: int, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        truths = sample.defects()
        k = 0
        while k < n:
            x, y = rng.uniform(-6000, 6000, 2)
            if any(t.bbox_um[0] - side < x + side and x < t.bbox_um[2] + side and
                   t.bbox_um[1] - side < y + side and y < t.bbox_um[3] + side for t in truths):
                continue
            iio.imwrite(folder / f"g{seed}_{k:04d}.png", render(sample, x, y))
            k += 1

    wafer = dict(diameter_mm=30, edge_exclusion_mm=1, die_pitch_mm=(2.0, 2.0),
                 scribe_width_um=60)
    good_crops(make_sample("wafer", n_defects=0, seed=seed + 1, **wafer), n_train,
               root / "train" / "good")
    test_wafer = make_sample("wafer", n_defects=4 * n_test, seed=seed + 2, **wafer)
    good_crops(test_wafer, n_test, root / "test" / "good")
    bad = root / "test" / "defect"
    bad.mkdir(parents=True, exist_ok=True)
    k = 0
    for t in test_wafer.defects():
        if k >= n_test or max(t.bbox_um[2] - t.bbox_um[0], t.bbox_um[3] - t.bbox_um[1]) > side:
            continue
        # the defect somewhere in the crop, not always in its centre
        dx, dy = rng.uniform(0.2, 0.8, 2) * side
        iio.imwrite(bad / f"d{seed}_{k:04d}.png", render(test_wafer, t.x_um - dx, t.y_um - dy))
        k += 1
    return {"train": n_train, "test_good": n_test, "test_defect": k}


def auroc(scores: dict[str, float]) -> float:
    """Image AUROC (Mann-Whitney) of scores keyed ``good/...`` / ``defect/...``."""
    from scipy.stats import rankdata

    names = sorted(scores)
    y = np.array([n.startswith("defect/") for n in names])
    r = rankdata([scores[n] for n in names])
    n1, n0 = y.sum(), (~y).sum()
    return float((r[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def run_waferscope(root: Path, pixel_um: float, epochs: int | None) -> dict:
    from models import load_model
    from scanner.inspection.inspect import inspect_images

    t0 = time.perf_counter()
    how = "shipped model (no training available)"
    model = None
    try:
        from models import train_model

        out = root / "ws_model"
        opts = {} if epochs is None else {"epochs": epochs}
        train_model([root / "train" / "good"], out, pixel_size_um=pixel_um, **opts)
        model = load_model(out.with_suffix(".safetensors"))
        how = "trained on the good crops"
    except (ImportError, ModuleNotFoundError, TypeError) as exc:
        how += f" [{type(exc).__name__}]"
        model = load_model(None)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = inspect_images([root / "test"], root / "ws_out", model=model)
    pred_s = time.perf_counter() - t0
    with open(root / "ws_out" / "scores.csv", newline="") as f:
        scores = {r["image"]: float(r["score"]) for r in csv.DictReader(f)}
    return {"scores": scores, "train_s": train_s, "predict_s": pred_s, "how": how,
            "n": len(res.scores)}


def run_anomalib(root: Path, epochs: int) -> dict | None:
    if not ANOMALIB_PY.exists():
        return None
    proc = subprocess.run([str(ANOMALIB_PY), "-c", _ANOMALIB_SCRIPT, str(root), str(epochs)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None,
                        help="waferscope epochs (default: train's own default)")
    parser.add_argument("--draem-epochs", type=int, default=3,
                        help="DRAEM epochs (about 2-4 min each on 2 CPU cores at 100 images)")
    parser.add_argument("--n-train", type=int, default=100)
    parser.add_argument("--n-test", type=int, default=40)
    parser.add_argument("--pixel-size", type=float, default=None)
    args = parser.parse_args(argv)
    from models import load_model

    pixel_um = args.pixel_size or float(load_model(None).pixel_size_um)
    table = Table(title=f"waferscope vs anomalib DRAEM ({CROP} px crops of simulated wafers, "
                        f"{pixel_um:g} µm/px)")
    for col in ("method", "how", "image AUROC", "train s", "test images/s", "test MP/s"):
        table.add_column(col, justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        counts = make_images(root, pixel_um, args.n_train, args.n_test, seed=777000)
        n_test = counts["test_good"] + counts["test_defect"]
        mp = n_test * CROP * CROP / 1e6
        ws = run_waferscope(root, pixel_um, args.epochs)
        table.add_row("waferscope", ws["how"], f"{auroc(ws['scores']):.3f}",
                      f"{ws['train_s']:.0f}", f"{n_test / ws['predict_s']:.1f}",
                      f"{mp / ws['predict_s']:.2f}")
        an = run_anomalib(root, args.draem_epochs)
        if an is None:
            table.add_row("anomalib DRAEM", "not run (bench/setup_anomalib.sh)", "-", "-", "-",
                          "-")
        else:
            table.add_row("anomalib DRAEM", f"{args.draem_epochs} epochs from scratch",
                          f"{auroc(an['scores']):.3f}", f"{an['train_s']:.0f}",
                          f"{n_test / an['predict_s']:.1f}", f"{mp / an['predict_s']:.2f}")
    Console(width=150).print(table)
    print(f"images: {counts}")


if __name__ == "__main__":
    main(sys.argv[1:])
