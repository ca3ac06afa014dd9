"""Pairwise registration of overlapping tiles by phase correlation on their overlap strips.

Why not ``skimage.registration.phase_cross_correlation`` alone: it takes the highest peak of the
whole correlation surface. On a periodic pattern (a die grid, PV fingers) every period gives a
peak nearly as high as the true one, and noise decides which wins. The stage's error model says
how far a tile can really be from where the stage reported it, so the integer peak is searched
only inside that window (here, by hand: no library restricts the search), which is what stops a
periodic pattern snapping to the wrong period. The sub-pixel residual (under a pixel once the
strips are re-cut at the integer shift) is then found by Gauss-Newton (Lucas-Kanade) on the
high-passed strips: measured on noisy band-limited strips it is accurate to ~0.01 px, where
scikit-image's upsampled phase correlation of the same (whitened, windowed) strips was off by
0.3-0.6 px, its equal weighting of all frequencies letting the noise decide.

Conventions: a tile's pixel ``(r, c)`` lies at ``(t_x + c, t_y + r)`` of a common camera-pixel
frame; the offset of a pair ``(a, b)`` is ``t_b - t_a`` as ``(dx, dy)`` pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage, signal

from scanner.subpixel import prepare_strip, refine_subpixel

__all__ = ["PairResult", "overlap_slices", "prepare_strip", "register_pair", "search_key",
           "texture_snr"]

#: Below this signal-to-noise ratio of its texture a strip is called blank.
_MIN_TEXTURE_SNR = 0.25
#: Pixels around the best peak excluded when looking for the second best (peak ratio).
_PEAK_EXCLUSION = 3
#: A best candidate whose overlap disagrees this many times less than the next peak's
#: (``1 - ncc``) is unambiguous, however close the two correlations' ratio: a texture that
#: nearly repeats (bricks, fingers, fabric) matches the wrong period at NCC 0.8 and the right
#: one at 0.997. Over 3,105 pairs of 64 simulated scans (wafers, PV cells, 20 photographs at
#: 0.65 and 1 um) with the stage's truth, the wrong peaks the ratio rejected disagreed at most
#: 2.2 times more than their best others; at 4, 418 right pairs more are used and no wrong one.
_MIN_DISAGREEMENT_RATIO = 4.0
#: A best peak within this fraction of the search window from the expected offset is where
#: the stage landed; peaks beyond :data:`_RIVAL_REACH` of it are then no rivals
#: (:func:`_plausible_rivals`).
_BEST_REACH = 1.0 / 3.0
_RIVAL_REACH = 2.0 / 3.0
#: ... for a best match at least this good: weaker ones (a silhouette's few edges, NCC
#: 0.65-0.77) were found 2.7 px off the truth with a far rival, which the ratio had refused
_PRIOR_NCC = 0.8
#: Exponent of the spectral whitening (1 = phase correlation, 0 = plain cross-correlation).
_WHITEN = 0.5
#: Fraction of a strip's length tapered by the apodization window.
_TAPER = 0.5
#: Below this ratio of the structure tensor's eigenvalues a strip is an edge (see _structure):
#: only the shift across the edge is measured.
_EDGE_ISOTROPY = 0.05
#: Below this ratio a strip whose rivals lie along its weak direction is measured as an edge
_WEAK_ISOTROPY = 0.25
#: Smoothing (pixels) before the structure tensor, so that pixel noise (isotropic) does not
#: pass a straight edge for texture.
_TENSOR_SIGMA = 1.5
#: Narrowest overlap (pixels) that is still registered.
_MIN_OVERLAP = 8


@dataclass(frozen=True)
class PairResult:
    """Measured offset of tile ``b`` relative to tile ``a`` and how far to trust it.

    Attributes
    ----------
    a, b : int
        Tile ids.
    dx, dy : float
        ``t_b - t_a`` in camera pixels (nan when nothing was measured).
    ncc : float
        Normalized cross-correlation of the high-passed overlaps after the shift (0 if none).
    peak_ratio : float
        Normalized cross-correlation of the best candidate shift in the search window over
        that of the second best (inf if there is only one).
    texture : float
        Signal-to-noise ratio of the overlap's texture (the lower of the two strips).
    ok : bool
        Whether the measurement is usable (textured, confident, unambiguous).
    info : (float, float, float)
        Shape of the measurement's information matrix ``(xx, xy, yy)`` in (x, y) pixel axes,
        scaled to a largest eigenvalue of 1: the identity for isotropic texture, ``v v^T``
        (``v`` the unit normal of the edge) for a strip whose only texture is one straight
        edge (a wafer rim, a scribe line), along which the shift is not measurable.
    """

    a: int
    b: int
    dx: float
    dy: float
    ncc: float
    peak_ratio: float
    texture: float
    ok: bool
    info: tuple[float, float, float] = (1.0, 0.0, 1.0)

    @property
    def is_edge(self) -> bool:
        """Only the direction across one edge is measured (rank-1 information)."""
        xx, xy, yy = self.info
        return xx * yy - xy * xy < 1e-9


def overlap_slices(
    offset: tuple[int, int], shape: tuple[int, int]
) -> tuple[tuple[slice, slice], tuple[slice, slice]] | None:
    """Slices of tiles ``a`` and ``b`` that see the same area for an integer offset.

    Parameters
    ----------
    offset : (int, int)
        ``(dy, dx)`` = ``t_b - t_a`` in pixels.
    shape : (int, int)
        Tile shape ``(rows, cols)`` (both tiles).

    Returns
    -------
    tuple or None
        ``(slices_a, slices_b)`` of equal shape, or None if the tiles do not overlap.
    """
    out_a, out_b = [], []
    for d, n in zip(offset, shape, strict=True):
        lo, hi = max(0, d), min(n, n + d)
        if hi - lo < 1:
            return None
        out_a.append(slice(lo, hi))
        out_b.append(slice(lo - d, hi - d))
    return (out_a[0], out_a[1]), (out_b[0], out_b[1])


def texture_snr(hp: np.ndarray) -> float:
    """Signal-to-noise ratio of a high-passed strip's texture.

    The noise is estimated from differences of neighbouring pixels (robust MAD), the signal is
    what is left of the variance once the noise is taken out. Camera noise differs the same
    along rows and columns, structure does not: the smaller of the two axes' estimates is the
    noise, so that a pattern fine along one axis (a grating of 6 px, PV fingers, metal lines:
    every neighbour along x differs by the lines' contrast) is not taken for noise and its
    strip for blank (its tiles were left where the stage landed, the lines broken at seams).
    """
    if hp.size < 16:
        return 0.0

    def scale(axis: int) -> float:
        d = np.diff(hp, axis=axis)
        if d.size > 8192:
            d = d.ravel()[:: d.size // 4096]  # a robust scale needs a few thousand samples
        return 1.4826 * float(np.median(np.abs(d - np.median(d)))) / math.sqrt(2.0)

    noise = min(scale(axis) for axis in (0, 1) if hp.shape[axis] > 1)
    var = float(hp.var())
    if noise <= 0:
        return math.inf if var > 0 else 0.0
    # the neighbour difference also sees fine texture; smoothing it out keeps a fair estimate
    signal2 = max(var - noise * noise, 0.0)
    return math.sqrt(signal2) / noise


def _tukey(n: int) -> np.ndarray:
    """Tukey (tapered cosine) window: flat middle keeps more of a narrow overlap than Hann."""
    return signal.windows.tukey(n, alpha=_TAPER).astype(np.float32)


def _window_candidates(
    a: np.ndarray, b: np.ndarray, centre: tuple[int, int], max_shift: tuple[float, float],
    count: int = 4,
) -> list[tuple[int, int]]:
    """The ``count`` best integer shifts ``(sy, sx)`` with ``b(r, c) ~ a(r + sy, c + sx)``.

    Only local maxima of the correlation inside the window ``centre +- max_shift`` count (the
    window narrowed to fewer shifts than the strip has samples, so that no two shifts of it
    alias to the same peak), at least ``_PEAK_EXCLUSION`` pixels apart, best first.
    """
    win = np.outer(_tukey(a.shape[0]), _tukey(a.shape[1]))
    fa = np.fft.rfft2(a * win)
    fb = np.fft.rfft2(b * win)
    cross = fa * np.conj(fb)
    # partial whitening (|F|^-WHITEN): full phase normalization lets the shared apodization
    # window and noise dominate where the texture is weak and pulls the peak to zero shift
    cross /= np.maximum(np.abs(cross), 1e-12) ** _WHITEN
    corr = np.fft.irfft2(cross, s=a.shape)
    rows, cols = corr.shape
    my = min(int(math.floor(max_shift[0])), (rows - 1) // 2)
    mx = min(int(math.floor(max_shift[1])), (cols - 1) // 2)
    ys = np.arange(centre[0] - my, centre[0] + my + 1)
    xs = np.arange(centre[1] - mx, centre[1] + mx + 1)
    sub = corr[np.ix_(ys % rows, xs % cols)]
    size = 2 * _PEAK_EXCLUSION + 1
    peaks = sub == ndimage.maximum_filter(sub, size=size, mode="constant", cval=-np.inf)
    iy, ix = np.nonzero(peaks)
    order = np.argsort(sub[iy, ix])[::-1][:count]
    # corr peaks at s where a(x) = b(x - s), i.e. b(r, c) = a(r + sy, c + sx)
    return [(int(ys[iy[k]]), int(xs[ix[k]])) for k in order]


def _structure(a: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Isotropy and shape of the gradient structure tensor of a (lightly smoothed) strip.

    The tensor ``sum(g g^T)`` is, up to the noise level, the information matrix of a
    Gauss-Newton shift estimate: its eigenvalues say how well the shift is measured along
    each eigenvector. The isotropy (smaller over larger eigenvalue) is near 0 when all the
    texture is one straight edge (a wafer's rim, a busbar, a scribe line): the shift along the
    edge is then not measurable (the aperture problem), whatever the correlation.

    Returns
    -------
    isotropy : float
    shape : ndarray
        ``(2, 2)`` tensor in (y, x) axes scaled to a largest eigenvalue of 1.
    normal : ndarray
        ``(y, x)`` unit eigenvector of the largest eigenvalue (across an edge).
    """
    gy, gx = np.gradient(ndimage.gaussian_filter(a.astype(np.float64), _TENSOR_SIGMA))
    t = np.array([[np.sum(gy * gy), np.sum(gy * gx)], [np.sum(gy * gx), np.sum(gx * gx)]])
    ev, vec = np.linalg.eigh(t)
    if ev[1] <= 0:
        return 0.0, np.zeros((2, 2)), np.array([1.0, 0.0])
    return float(ev[0] / ev[1]), t / ev[1], vec[:, 1]


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    den = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum()) / den if den > 0 else 0.0


def search_key(expected: tuple[float, float], max_shift_px: float) -> tuple[int, int, int, int]:
    """What :func:`register_pair` makes of ``expected`` and ``max_shift_px``: nothing else.

    The strips are cut at the rounded expected offset and the integer peak is searched in a
    window of whole pixels; the fractional parts of ``expected`` and ``max_shift_px`` play no
    other part. Two registrations of the same tiles with the same key (and the same other
    arguments) are therefore identical, which is what lets a pair measured during acquisition
    (with parameters estimated from the plan) stand for one measured afterwards.

    Returns
    -------
    (oy, ox, wy, wx) : int
        The cut ``(dy, dx)`` and the window's half-widths (pixels).
    """
    ex, ey = expected
    oy, ox = int(round(ey)), int(round(ex))
    return (oy, ox, int(math.floor(max_shift_px + abs(ey - oy))),
            int(math.floor(max_shift_px + abs(ex - ox))))


def register_pair(
    tile_a: np.ndarray,
    tile_b: np.ndarray,
    expected: tuple[float, float],
    max_shift_px: float,
    *,
    ids: tuple[int, int] = (0, 1),
    shape: tuple[int, int] | None = None,
    min_ncc: float = 0.3,
    min_peak_ratio: float = 1.5,
) -> PairResult:
    """Register two overlapping tiles.

    Parameters
    ----------
    tile_a, tile_b : array-like
        The two tiles (same shape), or anything sliced like them (a crop that holds the strips
        that can overlap, see ``shape``); only their overlap is read.
    expected : (float, float)
        Expected offset ``(dx, dy)`` = ``t_b - t_a`` in pixels, from the stage positions.
    max_shift_px : float
        Largest error of ``expected`` searched (each axis), from the stage's error model.
    ids : (int, int)
        Tile ids recorded in the result.
    shape : (int, int), optional
        Tile shape, when ``tile_a`` / ``tile_b`` are crops that do not know it.
    min_ncc : float
        Pairs with a lower normalized cross-correlation after the shift are not ``ok``.
    min_peak_ratio : float
        Pairs whose best candidate does not correlate this much better than the second are
        ambiguous (``ok`` False): a periodic pattern with more than one period in the window;
        unless the second's overlap disagrees :data:`_MIN_DISAGREEMENT_RATIO` times more than
        the best's (a texture that nearly repeats, matched to the noise at the best peak).

    Returns
    -------
    PairResult
    """
    a_id, b_id = ids
    shape = tuple(shape or tile_a.shape)
    # expected and max_shift_px enter through the search key alone (see search_key)
    oy, ox, wy, wx = search_key(expected, max_shift_px)
    window = (float(wy), float(wx))
    # strips cut at the expected offset (widening them by the window was tried: the true
    # overlap then sits at opposite ends of the two strips and the apodization window hides it)
    centre = (0, 0)
    cut = (oy - centre[0], ox - centre[1])
    nothing = PairResult(a_id, b_id, math.nan, math.nan, 0.0, 0.0, 0.0, False)
    sl = overlap_slices(cut, shape)
    if sl is None:
        return nothing
    (sa, sb) = sl
    ha = prepare_strip(tile_a[sa])
    hb = prepare_strip(tile_b[sb])
    texture = min(texture_snr(ha), texture_snr(hb))
    if texture < _MIN_TEXTURE_SNR:
        return PairResult(a_id, b_id, math.nan, math.nan, 0.0, 0.0, texture, False)

    scored = _scored_candidates(tile_a, tile_b, ha, hb, cut, centre, window, shape)
    if not scored:
        return PairResult(a_id, b_id, math.nan, math.nan, 0.0, 0.0, texture, False)
    return _measured_pair(tile_a, tile_b, scored, shape, ids, texture, min_ncc, min_peak_ratio,
                          (cut, window))


def _scored_candidates(tile_a: np.ndarray, tile_b: np.ndarray, ha: np.ndarray, hb: np.ndarray,
                       cut: tuple[int, int], centre: tuple[int, int],
                       window: tuple[float, float], shape: tuple[int, ...]) -> list[tuple]:
    """``(ncc, dy, dx, slices)`` of the candidate peaks in the window, best first (empty:
    none with an overlap wide enough)."""
    # each candidate peak is scored by the normalized cross-correlation of the overlap it
    # implies (cheap, at the integer shift); the best is refined, the second best says how
    # ambiguous the choice was
    scored = []
    for sy, sx in _window_candidates(ha, hb, centre, window):
        oy2, ox2 = cut[0] + sy, cut[1] + sx
        sl2 = overlap_slices((oy2, ox2), shape)
        if sl2 is None or min(s.stop - s.start for s in sl2[0]) < _MIN_OVERLAP:
            continue
        # scored on the part of the candidate's overlap that the strips already hold
        part = overlap_slices((sy, sx), ha.shape)
        if part is None or min(s.stop - s.start for s in part[0]) < _MIN_OVERLAP:
            continue
        scored.append((_ncc(ha[part[0]], hb[part[1]]), oy2, ox2, sl2))
    if not scored:
        return scored
    scored.sort(key=lambda c: c[0], reverse=True)
    # close calls (a weakly textured direction, a near-period) are re-scored on the whole
    # overlap each candidate implies, cut and high-passed anew
    close = [c for c in scored if c[0] >= 0.9 * scored[0][0]]
    if len(close) > 1:
        rescored = []
        for _, cy, cx, csl in close:
            pa, pb = prepare_strip(tile_a[csl[0]]), prepare_strip(tile_b[csl[1]])
            rescored.append((_ncc(pa, pb), cy, cx, csl))
        scored = sorted(rescored, key=lambda c: c[0], reverse=True) + scored[len(close):]
    return scored


def _measured_pair(tile_a: np.ndarray, tile_b: np.ndarray, scored: list[tuple],
                   shape: tuple[int, ...], ids: tuple[int, int], texture: float,
                   min_ncc: float, min_peak_ratio: float,
                   prior: tuple[tuple[int, int], tuple[float, float]]) -> PairResult:
    """The best candidate refined to a fraction of a pixel (across the edge only, on an edge
    strip) and judged by its correlation and its lead over the other peaks that the stage
    could have landed on (``prior``: the expected offset and the search window, see
    :func:`_plausible_rivals`)."""
    _, oy2, ox2, sl2 = scored[0]
    ha2 = prepare_strip(tile_a[sl2[0]])
    hb2 = prepare_strip(tile_b[sl2[1]])
    isotropy, tensor, normal = _structure(ha2)
    edge = isotropy < _EDGE_ISOTROPY
    direction = normal if edge else None
    fy, fx, aligned = _refine_from_peak(ha2, hb2, direction)
    # a refinement that moved far from its integer start (a weak correlation peak on a narrow
    # strip, most of whose true overlap the cut missed) is repeated on strips re-cut there
    for _ in range(2):
        if max(abs(fy), abs(fx)) <= 1.5:
            break
        sl3 = overlap_slices((oy2 + round(fy), ox2 + round(fx)), shape)
        if sl3 is None or min(s.stop - s.start for s in sl3[0]) < _MIN_OVERLAP:
            break
        try:
            ha3, hb3 = prepare_strip(tile_a[sl3[0]]), prepare_strip(tile_b[sl3[1]])
        except IndexError:  # beyond the strip kept of tile a: keep what was found
            break
        oy2, ox2, ha2, hb2 = oy2 + round(fy), ox2 + round(fx), ha3, hb3
        fy, fx, aligned = refine_subpixel(ha2, hb2, limit=2.0, direction=direction)
    m = 2
    ncc = _ncc(ha2[m:-m, m:-m], aligned[m:-m, m:-m]) if min(ha2.shape) > 2 * m + 2 else 0.0
    dy, dx = oy2 + fy, ox2 + fx
    rivals = _plausible_rivals(scored, dy, dx, *prior) if ncc >= _PRIOR_NCC else scored

    def lead(across_only: bool) -> tuple[float, bool]:
        """The best's lead over the rivals (their distance across the edge only, or in
        full) and whether it is unambiguous."""
        second = _second_peak(rivals, dy, dx, across_only, normal)
        ratio = max(ncc, scored[0][0]) / second if second > 0 else math.inf
        # the best's integer-shift correlation: the other peaks are scored at integer shifts
        clear = (1.0 - second) >= _MIN_DISAGREEMENT_RATIO * (1.0 - scored[0][0])
        return ratio, ratio >= min_peak_ratio or clear

    ratio, unambiguous = lead(edge)
    ok = ncc >= min_ncc and unambiguous
    if not ok and not edge and ncc >= min_ncc and isotropy < _WEAK_ISOTROPY:
        # texture strong across one direction, weak along the other (streets and die edges
        # that run along the strip, a little structure across): the rivals may lie along the
        # weak direction only, and then the shift across is still measured. Taken as an
        # edge's (across only): refused, the tiles of a sky-and-streets die grid at 0.5 um
        # kept their stage places in x, 4-8 px seams
        ratio, unambiguous = lead(True)
        edge = ok = unambiguous
    if edge:
        ny, nx = float(normal[0]), float(normal[1])
        info = (nx * nx, nx * ny, ny * ny)
    else:
        info = (float(tensor[1, 1]), float(tensor[0, 1]), float(tensor[0, 0]))
    return PairResult(ids[0], ids[1], dx, dy, ncc, ratio, texture, ok, info)


def _refine_from_peak(ha2: np.ndarray, hb2: np.ndarray, direction: np.ndarray | None
                      ) -> tuple[float, float, np.ndarray]:
    """Sub-pixel ``(fy, fx, aligned b strip)`` from the integer peak's strips."""
    # the integer peak is usually within a pixel: refine at full resolution first; when that
    # does not converge, coarse-to-fine blurred passes pull in a peak that is off by a few
    # pixels (a weak, broad correlation peak on a narrow overlap)
    fy, fx, aligned = refine_subpixel(ha2, hb2, limit=1.0, direction=direction)
    if (fy, fx) == (0.0, 0.0):
        f = (0.0, 0.0)
        for sigma in (4.0, 2.0):
            fy, fx, _ = refine_subpixel(ndimage.gaussian_filter(ha2, sigma),
                                        ndimage.gaussian_filter(hb2, sigma), start=f,
                                        limit=8.0, direction=direction, order=1)
            f = (fy, fx) if (fy, fx) != (0.0, 0.0) else f
        fy, fx, aligned = refine_subpixel(ha2, hb2, start=f, limit=8.0, direction=direction)
    return fy, fx, aligned


def _plausible_rivals(scored: list[tuple], dy: float, dx: float, expected: tuple[int, int],
                      window: tuple[float, float]) -> list[tuple]:
    """The candidates that may rival the best one, measured at ``(dy, dx)``.

    The search window spans 4.5 sigma of two tiles' landing difference (plus the step's
    error): a peak in its outer third lies 3 sigma or more from where the stage put the tile,
    a landing that rare. When the best lies within the window's inner third, such a far peak
    is no rival: on a faint pattern whose strips run along streets (a die grid at 10 %
    contrast, camera noise 1.5 %), every right pair matched at NCC 0.86-0.93 against a peak
    19-23 px off at 0.67-0.83 (window 19 px), and left a corner tile placed by the stage
    alone, 6 um off. A best peak far from the stage's place keeps every rival, and so does a
    weak best match (:data:`_PRIOR_NCC`).
    """
    def reach(c: tuple[float, ...]) -> float:
        return max(abs(c[0] - expected[0]) / max(window[0], 1.0),
                   abs(c[1] - expected[1]) / max(window[1], 1.0))

    if reach((dy, dx)) > _BEST_REACH:
        return scored
    return [scored[0]] + [c for c in scored[1:] if reach((c[1], c[2])) <= _RIVAL_REACH]


def _second_peak(scored: list[tuple], dy: float, dx: float, edge: bool, normal: np.ndarray
                 ) -> float:
    """The correlation of the best candidate other than the chosen peak (0: none)."""
    # candidates more than a couple of pixels away are other peaks (periods, noise); along an
    # edge every shift is as good, so only the distance across it counts
    def apart(c: tuple) -> float:
        d = np.array([c[1] - dy, c[2] - dx])
        return abs(float(d @ normal)) if edge else float(np.hypot(*d))

    others = [c[0] for c in scored[1:] if apart(c) > 2.5]
    return max(others) if others else 0.0
