"""Reading picture files whose pixels are not plain grey or RGB: ink (CMYK) and other colour
spaces, and what white is for pixel types without a conventional full scale.

Shared by the image sample (``simulators.samples.image``) and the model's image reader
(``models.data.read_image``), so that a file is read the same way when it is scanned and when
it is learnt from. A CMYK JPEG read as RGB(A) is ink amounts taken for light: the picture came
out black, and a defective print scored as good.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

#: shortest side (px) of a picture that is scanned as a sample, learnt from or inspected
MIN_IMAGE_PX = 8
#: PIL modes that are not light intensities: converted to RGB before use
_PIL_CONVERT = ("CMYK", "YCbCr", "LAB", "HSV")
#: TIFF photometric interpretation of ink separations (CMYK)
_SEPARATED = 5


#: EXIF tag of the orientation a camera records instead of turning the pixels
_EXIF_ORIENTATION = 0x0112
#: EXIF orientations that turn the picture a quarter (rows and columns swap)
_EXIF_QUARTER_TURNS = (5, 6, 7, 8)


def _exif_orientation(im: Any) -> int:
    try:
        return int(im.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - an unreadable EXIF block: the pixels as stored
        return 1


def read_picture(path: Path) -> np.ndarray:
    """The pixels of a non-TIFF picture file (PNG, JPEG, BMP, ...) as a viewer shows them:
    turned by their EXIF orientation (a phone or camera records the turn instead of turning
    the pixels), colour spaces other than grey and RGB(A) converted to RGB by Pillow;
    otherwise as ``imageio`` reads it. A PNG whose pixel data stops short is refused
    (:func:`check_png_complete`)."""
    pixels = _decoded(path)
    check_png_complete(path)  # after the decoder's own checks (size, CRCs), whose words are clearer
    return pixels


def _decoded(path: Path) -> np.ndarray:
    import imageio.v3 as iio

    try:
        from PIL import Image, ImageOps

        with Image.open(path) as im:
            turned = _exif_orientation(im) != 1
            if turned:
                im = ImageOps.exif_transpose(im)
            if im.mode in _PIL_CONVERT:
                return np.asarray(im.convert("RGB"))
            if turned:
                return np.asarray(im)
    except Exception:  # noqa: BLE001 - not a Pillow format: imageio's other plugins decide
        pass
    return np.asarray(iio.imread(path))


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: samples per pixel of each PNG colour type (grey, RGB, palette, grey + alpha, RGBA)
_PNG_SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
#: Adam7 interlacing's passes: first column, first row, column step, row step
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
          (0, 1, 1, 2))


def check_png_complete(path: Path) -> None:
    """Refuse a PNG whose compressed pixel data holds fewer rows than its header declares.

    Pillow (and so imageio) fills the rows missing from a PNG whose data stream ends early
    with 0 and raises nothing: a file cut short, or written by a program stopped half way,
    was inspected with its lower half black (a "crack" where the data stops) and learnt from
    as a good image. Written here because no library that reads PNG says so: the file's
    chunks are walked (stdlib ``zlib``; the CRCs are Pillow's to check) and the inflated
    size compared with the header's. Other files are left alone.

    Raises
    ------
    ValueError
        The pixel data ends early (the file was cut, or its data stream stops).
    """
    import struct
    import zlib

    with open(path, "rb") as f:
        if f.read(8) != _PNG_SIGNATURE:
            return
        header, inflate, got = None, zlib.decompressobj(), 0
        while True:
            head = f.read(8)
            if len(head) < 8:
                break  # no IEND: what the data holds decides
            length, kind = struct.unpack(">I4s", head)
            data = f.read(length)
            f.seek(4, 1)  # the chunk's CRC
            if kind == b"IHDR":
                header = struct.unpack(">IIBBBBB", data[:13])
            elif kind == b"IDAT":
                chunk = inflate.decompress(data, 1 << 24)
                while chunk:
                    got += len(chunk)
                    chunk = inflate.decompress(inflate.unconsumed_tail, 1 << 24)
            elif kind == b"IEND":
                break
        got += len(inflate.flush())
    if header is None:
        return  # no header: the decoder refuses it
    width, height, depth, colour, _, _, interlace = header
    bits = _PNG_SAMPLES.get(colour, 1) * depth

    def size(w: int, h: int) -> int:
        return 0 if w <= 0 or h <= 0 else h * (1 + (w * bits + 7) // 8)

    if interlace:
        expected = sum(size(-(-(width - x0) // dx), -(-(height - y0) // dy))
                       for x0, y0, dx, dy in _ADAM7)
    else:
        expected = size(width, height)
    if got < expected:
        raise ValueError(f"the PNG's pixel data ends early ({got} of {expected} bytes: "
                         f"about {height * got // max(expected, 1)} of its {height} rows); "
                         "the file was cut short or written incompletely")


def picture_shape(path: Path) -> tuple[int, int]:
    """(rows, cols) of a non-TIFF picture as :func:`read_picture` returns it, from its header."""
    import imageio.v3 as iio

    try:
        from PIL import Image

        with Image.open(path) as im:
            cols, rows = im.size
            if _exif_orientation(im) in _EXIF_QUARTER_TURNS:
                rows, cols = cols, rows
            return int(rows), int(cols)
    except Exception:  # noqa: BLE001 - not a Pillow format: imageio's other plugins decide
        pass
    shape = iio.improps(path).shape
    return int(shape[0]), int(shape[1])


#: TIFF photometric interpretations whose samples are colours: RGB, CMYK (separated), YCbCr
_COLOUR_PHOTOMETRIC = (2, 5, 6)


def tiff_image_axes(series: Any) -> str:
    """The axes of a TIFF series that make one picture (``Y``, ``X`` and a colour-sample axis
    ``S``/``C`` of 3 or 4), checked to hold one picture only.

    Raises
    ------
    ValueError
        The series stacks several pictures (pages of a z-stack, a time series, channels that
        are not colours): which one is the sample is the user's choice, not page 0's.
    """
    axes, shape = str(series.axes), tuple(int(n) for n in series.shape)
    if "Y" not in axes or "X" not in axes:
        raise ValueError(f"no Y/X axes in {axes!r}")
    # a C axis is colour only in an RGB, CMYK or YCbCr file: three fluorescence channels
    # (ImageJ or OME-TIFF, grey pages) were mixed into one "luminance" while 2 or 5 were refused
    colour = int(getattr(series.keyframe, "photometric", 2) or 0) in _COLOUR_PHOTOMETRIC
    stacked = [(ax, n) for ax, n in zip(axes, shape, strict=True)
               if ax not in "YX" and n > 1
               and not ((ax == "S" or ax == "C" and colour) and n in (3, 4))]
    if stacked:
        what = ", ".join(f"{n} along {ax}" for ax, n in stacked)
        raise ValueError(f"holds several images ({what}; TIFF axes {axes}): save the one "
                         "image to use as a file of its own")
    return axes


def main_series(tif: Any) -> Any:
    """The picture of an open ``tifffile.TiffFile``: its largest series (Y x X).

    A file may hold a thumbnail, a label or a preview beside its picture, in any order: the
    first series of one such file was a 200 x 300 thumbnail, inspected in place of the
    picture with no defect found.
    """
    def area(series: Any) -> int:
        axes, shape = str(series.axes), tuple(int(n) for n in series.shape)
        if "Y" not in axes or "X" not in axes:
            return 0
        return shape[axes.index("Y")] * shape[axes.index("X")]

    series = list(tif.series)
    if not series:
        raise ValueError("no image data in the TIFF file")
    largest = max(series, key=area)
    if sum(area(s) == area(largest) for s in series) > 1:
        # a thumbnail is smaller than its picture; pictures of one size are separate images
        # (the first was used without a word)
        n = sum(area(s) == area(largest) for s in series)
        raise ValueError(f"holds several images ({n} of the same size): save the one to use "
                         "in a file of its own")
    _check_segments(largest)
    return largest


def _check_segments(series: Any) -> None:
    """Refuse a TIFF picture a strip or tile of which is not in the file (offset or byte
    count 0: a file cut short by its writer, or its index damaged): tifffile reads such a
    segment as zeros without a word, a black band scanned, learnt from or inspected as if
    imaged."""
    for number, page in enumerate(series.pages):
        if page is None:
            raise ValueError(f"page {number} of the picture is missing: the file is damaged")
        offsets = tuple(getattr(page, "dataoffsets", ()) or ())
        counts = tuple(getattr(page, "databytecounts", ()) or ())
        what = "tile" if getattr(page, "is_tiled", False) else "strip"
        for index, (offset, count) in enumerate(zip(offsets, counts, strict=False)):
            if not offset or not count:
                raise ValueError(f"{what} {index} of {len(offsets)} holds no data (offset "
                                 f"{offset}, {count} bytes): the file is damaged or "
                                 "incomplete, and that part would be read as black")


def tiff_is_cmyk(tif: Any) -> bool:
    """Whether an open ``tifffile.TiffFile``'s picture holds ink separations (4 samples: C, M,
    Y, K)."""
    page = main_series(tif).keyframe
    return int(getattr(page, "photometric", 0)) == _SEPARATED and \
        int(getattr(page, "samplesperpixel", 0)) == 4


def cmyk_to_rgb(ink: np.ndarray) -> np.ndarray:
    """RGB light of ink amounts ``(..., 4)`` (0 = no ink, the type's maximum or 1.0 for
    floats = full ink), in the same units: each colour is what its ink and the black ink let
    through."""
    ink = np.asarray(ink)
    full = float(np.iinfo(ink.dtype).max) if np.issubdtype(ink.dtype, np.integer) else 1.0
    a = ink.astype(np.float64) / full
    k = 1.0 - a[..., 3]
    return np.stack([(1.0 - a[..., i]) * k for i in range(3)], axis=-1) * full


def full_scale(dtype: np.dtype, data_max: float) -> float:
    """The pixel value taken as white.

    8- and 16-bit integers: the type's maximum (a dark 16-bit picture stays dark). Wider
    integers (32/64-bit) have no such convention (2**31 as white made every picture black):
    the picture's own maximum. Floats: 1 when they lie in [0, 1], else their maximum.
    """
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return 1.0
    if np.issubdtype(dtype, np.integer):
        if dtype.itemsize <= 2:
            return float(np.iinfo(dtype).max)
        return float(data_max) if data_max > 0 else 1.0
    return float(data_max) if data_max > 1.0 else 1.0
