"""Multiscale OME-NGFF (v0.5, zarr v3) images: written level by level, read back by stage
coordinates.

The mosaic (:mod:`scanner.stitching.mosaic`) and the inspection's maps share it: create the empty
levels in a ``*.tmp.zarr`` sibling (:func:`create_multiscale`), fill level 0, build the pyramid
(:func:`build_pyramid`, each level the 2 x 2 mean of the one below) and write the metadata
and rename it over the destination (:func:`finish_multiscale`), so that an earlier image
survives until the new one is complete. Level ``k`` has pixels of size ``p * 2**k``; its pixel
``(0, 0)`` is the 2**k x 2**k block of level-0 pixels at the origin, so its centre lies at
``origin + (2**k - 1) / 2 * p`` (the stored ``translation``, in ``[y, x]`` order).
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
import yaozarrs
import zarr
from yaozarrs import v05

from scanner.defectlist import MAP_NAMES
from scanner.errors import UserError
from scanner.scanfolder import SCAN_JSON
from simulators.errors import first_line

#: Worker threads used for fusion and pyramid building (numpy and the codecs release the GIL).
_WORKERS = 2


def _chunk_order(n_rows: int, n_cols: int, band: int) -> Iterator[tuple[int, int]]:
    """Chunk indices in bands of ``band`` chunk rows, column by column inside each band.

    Consecutive chunks then share most of their tiles, which keeps the LRU cache small.
    """
    for b0 in range(0, n_rows, band):
        for j in range(n_cols):
            for i in range(b0, min(b0 + band, n_rows)):
                yield i, j


def _run(
    fn: Callable[[tuple[int, int]], None],
    items: Iterator[tuple[int, int]],
    workers: int,
    on_done: Callable[[], None],
) -> None:
    """Apply ``fn`` to every item, on ``workers`` threads, keeping few items in flight."""
    if workers <= 1:
        for item in items:
            fn(item)
            on_done()
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        in_flight = []
        for item in items:
            in_flight.append(pool.submit(fn, item))
            if len(in_flight) >= 2 * workers:
                in_flight.pop(0).result()
                on_done()
        for fut in in_flight:
            fut.result()
            on_done()


def ome_attributes(name: str, n_levels: int, p: float, origin: tuple[float, float]
                   ) -> dict[str, Any]:
    """The OME-NGFF 0.5 ``ome`` attributes of a mosaic with ``n_levels`` levels, level 0 of
    pixel size ``p`` with pixel ``(0, 0)`` centred at stage ``origin`` (x, y), built with
    yaozarrs' models of the specification (so what is written is valid by construction).

    Level ``k`` has pixels ``2**k`` times larger; its pixel ``(0, 0)`` is the mean of level
    0's first ``2**k`` pixels, so its centre lies ``(2**k - 1) / 2`` level-0 pixels further.
    """
    datasets = []
    for k in range(n_levels):
        scale = p * 2**k
        shift = (2**k - 1) / 2.0 * p
        datasets.append(v05.Dataset(path=str(k), coordinateTransformations=[
            v05.ScaleTransformation(scale=[scale, scale]),
            v05.TranslationTransformation(translation=[origin[1] + shift, origin[0] + shift])]))
    axes = [v05.SpaceAxis(name=n, unit="micrometer") for n in ("y", "x")]
    image = v05.Image(multiscales=[v05.Multiscale(name=name, axes=axes, datasets=datasets)])
    return image.model_dump(mode="json", exclude_none=True)


def _level_shapes(shape: tuple[int, int], min_level_size: int) -> list[tuple[int, int]]:
    """Shapes of all pyramid levels: halve (rounding up) while the last is > min_level_size."""
    shapes = [shape]
    while max(shapes[-1]) > min_level_size and max(shapes[-1]) > 1:
        r, c = shapes[-1]
        shapes.append(((r + 1) // 2, (c + 1) // 2))
    return shapes


def _downsample2(block: np.ndarray) -> np.ndarray:
    """2 x 2 mean of ``block`` (odd edges padded by repeating the last row / column), rounded."""
    r, c = block.shape
    if r % 2 or c % 2:
        block = np.pad(block, ((0, r % 2), (0, c % 2)), mode="edge")
    dtype = block.dtype
    if np.issubdtype(dtype, np.integer):
        acc_t = np.uint32 if dtype in (np.uint8, np.uint16) else np.int64
        acc = block[0::2, 0::2].astype(acc_t)
        acc += block[1::2, 0::2]
        acc += block[0::2, 1::2]
        acc += block[1::2, 1::2]
        acc += 2  # round half up; the mean of in-range values stays in range
        acc //= 4
        return acc.astype(dtype)
    acc = block[0::2, 0::2].astype(np.float64)
    acc += block[1::2, 0::2]
    acc += block[0::2, 1::2]
    acc += block[1::2, 1::2]
    acc *= 0.25
    return acc.astype(dtype)


def _replace_dir(tmp: Path, dest: Path) -> None:
    """Move ``tmp`` to ``dest``, replacing whatever ``dest`` was, losing it only at the end."""
    old = None
    if dest.exists() or dest.is_symlink():
        old = dest.with_name(dest.name + ".old")
        _remove(old)
        dest.rename(old)
    tmp.rename(dest)
    if old is not None:
        _remove(old)


def _remove(path: Path) -> None:
    """Delete a file or folder tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _tmp_path(out_path: Path) -> Path:
    """Sibling of ``out_path`` where the mosaic is written before being renamed over it."""
    stem = out_path.name[: -len(out_path.suffix)] if out_path.suffix else out_path.name
    return out_path.with_name(stem + ".tmp.zarr")

def downsample_block(src: Any, dst: Any, chunk: int, chunks: list[tuple[int, int]]) -> int:
    """Fill ``chunks`` of a pyramid level from the level below (one dask task)."""
    for ij in chunks:
        _down_chunk(ij, src, dst, chunk)
    return len(chunks)


def damaged_image(path: Path) -> str:
    """What a damaged multiscale image is and what writes it again: an inspection map
    (``anomaly.ome.zarr``...) is written by ``inspect``, the mosaic by ``stitch`` (re-stitching
    left a damaged map as it was)."""
    stem = Path(path).name.split(".")[0]
    if stem in MAP_NAMES and Path(path).name == MAP_NAMES[stem]:
        return f"the {stem} map is damaged (re-run `waferscope inspect`)"
    return "the mosaic is damaged (re-run `waferscope stitch`)"


def open_mosaic(path: Path) -> tuple[list[zarr.Array], list[dict]]:
    """Open a mosaic written by :func:`scanner.stitching.mosaic.fuse_mosaic`.

    Parameters
    ----------
    path : Path
        The mosaic's zarr group.

    Returns
    -------
    levels : list[zarr.Array]
        The level arrays, finest (level 0) first, opened read-only.
    transforms : list[dict]
        Each level's ``coordinateTransformations`` list as stored (a ``scale`` then a
        ``translation`` entry, in ``[y, x]`` order).

    Raises
    ------
    ValueError
        If the group has no OME-NGFF multiscales metadata.
    """
    try:
        root = zarr.open_group(str(path), mode="r")
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - unreadable group metadata: damage
        raise UserError(f"{path}: cannot be opened ({first_line(exc)}); "
                        f"{damaged_image(path)}") from None
    ome = root.attrs.get("ome")
    if not isinstance(ome, dict) or not ome.get("multiscales"):
        if root.attrs.get("multiscales"):  # written by a tool of OME-NGFF 0.4's time
            raise UserError(f"{path}: an OME-NGFF 0.4 (Zarr v2) image; waferscope reads OME-NGFF "
                            "0.5 (Zarr v3): convert it (e.g. ngff-zarr or bioformats2raw's "
                            "current release)")
        raise ValueError(f"{path} is not an OME-NGFF multiscale image (no 'ome' attributes)")
    try:
        image = yaozarrs.validate_ome_object(ome, v05.Image)
    except pydantic.ValidationError as exc:
        raise ValueError(f"{path}: invalid OME-NGFF 0.5 image metadata "
                         f"({exc.errors()[0]['msg']})") from None
    multiscale = image.model_dump(mode="json", exclude_none=True)["multiscales"][0]
    to_um = _micrometres_per_unit(path, multiscale["axes"])
    datasets = multiscale["datasets"]
    levels = []
    for d in datasets:
        try:
            levels.append(root[d["path"]])
        except Exception as exc:  # noqa: BLE001 - a level gone or its metadata unreadable
            why = "missing" if isinstance(exc, KeyError) else f"unreadable ({first_line(exc)})"
            raise UserError(f"{path}: level {d['path']} is {why}; "
                            f"{damaged_image(path)}") from None
        scale = next((t.get("scale") for t in d["coordinateTransformations"]
                      if t.get("type") == "scale"), None)
        # OME-NGFF's schema takes any number; a pixel of size 0 (or NaN) places nothing
        if scale is None or not all(math.isfinite(s) and s > 0 for s in scale):
            raise UserError(f"{path}: level {d['path']} has scale {scale}; pixel sizes must be "
                            f"positive: its metadata is damaged; {damaged_image(path)}")
        d["coordinateTransformations"] = _in_micrometres(path, d, scale, to_um)
    for k in range(1, len(levels)):
        # each level halves the one before (rounded either way by other writers): a level
        # whose metadata says otherwise was edited or damaged, and would be read as a corner
        prev, shape = levels[k - 1].shape[-2:], levels[k].shape[-2:]
        if any(n not in (m // 2, -(-m // 2)) for m, n in zip(prev, shape, strict=True)):
            raise UserError(f"{path}: level {k} is {' x '.join(map(str, shape))} px, level "
                            f"{k - 1} {' x '.join(map(str, prev))}: the levels disagree, its "
                            f"metadata is damaged; {damaged_image(path)}")
    return levels, [d["coordinateTransformations"] for d in datasets]


#: micrometres per length unit of OME-NGFF's axes (UDUNITS-2 names); an axis without a unit is
#: taken as micrometres, as waferscope writes them
_UNIT_UM = {"angstrom": 1e-4, "nanometer": 1e-3, "micrometer": 1.0, "millimeter": 1e3,
            "centimeter": 1e4, "meter": 1e6}


def _micrometres_per_unit(path: Path, axes: list[dict]) -> float:
    """The axes of a mosaic checked (``y`` then ``x``, of one length unit), and how many µm
    its unit is.

    Raises
    ------
    UserError
        Other axes (channels, a z-stack, time), another order, or a unit that is no length.
    """
    names = [a.get("name") for a in axes]
    if names != ["y", "x"]:
        raise UserError(f"{path}: the mosaic's axes are {names}; waferscope inspects 2-D grey "
                        "mosaics with axes [y, x] (one plane or channel, rows first)")
    units = {a.get("unit") or "micrometer" for a in axes}
    unit = units.pop()
    if units or unit not in _UNIT_UM:
        raise UserError(f"{path}: the mosaic's axes are in {[a.get('unit') for a in axes]}; "
                        f"waferscope reads one length unit for both ({', '.join(_UNIT_UM)})")
    return _UNIT_UM[unit]


def _in_micrometres(path: Path, dataset: dict, scale: list[float], to_um: float) -> list[dict]:
    """A level's ``scale`` and ``translation`` in µm (a translation left out is 0, as
    OME-NGFF allows: a store written without one crashed inspection).

    Raises
    ------
    UserError
        Pixels that are not square (placed as square, a defect's y was half of where it is).
    """
    scale = [float(v) * to_um for v in scale]
    trans = next((t.get("translation") for t in dataset["coordinateTransformations"]
                  if t.get("type") == "translation"), None) or [0.0, 0.0]
    if not math.isclose(scale[0], scale[1], rel_tol=1e-6):
        raise UserError(f"{path}: level {dataset['path']} has pixels of {scale[0]:g} x "
                        f"{scale[1]:g} µm (y x); waferscope reads square pixels: resample it")
    return [{"type": "scale", "scale": scale},
            {"type": "translation", "translation": [float(v) * to_um for v in trans]}]


def level_transform(transforms: list[dict], level: int = 0
                    ) -> tuple[list[float], list[float]]:
    """A level's ``scale`` and ``translation`` (``[y, x]``), from :func:`open_mosaic`'s list."""
    entries = transforms[level]
    scale = next(t["scale"] for t in entries if t["type"] == "scale")
    trans = next(t["translation"] for t in entries if t["type"] == "translation")
    return scale, trans


def mosaic_region(
    path: Path, x_um: float, y_um: float, shape: tuple[int, int], level: int = 0
) -> np.ndarray:
    """Read a window of a mosaic by stage coordinates.

    Parameters
    ----------
    path : Path
        The mosaic's zarr group.
    x_um, y_um : float
        Stage position; the window's pixel ``(0, 0)`` is the level pixel whose centre is nearest.
    shape : tuple[int, int]
        Window shape ``(rows, cols)`` in pixels of ``level``.
    level : int, optional
        Pyramid level (default 0, full resolution).

    Returns
    -------
    np.ndarray
        The window, in the mosaic's dtype; pixels outside the mosaic are 0.
    """
    levels, transforms = open_mosaic(path)
    if not 0 <= level < len(levels):
        raise ValueError(f"level must be in 0..{len(levels) - 1}, got {level}")
    arr = levels[level]
    scale, trans = level_transform(transforms, level)
    row = round((y_um - trans[0]) / scale[0])
    col = round((x_um - trans[1]) / scale[1])
    h, w = (int(s) for s in shape)
    out = np.zeros((h, w), dtype=arr.dtype)
    a0, a1 = max(row, 0), min(row + h, arr.shape[0])
    b0, b1 = max(col, 0), min(col + w, arr.shape[1])
    if a0 < a1 and b0 < b1:
        out[a0 - row : a1 - row, b0 - col : b1 - col] = arr[a0:a1, b0:b1]
    return out


# ----------------------------------------------------------------------- shared OME-NGFF writing


def create_multiscale(
    out_path: Path,
    shape: tuple[int, int],
    *,
    chunk: int,
    dtype: Any,
    fill_value: float = 0,
    min_level_size: int = 256,
) -> tuple[Path, list[zarr.Array]]:
    """Create the empty levels of a multiscale image in the ``*.tmp.zarr`` sibling of ``out_path``.

    Fill level 0, then call :func:`build_pyramid` and :func:`finish_multiscale`, which renames
    the temporary group over ``out_path``: an earlier image there survives until the new one is
    complete.

    Returns
    -------
    tmp : Path
        The temporary group being written.
    arrays : list of zarr.Array
        One array per level, level 0 first.
    """
    out_path = Path(out_path)
    shapes = _level_shapes((int(shape[0]), int(shape[1])), min_level_size)
    tmp = _tmp_path(out_path)
    _remove(tmp)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return tmp, _create_levels(tmp, shapes, chunk, dtype, fill_value)
    except BaseException:  # stopped (or refused) while creating: nothing half-made is left
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _create_levels(tmp: Path, shapes: list[tuple[int, int]], chunk: int, dtype: Any,
                   fill_value: Any) -> list[zarr.Array]:
    """The empty level arrays of :func:`create_multiscale` in the group ``tmp``."""
    root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
    return [
        root.create_array(
            str(k),
            shape=s,
            chunks=(chunk, chunk),
            dtype=dtype,
            fill_value=fill_value,
            # the frame checksum: a flipped bit is refused when read, never shown as data
            compressors=zarr.codecs.ZstdCodec(level=3, checksum=True),
            dimension_names=["y", "x"],
            # every chunk is stored, background included, so that a missing chunk is damage
            # that can be found (zarr would read it back as fill value, i.e. black)
            config={"write_empty_chunks": True},
        )
        for k, s in enumerate(shapes)
    ]


#: the root attribute waferscope's multiscale images carry: every chunk was stored
#: (``write_empty_chunks``), so a missing one is damage
EVERY_CHUNK_STORED = {"every_chunk_stored": True}


def every_chunk_stored(group: Path) -> bool:
    """Whether a multiscale image promises every chunk stored: waferscope wrote it (its root
    attribute ``waferscope``, or it lies in a scan folder, as every earlier version's
    mosaic and maps do). Other writers need not: the Zarr spec reads a chunk never written
    as the fill value, and zarr-python 3 leaves out the chunks that hold only it by default
    (``write_empty_chunks`` false), so a foreign mosaic with a black surround was refused as
    damaged."""
    group = Path(group)
    if (group.parent / SCAN_JSON).is_file():
        return True
    try:
        attrs = json.loads((group / "zarr.json").read_text(encoding="utf-8")).get(
            "attributes") or {}
    except (OSError, ValueError, AttributeError):
        return True  # unreadable: the strict reading (open_mosaic says what is wrong)
    return attrs.get("waferscope") == EVERY_CHUNK_STORED


def check_complete(array: zarr.Array, what: str) -> None:
    """Refuse an image with a missing chunk: zarr would read it as fill value (black). An
    image that does not promise every chunk stored (:func:`every_chunk_stored`: not
    waferscope's) reads a missing chunk as its fill value, as the Zarr spec says.

    Raises
    ------
    UserError
        Naming the first missing chunk (its pixel rows and columns).
    """
    if array.nchunks_initialized == array.nchunks:
        return
    if not every_chunk_stored(Path(str(array.store_path.store.root))):
        return
    root = Path(str(array.store_path.store.root)) / array.store_path.path
    grid = [range(-(-n // c)) for n, c in zip(array.shape, array.chunks, strict=True)]
    for ij in itertools.product(*grid):
        if not (root / array.metadata.encode_chunk_key(ij)).is_file():
            r, c = (i * n for i, n in zip(ij, array.chunks, strict=True))
            raise UserError(f"{what}: chunk {ij} (rows {r}.., cols {c}..) is missing; "
                            f"{damaged_image(Path(str(array.store_path.store.root)))}")


def build_pyramid(
    arrays: list[zarr.Array], chunk: int, tick: Callable[[], None] | None = None
) -> None:
    """Fill levels 1.. of a multiscale image chunk-wise, each the 2 x 2 mean of the level below.

    Chunks of the level below that hold only zeros (unscanned) are not averaged: zeros are
    stored.
    """
    for k in range(1, len(arrays)):
        src, dst_arr = arrays[k - 1], arrays[k]
        rows, cols = dst_arr.shape

        def down_chunk(ij: tuple[int, int], src: zarr.Array = src,
                       dst: zarr.Array = dst_arr) -> None:
            _down_chunk(ij, src, dst, chunk)

        n_r, n_c = math.ceil(rows / chunk), math.ceil(cols / chunk)
        _run(down_chunk, _chunk_order(n_r, n_c, 1), _WORKERS, tick or (lambda: None))


def _down_chunk(ij: tuple[int, int], src: Any, dst: Any, chunk: int) -> None:
    """Chunk ``ij`` of a pyramid level: the 2 x 2 mean of the level below (unscanned: skipped)."""
    rows, cols = dst.shape
    r0, c0 = ij[0] * chunk, ij[1] * chunk
    r1, c1 = min(r0 + chunk, rows), min(c0 + chunk, cols)
    block = src[2 * r0 : min(2 * r1, src.shape[0]), 2 * c0 : min(2 * c1, src.shape[1])]
    if not block.any():  # unscanned: zeros, stored (a missing chunk is damage)
        dst[r0:r1, c0:c1] = np.zeros((r1 - r0, c1 - c0), dtype=dst.dtype)
        return
    dst[r0:r1, c0:c1] = _downsample2(np.asarray(block))


def finish_multiscale(
    tmp: Path, out_path: Path, n_levels: int, pixel_size_um: float,
    origin_um: tuple[float, float], name: str,
) -> None:
    """Write the OME-NGFF 0.5 metadata of a multiscale image and rename it over ``out_path``.

    ``origin_um`` is the stage ``(x_um, y_um)`` of the centre of level-0 pixel ``(0, 0)`` and
    ``pixel_size_um`` the level-0 pixel size.
    """
    root = zarr.open_group(str(tmp), mode="r+")
    root.attrs["ome"] = ome_attributes(name, n_levels, float(pixel_size_um), origin_um)
    root.attrs["waferscope"] = EVERY_CHUNK_STORED
    _replace_dir(Path(tmp), Path(out_path))
