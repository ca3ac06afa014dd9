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
            if not turned and im.format == "PNG" and _png_colour_16bit(path):
                # Pillow keeps 8 of a 16-bit colour PNG's bits: a 12-bit camera's RGB was read
                # as 9 grey levels, its defects flattened away; imagecodecs (tifffile's codecs)
                # decodes the file's own samples
                import imagecodecs

                return np.asarray(imagecodecs.png_decode(path.read_bytes()))
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


def _png_colour_16bit(path: Path) -> bool:
    """Whether a PNG holds 16-bit colour or grey + alpha samples (colour types 2, 4, 6), which
    Pillow reduces to 8 bits (16-bit grey it keeps)."""
    with open(path, "rb") as f:
        head = f.read(29)  # signature, IHDR's length and type, width, height, depth, colour
    return len(head) == 29 and head[:8] == _PNG_SIGNATURE and head[12:16] == b"IHDR" \
        and head[24] == 16 and head[25] in (2, 4, 6)


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
#: TIFF photometric interpretations of grey where 0 is white, of colour-map indices, and of
#: luma + chroma samples
_MINISWHITE, _PALETTE, _YCBCR = 0, 3, 6
#: TIFF photometric interpretations read as light: MinIsWhite, MinIsBlack, RGB, palette,
#: CMYK, YCbCr (CIE L*a*b*, a camera's raw colour-filter mosaic and the rest are not)
_READ_PHOTOMETRIC = (0, 1, 2, 3, 5, 6)
#: TIFF compression of JPEG data, whose decoder returns RGB from YCbCr (old-style 6, new 7)
_JPEG = (6, 7)
#: TIFF ExtraSamples values of alpha (associated, unassociated)
_ASSOCIATED_ALPHA, _ALPHA = 1, 2


def _photometric(page: Any) -> int:
    """A TIFF page's photometric interpretation; a file without the tag (tifffile then says
    MinIsWhite, 0) is MinIsBlack: a program that wrote bare samples, grey as they are
    (libtiff's reading too)."""
    photometric = int(getattr(page, "photometric", 1) or 0)
    tags = getattr(page, "tags", None)
    if photometric == _MINISWHITE and tags is not None and \
            "PhotometricInterpretation" not in tags:
        return 1
    return photometric


def _ycbcr_luma(page: Any) -> bool:
    """Whether tifffile returns the page's stored luma and chroma (YCbCr not JPEG-compressed:
    a JPEG decoder converts to RGB itself)."""
    return _photometric(page) == _YCBCR and \
        int(getattr(page, "compression", 1) or 0) not in _JPEG


def _reference_black_white(page: Any) -> tuple[float, float] | None:
    """The luma's black and white of a YCbCr page's ``ReferenceBlackWhite`` tag (None: no
    tag)."""
    tags = getattr(page, "tags", None)
    tag = tags.get("ReferenceBlackWhite") if tags is not None else None
    if tag is None:
        return None
    values = tuple(tag.value)
    if values and isinstance(values[0], tuple):  # rationals as (numerator, denominator)
        values = tuple(n / d if d else 0.0 for n, d in values)
    elif len(values) == 12:  # rationals as a flat list
        values = tuple(values[i] / values[i + 1] if values[i + 1] else 0.0
                       for i in range(0, 12, 2))
    if len(values) < 2:
        return (float(values[0]), float("nan")) if values else None
    return float(values[0]), float(values[1])


def tiff_white_from_pixels(page: Any) -> bool:
    """Whether a page is MinIsWhite with samples whose white is the picture's own largest
    (:func:`full_scale`: floats, 32/64-bit integers): a reader of windows finds it over the
    whole picture first and passes it to :func:`tiff_light` (each window's own largest
    sample would be another white for every window)."""
    dtype = getattr(page, "dtype", None)
    if _photometric(page) != _MINISWHITE or dtype is None:
        return False
    dtype = np.dtype(dtype)
    return dtype.kind == "f" or (dtype.kind in "iu" and dtype.itemsize > 2)


def _integer_white(page: Any, dtype: np.dtype) -> int | None:
    """White of a page's integer samples of ``dtype``: ``2**bits - 1`` when the file stores
    fewer bits than the type holds (a 4- or 12-bit picture), else the type's maximum up to 16
    bits; None for wider types (their white is the picture's own largest sample)."""
    bits = int(getattr(page, "bitspersample", 8 * dtype.itemsize) or 0)
    if 0 < bits < 8 * dtype.itemsize:
        return (1 << bits) - 1
    return int(np.iinfo(dtype).max) if dtype.itemsize <= 2 else None


def tiff_light_white(page: Any) -> float | None:
    """White of the light :func:`tiff_light` returns for a page whose file says it, else None
    (the pixel type's :func:`full_scale`): a palette's colour-map maximum (its colours are
    16-bit whatever its indices are), the luma's ``ReferenceBlackWhite`` range of YCbCr, and
    ``2**bits - 1`` for integer samples narrower than their type (a 4- or 12-bit picture is
    not 255 or 65535 dark). Used by the image sample, which renders light divided by white
    window by window."""
    photometric = _photometric(page)
    if photometric == _PALETTE:
        colormap = getattr(page, "colormap", None)
        if colormap is None:
            return None
        dtype = np.asarray(colormap).dtype
        return float(np.iinfo(dtype).max) if np.issubdtype(dtype, np.integer) else None
    dtype = getattr(page, "dtype", None)
    if dtype is None or not np.issubdtype(np.dtype(dtype), np.integer):
        return None
    top = _integer_white(page, np.dtype(dtype))
    white = None if top is None else float(top)
    if white is not None and _ycbcr_luma(page):
        reference = _reference_black_white(page)
        if reference is not None and np.isfinite(reference[1]) and reference[1] > reference[0]:
            return reference[1] - reference[0]
    return white


def tiff_light(page: Any, pixels: np.ndarray, white: float | None = None) -> np.ndarray:
    """A TIFF picture's samples ``(Y, X)`` or ``(Y, X, S)`` as light, as a viewer shows them
    (``page``: its keyframe). ``pixels`` may be any window of the picture: the light of each
    pixel depends on the file's tags only, except a floating-point MinIsWhite picture's,
    whose white is the largest sample of the whole picture (``white``: pass it when
    ``pixels`` is a window; default: the largest of ``pixels``).

    * ``MinIsWhite`` grey (scanners', some X-ray and document cameras'): 0 is white, so the
      samples are turned over (white minus each): read as stored, a dark scratch came out
      bright and the picture negative.
    * a colour map's indices (palette): the colours they index (indices were read as grey
      levels, the picture's contrast whatever the palette's order made it).
    * YCbCr not JPEG-compressed (tifffile returns the stored luma and chroma; a JPEG
      decoder converts to RGB itself): the luma, less its black (``ReferenceBlackWhite``),
      is the grey (it was mixed with the chroma as if R, G, B, its contrast cut six-fold).

    Other pictures are returned as they are.

    Raises
    ------
    ValueError
        Samples that are not light, grey or colour (CIE L*a*b*, a raw colour-filter mosaic,
        ...), or a palette picture without its colour map.
    """
    photometric = _photometric(page)
    if photometric not in _READ_PHOTOMETRIC:
        import tifffile

        try:
            name = tifffile.PHOTOMETRIC(photometric).name
        except ValueError:
            name = str(photometric)
        raise ValueError(f"its samples are {name} (TIFF photometric {photometric}), not grey or "
                         "colour light: save the picture as grey or RGB")
    if photometric == _PALETTE:
        colormap = getattr(page, "colormap", None)
        if colormap is None:
            raise ValueError("a palette picture without its colour map")
        return np.moveaxis(np.asarray(colormap)[:, pixels], 0, -1)  # (Y, X, RGB)
    if photometric == _MINISWHITE:
        grey = pixels[..., 0] if pixels.ndim == 3 else pixels
        if grey.dtype == np.bool_:
            grey = ~grey
        elif np.issubdtype(grey.dtype, np.integer) and grey.dtype.itemsize <= 2:
            grey = _integer_white(page, grey.dtype) - grey.astype(np.int64)
        else:
            if white is None:
                white = full_scale(grey.dtype, float(np.max(grey)) if grey.size else 0.0)
            grey = white - grey.astype(np.float64)
        if pixels.ndim == 3:  # grey + alpha: the alpha stays as it is
            return np.stack([grey, pixels[..., 1].astype(grey.dtype)], axis=-1)
        return grey
    if _ycbcr_luma(page) and pixels.ndim == 3:
        reference = _reference_black_white(page)
        black = reference[0] if reference is not None else 0.0
        return pixels[..., 0].astype(np.float64) - black
    return pixels


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
    # grey + alpha (GIMP's, Photoshop's grey TIFF with transparency): 2 samples, one of them
    # marked as alpha, is one picture, as a grey + alpha PNG is (it was "several images")
    extra = tuple(getattr(series.keyframe, "extrasamples", ()) or ())
    alpha = _ALPHA in extra or _ASSOCIATED_ALPHA in extra
    stacked = [(ax, n) for ax, n in zip(axes, shape, strict=True)
               if ax not in "YX" and n > 1
               and not ((ax == "S" or ax == "C" and colour) and n in (3, 4))
               and not (ax == "S" and n == 2 and not colour and alpha)]
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
