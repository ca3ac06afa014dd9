"""Golden-image comparison: a scan of a design that does not repeat, against its good image.

Die-to-die (:mod:`scanner.inspection.dietodie`) judges a die by its neighbours. A design with no
repeat (one large chip, a photograph, a board) has no neighbours, and a memory bank built from
its one good image has seen its centre only in a held-out quarter: the threshold that quarter
sets stands above the defects of a copy (a moon photograph: 0 of 22 found). Its good image, kept
in the model (:func:`models.build.build_detector`), is its reference instead, as a golden die
is a fab's reference for a die with no neighbour:

1. **Registration**: the golden image is placed on the mosaic by phase correlation at about
   512 px a side, then refined to 0.1 px on a central crop at full resolution
   (:func:`scanner.inspection.dietodie_maths.block_shift`). A scan that does not show the
   design (correlation under :data:`MIN_CORRELATION`) is not compared.
2. **Shading**: a scan's flat-field leaves a few per cent of smooth gain that a golden image
   lacks; the test is divided by the median ratio test / golden over blocks of
   :data:`GAIN_BLOCK_PX`, smoothed (a stain of tens of pixels does not move a block median).
3. **Difference**: at each of die-to-die's scales, how far the smoothed test lies outside the
   envelope of the smoothed golden over +-``tolerance_px`` (blur and a pixel of stitching
   error stay inside it), over the noise: the robust spread of test minus golden over the
   block, with die-to-die's allowance for a sampling phase at peaks and valleys.

The z-scores go onto the anomaly map as die-to-die's do (:func:`scanner.inspection.dietodie_maps.
map_patch`), with their ``compared`` and ``repeated`` masks (where the scan shows the golden
design, the network's novelty is design, not a defect) and a ``difference`` reader for the
defects' measurement, so :mod:`scanner.inspection.defects` treats both alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from scipy import ndimage

from scanner.inspection.dietodie import DieToDie
from scanner.inspection.dietodie_geometry import MosaicGrid, _read
from scanner.inspection.dietodie_maps import (
    Patch,
    apply_patches,
    map_patch,
    repeated_mask,
    z_to_score,
)
from scanner.inspection.dietodie_maths import (
    TEXTURE_MIN_SPREAD,
    TEXTURE_TOLERANCE_PX,
    _mean_pool,
    block_shift,
    texture_energy,
)
from scanner.inspection.maps import grid_pixel_um

#: the kinds of sample a golden image stands for (None: image files, mosaics of unknown
#: samples); every wafer, PV cell or coupon shows grains, haze or texture of its own
GOLDEN_KINDS = ("image", None)
#: what the maps' record calls this comparison (``reference``)
GOLDEN = "golden image"
#: side (px) of the pyramid level the golden image is first placed in
COARSE_PX = 512
#: side (px) of the central crop the placement is refined on
FINE_PX = 1024
#: the golden image and the scan must agree at least this well once placed (Pearson r at the
#: coarse level) to be compared: a scan of another design is left to the model
MIN_CORRELATION = 0.5
#: side (px) of the crops a golden image's turn on the scan is measured with (:func:`_turned`)
TURN_CROP_PX = 256
#: largest turn looked for (degrees): a part placed by hand
MAX_TURN_DEG = 5.0
#: a turn that moves the golden image's far corner by less than this (px) is none
TURN_RESOLUTION_PX = 0.5
#: a crop found farther (px) from where the fitted turn puts it is left out
TURN_MAX_RESIDUAL_PX = 1.5
#: side (px) of the blocks whose median ratio test / golden is the scan's shading
GAIN_BLOCK_PX = 64
#: side (px) of the blocks compared at a time (bounds memory)
BLOCK_PX = 1024
#: least side (px) of the window a defect's difference image is compared in
DIFFERENCE_PX = 256
#: local misalignment tolerated after placement (px): a scan's stitching errors on featureless
#: ground reach a pixel or two
TOLERANCE_PX = 3
#: the difference in sampling phase tolerated (px; see :data:`scanner.inspection.dietodie_maths.
#: PHASE_TOLERANCE_PX`). Die-to-die's references sample a feature at several phases, and
#: their envelope spans them; one golden scan samples it at one
#: (two good scans of three photographs, one the golden image, differed by up to z 8 at
#: thin bright lines with 0.3, and 0.7 gained little over 0.5)
GOLDEN_PHASE_PX = 0.5
#: pixels along the golden image's border left out of the comparison
EDGE_PX = 2 * TOLERANCE_PX
#: z-score that counts as a defect, against a golden image file or a golden scan alike:
#: 1.5 times the worst a second good scan reaches (as die-to-die calibrates its threshold on a
#: good scan), not under die-to-die's floor (7). Second good scans of five photographs that do
#: not repeat (moon, camera, astronaut, coffee, Hubble deep field; products bench, z as
#: inspection computes it, in blocks of BLOCK_PX, after the pair opening) reach 2.9-4.4
#: against the photograph and 2.4-3.7 against a first good scan: 7 for both. A golden scan
#: needed 11 while tiles were resampled bilinearly (each as sharp as its position's fraction
#: of a pixel allowed: 4.2-7.5) and its surround was compared too (the chuck's quiet
#: difference lowered the spread: the same scan's defects scored higher, and so did its
#: seams). The painted defects' weakest reach 5.7-25 against a golden scan, 7.3-31 against
#: the file
Z_THRESHOLD = 7.0


#: a golden image's pixel of 0 is one it does not show (a good scan's unscanned margin, the
#: mosaic's convention); a file's black is kept at this floor (relative reflectance) instead.
#: A second good scan that reached 4 um further than the first was compared there with 0:
#: z 12.7 along the product's edge
BLACK_FLOOR = 1e-3


def golden_pixels(image: np.ndarray, usable: np.ndarray | None) -> np.ndarray:
    """The pixels a model keeps of its golden image: ``image`` (relative reflectance) with
    black raised to :data:`BLACK_FLOOR`, and 0 off ``usable`` (a scan's pixels that were not
    scanned or lie off the sample; None: all usable)."""
    out = np.maximum(np.asarray(image, dtype=np.float32), np.float32(BLACK_FLOOR))
    if usable is not None:
        out[~np.asarray(usable, dtype=bool)] = 0.0
    return out


def golden_record(image: np.ndarray, source: str, acquired: bool,
                  z_threshold: float = Z_THRESHOLD) -> dict[str, Any]:
    """The card's record of a golden image (the pixels go in the weights file): where it
    came from (a scan, ``acquired``, or a file), its shape and the z threshold it is
    compared at (a model keeps the one it was built with)."""
    return {"source": source, "shape": [int(n) for n in image.shape], "acquired": acquired,
            "z_threshold": round(float(z_threshold), 3)}


@dataclass
class GoldenComparison:
    """A golden image placed on a mosaic, and the comparison made with it.

    Attributes
    ----------
    golden : ndarray (H, W) float32
        The good image at the mosaic's pixel size (relative reflectance).
    shift : tuple of float
        Where its pixel (0, 0) lies on the mosaic's level 0 (rows, columns).
    mosaic : MosaicGrid
        The mosaic's geometry.
    correlation : float
        How well the placed golden image agrees with the scan (Pearson r, coarse).
    """

    golden: np.ndarray
    shift: tuple[float, float]
    mosaic: MosaicGrid
    correlation: float
    settings: DieToDie = field(default_factory=DieToDie)
    #: the golden image's turn on the mosaic (a part placed by hand); mosaic pixel
    #: ``shift + R(turn) @ g`` shows golden pixel ``g`` (rows, columns)
    turn_deg: float = 0.0
    #: the mosaic pixels that show the sample, :data:`EDGE_PX` inside its usable area's edge
    #: (``usable(r0, c0, h, w)``, a bool mask; None: all of them)
    usable: Any = None

    def to_golden(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Golden image (row, column) of mosaic pixels (row, column)."""
        dr, dc = rows - self.shift[0], cols - self.shift[1]
        if not self.turn_deg:
            return dr, dc
        c, s = math.cos(math.radians(self.turn_deg)), math.sin(math.radians(self.turn_deg))
        return c * dr + s * dc, -s * dr + c * dc

    @property
    def pad(self) -> int:
        """Pixels read around a block: room for the smoothing and the envelope."""
        return int(math.ceil(3 * max(self.settings.scales_px))) + TOLERANCE_PX + 4

    def footprint(self) -> tuple[int, int, int, int]:
        """Mosaic rows and columns ``(r0, c0, r1, c1)`` the golden image covers."""
        h, w = self.golden.shape
        if self.turn_deg:  # the corners' bounding box (off the golden image: NaN, not compared)
            g = np.array([(0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1)], dtype=np.float64)
            m = g @ _rotation(math.radians(self.turn_deg)).T + np.asarray(self.shift)
            lo, hi = m.min(axis=0), m.max(axis=0)
        else:
            lo = np.asarray(self.shift, dtype=np.float64)
            hi = lo + (h - 1, w - 1)
        r0, c0 = (int(math.ceil(v)) for v in lo)
        r1, c1 = (int(math.floor(v)) + 1 for v in hi)
        rows, cols = self.mosaic.shape
        return max(r0, 0), max(c0, 0), min(r1, rows), min(c1, cols)

    def reference(self, r0: int, c0: int, h: int, w: int) -> np.ndarray:
        """The golden image over mosaic pixels ``[r0, r0+h) x [c0, c0+w)`` (NaN off it)."""
        rows, cols = np.meshgrid(np.arange(r0, r0 + h, dtype=np.float64),
                                 np.arange(c0, c0 + w, dtype=np.float64), indexing="ij")
        return ndimage.map_coordinates(self.golden, self.to_golden(rows, cols), order=1,
                                       mode="constant", cval=np.nan).astype(np.float32)

    def compare(self, level0: Any, r0: int, c0: int, h: int, w: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Test minus golden (the test's units), the z-scores and the pixels compared, over
        mosaic pixels ``[r0, r0+h) x [c0, c0+w)``."""
        p = self.pad
        test = _read(level0, r0 - p, c0 - p, h + 2 * p, w + 2 * p)
        ref = self.reference(r0 - p, c0 - p, h + 2 * p, w + 2 * p)
        # not within EDGE_PX of the golden image's border: a scan blurs the product's edge
        # into whatever lies beyond it, which the golden image does not show
        # (NaN off the golden image, 0 where it shows nothing: see BLACK_FLOOR)
        on = ndimage.binary_erosion(np.isfinite(ref) & (ref > 0), iterations=EDGE_PX,
                                    border_value=1)
        mask = on & (test != 0)
        if self.usable is not None:
            # nor within EDGE_PX of the sample's edge: there the scan blurs in what lies
            # beyond, which a golden image turned against the part does not run along (a
            # photograph turned 1 deg: three false "scratches" along its edge)
            mask &= self.usable(r0 - p, c0 - p, h + 2 * p, w + 2 * p)
        ref = np.where(mask, ref, 0.0).astype(np.float32)
        ref *= shading(test, ref, mask)
        z = np.maximum(golden_z(test, ref, mask, self.settings.scales_px),
                       golden_texture_z(test, ref, mask))
        diff = np.where(mask, test - ref, 0.0).astype(np.float32)
        core = (slice(p, p + h), slice(p, p + w))
        return diff[core], z[core], mask[core]

    def difference(self, level0: Any, r0: int, c0: int, h: int, w: int
                   ) -> tuple[np.ndarray, np.ndarray] | None:
        """What :meth:`scanner.inspection.dietodie.Comparison.difference` gives: test minus
        golden and the z-scores over a window (None unless it lies on the golden image)."""
        fr0, fc0, fr1, fc1 = self.footprint()
        if r0 < fr0 or c0 < fc0 or r0 + h > fr1 or c0 + w > fc1:
            return None
        # compared within at least DIFFERENCE_PX around, as the blocks of the map are: the
        # shading and the noise are the surroundings', not a large stain's own
        grow_r, grow_c = max(0, (DIFFERENCE_PX - h) // 2), max(0, (DIFFERENCE_PX - w) // 2)
        a0, b0 = max(fr0, r0 - grow_r), max(fc0, c0 - grow_c)
        a1, b1 = min(fr1, r0 + h + grow_r), min(fc1, c0 + w + grow_c)
        diff, z, _ = self.compare(level0, a0, b0, a1 - a0, b1 - b0)
        core = (slice(r0 - a0, r0 - a0 + h), slice(c0 - b0, c0 - b0 + w))
        return diff[core], z[core]

    def compared_mask(self, origin_um: tuple[float, float], pixel_um: float,
                      shape: tuple[int, int]) -> np.ndarray:
        """Which pixels of a map lie on the golden image (inside its border's pad)."""
        fr0, fc0, fr1, fc1 = self.footprint()
        p, m = self.mosaic.pixel_size_um, self.pad
        ys = origin_um[1] + np.arange(shape[0]) * pixel_um
        xs = origin_um[0] + np.arange(shape[1]) * pixel_um
        rows = (ys - self.mosaic.origin_um[1]) / p
        cols = (xs - self.mosaic.origin_um[0]) / p
        if self.turn_deg:  # inside the turned golden image's border, less the pad
            gr, gc = self.to_golden(*np.meshgrid(rows, cols, indexing="ij"))
            h, w = self.golden.shape
            return (gr >= m) & (gr < h - 1 - m) & (gc >= m) & (gc < w - 1 - m)
        return ((rows >= fr0 + m) & (rows < fr1 - m))[:, None] & \
            ((cols >= fc0 + m) & (cols < fc1 - m))[None, :]


def place_golden(golden: np.ndarray, golden_pixel_um: float, levels: list[Any],
                 mosaic: MosaicGrid) -> GoldenComparison | None:
    """The golden image resampled to the mosaic's pixel size and placed on it (None: the scan
    does not show it, or either is featureless). ``levels``: the mosaic's pyramid, level 0
    first (a level of about :data:`COARSE_PX` a side is read whole, level 0 only in crops)."""
    golden = np.asarray(golden, dtype=np.float32)
    zoom = golden_pixel_um / mosaic.pixel_size_um
    if abs(zoom - 1.0) > 1e-3:
        if zoom < 1.0:  # anti-alias before shrinking, as the inspection's reader does
            golden = ndimage.gaussian_filter(golden, 0.5 * math.sqrt(1.0 / zoom**2 - 1.0))
        golden = ndimage.zoom(golden, zoom, order=1, grid_mode=True, mode="nearest")
    coarse_m, f = _coarse_level(levels)
    level = float(np.median(coarse_m[coarse_m > 0])) if np.any(coarse_m > 0) else 0.0
    if level <= 0:
        return None
    coarse_m = coarse_m / np.float32(level)
    coarse_g = _mean_pool(golden, f)
    shape = (max(coarse_m.shape[0], coarse_g.shape[0]), max(coarse_m.shape[1], coarse_g.shape[1]))
    fixed = _canvas(coarse_m, shape, coarse_m > 0)
    moving = _canvas(coarse_g, shape, coarse_g > 0)
    if fixed.std() < 1e-6 or moving.std() < 1e-6:
        return None
    from skimage.registration import phase_cross_correlation

    # whitened (phase) correlation: the scan's surround (a chuck beyond the product) and the
    # canvas's fill would dominate a plain one
    coarse, _, _ = phase_cross_correlation(fixed, moving)
    shift = _refined(golden, levels[0], np.asarray(coarse, dtype=np.float64) * f, f)
    turn, shift = _turned(golden, levels[0], shift, f, _shown_box(coarse_m), f)
    correlation = _agreement(coarse_g, coarse_m, shift / f, turn)
    if correlation < MIN_CORRELATION:
        return None
    return GoldenComparison(golden, (float(shift[0]), float(shift[1])), mosaic, correlation,
                            turn_deg=turn)


def _coarse_level(levels: list[Any]) -> tuple[np.ndarray, int]:
    """The first pyramid level of at most :data:`COARSE_PX` a side (the coarsest one, halved
    further, when none is), and its pixel in level-0 pixels."""
    k = next((i for i, a in enumerate(levels) if max(a.shape) <= COARSE_PX), len(levels) - 1)
    image = np.asarray(levels[k][...], dtype=np.float32)
    f = 2**k
    while max(image.shape) > COARSE_PX:
        image, f = _mean_pool(image, 2), 2 * f
    return image, f


def _canvas(a: np.ndarray, shape: tuple[int, int], valid: np.ndarray | None) -> np.ndarray:
    """``a`` at the top left of ``shape``, the rest (and invalid pixels) at its median, its
    mean removed."""
    fill = float(np.median(a[valid])) if valid is not None and valid.any() else float(
        np.median(a))
    out = np.full(shape, fill, dtype=np.float32)
    out[: a.shape[0], : a.shape[1]] = a if valid is None else np.where(valid, a, fill)
    return out - out.mean()


def _shown_box(golden: np.ndarray) -> tuple[int, int, int, int] | None:
    """Rows and columns ``(r0, r1, c0, c1)`` of what a golden image shows (its pixels over 0,
    see :func:`golden_pixels`; None: nothing)."""
    rows, cols = np.nonzero((golden > 0).any(axis=1))[0], np.nonzero((golden > 0).any(axis=0))[0]
    if not len(rows):
        return None
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _rotation(theta: float) -> np.ndarray:
    """The matrix turning (row, column) vectors by ``theta`` radians, as
    :meth:`GoldenComparison.to_golden` undoes it."""
    c, s = math.cos(theta), math.sin(theta)
    return np.array([[c, -s], [s, c]])


def _refined(golden: np.ndarray, level0: Any, shift: np.ndarray, f: int) -> np.ndarray:
    """The coarse placement refined on a crop at the centre of what the golden image shows
    (not its unscanned margin: a golden scan of a photograph with the chuck left out shows
    half its array, and a crop of its array's centre, a quarter of it empty, placed it a
    pixel off), at full resolution (unchanged where the crop has no clear match)."""
    box = _shown_box(golden)
    if box is None:
        return shift
    r0, r1, c0, c1 = box
    side = min(FINE_PX, r1 - r0, c1 - c0)
    gr, gc = (r0 + r1 - side) // 2, (c0 + c1 - side) // 2
    crop = golden[gr : gr + side, gc : gc + side]
    r, c = int(round(gr + shift[0])), int(round(gc + shift[1]))
    window = _read(level0, r, c, side, side)
    if np.count_nonzero(window) < 0.9 * window.size:
        return shift
    fine = block_shift(window, crop, max_shift_px=2.0 * f + 4.0)
    if fine is None:
        return shift
    # the crop moved by ``fine`` lands on the window: the golden lies ``fine`` further on
    return np.array([r - gr + fine[0], c - gc + fine[1]], dtype=np.float64)


def _turned(golden: np.ndarray, level0: Any, shift: np.ndarray, f: int,
            scan_box: tuple[int, int, int, int] | None = None, scan_f: int = 1
            ) -> tuple[float, np.ndarray]:
    """The golden image's turn on the scan (degrees) and its placement with it: ``(0,
    shift)`` unless a turn is told.

    A part placed by hand lies turned against the golden image by a fraction of a degree: 0.5
    deg moves a 1,100 px photograph's corners 7 px off a translation, and its outline and
    every edge became defects (precision 0.51). Crops on a 3 x 3 grid over what the golden
    image shows are found on the scan around ``shift`` (phase correlation), and the turn and
    translation that carry them onto where they were found are fitted by least squares, crops
    that miss it by more than :data:`TURN_MAX_RESIDUAL_PX` left out one at a time (at least
    five kept); then again around that fit, to a fraction of a pixel (:func:`_fine_shift`).
    Kept when it moves the golden image's far corner by more than :data:`TURN_RESOLUTION_PX`.

    The crops are laid over the part of the golden image the scan shows (``scan_box``: what
    the scan shows, ``(r0, r1, c0, c1)`` in pixels of ``scan_f`` level-0 pixels): a part placed
    300 um off the golden scan's place left the crops of one side off the scan, fewer than
    five were found, and a part turned 0.7 or 1 deg was compared unturned (19 and 22 false
    defects, a brick texture).
    """
    box = _shown_box(golden)
    if box is None:
        return 0.0, shift
    r0, r1, c0, c1 = box
    if scan_box is not None:
        # the scan's shown pixels in golden pixels (one coarse pixel in from their edge)
        sr0, sr1, sc0, sc1 = ((v + d) * scan_f for v, d in zip(scan_box, (1, -1, 1, -1),
                                                                strict=True))
        r0, r1 = max(r0, int(math.ceil(sr0 - shift[0]))), min(r1, int(sr1 - shift[0]))
        c0, c1 = max(c0, int(math.ceil(sc0 - shift[1]))), min(c1, int(sc1 - shift[1]))
        if r1 <= r0 or c1 <= c0:
            return 0.0, shift
    side = min(TURN_CROP_PX, (r1 - r0) // 3, (c1 - c0) // 3)
    if side < 64:
        return 0.0, shift
    reach = math.hypot(r1 - r0, c1 - c0) / 2
    centres = [(r0 + fr * (r1 - r0), c0 + fc * (c1 - c0))
               for fr in (0.2, 0.5, 0.8) for fc in (0.2, 0.5, 0.8)]
    theta, t = 0.0, np.asarray(shift, dtype=np.float64)
    # twice: the crops found around the translation by correlation, then again around the
    # turn found, to a fraction of a pixel by Gauss-Newton (a windowed correlation pulls a
    # small shift towards 0: correlation alone told 0.54 deg of 0.60 after two passes)
    for search in (2.0 * f + 4.0 + reach * math.radians(MAX_TURN_DEG), None):
        found = _crops_found(golden, level0, centres, side, theta, t, search)
        if found is None:
            return 0.0, shift
        theta, t = found
    if abs(math.degrees(theta)) > MAX_TURN_DEG or abs(theta) * reach < TURN_RESOLUTION_PX:
        return 0.0, shift
    return math.degrees(theta), t


def _crops_found(golden: np.ndarray, level0: Any, centres: list[tuple[float, float]],
                 side: int, theta: float, t: np.ndarray, search: float | None
                 ) -> tuple[float, np.ndarray] | None:
    """The turn and translation fitted to where crops of ``side`` px of the golden image,
    centred at ``centres``, are found on the scan around where ``(theta, t)`` puts them
    (see :func:`_turned`; None: fewer than five agree): by phase correlation within
    ``search`` px, or (None) to a fraction of a pixel within a pixel or two."""
    rot = _rotation(theta)
    found_g, found_m = [], []
    for cr, cc in centres:
        gr, gc = int(cr) - side // 2, int(cc) - side // 2
        crop = golden[gr:gr + side, gc:gc + side]
        at = t + rot @ (gr + side / 2, gc + side / 2)  # the crop's centre on the scan
        r, c = int(round(at[0] - side / 2)), int(round(at[1] - side / 2))
        window = _read(level0, r, c, side, side)
        if np.count_nonzero(window) < 0.9 * window.size \
                or np.count_nonzero(crop) < 0.9 * crop.size:
            continue
        if search is not None:
            local, at_px = block_shift(window, crop, max_shift_px=search), (side / 2, side / 2)
        else:
            local, at_px = _fine_shift(window, crop)
        if local is None:
            continue
        found_g.append((gr + at_px[0], gc + at_px[1]))
        found_m.append((r + at_px[0] + local[0], c + at_px[1] + local[1]))
    g, m = np.array(found_g), np.array(found_m)
    while len(g) >= 5:
        theta, t, miss = _turn_fit(g, m)
        if miss.max() <= TURN_MAX_RESIDUAL_PX:
            return theta, t
        # a crop placed on a look-alike (a featureless one, a repeat): left out, fitted again
        keep = np.arange(len(g)) != int(np.argmax(miss))
        g, m = g[keep], m[keep]
    return None


def _fine_shift(window: np.ndarray, crop: np.ndarray
                ) -> tuple[np.ndarray | None, tuple[float, float]]:
    """Where ``crop`` lies on ``window`` (rows, columns; within 3 px) to a hundredth of a
    pixel, and the crop's point that shift is measured at: Gauss-Newton on both high-passed
    and scaled alike (the scan's counts and shading against the golden image's reflectance).
    On turned content the shift is that of where the crop's detail is (the pixels weigh by
    their gradient's square), not of its centre: 0.5 px apart at a corner of a photograph
    turned 0.6 deg. None: no convergence."""
    from scanner.subpixel import prepare_strip, refine_subpixel

    a, b = prepare_strip(window), prepare_strip(crop)
    centre = (crop.shape[0] / 2, crop.shape[1] / 2)
    if a.std() <= 0 or b.std() <= 0:
        return None, centre
    fy, fx, _ = refine_subpixel(a / a.std(), b / b.std(), limit=3.0)
    if (fy, fx) == (0.0, 0.0):
        return None, centre
    gy, gx = np.gradient(b.astype(np.float64))
    weight = gy * gy + gx * gx
    rows, cols = np.mgrid[: b.shape[0], : b.shape[1]]
    total = float(weight.sum())
    return np.array([fy, fx]), (float((rows * weight).sum() / total),
                                float((cols * weight).sum() / total))


def _turn_fit(g: np.ndarray, m: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """The turn (radians) and translation ``t`` that best carry points ``g`` onto ``m``
    (``m = t + R g``, rows and columns), and each point's miss (px)."""
    # R = [[a, -b], [b, a]]: linear in (a, b, t); the turn is atan2(b, a)
    design = np.zeros((2 * len(g), 4))
    design[0::2] = np.column_stack([g[:, 0], -g[:, 1], np.ones(len(g)), np.zeros(len(g))])
    design[1::2] = np.column_stack([g[:, 1], g[:, 0], np.zeros(len(g)), np.ones(len(g))])
    (a, b, *_), *_ = np.linalg.lstsq(design, m.reshape(-1), rcond=None)
    theta = math.atan2(b, a)
    rot = _rotation(theta)
    t = (m - g @ rot.T).mean(axis=0)
    return theta, t, np.hypot(*(m - t - g @ rot.T).T)


def _agreement(golden: np.ndarray, image: np.ndarray, shift: np.ndarray,
               turn_deg: float = 0.0) -> float:
    """Pearson r of a (coarse) golden image placed at ``shift`` (turned ``turn_deg``) on a
    (coarse) scan, over the pixels they share."""
    placed = GoldenComparison(golden, (float(shift[0]), float(shift[1])),
                              MosaicGrid((0.0, 0.0), 1.0, image.shape), 0.0, turn_deg=turn_deg)
    rows, cols = np.meshgrid(np.arange(image.shape[0], dtype=np.float64),
                             np.arange(image.shape[1], dtype=np.float64), indexing="ij")
    ref = ndimage.map_coordinates(golden, placed.to_golden(rows, cols), order=1,
                                  mode="constant", cval=np.nan)
    ok = np.isfinite(ref) & (ref > 0) & (image > 0)
    if ok.sum() < 64:
        return 0.0
    a, b = ref[ok].astype(np.float64), image[ok].astype(np.float64)
    if a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def shading(test: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The smooth gain of the test over the golden image: the median ratio test / golden in
    blocks of :data:`GAIN_BLOCK_PX` (where the golden is not dark), a 3 x 3 median of the
    blocks, interpolated bilinearly (1 where a block has too few pixels)."""
    b = GAIN_BLOCK_PX
    h, w = test.shape
    nb_r, nb_c = -(-h // b), -(-w // b)
    bright = mask & (ref > 0.3 * max(float(np.median(ref[mask])) if mask.any() else 0.0, 1e-6))
    gains = np.full((nb_r, nb_c), np.nan, dtype=np.float32)
    for i in range(nb_r):
        for j in range(nb_c):
            sel = bright[i * b:(i + 1) * b, j * b:(j + 1) * b]
            if np.count_nonzero(sel) >= b * b // 8:
                t = test[i * b:(i + 1) * b, j * b:(j + 1) * b][sel]
                r = ref[i * b:(i + 1) * b, j * b:(j + 1) * b][sel]
                gains[i, j] = np.median(t / r)
    if not np.isfinite(gains).any():
        return np.ones_like(test)
    gains = np.where(np.isfinite(gains), gains, np.nanmedian(gains))
    gains = ndimage.median_filter(gains, 3, mode="nearest")
    rows = (np.arange(h) + 0.5) / b - 0.5
    cols = (np.arange(w) + 0.5) / b - 0.5
    coords = np.meshgrid(rows, cols, indexing="ij")
    return ndimage.map_coordinates(gains, coords, order=1, mode="nearest").astype(np.float32)


def golden_z(test: np.ndarray, ref: np.ndarray, mask: np.ndarray,
             scales_px: tuple[float, ...], tolerance_px: int = TOLERANCE_PX) -> np.ndarray:
    """The largest ``|excess| / noise`` over the scales: how far the smoothed test lies
    outside the envelope of the smoothed golden image over ``+-tolerance_px``, over the
    robust spread of their difference (plus die-to-die's sampling-phase allowance); 0 off
    ``mask``."""
    z = np.zeros(test.shape, dtype=np.float32)
    if not mask.any():
        return z
    t_all, ref, level = _filled(test, ref, mask)
    floor = 1e-3 * max(level, 1e-3)
    size = 2 * tolerance_px + 1
    for s in scales_px:
        t = ndimage.gaussian_filter(t_all, s, truncate=2.5)
        r = ndimage.gaussian_filter(ref, s, truncate=2.5)
        lo = ndimage.minimum_filter(r, size)
        hi = ndimage.maximum_filter(r, size)
        excess = t - np.clip(t, lo, hi)
        spread = _robust_spread((t - r)[mask]) + floor
        curvature = np.abs(ndimage.laplace(r))
        phase = np.float32(0.5 * GOLDEN_PHASE_PX**2) * ndimage.maximum_filter(curvature, size)
        np.maximum(z, np.abs(excess) / np.hypot(np.float32(spread), phase), out=z)
    z[~mask] = 0.0
    return z


def _filled(test: np.ndarray, ref: np.ndarray, mask: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray, float]:
    """The test and the golden image with both reading the golden's level (returned too) off
    the compared pixels: smoothed, they drop alike there."""
    level = float(np.median(ref[mask]))
    return (np.where(mask, test, np.float32(level)), np.where(mask, ref, np.float32(level)),
            level)


def _robust_spread(d: np.ndarray) -> float:
    """1.4826 x the median absolute deviation: the standard deviation of normal noise,
    untouched by a defect's few pixels."""
    return 1.4826 * float(np.median(np.abs(d - np.median(d))))


def golden_texture_z(test: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Z-score of the test's loss of fine-texture energy against the golden image's (see
    :func:`scanner.inspection.dietodie_maths.texture_z`): a patch of missing texture filled
    with the surface's level changes the intensities little (a moon photograph's two such
    patches: intensity z 3-6) but empties the detail. The log-energies are compared within
    the die-to-die envelope, after their median difference over the block (a scan's blur
    and noise move the detail's energy everywhere alike), over its robust spread."""
    z = np.zeros(test.shape, dtype=np.float32)
    if not mask.any():
        return z
    t_all, r_all, level = _filled(test, ref, mask)
    floor = np.float32(1e-4 * max(level, 1e-3) ** 2)  # (1 % of the level)^2: camera noise
    lt = np.log(texture_energy(t_all) + floor)
    lr = np.log(texture_energy(r_all) + floor)
    d = (lt - lr)[mask]
    centre = float(np.median(d))
    spread = _robust_spread(d) + TEXTURE_MIN_SPREAD
    lo = ndimage.minimum_filter(lr, 2 * TEXTURE_TOLERANCE_PX + 1) + np.float32(centre)
    z = (np.maximum(lo - lt, 0.0) / np.float32(spread)).astype(np.float32)
    z[~mask] = 0.0
    return z


def golden_patches(placed: GoldenComparison, level0: Any, map_origin_um: tuple[float, float],
                   map_pixel_um: float, z_threshold: float, threshold: float) -> list[Patch]:
    """The golden comparison's z-scores over its footprint, as blocks of anomaly-map scores
    (:func:`scanner.inspection.dietodie_maps.map_patch`)."""
    fr0, fc0, fr1, fc1 = placed.footprint()
    patches = []
    for r0 in range(fr0, fr1, BLOCK_PX):
        for c0 in range(fc0, fc1, BLOCK_PX):
            h, w = min(BLOCK_PX, fr1 - r0), min(BLOCK_PX, fc1 - c0)
            _, z, _ = placed.compare(level0, r0, c0, h, w)
            patch = map_patch(z, r0, c0, placed.mosaic, map_origin_um, map_pixel_um,
                              z_threshold, threshold)
            if patch is not None:
                patches.append(patch)
    return patches


def uses_golden(model: Any, kind: str | None) -> bool:
    """Whether inspection compares a sample of ``kind`` with the model's golden image."""
    return getattr(model, "golden", None) is not None and kind in GOLDEN_KINDS


def say_golden_unplaced(images: list[str] | None = None, of: int = 1) -> None:
    """Warn that the golden image was not found in the image inspected, or in ``images`` of
    ``of`` image files (said once for them all: it was said once per image, naming none)."""
    from scanner.inspection.card import log

    if images is None:
        log.warning("the model's golden image was not found in this image (another product, or "
                    "placed beyond the search): compared with nothing, the model alone judges it")
        return
    shown = ", ".join(images[:3]) + (", ..." if len(images) > 3 else "")
    log.warning("the model's golden image was not found in %d of %d images (%s: another "
                "product, or placed beyond the search): the model alone judged them",
                len(images), of, shown)


def golden_evidence(model: Any, levels: list[Any], mosaic: MosaicGrid, maps: Any,
                    threshold: float, polygon: Any = None, say_unplaced: bool = True
                    ) -> tuple[dict[str, Any], Any, np.ndarray | None, np.ndarray | None]:
    """Compare an image (a mosaic's pyramid, or one image as its only level) with the model's
    golden image and raise its anomaly map where they differ, as die-to-die does: what was
    done, the difference reader (None: not on the image's own grid), the map pixels compared
    and, of them, those where the image shows the golden design (z under ``DESIGN_Z``).
    Nothing is compared, and the model alone judges, when the image does not show the
    design (:func:`place_golden` finds no placement), which is said unless ``say_unplaced``
    is false (the caller compares the image with something else then)."""
    import functools
    import time

    from scanner.inspection.defects import DESIGN_Z

    t0 = time.perf_counter()
    z_threshold = float((model.card.get("golden") or {}).get("z_threshold", Z_THRESHOLD))
    # the golden image is at the model's pixel size, or at the mosaic's when that was assumed
    placed = place_golden(model.golden, grid_pixel_um(model, mosaic.pixel_size_um), levels,
                          mosaic)
    stats: dict[str, Any] = {"reference": GOLDEN, "z_threshold": z_threshold,
                             "placed": placed is not None}
    if placed is None:
        if say_unplaced:
            # said, not only recorded: the model alone then judges a product whose defects
            # the golden comparison was kept for (a fine grating: 9 of 23 found, nothing said)
            say_golden_unplaced()
        return {**stats, "seconds": round(time.perf_counter() - t0, 3)}, None, None, None
    if polygon is not None:
        from scanner.inspection.dietodie_geometry import UsableArea

        placed = replace(placed, usable=UsableArea(polygon, mosaic, EDGE_PX))
    stats["turn_deg"] = round(placed.turn_deg, 4)
    anomaly = maps.maps["anomaly"]
    patches = golden_patches(placed, levels[0], maps.origin_um, maps.pixel_size_um,
                             z_threshold, threshold)
    apply_patches(anomaly, patches)
    compared = placed.compared_mask(maps.origin_um, maps.pixel_size_um, anomaly.shape)
    repeated = repeated_mask(compared, patches,
                             float(z_to_score(DESIGN_Z, z_threshold, threshold)))
    difference = None
    if not maps.reader.resample and levels[0].ndim == 2:
        difference = functools.partial(placed.difference, levels[0])
    stats.update(shift_px=[round(v, 2) for v in placed.shift],
                 correlation=round(placed.correlation, 4),
                 map_pixels_over_threshold=int(sum(np.count_nonzero(sc >= threshold)
                                                   for _, _, sc in patches)),
                 seconds=round(time.perf_counter() - t0, 3))
    return stats, difference, compared, repeated
