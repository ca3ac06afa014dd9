"""The camera's rotation and pixel size against the stage, measured on a scan's own tiles.

Two tiles of one camera differ by a translation in the camera's frame, however the camera is
turned on its port; so the registered positions of a scan's tiles run at the camera's angle
to the stage positions they were taken at, and at its pixel size's ratio to the nominal one.
Placed with the nominal geometry (no ``microscope.calibration``), the mosaic is turned and
scaled against the stage: a camera turned by 1 degree puts the far dies of a 2 mm product
35 um from where the grid puts them, and every defect is reported that far off.

The affine map from the stage positions to the registered positions is fitted by least
squares over the tiles registered in both directions, as ``waferscope calibrate`` fits its
frames (:func:`fit_camera_matrix`, with the pairs alone deciding the tiles' shape); its closest
similarity gives the pixel size and the rotation, and the stage's landing error (the fit's
residual) their uncertainty. The scan is registered again with a part of it only when what
that part changes across the scan is more than :data:`MIN_EFFECT_PX` and at least
:data:`MIN_SIGNIFICANCE` times its uncertainty: a scan of a camera as calibrated keeps it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from scanner.stitching.registration.pairwise import PairResult
from scanner.stitching.registration.solve import solve_positions

__all__ = ["MIN_EFFECT_PX", "MIN_SIGNIFICANCE", "fit_camera_matrix", "matrix_geometry",
           "measured_camera"]

#: a correction that moves no tile by more than this (pixels) is not made
MIN_EFFECT_PX = 0.5
#: nor one under this many standard deviations of its estimate
MIN_SIGNIFICANCE = 5.0
#: tiles registered in both directions needed, over at least two rows and two columns. Nine
#: left a 3 x 3 scan of a small wafer (one corner tile off the wafer: 8) with its camera
#: turned 0.5 deg unmeasured and uncorrected, without a word: 9 of its 20 defects found, 19
#: once measured (+0.503 +- 0.008 deg). Fewer tiles are guarded by the significance test and
#: the stage's landing floor below
MIN_TILES = 6


def fit_camera_matrix(
    stage_um: np.ndarray, pixel_pos: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least-squares affine map ``pixel = A @ stage + b``.

    Parameters
    ----------
    stage_um : ndarray
        ``(N, 2)`` stage positions ``(x, y)``.
    pixel_pos : ndarray
        ``(N, 2)`` measured frame positions ``(x, y)`` in camera pixels.

    Returns
    -------
    A : ndarray
        ``(2, 2)`` stage-to-pixel matrix.
    residuals : ndarray
        ``(N, 2)`` residuals in pixels.
    cov_scale : ndarray
        ``(2, 2)`` ``inv(X^T X)`` block of the centred stage positions (for uncertainties).
    """
    s = np.asarray(stage_um, dtype=float)
    t = np.asarray(pixel_pos, dtype=float)
    design = np.column_stack([s, np.ones(len(s))])
    coef, *_ = np.linalg.lstsq(design, t, rcond=None)
    a = coef[:2].T
    residuals = t - design @ coef
    sc = s - s.mean(axis=0)
    return a, residuals, np.linalg.inv(sc.T @ sc)


def matrix_geometry(a: np.ndarray) -> tuple[float, float, float, float, float]:
    """Pixel size, rotation (deg), per-axis pixel sizes and skew (deg) of a stage→pixel map.

    For a camera rotated by ``theta`` with pixel ``p``, ``A = R(theta)^T / p``; the closest
    similarity ``[[a, b], [-b, a]]`` gives ``p = 1 / hypot(a, b)``, ``theta = atan2(b, a)``.
    """
    sa = (a[0, 0] + a[1, 1]) / 2
    sb = (a[0, 1] - a[1, 0]) / 2
    pixel = 1.0 / math.hypot(sa, sb)
    theta = math.degrees(math.atan2(sb, sa))
    inv = np.linalg.inv(a)  # columns: stage µm per camera pixel along x and y
    px_x, px_y = float(np.linalg.norm(inv[:, 0])), float(np.linalg.norm(inv[:, 1]))
    cosang = float(inv[:, 0] @ inv[:, 1]) / (px_x * px_y)
    skew = 90.0 - math.degrees(math.acos(max(-1.0, min(1.0, cosang))))
    return pixel, theta, px_x, px_y, skew


def slope_sigma(residuals: np.ndarray, cov: np.ndarray, n_frames: int,
                floor_px: float = 0.0) -> float:
    """Standard deviation (pixels per µm) of the fitted matrix's similarity part: from the
    fit's residual (``floor_px``: at least this per frame and axis)."""
    dof = max(1, 2 * n_frames - 6)
    sigma_px = max(float(np.sqrt((residuals**2).sum() / dof)), floor_px)
    return sigma_px * math.sqrt(float(np.trace(cov)) / 2) / math.sqrt(2)


def measured_camera(
    stage_um: np.ndarray,
    prior: np.ndarray,
    pairs: Sequence[PairResult],
    textured: np.ndarray,
    rows_cols: np.ndarray,
    pixel_size_um: float,
    rotation_deg: float,
    landing_sigma_um: float | None = None,
) -> tuple[float, float, dict[str, Any]] | None:
    """The pixel size and rotation a scan's registered tiles show, each kept where it differs
    from the given one enough to matter (see the module's notes).

    Parameters
    ----------
    stage_um : ndarray
        ``(N, 2)`` stage positions the tiles were taken at.
    prior : ndarray
        ``(N, 2)`` their camera-frame positions by the given geometry (only the tiles' common
        translation is taken from it).
    pairs : sequence of PairResult
        The scan's measured pairs.
    textured : ndarray
        ``(N,)`` bool: tiles registered in both directions, in one group.
    rows_cols : ndarray
        ``(N, 2)`` grid row and column of each tile.
    pixel_size_um, rotation_deg : float
        The geometry the scan was registered with.
    landing_sigma_um : float, optional
        The stage's repeatability (one sigma per axis): the least scatter of the tiles'
        positions the uncertainty assumes.

    Returns
    -------
    (pixel_size_um, rotation_deg, record) or None
        The geometry to register with (a part that does not matter left as given) and what
        was measured (``rotation_applied``, ``pixel_size_applied``: which part changes); None
        when too few tiles tell.
    """
    use = np.asarray(textured, dtype=bool)
    rc = np.asarray(rows_cols)
    if use.sum() < MIN_TILES or len(np.unique(rc[use, 0])) < 2 or len(np.unique(rc[use, 1])) < 2:
        return None
    # the pairs alone decide the tiles' shape (a weak prior fixes their common translation)
    solved = solve_positions(prior, 1e4, list(pairs))
    use &= solved.constrained
    if use.sum() < MIN_TILES:
        return None
    stage = np.asarray(stage_um, dtype=float)
    a, res, cov = fit_camera_matrix(stage[use], solved.positions[use])
    pixel, theta, *_ = matrix_geometry(a)
    # the stage's own landing error (its repeatability) floors the residual's: six tiles
    # once scattered 0.6 of it, and their 0.56 % "pixel size" error was noise (a good scan
    # of a photograph scaled by it: two false defects at its edge against the golden image)
    floor = 0.0 if landing_sigma_um is None else landing_sigma_um / pixel_size_um
    sigma = slope_sigma(res, cov, int(use.sum()), floor) * pixel  # relative, = radians
    reach_um = float(np.hypot(*(stage - stage.mean(axis=0)).T).max())
    d_theta = math.radians(theta - rotation_deg)
    d_scale = pixel_size_um / pixel - 1.0
    effect_rot = abs(d_theta) * reach_um / pixel_size_um
    effect_scale = abs(d_scale) * reach_um / pixel_size_um
    rotate = effect_rot > MIN_EFFECT_PX and abs(d_theta) > MIN_SIGNIFICANCE * sigma
    rescale = effect_scale > MIN_EFFECT_PX and abs(d_scale) > MIN_SIGNIFICANCE * sigma
    record = {"pixel_size_um": round(pixel, 6), "rotation_deg": round(theta, 4),
              "pixel_size_sigma_rel": float(f"{sigma:.3g}"),
              "rotation_sigma_deg": float(f"{math.degrees(sigma):.3g}"),
              "tiles": int(use.sum()), "rotation_applied": bool(rotate),
              "pixel_size_applied": bool(rescale),
              "rotation_effect_px": round(effect_rot, 2),
              "pixel_size_effect_px": round(effect_scale, 2)}
    return (pixel if rescale else pixel_size_um, theta if rotate else rotation_deg, record)
