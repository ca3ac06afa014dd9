"""Virtual samples for the simulated microscope.

A sample renders reflectance as a pure function of stage coordinates (µm; x grows with the
image column, y with the image row), so the simulated camera can take any tile at any pixel
size and overlapping tiles agree exactly. Synthetic defects carry their ground truth
(``VirtualSample.truth()``, written to ``truth.json``).

============  ===================  ===========================================================
kind          class                what it is
============  ===================  ===========================================================
wafer         ``WaferSample``      round wafer, die grid, scribe lanes, notch/flat (to +y)
pv_cell       ``PVCellSample``     PV cell as seen in electroluminescence
image         ``ImageSample``      any TIFF/PNG file at a pixel size (TIFF read lazily)
rectangle     ``RectangleSample``  plain polished rectangle
============  ===================  ===========================================================
"""

from __future__ import annotations

import inspect
from typing import Any

from .base import TrueDefect, VirtualSample
from .defects import ALL_KINDS, CELL_KINDS, SURFACE_KINDS, WAFER_KINDS
from .image import ImageSample
from .pv_cell import PVCellSample
from .rectangle import RectangleSample
from .wafer import WaferSample

SAMPLE_TYPES: dict[str, type[VirtualSample]] = {
    "wafer": WaferSample,
    "pv_cell": PVCellSample,
    "image": ImageSample,
    "rectangle": RectangleSample,
}


def make_sample(kind: str, **params: Any) -> VirtualSample:
    """Build a virtual sample from its kind and constructor keyword arguments.

    Parameters
    ----------
    kind : str
        ``"wafer"``, ``"pv_cell"``, ``"image"`` or ``"rectangle"``.
    **params
        Keyword arguments of the sample class (lengths in mm for sample geometry, µm for
        stage positions). ``roughness`` (a dict of :class:`simulators.roughness.RoughnessField`
        parameters, or None) gives any sample a rough surface with a known Sa.

    Raises
    ------
    ValueError
        Unknown kind, or invalid parameters (an unknown keyword included).
    FileNotFoundError
        ``image`` whose file does not exist.
    """
    roughness = params.pop("roughness", None)
    try:
        cls = SAMPLE_TYPES[kind]
    except KeyError:
        raise ValueError(
            f"unknown sample kind {kind!r} (choose from {', '.join(SAMPLE_TYPES)})"
        ) from None
    try:
        inspect.signature(cls).bind(**params)
    except TypeError as exc:  # an unknown or missing keyword is a parameter error
        raise ValueError(f"{kind} sample: {exc}") from None
    sample = cls(**params)
    if roughness:
        from ..roughness import RoughnessField, RoughSample

        try:
            field = RoughnessField(**dict(roughness))
        except TypeError as exc:
            raise ValueError(f"roughness: {exc}") from None
        sample = RoughSample(sample, field)
    return sample


__all__ = [
    "ALL_KINDS",
    "CELL_KINDS",
    "SAMPLE_TYPES",
    "SURFACE_KINDS",
    "WAFER_KINDS",
    "ImageSample",
    "PVCellSample",
    "RectangleSample",
    "TrueDefect",
    "VirtualSample",
    "WaferSample",
    "make_sample",
]
