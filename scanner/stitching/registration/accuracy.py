"""Accuracy of registered tile positions against a simulator's truth (tests, benchmarks).

Tiles fall in three classes by what their images can tell:

* ``textured``: tiles of the largest group linked by pairs that measure both directions
  (the main mosaic). Their error is taken after removing the group's common offset, which no
  image can tell (it is the mean of the stage errors).
* ``partial``: tiles linked to others only across edges (one direction measured) or through
  a small group cut off from the main mosaic; the images fix them in part only.
* ``featureless``: tiles without any used pair. They must keep their stage prior, so their
  absolute error is compared with the stage's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from scanner.stitching.registration.pairwise import PairResult

__all__ = ["AccuracyReport", "classify_tiles", "position_accuracy"]


@dataclass
class AccuracyReport:
    """RMS and worst errors (pixels) per class of tiles, and the stage's for comparison."""

    counts: dict[str, int]
    rms_px: dict[str, float]
    worst_px: dict[str, float]
    stage_rms_px: dict[str, float]
    stage_worst_px: dict[str, float]
    featureless_worse_than_stage: int

    def row(self, cls: str) -> str:
        """One text line for a class."""
        if not self.counts.get(cls):
            return f"{cls:<11} n=   0"
        return (f"{cls:<11} n={self.counts[cls]:4d} RMS {self.rms_px[cls]:.3f} px, worst "
                f"{self.worst_px[cls]:.3f} px (stage: RMS {self.stage_rms_px[cls]:.3f}, worst "
                f"{self.stage_worst_px[cls]:.3f})")


def classify_tiles(n: int, used: Sequence[PairResult]) -> np.ndarray:
    """Class of each tile (``"textured"``, ``"partial"``, ``"featureless"``) from used pairs."""
    cls = np.full(n, "featureless", dtype=object)
    for p in used:
        cls[p.a] = cls[p.b] = "partial"
    full = [p for p in used if not p.is_edge]
    if full:
        a = np.array([p.a for p in full])
        b = np.array([p.b for p in full])
        graph = coo_matrix((np.ones(len(full)), (a, b)), shape=(n, n))
        _, labels = connected_components(graph, directed=False)
        linked = np.zeros(n, dtype=bool)
        linked[a] = linked[b] = True
        sizes = np.bincount(labels[linked])
        main = int(np.argmax(sizes))
        cls[(labels == main) & linked] = "textured"
    return cls


def position_accuracy(
    registered: np.ndarray,
    true: np.ndarray,
    stage: np.ndarray,
    classes: np.ndarray,
    pixel_size_um: float,
) -> AccuracyReport:
    """Errors of registered and stage positions (µm in, pixels out) per class of tiles."""
    reg_err = (np.asarray(registered) - true) / pixel_size_um
    st_err = (np.asarray(stage) - true) / pixel_size_um
    counts, rms, worst, srms, sworst = {}, {}, {}, {}, {}
    for cls in ("textured", "partial", "featureless"):
        m = classes == cls
        counts[cls] = int(m.sum())
        if not m.any():
            continue
        if cls == "textured":
            r = reg_err[m] - reg_err[m].mean(axis=0)
            s = st_err[m] - st_err[m].mean(axis=0)
        else:
            r, s = reg_err[m], st_err[m]
        e, es = np.hypot(*r.T), np.hypot(*s.T)
        rms[cls], worst[cls] = float(np.sqrt(np.mean(e**2))), float(e.max())
        srms[cls], sworst[cls] = float(np.sqrt(np.mean(es**2))), float(es.max())
    m = classes == "featureless"
    worse = int((np.hypot(*reg_err[m].T) > np.hypot(*st_err[m].T) + 0.05).sum())
    return AccuracyReport(counts, rms, worst, srms, sworst, worse)
