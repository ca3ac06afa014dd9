"""A PV cell's busbars on the anomaly map: the cell's design, not defects.

The memory bank knows the busbars it was built from (the simulated cells' 1.2 mm ones, 30 to
150 pixels wide at 8-40 um); a narrower one, a dark line a dozen pixels wide, is a structure it
never saw, and the features whose field covers it score the whole busbar high: along a 0.3 mm
busbar at 30 um the map's median was 0.80-0.95 (threshold 0.911, line threshold 0.785, the
finger area 0.58), and every busbar came out as a crack as long as the cell.

The busbars are known from the recipe and the alignment, so the map is compared with itself
along each of them, as cell-to-cell compares a repeat: at each offset across a busbar (within
its band, the busbar and the field of the features either side), the map's running median
along the busbar over :data:`ALONG_MM` is what the design scores there, and its excess over the
surface just outside the band is taken off. A defect on a busbar shorter than about half that
window, and one crossing it, still stand out by what they add to the design's level.

Beside a busbar's edge the map's level is the surface's but its spread is wider: the
features see the edge, and on the simulated benchmark's cells (1.2 mm busbars, 30 um) 32 of
99 false defects lay 0.2-1.2 mm beyond an edge (the 99th percentile there 0.83-0.85 against
0.76-0.80 far away). So the deviation at each offset from the design's level is also scaled
to the spread beside the band (:func:`_spread_factor`, measured along the whole busbar; at
most 1): false defects 99 -> 67 with the same defects found.

The cell's four sides are compared with themselves the same way (:func:`flatten_sides`): a
side inside the mosaic has the chuck beyond it, the features within their reach of it see
both, and the band along it scored higher all along the side (a 90 mm cell at 40 um: 0.85
against 0.65 further in, threshold 0.911, line threshold 0.785), reported as scratches and
cracks up to 20 mm long on the cell's edge.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.ndimage import median_filter

#: length of the running median along a busbar (mm): what the design scores there
ALONG_MM = 12.0
#: the band either side of a busbar's edge where the features see it (image pixels at the
#: detector's input: its stride-16 features, averaged over 3 x 3 cells, raise the map about
#: 30 px beyond a thin busbar's edge, and widen its spread up to 40 px beyond a 1.2 mm one:
#: false defects 1.0-1.2 mm from the busbar's centre at 30 um)
MARGIN_PX = 48.0
#: map pixels just outside the band that give the surface's own level beside the busbar
BESIDE_PX = 3
#: the upper quantile of the map's deviation from the design's level that measures its
#: spread at an offset across a busbar (along the whole busbar: a 156 mm cell at 30 um gives
#: each offset some 1,300 map pixels, so 65 above it)
SPREAD_QUANTILE = 0.95
#: valid map pixels an offset needs along a busbar to measure its spread
MIN_SPREAD_ROWS = 100


def cell_sides(sample: Any, alignment: dict[str, Any] | None
               ) -> tuple[tuple[float, float], float, float, float] | None:
    """The cell's centre (stage um), rotation (rad) and half width and height (um); None for
    another kind of sample."""
    if sample is None or str(getattr(sample, "kind", "")) != "pv_cell":
        return None
    centre = tuple(float(v) for v in getattr(sample, "center_um", (0.0, 0.0)))
    theta = 0.0
    if alignment:
        centre = tuple(float(v) for v in alignment.get("center_um", centre))
        theta = math.radians(float(alignment.get("rotation_deg", 0.0) or 0.0))
    return ((centre[0], centre[1]), theta, float(sample.width_mm) * 500.0,
            float(sample.height_mm) * 500.0)


def busbar_lines(sample: Any, alignment: dict[str, Any] | None
                 ) -> tuple[tuple[float, float], float, list[float], float] | None:
    """The cell's centre (stage um), rotation (rad), the busbars' centres across the cell
    (um from its centre, in its own frame) and their half width (um); None without busbars."""
    cell = cell_sides(sample, alignment)
    n = int(getattr(sample, "busbars", 0) or 0)
    if cell is None or n <= 0:
        return None
    centre, theta, hw, _ = cell
    spacing = 2 * hw / n
    return (centre, theta, [-hw + (k + 0.5) * spacing for k in range(n)],
            float(sample.busbar_width_mm) * 500.0)


def _running_median(values: np.ndarray, valid: np.ndarray, size: int) -> np.ndarray:
    """Median of each column of ``values`` over ``size`` rows, of its valid rows only."""
    out = np.zeros_like(values)
    for j in range(values.shape[1]):
        keep = valid[:, j]
        if keep.sum() >= 3:
            out[keep, j] = median_filter(values[keep, j], size=min(size, int(keep.sum())),
                                         mode="nearest")
    return out


def _spread_factor(deviation: np.ndarray, valid: np.ndarray, inner: np.ndarray,
                   beside: np.ndarray) -> np.ndarray:
    """Per offset of ``inner``, the ratio (at most 1) of the surface's spread beside the band
    to the spread at that offset along the whole line: the upper :data:`SPREAD_QUANTILE` of
    the map's deviation from its running median (``deviation``), over valid rows. 1 where an
    offset has under :data:`MIN_SPREAD_ROWS` valid rows."""
    def spread(cols: np.ndarray) -> np.ndarray:
        out = np.full(len(cols), np.nan)
        for k, j in enumerate(cols):
            keep = valid[:, j]
            if keep.sum() >= MIN_SPREAD_ROWS:
                out[k] = np.quantile(deviation[keep, j], SPREAD_QUANTILE)
        return out

    near = spread(beside)
    if not np.isfinite(near).any():
        return np.ones(len(inner))
    ref = float(np.nanmean(near))
    at = spread(inner)
    ok = np.isfinite(at) & (at > 0) & (ref > 0)
    return np.where(ok, np.minimum(1.0, ref / np.where(ok, at, 1.0)), 1.0)


def flatten_busbars(anomaly: Any, origin_um: tuple[float, float], map_pixel_um: float,
                    stride: int, sample: Any, alignment: dict[str, Any] | None) -> int:
    """Take the busbars' own level off ``anomaly`` (numpy or Zarr, writable; 0: not
    inspected). Returns the number of map pixels lowered."""
    lines = busbar_lines(sample, alignment)
    if lines is None:
        return 0
    (cx, cy), theta, centres, half = lines
    p = float(map_pixel_um)
    input_px = p / max(int(stride), 1)
    m = int(math.ceil((half + MARGIN_PX * input_px) / p))  # band half width (map px)
    reach = m + BESIDE_PX
    offsets = np.arange(-reach, reach + 1)
    beside = np.r_[0:BESIDE_PX, 2 * reach + 1 - BESIDE_PX : 2 * reach + 1]
    inner = np.arange(BESIDE_PX, 2 * reach + 1 - BESIDE_PX)
    lowered = 0
    for u in centres:
        lowered += _flatten_line(anomaly, origin_um, p, (cx, cy), theta, u, offsets,
                                 lambda valid: (inner, beside), even_spread=True)
    return lowered


def flatten_sides(anomaly: Any, origin_um: tuple[float, float], map_pixel_um: float,
                  stride: int, sample: Any, alignment: dict[str, Any] | None) -> int:
    """Take the level a PV cell's four sides score off ``anomaly`` (as
    :func:`flatten_busbars` does for its busbars). Returns the number of map pixels lowered.

    A side lying inside the mosaic, with the chuck beyond it, is seen by the features of the
    band within their reach of the first inspected map pixel (the map leaves the model's own
    border out); that band is compared with itself along the side, and its excess over the
    surface just inside it is taken off. A defect at the edge shorter than about half
    :data:`ALONG_MM`, and one crossing it, keep what they add."""
    cell = cell_sides(sample, alignment)
    if cell is None:
        return 0
    (cx, cy), theta, hw, hh = cell
    p = float(map_pixel_um)
    input_px = p / max(int(stride), 1)
    m = int(math.ceil(MARGIN_PX * input_px / p))  # the features' reach (map px)
    # offsets inward from the side: the part the map leaves out along the border is found
    # from the map itself (where its pixels start), then the reach and the surface beyond
    span = 4 * m + BESIDE_PX

    def parts(valid: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        rows = valid.any(1)
        if not rows.any():
            return None
        # the first inspected offset on the rows that have one, one more for the line's
        # column and the map's border, each rounded to a whole pixel on a turned cell
        first = int(np.median(np.argmax(valid[rows], axis=1))) + 1
        end = first + m + 1
        if end + BESIDE_PX > valid.shape[1]:
            return None
        return np.arange(0, end), np.arange(end, end + BESIDE_PX)

    lowered = 0
    inward = np.arange(0, span + 1)
    # left and right sides: lines along the cell's v at u = -hw, +hw
    for u, sign in ((-hw, 1), (hw, -1)):
        lowered += _flatten_line(anomaly, origin_um, p, (cx, cy), theta, u, sign * inward,
                                 parts)
    # bottom and top sides: lines along u at v = -hh, +hh; on the transposed map a line of
    # constant v is one of constant u, turned the other way
    turned = _Transposed(anomaly)
    for v, sign in ((-hh, 1), (hh, -1)):
        lowered += _flatten_line(turned, (origin_um[1], origin_um[0]), p, (cy, cx), -theta, v,
                                 sign * inward, parts)
    return lowered


class _Transposed:
    """``anomaly`` seen with rows and columns swapped (reads and writes of ``[:, c0:c1]``)."""

    def __init__(self, array: Any) -> None:
        self.array = array
        self.shape = tuple(reversed(tuple(int(v) for v in array.shape)))

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        return np.asarray(self.array[key[1], key[0]]).T

    def __setitem__(self, key: tuple[slice, slice], value: np.ndarray) -> None:
        self.array[key[1], key[0]] = np.ascontiguousarray(np.asarray(value).T)


def _flatten_line(anomaly: Any, origin_um: tuple[float, float], p: float,
                  centre: tuple[float, float], theta: float, u: float, offsets: np.ndarray,
                  parts: Any, even_spread: bool = False) -> int:
    """Lower the band along the cell's line at ``u`` (a line of its v axis) by the excess of
    its running median over the surface beside it. ``offsets``: map columns across the line
    sampled on each row; ``parts(valid)``: the indices of ``offsets`` lowered and of those
    giving the surface's level (None: leave the line); ``even_spread``: also scale each
    lowered offset's deviation to the spread beside the band (:func:`_spread_factor`).
    Returns the map pixels lowered."""
    cx, cy = centre
    h, w = (int(v) for v in anomaly.shape)
    x0, y0 = origin_um
    size = max(31, int(round(ALONG_MM * 1000.0 / p)) | 1)
    y = y0 + np.arange(h) * p
    cos, sin = math.cos(theta), math.sin(theta)
    # the line's column on each map row (stage = centre + R(theta) (u, v))
    v = (y - cy - u * sin) / cos
    col = np.rint((cx + u * cos - v * sin - x0) / p).astype(int)
    lo = int(col.min()) + min(int(offsets.min()), 0)
    hi = int(col.max()) + max(int(offsets.max()), 0) + 1
    c0, c1 = max(lo, 0), min(hi, w)
    if c1 <= c0:
        return 0
    strip = np.zeros((h, hi - lo), dtype=np.float32)
    strip[:, c0 - lo : c1 - lo] = np.asarray(anomaly[:, c0:c1], dtype=np.float32)
    idx = (col - lo)[:, None] + offsets[None, :]
    band = np.take_along_axis(strip, idx, axis=1)  # rows x offsets across the line
    valid = band > 0
    found = parts(valid)
    if found is None:
        return 0
    inner, beside = found
    ref = _running_median(band, valid, size)
    ok = valid[:, beside]
    base = np.where(ok.any(1), (ref[:, beside] * ok).sum(1) / np.maximum(ok.sum(1), 1),
                    np.inf)
    cur = band[:, inner]
    factor = _spread_factor(band - ref, valid, inner, beside) if even_spread else 1.0
    # the design's level at each offset becomes the surface's beside the band, and the
    # deviation from it is scaled to the surface's spread there
    flat = base[:, None] + (cur - ref[:, inner]) * factor
    new = np.where(valid[:, inner], np.maximum(np.minimum(flat, cur), 1e-3), cur)
    changed = new < cur
    if not changed.any():
        return 0
    np.put_along_axis(strip, idx[:, inner], new, axis=1)
    anomaly[:, c0:c1] = strip[:, c0 - lo : c1 - lo]
    return int(changed.sum())
