"""Benchmark: demo scans on the simulated microscope.

Prints, for each demo recipe, the tile rate and the wall-clock time against the simulated
hardware time (how much faster than the real instrument the simulation runs, and where the
wall time goes). Run: ``.venv/bin/python bench/bench_scan.py [RECIPE ...]``.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scanner.pipeline import run_scan  # noqa: E402
from scanner.recipe import load_recipe  # noqa: E402

DEFAULT = ["recipes/demo_wafer.yaml", "recipes/demo_pv_cell.yaml", "recipes/image_coupon.yaml"]


def bench(recipe_path: Path, workdir: Path) -> dict[str, float]:
    """Run one recipe and collect its figures."""
    recipe = load_recipe(recipe_path)
    t0 = time.perf_counter()
    result = run_scan(recipe, workdir / recipe_path.stem)
    total = time.perf_counter() - t0
    acq = result.timings["acquire"]
    return {
        "tiles": result.n_tiles,
        "tiles_per_s": result.n_tiles / acq["wall_s"],
        "acquire_wall_s": acq["wall_s"],
        "hardware_s": acq["hardware_s"],
        "stitch_wall_s": result.timings["stitch"]["wall_s"],
        "total_wall_s": total,
    }


def main(argv: list[str]) -> None:
    recipes = [ROOT / p for p in (argv or DEFAULT)]
    table = Table(title="waferscope scan benchmark (simulated microscope)")
    for col in ("recipe", "tiles", "tiles/s", "acquire wall s", "hardware s",
                "hardware / wall", "stitch wall s", "total wall s"):
        table.add_column(col, justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        for path in recipes:
            r = bench(path, Path(tmp))
            table.add_row(path.stem, f"{r['tiles']:d}", f"{r['tiles_per_s']:.1f}",
                          f"{r['acquire_wall_s']:.1f}", f"{r['hardware_s']:.1f}",
                          f"{r['hardware_s'] / r['acquire_wall_s']:.2f}x",
                          f"{r['stitch_wall_s']:.1f}", f"{r['total_wall_s']:.1f}")
    Console(width=150).print(table)


if __name__ == "__main__":
    main(sys.argv[1:])
