"""Inference over a mosaic in memory bounded in width as well as height.

:func:`scanner.inspection.tiled.run_tiled` blends windows in a buffer one window row high and as
wide as the mosaic (about 0.5 GB across a 300 mm wafer at 2 µm, 3 GB at 1 µm). Here the work is
cut in two steps that each hold a few windows only:

1. **compute** (:func:`compute_windows`): each window's maps (its core and blend overlaps,
   unweighted, ``(3, n, n)`` float32) go to a scratch Zarr array with one chunk per window;
   a window that is not computed (outside the sample, or nothing scanned) is never written,
   so it reads back as the fill value NaN;
2. **blend** (:func:`blend_chunk_row`): each chunk of the maps is the weighted sum of the
   (at most 3 x 3) windows that overlap it, divided by the sum of their weights, then masked.

The sums are taken in the order in which :func:`~scanner.inspection.tiled.run_tiled` takes them
(window rows, then window columns, starting from zero), with the same float32 products, so
the maps are bit for bit those of the row buffer. Both steps only need their own windows and
chunks: :mod:`scanner.cluster` runs them as dask tasks; here they run one after the other,
window row ``i`` then chunk row ``i - 1``, and scratch rows no longer needed are deleted, so
the scratch holds three window rows at a time.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from models.edgeband import calibrated_band
from models.heap import reused_heap
from scanner.inspection.tiled import (
    MAPS,
    GridReader,
    InferenceStats,
    Model,
    Tiling,
    _ramp,
    _threads,
    core_in_source,
)

__all__ = ["blend_chunk_row", "compute_windows", "create_scratch", "planned_windows",
           "stream_maps"]

Mask = Callable[[int, int, int, int], np.ndarray | None]


@dataclass(frozen=True)
class EdgeBand:
    """The border band of the usable area calibrated on its own (:mod:`models.edgeband`):
    the anomaly map there is divided by ``factor`` (the uncertainty recomputed around
    ``threshold``). ``inner``: the mask of the usable area beyond the band."""

    inner: Mask
    factor: float
    threshold: float
    log_scale: float


def create_scratch(path: Path, tiling: Tiling) -> zarr.Array:
    """The scratch array of window maps: ``(rows, cols, 3, n, n)``, one chunk per window.

    Not compressed (it lives for the length of one inference); NaN where no window was
    computed, and such chunks are not stored.
    """
    n_rows, n_cols = tiling.grid
    n_win = tiling.step + 2 * tiling.overlap
    if path.exists():
        shutil.rmtree(path)
    return zarr.create_array(
        str(path), shape=(n_rows, n_cols, len(MAPS), n_win, n_win),
        chunks=(1, 1, len(MAPS), n_win, n_win), dtype=np.float32, fill_value=np.nan,
        compressors=None, zarr_format=3, config={"write_empty_chunks": False})


def planned_windows(tiling: Tiling, mask: Mask | None) -> tuple[list[tuple[int, int]], int]:
    """Windows to compute in row-major order, and how many lie wholly outside ``mask``."""
    mh, mw = tiling.map_shape
    n_rows, n_cols = tiling.grid
    step, ov = tiling.step, tiling.overlap
    n_win = step + 2 * ov
    todo: list[tuple[int, int]] = []
    skipped = 0
    for i in range(n_rows):
        for j in range(n_cols):
            if mask is not None:
                mr0, mc0 = i * step - ov, j * step - ov
                if mask(max(mr0, 0), max(mc0, 0), min(mr0 + n_win, mh) - max(mr0, 0),
                        min(mc0 + n_win, mw) - max(mc0, 0)) is None:
                    skipped += 1
                    continue
            todo.append((i, j))
    return todo, skipped


@reused_heap()
def compute_windows(
    model: Model,
    reader: GridReader,
    tiling: Tiling,
    windows: list[tuple[int, int]],
    scratch: zarr.Array,
    *,
    level: float,
    skip_empty: bool,
    batch: int = 1,
    stats: InferenceStats | None = None,
    on_window: Callable[[], None] | None = None,
) -> InferenceStats:
    """Run the network on ``windows`` and store their maps in ``scratch``.

    The next window is read (and normalised) on a thread while the network runs on this one.
    The caller sets torch's threads. ``on_window()`` is called after each window, computed
    or found empty.
    """
    stats = stats if stats is not None else InferenceStats()
    s = int(tiling.stride)
    n_win = tiling.step + 2 * tiling.overlap
    ctx_m = tiling.context_px // s
    ctx = tiling.context_px
    side = tiling.window_px

    def window_input(i: int, j: int) -> tuple[np.ndarray | None, float]:
        t = time.perf_counter()
        r0, c0 = tiling.input_origin(i, j)
        raw = reader.read(r0, c0, side, side)
        if skip_empty and not core_in_source(raw, r0, c0, ctx, reader.shape).any():
            return None, time.perf_counter() - t  # nothing scanned here
        data = np.asarray(model.normalize(raw, level), dtype=np.float32)
        return data, time.perf_counter() - t

    with ThreadPoolExecutor(max_workers=1) as pool:
        futures: list[Any] = [pool.submit(window_input, *ij) for ij in windows[: batch + 1]]
        k = 0
        while k < len(windows):
            batch_ij, batch_x = [], []
            while k < len(windows) and len(batch_ij) < batch:
                x, read_s = futures[k].result()
                futures[k] = None  # let it be freed
                stats.read_s += read_s
                if len(futures) < len(windows):
                    futures.append(pool.submit(window_input, *windows[len(futures)]))
                if x is None:
                    stats.skipped += 1
                    if on_window is not None:
                        on_window()
                else:
                    batch_ij.append(windows[k])
                    batch_x.append(x)
                k += 1
            if not batch_x:
                continue
            t = time.perf_counter()
            out = model.predict(np.stack(batch_x), margin=ctx_m)
            stats.network_s += time.perf_counter() - t
            stats.windows += len(batch_x)
            stats.input_px += len(batch_x) * (n_win * s) ** 2
            for b, (i, j) in enumerate(batch_ij):
                scratch[i, j] = np.stack([
                    np.asarray(out[name][b], dtype=np.float32)[ctx_m : ctx_m + n_win,
                                                               ctx_m : ctx_m + n_win]
                    for name in MAPS])
                if on_window is not None:
                    on_window()
    return stats


def blend_chunk_row(
    ci: int, scratch: zarr.Array, tiling: Tiling, arrays: dict[str, Any],
    mask: Mask | None, edge: EdgeBand | None = None,
) -> None:
    """Blend, normalise, mask and write chunk row ``ci`` of the maps, chunk by chunk (and
    calibrate the usable area's border band: ``edge``).

    Each chunk sums the windows of rows ``ci - 1 .. ci + 1`` and of the three columns around
    it, row by row and column by column (the order of :func:`scanner.inspection.tiled.run_tiled`);
    the windows of three columns are kept while the chunk column moves right.
    """
    step, ov = tiling.step, tiling.overlap
    mh, mw = tiling.map_shape
    n_rows, n_cols = tiling.grid
    n_win = step + 2 * ov
    r0 = ci * step
    h = min(step, mh - r0)
    if h <= 0:
        return
    ramp = _ramp(n_win, ov)
    rows = [wi for wi in (ci - 1, ci, ci + 1) if 0 <= wi < n_rows]
    cache: dict[tuple[int, int], np.ndarray | None] = {}

    def window(wi: int, wj: int) -> np.ndarray | None:
        if (wi, wj) not in cache:
            block = np.asarray(scratch[wi, wj])
            cache[(wi, wj)] = None if np.isnan(block).all() else block
        return cache[(wi, wj)]

    for cj in range(math.ceil(mw / step)):
        for key in [k for k in cache if k[1] < cj - 1]:
            del cache[key]
        c0 = cj * step
        w = min(step, mw - c0)
        acc = np.zeros((len(MAPS), h, w), dtype=np.float32)
        wsum = np.zeros((h, w), dtype=np.float32)
        for wi in rows:
            for wj in (cj - 1, cj, cj + 1):
                if not 0 <= wj < n_cols:
                    continue
                out = window(wi, wj)
                if out is None:
                    continue
                wr0, wc0 = wi * step - ov, wj * step - ov  # map pixel of window pixel (0, 0)
                a0, a1 = max(r0, wr0), min(r0 + h, wr0 + n_win)
                b0, b1 = max(c0, wc0), min(c0 + w, wc0 + n_win)
                if a0 >= a1 or b0 >= b1:
                    continue
                src = (slice(a0 - wr0, a1 - wr0), slice(b0 - wc0, b1 - wc0))
                dst = (slice(a0 - r0, a1 - r0), slice(b0 - c0, b1 - c0))
                w2 = np.multiply.outer(ramp[src[0]], ramp[src[1]])
                for k in range(len(MAPS)):
                    acc[k][dst] += out[k][src] * w2
                wsum[dst] += w2
        valid = wsum > 0
        inside = mask(r0, c0, h, w) if mask is not None else True
        blocks = {}
        for k, name in enumerate(MAPS):
            blk = np.zeros((h, w), dtype=np.float32)
            np.divide(acc[k], wsum, out=blk, where=valid)
            if inside is None:
                blk[:] = 0
            elif inside is not True:
                blk[~inside] = 0
            blocks[name] = blk
        if edge is not None and inside is not None:
            inner = edge.inner(r0, c0, h, w)
            band = np.ones((h, w), dtype=bool) if inside is True else inside.copy()
            if inner is not None:
                band &= ~inner
            calibrated_band(blocks["anomaly"], blocks.get("uncertainty"), band, edge.factor,
                            edge.threshold, edge.log_scale)
        for name, blk in blocks.items():
            arrays[name][r0 : r0 + h, c0 : c0 + w] = blk


def drop_scratch_row(scratch: zarr.Array, i: int) -> None:
    """Delete the stored windows of window row ``i`` (the blend no longer needs them)."""
    root = Path(str(scratch.store_path.store.root)) / scratch.store_path.path
    key = scratch.metadata.encode_chunk_key((i, 0, 0, 0, 0))
    parts = key.split("/")
    row_dir = root.joinpath(*parts[:2]) if parts[0] == "c" else None
    if row_dir is not None and row_dir.is_dir():
        shutil.rmtree(row_dir, ignore_errors=True)


def _by_row(windows: list[tuple[int, int]], n_rows: int) -> Iterator[list[tuple[int, int]]]:
    rows: list[list[tuple[int, int]]] = [[] for _ in range(n_rows)]
    for ij in windows:
        rows[ij[0]].append(ij)
    yield from rows


@reused_heap()
def stream_maps(
    model: Model,
    reader: GridReader,
    arrays: dict[str, Any],
    scratch_path: Path,
    *,
    tiling: Tiling,
    level: float,
    mask: Mask | None = None,
    skip_empty: bool = False,
    batch: int = 1,
    progress: Callable[[int, int], None] | None = None,
    edge: EdgeBand | None = None,
) -> InferenceStats:
    """Fill the level-0 map ``arrays`` (chunks of ``tiling.step``), in this process.

    Window row ``i`` is computed, then chunk row ``i - 1`` blended and the windows of row
    ``i - 2`` dropped: the scratch holds three window rows, the memory a few windows.
    """
    import torch

    t_start = time.perf_counter()
    n_rows, n_cols = tiling.grid
    total = n_rows * n_cols
    todo, skipped = planned_windows(tiling, mask)
    stats = InferenceStats(skipped=skipped)
    stats.extra["level"] = float(level)
    scratch = create_scratch(scratch_path, tiling)

    def tick() -> None:
        if progress is not None:
            progress(min(stats.windows + stats.skipped, total), total)

    old_threads = torch.get_num_threads()
    torch.set_num_threads(_threads())
    if hasattr(model, "num_threads"):
        model.num_threads = _threads()
    try:
        with torch.inference_mode():
            for i, row in enumerate(_by_row(todo, n_rows)):
                compute_windows(model, reader, tiling, row, scratch, level=level,
                                skip_empty=skip_empty, batch=batch, stats=stats,
                                on_window=tick)
                if i >= 1:
                    blend_chunk_row(i - 1, scratch, tiling, arrays, mask, edge)
                if i >= 2:
                    drop_scratch_row(scratch, i - 2)
            blend_chunk_row(n_rows - 1, scratch, tiling, arrays, mask, edge)
    finally:
        torch.set_num_threads(old_threads)
        shutil.rmtree(scratch_path, ignore_errors=True)
    if progress is not None:
        progress(total, total)
    stats.total_s = time.perf_counter() - t_start
    return stats
