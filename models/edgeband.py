"""The border of the good surface, calibrated apart from the rest.

Near the border of a part (a sample's edge in a scan, an image file's border) a patch's
features reach over the edge: onto what lies beyond, onto the mirrored context the windows
add, or onto the sliver of unscanned pixels a stage leaves. The bank holds such patches, but
fewer and more varied than the surface inside, so a new copy of the part scores higher there.
The threshold is calibrated on the centre of one good image (a corner would set it alone,
see :func:`models.build._split_image`), which holds no border: on a plain textured coupon
(1.2 mm, scanned as an image sample at 1 um, model built from one good scan) a second good
scan's map peaked at 1.03 inside and 1.26-1.28 within 8-32 um of the edge, over a threshold
of 1.19; 2-3 false defects per scan, all on the border.

So the border gets its own calibration: the band of :data:`EDGE_CELLS` cells along the usable
area's border is held out in the middle half of each side (never a corner, for the reason
above), its held-out scores are compared with those of the surface inside, and the ratio
(:func:`edge_factor`, at least 1) is what inspection divides the band's anomaly map by. Built
from many images (whole images held out), the held-out images' own bands serve.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .backbone import FEATURE_STRIDE

#: width of the border band in stride-8 feature cells (64 input pixels): the rise measured
#: above reached 32-64 um from the edge at 1 um per pixel
EDGE_CELLS = 8
#: held-out cells needed on each side of the comparison, border and inside
MIN_CELLS = 64
#: the quantile of held-out anomaly values compared (the largest would let one dust particle
#: on the good part's border set the band's factor)
QUANTILE = 0.999


def band(usable: np.ndarray, image_border: bool = True, cells: int = EDGE_CELLS
         ) -> np.ndarray:
    """Usable cells within ``cells`` cells of the usable area's border, and of the image's
    unless ``image_border`` is false (a crop of a larger image: its border is no edge);
    chessboard distance, the eight neighbours of an outside cell at 1."""
    u = np.asarray(usable, dtype=bool)
    if not (~u).any() and not image_border:
        return np.zeros_like(u)
    d = ndimage.distance_transform_cdt(np.pad(u, 1, constant_values=not image_border),
                                       metric="chessboard")[1:-1, 1:-1]
    return u & (d <= cells)


def held_segments(edge: np.ndarray, rows: slice, cols: slice) -> np.ndarray:
    """The cells of an image's border band ``edge`` (:func:`band`) held out: those in the
    middle half of the rows or of the columns (``rows``, ``cols``: the central block held out
    beside them), so the middle half of each side of a rectangle and never a corner, which no
    other part of the image shows."""
    cross = np.zeros(edge.shape, dtype=bool)
    cross[rows, :] = True
    cross[:, cols] = True
    cross[rows, cols] = False
    return edge & cross


def edge_factor(inside: np.ndarray, edge: np.ndarray) -> dict[str, float] | None:
    """The band's calibration from held-out anomaly values inside and on the border.

    Parameters
    ----------
    inside, edge : ndarray
        Held-out cells' scores (nearest-bank distance / score reference) inside the usable
        area and in its border band.

    Returns
    -------
    dict or None
        ``{"band_px", "factor", "edge_quantile", "inside_quantile", "edge_cells"}``
        (``factor``: the ratio of the :data:`QUANTILE` s, at least 1), or None when either
        side holds fewer than :data:`MIN_CELLS` cells.
    """
    if inside.size < MIN_CELLS or edge.size < MIN_CELLS:
        return None
    q_in = float(np.quantile(inside, QUANTILE))
    q_edge = float(np.quantile(edge, QUANTILE))
    if q_in <= 0:
        return None
    return {"band_px": EDGE_CELLS * FEATURE_STRIDE, "factor": round(max(1.0, q_edge / q_in), 4),
            "edge_quantile": round(q_edge, 4), "inside_quantile": round(q_in, 4),
            "edge_cells": int(edge.size)}


def card_band(card: dict | None) -> tuple[int, float] | None:
    """``(band_px, factor)`` of a detector card whose border band scores higher than its
    inside (factor above 1), else None."""
    edge = ((card or {}).get("calibration") or {}).get("edge") or {}
    factor = float(edge.get("factor", 1.0))
    return (int(edge["band_px"]), factor) if factor > 1.0 and edge.get("band_px") else None


def calibrated_band(anomaly: np.ndarray, uncertainty: np.ndarray | None, band_mask: np.ndarray,
                    factor: float, threshold: float, log_scale: float) -> None:
    """Divide the anomaly map by the band's ``factor`` where ``band_mask`` is true, in place,
    and recompute the uncertainty there (entropy of the defect probability, centred on
    ``threshold``: :meth:`models.detector.PatchDetector.uncertainty`)."""
    if not band_mask.any():
        return
    anomaly[band_mask] /= np.float32(factor)
    if uncertainty is not None:
        import torch

        from .detector import uncertainty_bits

        uncertainty[band_mask] = uncertainty_bits(torch.from_numpy(anomaly[band_mask]),
                                                  threshold, log_scale).numpy()
