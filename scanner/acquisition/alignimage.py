"""What the pre-alignment reads from one field's image: edge crossings along rays from the
expected centre, circles and lines fitted to the edge points, and scribe-lane crossings.

Pure functions of an image and its pixel size (no hardware), so that they can be tested on
drawn fields; :mod:`scanner.acquisition.align` takes the fields and combines what these give.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage, optimize


def ray_edges(image: np.ndarray, field_xy: tuple[float, float], pixel_um: float,
              centre: tuple[float, float], angles_deg: np.ndarray, r_out: float,
              r_in: float, camera_deg: float = 0.0) -> np.ndarray:
    """Radius of the outermost chuck-to-sample crossing along each ray (NaN: none).

    ``camera_deg``: the camera's rotation against the stage (a calibration's), by which a
    stage offset from the field's centre is turned back into the image's pixels.

    Rays start at ``centre + r_out * u`` and run inwards to ``r_in``, sampled every half
    pixel (bilinear). A first pass finds the crossing of the field's Otsu level; the level is
    then the mean of the chuck's and the sample's medians just outside and inside it on the
    same ray (so a pattern, vignetting or a dim edge die does not move it), and the crossing
    is interpolated between the two samples around it.
    """
    from skimage.filters import threshold_otsu

    img = np.asarray(image, dtype=np.float32)
    h, w = img.shape
    step = 0.5 * pixel_um
    radii = np.arange(r_out, r_in, -step)
    ang = np.radians(np.asarray(angles_deg, dtype=float))
    xs = centre[0] + radii[None, :] * np.cos(ang)[:, None]
    ys = centre[1] + radii[None, :] * np.sin(ang)[:, None]
    c, s = math.cos(math.radians(camera_deg)), math.sin(math.radians(camera_deg))
    dx, dy = xs - field_xy[0], ys - field_xy[1]
    cols = (c * dx + s * dy) / pixel_um + (w - 1) / 2
    rows = (-s * dx + c * dy) / pixel_um + (h - 1) / 2
    v = ndimage.map_coordinates(img, [rows, cols], order=1, cval=np.nan)
    inside = (cols >= 0) & (cols <= w - 1) & (rows >= 0) & (rows <= h - 1)
    v[~inside] = np.nan
    t0 = float(threshold_otsu(img[::4, ::4]))
    out = np.full(len(ang), np.nan)
    near, far = 6, 24  # half-pixel steps: clear of the edge's blur, still local
    for k in range(len(ang)):
        prof = v[k]
        ok = np.flatnonzero(np.isfinite(prof))
        if len(ok) < 2 * far:
            continue
        first = ok[0]
        if prof[first] >= t0:
            continue  # the ray starts on the sample: its edge lies beyond the field
        above = np.flatnonzero(prof[first:] >= t0)
        if len(above) == 0:
            continue
        j = first + int(above[0])
        lo = prof[max(first, j - far): j - near]
        hi = prof[j + near: j + far]
        if len(lo) < 4 or len(hi) < 4 or not np.isfinite(hi).all():
            continue
        t = 0.5 * (float(np.median(lo)) + float(np.median(hi)))
        seg = prof[max(first, j - near): j + near]
        cross = np.flatnonzero((seg[:-1] < t) & (seg[1:] >= t))
        if len(cross) == 0:
            continue
        i = max(first, j - near) + int(cross[0])
        a, b = prof[i], prof[i + 1]
        out[k] = radii[i] - step * (t - a) / (b - a)
    return out


def fit_circle(points: np.ndarray, start: tuple[float, float, float],
               clip_um: float) -> tuple[float, float, float, float, np.ndarray]:
    """Least-squares circle through edge points, dropping those off it by more than 3 sigma
    (or ``clip_um``): ``(cx, cy, r, rms, kept)``."""
    keep = np.ones(len(points), bool)
    params = np.asarray(start, float)
    for _ in range(4):
        p = points[keep]

        def resid(q: np.ndarray, p: np.ndarray = p) -> np.ndarray:
            return np.hypot(p[:, 0] - q[0], p[:, 1] - q[1]) - q[2]

        params = optimize.least_squares(resid, params, method="lm").x
        res = np.hypot(points[:, 0] - params[0], points[:, 1] - params[1]) - params[2]
        rms = float(np.sqrt(np.mean(res[keep] ** 2)))
        new = np.abs(res) <= max(3 * rms, 1e-6) if rms > clip_um / 3 else np.abs(res) <= clip_um
        new |= np.abs(res) <= 3 * rms
        if (new == keep).all():
            break
        keep = new
    return float(params[0]), float(params[1]), float(params[2]), rms, keep


def fit_circle_radius(points: np.ndarray, start: tuple[float, float], radius: float,
                      clip_um: float) -> tuple[float, float, float, np.ndarray]:
    """:func:`fit_circle` with the radius held: ``(cx, cy, rms, kept)``."""
    keep = np.ones(len(points), bool)
    params = np.asarray(start, float)
    for _ in range(4):
        p = points[keep]

        def resid(q: np.ndarray, p: np.ndarray = p) -> np.ndarray:
            return np.hypot(p[:, 0] - q[0], p[:, 1] - q[1]) - radius

        params = optimize.least_squares(resid, params, method="lm").x
        res = np.hypot(points[:, 0] - params[0], points[:, 1] - params[1]) - radius
        rms = float(np.sqrt(np.mean(res[keep] ** 2)))
        new = (np.abs(res) <= max(3 * rms, 1e-6)) | (np.abs(res) <= clip_um)
        if (new == keep).all():
            break
        keep = new
    return float(params[0]), float(params[1]), rms, keep


def fit_line(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Total least squares line: ``(point, unit direction, rms distance)``."""
    mean = points.mean(axis=0)
    _, s, vt = np.linalg.svd(points - mean, full_matrices=False)
    return mean, vt[0], float(s[-1] / math.sqrt(len(points)))


def lane_middle(profile: np.ndarray, approx: float, half_width_px: float) -> float | None:
    """Middle (sub-pixel) of the quiet run (a scribe lane) nearest ``approx`` in a profile of
    per-column (or per-row) spread; None when no clear lane is there."""
    n = len(profile)
    lo_i = max(int(approx - 3 * half_width_px) - 4, 1)
    hi_i = min(int(approx + 3 * half_width_px) + 4, n - 2)
    if hi_i - lo_i < 4:
        return None
    window = profile[lo_i:hi_i]
    quiet = float(np.min(window))
    # a die's seal ring and pads flank its lane, busy at any pixel size (a die's core may
    # average to grey at a coarse one)
    busy = float(np.percentile(window, 90))
    if busy <= quiet * 2 + 1e-9:
        return None
    t = 0.5 * (quiet + busy)
    j = lo_i + int(np.argmin(window))
    a = j
    while a > 0 and profile[a - 1] < t:
        a -= 1
    b = j
    while b < n - 1 and profile[b + 1] < t:
        b += 1
    if a == 0 or b == n - 1:
        return None
    # crossings interpolated on each side of the run
    left = a - 1 + (t - profile[a - 1]) / (profile[a] - profile[a - 1])
    right = b + (profile[b] - t) / (profile[b] - profile[b + 1])
    return 0.5 * (left + right)


#: lanes whose slant moves them more than this many pixels across the field are straightened
#: before their columns and rows are read
SLANT_PX = 1.0


def lane_cross(image: np.ndarray, lane_um: float, pixel_um: float, angle_deg: float = 0.0
               ) -> tuple[float, float] | None:
    """Pixel ``(col, row)`` where a vertical and a horizontal scribe lane cross, near the
    field's centre (None: not seen).

    ``angle_deg``: the lanes' turn in the image (from +col towards +row; the wafer's rotation
    less the camera's). Lanes are found as quiet columns and rows, so turned lanes are
    straightened first: a 100 um lane at 10 um pixels turned 1.4 deg drifted 12 px over a
    512 px field, wider than itself, and no column was quiet.
    """
    img = np.asarray(image, dtype=np.float32)
    found = _lane_cross_at(img, lane_um, pixel_um, angle_deg)
    if found is None:
        # the camera may be turned against the stage without a calibration saying so: the
        # lanes then lie at the pattern's own angle, not the expected one
        seen = manhattan_angle(img, angle_deg)
        if abs(seen - angle_deg) > 0.05:
            found = _lane_cross_at(img, lane_um, pixel_um, seen)
    return found


def manhattan_angle(image: np.ndarray, near_deg: float = 0.0) -> float:
    """The turn (deg, from +col towards +row) of a pattern drawn along two perpendicular
    directions (a die's lanes, pads and lines), from its gradients' directions folded onto a
    quarter turn; the one nearest ``near_deg``."""
    img = np.asarray(image, dtype=np.float32)
    gy, gx = np.gradient(ndimage.gaussian_filter(img, 1.0))
    weight = np.hypot(gx, gy)
    z = np.sum(weight * np.exp(4j * np.arctan2(gy, gx)))
    angle = math.degrees(math.atan2(z.imag, z.real)) / 4.0
    return angle + 90.0 * round((near_deg - angle) / 90.0)


def _lane_cross_at(img: np.ndarray, lane_um: float, pixel_um: float, angle_deg: float
                   ) -> tuple[float, float] | None:
    h, w = img.shape
    th = math.radians(angle_deg)
    if abs(math.tan(th)) * max(h, w) > SLANT_PX:
        # straightened (row, col) samples the field at centre + R(th) (col, row) offsets
        c, s = math.cos(th), math.sin(th)
        m = np.array([[c, s], [-s, c]])
        centre = np.array([(h - 1) / 2, (w - 1) / 2])
        straight = ndimage.affine_transform(img, m, offset=centre - m @ centre, order=1,
                                            mode="nearest")
        found = _lane_cross_at(straight, lane_um, pixel_um, 0.0)
        if found is None:
            return None
        dc, dr = found[0] - centre[1], found[1] - centre[0]
        return centre[1] + c * dc - s * dr, centre[0] + s * dc + c * dr
    # interquartile range per column/row: a die varies, a lane does not (a particle on the
    # lane moves a few pixels of a column, not its quartiles)
    q = np.percentile(img, [25, 75], axis=0)
    cols = q[1] - q[0]
    q = np.percentile(img, [25, 75], axis=1)
    rows = q[1] - q[0]
    half = 0.5 * lane_um / pixel_um
    c = lane_middle(cols, (w - 1) / 2, max(half, 2.0))
    r = lane_middle(rows, (h - 1) / 2, max(half, 2.0))
    return None if c is None or r is None else (c, r)

