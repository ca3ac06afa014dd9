"""Kill a scan at random moments, resume it, and compare with an uninterrupted run.

Prints one table: per kill, when it came, the status it left (as read back), the tiles
acquired before the resume, and whether the resumed scan has every tile once, the same
defects and the same mosaic as the uninterrupted run. Then the fault-injection figures: the
demo wafer scanned through the emulated Prior controller with 5 % of serial commands faulted and
2 % camera timeouts, against the same scan without faults.

    python bench/bench_resume.py [--kills 10] [--seed 7] [--keep DIR]
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
import zarr
from skimage.registration import phase_cross_correlation

WAFER = {"kind": "wafer", "diameter_mm": 20, "edge_exclusion_mm": 1.0,
         "die_pitch_mm": [3.0, 2.5], "defects": {"count": 8, "seed": 3}}
CAMERA = {"width": 512, "height": 512, "pixel_size_um": 10.0}
WAFERSCOPE = [sys.executable, "-m", "scanner"]


def _write(path: Path, microscope: dict) -> Path:
    path.write_text(yaml.safe_dump({"sample": WAFER, "microscope": {
        "kind": "simulated", "seed": 1, "camera": CAMERA, **microscope},
        "scan": {"overlap": 0.1}}))
    return path


def _scan(folder: Path) -> dict:
    return json.loads((folder / "scan.json").read_text())


def _ok(folder: Path) -> collections.Counter:
    with open(folder / "tiles.csv", newline="") as f:
        return collections.Counter(int(r["index"]) for r in csv.DictReader(f)
                                   if r.get("status") == "ok")


def _defects(folder: Path) -> list:
    return sorted((d["defect_class"], round(d["x_um"], 1), round(d["y_um"], 1))
                  for d in json.loads((folder / "defects.json").read_text())["defects"])


def _mosaic(folder: Path) -> np.ndarray:
    return zarr.open_array(folder / "mosaic.ome.zarr" / "0")[:].astype(np.float64)


def _started(folder: Path) -> float:
    """Wait until a run has written its scan.json (Python and torch take seconds to import)."""
    while not (folder / "scan.json").is_file():
        time.sleep(0.02)
    return time.perf_counter()


def kills(work: Path, n: int, seed: int) -> None:
    from scanner.scanfolder import effective_status

    recipe = _write(work / "rt.yaml", {"realtime": True})
    ref = work / "reference"
    proc = subprocess.Popen([*WAFERSCOPE, "run", str(recipe), "--out", str(ref)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = _started(ref)
    assert proc.wait() == 0
    wall = time.perf_counter() - t0  # from the scan folder's creation to the end
    n_tiles = _scan(ref)["plan"]["n_tiles"]
    print(f"reference: {n_tiles} tiles, {len(_defects(ref))} defects, wall {wall:.1f} s "
          "(realtime)")
    print(f"{'kill':>4} {'at s':>6} {'left as':>12} {'read as':>12} {'tiles':>6} "
          f"{'resume':>6} {'once':>5} {'defects':>8} {'mosaic':>7}")
    rng = random.Random(seed)
    passed = 0
    for k in range(n):
        at = rng.uniform(0.02, 0.98) * wall
        out = work / f"kill{k}"
        proc = subprocess.Popen([*WAFERSCOPE, "run", str(recipe), "--out", str(out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _started(out)
        time.sleep(at)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        scan = _scan(out)
        left, read = scan["status"], effective_status(scan)
        tiles = len(_ok(out)) if (out / "tiles.csv").is_file() else 0
        rc = 0
        if left != "complete":
            rc = subprocess.run([*WAFERSCOPE, "resume", str(out)], capture_output=True).returncode
        ok = _ok(out)
        once = sorted(ok) == list(range(n_tiles)) and set(ok.values()) == {1}
        same = _defects(out) == _defects(ref)
        mosaic = bool(np.array_equal(_mosaic(out), _mosaic(ref)))
        passed += rc == 0 and once and same and mosaic
        print(f"{k:>4} {at:6.1f} {left:>12} {read:>12} {tiles:>6} {rc:>6} {once!s:>5} "
              f"{same!s:>8} {mosaic!s:>7}")
    print(f"{passed} of {n} kills resumed to the uninterrupted result")


def faults(work: Path) -> None:
    from scanner.pipeline import run_scan
    from scanner.recipe import load_recipe

    rows = []
    for name, extra in (("no faults", {}), ("5% serial + 2% camera",
                                            {"faults": {"serial_error_rate": 0.05,
                                                        "camera_timeout_rate": 0.02,
                                                        "seed": 4}})):
        # the demo wafer (94 tiles) through the Prior driver on the emulated controller
        demo = yaml.safe_load((Path(__file__).parents[1] / "recipes/demo_wafer.yaml").read_text())
        demo["microscope"]["stage"]["driver"] = "prior"
        demo["microscope"].update(extra)
        path = work / f"{len(rows)}.yaml"
        path.write_text(yaml.safe_dump(demo))
        recipe = load_recipe(path)
        t0 = time.perf_counter()
        result = run_scan(recipe, work / f"faults{len(rows)}")
        rows.append((name, result, time.perf_counter() - t0))
    ref = _mosaic(rows[0][1].folder)
    print(f"\n{'run':<24} {'status':>9} {'tiles':>7} {'retried':>8} {'once':>5} "
          f"{'shift px':>9} {'wall s':>7}")
    for name, result, wall in rows:
        ok = _ok(result.folder)
        once = sorted(ok) == list(range(result.n_tiles)) and set(ok.values()) == {1}
        shift, _, _ = phase_cross_correlation(ref, _mosaic(result.folder), upsample_factor=20)
        retried = _scan(result.folder).get("retried_actions", 0)
        print(f"{name:<24} {result.status:>9} {result.n_acquired:>3}/{result.n_tiles:<3} "
              f"{retried:>8} {once!s:>5} {np.hypot(*shift):9.3f} {wall:7.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--keep", type=Path, help="work folder to keep (default: temporary)")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-resume-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        kills(work, args.kills, args.seed)
        faults(work)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
