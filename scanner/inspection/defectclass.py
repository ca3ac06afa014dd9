"""A defect's class from its shape and appearance only (:func:`classify`).

Shape on the anomaly map or, where the image is read, on the defect's own footprint
(:func:`shape_features`); contrast, noise, rim and body against the ring around it
(:func:`appearance`). Nothing here knows how any simulator draws its defects; the
extraction (:mod:`scanner.inspection.defects`) measures each defect and asks for its class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage import measure, morphology

#: contrast (relative to the surface level) under which a large defect is a stain: films and
#: residues change reflectance by tens of per cent at most, while particles and pits of that
#: size are opaque or deep (simulated wafers and PV cells: stains 0.13-0.34, particles and pits
#: over 20 px across 0.48-0.88, measured as :func:`appearance` does)
FAINT_CONTRAST = 0.4


#: a compact dark defect is a pit when the brightest part of the shell around it stands out by
#: this fraction of its contrast (beyond the noise): simulated pits 0.09-0.37, dark particles
#: 0.00-0.03 (see :attr:`Features.rim`)
PIT_RIM = 0.06


#: mean width (image pixels) up to which a long region on the image is a line (a crack or a
#: scratch imaged at the resolution limit is 1-4 pixels wide; a blotchy stain 8 or more)
THIN_LINE_PX = 6.0


@dataclass(frozen=True)
class Features:
    """Shape and appearance of one defect (map pixels unless stated).

    Attributes
    ----------
    area : float
        Pixels of the defect.
    length, width : float
        Major and minor axis lengths of the moment ellipse.
    elongation : float
        ``length / width``.
    solidity : float
        Area over the area of the convex hull.
    extent : float
        Area over the area of the bounding box.
    branches : int
        Branch points of the skeleton (pixels with 3 or more skeleton neighbours).
    tortuosity : float
        Skeleton length over the Feret diameter (1 for a straight line).
    skeleton : int
        Skeleton length (pixels).
    corners : bool
        Whether all four corners of the bounding box belong to the defect (rectangles).
    contrast : float
        Signed intensity change of the defect against its surroundings, in units of the
        surface level (positive: brighter); NaN when the image is not available.
    snr : float
        ``|contrast|`` over the local noise of the surroundings.
    resolution : float
        Size of one pixel of the shape measurements in map pixels: 1 when they are measured
        on the map, ``1 / stride`` when on the defect's footprint in the image
        (:func:`appearance`).
    rim : float
        The 10th percentile of the deviation of a 2 px shell just outside the footprint on
        the image, with the defect's own sign, over ``|contrast|`` (a pit's bright rim around
        its dark core makes it negative); NaN without a footprint.
    body : float
        Median deviation over the footprint on the image (units of the surface level; NaN
        without a footprint).
    map_winding : bool
        When the shape is the footprint's: whether the defect's whole region on the map winds
        or branches (tortuosity >= 1.2 or two branch points; a straight scratch's blurred
        band does neither).
    """

    area: float
    length: float
    width: float
    elongation: float
    solidity: float
    extent: float
    branches: int
    tortuosity: float
    skeleton: int
    corners: bool
    contrast: float
    snr: float
    resolution: float = 1.0
    rim: float = math.nan
    body: float = math.nan
    map_winding: bool = False


def classify(f: Features) -> str:
    """Class of a defect from its features (one of :data:`scanner.defectlist.CLASSES`).

    General rules, in order (sizes in map pixels, whatever the resolution the shape was
    measured at; see :attr:`Features.resolution`):

    * **rectangular** (the bounding box filled: extent >= 0.88 on the image, or >= 0.85 with
      its corners on the map; solid, at least 2 x 2 map pixels, not a thin line): ``pattern``
      (missing or extra structure on a patterned surface is axis-aligned and square-cornered);
    * **linear** (elongation >= 4, or a long thin skeleton with a sparse hull): a winding line
      (or on the map, where a crack is blurred, a branched one; or one whose whole region on
      the map winds or branches while its footprint is one straight piece) is a ``crack``, a
      straight or gently curved one a ``scratch``;
    * **large and faint, or large and irregular** (at least 4 x 4 with a contrast under
      :data:`FAINT_CONTRAST`: the footprint's median one when there is a footprint, or
      8 x 8 with solidity < 0.75): ``stain``;
    * **compact**: darker than its surroundings with a brighter rim around it (beyond the
      noise: :data:`PIT_RIM` + 1.28 / SNR, the noise's own 10th percentile), a ``pit`` (its
      slope sends light back into the objective); otherwise a ``particle`` (bright or dark:
      a particle scatters light out of the objective and has no rim);
    * anything else: ``other``.
    """
    fine = f.resolution < 1.0  # measured on the defect's footprint in the image
    area = f.area * f.resolution**2
    thickness = f.area / max(f.skeleton, 1)  # mean width of a line-like region (own pixels)
    filled = f.extent >= 0.88 if fine else (f.extent >= 0.85 and f.corners)
    # a long filled rectangle is a missing line of the design unless it is as thin as a
    # scratch (an axis-aligned scratch fills its bounding box too)
    squat = f.elongation < (6.0 if fine else 3.0) or (fine and f.width > 2 * THIN_LINE_PX)
    if filled and f.solidity >= 0.95 and area >= 4 and squat and f.width >= 3:
        return "pattern"
    # a line bent or branched has a low moment elongation but a long, thin skeleton; on the
    # image a line is also thin in pixels (a blotchy stain's skeleton is long too)
    thin = f.skeleton * f.resolution >= 8 and f.skeleton**2 / f.area >= 12 \
        and f.solidity < 0.5 and (not fine or thickness <= THIN_LINE_PX)
    if f.elongation >= 4.0 or thin:
        # on the image, outline noise branches any skeleton: only the winding counts there,
        # or the course of the whole region on the map (the footprint is one piece of it)
        if f.tortuosity >= 1.35 or (not fine and f.branches >= 2) or f.map_winding:
            return "crack"
        return "scratch"
    # the typical contrast over the footprint when there is one: the extreme of a stain on
    # circuitry is where the design is brightest
    level = f.body if math.isfinite(f.body) else f.contrast
    faint = math.isfinite(level) and abs(level) < FAINT_CONTRAST
    if (area >= 16 and faint) or (area >= 64 and f.solidity < 0.75):
        return "stain"
    if f.solidity >= 0.75 and f.elongation < 3.0:
        if math.isfinite(f.contrast) and f.contrast < 0 and math.isfinite(f.rim) \
                and f.rim <= -(PIT_RIM + 1.28 / max(f.snr, 1e-6)):
            return "pit"
        return "particle"
    return "other"


def shape_features(mask: np.ndarray) -> dict[str, float]:
    """Shape features of one binary region (see :class:`Features`)."""
    mask = np.asarray(mask, dtype=bool)
    props = measure.regionprops(mask.astype(np.uint8))[0]
    area = float(props.area)
    length = float(props.axis_major_length) if area > 1 else 1.0
    width = float(props.axis_minor_length) if area > 1 else 1.0
    length, width = max(length, 1.0), max(width, 1.0)
    skel = morphology.skeletonize(mask)
    n_skel = int(skel.sum())
    if n_skel:
        nb = ndimage.convolve(skel.astype(np.uint8), np.ones((3, 3), np.uint8), mode="constant")
        branches = int(np.count_nonzero(skel & (nb >= 4)))  # self + 3 neighbours
    else:
        branches = 0
    feret = max(float(props.feret_diameter_max), 1.0)
    box = props.image
    return {
        "area": area,
        "length": length,
        "width": width,
        "elongation": length / width,
        "solidity": float(props.solidity),
        "extent": float(props.extent),
        "branches": branches,
        "tortuosity": max(1.0, n_skel / feret) if n_skel > 2 else 1.0,
        "skeleton": n_skel,
        "corners": bool(box[0, 0] and box[0, -1] and box[-1, 0] and box[-1, -1]),
        "feret": feret,
    }


@dataclass
class Appearance:
    """What a defect looks like on the image (see :func:`appearance`).

    Attributes
    ----------
    contrast, snr : float
        Signed contrast against the surrounding ring (units of the surface level; the
        extreme of the defect's pixels) and ``|contrast|`` over the ring's noise. NaN when
        there is no usable background.
    centre : tuple of float or None
        ``(row, col)`` on the patch of the centroid of the pixels that deviate from the
        background with the defect's sign (weighted by the deviation), those of the
        footprint where there is one: the defect itself at full resolution rather than its
        blurred footprint on the map. None when the defect does not stand clearly out of
        the noise.
    footprint : np.ndarray of bool or None
        The defect as seen on the patch: the largest connected region inside the map's
        region that deviates from the background with the defect's sign by more than half its
        contrast (and 3 noise sigmas). A scratch one pixel wide is a line here while its
        footprint on the map is a blurred band a map pixel or two wide, so shape is measured
        on this when there is one. None when the defect does not stand out, or when the
        deviating pixels are scattered (structure of a patterned surface rather than one
        object).
    rim : float
        :attr:`Features.rim` (NaN without a footprint).
    body : float
        Median deviation over the footprint (units of the surface level; NaN without one):
        the defect's typical contrast, where ``contrast`` is its extreme.
    background, noise : float
        The ring's median and its noise (1.4826 x the median absolute deviation), which
        ``contrast`` and ``snr`` are measured against.
    """

    contrast: float = math.nan
    snr: float = math.nan
    background: float = math.nan
    noise: float = math.nan
    centre: tuple[float, float] | None = None
    footprint: np.ndarray | None = None
    rim: float = math.nan
    body: float = math.nan


def appearance(patch: np.ndarray, inside: np.ndarray, ring_px: int) -> Appearance:
    """What a defect looks like against a ring around it (:class:`Appearance`).

    Parameters
    ----------
    patch : np.ndarray
        Normalised image (surface level about 0, one unit = the surface level / gain) around
        the defect.
    inside : np.ndarray
        Boolean mask of the defect on ``patch``.
    ring_px : int
        Width of the surrounding ring used as background.
    """
    if not inside.any():
        return Appearance()
    # distance to the defect: a gap of a third of the ring (the defect's blurred border),
    # then the ring itself; one linear-time transform whatever the ring's width
    dist = ndimage.distance_transform_edt(~inside)
    gap = max(1, ring_px // 3)
    ring = (dist > gap) & (dist <= gap + ring_px)
    if ring.sum() < 8:
        return Appearance()
    bg = patch[ring]
    med = float(np.median(bg))
    noise = 1.4826 * float(np.median(np.abs(bg - med))) + 1e-6
    dev = patch[inside] - med
    # the defect may fill only a few per cent of its blurred footprint on the map
    hi, lo = float(np.percentile(dev, 98)), float(np.percentile(dev, 2))
    contrast = hi if abs(hi) >= abs(lo) else lo
    out = Appearance(contrast=contrast, snr=abs(contrast) / noise, background=med, noise=noise)
    if out.snr < 3:
        return out
    sign = math.copysign(1.0, contrast)
    signed = (patch - med) * sign
    out.footprint = _footprint(patch, inside, ring, sign)
    if out.snr >= 5:
        strong = inside & (signed > max(3 * noise, 0.3 * abs(contrast)))
        # the defect's pixels and those next to it where it has a footprint: strong pixels
        # elsewhere in the map's region (a die's mark beside a missing pattern) pulled the
        # centre 18-27 px off the defect on a 10 um wafer
        if out.footprint is not None:
            near = ndimage.distance_transform_edt(~out.footprint) <= max(2, ring_px // 2)
            if (strong & near).any():
                strong &= near
        if strong.any():
            rr, cc = np.nonzero(strong)
            w = signed[rr, cc]
            out.centre = (float((w * rr).sum() / w.sum()), float((w * cc).sum() / w.sum()))
    if out.footprint is not None:
        out.body = float(np.median(patch[out.footprint])) - med
        # the shell 1-2 px outside the footprint: the blurred border of a plain blob keeps
        # the defect's sign there, the rim of a pit (light scattered back by its slope) has
        # the opposite one; a rim need not go all round, so its brightest tenth counts
        near = ndimage.binary_dilation(out.footprint, iterations=2) & ~out.footprint
        if near.sum() >= 8:
            out.rim = float(np.percentile(signed[near], 10)) / abs(contrast)
    return out


def _footprint(patch: np.ndarray, inside: np.ndarray, ring: np.ndarray, sign: float
               ) -> np.ndarray | None:
    """The defect's region on the image (see :func:`appearance`).

    Thresholded after a Gaussian of one pixel: on the raw image a faint defect's region is
    speckled by the noise, and its skeleton then branches everywhere. Levels are taken on the
    smoothed image too, so a line one pixel wide keeps its (lower) peak above half of it.
    """
    smooth = ndimage.gaussian_filter(patch.astype(np.float32), 1.0)
    bg = smooth[ring]
    med = float(np.median(bg))
    noise = 1.4826 * float(np.median(np.abs(bg - med))) + 1e-6
    signed = (smooth - med) * sign
    peak = float(np.percentile(signed[inside], 98))
    region = _largest_region(inside & (signed > max(3 * noise, 0.5 * peak)))
    if region is None:
        return None
    # pinholes of noise inside a blob are part of it (skimage's remove_small_holes changed its
    # parameter in 0.26; this works with any version)
    holes, n = ndimage.label(ndimage.binary_fill_holes(region) & ~region)
    if n:
        small = np.bincount(holes.ravel()) < 16
        small[0] = False
        region = region | small[holes]
    return region


def _largest_region(mask: np.ndarray, min_share: float = 0.5, min_px: int = 4
                    ) -> np.ndarray | None:
    """The largest connected region of ``mask`` when it holds at least ``min_share`` of the
    mask's pixels and ``min_px`` pixels (else None)."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
    if n == 0:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    k = int(np.argmax(sizes))
    if sizes[k] < min_px or sizes[k] < min_share * sizes.sum():
        return None
    return labels == k + 1
