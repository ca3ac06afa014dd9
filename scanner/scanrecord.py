"""``scan.json`` as one typed record: what a scan folder holds and how it got there.

The pipeline writes ``scan.json`` stage by stage (a stage that is killed leaves the record of
the last one that finished), and every later stage, report and viewer reads it back. This
model is the one description of its top level: :func:`scanner.scanfolder.read_scan_json`
validates every read against it, so a damaged or hand-edited record is refused with the
field that is wrong, instead of failing somewhere later on a missing key or a wrong type.

Sections a stage owns (``plan``, ``focus``, ``registration``, ``mosaic``, ``inspection``...)
are mappings whose content that stage documents; keys added by newer versions are kept.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    model_validator,
)

from scanner.errors import UserError, is_finite_number
from scanner.recipe import format_validation_error

Section = dict[str, Any]

#: statuses written while a stage runs; found with no live process, they read as interrupted
RUNNING = ("aligning", "acquiring", "stitching", "inspecting", "reporting")
#: how every scan ends
FINAL = ("complete", "incomplete", "interrupted", "failed")


#: a positive finite number (not a bool or a string: a hand-edited record)
_Positive = Annotated[float, Field(gt=0, allow_inf_nan=False, strict=True)]
_PositiveInt = Annotated[StrictInt, Field(gt=0)]


class MicroscopeRecord(BaseModel):
    """``scan.json`` ``microscope``: the numbers the stages compute with."""

    model_config = ConfigDict(extra="allow")

    pixel_size_um: _Positive | None = None
    camera_shape: tuple[_PositiveInt, _PositiveInt] | None = None
    camera_dtype: str | None = Field(None, description="the raw tiles' pixel type (uint16)")
    depth_of_field_um: _Positive | None = None


class PlanRecord(BaseModel):
    """``scan.json`` ``plan`` (``n_tiles`` is checked by
    :func:`scanner.integrity.planned_tiles`, which says the folder is no scan without it)."""

    model_config = ConfigDict(extra="allow")

    fov_um: tuple[_Positive, _Positive] | None = None
    n_rows: _PositiveInt | None = None
    n_cols: _PositiveInt | None = None


class OptionsRecord(BaseModel):
    """``scan.json`` ``options``: what ``resume`` finishes the scan with (a model given as a
    number failed ``resume`` with exit 1, "expected str ... not int")."""

    model_config = ConfigDict(extra="allow")

    inspect: StrictBool | None = None
    model: str | None = Field(None, description="the model file `run` was given (None: shipped)")


class InspectionRecord(BaseModel):
    """``scan.json`` ``inspection``: the sections other commands read back (``drift`` read a
    ``model`` that was no mapping: exit 1, "'str' object has no attribute 'get'")."""

    model_config = ConfigDict(extra="allow")

    model: Section | None = Field(None, description="which model (name, file, weights hash)")
    good_scores: Section | None = None
    surface_image: Section | None = None


class ScanRecord(BaseModel):
    """The top level of ``scan.json``.

    Every field is optional (a record is written before the scan has done anything), but
    each one present must have its type.
    """

    model_config = ConfigDict(extra="allow")

    status: Literal[RUNNING + FINAL] | None = Field(  # type: ignore[valid-type]
        None, description="the stage running or the outcome")
    started: str | None = None
    finished: str | None = None
    error: str | None = Field(None, description="why the scan failed, in one line")
    process: Section | None = Field(None, description="host and pid of the running process")
    recipe: Section | None = Field(None, description="the recipe as validated, paths resolved")
    options: OptionsRecord | None = None
    versions: dict[str, str] | None = None
    microscope: MicroscopeRecord | None = None
    plan: PlanRecord | None = Field(None, description="tiles, travel and time estimate")
    acquired_tiles: int | None = Field(None, ge=0)
    lost_tiles: dict[str, Any] | None = Field(None, description="tiles that could not be "
                                              "acquired, by index, and why")
    retried_actions: int | None = Field(None, ge=0)
    timings: dict[str, Section] | None = Field(None, description="seconds per stage")
    alignment: Section | None = None
    alignment_skipped: str | None = Field(None, description="why the alignment was skipped")
    focus: Section | None = None
    during_acquisition: Section | None = None
    registration: Section | None = None
    flatfield: Section | None = None
    stitch_camera: Section | None = None
    mosaic: Section | None = None
    inspection: InspectionRecord | None = None
    report: Section | None = None
    resumed: list[Section] | None = Field(None, description="each resume: when, from what")

    @model_validator(mode="after")
    def _alignment_places_the_sample(self) -> ScanRecord:
        # every report locates its defects with it (scanner.acquisition.alignrefine.
        # effective_alignment): a "refined" that was no mapping failed `report` with exit 1
        for where, record in (("alignment", self.alignment),
                              ("alignment.refined", (self.alignment or {}).get("refined"))):
            if not record:
                continue
            if not isinstance(record, dict):
                raise ValueError(f"{where}: not a mapping (got {record!r})")
            centre, turn = record.get("center_um"), record.get("rotation_deg")
            if centre is not None and not (isinstance(centre, list) and len(centre) == 2
                                           and all(is_finite_number(v) for v in centre)):
                raise ValueError(f"{where}.center_um: not two numbers (got {centre!r})")
            if turn is not None and not is_finite_number(turn):
                raise ValueError(f"{where}.rotation_deg: not a number (got {turn!r})")
        return self

    @model_validator(mode="after")
    def _no_more_tiles_than_planned(self) -> ScanRecord:
        planned = getattr(self.plan, "n_tiles", None)
        if (self.acquired_tiles is not None and isinstance(planned, int)
                and not isinstance(planned, bool) and self.acquired_tiles > planned):
            raise ValueError(f"acquired_tiles: {self.acquired_tiles} acquired of {planned} "
                             "planned (plan.n_tiles): the record was changed")
        return self


def validated_scan(data: Any, source: str) -> dict[str, Any]:
    """``data`` (parsed ``scan.json``) once it fits :class:`ScanRecord`, as it is.

    Raises
    ------
    UserError
        Not a mapping, or a field of the wrong type (the first one is named).
    """
    if not isinstance(data, dict):
        raise UserError(f"{source}: not a scan record (a JSON object is expected)")
    try:
        ScanRecord.model_validate(data)
    except ValidationError as exc:
        raise UserError(f"{source}: {format_validation_error(exc, root='')}") from None
    return data
