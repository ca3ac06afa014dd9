"""Sharpness re-check of tiles taken at a focus map's predicted Z.

A tile's sharpness alone says little about its focus: it depends on what the field shows far
more than on a depth of field of defocus (the fine-band energy of in-focus wafer tiles spans a
factor of 8). Neighbouring tiles, however, overlap: the strip they share shows the same
content in both. The ratio of the strip's fine-detail energy in the two tiles is therefore a
content-free measure of how much blurrier one is than the other, and defocus blur adds in
quadrature, so

    ln(E_neighbour / E_tile) = c * (dz_tile**2 - dz_neighbour**2)     (dz in depths of field)

for the fine band (difference of Gaussians at 0.7 and 1.4 px) above its noise floor. The
constant ``c`` depends on the optics, the pixel size and the sample's spectrum: it is
calibrated per scan from the frames the autofocus took at the focus-map points, whose
defocus is known once the peak is found (``calibrate``). Each tile's squared defocus is then
estimated from its already-acquired neighbours (``estimate_defocus_sq``), starting from the
map's own prediction (0) and from re-measured tiles (0 by construction).

The check is only as good as its evidence: when the tolerated defocus changes the fine band
by less than 5 % (pixels much coarser than the optics resolve, little texture), ``calibrate``
says it cannot see it and the re-check stays off for that scan. During the scan a tile is
re-measured only when its estimated defocus exceeds the tolerance *and* its log ratio exceeds
3 sigma of the comparison noise, measured on the scan's own neighbour pairs (``PairNoise``):
sub-pixel sampling makes in-focus neighbours differ by ~4-10 % in fine detail.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from scipy import ndimage

from scanner.acquisition.focus.measures import estimate_noise_sigma

__all__ = [
    "BandEnergy",
    "RecheckCalibration",
    "band_energy",
    "calibrate",
    "estimate_defocus_sq",
    "log_ratio",
    "PairNoise",
    "strip_energies",
]

#: Difference-of-Gaussians band (px): blur removes it first, noise leaves it measurable.
FINE_SIGMAS = (0.7, 1.4)
#: A strip is usable when its band signal is at least this many times the noise's share.
MIN_SNR = 2.0
#: Smallest drop of ln(E) at the tolerance for the re-check to run (a 5 % change in detail).
MIN_DROP = 0.05
#: Pixels left out at a frame's border (the DoG reaches 4 sigma = 6 px) and at the strip's
#: inner edge (stage repeatability shifts the overlap by a pixel or two).
BORDER_PX = 6


@dataclass(frozen=True)
class BandEnergy:
    """Fine-band energy of an image region, normalised by its squared mean intensity.

    Attributes
    ----------
    signal : float
        Band energy minus what the noise alone contributes.
    noise : float
        The noise's share (known from the noise level and the filter).
    """

    signal: float
    noise: float

    @property
    def usable(self) -> bool:
        """True when the band holds detail clearly above noise."""
        return self.signal > MIN_SNR * self.noise and self.signal > 0


@lru_cache(maxsize=4)
def _noise_gain(s1: float, s2: float) -> float:
    """Sum of squares of the DoG kernel: band energy of unit white noise."""
    delta = np.zeros((41, 41), np.float64)
    delta[20, 20] = 1.0
    h = ndimage.gaussian_filter(delta, s1) - ndimage.gaussian_filter(delta, s2)
    return float(np.sum(h * h))


def _band(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image, dtype=np.float32)
    return ndimage.gaussian_filter(img, FINE_SIGMAS[0]) - ndimage.gaussian_filter(
        img, FINE_SIGMAS[1])


def _energy(img: np.ndarray, band: np.ndarray) -> BandEnergy:
    mean = float(np.mean(img, dtype=np.float64))
    if img.size == 0 or mean <= 1e-6 or min(img.shape) < 5:
        return BandEnergy(0.0, math.inf)
    sigma = estimate_noise_sigma(img)
    norm = mean * mean
    total = float(np.mean(band.astype(np.float64) ** 2)) / norm
    noise = sigma * sigma * _noise_gain(*FINE_SIGMAS) / norm
    return BandEnergy(total - noise, noise)


def _region_energy(img: np.ndarray, rows: slice, cols: slice) -> BandEnergy:
    """Band energy of ``img[rows, cols]``, filtering only that region plus a margin."""
    m = BORDER_PX
    r0, c0 = max(rows.start - m, 0), max(cols.start - m, 0)
    sub = img[r0 : rows.stop + m, c0 : cols.stop + m]
    band = _band(sub)
    inner = (slice(rows.start - r0, rows.stop - r0), slice(cols.start - c0, cols.stop - c0))
    return _energy(sub[inner], band[inner])


def band_energy(image: np.ndarray) -> BandEnergy:
    """Fine-band energy of a whole frame (borders excluded).

    Parameters
    ----------
    image : ndarray
        2-D frame.
    """
    b = BORDER_PX
    img = np.asarray(image, dtype=np.float32)
    return _energy(img[b:-b, b:-b], _band(img)[b:-b, b:-b])


def strip_energies(image: np.ndarray, overlap_px: tuple[int, int]) -> dict[str, BandEnergy]:
    """Fine-band energy of the four border strips a tile shares with its neighbours.

    Parameters
    ----------
    image : ndarray
        The tile.
    overlap_px : (int, int)
        Overlap with the neighbours along x (columns) and y (rows), in pixels.

    Returns
    -------
    dict
        ``"left"``, ``"right"`` (the strips shared with the tiles at -x and +x), ``"top"``,
        ``"bottom"`` (at -y and +y); a side whose strip is too narrow is missing.
    """
    img = np.asarray(image, dtype=np.float32)
    h, w = img.shape
    b = BORDER_PX
    ox, oy = (int(v) - 2 * b for v in overlap_px)
    out: dict[str, BandEnergy] = {}
    if ox >= 4:
        cols = {"left": slice(b, b + ox), "right": slice(w - b - ox, w - b)}
        for side, sl in cols.items():
            out[side] = _region_energy(img, slice(b, h - b), sl)
    if oy >= 4:
        rows = {"top": slice(b, b + oy), "bottom": slice(h - b - oy, h - b)}
        for side, sl in rows.items():
            out[side] = _region_energy(img, sl, slice(b, w - b))
    return out


@dataclass
class RecheckCalibration:
    """How the fine band falls with defocus on this scan, and whether that is usable.

    Attributes
    ----------
    c_per_dof2 : float
        ``-d ln(E) / d(dz**2)`` with dz in depths of field (median over the focus points).
    scatter : float
        Robust scatter of ln(E) about the fits (measurement noise of one comparison).
    n_points : int
        Focus points that gave a fit.
    enabled : bool
        Whether a defocus of ``tolerance_dof`` is visible above the scatter.
    reason : str
        Why it is off, or ``"ok"``.
    tolerance_dof : float
        Defocus (depths of field) beyond which a tile is re-measured.
    """

    c_per_dof2: float = math.nan
    scatter: float = math.nan
    n_points: int = 0
    enabled: bool = False
    reason: str = "not calibrated"
    tolerance_dof: float = 0.75
    fits: list[dict[str, float]] = field(default_factory=list)

    @property
    def ratio_threshold(self) -> float:
        """Sharpness ratio (tile / in-focus neighbour) below which a tile is re-measured."""
        return math.exp(-self.c_per_dof2 * self.tolerance_dof**2)

    def to_dict(self) -> dict[str, object]:
        """For ``focus_map.json``."""
        return {"enabled": self.enabled, "reason": self.reason,
                "tolerance_dof": self.tolerance_dof, "c_per_dof2": self.c_per_dof2,
                "ratio_threshold": self.ratio_threshold if self.enabled else None,
                "scatter": self.scatter, "n_points": self.n_points}


def calibrate(
    sweeps: list[list[tuple[float, BandEnergy]]],
    tolerance_dof: float = 0.75,
    max_dz_dof: float = 3.0,
) -> RecheckCalibration:
    """Fit ``ln E = a - c dz**2`` to the autofocus frames of each focus point.

    Parameters
    ----------
    sweeps : list of list of (dz_dof, BandEnergy)
        For each focus point whose autofocus succeeded, every frame's defocus relative to the
        found focus (depths of field) and its fine-band energy.
    tolerance_dof : float
        Defocus that the re-check must see.
    max_dz_dof : float
        Frames further from focus are left out (the band is gone, the model does not hold).

    Returns
    -------
    RecheckCalibration
        ``enabled`` when ``c * tolerance**2`` is at least ``MIN_DROP``. Whether a tile's
        drop is significant is judged during the scan against the noise of the neighbour
        comparisons themselves (``PairNoise``), which the focus points cannot show.
    """
    cal = RecheckCalibration(tolerance_dof=tolerance_dof)
    cs, resid = [], []
    for sweep in sweeps:
        pts = [(dz * dz, math.log(e.signal)) for dz, e in sweep
               if abs(dz) <= max_dz_dof and e.usable]
        if len(pts) < 3:
            continue
        x, y = np.array(pts).T
        if np.ptp(x) < 0.5:  # frames too close together in dz**2 to see a slope
            continue
        slope, icept = np.polyfit(x, y, 1)
        cs.append(-float(slope))
        resid.extend((y - (icept + slope * x)).tolist())
        cal.fits.append({"c_per_dof2": -float(slope), "n_frames": len(pts)})
    cal.n_points = len(cs)
    if len(cs) < 3:
        cal.reason = f"only {len(cs)} focus points with enough texture to calibrate"
        return cal
    cal.c_per_dof2 = float(np.median(cs))
    # residuals of 3-frame fits are shrunk by the 2 fitted parameters: scale them back
    r = np.abs(np.array(resid))
    cal.scatter = float(1.4826 * np.median(r) * math.sqrt(3.0)) if r.size else math.nan
    drop = cal.c_per_dof2 * tolerance_dof**2
    if not drop >= MIN_DROP:
        cal.reason = (f"a defocus of {tolerance_dof:g} DOF changes the fine detail by only "
                      f"{100 * (1 - math.exp(-drop)):.1f} % (pixels coarser than the optics "
                      "resolve, or too little texture)")
        return cal
    cal.enabled, cal.reason = True, "ok"
    return cal


def estimate_defocus_sq(
    pairs: list[tuple[BandEnergy, BandEnergy, float]], c_per_dof2: float,
    noise: float = 0.0,
) -> float | None:
    """A tile's squared defocus (DOF**2) from the strips it shares with acquired neighbours.

    Parameters
    ----------
    pairs : list of (tile strip, neighbour strip, neighbour's squared defocus)
        One entry per acquired neighbour.
    c_per_dof2 : float
        From ``calibrate``.
    noise : float
        Scatter of ``ln(E_neighbour / E_tile)`` between in-focus neighbours (sub-pixel
        sampling of fine detail differs from tile to tile). A neighbour's own estimate is
        carried over only when it exceeds twice that scatter, so that noise does not
        accumulate along the scan.

    Returns
    -------
    float or None
        The median over the neighbours whose shared strip has detail in the neighbour, at
        least 0; None when no neighbour's strip has detail (nothing to compare: a featureless
        region never triggers a re-measure). Detail that the neighbour shows and the tile has
        lost to blur counts as a quarter of the tile's noise share: a large, finite defocus.
    """
    carry = 2.0 * noise / c_per_dof2
    est = [(nb_dz2 if nb_dz2 > carry else 0.0)
           + log_ratio(tile, nb) / c_per_dof2 for tile, nb, nb_dz2 in pairs if nb.usable]
    if not est:
        return None
    return max(float(np.median(est)), 0.0)


def log_ratio(tile: BandEnergy, neighbour: BandEnergy) -> float:
    """``ln(E_neighbour / E_tile)``: how much fine detail the tile lost against its neighbour."""
    return math.log(neighbour.signal / max(tile.signal, 0.25 * tile.noise, 1e-30))


class PairNoise:
    """Running robust scatter of ``ln(E_neighbour / E_tile)`` over the scan's neighbour pairs.

    Most neighbours are in focus, so the median absolute log ratio measures the comparison's
    own noise (sub-pixel sampling, stage repeatability, shot noise); defocused pairs are the
    tail. Until ``min_pairs`` are seen, ``prior`` stands in.
    """

    def __init__(self, prior: float, min_pairs: int = 12) -> None:
        self.prior = prior
        self.min_pairs = min_pairs
        self.values: list[float] = []

    def add(self, value: float) -> None:
        """Record one pair's log ratio."""
        self.values.append(abs(value))

    @property
    def sigma(self) -> float:
        """Robust standard deviation (1.4826 x median absolute value)."""
        if len(self.values) < self.min_pairs:
            return self.prior
        return float(1.4826 * np.median(self.values))
