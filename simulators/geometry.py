"""Sample outlines in stage coordinates, from a recipe's sample section alone.

The sample is read by attribute (``kind``, ``diameter_mm``, ``center_um``...: the validated
``sample:`` section of ``scanner.recipe``), so this module needs nothing above it: the planner
(``scanner.geometry`` re-exports it) and the simulated focal surface (``devices``) share it.

Coordinates are stage micrometres; x grows with the image column and y with the image row, so
a wafer's notch or flat "at 6 o'clock" lies towards +y.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from shapely.geometry import Polygon, box

from .errors import UserError, first_line
from .picture import main_series, picture_shape, tiff_image_axes


def image_shape(path: Path) -> tuple[int, int]:
    """(rows, cols) of an image file, read from its header only."""
    if Path(path).is_dir():
        raise UserError(f"sample.path: {path} is a folder, not an image file")
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                series = main_series(tif)
                shape = series.shape
                # the spatial axes (a colour or sample axis may come last or first)
                axes = tiff_image_axes(series)
            return int(shape[axes.index("Y")]), int(shape[axes.index("X")])
        return picture_shape(path)
    except FileNotFoundError:
        raise UserError(f"sample.path: file not found: {path}") from None
    except Exception as exc:
        raise UserError(f"sample.path: cannot read image {path}: {first_line(exc)}") from None


def wafer_outline(
    diameter_mm: float,
    orientation: str,
    flat_length_mm: float,
    center_um: tuple[float, float],
    shrink_mm: float = 0.0,
    n_vertices: int = 360,
    notch_depth_mm: float = 1.0,
) -> Polygon:
    """Wafer outline (optionally shrunk by an edge exclusion) with its flat or notch towards +y.

    The notch is a V of 90° opening, ``notch_depth_mm`` deep (SEMI M1: 1 mm); the edge
    exclusion follows it (its apex moves in by ``shrink * sqrt(2)``).
    """
    full_r = diameter_mm * 500.0
    radius = full_r - shrink_mm * 1000.0
    cx, cy = center_um
    angles = np.linspace(0, 2 * math.pi, n_vertices, endpoint=False)
    circle = Polygon(np.c_[cx + radius * np.cos(angles), cy + radius * np.sin(angles)])
    if orientation == "flat":
        half = min(flat_length_mm * 500.0, full_r * 0.99)
        flat_y = math.sqrt(full_r**2 - half**2) - shrink_mm * 1000.0
        circle = circle.intersection(box(cx - full_r, cy - full_r, cx + full_r, cy + flat_y))
    elif orientation == "notch" and notch_depth_mm > 0:
        depth = min(notch_depth_mm * 1000.0, 0.5 * full_r)
        apex = full_r - depth - shrink_mm * 1000.0 * math.sqrt(2)
        notch = Polygon([(cx, cy + apex), (cx - 2 * full_r, cy + apex + 2 * full_r),
                         (cx + 2 * full_r, cy + apex + 2 * full_r)])
        circle = circle.difference(notch)
    return circle


def place(polygon: Polygon, sample: object, alignment: dict | None) -> Polygon:
    """A nominal outline moved where the alignment found the sample (itself without one).

    The sample is turned about its nominal centre by the measured rotation and shifted to
    its measured centre (``scanner.acquisition.align``'s record in ``scan.json``).
    """
    if not alignment:
        return polygon
    from shapely import affinity

    nx, ny = (float(v) for v in alignment["nominal_center_um"])
    cx, cy = (float(v) for v in alignment["center_um"])
    turned = affinity.rotate(polygon, float(alignment.get("rotation_deg", 0.0)),
                             origin=(nx, ny), use_radians=False)
    return affinity.translate(turned, cx - nx, cy - ny)


def usable_polygon(sample: object, notch: bool = True,
                   alignment: dict | None = None) -> Polygon:
    """The area of a recipe's sample that is to be scanned, as a shapely polygon (µm).

    Parameters
    ----------
    sample : object
        Validated ``sample:`` section (``scanner.recipe``'s ``WaferSample``, ``PVCellSample``,
        ``ImageSample`` or ``RectangleSample``), read by attribute.
    notch : bool
        Leave a wafer's notch out (default). The scan plan keeps it (a few tiles over the
        notch cost little, and the tile grid stays anchored on the wafer's circle);
        inspection and reports leave it out (the chuck seen through it is not a defect).
    alignment : dict, optional
        The measured placement (``scan.json``'s ``alignment``): the area where the sample
        really lies.
    """
    return place(_nominal_polygon(sample, notch), sample, alignment)


def _nominal_polygon(sample: object, notch: bool) -> Polygon:
    """The usable area where the recipe puts the sample."""
    kind = sample.kind
    if kind == "wafer":
        return wafer_outline(
            sample.diameter_mm,
            sample.orientation,
            sample.flat_length_mm,
            sample.center_um,
            shrink_mm=sample.edge_exclusion_mm,
            notch_depth_mm=getattr(sample, "notch_depth_mm", 1.0) if notch else 0.0,
        )
    if kind in ("pv_cell", "rectangle"):
        cx, cy = sample.center_um
        hw, hh = sample.width_mm * 500.0, sample.height_mm * 500.0
        return box(cx - hw, cy - hh, cx + hw, cy + hh)
    if kind == "image":
        rows, cols = image_shape(sample.path)
        r0, c0, nr, nc = sample.region_px or (0, 0, rows, cols)
        if r0 + nr > rows or c0 + nc > cols:
            raise UserError(
                f"sample.region_px: ({r0}, {c0}, {nr}, {nc}) exceeds the image "
                f"({rows} x {cols} px)"
            )
        p = sample.pixel_size_um
        ox, oy = sample.origin_um
        # pixel (r, c) is centred on origin + (c, r) * p; the region covers whole pixels
        return box(ox + (c0 - 0.5) * p, oy + (r0 - 0.5) * p, ox + (c0 + nc - 0.5) * p,
                   oy + (r0 + nr - 0.5) * p)
    raise UserError(f"sample.kind: unknown kind {kind!r}")

