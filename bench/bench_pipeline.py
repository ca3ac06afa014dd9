"""Benchmark: is the pipeline as fast as the hardware, in flat memory, and does it scale out?

For each recipe, in one run:

* ``waferscope run`` with ``realtime: true`` in a child process: tiles, mosaic Mpx, the
  simulated hardware time (alignment and acquisition), the wall time, wall / hardware, the
  time after the last tile (from the last tile written to the end of the run: stitch,
  inspect, report), the child's peak RSS (``os.wait4``), and the inspection's rate (mosaic
  Mpx / inspect wall);
* the same scan folder fused and inspected again as dask tasks on a ``LocalCluster`` of 1 and
  of 2 worker processes: the wall time of fusion + the maps (what runs as tasks; die-to-die,
  plain-surface refinement and defect extraction run in the client and are left out) and
  the speed-up of 2 workers over 1 and over the run without dask; the mosaics must be equal
  bit for bit, the maps to float32 rounding.

Run: ``make bench-pipeline`` or ``.venv/bin/python bench/bench_pipeline.py [RECIPE ...]
[--no-dask] [--band300]``; ``band300`` is a 3 mm band along the diameter of a 300 mm wafer at
2 µm/px (``scan.region.band_mm``). Figures depend on the machine's load: say what else ran.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT = ["recipes/demo_wafer.yaml", "recipes/tilted_wafer_focus_map.yaml"]

#: a band along the diameter of a 300 mm wafer at 2 µm/px: 320 tiles, about 0.6 Gpx
BAND300: dict[str, Any] = {
    "sample": {"kind": "wafer", "diameter_mm": 300, "orientation": "notch",
               "edge_exclusion_mm": 3, "die_pitch_mm": [10, 10], "die_origin_mm": [-5, -5],
               "center_um": [0, 0], "defects": {"count": 40, "seed": 7}},
    "microscope": {"kind": "simulated",
                   "camera": {"width": 1024, "height": 1024, "pixel_size_um": 2.0,
                              "bit_depth": 12, "exposure_ms": 8},
                   "stage": {"travel_x_um": [-160000, 160000],
                             "travel_y_um": [-160000, 160000], "speed_um_s": 25000,
                             "acceleration_um_s2": 250000, "settle_ms": 40,
                             "repeatability_um": 2.0},
                   "focus": {"z_um": 0, "range_um": [-500, 500]}, "seed": 1},
    "scan": {"overlap": 0.1, "align": False, "region": {"band_mm": [-1.5, 1.5]}},
}


def _realtime_recipe(source: Path | None, data: dict[str, Any] | None, work: Path) -> Path:
    """A copy of a recipe with ``microscope.realtime: true``, paths made absolute."""
    if data is None:
        data = yaml.safe_load(source.read_text(encoding="utf-8"))
        sample = data.get("sample", {})
        if "path" in sample and not Path(sample["path"]).is_absolute():
            sample["path"] = str((source.parent / sample["path"]).resolve())
    data = json.loads(json.dumps(data))
    data.setdefault("microscope", {})["realtime"] = True
    data.setdefault("output", {})["root"] = str(work)
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _last_tile_time(folder: Path) -> float:
    """When the last tile was written (newest chunk file of ``tiles.zarr``)."""
    times = [p.stat().st_mtime for p in (folder / "tiles.zarr").rglob("*") if p.is_file()
             and p.name != "zarr.json"]
    return max(times)


def run_realtime(recipe: Path, folder: Path) -> dict[str, float]:
    """``waferscope run`` in a child process: wall time, time after the last tile, peak RSS."""
    exe = Path(sys.executable).with_name("waferscope")
    t0 = time.time()
    proc = subprocess.Popen([str(exe), "run", str(recipe), "--out", str(folder)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    end = time.time()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"waferscope run {recipe} failed: {proc.stderr.read().decode()[-2000:]}")
    scan = json.loads((folder / "scan.json").read_text(encoding="utf-8"))
    mpx = float(np.prod(scan["mosaic"]["shape"])) / 1e6
    inspect_s = float(scan["timings"]["inspect"]["wall_s"])
    return {
        "tiles": int(scan["plan"]["n_tiles"]),
        "mpx": mpx,
        # the stage and camera set the pace while aligning too (the wall counts it)
        "hardware_s": sum(float(scan["timings"].get(step, {}).get("hardware_s") or 0.0)
                          for step in ("align", "acquire")),
        "wall_s": end - t0,
        "after_last_tile_s": end - _last_tile_time(folder),
        "peak_rss_gb": usage.ru_maxrss / 2**20,  # KiB on Linux
        "inspect_mpx_s": mpx / inspect_s if inspect_s > 0 else float("nan"),
        "seq_tasks_s": _tasks_s(scan["timings"]["stitch"].get("fuse_s", 0.0),
                                scan.get("inspection", {})),
    }


def _tasks_s(fuse_s: float, inspection: dict[str, Any]) -> float:
    """Fusion plus the maps (inference and blending), without the refinement run here."""
    maps = float(inspection.get("maps_s", 0.0))
    maps -= float(inspection.get("die_to_die_s") or 0.0)
    maps -= float(inspection.get("plain_surface_s") or 0.0)
    return float(fuse_s) + maps


def run_dask(folder: Path, workers: int, work: Path) -> tuple[float, Path, Path]:
    """Fuse and inspect ``folder`` again on a ``local:workers`` cluster.

    Returns the tasks' wall time (fusion + maps), the mosaic and the folder of the maps.
    """
    from scanner.cluster import open_cluster
    from scanner.inspection.inspect import inspect_scan
    from scanner.stitching.stitch import MOSAIC, stitch

    scan = json.loads((folder / "scan.json").read_text(encoding="utf-8"))
    camera = scan["stitch_camera"]
    ff = np.load(folder / "flatfield.npy") if (folder / "flatfield.npy").is_file() else None
    chunk = int(scan["recipe"].get("output", {}).get("chunk_px", 1024))
    copy = work / f"dask{workers}"
    shutil.rmtree(copy, ignore_errors=True)
    copy.mkdir(parents=True)
    for name in ("scan.json", "tiles.csv", "tiles.zarr", "truth.json"):
        src = folder / name
        if src.is_dir():
            os.symlink(src, copy / name)  # read only: the tiles are not copied
        elif src.is_file():
            shutil.copy2(src, copy / name)
    with open_cluster(f"local:{workers}") as cluster:
        t0 = time.perf_counter()
        stitch(copy, float(camera["pixel_size_um"]), chunk=chunk, flatfield=ff,
               rotation_deg=float(camera["rotation_deg"]), cluster=cluster)
        fuse_s = time.perf_counter() - t0
        result = inspect_scan(copy, out_dir=copy / "maps", cluster=cluster)
    return _tasks_s(fuse_s, result.timings), copy / MOSAIC, copy / "maps"


#: a defect's values that follow the maps' float32 rounding (torch's sums depend on the thread
#: count, which differs between the sequential path and a worker)
_ROUNDED = ("score", "roughness", "uncertainty")
#: what the report adds to a defect (``scanner.reports.locate``)
_LOCATED = ("tiles", "wafer_x_mm", "wafer_y_mm", "die_col", "die_row", "die_x_um", "die_y_um",
            "region")


def _same_defects(a: Path, b: Path) -> bool:
    """The same defects (where, how large, class, review flag) in two output folders; the
    rounded values within 1e-4 relative. Where the defects were located (tiles, wafer and die
    coordinates: ``run``'s report adds them, a re-inspection alone does not) is not compared."""
    da, db = (json.loads((f / "defects.json").read_text(encoding="utf-8"))["defects"]
              for f in (a, b))
    if len(da) != len(db):
        print(f"defects of {a} and {b}: {len(da)} and {len(db)}", file=sys.stderr)
        return False
    for d, e in zip(da, db, strict=True):
        differ = {k: (d.get(k), e.get(k)) for k in d.keys() | e.keys()
                  if k not in _ROUNDED + _LOCATED and d.get(k) != e.get(k)}
        differ.update({k: (d[k], e[k]) for k in _ROUNDED if d.get(k) is not None
                       and e.get(k) is not None
                       and not np.isclose(float(d[k]), float(e[k]), rtol=1e-4, atol=1e-6)})
        if differ:
            print(f"defect {d.get('id')} of {a} and {b}: {differ}", file=sys.stderr)
            return False
    return True


def _same(a: Path, b: Path, exact: bool) -> bool:
    from scanner.ngff import open_mosaic

    for x, y in zip(open_mosaic(a)[0], open_mosaic(b)[0], strict=True):
        x, y = np.asarray(x[:]), np.asarray(y[:])
        if x.shape != y.shape:
            print(f"{a} and {b}: shapes {x.shape} and {y.shape}", file=sys.stderr)
            return False
        if (not np.array_equal(x, y) if exact else
                not np.allclose(x, y, rtol=1e-5, atol=1e-6, equal_nan=True)):
            print(f"{a} and {b} differ by up to {np.nanmax(np.abs(x - y)):.3g}", file=sys.stderr)
            return False
    return True


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="*", help="recipe files (default: demo_wafer, "
                        "tilted_wafer_focus_map)")
    parser.add_argument("--band300", action="store_true", help="add the 300 mm band")
    parser.add_argument("--no-dask", action="store_true", help="skip the dask speed-ups")
    args = parser.parse_args(argv)
    jobs: list[tuple[str, Path | None, dict | None]] = [
        (Path(p).stem, ROOT / p, None) for p in (args.recipes or ([] if args.band300 else
                                                                   DEFAULT))]
    if args.band300:
        jobs.append(("band300", None, BAND300))

    table = Table(title=f"waferscope pipeline ({os.cpu_count()} cores, load "
                  f"{os.getloadavg()[0]:.2f} at the start)")
    for col in ("recipe", "tiles", "Mpx", "hardware s", "wall s (realtime)", "wall / hw",
                "after last tile s", "peak RSS GB", "inspect Mpx/s", "fuse+maps s: seq",
                "local:1", "local:2", "2 vs 1", "2 vs seq", "same outputs"):
        table.add_column(col, justify="right")
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        for name, path, data in jobs:
            work = Path(tmp) / name
            work.mkdir()
            folder = work / "scan"
            r = run_realtime(_realtime_recipe(path, data, work), folder)
            row = [name, f"{r['tiles']:d}", f"{r['mpx']:.0f}", f"{r['hardware_s']:.1f}",
                   f"{r['wall_s']:.1f}", f"{r['wall_s'] / r['hardware_s']:.2f}x",
                   f"{r['after_last_tile_s']:.1f}", f"{r['peak_rss_gb']:.2f}",
                   f"{r['inspect_mpx_s']:.2f}", f"{r['seq_tasks_s']:.1f}"]
            if args.no_dask:
                row += ["-"] * 5
            else:
                t1, m1, maps1 = run_dask(folder, 1, work)
                t2, m2, maps2 = run_dask(folder, 2, work)
                same = (_same(folder / "mosaic.ome.zarr", m1, True)
                        and _same(m1, m2, True)
                        and all(_same(maps1 / f, maps2 / f, False) and
                                _same(folder / f, maps1 / f, False)
                                for f in ("anomaly.ome.zarr", "roughness.ome.zarr",
                                          "uncertainty.ome.zarr"))
                        and _same_defects(folder, maps1) and _same_defects(maps1, maps2))
                row += [f"{t1:.1f}", f"{t2:.1f}", f"{t1 / t2:.2f}x",
                        f"{r['seq_tasks_s'] / t2:.2f}x", "yes" if same else "NO"]
            table.add_row(*row)
            print(f"{name}: " + ", ".join(row[1:]), file=sys.stderr, flush=True)
            shutil.rmtree(work, ignore_errors=True)
    Console(width=200).print(table)


if __name__ == "__main__":
    main(sys.argv[1:])
