"""Benchmark: image files of a product, no scan: good files -> ``train`` -> ``inspect`` files.

A user who has pictures of a part (from another microscope, a camera, an archive) builds a
detector from a few good ones and inspects the rest as files. For each product of
``bench/bench_products.py`` (the same good and painted copies, the same matching):

1. ``--good-files N`` good copies are written as 16-bit TIFF files: the first as made, the
   others moved by up to 2 px; each with a gain of +-5 % and 1 % noise, as separate exposures
   (``--turn DEG``: copies also turned by -DEG, 0 or +DEG, a part placed by hand);
2. ``waferscope train --good`` on them (the card's own threshold; no option);
3. ``waferscope inspect`` of the painted copy (moved, its own exposure) and of three fresh
   good copies, as files.

Prints one table: the reference inspection used (golden image, die to die, or the bank
alone), recall and precision on the painted copy, false defects on the fresh good copies and
the wall times. Defects of 8 px and more are judged, as in the products bench.

Run: ``nice -n 10 .venv/bin/python bench/bench_files.py [--products a,b] [--good-files N]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_products import (  # noqa: E402
    DATA,
    DEFAULT_PRODUCTS,
    PRODUCTS,
    cli,
    make_good,
    match,
    paint_defects,
    write_tiff,
)

#: fresh good copies inspected beside the painted one
FRESH = 3


def exposure(img: np.ndarray, shift: tuple[float, float], turn_deg: float, seed: int
             ) -> np.ndarray:
    """One picture of ``img`` (values 0-1): moved, turned, with a gain and noise."""
    rng = np.random.default_rng(seed)
    out = img
    if any(shift):
        out = ndimage.shift(out, shift, order=1, mode="nearest")
    if turn_deg:
        out = ndimage.rotate(out, turn_deg, reshape=False, order=1, mode="nearest")
    return np.clip(out * rng.uniform(0.95, 1.05) + rng.normal(0, 0.01, out.shape), 0, 1)


def bench_files(name: str, n_good: int, turn: float, work: Path, log: Path) -> dict:
    p = PRODUCTS[name]
    folder = work / name
    (folder / "good").mkdir(parents=True)
    good, pattern = make_good(p)
    bad, truth = paint_defects(good, pattern, p)
    rng = np.random.default_rng(1)

    def moved() -> tuple[float, float]:
        return tuple(rng.uniform(-2, 2, 2))

    def turned(seed: int) -> float:
        return turn * (seed % 3 - 1)

    for i in range(n_good):
        shift = (0.0, 0.0) if i == 0 else moved()
        write_tiff(exposure(good, shift, turned(i) if i else 0.0, i),
                   folder / "good" / f"good{i}.tif")
    write_tiff(exposure(bad, (0.7, -1.2), turned(99), 99), folder / "bad.tif")
    for i in range(FRESH):
        write_tiff(exposure(good, moved(), turned(200 + i), 200 + i), folder / f"fresh{i}.tif")
    train_s = cli(["train", "--good", str(folder / "good"), "--out", str(folder / "m")], log)
    card = json.loads((folder / "m.json").read_text())
    inspect_s = cli(["inspect", str(folder / "bad.tif"),
                     *[str(folder / f"fresh{i}.tif") for i in range(FRESH)],
                     "--model", str(folder / "m"), "--out", str(folder / "inspection")], log)
    doc = json.loads((folder / "inspection" / "defects.json").read_text())
    header = doc["header"]
    extent = (-0.5, -0.5, good.shape[1] - 0.5, good.shape[0] - 0.5)  # 1 um/px from 0, 0
    m = match(doc["images"]["bad.tif"], truth, extent)
    reference = ("golden image" if (header.get("golden") or {}).get("images_compared")
                 else "die to die" if header["die_to_die"]["images_compared"] else "bank")
    return {"product": name, "good_files": n_good, "turn_deg": turn, "reference": reference,
            "golden_kept": "golden" in card,
            "repeats": (card.get("die_to_die") or {}).get("found_grid_repeats"),
            "recall": m["recall"], "precision": m["precision"], "n_reported": m["n_reported"],
            "missed": m["missed"],
            "false_on_fresh": [len(doc["images"][f"fresh{i}.tif"]) for i in range(FRESH)],
            "train_s": train_s, "inspect_s": inspect_s}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", default=None,
                        help=f"comma-separated names of {', '.join(PRODUCTS)} "
                        f"(default: {', '.join(DEFAULT_PRODUCTS)})")
    parser.add_argument("--good-files", type=int, default=1, help="good files to train on")
    parser.add_argument("--turn", type=float, default=0.0,
                        help="turn the copies by -DEG, 0 or +DEG (a part placed by hand)")
    args = parser.parse_args(argv)
    names = args.products.split(",") if args.products else list(DEFAULT_PRODUCTS)
    unknown = [n for n in names if n not in PRODUCTS]
    if unknown:
        parser.error(f"unknown products {unknown}; choose from {list(PRODUCTS)}")
    if args.good_files < 1:
        parser.error("--good-files: at least 1")
    console = Console(width=160)
    DATA.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="files-", dir=DATA) as tmp:
        work = Path(tmp)
        for name in names:
            try:
                rows.append(bench_files(name, args.good_files, args.turn, work,
                                        work / "cli.log"))
            except Exception as exc:  # noqa: BLE001 - report a failed product and go on
                console.log(f"[red]{name} failed: {exc}")
                rows.append({"product": name, "error": str(exc)})
                continue
            console.log(f"{name}: recall {rows[-1]['recall']:.2f}, reference "
                        f"{rows[-1]['reference']}")
    table = Table(title=f"Image files, no scan: {args.good_files} good file(s) -> train -> "
                  f"inspect files (turn +-{args.turn:g} deg); targets: recall >= 0.9 at "
                  "precision >= 0.9, no defect on good copies")
    for col in ("product", "reference", "golden kept", "dies repeat", "recall", "precision",
                "reported", "false on fresh good", "missed (kind size px)", "train s",
                "inspect s"):
        table.add_column(col, justify="left" if col in ("product", "reference") else "right")
    for r in rows:
        if "error" in r:
            table.add_row(r["product"], "failed", "", "", "", "", "", "",
                          r["error"].splitlines()[-1][:60], "", "")
            continue
        missed = ", ".join(f"{m['kind']} {m['size_px']}" for m in r["missed"]) or "-"
        table.add_row(r["product"], r["reference"], str(r["golden_kept"]), str(r["repeats"]),
                      f"{r['recall']:.2f}", f"{r['precision']:.2f}", str(r["n_reported"]),
                      str(r["false_on_fresh"]), missed, f"{r['train_s']:.0f}",
                      f"{r['inspect_s']:.0f}")
    console.print(table)
    console.print(f"total wall {time.perf_counter() - t0:.0f} s")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
