"""Die-to-die z-scores put on the anomaly map (:mod:`scanner.inspection.dietodie`).

A z-score on the anomaly scale (:func:`z_to_score`), a die's band of z-scores as a block of
map pixels (:func:`map_patch`), and the map raised to the blocks (:func:`apply_patches`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from scanner.inspection.dietodie_geometry import MosaicGrid


def z_to_score(z: np.ndarray, z_threshold: float, threshold: float) -> np.ndarray:
    """Die-to-die z-scores on the anomaly map's scale: ``z_threshold`` maps to ``threshold``.

    ``threshold * sqrt(z / z_threshold)`` below the threshold and ``threshold + (top -
    threshold)(1 - z_threshold / z)`` above it, approaching ``top`` for strong differences
    (:func:`score_ceiling`: 1 on a probability map, twice the threshold on a distance map). The
    square root puts the extent threshold of defect extraction (about two thirds of the
    decision threshold on a patterned wafer) near z = 7, well above the noise, so a scratch
    that is faint where it crosses busy circuitry still grows into one defect.
    """
    z = np.maximum(np.asarray(z, dtype=np.float32), 0.0)
    below = threshold * np.sqrt(z / z_threshold)
    from scanner.inspection.defects import score_ceiling

    above = threshold + (score_ceiling(threshold) - threshold) * (
        1.0 - z_threshold / np.maximum(z, 1e-6))
    return np.where(z <= z_threshold, below, above).astype(np.float32)


#: a block of die-to-die scores on the anomaly map: its first map row and column, and values
Patch = tuple[int, int, np.ndarray]


def map_samples(shape: tuple[int, int], r0: int, c0: int, mosaic: MosaicGrid,
                map_origin_um: tuple[float, float], map_pixel_um: float
                ) -> tuple[int, int, np.ndarray, np.ndarray, int] | None:
    """Where the map pixels fall on a block of mosaic pixels ``[r0:r0 + h, c0:c0 + w]``.

    Returns the first map row and column whose centres lie on the block, the block's rows and
    columns nearest to those centres, and the map pixel's side in mosaic pixels (None: no
    map pixel centre lies on the block).
    """
    p = mosaic.pixel_size_um
    size = max(1, int(math.ceil(map_pixel_um / p)))
    y0 = mosaic.origin_um[1] + r0 * p
    x0 = mosaic.origin_um[0] + c0 * p
    i0 = max(0, int(math.ceil((y0 - map_origin_um[1]) / map_pixel_um)))
    j0 = max(0, int(math.ceil((x0 - map_origin_um[0]) / map_pixel_um)))
    i1 = int(math.floor((y0 + (shape[0] - 1) * p - map_origin_um[1]) / map_pixel_um)) + 1
    j1 = int(math.floor((x0 + (shape[1] - 1) * p - map_origin_um[0]) / map_pixel_um)) + 1
    if i1 <= i0 or j1 <= j0:
        return None
    rows = np.rint((map_origin_um[1] + np.arange(i0, i1) * map_pixel_um - y0) / p
                   ).astype(int).clip(0, shape[0] - 1)
    cols = np.rint((map_origin_um[0] + np.arange(j0, j1) * map_pixel_um - x0) / p
                   ).astype(int).clip(0, shape[1] - 1)
    return i0, j0, rows, cols, size


def map_patch(z: np.ndarray, r0: int, c0: int, mosaic: MosaicGrid,
              map_origin_um: tuple[float, float], map_pixel_um: float, z_threshold: float,
              threshold: float) -> Patch | None:
    """A z-score map of mosaic pixels ``[r0:, c0:]`` as anomaly-map scores (None: no overlap).

    The map pixels whose centres fall on ``z`` are sampled from it after an opening that
    keeps what two neighbouring mosaic pixels share (:func:`opened_max_at`: a lone noisy
    pixel does not become a whole map pixel and pass the minimum defect area, while a
    scratch one pixel wide, in any direction, stays) and a max-filter of one map pixel (a
    defect narrower than a map pixel is kept).
    """
    at = map_samples(z.shape, r0, c0, mosaic, map_origin_um, map_pixel_um)
    if at is None:
        return None
    i0, j0, rows, cols, size = at
    return i0, j0, z_to_score(opened_max_at(z, rows, cols, size), z_threshold, threshold)


def opened_max_at(z: np.ndarray, rows: np.ndarray, cols: np.ndarray, size: int) -> np.ndarray:
    """The max-filter of ``size`` of ``z``'s opening by pairs of neighbouring pixels (the
    largest of its openings by the 8 two-pixel elements), at the sampled ``rows`` and
    ``cols`` only.

    The opening keeps at each pixel what it shares with its strongest 8-neighbour
    (``min(z, max of the 8 neighbours)``): a lone pixel falls to its neighbours' level, a
    line one pixel wide in any direction keeps its value. A 2 x 2 square opening, used
    before, erased such lines: a thin scratch across a die scored z 27 and was not reported
    (simulated wafer, 5 µm pixels). The max-filter is gathered at the map pixels (a
    sixteenth of the mosaic's at a 4 px map pixel) instead of filtering every mosaic pixel.
    """
    return max_at(pair_opening(z), rows, cols, size)


def max_at(values: np.ndarray, rows: np.ndarray, cols: np.ndarray, size: int) -> np.ndarray:
    """``maximum_filter(values, size)`` (scipy's, border replicated) at the sampled ``rows``
    and ``cols`` only."""
    h, w = values.shape
    lo, hi = -(size // 2), (size - 1) // 2
    band = np.max([values[np.clip(rows + d, 0, h - 1)] for d in range(lo, hi + 1)], axis=0)
    return np.max([band[:, np.clip(cols + d, 0, w - 1)] for d in range(lo, hi + 1)], axis=0)


def pair_opening(z: np.ndarray) -> np.ndarray:
    """``z``'s opening by pairs of neighbouring pixels: at each pixel what it shares with its
    strongest 8-neighbour, ``min(z, max of the 8 neighbours)`` (border replicated)."""
    h, w = z.shape
    zp = np.pad(z, 1, mode="edge")
    neighbours = np.full(z.shape, -np.inf, dtype=z.dtype)
    for dr in (0, 1, 2):
        for dc in (0, 1, 2):
            if dr != 1 or dc != 1:
                np.maximum(neighbours, zp[dr:dr + h, dc:dc + w], out=neighbours)
    return np.minimum(z, neighbours)


def repeated_mask(compared: np.ndarray, patches: list[Patch], design_score: float
                  ) -> np.ndarray:
    """The map pixels of the dies ``compared`` where no patch reaches ``design_score``:
    there the neighbouring dies show the same as the die (its design, however unusual it
    looks to the network)."""
    out = compared.copy()
    mr, mc = out.shape
    for i0, j0, sc in patches:
        a0, b0 = max(i0, 0), max(j0, 0)
        a1, b1 = min(i0 + sc.shape[0], mr), min(j0 + sc.shape[1], mc)
        if a1 > a0 and b1 > b0:
            out[a0:a1, b0:b1] &= sc[a0 - i0:a1 - i0, b0 - j0:b1 - j0] < design_score
    return out


def apply_patches(anomaly: Any, patches: list[Patch], band_rows: int = 1024) -> None:
    """Raise ``anomaly`` (numpy or Zarr, writable) to the patches' scores, in place.

    Band by band of ``band_rows`` map rows, each read and written once: writing patch by
    patch into a Zarr array re-encodes its chunks once per patch (1.4 s for the 49 dies of the
    benchmark's die-dense wafer).
    """
    mr, mc = anomaly.shape
    if not patches:
        return
    top = min(i0 for i0, _, _ in patches)
    bottom = min(mr, max(i0 + sc.shape[0] for i0, _, sc in patches))
    for b0 in range(top, bottom, band_rows):
        b1 = min(b0 + band_rows, bottom)
        inside = [(i0, j0, sc) for i0, j0, sc in patches
                  if i0 < b1 and i0 + sc.shape[0] > b0 and j0 < mc]
        if not inside:
            continue
        band = np.asarray(anomaly[b0:b1], dtype=np.float32).copy()
        for i0, j0, sc in inside:
            r0, r1 = max(i0, b0), min(i0 + sc.shape[0], b1)
            w = min(sc.shape[1], mc - j0)
            view = band[r0 - b0:r1 - b0, j0:j0 + w]
            np.maximum(view, sc[r0 - i0:r1 - i0, :w], out=view)
        anomaly[b0:b1] = band


def bridge_die_borders(anomaly: Any, compared: np.ndarray, grid: Any,
                       map_origin_um: tuple[float, float], map_pixel_um: float,
                       gap_px: float, reach: int = 2) -> int:
    """Raise the map across the die grid's lines to what both sides of each line hold, in
    place (numpy or Zarr); returns how many map pixels were raised.

    Die-to-die scores a die's border with the references' own surroundings as context and
    keeps the smaller z there (:func:`scanner.inspection.dietodie._band_z_in_context`), so a
    defect that crosses from one die into the next dips along the line between them: a faint
    stain 150 um wide across four dies of a photograph die grid was reported as five pieces,
    none of them over its centre. Along each line of the grid (within ``gap_px`` map pixels
    of it, inside the dies ``compared``), a map pixel is raised to the smaller of the largest
    values ``reach`` pixels beyond the gap on either side: what both dies show continues
    across the line; what one die shows alone is not carried over. A grid turned by more than
    a map pixel across the map is left as it is.
    """
    mr, mc = anomaly.shape
    if not compared.any():
        return 0
    turn = math.radians(float(getattr(grid, "rotation_deg", 0.0)))
    if abs(math.tan(turn)) * max(mr, mc) > 1.0:
        return 0
    rows = np.nonzero(compared.any(axis=1))[0]
    cols = np.nonzero(compared.any(axis=0))[0]
    g = int(math.ceil(gap_px))
    raised = 0
    for axis in (1, 0):  # vertical lines (x = const), then horizontal ones
        pitch = float(grid.pitch_um[0 if axis == 1 else 1]) / map_pixel_um
        start = (float(grid.origin_um[0 if axis == 1 else 1])
                 - map_origin_um[0 if axis == 1 else 1]) / map_pixel_um
        lo_px, hi_px = (cols if axis == 1 else rows)[[0, -1]]
        across = (rows if axis == 1 else cols)[[0, -1]]
        k0 = int(math.ceil((lo_px - start) / pitch))
        k1 = int(math.floor((hi_px - start) / pitch))
        for k in range(k0, k1 + 1):
            line = start + k * pitch
            a, b = int(math.floor(line)) - g, int(math.ceil(line)) + g
            if a - reach < 0 or b + reach >= (mc if axis == 1 else mr):
                continue
            sl = slice(a - reach, b + reach + 1)
            span = slice(int(across[0]), int(across[1]) + 1)
            strip = np.asarray(anomaly[span, sl] if axis == 1 else anomaly[sl, span],
                               dtype=np.float32)
            strip = strip if axis == 1 else strip.T
            inside = (compared[span, sl] if axis == 1 else compared[sl, span].T)
            both = np.minimum(strip[:, :reach].max(axis=1), strip[:, -reach:].max(axis=1))
            mid = strip[:, reach:-reach]
            up = (both[:, None] > mid) & inside[:, reach:-reach]
            if not up.any():
                continue
            raised += int(np.count_nonzero(up))
            mid[up] = np.broadcast_to(both[:, None], mid.shape)[up]
            if axis == 1:
                anomaly[span, sl] = strip
            else:
                anomaly[sl, span] = strip.T
    return raised
