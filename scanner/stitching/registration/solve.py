"""Global solve: tile positions from pairwise offsets and stage priors by weighted least squares.

Each tile ``i`` has an unknown position ``t_i`` (camera pixels, x and y). Two kinds of
observations constrain it:

* a prior ``t_i ~ q_i`` from the stage's reported position, with the stage's repeatability as
  its standard deviation;
* for each registered pair, ``t_b - t_a ~ d_ab`` with a 2x2 information matrix: the pair's
  scalar weight (it grows with the correlation) times the shape of its texture's structure
  tensor (``PairResult.info``). A pair whose overlap holds one straight edge only (a wafer rim,
  a scribe line) constrains the position across the edge and leaves the other direction to the
  prior and to the other pairs.

x and y couple through the information matrices, so one sparse symmetric ``2N x 2N`` system
is solved (scipy). Two checks reject pairs: before the solve, a pair whose offset is further
from the stage's expectation than the stage's error model allows (4.5 sigma, after taking out
the common step error of its direction, e.g. a pixel-size error) snapped to a wrong peak;
after it, pairs whose residual is far beyond what their correlation allows are outliers (a
wrong peak, a moving particle, a repeated pattern): the worst are dropped and the solve
repeated. A tile without any usable pair (a bare area) keeps its prior exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.sparse.linalg import spsolve

from scanner.stitching.registration.pairwise import PairResult

__all__ = ["SolveResult", "solve_positions"]


@dataclass
class SolveResult:
    """Positions after the global solve.

    Attributes
    ----------
    positions : ndarray
        ``(N, 2)`` solved ``(x, y)`` in camera pixels.
    used : list[PairResult]
        Pairs kept in the final solve.
    rejected : list[PairResult]
        Pairs dropped as outliers.
    residuals_px : ndarray
        Residual (pixels) of each kept pair, in the directions it measures.
    constrained : ndarray
        ``(N,)`` bool: the tile has at least one kept pair.
    """

    positions: np.ndarray
    used: list[PairResult]
    rejected: list[PairResult]
    residuals_px: np.ndarray
    constrained: np.ndarray


def _info(pairs: Sequence[PairResult]) -> np.ndarray:
    """``(M, 2, 2)`` information shapes (x, y axes) of the pairs, largest eigenvalue 1."""
    out = np.zeros((len(pairs), 2, 2))
    for k, p in enumerate(pairs):
        xx, xy, yy = p.info
        out[k] = ((xx, xy), (xy, yy))
    return out


def _solve(
    prior: np.ndarray, prior_w: float, pairs: Sequence[PairResult], pair_w: np.ndarray
) -> np.ndarray:
    n = prior.shape[0]
    rhs = (prior * prior_w).ravel()
    rows = [np.arange(2 * n)]
    cols = [np.arange(2 * n)]
    vals = [np.full(2 * n, prior_w)]
    if pairs:
        a = np.array([p.a for p in pairs])
        b = np.array([p.b for p in pairs])
        d = np.array([(p.dx, p.dy) for p in pairs])
        w = _info(pairs) * pair_w[:, None, None]
        wd = np.einsum("kij,kj->ki", w, d)
        np.add.at(rhs, 2 * a, -wd[:, 0])
        np.add.at(rhs, 2 * a + 1, -wd[:, 1])
        np.add.at(rhs, 2 * b, wd[:, 0])
        np.add.at(rhs, 2 * b + 1, wd[:, 1])
        for i in range(2):
            for j in range(2):
                wij = w[:, i, j]
                for u, v, sign in ((a, a, 1), (b, b, 1), (a, b, -1), (b, a, -1)):
                    rows.append(2 * u + i)
                    cols.append(2 * v + j)
                    vals.append(sign * wij)
    mat = sparse.coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                            shape=(2 * n, 2 * n)).tocsc()
    sol = spsolve(mat, rhs)
    return np.asarray(sol, dtype=float).reshape(n, 2)


def _measured_residual(pairs: Sequence[PairResult], r: np.ndarray) -> np.ndarray:
    """Size (pixels) of residuals ``r`` in the directions the pairs measure (edge: across)."""
    if not len(pairs):
        return np.zeros(0)
    return np.sqrt(np.maximum(np.einsum("ki,kij,kj->k", r, _info(pairs), r), 0.0))


def _inconsistent_with_stage(
    prior: np.ndarray, prior_sigma: float, pairs: Sequence[PairResult], k_sigma: float = 4.5
) -> np.ndarray:
    """Pairs whose offset departs from the stage's expectation beyond its error model.

    The difference of two landings has a standard deviation ``sqrt(2) * prior_sigma`` per
    axis; a 2-D departure beyond ``k_sigma`` of it has a probability of ``exp(-k^2 / 2)``
    (4e-5 for 4.5) for a true pair, so such a pair snapped to a wrong peak (another period).
    The median departure of the pairs of each step direction (five or more) is taken out
    first: a pixel-size or rotation error shifts all of them alike.
    """
    if not len(pairs):
        return np.zeros(0, dtype=bool)
    a = np.array([p.a for p in pairs])
    b = np.array([p.b for p in pairs])
    expected = prior[b] - prior[a]
    dev = np.array([(p.dx, p.dy) for p in pairs]) - expected
    key = np.where(np.abs(expected[:, 0]) >= np.abs(expected[:, 1]),
                   np.sign(expected[:, 0]) * 1, np.sign(expected[:, 1]) * 2)
    for k in np.unique(key):
        sel = key == k
        if sel.sum() >= 5:  # a median of fewer pairs is not a common error
            dev[sel] -= np.median(dev[sel], axis=0)
    size = _measured_residual(pairs, dev)
    return size > k_sigma * np.sqrt(2.0) * prior_sigma


def solve_positions(
    prior_px: np.ndarray,
    prior_sigma_px: float,
    pairs: Sequence[PairResult],
    *,
    pair_sigma_px: float = 0.1,
    reject_px: float = 1.0,
    max_iterations: int = 20,
) -> SolveResult:
    """Weighted least-squares tile positions with iterative outlier-pair rejection.

    Parameters
    ----------
    prior_px : ndarray
        ``(N, 2)`` positions ``(x, y)`` from the stage, in camera pixels.
    prior_sigma_px : float
        Standard deviation of a stage position (the repeatability), in pixels.
    pairs : sequence of PairResult
        Registered pairs (``a``, ``b`` index ``prior_px``); those not ``ok`` are ignored.
    pair_sigma_px : float
        Standard deviation of a perfectly correlated pair's offset; a pair with normalized
        cross-correlation ``ncc`` gets ``pair_sigma_px / ncc``.
    reject_px : float
        Residuals below this are never called outliers.
    max_iterations : int
        Most rounds of rejection.

    Returns
    -------
    SolveResult
    """
    prior = np.asarray(prior_px, dtype=float)
    prior_w = 1.0 / max(float(prior_sigma_px), 1e-3) ** 2
    kept = [p for p in pairs if p.ok and np.isfinite(p.dx) and np.isfinite(p.dy)]
    far = _inconsistent_with_stage(prior, float(prior_sigma_px), kept)
    rejected: list[PairResult] = [p for p, f in zip(kept, far, strict=True) if f]
    kept = [p for p, f in zip(kept, far, strict=True) if not f]
    for _ in range(max_iterations):
        w = np.array([(max(p.ncc, 0.05) / pair_sigma_px) ** 2 for p in kept])
        pos = _solve(prior, prior_w, kept, w)
        if not kept:
            res = np.zeros(0)
            break
        r = np.array([pos[p.b] - pos[p.a] - (p.dx, p.dy) for p in kept])
        res = _measured_residual(kept, r)
        # a pair is an outlier when its residual is well beyond its own uncertainty and beyond
        # what the typical pair shows; drop the worst ones only, their error spreads to others
        sigma = pair_sigma_px / np.maximum([p.ncc for p in kept], 0.05)
        typical = 1.4826 * float(np.median(res))
        limit = np.maximum(reject_px, np.maximum(5 * sigma, 5 * typical))
        bad = res > limit
        if not bad.any():
            break
        worst = res >= max(0.5 * float(res[bad].max()), float(limit[bad].min()))
        drop = bad & worst
        rejected.extend(p for p, d in zip(kept, drop, strict=True) if d)
        kept = [p for p, d in zip(kept, drop, strict=True) if not d]
    constrained = np.zeros(prior.shape[0], dtype=bool)
    for p in kept:
        constrained[p.a] = constrained[p.b] = True
    return SolveResult(pos, kept, rejected, res, constrained)
