"""Register the tiles of a scan folder: pairwise offsets row by row, then the global solve.

Streaming: tiles are read one at a time in grid order; what is kept between them is the strip
of the left neighbour that can overlap and the bottom strips of the previous grid row, so
memory is one row of strips plus a tile, whatever the number of tiles.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from scanner.stitching.registration.accuracy import classify_tiles
from scanner.stitching.registration.lattice import place_on_lattice
from scanner.stitching.registration.pairwise import PairResult, register_pair, search_key
from scanner.stitching.registration.selfcal import measured_camera
from scanner.stitching.registration.solve import SolveResult, solve_positions
from scanner.tilestore import ScanTiles, TileRecord, read_tiles_csv, write_tiles_csv

__all__ = ["CameraGeometry", "PairSource", "RegistrationSummary", "SearchParams",
           "kept_region", "register_scan", "register_tiles", "search_params",
           "tile_prior"]


@dataclass(frozen=True)
class CameraGeometry:
    """How camera pixels map onto the stage: pixel size and rotation.

    Camera pixel offset ``(u, v)`` (columns, rows) from the sensor centre images the stage at
    ``centre + R(rotation) @ (u, v) * pixel_size_um``.
    """

    pixel_size_um: float
    rotation_deg: float = 0.0

    def stage_to_px(self) -> np.ndarray:
        """2x2 matrix taking a stage displacement (µm) to camera pixels."""
        th = math.radians(self.rotation_deg)
        c, s = math.cos(th), math.sin(th)
        return np.array([[c, s], [-s, c]]) / self.pixel_size_um


@dataclass
class RegistrationSummary:
    """What registration did (recorded in ``scan.json``)."""

    n_tiles: int
    n_pairs: int
    n_pairs_used: int
    n_pairs_rejected: int
    n_blank_pairs: int
    n_unconstrained_tiles: int
    n_edge_pairs_used: int
    n_textured_tiles: int
    n_partial_tiles: int
    max_shift_px: float
    median_ncc: float
    rms_residual_px: float
    max_correction_um: float
    #: pairs taken from those measured during acquisition (the rest measured after it)
    n_pairs_precomputed: int = 0
    #: tiles left where the stage landed although an overlap of theirs matched (every such
    #: pair ambiguous or rejected by the solve): ``(row, col)``
    unplaced_tiles: list[tuple[int, int]] = field(default_factory=list)
    #: tiles whose overlaps matched at several periods of a repeating pattern, placed on its
    #: lattice nearest where the stage landed (:mod:`scanner.stitching.registration.lattice`)
    lattice_placed_tiles: int = 0
    #: tiles placed by the stage along one axis: no chain of matched overlaps measures their
    #: offset along it from the largest group of tiles that it links (overlaps whose only
    #: structure runs along that axis, streets and die edges): ``(row, col, "x" | "y")``
    stage_placed_axes: list[tuple[int, int, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """JSON-friendly dict (floats rounded)."""
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in vars(self).items()}


class _Crop:
    """Part of a tile, sliced in the tile's own coordinates."""

    def __init__(self, data: np.ndarray, r0: int, c0: int) -> None:
        self.data, self.r0, self.c0 = data, r0, c0

    def __getitem__(self, sl: tuple[slice, slice]) -> np.ndarray:
        a0, a1 = sl[0].start - self.r0, sl[0].stop - self.r0
        b0, b1 = sl[1].start - self.c0, sl[1].stop - self.c0
        if a0 < 0 or b0 < 0 or a1 > self.data.shape[0] or b1 > self.data.shape[1]:
            raise IndexError("overlap outside the kept strip")
        return self.data[a0:a1, b0:b1]


def default_max_shift_px(repeatability_um: float, step_px: float, pixel_size_um: float) -> float:
    """Search window: 4.5 sigma of the difference of two landings, 1 % of the step, 2 px."""
    return 4.5 * math.sqrt(2.0) * repeatability_um / pixel_size_um + 0.01 * step_px + 2.0


class _Done:
    def __init__(self, value: Any) -> None:
        self.value = value

    def result(self) -> Any:
        return self.value


class _Inline:
    """Executor stand-in that runs each job at once (one worker)."""

    def submit(self, fn: Callable[..., Any], *args: Any) -> _Done:
        return _Done(fn(*args))

    def shutdown(self) -> None:
        pass


def _register_one(crop: Any, here: Any, expected: tuple[float, float], max_shift: float,
                  ids: tuple[int, int], shape: tuple[int, int], min_ncc: float) -> PairResult:
    try:
        return register_pair(crop, here, expected, max_shift, ids=ids, shape=shape,
                             min_ncc=min_ncc)
    except IndexError:  # the kept strip does not hold the overlap (a far-off stage position)
        return PairResult(ids[0], ids[1], math.nan, math.nan, 0.0, 0.0, 0.0, False)


@dataclass(frozen=True)
class SearchParams:
    """The registration's parameters derived from the tile positions (see
    :func:`search_params`)."""

    step_px: float
    max_shift_px: float
    keep_c: int  # columns of a tile kept for its right neighbour
    keep_r: int  # rows of a tile kept for its lower neighbour


def tile_prior(stage_um: np.ndarray, camera: CameraGeometry,
               shape: tuple[int, int]) -> np.ndarray:
    """Camera-frame position ``t_i`` of pixel (0, 0) of tiles centred at ``stage_um`` (N, 2)."""
    h, w = shape
    centre_px = np.array([(w - 1) / 2, (h - 1) / 2])
    return np.asarray(stage_um, dtype=float) @ camera.stage_to_px().T - centre_px


def search_params(prior: np.ndarray, grid: dict[tuple[int, int], int],
                  shape: tuple[int, int], camera: CameraGeometry, repeatability_um: float,
                  max_shift_um: float | None) -> SearchParams:
    """Step (the median over grid neighbours), search window and strips kept.

    ``prior`` are the tiles' camera-frame positions, ``grid`` maps ``(row, col)`` to a row of
    ``prior``.
    """
    h, w = shape
    steps = [abs(prior[grid[(r, c + 1)]] - prior[k]).max() for (r, c), k in grid.items()
             if (r, c + 1) in grid]
    steps += [abs(prior[grid[(r + 1, c)]] - prior[k]).max() for (r, c), k in grid.items()
              if (r + 1, c) in grid]
    step_px = float(np.median(steps)) if steps else float(max(h, w))
    p = camera.pixel_size_um
    if max_shift_um is not None:
        max_shift = max_shift_um / p
    else:
        max_shift = default_max_shift_px(repeatability_um, step_px, p)
    # strips kept for later neighbours: the overlap plus the window, plus a little
    keep_c = min(w, int(math.ceil(w - step_px + 2 * max_shift + 4)))
    keep_r = min(h, int(math.ceil(h - step_px + 2 * max_shift + 4)))
    return SearchParams(step_px, float(max_shift), keep_c, keep_r)


def kept_region(kind: str, shape: tuple[int, int], params: SearchParams
                ) -> tuple[int, int, int, int]:
    """``(r0, r1, c0, c1)`` of tile ``a`` kept for a ``"left"`` pair (``a`` left of ``b``) or
    an ``"up"`` pair (``a`` above ``b``)."""
    h, w = shape
    if kind == "left":
        return (0, h, w - params.keep_c, w)
    return (h - params.keep_r, h, 0, w)


class PairSource(Protocol):
    """Pairs measured earlier (during acquisition), see ``registration.live``."""

    def lookup(self, a: TileRecord, b: TileRecord, key: tuple[int, int, int, int],
               min_ncc: float, shape: tuple[int, int], region_a: tuple[int, int, int, int]
               ) -> PairResult | None:
        """The pair of tiles ``a`` and ``b`` (ids their tile indices) if it was measured on
        these very tiles and is what :func:`register_tiles` would measure now: the same search
        key (``pairwise.search_key``), ``min_ncc`` and shape, and reads of ``a`` that the strip
        ``region_a`` holds; else None."""
        ...


def register_tiles(
    tiles: Any,
    records: list[TileRecord],
    camera: CameraGeometry,
    repeatability_um: float,
    *,
    max_shift_um: float | None = None,
    min_ncc: float = 0.3,
    progress: Callable[[int, int], None] | None = None,
    workers: int = 2,
    precomputed: PairSource | None = None,
) -> tuple[np.ndarray, RegistrationSummary, list[PairResult], np.ndarray]:
    """Registered tile centres (stage µm) of acquired tiles.

    Parameters
    ----------
    tiles : array-like
        ``(N, H, W)`` tile store; ``tiles[record.index]`` is read once per tile (only for the
        tiles of pairs not taken from ``precomputed``).
    records : list[TileRecord]
        The acquired tiles (grid ``row``/``col`` and reported ``x_um``/``y_um``).
    camera : CameraGeometry
        Pixel size and rotation of the camera against the stage.
    repeatability_um : float
        Stage repeatability (one sigma per axis): the prior's weight and the search window.
    max_shift_um : float, optional
        Search window override.
    min_ncc : float
        Pairs correlating less are not used.
    progress : callable, optional
        ``progress(done, total)`` per tile.
    workers : int
        Threads registering the pairs of a row.
    precomputed : PairSource, optional
        Pairs measured during acquisition (``registration.live``): a pair is taken from it
        only when it is exactly the one measured here (same tiles, same search key, see
        :meth:`PairSource.lookup`), so that the result is the same bit for bit; the others
        are measured as without it.

    Returns
    -------
    centres_um : ndarray
        ``(N, 2)`` registered tile centres, in ``records`` order.
    summary : RegistrationSummary
    pairs : list[PairResult]
        Every measured pair (``a``/``b`` index ``records``).
    classes : ndarray
        Per tile ``"textured"`` (in the main group registered in both directions),
        ``"partial"`` or ``"featureless"`` (keeps its stage position), see
        ``registration.accuracy.classify_tiles``.
    """
    n = len(records)
    h, w = (int(s) for s in tiles.shape[1:])
    to_px = camera.stage_to_px()
    stage = np.array([(r.x_um, r.y_um) for r in records], dtype=float)
    centre_px = np.array([(w - 1) / 2, (h - 1) / 2])
    prior = tile_prior(stage, camera, (h, w))  # t_i: camera-frame position of pixel (0, 0)

    grid = {(r.row, r.col): k for k, r in enumerate(records)}
    params = search_params(prior, grid, (h, w), camera, repeatability_um, max_shift_um)
    order = _pair_order(records, grid)
    found = ({} if precomputed is None else
             _precomputed_pairs(precomputed, order, records, prior, params, min_ncc, (h, w)))
    needed = {t for a, k, _ in order if (a, k) not in found for t in (a, k)}
    results = _measure_pairs(tiles, records, grid, prior, params, found, needed, min_ncc,
                             workers, progress)
    pairs: list[PairResult] = [found[(a, k)] if (a, k) in found else results[(a, k)]
                               for a, k, _ in order]

    result = solve_positions(prior, repeatability_um / camera.pixel_size_um, pairs)
    on_lattice = place_on_lattice(result.positions, result.constrained, prior, pairs,
                                  lambda k: tiles[records[k].index], params.max_shift_px,
                                  result.used)
    centres = (result.positions + centre_px) @ np.linalg.inv(to_px).T
    classes = classify_tiles(n, result.used)
    summary = _summary(records, pairs, result, classes, params.max_shift_px,
                       float(np.abs(centres - stage).max()) if n else 0.0, len(found), min_ncc,
                       on_lattice)
    return centres, summary, pairs, classes


def _pair_order(records: list[TileRecord], grid: dict[tuple[int, int], int]
                ) -> list[tuple[int, int, str]]:
    """``(a, b, "left" | "up")`` of every pair, in the order they have always been measured
    and solved in: grid rows top to bottom, each tile with its left then its upper
    neighbour."""
    order: list[tuple[int, int, str]] = []
    for row in sorted({r.row for r in records}):
        for col in sorted(c for (r, c) in grid if r == row):
            k = grid[(row, col)]
            if (row, col - 1) in grid:
                order.append((grid[(row, col - 1)], k, "left"))
            if (row - 1, col) in grid:
                order.append((grid[(row - 1, col)], k, "up"))
    return order


def _precomputed_pairs(precomputed: PairSource, order: list[tuple[int, int, str]],
                       records: list[TileRecord], prior: np.ndarray, params: SearchParams,
                       min_ncc: float, shape: tuple[int, int]
                       ) -> dict[tuple[int, int], PairResult]:
    """The pairs ``precomputed`` measured exactly as they would be measured now (ids
    ``records``' positions)."""
    found: dict[tuple[int, int], PairResult] = {}
    for a, k, kind in order:
        expected = prior[k] - prior[a]
        got = precomputed.lookup(
            records[a], records[k],
            search_key((expected[0], expected[1]), params.max_shift_px),
            min_ncc, shape, kept_region(kind, shape, params))
        if got is not None:
            found[(a, k)] = replace(got, a=a, b=k)
    return found


def _measure_pairs(tiles: Any, records: list[TileRecord], grid: dict[tuple[int, int], int],
                   prior: np.ndarray, params: SearchParams,
                   found: dict[tuple[int, int], PairResult], needed: set[int],
                   min_ncc: float, workers: int,
                   progress: Callable[[int, int], None] | None
                   ) -> dict[tuple[int, int], PairResult]:
    """Measure the pairs not ``found``, reading the ``needed`` tiles row by row and keeping
    only the strips later neighbours overlap (memory: one row of strips and a tile)."""
    h, w = (int(s) for s in tiles.shape[1:])
    max_shift, keep_c, keep_r = params.max_shift_px, params.keep_c, params.keep_r
    results: dict[tuple[int, int], Any] = {}
    above: dict[int, _Crop] = {}
    done = 0
    # pairs are independent: a row's pairs run on a few threads (the FFTs, filters and warps
    # release the GIL); waiting at the end of each row keeps memory at one row of tiles
    pool = ThreadPoolExecutor(max_workers=workers) if workers > 1 else _Inline()
    for row in sorted({r.row for r in records}):
        jobs: list[tuple[tuple[int, int], Any]] = []
        below: dict[int, _Crop] = {}
        left: tuple[int, _Crop] | None = None
        for col in sorted(c for (r, c) in grid if r == row):
            k = grid[(row, col)]
            if k in needed:  # tiles whose pairs are all known are not read
                tile = np.asarray(tiles[records[k].index])
                here = _Crop(tile, 0, 0)
                neighbours = []
                if left is not None and left[0] == col - 1:
                    neighbours.append((grid[(row, col - 1)], left[1]))
                if (row - 1, col) in grid and col in above:
                    neighbours.append((grid[(row - 1, col)], above[col]))
                for a, crop in neighbours:
                    if (a, k) in found:
                        continue
                    expected = prior[k] - prior[a]
                    jobs.append(((a, k), pool.submit(
                        _register_one, crop, here, (expected[0], expected[1]), max_shift,
                        (a, k), (h, w), min_ncc)))
                left = (col, _Crop(tile[:, w - keep_c:].copy(), 0, w - keep_c))
                below[col] = _Crop(tile[h - keep_r:, :].copy(), h - keep_r, 0)
            done += 1
            if progress is not None:
                progress(done, len(records))
        results.update((ids, job.result()) for ids, job in jobs)
        above = below
    pool.shutdown()
    return results


def _summary(records: list[Any], pairs: list[PairResult], result: SolveResult,
             classes: np.ndarray, max_shift: float, max_correction_um: float,
             n_precomputed: int, min_ncc: float, on_lattice: np.ndarray) -> RegistrationSummary:
    """What the registration did, from the pairs and the global solve's ``result``."""
    nccs = [q.ncc for q in result.used]
    return RegistrationSummary(
        n_tiles=len(records),
        n_pairs=len(pairs),
        n_pairs_used=len(result.used),
        n_pairs_rejected=len(result.rejected),
        n_blank_pairs=sum(1 for q in pairs if not q.ok and q.ncc == 0.0),
        n_unconstrained_tiles=int((~result.constrained).sum()),
        n_edge_pairs_used=sum(1 for q in result.used if q.is_edge),
        n_textured_tiles=int((classes == "textured").sum()),
        n_partial_tiles=int((classes == "partial").sum()),
        max_shift_px=float(max_shift),
        median_ncc=float(np.median(nccs)) if nccs else 0.0,
        rms_residual_px=float(np.sqrt(np.mean(result.residuals_px**2)))
        if result.residuals_px.size else 0.0,
        max_correction_um=max_correction_um,
        n_pairs_precomputed=n_precomputed,
        unplaced_tiles=[(int(records[k].row), int(records[k].col))
                        for k in sorted({t for q in pairs if math.isfinite(q.dx)
                                         and q.ncc >= min_ncc for t in (q.a, q.b)})
                        if not result.constrained[k] and not on_lattice[k]],
        lattice_placed_tiles=int(on_lattice.sum()),
        stage_placed_axes=[(int(records[k].row), int(records[k].col), axis)
                           for axis in ("x", "y")
                           for k in _off_the_main_chain(len(records), result.used, axis)
                           # a tile at a sample's rim (partial) is matched across the rim
                           # only, as a rim allows: not worth a warning on every wafer
                           if result.constrained[k] and classes[k] == "textured"],
    )


def _off_the_main_chain(n_tiles: int, used: list[PairResult], axis: str) -> list[int]:
    """Tiles that no chain of used pairs measuring ``axis`` links to the largest such group
    (none when no pair measures it: a scan that matched nothing is told as unplaced)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    k = 0 if axis == "x" else 2
    links = [(q.a, q.b) for q in used if q.info[k] > _MEASURED_INFO]
    if not links:
        return []
    a, b = np.array(links).T
    graph = coo_matrix((np.ones(len(links)), (a, b)), shape=(n_tiles, n_tiles))
    _, label = connected_components(graph, directed=False)
    touched = np.zeros(n_tiles, bool)
    touched[a] = touched[b] = True
    main = np.bincount(label[touched]).argmax()
    return [t for t in range(n_tiles) if label[t] != main]


#: a pair measures an axis when its information along it is at least this share of its
#: strongest direction's
_MEASURED_INFO = 0.1


#: the largest camera turn against the stage a scan without a calibration is searched for
MAX_CAMERA_TURN_DEG = 5.0
#: a first registration matching under this share of its pairs that are not blank is
#: searched again with a window wide enough for such a turn
FEW_MATCHED = 0.5


def _few_matched(summary: RegistrationSummary) -> bool:
    textured = summary.n_pairs - summary.n_blank_pairs
    return textured > 0 and summary.n_pairs_used < FEW_MATCHED * textured


def _wide_window_um(records: list[TileRecord], window_um: float) -> float:
    """The usual window plus a neighbour's sideways shift under a camera turned by
    :data:`MAX_CAMERA_TURN_DEG`."""
    at = {(r.row, r.col): (r.x_um, r.y_um) for r in records}
    steps = [math.hypot(at[(r, c + 1)][0] - x, at[(r, c + 1)][1] - y)
             for (r, c), (x, y) in at.items() if (r, c + 1) in at]
    steps += [math.hypot(at[(r + 1, c)][0] - x, at[(r + 1, c)][1] - y)
              for (r, c), (x, y) in at.items() if (r + 1, c) in at]
    step = float(np.median(steps)) if steps else 0.0
    return window_um + step * math.sin(math.radians(MAX_CAMERA_TURN_DEG))


def register_scan(
    folder: Path,
    camera: CameraGeometry,
    repeatability_um: float,
    *,
    max_shift_um: float | None = None,
    min_ncc: float = 0.3,
    progress: Callable[[int, int], None] | None = None,
    precomputed: PairSource | None = None,
    measure_camera: bool = False,
) -> tuple[RegistrationSummary, CameraGeometry, dict[str, Any] | None]:
    """Register a scan folder's tiles and write ``x_reg_um``/``y_reg_um`` into ``tiles.csv``.

    See :func:`register_tiles` for the parameters. Lost tiles keep empty registered columns.
    With ``measure_camera`` (no calibration file), the camera's rotation and pixel size are
    measured on the registered tiles (:func:`~scanner.stitching.registration.selfcal.
    measured_camera`) and, where they matter, the tiles are registered again with them.

    Returns
    -------
    summary, camera, measured
        What registration did, the geometry the positions were solved with and what was
        measured of it (:func:`~scanner.stitching.registration.selfcal.measured_camera`;
        None: not measured, or too few tiles registered in both directions).
    """
    folder = Path(folder)
    all_records = read_tiles_csv(folder)
    ok = [r for r in all_records if r.status == "ok"]
    tiles = ScanTiles(folder)
    centres, summary, pairs, classes = register_tiles(
        tiles, ok, camera, repeatability_um, max_shift_um=max_shift_um, min_ncc=min_ncc,
        progress=progress, precomputed=precomputed)
    measured = None
    if measure_camera and ok:
        found_in = (pairs, classes)
        if max_shift_um is None and _few_matched(summary):
            # a camera turned more than about a degree shifts each neighbour sideways by
            # more than the window (2 deg over 460 px: 16 px against 8.5): few pairs match,
            # and its turn cannot be measured from them. A wider window finds the turn; the
            # scan is then registered with it at the usual window below.
            wide = _wide_window_um(ok, summary.max_shift_px * camera.pixel_size_um)
            _, wide_summary, wide_pairs, wide_classes = register_tiles(
                tiles, ok, camera, repeatability_um, max_shift_um=wide, min_ncc=min_ncc)
            if wide_summary.n_pairs_used > summary.n_pairs_used:
                found_in = (wide_pairs, wide_classes)
        stage = np.array([(r.x_um, r.y_um) for r in ok], dtype=float)
        found = measured_camera(
            stage, tile_prior(stage, camera, tuple(int(s) for s in tiles.shape[1:])),
            found_in[0], found_in[1] == "textured", np.array([(r.row, r.col) for r in ok]),
            camera.pixel_size_um, camera.rotation_deg, repeatability_um)
        if found is not None:
            pixel, rotation, measured = found
            if measured["rotation_applied"] or measured["pixel_size_applied"]:
                turned = CameraGeometry(pixel, rotation)
                # searched and solved again around where this geometry expects each tile
                again = register_tiles(tiles, ok, turned, repeatability_um,
                                       max_shift_um=max_shift_um, min_ncc=min_ncc,
                                       precomputed=precomputed)
                if again[1].n_pairs_used >= summary.n_pairs_used:
                    camera, (centres, summary) = turned, again[:2]
                else:  # the geometry matched fewer pairs than the given one: not taken
                    measured = None
    by_index = {r.index: (float(c[0]), float(c[1])) for r, c in zip(ok, centres, strict=True)}
    out = [replace(r, x_reg_um=by_index[r.index][0], y_reg_um=by_index[r.index][1])
           if r.index in by_index else r for r in all_records]
    write_tiles_csv(folder, out)
    return summary, camera, measured
