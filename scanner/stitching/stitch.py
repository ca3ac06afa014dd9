"""Stitching: register the tiles of a scan folder, flatten them and fuse the OME-NGFF mosaic.

:func:`stitch_scan` is the stage: register (pairwise + global solve, ``x_reg_um``/``y_reg_um``
into ``tiles.csv``) → flat-field (``flatfield.npy``) → fuse at the registered positions.
:func:`stitch` is the fusion alone: it places tiles at their registered positions when
``tiles.csv`` has them, else at the stage positions read back from the core.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from devices.calibration import read_camera_calibration
from scanner.errors import UserError
from scanner.scanfolder import MOSAIC, planned_grid
from scanner.stitching.mosaic import MosaicInfo, fuse_mosaic
from scanner.stitching.registration.flatfield import (
    MEDIAN_MODEL,
    choose_flatfield,
    fit_median_gain,
    flatfield_tiles,
    median_thumbnail,
    overlap_blocks,
)
from scanner.stitching.registration.live import LiveResults
from scanner.stitching.registration.scan import CameraGeometry, register_scan
from scanner.tilestore import (
    TILES_CSV,
    ScanTiles,
    TileRecord,
    check_journal,
    open_tiles,
    read_tiles_csv,
)

FLATFIELD = "flatfield.npy"

log = logging.getLogger("waferscope.stitch")


def tile_origins_um(
    centres_um: np.ndarray, tile_shape: tuple[int, int], pixel_size_um: float,
    rotation_deg: float = 0.0,
) -> np.ndarray:
    """Stage position of each tile's pixel (0, 0) centre from the tile centres (x, y).

    With a rotated camera pixel ``(r, c)`` lies at ``centre + R @ (c - cx, r - cy) * p``.
    """
    rows, cols = tile_shape
    half = np.array([(cols - 1) / 2, (rows - 1) / 2]) * pixel_size_um
    th = np.deg2rad(rotation_deg)
    rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    return np.asarray(centres_um, dtype=float) - rot @ half


def stitch(
    folder: Path,
    pixel_size_um: float,
    *,
    chunk: int = 1024,
    progress: Callable[[int, int], None] | None = None,
    flatfield: np.ndarray | None = None,
    use_registered: bool = True,
    rotation_deg: float = 0.0,
    cluster: Any = None,
) -> MosaicInfo:
    """Fuse the tiles of a scan folder into ``mosaic.ome.zarr``.

    Parameters
    ----------
    folder : Path
        Scan folder with ``tiles.zarr`` and ``tiles.csv``.
    pixel_size_um : float
        Camera pixel size at the sample.
    chunk : int
        Chunk size of the mosaic (pixels).
    progress : callable, optional
        Called with (done, total) output chunks.
    flatfield : ndarray, optional
        Relative illumination of the sensor; tiles are divided by it.
    use_registered : bool
        Place tiles at ``x_reg_um``/``y_reg_um`` where ``tiles.csv`` has them.
    rotation_deg : float
        Camera rotation against the stage (from a calibration); tiles are warped by it.
    cluster : scanner.cluster.Cluster, optional
        Fuse as dask tasks (the same mosaic).
    """
    folder = Path(folder)
    if not (folder / TILES_CSV).is_file():
        raise UserError(f"{folder}: not a scan folder (no {TILES_CSV})")
    tiles = ScanTiles(folder)
    # a journaled tile whose data is missing stops the stitch: it must not be fused as black
    records = [r for r in check_journal(folder, tiles.shape[0], planned_grid(folder))
               if r.status == "ok"]
    if not records:
        raise UserError(f"{folder / TILES_CSV}: no acquired tiles to stitch")
    centres = np.array(
        [
            (r.x_reg_um, r.y_reg_um) if use_registered and np.isfinite(r.x_reg_um)
            else (r.x_um, r.y_um)
            for r in records
        ]
    )
    origins = tile_origins_um(centres, tiles.shape[1:], pixel_size_um, rotation_deg)
    subset = _TileSubset(tiles, [r.index for r in records])
    return fuse_mosaic(subset, origins, pixel_size_um, folder / MOSAIC, chunk=chunk,
                       progress=progress, name=folder.name, flatfield=flatfield,
                       rotation_deg=rotation_deg, cluster=cluster)


class _TileSubset:
    """The acquired tiles of a store, indexed 0..n-1 (lost tiles are left out)."""

    def __init__(self, tiles, indices: list[int]) -> None:
        self._tiles = tiles
        self._indices = indices
        self.shape = (len(indices), *tiles.shape[1:])
        self.dtype = tiles.dtype

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, i: int) -> np.ndarray:
        return np.asarray(self._tiles[self._indices[i]])


@dataclass
class StitchResult:
    """What the stitch stage did: the mosaic, the registration summary, timings per sub-step."""

    mosaic: MosaicInfo
    camera: CameraGeometry
    registration: dict[str, Any] | None = None
    flatfield: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)


def load_calibration(path: Path) -> CameraGeometry:
    """Read a calibration file written by ``waferscope calibrate``
    (:func:`devices.calibration.read_camera_calibration`, the one reader).

    Raises
    ------
    UserError
        If the file is missing or does not hold ``pixel_size_um`` and ``rotation_deg``.
    """
    return CameraGeometry(*read_camera_calibration(path))


def camera_geometry(calibration: Path | None, nominal_pixel_size_um: float) -> CameraGeometry:
    """The camera the tiles are placed with: the calibration file's, else the nominal pixel
    size unrotated (the stitch stage and the registration during acquisition alike)."""
    if calibration is None:
        return CameraGeometry(nominal_pixel_size_um, 0.0)
    return load_calibration(calibration)


def stitch_scan(
    folder: Path,
    nominal_pixel_size_um: float,
    *,
    repeatability_um: float,
    registration: bool = True,
    flatfield: bool = True,
    calibration: Path | None = None,
    max_shift_um: float | None = None,
    min_ncc: float = 0.3,
    chunk: int = 1024,
    progress: Callable[[str, int, int], None] | None = None,
    cluster: Any = None,
    precomputed: LiveResults | None = None,
) -> StitchResult:
    """The stitch stage: register → global solve → flat-field → fuse.

    Parameters
    ----------
    folder : Path
        Scan folder.
    nominal_pixel_size_um : float
        Pixel size the microscope reports (used unless ``calibration`` gives another).
    repeatability_um : float
        Stage repeatability: the prior of the solve and the registration's search window.
    registration, flatfield : bool
        Steps to run (off: stage positions / no vignetting correction).
    calibration : Path, optional
        Calibration file (pixel size and rotation of the camera against the stage).
    max_shift_um, min_ncc : float
        Registration settings (see ``scanner.stitching.registration.scan.register_tiles``).
    chunk : int
        Mosaic chunk size.
    progress : callable, optional
        ``progress(step, done, total)`` with step ``"register"`` or ``"fuse"``.
    cluster : scanner.cluster.Cluster, optional
        Fuse (and build the pyramid) as dask tasks; registration runs here.
    precomputed : scanner.stitching.registration.live.LiveResults, optional
        What was computed during acquisition: the pairs measured exactly as here and the
        flat-field thumbnails of the same acquisitions are taken from it, the rest computed
        here (the same result as without it, only sooner).
    """
    folder = Path(folder)
    if not (folder / TILES_CSV).is_file():
        raise UserError(f"{folder}: not a scan folder (no {TILES_CSV})")
    # before registration rewrites it
    check_journal(folder, open_tiles(folder).shape[0], planned_grid(folder))
    camera = camera_geometry(calibration, nominal_pixel_size_um)
    timings: dict[str, float] = {}
    reg_summary = None
    if registration:
        t0 = time.perf_counter()
        summary, camera, measured = register_scan(
            folder, camera, repeatability_um, max_shift_um=max_shift_um, min_ncc=min_ncc,
            progress=(lambda d, t: progress("register", d, t)) if progress else None,
            precomputed=precomputed, measure_camera=calibration is None,
        )
        reg_summary = summary.to_json()
        if summary.unplaced_tiles:
            _tell_unplaced(summary.unplaced_tiles, repeatability_um)
        if summary.stage_placed_axes:
            _tell_stage_placed_axes(summary.stage_placed_axes, repeatability_um)
        if measured is not None:
            reg_summary["camera_measured"] = measured
            _tell_measured_camera(measured, summary.n_tiles)
        # with precomputed pairs: the pairs not measured during acquisition, and the solve
        timings["register_s"] = round(time.perf_counter() - t0, 3)
    ff = None
    ff_info = None
    if flatfield:
        t0 = time.perf_counter()
        ff, ff_info = _flatfield_step(folder, precomputed, camera)
        timings["flatfield_s"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    info = stitch(folder, camera.pixel_size_um, chunk=chunk, flatfield=ff,
                  use_registered=registration, rotation_deg=camera.rotation_deg, cluster=cluster,
                  progress=(lambda d, t: progress("fuse", d, t)) if progress else None)
    timings["fuse_s"] = round(time.perf_counter() - t0, 3)
    return StitchResult(info, camera, reg_summary, ff_info, timings)


def _tell_unplaced(tiles: list[tuple[int, int]], repeatability_um: float) -> None:
    """Warn that tiles with texture in their overlaps were placed by the stage alone."""
    shown = ", ".join(f"row {r} col {c}" for r, c in tiles[:5])
    more = f" and {len(tiles) - 5} more" if len(tiles) > 5 else ""
    log.warning("%d tile(s) matched no neighbour unambiguously (%s%s) and lie where the stage "
                "landed, up to %.3g um off (3 sigma of microscope.stage.repeatability_um): "
                "seams there may read as defects; a larger scan.overlap gives their overlaps "
                "more to match", len(tiles), shown, more, 3 * repeatability_um)


def _tell_stage_placed_axes(tiles: list[tuple[int, int, str]], repeatability_um: float
                            ) -> None:
    """Warn that some tiles' overlaps measured their offset along one axis only."""
    axes = sorted({a for _, _, a in tiles})
    shown = ", ".join(f"row {r} col {c} in {a}" for r, c, a in tiles[:5])
    more = f" and {len(tiles) - 5} more" if len(tiles) > 5 else ""
    log.warning("%d tile position(s) lie where the stage landed along %s (%s%s): their "
                "overlaps hold structure along that axis only (streets, die edges), so no "
                "neighbour measures it; up to %.3g um off (3 sigma of "
                "microscope.stage.repeatability_um), seams there may read as defects; a larger "
                "scan.overlap gives the overlaps more to match", len(tiles),
                " and ".join(axes), shown, more, 3 * repeatability_um)


def _tell_measured_camera(measured: dict[str, Any], n_tiles: int) -> None:
    """Warn that the camera's geometry was measured on this scan and used."""
    parts, moved = [], 0.0
    if measured["rotation_applied"]:
        parts.append(f"turned {measured['rotation_deg']:+.3f} deg "
                     f"(+- {measured['rotation_sigma_deg']:.2g}) against the stage")
        moved = max(moved, measured["rotation_effect_px"])
    if measured["pixel_size_applied"]:
        parts.append(f"{measured['pixel_size_um']:.5g} um per pixel "
                     f"(+- {100 * measured['pixel_size_sigma_rel']:.2g} %)")
        moved = max(moved, measured["pixel_size_effect_px"])
    if parts:
        log.warning("the camera is %s, as %d of the %d tiles' registered positions show; the "
                    "mosaic is placed with it (it moves tiles by up to %.1f px). "
                    "`waferscope calibrate` measures it once for the microscope "
                    "(microscope.calibration).", " and ".join(parts), measured["tiles"],
                    n_tiles, moved)


def _flatfield_step(folder: Path, precomputed: LiveResults | None, camera: CameraGeometry
                    ) -> tuple[np.ndarray | None, dict[str, Any]]:
    """Estimate the flat-field of the scan's good tiles and save it (``flatfield.npy``):
    the gain (None: too few tiles, or none fits better than no correction) and its record
    for ``scan.json``.

    Fitted to the overlaps of neighbouring tiles and checked against the tiles' median fit
    and no correction by how well the overlaps agree (:func:`choose_flatfield`); a scan
    without overlaps gets the median fit.
    """
    records = [r for r in read_tiles_csv(folder) if r.status == "ok"]
    ok = [r.index for r in records]
    tiles = ScanTiles(folder)
    # thumbnails computed during acquisition, for these very acquisitions
    thumbs = precomputed.thumbnails_for(records) if precomputed is not None else {}
    med = median_thumbnail(tiles, ok, thumbnails=thumbs)
    samples = overlap_blocks(tiles, _tile_frame_px(records, camera))
    ff, ff_info = None, {"path": None, "why": "too few tiles to estimate it"}
    if samples:
        ff, model, scores = choose_flatfield(med, tuple(tiles.shape[1:]), samples)
        ff_info = {"model": model, "overlap_mismatch": scores, "overlap_pairs": len(samples)}
        if ff is None:
            ff_info.update(path=None, why="overlapping tiles agree best undivided")
    elif med is not None:  # no overlaps to judge by: the tiles' median
        ff = fit_median_gain(med, tuple(tiles.shape[1:]))
        ff_info = {"model": MEDIAN_MODEL, "overlap_pairs": 0}
    if ff is not None:
        tmp = folder / (FLATFIELD + ".tmp.npy")
        np.save(tmp, ff)
        tmp.replace(folder / FLATFIELD)
        ff_info.update({"path": FLATFIELD, "min": round(float(ff.min()), 4),
                        "max": round(float(ff.max()), 4), "tiles_used": min(len(ok), 200)})
    else:
        (folder / FLATFIELD).unlink(missing_ok=True)  # an earlier stitch's is not this one's
    ff_info["thumbnails_precomputed"] = sum(i in thumbs for i in flatfield_tiles(ok))
    return ff, ff_info


def _tile_frame_px(records: list[TileRecord], camera: CameraGeometry
                   ) -> dict[int, tuple[float, float]]:
    """Each tile's position (row, col) in the camera's own pixel frame: two tiles of one
    camera, rotated alike, differ there by a translation only."""
    th = np.deg2rad(camera.rotation_deg)
    rot_t = np.array([[np.cos(th), np.sin(th)], [-np.sin(th), np.cos(th)]])
    out = {}
    for r in records:
        x, y = (r.x_reg_um, r.y_reg_um) if np.isfinite(r.x_reg_um) else (r.x_um, r.y_um)
        col, row = rot_t @ np.array([x, y]) / camera.pixel_size_um
        out[r.index] = (float(row), float(col))
    return out
