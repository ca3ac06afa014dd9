"""The user's good images for building a detector: image files, folders, good scan folders.

A good scan is read as inspection will read the scans it judges: its stitched mosaic (seams,
flat-field correction and camera noise included), divided by the mosaic's brightness level
taken as inspection takes it, with the sample's usable area from the scan's recipe (the chuck
and the sample's edge are not good surface). Image files are divided by their own median, as
inspection of image files does.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from models.data import GoodImage, image_files
from scanner.errors import UserError
from scanner.inspection.images import IMAGE_SUFFIXES
from scanner.inspection.inspect import _saved_sample, _usable_polygon, read_image
from scanner.inspection.pixelsize import stated_pixel_um
from scanner.inspection.polygonmask import polygon_mask, polygon_pixels
from scanner.inspection.tiled import source_level
from scanner.scanfolder import MOSAIC, SCAN_JSON, scan_json_if_any

#: a mosaic larger than this (pixels) is read as crops on a grid rather than whole
WHOLE_MOSAIC_PX = 64_000_000
#: side of those crops, and the most of them
CROP_PX = 2048
MAX_CROPS = 48


def load_good(paths: Iterable[str | Path]) -> tuple[list[GoodImage], float | None]:
    """Good images from files, folders of images and good scan folders (or mosaics), and the
    pixel size a scan records (None when no scan says).

    Raises
    ------
    UserError
        A path that does not exist, an unreadable image, a scan without a mosaic, no images.
    """
    out: list[GoodImage] = []
    pixel_um: float | None = None
    paths = [Path(p) for p in paths]
    for path in paths:
        if not path.exists():
            raise UserError(f"{path}: good image path not found")
        if path.is_file():
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise UserError(f"{path}: not an image file ({', '.join(IMAGE_SUFFIXES)})")
            out.append(_image_file(path, path.name))
        elif path.name.endswith(".ome.zarr") or (path / MOSAIC).exists():
            if not path.name.endswith(".ome.zarr") and not (path / SCAN_JSON).is_file():
                # a scan folder that lost its record (or is not one): its mosaic was learnt
                # whole, chuck and sample edge taken for good surface, as inspection refuses
                raise UserError(f"{path}: not a scan folder (no {SCAN_JSON}); to learn from "
                                f"its mosaic alone, give {path / MOSAIC}")
            images, p = _scan(path if path.name.endswith(".ome.zarr") else path / MOSAIC)
            out += images
            pixel_um = pixel_um or p
        elif (path / SCAN_JSON).is_file():
            raise UserError(f"{path}: good scan has no {MOSAIC} (stitch it first)")
        else:
            out += [_image_file(f, str(f.relative_to(path))) for f in image_files(path)]
    if not out:
        raise UserError(f"--good: no images found in {', '.join(str(p) for p in paths)}")
    return out, pixel_um


def _image_file(path: Path, name: str) -> GoodImage:
    img = read_image(path)  # refuses non-finite pixels
    return GoodImage(img / np.float32(source_level(img)), source=name,
                     meta={"stated_pixel_um": stated_pixel_um(path)})


def _scan(mosaic: Path) -> tuple[list[GoodImage], float]:
    """The good surface of a scan's mosaic: whole, or crops on a grid when large."""
    from scanner.integrity import require_ready
    from scanner.ngff import check_complete, level_transform, open_mosaic

    if (mosaic.parent / SCAN_JSON).is_file():
        # what inspection would refuse is no good image either: a scan that did not take
        # every planned tile, a journaled tile missing from its store
        require_ready(mosaic.parent, "inspect", allow_incomplete=None)
    try:
        levels, transforms = open_mosaic(mosaic)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise UserError(f"{mosaic}: not a readable OME-NGFF mosaic ({exc})") from None
    arr = levels[0]
    if arr.ndim != 2:
        raise UserError(f"{mosaic}: expected a 2-D grey mosaic, got shape {arr.shape}")
    check_complete(arr, f"{mosaic} level 0")  # a missing chunk would be learnt as black
    scale, trans = level_transform(transforms)
    p = float(scale[1])
    origin = (float(trans[1]), float(trans[0]))
    folder = mosaic.parent
    scan = scan_json_if_any(folder)
    sample = _saved_sample(folder, scan)
    polygon = _usable_polygon(sample)
    mask = polygon_mask(polygon, origin, p, 2 * p) if polygon is not None else None
    level = source_level(arr, inside=polygon_pixels(polygon, origin, p)
                         if polygon is not None else None)
    h, w = (int(n) for n in arr.shape)
    if h * w <= WHOLE_MOSAIC_PX:
        boxes = [(0, 0, h, w)]
    else:
        nr, nc = max(1, h // CROP_PX), max(1, w // CROP_PX)
        boxes = [(int(i * (h - CROP_PX) / max(nr - 1, 1)), int(j * (w - CROP_PX) /
                  max(nc - 1, 1)), CROP_PX, CROP_PX) for i in range(nr) for j in range(nc)]
    images = []
    for r0, c0, bh, bw in boxes:
        usable = mask(r0, c0, bh, bw) if mask is not None else np.ones((bh, bw), dtype=bool)
        if usable is None:
            continue
        block = np.asarray(arr[r0 : r0 + bh, c0 : c0 + bw], dtype=np.float32)
        usable = usable & (block != 0)  # never scanned: no surface
        if usable.mean() < 0.05:
            continue
        images.append(GoodImage(block / np.float32(level), source=f"{folder.name}:{r0},{c0}",
                                usable=usable, meta={"acquired": True, "pixel_size_um": p,
                                                     "sample_kind": getattr(sample, "kind",
                                                                            None),
                                                     # a crop's border is no edge of the part
                                                     "cropped": len(boxes) > 1}))
    step = max(1, len(images) // MAX_CROPS)
    return images[::step][:MAX_CROPS], p


def good_image_die_to_die(image: np.ndarray, pixel_um: float, seed: int = 0
                          ) -> dict[str, Any] | None:
    """Die-to-die on a good image file as a microscope would show it, as a good scan's
    (:func:`scanner.inspection.inspect.good_scan_die_to_die`): whether the design repeats in
    dies that compare alike (None: no repeat found, or fewer than three dies), which decides
    whether a model keeps the file as its golden image (:mod:`scanner.inspection.golden`).

    The image is given the blur and noise of a scan (:func:`models.variants.camera_variants`,
    its first and mildest version), its repeat is looked for as in a mosaic, and its dies are
    compared as a scan's are. Not the bank's shading: its gain field, independent from one
    256 px patch to the next, set neighbouring dies apart by a few per cent (a horse die
    grid's largest z 14 with it, 1.7 without). Its z-scores are no calibration for a scan's
    dies, which agree less (seams, focus: a cell die grid 2.3 here, 12.1 on its good scan).
    """

    from models.variants import camera_variants
    from scanner.inspection.celltocell import cell_comparison, largest_cell_z
    from scanner.inspection.dietodie import DieToDie, MosaicGrid, largest_z
    from scanner.inspection.dietodie_alike import on_part
    from scanner.inspection.inspect import (
        _arbitrated,
        _with_room,
        die_to_die_record,
        image_grid,
        image_levels,
    )

    seen = camera_variants(np.asarray(image, dtype=np.float32), np.random.default_rng(seed),
                           1, gain_std=0.0)[0]
    levels = image_levels(seen)
    grid = image_grid(levels, pixel_um)
    if grid is None:
        return None
    geometry = MosaicGrid((0.0, 0.0), pixel_um, tuple(seen.shape))
    cells = cell_comparison(geometry, grid, geometry.outline())
    if cells is not None:
        # a repeat finer than a die (an array, a via field) is compared cell to cell, as a
        # good scan of it is (inspect.good_scan_die_to_die): die-to-die has no die to align
        # in it, and the file kept as a golden image instead was compared within +-3 px, where
        # a 30 px face array's own edges hid scratches of 27 % contrast (16 of 20 found in
        # the defective file against the golden image, 19 of 20 in its scan cell to cell)
        reached = largest_cell_z(seen, cells, geometry.outline())
        return None if reached is None else {**die_to_die_record(reached, True),
                                             "mode": "cell to cell"}
    compared, pyramid, area, pad = _with_room(levels, geometry, grid, geometry.outline())
    if pad:
        geometry = MosaicGrid((-pad * pixel_um, -pad * pixel_um), pixel_um,
                              tuple(compared.shape))
    area = on_part(compared, geometry, grid, area, pyramid)
    reached = largest_z(compared, geometry, grid, area, _arbitrated(DieToDie(), pad),
                        pyramid=pyramid)
    return None if reached is None else die_to_die_record(reached, True)
