"""The defect list: the contract between inspection (which finds defects) and reports.

Inspection produces :class:`Defect` rows in stage coordinates (centre, bounding box, area, class,
score, roughness, uncertainty). Reports *locate* them (wafer mm, die index and position in the
die, PV-cell region, tiles that saw them) and write ``defects.json`` / ``defects.csv`` /
``defects.klarf``. Both sides read and write through this module only.

``defects.json`` is ``{"header": {...}, "defects": [row, ...]}``; ``defects.csv`` holds the same
rows, one per line, with the columns of :data:`CSV_COLUMNS` (``bbox_um`` split into four columns,
``tiles`` joined with ``;``).

Coordinates follow the scan folder's contract: stage micrometres, x grows with the mosaic column
and y with the mosaic row; wafer millimetres from the wafer centre, same axis directions.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from devices.spec import MAX_COORDINATE
from scanner.errors import UserError, is_finite_number, is_number
from scanner.recipe import format_validation_error
from scanner.scanfolder import write_json

DEFECTS_JSON = "defects.json"
DEFECTS_CSV = "defects.csv"

#: Defect classes and their KLARF class numbers (0 is reserved by KLARF for "unclassified").
CLASSES: dict[str, int] = {
    "particle": 1,
    "scratch": 2,
    "pit": 3,
    "stain": 4,
    "crack": 5,
    "pattern": 6,
    "other": 7,
}

#: Anomaly maps written next to the mosaic by inspection (OME-NGFF, same stage transforms).
MAP_NAMES: dict[str, str] = {
    "anomaly": "anomaly.ome.zarr",
    "roughness": "roughness.ome.zarr",
    "uncertainty": "uncertainty.ome.zarr",
}


@dataclass
class Defect:
    """One defect.

    Attributes
    ----------
    id : int
        1, 2, ... in the order of the list.
    x_um, y_um : float
        Centre in stage micrometres.
    bbox_um : tuple of float
        ``(xmin, ymin, xmax, ymax)`` in stage micrometres.
    area_um2 : float
        Area of the defect's pixels.
    size_um : float
        Largest extent (Feret diameter or the bbox diagonal where that is all there is).
    defect_class : str
        One of :data:`CLASSES`.
    score : float
        Anomaly score (the peak of the anomaly map over the defect; higher = more defective).
    roughness : float
        Mean roughness estimate over the defect (the model's height units, e.g. nm Sa).
    uncertainty : float
        Mean uncertainty of the model over the defect.
    review : bool
        True when the uncertainty is high enough that a person should look at it.
    tiles : list of int
        Indices (``tiles.csv`` ``index``) of the tiles whose field of view contains the centre.
    wafer_x_mm, wafer_y_mm : float or None
        Centre relative to the wafer centre (wafers only).
    die_col, die_row : int or None
        Die index on the recipe's die grid (wafers only); ``(0, 0)`` is the die whose lower
        corner is ``die_origin_mm``.
    die_x_um, die_y_um : float or None
        Position of the centre inside its die, from the die's lower corner (wafers only).
    region : str or None
        PV cells: ``"busbar N"``, ``"finger area"`` or ``"edge"``; None elsewhere.
    """

    id: int
    x_um: float
    y_um: float
    bbox_um: tuple[float, float, float, float]
    area_um2: float
    size_um: float
    defect_class: str = "other"
    score: float = float("nan")
    roughness: float = float("nan")
    uncertainty: float = float("nan")
    review: bool = False
    tiles: list[int] = field(default_factory=list)
    wafer_x_mm: float | None = None
    wafer_y_mm: float | None = None
    die_col: int | None = None
    die_row: int | None = None
    die_x_um: float | None = None
    die_y_um: float | None = None
    region: str | None = None

    def __post_init__(self) -> None:
        if self.defect_class not in CLASSES:
            raise ValueError(f"defect_class: {self.defect_class!r} is not one of {list(CLASSES)}")
        # a list edited by hand or by another tool: where a defect lies and how large it is
        # must be numbers (a NaN centre crashed the die index, or was written as an empty
        # cell of the report), the rest of the right type
        if not _is_int(self.id):
            raise ValueError(f"id: {self.id!r} is not a whole number")
        if self.id < 0:
            raise ValueError(f"id: {self.id} is negative")
        for name in ("x_um", "y_um", "area_um2", "size_um"):
            if not is_finite_number(getattr(self, name)):
                raise ValueError(f"defect {self.id}: {name}: {getattr(self, name)!r} is not a "
                                 "finite number")
        for name in ("area_um2", "size_um"):
            if getattr(self, name) < 0:
                raise ValueError(f"defect {self.id}: {name}: {getattr(self, name)!r} is negative")
        if not isinstance(self.bbox_um, tuple | list) or len(self.bbox_um) != 4 or not all(
                is_finite_number(v) for v in self.bbox_um):
            raise ValueError(f"defect {self.id}: bbox_um: {self.bbox_um!r} is not 4 finite "
                             "numbers")
        x0, y0, x1, y1 = self.bbox_um
        if x0 > x1 or y0 > y1:
            raise ValueError(f"defect {self.id}: bbox_um: {list(self.bbox_um)!r} is not "
                             "[xmin, ymin, xmax, ymax]")
        # a stage coordinate a kilometre away is damage (1e300 was written back as given)
        # (the bound a recipe's coordinates have: a defect lies where a recipe may scan)
        if max(abs(self.x_um), abs(self.y_um), *map(abs, self.bbox_um)) > MAX_COORDINATE:
            raise ValueError(f"defect {self.id}: lies more than {MAX_COORDINATE:.0e} um from "
                             "the stage origin")
        for name in ("score", "roughness", "uncertainty"):
            if not is_number(getattr(self, name)):
                raise ValueError(f"defect {self.id}: {name}: {getattr(self, name)!r} is not a "
                                 "number")
        if not isinstance(self.review, bool):
            raise ValueError(f"defect {self.id}: review: {self.review!r} is not true or false")
        self.bbox_um = tuple(float(v) for v in self.bbox_um)  # type: ignore[assignment]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (NaN becomes None)."""
        return {k: _clean(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Defect:
        """Inverse of :meth:`to_dict` (unknown keys are ignored, None floats become NaN)."""
        names = {f.name: f for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        for key in ("score", "roughness", "uncertainty"):
            if values.get(key) is None:
                values[key] = float("nan")
        values["bbox_um"] = tuple(values.get("bbox_um") or (math.nan,) * 4)
        tiles = values.get("tiles") or []
        if not isinstance(tiles, list) or not all(_is_int(t) for t in tiles):
            raise ValueError(f"defect {values.get('id')}: tiles: {tiles!r} is not a list of tile "
                             "indices")
        values["tiles"] = [int(t) for t in tiles]
        return cls(**values)


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, tuple | list):
        return [_clean(v) for v in value]
    return value


CSV_COLUMNS: list[str] = [
    "id", "x_um", "y_um", "wafer_x_mm", "wafer_y_mm", "die_col", "die_row", "die_x_um",
    "die_y_um", "region", "bbox_xmin_um", "bbox_ymin_um", "bbox_xmax_um", "bbox_ymax_um",
    "area_um2", "size_um", "defect_class", "score", "roughness", "uncertainty", "review", "tiles",
]


Section = dict[str, Any]


class DefectListHeader(BaseModel):
    """The header of ``defects.json``: what was inspected, how, and where it lies.

    Inspection writes the first part (model, threshold, maps, timings), the report stage adds
    where the sample lies (sample, dies, alignment, regions, counts). Every field is optional
    (image-file inspections carry fewer), but each one present must have its type; keys added
    by newer versions are kept.
    """

    model_config = ConfigDict(extra="allow")

    source: str | None = Field(None, description="the mosaic or images inspected")
    created: str | None = None
    model: Section | None = Field(None, description="which model (name, file, weights hash)")
    threshold: float | None = Field(None, gt=0, allow_inf_nan=False,
                                    description="anomaly score that counts as a defect")
    threshold_source: str | None = None
    maps: dict[str, str] | None = Field(None, description="map name -> OME-NGFF file")
    map_pixel_size_um: float | None = Field(None, gt=0)
    masked_to_usable_area: bool | None = None
    windows: int | None = Field(None, ge=0)
    windows_skipped: int | None = Field(None, ge=0)
    die_to_die: Section | None = None
    golden: Section | None = Field(None, description="the comparison with the model's golden "
                                   "image (a design that does not repeat)")
    plain_surface: Section | None = None
    not_scanned_mm2: float | None = Field(
        None, ge=0, description="usable area no tile covered: not inspected, no defect there")
    edge_band_um: float | None = Field(
        None, ge=0, description="band along the sample's edge not inspected: the model never "
                                "saw a sample's edge as a scan shows it (built from files)")
    timings: dict[str, float] | None = None
    n_defects: int | None = Field(None, ge=0)
    good_scores: Section | None = None
    sample: Section | None = None
    recipe_sha256: str | None = None
    versions: dict[str, str] | None = None
    scan_started: str | None = None
    scan_finished: str | None = None
    scan_status: str | None = None
    coordinates: str | None = None
    counts: dict[str, int] | None = None
    dies: Section | None = None
    alignment: Section | None = None
    regions: dict[str, int] | None = None
    repeaters: Section | None = None


def _checked_header(header: Any, source: str) -> dict[str, Any]:
    """``header`` once it fits :class:`DefectListHeader`, as it is (a field of the wrong type
    is named in one line)."""
    if not isinstance(header, dict):
        raise UserError(f"{source}: header: a JSON object is expected")
    try:
        DefectListHeader.model_validate(header)
    except ValidationError as exc:
        raise UserError(f"{source}: header.{format_validation_error(exc)}") from None
    return dict(header)


def write_defects(folder: Path, defects: list[Defect], header: dict[str, Any]) -> None:
    """Write ``defects.json`` and ``defects.csv`` atomically (the same rows in both).

    Raises
    ------
    UserError
        The header does not fit :class:`DefectListHeader` (nothing is written).
    """
    folder = Path(folder)
    header = _checked_header(header, str(folder / DEFECTS_JSON))
    write_json(folder / DEFECTS_JSON, {"header": header, "defects": [d.to_dict() for d in defects]})
    tmp = folder / (DEFECTS_CSV + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for d in defects:
            row = d.to_dict()
            xmin, ymin, xmax, ymax = row.pop("bbox_um")
            row.update(bbox_xmin_um=xmin, bbox_ymin_um=ymin, bbox_xmax_um=xmax, bbox_ymax_um=ymax,
                       tiles=";".join(str(t) for t in d.tiles))
            writer.writerow(["" if row[c] is None else row[c] for c in CSV_COLUMNS])
    tmp.replace(folder / DEFECTS_CSV)


def read_defects(folder: Path) -> tuple[dict[str, Any], list[Defect]]:
    """Read ``defects.json`` of a scan folder: ``(header, defects)``.

    Raises
    ------
    UserError
        If the file is missing or not a defect list.
    """
    path = Path(folder) / DEFECTS_JSON
    if not path.is_file():
        raise UserError(f"{folder}: no {DEFECTS_JSON} (inspect the scan first)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("a JSON object with 'header' and 'defects' is expected")
        if not isinstance(data.get("defects"), list):
            # "" or {} iterated as no defects, and the report rewrote the list empty
            raise ValueError("defects: a JSON list is expected")
        if not all(isinstance(d, dict) for d in data["defects"]):
            raise ValueError("defects: each defect must be a JSON object")
        header = data.get("header", {})
        defects = [Defect.from_dict(d) for d in data["defects"]]
        ids = [d.id for d in defects]
        if len(set(ids)) != len(ids):
            raise ValueError(f"id: {next(i for i in ids if ids.count(i) > 1)} is given twice")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"{path}: not a readable defect list ({exc})") from None
    return _checked_header(header, str(path)), defects


@dataclass
class InspectionResult:
    """What an inspection wrote (its files and defects), and how long it took."""

    folder: Path
    n_defects: int
    timings: dict[str, float]
    outputs: dict[str, Path] = field(default_factory=dict)
    defects: list[Defect] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)
