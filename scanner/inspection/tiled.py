"""The tiled inference engine: a fully convolutional model run over an image of any size.

The model maps an input window to anomaly, roughness and uncertainty maps at
``1 / output_stride`` of its resolution. A mosaic can be far larger than memory, so inference
walks over it in overlapping windows:

* each window is a *core* of ``step`` map pixels plus ``overlap`` map pixels on each side,
  plus ``context_px`` input pixels of context on each side that the network needs to see but
  whose outputs are dropped (they suffer from the network's zero padding);
* neighbouring windows are blended with linear ramps across their ``2 * overlap`` shared map
  pixels (weights summing to one), so nothing of a window border shows in the maps;
* window origins are multiples of :data:`ALIGN_PX` input pixels, so a network that
  downsamples internally (strided encoders) sees the same pixel grid in every window: inside
  the mosaic, tiled inference equals inference on one big window to float precision;
* windows are processed one row at a time (batched), their blended outputs accumulate in a
  buffer of one window row, and finished rows go to a sink chunk row by chunk row:
  memory depends on the window size and the mosaic *width*, never on its height;
* windows that lie wholly outside the sample (the chuck, unscanned areas) are not computed.

Images whose pixel size differs from the model's are read through :class:`GridReader`, which
resamples on the fly (bilinear, with a Gaussian anti-alias filter when shrinking) onto a
*model grid* with the model's pixel size and the same stage origin. :mod:`scanner.inspection.maps`
runs it over images and mosaics; :mod:`scanner.inspection.streammaps` is its windows-in-parallel
twin.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from scipy import ndimage

ALIGN_PX = 32
#: Default core of a window, in input pixels (before context): large enough that the context
#: margins cost little (windows 1.1x the core's area) and the network runs at its full rate per
#: pixel (on a 2-core CPU: 2.7 MP/s on 1k windows, 9.4 on 2.6k, 11.8 on 4.9k), small enough
#: that the network's activations fit comfortably (about 1.5 GB on a 5.4k window).
DEFAULT_CORE_PX = 5120
#: Map pixels of ramp on each side of a window boundary (before rounding to :data:`ALIGN_PX`).
DEFAULT_OVERLAP_PX = 32
MAPS: tuple[str, ...] = ("anomaly", "roughness", "uncertainty")


class Model(Protocol):
    """What inference needs from :class:`models.InspectionModel`."""

    output_stride: int
    context_px: int
    pixel_size_um: float
    threshold: float
    card: dict

    def normalize(self, image: np.ndarray, level: float | None = None) -> np.ndarray:
        """Raw camera counts to float32 network input, relative to a brightness level.

        ``level`` defaults to the image's own; the windows of one mosaic all get the same one.
        """

    def brightness_level(self, image: np.ndarray) -> float:
        """Robust brightness level (median) of an image or of a subsample of a mosaic."""

    def predict(self, batch: np.ndarray, margin: int = 0) -> dict[str, np.ndarray]:
        """Anomaly, roughness and uncertainty maps of a batch of normalised windows.

        Parameters
        ----------
        batch : ndarray, shape (N, H, W)
            Output of :meth:`normalize`; ``H`` and ``W`` multiples of ``output_stride``.
        margin : int
            Map pixels along each side that the caller drops (the window's context); the
            model may leave them uncomputed (NaN).

        Returns
        -------
        dict of ndarray
            float32 maps ``(N, H / output_stride, W / output_stride)`` by name, at least those
            of :data:`MAPS`.
        """


# --------------------------------------------------------------------------- reading the input


class GridReader:
    """Reads windows of an image on the *model grid*, resampling when pixel sizes differ.

    Parameters
    ----------
    source : array-like
        2-D image (numpy or zarr array; only slices are read).
    scale : float
        Source pixels per model-grid pixel (``model_pixel_um / source_pixel_um``); 1 means
        no resampling.

    Notes
    -----
    Reads outside the source are filled by mirror reflection about its border (the same for
    every window, so the context of border windows is consistent), or by the edge value when
    the source is too small to mirror.
    """

    def __init__(self, source: Any, scale: float = 1.0) -> None:
        if len(source.shape) != 2:
            raise ValueError(f"expected a 2-D image, got shape {source.shape}")
        self.source = source
        self.scale = float(scale)
        self.resample = abs(self.scale - 1.0) > 1e-3
        h, w = (int(s) for s in source.shape)
        if self.resample:
            h = math.floor((h - 1) / self.scale + 1e-9) + 1
            w = math.floor((w - 1) / self.scale + 1e-9) + 1
        self.shape = (h, w)

    def read(self, r0: int, c0: int, h: int, w: int) -> np.ndarray:
        """Model-grid window ``[r0, r0+h) x [c0, c0+w)`` as float32 (raw intensities)."""
        if not self.resample:
            return _read_reflect(self.source, r0, c0, h, w)
        f = self.scale
        # source rows sampled by this window, plus room for the filter and interpolation
        pad = 2 + (math.ceil(2 * f) if f > 1 else 0)
        sr0 = math.floor(r0 * f) - pad
        sc0 = math.floor(c0 * f) - pad
        sh = math.ceil((r0 + h - 1) * f) + pad + 2 - sr0
        sw = math.ceil((c0 + w - 1) * f) + pad + 2 - sc0
        src = _read_reflect(self.source, sr0, sc0, sh, sw)
        if f > 1:  # anti-alias before shrinking
            src = ndimage.gaussian_filter(src, sigma=0.5 * math.sqrt(f * f - 1), mode="nearest")
        rr = (r0 + np.arange(h)) * f - sr0
        cc = (c0 + np.arange(w)) * f - sc0
        coords = np.meshgrid(rr, cc, indexing="ij")
        return ndimage.map_coordinates(src, coords, order=1, mode="nearest").astype(np.float32)


def _read_reflect(src: Any, r0: int, c0: int, h: int, w: int) -> np.ndarray:
    """Read ``src[r0:r0+h, c0:c0+w]`` as float32, mirroring the image about its borders."""
    H, W = (int(s) for s in src.shape)  # noqa: N806
    a0, a1 = max(r0, 0), min(r0 + h, H)
    b0, b1 = max(c0, 0), min(c0 + w, W)
    if a0 >= a1 or b0 >= b1:
        return np.zeros((h, w), dtype=np.float32)
    pads = ((a0 - r0, r0 + h - a1), (b0 - c0, c0 + w - b1))
    if not any(p for pair in pads for p in pair):
        return np.asarray(src[a0:a1, b0:b1], dtype=np.float32)
    # the source is converted straight into the window and the borders mirrored in place:
    # np.pad would cost a second full-size copy of every border window
    out = np.empty((h, w), dtype=np.float32)
    (pt, pb), (pl, pr) = pads
    out[pt : h - pb, pl : w - pr] = src[a0:a1, b0:b1]
    # mirrored again and again where a window reaches past the image by more than the image
    # part it holds (numpy reflects repeatedly): the edge row repeated there made a flat band
    # the detector's bank never saw (features_of mirrors), and a 1800 x 1200 photograph's last
    # map rows stood at 1.37 against 0.80 on the image the model was built from
    ri = np.pad(np.arange(a1 - a0), pads[0], mode="reflect") + pt  # window row each row copies
    ci = np.pad(np.arange(b1 - b0), pads[1], mode="reflect") + pl
    if pt:
        out[:pt] = out[ri[:pt]]
    if pb:
        out[h - pb :] = out[ri[h - pb :]]
    if pl:
        out[:, :pl] = out[:, ci[:pl]]
    if pr:
        out[:, w - pr :] = out[:, ci[w - pr :]]
    return out


# --------------------------------------------------------------------------- window plan


@dataclass(frozen=True)
class Tiling:
    """How a model grid of ``shape`` input pixels is cut into windows.

    All sizes in map pixels except ``context_px`` (input pixels). Window ``(i, j)`` produces map
    rows ``[i*step - overlap, (i+1)*step + overlap)`` (clipped to the map), columns likewise.
    """

    shape: tuple[int, int]  # model grid (input pixels)
    stride: int
    step: int
    overlap: int
    context_px: int

    @property
    def map_shape(self) -> tuple[int, int]:
        """Shape of the output maps."""
        return (math.ceil(self.shape[0] / self.stride), math.ceil(self.shape[1] / self.stride))

    @property
    def grid(self) -> tuple[int, int]:
        """Number of window rows and columns."""
        r, c = self.map_shape
        return math.ceil(r / self.step), math.ceil(c / self.step)

    @property
    def window_px(self) -> int:
        """Input side of a window (core, overlaps and context)."""
        return (self.step + 2 * self.overlap) * self.stride + 2 * self.context_px

    def input_origin(self, i: int, j: int) -> tuple[int, int]:
        """Model-grid pixel of the window's input pixel (0, 0)."""
        s = self.stride
        return ((i * self.step - self.overlap) * s - self.context_px,
                (j * self.step - self.overlap) * s - self.context_px)


def plan_tiling(
    shape: tuple[int, int],
    stride: int,
    context_px: int,
    core_px: int = DEFAULT_CORE_PX,
    overlap_px: int = DEFAULT_OVERLAP_PX,
) -> Tiling:
    """Window plan with origins on the :data:`ALIGN_PX` grid.

    Parameters
    ----------
    shape : tuple of int
        Model-grid shape (input pixels).
    stride : int
        The model's output stride.
    context_px : int
        Input pixels of context the model needs on each side (rounded up to the alignment).
    core_px, overlap_px : int
        Requested core and blend overlap in input pixels (rounded up to the alignment).
    """
    if stride < 1 or ALIGN_PX % stride:
        raise ValueError(f"output stride must divide {ALIGN_PX}, got {stride}")
    up = lambda v: max(ALIGN_PX, math.ceil(v / ALIGN_PX) * ALIGN_PX)  # noqa: E731
    # as few windows as the requested core allows, shrunk to share the grid evenly (a 4.7k
    # mosaic takes 3 x 3 cores of 1.6k, not 3 x 3 of 2k of which a quarter would be padding)
    side = max(int(shape[0]), int(shape[1]), 1)
    n = math.ceil(side / up(core_px))
    core = up(math.ceil(side / n))
    if n == 1:
        # one window holds it all: nothing to blend, and the context only pads the image
        # border (mirrored), so one alignment step of it is enough; small images stay cheap
        return Tiling((int(shape[0]), int(shape[1])), stride, core // stride, 0,
                      min(up(context_px), ALIGN_PX) if context_px > 0 else 0)
    return Tiling(
        shape=(int(shape[0]), int(shape[1])),
        stride=stride,
        step=core // stride,
        overlap=up(overlap_px) // stride if overlap_px > 0 else 0,
        context_px=up(context_px) if context_px > 0 else 0,
    )


def _ramp(n: int, overlap: int) -> np.ndarray:
    """Blend weights over a window's ``n`` map pixels: rising and falling over ``2*overlap``.

    Across the shared band of two neighbours the weights are ``(k + 0.5) / (2*overlap)`` and
    one minus that: they sum to one, so values that agree stay exactly as they are.
    """
    w = np.ones(n, dtype=np.float32)
    if overlap > 0:
        ramp = (np.arange(2 * overlap, dtype=np.float32) + 0.5) / (2 * overlap)
        w[: 2 * overlap] = ramp
        w[n - 2 * overlap :] = ramp[::-1]
    return w


# --------------------------------------------------------------------------- the engine


class RowSink(Protocol):
    """Receives finished map rows ``[r0, r0 + block.shape[0])`` (full width) per map name."""

    def write(self, r0: int, blocks: dict[str, np.ndarray]) -> None:
        """Take finished map rows from row ``r0`` on: one full-width block per map name."""


class ArraySink:
    """Keeps the maps in memory (plain images)."""

    def __init__(self, shape: tuple[int, int]) -> None:
        self.maps = {name: np.zeros(shape, dtype=np.float32) for name in MAPS}

    def write(self, r0: int, blocks: dict[str, np.ndarray]) -> None:
        """Copy each block into rows ``[r0, r0 + len(block))`` of its in-memory map."""
        for name, block in blocks.items():
            self.maps[name][r0 : r0 + block.shape[0]] = block


class ZarrSink:
    """Writes map rows to level 0 of Zarr arrays (rows arrive chunk-row aligned)."""

    def __init__(self, arrays: dict[str, Any]) -> None:
        self.arrays = arrays

    def write(self, r0: int, blocks: dict[str, np.ndarray]) -> None:
        """Write each block into rows ``[r0, r0 + len(block))`` of its Zarr array."""
        for name, block in blocks.items():
            self.arrays[name][r0 : r0 + block.shape[0], :] = block


@dataclass
class InferenceStats:
    """What a tiled inference did, and how long it took."""

    windows: int = 0
    skipped: int = 0
    read_s: float = 0.0
    network_s: float = 0.0
    total_s: float = 0.0
    input_px: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _threads() -> int:
    """Cores this process may use (affinity-aware)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not on Linux
        return max(1, os.cpu_count() or 1)


#: a pixel whose surroundings (the image closed over :data:`CLOSE_PX`) lie under this share of
#: the lit surface's level, or over its inverse, is not the lit surface: a dead or inactive
#: region of a PV cell, a wide crack's dark area, a busbar, a bright reflection. A PV cell's
#: inactive area is 0.1-0.6 of it, its busbars 0.1; a good surface's grains and falloff stay
#: within 0.7-1.3 of it (simulated mono and poly cells, 8-40 um)
LIT_SHARE = 0.6
#: side (pixels) of the grey closing that fills fine dark lines (fingers, grain boundaries,
#: thin cracks: part of the lit surface's texture) before the lit surface is told apart
CLOSE_PX = 15
#: half width (natural log) of the window that finds the lit surface's mode: a poly cell's
#: grains differ by up to 0.55 / 0.8
MODE_WIDTH = 0.2


def lit_level(image: np.ndarray, valid: np.ndarray) -> float:
    """The level of the lit surface of ``image`` (its ``valid`` pixels), robust to large dark
    and bright areas.

    The plain median of the pixels moves with a large dark region: a PV cell with a dead
    region over 40 % of it put the median at the 17th percentile of the rest, which then read
    as bright and scored as defects. So the lit surface is found first: the image closed over
    :data:`CLOSE_PX` (fine dark lines filled, wide dark areas kept), its mode found by a
    median shift in log brightness from the upper quartile (the lit surface is the brightest
    large population, however much of the image is dark), and the pixels whose closed value
    lies within :data:`LIT_SHARE` of that mode. The level is the median of those pixels; on a
    surface without large dark or bright areas that is the plain median."""
    from models.modelfile import brightness_level

    values = image[valid]
    if not values.size:
        return 1.0
    filled = np.where(valid, image, np.float32(np.median(values)))
    closed = ndimage.grey_closing(filled, size=(CLOSE_PX, CLOSE_PX))[valid]
    logs = np.log(np.maximum(closed, 1e-6))
    step = max(1, logs.size // 200_000)
    sample = np.sort(logs[::step])
    centre = float(np.quantile(sample, 0.75))
    for _ in range(30):
        lo, hi = np.searchsorted(sample, [centre - MODE_WIDTH, centre + MODE_WIDTH])
        moved = float(np.median(sample[lo:hi]))
        if abs(moved - centre) < 1e-4:
            break
        centre = moved
    lit = np.abs(logs - centre) <= -math.log(LIT_SHARE)
    kept = values[lit] if lit.any() else values
    return float(brightness_level(kept[None, :]))


def source_level(source: Any, grid: int = 8, window: int = 128,
                 inside: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None) -> float:
    """Brightness level of a whole image or mosaic, from full-resolution samples.

    ``grid x grid`` windows of ``window`` pixels spread evenly over the source are read (a few
    chunks of a mosaic, whatever its size) and the level of the lit surface is taken over
    their pixels (:func:`lit_level`), leaving out zeros (unscanned
    mosaic areas) and, with ``inside(rows, cols)`` (a boolean grid, see
    :func:`polygon_pixels`), what lies off the sample. Full-resolution pixels, not a pyramid
    level, because averaging changes the median of a patterned surface.
    """
    h, w = (int(n) for n in source.shape)
    if h * w <= (grid * window) ** 2:
        sub = np.asarray(source[:], dtype=np.float32)
        valid = inside(np.arange(h), np.arange(w)) if inside is not None else \
            np.ones(sub.shape, dtype=bool)
    else:
        # the windows' rows times their columns, in one orthogonal read: each chunk is
        # decoded once (not once per window that touches it), chunks concurrently
        rows = np.concatenate([np.arange(window) + max(0, min(h - window, int(
            (i + 0.5) * h / grid) - window // 2)) for i in range(grid)])
        cols = np.concatenate([np.arange(window) + max(0, min(w - window, int(
            (j + 0.5) * w / grid) - window // 2)) for j in range(grid)])
        block = source.oindex[rows, cols] if hasattr(source, "oindex") else \
            np.asarray(source)[np.ix_(rows, cols)]
        sub = np.asarray(block, dtype=np.float32)
        valid = inside(rows, cols) if inside is not None else np.ones(sub.shape, dtype=bool)
    valid = np.asarray(valid, dtype=bool) & (sub != 0)
    if not valid.any():
        return 1.0
    return lit_level(sub, valid)


def run_tiled(
    model: Model,
    reader: GridReader,
    sink: RowSink,
    *,
    tiling: Tiling | None = None,
    batch: int = 1,
    mask: Callable[[int, int, int, int], np.ndarray | None] | None = None,
    skip_empty: bool = False,
    level: float | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> InferenceStats:
    """Run the model over the whole model grid of ``reader``, window row by window row.

    Parameters
    ----------
    model : Model
        The inspection model.
    reader : GridReader
        Source on the model grid.
    sink : RowSink
        Receives finished map rows.
    tiling : Tiling, optional
        Window plan (default :func:`plan_tiling` with the model's stride and context).
    batch : int
        Windows per network call (1: on a CPU a bigger batch gains nothing, and the next
        window is read while the network runs on this one).
    mask : callable, optional
        ``mask(r0, c0, h, w)`` gives the boolean map-pixel mask of the sample over a map region,
        or None when the region lies wholly outside it: such windows are skipped, and the
        maps are 0 outside the mask.
    skip_empty : bool
        Skip windows whose input is all zeros (unscanned mosaic areas).
    level : float, optional
        Brightness level for ``model.normalize``, the same for every window (a per-window
        level would make windows disagree). Default: that of a subsample of the source.
    progress : callable, optional
        ``progress(done, total)`` in windows.
    """
    import torch

    t_start = time.perf_counter()
    s = int(model.output_stride)
    tiling = tiling or plan_tiling(reader.shape, s, int(model.context_px))
    stats = InferenceStats()
    if level is None:
        level = source_level(reader.source)
    stats.extra["level"] = float(level)
    run = _Pass(model, reader, tiling, stats, mask, skip_empty, float(level))
    n_rows, n_cols = tiling.grid
    total = n_rows * n_cols
    old_threads = torch.get_num_threads()
    torch.set_num_threads(_threads())
    if hasattr(model, "num_threads"):
        model.num_threads = _threads()
    try:
        with ThreadPoolExecutor(max_workers=1) as pool, torch.inference_mode():
            for i in range(n_rows):
                run.window_row(i, pool, batch, progress, total)
                if i >= 1:
                    _emit(i - 1, run.acc, run.wsum, tiling, tiling.map_shape[0], sink, mask)
                run.shift()
            _emit(n_rows - 1, run.acc, run.wsum, tiling, tiling.map_shape[0], sink, mask)
    finally:
        torch.set_num_threads(old_threads)
    if progress is not None:
        progress(total, total)
    stats.total_s = time.perf_counter() - t_start
    return stats


class _Pass:
    """One pass of :func:`run_tiled`: reads windows, runs the model on them and blends their
    maps into an accumulator of map rows ``[(i-1)*step, (i+1)*step + ov)`` while window row
    ``i`` is processed (chunk row ``i-1``, its first ``step`` rows, is final once window row
    ``i`` has been added)."""

    def __init__(self, model: Model, reader: GridReader, tiling: Tiling, stats: InferenceStats,
                 mask: Callable[[int, int, int, int], np.ndarray | None] | None,
                 skip_empty: bool, level: float) -> None:
        self.model, self.reader, self.tiling, self.stats = model, reader, tiling, stats
        self.mask, self.skip_empty, self.level = mask, skip_empty, level
        self.s = int(model.output_stride)
        step, ov = tiling.step, tiling.overlap
        self.n_win = step + 2 * ov  # map pixels produced per window (before clipping)
        mw = tiling.map_shape[1]
        self.acc = {k: np.zeros((2 * step + ov, mw), dtype=np.float32) for k in MAPS}
        self.wsum = np.zeros((2 * step + ov, mw), dtype=np.float32)

    def window_input(self, i: int, j: int) -> np.ndarray | None:
        """The normalised input of window ``(i, j)``; None when it shows nothing scanned."""
        tiling, stats = self.tiling, self.stats
        r0, c0 = tiling.input_origin(i, j)
        side = tiling.window_px
        t = time.perf_counter()
        raw = self.reader.read(r0, c0, side, side)
        ctx = tiling.context_px
        if self.skip_empty and not core_in_source(raw, r0, c0, ctx, self.reader.shape).any():
            stats.read_s += time.perf_counter() - t
            return None  # nothing scanned here (read once: the check costs no second decode)
        data = np.asarray(self.model.normalize(raw, self.level), dtype=np.float32)
        stats.read_s += time.perf_counter() - t
        return data

    def windows_of_row(self, i: int) -> Iterator[tuple[int, int]]:
        """The windows of window row ``i`` that touch the sample (the others are counted as
        skipped)."""
        tiling, n_win = self.tiling, self.n_win
        mh, mw = tiling.map_shape
        step, ov = tiling.step, tiling.overlap
        for j in range(tiling.grid[1]):
            if self.mask is not None:
                mr0, mc0 = i * step - ov, j * step - ov
                if self.mask(max(mr0, 0), max(mc0, 0), min(mr0 + n_win, mh) - max(mr0, 0),
                             min(mc0 + n_win, mw) - max(mc0, 0)) is None:
                    self.stats.skipped += 1
                    continue
            yield i, j

    def window_row(self, i: int, pool: ThreadPoolExecutor, batch: int,
                   progress: Callable[[int, int], None] | None, total: int) -> None:
        """Run window row ``i`` in batches into the accumulator, reading the next windows
        while the model runs on the current batch."""
        stats, tiling = self.stats, self.tiling
        ctx_m, mw = tiling.context_px // self.s, tiling.map_shape[1]
        todo = list(self.windows_of_row(i))
        futures: list[Any] = [pool.submit(self.window_input, *ij) for ij in todo[: batch + 1]]
        k = 0
        while k < len(todo):
            batch_ij, batch_x = [], []
            while k < len(todo) and len(batch_ij) < batch:
                x = futures[k].result()
                futures[k] = None  # let it be freed
                if len(futures) < len(todo):
                    futures.append(pool.submit(self.window_input, *todo[len(futures)]))
                if x is None:
                    stats.skipped += 1
                else:
                    batch_ij.append(todo[k])
                    batch_x.append(x)
                k += 1
            if batch_x:
                t = time.perf_counter()
                out = self.model.predict(np.stack(batch_x), margin=ctx_m)
                stats.network_s += time.perf_counter() - t
                stats.windows += len(batch_x)
                stats.input_px += len(batch_x) * (self.n_win * self.s) ** 2
                for b, (_, j) in enumerate(batch_ij):
                    _accumulate(self.acc, self.wsum, out, b, j, tiling, ctx_m, mw)
            if progress is not None:
                progress(min(stats.windows + stats.skipped, total), total)

    def shift(self) -> None:
        """Move the accumulator up by one chunk row (after that row was emitted)."""
        step, ov = self.tiling.step, self.tiling.overlap
        for arr in (*self.acc.values(), self.wsum):
            arr[: step + ov] = arr[step:]
            arr[step + ov :] = 0


def core_in_source(window: np.ndarray, r0: int, c0: int, context_px: int,
                   shape: tuple[int, int]) -> np.ndarray:
    """The part of a window read at ``(r0, c0)`` that is its core (``context_px`` in from each
    side) and inside the source of ``shape``: what "nothing scanned here" is judged on (beyond
    the source the window holds the mirror of what it holds inside)."""
    h, w = window.shape[-2:]
    a0, a1 = max(context_px, -r0), min(h - context_px, shape[0] - r0)
    b0, b1 = max(context_px, -c0), min(w - context_px, shape[1] - c0)
    return window[..., max(a0, 0):max(a1, 0), max(b0, 0):max(b1, 0)]


def _accumulate(
    acc: dict[str, np.ndarray], wsum: np.ndarray, out: dict[str, Any], b: int, j: int,
    tiling: Tiling, ctx_m: int, mw: int,
) -> None:
    """Add window ``b`` of a batch output (window column ``j``) to the row accumulator.

    The window's core and overlaps cover accumulator rows ``[step - ov, 2*step + ov)`` and map
    columns ``[j*step - ov, (j+1)*step + ov)``, clipped to the map.
    """
    step, ov = tiling.step, tiling.overlap
    n_win = step + 2 * ov
    c0 = j * step - ov
    a, z = max(0, -c0), min(n_win, mw - c0)  # window columns inside the map
    if z <= a:
        return
    ramp = _ramp(n_win, ov)
    w2 = np.multiply.outer(ramp, ramp[a:z])
    rows = slice(step - ov, 2 * step + ov)
    cols = slice(c0 + a, c0 + z)
    for name in MAPS:
        m = np.asarray(out[name][b], dtype=np.float32)
        acc[name][rows, cols] += m[ctx_m : ctx_m + n_win, ctx_m + a : ctx_m + z] * w2
    wsum[rows, cols] += w2


def _emit(
    i: int, acc: dict[str, np.ndarray], wsum: np.ndarray, tiling: Tiling, mh: int,
    sink: RowSink, mask: Callable[[int, int, int, int], np.ndarray | None] | None,
) -> None:
    """Normalise and write chunk row ``i`` (accumulator rows ``[0, step)``, clipped to the map)."""
    r0 = i * tiling.step
    h = min(tiling.step, mh - r0)
    if h <= 0:
        return
    mw = wsum.shape[1]
    valid = wsum[:h] > 0
    inside = mask(r0, 0, h, mw) if mask is not None else True
    blocks = {}
    for name in MAPS:
        blk = np.zeros((h, mw), dtype=np.float32)
        np.divide(acc[name][:h], wsum[:h], out=blk, where=valid)
        if inside is None:
            blk[:] = 0
        elif inside is not True:
            blk[~inside] = 0
        blocks[name] = blk
    sink.write(r0, blocks)
