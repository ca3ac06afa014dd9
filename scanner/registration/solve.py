"""Global solve: tile positions from pairwise offsets and stage priors by weighted least squares.

Each tile ``i`` has an unknown position ``t_i`` (camera pixels, x and y). Two kinds of
observations constrain it:

* a prior ``t_i ~ q_i`` from the stage's reported position, with the stage's repeatability as
  its standard deviation;
* for each registered pair, ``t_b - t_a ~ d_ab`` with a standard deviation that shrinks with
  the pair's correlation.

x and y decouple, so both are solved with one sparse symmetric system (scipy). Pairs whose
residual after the solve is far beyond what their correlation allows are outliers (a wrong
peak, a moving particle, a repeated pattern): the worst are dropped and the solve repeated.
A tile without any usable pair (a bare area) keeps its prior exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.sparse.linalg import spsolve

from .pairwise import PairResult

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
        Residual (pixels) of each kept pair.
    constrained : ndarray
        ``(N,)`` bool: the tile has at least one kept pair.
    """

    positions: np.ndarray
    used: list[PairResult]
    rejected: list[PairResult]
    residuals_px: np.ndarray
    constrained: np.ndarray


def _solve(
    prior: np.ndarray, prior_w: float, pairs: Sequence[PairResult], pair_w: np.ndarray
) -> np.ndarray:
    n = prior.shape[0]
    diag = np.full(n, prior_w)
    rhs = prior * prior_w
    if pairs:
        a = np.array([p.a for p in pairs])
        b = np.array([p.b for p in pairs])
        d = np.array([(p.dx, p.dy) for p in pairs])
        np.add.at(diag, a, pair_w)
        np.add.at(diag, b, pair_w)
        np.add.at(rhs, a, -pair_w[:, None] * d)
        np.add.at(rhs, b, pair_w[:, None] * d)
        off = sparse.coo_matrix(
            (np.concatenate([-pair_w, -pair_w]), (np.concatenate([a, b]), np.concatenate([b, a]))),
            shape=(n, n),
        )
        mat = (sparse.diags(diag) + off).tocsc()
    else:
        mat = sparse.diags(diag).tocsc()
    sol = spsolve(mat, rhs)
    return np.asarray(sol, dtype=float).reshape(n, 2)


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
    rejected: list[PairResult] = []
    for _ in range(max_iterations):
        w = np.array([(max(p.ncc, 0.05) / pair_sigma_px) ** 2 for p in kept])
        pos = _solve(prior, prior_w, kept, w)
        if not kept:
            res = np.zeros(0)
            break
        res = np.array([np.hypot(*(pos[p.b] - pos[p.a] - (p.dx, p.dy))) for p in kept])
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
