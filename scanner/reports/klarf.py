"""KLARF (KLA Results File) writer for wafer scans: 1.2 (flat) and 1.8 (nested records).

KLARF 1.2 is the flat, line-oriented defect file that yield-management systems ingest: one
record per line, terminated by ``;``, tables (class lookup, test plan, defect list, summary)
as a record name followed by indented rows. KLARF 1.8 carries the same content as nested
``Record``/``Field``/``List`` blocks in braces (file, lot, wafer, test and summary records;
typed ``Columns`` and ``Data`` for the tables), which newer yield systems expect. No
maintained Python library writes either reliably (the PyPI readers ``klarf-reader`` (1.2)
and ``klarfio`` (1.2 and 1.8) parse them; the test suite reads our files back with both), so
the writer is here, in the record order the formats use. ``report --klarf-version`` (or the
recipe's ``output.klarf_version``) chooses which one ``defects.klarf`` is.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scanner.defectlist import CLASSES, Defect

KLARF = "defects.klarf"
#: KLARF versions written (``output.klarf_version``)
KLARF_VERSIONS = ("1.2", "1.8")

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
    return f"{float(value) + 0.0:.10e}"  # + 0.0: no "-0.0000000000e+00"


def _fixed(value: float, digits: int = 3) -> str:
    text = f"{float(value):.{digits}f}"
    return "0." + "0" * digits if text.lstrip("-").strip("0.") == "" else text


@dataclass(frozen=True)
class _Content:
    """What both KLARF versions write, in their units and frames (the module docstring)."""

    info: dict[str, Any]  # the header's sample: name, lot and wafer ids
    pitch_um: tuple[float, float]
    center: tuple[float, float]  # SampleCenterLocation: the wafer centre, KLARF's y up
    mark: str  # FLAT or NOTCH
    started: Any  # the scan's start: ResultTimestamp
    name: str
    diameter_mm: int
    classes: list[tuple[int, str]]  # ClassLookup: number, name
    plan: list[tuple[int, int]]  # SampleTestPlan: XINDEX, YINDEX
    rows: list[list[str]]  # DefectList rows, DEFECT_COLUMNS
    summary: list[str]  # SummaryList row, SUMMARY_COLUMNS


def _content(header: dict[str, Any], defects: list[Defect], sample: dict[str, Any],
             area_um2: float) -> _Content:
    """The values of a KLARF file of either version (parameters of :func:`klarf_text`)."""
    info = header.get("sample") or {}
    px, py = (float(v) * 1000.0 for v in sample["die_pitch_mm"])
    ox, oy = _die_origin(header, sample)
    tested = (header.get("dies") or {}).get("tested") or []
    n_failed = sum(not d["pass"] for d in tested)
    density = len(defects) / (area_um2 * 1e-8) if area_um2 > 0 else 0.0  # per cm²
    rows = []
    for d in defects:
        xi, yi, xrel, yrel = klarf_die_position(d, py)
        x0, y0, x1, y1 = d.bbox_um
        number = CLASSES[d.defect_class]
        rows.append([
            str(d.id), _fixed(xrel), _fixed(yrel), str(xi), str(yi),
            _fixed(x1 - x0), _fixed(y1 - y0), _fixed(d.area_um2), _fixed(d.size_um),
            str(number), "1", "0", str(number), "0", "1" if d.review else "0", "0", "0",
        ])
    return _Content(
        info=info,
        pitch_um=(px, py),
        # the wafer centre seen from the lower-left corner of die (0, 0), KLARF's y up
        center=(-ox, oy + py),
        mark="FLAT" if sample.get("orientation") == "flat" else "NOTCH",
        started=header.get("scan_started"),
        name=info.get("name") or "waferscope",
        diameter_mm=round(float(sample["diameter_mm"])),
        classes=[(0, "UNCLASSIFIED")] + [(n, c.upper()) for c, n in CLASSES.items()],
        plan=sorted({(int(d["col"]), -int(d["row"])) for d in tested},
                    key=lambda t: (-t[1], t[0])),
        rows=rows,
        summary=["1", str(len(defects)), f"{density:.6e}", str(len(tested)), str(n_failed)],
    )


def klarf_text(
    header: dict[str, Any],
    defects: list[Defect],
    sample: dict[str, Any],
    area_um2: float,
    *,
    created: str | _dt.datetime | None = None,
    station: tuple[str, str, str] = ("WAFERSCOPE", "SIMULATED", "1"),
    slot: int = 1,
    version: str = "1.2",
) -> str:
    """The KLARF text of a located wafer defect list: 1.2 (flat) or 1.8 (nested records).

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
    version : {"1.2", "1.8"}
        KLARF version (:data:`KLARF_VERSIONS`); 1.8 has the same values, frames and columns.
    """
    if version not in KLARF_VERSIONS:
        raise ValueError(f"KLARF version {version!r}: one of {', '.join(KLARF_VERSIONS)}")
    content = _content(header, defects, sample, area_um2)
    write = _text12 if version == "1.2" else _text18
    return write(content, area_um2, created=created, station=station, slot=slot)


def _text12(k: _Content, area_um2: float, *, created: str | _dt.datetime | None,
            station: tuple[str, str, str], slot: int) -> str:
    """KLARF 1.2: one record per line."""
    px, py = k.pitch_um
    lines = [
        "FileVersion 1 2;",
        f"FileTimestamp {_timestamp(created)};",
        "InspectionStationID " + " ".join(_token(s) for s in station) + ";",
        "SampleType WAFER;",
        f"ResultTimestamp {_timestamp(k.started)};",
        f"LotID {_quoted(k.info.get('lot_id') or 'LOT')};",
        f"SampleSize 1 {k.diameter_mm};",
        f"DeviceID {_quoted(k.name)};",
        f"SetupID {_quoted(k.name)} {_timestamp(k.started)};",
        f"StepID {_quoted('INSPECTION')};",
        f"SampleOrientationMarkType {k.mark};",
        "OrientationMarkLocation DOWN;",
        f"DiePitch {_sci(px)} {_sci(py)};",
        f"DieOrigin {_sci(0.0)} {_sci(0.0)};",
        f"WaferID {_quoted(k.info.get('wafer_id') or 'W01')};",
        f"Slot {int(slot)};",
        f"SampleCenterLocation {_sci(k.center[0])} {_sci(k.center[1])};",
    ]
    lines.append(f"ClassLookup {len(k.classes)}")
    lines += [f" {n} {_quoted(c)}" for n, c in k.classes]
    lines[-1] += ";"
    lines.append("InspectionTest 1;")
    if k.plan:
        lines.append(f"SampleTestPlan {len(k.plan)}")
        lines += [f" {i} {j}" for i, j in k.plan]
        lines[-1] += ";"
    else:
        lines.append("SampleTestPlan 0;")
    lines.append(f"AreaPerTest {_sci(area_um2)};")
    lines.append(f"DefectRecordSpec {len(DEFECT_COLUMNS)} {' '.join(DEFECT_COLUMNS)};")
    lines.append("DefectList")
    lines += [" " + " ".join(row) for row in k.rows]
    lines[-1] += ";"
    lines.append(f"SummarySpec {len(SUMMARY_COLUMNS)} {' '.join(SUMMARY_COLUMNS)};")
    lines.append("SummaryList")
    lines.append(" " + " ".join(k.summary) + ";")
    lines.append("EndOfFile;")
    return "\n".join(lines) + "\n"


def _string18(value: Any) -> str:
    """A KLARF 1.8 string: quoted, without the characters that delimit its blocks."""
    return '"' + re.sub(r'[",;{}\r\n]', "_", str(value)) + '"'


def _word18(value: Any) -> str:
    """A string in a 1.8 ``Data`` row: quoted and without spaces (rows split at spaces)."""
    return _string18(re.sub(r"\s+", "_", str(value)))


def _stamp18(value: str | _dt.datetime | None) -> str:
    """``"MM-DD-YYYY", "HH:MM:SS"`` (1.8 gives the date and the time as two strings)."""
    date, time = _timestamp(value).split(" ")
    month, day, year = date.split("-")
    return f'"{month}-{day}-20{year}", "{time}"'


def _list18(name: str, columns: list[tuple[str, str]], rows: list[list[str]],
            indent: str) -> list[str]:
    """A 1.8 ``List``: typed columns, then one ``;``-terminated row per entry."""
    out = [f"{indent}List {name}", f"{indent}{{",
           f"{indent}  Columns {len(columns)} {{ "
           + ", ".join(f"{t} {c}" for t, c in columns) + " }",
           f"{indent}  Data {len(rows)}", f"{indent}  {{"]
    out += [f"{indent}    " + " ".join(r) + ";" for r in rows]
    out += [f"{indent}  }}", f"{indent}}}"]
    return out


#: types of the 1.2 defect columns in a 1.8 ``DefectList``
_DEFECT_TYPES = ("int32", "float", "float", "int32", "int32", "float", "float", "float",
                 "float", "int32", "int32", "int32", "int32", "int32", "int32", "int32",
                 "int32")


def klarf18_text(
    header: dict[str, Any],
    defects: list[Defect],
    sample: dict[str, Any],
    area_um2: float,
    *,
    created: str | _dt.datetime | None = None,
    station: tuple[str, str, str] = ("WAFERSCOPE", "SIMULATED", "1"),
    slot: int = 1,
) -> str:
    """The KLARF 1.8 text of a located wafer defect list: :func:`klarf_text` with
    ``version="1.8"`` (the same values, frames and columns, in nested records)."""
    return klarf_text(header, defects, sample, area_um2, created=created, station=station,
                      slot=slot, version="1.8")


def _text18(k: _Content, area_um2: float, *, created: str | _dt.datetime | None,
            station: tuple[str, str, str], slot: int) -> str:
    """KLARF 1.8: nested ``Record``/``Field``/``List`` blocks."""
    px, py = k.pitch_um
    lot, wafer = k.info.get("lot_id") or "LOT", k.info.get("wafer_id") or "W01"
    i1, i2, i3 = "  ", "    ", "      "
    lines = ['Record FileRecord "1.8"', "{",
             f"{i1}Field FileTimestamp 2 {{{_stamp18(created)}}}",
             f"{i1}Field InspectionStationID 3 {{"
             + ", ".join(_string18(v) for v in station) + "}",
             f"{i1}Record LotRecord {_word18(lot)}", f"{i1}{{",
             f"{i2}Field DeviceID 1 {{{_string18(k.name)}}}",
             f"{i2}Field DiePitch 2 {{{_sci(px)}, {_sci(py)}}}",
             f"{i2}Field RecipeID 3 {{{_string18(k.name)}, {_stamp18(k.started)}}}",
             f"{i2}Field ResultTimestamp 2 {{{_stamp18(k.started)}}}",
             f'{i2}Field SampleOrientationMarkType 1 {{"{k.mark}"}}',
             f'{i2}Field OrientationMarkLocation 1 {{"DOWN"}}',
             f"{i2}Field SampleSize 2 {{1, {k.diameter_mm}}}",
             f'{i2}Field SampleType 1 {{"WAFER"}}',
             f'{i2}Field StepID 1 {{"INSPECTION"}}']
    lines += _list18("ClassLookupList", [("int32", "CLASSNUMBER"), ("string", "CLASSNAME"),
                                         ("string", "CLASSCODE")],
                     [[str(n), _word18(c), '""'] for n, c in k.classes], i2)
    lines += [f"{i2}Record WaferRecord {_word18(wafer)}", f"{i2}{{",
              f"{i3}Field DieOrigin 2 {{{_sci(0.0)}, {_sci(0.0)}}}",
              f"{i3}Field SampleCenterLocation 2 {{{_sci(k.center[0])}, {_sci(k.center[1])}}}",
              f"{i3}Field SlotNumber 1 {{{int(slot)}}}",
              f'{i3}Record TestRecord "1"', f"{i3}{{",
              f"{i3}  Field AreaPerTest 1 {{{_sci(area_um2)}}}"]
    lines += _list18("SampleTestPlanList", [("int32", "XINDEX"), ("int32", "YINDEX")],
                     [[str(i), str(j)] for i, j in k.plan], i3 + "  ")
    lines.append(f"{i3}}}")
    lines += _list18("DefectList", list(zip(_DEFECT_TYPES, DEFECT_COLUMNS, strict=True)), k.rows,
                     i3)
    lines += [f"{i3}Record SummaryRecord", f"{i3}{{"]
    lines += _list18("TestSummaryList", [("int32", "TESTNO"), ("int32", "NDEFECT"),
                                         ("float", "DEFDENSITY"), ("int32", "NDIE"),
                                         ("int32", "NDEFDIE")],
                     [k.summary], i3 + "  ")
    lines += [f"{i3}}}", f"{i2}}}", f"{i1}}}", "}", "EndOfFile;"]
    return "\n".join(lines) + "\n"


def _die_origin(header: dict[str, Any], sample: dict[str, Any]) -> tuple[float, float]:
    """Die (0, 0)'s lower corner in the wafer frame (µm): measured when the scan aligned."""
    aligned = (header.get("alignment") or {}).get("die_origin_um")
    if aligned is not None:
        return float(aligned[0]), float(aligned[1])
    ox, oy = (float(v) * 1000.0 for v in sample.get("die_origin_mm", (0.0, 0.0)))
    return ox, oy


def write_klarf(path: Path, *args: Any, version: str = "1.2", **kwargs: Any) -> Path:
    """Write :func:`klarf_text` of ``version`` (1.2 or 1.8) to ``path`` atomically (written
    beside, then renamed)."""
    if version not in KLARF_VERSIONS:
        raise ValueError(f"KLARF version {version!r}: one of {', '.join(KLARF_VERSIONS)}")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    text = klarf_text(*args, version=version, **kwargs)
    tmp.write_text(text, encoding="ascii", errors="replace")
    tmp.replace(path)
    return path
