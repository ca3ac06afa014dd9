"""Benchmark: inspection of simulated wafers and PV cells against the simulator's ground truth.



Scans small simulated samples (seeds far from any used in training) at the pixel sizes of the
demo recipes (wafer 5 µm, PV cell 30 µm; options change them), runs the inspect stage on each
mosaic and prints, per sample and in total:

* recall of the true defects at least 4 pixels across (a true defect is found when a
  reported defect's box, grown by 2 pixels, holds its centre, or their centres lie within
  half the true size);
* false defects per cm² of inspected (usable) area: reported defects matching no true one;
* centre error in pixels (median over found compact defects: particles, pits, and stains
  up to 32 pixels across);
* roughness R² against the true Sa: plain coupons with uniform simulated roughness of known Sa,
  the median of the roughness map against it;
* class accuracy: the share of found defects whose class is the one a fab would give the
  true kind (:data:`EXPECTED_CLASS`), with the confusions listed;
* Spearman rank correlation between a defect's uncertainty and its error (1 for a false
  defect, 0 for a true one): positive means "more uncertain, more often wrong";
* throughput: end to end Zarr -> Zarr (three OME-NGFF maps written) in mosaic megapixels per
  second, and the network alone on one full window;
* a die-dense wafer (about 40 full dies in 5 x 5 tiles, as on the demo wafer) apart: the
  table's wafers hold 4 dies each, so they would not show what the die-to-die comparison
  costs (``scanner/inspection/dietodie.py``); its recall and false defects are printed too.

Run: ``nice -n 10 .venv/bin/python bench/bench_inspect.py [--model M] [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import yaml
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scanner.defectlist import read_defects  # noqa: E402
from scanner.inspection.inspect import load_inspection_model  # noqa: E402
from scanner.inspection.tiled import DEFAULT_CORE_PX, plan_tiling  # noqa: E402
from scanner.pipeline import run_scan  # noqa: E402
from scanner.recipe import load_recipe  # noqa: E402

#: seeds of the benchmark samples (training uses small seeds; these are never used there)
SEEDS = (90101, 90202)


#: kinds whose true centre is the centre of what is seen (the centre error is measured on
#: them): round particles and pits, and stains up to :data:`COMPACT_MAX_PX` across (larger
#: stains are clusters of blobs whose drawn "centre" is one blob's, not the region's)
COMPACT = ("particle", "pit", "stain")
COMPACT_MAX_PX = 32

#: the class a fab would give each simulated defect kind (for the class accuracy): a dark area
#: of a PV cell is a stain; a missing structure or an interrupted finger is a pattern defect
EXPECTED_CLASS = {
    "particle": "particle", "pit": "pit", "scratch": "scratch", "crack": "crack",
    "stain": "stain", "dark_area": "stain", "missing_pattern": "pattern",
    "finger_interruption": "pattern",
}

#: pixel sizes (µm) the benchmark images each kind at: those of the demo recipes
#: (``recipes/demo_wafer.yaml``, ``recipes/demo_pv_cell.yaml``), inside the ranges the default
#: model is trained over (``models.data.PIXEL_RANGES_UM``)
PIXEL_UM = {"wafer": 5.0, "pv_cell": 30.0}


def recipes(pixel_um: dict[str, float], quick: bool) -> dict[str, dict]:
    """Small wafer and PV-cell recipes of about 3 x 3 (quick) or 5 x 5 tiles."""
    n_tiles = 3 if quick else 5
    out = {}
    for seed in SEEDS[: 1 if quick else 2]:
        out[f"wafer-{seed}"] = wafer_recipe(pixel_um["wafer"], n_tiles, seed, dies_across=3)
        p = pixel_um["pv_cell"]
        side_mm = 1024 * p / 1000 * n_tiles * 0.9
        cam = {"width": 1024, "height": 1024, "pixel_size_um": p, "bit_depth": 12}
        out[f"pv_cell-{seed}"] = {
            "sample": {"kind": "pv_cell", "width_mm": round(side_mm, 3),
                       "height_mm": round(side_mm, 3), "busbars": 3,
                       "finger_pitch_mm": 1.8,
                       "defects": {"count": 8, "seed": seed}},
            "microscope": {"kind": "simulated", "camera": cam, "seed": seed},
            "scan": {"overlap": 0.1},
        }
    return out


def wafer_recipe(pixel_um: float, n_tiles: int, seed: int, dies_across: int,
                 die_origin_mm: float = 0.0) -> dict:
    """A wafer scanned in about ``n_tiles`` x ``n_tiles`` tiles, dies a ``dies_across``-th of
    the scanned side, 12 defects of seed ``seed``."""
    side_mm = 1024 * pixel_um / 1000 * n_tiles
    cam = {"width": 1024, "height": 1024, "pixel_size_um": pixel_um, "bit_depth": 12}
    return {
        "sample": {"kind": "wafer", "diameter_mm": round(side_mm * 1.45, 3),
                   "edge_exclusion_mm": round(side_mm * 0.05, 3),
                   "die_pitch_mm": [round(side_mm / dies_across, 3)] * 2,
                   "die_origin_mm": [round(die_origin_mm, 3)] * 2,
                   "defects": {"count": 12, "seed": seed}},
        "microscope": {"kind": "simulated", "camera": cam, "seed": seed},
        "scan": {"overlap": 0.1},
    }


def dense_wafer(pixel_um: float, quick: bool) -> dict:
    """A wafer whose 5 x 5 tiles (3 x 3 quick) are mostly dies: pitch a seventh of the side."""
    n_tiles = 3 if quick else 5
    side_mm = 1024 * pixel_um / 1000 * n_tiles
    return wafer_recipe(pixel_um, n_tiles, 90303, dies_across=7, die_origin_mm=side_mm / 14)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 3 or np.all(a == a[0]) or np.all(b == b[0]):
        return math.nan
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def overlapping(true: list[dict]) -> list[list[dict]]:
    """True defects in groups whose boxes overlap: one group is one true defect.

    The simulator may paint one defect over another (the die-dense wafer: a 39 µm pit on a
    168 x 31 µm missing-pattern patch); inspection reports touching regions as one defect, as
    any would, so one report finds such a group, and the group is counted once."""
    parent = list(range(len(true)))

    def root(k: int) -> int:
        while parent[k] != k:
            k = parent[k]
        return k

    for i, a in enumerate(true):
        for j in range(i):
            b = true[j]
            if (a["bbox_um"][0] <= b["bbox_um"][2] and b["bbox_um"][0] <= a["bbox_um"][2]
                    and a["bbox_um"][1] <= b["bbox_um"][3] and b["bbox_um"][1] <= a["bbox_um"][3]):
                parent[root(i)] = root(j)
    out: dict[int, list[dict]] = {}
    for k, t in enumerate(true):
        out.setdefault(root(k), []).append(t)
    return list(out.values())


def evaluate(folder: Path) -> dict[str, float]:
    """Match a scan's defects with its truth."""
    scan = json.loads((folder / "scan.json").read_text())
    pixel_um = float(scan["recipe"]["microscope"]["camera"]["pixel_size_um"])
    truth = json.loads((folder / "truth.json").read_text())
    header, found = read_defects(folder)
    true = [t for t in truth["defects"] if t["size_um"] >= 4 * pixel_um]
    groups = overlapping(true)
    matched_true, used, missed = 0, set(), []
    errors = []
    classes = []  # (expected, reported) of every found true defect
    for group in groups:
        best, best_d, t = None, math.inf, group[0]
        for k, d in enumerate(found):
            if k in used:  # one reported defect finds one true defect
                continue
            x0, y0, x1, y1 = d.bbox_um
            g = 2 * pixel_um
            for member in group:
                inside = (x0 - g <= member["x_um"] <= x1 + g
                          and y0 - g <= member["y_um"] <= y1 + g)
                dist = math.hypot(d.x_um - member["x_um"], d.y_um - member["y_um"])
                if (inside or dist <= member["size_um"] / 2) and dist < best_d:
                    best, best_d, t = k, dist, member
        if best is not None:
            matched_true += 1
            used.add(best)
            classes.append((EXPECTED_CLASS.get(t["kind"], "other"), found[best].defect_class))
            if t["kind"] in COMPACT and t["size_um"] <= COMPACT_MAX_PX * pixel_um:
                errors.append(best_d / pixel_um)
        else:
            missed.append(" + ".join(f"{m['kind']} {m['size_um']:.0f} um at "
                                     f"({m['x_um']:.0f}, {m['y_um']:.0f})" for m in group))
    # a reported defect that holds any true defect (even one under 4 px) is not false
    false = 0
    wrong = []
    for k, d in enumerate(found):
        x0, y0, x1, y1 = d.bbox_um
        g = 2 * pixel_um
        hit = k in used or any(
            x0 - g <= t["x_um"] <= x1 + g and y0 - g <= t["y_um"] <= y1 + g
            for t in truth["defects"])
        false += not hit
        wrong.append(0.0 if hit else 1.0)
    from scanner.geometry import usable_polygon
    from scanner.recipe import parse_recipe

    area_cm2 = usable_polygon(parse_recipe(scan["recipe"], folder).sample).area / 1e8
    unc = np.array([d.uncertainty for d in found])
    return {
        "true": len(groups), "found": matched_true, "reported": len(found), "false": false,
        "area_cm2": area_cm2,
        "centre_err_px": float(np.median(errors)) if errors else math.nan,
        "unc_rho": _spearman(unc, np.array(wrong)),
        "inspect": scan["inspection"],
        "unc": unc.tolist(), "wrong": wrong, "classes": classes, "missed": missed,
    }


def class_accuracy(classes: list[tuple[str, str]]) -> float:
    """Share of ``(expected, reported)`` class pairs that agree (NaN for none)."""
    return sum(e == c for e, c in classes) / len(classes) if classes else math.nan


def network_rate(model) -> float:
    """Megapixels per second of the network alone on one default-size window."""
    t = plan_tiling((8192, 8192), model.output_stride, model.context_px, DEFAULT_CORE_PX)
    x = np.random.default_rng(0).normal(0, 0.3, (1, t.window_px, t.window_px)).astype(np.float32)
    model.predict(x)  # warm-up
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        model.predict(x)
        runs.append(time.perf_counter() - t0)
    return x.size / min(runs) / 1e6


def roughness_r2(model, tmp: Path, quick: bool) -> tuple[float, list[tuple[float, float]]]:
    """R² of the median roughness map of plain rough coupons against their true Sa."""
    p = float(model.pixel_size_um)
    side_mm = round(900 * p / 1000, 4)
    pairs = []
    for k, sa in enumerate((1.0, 3.0, 6.0, 12.0) if quick else (0.5, 1, 2, 4, 6, 9, 12, 16)):
        data = {"sample": {"kind": "rectangle", "width_mm": side_mm, "height_mm": side_mm,
                           "defects": {"count": 0},
                           "roughness": {"sa_nm": sa, "seed": 90500 + k}},
                "microscope": {"kind": "simulated", "seed": 90500 + k,
                               "camera": {"width": 1024, "height": 1024, "pixel_size_um": p,
                                          "bit_depth": 12}},
                "scan": {"overlap": 0.1}}
        path = tmp / f"rough{k}.yaml"
        path.write_text(yaml.safe_dump(data))
        res = run_scan(load_recipe(path), tmp / f"rough{k}", inspect=True, model=model)
        from scanner.ngff import open_mosaic

        rough = np.asarray(open_mosaic(res.folder / "roughness.ome.zarr")[0][0][:])
        inner = rough[rough.shape[0] // 4: -rough.shape[0] // 4,
                      rough.shape[1] // 4: -rough.shape[1] // 4]
        pairs.append((sa, float(np.median(inner))))
    t, e = np.array(pairs).T
    return float(1 - ((e - t) ** 2).sum() / ((t - t.mean()) ** 2).sum()), pairs


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model file (default: shipped)")
    parser.add_argument("--quick", action="store_true", help="one small sample of each kind")
    parser.add_argument("--wafer-pixel-um", type=float, default=PIXEL_UM["wafer"])
    parser.add_argument("--pv-pixel-um", type=float, default=PIXEL_UM["pv_cell"])
    args = parser.parse_args(argv)
    model = load_inspection_model(args.model)
    pixels = {"wafer": args.wafer_pixel_um, "pv_cell": args.pv_pixel_um}
    table = Table(title=f"waferscope inspection benchmark (wafer {pixels['wafer']:g} µm, "
                        f"PV cell {pixels['pv_cell']:g} µm pixels; threshold "
                        f"{model.threshold:.3g})")
    for col in ("sample", "mosaic MP", "true ≥4px", "found", "recall", "false", "false/cm²",
                "centre err px", "class acc.", "unc. ρ", "Zarr→Zarr MP/s"):
        table.add_column(col, justify="right")
    total = {"true": 0, "found": 0, "false": 0, "area": 0.0, "mp": 0.0, "s": 0.0}
    errs, uncs, wrongs, classes, missed = [], [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in recipes(pixels, args.quick).items():
            path = Path(tmp) / f"{name}.yaml"
            path.write_text(yaml.safe_dump(data))
            result = run_scan(load_recipe(path), Path(tmp) / name, inspect=True, model=model)
            r = evaluate(result.folder)
            ins = r["inspect"]
            mp = ins["mosaic_megapixels"]
            rate = mp / ins["maps_s"]
            total["true"] += r["true"]
            total["found"] += r["found"]
            total["false"] += r["false"]
            total["area"] += r["area_cm2"]
            total["mp"] += mp
            total["s"] += ins["maps_s"]
            if math.isfinite(r["centre_err_px"]):
                errs.append(r["centre_err_px"])
            uncs += r["unc"]
            wrongs += r["wrong"]
            classes += r["classes"]
            missed += [f"{name}: {m}" for m in r["missed"]]
            table.add_row(name, f"{mp:.1f}", str(r["true"]), str(r["found"]),
                          f"{r['found'] / max(r['true'], 1):.2f}", str(r["false"]),
                          f"{r['false'] / r['area_cm2']:.2f}", f"{r['centre_err_px']:.2f}",
                          f"{class_accuracy(r['classes']):.2f}", f"{r['unc_rho']:.2f}",
                          f"{rate:.2f}")
    table.add_row("all", f"{total['mp']:.1f}", str(total["true"]), str(total["found"]),
                  f"{total['found'] / max(total['true'], 1):.2f}", str(total["false"]),
                  f"{total['false'] / max(total['area'], 1e-9):.2f}",
                  f"{np.median(errs):.2f}" if errs else "nan",
                  f"{class_accuracy(classes):.2f}",
                  f"{_spearman(np.array(uncs), np.array(wrongs)):.2f}",
                  f"{total['mp'] / max(total['s'], 1e-9):.2f}")
    console = Console(width=160)
    console.print(table)
    confusions = Counter(f"{e}→{c}" for e, c in classes if e != c)
    console.print("class confusions (expected→reported): "
                  + (", ".join(f"{k} {n}" for k, n in confusions.most_common()) or "none"))
    console.print("missed: " + ("; ".join(missed) or "none"))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dense.yaml"
        path.write_text(yaml.safe_dump(dense_wafer(pixels["wafer"], args.quick)))
        result = run_scan(load_recipe(path), Path(tmp) / "dense", inspect=True, model=model)
        r = evaluate(result.folder)
        ins = r["inspect"]
        d2d = ins.get("die_to_die") or {}
        console.print(
            f"die-dense wafer: {d2d.get('dies', 0)} dies compared, {ins['mosaic_megapixels']:.1f} "
            f"MP, {ins['mosaic_megapixels'] / ins['maps_s']:.2f} MP/s Zarr→Zarr (network "
            f"{ins['network_s']:.1f} s, die-to-die {d2d.get('seconds', 0.0):.1f} s of "
            f"{ins['maps_s']:.1f} s); found {r['found']}/{r['true']}, {r['false']} false "
            f"({r['false'] / r['area_cm2']:.2f}/cm²)"
            + (f"; missed {'; '.join(r['missed'])}" if r["missed"] else ""))
    console.print(f"network alone: {network_rate(model):.2f} MP/s (one window, "
                  f"{model.output_stride}x output stride)")
    with tempfile.TemporaryDirectory() as tmp:
        r2, pairs = roughness_r2(model, Path(tmp), args.quick)
    console.print(f"roughness R² vs true Sa: {r2:.3f} (true, estimated nm: "
                  + ", ".join(f"{a:g}→{b:.2f}" for a, b in pairs) + ")")
    console.print("targets: recall ≥ 0.95, ≤ 1 false/cm², centre ≤ 2 px, ≥ 5 MP/s Zarr→Zarr")


if __name__ == "__main__":
    main(sys.argv[1:])
