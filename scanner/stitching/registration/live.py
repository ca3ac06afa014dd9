"""Registration while the stage moves: the pairs of a scan measured as its tiles arrive (and
the flat-field's thumbnails of the tiles computed).

:class:`LiveRegistrar` is fed each tile as soon as it is stored (``acquire``'s ``on_tile``) and
measures, in the background (a worker thread keeping strips of the tiles, a few threads for
the pairs), the pairs of that tile with its grid neighbours already seen (left and upper, and
right and lower when the scan runs serpentine), exactly as
:func:`scanner.stitching.registration.scan.register_tiles` does afterwards: ``_register_one`` on the
same strips. The acquisition thread never waits for it: :meth:`LiveRegistrar.feed` queues a
copy of the tile and returns; when more than ``max_queued_bytes`` wait, the tile is dropped
and its pairs are left to the stitch stage. A failure in the worker is logged and its pairs
are left to the stitch stage too.

The parameters register_tiles will use are only known at the end (the step is the median over
every pair of the reported positions, which a lost tile changes), so the worker measures with
the parameters of the plan and :meth:`LiveResults.lookup` hands a pair over only when it is
provably the one register_tiles would measure:

* the same two tiles (their journal rows as tiles.csv holds them: index, grid cell, reported
  position, Z, time);
* the same search key (``pairwise.search_key``: the cut and the whole-pixel window, the only
  way the expected offset and the search window enter a registration), ``min_ncc`` and shape;
* of tile ``a`` (left or upper) register_tiles keeps a strip and a read outside it ends the
  registration (``IndexError``): the worker records the extent of what it read of ``a``; a
  pair whose reads all lie inside the strip register_tiles keeps reads the same pixels there,
  so it goes the same way. A pair that read outside the strip the worker held is handed over
  only if that strip is the one register_tiles keeps. Tile ``b`` is read whole there: a pair
  whose read of ``b`` fell outside what the worker held is not handed over.

Anything else is measured again by register_tiles, from the store.

The flat-field's thumbnail of each tile (``flatfield.thumbnail``) is computed from the same data
and handed over for the same journal row only (:meth:`LiveResults.thumbnails_for`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from scanner.stitching.registration.flatfield import thumbnail
from scanner.stitching.registration.pairwise import PairResult, search_key
from scanner.stitching.registration.scan import (
    CameraGeometry,
    SearchParams,
    _Crop,
    _register_one,
    search_params,
    tile_prior,
)
from scanner.tilestore import COLUMNS, TileRecord, _fmt, as_journaled

__all__ = ["LiveRegistrar", "LiveResults", "MeasuredPair"]

log = logging.getLogger("waferscope.live")

#: Journal columns that identify one acquisition of a tile.
_IDENTITY = ("index", "row", "col", "x_um", "y_um", "z_um", "time_s", "status")
assert set(_IDENTITY) <= set(COLUMNS)

#: Extra pixels kept of each strip beyond the plan's estimate (the final step differs a little).
_MARGIN = 8

Region = tuple[int, int, int, int]  # r0, r1, c0, c1 in a tile's own pixels


def identity(record: TileRecord) -> tuple[str, ...]:
    """What identifies one acquisition of a tile, as tiles.csv writes it."""
    return tuple(_fmt(getattr(record, name)) for name in _IDENTITY)


class _Tracked(_Crop):
    """A crop that records the extent of what was read from it and any read outside it."""

    def __init__(self, data: np.ndarray, r0: int, c0: int) -> None:
        super().__init__(data, r0, c0)
        self.read: Region | None = None
        self.outside = False

    @property
    def region(self) -> Region:
        return (self.r0, self.r0 + self.data.shape[0], self.c0, self.c0 + self.data.shape[1])

    def __getitem__(self, sl: tuple[slice, slice]) -> np.ndarray:
        try:
            out = super().__getitem__(sl)
        except IndexError:
            self.outside = True
            raise
        box = (sl[0].start, sl[0].stop, sl[1].start, sl[1].stop)
        r = self.read
        self.read = box if r is None else (min(r[0], box[0]), max(r[1], box[1]),
                                           min(r[2], box[2]), max(r[3], box[3]))
        return out


def _inside(inner: Region, outer: Region) -> bool:
    return (outer[0] <= inner[0] and inner[1] <= outer[1] and outer[2] <= inner[2]
            and inner[3] <= outer[3])


@dataclass(frozen=True)
class MeasuredPair:
    """A pair measured during acquisition and what it was measured with."""

    result: PairResult  # a, b are tile (plan) indices
    a: tuple[str, ...]  # identity of the tiles' acquisitions
    b: tuple[str, ...]
    key: tuple[int, int, int, int]
    min_ncc: float
    shape: tuple[int, int]
    a_held: Region  # what the worker held of tile a
    a_read: Region | None  # the extent of what it read there
    a_outside: bool  # a read of tile a fell outside a_held
    b_outside: bool  # a read of tile b fell outside what the worker held of it


@dataclass
class LiveResults:
    """What the worker measured: pairs keyed by ``(tile index a, tile index b)``.

    Implements ``registration.scan.PairSource`` for ``register_tiles(precomputed=...)``.
    """

    pairs: dict[tuple[int, int], MeasuredPair] = field(default_factory=dict)
    params: SearchParams | None = None
    camera: CameraGeometry | None = None
    min_ncc: float = 0.3
    stats: dict[str, Any] = field(default_factory=dict)
    thumbnails: dict[int, tuple[tuple[str, ...], np.ndarray]] = field(default_factory=dict)

    def thumbnails_for(self, records: Iterable[TileRecord]) -> dict[int, np.ndarray]:
        """The flat-field thumbnails of these tiles computed from these very acquisitions."""
        out = {}
        for r in records:
            got = self.thumbnails.get(r.index)
            if got is not None and got[0] == identity(r):
                out[r.index] = got[1]
        return out

    def lookup(self, a: TileRecord, b: TileRecord, key: tuple[int, int, int, int],
               min_ncc: float, shape: tuple[int, int], region_a: Region) -> PairResult | None:
        """The pair if it is exactly what register_tiles would measure (see the module)."""
        m = self.pairs.get((a.index, b.index))
        if m is None or m.a != identity(a) or m.b != identity(b):
            return None
        if m.key != tuple(key) or m.min_ncc != min_ncc or m.shape != tuple(shape):
            return None
        if m.b_outside:
            return None
        if m.a_outside:  # the registration ended at the edge of the strip held
            return m.result if m.a_held == tuple(region_a) else None
        if m.a_read is not None and not _inside(m.a_read, region_a):
            return None
        return m.result


#: Neighbour directions: (row step, col step, kind of the pair, whether the new tile is b).
#: A "left" pair has a left of b, an "up" pair a above b.
_NEIGHBOURS = ((0, -1, "left", True), (-1, 0, "up", True), (0, 1, "left", False),
               (1, 0, "up", False))


class LiveRegistrar:
    """Measures the pairs of a scan on a worker thread as its tiles are acquired.

    Parameters
    ----------
    shape : (int, int)
        Tile shape.
    camera : CameraGeometry
        Pixel size and rotation (as the stitch stage will use them).
    repeatability_um, max_shift_um, min_ncc :
        As for ``register_tiles``.
    planned : iterable of (index, row, col, x_um, y_um)
        Every tile of the plan: the parameters are estimated from their planned positions.
    coming : iterable of int
        Indices of the tiles this acquisition takes (a neighbour outside them is not waited
        for).
    max_queued_bytes : int
        Tiles waiting beyond this are dropped (left to the stitch stage); one always fits.
    workers : int
        Threads measuring the pairs (the worker thread keeps the strips and hands them out).
    register, thumbnails : bool
        Measure the pairs; compute the flat-field thumbnails.
    """

    def __init__(
        self,
        shape: tuple[int, int],
        camera: CameraGeometry,
        repeatability_um: float,
        *,
        max_shift_um: float | None = None,
        min_ncc: float = 0.3,
        planned: Iterable[tuple[int, int, int, float, float]],
        coming: Iterable[int],
        max_queued_bytes: int = 128 * 2**20,
        workers: int = 2,
        register: bool = True,
        thumbnails: bool = False,
    ) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.camera = camera
        self.min_ncc = float(min_ncc)
        planned = list(planned)
        self._cell = {int(i): (int(r), int(c)) for i, r, c, _, _ in planned}
        self._by_cell = {rc: i for i, rc in self._cell.items()}
        self._coming = set(coming)
        stage = np.array([(float(_fmt(float(x))), float(_fmt(float(y))))
                          for _, _, _, x, y in planned], dtype=float)
        grid = {(int(r), int(c)): k for k, (_, r, c, _, _) in enumerate(planned)}
        h, w = self.shape
        self.params = search_params(tile_prior(stage, camera, self.shape), grid, self.shape,
                                    camera, repeatability_um, max_shift_um)
        self._keep_c = min(w, self.params.keep_c + _MARGIN)
        self._keep_r = min(h, self.params.keep_r + _MARGIN)
        self._max_bytes = int(max_queued_bytes)
        self._lock = threading.Lock()
        self._queued_bytes = 0
        self._queue: queue.Queue[Any] = queue.Queue()
        self._aborted = False
        self._records: dict[int, TileRecord] = {}
        self._strips: dict[tuple[int, str], _Crop] = {}  # (tile, side) -> strip kept there
        self._dropped: set[int] = set()
        self._waited = 0.0
        self._released: set[int] = set()
        self._register, self._thumbnails = bool(register), bool(thumbnails)
        self.pairs: dict[tuple[int, int], MeasuredPair] = {}
        self.thumbs: dict[int, tuple[tuple[str, ...], np.ndarray]] = {}
        self.stats = {"tiles": 0, "pairs": 0, "thumbnails": 0, "dropped": 0, "failures": 0,
                      "busy_s": 0.0}
        # the worker keeps the strips; the pairs are measured on a few threads (the FFTs,
        # filters and warps release the GIL)
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers),
                                        thread_name_prefix="live registration")
        self._jobs: list[Future[None]] = []
        # pairs waiting for a thread hold their tiles: the worker waits for a free slot (and
        # the tiles queue up behind it, within max_queued_bytes)
        self._slots = threading.BoundedSemaphore(2 * max(1, workers))
        self._thread = threading.Thread(target=self._run, name="live registration",
                                        daemon=True)
        self._thread.start()

    # -- the acquisition thread -------------------------------------------------------------

    def feed(self, image: np.ndarray, record: TileRecord) -> None:
        """Queue a stored tile (never blocks, never raises)."""
        try:
            if record.status != "ok" or self._aborted:
                return
            nbytes = int(image.nbytes)
            with self._lock:
                if self._queued_bytes > 0 and self._queued_bytes + nbytes > self._max_bytes:
                    self._dropped.add(record.index)
                    self.stats["dropped"] += 1
                    return
                self._queued_bytes += nbytes
            self._queue.put_nowait((np.array(image, copy=True), record))
        except Exception:  # the scan goes on; the stitch stage measures what is missing
            log.exception("tile %s not queued for live registration", record.index)

    # -- the end ------------------------------------------------------------------------------

    def finish(self) -> LiveResults:
        """Wait for the queued tiles, stop the worker and return what it measured."""
        t0 = time.perf_counter()
        self._queue.put(None)
        self._thread.join()
        for job in self._jobs:
            job.result()  # _measure_safely does not raise
        self._pool.shutdown()
        stats = {**self.stats, "busy_s": round(self.stats["busy_s"], 3),
                 "drain_s": round(time.perf_counter() - t0, 3)}
        return LiveResults(dict(self.pairs), self.params, self.camera, self.min_ncc, stats,
                           dict(self.thumbs))

    def abort(self) -> None:
        """Stop the worker without waiting (the scan stopped)."""
        self._aborted = True
        self._queue.put(None)
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- the worker ---------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            image, record = item
            with self._lock:
                self._queued_bytes -= int(image.nbytes)
            if self._aborted:
                continue
            t0 = time.perf_counter()
            self._waited = 0.0  # for a free thread: not work
            try:
                self._process(image, record)
                with self._lock:
                    self.stats["tiles"] += 1
            except Exception:
                if self._aborted:  # the scan stopped under it (abort() shut the pool down):
                    # no stitch stage follows, and the error that stopped it is said already
                    log.debug("live registration of tile %d stopped with the scan",
                              record.index, exc_info=True)
                    continue
                log.exception("live registration of tile %d failed; the stitch stage "
                              "measures its pairs", record.index)
                with self._lock:
                    self.stats["failures"] += 1
                self._forget(record.index)
            finally:
                with self._lock:
                    self.stats["busy_s"] += time.perf_counter() - t0 - self._waited

    def _forget(self, index: int) -> None:
        """A tile whose pairs the worker will not measure: drop the strips that wait for it."""
        self._records.pop(index, None)
        for side in ("left", "right", "top", "bottom"):
            self._strips.pop((index, side), None)
        if index not in self._cell:
            return
        r, c = self._cell[index]
        for (dr, dc), side in (((0, -1), "right"), ((0, 1), "left"), ((-1, 0), "bottom"),
                               ((1, 0), "top")):
            n = self._by_cell.get((r + dr, c + dc))
            if n is not None:
                self._strips.pop((n, side), None)

    def _process(self, image: np.ndarray, record: TileRecord) -> None:
        with self._lock:
            newly = self._dropped - self._released
            self._released |= newly
        for index in newly:
            self._forget(index)
        h, w = self.shape
        if image.shape != (h, w):
            raise ValueError(f"tile {record.index} is {image.shape}, expected {(h, w)}")
        rec = as_journaled(record)
        here = rec.index
        if self._thumbnails:
            self.thumbs[here] = (identity(rec), thumbnail(image))
            with self._lock:
                self.stats["thumbnails"] += 1
        if not self._register:
            return
        self._records[here] = rec
        for dr, dc, kind, new_is_b in _NEIGHBOURS:
            other = self._by_cell.get((rec.row + dr, rec.col + dc))
            if other is None or other not in self._records:
                continue
            if new_is_b:  # the neighbour is a: its strip towards the new tile
                side = "right" if kind == "left" else "bottom"
                strip = self._strips.pop((other, side), None)
                if strip is None:
                    continue
                a, b = other, here
                crop_a, crop_b = _Tracked(strip.data, strip.r0, strip.c0), _Tracked(image, 0, 0)
            else:  # the new tile is a, the neighbour b
                side = "left" if kind == "left" else "top"
                strip = self._strips.pop((other, side), None)
                if strip is None:
                    continue
                a, b = here, other
                crop_a, crop_b = _Tracked(image, 0, 0), _Tracked(strip.data, strip.r0, strip.c0)
            t_wait = time.perf_counter()
            self._slots.acquire()
            self._waited += time.perf_counter() - t_wait
            try:
                job = self._pool.submit(self._measure_safely, a, b, crop_a, crop_b)
            except BaseException:
                self._slots.release()
                raise
            job.add_done_callback(lambda _: self._slots.release())
            self._jobs.append(job)
        # strips for the neighbours still to come
        for dr, dc, kind, new_is_b in _NEIGHBOURS:
            other = self._by_cell.get((rec.row + dr, rec.col + dc))
            if (other is None or other in self._records or other not in self._coming
                    or other in self._released):
                continue
            if new_is_b:  # the new tile will be b of that pair: keep its left / top part
                if kind == "left":
                    self._strips[(here, "left")] = _Crop(image[:, :self._keep_c].copy(), 0, 0)
                else:
                    self._strips[(here, "top")] = _Crop(image[:self._keep_r, :].copy(), 0, 0)
            elif kind == "left":  # the new tile will be a: as register_tiles keeps it
                c0 = w - self._keep_c
                self._strips[(here, "right")] = _Crop(image[:, c0:].copy(), 0, c0)
            else:
                r0 = h - self._keep_r
                self._strips[(here, "bottom")] = _Crop(image[r0:, :].copy(), r0, 0)

    def _measure_safely(self, a: int, b: int, crop_a: _Tracked, crop_b: _Tracked) -> None:
        if self._aborted:
            return
        t0 = time.perf_counter()
        try:
            self._measure(a, b, crop_a, crop_b)
        except Exception:
            log.exception("live registration of tiles %d and %d failed; the stitch stage "
                          "measures the pair", a, b)
            with self._lock:
                self.stats["failures"] += 1
        finally:
            with self._lock:
                self.stats["busy_s"] += time.perf_counter() - t0

    def _measure(self, a: int, b: int, crop_a: _Tracked, crop_b: _Tracked) -> None:
        ra, rb = self._records[a], self._records[b]
        prior = tile_prior(np.array([(ra.x_um, ra.y_um), (rb.x_um, rb.y_um)], dtype=float),
                           self.camera, self.shape)
        expected = prior[1] - prior[0]
        ex = (expected[0], expected[1])
        max_shift = self.params.max_shift_px
        result = _register_one(crop_a, crop_b, ex, max_shift, (a, b), self.shape, self.min_ncc)
        self.pairs[(a, b)] = MeasuredPair(
            result=result, a=identity(ra), b=identity(rb), key=search_key(ex, max_shift),
            min_ncc=self.min_ncc, shape=self.shape, a_held=crop_a.region, a_read=crop_a.read,
            a_outside=crop_a.outside, b_outside=crop_b.outside)
        with self._lock:
            self.stats["pairs"] += 1
