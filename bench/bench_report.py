"""Benchmark: the report stage on production-sized wafers, without acquiring anything.

Builds scan folders that hold only what the report stage reads (``scan.json`` with the
resolved wafer recipe, ``tiles.csv`` of the tile grid, ``defects.json`` with seeded random
defects in stage coordinates), then times each part of ``waferscope report``: locating (die,
wafer mm, tiles), the dies tested, the KLARF file and the wafer map. Prints one row per case.
Run: ``.venv/bin/python bench/bench_report.py``.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scanner.defectlist import CLASSES, Defect, read_defects, write_defects  # noqa: E402
from scanner.recipe import WaferSample  # noqa: E402
from scanner.reports.klarf import write_klarf  # noqa: E402
from scanner.reports.locate import ScanContext, build_header, locate, tested_dies  # noqa: E402
from scanner.reports.wafermap import draw_wafermap  # noqa: E402
from scanner.scanfolder import write_json  # noqa: E402

#: (diameter mm, die pitch mm, defects)
CASES = [(100, 10.0, 100), (200, 5.0, 1000), (300, 10.0, 1000), (300, 2.0, 5000)]
FOV_UM = 5000.0


def make_folder(folder: Path, diameter: float, pitch: float, n: int, seed: int = 0) -> None:
    """A scan folder with the files the report stage reads."""
    folder.mkdir(parents=True)
    sample = WaferSample(diameter_mm=diameter, die_pitch_mm=(pitch, pitch),
                         die_origin_mm=(-pitch / 2, -pitch / 2), edge_exclusion_mm=3.0)
    write_json(folder / "scan.json", {
        "recipe": {"name": f"bench{diameter}", "sample": sample.model_dump(mode="json")},
        "plan": {"fov_um": [FOV_UM, FOV_UM]}, "status": "complete",
        "started": "2026-01-01T00:00:00+00:00", "finished": "2026-01-01T01:00:00+00:00",
    })
    r = diameter * 500.0
    centres = np.arange(-r, r + FOV_UM, FOV_UM * 0.9)
    with open(folder / "tiles.csv", "w") as f:
        f.write("index,row,col,x_um,y_um,z_um,time_s,status\n")
        k = 0
        for i, y in enumerate(centres):
            for j, x in enumerate(centres):
                if np.hypot(x, y) < r + FOV_UM:
                    f.write(f"{k},{i},{j},{x},{y},0,0,ok\n")
                    k += 1
    rng = np.random.default_rng(seed)
    rad = (r - 3500.0) * np.sqrt(rng.random(n))
    ang = rng.random(n) * 2 * np.pi
    sizes = np.exp(rng.uniform(np.log(5), np.log(3000), n))
    names = list(CLASSES)
    defects = [
        Defect(i + 1, float(x), float(y), (x - s / 2, y - s / 4, x + s / 2, y + s / 4),
               float(s * s / 8), float(s), names[i % len(names)], float(rng.random()))
        for i, (x, y, s) in enumerate(zip(rad * np.cos(ang), rad * np.sin(ang), sizes,
                                          strict=True))
    ]
    write_defects(folder, defects, {})


def bench(folder: Path) -> dict[str, float]:
    """Time the parts of the report stage on one folder."""
    t = {}
    t0 = time.perf_counter()
    ctx = ScanContext.load(folder)
    previous, defects = read_defects(folder)
    t["read_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    defects = locate(defects, ctx)
    t["locate_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    dies = tested_dies(ctx, defects)
    t["dies_s"] = time.perf_counter() - t0
    header = build_header(ctx, defects, previous)
    write_defects(folder, defects, header)
    t0 = time.perf_counter()
    write_klarf(folder / "defects.klarf", header, defects, ctx.sample,
                ctx.usable_polygon().area)
    t["klarf_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    draw_wafermap(folder / "wafermap.png", ctx, header, defects)
    t["map_s"] = time.perf_counter() - t0
    t["dies"] = len(dies)
    t["tiles"] = len(ctx.tiles)
    return t


def main() -> None:
    table = Table(title="report stage (wall seconds)")
    for col in ("wafer", "die", "dies tested", "tiles", "defects", "read", "locate", "dies",
                "klarf", "wafer map", "total"):
        table.add_column(col, justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        for k, (diameter, pitch, n) in enumerate(CASES):
            folder = Path(tmp) / f"case{k}"
            make_folder(folder, diameter, pitch, n)
            t = bench(folder)
            total = sum(v for key, v in t.items() if key.endswith("_s"))
            table.add_row(f"{diameter} mm", f"{pitch:g} mm", str(t["dies"]), str(t["tiles"]),
                          str(n), f"{t['read_s']:.2f}", f"{t['locate_s']:.2f}",
                          f"{t['dies_s']:.2f}", f"{t['klarf_s']:.2f}", f"{t['map_s']:.2f}",
                          f"{total:.2f}")
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
