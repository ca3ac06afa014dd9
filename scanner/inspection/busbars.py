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
#: 30 px beyond a thin busbar's edge)
MARGIN_PX = 32.0
#: map pixels just outside the band that give the surface's own level beside the busbar
BESIDE_PX = 3


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
                                 lambda valid: (inner, beside))
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
                  parts: Any) -> int:
    """Lower the band along the cell's line at ``u`` (a line of its v axis) by the excess of
    its running median over the surface beside it. ``offsets``: map columns across the line
    sampled on each row; ``parts(valid)``: the indices of ``offsets`` lowered and of those
    giving the surface's level (None: leave the line). Returns the map pixels lowered."""
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
    excess = np.clip(ref[:, inner] - base[:, None], 0.0, None)
    cur = band[:, inner]
    new = np.where(valid[:, inner], np.maximum(cur - excess, 1e-3), cur)
    changed = new < cur
    if not changed.any():
        return 0
    np.put_along_axis(strip, idx[:, inner], new, axis=1)
    anomaly[:, c0:c1] = strip[:, c0 - lo : c1 - lo]
    return int(changed.sum())
