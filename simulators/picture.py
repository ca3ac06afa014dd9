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

#: PIL modes that are not light intensities: converted to RGB before use
_PIL_CONVERT = ("CMYK", "YCbCr", "LAB", "HSV")
#: TIFF photometric interpretation of ink separations (CMYK)
_SEPARATED = 5


def read_picture(path: Path) -> np.ndarray:
    """The pixels of a non-TIFF picture file (PNG, JPEG, BMP, ...), colour spaces other than
    grey and RGB(A) converted to RGB by Pillow; otherwise as ``imageio`` reads it."""
    import imageio.v3 as iio

    try:
        from PIL import Image

        with Image.open(path) as im:
            if im.mode in _PIL_CONVERT:
                return np.asarray(im.convert("RGB"))
    except Exception:  # noqa: BLE001 - not a Pillow format: imageio's other plugins decide
        pass
    return np.asarray(iio.imread(path))


def tiff_is_cmyk(tif: Any) -> bool:
    """Whether an open ``tifffile.TiffFile`` holds ink separations (4 samples: C, M, Y, K)."""
    page = tif.pages[0]
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
