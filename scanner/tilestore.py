"""The tiles store of a scan folder: raw tiles in Zarr plus a journal row per tile.

Each tile is written to ``tiles.zarr`` as it arrives and only then journaled in ``tiles.csv``
(flushed at once), so after a crash every row of the journal points at a complete tile.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import zarr

TILES_ZARR = "tiles.zarr"
TILES_CSV = "tiles.csv"


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


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return "" if np.isnan(value) else f"{value:.4f}"
    return str(value)


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
    """

    def __init__(self, folder: Path, n_tiles: int, shape: tuple[int, int], dtype: np.dtype) -> None:
        self.folder = Path(folder)
        self.array = zarr.create_array(
            self.folder / TILES_ZARR,
            shape=(n_tiles, *shape),
            chunks=(1, *shape),
            dtype=dtype,
            fill_value=0,
            dimension_names=("tile", "y", "x"),
            overwrite=True,
        )
        self._csv_file = open(self.folder / TILES_CSV, "w", newline="", encoding="utf-8")  # noqa: SIM115
        self._csv = csv.writer(self._csv_file)
        self._csv.writerow(COLUMNS)
        self._csv_file.flush()
        self.written = 0

    def write(self, image: np.ndarray, record: TileRecord) -> None:
        """Store one tile, then journal it."""
        if record.status == "ok":
            self.array[record.index] = image
        self._csv.writerow([_fmt(v) for v in asdict(record).values()])
        self._csv_file.flush()
        self.written += record.status == "ok"

    def close(self) -> None:
        """Close the journal."""
        if not self._csv_file.closed:
            self._csv_file.close()


def read_tiles_csv(folder: Path) -> list[TileRecord]:
    """Read the journal of a scan folder (last row wins for a re-acquired tile)."""
    path = Path(folder) / TILES_CSV
    by_index: dict[int, TileRecord] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            values: dict[str, object] = {}
            for field in fields(TileRecord):
                raw = row.get(field.name, "")
                if field.type in ("int", int):
                    values[field.name] = int(raw) if raw not in ("", None) else 0
                elif field.type in ("float", float):
                    values[field.name] = float(raw) if raw not in ("", None) else float("nan")
                else:
                    values[field.name] = raw if raw not in ("", None) else field.default
            record = TileRecord(**values)  # type: ignore[arg-type]
            by_index[record.index] = record
    return [by_index[i] for i in sorted(by_index)]


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
    """Open the raw tiles array of a scan folder (read-only)."""
    return zarr.open_array(Path(folder) / TILES_ZARR, mode="r")
