"""Focus maps: robust fits of the in-focus Z over the stage (where to measure it:
:mod:`scanner.acquisition.focus.points`).

A focus map is a handful of autofocus results ``(x, y, z)`` spread over the sample; between
them the scan predicts Z from a fitted surface. Autofocus occasionally locks onto dust, a
reflection or a featureless field it failed to refuse, so the fits are robust:

* **plane / quadratic**: least trimmed squares (FAST-LTS: the best-fitting half of the
  points; breaks down only beyond 50 % outliers, needs no threshold), then outliers are
  the points beyond ``3 x 1.4826 x MAD`` of the residuals (or ``outlier_threshold_um``)
  and the model is refitted by least squares on the inliers, until the inliers are stable;
* **tps**: a thin-plate spline ``z = sum w_i r_i**2 log r_i + a0 + a1 x + a2 y`` with a
  smoothing ``lambda`` chosen by leave-one-out cross-validation (closed form, Rippa's rule,
  for every ``lambda`` from one eigen-decomposition), started from the robust quadratic's
  inliers and re-deciding outliers on the *standardised* leave-one-out residuals (a spline
  can bend through a lone outlier, its leave-one-out residual cannot; standardising keeps
  hull points, where any spline extrapolates, from being taken for outliers);
* **auto**: the simplest model whose robust leave-one-out error (root median square) is
  within 15 % of the best one. Plane from 3 points, quadratic from 8, tps from 10; a
  constant (the median) below 3.

Coordinates are centred and scaled internally (stage µm are ~1e5, their squares ~1e10).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from scipy import linalg

# where the points are measured: scanner.acquisition.focusing and the package read them here too
from scanner.acquisition.focus.points import focus_points_layout as focus_points_layout
from scanner.acquisition.focus.points import tour_order as tour_order

__all__ = ["FocusSurface", "fit_focus_surface", "focus_points_layout"]

Model = Literal["constant", "plane", "quadratic", "tps"]

_MIN_POINTS = {"constant": 1, "plane": 3, "quadratic": 6, "tps": 10}
#: Fewest points each model can be fitted to (public: callers fall back below it).
MIN_POINTS = dict(_MIN_POINTS)
# auto only considers a model with some redundancy (leave-one-out needs n > parameters)
_AUTO_MIN_POINTS = {"constant": 1, "plane": 3, "quadratic": 8, "tps": 10}
_TERMS = {
    "constant": ["1"],
    "plane": ["1", "u", "v"],
    "quadratic": ["1", "u", "v", "u^2", "u*v", "v^2"],
}
_K_SIGMA = 3.0  # outliers beyond 3 robust sigmas
_MAD_TO_SIGMA = 1.4826
_AUTO_TOLERANCE = 1.15
_LAMBDAS = np.concatenate([[0.0], np.logspace(-7, 1, 33)])


def _design(model: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    one = np.ones_like(u)
    if model == "constant":
        return one[:, None]
    if model == "plane":
        return np.stack([one, u, v], axis=1)
    return np.stack([one, u, v, u * u, u * v, v * v], axis=1)


def _tps_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``r**2 log r`` between point sets (N,2) and (M,2); 0 at r = 0."""
    d2 = np.sum((a[:, None, :] - b[None, :, :]) ** 2, axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        k = 0.5 * d2 * np.log(d2)
    k[d2 == 0] = 0.0
    return k


@dataclass
class FocusSurface:
    """A fitted focal surface ``z(x, y)`` (µm).

    Attributes
    ----------
    model : str
        "constant", "plane", "quadratic" or "tps".
    x_um, y_um, z_um : ndarray
        The points it was fitted to (all of them, outliers included).
    inliers : ndarray of bool
        Points used by the final fit.
    residuals_um : ndarray
        ``z - predict(x, y)`` at every point.
    rms_um : float
        RMS residual over the inliers (in-sample; see ``loo_rms_um`` for the prediction error).
    loo_rms_um : float
        Root median square leave-one-out residual: the error to expect between points.
    threshold_um : float
        Residual beyond which a point was an outlier.
    coefficients : dict
        Model parameters in the normalised coordinates ``u = (x - cx) / s, v = (y - cy) / s``.
    """

    model: str
    x_um: np.ndarray
    y_um: np.ndarray
    z_um: np.ndarray
    inliers: np.ndarray
    residuals_um: np.ndarray = field(default_factory=lambda: np.zeros(0))
    rms_um: float = math.nan
    loo_rms_um: float = math.nan
    threshold_um: float = math.nan
    coefficients: dict[str, Any] = field(default_factory=dict)

    def _uv(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cx, cy = self.coefficients["center_um"]
        s = self.coefficients["scale_um"]
        return (x - cx) / s, (y - cy) / s

    def predict(self, x_um: np.ndarray | float, y_um: np.ndarray | float) -> np.ndarray:
        """Surface Z at stage positions (broadcasts ``x_um`` against ``y_um``).

        Parameters
        ----------
        x_um, y_um : array_like
            Stage positions (µm).

        Returns
        -------
        ndarray
            Predicted in-focus Z (µm), of the broadcast shape.
        """
        x, y = np.broadcast_arrays(np.asarray(x_um, dtype=float), np.asarray(y_um, dtype=float))
        shape = x.shape
        u, v = self._uv(x.ravel(), y.ravel())
        c = self.coefficients
        z0 = c["z_offset_um"]
        if self.model == "tps":
            centres = np.asarray(c["centres"], dtype=float)
            w = np.asarray(c["weights"], dtype=float)
            a = np.asarray(c["affine"], dtype=float)
            out = np.empty(u.size)
            q = np.stack([u, v], axis=1)
            for i in range(0, q.shape[0], 4096):  # bounded memory for dense grids
                k = _tps_kernel(q[i : i + 4096], centres)
                out[i : i + 4096] = k @ w + a[0] + a[1] * u[i : i + 4096] + a[2] * v[i : i + 4096]
        else:
            out = _design(self.model, u, v) @ np.asarray(c["values"], dtype=float)
        return (out + z0).reshape(shape)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable description: points, inlier mask, residuals, model, coefficients."""
        coeffs = {k: (v.tolist() if isinstance(v, np.ndarray) else v)
                  for k, v in self.coefficients.items()}
        return {
            "model": self.model,
            "points": {
                "x_um": self.x_um.tolist(),
                "y_um": self.y_um.tolist(),
                "z_um": self.z_um.tolist(),
            },
            "inliers": self.inliers.astype(bool).tolist(),
            "residuals_um": self.residuals_um.tolist(),
            "rms_um": float(self.rms_um),
            "loo_rms_um": float(self.loo_rms_um),
            "threshold_um": float(self.threshold_um),
            "coefficients": coeffs,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FocusSurface:
        """Rebuild a surface written by ``to_dict`` (no refit)."""
        pts = data["points"]
        return cls(
            model=data["model"],
            x_um=np.asarray(pts["x_um"], dtype=float),
            y_um=np.asarray(pts["y_um"], dtype=float),
            z_um=np.asarray(pts["z_um"], dtype=float),
            inliers=np.asarray(data["inliers"], dtype=bool),
            residuals_um=np.asarray(data["residuals_um"], dtype=float),
            rms_um=float(data["rms_um"]),
            loo_rms_um=float(data.get("loo_rms_um", math.nan)),
            threshold_um=float(data.get("threshold_um", math.nan)),
            coefficients=dict(data["coefficients"]),
        )


# ---------------------------------------------------------------------------- parametric


def _robust_scale(r: np.ndarray) -> float:
    return _MAD_TO_SIGMA * float(np.median(np.abs(r)))


def _threshold(r: np.ndarray, fixed: float | None, zscale: float) -> float:
    if fixed is not None:
        return float(fixed)
    # the floor keeps exact (noise-free) data from rejecting round-off
    return max(_K_SIGMA * _robust_scale(r), 1e-9 * (1.0 + zscale))


def _lts(x: np.ndarray, z: np.ndarray, rng: np.random.Generator, trials: int) -> np.ndarray:
    """Least trimmed squares (FAST-LTS): the fit of the best half of the points.

    Random minimal subsets, each improved by two concentration steps (refit on the ``h``
    points with the smallest residuals), the best kept and concentrated to convergence.
    A plain least-median search from minimal subsets is not enough on a wavy surface with
    many outliers: few subsets are clean and a clean one still bends through the waviness.
    """
    n, p = x.shape
    h = min(n, (n + p + 1) // 2)

    def objective(c: np.ndarray) -> tuple[float, np.ndarray]:
        r2 = (x @ c - z) ** 2
        keep = np.argpartition(r2, h - 1)[:h]
        return float(r2[keep].sum()), keep

    def csteps(c: np.ndarray, k: int) -> tuple[float, np.ndarray]:
        obj, keep = objective(c)
        for _ in range(k):
            c_new = np.linalg.lstsq(x[keep], z[keep], rcond=None)[0]
            obj_new, keep_new = objective(c_new)
            if obj_new >= obj - 1e-12 * (1.0 + obj):
                break
            c, obj, keep = c_new, obj_new, keep_new
        return obj, c

    cands: list[tuple[float, np.ndarray]] = []
    for _ in range(trials):
        idx = rng.choice(n, p, replace=False)
        sub = x[idx]
        if np.linalg.matrix_rank(sub) < p:
            continue
        cands.append(csteps(np.linalg.solve(sub, z[idx]), 2))
    if not cands:  # degenerate layout (e.g. collinear points): plain least squares
        return np.linalg.lstsq(x, z, rcond=None)[0]
    cands.sort(key=lambda t: t[0])
    best = min((csteps(c, 50) for _, c in cands[:10]), key=lambda t: t[0])
    return best[1]


def _fit_parametric(
    model: str, u: np.ndarray, v: np.ndarray, z: np.ndarray, fixed_thr: float | None
) -> dict[str, Any]:
    x = _design(model, u, v)
    n, p = x.shape
    zscale = float(np.max(np.abs(z))) if z.size else 0.0
    if model == "constant" or n <= p:
        inl = np.ones(n, bool)
        c = np.linalg.lstsq(x, z, rcond=None)[0] if model != "constant" else np.array(
            [float(np.median(z))])
    else:
        rng = np.random.default_rng(0)  # deterministic fits
        c = _lts(x, z, rng, trials=min(50 * p, math.comb(n, p)))
        inl = np.ones(n, bool)
        for _ in range(20):
            thr = _threshold(z - x @ c, fixed_thr, zscale)
            new = np.abs(z - x @ c) <= thr
            if new.sum() < p:  # keep the best p + 1 rather than fitting nothing
                new = np.zeros(n, bool)
                new[np.argsort(np.abs(z - x @ c))[: min(n, p + 1)]] = True
            c = np.linalg.lstsq(x[new], z[new], rcond=None)[0]
            if np.array_equal(new, inl):
                break
            inl = new
    r = z - x @ c
    # leave-one-out residuals: r / (1 - h) on the inliers, plain residuals on outliers
    loo = r.copy()
    xi = x[inl]
    if inl.sum() > p:
        g = np.linalg.pinv(xi.T @ xi)
        h = np.einsum("ij,jk,ik->i", xi, g, xi)
        loo[inl] = r[inl] / np.maximum(1.0 - h, 1e-12)
    else:
        loo[inl] = math.inf
    thr = _threshold(r, fixed_thr, zscale) if model != "constant" else math.inf
    return {"values": c, "inliers": inl, "residuals": r, "loo": loo, "threshold": thr}


# ---------------------------------------------------------------------------------- tps


def _tps_system(pts: np.ndarray, lam: float) -> np.ndarray:
    n = pts.shape[0]
    a = np.zeros((n + 3, n + 3))
    a[:n, :n] = _tps_kernel(pts, pts) + lam * np.eye(n)
    a[:n, n] = a[n, :n] = 1.0
    a[:n, n + 1 :] = pts
    a[n + 1 :, :n] = pts.T
    return a


def _tps_solve(
    pts: np.ndarray, z: np.ndarray
) -> tuple[np.ndarray, np.ndarray, float, np.ndarray, np.ndarray]:
    """TPS through ``pts`` with the smoothing that minimises the leave-one-out error.

    Returns weights, affine part, lambda, the leave-one-out residuals and their variance
    factors ``1 / (A^-1)_ii`` (the leave-one-out residual over its square root is the
    standardised cross-validation residual of kriging).

    Written here rather than with ``scipy.interpolate.RBFInterpolator(kernel=
    "thin_plate_spline", smoothing=lam)``: that solves one smoothing at a time and gives no
    leave-one-out residuals, so choosing lambda by cross-validation would cost a fit per
    point per lambda; one eigen-decomposition here gives them all in closed form.
    """
    n = pts.shape[0]
    k = _tps_kernel(pts, pts)
    p = np.column_stack([np.ones(n), pts])
    # Z spans the null space of P^T; the top-left block of the inverse of the saddle-point
    # system [[K + lam I, P], [P^T, 0]] is Z (Z^T (K + lam I) Z)^-1 Z^T. One eigen-
    # decomposition of Z^T K Z gives it for every lam.
    q, _ = np.linalg.qr(p, mode="complete")
    zb = q[:, 3:]
    evals, evecs = linalg.eigh(zb.T @ k @ zb)
    g = zb @ evecs  # (n, n-3)
    gz = g.T @ z
    best = None
    for lam in _LAMBDAS:
        denom = evals + lam
        if np.any(denom <= 1e-12 * max(1.0, float(np.max(np.abs(evals))))):
            continue
        w = g @ (gz / denom)
        a11 = np.einsum("ik,k,ik->i", g, 1.0 / denom, g)
        loo = w / a11  # Rippa's rule
        score = float(np.mean(loo**2))
        if best is None or score < best[0]:
            best = (score, lam, w, loo, 1.0 / a11)
    if best is None:
        raise np.linalg.LinAlgError("thin-plate spline system is singular")
    _, lam, w, loo, var = best
    a = np.linalg.lstsq(p, z - (k + lam * np.eye(n)) @ w, rcond=None)[0]
    return w, a, float(lam), loo, var


def _fit_tps(
    u: np.ndarray, v: np.ndarray, z: np.ndarray, fixed_thr: float | None, start: np.ndarray
) -> dict[str, Any]:
    pts = np.stack([u, v], axis=1)
    zscale = float(np.max(np.abs(z))) if z.size else 0.0
    inl = start.copy()
    for _ in range(10):
        w, a, lam, loo_in, var_in = _tps_solve(pts[inl], z[inl])
        pred = _tps_kernel(pts, pts[inl]) @ w + a[0] + a[1] * u + a[2] * v
        loo = z - pred  # excluded points are out-of-sample already
        loo[inl] = loo_in
        var = np.empty_like(z)
        var[inl] = var_in
        out = ~inl
        if out.any():
            # variance factor of a point not in the fit: the Schur complement of adding it
            ainv = np.linalg.inv(_tps_system(pts[inl], lam))
            b = np.column_stack([_tps_kernel(pts[out], pts[inl]), np.ones(out.sum()),
                                 pts[out]])
            var[out] = lam - np.einsum("ij,jk,ik->i", b, ainv, b)
        std = loo / np.sqrt(np.maximum(var, 1e-300))
        if fixed_thr is not None:
            new = np.abs(loo) <= fixed_thr
        else:
            # Standardised, so that points on the hull, where any spline extrapolates and
            # the leave-one-out error is large, are not taken for outliers.
            new = np.abs(std) <= max(_K_SIGMA * _robust_scale(std), 1e-300)
        if np.array_equal(new, inl) or new.sum() < _MIN_POINTS["tps"]:
            break
        inl = new
    w, a, lam, loo_in, _ = _tps_solve(pts[inl], z[inl])
    pred = _tps_kernel(pts, pts[inl]) @ w + a[0] + a[1] * u + a[2] * v
    r = z - pred
    loo = r.copy()
    loo[inl] = loo_in
    return {
        "centres": pts[inl],
        "weights": w,
        "affine": a,
        "smoothing": lam,
        "inliers": inl,
        "residuals": r,
        "loo": loo,
        "threshold": _threshold(loo, fixed_thr, zscale),
    }


# ------------------------------------------------------------------------------- public


def fit_focus_surface(
    x_um: np.ndarray,
    y_um: np.ndarray,
    z_um: np.ndarray,
    model: Literal["plane", "quadratic", "tps", "auto"] = "auto",
    *,
    outlier_threshold_um: float | None = None,
) -> FocusSurface:
    """Fit the in-focus Z over the stage robustly, flagging outlier points.

    Parameters
    ----------
    x_um, y_um, z_um : array_like
        Focus points: stage position and in-focus Z (µm). Non-finite points are outliers.
    model : {"plane", "quadratic", "tps", "auto"}
        Surface model; "auto" picks by leave-one-out error (module docstring).
    outlier_threshold_um : float, optional
        Fixed residual beyond which a point is an outlier; default ``3 x 1.4826 x MAD``.

    Returns
    -------
    FocusSurface
        The fit; ``inliers`` marks the points it used.

    Raises
    ------
    ValueError
        Mismatched inputs, an unknown model, or too few finite points for ``model``.
    """
    x, y, z, finite = _checked_points(x_um, y_um, z_um, model, outlier_threshold_um)
    n = int(finite.sum())

    xf, yf, zf = x[finite], y[finite], z[finite]
    cx, cy = float(np.mean(xf)), float(np.mean(yf))
    scale = float(max(np.ptp(xf), np.ptp(yf))) / 2.0
    scale = scale if scale > 0 else 1.0
    u, v = (xf - cx) / scale, (yf - cy) / scale
    z_off = float(np.median(zf))
    zc = zf - z_off

    candidates = _candidates(model, n)
    fits = _fit_candidates(candidates, u, v, zc, outlier_threshold_um, n)
    chosen, scores = _choose(candidates, fits)
    f = fits[chosen]

    coeffs: dict[str, Any] = {"center_um": [cx, cy], "scale_um": scale, "z_offset_um": z_off}
    if chosen == "tps":
        coeffs.update(kernel="r^2 log r", centres=f["centres"], weights=f["weights"],
                      affine=f["affine"], smoothing=f["smoothing"])
    else:
        coeffs.update(terms=_TERMS[chosen], values=f["values"])

    inliers = np.zeros(x.size, bool)
    inliers[finite] = f["inliers"]
    residuals = np.full(x.size, np.nan)
    residuals[finite] = f["residuals"]
    r_in = f["residuals"][f["inliers"]]
    surf = FocusSurface(
        model=chosen,
        x_um=x,
        y_um=y,
        z_um=z,
        inliers=inliers,
        residuals_um=residuals,
        rms_um=float(np.sqrt(np.mean(r_in**2))) if r_in.size else math.nan,
        loo_rms_um=scores[chosen],
        threshold_um=float(f["threshold"]),
        coefficients=coeffs,
    )
    return surf


def _checked_points(x_um: np.ndarray, y_um: np.ndarray, z_um: np.ndarray, model: str,
                    outlier_threshold_um: float | None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`fit_focus_surface`'s arguments checked: flat ``x, y, z`` and which are finite."""
    x = np.asarray(x_um, dtype=float).ravel()
    y = np.asarray(y_um, dtype=float).ravel()
    z = np.asarray(z_um, dtype=float).ravel()
    if not (x.shape == y.shape == z.shape):
        raise ValueError(f"x, y, z must have the same length: {x.size}, {y.size}, {z.size}")
    if model not in ("plane", "quadratic", "tps", "auto"):
        raise ValueError(f"unknown model {model!r}")
    if outlier_threshold_um is not None and not outlier_threshold_um > 0:
        raise ValueError(f"outlier_threshold_um must be > 0, got {outlier_threshold_um}")
    finite = np.isfinite(x) & np.isfinite(y) & np.isfinite(z)
    n = int(finite.sum())
    if model != "auto" and n < _MIN_POINTS[model]:
        raise ValueError(f"model {model!r} needs >= {_MIN_POINTS[model]} points, got {n}")
    if n == 0:
        raise ValueError("no finite focus points")
    return x, y, z, finite


def _candidates(model: str, n: int) -> list[str]:
    """The models fitted, simplest first: ``model``, or for "auto" those ``n`` points allow
    (a constant only below 3 points)."""
    if model != "auto":
        return [model]
    candidates = [m for m in ("constant", "plane", "quadratic", "tps")
                  if n >= _AUTO_MIN_POINTS[m]]
    if n >= 3:
        candidates.remove("constant")
    return candidates


def _fit_candidates(candidates: list[str], u: np.ndarray, v: np.ndarray, zc: np.ndarray,
                    outlier_threshold_um: float | None, n: int) -> dict[str, dict[str, Any]]:
    """Each candidate's fit; the spline starts from the robust quadratic's (or plane's)
    inliers."""
    fits: dict[str, dict[str, Any]] = {}
    for m in candidates:
        if m == "tps":
            base = fits.get("quadratic") or _fit_parametric(
                "quadratic" if n >= _AUTO_MIN_POINTS["quadratic"] else "plane",
                u, v, zc, outlier_threshold_um)
            fits[m] = _fit_tps(u, v, zc, outlier_threshold_um, base["inliers"])
        else:
            fits[m] = _fit_parametric(m, u, v, zc, outlier_threshold_um)
    return fits


def _choose(candidates: list[str], fits: dict[str, dict[str, Any]]
            ) -> tuple[str, dict[str, float]]:
    """The simplest model within :data:`_AUTO_TOLERANCE` of the best robust leave-one-out
    error (root median square; inf where a point could not be left out), and every score."""
    def score(f: dict[str, Any]) -> float:
        loo = f["loo"]
        return math.sqrt(float(np.median(loo**2))) if np.all(np.isfinite(loo)) else math.inf

    scores = {m: score(f) for m, f in fits.items()}
    best = min(scores.values())
    chosen = candidates[-1]
    for m in candidates:  # simplest first
        if scores[m] <= _AUTO_TOLERANCE * best + 1e-9:
            chosen = m
            break
    return chosen, scores
