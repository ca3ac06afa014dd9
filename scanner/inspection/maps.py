"""The inspection model's maps of an image or a mosaic of any size.

:func:`infer_image` and :func:`infer_mosaic` run the tiled engine of :mod:`scanner.inspection.tiled`
over an in-memory image or a stitched mosaic. A mosaic can be far larger than memory: its
maps are written row by row, never held whole.

Images whose pixel size differs from the model's (outside the range it was trained over, see
:func:`grid_pixel_um`) are resampled on the fly onto a *model grid* with the model's pixel
size and the same stage origin.

The maps go next to the mosaic as OME-NGFF multiscale images (:data:`MAP_NAMES`), in the same
stage coordinate system: map pixel ``(i, j)`` summarises model-grid pixels
``[i*s, i*s+s) x [j*s, j*s+s)``, so its scale is ``s * p`` and its translation is the stage
position of the mosaic origin plus ``(s - 1) / 2 * p``.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scanner.defectlist import MAP_NAMES
from scanner.errors import UserError
from scanner.inspection.polygonmask import polygon_mask, polygon_pixels
from scanner.inspection.tiled import (
    DEFAULT_CORE_PX,
    MAPS,
    ArraySink,
    GridReader,
    InferenceStats,
    Model,
    Tiling,
    plan_tiling,
    run_tiled,
    source_level,
)
from scanner.ngff import (
    build_pyramid,
    check_complete,
    create_multiscale,
    finish_multiscale,
    level_transform,
    open_mosaic,
)

#: Scratch store of window maps next to the maps while a mosaic is inspected.
WINDOWS_SCRATCH = "inspect-windows.tmp.zarr"
#: longest side an image may take once resampled to the model's pixels (a 2 m wafer at 1 µm;
#: beyond it a pixel size is a typo, and numpy refuses the array anyway)
MAX_RESAMPLED_SIDE_PX = 2_000_000
#: most pixels an image held in memory may take once resampled (4 GB of float32): a pixel
#: size off by 200 x asked numpy for 36-244 GiB (MemoryError) instead of naming the option
MAX_RESAMPLED_IMAGE_PX = 1_000_000_000


# --------------------------------------------------------------------------- maps of a sample


@dataclass
class MapSet:
    """Anomaly, roughness and uncertainty maps of one image or mosaic, with their geometry.

    Attributes
    ----------
    maps : dict
        ``{"anomaly": ..., "roughness": ..., "uncertainty": ...}``: 2-D arrays (numpy, or the
        level-0 Zarr arrays of the written OME-NGFF maps).
    pixel_size_um : float
        Map pixel size (model pixel size times the output stride).
    origin_um : tuple of float
        Stage ``(x, y)`` of the centre of map pixel ``(0, 0)``.
    stride : int
        Model-grid pixels per map pixel.
    reader : GridReader
        The input on the model grid (for the appearance of defects).
    stats : InferenceStats
        Timings.
    paths : dict
        Where the maps were written (mosaics only).
    source_levels : list, optional
        The mosaic's pyramid (level k: 2^k x 2^k means of level 0), mosaics only.
    """

    maps: dict[str, Any]
    pixel_size_um: float
    origin_um: tuple[float, float]
    stride: int
    reader: GridReader
    stats: InferenceStats
    paths: dict[str, Path] = field(default_factory=dict)
    source_levels: list[Any] | None = None


def reflectance_at_map(maps: MapSet, chunk_rows: int = 256) -> np.ndarray:
    """The input as relative reflectance (raw / brightness level) at map resolution.

    Each map pixel gets the mean of its ``stride`` x ``stride`` input pixels (what
    :func:`models.thresholds.plain_mask` reads). A mosaic read at its own pixel size has that
    already in its pyramid (level log2(stride)); otherwise the model grid is read in strips.
    """
    from models.thresholds import map_resolution

    shape = tuple(int(n) for n in maps.maps["anomaly"].shape)
    s = int(maps.stride)
    level = float(maps.stats.extra.get("level", 1.0)) or 1.0
    k = int(round(math.log2(s))) if s > 0 else 0
    levels = maps.source_levels
    if levels is not None and not maps.reader.resample and 2**k == s and len(levels) > k:
        pooled = np.asarray(levels[k], dtype=np.float32)
        if pooled.ndim == 2 and abs(pooled.shape[0] - shape[0]) <= 1 \
                and abs(pooled.shape[1] - shape[1]) <= 1:
            return map_resolution(pooled, 1, shape) / np.float32(level)
    h, w = maps.reader.shape
    out = np.zeros(shape, dtype=np.float32)
    for m0 in range(0, shape[0], chunk_rows):
        m1 = min(m0 + chunk_rows, shape[0])
        rows = min(m1 * s, h) - m0 * s
        if rows <= 0:
            break
        strip = maps.reader.read(m0 * s, 0, rows, w)
        out[m0:m1] = map_resolution(strip, s, (m1 - m0, shape[1]))
    return out / np.float32(level)



class _ScannedMask:
    """A map mask (see ``mask`` of :func:`scanner.inspection.streammaps.stream_maps`): the
    map pixels where some tile landed, inside ``inner`` (another mask, or everywhere).

    A class, not a closure, so dask can send it to its workers (:mod:`scanner.cluster`).
    """

    def __init__(self, pooled: Any, inner: Any = None) -> None:
        self.pooled, self.inner = pooled, inner

    def __call__(self, r0: int, c0: int, h: int, w: int) -> np.ndarray | None:
        inside = self.inner(r0, c0, h, w) if self.inner is not None else True
        if inside is None:
            return None
        out = np.zeros((h, w), dtype=bool)
        block = np.asarray(self.pooled[r0:r0 + h, c0:c0 + w]) > 0
        out[:block.shape[0], :block.shape[1]] = block
        return out & inside if inside is not True else out


def scanned_mask(levels: list[Any], stride: int, inner: Any = None) -> Any:
    """``inner`` (a map mask, or None) narrowed to the map pixels where some tile landed.

    The mosaic is 0 where no tile landed (``scanner.stitching.mosaic``): a stage that
    stopped short, a tile lost for good. Read as data, such a strip is black surface: the
    network scores it as whatever black resembles, and the plain-surface channels as a
    stain. Its map pixels (their ``stride`` x ``stride`` mosaic pixels all 0: the pyramid's
    level log2(stride) is their mean) are left out like the area off the sample, and the
    defect list's header counts them (``not_scanned_mm2``). Returns ``inner`` unchanged
    when the pyramid has no such level.
    """
    k = int(round(math.log2(stride))) if stride > 0 else -1
    if k < 0 or 2**k != stride or len(levels) <= k:
        return inner
    return _ScannedMask(levels[k], inner)


def grid_pixel_um(model: Model, source_um: float) -> float:
    """Pixel size to run the model at for a source of ``source_um``.

    A model trained over a range of pixel sizes (``pixel_size_range_um`` in its card) runs at
    the source's own pixel size inside that range and at the nearest end of it outside; a
    model trained at one pixel size runs at that one. The source is resampled to it. A model
    whose pixel size was assumed (image files without ``--pixel-size``) runs at the source's:
    its images were most likely taken as the parts are, and resampled to the assumed 1 um a
    part scanned at 2 or 0.5 um gave 1 of 8 and 0 of 9 of its defects (9 of 9 unresampled).
    """
    card = getattr(model, "card", None) or {}
    if card.get("pixel_size_assumed"):
        return float(source_um)
    span = card.get("pixel_size_range_um")
    if span and len(span) == 2 and 0 < float(span[0]) <= float(span[1]):
        return float(min(max(source_um, float(span[0])), float(span[1])))
    return float(model.pixel_size_um)


def map_geometry(model: Model, origin_um: tuple[float, float], pixel_size_um: float
                 ) -> tuple[tuple[float, float], float]:
    """Stage ``(x, y)`` of the centre of map pixel ``(0, 0)``, and the map pixel size, of the
    maps of a source whose pixel ``(0, 0)`` is centred at ``origin_um``."""
    p_model = grid_pixel_um(model, pixel_size_um)
    s = int(model.output_stride)
    half = (s - 1) / 2 * p_model
    return (origin_um[0] + half, origin_um[1] + half), s * p_model


def infer_image(
    model: Model,
    image: np.ndarray,
    *,
    pixel_size_um: float | None = None,
    origin_um: tuple[float, float] = (0.0, 0.0),
    core_px: int | None = None,
    batch: int = 1,
) -> MapSet:
    """Maps of an in-memory 2-D image.

    Parameters
    ----------
    model : Model
        The inspection model.
    image : np.ndarray
        2-D image, any numeric dtype (what ``model.normalize`` accepts).
    pixel_size_um : float, optional
        Pixel size of the image; default the model's (no resampling).
    origin_um : tuple of float
        Stage ``(x, y)`` of image pixel ``(0, 0)``.
    core_px : int, optional
        Window core (input pixels); default the model's ``core_px``, else
        :data:`DEFAULT_CORE_PX`.
    batch : int
        Windows per network call.
    """
    p_img = float(pixel_size_um or model.pixel_size_um)
    p_model = grid_pixel_um(model, p_img)
    resampled = [n * p_img / p_model for n in image.shape[:2]]
    if not all(1 <= n <= MAX_RESAMPLED_SIDE_PX for n in resampled) \
            or resampled[0] * resampled[1] > MAX_RESAMPLED_IMAGE_PX:
        raise UserError(f"pixel size {p_img:g} µm: the model runs at {p_model:g} µm, so this "
                        f"{image.shape[0]} x {image.shape[1]} px image would become "
                        f"{resampled[0]:.3g} x {resampled[1]:.3g} px; check --pixel-size")
    reader = GridReader(image, p_model / p_img)
    s = int(model.output_stride)
    tiling = plan_tiling(reader.shape, s, int(model.context_px),
                         core_px=core_px or getattr(model, "core_px", DEFAULT_CORE_PX))
    aligned = getattr(model, "predict_aligned", None)
    if aligned is not None and p_model == p_img:
        # an image of the aligned part a detector also models per position: one pass of
        # that model (None for any other image, which the windows below score)
        t0 = time.perf_counter()
        level = float(source_level(image))  # as the good images were normalised
        maps = aligned(model.normalize(image, level))
        if maps is not None and maps["anomaly"].shape == tuple(tiling.map_shape):
            stats = InferenceStats(windows=1, input_px=int(image.shape[0] * image.shape[1]))
            stats.network_s = stats.total_s = time.perf_counter() - t0
            stats.extra["level"] = level
            half = (s - 1) / 2 * p_model
            return MapSet({k: np.asarray(maps[k], np.float32) for k in MAPS}, s * p_model,
                          (origin_um[0] + half, origin_um[1] + half), s, reader, stats)
    sink = ArraySink(tiling.map_shape)
    stats = run_tiled(model, reader, sink, tiling=tiling, batch=batch)
    _image_edge_band(model, sink.maps, s)
    half = (s - 1) / 2 * p_model
    return MapSet(sink.maps, s * p_model, (origin_um[0] + half, origin_um[1] + half), s,
                  reader, stats)


def _image_edge_band(model: Model, maps: dict[str, np.ndarray], stride: int) -> None:
    """Calibrate an image's border band in its maps, in place, as the model's card says
    (:mod:`models.edgeband`; an image file's border is its part's)."""
    from models.edgeband import calibrated_band

    found = _band_calibration(model)
    if found is None:
        return
    band_px, factor, threshold, log_scale = found
    b = max(1, int(round(band_px / stride)))
    band = np.ones(maps["anomaly"].shape, dtype=bool)
    band[b:-b, b:-b] = False
    calibrated_band(maps["anomaly"], maps.get("uncertainty"), band, factor, threshold,
                    log_scale)


def _band_calibration(model: Model) -> tuple[int, float, float, float] | None:
    """``(band_px, factor, threshold, log_scale)`` of the border band the model's card
    calibrated (:func:`models.edgeband.card_band`), with the threshold and log scale the
    band's uncertainty is recomputed around; None when the band scores no higher."""
    from models.edgeband import card_band

    found = card_band(getattr(model, "card", None))
    if found is None:
        return None
    return (*found, float(getattr(model, "decision_threshold", model.threshold)),
            float(getattr(model, "uncertainty_log_scale", 0.1)))


def infer_mosaic(
    model: Model,
    mosaic: Path,
    out_dir: Path,
    *,
    polygon: Any = None,
    edge_um: float | None = None,
    core_px: int | None = None,
    batch: int = 1,
    progress: Callable[[int, int], None] | None = None,
    refine: Callable[[MapSet], None] | None = None,
    cluster: Any = None,
) -> MapSet:
    """Stream a mosaic through the model and write the three OME-NGFF maps into ``out_dir``.

    Memory is bounded in width as well as height (:mod:`scanner.inspection.streammaps`): windows go
    to a scratch store in ``out_dir`` (removed at the end) and the maps are blended chunk by chunk.

    Parameters
    ----------
    model : Model
        The inspection model.
    mosaic : Path
        ``mosaic.ome.zarr`` (level 0 is read).
    out_dir : Path
        Folder that receives :data:`scanner.defectlist.MAP_NAMES` (earlier maps there are
        replaced only once the new ones are complete).
    polygon : shapely Polygon, optional
        The sample's usable area (stage µm): windows outside it are not computed and the maps
        are 0 outside it. Default: everything scanned.
    edge_um : float, optional
        Erosion of ``polygon``, so the sample's border is not a defect (default: the model's
        ``edge_px`` input pixels, at least two map pixels).
    core_px : int, optional
        Window core (input pixels); default the model's ``core_px``, else
        :data:`DEFAULT_CORE_PX`.
    batch : int
        Windows per network call.
    progress : callable, optional
        ``progress(done, total)`` in windows.
    refine : callable, optional
        ``refine(maps)``: given a :class:`MapSet` of the writable level-0 maps before their
        pyramids are built, to add evidence from outside the network (die-to-die, plain
        surface).
    cluster : scanner.cluster.Cluster, optional
        Run windows and blending as dask tasks (:mod:`scanner.cluster`).
    """

    levels, transforms = _open_complete(Path(mosaic))
    level0, (scale, trans) = levels[0], level_transform(transforms)
    p_mosaic, (x0, y0) = float(scale[1]), (float(trans[1]), float(trans[0]))
    p_model = grid_pixel_um(model, p_mosaic)
    reader = GridReader(level0, p_model / p_mosaic)
    s = int(model.output_stride)
    tiling = plan_tiling(reader.shape, s, int(model.context_px),
                         core_px=core_px or getattr(model, "core_px", DEFAULT_CORE_PX))
    origin, p_map = map_geometry(model, (x0, y0), p_mosaic)
    mask = None
    if polygon is not None:  # by default the model's reach across the border, >= 2 map px
        mask = polygon_mask(polygon, origin, p_map, edge_um if edge_um is not None else max(
            2 * p_map, float(getattr(model, "edge_px", 0)) * p_model))
    if not reader.resample:  # pixels no tile covered are not inspected, not read as black
        mask = scanned_mask(levels, s, mask)
    edge = _edge_band(model, polygon, (x0, y0), p_mosaic, tuple(level0.shape[:2]), origin,
                      p_map, p_model)
    out_dir = Path(out_dir)
    tmps, arrays = _create_maps(out_dir, tiling)
    try:
        level0_maps = {k: a[0] for k, a in arrays.items()}
        scratch = out_dir / WINDOWS_SCRATCH
        options = {"tiling": tiling, "mask": mask, "skip_empty": True, "progress": progress,
                   "level": _surface_level(level0, polygon, (x0, y0), p_mosaic), "edge": edge}
        if cluster is not None:  # the same two steps as dask tasks (scanner.cluster)
            stats = cluster.stream_maps(model, Path(mosaic), reader.scale, level0_maps,
                                        scratch, **options)
        else:
            from scanner.inspection.streammaps import stream_maps

            stats = stream_maps(model, reader, level0_maps, scratch, batch=batch, **options)
        stats.extra["mosaic_px"] = int(level0.shape[0]) * int(level0.shape[1])
        if refine is not None:
            refine(MapSet(level0_maps, p_map, origin, s, reader, stats, source_levels=levels))
    except BaseException:
        # refused (damaged data) or stopped: the half-written maps go, the earlier ones stay
        for tmp in tmps.values():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    paths = _finish_maps(arrays, tmps, out_dir, tiling.step, p_map, origin)
    maps = {name: open_mosaic(paths[name])[0][0] for name in MAPS}
    return MapSet(maps, p_map, origin, s, reader, stats, paths, levels)


def _edge_band(model: Model, polygon: Any, mosaic_origin_um: tuple[float, float],
               p_mosaic: float, shape: tuple[int, int], origin: tuple[float, float],
               p_map: float, p_model: float) -> Any:
    """The usable area's border band as the model's card calibrated it
    (:mod:`models.edgeband`; None when it scores no higher than the inside): measured from
    the usable area's border, or the mosaic's without one."""
    from scanner.inspection.streammaps import EdgeBand

    found = _band_calibration(model)
    if found is None:
        return None
    band_px, factor, threshold, log_scale = found
    if polygon is None:
        from scanner.inspection.dietodie_geometry import MosaicGrid

        polygon = MosaicGrid(mosaic_origin_um, p_mosaic, shape).outline()
    return EdgeBand(polygon_mask(polygon, origin, p_map, band_px * p_model), factor,
                    threshold, log_scale)


def _create_maps(out_dir: Path, tiling: Tiling) -> tuple[dict[str, Path], dict[str, Any]]:
    """Empty multiscale maps, in temporary stores beside their final places."""
    tmps, arrays = {}, {}
    try:
        for name in MAPS:
            tmps[name], arrays[name] = create_multiscale(
                out_dir / MAP_NAMES[name], tiling.map_shape, chunk=tiling.step,
                dtype=np.float32)
    except BaseException:  # stopped between two maps: the ones made go too
        for tmp in tmps.values():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmps, arrays


def open_readable(mosaic: Path) -> tuple[list[Any], list[Any]]:
    """A mosaic's levels and transforms, refused (:class:`UserError`) when its metadata is not
    a readable OME-NGFF image."""
    try:
        return open_mosaic(mosaic)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise UserError(f"{mosaic}: not a readable OME-NGFF mosaic ({exc})") from None


def _open_complete(mosaic: Path) -> tuple[list[Any], list[Any]]:
    """A mosaic's levels and transforms, refused when unreadable or when a chunk is missing
    (damaged data is never read as black)."""
    levels, transforms = open_readable(mosaic)
    for k, level in enumerate(levels):
        check_complete(level, f"{mosaic} level {k}")
    return levels, transforms


def _surface_level(level0: Any, polygon: Any, origin_um: tuple[float, float],
                   pixel_um: float) -> float:
    """The brightness level of the sample's surface in a mosaic: inside its polygon, not that
    of the chuck or background the mosaic also shows (an image sample's dark surround moved
    it by 11 %, and every cell of a scan with it)."""
    if polygon is not None:
        level = source_level(level0, inside=polygon_pixels(polygon, origin_um, pixel_um))
        if level is not None:
            return level
    return source_level(level0)


def _finish_maps(arrays: dict[str, Any], tmps: dict[str, Path], out_dir: Path, chunk: int,
                 p_map: float, origin: tuple[float, float]) -> dict[str, Path]:
    """Build the maps' pyramids and move them into place (replacing earlier maps only now
    that they are complete); returns their paths."""
    paths = {}
    for name in MAPS:
        build_pyramid(arrays[name], chunk)
        paths[name] = out_dir / MAP_NAMES[name]
        finish_multiscale(tmps[name], paths[name], len(arrays[name]), p_map, origin, name)
    return paths
