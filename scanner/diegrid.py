"""The recipe's die grid in stage coordinates, and which dies a wafer scan tested.

Convention (the same as the simulator's, ``simulators/samples/wafer.py``): the grid has pitch
``die_pitch_mm`` and a die-cell corner at ``die_origin_mm`` from the wafer centre. Die
``(col, row) = (0, 0)`` is the cell whose *lower* corner (smallest stage x and y) is that
corner; ``col`` grows with stage x and ``row`` with stage y (downwards in the mosaic). Each
cell is a die plus half a scribe lane on each side.

A wafer that lies turned on the chuck (``scanner.acquisition.align``) turns its grid too:
``rotation_deg`` turns the grid's axes about die (0, 0)'s corner (from +x towards +y), so ``col``
and ``row`` count along the wafer's own axes; the grid stays in stage micrometres.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import shapely
from shapely.geometry import Polygon

#: dies smaller than this (mosaic pixels a side) are not compared die to die (here, in the
#: core, so that a recipe's plan is checked against the same value inspection applies)
MIN_DIE_PX = 32


@dataclass(frozen=True)
class DieGrid:
    """A die grid in stage micrometres.

    Attributes
    ----------
    pitch_um : (float, float)
        Die pitch along x and y.
    origin_um : (float, float)
        Stage position of the lower corner (smallest x and y) of die ``(0, 0)``.
    rotation_deg : float
        Turn of the grid's axes against the stage's (from +x towards +y).
    precision_um : float
        How far the cells may lie off: 0 for a recipe's or an alignment's grid, a few pixels
        of the image it was found in (:func:`estimate_grid`). A cell that overhangs a region by
        no more is whole in it (:meth:`cells_in`): a 2 x 2 layout found 0.15 um too wide a
        pitch at 2.6 um pixels had its second dies overhang the image by 0.3 um, and none
        was compared.
    """

    pitch_um: tuple[float, float]
    origin_um: tuple[float, float]
    rotation_deg: float = 0.0
    precision_um: float = 0.0
    #: axes ``(x, y)`` along which the layout does not change at all (a grating's lines, found
    #: in an image: :func:`estimate_grid`); their pitch is the image's extent
    uniform_axes: tuple[bool, bool] = (False, False)

    @classmethod
    def from_sample(cls, sample: dict[str, Any],
                    alignment: dict[str, Any] | None = None) -> DieGrid:
        """The grid of a wafer recipe's ``sample`` section (as stored in ``scan.json``).

        With a measured ``alignment`` (``scan.json``'s record, :mod:`scanner.acquisition.align`) the
        grid is the one the alignment found on the stage: its die sites' where they were
        measured, else the recipe's grid laid on the measured centre and turned with the wafer
        (a wafer too small for two die sites far apart, or without die-to-die: the recipe's
        grid at the nominal centre put a wafer placed 0.4 mm off and 0.38 deg turned 0.25-0.44
        mm off in every die position reported).
        """
        if alignment and alignment.get("die_grid"):
            g = alignment["die_grid"]
            return cls(tuple(g["pitch_um"]), tuple(g["origin_um"]),  # type: ignore[arg-type]
                       float(g.get("rotation_deg", 0.0)))
        px, py = (float(v) * 1000.0 for v in sample["die_pitch_mm"])
        cx, cy = (float(v) for v in sample.get("center_um", (0.0, 0.0)))
        ox, oy = (float(v) * 1000.0 for v in sample.get("die_origin_mm", (0.0, 0.0)))
        if alignment and alignment.get("center_um") is not None:
            cx, cy = (float(v) for v in alignment["center_um"])
            turn = float(alignment.get("rotation_deg") or 0.0)
            c, s = math.cos(math.radians(turn)), math.sin(math.radians(turn))
            return cls((px, py), (cx + c * ox - s * oy, cy + s * ox + c * oy), turn)
        return cls((px, py), (cx + ox, cy + oy))

    def _axes(self) -> tuple[float, float]:
        th = math.radians(self.rotation_deg)
        return math.cos(th), math.sin(th)

    def to_grid(self, x_um: float, y_um: float) -> tuple[float, float]:
        """A stage point in the grid's frame: µm from die (0, 0)'s corner along its axes."""
        c, s = self._axes()
        dx, dy = x_um - self.origin_um[0], y_um - self.origin_um[1]
        return c * dx + s * dy, -s * dx + c * dy

    def to_stage(self, u_um: float, v_um: float) -> tuple[float, float]:
        """A point of the grid's frame on the stage."""
        c, s = self._axes()
        return self.origin_um[0] + c * u_um - s * v_um, self.origin_um[1] + s * u_um + c * v_um

    def index(self, x_um: float, y_um: float) -> tuple[int, int]:
        """``(col, row)`` of the die cell that contains a stage point."""
        u, v = self.to_grid(x_um, y_um)
        return math.floor(u / self.pitch_um[0]), math.floor(v / self.pitch_um[1])

    def in_die(self, x_um: float, y_um: float) -> tuple[float, float]:
        """Position of a stage point inside its die cell, from the cell's lower corner (µm),
        along the grid's axes."""
        u, v = self.to_grid(x_um, y_um)
        col, row = math.floor(u / self.pitch_um[0]), math.floor(v / self.pitch_um[1])
        return u - col * self.pitch_um[0], v - row * self.pitch_um[1]

    def corner(self, col: int, row: int) -> tuple[float, float]:
        """Stage position of a die cell's lower corner (its corner nearest die (0, 0)'s)."""
        return self.to_stage(col * self.pitch_um[0], row * self.pitch_um[1])

    def cell_box(self, col: int, row: int) -> tuple[float, float, float, float]:
        """``(xmin, ymin, xmax, ymax)`` of a die cell in stage µm.

        On a turned grid: the pitch-sized, stage-aligned box at the cell's lower corner (the
        window die-to-die comparison cuts; :meth:`cell_polygon` is the cell itself).
        """
        x0, y0 = self.corner(col, row)
        return x0, y0, x0 + self.pitch_um[0], y0 + self.pitch_um[1]

    def cell_polygon(self, col: int, row: int) -> Polygon:
        """A die cell's outline in stage µm."""
        px, py = self.pitch_um
        return Polygon([self.corner(col, row), self.to_stage((col + 1) * px, row * py),
                        self.to_stage((col + 1) * px, (row + 1) * py),
                        self.to_stage(col * px, (row + 1) * py)])

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
        idx = np.array([self.index(x, y) for x in (xmin, xmax) for y in (ymin, ymax)])
        c0, r0 = idx.min(axis=0)
        c1, r1 = idx.max(axis=0)
        rows, cols = np.mgrid[r0:r1 + 1, c0:c1 + 1]
        cols, rows = cols.ravel(), rows.ravel()
        px, py = self.pitch_um
        c, s = self._axes()
        # the four corners of every cell, turned with the grid
        u = np.stack([cols, cols + 1, cols + 1, cols], axis=1) * px
        v = np.stack([rows, rows, rows + 1, rows + 1], axis=1) * py
        xs = self.origin_um[0] + c * u - s * v
        ys = self.origin_um[1] + s * u + c * v
        cells = shapely.polygons(np.stack([xs, ys], axis=-1))
        shapely.prepare(region)
        area = self.pitch_um[0] * self.pitch_um[1]
        inside = shapely.area(shapely.intersection(cells, region)) / area
        whole = inside
        if self.precision_um > 0:
            grown = region.buffer(self.precision_um, join_style="mitre")
            whole = shapely.area(shapely.intersection(cells, grown)) / area
        keep = inside > min_fraction
        return [(int(c), int(r), bool(f >= 1.0 - 1e-9))
                for c, r, f in zip(cols[keep], rows[keep], whole[keep], strict=True)]


def sample_grid(sample: Any, alignment: dict[str, Any] | None = None) -> DieGrid | None:
    """The die grid a recipe's sample gives (None: none given; a wafer always has one).

    A wafer's grid is anchored at its centre (the measured one with an ``alignment``, and
    turned with it); an image's at the stage position of its pixel (0, 0); a rectangle's at
    its lower corner (smallest x and y).
    """
    kind = getattr(sample, "kind", None)
    if kind == "wafer":
        return DieGrid.from_sample(sample.model_dump(mode="json"), alignment)
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
#: ... or, repeated only twice along an axis (a 2 x 2 layout: its double lies outside the
#: image, so nothing confirms it), its peak must reach this: an exact copy scores about 0.99
#: (a mirrored brick texture tiled 2 x 2 through the simulated microscope), the echoes of a
#: natural texture or an unrelated motif 0.2-0.7
MIN_TWICE_CORRELATION = 0.85
#: an axis along which the autocorrelation stays at least this at every lag is one the layout
#: does not change along (a grating's lines): a repeat along the other axis alone is a layout
UNIFORM_CORRELATION = 0.9
#: largest turn of a found layout (degrees): a part placed by hand
MAX_GRID_ROTATION_DEG = 5.0
#: a found turn that moves the image's far side by less than this (pixels of the level
#: searched) is no turn: an axis-aligned layout keeps its axes
ROTATION_RESOLUTION_PX = 1.0
#: how far past half the image's extent a repeat is looked for (pixels; at least, else 1 % of
#: the extent): two repeats that fit but for the rounding of the image's edges
REPEAT_SLACK_PX = 2
#: a column (row) of the mean cell that varies at most this fraction of what the median one
#: does is a street (a die grid's; a texture has none)
STREET_VARIATION = 0.2


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
    cell varies least across it. A layout turned against the image (a part placed by hand,
    up to :data:`MAX_GRID_ROTATION_DEG`) has its repeat off the axes: where the axis shows
    none, the largest autocorrelation across a band around it is taken, and the repeat's
    cross lag gives the grid's turn; the mean cell is then folded along the layout's axes.
    An axis-aligned layout keeps ``rotation_deg`` 0 (:data:`ROTATION_RESOLUTION_PX`).
    """
    img = np.asarray(image, dtype=np.float64)
    ok = np.isfinite(img) if valid is None else (np.asarray(valid, dtype=bool) & np.isfinite(img))
    if ok.sum() < 64 * 64:
        return None
    x = np.where(ok, img - img[ok].mean(), 0.0)
    w = ok.astype(np.float64)
    shape = tuple(2 * n for n in img.shape)
    fx, fw = np.fft.rfft2(x, shape), np.fft.rfft2(w, shape)
    # circular over twice the image: index -k holds the lag -k
    ac = np.fft.irfft2(fx * np.conj(fx), shape)
    ac /= np.maximum(np.fft.irfft2(fw * np.conj(fw), shape), 1.0)
    if ac[0, 0] <= 0:
        return None
    ac /= ac[0, 0]
    h, wd = img.shape
    # the extent of the valid pixels along each axis: what the repeats must fit in
    rows_ok, cols_ok = np.nonzero(ok.any(axis=1))[0], np.nonzero(ok.any(axis=0))[0]
    span = {1: (int(cols_ok[0]), int(cols_ok[-1]) + 1), 0: (int(rows_ok[0]), int(rows_ok[-1]) + 1)}
    vectors = []
    uniform = {1: False, 0: False}
    for axis in (1, 0):
        n = span[axis][1] - span[axis][0]
        # up to half the extent (two repeats), a little beyond, and one lag more to see that
        # it peaks: a layout of exactly two repeats spans a pixel or two less than twice its
        # pitch at this pyramid level as often as not (a 2 x 2 layout scanned at 0.65 um: its
        # 787 px against a pitch of 393.9 px; no grid, no die-to-die, 7 of 22 defects found)
        reach = (n + _slack_px(n)) // 2 + 2
        a = ac if axis == 1 else ac.T  # lags along axis 1
        if float(a[0, 1:reach].min()) >= UNIFORM_CORRELATION:
            # nothing changes along this axis (a grating's lines): one cell spans the image
            uniform[axis] = True
            vectors.append((float(n), 0.0))
            continue
        lag = _first_repeat(a[0, :reach], n)
        if lag is None:  # a turned layout: its repeat lies off the image's axis
            lag = _first_repeat(_turned_profile(a, reach), n)
            if lag is None:
                return None
        vectors.append((lag, _across(a, lag)))
    if uniform[0] and uniform[1]:
        return None  # a plain (or smoothly shaded) image: no layout
    (lx, dyx), (ly, dxy) = vectors
    # the layout's turn: the x repeat runs towards +y by dyx, the y repeat towards -x by dxy
    theta = 0.5 * (math.atan2(dyx, lx) - math.atan2(dxy, ly))
    if abs(theta) * max(h, wd) < ROTATION_RESOLUTION_PX or uniform[0] or uniform[1]:
        # (a grating uniform along an image axis lies along it)
        theta = 0.0  # not told from an axis-aligned layout at this level: none
    px, py = (math.hypot(lx, dyx), math.hypot(ly, dxy)) if theta else (lx, ly)
    c, s_ = math.cos(theta), math.sin(theta)
    # the mean cell, folded at the pitch along the layout's own axes, and its quietest column
    # and row: the street
    yy, xx = np.mgrid[0:h, 0:wd]
    u, v = (xx, yy) if not theta else (c * xx + s_ * yy, -s_ * xx + c * yy)
    cols = np.round(u % px).astype(int) % max(int(round(px)), 1)
    rows = np.round(v % py).astype(int) % max(int(round(py)), 1)
    nx, ny = int(cols.max()) + 1, int(rows.max()) + 1
    total = np.zeros((ny, nx))
    count = np.zeros((ny, nx))
    np.add.at(total, (rows, cols), np.where(ok, img, 0.0))
    np.add.at(count, (rows, cols), w)
    mean_cell = total / np.maximum(count, 1.0)
    if theta:  # the valid extent along the layout's axes
        span = {1: (int(np.floor(u[ok].min())), int(np.ceil(u[ok].max())) + 1),
                0: (int(np.floor(v[ok].min())), int(np.ceil(v[ok].max())) + 1)}
    cu = _cell_start(_smooth(mean_cell.std(axis=0)), px, span[1])
    cv = _cell_start(_smooth(mean_cell.std(axis=1)), py, span[0])
    cx, cy = c * cu - s_ * cv, s_ * cu + c * cv  # die (0, 0)'s corner, image pixels
    ox = origin_um[0] - 0.5 * pixel_um + cx * pixel_um
    oy = origin_um[1] - 0.5 * pixel_um + cy * pixel_um
    # cells may overhang the image by a pixel and the slack (see _cell_start)
    slack = 1 + _slack_px(max(span[0][1] - span[0][0], span[1][1] - span[1][0]))
    return DieGrid((px * pixel_um, py * pixel_um), (ox, oy), math.degrees(theta),
                   precision_um=slack * pixel_um, uniform_axes=(uniform[1], uniform[0]))


def _band(lag: int) -> int:
    """Cross lags searched on either side at ``lag``: the layout turned up to
    :data:`MAX_GRID_ROTATION_DEG`."""
    return int(math.tan(math.radians(MAX_GRID_ROTATION_DEG)) * lag) + 1


def _turned_profile(ac: np.ndarray, reach: int) -> np.ndarray:
    """The autocorrelation along axis 1 of ``ac``, each lag's largest within
    :func:`_band` of the axis.

    A part placed by hand lies turned a degree or two: its die grid's repeat is then off the
    image's axes by the pitch's sine (9 px at 2 degrees of a 256 px pitch), where the
    autocorrelation along the axis has no peak; a coin die grid turned 2 degrees had no grid.
    """
    out = ac[0, :reach].copy()
    for lag in range(1, reach):
        k = _band(lag)
        out[lag] = max(ac[-k:, lag].max(), ac[:k + 1, lag].max())
    return out


def _across(ac: np.ndarray, lag: float) -> float:
    """The cross lag (along axis 0 of ``ac``) of the repeat at ``lag``: its peak within
    :func:`_band`, to a fraction of a pixel (a parabola)."""
    i = int(round(lag))
    k = _band(i)
    band = np.concatenate([ac[-k:, i], ac[:k + 1, i]])  # cross lags -k .. k
    j = int(np.argmax(band))
    if j == 0 or j == len(band) - 1:
        return 0.0  # no peak inside the band
    a, b, c = band[j - 1], band[j], band[j + 1]
    den = a - 2 * b + c
    return j - k + (0.5 * (a - c) / den if den < 0 else 0.0)


def _cell_start(variation: np.ndarray, pitch: float, span: tuple[int, int]) -> int:
    """Where a cell starts (pixel, modulo the pitch): the quietest column (row) of the mean
    cell, the street, among the starts that fit the most whole cells into ``span``.

    A die grid's street gives both at once, and where it does not (a surround scanned
    beside the dies), the street comes first. A texture has no street, and its quietest
    column is anywhere: a start that leaves the repeats cut at both ends of the image would
    leave no whole cell to compare (a 2 x 2 layout), so the whole cells come first.
    """
    starts = np.arange(len(variation))
    street = variation <= STREET_VARIATION * np.median(variation)
    if street.any():
        # a die grid's cells start in its street even where another start fits one more
        # whole cell: a grid in a surround whose scan spanned 8.04 pitches had its cells cut
        # through every die (a camera-photo grid turned 0.3 deg: 2 of 22 defects found)
        # (a pixel either side of it too: the 3-tap smoothing lifts a narrow street's edges)
        starts = starts[street | np.roll(street, 1) | np.roll(street, -1)]
    a, b = span
    first = a + (starts - a) % pitch  # the first cell start at or after the span's start
    # a cell may overhang the span by a pixel (the pitch is measured to a fraction of one),
    # or by as much as a repeat is looked for past half the span (see estimate_grid)
    whole = np.floor((b - first + 1) / pitch).astype(int)
    loose = np.floor((b - first + 1 + _slack_px(b - a)) / pitch).astype(int)
    if loose.max() > whole.max():
        # the repeats fit only with the slack (the image a pixel or two short of them): the
        # cells start where the image does, overhanging its far end the least
        fit = loose == loose.max()
        return int(starts[fit][np.argmin(first[fit])])
    candidates = starts[whole == whole.max()]
    return int(candidates[np.argmin(variation[candidates])])


def _slack_px(extent: int) -> int:
    """How far past two whole repeats an image of ``extent`` pixels may fall short."""
    return max(REPEAT_SLACK_PX, extent // 100)


def _smooth(v: np.ndarray) -> np.ndarray:
    """A circular 3-tap mean (the mean cell's rows and columns wrap around)."""
    return (np.roll(v, 1) + v + np.roll(v, -1)) / 3.0


def _first_repeat(profile: np.ndarray, extent: int) -> float | None:
    """The repeat's lag in an autocorrelation profile over ``extent`` valid pixels: of the
    strong peaks (at least :data:`MIN_REPEAT_CORRELATION` and strong again at twice the lag
    where :data:`MIN_REPEATS` fit, else at least :data:`MIN_TWICE_CORRELATION`), the first one
    within 0.1 of the strongest (an exact repeat outscores the looser one of a motif inside
    the die; the die's multiples score as high as it does, and come later)."""
    n = len(profile)
    peaks = []
    for lag in range(4, n - 1):
        v = profile[lag]
        if v < MIN_REPEAT_CORRELATION or v < profile[lag - 1] or v < profile[lag + 1]:
            continue
        if lag * MIN_REPEATS > extent and v < MIN_TWICE_CORRELATION:
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
