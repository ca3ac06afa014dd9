"""Focus map outputs: ``focus_map.json`` (points, fitted surface, residuals) and a small PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from scanner.scanfolder import write_json
from scanner.tilestore import TileRecord

FOCUS_JSON = "focus_map.json"
FOCUS_PNG = "focus_map.png"


def write_focus_outputs(folder: Path, focus: dict[str, Any], records: list[TileRecord]) -> None:
    """Save the focus summary and draw the tiles' Z (and their error when the truth is known).

    Parameters
    ----------
    folder : Path
        Scan folder.
    focus : dict
        ``FocusController.summary()``.
    records : list of TileRecord
        The scan's tiles (``z_um`` used; ``z_true_um`` in simulation).
    """
    tiles = [r for r in records if r.status == "ok"]
    z = np.array([r.z_um for r in tiles])
    z_true = np.array([r.z_true_um for r in tiles])
    dof = float(focus.get("depth_of_field_um", np.nan))
    stats: dict[str, Any] = {"n_tiles": len(tiles)}
    if len(tiles) and np.all(np.isfinite(z_true)):
        err = np.abs(z - z_true)
        stats.update(
            median_abs_error_um=float(np.median(err)),
            p95_abs_error_um=float(np.percentile(err, 95)),
            max_abs_error_um=float(err.max()),
            median_abs_error_dof=float(np.median(err) / dof),
            p95_abs_error_dof=float(np.percentile(err, 95) / dof),
            max_abs_error_dof=float(err.max() / dof),
        )
    write_json(folder / FOCUS_JSON, {**focus, "tiles": stats})
    _draw(folder / FOCUS_PNG, focus, tiles, z, z_true, dof)


def _draw(path: Path, focus: dict[str, Any], tiles: list[TileRecord], z: np.ndarray,
          z_true: np.ndarray, dof: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not tiles:
        return
    x = np.array([t.x_um for t in tiles]) / 1000
    y = np.array([t.y_um for t in tiles]) / 1000
    has_truth = np.all(np.isfinite(z_true))
    fig, axes = plt.subplots(1, 2 if has_truth else 1, figsize=(9 if has_truth else 5, 4.2),
                             squeeze=False)
    ax = axes[0, 0]
    sc = ax.scatter(x, y, c=z, cmap="viridis", s=18, marker="s")
    fig.colorbar(sc, ax=ax, label="Z used (µm)")
    pts = [p for p in focus.get("points", [])]
    if pts:
        ok = np.array([p["ok"] for p in pts])
        px = np.array([p["x_um"] for p in pts]) / 1000
        py = np.array([p["y_um"] for p in pts]) / 1000
        ax.scatter(px[ok], py[ok], facecolors="none", edgecolors="w", s=60, label="focus point")
        ax.scatter(px[~ok], py[~ok], c="r", marker="x", s=60, label="refused point")
    redone = np.array([t.focus_source == "remeasured" for t in tiles])
    if redone.any():  # tiles the sharpness re-check re-measured
        ax.scatter(x[redone], y[redone], facecolors="none", edgecolors="r", marker="s", s=40,
                   label="re-measured")
    if pts or redone.any():
        ax.legend(loc="lower right", fontsize=7)
    ax.set_title(f"focus: {focus.get('strategy')}")
    ax.set_xlabel("x (mm)")
    ax.set_ylabel("y (mm)")
    ax.invert_yaxis()  # y grows with the image row
    ax.set_aspect("equal")
    if has_truth:
        ax = axes[0, 1]
        err = (z - z_true) / dof
        lim = max(1.0, float(np.abs(err).max()))
        sc = ax.scatter(x, y, c=err, cmap="RdBu_r", vmin=-lim, vmax=lim, s=18, marker="s")
        fig.colorbar(sc, ax=ax, label="Z − Z_true (depths of field)")
        ax.set_title("focus error")
        ax.set_xlabel("x (mm)")
        ax.invert_yaxis()
        ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
