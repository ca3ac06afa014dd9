"""Camera calibration: pixel size and rotation of the camera against the stage axes.

The stage is moved by known steps over a textured area (an ``n x n`` grid of overlapping
frames, through the Micro-Manager core, so the same code runs on real hardware), the frames are
registered pairwise (``registration.pairwise``) and placed by the global solve with a weak
prior (``registration.solve``), and the affine map from commanded stage positions to the
frames' pixel positions is fitted by least squares. Its 2x2 matrix gives the pixel size and
the rotation. Fitting all frame positions at once (rather than averaging pair offsets) uses the
whole span of the grid, so the stage's landing error (its repeatability) is divided by the grid
span, not by one step.

No library does this (Micro-Manager's Pixel Calibrator plugin is a Java GUI of the same idea).
"""

from __future__ import annotations

import gc
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scanner.errors import UserError
from scanner.scanfolder import now_iso, write_json
from scanner.stitching.registration.pairwise import register_pair
from scanner.stitching.registration.scan import default_max_shift_px
from scanner.stitching.registration.selfcal import (
    fit_camera_matrix,
    matrix_geometry,
    slope_sigma,
)
from scanner.stitching.registration.solve import solve_positions
from scanner.travel import check_positions, travel_limits

log = logging.getLogger("waferscope.calibrate")

__all__ = ["CalibrationResult", "auto_grid", "calibrate_core", "calibrate_recipe",
           "expected_error_rel", "grid_positions"]


@dataclass
class CalibrationResult:
    """What a calibration measured (written as JSON by :meth:`to_json`)."""

    pixel_size_um: float
    rotation_deg: float
    stage_to_px: np.ndarray
    pixel_size_x_um: float
    pixel_size_y_um: float
    skew_deg: float
    residual_rms_um: float
    pixel_size_sigma_rel: float
    rotation_sigma_deg: float
    n_frames: int
    n_pairs_used: int
    n_pairs: int
    nominal_pixel_size_um: float
    centre_um: tuple[float, float]
    step_um: tuple[float, float]
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """JSON-friendly dict; ``pixel_size_um`` and ``rotation_deg`` are what recipes read."""
        return {
            "pixel_size_um": self.pixel_size_um,
            "rotation_deg": self.rotation_deg,
            "stage_to_pixel": self.stage_to_px.tolist(),
            "pixel_size_x_um": self.pixel_size_x_um,
            "pixel_size_y_um": self.pixel_size_y_um,
            "skew_deg": self.skew_deg,
            "residual_rms_um": self.residual_rms_um,
            "uncertainty": {"pixel_size_rel": self.pixel_size_sigma_rel,
                            "rotation_deg": self.rotation_sigma_deg},
            "nominal_pixel_size_um": self.nominal_pixel_size_um,
            "centre_um": list(self.centre_um),
            "step_um": list(self.step_um),
            "n_frames": self.n_frames,
            "n_pairs": self.n_pairs,
            "n_pairs_used": self.n_pairs_used,
            "created": now_iso(),
            **self.extra,
        }

    def write(self, path: Path) -> None:
        """Write the calibration file atomically."""
        write_json(Path(path), self.to_json())


def grid_positions(
    centre_um: tuple[float, float], n: int, step_um: tuple[float, float]
) -> list[tuple[int, int, float, float]]:
    """``(row, col, x, y)`` of an ``n x n`` grid of stage positions centred on ``centre_um``."""
    half = (n - 1) / 2
    return [(r, c, centre_um[0] + (c - half) * step_um[0], centre_um[1] + (r - half) * step_um[1])
            for r in range(n) for c in range(n)]


def expected_error_rel(repeatability_um: float, step_um: float, n: int) -> float:
    """Expected relative error (one sigma) of the pixel size from an ``n x n`` grid.

    The slope of a line fitted to ``n * n`` points whose positions scatter by the stage's
    repeatability: ``sigma / sqrt(sum (x - mean)^2)`` with ``n`` columns ``step`` apart. The
    rotation's error in radians is the same number.
    """
    spread = step_um * n * math.sqrt((n * n - 1) / 12.0)
    return repeatability_um / spread if spread > 0 else math.inf


def auto_grid(repeatability_um: float, step_um: float, target_rel: float = 3e-4,
              smallest: int = 5, largest: int = 15) -> int:
    """Smallest grid (frames per side) whose expected pixel-size error is ``target_rel``."""
    for n in range(smallest, largest + 1):
        if expected_error_rel(repeatability_um, step_um, n) <= target_rel:
            return n
    return largest


#: most frames per side of a calibration grid: every frame is held in memory until the
#: pairs are registered, and the pixel size's error falls as 1 / n^2, so that 40 x 40 frames
#: (1600) are some 7 times better than the largest automatic grid (15) and more buys nothing
MAX_GRID = 40


def calibrate_core(
    core: Any,
    nominal_pixel_size_um: float,
    centre_um: tuple[float, float],
    *,
    grid: int | None = None,
    step_fraction: float = 0.75,
    repeatability_um: float = 2.0,
    max_error: float = 0.03,
    travel: dict[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
    area: Any = None,
    retries: int = 3,
    timeout_s: float = 60.0,
) -> CalibrationResult:
    """Measure the camera's pixel size and rotation by moving the stage by known steps.

    Parameters
    ----------
    core : CMMCorePlus
        Loaded core with a camera and an XY stage.
    nominal_pixel_size_um : float
        Pixel size believed so far (sets the step and the expected offsets).
    centre_um : (float, float)
        Centre of the calibration grid; the area around it must be textured.
    grid : int, optional
        Frames per side of the grid (at least 2); by default the smallest that brings the
        expected error of the pixel size under 0.03 % (see :func:`auto_grid`).
    step_fraction : float
        Step between frames as a fraction of the field of view (frames must overlap).
    repeatability_um : float
        Stage repeatability (one sigma), for the registration's search window.
    max_error : float
        Largest relative error of the nominal geometry that is searched for (scale error plus
        rotation in radians); 0.03 covers 1 % pixel size and 1°.
    travel : dict, optional
        Where the stage may go (:func:`scanner.travel.travel_limits`); the grid's corners
        are checked before the first move.
    progress : callable, optional
        ``progress(done, total)`` per frame.
    area : shapely Polygon, optional
        Where the sample lies (stage µm): a grid chosen here keeps its frames on it (at
        least 3 x 3); a given ``grid`` is taken as it is.
    retries, timeout_s : int, float
        The scan's ``scan.retries`` and ``scan.device_timeout_s`` for each move and snap.

    Raises
    ------
    UserError
        A grid position outside the travel, or an area too plain to register.
    """
    if grid is not None and grid < 2:
        raise UserError("calibrate: --grid must be at least 2")
    if not 0.1 <= step_fraction <= 0.9:
        raise UserError("calibrate: --step must be between 0.1 and 0.9 of the field of view")
    w, h = int(core.getImageWidth()), int(core.getImageHeight())
    p = float(nominal_pixel_size_um)
    step_px = (round(step_fraction * w), round(step_fraction * h))
    step_um = (step_px[0] * p, step_px[1] * p)
    if grid is None:
        grid = auto_grid(repeatability_um, min(step_um))
        if area is not None:
            # frames off the sample see the bare chuck and do not register: the 5 x 5 grid
            # of 7.7 mm steps spanned 41 mm over a 20 mm wafer, and 12 of 40 pairs matched
            grid = min(grid, max(3, _grid_on(area, centre_um, step_um, (w * p, h * p))))
    # the grid's corners before its n x n positions are listed: --grid 100000 (10^10
    # positions) filled the memory before the travel check could refuse it
    if travel is not None:
        corners = grid_positions(centre_um, 2, ((grid - 1) * step_um[0], (grid - 1) * step_um[1]))
        outside = check_positions(travel, [("a calibration frame", x, y)
                                           for _, _, x, y in corners])
        if outside:
            raise UserError(f"{outside}; move --at or use a smaller --grid/--step")
    if grid > MAX_GRID:
        raise UserError(f"calibrate: --grid {grid} is more than {MAX_GRID} frames per side "
                        "(every frame is held until the frames are registered; leave --grid "
                        "out for a grid that brings the pixel size within 0.03 %)")
    positions = grid_positions(centre_um, grid, step_um)
    frames = _snap_frames(core, positions, progress, retries, timeout_s)

    stage = np.array([(x, y) for _, _, x, y in positions])
    centre_px = np.array([(w - 1) / 2, (h - 1) / 2])
    prior = stage / p - centre_px
    window = default_max_shift_px(repeatability_um, max(step_px), p) + max_error * max(step_px)
    pairs = _register_grid(frames, positions, prior, window)
    ok = [q for q in pairs if q.ok]
    if len(ok) < max(3, len(pairs) // 2):
        raise UserError(
            f"calibrate: only {len(ok)} of {len(pairs)} frame pairs around "
            f"({centre_um[0]:.0f}, {centre_um[1]:.0f}) µm could be registered; choose a "
            "textured, non-repetitive area with --at X Y")
    _require_both_axes(ok, positions)
    # the prior only fixes the free translation of the grid: the pairs alone decide the shape
    solved = solve_positions(prior, 1e4, pairs)
    use = solved.constrained
    a, res, cov = fit_camera_matrix(stage[use], solved.positions[use])
    return _result(a, res, cov, int(use.sum()), len(solved.used), len(pairs), len(positions), p,
                   centre_um, step_um)


def _result(a: np.ndarray, res: np.ndarray, cov: np.ndarray, n_used_frames: int,
            n_pairs_used: int, n_pairs: int, n_frames: int, p: float,
            centre_um: tuple[float, float], step_um: tuple[float, float]) -> CalibrationResult:
    """The calibration from the fitted stage-to-pixel matrix ``a``, its residuals ``res`` and
    covariance ``cov`` (:func:`fit_camera_matrix` over ``n_used_frames`` frames)."""
    pixel, theta, px_x, px_y, skew = matrix_geometry(a)
    # residual in pixels is the stage's landing error (µm) times the scale
    sigma_rel = slope_sigma(res, cov, n_used_frames) * pixel
    return CalibrationResult(
        pixel_size_um=pixel,
        rotation_deg=theta,
        stage_to_px=a,
        pixel_size_x_um=px_x,
        pixel_size_y_um=px_y,
        skew_deg=skew,
        residual_rms_um=float(np.sqrt(np.mean(res**2))) * pixel,
        pixel_size_sigma_rel=sigma_rel,
        rotation_sigma_deg=math.degrees(sigma_rel),
        n_frames=n_frames,
        n_pairs_used=n_pairs_used,
        n_pairs=n_pairs,
        nominal_pixel_size_um=p,
        centre_um=(float(centre_um[0]), float(centre_um[1])),
        step_um=step_um,
    )


def _snap_frames(core: Any, positions: list[tuple[int, int, float, float]],
                 progress: Callable[[int, int], None] | None, retries: int, timeout_s: float
                 ) -> dict[tuple[int, int], np.ndarray]:
    """One frame at each grid position, by ``(row, column)``; moves and snaps under the
    scan's watchdog and retries (:func:`devices.calls.retried`): one garbled serial reply
    failed the calibration, and a stuck stage was left moving after the core's 5 s wait."""
    from devices.calls import GaveUp, retried
    from devices.errors import HardwareError

    xy = core.getXYStageDevice()
    frames: dict[tuple[int, int], np.ndarray] = {}
    for i, (r, c, x, y) in enumerate(positions):
        try:
            retried(lambda x=x, y=y: (core.setXYPosition(x, y), core.waitForDevice(xy)),
                    f"calibration move to ({x:.0f}, {y:.0f}) µm", retries=retries,
                    timeout_s=timeout_s)
            retried(core.snapImage, "calibration snap", retries=retries, timeout_s=timeout_s)
        except GaveUp as exc:
            raise HardwareError(f"calibrate: {exc}") from None
        frames[(r, c)] = np.asarray(core.getImage())
        if progress is not None:
            progress(i + 1, len(positions))
    return frames


def _require_both_axes(ok: list[Any], positions: list[tuple[int, int, float, float]]) -> None:
    """Refuse a grid whose registered pairs all lie along one stage axis.

    The frames are then placed along the other axis by the nominal prior alone, and the fit
    gave back the nominal pixel size and no rotation as if measured: a camera mounted
    mirrored in x (its y pairs matched, none of its x pairs) was written as calibrated,
    pixel size 10.000 um and 0.004 degrees, to within 0.01 %.
    """
    rows = [r for r, _, _, _ in positions]
    along_x = sum(1 for q in ok if rows[q.a] == rows[q.b])
    along_y = len(ok) - along_x
    for axis, n, other, m in (("x", along_x, "y", along_y), ("y", along_y, "x", along_x)):
        if n == 0:
            raise UserError(
                f"calibrate: no frame pair a step apart along the stage's {axis} registered "
                f"({m} along {other}), so the camera's {axis} scale would be the nominal "
                "one, not measured; is the camera mirrored or turned against the stage (its "
                "image must follow the stage's axes), or the area plain along "
                f"{axis}? (choose a textured area with --at X Y)")


def _register_grid(frames: dict[tuple[int, int], np.ndarray],
                   positions: list[tuple[int, int, float, float]], prior: np.ndarray,
                   window: float) -> list[Any]:
    """Every frame registered with its right and lower neighbours, near the offsets the
    nominal geometry predicts (``prior``: each frame's expected position in pixels)."""
    ids = {(r, c): k for k, (r, c, _, _) in enumerate(positions)}
    pairs = []
    for (r, c), k in ids.items():
        for nb in ((r, c + 1), (r + 1, c)):
            if nb in ids:
                j = ids[nb]
                d = prior[j] - prior[k]
                pairs.append(register_pair(frames[(r, c)], frames[nb], (d[0], d[1]), window,
                                           ids=(k, j)))
    return pairs


def _grid_on(area: Any, centre_um: tuple[float, float], step_um: tuple[float, float],
             fov_um: tuple[float, float]) -> int:
    """Most frames per side whose fields all lie on ``area`` (0: not even one)."""
    from shapely.geometry import box

    n = 0
    while n < MAX_GRID:
        half = (n * step_um[0] / 2 + fov_um[0] / 2, n * step_um[1] / 2 + fov_um[1] / 2)
        if not area.contains(box(centre_um[0] - half[0], centre_um[1] - half[1],
                                 centre_um[0] + half[0], centre_um[1] + half[1])):
            return n
        n += 1
    return n


def calibrate_recipe(
    recipe: Any,
    *,
    centre_um: tuple[float, float] | None = None,
    grid: int | None = None,
    step_fraction: float = 0.75,
    progress: Callable[[int, int], None] | None = None,
) -> CalibrationResult:
    """Calibrate the microscope of a recipe (simulated or Micro-Manager).

    The grid is centred on ``centre_um`` or else on the centre of the recipe's sample region.
    In simulation the true camera geometry is added to the result (``truth``) with the errors.
    """
    from devices.core import build_microscope

    failure = None
    with build_microscope(recipe) as handle:
        try:
            return _calibrate_handle(handle, recipe, centre_um, grid, step_fraction, progress)
        except Exception as exc:  # noqa: BLE001 - raised again below, its traceback dropped
            log.debug("calibration failed", exc_info=True)
            failure = exc
    # the failure's traceback holds the core: collected here, not at the interpreter's exit
    # in one of the core's C++ threads, which aborted the process after the one line was
    # printed ("FATAL: exception not rethrown", exit 134), as devices.core's load does
    failure.__traceback__ = failure.__context__ = failure.__cause__ = None
    del handle
    gc.collect()
    raise failure


def _calibrate_handle(handle: Any, recipe: Any, centre_um: tuple[float, float] | None,
                      grid: int | None, step_fraction: float,
                      progress: Callable[[int, int], None] | None) -> CalibrationResult:
    """:func:`calibrate_recipe` on a built microscope."""
    from scanner.geometry import usable_polygon

    core = handle.core
    area = None
    if centre_um is None:  # on the sample (a grid at --at X Y is the user's choice)
        area = usable_polygon(recipe.sample, notch=False)
        c = area.centroid  # the sample's centre
        centre_um = (float(c.x), float(c.y))
    micro = recipe.microscope
    stage = getattr(micro, "stage", None)
    travel = travel_limits(recipe, core) if stage is not None else None
    repeat = float(stage.repeatability_um) if stage is not None else 2.0
    # the core's own wait for a device (5 s by default) as the watchdog's: a stuck stage is
    # then stopped by its driver's move timeout, not abandoned moving
    core.setTimeoutMs(int(recipe.scan.device_timeout_s * 1000))
    result = calibrate_core(core, float(core.getPixelSizeUm()), centre_um, grid=grid,
                            step_fraction=step_fraction, repeatability_um=repeat,
                            travel=travel, progress=progress, area=area,
                            retries=recipe.scan.retries, timeout_s=recipe.scan.device_timeout_s)
    truth = (handle.truth or {}).get("camera")
    if truth:
        result.extra["truth"] = {
            "pixel_size_um": truth["pixel_size_um"],
            "rotation_deg": truth["rotation_deg"],
            "pixel_size_error_pct": 100 * (result.pixel_size_um / truth["pixel_size_um"] - 1),
            "rotation_error_deg": result.rotation_deg - truth["rotation_deg"],
        }
    return result
