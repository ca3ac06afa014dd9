"""The tiles store of a scan folder: raw tiles in Zarr plus a journal row per tile.

Each tile is written to ``tiles.zarr`` as it arrives and only then journaled in ``tiles.csv``
(flushed and synced at once), so after a crash every row of the journal points at a complete
tile. The journal is the truth: a tile in the store without its row is not acquired, and a row
whose chunk is missing is damage, never read as a black tile.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from scanner.errors import UserError, undecodable
from scanner.scanfolder import TILES_CSV
from simulators.errors import first_line

TILES_ZARR = "tiles.zarr"


@dataclass
class TileRecord:
    """One row of ``tiles.csv``.

    ``x_um``/``y_um``/``z_um`` are read back from the core after the move (the tile centre);
    the ``*_true_um`` columns are the simulator's ground truth (empty on real hardware) and
    ``x_reg_um``/``y_reg_um`` are filled by registration.
    """

    index: int
    row: int
    col: int
    x_um: float
    y_um: float
    z_um: float
    time_s: float
    x_planned_um: float = float("nan")
    y_planned_um: float = float("nan")
    x_true_um: float = float("nan")
    y_true_um: float = float("nan")
    z_true_um: float = float("nan")
    x_reg_um: float = float("nan")
    y_reg_um: float = float("nan")
    focus_source: str = "fixed"
    focus_confidence: float = float("nan")
    af_images: int = 0
    status: str = "ok"


COLUMNS = [f.name for f in fields(TileRecord)]
#: the columns without a default: a journal whose header lacks one is damaged
REQUIRED_COLUMNS = [f.name for f in fields(TileRecord) if f.default is MISSING]


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return "" if np.isnan(value) else f"{value:.4f}"
    return str(value)


class StorageError(UserError):
    """A tile could not be written (disk full, permissions): the scan stops at once."""


def check_journal_kept(folder: Path) -> None:
    """Refuse a folder whose tile store holds tiles but whose journal is gone.

    Raises
    ------
    UserError
        ``tiles.csv`` is missing while ``tiles.zarr`` holds tiles: a new store would replace
        them (taken again where the chuck may hold another part).
    """
    folder = Path(folder)
    if (folder / TILES_CSV).is_file() or not (folder / TILES_ZARR).is_dir():
        return
    stored = stored_tiles(open_tiles(folder))
    if stored:
        raise UserError(f"{folder}: {TILES_CSV} is missing while {TILES_ZARR} holds "
                        f"{len(stored)} tiles; restore the journal (nothing was changed)")


class TileStore:
    """Writes tiles and their journal into a scan folder.

    Parameters
    ----------
    folder : Path
        Scan folder.
    n_tiles : int
        Number of planned tiles (the array's first axis).
    shape : (int, int)
        Tile shape (rows, cols).
    dtype : numpy dtype
        Camera pixel type.
    resume : bool
        Keep the tiles and journal already in the folder and append to them (``resume``);
        otherwise both are created empty.
    """

    def __init__(self, folder: Path, n_tiles: int, shape: tuple[int, int], dtype: np.dtype,
                 resume: bool = False) -> None:
        self.folder = Path(folder)
        # a scan stopped before its first tile has no store yet: start one
        resume = resume and (self.folder / TILES_ZARR).is_dir()
        if resume and not (self.folder / TILES_CSV).is_file():
            check_journal_kept(self.folder)
            resume = False  # stopped before the journal's header: no tile stored yet
        if resume:
            self.array = zarr.open_array(self.folder / TILES_ZARR, mode="r+")
            if self.array.shape != (n_tiles, *shape) or self.array.dtype != np.dtype(dtype):
                raise UserError(
                    f"{self.folder / TILES_ZARR}: holds {self.array.shape} {self.array.dtype} "
                    f"tiles but the plan needs {(n_tiles, *shape)} {np.dtype(dtype)}"
                )
            kept = read_tiles_csv(self.folder)  # drops a row cut short by a crash
            write_tiles_csv(self.folder, kept)
            mode = "a"
        else:
            self.array = zarr.create_array(
                self.folder / TILES_ZARR,
                shape=(n_tiles, *shape),
                chunks=(1, *shape),
                dtype=dtype,
                fill_value=0,
                dimension_names=("tile", "y", "x"),
                # zarr's default Zstd with its frame checksum: a flipped bit in a raw tile is
                # refused as damage when read, never stitched and inspected as data
                compressors=zarr.codecs.ZstdCodec(level=0, checksum=True),
                overwrite=True,
                # every acquired tile gets its chunk, even an all-zero one, so that a missing
                # chunk always means damage
                config={"write_empty_chunks": True},
            )
            mode = "w"
        self._csv_file = open(self.folder / TILES_CSV, mode, newline="", encoding="utf-8")  # noqa: SIM115
        self._csv = csv.writer(self._csv_file)
        if mode == "w":
            self._csv.writerow(COLUMNS)
            self._csv_file.flush()
        self.written = 0

    def write(self, image: np.ndarray, record: TileRecord) -> None:
        """Store one tile, then journal it.

        Raises
        ------
        StorageError
            If the tile or its row cannot be written; the row is only written after the tile.
        """
        try:
            if record.status == "ok":
                self.array[record.index] = image
            self._csv.writerow([_fmt(v) for v in asdict(record).values()])
            self._csv_file.flush()
            os.fsync(self._csv_file.fileno())
        except OSError as exc:
            raise StorageError(
                f"{self.folder}: cannot write tile {record.index} ({exc.strerror or exc}); the "
                "scan stopped; free space and run `waferscope resume` on the folder"
            ) from None
        self.written += record.status == "ok"

    def close(self) -> None:
        """Close the journal."""
        if not self._csv_file.closed:
            self._csv_file.close()


def read_tiles_csv(folder: Path) -> list[TileRecord]:
    """Read the journal of a scan folder (last row wins for a re-acquired tile).

    A row cut short (the process killed while writing it) is dropped: its tile counts as not
    acquired. Only the last row can be cut short so: a short or long row before others, or a
    header without the journal's columns, is damage (the rows cannot be trusted, and a
    journal read as empty would have ``resume`` take every stored tile again). A byte-order
    mark (a spreadsheet's "CSV UTF-8") is read past.
    """
    path = Path(folder) / TILES_CSV
    if not path.is_file():
        raise UserError(f"{folder}: no {TILES_CSV} (the scan acquired nothing)")
    by_index: dict[int, TileRecord] = {}
    # every row is written whole with its line end: a last line without one was cut short,
    # even where what is left of it still parses column by column (a status cut to "o")
    with open(path, "rb") as raw:
        raw.seek(0, os.SEEK_END)
        size = raw.tell()
        raw.seek(max(0, size - 1))
        unterminated = size > 0 and raw.read(1) not in (b"\n", b"\r")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            names = reader.fieldnames or COLUMNS
            missing = [c for c in REQUIRED_COLUMNS if c not in names]
            if missing:
                raise UserError(f"{path}: its header lacks {', '.join(missing)}; the journal "
                                "is damaged")
            cut = 0  # the line of a row cut short, damage unless it is the last
            for row in reader:
                if cut:
                    raise UserError(f"{path}, line {cut}: not the {len(names)} columns of its "
                                    "header; the journal is damaged")
                if None in row or any(row.get(c) is None for c in names) or \
                        not row.get("status", "ok"):
                    cut = reader.line_num
                    continue  # a partial last line
                try:
                    record = _parse_row(row)
                except ValueError as exc:
                    if unterminated:  # the last line, if no row follows (checked above)
                        cut = reader.line_num
                        continue
                    raise UserError(f"{path}, line {reader.line_num}: {exc}; the journal is "
                                    "damaged") from None
                by_index[record.index] = record
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not a text journal ({exc.reason}); the scan is damaged"
                        ) from None
    return [by_index[i] for i in sorted(by_index)]


def _parse_row(row: dict[str, str]) -> TileRecord:
    """One journal row as written by :class:`TileStore`.

    An empty optional column is its default (NaN: not measured, e.g. ``x_reg_um`` before
    registration). The columns without a default (the tile's index and place, its read-back
    position and time) are always written as numbers: an empty or non-finite one ("nan",
    "inf") is damage, refused here rather than met by the stitching as a NaN position.

    Raises
    ------
    ValueError
        Naming the column.
    """
    values: dict[str, object] = {}
    for field in fields(TileRecord):
        raw = row.get(field.name, "")
        required = field.default is MISSING
        if raw in ("", None):
            if required:
                raise ValueError(f"{field.name}: empty")
            values[field.name] = field.default
        elif field.type in ("int", int):
            try:
                values[field.name] = int(raw)
            except ValueError:
                raise ValueError(f"{field.name}: {raw!r} is not a whole number") from None
        elif field.type in ("float", float):
            try:
                value = float(raw)
            except ValueError:
                raise ValueError(f"{field.name}: {raw!r} is not a number") from None
            if required and not math.isfinite(value):
                raise ValueError(f"{field.name}: {raw!r} is not a finite number")
            values[field.name] = value
        else:
            values[field.name] = raw
    status = str(values["status"])
    if status != "ok" and not status.startswith("lost"):  # the only two a scan writes
        raise ValueError(f"status: {status!r} is neither 'ok' nor 'lost: REASON'")
    return TileRecord(**values)  # type: ignore[arg-type]


def as_journaled(record: TileRecord) -> TileRecord:
    """``record`` as :func:`read_tiles_csv` reads it back once journaled (floats rounded)."""
    return _parse_row({k: _fmt(v) for k, v in asdict(record).items()})


def write_tiles_csv(folder: Path, records: Iterable[TileRecord]) -> None:
    """Rewrite the journal (e.g. after registration filled ``x_reg_um``), atomically."""
    path = Path(folder) / TILES_CSV
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for record in records:
            writer.writerow([_fmt(v) for v in asdict(record).values()])
    tmp.replace(path)


def open_tiles(folder: Path) -> zarr.Array:
    """Open the raw tiles array of a scan folder (read-only).

    Raises
    ------
    UserError
        The store is missing, unreadable, or not an array of 2-D tiles one chunk each.
    """
    path = Path(folder) / TILES_ZARR
    try:
        array = zarr.open_array(path, mode="r")
    except Exception as exc:  # zarr raises FileNotFoundError, JSON and metadata errors
        raise UserError(f"{path}: the raw tiles cannot be opened ({first_line(exc)}); the "
                        "scan is damaged") from None
    if array.ndim != 3 or tuple(array.chunks) != (1, *array.shape[1:]):
        raise UserError(f"{path}: not a store of whole tiles (shape {array.shape}, chunks "
                        f"{array.chunks}); the scan is damaged")
    return array


def check_recorded_camera(folder: Path, array: zarr.Array) -> None:
    """Refuse a raw tile store whose metadata says other tiles than the camera took
    (``scan.json`` ``microscope.camera_shape``, ``camera_dtype``; a scan that records
    neither, written before they were, is not checked).

    Its ``zarr.json`` was edited: another shape reads every tile as damaged (and ``resume``,
    the advice then, refuses the store's shape); another type (``int16`` for ``uint16``) reads
    every tile's bytes as that type, bright pixels wrapped to negative ones.

    Raises
    ------
    UserError
        Naming the store's ``zarr.json`` and the field of ``scan.json``.
    """
    from scanner.scanfolder import scan_json_if_any

    camera = ((scan_json_if_any(folder) or {}).get("microscope") or {})
    meta = Path(folder) / TILES_ZARR / "zarr.json"
    shape = camera.get("camera_shape")
    if shape and tuple(array.shape[1:]) != tuple(shape):
        raise UserError(f"{meta}: holds tiles of {array.shape[1]} x {array.shape[2]} px but "
                        f"the camera took {shape[0]} x {shape[1]} px (scan.json microscope."
                        "camera_shape); the store's zarr.json is damaged")
    dtype = camera.get("camera_dtype")
    if dtype is not None and str(array.dtype) != dtype:
        raise UserError(f"{meta}: holds {array.dtype} tiles but the camera took {dtype} "
                        "(scan.json microscope.camera_dtype); the store's zarr.json is "
                        "damaged")


class ScanTiles:
    """The raw tiles of a scan folder as the stitch stage reads them: ``tiles[i]``, ``shape``,
    ``dtype`` (and it pickles, for dask workers).

    A tile whose chunk does not decode is refused naming the tile and how to take it again;
    zarr's own error names only the codec.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.array = open_tiles(self.folder)
        check_recorded_camera(self.folder, self.array)
        self.shape = tuple(self.array.shape)
        self.dtype = self.array.dtype
        self.ndim = self.array.ndim

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        try:
            return self.array[key]
        except Exception as exc:
            if not undecodable(exc):
                raise
            index = key[0] if isinstance(key, tuple) else key
            raise UserError(f"{self.folder / TILES_ZARR}: tile {index} is damaged (its chunk "
                            f"cannot be decoded: {first_line(exc)}); run `waferscope resume "
                            f"{self.folder}` to take it again") from None


def stored_tiles(array: zarr.Array) -> set[int]:
    """Indices of the tiles whose chunk is in the store (a tile is exactly one chunk)."""
    root = Path(str(array.store_path.store.root)) / array.store_path.path
    present = set()
    for index in range(array.shape[0]):
        key = array.metadata.encode_chunk_key((index, 0, 0))
        if (root / key).is_file():
            present.add(index)
    return present


def decodable_tiles(array: zarr.Array, indices: Iterable[int]) -> set[int]:
    """The tiles among ``indices`` whose chunk decodes: a chunk cut short by a crash while it
    was written, or damaged since, is there but holds no tile (the resume takes it again)."""
    good = set()
    for index in sorted(indices):
        try:
            array[index]
        except Exception as exc:
            if not undecodable(exc):
                raise
            continue
        good.add(index)
    return good


def check_journal(folder: Path, n_planned: int, grid: tuple[Any, Any] | None = None
                  ) -> list[TileRecord]:
    """The journal's rows, checked against the plan and the store.

    ``grid``: the plan's rows and columns (``scan.json`` ``plan.n_rows``, ``n_cols``; either
    may be None when not recorded).

    Raises
    ------
    UserError
        If a row names a tile outside the plan (its index, or its row or column), or a
        journaled tile's chunk is missing (damage, which must never be read as a black
        tile).
    """
    records = read_tiles_csv(folder)
    present = stored_tiles(open_tiles(folder))
    n_rows, n_cols = grid or (None, None)
    for r in records:
        if not 0 <= r.index < n_planned:
            raise UserError(f"{folder / TILES_CSV}: tile {r.index} is not in the plan "
                            f"of {n_planned} tiles")
        # a row or column beyond the plan's (an edit): the tile was stitched without its
        # neighbours, and the mosaic changed shape (exit 0)
        for name, value, n in (("row", r.row, n_rows), ("col", r.col, n_cols)):
            if value < 0 or (isinstance(n, int) and value >= n):
                raise UserError(f"{folder / TILES_CSV}: tile {r.index}: {name} {value} is not "
                                f"in the plan" + (f" of {n} {name}s" if isinstance(n, int)
                                                  else ""))
        if r.status == "ok" and r.index not in present:
            raise UserError(f"{folder / TILES_ZARR}: tile {r.index} (row {r.row}, col {r.col}) "
                            "is journaled but its data is missing; the scan is damaged: "
                            f"`waferscope resume {folder}` takes it again")
    check_positions(folder, records)
    return records


def check_positions(folder: Path, records: list[TileRecord]) -> None:
    """Refuse a kept tile whose read-back or registered position lies a whole tile step or
    more from its plan: acquisition loses such a tile (5 % of a field is its limit) and
    registration moves one by the stage's error, so the row was changed since (an edit turned
    1064.24 into 10001064.24, and a mosaic 5 million pixels wide was stitched; a registered x
    of 1e9 took every defect's tile away in the report)."""
    ok = [r for r in records if r.status == "ok" and math.isfinite(r.x_planned_um)
          and math.isfinite(r.y_planned_um)]
    if len(ok) < 2:
        return
    from scipy.spatial import cKDTree

    planned = np.array([(r.x_planned_um, r.y_planned_um) for r in ok])
    gaps, _ = cKDTree(planned).query(planned, k=2)  # each tile's nearest planned neighbour
    step = float(np.median(gaps[:, 1]))
    if not math.isfinite(step) or step <= 0:
        return
    for r in ok:
        for what, x, y in (("read back", r.x_um, r.y_um), ("registered", r.x_reg_um, r.y_reg_um)):
            if what == "registered" and not (math.isfinite(x) and math.isfinite(y)):
                continue  # not registered (yet)
            off = math.hypot(x - r.x_planned_um, y - r.y_planned_um)
            if off >= step:
                raise UserError(f"{folder / TILES_CSV}: tile {r.index} {what} at ({x:.1f}, "
                                f"{y:.1f}) um, {off:.0f} um from its plan (a tile step is "
                                f"{step:.0f} um); the journal is damaged")
