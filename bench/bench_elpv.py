"""Real-image benchmark: defective vs functional solar cells of the ELPV data set.

Data: the PyPI package ``elpv-dataset`` (2,624 electroluminescence images of PV cells,
300 x 300, 8-bit; each with a defect probability 0, 1/3, 2/3 or 1 and a type mono/poly;
CC BY-NC-SA 4.0: the images are copied to a temporary folder, or to ``--keep DIR``, which
must not be committed: ``bench/elpv-data/`` is git-ignored).

Split by file name (:func:`split`): a quarter of the cells (``crc32(name) % 4 == 0``) is kept
for an independent check and is dropped before anything else (never read, scored or
counted by label here); of the rest, half 0 (``(crc32(name) // 4) % 2 == 0``) gives the
training cells (functional ones only, probability 0) and half 1 the test cells (all of them).
Metric: image AUROC of defective (probability >= 2/3, i.e. 2/3 and 1) against functional
(probability 0) test cells; the 1/3 cells are scored but left out of the AUROC.

Rows of the table:

1. mean brightness (score = minus the mean grey level: defects are dark in EL images);
2. the plain PatchCore probe ``../shared/baselines/patchcore_probe.py`` (EfficientNet-Lite0);
3. waferscope through its CLI, as a user would run it: ``waferscope train --good TRAIN
   --out MODEL`` then ``waferscope inspect TEST --model MODEL --out OUT`` (``scores.csv``):
   whatever detector the CLI builds;
4. (``--cnn``) the old inspection CNN, ``models.train.train_model`` on the same good cells
   (with ``detector="cnn"`` where that keyword exists), scored with its anomaly map's
   smoothed peak as ``inspect`` scores plain images;
5. (``--anomalib``) anomalib DRAEM in its own environment (``bash bench/setup_anomalib.sh``).

Run: ``nice -n 10 .venv/bin/python bench/bench_elpv.py [--quick] [--skip-probe] [--cnn]
[--anomalib] [--keep bench/elpv-data]`` (``make bench-elpv`` installs the data and runs it).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
PROBE = ROOT.parent / "shared" / "baselines" / "patchcore_probe.py"
ANOMALIB_PY = ROOT / "bench" / ".venv-anomalib" / "bin" / "python"
# probability >= this: defective (2/3 and 1). labels.csv stores 2/3 as 0.6666666666666666,
# just under 0.67: the bound is 2/3 itself, with room for rounding
DEFECTIVE_MIN = 2 / 3 - 1e-6
QUICK_TRAIN, QUICK_TEST = 150, 200
QUICK_EPOCHS = 2


def split(name: str) -> str:
    """``"hidden"``, ``"train"`` or ``"test"`` for a cell's file name (e.g. ``cell0001.png``).

    ``hidden``: ``crc32(name) % 4 == 0``, kept for an independent check; of the rest,
    ``(crc32(name) // 4) % 2``: 0 ``train``, 1 ``test``.
    """
    c = zlib.crc32(name.encode())
    if c % 4 == 0:
        return "hidden"
    return "train" if (c // 4) % 2 == 0 else "test"


@dataclass(frozen=True)
class Cell:
    name: str
    path: Path
    probability: float
    type: str
    part: str  # train | test

    @property
    def label(self) -> str:
        """``functional`` (0), ``defective`` (2/3 and 1) or ``uncertain`` (1/3)."""
        if self.probability == 0:
            return "functional"
        return "defective" if self.probability >= DEFECTIVE_MIN else "uncertain"


def load_cells() -> tuple[list[Cell], int]:
    """The non-hidden cells of the installed data set, and how many names were hidden.

    ``elpv_dataset.utils.load_dataset`` returns the images but not their file names, so the
    package's ``labels.csv`` (``images/cellNNNN.png  probability  type``) is read here; a
    hidden cell is dropped on its name alone, before its label is parsed or its image opened.
    """
    try:
        import elpv_dataset
    except ImportError:
        sys.exit("elpv-dataset is not installed: bash bench/setup_elpv.sh (or make bench-elpv)")
    data = Path(elpv_dataset.__file__).resolve().parent / "data"
    cells, hidden = [], 0
    for line in (data / "labels.csv").read_text().splitlines():
        if not line.strip():
            continue
        rel, rest = line.split(maxsplit=1)
        name = Path(rel).name
        part = split(name)
        if part == "hidden":
            hidden += 1
            continue
        prob, kind = rest.split()
        cells.append(Cell(name, data / rel, float(prob), kind, part))
    return cells, hidden


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Rank (Mann-Whitney) AUROC of ``scores`` for ``positive`` against the rest; ties half."""
    from scipy.stats import rankdata

    positive = np.asarray(positive, bool)
    n1, n0 = int(positive.sum()), int((~positive).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = rankdata(np.asarray(scores, float))
    return float((r[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def aurocs(test: list[Cell], scores: dict[str, float]) -> tuple[float, float, float, int]:
    """AUROC over all / mono / poly test cells (defective vs functional), and cells missing."""
    missing = sum(c.name not in scores for c in test)
    out = []
    for kind in (None, "mono", "poly"):
        cs = [c for c in test if c.label != "uncertain" and c.name in scores
              and (kind is None or c.type == kind)]
        out.append(auroc(np.array([scores[c.name] for c in cs]),
                         np.array([c.label == "defective" for c in cs])))
    return out[0], out[1], out[2], missing


def subsample(cells: list[Cell], n: int) -> list[Cell]:
    """``n`` cells chosen by a fixed seed (all when fewer), in name order."""
    if len(cells) <= n:
        return cells
    idx = np.random.default_rng(0).choice(len(cells), n, replace=False)
    return sorted((cells[i] for i in idx), key=lambda c: c.name)


def write_folder(cells: list[Cell], folder: Path) -> Path:
    """Copy the cells' PNG files (bit-exact) into a fresh ``folder``."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for c in cells:
        shutil.copyfile(c.path, folder / c.name)
    return folder


def read_scores(path: Path) -> dict[str, float]:
    """``image,score`` CSV to ``{file name: score}``."""
    with open(path, newline="") as f:
        return {Path(r["image"]).name: float(r["score"]) for r in csv.DictReader(f)}


def run(cmd: list[str], log: Path, timeout: float | None = None) -> tuple[int, float, str]:
    """Run a command (output to ``log``): return code, wall seconds, last line of output."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        try:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, text=True,
                                  check=False, timeout=timeout, cwd=ROOT)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = -9
    wall = time.perf_counter() - t0
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return rc, wall, (lines[-1] if lines else "")[:160]


def waferscope_exe() -> str:
    exe = Path(sys.executable).parent / "waferscope"
    if exe.exists():
        return str(exe)
    found = shutil.which("waferscope")
    if not found:
        sys.exit("waferscope not found: run the benchmark with .venv/bin/python")
    return found


# ---------------------------------------------------------------------------------- rows

@dataclass
class Row:
    method: str
    how: str = ""
    scores: dict[str, float] | None = None
    train_s: float | None = None
    score_s: float | None = None
    n_scored: int = 0
    note: str = ""


def row_brightness(test: list[Cell]) -> Row:
    from PIL import Image

    t0 = time.perf_counter()
    scores = {}
    for c in test:
        with Image.open(c.path) as im:
            scores[c.name] = -float(np.asarray(im.convert("L"), np.float32).mean())
    return Row("mean brightness", "score = -mean grey level", scores, 0.0,
               time.perf_counter() - t0, len(test))


def row_probe(good: Path, test_dir: Path, n_test: int, work: Path) -> Row:
    row = Row("PatchCore probe", "shared/baselines/patchcore_probe.py")
    if not PROBE.is_file():
        row.note = f"not found: {PROBE}"
        return row
    out = work / "probe_scores.csv"
    rc, wall, last = run([sys.executable, str(PROBE), str(good), str(test_dir), str(out)],
                         work / "probe.log")
    if rc != 0 or not out.is_file():
        row.note = f"failed (rc {rc}): {last}"
        return row
    row.scores, row.score_s, row.n_scored = read_scores(out), wall, n_test
    row.note = f"one process: bank + scoring {wall:.0f} s ({last})"
    return row


def cli_supports(exe: str, command: str, option: str) -> bool:
    proc = subprocess.run([exe, command, "--help"], capture_output=True, text=True,
                          check=False, env={**os.environ, "COLUMNS": "200"})
    return option in proc.stdout


def row_cli(exe: str, good: Path, test_dir: Path, n_test: int, work: Path,
            epochs: int | None) -> tuple[Row, list[str]]:
    row = Row("waferscope CLI", "waferscope train + inspect")
    model_dir = work / "models"
    if model_dir.exists():
        shutil.rmtree(model_dir)  # train refuses to replace a model (no --overwrite used)
    model_dir.mkdir(parents=True)
    model, out = model_dir / "elpv", work / "cli_out"
    if out.exists():
        shutil.rmtree(out)
    train = [exe, "train", "--good", str(good), "--out", str(model)]
    if epochs is not None:
        if cli_supports(exe, "train", "--epochs"):
            train += ["--epochs", str(epochs)]
            row.how += f" (--epochs {epochs})"
        else:
            row.how += " (train has no --epochs: its default)"
    inspect = [exe, "inspect", str(test_dir), "--model", str(model), "--out", str(out)]
    commands = [" ".join(train), " ".join(inspect)]
    rc, row.train_s, last = run(train, work / "cli_train.log")
    if rc != 0:
        row.note = f"train failed (rc {rc}): {last}"
        return row, commands
    card = model.with_suffix(".json")
    if card.is_file():
        info = json.loads(card.read_text())  # what the CLI built, in the card's words
        built = info.get("method") or info.get("architecture") or info.get("kind")
        if isinstance(built, dict):
            built = built.get("name")
        if built:
            row.how += f"; built: {str(built).split(':')[0]}"
    rc, row.score_s, last = run(inspect, work / "cli_inspect.log")
    if rc != 0 or not (out / "scores.csv").is_file():
        row.note = f"inspect failed (rc {rc}): {last}"
        return row, commands
    row.scores = read_scores(out / "scores.csv")
    row.n_scored = len(row.scores)
    try:
        timings = json.loads((out / "defects.json").read_text())["header"]["timings"]
        row.note = (f"wall: train {row.train_s:.0f} s, inspect {row.score_s:.0f} s "
                    f"(in-process {float(timings['wall_s']):.0f} s)")
    except (OSError, KeyError, TypeError, ValueError):
        row.note = f"wall: train {row.train_s:.0f} s, inspect {row.score_s:.0f} s"
    return row, commands


# Runs in a fresh interpreter (the project's own), so that it trains the old CNN whatever the
# CLI's default detector is: argv = good folder, model stem, test folder, result JSON, epochs.
_CNN_SCRIPT = r'''
import inspect, json, sys, time
from pathlib import Path
import numpy as np
from PIL import Image
from scipy import ndimage
good, stem, test, result, epochs = sys.argv[1:6]
from models.train import train_model
params = inspect.signature(train_model).parameters
kwargs, how = {}, "models.train.train_model"
if "detector" in params:
    kwargs["detector"] = "cnn"
    how += '(detector="cnn")'
elif "config" not in params:
    json.dump({"skip": "train_model has neither detector= nor config=: unclear whether it "
               "trains the old CNN"}, open(result, "w"))
    sys.exit(0)
if epochs != "none" and "epochs" in params:
    kwargs["epochs"] = int(epochs)
    how += f" epochs={epochs}"
t0 = time.perf_counter()
train_model([Path(good)], Path(stem), **kwargs)
train_s = time.perf_counter() - t0
from models.modelfile import InspectionModel, load_network
from models.network import InspectionNet
net, card, weights = load_network(Path(stem).with_suffix(".safetensors"))
if not isinstance(net, InspectionNet):
    json.dump({"skip": f"train_model built a {type(net).__name__}, not the old CNN"},
              open(result, "w"))
    sys.exit(0)
model = InspectionModel(net, card, path=weights)
paths = sorted(p for p in Path(test).iterdir() if p.suffix.lower() == ".png")
t0 = time.perf_counter()
scores = {}
for p in paths:
    with Image.open(p) as im:
        img = np.asarray(im.convert("L"), np.float32)
    anomaly = model.predict_image(img)["anomaly"]
    scores[p.name] = float(ndimage.gaussian_filter(anomaly.astype(np.float32), 1.0).max())
score_s = time.perf_counter() - t0
json.dump({"scores": scores, "train_s": train_s, "score_s": score_s, "how": how},
          open(result, "w"))
'''


def row_cnn(good: Path, test_dir: Path, work: Path, epochs: int | None) -> Row:
    row = Row("today's CNN (Python API)")
    folder = work / "cnn"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    result = folder / "result.json"
    cmd = [sys.executable, "-c", _CNN_SCRIPT, str(good), str(folder / "elpv"), str(test_dir),
           str(result), "none" if epochs is None else str(epochs)]
    rc, wall, last = run(cmd, work / "cnn.log")
    if rc != 0 or not result.is_file():
        row.note = f"failed (rc {rc}): {last}"
        return row
    res = json.loads(result.read_text())
    if "skip" in res:
        row.note = f"skipped: {res['skip']}"
        return row
    row.how, row.scores = res["how"], res["scores"]
    row.train_s, row.score_s, row.n_scored = res["train_s"], res["score_s"], len(res["scores"])
    row.note = "score = peak of the smoothed anomaly map (as inspect); in-process times"
    return row


# Runs in bench/.venv-anomalib: DRAEM trained on train/good, every test image scored.
# argv = root, epochs; prints one JSON line.
_ANOMALIB_SCRIPT = r'''
import json, sys, time
from pathlib import Path
import torch
torch.set_num_threads(2)
from anomalib.data import Folder
from anomalib.engine import Engine
from anomalib.models import Draem
root, epochs = Path(sys.argv[1]), int(sys.argv[2])
kw = dict(name="elpv", root=root, normal_dir="train/good", abnormal_dir="test/other",
          normal_test_dir="test/good", train_batch_size=8, eval_batch_size=8, num_workers=0)
try:  # keep every test image in the test set (the default takes a validation part of it)
    dm = Folder(val_split_mode="same_as_test", **kw)
except TypeError:
    dm = Folder(**kw)
(root / "no_dtd").mkdir(exist_ok=True)  # no download: DRAEM makes its anomalies from noise
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
        scores[Path(path).name] = float(score)
print(json.dumps({"scores": scores, "train_s": train_s, "predict_s": pred_s}))
'''


def row_anomalib(train: list[Cell], test: list[Cell], work: Path, epochs: int,
                 n_train: int, timeout_s: float) -> Row:
    row = Row("anomalib DRAEM")
    if not ANOMALIB_PY.exists():
        row.note = "not set up (bash bench/setup_anomalib.sh)"
        return row
    # PatchCore/PaDiM in anomalib take timm backbones with hub weights (none offline; the
    # local EfficientNet-Lite0 weights are in another layout): DRAEM, trained from scratch.
    root = work / "anomalib"
    cells = subsample(train, n_train)
    write_folder(cells, root / "train" / "good")
    write_folder([c for c in test if c.label == "functional"], root / "test" / "good")
    write_folder([c for c in test if c.label != "functional"], root / "test" / "other")
    rc, wall, last = run([str(ANOMALIB_PY), "-c", _ANOMALIB_SCRIPT, str(root), str(epochs)],
                         work / "anomalib.log", timeout=timeout_s)
    if rc == -9:
        row.note = f"stopped after {wall:.0f} s (--anomalib-timeout)"
        return row
    lines = (work / "anomalib.log").read_text(errors="replace").splitlines()
    res = next((json.loads(ln) for ln in reversed(lines) if ln.startswith('{"scores"')), None)
    if rc != 0 or res is None:
        row.note = f"failed (rc {rc}): {last}"
        return row
    row.how = f"{epochs} epoch(s) from scratch on {len(cells)} good cells, 256 px"
    row.scores, row.train_s, row.score_s = res["scores"], res["train_s"], res["predict_s"]
    row.n_scored = len(res["scores"])
    row.note = "score s: engine.predict (in-process)"
    return row


# ---------------------------------------------------------------------------------- main

def duplicates(cells: list[Cell]) -> list[tuple[str, str]]:
    """Pairs of cells with identical pixels (train/test leakage check), by file content hash."""
    from PIL import Image

    seen: dict[str, str] = {}
    pairs = []
    for c in cells:
        with Image.open(c.path) as im:
            h = hashlib.sha1(np.asarray(im).tobytes()).hexdigest()
        if h in seen:
            pairs.append((seen[h], c.name))
        else:
            seen[h] = c.name
    return pairs


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else format(x, spec)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"subsample ({QUICK_TRAIN} train, {QUICK_TEST} test cells) and "
                             f"{QUICK_EPOCHS} epochs where an epoch option exists: a smoke run")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs for the CLI's train (only if it has --epochs) and the CNN "
                             "row (default: their own defaults; --quick: 2)")
    parser.add_argument("--skip-probe", action="store_true", help="leave out the probe row")
    parser.add_argument("--cnn", action="store_true",
                        help="add the old CNN row (models.train.train_model, Python API)")
    parser.add_argument("--anomalib", action="store_true",
                        help="add anomalib DRAEM (environment: bash bench/setup_anomalib.sh)")
    parser.add_argument("--anomalib-epochs", type=int, default=1)
    parser.add_argument("--anomalib-train", type=int, default=100,
                        help="good cells DRAEM trains on (a subsample: it is slow on a CPU)")
    parser.add_argument("--anomalib-timeout", type=float, default=3600,
                        help="seconds before the anomalib row is given up")
    parser.add_argument("--keep", type=Path, default=None,
                        help="write images, models and outputs here and keep them "
                             "(e.g. bench/elpv-data, git-ignored; never commit the images)")
    args = parser.parse_args(argv)
    epochs = args.epochs if args.epochs is not None else (QUICK_EPOCHS if args.quick else None)

    t_all = time.perf_counter()
    cells, n_hidden = load_cells()
    train = [c for c in cells if c.part == "train" and c.label == "functional"]
    n_train_other = sum(c.part == "train" and c.label != "functional" for c in cells)
    test = [c for c in cells if c.part == "test"]
    if args.quick:
        train, test = subsample(train, QUICK_TRAIN), subsample(test, QUICK_TEST)
    counts = {lab: sum(c.label == lab for c in test)
              for lab in ("functional", "uncertain", "defective")}
    by_type = {t: sum(c.type == t for c in test) for t in ("mono", "poly")}
    print(f"split: hidden {n_hidden} (dropped by name, not read), train {len(train)} "
          f"functional cells (+{n_train_other} non-functional cells of half 0 unused), "
          f"test {len(test)}: functional {counts['functional']}, 1/3 {counts['uncertain']} "
          f"(scored, not in the AUROC), defective (>= 2/3) {counts['defective']}; "
          f"mono {by_type['mono']}, poly {by_type['poly']}" + (" [--quick]" if args.quick else ""))
    dups = duplicates(train + test)
    if dups:
        print(f"identical images among the cells used: {len(dups)} pairs, e.g. {dups[:3]}")

    commands: list[str] = []
    if args.keep is not None:
        work_ctx = None
        work = args.keep.resolve()
        work.mkdir(parents=True, exist_ok=True)
    else:
        work_ctx = tempfile.TemporaryDirectory(prefix="elpv-")
        work = Path(work_ctx.name)
    try:
        good = write_folder(train, work / "train_good")
        test_dir = write_folder(test, work / "test")
        exe = waferscope_exe()
        rows = [row_brightness(test)]
        if args.skip_probe:
            rows.append(Row("PatchCore probe", note="skipped (--skip-probe)"))
        else:
            rows.append(row_probe(good, test_dir, len(test), work))
            commands.append(f"{sys.executable} {PROBE} {good} {test_dir} "
                            f"{work / 'probe_scores.csv'}")
        row, cmds = row_cli(exe, good, test_dir, len(test), work, epochs)
        rows.append(row)
        commands += cmds
        if args.cnn:
            rows.append(row_cnn(good, test_dir, work, epochs))
        else:
            rows.append(Row("today's CNN (Python API)", note="skipped (pass --cnn)"))
        if args.anomalib:
            rows.append(row_anomalib(train, test, work, args.anomalib_epochs,
                                     args.anomalib_train, args.anomalib_timeout))
        else:
            rows.append(Row("anomalib DRAEM", note="skipped (pass --anomalib)"))

        table = Table(title=f"ELPV: defective (>= 2/3) vs functional test cells "
                            f"({counts['defective']} vs {counts['functional']}; "
                            f"trained on {len(train)} functional cells)"
                            + (" [--quick]" if args.quick else ""))
        for col, just in (("#", "right"), ("method", "left"), ("how", "left"),
                          ("AUROC", "right"), ("mono", "right"), ("poly", "right"),
                          ("train s", "right"), ("score s", "right"),
                          ("images/s", "right"), ("note", "left")):
            table.add_column(col, justify=just)
        for k, r in enumerate(rows, 1):
            if r.scores is None:
                table.add_row(str(k), r.method, r.how, "-", "-", "-", fmt(r.train_s, ".0f"),
                              "-", "-", r.note)
                continue
            a, am, ap, missing = aurocs(test, r.scores)
            note = r.note + (f"; {missing} test cells without a score" if missing else "")
            rate = r.n_scored / r.score_s if r.score_s else None
            table.add_row(str(k), r.method, r.how, fmt(a, ".3f"), fmt(am, ".3f"),
                          fmt(ap, ".3f"), fmt(r.train_s, ".0f"), fmt(r.score_s, ".1f"),
                          fmt(rate, ".1f"), note)
        Console(width=200).print(table)
        print("AUROC columns: all test cells / mono only / poly only; images/s = scored test "
              "images / score s (for the CLI the whole `inspect` process, start-up included; "
              "for the probe its whole run, memory bank included)")
        print("commands:")
        for c in commands:
            print(f"  {c}")
        print(f"total wall {time.perf_counter() - t_all:.0f} s; work folder "
              f"{work}" + ("" if args.keep else " (deleted)"))
    finally:
        if work_ctx is not None:
            work_ctx.cleanup()


if __name__ == "__main__":
    main(sys.argv[1:])
