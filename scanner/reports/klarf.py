"""KLARF 1.2 (KLA Results File) writer for wafer scans.

KLARF 1.2 is the flat, line-oriented defect file that yield-management systems ingest: one
record per line, terminated by ``;``, tables (class lookup, test plan, defect list, summary)
as a record name followed by indented rows. No maintained Python library writes it (the PyPI
readers ``klarf-reader`` and ``klarfio`` only parse it; the test suite reads our files back
with both), so the writer is here, in the record order the format uses.

Units and axes (KLARF's conventions, not ours)
----------------------------------------------
* Lengths in micrometres, areas in µm², ``SampleSize`` in mm.
* KLARF's y axis points **up**; ours (stage y, image row) points **down**. With ``Y = -y``:

  ``XINDEX = die_col``, ``YINDEX = -die_row``,
  ``XREL = die_x_um``, ``YREL = die_pitch_y - die_y_um``,

  so that ``(XREL, YREL)`` is measured from the lower-left corner of the die in KLARF's frame
  and a reader's ``x = XINDEX * pitch_x + XREL - SampleCenterLocation.x`` gives
  ``wafer_x_mm * 1000`` and the same for y gives ``-wafer_y_mm * 1000``.
* ``DieOrigin 0 0`` (die coordinates start at the die's lower-left corner) and
  ``SampleCenterLocation`` = the wafer centre relative to the lower-left corner of die (0, 0)
  (as the alignment measured them when the scan aligned: ``header["alignment"]``).
* Our notch or flat points to +y (6 o'clock on the mosaic), i.e. to -Y in KLARF's frame:
  ``OrientationMarkLocation DOWN``. A wafer without a mark is written as ``NOTCH DOWN``:
  its coordinate frame is defined as if the notch were there.
"""

from __future__ import annotations

import datetime as _dt
import re
from pathlib import Path
from typing import Any

from ..defectlist import CLASSES, Defect

KLARF = "defects.klarf"

#: the 17 columns of the standard 1.2 defect record
DEFECT_COLUMNS = (
    "DEFECTID", "XREL", "YREL", "XINDEX", "YINDEX", "XSIZE", "YSIZE", "DEFECTAREA", "DSIZE",
    "CLASSNUMBER", "TEST", "CLUSTERNUMBER", "ROUGHBINNUMBER", "FINEBINNUMBER", "REVIEWSAMPLE",
    "IMAGECOUNT", "IMAGELIST",
)
SUMMARY_COLUMNS = ("TESTNO", "NDEFECT", "DEFDENSITY", "NDIE", "NDEFDIE")


def klarf_die_position(defect: Defect, pitch_y_um: float) -> tuple[int, int, float, float]:
    """``(XINDEX, YINDEX, XREL, YREL)`` of a located defect (see the module docstring)."""
    if defect.die_col is None or defect.die_row is None or defect.die_x_um is None \
            or defect.die_y_um is None:
        raise ValueError(f"defect {defect.id}: not located on the die grid")
    return (int(defect.die_col), -int(defect.die_row), float(defect.die_x_um),
            float(pitch_y_um) - float(defect.die_y_um))


def _timestamp(value: str | _dt.datetime | None) -> str:
    """KLARF time stamp ``MM-DD-YY HH:MM:SS`` from an ISO string or a datetime."""
    if value is None:
        when = _dt.datetime.now().astimezone()
    elif isinstance(value, _dt.datetime):
        when = value
    else:
        when = _dt.datetime.fromisoformat(str(value))
    return when.strftime("%m-%d-%y %H:%M:%S")


def _quoted(value: Any) -> str:
    """A KLARF string: double-quoted, without quotes, semicolons or line breaks inside."""
    return '"' + re.sub(r'["\r\n;]', "_", str(value)) + '"'


def _token(value: Any) -> str:
    """A single-token identifier (InspectionStationID parts may not contain spaces)."""
    return _quoted(re.sub(r"\s+", "_", str(value)))


def _sci(value: float) -> str:
    return f"{float(value):.10e}"


def _fixed(value: float, digits: int = 3) -> str:
    text = f"{float(value):.{digits}f}"
    return "0." + "0" * digits if text.lstrip("-").strip("0.") == "" else text


def klarf_text(
    header: dict[str, Any],
    defects: list[Defect],
    sample: dict[str, Any],
    area_um2: float,
    *,
    created: str | _dt.datetime | None = None,
    station: tuple[str, str, str] = ("WAFERSCOPE", "SIMULATED", "1"),
    slot: int = 1,
) -> str:
    """The KLARF 1.2 text of a located wafer defect list.

    Parameters
    ----------
    header : dict
        The defect list's header (see ``locate.build_header``): lot and wafer ids, scan start,
        tested dies, recipe name.
    defects : list of Defect
        Located defects (die index and position filled).
    sample : dict
        The recipe's wafer ``sample`` section (diameter, orientation, die pitch and origin).
    area_um2 : float
        Inspected area (the usable area of the wafer), for ``AreaPerTest`` and the density.
    created : str or datetime, optional
        ``FileTimestamp`` (default now).
    station : (str, str, str)
        ``InspectionStationID`` (manufacturer, model, id).
    slot : int
        Carrier slot of the wafer.
    """
    info = header.get("sample") or {}
    px, py = (float(v) * 1000.0 for v in sample["die_pitch_mm"])
    ox, oy = (float(v) * 1000.0 for v in sample.get("die_origin_mm", (0.0, 0.0)))
    aligned = (header.get("alignment") or {}).get("die_origin_um")
    if aligned is not None:  # the die origin the alignment measured, in the wafer's frame
        ox, oy = (float(v) for v in aligned)
    mark = "FLAT" if sample.get("orientation") == "flat" else "NOTCH"
    started = header.get("scan_started")
    name = info.get("name") or "waferscope"
    tested = (header.get("dies") or {}).get("tested") or []
    n_failed = sum(not d["pass"] for d in tested)
    density = len(defects) / (area_um2 * 1e-8) if area_um2 > 0 else 0.0  # per cm²

    lines = [
        "FileVersion 1 2;",
        f"FileTimestamp {_timestamp(created)};",
        "InspectionStationID " + " ".join(_token(s) for s in station) + ";",
        "SampleType WAFER;",
        f"ResultTimestamp {_timestamp(started)};",
        f"LotID {_quoted(info.get('lot_id') or 'LOT')};",
        f"SampleSize 1 {round(float(sample['diameter_mm']))};",
        f"DeviceID {_quoted(name)};",
        f"SetupID {_quoted(name)} {_timestamp(started)};",
        f"StepID {_quoted('INSPECTION')};",
        f"SampleOrientationMarkType {mark};",
        "OrientationMarkLocation DOWN;",
        f"DiePitch {_sci(px)} {_sci(py)};",
        f"DieOrigin {_sci(0.0)} {_sci(0.0)};",
        f"WaferID {_quoted(info.get('wafer_id') or 'W01')};",
        f"Slot {int(slot)};",
        # the wafer centre seen from the lower-left corner of die (0, 0), KLARF's y up
        f"SampleCenterLocation {_sci(-ox)} {_sci(oy + py)};",
    ]
    lines.append(f"ClassLookup {len(CLASSES) + 1}")
    lookup = [(0, "UNCLASSIFIED")] + [(n, c.upper()) for c, n in CLASSES.items()]
    lines += [f" {n} {_quoted(c)}" for n, c in lookup]
    lines[-1] += ";"
    lines.append("InspectionTest 1;")
    plan = sorted({(int(d["col"]), -int(d["row"])) for d in tested}, key=lambda t: (-t[1], t[0]))
    if plan:
        lines.append(f"SampleTestPlan {len(plan)}")
        lines += [f" {i} {j}" for i, j in plan]
        lines[-1] += ";"
    else:
        lines.append("SampleTestPlan 0;")
    lines.append(f"AreaPerTest {_sci(area_um2)};")
    lines.append(f"DefectRecordSpec {len(DEFECT_COLUMNS)} {' '.join(DEFECT_COLUMNS)};")
    lines.append("DefectList")
    for d in defects:
        xi, yi, xrel, yrel = klarf_die_position(d, py)
        x0, y0, x1, y1 = d.bbox_um
        number = CLASSES[d.defect_class]
        row = [
            str(d.id), _fixed(xrel), _fixed(yrel), str(xi), str(yi),
            _fixed(x1 - x0), _fixed(y1 - y0), _fixed(d.area_um2), _fixed(d.size_um),
            str(number), "1", "0", str(number), "0", "1" if d.review else "0", "0", "0",
        ]
        lines.append(" " + " ".join(row))
    lines[-1] += ";"
    lines.append(f"SummarySpec {len(SUMMARY_COLUMNS)} {' '.join(SUMMARY_COLUMNS)};")
    lines.append("SummaryList")
    lines.append(f" 1 {len(defects)} {density:.6e} {len(tested)} {n_failed};")
    lines.append("EndOfFile;")
    return "\n".join(lines) + "\n"


def write_klarf(path: Path, *args: Any, **kwargs: Any) -> Path:
    """Write :func:`klarf_text` to ``path`` atomically (written beside, then renamed)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(klarf_text(*args, **kwargs), encoding="ascii", errors="replace")
    tmp.replace(path)
    return path
