"""An image file used as the sample: any TIFF or PNG placed on the stage at a pixel size.

TIFF files are read lazily: each render reads only the window of the file it needs (through
``tifffile``'s Zarr store, chunk by chunk, or a memory map for uncompressed contiguous files),
so a 20000 x 20000 px image never has to fit in memory. PNG, JPEG and other formats that
``imageio`` reads have no random-access reader: they are loaded once, whole, when the sample
is created.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import first_line
from ..picture import (
    cmyk_to_rgb,
    full_scale,
    main_series,
    read_picture,
    tiff_image_axes,
    tiff_is_cmyk,
    tiff_light,
    tiff_light_white,
    tiff_white_from_pixels,
)
from .base import VirtualSample
from .defects import ALL_KINDS, SURFACE_KINDS, DefectField, place_defects, resolve_kinds
from .shapes import interval_coverage, pixel_axes, rect_polygon
from .texture import chuck_background, over_chuck

log = logging.getLogger(__name__)

#: Rec. 709 luminance weights of linear R, G, B
LUMA = (0.2126, 0.7152, 0.0722)
#: most source pixels read at once when averaging down (bounds memory on overviews)
_STRIP_PIXELS = 8_000_000
#: ... and when the whole file is read once to check it (a few MB at a time)
_SURVEY_PIXELS = 262_144
#: Half-width of the Lanczos kernel that interpolates the file, and its taps' offsets from the
#: file pixel at or below a coordinate.
_LANCZOS_A = 3
_TAPS = np.arange(-_LANCZOS_A + 1, _LANCZOS_A + 1)


class _Reader:
    """Raw window access to a 2-D luminance image (float64, in the file's units)."""

    shape: tuple[int, int]
    dtype: np.dtype
    scale: float = 1.0  # white: divide by it to get [0, 1] (set by ImageSample)
    white: float | None = None  # white the file states (else the pixel type's full scale)
    lazy: bool
    chunk: tuple[int, int] = (1, 1)  # rows, cols the file is stored in (decoded whole)

    def read(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        """Release the file (no-op for in-memory images)."""


def _survey(reader: _Reader, path: Path) -> float:
    """Read the whole file once, strip by strip: a damaged chunk, NaN or infinite pixels, or
    negative ones refuse it before a scan starts (not as a black tile in the middle of one,
    nor after an earlier scan was overwritten); returns the largest luminance, which sets
    white for pixel types without a conventional full scale
    (:func:`simulators.picture.full_scale`).

    A sample image is light, 0 (black) or more: negative pixels (a difference image, a
    float picture centred on 0) were clipped to black, silently, by the camera's rendering.
    """
    rows, cols = reader.shape
    # blocks of whole stored chunks, so that each chunk is decoded once (strips thinner
    # than a tiled file's tiles decoded every tile again for each strip)
    ch, cw = (max(1, int(v)) for v in reader.chunk)
    step = ch * max(1, _SURVEY_PIXELS // max(cols, 1) // ch)
    width = cw * max(1, _SURVEY_PIXELS // step // cw)
    largest, least = 0.0, 0.0
    for r0 in range(0, rows, step):
        for c0 in range(0, cols, width):
            window = reader.read(r0, min(rows, r0 + step), c0, min(cols, c0 + width))
            if not np.isfinite(window).all():
                raise ValueError("it holds non-finite pixels (NaN or infinity)")
            if window.size:
                largest = max(largest, float(window.max()))
                least = min(least, float(window.min()))
    if least < 0:
        # after the whole file: the message gives the true least value, not a strip's
        raise ValueError(f"it holds negative pixel values (down to {least:.4g}); a sample "
                         "image must be 0 (black) or more")
    return largest


def _intensities(dtype: np.dtype) -> np.dtype:
    """``dtype`` if its pixels are intensities (bool, integer, float); complex, text and
    record pixels are refused (the imaginary part would be dropped without a word)."""
    if dtype.kind not in "biuf":
        raise ValueError(f"unsupported pixel type {dtype}")
    return dtype


def _luminance(window: np.ndarray) -> np.ndarray:
    """(rows, cols[, channels]) -> (rows, cols) float64; RGB(A) -> Rec. 709 luminance."""
    a = np.asarray(window)
    if a.ndim == 2:
        return a.astype(np.float64)
    if a.shape[-1] >= 3:
        r, g, b = (a[..., k].astype(np.float64) for k in range(3))
        return LUMA[0] * r + LUMA[1] * g + LUMA[2] * b
    return a[..., 0].astype(np.float64)  # grey + alpha


class _TiffReader(_Reader):
    """Lazy TIFF window reader (memory map if possible, else tifffile's Zarr store).

    Each window is read as light the way the model's image reader reads the whole file
    (:func:`simulators.picture.tiff_light`: MinIsWhite turned over, a palette's indices
    looked up in its colour map, uncompressed YCbCr's luma; CMYK converted; CIE L*a*b* and
    other samples that are not light refused), so that a picture scanned as a sample is the
    picture a model was trained on. Everything a window's light needs comes from the file's
    tags, except a floating-point (or 32-bit) MinIsWhite picture's white, its largest
    sample, which is found once over the whole file, window by window.
    """

    def __init__(self, path: Path) -> None:
        import tifffile
        import zarr

        # tifffile logs its own warning about a damaged file before raising; the error says it
        logging.getLogger("tifffile").setLevel(logging.ERROR)
        self._tif = tifffile.TiffFile(path)
        try:
            series = main_series(self._tif)
            axes, shape = tiff_image_axes(series), series.shape
            self.shape = (int(shape[axes.index("Y")]), int(shape[axes.index("X")]))
            self.dtype = _intensities(np.dtype(series.dtype))
            self._page = series.keyframe
            tiff_light(self._page, np.zeros((1, 1), self.dtype))  # not light: refused now
            self.white = tiff_light_white(self._page)
            self._stored_white: float | None = None  # MinIsWhite's white, when the data's
            self._cmyk = tiff_is_cmyk(self._tif)
            channel = "S" if "S" in axes else ("C" if "C" in axes else None)
            # index template: Y and X sliced per read, the channel axis kept, the rest at 0
            self._axes = axes
            self._channel = channel
            self._array: Any = None
            try:
                mm = tifffile.memmap(path, mode="r")
                if tuple(mm.shape) == tuple(shape):
                    self._array = mm
            except Exception:  # noqa: BLE001 - not memory-mappable: use the chunked reader
                self._array = None
            if self._array is None:
                self._array = zarr.open_array(series.aszarr(level=0), mode="r")
                chunks = self._array.chunks
                self.chunk = (int(chunks[axes.index("Y")]), int(chunks[axes.index("X")]))
            self.lazy = True
            if tiff_white_from_pixels(self._page):
                # white is the largest stored sample of the whole picture (as the file reader
                # takes it), not of each window
                largest = _survey(_StoredSamples(self), path)
                self._stored_white = full_scale(self.dtype, largest)
                self.white = self._stored_white
        except Exception:
            self._tif.close()
            raise

    def stored(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        """The window's samples as the file stores them, ``(rows, cols[, samples])``."""
        index: list[Any] = []
        for ax in self._axes:
            if ax == "Y":
                index.append(slice(r0, r1))
            elif ax == "X":
                index.append(slice(c0, c1))
            elif ax == self._channel:
                index.append(slice(None))
            else:
                index.append(0)
        window = np.asarray(self._array[tuple(index)])
        if self._channel is not None:
            kept = [ax for ax in self._axes if ax in ("Y", "X", self._channel)]
            window = np.moveaxis(window, kept.index(self._channel), -1)
            if window.shape[-1] == 1:
                window = window[..., 0]
        return window

    def read(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        window = tiff_light(self._page, self.stored(r0, r1, c0, c1), white=self._stored_white)
        if self._cmyk and window.ndim == 3 and window.shape[-1] == 4:
            window = cmyk_to_rgb(window)
        return _luminance(window)

    def close(self) -> None:
        self._array = None
        self._tif.close()


class _StoredSamples(_Reader):
    """A TIFF reader's samples as stored (grey, or its first sample), for finding the
    largest."""

    def __init__(self, tiff: _TiffReader) -> None:
        self._tiff = tiff
        self.shape, self.dtype, self.chunk, self.lazy = tiff.shape, tiff.dtype, tiff.chunk, True

    def read(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        window = self._tiff.stored(r0, r1, c0, c1)
        return (window[..., 0] if window.ndim == 3 else window).astype(np.float64)


class _ArrayReader(_Reader):
    """Whole image held in memory (formats without a random-access reader)."""

    def __init__(self, path: Path) -> None:
        raw = read_picture(path)
        if raw.ndim == 3 and raw.shape[0] in (3, 4) and raw.shape[-1] not in (1, 2, 3, 4):
            raw = np.moveaxis(raw, 0, -1)
        if raw.ndim not in (2, 3):
            raise ValueError(f"unsupported image shape {raw.shape}")
        self.dtype = _intensities(raw.dtype)
        self._lum = _luminance(raw)
        self.shape = (int(self._lum.shape[0]), int(self._lum.shape[1]))
        self.lazy = False

    def read(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        return self._lum[r0:r1, c0:c1]


class ImageSample(VirtualSample):
    """An image file on the stage, rendered by resampling at the camera's pixel size.

    Pixel ``(r, c)`` of the file is centred on stage ``origin_um + (c, r) * pixel_size_um``.
    Values are the luminance (Rec. 709 for RGB, alpha ignored; CMYK converted to RGB) divided
    by white: the maximum of an 8- or 16-bit pixel type (255, 65535), the picture's own
    maximum for wider integers, 1 for floats in [0, 1], else their maximum
    (:func:`simulators.picture.full_scale`). The whole file is read once when the sample is
    made: a damaged chunk or a NaN pixel is refused then. A camera pixel
    no larger than a file pixel is interpolated (Lanczos-3: at the file's own pixel size and
    grid it reproduces the file exactly); a larger one is the exact area average of the file
    pixels under its footprint (no aliasing on overviews). Outside the image: the chuck.

    TIFF files are read lazily, one window per render (only the chunks under it); PNG and
    other formats are loaded whole once, at construction.

    Parameters
    ----------
    path : str or Path
        TIFF or PNG (or anything ``imageio`` reads), 8/16-bit, greyscale or RGB(A).
    pixel_size_um : float
        Size of a file pixel on the stage.
    origin_um : (float, float)
        Stage position of the centre of file pixel (0, 0).
    region_px : (int, int, int, int), optional
        ``(row0, col0, rows, cols)`` of the file to scan (the usable polygon); the whole
        image still renders. Default: the whole image.
    n_defects : int
        Synthetic defects drawn on top of the image (default none).
    defect_kinds : sequence of str, optional
        Kinds to place (default ``SURFACE_KINDS``).
    seed : int
        Seed of the defects.

    Raises
    ------
    FileNotFoundError
        The file does not exist (the message names it).
    ValueError
        The file cannot be read as an image, or ``region_px`` lies outside it.
    """

    kind = "image"

    def __init__(
        self,
        path: str | Path,
        pixel_size_um: float,
        origin_um: Sequence[float] = (0.0, 0.0),
        region_px: Sequence[int] | None = None,
        n_defects: int = 0,
        defect_kinds: Sequence[str] | None = None,
        seed: int = 0,
    ) -> None:
        self.path = Path(path).expanduser()
        if self.path.is_dir():
            raise ValueError(f"{self.path} is a folder, not an image file")
        if not self.path.is_file():
            raise FileNotFoundError(f"image file not found: {self.path}")
        if not pixel_size_um > 0:
            raise ValueError(f"pixel_size_um: must be > 0, got {pixel_size_um}")
        self.pixel_size_um = float(pixel_size_um)
        self.origin_um = (float(origin_um[0]), float(origin_um[1]))
        try:
            if self.path.suffix.lower() in (".tif", ".tiff"):
                self._reader: _Reader = _TiffReader(self.path)
            else:
                self._reader = _ArrayReader(self.path)
            largest = _survey(self._reader, self.path)  # fail now, not in a scan
        except Exception as exc:  # noqa: BLE001 - any decoder error means "unreadable"
            raise ValueError(f"path: cannot read image {self.path}: {first_line(exc)}"
                             ) from None
        white = self._reader.white
        self._reader.scale = white if white else full_scale(self._reader.dtype, largest)
        if np.issubdtype(self._reader.dtype, np.floating) and largest > 1.0:
            log.warning("%s: float pixels above 1 (largest %.4g): scaled to their largest",
                        self.path, largest)
        rows, cols = self._reader.shape
        if region_px is None:
            region = (0, 0, rows, cols)
        else:
            region = tuple(int(v) for v in region_px)
            r0, c0, nr, nc = region
            if r0 < 0 or c0 < 0 or nr <= 0 or nc <= 0 or r0 + nr > rows or c0 + nc > cols:
                raise ValueError(
                    f"region_px: {region} is not inside the image {self.path} "
                    f"({rows} x {cols} px)"
                )
        self.region_px: tuple[int, int, int, int] = region  # type: ignore[assignment]
        self.n_defects = int(n_defects)
        self.seed = int(seed)
        self.defect_kinds = resolve_kinds(defect_kinds, SURFACE_KINDS, ALL_KINDS[:4], "image")
        self._field = DefectField(
            place_defects(self, self.n_defects, self.defect_kinds, self.seed),
            nominal=0.5, bare=0.5,
        )

    @property
    def image_shape(self) -> tuple[int, int]:
        """(rows, cols) of the file."""
        return self._reader.shape

    @property
    def lazy(self) -> bool:
        """Whether renders read only the window they need (TIFF) or the whole image is held."""
        return self._reader.lazy

    def close(self) -> None:
        """Close the file (TIFF); the sample cannot render afterwards."""
        self._reader.close()

    def parameters(self) -> dict[str, Any]:
        """Constructor parameters plus the image shape."""
        return {
            "path": str(self.path), "pixel_size_um": self.pixel_size_um,
            "origin_um": self.origin_um, "region_px": self.region_px,
            "image_shape": self.image_shape, "n_defects": self.n_defects,
            "defect_kinds": list(self.defect_kinds), "seed": self.seed,
        }

    def _extent(self, r0: int, c0: int, nr: int, nc: int) -> tuple[float, float, float, float]:
        ps, (ox, oy) = self.pixel_size_um, self.origin_um
        return (ox + (c0 - 0.5) * ps, oy + (r0 - 0.5) * ps,
                ox + (c0 + nc - 0.5) * ps, oy + (r0 + nr - 0.5) * ps)

    def bounds_um(self) -> tuple[float, float, float, float]:
        """Outer edges of the whole image's pixels."""
        return self._extent(0, 0, *self.image_shape)

    def usable_polygon_um(self) -> np.ndarray:
        """Outer edges of the pixels of ``region_px``."""
        return rect_polygon(*self._extent(*self.region_px))

    # ------------------------------------------------------------------ rendering

    def _grid(self, coords: np.ndarray, origin: float) -> np.ndarray:
        """File pixel coordinates of stage coordinates, snapped to integers when within 1e-6
        (so the native grid reproduces the file exactly despite rounding in ``x0 + c p``)."""
        g = (coords - origin) / self.pixel_size_um
        near = np.rint(g)
        return np.where(np.abs(g - near) < 1e-6, near, g)

    def render(
        self, x0_um: float, y0_um: float, shape: tuple[int, int], pixel_size_um: float
    ) -> np.ndarray:
        """Reflectance of a stage region (see ``VirtualSample.render``)."""
        p = float(pixel_size_um)
        xs, ys = pixel_axes(x0_um, y0_um, shape, p)
        bx0, by0, bx1, by1 = self.bounds_um()
        cov_x = interval_coverage(xs, bx0, bx1, p)
        cov_y = interval_coverage(ys, by0, by1, p)
        if not cov_x.any() or not cov_y.any():
            return chuck_background(xs, ys, p)
        gx = self._grid(xs, self.origin_um[0])
        gy = self._grid(ys, self.origin_um[1])
        # only the rows/columns that see the image are resampled
        cx = np.flatnonzero(cov_x)
        cy = np.flatnonzero(cov_y)
        c0, c1, r0, r1 = int(cx[0]), int(cx[-1]) + 1, int(cy[0]), int(cy[-1]) + 1
        if p <= self.pixel_size_um * (1 + 1e-9):
            inner = self._interpolated(gx[c0:c1], gy[r0:r1])
        else:
            inner = self._area(gx[c0:c1], gy[r0:r1], p / self.pixel_size_um)
        img = np.zeros((len(ys), len(xs)), dtype=np.float32)
        img[r0:r1, c0:c1] = (inner / self._reader.scale).astype(np.float32)
        self._field.draw(img, xs, ys, p)
        if cov_x.min() < 1.0 or cov_y.min() < 1.0:
            img = over_chuck(img, cov_y[:, None] * cov_x[None, :], xs, ys, p)
        return np.clip(img, 0.0, 1.0, out=img)

    def _interpolated(self, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
        """Lanczos-3 interpolation of the file at pixel coordinates (edge pixels extended).

        A camera looks at a continuous surface: its image is as sharp wherever the stage puts
        it. Bilinear lookup was not (half a pixel off the file's grid, it halved the picture's
        detail at a quarter of the sampling frequency), so each tile of a scan came out as
        sharp as its stage position's fraction of a pixel allowed, a texture difference no
        microscope makes and die-to-die read as a stain. Lanczos-3 keeps 97-100 % of that
        detail; on the file's own grid it reproduces the file exactly.
        """
        rows, cols = self.image_shape

        def axis(g: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, bool]:
            """File indices ``(len(g), 6)`` (clamped to the file), their weights, and whether
            every coordinate lies on the file's grid."""
            g = np.clip(g, 0.0, n - 1.0)
            i0 = np.floor(g).astype(np.int64)
            t = g - i0
            x = t[:, None] - _TAPS[None, :]
            w = np.sinc(x) * np.sinc(x / _LANCZOS_A)
            return (np.clip(i0[:, None] + _TAPS[None, :], 0, n - 1),
                    w / w.sum(axis=1, keepdims=True), not t.any())

        ix, wx, x_on_grid = axis(gx, cols)
        iy, wy, y_on_grid = axis(gy, rows)
        # one window read, with the kernel's reach
        wr0, wr1 = int(iy.min()), int(iy.max()) + 1
        wc0, wc1 = int(ix.min()), int(ix.max()) + 1
        win = self._reader.read(wr0, wr1, wc0, wc1)
        ix, iy = ix - wc0, iy - wr0
        if x_on_grid and y_on_grid:  # on the file's grid: a gather of the taps at offset 0
            return win[np.ix_(iy[:, _LANCZOS_A - 1], ix[:, _LANCZOS_A - 1])]
        across = sum(win[:, ix[:, k]] * wx[:, k] for k in range(len(_TAPS)))
        return sum(across[iy[:, k]] * wy[:, k, None] for k in range(len(_TAPS)))

    def _area(self, gx: np.ndarray, gy: np.ndarray, width: float) -> np.ndarray:
        """Exact area average of the file under each pixel footprint (``width`` file px).

        Processes bands of output rows so that at most ``_STRIP_PIXELS`` file pixels are held
        at once. Full pixels are summed with ``np.add.reduceat`` over each footprint's own
        index range, so a value does not depend on where the window starts.
        """
        rows, cols = self.image_shape
        xa, xb = _footprints(gx, width, cols)
        ya, yb = _footprints(gy, width, rows)
        wc0, wc1 = int(np.floor(xa[0])), int(np.ceil(xb[-1]))
        out = np.empty((len(gy), len(gx)), dtype=np.float64)
        band = max(1, int(_STRIP_PIXELS // max(1, (wc1 - wc0) * (width + 1))))
        for k0 in range(0, len(gy), band):
            k1 = min(k0 + band, len(gy))
            wr0, wr1 = int(np.floor(ya[k0])), int(np.ceil(yb[k1 - 1]))
            win = self._reader.read(wr0, wr1, wc0, wc1)
            horiz = _area_sum(win, xa - wc0, xb - wc0, axis=1)
            out[k0:k1] = _area_sum(horiz, ya[k0:k1] - wr0, yb[k0:k1] - wr0, axis=0)
        area = (yb - ya)[:, None] * (xb - xa)[None, :]
        return out / np.where(area > 0, area, 1.0)


def _footprints(g: np.ndarray, width: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Footprint ``[a, b]`` of each sample in pixel-edge units (pixel i covers [i, i + 1]),
    clipped to the image."""
    e = g + 0.5
    a = np.clip(e - width / 2, 0.0, float(n))
    b = np.clip(e + width / 2, 0.0, float(n))
    return a, b


def _area_sum(v: np.ndarray, a: np.ndarray, b: np.ndarray, axis: int) -> np.ndarray:
    """Integral of the piecewise-constant ``v`` over ``[a_k, b_k]`` (pixel-edge units) along
    ``axis``: whole pixels summed by ``np.add.reduceat``, partial pixels at both ends."""
    v = np.moveaxis(v, axis, -1)
    n = v.shape[-1]
    vp = np.concatenate([v, np.zeros(v.shape[:-1] + (1,), dtype=v.dtype)], axis=-1)
    s = np.clip(np.ceil(a).astype(np.int64), 0, n)  # first whole pixel
    t = np.clip(np.floor(b).astype(np.int64), 0, n)  # one past the last whole pixel
    # interleaved (s_k, t_k) indices: even outputs are the sums of v[s_k:t_k]
    idx = np.empty(2 * len(a), dtype=np.int64)
    idx[0::2] = s
    idx[1::2] = np.maximum(t, s)
    whole = np.add.reduceat(vp, idx, axis=-1)[..., 0::2]
    whole = np.where(t > s, whole, 0.0)
    first = np.clip(np.floor(a).astype(np.int64), 0, n)
    left = np.where(s > a, s - a, 0.0) * vp[..., np.clip(s - 1, 0, n)]
    right = np.where(b > t, b - t, 0.0) * vp[..., t]
    inside = (b - a) * vp[..., first]  # footprint within a single pixel
    out = np.where(s > t, inside, whole + left + right)
    return np.moveaxis(out, -1, axis)
