"""The recipe's die grid in stage coordinates, and which dies a wafer scan tested.

Convention (the same as the simulator's, ``simulators/samples/wafer.py``): the grid has pitch
``die_pitch_mm`` and a die-cell corner at ``die_origin_mm`` from the wafer centre. Die
``(col, row) = (0, 0)`` is the cell whose *lower* corner (smallest stage x and y) is that
corner; ``col`` grows with stage x and ``row`` with stage y (downwards in the mosaic). Each
cell is a die plus half a scribe lane on each side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import shapely
from shapely.geometry import Polygon


@dataclass(frozen=True)
class DieGrid:
    """A die grid in stage micrometres.

    Attributes
    ----------
    pitch_um : (float, float)
        Die pitch along x and y.
    origin_um : (float, float)
        Stage position of the lower corner (smallest x and y) of die ``(0, 0)``.
    """

    pitch_um: tuple[float, float]
    origin_um: tuple[float, float]

    @classmethod
    def from_sample(cls, sample: dict[str, Any]) -> DieGrid:
        """The grid of a wafer recipe's ``sample`` section (as stored in ``scan.json``)."""
        px, py = (float(v) * 1000.0 for v in sample["die_pitch_mm"])
        cx, cy = (float(v) for v in sample.get("center_um", (0.0, 0.0)))
        ox, oy = (float(v) * 1000.0 for v in sample.get("die_origin_mm", (0.0, 0.0)))
        return cls((px, py), (cx + ox, cy + oy))

    def index(self, x_um: float, y_um: float) -> tuple[int, int]:
        """``(col, row)`` of the die cell that contains a stage point."""
        return (math.floor((x_um - self.origin_um[0]) / self.pitch_um[0]),
                math.floor((y_um - self.origin_um[1]) / self.pitch_um[1]))

    def in_die(self, x_um: float, y_um: float) -> tuple[float, float]:
        """Position of a stage point inside its die cell, from the cell's lower corner (µm)."""
        col, row = self.index(x_um, y_um)
        x0, y0, _, _ = self.cell_box(col, row)
        return x_um - x0, y_um - y0

    def cell_box(self, col: int, row: int) -> tuple[float, float, float, float]:
        """``(xmin, ymin, xmax, ymax)`` of a die cell in stage µm."""
        x0 = self.origin_um[0] + col * self.pitch_um[0]
        y0 = self.origin_um[1] + row * self.pitch_um[1]
        return x0, y0, x0 + self.pitch_um[0], y0 + self.pitch_um[1]

    def cells_in(self, region: Polygon, min_fraction: float = 1e-6) -> list[tuple[int, int, bool]]:
        """Die cells that lie fully or partly inside a region.

        Parameters
        ----------
        region : shapely Polygon
            Usable area in stage µm (a wafer minus its edge exclusion).
        min_fraction : float
            Smallest fraction of a cell's area that must be inside for it to count (drops
            cells that only touch the region along an edge).

        Returns
        -------
        list of (col, row, full)
            Sorted by row then column; ``full`` is True when the whole cell is inside.
        """
        xmin, ymin, xmax, ymax = region.bounds
        c0, r0 = self.index(xmin, ymin)
        c1, r1 = self.index(xmax, ymax)
        rows, cols = np.mgrid[r0:r1 + 1, c0:c1 + 1]
        cols, rows = cols.ravel(), rows.ravel()
        x0 = self.origin_um[0] + cols * self.pitch_um[0]
        y0 = self.origin_um[1] + rows * self.pitch_um[1]
        cells = shapely.box(x0, y0, x0 + self.pitch_um[0], y0 + self.pitch_um[1])
        shapely.prepare(region)
        inside = shapely.area(shapely.intersection(cells, region)) / (
            self.pitch_um[0] * self.pitch_um[1])
        keep = inside > min_fraction
        return [(int(c), int(r), bool(f >= 1.0 - 1e-9))
                for c, r, f in zip(cols[keep], rows[keep], inside[keep], strict=True)]


def sample_grid(sample: Any) -> DieGrid | None:
    """The die grid a recipe's sample gives (None: none given; a wafer always has one).

    A wafer's grid is anchored at its centre; an image's at the stage position of its pixel
    (0, 0); a rectangle's at its lower corner (smallest x and y).
    """
    kind = getattr(sample, "kind", None)
    if kind == "wafer":
        return DieGrid.from_sample(sample.model_dump(mode="json"))
    pitch = getattr(sample, "die_pitch_mm", None)
    if pitch is None:
        return None
    if kind == "image":
        ref = sample.origin_um
    elif kind == "rectangle":
        ref = (sample.center_um[0] - sample.width_mm * 500.0,
               sample.center_um[1] - sample.height_mm * 500.0)
    else:
        return None
    ox, oy = (float(v) * 1000.0 for v in sample.die_origin_mm)
    return DieGrid((float(pitch[0]) * 1000.0, float(pitch[1]) * 1000.0),
                   (float(ref[0]) + ox, float(ref[1]) + oy))


#: an autocorrelation peak at the repeat's pitch must reach this share of the zero-lag value
MIN_REPEAT_CORRELATION = 0.5
#: and the layout must repeat at least this many times along each axis
MIN_REPEATS = 3


def estimate_grid(image: np.ndarray, pixel_um: float, origin_um: tuple[float, float],
                  valid: np.ndarray | None = None) -> DieGrid | None:
    """The repeat of a layout (a die grid) found in an image, or None when there is none.

    Parameters
    ----------
    image : ndarray (H, W)
        The mosaic, best a pyramid level of about 1k pixels a side (the pitch is refined to
        a fraction of its pixel).
    pixel_um : float
        Its pixel size.
    origin_um : tuple of float
        Stage ``(x, y)`` of its pixel ``(0, 0)`` (centre).
    valid : ndarray of bool, optional
        Pixels that show the sample (the rest, e.g. unscanned zeros, are left out).

    Notes
    -----
    The pitch along each axis is the first lag at which the image's normalised
    autocorrelation (computed by FFT over the valid pixels, each lag divided by its overlap)
    has a peak of at least :data:`MIN_REPEAT_CORRELATION` and whose double is also such a
    peak (a die grid repeats; an isolated echo does not), refined by a parabola through the
    peak. Written here because no library finds a lattice's period: skimage's
    ``phase_cross_correlation`` registers two images, it does not find one image's repeat.
    The grid's origin is put in the street: the cell position whose column (row) of the mean
    cell varies least across it.
    """
    img = np.asarray(image, dtype=np.float64)
    ok = np.isfinite(img) if valid is None else (np.asarray(valid, dtype=bool) & np.isfinite(img))
    if ok.sum() < 64 * 64:
        return None
    x = np.where(ok, img - img[ok].mean(), 0.0)
    w = ok.astype(np.float64)
    shape = tuple(2 * n for n in img.shape)
    fx, fw = np.fft.rfft2(x, shape), np.fft.rfft2(w, shape)
    ac = np.fft.irfft2(fx * np.conj(fx), shape)
    overlap = np.fft.irfft2(fw * np.conj(fw), shape)
    h, wd = img.shape
    ac = ac[:h, :wd] / np.maximum(overlap[:h, :wd], 1.0)
    if ac[0, 0] <= 0:
        return None
    ac /= ac[0, 0]
    pitch = []
    for axis, n in ((1, wd), (0, h)):
        profile = ac[0, : n // MIN_REPEATS + 1] if axis == 1 else ac[: n // MIN_REPEATS + 1, 0]
        lag = _first_repeat(profile)
        if lag is None:
            return None
        pitch.append(lag)
    px, py = pitch
    # the mean cell, folded at the pitch, and its quietest column and row: the street
    cols = np.round(np.arange(wd) % px).astype(int) % max(int(round(px)), 1)
    rows = np.round(np.arange(h) % py).astype(int) % max(int(round(py)), 1)
    nx, ny = int(cols.max()) + 1, int(rows.max()) + 1
    total = np.zeros((ny, nx))
    count = np.zeros((ny, nx))
    np.add.at(total, (rows[:, None], cols[None, :]), np.where(ok, img, 0.0))
    np.add.at(count, (rows[:, None], cols[None, :]), w)
    mean_cell = total / np.maximum(count, 1.0)
    cx = int(np.argmin(_smooth(mean_cell.std(axis=0))))
    cy = int(np.argmin(_smooth(mean_cell.std(axis=1))))
    ox = origin_um[0] - 0.5 * pixel_um + cx * pixel_um
    oy = origin_um[1] - 0.5 * pixel_um + cy * pixel_um
    return DieGrid((px * pixel_um, py * pixel_um), (ox, oy))


def _smooth(v: np.ndarray) -> np.ndarray:
    """A circular 3-tap mean (the mean cell's rows and columns wrap around)."""
    return (np.roll(v, 1) + v + np.roll(v, -1)) / 3.0


def _first_repeat(profile: np.ndarray) -> float | None:
    """The repeat's lag in an autocorrelation profile: of the strong peaks (at least
    :data:`MIN_REPEAT_CORRELATION`, and strong again at twice the lag), the first one within
    0.1 of the strongest (an exact repeat outscores the looser one of a motif inside the die;
    the die's multiples score as high as it does, and come later)."""
    n = len(profile)
    peaks = []
    for lag in range(4, n - 1):
        v = profile[lag]
        if v < MIN_REPEAT_CORRELATION or v < profile[lag - 1] or v < profile[lag + 1]:
            continue
        a, c = profile[lag - 1], profile[lag + 1]
        den = a - 2 * v + c
        sub = lag + (0.5 * (a - c) / den if den < 0 else 0.0)
        double = int(round(2 * sub))
        if double + 1 < n and profile[max(double - 1, 0) : double + 2].max() \
                < MIN_REPEAT_CORRELATION:
            continue
        peaks.append((float(sub), float(v)))
    if not peaks:
        return None
    best = max(v for _, v in peaks)
    return next(lag for lag, v in peaks if v >= best - 0.1)
