"""npe2 reader: a scan folder as napari layers, in stage micrometres.

Layers (bottom to top):

* ``mosaic``: the stitched mosaic as a lazy multiscale image (dask arrays over the OME-Zarr
  levels; nothing is read until napari draws it), placed by the OME-NGFF ``scale`` and
  ``translation`` of level 0, so world coordinates are stage µm ``(y, x)``.
* ``anomaly``, ``roughness``, ``uncertainty``: the inspection maps (``MAP_NAMES``) where they
  exist, each placed by its own OME metadata, hidden and half-transparent until toggled.
* ``die grid`` (wafers): the tested dies as rectangles, failing dies outlined in red; hidden.
* ``repeaters`` (wafers with repeaters): defects at one in-die position in many dies, which
  the report keeps out of the defect list (``repeaters.json``), as small brown crosses.
* ``defects``: one point per defect at its centre, coloured by class (the wafer map's
  colours), with ``id``, ``class``, ``score``, ``size_um``, ``die``, ``region``, ``review`` as
  features, which napari shows on hover.

Nothing here imports napari: the reader returns plain ``(data, kwargs, layer_type)`` tuples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from scanner.defectlist import DEFECTS_JSON, MAP_NAMES, read_defects
from scanner.errors import UserError, undecodable
from scanner.reports.repeaters import REPEATERS_JSON, read_repeaters
from scanner.reports.style import CLASS_COLORS, REPEATER_COLOR, class_rgba
from scanner.scanfolder import MOSAIC, SCAN_JSON

LayerData = tuple[Any, dict[str, Any], str]

#: colormap of each inspection map
MAP_COLORMAPS = {"anomaly": "inferno", "roughness": "viridis", "uncertainty": "magma"}


def _scan_folder(path: str | list[str] | Path) -> Path | None:
    """The scan folder a path points at (the folder, or a file or mosaic inside it), or the
    folder an inspection of a scan was written to (``inspect SCAN --out DIR``)."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    p = Path(path)
    for candidate in (p, p.parent):
        if candidate.is_dir() and ((candidate / SCAN_JSON).is_file()
                                   or inspected_mosaic(candidate) is not None):
            return candidate
    return None


def inspected_mosaic(folder: Path) -> Path | None:
    """The mosaic a folder shows: its own, or the one its inspection's ``defects.json``
    names as its source when the inspection was written elsewhere (``inspect SCAN --out
    DIR``: DIR holds the maps and defects, the scan keeps its mosaic); None when neither
    exists."""
    if (folder / MOSAIC).is_dir():
        return folder / MOSAIC
    if not (folder / DEFECTS_JSON).is_file():
        return None
    try:
        header, _ = read_defects(folder)
    except UserError:  # not a scan inspection's list (image files'): nothing to show
        return None
    source = header.get("source")
    if not isinstance(source, str) or not source.endswith(".zarr"):
        return None
    mosaic = Path(source)
    if not mosaic.is_absolute():  # recorded as given; inspect now records it resolved
        mosaic = folder / mosaic
    return mosaic if mosaic.is_dir() else None


def _context_folder(folder: Path) -> Path:
    """The scan folder whose ``scan.json`` places a folder's defects: its own, or that of the
    scan whose mosaic it shows (:func:`inspected_mosaic`)."""
    if (folder / SCAN_JSON).is_file():
        return folder
    mosaic = inspected_mosaic(folder)
    return mosaic.parent if mosaic is not None else folder


def get_reader(path: str | list[str]) -> Any:
    """npe2 ``get_reader`` hook: :func:`read_scan` for a scan folder, else None."""
    return read_scan if _scan_folder(path) is not None else None


def open_multiscale(path: Path) -> tuple[list[Any], tuple[float, float], tuple[float, float]]:
    """Open an OME-NGFF multiscale image lazily.

    Returns
    -------
    levels : list of dask arrays
        Finest first.
    scale, translate : (float, float)
        Level 0's ``scale`` and ``translation`` (``(y, x)``, stage µm).
    """
    import dask.array as da

    from scanner.ngff import check_complete, level_transform, open_mosaic

    arrays, transforms = open_mosaic(path)  # the metadata validated (OME-NGFF 0.5)
    # mosaics and maps store every chunk: a missing one is damage, never shown as black
    for k, a in enumerate(arrays):
        check_complete(a, f"{path} level {k}")
    scale, trans = level_transform(transforms)
    levels = [da.from_zarr(a) for a in arrays]
    return levels, (float(scale[-2]), float(scale[-1])), (float(trans[-2]), float(trans[-1]))


def _limits(levels: list[Any], lo: float = 0.5, hi: float = 99.9) -> tuple[float, float]:
    """Contrast limits from the first level at most ~1024 px a side (cheap, still detailed)."""
    level = next((a for a in levels if max(a.shape[-2:]) <= 1024), levels[-1])
    small = np.asarray(level)
    values = small[np.isfinite(small)] if small.dtype.kind == "f" else small.ravel()
    if values.size == 0:
        return 0.0, 1.0
    a, b = np.percentile(values, [lo, hi])
    return (float(a), float(b)) if b > a else (float(a), float(a) + 1.0)


def _image_layer(path: Path, name: str, **kwargs: Any) -> LayerData:
    levels, scale, translate = open_multiscale(path)
    data = levels if len(levels) > 1 else levels[0]
    return (data, {"name": name, "multiscale": len(levels) > 1, "scale": scale,
                   "units": ("micrometer", "micrometer"), "axis_labels": ("y", "x"),
                   "translate": translate, "contrast_limits": _limits(levels),
                   "metadata": {"path": str(path)}, **kwargs}, "image")


def defect_points(folder: Path, extent_um: float | None = None) -> LayerData | None:
    """The defects of a scan folder as a points layer (None without ``defects.json``).

    Parameters
    ----------
    folder : Path
        Scan folder.
    extent_um : float, optional
        Size of the imaged area; markers are at least 0.6 % of it, so that a 20 µm particle
        is still visible on a whole-wafer view.
    """
    if not (folder / DEFECTS_JSON).is_file():
        return None
    _, defects = read_defects(folder)
    if not defects:
        return None  # a clean scan (napari cannot colour an empty points layer by arrays)
    coords = np.array([(d.y_um, d.x_um) for d in defects], dtype=float).reshape(-1, 2)
    floor = 0.006 * extent_um if extent_um else 0.0
    sizes = np.array([max(1.3 * d.size_um, floor, 1.0) for d in defects], dtype=float)

    def die(d: Any) -> str:
        return "" if d.die_col is None else f"{d.die_col},{d.die_row}"

    features = {
        "id": np.array([d.id for d in defects], dtype=int),
        "class": np.array([d.defect_class for d in defects], dtype=object),
        "score": np.array([d.score for d in defects], dtype=float),
        "size_um": np.array([round(d.size_um, 1) for d in defects], dtype=float),
        "area_um2": np.array([round(d.area_um2, 1) for d in defects], dtype=float),
        "die": np.array([die(d) for d in defects], dtype=object),
        "region": np.array([d.region or "" for d in defects], dtype=object),
        "review": np.array([bool(d.review) for d in defects], dtype=bool),
    }
    colours = np.array([class_rgba(d.defect_class) for d in defects], dtype=float).reshape(-1, 4)
    kwargs = {
        "name": "defects",
        "features": features,
        "units": ("micrometer", "micrometer"),
        "size": sizes,
        "symbol": "ring",
        "face_color": colours,
        "border_color": colours,
        "border_width": 0.0,
        "canvas_size_limits": (12, 400),
        "opacity": 1.0,
        "metadata": {"class_colors": dict(CLASS_COLORS), "path": str(folder / DEFECTS_JSON)},
    }
    return coords, kwargs, "points"


def repeater_points(folder: Path, extent_um: float | None = None) -> LayerData | None:
    """Repeater defects of a wafer scan (``repeaters.json``) as small brown crosses.

    None when the repeater analysis found none, or its file belongs to an older inspection.
    """
    if not (folder / DEFECTS_JSON).is_file():
        return None
    header, _ = read_defects(folder)
    repeaters = read_repeaters(folder, header.get("created"))
    if not repeaters:
        return None
    coords = np.array([(d.y_um, d.x_um) for d in repeaters], dtype=float)
    floor = 0.004 * extent_um if extent_um else 0.0
    return coords, {
        "name": "repeaters",
        "features": {"id": np.array([d.id for d in repeaters], dtype=int),
                     "class": np.array([d.defect_class for d in repeaters], dtype=object),
                     "score": np.array([d.score for d in repeaters], dtype=float)},
        "units": ("micrometer", "micrometer"),
        "size": np.array([max(1.3 * d.size_um, floor, 1.0) for d in repeaters], dtype=float),
        "symbol": "cross",
        "face_color": REPEATER_COLOR,
        "border_width": 0.0,
        "canvas_size_limits": (8, 200),
        "metadata": {"path": str(folder / REPEATERS_JSON)},
    }, "points"


def die_grid_shapes(folder: Path) -> LayerData | None:
    """Tested dies of a wafer scan as their outlines (None when there are none): the grid
    the alignment found, as the defect list, the KLARF and the wafer map place dies (the
    recipe's grid drew a wafer placed 150 um off and turned 0.4 deg 270 um off)."""
    if not (folder / DEFECTS_JSON).is_file():
        return None

    from scanner.reports.locate import ScanContext

    header, _ = read_defects(folder)
    tested = (header.get("dies") or {}).get("tested") or []
    if not tested:
        return None
    ctx = ScanContext.load(_context_folder(folder))  # scan.json read once, as the reports do
    grid = ctx.die_grid() if ctx.kind == "wafer" else None
    if grid is None:
        return None
    rects, edges = [], []
    for d in tested:
        corners = np.asarray(grid.cell_polygon(d["col"], d["row"]).exterior.coords)[:4]
        rects.append(corners[:, ::-1].astype(float))  # (y, x), as napari's world
        edges.append((1.0, 0.25, 0.25, 1.0) if not d["pass"] else (0.6, 0.8, 1.0, 0.8))
    return rects, {"name": "die grid", "shape_type": "polygon",
                   "units": ("micrometer", "micrometer"), "edge_color": np.array(edges),
                   "face_color": "transparent", "edge_width": 0.01 * min(grid.pitch_um),
                   "visible": False, "opacity": 0.8,
                   "features": {"die": [f"{d['col']},{d['row']}" for d in tested],
                                "defects": [d["defects"] for d in tested],
                                "pass": [d["pass"] for d in tested]}}, "shapes"


def read_scan(path: str | list[str]) -> list[LayerData]:
    """Layers of a scan folder (see the module docstring).

    Raises
    ------
    UserError
        A store that is damaged, naming its file and the command that writes it again (a
        chunk that does not decode raised zarr's codec error, which names no file: napari
        shows the exception's text).
    """
    folder = _scan_folder(path)
    if folder is None:
        raise ValueError(f"{path}: not a waferscope scan folder (no {SCAN_JSON} or {MOSAIC})")
    try:
        return _layers(folder)
    except Exception as exc:
        if not undecodable(exc):
            raise
        from scanner.integrity import damaged_data_message

        source = inspected_mosaic(folder)  # (in another scan's folder: `inspect --out DIR`)
        where = [folder, *([source.parent] if source and source.parent != folder else [])]
        raise UserError(damaged_data_message(exc, ",".join(map(str, where)))) from exc


def _layers(folder: Path) -> list[LayerData]:
    """:func:`read_scan`'s layers of a scan folder."""
    layers: list[LayerData] = []
    extent = None
    source = inspected_mosaic(folder)
    if source is not None:
        mosaic = _image_layer(source, "mosaic", colormap="gray", blending="opaque")
        layers.append(mosaic)
        shape = np.asarray((mosaic[0][0] if mosaic[1]["multiscale"] else mosaic[0]).shape[-2:])
        extent = float(np.max(shape * np.asarray(mosaic[1]["scale"])))
    for name, filename in MAP_NAMES.items():
        if (folder / filename).is_dir():
            layers.append(_image_layer(folder / filename, name, colormap=MAP_COLORMAPS[name],
                                       visible=False, opacity=0.5, blending="additive"))
    grid = die_grid_shapes(folder)
    if grid is not None:
        layers.append(grid)
    repeaters = repeater_points(folder, extent)
    if repeaters is not None:
        layers.append(repeaters)
    points = defect_points(folder, extent)
    if points is not None:
        layers.append(points)
    return layers
