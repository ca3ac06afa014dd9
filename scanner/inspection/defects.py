"""Defects from the anomaly maps: threshold, connected components, merging, classification.

The steps, all on the maps' grid (``1 / stride`` of the model grid):

1. **Hysteresis threshold.** A defect is a connected region where the anomaly exceeds a *low*
   threshold (default halfway from the surface's median anomaly to the decision threshold,
   at least half the latter) that somewhere exceeds the decision
   threshold itself (the model's calibrated one unless overridden). The low threshold gives a
   defect its full extent; the high one decides whether it is one.
2. **Merging.** Regions closer than ``merge_px`` (model-grid pixels) are one defect: a scratch
   whose contrast fades in places, or any defect broken into fragments, is reported once. The
   grouping dilates the mask by half the gap and labels it; pixels keep their own extent.
   The default gap is 24 px: with the lower thresholds of quiet and plain neighbourhoods a
   faint scratch passes in pieces up to ~20 px apart (12 px reported a 236 µm scratch on a
   rough coupon as two defects; the benchmark's recall is the same with 24). Line-like
   pieces that continue one another are joined across longer gaps
   (:func:`merge_collinear`).
3. **Minimum size.** Defects smaller than ``min_area_px`` model-grid pixels are dropped.
4. **Measurements** in stage µm: the anomaly-weighted centroid (sub-pixel), bounding box,
   area, Feret diameter, peak score, mean roughness, and the uncertainty at the peak.
5. **Class** from shape and appearance only (:func:`classify`, in
   :mod:`scanner.inspection.defectclass`): nothing here knows how any simulator draws its
   defects.

Defects whose uncertainty is high, or whose score barely passes the threshold, get
``review=True``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree
from skimage import measure, morphology

from models.lines import line_seeds
from models.thresholds import label_defects
from scanner.defectlist import Defect

# the classes live in their own module; their names stay importable from here (the tests
# import them from scanner.inspection.defects)
from scanner.inspection.defectclass import (  # noqa: F401
    FAINT_CONTRAST,
    PIT_RIM,
    THIN_LINE_PX,
    Appearance,
    Features,
    appearance,
    classify,
    shape_features,
)

#: Default uncertainty (bits of entropy, the map's units) above which a defect is flagged for
#: review, when the model card does not give one (``review_uncertainty``; training calibrates
#: it on held-out data, 0.58 for the shipped model).
DEFAULT_REVIEW_UNCERTAINTY = 0.8
#: Defects whose score lies in this lowest fraction of the range from the threshold to 1 are
#: flagged for review too (barely above the threshold). A fraction of the range, not a multiple
#: of the threshold: with a threshold above 1 / 1.15 = 0.87 a multiple flagged every defect.
BORDERLINE = 0.15
#: fragments closer than this (model-grid pixels) are one defect (``extract_defects``'s
#: ``merge_px``; module docstring). Training's component count uses the same gap on the map
#: grid: ``models.thresholds.DEFECT_MERGE_MAP_PX`` = this / the output stride (4), checked by
#: tests/test_single_source.py since models/ may not import scanner.
MERGE_PX = 24.0

#: maps of up to this many pixels are read into memory once: each defect reads its region of
#: three maps, and a small read of a Zarr array costs about 6 ms (a PV cell with 190 defects
#: spent 4.5 s on them). Larger maps are read region by region: three maps of 64 Mpx held
#: 0.8 GB (a 533-tile wafer's 33 Mpx maps 0.4 GB at its inspection's peak, for a few seconds
#: of reads saved), and memory is not to grow with the wafer.
IN_MEMORY_MAP_PX = 16_000_000

#: a region whose die-to-die difference stands out of the difference's own noise around it by
#: less than this is the design the neighbouring dies repeat (see ``extract_defects``)
DESIGN_SNR = 3.0
#: Gaussian sigma (model-grid px) of the die-to-die difference read again where it does not
#: stand out (:func:`_measure`): a design finer than that differs from misaligned references
#: at full contrast
FINE_DESIGN_PX = 1.0
#: die-to-die z-score (noise sigmas; a defect is 13) under which a whole region is the design
#: the neighbouring dies repeat
DESIGN_Z = 4.0


def _in_memory(array: Any) -> Any:
    """``array`` as numpy when it is small enough (:data:`IN_MEMORY_MAP_PX`), else as is."""
    if isinstance(array, np.ndarray) or math.prod(array.shape) > IN_MEMORY_MAP_PX:
        return array
    return np.asarray(array[...])


def score_ceiling(threshold: float) -> float:
    """The top of the anomaly map's useful range above a threshold: 1 on a probability map
    (threshold below 1), twice the threshold on the detector's unbounded distance scale
    (threshold 1 and above). Evidence from outside the model (die-to-die, plain surface)
    approaches it, and the borderline band is measured against it."""
    return 1.0 if threshold < 1.0 else 2.0 * float(threshold)


def is_borderline(score: float, threshold: float) -> bool:
    """True when ``score`` is in the lowest :data:`BORDERLINE` of the range threshold..top
    (:func:`score_ceiling`)."""
    return score < threshold + BORDERLINE * (score_ceiling(threshold) - threshold)


@dataclass
class MapGeometry:
    """Where a map lies: stage ``(x, y)`` of the centre of pixel (0, 0), pixel size, stride."""

    origin_um: tuple[float, float]
    pixel_size_um: float
    stride: int


def extent_threshold(anomaly: Any, threshold: float, chunk: int = 1024) -> float:
    """Default low (extent) threshold: halfway from the surface's typical anomaly to ``threshold``.

    The typical level is the median of the map over the inspected area (zeros, outside the
    sample, left out). Half the threshold would do on a quiet surface, but where the surface
    itself scores near it (patterned wafers, textured cells) the extent would flood into the
    surface and join unrelated defects.
    """
    h = int(anomaly.shape[0])
    samples = []
    for r0 in range(0, h, chunk):
        block = np.asarray(anomaly[r0 : r0 + chunk])[::2, ::2]
        samples.append(block[block > 0])
    values = np.concatenate(samples) if samples else np.zeros(0)
    typical = float(np.median(values)) if values.size else 0.0
    return max(threshold / 2, typical + 0.5 * (threshold - typical))


#: side (map pixels) of the blocks whose typical anomaly sets the local extent threshold
EXTENT_BLOCK = 32


def local_extent_thresholds(anomaly: Any, threshold: float, low: float,
                            block: int = EXTENT_BLOCK, chunk: int = 1024) -> np.ndarray:
    """Per ``block`` x ``block`` block of the map: the extent threshold, raised where the
    surface itself scores high (halfway from the block's typical anomaly to ``threshold``,
    the typical being the median over 3 x 3 blocks of the blocks' medians; never under
    ``low``).

    One extent threshold for the whole map takes the typical anomaly of the whole map, most
    of it plain. Where a die's circuitry scores near it (a simulated wafer's dies of 8.5
    mm: median 0.84, 39 % of the die over the extent threshold of 0.90), the extents of
    defects flooded through the die and joined everything in it: one reported box of 7.8 mm
    held a scratch, a stain and a missing pattern. Zeros (off the sample) are left out.
    """
    h, w = (int(n) for n in anomaly.shape)
    hb, wb = -(-h // block), -(-w // block)
    chunk = max(block, chunk // block * block)
    med = np.full((hb, wb), np.nan, dtype=np.float32)
    for r0 in range(0, h, chunk):
        rows = np.asarray(anomaly[r0 : r0 + chunk], dtype=np.float32)
        n = -(-rows.shape[0] // block)
        padded = np.zeros((n * block, wb * block), dtype=np.float32)
        padded[: rows.shape[0], :w] = rows
        blocks = padded.reshape(n, block, wb, block).swapaxes(1, 2).reshape(n, wb, -1)
        blocks = np.where(blocks > 0, blocks, np.nan)
        seen = np.isfinite(blocks).any(axis=2)
        part = np.full((n, wb), np.nan, dtype=np.float32)
        if seen.any():
            part[seen] = np.nanmedian(blocks[seen], axis=1)
        med[r0 // block : r0 // block + n] = part

    filled = np.where(np.isfinite(med), med, 0.0)
    typical = ndimage.median_filter(filled, size=3, mode="nearest")
    return np.maximum(np.float32(low), typical + 0.5 * (threshold - typical)).astype(np.float32)


def threshold_masks(
    anomaly: Any, threshold: float, low: float | np.ndarray, chunk: int = 1024,
    local: np.ndarray | None = None, block: int = EXTENT_BLOCK,
) -> tuple[np.ndarray, np.ndarray]:
    """Boolean ``(anomaly >= low, anomaly >= threshold)`` masks, read chunk row by chunk row.

    ``low``: one extent threshold, or one per ``block`` x ``block`` block
    (:func:`local_extent_thresholds`); it is never above ``threshold``. ``local`` (optional,
    the map's shape) is the decision threshold of each pixel: both thresholds are scaled by
    ``local / threshold`` there.
    """
    h, w = (int(n) for n in anomaly.shape)
    lo = np.zeros((h, w), dtype=bool)
    hi = np.zeros((h, w), dtype=bool)
    per_block = np.ndim(low) == 2
    chunk = max(block, chunk // block * block) if per_block else chunk
    for r0 in range(0, h, chunk):
        part = np.asarray(anomaly[r0 : r0 + chunk])
        if local is not None:
            part = part * (np.float32(threshold) / local[r0 : r0 + chunk])
        if per_block:
            rows = np.asarray(low)[r0 // block : -(-(r0 + part.shape[0]) // block)]
            cut = np.repeat(np.repeat(rows, block, axis=0), block, axis=1)
            lo[r0 : r0 + chunk] = part >= np.minimum(cut[: part.shape[0], :w], threshold)
        else:
            lo[r0 : r0 + chunk] = part >= min(float(low), threshold)
        hi[r0 : r0 + chunk] = part >= threshold
    return lo, hi


def local_thresholds(threshold: float, contexts: Sequence[tuple[np.ndarray, float | None]],
                     shape: tuple[int, int]) -> np.ndarray | None:
    """Per map pixel decision threshold: ``threshold``, lowered where a context applies.

    ``contexts`` are ``(mask, context_threshold)`` pairs (quiet, plain neighbourhoods); a
    pixel gets the lowest threshold of the contexts it is in, never above ``threshold``.
    None when no context lowers anything.
    """
    out = None
    for mask, value in contexts:
        if value is None or value >= threshold or mask is None or not mask.any():
            continue
        if out is None:
            out = np.full(shape, threshold, dtype=np.float32)
        np.minimum(out, np.where(mask, np.float32(value), out), out=out)
    return out


def merge_collinear(labels: np.ndarray, max_angle_deg: float = 10.0,
                    min_elongation: float = 3.0, max_regions: int = 5000) -> np.ndarray:
    """Join line-like labelled regions that continue one another: one scratch seen in pieces.

    A scratch whose contrast fades over a stretch longer than the merging gap (on the
    benchmark coupon a 1.3 mm scratch lost 0.8 mm of its middle) is one defect to a fab,
    not two or three. Two regions are joined when both are elongated
    (``min_elongation``), point the same way (within ``max_angle_deg``), lie on one line
    (each centroid within 2 px or 5 % of their distance of the other's axis) and the gap
    between their ends is no longer than the two together. Returns the labels with joined
    regions sharing one label (unchanged with more than ``max_regions`` line-like regions).
    """
    props = [r for r in measure.regionprops(labels)
             if r.area >= 3 and r.axis_major_length >= 4
             and r.axis_major_length >= min_elongation * max(r.axis_minor_length, 1.0)]
    if not 1 <= len(props) <= max_regions:
        return labels  # nothing to join, or a map of noise (every piece would be a defect)
    tol = math.radians(max_angle_deg)
    parent = {r.label: r.label for r in props}

    def root(k: int) -> int:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    def along(a: float, b: float) -> bool:  # two undirected orientations agree
        d = abs(a - b) % math.pi
        return min(d, math.pi - d) <= tol

    from scipy.spatial import cKDTree

    # only pairs close enough to pass the gap test (dist <= 1.5 (la + lb)): a noisy map may
    # hold thousands of small line-like regions
    reach = 3.0 * max(r.axis_major_length for r in props)
    pairs = cKDTree(np.array([r.centroid for r in props])).query_pairs(reach)
    for i, j in sorted(pairs):
        a, b = props[i], props[j]
        dy, dx = (b.centroid[0] - a.centroid[0], b.centroid[1] - a.centroid[1])
        dist = math.hypot(dy, dx)
        la, lb = a.axis_major_length, b.axis_major_length
        if dist - (la + lb) / 2 > la + lb or dist == 0:
            continue
        # on one line: each centroid near the other's axis (skimage's orientation is the
        # angle from the row axis to the major axis); 5 % of the distance allows a gentle
        # curve, 2 px the pieces' own width
        off = max(2.0, 0.05 * dist)
        if along(a.orientation, b.orientation) and all(
                abs(dy * math.sin(r.orientation) - dx * math.cos(r.orientation)) <= off
                for r in (a, b)):
            parent[root(b.label)] = root(a.label)
    _join_line_ends(labels, props, parent, root)
    lut = np.arange(int(labels.max()) + 1, dtype=labels.dtype)
    for k in parent:
        lut[k] = root(k)
    return lut[labels]


def _join_line_ends(labels: np.ndarray, lines: list[Any], parent: dict[int, int],
                    root: Callable[[int], int]) -> None:
    """Join to a line-like region (``lines``, :func:`merge_collinear`) the small compact
    pieces that continue it beyond one of its ends: a scratch's last few pixels, cut off
    where it crosses a dark street, are too short to have a direction of their own (a
    bright scratch across an array of 48 px dies was reported as itself and, 24 um beyond its
    end, a "particle" of 8 um). A piece joins when its centroid lies on the line's axis
    (within 2 px or 5 % of the distance), beyond the line's end by no more than the line's
    own length, and it is smaller than the line (``parent``, ``root``: the union-find of
    :func:`merge_collinear`, updated in place)."""
    line_labels = {r.label for r in lines}
    small = [r for r in measure.regionprops(labels)
             if r.label not in line_labels and r.axis_major_length < 4]
    if not small or len(small) > 5000:
        return
    for piece in small:
        py, px = piece.centroid
        best = None
        for line in lines:
            if piece.area >= line.area:
                continue
            cy, cx = line.centroid
            # skimage's orientation: the angle from the row axis to the major axis
            uy, ux = math.cos(line.orientation), math.sin(line.orientation)
            t = (py - cy) * uy + (px - cx) * ux  # along the axis
            n = abs(-(py - cy) * ux + (px - cx) * uy)  # across it
            half = line.axis_major_length / 2
            if abs(t) <= half or abs(t) - half > 2 * half:
                continue  # beside the line (the 24 px gap groups that), or too far on
            if n <= max(2.0, 0.05 * math.hypot(py - cy, px - cx)):
                if best is None or abs(t) - half < best[0]:
                    best = (abs(t) - half, line.label)
        if best is not None:
            parent[piece.label] = piece.label
            parent[root(piece.label)] = root(best[1])


def extract_defects(
    maps: dict[str, Any],
    geometry: MapGeometry,
    *,
    threshold: float,
    low: float | None = None,
    min_area_px: float = 4.0,
    merge_px: float = MERGE_PX,
    review_uncertainty: float = DEFAULT_REVIEW_UNCERTAINTY,
    image: Callable[[int, int, int, int], np.ndarray] | None = None,
    local_threshold: np.ndarray | None = None,
    merge_lines: bool = True,
    line_threshold: float | None = None,
    difference: Callable[[int, int, int, int],
                         tuple[np.ndarray, np.ndarray] | None] | None = None,
    dies: tuple[np.ndarray, np.ndarray] | None = None,
) -> list[Defect]:
    """Defects of one set of maps, in stage coordinates.

    Parameters
    ----------
    maps : dict
        ``anomaly``, ``roughness`` and ``uncertainty`` 2-D arrays (numpy or Zarr) on one grid.
    geometry : MapGeometry
        Map origin, pixel size and stride.
    threshold : float
        Decision threshold on the anomaly.
    low : float, optional
        Extent threshold (default :func:`extent_threshold`).
    min_area_px : float
        Smallest defect, in model-grid pixels (area).
    merge_px : float
        Fragments closer than this (model-grid pixels) are one defect.
    review_uncertainty : float
        Uncertainty (at the defect's peak) above which a defect gets ``review=True``.
    image : callable, optional
        ``image(r0, c0, h, w)``: the image on the model grid as relative reflectance
        (``x / level - 1``, level the surface's), for each defect's contrast, centre and
        footprint; without it the contrast is unknown and shape is measured on the map.
    local_threshold : ndarray of float32, optional
        The decision threshold of each map pixel where neighbourhoods have their own (quiet
        and plain ones: :func:`local_thresholds`); the extent threshold is scaled alike.
        Default: ``threshold`` everywhere.
    merge_lines : bool
        Join line-like fragments that continue one another across longer gaps
        (:func:`merge_collinear`).
    line_threshold : float, optional
        Pixels whose line evidence (:func:`models.lines.line_evidence`: the anomaly's mean
        along a short segment) reaches it decide a defect too, as pixels over ``threshold``
        do: a faint scratch whose pixels all score just under the threshold. None: off.
    difference : callable, optional
        ``difference(r0, c0, h, w)``: the die-to-die difference image in the units of
        ``image`` (0: no difference) and its z-scores
        (:func:`scanner.inspection.dietodie.difference_z`), None outside the dies compared. The
        difference is read instead of ``image`` where there is one, so a defect's contrast,
        footprint and centre are its own rather than mixed with the design under it. A region
        where the neighbouring dies show the same (z under :data:`DESIGN_Z` all over it, or a
        difference that does not stand out of its surroundings: SNR under :data:`DESIGN_SNR`)
        is their common design, and is dropped.
    dies : tuple of two boolean arrays, optional
        The map pixels of the dies compared die-to-die, and those of them where the
        neighbouring dies show the same (z under :data:`DESIGN_Z`). A region whose window
        ``difference`` cannot read (it crosses a die's edge, or spans several dies) is their
        common design when every pixel over the threshold lies where the dies repeat and
        none lies where they differ: thin design features at the dies' edges, chained from
        die to die by the extent threshold, made one box over a whole product. A region with
        pixels over the threshold of both kinds is cut into its pieces outside the repeated
        pixels (:func:`_parts`).

    Returns
    -------
    list of Defect
        Sorted by score (highest first), ids 1, 2, ...
    """
    maps = {k: _in_memory(v) for k, v in maps.items()}
    extent: float | np.ndarray
    if low is None:
        low = min(extent_threshold(maps["anomaly"], threshold), threshold)
        extent = local_extent_thresholds(maps["anomaly"], threshold, low)
    else:
        low = extent = min(low, threshold)
    s = geometry.stride
    lo, hi = threshold_masks(maps["anomaly"], threshold, extent, local=local_threshold)
    if line_threshold is not None:
        hi |= lo & line_seeds(maps["anomaly"], line_threshold)
    labels = label_defects(lo, hi, merge_px / s)
    if merge_lines:
        labels = merge_collinear(labels)
    found: list[Defect] = []
    gap = merge_px / s
    for region in measure.regionprops(labels):
        parts = [region] if dies is None else _parts(region, hi, dies[1], gap)
        pieces: list[Defect] = []
        for part in (piece for whole in parts
                     for piece in _peaks(whole, maps["anomaly"], hi, low, threshold, gap)):
            if part.area * s * s < min_area_px:
                continue
            defect = _region_defect(part, maps, geometry, threshold, low, review_uncertainty,
                                    image, local_threshold, difference,
                                    None if dies is None else (hi, *dies))
            if defect is not None:
                pieces.extend(defect)
        found.extend(merge_overlapping(pieces))
    found.sort(key=lambda d: -d.score)
    for k, d in enumerate(found, start=1):
        d.id = k
    return found


def _region_defect(
    region: Any,
    maps: dict[str, Any],
    geometry: MapGeometry,
    threshold: float,
    low: float,
    review_uncertainty: float,
    image: Callable[[int, int, int, int], np.ndarray] | None,
    local_threshold: np.ndarray | None,
    difference: Callable[[int, int, int, int], tuple[np.ndarray, np.ndarray] | None] | None,
    dies: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> list[Defect] | None:
    """One labelled region (``skimage.measure.regionprops``) of :func:`extract_defects` as a
    defect with id 0, or as several where it holds separate spots (:func:`_spots`); None where
    it is the neighbouring dies' common design (``dies``: the map's pixels over the threshold,
    those of the dies compared and those the dies repeat)."""
    s = geometry.stride
    p = geometry.pixel_size_um
    x0, y0 = geometry.origin_um
    r0, c0, r1, c1 = region.bbox
    sub = region.image
    an = np.asarray(maps["anomaly"][r0:r1, c0:c1], dtype=np.float64)
    rough = np.asarray(maps["roughness"][r0:r1, c0:c1], dtype=np.float64)
    unc = np.asarray(maps["uncertainty"][r0:r1, c0:c1], dtype=np.float64)
    weights = np.where(sub, np.clip(an - low, 0, None) + 1e-9, 0.0)
    rr, cc = np.nonzero(sub)
    wsum = weights[rr, cc].sum()
    cy = r0 + float((weights[rr, cc] * rr).sum() / wsum)
    cx = c0 + float((weights[rr, cc] * cc).sum() / wsum)
    m = _measure(sub, region.bbox, s, _Measured(cy, cx, shape_features(sub)), image,
                 difference)
    if m is None or (not m.by_difference and dies is not None
                     and _repeated(sub, region.slice, *dies)):
        return None  # the neighbouring dies show the same: their common design
    shape, cy, cx = m.shape, m.cy, m.cx
    feats = Features(
        area=shape["area"], length=shape["length"], width=shape["width"],
        elongation=shape["elongation"], solidity=shape["solidity"], extent=shape["extent"],
        branches=int(shape["branches"]), tortuosity=shape["tortuosity"],
        skeleton=int(shape["skeleton"]), corners=bool(shape["corners"]),
        contrast=m.contrast, snr=m.snr, resolution=m.resolution, rim=m.rim, body=m.body,
        map_winding=m.map_winding,
    )
    defect_class = classify(feats)
    if defect_class in ("scratch", "crack"):
        cy, cx = _on_skeleton(sub, cy - r0, cx - c0)
        cy, cx = cy + r0, cx + c0
    # the uncertainty where the defect is most anomalous: how sure the model is that
    # there is a defect. Not the mean over the region: a defect's fringe is uncertain by
    # nature (p near 0.5 at any edge), so the mean grew with size and ranked true cracks
    # as less certain than false grain-boundary spots (bench, shipped model: Spearman
    # with "defect is false" 0.49 at the peak, 0.16 as the mean)
    peak = np.unravel_index(int(np.argmax(np.where(sub, an, -np.inf))), an.shape)
    score = float(an[peak])
    uncertainty = float(unc[peak])
    # the threshold that decided at the peak (quiet and plain neighbourhoods have their own)
    applied = (float(local_threshold[r0 + peak[0], c0 + peak[1]])
               if local_threshold is not None else threshold)
    # the box of the map's region is blurred by the network and by the extent threshold; on
    # a die-to-die difference a compact defect's box is that of its own clear deviation (a
    # stain of 494 x 548 um was boxed 600 x 680 um, a pit of 56 um 120 x 80 um). Lines keep
    # the region's box: a faint scratch deviates clearly only in pieces.
    top, left, bottom, right = r0 - 0.5, c0 - 0.5, r1 - 0.5, c1 - 0.5
    area_px = float(region.area)
    size_px = max(shape["feret"], 1.0)
    if m.box is not None and defect_class not in ("scratch", "crack"):
        top, left, bottom, right = m.box
        area_px = m.own_area
        # the size within that box too (a defect boxed 80 x 70 um was 288 um across: the
        # map region's Feret diameter, blur included)
        size_px = min(size_px, max(math.hypot(bottom - top, right - left), 1.0))
    whole = Defect(
        id=0,
        x_um=x0 + cx * p,
        y_um=y0 + cy * p,
        bbox_um=(x0 + left * p, y0 + top * p, x0 + right * p, y0 + bottom * p),
        area_um2=area_px * p * p,
        size_um=size_px * p,
        defect_class=defect_class,
        score=score,
        roughness=float(rough[sub].mean()),
        uncertainty=uncertainty,
        review=bool(uncertainty >= review_uncertainty or is_borderline(score, applied)),
    )
    if not m.spots or (defect_class in ("scratch", "crack") and m.resolution < 1.0):
        return [whole]  # a line seen on the image (its pieces are joined as one line)
    out = []
    for (top, left, bottom, right), (sy, sx), mask in m.spots:
        # each spot's score and uncertainty: the map's peak in the region nearest the spot
        near = np.zeros_like(sub)
        near[max(int(math.floor(top)) - r0, 0):max(int(math.ceil(bottom)) - r0 + 1, 0),
             max(int(math.floor(left)) - c0, 0):max(int(math.ceil(right)) - c0 + 1, 0)] = True
        near &= sub
        if not near.any():
            near = sub
        k = np.unravel_index(int(np.argmax(np.where(near, an, -np.inf))), an.shape)
        f = shape_features(mask)
        spot_class = classify(replace(feats, area=f["area"], length=f["length"],
                                      width=f["width"], elongation=f["elongation"],
                                      solidity=f["solidity"], extent=f["extent"],
                                      branches=int(f["branches"]), tortuosity=f["tortuosity"],
                                      skeleton=int(f["skeleton"]), corners=bool(f["corners"]),
                                      resolution=1.0 / s, map_winding=False))
        spot_score, spot_unc = float(an[k]), float(unc[k])
        out.append(replace(
            whole, x_um=x0 + sx * p, y_um=y0 + sy * p,
            bbox_um=(x0 + left * p, y0 + top * p, x0 + right * p, y0 + bottom * p),
            area_um2=float(mask.sum()) / (s * s) * p * p,
            size_um=max(f["feret"] / s, 1.0) * p, defect_class=spot_class, score=spot_score,
            uncertainty=spot_unc,
            review=bool(spot_unc >= review_uncertainty or is_borderline(spot_score, applied))))
    return out


#: two defects of one map region are one when this share of the smaller one's box lies in
#: the other's (:func:`merge_overlapping`)
OVERLAP_SHARE = 0.5


def merge_overlapping(defects: list[Defect]) -> list[Defect]:
    """The defects of one map region with the pieces of one defect joined: two whose boxes
    overlap by :data:`OVERLAP_SHARE` of the smaller box are one, boxed over both, with the
    larger one's class and centre and the higher score.

    A large defect is cut into parts on the map (its strong peaks, its pixels the compared
    dies repeat), and each part measured again on the image or difference around it boxes
    the same deviation: a smudge over most of a 224 px die was reported as a 212 x 208 px
    "crack" and a 132 x 132 px "particle" inside it (probe P22). Separate defects of one
    region (a cluster's spots, two defects whose blurred tails joined) are boxed apart.
    """
    out = sorted(defects, key=lambda d: -_box_area(d.bbox_um))
    merged = True
    while merged and len(out) > 1:
        merged = False
        for i in range(len(out)):
            for j in range(i + 1, len(out)):
                a, b = out[i], out[j]
                share = _box_overlap(a.bbox_um, b.bbox_um) / max(
                    min(_box_area(a.bbox_um), _box_area(b.bbox_um)), 1e-12)
                if share >= OVERLAP_SHARE:
                    top = a if a.score >= b.score else b
                    out[i] = replace(
                        a, bbox_um=(min(a.bbox_um[0], b.bbox_um[0]),
                                    min(a.bbox_um[1], b.bbox_um[1]),
                                    max(a.bbox_um[2], b.bbox_um[2]),
                                    max(a.bbox_um[3], b.bbox_um[3])),
                        area_um2=max(a.area_um2, b.area_um2), size_um=max(a.size_um, b.size_um),
                        score=top.score, uncertainty=top.uncertainty,
                        review=top.review)
                    del out[j]
                    merged = True
                    break
            if merged:
                break
    return out


def _box_area(b: tuple[float, float, float, float]) -> float:
    return max(b[2] - b[0], 0.0) * max(b[3] - b[1], 0.0)


def _box_overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]
                 ) -> float:
    return (max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
            * max(min(a[3], b[3]) - max(a[1], b[1]), 0.0))


@dataclass
class _Part:
    """A piece of a labelled region, with what :func:`_region_defect` reads of a region."""

    bbox: tuple[int, int, int, int]
    image: np.ndarray
    area: float
    slice: tuple[slice, slice]


def _parts(region: Any, over: np.ndarray, repeated: np.ndarray, merge_map_px: float
           ) -> list[Any]:
    """``region`` as it is, or, when some of its pixels over the threshold lie where the
    compared dies repeat one another and others do not, its pieces outside the repeated
    pixels that hold one of the others (grouped across gaps as :func:`label_defects` groups
    fragments, and pieces of one line joined): design features of every die chained by the
    extent threshold to real defects made one box over a whole product (a horse die grid: 4
    reported boxes for 22 defects)."""
    where = region.slice
    same = repeated[where] & region.image
    seeds = region.image & over[where]
    if not (seeds & same).any() or not (seeds & ~same).any():
        return [region]
    # the pieces of one line stay one (:func:`merge_collinear`): a scratch crossing a street,
    # where it is faint and the dies repeat one another, was two defects (probe P22: a
    # 555 um scratch over three dies, cut at the second street)
    return _labelled_parts(merge_collinear(label_defects(region.image & ~same, seeds & ~same,
                                                         merge_map_px)), where)


def _labelled_parts(labels: np.ndarray, where: tuple[slice, slice]) -> list[_Part]:
    """One part per label of ``labels`` (a region's box, at ``where`` on the map)."""
    r0, c0 = where[0].start, where[1].start
    out = []
    for k, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        image = labels[sl] == k
        bbox = (r0 + sl[0].start, c0 + sl[1].start, r0 + sl[0].stop, c0 + sl[1].stop)
        out.append(_Part(bbox, image, float(image.sum()),
                         (slice(bbox[0], bbox[2]), slice(bbox[1], bbox[3]))))
    return out


#: groups of a region farther apart than the merging gap are parts of their own when each
#: peaks this far up the range from the threshold to :func:`score_ceiling` (:func:`_apart`):
#: two clear defects (a spot and a particle at 0.87-0.98 of the range on a photographed
#: product), while the faint pieces of a PV stain (0.18-0.33 beside 0.86-3.3) stay one
APART_STRONG = 0.5

#: a strong defect's own extent, to tell two defects apart whose blurred tails join: the
#: pixels over this fraction of the way from the extent threshold to the region's peak
#: (:func:`_peaks`)
PEAK_EXTENT = 0.25


def _peaks(region: Any, anomaly: np.ndarray, over: np.ndarray, low: float, threshold: float,
           merge_map_px: float) -> list[Any]:
    """``region`` as it is, or, when it holds strong defects whose blurred tails the extent
    threshold joined, one part per defect.

    The extent threshold lies just above the surface's typical score; a defect scoring
    several times the threshold keeps its network-blurred tail over it far around (on a
    polished, nearly featureless part a 17 px particle at 4.6 times the threshold was boxed
    120 x 100 px), and defects 40-100 px apart became one box. Where the region's peak lies
    so high that :data:`PEAK_EXTENT` of the way from the extent threshold to it is over the
    decision threshold, the pixels over that level are grouped as fragments are
    (:func:`label_defects`, :func:`merge_collinear`: a scratch that fades in places stays
    one); with two groups or more, each pixel of the region goes to the nearest group.
    Before that, groups of pixels over the decision threshold farther apart than
    ``merge_map_px`` are parts of their own whatever the peak (:func:`_apart`).
    """
    return [piece for part in _apart(region, anomaly, over, threshold, merge_map_px)
            for piece in _strong_peaks(part, anomaly, over, low, threshold, merge_map_px)]


def _apart(region: Any, anomaly: np.ndarray, over: np.ndarray, threshold: float,
           merge_map_px: float) -> list[Any]:
    """``region`` as it is, or, when its pixels over the threshold (``over``) form groups
    farther apart than ``merge_map_px`` that the extent threshold joined, and two or more of
    them peak in the upper half of the range over ``threshold`` (:data:`APART_STRONG`), one
    part per such group, each pixel of the region going to the nearest.

    :func:`label_defects` groups regions of the extent threshold: a dark spot 2 times over
    the threshold whose nearest pixels over it lay 7 map px from a bright particle's, their
    blurred tails touching, was one region with the particle, measured and boxed as the
    particle, and lost. Groups whose nearest pixels lie within ``merge_map_px`` stay one,
    and so do groups along one line (:func:`merge_collinear`, :func:`join_line_pieces`: a
    scratch that fades in places, seen in pieces, stays one defect).
    """
    where = region.slice
    sub = region.image
    seeds = sub & over[where]
    groups, n = ndimage.label(seeds, structure=np.ones((3, 3), dtype=bool))
    if n < 2:
        return [region]
    # groups whose nearest pixels lie within the merging distance are one (label_defects
    # grows each by half the distance rounded up, which joins pixels 7-8 px apart); the
    # nearest pixels of two groups are on their edges
    edge = seeds & ~ndimage.binary_erosion(seeds, structure=np.ones((3, 3), dtype=bool))
    pts = np.argwhere(edge)
    owner = groups[edge]
    pairs = cKDTree(pts).query_pairs(merge_map_px, output_type="ndarray")
    a, b = owner[pairs[:, 0]], owner[pairs[:, 1]]
    graph = coo_matrix((np.ones(a.size, dtype=np.int8), (a, b)), shape=(n + 1, n + 1))
    _, joined = connected_components(graph, directed=False)
    lut = np.zeros(n + 1, dtype=np.int32)
    lut[1:] = joined[1:] + 1
    groups = merge_collinear(lut[groups])
    # only groups in the upper half of the range over the threshold are defects of their own
    # (:data:`APART_STRONG`); a weaker one stays with the nearest: a defect's fringe crossing
    # the threshold in places (a coin die's missing pattern gave off a "crack" 114 um away,
    # scoring 1.16 against 1.13), or a fragment of a faint extended one (a PV stain's pieces
    # at 0.2-0.3 of the range, split off and called a crack)
    peaks = ndimage.maximum(np.asarray(anomaly[where], dtype=np.float32), groups,
                            np.arange(1, int(groups.max()) + 1))
    strong = threshold + APART_STRONG * (score_ceiling(threshold) - threshold)
    clear = np.zeros(int(groups.max()) + 1, dtype=bool)
    clear[1:] = np.atleast_1d(peaks) >= strong
    groups = np.where(clear[groups], groups, 0)
    if len(np.unique(groups[groups > 0])) < 2:
        return [region]
    return _nearest_parts(region, groups)


def _nearest_parts(region: Any, groups: np.ndarray) -> list[Any]:
    """The pixels of ``region`` shared among the labelled ``groups`` (in its box), each
    going to the nearest group, with the pieces of one line joined (:func:`join_line_pieces`);
    ``region`` as it is when that leaves one part."""
    _, (ii, jj) = ndimage.distance_transform_edt(groups == 0, return_indices=True)
    parts = join_line_pieces(np.where(region.image, groups[ii, jj], 0), groups)
    if len(np.unique(parts[parts > 0])) < 2:
        return [region]
    return _labelled_parts(parts, region.slice)


def _strong_peaks(region: Any, anomaly: np.ndarray, over: np.ndarray, low: float,
                  threshold: float, merge_map_px: float) -> list[Any]:
    """``region`` split among its strong defects (:func:`_peaks`)."""
    where = region.slice
    sub = region.image
    a = np.asarray(anomaly[where], dtype=np.float32)
    peak = float(a[sub].max())
    cut = low + PEAK_EXTENT * (peak - low)
    if cut <= threshold:
        return [region]
    strong = sub & (a >= cut)
    groups = merge_collinear(label_defects(strong, strong & over[where], merge_map_px))
    if len(np.unique(groups[groups > 0])) < 2:
        return [region]
    return _nearest_parts(region, groups)


#: a piece is line-like from this length / width on (:func:`join_line_pieces`)
PIECE_ELONGATION = 2.0
#: two pieces lie end to end when their union is longer than the longer one by at least
#: this share of the shorter one's length (for lines of equal length: 1.0 in line, 0.96
#: bent by 20 degrees, 0.41 at a right angle, 0.29 side by side half overlapping, 0 or
#: less crossing)
END_TO_END = 0.5


def _axes(mask: np.ndarray) -> tuple[float, float]:
    """Major and minor axis lengths (px) of ``mask``'s pixels as one region."""
    (props,) = measure.regionprops(mask.astype(np.uint8))
    return float(props.axis_major_length), max(float(props.axis_minor_length), 1.0)


def join_line_pieces(parts: np.ndarray, cores: np.ndarray) -> np.ndarray:
    """Join the touching parts of one region that are pieces of one line.

    ``parts`` labels a region's pixels by the strong group nearest each, ``cores`` labels
    those groups (:func:`_peaks`). A scratch whose contrast varies along it holds several
    strong groups, and cut between them its pieces are short and broad, their orientations
    15-20 degrees apart (a 335 um scratch on the plain coupon was reported as three
    defects), too rough for :func:`merge_collinear`. Two touching parts are one line when
    both they and their strong groups are line-like (:data:`PIECE_ELONGATION`) and they lie
    end to end (:data:`END_TO_END`). Compact spots whose tails
    join, a particle on a scratch, and lines side by side or crossing do not pass.
    Returns the labels with joined parts sharing one label.
    """
    labels = [int(k) for k in np.unique(parts[parts > 0])]
    line_like: dict[int, float] = {}  # the line-like parts' lengths
    for k in labels:
        (major, minor), (cmajor, cminor) = _axes(parts == k), _axes(cores == k)
        if min(major / minor, cmajor / cminor) >= PIECE_ELONGATION:
            line_like[k] = major
    out = parts.copy()
    for i, a in enumerate(labels):
        if a not in line_like:
            continue
        grown = ndimage.binary_dilation(parts == a, structure=np.ones((3, 3)))
        for b in labels[i + 1:]:
            if b not in line_like or not (grown & (parts == b)).any():
                continue
            ma, mb = line_like[a], line_like[b]
            union, _ = _axes((parts == a) | (parts == b))
            if union - max(ma, mb) >= END_TO_END * min(ma, mb):
                out[out == out[parts == b][0]] = out[parts == a][0]
    return out


def _repeated(sub: np.ndarray, where: tuple[slice, slice], over: np.ndarray,
              compared: np.ndarray, repeated: np.ndarray) -> bool:
    """Whether a region (``sub`` at ``where`` on the map) is the dies' common design: its
    pixels ``over`` the threshold all lie where the compared dies repeat one another, and
    none of its pixels lies where they differ."""
    seeds = sub & over[where]
    same = repeated[where]
    return bool(seeds.any() and same[seeds].all()
                and not (sub & compared[where] & ~same).any())


@dataclass
class _Measured:
    """A region's centre (map pixels) and shape, and what its image says: contrast, noise,
    rim and body (NaN without an image), the resolution its shape was measured at (map
    pixels per pixel), whether the map region winds (its footprint is one piece only) and
    the box and area of what deviates clearly on a die-to-die difference."""

    cy: float
    cx: float
    shape: dict[str, Any]
    contrast: float = math.nan
    snr: float = math.nan
    rim: float = math.nan
    body: float = math.nan
    resolution: float = 1.0
    map_winding: bool = False
    #: ``(top, left, bottom, right)`` edges (map pixels) of what deviates clearly on a
    #: die-to-die difference: the defect without the blur around it (None elsewhere)
    box: tuple[float, float, float, float] | None = None
    own_area: float = math.nan  # its pixels' area (map pixels)
    by_difference: bool = False  # measured on a die-to-die difference
    #: separate compact spots of one region (:func:`_spots`): ``(top, left, bottom, right)``
    #: box edges and ``(cy, cx)`` centre (map pixels) and the spot's mask (model-grid pixels)
    #: of each; empty when the region is one defect
    spots: list[tuple[tuple[float, float, float, float], tuple[float, float], np.ndarray]] \
        = field(default_factory=list)


def _measure(sub: np.ndarray, bbox: tuple[int, int, int, int], s: int, m: _Measured,
             image: Callable[[int, int, int, int], np.ndarray] | None,
             difference: Callable[[int, int, int, int],
                                  tuple[np.ndarray, np.ndarray] | None] | None,
             ) -> _Measured | None:
    """``m`` measured again on the region's die-to-die difference or image around it, where
    there is one (contrast, centre, footprint); None where the difference shows the
    neighbouring dies' common design."""
    r0, c0, r1, c1 = bbox
    margin = min(max(2, int(round(0.5 * max(r1 - r0, c1 - c0)))), 8) + 2
    pr0, pc0 = (r0 - margin) * s, (c0 - margin) * s
    ph, pw = (r1 - r0 + 2 * margin) * s, (c1 - c0 + 2 * margin) * s
    compared = difference(pr0, pc0, ph, pw) if difference is not None else None
    inside = np.zeros((r1 - r0 + 2 * margin, c1 - c0 + 2 * margin), dtype=bool)
    inside[margin : margin + r1 - r0, margin : margin + c1 - c0] = sub
    inside = np.repeat(np.repeat(inside, s, axis=0), s, axis=1)
    ring_px = min(max(2, margin * s // 2), 24)
    look = None
    if compared is not None:
        z_all = np.asarray(compared[1], dtype=np.float32)
        z_in = z_all[inside]
        # a window reaching past the die's border (NaN there): near a die's border the
        # z-scores are the smaller of two (the die mirrored, the die in its neighbours'
        # context) and say less; where they do not show the region, the image does
        past_die = bool(np.isnan(z_all).any())
        # the window's parts in other compared dies (their z-scores NaN: the die's own
        # decide) only box a defect that crosses a street; the rest is the die's own part
        whole = np.nan_to_num(np.asarray(compared[0], dtype=np.float32))
        diff = np.where(np.isnan(z_all), np.float32(0.0), whole) if past_die else whole
        look = appearance(diff, inside, ring_px)
        if math.isfinite(look.snr) and look.snr < DESIGN_SNR:
            # a design finer than two pixels (a grating) differs from its references by a
            # fraction of a pixel of misalignment at full contrast, all around a defect: a
            # 367 um missing pattern in a grating (z 22) stood out of that by 1.9 noise
            # widths, and of the difference smoothed over a pixel by 15
            diff = ndimage.gaussian_filter(diff, FINE_DESIGN_PX)
            whole = ndimage.gaussian_filter(whole, FINE_DESIGN_PX)
            look = appearance(diff, inside, ring_px)
        if float(np.nanmax(z_in, initial=0.0)) < DESIGN_Z \
                or (math.isfinite(look.snr) and look.snr < DESIGN_SNR):
            if not past_die:
                return None  # the neighbouring dies show the same: their common design
            compared = look = None  # the die's part does not show it: the image says
        else:
            compared = (diff, compared[1])
    patch = compared[0] if compared is not None else None
    if patch is None and image is not None:
        patch = image(pr0, pc0, ph, pw)
    if patch is None:
        return m
    patch = np.asarray(patch, dtype=np.float32)
    if look is None:
        look = appearance(patch, inside, ring_px)
    m.contrast, m.snr, m.rim, m.body = look.contrast, look.snr, look.rim, look.body
    m.by_difference = compared is not None
    if look.centre is not None:  # model-grid pixel -> map pixel coordinates
        m.cy = (pr0 + look.centre[0] - (s - 1) / 2) / s
        m.cx = (pc0 + look.centre[1] - (s - 1) / 2) / s
    if look.snr >= 5:  # several equal spots have no footprint (none is the largest by far)
        m.spots = _spots(patch, inside, look, pr0, pc0, s)
    if look.footprint is not None:  # the class from the defect itself, not its blur
        fine = shape_features(look.footprint)
        # size stays the map region's, and so does the course of the whole defect:
        # the footprint is its largest piece only (one branch of a crack)
        m.map_winding = m.shape["tortuosity"] >= 1.2 or m.shape["branches"] >= 2
        m.shape = {**fine, "feret": m.shape["feret"]}
        m.resolution = 1.0 / s
        if compared is not None:
            # every clear deviation of either sign in the region: a missing pattern's
            # difference is the design's own structure, of both signs, of which the
            # footprint is one piece, and two defects a few pixels apart make one region
            # (against the ring that the contrast was measured against)
            # (``whole``: the window's parts in other compared dies too, a stain across a
            # street)
            clear = np.abs(whole - look.background) >= max(3 * look.noise,
                                                           0.3 * abs(look.contrast))
            own = look.footprint | (inside & clear)
            m.cy, m.cx = _own_centre(whole, own, look, pr0, pc0, s, (m.cy, m.cx))
            m.own_area = float(own.sum()) / (s * s)
            m.box = _map_box(own, pr0, pc0, s)
    return m


def _map_box(own: np.ndarray, pr0: int, pc0: int, s: int) -> tuple[float, float, float, float]:
    """The box ``(top, left, bottom, right)`` in map pixel coordinates of the pixels ``own``
    of a patch read at model-grid pixel ``(pr0, pc0)`` (``s`` model-grid pixels a map pixel)."""
    rows, cols = np.nonzero(own)
    edge = (s - 1) / 2 + 0.5  # model-grid pixel edges -> map pixel coordinates
    return ((pr0 + rows.min() - edge) / s, (pc0 + cols.min() - edge) / s,
            (pr0 + rows.max() + 1 - edge) / s, (pc0 + cols.max() + 1 - edge) / s)


def _own_centre(patch: np.ndarray, own: np.ndarray, look: Any, pr0: int, pc0: int, s: int,
                centre: tuple[float, float]) -> tuple[float, float]:
    """The centre (map pixels) of a defect on a die-to-die difference: of the clear
    deviation of either sign (``own``) joined to its footprint, each pixel weighted by its
    deviation up to half the contrast.

    The footprint is the strongest piece of one sign: a missing pattern's difference is the
    design it lacks, and where that was brightest (a photograph die's bright edge along one
    side of a 32 px hole) drew its centre 9 px off the hole's (0.6 px now). Pieces of
    ``own`` not joined to the footprint (another die's mark in the map's region) are left
    out, as the centre of :func:`appearance` leaves them out.
    """
    labels, _ = ndimage.label(own, structure=np.ones((3, 3), dtype=bool))
    keep = np.unique(labels[look.footprint & own])
    piece = np.isin(labels, keep[keep > 0])
    if not piece.any():
        return centre
    rows, cols = np.nonzero(piece)
    w = np.minimum(np.abs(patch[rows, cols] - look.background), 0.5 * abs(look.contrast))
    if not float(w.sum()) > 0:
        return centre
    cy = float((w * rows).sum() / w.sum())
    cx = float((w * cols).sum() / w.sum())
    return (pr0 + cy - (s - 1) / 2) / s, (pc0 + cx - (s - 1) / 2) / s


#: separate spots (:func:`_spots`): each holds at least this many model-grid pixels over
#: :data:`SPOT_CORE` of the region's contrast, is at most this long for its width (a piece of
#: a line is no spot) and fills this share of its convex hull
SPOT_MIN_PX = 6
SPOT_MAX_ELONGATION = 2.5
SPOT_MIN_SOLIDITY = 0.6
SPOT_MAX_COUNT = 12
#: a spot lies at least this far (model-grid pixels) from the next one (:func:`_spots`)
SPOT_MIN_GAP_PX = 6.0
#: a spot's core: its pixels over this share of the region's contrast
SPOT_CORE = 0.4
#: spots are apart when the deviation between them falls under this share of the region's
#: contrast (a saddle): a stain, or a missing pattern's difference (the design it lacks),
#: deviates between its strongest parts too
SPOT_SADDLE = 0.15


def _spots(patch: np.ndarray, inside: np.ndarray, look: Any, pr0: int, pc0: int, s: int
           ) -> list[tuple[tuple[float, float, float, float], tuple[float, float], np.ndarray]]:
    """Separate compact spots in one map region, each a defect of its own.

    The network's features reach 16-32 px, so a cluster of particles 15-30 px apart is one
    region on the map (a 2 x 2 cluster of 9 px spots 20 px apart was reported as one
    "particle" boxed 48 x 48 px), while a fab's defect list (KLARF) lists each particle with
    its own size and leaves grouping them into a cluster to its spatial analysis. The
    region's deviation of its sign is cut where it falls under :data:`SPOT_SADDLE` of its
    contrast (and 3 noise widths); it is several spots when that leaves 2 to
    :data:`SPOT_MAX_COUNT` pieces holding a core (:data:`SPOT_CORE`, :data:`SPOT_MIN_PX`),
    each compact (:data:`SPOT_MAX_ELONGATION`, :data:`SPOT_MIN_SOLIDITY`) and no wider than
    the merging gap (:data:`MERGE_PX`: larger parts the map itself tells apart; the quarters
    of a stain over a street crossing, where the dark street hides it, are one stain), no
    other piece as large as a spot without a core (a faint part of one extended defect), and
    no strong deviation of the other sign (a missing pattern's difference is the design it
    lacks, of both signs). Returns each spot's box edges and centre (map pixels) and mask (``patch``
    pixels); empty when the region is one defect.
    """
    sign = math.copysign(1.0, look.contrast)
    dev = (patch - look.background) * sign
    core = inside & (dev > max(4 * look.noise, SPOT_CORE * abs(look.contrast)))
    if (inside & (-dev > max(4 * look.noise, SPOT_CORE * abs(look.contrast)))).any():
        return []
    low = inside & (dev > max(3 * look.noise, SPOT_SADDLE * abs(look.contrast)))
    labels, n = ndimage.label(low, structure=np.ones((3, 3), dtype=bool))
    if not 2 <= n <= 4 * SPOT_MAX_COUNT:
        return []
    cores = ndimage.sum(core, labels, np.arange(1, n + 1))
    sizes = ndimage.sum(low, labels, np.arange(1, n + 1))
    spots = [k + 1 for k in range(n) if cores[k] >= SPOT_MIN_PX]
    if not 2 <= len(spots) <= SPOT_MAX_COUNT:
        return []
    if any(cores[k] < SPOT_MIN_PX and sizes[k] >= min(sizes[j - 1] for j in spots)
           for k in range(n)):
        return []
    objects = ndimage.find_objects(labels)
    for k in spots:
        f = shape_features(labels[objects[k - 1]] == k)
        if f["elongation"] > SPOT_MAX_ELONGATION or f["solidity"] < SPOT_MIN_SOLIDITY \
                or f["feret"] > MERGE_PX:
            return []
    # spots a few pixels apart are one defect: a field of missing vias (11 px apart, 3 px of
    # gap at half their depth) was reported as five "particles"
    held = np.isin(labels, spots)
    for k in spots:
        own = labels == k
        if ndimage.distance_transform_edt(~(held & ~own))[own].min() < SPOT_MIN_GAP_PX:
            return []
    out = []
    for k in spots:
        own = labels == k
        rows, cols = np.nonzero(own)
        w = dev[rows, cols]
        cy, cx = float((w * rows).sum() / w.sum()), float((w * cols).sum() / w.sum())
        centre = ((pr0 + cy - (s - 1) / 2) / s, (pc0 + cx - (s - 1) / 2) / s)
        out.append((_map_box(own, pr0, pc0, s), centre, own & (dev > 0.5 * float(dev[own].max()))))
    return out


def _on_skeleton(mask: np.ndarray, cy: float, cx: float) -> tuple[float, float]:
    """The point of a line-like region's skeleton nearest to ``(cy, cx)``.

    The centroid of a curved scratch or a crack may lie off the defect; its centre is
    reported on the defect itself.
    """
    skel = morphology.skeletonize(mask)
    rr, cc = np.nonzero(skel)
    if rr.size == 0:
        return cy, cx
    k = int(np.argmin((rr - cy) ** 2 + (cc - cx) ** 2))
    if math.hypot(rr[k] - cy, cc[k] - cx) <= 1.0:
        return cy, cx
    return float(rr[k]), float(cc[k])
