"""A golden image from several good images of one part: their median, once registered.

One good image of a design that does not repeat is kept as the golden image it is compared
with (:mod:`scanner.inspection.golden`), and forty or more of one aligned part get a model per
position (:mod:`models.gaussian`). Between the two (a user's handful of good photographs of
one part) only the memory bank judged, and it cannot see that something is out of place when
it looks like what is normal elsewhere: a black 20 x 20 px square on the grey wall of a
photograph scored 0.91-0.94 against a threshold of 1.23 with four good copies, while the
golden comparison of one copy found it.

So the images are registered onto the first (a shift within a tenth of their side, and a turn) and
their pixel-wise median is the golden image, which the camera noise of each copy leaves (each
pixel the median of the copies that show it: a copy framed further off does not show a band along
its border, which filling from its edge turned into differences of z 9-24). Its z
threshold is set on the images themselves, as die-to-die's is on a good scan: each image is
compared with the median of the others, and the threshold is ``GOOD_Z_MARGIN`` times the
largest z any reaches, at least the golden's default. Images that do not show one part alike
(random crops of a texture, cells whose grains differ) do not register or differ beyond
die-to-die's default threshold, and a design that repeats so that inspection's placement finds
the median a period off (a mirrored texture) would be compared where it is not: none is kept
then, and the bank judges as before.

A part whose dies repeat keeps one too: image files are compared with it before their own dies
(a scan of one is compared die to die first). On four good copies (shifted by up to 2 px, 5 %
gain, 1 % noise) of products of ``bench/bench_products.py``, the painted copy inspected as a
file: a moon photograph 0.09 -> 0.95 of its defects found, a portrait 0.00 -> 1.00, a die grid
of the camera photograph 0.77 -> 1.00, of the coins 0.82 -> 1.00, all at precision 1.00 and
with no defect on three more good copies (``docs/model.md``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from functools import partial
from typing import Any

import numpy as np
from scipy import ndimage

from scanner.inspection.dietodie import (
    GOOD_Z_MARGIN,
    DieToDie,
    MosaicGrid,
    calibrated_z_threshold,
)
from scanner.inspection.dietodie_maps import pair_opening
from scanner.inspection.dietodie_maths import block_shift
from scanner.inspection.golden import Z_THRESHOLD, _rotation, place_golden

#: most images registered and stacked (the rest add little to a median and cost time: eight
#: of 4 Mpx took 35 s and 0.74 GB on the 2-core machine)
MAX_IMAGES = 8
#: largest shift between two good images of the part (share of the shorter side): pictures of
#: one part framed alike
MAX_SHIFT_SHARE = 0.1
#: the placement's turn is taken when its shift at the images' centre is within this (px) of
#: the correlation's
TURN_AGREEMENT_PX = 2.0


def stacked_golden(images: Sequence[np.ndarray]) -> tuple[np.ndarray, float] | None:
    """The golden image of several good images of one part and its z threshold.

    Parameters
    ----------
    images : sequence of ndarray (H, W)
        Good images of one part, all of one shape (relative reflectance).

    Returns
    -------
    (ndarray, float) or None
        The median of the images registered onto the first, and the z-score that counts as a
        defect against it; None when they do not show one part alike (see the module
        docstring), are fewer than two, or not all of one shape.
    """
    if len(images) < 2 or len({np.shape(a) for a in images}) != 1:
        return None
    images = [np.asarray(a, dtype=np.float32) for a in images[:MAX_IMAGES]]
    registered = _registered(images)
    if registered is None:
        return None
    aligned, seen = registered
    # what a copy moved onto the first's grid does not show (a band along its border) is
    # left out: filled from the border pixel, it scored z 9-24 there and no golden was kept
    # for copies shifted by more than about 4 % of their side
    aligned = np.where(seen, aligned, np.nan)
    everywhere = seen.all(axis=0)
    with warnings.catch_warnings():  # a pixel only the first shows: no other's median
        warnings.simplefilter("ignore", RuntimeWarning)
        worst = max(_largest_z(aligned[i], np.nanmedian(np.delete(aligned, i, axis=0), axis=0),
                               everywhere) for i in range(len(aligned)))
    default = DieToDie().z_threshold
    if GOOD_Z_MARGIN * worst > default:
        return None
    z_threshold = max(calibrated_z_threshold(worst, default), Z_THRESHOLD)
    return np.nanmedian(aligned, axis=0).astype(np.float32), z_threshold  # the first: all


def _moved(img: np.ndarray, move: Any) -> tuple[np.ndarray, np.ndarray]:
    """``move`` (``scipy.ndimage``'s ``shift`` or ``map_coordinates``, its motion bound)
    applied to an image (cubic spline) and to where it shows anything (the pixels it
    covers)."""
    shown = move(np.ones(img.shape, np.float32), order=0, mode="constant", cval=0.0) > 0.5
    return move(img, order=3, mode="nearest"), shown


def _registered(images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray] | None:
    """The images moved onto the first's grid ``(N, H, W)`` (cubic spline) and where each
    shows the part (bool, ``(N, H, W)``); None when one does not register on it within
    :data:`MAX_SHIFT_SHARE` of its side.

    The shift is the phase correlation of the whole images, Hann-windowed (:func:`scanner.
    inspection.dietodie_maths.block_shift`), not the golden placement's global search: a
    design that repeats matches itself a period off as well (a mirrored brick texture:
    1024 px). A turn (a part placed by hand) is the placement's, taken when its shift agrees
    with that one."""
    first = images[0]
    limit = MAX_SHIFT_SHARE * min(first.shape)
    grid = MosaicGrid((0.0, 0.0), 1.0, first.shape)
    out, shown = [first], [np.ones(first.shape, bool)]
    for img in images[1:]:
        shift = block_shift(first, img, limit)
        if shift is None:
            return None
        placed = place_golden(first, 1.0, [img], grid)
        turned = placed is not None and placed.turn_deg != 0.0
        if turned:
            # the image's pixel p + R g shows the first's pixel g; at the centre that is a
            # shift, which must be the correlation's (else the placement is a period off)
            rot = _rotation(math.radians(placed.turn_deg))
            centre = (np.asarray(first.shape, dtype=np.float64) - 1) / 2
            moved = np.asarray(placed.shift) + rot @ centre - centre
            turned = float(np.max(np.abs(moved + shift))) <= TURN_AGREEMENT_PX
        if turned:
            coords = np.einsum("ij,jhw->ihw", rot, np.indices(first.shape, dtype=np.float64))
            coords += np.asarray(placed.shift)[:, None, None]
            moved, seen = _moved(img, partial(ndimage.map_coordinates, coordinates=coords))
        else:
            moved, seen = _moved(img, partial(ndimage.shift, shift=shift))
        out.append(moved)
        shown.append(seen)
    return np.stack(out).astype(np.float32), np.stack(shown)


def _largest_z(test: np.ndarray, reference: np.ndarray, where: np.ndarray) -> float:
    """The largest z of ``test`` compared with ``reference`` as inspection compares an image
    with its golden image, after the pair opening inspection's maps get (a lone pixel of
    noise is no defect), over ``where`` (what every copy shows); infinite when inspection's
    placement would not find the reference where it is (within a pixel, unturned), as on a
    design that repeats. Pixels a copy does not show (NaN) are the other image's."""
    test = np.where(np.isnan(test), reference, test)
    reference = np.where(np.isnan(reference), test, reference)
    grid = MosaicGrid((0.0, 0.0), 1.0, test.shape)
    placed = place_golden(reference, 1.0, [test], grid)
    if placed is None or placed.turn_deg or max(abs(v) for v in placed.shift) > 1.0:
        return float("inf")
    _, z, _ = placed.compare(test, 0, 0, *test.shape)
    z = pair_opening(z)
    if z.shape == where.shape:
        z = z[where]
    return float(z.max()) if z.size else 0.0
