"""The pixel size an image file states: what its microscope or camera software wrote in it.

A TIFF from a microscope carries its pixel size: OME-TIFF as ``PhysicalSizeX`` in its OME-XML,
ImageJ/Fiji as ``XResolution`` pixels per its ``unit``, others as ``XResolution`` per
``ResolutionUnit`` (centimetre, or millimetre/micrometre in tifffile's extension). PNG, JPEG
and BMP carry dots per inch. Read here, without decoding the pixels; tifffile and Pillow parse
the tags, and only the units' names and the choice of what to trust are ours.

Dots per inch under :data:`MIN_DPI` are not taken: 72, 96, 300 or 600 dpi are what image
software writes by default for screens and printers (a photograph saved at 72 dpi would read
as 353 µm pixels), and no microscope image is that coarse.
"""

from __future__ import annotations

import logging
import math
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from pathlib import Path

from scanner.errors import UserError

log = logging.getLogger("waferscope")

#: dots per inch below this are a program's default, not a measurement (25.4 µm pixels)
MIN_DPI = 1000.0
#: stated sizes outside this range (µm) are not a pixel of an image of a part
PLAUSIBLE_UM = (1e-3, 1e4)
#: stated sizes of several images that differ by more than this (relative) are different
SAME = 0.01

#: micrometres per unit, by the names OME, ImageJ and TIFF use
_UM_PER = {"nm": 1e-3, "nanometer": 1e-3, "µm": 1.0, "um": 1.0, "micron": 1.0,
           "microns": 1.0, "micrometer": 1.0, "\u03bcm": 1.0, "\\u00b5m": 1.0,
           "mm": 1e3, "millimeter": 1e3, "cm": 1e4, "centimeter": 1e4, "m": 1e6,
           "meter": 1e6, "inch": 25400.0, "in": 25400.0}
_TIFF_UNIT = {3: "cm", 4: "mm", 5: "um"}  # RESUNIT: 1 none, 2 inch (not trusted), 3 cm, ...


def stated_pixel_um(path: Path) -> float | None:
    """The pixel size (µm) that ``path`` states, or None when it states none that can be
    trusted (no metadata, a screen or printer default, non-square pixels, an implausible
    value). Never raises: a file whose metadata cannot be read states nothing."""
    try:
        if Path(path).suffix.lower() in (".tif", ".tiff"):
            x, y = _tiff_pixel_um(Path(path))
        else:
            x, y = _picture_pixel_um(Path(path))
    except Exception:  # noqa: BLE001 - metadata is a hint; the pixels' reader names damage
        return None
    if x is None or y is None or not all(math.isfinite(v) and v > 0 for v in (x, y)):
        return None
    if abs(x / y - 1.0) > SAME:
        log.warning("%s: states pixels of %g x %g µm, not square: its pixel size is not "
                    "taken (give --pixel-size)", path, x, y)
        return None
    if not PLAUSIBLE_UM[0] <= x <= PLAUSIBLE_UM[1]:
        return None
    return float(x)


def _tiff_pixel_um(path: Path) -> tuple[float | None, float | None]:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        if tif.is_ome and tif.ome_metadata:
            return _ome_pixel_um(tif.ome_metadata)
        page = tif.pages.first
        tags = page.tags
        if "XResolution" not in tags or "YResolution" not in tags:
            return None, None
        per_unit = [_rational(tags[name].value) for name in ("XResolution", "YResolution")]
        if tif.is_imagej:
            unit = str((tif.imagej_metadata or {}).get("unit", "")).strip().lower()
            um = _UM_PER.get(unit)
        else:
            code = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 2
            if code == 2 and min(per_unit) >= MIN_DPI:
                um = _UM_PER["inch"]
            else:
                um = _UM_PER.get(_TIFF_UNIT.get(code, ""))
        if um is None or min(per_unit) <= 0:
            return None, None
        return um / per_unit[0], um / per_unit[1]


def _ome_pixel_um(xml: str) -> tuple[float | None, float | None]:
    root = ET.fromstring(xml)
    pixels = next((el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return None, None
    out = []
    for axis in ("X", "Y"):
        value = pixels.get(f"PhysicalSize{axis}")
        um = _UM_PER.get(pixels.get(f"PhysicalSize{axis}Unit", "µm").strip().lower())
        out.append(None if value is None or um is None else float(value) * um)
    return out[0], out[1]


def _picture_pixel_um(path: Path) -> tuple[float | None, float | None]:
    from PIL import Image

    with Image.open(path) as im:
        dpi = im.info.get("dpi")
    if not dpi or min(float(v) for v in dpi) < MIN_DPI:
        return None, None
    return _UM_PER["inch"] / float(dpi[0]), _UM_PER["inch"] / float(dpi[1])


def _rational(value: object) -> float:
    if isinstance(value, tuple):
        return float(value[0]) / float(value[1]) if float(value[1]) else 0.0
    return float(value)  # type: ignore[arg-type]


def images_pixel_um(paths: Sequence[Path], given: float | None) -> float | None:
    """The pixel size to take image files at (see :func:`resolved_pixel_um`)."""
    return resolved_pixel_um({Path(p).name: stated_pixel_um(Path(p)) for p in paths}, given)


def resolved_pixel_um(stated: Mapping[str, float | None], given: float | None
                      ) -> float | None:
    """The pixel size to take image files at: ``given`` (``--pixel-size``) when given, else the
    one size the files state (``stated``: by file name; None when none states one).

    Files that state another size than ``given`` are named in a warning (``given`` wins);
    files that state none beside files that do are taken at the stated size, with a warning.

    Raises
    ------
    UserError
        Without ``given``, files that state different pixel sizes (one pixel size is taken
        for a run: the threshold and the reports are per pixel size).
    """
    known = {name: v for name, v in stated.items() if v is not None}
    if given is not None:
        other = [name for name, v in known.items() if abs(v / given - 1.0) > SAME]
        if other:
            log.warning("%d image file(s) state another pixel size than --pixel-size %g µm "
                        "(e.g. %s: %g µm): --pixel-size is taken", len(other), given,
                        other[0], known[other[0]])
        return given
    if not known:
        return None
    first, size = next(iter(known.items()))
    for name, v in known.items():
        if abs(v / size - 1.0) > SAME:
            raise UserError(f"{name}: states {v:g} µm pixels, {first} {size:g} µm: take "
                            "images of one pixel size at a time, or give --pixel-size")
    silent = [name for name, v in stated.items() if v is None]
    if silent:
        log.warning("%d image file(s) state no pixel size (e.g. %s): taken at %g µm, as the "
                    "other files state", len(silent), silent[0], size)
    return size
