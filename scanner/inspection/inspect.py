"""The inspect stage: maps and defect list of a scan folder, a mosaic, or plain image files.

* A **scan folder** (or its ``mosaic.ome.zarr``): the maps go next to the mosaic as OME-NGFF
  images (:data:`scanner.defectlist.MAP_NAMES`), the defects to ``defects.json`` /
  ``defects.csv``, the timings and model to ``scan.json``. Only the sample's usable area (from
  the recipe saved in ``scan.json``) is inspected, so the chuck and the sample's edge are not
  defects. On a wafer the dies are also compared with their neighbours
  (``scanner.inspection.dietodie``) and that evidence is added to the anomaly map before defects are
  extracted; quiet and plain neighbourhoods get the card's thresholds for them for the
  sample kind (:func:`context_thresholds`).
* **Image files or folders**: each image is inspected whole (:mod:`scanner.inspection.images`).

The model's card (thresholds by sample kind, pixel size and context) is read by
:mod:`scanner.inspection.card`.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from models.blas import single_blas_thread
from models.data import read_image
from scanner.acquisition.alignrefine import effective_alignment
from scanner.defectlist import MAP_NAMES, InspectionResult, write_defects
from scanner.errors import UserError
from scanner.inspection.card import (
    ModelRef,
    _decision_threshold,
    _defects_from,
    context_thresholds,
    evidence_threshold,
    load_inspection_model,
    log,
    model_info,
    threshold_record,
)
from scanner.inspection.drift import good_surface_scores, surface_image
from scanner.inspection.golden import GOLDEN
from scanner.inspection.images import image_score, inspect_images, list_images
from scanner.inspection.maps import MapSet, infer_mosaic, open_readable, reflectance_at_map
from scanner.scanfolder import MOSAIC, SCAN_JSON, now_iso, scan_json_if_any, write_json


def _mosaic_pixel_size_um(mosaic: Path) -> float | None:
    """The pixel size of a mosaic's level 0 (µm), None when it cannot be read."""
    from scanner.ngff import level_transform, open_mosaic

    try:
        _, transforms = open_mosaic(mosaic)
        return float(level_transform(transforms)[0][-1])
    except Exception:  # inspection reads the mosaic again and reports what is wrong with it
        return None


def _saved_sample(folder: Path, scan: dict[str, Any] | None) -> Any:
    """The sample recorded in ``scan.json`` (None if unknown or unreadable).

    Raises
    ------
    UserError
        The sample's file (an image sample's picture) is no longer where the scan read it:
        the sample's outline comes from it, and without it the whole mosaic, the chuck
        around the sample included, was inspected (or learnt as good) without a word.
    """
    if not scan or "recipe" not in scan:
        return None
    from devices.spec import MISSING_FILE
    from scanner.recipe import RecipeError, recorded_sample

    try:
        return recorded_sample(scan, folder)
    except RecipeError as exc:
        if exc.kinds and exc.kinds <= {MISSING_FILE}:
            raise UserError(f"{folder}/{exc}: the sample's outline, the area inspected, is "
                            "read from it; put the file back where the scan read it") from None
        return None  # an unreadable sample must not stop inspection: inspect everything


def _usable_polygon(sample: Any, alignment: dict[str, Any] | None = None) -> Any:
    """A saved sample's usable polygon, where the alignment found it (None if unknown)."""
    if sample is None:
        return None
    from scanner.geometry import usable_polygon

    try:
        return usable_polygon(sample, alignment=alignment)
    except Exception:  # an odd sample must not stop inspection: inspect everything
        return None


def _die_grid(mosaic: Path, sample: Any, polygon: Any, alignment: dict[str, Any] | None
              ) -> tuple[list[Any], Any, str] | None:
    """The mosaic's levels, the die grid die-to-die compares on, and where the grid came
    from; None when there is none.

    Wafers with ``die_to_die`` use the recipe's grid; image and rectangle samples the grid
    their recipe gives, else the repeat found in the mosaic (:func:`scanner.diegrid.
    estimate_grid`) when ``die_to_die`` is true or auto.
    """
    kind = getattr(sample, "kind", None)
    if sample is None or polygon is None or kind not in ("wafer", "image", "rectangle") \
            or getattr(sample, "die_to_die", False) is False:
        return None
    from scanner.diegrid import sample_grid
    from scanner.ngff import open_mosaic

    levels, transforms = open_mosaic(mosaic)
    grid, source = sample_grid(sample, alignment), "alignment" if alignment else "recipe"
    if grid is None:
        grid, source = _found_grid(levels, transforms, polygon), "found in the mosaic"
    elif kind in PART_KINDS and not alignment:
        grid = _turned_as_found(grid, _found_grid(levels, transforms, polygon), polygon)
    return None if grid is None else (levels, grid, source)


def _turned_as_found(grid: Any, found: Any, polygon: Any) -> Any:
    """A part's recipe grid turned as the mosaic shows its layout (``found``: the repeat
    found there, :func:`scanner.diegrid.estimate_grid`), about the usable area's centre.

    No alignment finds an image or rectangle sample's turn before the scan, and a part laid
    down by hand lies up to a degree or so turned: the recipe's grid, square to the stage,
    left the dies far from the middle ``pitch * n * sin(turn)`` off their cells (a
    camera-photo die grid turned 1 deg: 15 false defects on its defective copy and 22 on a
    good one, all in the edge dies). The grid is kept as the recipe gives it when the layout
    found is another one (its pitch off the recipe's by more than it is measured to) or
    square."""
    if found is None or not found.rotation_deg or any(
            abs(a - b) > found.precision_um
            for a, b in zip(found.pitch_um, grid.pitch_um, strict=True)):
        return grid
    c = polygon.centroid
    th = math.radians(found.rotation_deg)
    u, v = grid.origin_um[0] - c.x, grid.origin_um[1] - c.y
    origin = (c.x + math.cos(th) * u - math.sin(th) * v, c.y + math.sin(th) * u + math.cos(th) * v)
    return replace(grid, origin_um=origin, rotation_deg=found.rotation_deg)


def _compared_image(mosaic_geometry: Any, levels: list[Any], grid: Any, polygon: Any,
                    kind: str | None) -> tuple[Any, Any, list[Any] | None, Any, int]:
    """The image die-to-die compares, its geometry (padded: see :func:`_with_room`), the
    pyramid, the usable area and the padding. The usable area of a part whose outline the
    recipe does not give (``kind`` image or rectangle) leaves out the surround it shows
    (:func:`scanner.inspection.dietodie_alike.on_part`); a wafer's is its edge-exclusion
    circle, placed by the pre-alignment."""
    from scanner.diegrid import MIN_DIE_PX
    from scanner.inspection.dietodie_alike import on_part

    polygon = _scanned_part(polygon, mosaic_geometry)
    image, pyramid, area, pad = _with_room(levels, mosaic_geometry, grid, polygon)
    geometry = _padded(mosaic_geometry, pad, image)
    if kind in PART_KINDS and min(grid.pitch_um) / geometry.pixel_size_um >= MIN_DIE_PX:
        # (a repeat of a few pixels has nothing to align or compare: die_to_die_patches)
        area = on_part(image, geometry, grid, area, pyramid)
        if not pad and area is not polygon:
            # what the part's surround took may leave too few dies with room to be aligned
            # (a staggered layout found at another phase: 4 whole dies, 2 once the empty
            # ends of its rows were left out, and nothing compared): room is made again
            image, pyramid, area, pad = _with_room(levels, mosaic_geometry, grid, area)
            geometry = _padded(mosaic_geometry, pad, image)
    return image, geometry, pyramid, area, pad


def _padded(geometry: Any, pad: int, image: Any) -> Any:
    """The geometry of a mosaic padded by ``pad`` pixels on each side (:func:`_with_room`)."""
    from scanner.inspection.dietodie import MosaicGrid

    if not pad:
        return geometry
    return MosaicGrid((geometry.origin_um[0] - pad * geometry.pixel_size_um,
                       geometry.origin_um[1] - pad * geometry.pixel_size_um),
                      geometry.pixel_size_um, tuple(image.shape))


def _scanned_part(polygon: Any, geometry: Any) -> Any:
    """The usable area within the mosaic: a band across a wafer holds a few of its dies,
    and the wafer's whole usable area counted 89 dies where none had room to be compared, so
    the band's edge dies were neither compared on their part nor left to the repeater check."""
    inside = polygon.intersection(geometry.outline())
    return inside if inside.geom_type in ("Polygon", "MultiPolygon") and not inside.is_empty \
        else polygon


#: sample kinds whose die-to-die usable area is the part as the scan shows it (on_part)
PART_KINDS = ("image", "rectangle")


def _die_to_die(mosaic: Path, sample: Any, polygon: Any, threshold: float,
                alignment: dict[str, Any] | None = None, z_threshold: float | None = None,
                texture_z_threshold: float | None = None, found_grid: bool = True
                ) -> Callable[[MapSet], tuple[dict[str, Any], Any, Any]] | None:
    """The map refinement that adds die-to-die evidence, or None when there is no die grid
    (:func:`_die_grid`).

    It runs after the model, not beside it: on the 2-core reference machine a thread running
    it during inference slowed both (demo wafer: inspection 18.2 -> 22.8 s). Returns what it
    did (dies compared, seconds, the grid), the reader of difference images and z-scores of
    the dies compared (``difference(r0, c0, h, w)`` on the mosaic's level 0:
    ``Comparison.difference``; None when none were, or when the maps are not on the mosaic's
    own grid), the map pixels of the dies compared and those of them where the neighbouring
    dies show the same (z under ``DESIGN_Z``, :func:`repeated_mask`). ``z_threshold`` and
    ``texture_z_threshold``: the model card's, calibrated on a good scan of the product
    (default: :class:`DieToDie`'s). ``found_grid`` false: a repeat found in the mosaic is not
    compared (the good scan showed that the product's found "dies" are no copies).
    """
    found = _die_grid(mosaic, sample, polygon, alignment)
    if found is None or (not found_grid and found[2] == "found in the mosaic"):
        return None
    levels, grid, source = found
    return die_to_die_step(levels, _mosaic_grid(mosaic), grid, source, polygon,
                           getattr(sample, "kind", None), threshold, z_threshold,
                           texture_z_threshold)


def repeats(card_die_to_die: dict[str, Any] | None) -> bool:
    """Whether a model's good images showed a product whose dies repeat (its card's
    ``die_to_die`` record, from good scans or good image files), so that images that say
    nothing of their sample (image files, a mosaic without a recipe) are compared die to die
    where a repeat is found in them. Not without such a record: the shipped model compared
    the "dies" found in real EL cells (the busbars' repeat) and lowered their AUROC (60
    cells: 0.698 -> 0.656, 11 more false defects)."""
    return bool(card_die_to_die) and card_die_to_die.get("found_grid_repeats") is not False


def die_to_die_step(levels: list[Any], geometry: Any, grid: Any, source: str, polygon: Any,
                    kind: str | None, threshold: float, z_threshold: float | None = None,
                    texture_z_threshold: float | None = None) -> DieToDieStep:
    """The map refinement of :func:`_die_to_die` on an image's pyramid ``levels`` (a
    mosaic's, or an image file's held in memory) whose level 0 lies at ``geometry``, with
    the die ``grid`` found or given (``source`` says which) and the usable ``polygon``:
    compared cell to cell when the repeat is finer than a die and the sample a part
    (``kind`` image or rectangle), die to die otherwise."""
    from scanner.inspection.defects import DESIGN_Z
    from scanner.inspection.dietodie import (
        DieToDie,
        _context_px,
        apply_patches,
        die_to_die_patches,
        repeated_mask,
        z_to_score,
    )
    from scanner.inspection.dietodie_maps import bridge_die_borders

    calibrated = {k: float(v) for k, v in (("z_threshold", z_threshold),
                                           ("texture_z_threshold", texture_z_threshold))
                  if v is not None}
    if kind in PART_KINDS:
        cells = _cell_to_cell(levels, geometry, grid, polygon, threshold, source, calibrated)
        if cells is not None:
            return cells
    settings = DieToDie(**calibrated)

    def refine(maps: MapSet) -> tuple[dict[str, Any], Any, np.ndarray | None,
                                      np.ndarray | None]:
        image, padded, pyramid, area, pad = _compared_image(geometry, levels, grid, polygon,
                                                            kind)
        patches, stats, comparison = die_to_die_patches(
            maps.origin_um, maps.pixel_size_um, image, padded, grid, area, threshold,
            _arbitrated(settings, pad), pyramid=pyramid)
        apply_patches(maps.maps["anomaly"], patches)
        difference, compared, repeated = None, None, None
        if comparison is not None:
            compared = comparison.compared_mask(maps.origin_um, maps.pixel_size_um,
                                                maps.maps["anomaly"].shape)
            # a defect crossing from die to die dips along the line between them
            bridge_die_borders(maps.maps["anomaly"], compared, grid, maps.origin_um,
                               maps.pixel_size_um, _context_px(settings)
                               * geometry.pixel_size_um / maps.pixel_size_um)
            repeated = repeated_mask(compared, patches,
                                     float(z_to_score(DESIGN_Z, settings.z_threshold,
                                                      threshold)))
            if not maps.reader.resample and levels[0].ndim == 2:
                difference = functools.partial(_shifted_difference, comparison, image, pad)
        return {**stats.to_dict(), "grid": _grid_record(grid, source)}, difference, compared, \
            repeated

    return refine


def _grid_record(grid: Any, source: str) -> dict[str, Any]:
    """The die grid compared, as the defect list's header records it."""
    return {"pitch_um": list(grid.pitch_um), "origin_um": list(grid.origin_um),
            "rotation_deg": grid.rotation_deg, "source": source}


def _cell_to_cell(levels: list[Any], geometry: Any, grid: Any, polygon: Any,
                  threshold: float, source: str, calibrated: dict[str, float]
                  ) -> DieToDieStep | None:
    """The map refinement that compares a repeat finer than a die cell to cell
    (:mod:`scanner.inspection.celltocell`), as :func:`_die_to_die` returns; None when the
    grid is a die grid."""
    from scanner.inspection.celltocell import CellToCell, cell_comparison, cell_to_cell_patches
    from scanner.inspection.defects import DESIGN_Z
    from scanner.inspection.dietodie import apply_patches, repeated_mask, z_to_score
    from scanner.inspection.polygonmask import polygon_mask

    comparison = cell_comparison(geometry, grid, _scanned_part(polygon, geometry),
                                 CellToCell(**calibrated))
    if comparison is None:
        return None

    def refine(maps: MapSet) -> tuple[dict[str, Any], Any, np.ndarray | None,
                                      np.ndarray | None]:
        level0 = levels[0]
        patches, stats = cell_to_cell_patches(maps.origin_um, maps.pixel_size_um, level0,
                                              comparison, comparison.usable.polygon, threshold)
        apply_patches(maps.maps["anomaly"], patches)
        shape = maps.maps["anomaly"].shape
        inside = polygon_mask(comparison.usable.polygon, maps.origin_um,
                              maps.pixel_size_um)(0, 0, *shape)
        compared = inside if inside is not None else np.zeros(shape, dtype=bool)
        repeated = repeated_mask(compared, patches, float(z_to_score(
            DESIGN_Z, comparison.settings.z_threshold, threshold)))
        difference = None
        if not maps.reader.resample and level0.ndim == 2:
            difference = functools.partial(comparison.difference, level0)
        return {**stats.to_dict(), "grid": _grid_record(grid, source)}, difference, compared, \
            repeated

    return refine


def _golden(mosaic: Path, model: Any, threshold: float, kind: str | None,
            polygon: Any = None) -> DieToDieStep | None:
    """The map refinement that compares the scan with the model's golden image, the reference
    of a design that does not repeat (:func:`scanner.inspection.golden.golden_evidence`);
    None when the model keeps none, or the sample is of a kind no golden image stands for."""
    from scanner.inspection.golden import golden_evidence, uses_golden

    if not uses_golden(model, kind):
        return None
    from scanner.ngff import open_mosaic

    def refine(maps: MapSet) -> tuple[dict[str, Any], Any, np.ndarray | None,
                                      np.ndarray | None]:
        levels, _ = open_mosaic(mosaic)
        return golden_evidence(model, levels, _mosaic_grid(mosaic), maps, threshold, polygon)

    return refine


@single_blas_thread()  # many tiny products (phase correlation): models/blas.py
def good_scan_die_to_die(folder: Path) -> dict[str, Any] | None:
    """Die-to-die on a good scan folder: the largest intensity and texture z-scores its dies
    reach, how many were compared and the z thresholds calibrated from them
    (:func:`scanner.inspection.dietodie.calibrated_z_threshold`); None when the scan has no
    die grid or fewer than three comparable dies."""
    from scanner.inspection.dietodie import DieToDie, largest_z

    folder = Path(folder)
    scan = scan_json_if_any(folder)
    saved = _saved_sample(folder, scan)
    alignment = effective_alignment((scan or {}).get("alignment"))
    polygon = _usable_polygon(saved, alignment)
    found = _die_grid(folder / MOSAIC, saved, polygon, alignment)
    if found is None:
        return None
    levels, grid, source = found
    if getattr(saved, "kind", None) in PART_KINDS:
        from scanner.inspection.celltocell import cell_comparison, largest_cell_z

        geometry = _mosaic_grid(folder / MOSAIC)
        part = _scanned_part(polygon, geometry)
        cells = cell_comparison(geometry, grid, part)
        if cells is not None:
            reached = largest_cell_z(levels[0], cells, part)
            return None if reached is None else {
                **die_to_die_record(reached, source == "found in the mosaic"),
                "mode": "cell to cell"}
    image, geometry, pyramid, area, pad = _compared_image(_mosaic_grid(folder / MOSAIC),
                                                          levels, grid, polygon,
                                                          getattr(saved, "kind", None))
    reached = largest_z(image, geometry, grid, area, _arbitrated(DieToDie(), pad),
                        pyramid=pyramid)
    if reached is None:
        return None
    return die_to_die_record(reached, source == "found in the mosaic")


def _arbitrated(settings: Any, pad: int) -> Any:
    """Die-to-die settings for a mosaic padded by ``pad`` pixels (:func:`_with_room`): no
    arbitration between references there (every die of a layout repeated 2 x 2 touches the
    mirrored padding, whose references differ by design along the border: outvoting one
    left false scratches along the die borders of a mirrored brick product)."""
    import dataclasses

    return dataclasses.replace(settings, arbitrate=False) if pad else settings


def die_to_die_record(reached: tuple[float, float, int], found: bool) -> dict[str, Any]:
    """The card's die-to-die calibration from the largest intensity and texture z-scores good
    dies reached and how many were compared (:func:`scanner.inspection.dietodie.largest_z`),
    on a grid ``found`` in the image or given."""
    from scanner.inspection.dietodie import calibrated_z_threshold

    z, zt, dies = reached
    out: dict[str, Any] = {"good_max_z": round(z, 2), "dies": dies,
                           "z_threshold": round(calibrated_z_threshold(z), 2),
                           "texture_good_max_z": round(zt, 2),
                           "texture_z_threshold": round(calibrated_z_threshold(zt), 2)}
    if found:
        # a repeat found in a picture that has none (a moon photograph: "dies" of 468 um,
        # its good scan's dies z 38): the good scan's own dies differing far beyond any
        # threshold say the found grid is not a layout, and inspection leaves it
        out["found_grid_repeats"] = bool(max(z, zt) <= NOT_A_REPEAT_Z)
    return out


#: a found grid whose good scan's dies differ by more than this z is no repeat (twice the
#: default threshold: a product's own dies, aligned, stay under it; the camera-photo grid under
#: 20 % vignetting reaches 14)
NOT_A_REPEAT_Z = 26.0


#: a mosaic whose dies all touch its border is padded in memory up to this size (pixels)
PAD_MAX_PX = 128 * 2**20


def _with_room(levels: list[Any], geometry: Any, grid: Any, polygon: Any
               ) -> tuple[Any, list[Any] | None, Any, int]:
    """What die-to-die compares: the mosaic, its pyramid, the usable area and the padding
    (pixels) added on each side of the mosaic.

    Dies are compared only with room around them to be aligned. A layout repeated only a few
    times (a 2 x 2 product) has every die on the image's border, where the scan often ends a
    pixel or two past it: no die had room, and no die was compared. When fewer than three do,
    a small mosaic is padded in memory by mirroring (the padding is never compared: it lies
    outside the usable area) and the usable area is let out by the precision of a found grid
    (a pixel of the level it was found in), so that dies found from the image itself count as
    whole. Not when fewer than three dies would be whole even so (a band across a wafer
    narrower than a die): its partial dies are compared with each other on what was scanned.
    """
    from scanner.inspection.dietodie import DieToDie, _margin, full_dies, room_px

    level0 = levels[0]
    margin = _margin(DieToDie())
    if len(full_dies(grid, polygon, geometry, margin_px=margin)) >= 3 or level0.ndim != 2 \
            or (level0.shape[0] + 2 * margin) * (level0.shape[1] + 2 * margin) > PAD_MAX_PX:
        return level0, levels, polygon, 0
    # a found grid fits to a pixel of the level it was found in (_found_grid)
    k = _search_level(levels)
    area = polygon.buffer((2**k + 1) * geometry.pixel_size_um, join_style="mitre")
    if sum(whole for *_, whole in grid.cells_in(area)) < 3:
        # padding makes no die whole (a band across a wafer narrower than a die): the partial
        # dies are compared with each other on the scanned pixels alone
        # (scanner.inspection.dietodie.compare_partial_dies). Compared in a mirrored padding
        # and in the area let out into it, a die row's dies, each mirrored a pixel apart
        # from the others at the band's edge, differed there (two false "scratches" 1.4 and
        # 3.4 mm long along a 76 mm wafer's band)
        return level0, levels, polygon, 0
    pad = room_px(grid, area, geometry, margin)
    padded = np.pad(np.asarray(level0[...]), pad, mode="symmetric")
    return padded, None, area, pad


def _shifted_difference(comparison: Any, source: Any, pad: int, r0: int, c0: int, h: int,
                        w: int) -> Any:
    """``comparison.difference`` of a mosaic window, in the coordinates of the unpadded
    mosaic (see :func:`_with_room`)."""
    return comparison.difference(source, r0 + pad, c0 + pad, h, w)


#: side (px) of the pyramid level the repeat of a layout is looked for in
GRID_SEARCH_PX = 1100


def _search_level(levels: list[Any]) -> int:
    """The pyramid level a layout's repeat is looked for in: the first of at most
    :data:`GRID_SEARCH_PX` a side (the coarsest when none is)."""
    return next((i for i, a in enumerate(levels) if max(a.shape) <= GRID_SEARCH_PX),
                len(levels) - 1)


def _found_grid(levels: list[Any], transforms: list[Any], polygon: Any = None) -> Any:
    """The repeat found in a mosaic's pyramid level of about :data:`GRID_SEARCH_PX` a side,
    over the sample's usable ``polygon`` where one is given (None: no clear repeat).

    The polygon matters: a scan reaches past an image sample's edges, and the surround,
    scanned but not part of the product, would be read as part of its layout."""
    from scanner.diegrid import estimate_grid
    from scanner.inspection.polygonmask import polygon_mask
    from scanner.ngff import level_transform

    k = _search_level(levels)
    image = np.asarray(levels[k][...], dtype=np.float32)
    if image.ndim != 2:
        return None
    scale, trans = level_transform(transforms, k)
    origin, pixel = (float(trans[1]), float(trans[0])), float(scale[1])
    valid = image != 0
    if polygon is not None:
        inside = polygon_mask(polygon, origin, pixel)(0, 0, *image.shape)
        valid &= inside if inside is not None else False
    return estimate_grid(image, pixel, origin, valid)


def image_levels(image: np.ndarray, max_levels: int = 12) -> list[np.ndarray]:
    """An image held in memory as a mosaic's pyramid: itself, then halved (by 2 x 2 means,
    as a mosaic's levels are written) down to one pixel or ``max_levels`` levels."""
    from scanner.ngff import _downsample2

    levels = [np.asarray(image, dtype=np.float32)]
    while max(levels[-1].shape) > 1 and len(levels) < max_levels:
        levels.append(_downsample2(levels[-1]))
    return levels


def image_grid(levels: list[np.ndarray], pixel_um: float) -> Any:
    """The repeat found in an image's pyramid (:func:`image_levels`) whose pixel ``(0, 0)`` of
    level 0 is centred on the stage origin, as :func:`_found_grid` finds a mosaic's (None: no
    clear repeat)."""
    from scanner.diegrid import estimate_grid

    k = _search_level(levels)
    centre = (2**k - 1) / 2 * pixel_um  # level k's pixel (0, 0) is centred on its 2**k block
    return estimate_grid(levels[k], pixel_um * 2**k, (centre, centre))


#: sample kinds whose surface can be plain (polished wafers between and around dies, blank
#: coupons): a PV cell's grains are never plain, and an image sample may show anything, with
#: no die grid to tell a large uniform structure of its design from a stain
PLAIN_SURFACE_KINDS = ("wafer", "rectangle")


def _plain_surface(maps: MapSet, reflectance: np.ndarray, sample: Any, polygon: Any,
                   threshold: float, mosaic: Path | None = None,
                   compared: np.ndarray | None = None) -> dict[str, Any]:
    """Add defects on plain surface to the anomaly map: large faint ones at map resolution
    (:mod:`scanner.inspection.plainsurface`) and, on a mosaic, small sharp ones at its own
    resolution (:mod:`scanner.inspection.plainspots`) outside the ``compared`` dies (map
    pixels; die-to-die judges those against the design); returns what they found."""
    from scanner.inspection.dietodie import apply_patches
    from scanner.inspection.plainspots import plain_spot_patches
    from scanner.inspection.plainsurface import (
        apply_plain_surface,
        die_pitch_in_map_px,
        plain_surface_area,
        plain_surface_defects,
    )
    from scanner.inspection.polygonmask import polygon_mask

    t0 = time.perf_counter()
    shape = tuple(int(n) for n in maps.maps["anomaly"].shape)
    usable = np.ones(shape, dtype=bool)
    if polygon is not None:
        usable = polygon_mask(polygon, maps.origin_um, maps.pixel_size_um,
                              2 * maps.pixel_size_um)(0, 0, *shape)
        if usable is None:
            usable = np.zeros(shape, dtype=bool)
    usable &= reflectance > 0  # no tile landed there: not inspected
    map_pitch = die_pitch_in_map_px(sample, maps.pixel_size_um)
    area = plain_surface_area(reflectance, usable) if usable.any() else None
    found = plain_surface_defects(reflectance, usable, map_pitch, area=area)
    raised = apply_plain_surface(maps.maps["anomaly"], found, threshold)
    record = {"regions": len(found), "map_pixels_raised": raised}
    if mosaic is not None and maps.source_levels is not None and area is not None:
        geometry = _mosaic_grid(mosaic)
        pitch = None if map_pitch is None else tuple(
            v * maps.pixel_size_um / geometry.pixel_size_um for v in map_pitch)
        surface = area.plain if compared is None else area.plain & ~compared
        patches, pixels = plain_spot_patches(
            maps.source_levels[0], geometry, float(maps.stats.extra.get("level", 1.0)) or 1.0,
            surface, maps.origin_um, maps.pixel_size_um, threshold, pitch)
        apply_patches(maps.maps["anomaly"], patches)
        record["spot_pixels"] = pixels
    return {**record, "seconds": round(time.perf_counter() - t0, 3)}


def _not_scanned_mm2(maps: MapSet, reflectance: np.ndarray, polygon: Any) -> float:
    """Usable area (mm²) whose map pixels no tile covered (the mosaic is 0 there: not
    inspected, see :func:`scanner.inspection.maps.scanned_mask`)."""
    from scanner.inspection.polygonmask import polygon_mask

    unscanned = reflectance <= 0
    if polygon is not None:
        inside = polygon_mask(polygon, maps.origin_um, maps.pixel_size_um)(0, 0,
                                                                         *unscanned.shape)
        unscanned &= inside if inside is not None else False
    return round(float(np.count_nonzero(unscanned)) * (maps.pixel_size_um / 1000.0) ** 2, 4)


#: model pixels along the sample's edge where a model built from image files alone is not
#: trusted. Its features there reach beyond the sample, onto the chuck, which its good images
#: never showed (their border is the file's). Measured on the products bench's coin grid
#: (``bench/bench_products.py``), with the model from the good image file, on the good scan:
#: the anomaly map's largest value 16-48 µm (px) from the edge was 1.38-1.41, against 1.23
#: further in and a threshold of 1.36; a model from the good scan showed no such band.
EDGE_CONTEXT_PX = 48


def _edge_band_um(polygon: Any, model: Any, pixel_um: float | None) -> float:
    """Width (µm) of the band along the sample's edge where ``model``'s map is not used
    (0: the model's usual border only, see :func:`scanner.inspection.maps.infer_mosaic`).

    A model whose card says its good images never showed a sample's edge with what lies
    beyond it (``sample_edge_seen: false``: built from image files only) loses
    :data:`EDGE_CONTEXT_PX` of its own pixels along the edge. A model built from a scan, the
    shipped default and cards without the entry keep the whole area. Die-to-die and the plain
    surface channels, which do not use the model, still judge the band.
    """
    card = getattr(model, "card", None) or {}
    if polygon is None or card.get("sample_edge_seen", True):
        return 0.0
    pixel = max(float(card.get("pixel_size_um") or 0.0), float(pixel_um or 0.0))
    band = EDGE_CONTEXT_PX * pixel
    inner = polygon.buffer(-band) if band > 0 else polygon
    if inner.is_empty or inner.area < 0.25 * polygon.area:
        return 0.0  # a sample hardly larger than the band: the model judges all of it
    return round(band, 3)


def _mosaic_grid(mosaic: Path) -> Any:
    """Where the pixels of level 0 of ``mosaic`` lie on the stage."""
    from scanner.inspection.dietodie import MosaicGrid
    from scanner.ngff import level_transform, open_mosaic

    levels, transforms = open_mosaic(mosaic)
    scale, trans = level_transform(transforms)
    return MosaicGrid((float(trans[1]), float(trans[0])), float(scale[1]),
                      tuple(int(n) for n in levels[0].shape[:2]))


@single_blas_thread()  # many tiny products (phase correlation): models/blas.py
def inspect_mosaic(
    mosaic: Path,
    out_dir: Path | None = None,
    *,
    model: ModelRef = None,
    threshold: float | None = None,
    polygon: Any = None,
    scan: dict[str, Any] | None = None,
    sample_kind: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    cluster: Any = None,
) -> InspectionResult:
    """Inspect a mosaic: write the maps and the defect list into ``out_dir``.

    Parameters
    ----------
    mosaic : Path
        ``mosaic.ome.zarr``.
    out_dir : Path, optional
        Where maps and defects go (default: the mosaic's folder).
    model : InspectionModel or path, optional
        Default: the shipped model.
    threshold : float, optional
        Decision threshold (default: the model's calibrated one for the scan's sample kind,
        see :func:`card_threshold`).
    polygon : shapely Polygon, optional
        Usable area of the sample (stage µm); default: from ``scan.json`` next to the mosaic.
    scan : dict, optional
        The scan's ``scan.json`` (read from the mosaic's folder when not given); when the
        outputs go to the scan folder it is updated with the inspection's timings.
    sample_kind : str, optional
        Kind of sample whose calibrated threshold to use (default: the recipe's in
        ``scan.json``; none known: the model's pooled threshold).
    progress : callable, optional
        ``progress(done, total)`` windows.
    cluster : scanner.cluster.Cluster, optional
        Compute the maps as dask tasks (:mod:`scanner.cluster`); defects are found here.
    """
    mosaic = Path(mosaic)
    if not mosaic.exists():
        raise UserError(f"{mosaic}: mosaic not found")
    open_readable(mosaic)  # damaged metadata is refused before the die grid reads it
    folder = mosaic.parent
    out_dir = Path(out_dir) if out_dir is not None else folder
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = load_inspection_model(model)
    if scan is None:
        scan = scan_json_if_any(folder)
    saved = _saved_sample(folder, scan)  # the recipe is parsed once, for both uses
    # where the sample really lies (the pre-alignment, refined on the mosaic after stitching)
    alignment = effective_alignment((scan or {}).get("alignment"))
    if polygon is None:
        polygon = _usable_polygon(saved, alignment)
    kind = sample_kind or (str(saved.kind) if saved is not None else None)
    if sample_kind and saved is not None and sample_kind != str(saved.kind):
        log.warning("--sample-kind %s: the scan's recipe says %s; the %s threshold is used, "
                    "as asked", sample_kind, saved.kind, sample_kind)
    pixel_um = _mosaic_pixel_size_um(mosaic)
    # the model's own map leaves out the edge band it cannot judge; die-to-die and the plain
    # surface, which compare the mosaic with itself, keep the whole usable area
    edge_band_um = _edge_band_um(polygon, model, pixel_um)
    thr, thr_source = _decision_threshold(model, threshold, kind, pixel_um)
    contexts = context_thresholds(model, kind, thr_source, pixel_um)
    evidence_thr = evidence_threshold(model, thr, thr_source, kind, pixel_um)
    d2d = (getattr(model, "card", None) or {}).get("die_to_die") or {}
    compared_sample, compared_polygon = saved, polygon
    if saved is None and polygon is None and repeats(d2d):
        # a mosaic with no recipe (stitched by another tool, or its recipe unreadable) of a
        # product whose good images repeat is looked for a repeat as an image sample is
        compared_sample = SimpleNamespace(kind="image", die_to_die="auto")  # pitch: found
        compared_polygon = _mosaic_grid(mosaic).outline()
    compare = _die_to_die(mosaic, compared_sample, compared_polygon, evidence_thr, alignment,
                          d2d.get("z_threshold"), d2d.get("texture_z_threshold"),
                          d2d.get("found_grid_repeats", True) is not False)
    golden = _golden(mosaic, model, evidence_thr, kind, polygon)
    refine = _Refinement(compare or golden, kind in PLAIN_SURFACE_KINDS, saved, polygon,
                         evidence_thr, mosaic, fallback=golden if compare is not None else None,
                         alignment=alignment)
    maps = infer_mosaic(model, mosaic, out_dir, polygon=polygon, progress=progress,
                        refine=refine, cluster=cluster, edge_um=edge_band_um or None)
    t1 = time.perf_counter()
    t_maps = t1 - t0
    defects = _defects_from(maps, model, thr, maps.stats.extra["level"], contexts,
                            refine.reflectance, refine.difference,
                            None if refine.compared is None else (refine.compared,
                                                                  refine.repeated))
    t_defects = time.perf_counter() - t1
    timings = _timings(time.perf_counter() - t0, t_maps, t_defects, maps, refine)
    header = {
        "source": str(Path(mosaic).resolve()), "created": now_iso(), "model": model_info(model),
        **threshold_record(thr, thr_source, contexts),
        **_maps_record(maps, refine, polygon is not None),
        "edge_band_um": edge_band_um,
        "timings": timings, "n_defects": len(defects),
        "good_scores": good_surface_scores(maps.maps["anomaly"], thr),
        "surface_image": surface_image(maps.source_levels[0]) if maps.source_levels
        else {"n": 0},
    }
    write_defects(out_dir, defects, header)
    if scan is not None and out_dir.resolve() == folder.resolve():
        _record_in_scan(scan, folder, header, defects, maps.stats.extra.get("mosaic_px", 0))
    outputs = {k: v for k, v in maps.paths.items()}
    outputs["defects"] = out_dir / "defects.json"
    return InspectionResult(out_dir, len(defects), timings, outputs, defects)


#: die-to-die over a scan's maps: its statistics, the difference reader, and the map pixels
#: compared and, of them, those where the neighbouring dies repeat one another
DieToDieStep = Callable[[MapSet], tuple[dict[str, Any], Any, np.ndarray | None,
                                        np.ndarray | None]]


class _Refinement:
    """The evidence added to the network's maps before defects are extracted (the ``refine``
    of :func:`scanner.inspection.maps.infer_mosaic`): die-to-die comparison where there is a die
    grid, large faint defects on plain surface for the kinds that have one."""

    def __init__(self, die_to_die: DieToDieStep | None,
                 plain_kind: bool, sample: Any, polygon: Any, threshold: float,
                 mosaic: Path | None = None, fallback: DieToDieStep | None = None,
                 alignment: dict[str, Any] | None = None) -> None:
        self.die_to_die, self.plain_kind, self.mosaic = die_to_die, plain_kind, mosaic
        #: where the sample lies (a PV cell's busbars are placed with it)
        self.alignment = alignment
        #: map pixels lowered to the level a PV cell's busbars score (their design)
        self.busbar_pixels = 0
        #: map pixels lowered to the level a PV cell's sides score (the chuck beyond them)
        self.side_pixels = 0
        #: the comparison run when ``die_to_die`` compared no die (the golden image's)
        self.fallback = fallback
        self.sample, self.polygon, self.threshold = sample, polygon, threshold
        self.d2d: dict[str, Any] = {}
        #: what the comparison with a golden image did (when it ran instead of die-to-die)
        self.golden: dict[str, Any] = {}
        self.plain: dict[str, Any] = {}
        #: the die-to-die difference reader, when dies were compared
        self.difference: Any = None
        #: usable area (mm²) that no tile covered: not inspected
        self.not_scanned_mm2 = 0.0
        #: the map pixels in the dies compared die-to-die (None: none were), and those of
        #: them where the neighbouring dies show the same
        self.compared: np.ndarray | None = None
        self.repeated: np.ndarray | None = None
        #: the input at map resolution, computed once for plain surface and defects
        self.reflectance: np.ndarray | None = None

    def __call__(self, maps: MapSet) -> None:
        if self.die_to_die is not None:
            stats, self.difference, self.compared, self.repeated = self.die_to_die(maps)
            if self.compared is None and self.fallback is not None:
                # a repeat found in a fine pattern (a grating's lines) that holds no whole
                # die took the place of the golden image and compared nothing
                self.d2d.update(stats)
                stats, self.difference, self.compared, self.repeated = self.fallback(maps)
            (self.golden if stats.get("reference") == GOLDEN else self.d2d).update(stats)
        if self.sample is not None and str(getattr(self.sample, "kind", "")) == "pv_cell":
            # a busbar is the cell's design: its own level along it is not a defect; nor is
            # the level its sides score where the chuck lies beyond them
            from scanner.inspection.busbars import flatten_busbars, flatten_sides

            self.busbar_pixels = flatten_busbars(
                maps.maps["anomaly"], maps.origin_um, maps.pixel_size_um, maps.stride,
                self.sample, self.alignment)
            self.side_pixels = flatten_sides(
                maps.maps["anomaly"], maps.origin_um, maps.pixel_size_um, maps.stride,
                self.sample, self.alignment)
        if self.plain_kind or self.polygon is not None:
            self.reflectance = reflectance_at_map(maps)
            self.not_scanned_mm2 = _not_scanned_mm2(maps, self.reflectance, self.polygon)
        if self.plain_kind:
            self.plain.update(_plain_surface(maps, self.reflectance, self.sample, self.polygon,
                                             self.threshold, self.mosaic, self.compared))


def _timings(wall: float, t_maps: float, t_defects: float, maps: MapSet,
             refine: _Refinement) -> dict[str, float]:
    """The inspection's timings (seconds; die-to-die and plain surface are part of maps_s)."""
    timings = {"wall_s": round(wall, 3), "maps_s": round(t_maps, 3),
               "network_s": round(maps.stats.network_s, 3), "defects_s": round(t_defects, 3)}
    if refine.d2d.get("dies") or refine.d2d.get("partial_dies"):
        timings["die_to_die_s"] = round(float(refine.d2d["seconds"]), 3)
    if refine.golden:
        timings["golden_s"] = round(float(refine.golden["seconds"]), 3)
    if refine.plain:
        timings["plain_surface_s"] = refine.plain["seconds"]
    return timings


def _maps_record(maps: MapSet, refine: _Refinement, masked: bool) -> dict[str, Any]:
    """What a defect list's header records of the maps and of the evidence added to them."""
    return {"maps": {k: v.name for k, v in maps.paths.items()},
            "map_pixel_size_um": maps.pixel_size_um, "masked_to_usable_area": masked,
            "windows": maps.stats.windows, "windows_skipped": maps.stats.skipped,
            "die_to_die": refine.d2d or None, "golden": refine.golden or None,
            "plain_surface": refine.plain or None,
            "busbar_pixels_lowered": refine.busbar_pixels,
            "side_pixels_lowered": refine.side_pixels,
            "not_scanned_mm2": refine.not_scanned_mm2}


def _record_in_scan(scan: dict[str, Any], folder: Path, header: dict[str, Any],
                    defects: list[Any], mosaic_px: int) -> None:
    """Write the inspection's summary and timings into the scan folder's ``scan.json``."""
    timings = header["timings"]
    scan.setdefault("timings", {})["inspect"] = {"wall_s": timings["wall_s"]}
    scan["inspection"] = {
        "model": header["model"], "threshold": header["threshold"],
        "n_defects": len(defects), "n_review": sum(d.review for d in defects),
        "maps": header["maps"],
        "mosaic_megapixels": round(mosaic_px / 1e6, 3) if mosaic_px else None, **timings,
        "die_to_die": header["die_to_die"], "golden": header.get("golden"),
        "good_scores": header["good_scores"], "surface_image": header["surface_image"],
    }
    write_json(folder / SCAN_JSON, scan)


def inspect_scan(
    folder: Path,
    *,
    model: ModelRef = None,
    threshold: float | None = None,
    out_dir: Path | None = None,
    scan: dict[str, Any] | None = None,
    sample_kind: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    cluster: Any = None,
) -> InspectionResult:
    """Inspect the mosaic of a scan folder (see :func:`inspect_mosaic`)."""
    folder = Path(folder)
    if not (folder / MOSAIC).exists():
        raise UserError(f"{folder}: no {MOSAIC} (stitch the scan first)")
    _check_recorded_shape(folder, scan if scan is not None else scan_json_if_any(folder))
    return inspect_mosaic(folder / MOSAIC, out_dir, model=model, threshold=threshold,
                          scan=scan, sample_kind=sample_kind, progress=progress,
                          cluster=cluster)


def _check_recorded_shape(folder: Path, scan: dict[str, Any] | None) -> None:
    """Refuse a mosaic whose level 0 is not the shape its scan recorded: metadata edited or
    damaged would have a corner inspected as the whole (0 defects where there were 3)."""
    from scanner.ngff import open_mosaic

    recorded = ((scan or {}).get("mosaic") or {}).get("shape")
    if not recorded:
        return
    try:
        shape = [int(n) for n in open_mosaic(folder / MOSAIC)[0][0].shape[:2]]
    except Exception:  # noqa: BLE001 - unreadable: the inspection's own opening names it
        return
    if shape != [int(n) for n in recorded]:
        raise UserError(f"{folder / MOSAIC}: level 0 is {shape[0]} x {shape[1]} px, the scan "
                        f"recorded {recorded[0]} x {recorded[1]}: the mosaic is damaged (re-run "
                        "`waferscope stitch`)")


# --------------------------------------------------------------------------- plain images


def _check_out_dir(out_dir: Path, targets: list[Path]) -> None:
    """Refuse an output folder whose earlier results inspection would replace: another scan
    folder (its defect list and maps would describe another sample while its ``scan.json``
    still describes its own, and its reports would follow them), or a folder inside a
    target's mosaic store.

    Raises
    ------
    UserError
        Naming ``--out`` and the folder.
    """
    out = out_dir.resolve()
    for t in targets:
        t = t.resolve()
        if t.is_dir() and not (t / SCAN_JSON).is_file() and not t.name.endswith(".zarr") \
                and out == t:
            # results written among the images: a user's own defects.csv or scores.csv there
            # was replaced, and the next inspection of the folder would read the maps' folder
            raise UserError(f"--out {out_dir}: is the folder of images inspected; choose "
                            "another folder for the results")
        zarr = t if t.name.endswith(".zarr") else t / MOSAIC
        if out == zarr or zarr in out.parents:
            raise UserError(f"--out {out_dir}: inside the mosaic {zarr}; choose a folder "
                            "outside it")
    if (out / SCAN_JSON).is_file() and not (len(targets) == 1 and targets[0].resolve() == out):
        raise UserError(f"--out {out_dir}: is another scan folder, whose defects and maps would "
                        "be replaced; choose a new folder (its own results: waferscope "
                        f"inspect {out_dir})")


def inspect_target(
    target: Sequence[Path],
    out_dir: Path | None = None,
    *,
    model: ModelRef = None,
    threshold: float | None = None,
    pixel_size_um: float | None = None,
    sample_kind: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    cluster: Any = None,
) -> InspectionResult:
    """Inspect a scan folder, a mosaic (``.ome.zarr``) or image files/folders.

    ``sample_kind`` chooses the model card's threshold for that kind of sample
    (:func:`card_threshold`); by default a scan's recipe says, and plain images get the pooled
    threshold.
    """
    targets = [Path(t) for t in target]
    if not targets:
        raise UserError("inspect: give a scan folder, a mosaic or image files")
    stores = [t for t in targets if t.name.endswith(".zarr") or (t / SCAN_JSON).is_file()]
    if stores and len(targets) > 1:
        # a scan or a mosaic is inspected alone (its defects and maps go to one folder); read
        # among image files, a store's folder held "no image files"
        raise UserError(f"{stores[0]}: a scan folder or mosaic is inspected on its own; for "
                        "many scans: waferscope batch SCAN...")
    if out_dir is not None:
        _check_out_dir(Path(out_dir), targets)
    first = targets[0]
    if len(targets) == 1 and first.is_dir() and (first / MOSAIC).exists():
        if not (first / SCAN_JSON).is_file():
            # a scan folder that lost its record: inspected as a bare mosaic, its defect list
            # would be overwritten by one made without its recipe (no usable area)
            raise UserError(f"{first}: not a scan folder (no {SCAN_JSON}); to inspect its "
                            f"mosaic alone: waferscope inspect {first / MOSAIC} --out DIR")
        return inspect_scan(first, model=model, threshold=threshold, out_dir=out_dir,
                            sample_kind=sample_kind, progress=progress, cluster=cluster)
    if len(targets) == 1 and first.name.endswith(".zarr"):
        if first.name in MAP_NAMES.values():  # its scores were inspected as an image
            raise UserError(f"{first}: an inspection's map, not a mosaic; inspect the scan "
                            f"folder or its {MOSAIC}")
        return inspect_mosaic(first, out_dir, model=model, threshold=threshold,
                              sample_kind=sample_kind, progress=progress, cluster=cluster)
    if len(targets) == 1 and first.is_dir() and (first / SCAN_JSON).is_file():
        raise UserError(f"{first}: scan folder has no {MOSAIC} (stitch it first)")
    out = Path(out_dir) if out_dir is not None else Path.cwd() / "inspection"
    return inspect_images(targets, out, model=model, threshold=threshold,
                          pixel_size_um=pixel_size_um, sample_kind=sample_kind,
                          progress=progress)


__all__ = [
    "InspectionResult", "MAP_NAMES", "image_score", "inspect_images", "inspect_mosaic",
    "inspect_scan", "inspect_target", "list_images", "read_image",
]
