"""Scan recipes: the pydantic models that describe one scan, and the YAML loader.

A recipe has four sections, ``sample``, ``microscope``, ``scan`` and ``output``. ``sample`` and
``microscope`` are tagged by ``kind``. The resolved recipe (every default filled in, every path
absolute) is the scan's description and is saved in ``scan.json``. The ``microscope`` section's
models live in the device layer (:mod:`devices.spec`, which builds a core from them) and are
re-exported here.
"""

from __future__ import annotations

import difflib
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args

import yaml
from pydantic import (
    BaseModel,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from devices.spec import MISSING_FILE, XY, NonNegFloat, PositiveFloat, Seed, existing_file
from devices.spec import CameraSpec as CameraSpec
from devices.spec import FaultsSpec as FaultsSpec
from devices.spec import FocusSpec as FocusSpec
from devices.spec import MicroManagerMicroscope as MicroManagerMicroscope
from devices.spec import Microscope as Microscope
from devices.spec import ObjectiveSpec as ObjectiveSpec
from devices.spec import RolesSpec as RolesSpec
from devices.spec import SimulatedMicroscope as SimulatedMicroscope
from devices.spec import SpecModel as _Model
from devices.spec import StageSpec as StageSpec
from scanner.errors import RecipeError, UserError

_SectionT = TypeVar("_SectionT", bound=BaseModel)

# --------------------------------------------------------------------------- samples

#: a simulated sample's design (die layout, grains, texture): copies of one product share it,
#: whatever their defects
DesignSeed = Annotated[Seed | None, Field(description="simulated sample: seed of its design "
                                          "(die layout, grains, texture); default: defects.seed")]


class DefectSpec(_Model):
    """Synthetic defects placed on a simulated sample (ignored on real hardware)."""

    # a simulated sample renders every defect on every frame it touches: thousands are a
    # typo, and a billion would hang even `validate`
    count: Annotated[int, Field(ge=0, le=10_000)] = 20
    kinds: list[str] | None = None
    seed: Seed = 0


class BumpSpec(_Model):
    """A local bump (or dent, with a negative height) in a simulated focal surface."""

    center_um: XY
    height_um: float
    radius_um: PositiveFloat


#: steepest simulated tilt (µm/mm, = mrad): 50 is about 3°, a sample not lying on the chuck
MAX_TILT_UM_PER_MM = 50.0
#: largest simulated bow (µm): a wafer's bow or warp is at most a few hundred µm, and the
#: default focus drive spans 1000
MAX_BOW_UM = 1000.0
#: largest simulated waviness (µm): local waviness is far below the bow
MAX_WAVINESS_UM = 100.0

# beyond these the surface is out of focus by kilometres: the simulated camera's blur kernel
# grew with the defocus and ran out of memory (a tilt of 1e12) or hung (a bow of 1e6)
Tilt = Annotated[float, Field(ge=-MAX_TILT_UM_PER_MM, le=MAX_TILT_UM_PER_MM)]


class SurfaceSpec(_Model):
    """Shape of a simulated sample's surface along the focus axis (ignored on real hardware)."""

    tilt_um_per_mm: tuple[Tilt, Tilt] = (0.0, 0.0)
    bow_um: Annotated[float, Field(ge=-MAX_BOW_UM, le=MAX_BOW_UM)] = 0.0
    waviness_um: Annotated[float, Field(ge=0, le=MAX_WAVINESS_UM)] = 0.0
    waviness_period_mm: PositiveFloat = 10.0
    z0_um: float = 0.0
    seed: Seed = 0
    bumps: list[BumpSpec] = Field(
        default_factory=list, description="local raised-cosine bumps (stage µm)"
    )


class RoughnessSpec(_Model):
    """Simulated surface roughness with a known areal roughness Sa (ignored on real hardware).

    See ``simulators.roughness``; the true Sa map follows from these parameters (truth.json).
    """

    sa_nm: NonNegFloat = 5.0
    variation: Annotated[float, Field(ge=0.0, le=0.95)] = 0.0
    # Sa is a mean over many correlation lengths: it cannot change over less than 0.1 mm, and
    # the Sa map's noise lattice (one cell a period) filled the memory at 1e-12 mm
    variation_period_mm: Annotated[float, Field(ge=0.1)] = 20.0
    correlation_um: PositiveFloat = 2.0
    wavelength_um: PositiveFloat = 0.55
    seed: Seed = 0


class PlacementSpec(_Model):
    """Simulated misplacement of a sample on the chuck (ignored on real hardware).

    The sample lies ``offset_um`` from where the recipe puts it, turned by ``rotation_deg``
    about its own centre (from +x towards +y); ``random: true`` draws both from ``seed``
    (offset up to ``max_offset_um`` along each axis, rotation up to ``max_rotation_deg``).
    The true placement is written to ``truth.json``.
    """

    offset_um: XY = (0.0, 0.0)
    rotation_deg: Annotated[float, Field(ge=-10.0, le=10.0)] = 0.0
    random: bool = False
    seed: Seed = 0
    max_offset_um: NonNegFloat = 500.0
    max_rotation_deg: Annotated[float, Field(ge=0.0, le=10.0)] = 1.0

    @model_validator(mode="after")
    def _random_or_given(self) -> PlacementSpec:
        # zeros are what a dumped recipe (scan.json) carries beside random: true
        given = {k for k in ("offset_um", "rotation_deg") if k in self.model_fields_set
                 and getattr(self, k) != type(self).model_fields[k].default}
        if self.random and given:
            raise ValueError(f"{sorted(given)[0]}: not with random: true (the placement is "
                             "drawn from seed)")
        return self


#: smallest and largest wafer diameter (mm): small simulated wafers scan in seconds; SEMI's
#: largest wafer is 450 mm. Out of range, the flat's default made from the diameter or the die
#: grid was reported instead of the diameter
MIN_WAFER_MM, MAX_WAFER_MM = 1.0, 450.0


#: what a KLARF id cannot hold: its strings' quotes, its records' ends and its 1.8 blocks'
#: delimiters (written, they were replaced by "_" without a word), and anything but printable
#: ASCII, which a KLARF file is (written, "Łódź" became "??d?" and two wafers one id)
#: the longest lot or wafer id (SEMI E90 substrate ids are at most 80 characters; a 300
#: character lot squeezed the wafer map into a corner of a 6413 px picture)
KLARF_ID_MAX = 64
_KLARF_ID_FORBIDDEN = re.compile(r'["\r\n;,{}]|[^\x20-\x7e]')


def klarf_id_problem(value: str) -> str | None:
    """Why ``value`` cannot be a lot or wafer id in a KLARF (None: it can)."""
    if not str(value).strip():
        return "an id cannot be empty"
    if len(str(value)) > KLARF_ID_MAX:
        return (f"an id of {len(str(value))} characters; at most {KLARF_ID_MAX} (a fab's "
                "lot and wafer ids are short, and the wafer map's title carries them)")
    if str(value) != str(value).strip():
        # " W1" and "W1" would be two wafers to a fab's system, one to anyone reading the map
        return f"{value!r} starts or ends with a space"
    bad = sorted(set(_KLARF_ID_FORBIDDEN.findall(str(value))))
    if bad:
        shown = " ".join(repr(c) for c in bad)
        return (f"{value!r} holds {shown}, which a KLARF cannot carry in an id (printable "
                'ASCII without " ; , { })')
    return None


class WaferSample(_Model):
    """A round wafer with a die grid."""

    kind: Literal["wafer"] = "wafer"
    diameter_mm: PositiveFloat = 100.0
    orientation: Literal["notch", "flat", "none"] = "notch"
    flat_length_mm: PositiveFloat = Field(
        32.5, description="length of the flat (default: SEMI M1's primary flat for the "
                          "diameter, e.g. 32.5 mm at 100 mm; 0.325 x other diameters)")
    notch_depth_mm: NonNegFloat = Field(1.0, description="depth of the V notch (SEMI M1: 1 mm)")
    edge_exclusion_mm: NonNegFloat = 3.0
    die_pitch_mm: tuple[PositiveFloat, PositiveFloat] = (10.0, 10.0)
    die_origin_mm: XY = (0.0, 0.0)
    scribe_width_um: NonNegFloat = 80.0
    center_um: XY = (0.0, 0.0)
    die_to_die: bool = Field(
        True, description="inspection compares each die with its neighbouring dies "
                          "(set false when the dies are not copies of one design)")
    lot_id: str = "LOT0001"
    wafer_id: str = "W01"
    edge_dies: Literal["bare", "patterned"] = Field(
        "bare", description="simulated wafer: whether the dies cut by the usable area's edge "
                            "carry the pattern (steppers often expose edge fields)")
    defects: DefectSpec = DefectSpec()
    design_seed: DesignSeed = None
    surface: SurfaceSpec = SurfaceSpec()
    roughness: RoughnessSpec | None = None
    placement: PlacementSpec = PlacementSpec()

    @field_validator("lot_id", "wafer_id")
    @classmethod
    def _fab_id(cls, value: str) -> str:
        problem = klarf_id_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("diameter_mm")
    @classmethod
    def _wafer_size(cls, value: float) -> float:
        if not MIN_WAFER_MM <= value <= MAX_WAFER_MM:
            raise ValueError(f"{value:g} mm is no wafer (must be {MIN_WAFER_MM:g} to "
                             f"{MAX_WAFER_MM:g} mm)")
        return value

    @model_validator(mode="before")
    @classmethod
    def _flat_for_the_diameter(cls, data: Any) -> Any:
        # one fixed default (100 mm's flat) is longer than a small wafer is wide, and cut a
        # 30 mm wafer in half without a word
        if isinstance(data, dict) and data.get("flat_length_mm") is None:
            try:
                diameter = float(data.get("diameter_mm", 100.0))
            except (TypeError, ValueError):
                return data  # the field's own check names it
            if math.isfinite(diameter) and MIN_WAFER_MM <= diameter <= MAX_WAFER_MM:
                data = {**data, "flat_length_mm": semi_flat_length_mm(diameter)}
        return data

    @model_validator(mode="after")
    def _check_geometry(self) -> WaferSample:
        # a pitch the recipe gives (the default 10 mm, which a dumped recipe carries too,
        # stays what it always was on a small wafer: a bare one)
        given = "die_pitch_mm" in self.model_fields_set and \
            self.die_pitch_mm != type(self).model_fields["die_pitch_mm"].default
        problem = given and die_pitch_problem(
            self.die_pitch_mm, (self.diameter_mm, self.diameter_mm),
            f"the {self.diameter_mm:g} mm wafer")
        if problem:
            raise ValueError(problem)
        if self.edge_exclusion_mm * 2 >= self.diameter_mm:
            raise ValueError("edge_exclusion_mm: leaves no usable area (must be < diameter_mm / 2)")
        if self.orientation == "flat" and self.flat_length_mm >= self.diameter_mm:
            raise ValueError(f"flat_length_mm: {self.flat_length_mm:g} mm is not shorter than "
                             f"the wafer's diameter ({self.diameter_mm:g} mm)")
        # the outline and the simulator cut a notch at most half the radius deep: a deeper
        # one would be drawn shallower than the recipe says, without a word
        if self.orientation == "notch" and self.notch_depth_mm > self.diameter_mm / 4:
            raise ValueError(f"notch_depth_mm: {self.notch_depth_mm:g} mm is deeper than a "
                             f"{self.diameter_mm:g} mm wafer allows (at most half its radius, "
                             f"{self.diameter_mm / 4:g} mm)")
        if self.scribe_width_um >= min(self.die_pitch_mm) * 1000.0:
            raise ValueError(f"scribe_width_um: {self.scribe_width_um:g} µm leaves no die "
                             f"(must be narrower than the die pitch, "
                             f"{min(self.die_pitch_mm) * 1000.0:g} µm)")
        problem = die_count_problem(self.die_pitch_mm, (self.diameter_mm, self.diameter_mm))
        if problem:
            raise ValueError(problem)
        # any die's corner gives the same grid, so one far off the wafer is a typo (an origin
        # of [1e8, -1e8] was taken: die indices of -20000001 in the KLARF)
        off = math.hypot(*self.die_origin_mm)
        if off > self.diameter_mm:
            raise ValueError(f"die_origin_mm: {[float(v) for v in self.die_origin_mm]} lies "
                             f"{off:.4g} mm from the centre of a {self.diameter_mm:g} mm wafer; "
                             "give the corner of a die on the wafer (mm from its centre)")
        return self


#: most die cells a sample's grid may hold (a 300 mm wafer of 0.22 mm dies): the reports and
#: the inspection list every cell over the sample (``scanner.diegrid.DieGrid.cells_in``), and
#: the simulated wafer draws each; 1.6 million cells took 27 s and 2 GB there each time, and a
#: pitch given in µm for mm (80 million cells) ran out of memory
MAX_DIES = 2_000_000


def die_count_problem(pitch_mm: tuple[float, float], extent_mm: tuple[float, float]
                      ) -> str | None:
    """Why a die grid of this pitch is too fine for a sample of this extent (x, y mm), as
    ``die_pitch_mm: why``; None when it is not.

    Counts every cell over the extent, partial ones included, as
    ``scanner.diegrid.DieGrid.cells_in`` lists them, and refuses more than :data:`MAX_DIES`.
    """
    n = (extent_mm[0] / pitch_mm[0] + 2) * (extent_mm[1] / pitch_mm[1] + 2)
    if n <= MAX_DIES:
        return None
    return (f"die_pitch_mm: {[float(v) for v in pitch_mm]} mm puts about {n:.3g} dies on the "
            f"sample, more than {MAX_DIES} (the pitch is in mm)")


def die_pitch_problem(pitch_mm: tuple[float, float], extent_mm: tuple[float, float],
                      sample: str, times: float = 1.0) -> str | None:
    """Why a die pitch does not fit a sample of this extent (x, y mm), as
    ``die_pitch_mm: why``; None when it does.

    A die larger than a wafer puts no die grid on it (a pitch given in µm for mm), and the
    simulated die is drawn at its pitch (1e6 mm hung ``validate``): refused first. A coupon
    or an image may be a piece of one large die (its pitch gives the die coordinates), so
    ``times`` lets the pitch exceed their extent that many times.
    """
    if pitch_mm[0] <= times * extent_mm[0] and pitch_mm[1] <= times * extent_mm[1]:
        return None
    larger = "larger than" if times == 1.0 else f"over {times:g} times"
    return (f"die_pitch_mm: {[float(v) for v in pitch_mm]} mm is {larger} {sample} "
            f"({extent_mm[0]:g} x {extent_mm[1]:g} mm; the pitch is in mm)")


#: how many times its extent the die pitch of a coupon or an image may be (a piece of a die)
PIECE_OF_A_DIE = 10.0


#: SEMI M1 primary flat lengths (mm) by nominal diameter (mm)
SEMI_FLATS_MM = {50.8: 15.88, 76.2: 22.22, 100.0: 32.5, 125.0: 42.5, 150.0: 57.5}


def semi_flat_length_mm(diameter_mm: float) -> float:
    """The primary flat SEMI M1 gives a wafer of this diameter (within 1 mm), else the same
    share of the diameter as a 100 mm wafer's (0.325)."""
    for nominal, flat in SEMI_FLATS_MM.items():
        if abs(diameter_mm - nominal) <= 1.0:
            return flat
    return round(0.325 * diameter_mm, 3)


class PVCellSample(_Model):
    """A photovoltaic cell with busbars and fingers (imaged like electroluminescence)."""

    kind: Literal["pv_cell"] = "pv_cell"
    width_mm: PositiveFloat = 156.0
    height_mm: PositiveFloat = 156.0
    busbars: Annotated[int, Field(ge=0, le=30)] = 5
    busbar_width_mm: PositiveFloat = 1.2
    finger_pitch_mm: PositiveFloat = 2.0
    finger_width_um: PositiveFloat = 60.0
    center_um: XY = (0.0, 0.0)
    grain_size_mm: Annotated[float, Field(
        ge=0.0, le=1000.0, description="simulated cell: mean grain size of a multicrystalline "
        "cell; 0 for a monocrystalline one")] = 5.0
    defects: DefectSpec = DefectSpec()
    design_seed: DesignSeed = None
    surface: SurfaceSpec = SurfaceSpec()
    roughness: RoughnessSpec | None = None
    placement: PlacementSpec = PlacementSpec()

    @model_validator(mode="after")
    def _check_layout(self) -> PVCellSample:
        # busbars are evenly spaced across the width (busbar k centred at (k + 0.5) * width /
        # busbars): wider than that spacing they overlap, and the cell is all busbar
        if self.busbars and self.busbar_width_mm >= self.width_mm / self.busbars:
            raise ValueError(
                f"busbar_width_mm: {self.busbar_width_mm:g} mm busbars do not fit {self.busbars} "
                f"to a {self.width_mm:g} mm cell (each must be narrower than "
                f"{self.width_mm / self.busbars:.4g} mm, the busbars' spacing)")
        if self.finger_pitch_mm >= self.height_mm:
            raise ValueError(f"finger_pitch_mm: {self.finger_pitch_mm:g} mm leaves no finger "
                             f"pattern on a {self.height_mm:g} mm cell (the fingers run "
                             "along x, one per pitch down the cell)")
        if self.finger_width_um >= self.finger_pitch_mm * 1000.0:
            raise ValueError(f"finger_width_um: {self.finger_width_um:g} µm fingers fill their "
                             f"{self.finger_pitch_mm:g} mm pitch (must be narrower)")
        return self


class _RepeatKeys(_Model):
    """The die-grid keys of samples that may repeat a layout (an image, a coupon)."""

    die_pitch_mm: tuple[PositiveFloat, PositiveFloat] | None = Field(
        None, description="pitch (x, y) of a repeating layout; default: found from the mosaic "
                          "when die_to_die is true or auto")
    die_origin_mm: XY = Field(
        (0.0, 0.0), description="corner of die (0, 0) from an image's pixel (0, 0) or a "
                                "rectangle's lower corner (smallest x and y), with die_pitch_mm")
    die_to_die: bool | Literal["auto"] = Field(
        "auto", description="compare each repeat with its neighbours: true, false, or auto "
                            "(when the mosaic shows a clear repeat)")


class ImageSample(_RepeatKeys):
    """Any TIFF/PNG file used as the sample, with its pixel size and stage placement."""

    kind: Literal["image"] = "image"
    path: Path
    pixel_size_um: PositiveFloat
    origin_um: XY = Field(
        (0.0, 0.0), description="stage position (x, y) µm of the image's pixel (0, 0)"
    )
    region_px: tuple[int, int, int, int] | None = Field(
        None, description="(row, col, rows, cols) to scan; default: the whole image"
    )
    defects: DefectSpec = DefectSpec(count=0)
    surface: SurfaceSpec = SurfaceSpec()
    roughness: RoughnessSpec | None = None
    placement: PlacementSpec = PlacementSpec()

    @field_validator("path")
    @classmethod
    def _path_exists(cls, value: Path, info: ValidationInfo) -> Path:
        return existing_file(value, info)

    @field_validator("region_px")
    @classmethod
    def _region_positive(
        cls, value: tuple[int, int, int, int] | None
    ) -> tuple[int, int, int, int] | None:
        if value is not None and (value[0] < 0 or value[1] < 0 or value[2] <= 0 or value[3] <= 0):
            raise ValueError("must be (row >= 0, col >= 0, rows > 0, cols > 0)")
        return value

    @model_validator(mode="after")
    def _check_image(self) -> ImageSample:
        from simulators.geometry import image_shape

        try:  # the header only
            rows, cols = image_shape(self.path)
        except UserError:
            return self  # the plan names sample.path and why
        from simulators.picture import MIN_IMAGE_PX

        field, scanned = ("path", (rows, cols)) if self.region_px is None else \
            ("region_px", self.region_px[2:])
        if min(scanned) < MIN_IMAGE_PX:
            # inspection refuses images this small (models.data.read_image): said before
            # the stage moves, not after the scan
            raise ValueError(f"{field}: {scanned[0]} x {scanned[1]} px is too small to scan "
                             f"and inspect ({MIN_IMAGE_PX} px a side at least)")
        if self.die_pitch_mm is None:
            return self
        extent = (cols * self.pixel_size_um / 1000.0, rows * self.pixel_size_um / 1000.0)
        problem = die_pitch_problem(self.die_pitch_mm, extent, "the image", PIECE_OF_A_DIE)
        if problem:
            raise ValueError(problem)
        return self


class RectangleSample(_RepeatKeys):
    """A plain rectangular region (a coupon, a die, a test area)."""

    kind: Literal["rectangle"] = "rectangle"
    width_mm: PositiveFloat
    height_mm: PositiveFloat
    center_um: XY = (0.0, 0.0)
    defects: DefectSpec = DefectSpec(count=10)
    design_seed: DesignSeed = None
    surface: SurfaceSpec = SurfaceSpec()
    roughness: RoughnessSpec | None = None
    placement: PlacementSpec = PlacementSpec()

    @model_validator(mode="after")
    def _check_die_count(self) -> RectangleSample:
        if self.die_pitch_mm is not None:
            problem = die_pitch_problem(self.die_pitch_mm, (self.width_mm, self.height_mm),
                                        "the rectangle", PIECE_OF_A_DIE) \
                or die_count_problem(self.die_pitch_mm, (self.width_mm, self.height_mm))
            if problem:
                raise ValueError(problem)
        return self


Sample = Annotated[
    WaferSample | PVCellSample | ImageSample | RectangleSample, Field(discriminator="kind")
]


# --------------------------------------------------------------------------- scan, output


class FocusPlan(_Model):
    """How each tile is brought into focus."""

    strategy: Literal["none", "every_tile", "every_n_tiles", "focus_map"] = "none"
    every_n: Annotated[int, Field(ge=1)] = 5
    points: Annotated[int, Field(ge=3, le=400)] = 13
    layout: Literal["grid", "rings"] = "grid"
    model: Literal["auto", "plane", "quadratic", "tps"] = "auto"
    method: Literal["image", "hardware"] = Field(
        "image", description="image-based search, or the configuration's autofocus device"
    )
    measure: (
        Literal["normalized_variance", "tenengrad", "brenner", "variance_of_laplacian"] | None
    ) = None
    search_span_um: PositiveFloat | None = None
    recheck: bool = Field(
        True, description="focus_map: re-measure tiles whose sharpness says the map failed"
    )
    recheck_dof: Annotated[float, Field(gt=0, le=5)] = Field(
        0.75, description="defocus (depths of field) beyond which a tile is re-measured"
    )


class RegionSpec(_Model):
    """A part of the sample to scan instead of all of it."""

    band_mm: tuple[float, float] | None = Field(
        None, description="[y0, y1]: only the band of stage y from y0 to y1 mm, measured from "
        "the middle of the sample's extent in y, across its whole width (e.g. a band along a "
        "300 mm wafer's diameter)")

    @model_validator(mode="after")
    def _check(self) -> RegionSpec:
        if self.band_mm is not None and not self.band_mm[0] < self.band_mm[1]:
            raise ValueError(f"band_mm: y0 must be below y1, got {list(self.band_mm)}")
        return self


class ScanSpec(_Model):
    """How to tile the sample."""

    overlap: Annotated[float, Field(ge=0.0, lt=0.9)] = 0.1
    order: Literal["serpentine", "raster"] = "serpentine"
    exposure_ms: PositiveFloat | None = Field(None, description="default: the camera's exposure")
    max_tiles: Annotated[int, Field(gt=0)] = 20_000
    retries: Annotated[int, Field(ge=0, le=10)] = 3
    # at most an hour: no move or snap takes longer, and 1e10 s overflowed the thread wait
    device_timeout_s: Annotated[float, Field(gt=0, le=3600)] = Field(
        60.0, description="watchdog: a move or snap not done after this long is a hardware fault"
    )
    focus: FocusPlan = FocusPlan()
    region: RegionSpec | None = Field(
        None, description="scan only a part of the sample (default: all of its usable area)")
    align: bool | Literal["auto"] = Field(
        "auto", description="find the sample's centre, rotation (notch, flat or edges) and "
        "die grid on the stage before tiling: true, false, or auto (wafers and PV cells)")


class StitchSpec(_Model):
    """How tiles are put together into the mosaic."""

    registration: bool = Field(
        True, description="register overlapping tiles (else: place them at stage positions)"
    )
    flatfield: bool = Field(
        True, description="estimate the vignetting from the tiles and divide it out"
    )
    max_shift_um: PositiveFloat | None = Field(
        None, description="largest pairwise position error searched; default: from the stage's "
        "repeatability (4.5 sigma of the difference of two tiles) plus 1 % of the step"
    )
    min_confidence: Annotated[float, Field(ge=0.0, le=1.0)] = Field(
        0.3, description="pairs whose normalized cross-correlation is lower are ignored"
    )


#: the longest scan name (UTF-8 bytes): a file system's 255 less the time stamp and number
#: that the scan folder's name adds (``-20260101-120000-99``)
MAX_NAME_BYTES = 255 - 24


def plain_folder_name(value: str) -> str:
    """A scan's name as it becomes a folder under ``output.root``: it must not climb out of
    it, name another folder, or hold control characters (a newline in a folder's name)."""
    if (not value.strip() or value in (".", "..") or any(c in value for c in "/\\:")
            or any(ord(c) < 32 or ord(c) == 127 for c in value)):
        raise ValueError(f"must be a plain folder name inside output.root (got {value!r})")
    size = len(value.encode("utf-8", "surrogateescape"))
    if size > MAX_NAME_BYTES:
        # the folder is NAME-YYYYMMDD-HHMMSS[-N]: past the file system's 255 bytes a name
        # failed when the scan folder was made ("File name too long", exit 1)
        raise ValueError(f"{size} bytes is too long for a folder name (at most "
                         f"{MAX_NAME_BYTES}, leaving room for the scan's time stamp); give a "
                         "shorter output.name")
    return value


class OutputSpec(_Model):
    """Where the scan folder goes (relative paths are relative to the working directory)."""

    root: Path = Path("scans")
    name: str | None = Field(None, description="default: the recipe file's name")
    chunk_px: Annotated[int, Field(ge=64, le=8192)] = 1024
    klarf_version: Literal["1.2", "1.8"] = Field(
        "1.2", description="KLARF version of defects.klarf: 1.2 (flat) or 1.8 (nested "
        "records); `report --klarf-version` overrides it")

    @field_validator("klarf_version", mode="before")
    @classmethod
    def _version_as_written(cls, value: Any) -> Any:
        # YAML reads `klarf_version: 1.8` as a number: "must be one of '1.2' or '1.8' (got
        # 1.8)" was no help
        return f"{value:.1f}" if isinstance(value, float) and value in (1.2, 1.8) else value

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str | None) -> str | None:
        return None if value is None else plain_folder_name(value)


class Recipe(_Model):
    """A whole scan: what is scanned, with what, how, and where the results go."""

    sample: Sample
    microscope: Microscope = SimulatedMicroscope()
    scan: ScanSpec = ScanSpec()
    output: OutputSpec = OutputSpec()
    stitch: StitchSpec = StitchSpec()
    #: the scan folder's name when ``output.name`` is not given
    name: str = "scan"

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        return plain_folder_name(value)

    @model_validator(mode="after")
    def _image_within_reach(self) -> Recipe:
        problem = image_beyond_reach(self)
        if problem:
            raise ValueError(problem)
        return self


#: how much a simulated camera's field may exceed its nominal one (a calibration's or the
#: camera's pixel-size error): the bounds of :func:`image_beyond_reach` are never tighter
#: than the plan's
_FIELD_MARGIN = 1.25


def image_beyond_reach(recipe: Recipe) -> str | None:
    """Why an image sample's scanned part, from its file's header, can never be planned on a
    simulated microscope: it reaches beyond the stage travel by more than a field, or it
    needs more than ``scan.max_tiles`` fields even without overlap; None when it might be.

    The whole file is read once when the sample is built (before the plan), to refuse
    damaged or negative pixels: a file of billions of pixels (a size typed wrong, a header
    declaring 200,000 x 200,000) was read for minutes before the plan refused it.
    """
    sample, scope = recipe.sample, recipe.microscope
    if not isinstance(sample, ImageSample) or not isinstance(scope, SimulatedMicroscope):
        return None
    from simulators.geometry import image_shape

    try:
        rows, cols = image_shape(sample.path)
    except UserError:
        return None  # named by the sample's own check or the plan
    r0, c0, nr, nc = sample.region_px or (0, 0, rows, cols)
    px = sample.pixel_size_um
    fov = (scope.camera.width * scope.camera.pixel_size_um * _FIELD_MARGIN,
           scope.camera.height * scope.camera.pixel_size_um * _FIELD_MARGIN)
    low = (sample.origin_um[0] + c0 * px, sample.origin_um[1] + r0 * px)
    size = (nc * px, nr * px)
    travel = (scope.stage.travel_x_um, scope.stage.travel_y_um)
    part = "the image" if sample.region_px is None else "its region_px"
    what = (f"{part} ({nc} x {nr} px at {px:g} µm/px: {size[0] / 1000:.4g} x "
            f"{size[1] / 1000:.4g} mm)")
    band = recipe.scan.region.band_mm if recipe.scan.region is not None else None
    # a band of stage y (scan.region) is scanned across the whole width only
    tall = size[1] if band is None else min(size[1], (band[1] - band[0]) * 1000.0)
    fields = (size[0] // fov[0]) * (tall // fov[1])  # inf for 1e300 µm pixels
    if fields > recipe.scan.max_tiles:
        return (f"scan.max_tiles: {what} needs more than {min(fields, 1e15):.3g} camera "
                f"fields, more than the limit {recipe.scan.max_tiles} (check "
                "sample.pixel_size_um, or scan a sample.region_px)")
    for axis, key in enumerate(("travel_x_um", "travel_y_um")[:1 if band else 2]):
        lo, hi = travel[axis]
        if low[axis] < lo - fov[axis] or low[axis] + size[axis] > hi + fov[axis]:
            return (f"sample.path: {what} reaches beyond the stage travel "
                    f"microscope.stage.{key} [{lo:g}, {hi:g}] µm (check sample.pixel_size_um, "
                    "origin_um and region_px)")
    return None


# --------------------------------------------------------------------------- loading


_MESSAGES = {
    "greater_than": "must be > {gt}",
    "greater_than_equal": "must be >= {ge}",
    "less_than": "must be < {lt}",
    "less_than_equal": "must be <= {le}",
    "missing": "required",
    "extra_forbidden": "unknown key",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "int_parsing": "must be an integer",
    "int_type": "must be an integer",
    "int_from_float": "must be an integer",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "tuple_type": "must be a list",
    "too_short": "needs {min_length} values",
    "too_long": "needs at most {max_length} values",
    "union_tag_invalid": "must be one of {expected_tags}",
    "union_tag_not_found": "needs a 'kind'",
    "model_type": "must be a mapping of keys",
    "model_attributes_type": "must be a mapping of keys",
    "dict_type": "must be a mapping of keys",
    "string_type": "must be text",
    "finite_number": "must be a finite number",
}

_KIND_TAGS = {"wafer", "pv_cell", "image", "rectangle", "simulated", "micromanager"}


def _format_error(error: dict[str, Any], root: str = "recipe") -> str:
    """One validation error as ``section.field: why`` (``root``: what a model validator of
    the top level is named by, "" for nothing: its message names its own field)."""
    loc = [str(p) for p in error["loc"]]
    # pydantic puts the union's tag in the location (sample.wafer.diameter_mm): drop it
    if len(loc) >= 2 and loc[0] in ("sample", "microscope") and loc[1] in _KIND_TAGS:
        del loc[1]
    where = ".".join(loc) or root
    kind = error["type"]
    if kind in ("value_error", "assertion_error"):
        message = str(error["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
        if not where:  # scan.json's top level: "acquired_tiles: ...", "alignment.center_um: ..."
            return message
        # a model validator may already name its field ("edge_exclusion_mm: ...")
        if ": " in message and message.split(": ", 1)[0].isidentifier():
            field, why = message.split(": ", 1)
            return f"{where}.{field}: {why}"
        # the whole recipe's validator names a field of any section (sample.path: ...)
        if not loc and ": " in message and all(
                part.isidentifier() for part in message.split(": ", 1)[0].split(".")):
            return message
        return f"{where}: {message}"
    template = _MESSAGES.get(kind)
    ctx = error.get("ctx") or {}
    if template is not None:
        try:
            why = template.format(**ctx)
        except KeyError:
            why = str(error["msg"])
    else:
        why = str(error["msg"])
    if kind == "literal_error":
        why = f"must be one of {ctx.get('expected', '')}"
    if kind == "union_tag_invalid":
        # the tag is the section's kind: name it and what was given ("Wafer")
        where += f".{ctx.get('discriminator', 'kind').strip(chr(39))}"
        why += f" (got {ctx.get('tag')!r})"
        return f"{where}: {why}"
    if kind not in ("missing", "extra_forbidden", MISSING_FILE) and "input" in error:
        got = error["input"]
        if isinstance(got, (str, int, float, bool)) or got is None:
            why += f" (got {got!r})"
    return f"{where}: {why}" if where else why


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The recipe section (pydantic model) that a validation error's location points into."""
    model: Any = Recipe
    parts = list(loc)
    while parts and model is not None:
        part = str(parts.pop(0))
        field = model.model_fields.get(part)
        if field is None:
            return None
        candidates = [a for a in _flatten(field.annotation) if isinstance(a, type)
                      and issubclass(a, BaseModel)]
        if len(candidates) > 1 and parts and str(parts[0]) in _KIND_TAGS:
            tag = str(parts.pop(0))
            candidates = [c for c in candidates if c.model_fields.get("kind") is not None
                          and c.model_fields["kind"].default == tag]
        model = candidates[0] if candidates else None
    return model


def _flatten(annotation: Any) -> list[Any]:
    """The classes inside an annotation (unions, Annotated, Optional, lists)."""
    args = get_args(annotation)
    if not args:
        return [annotation]
    return [leaf for arg in args for leaf in _flatten(arg)]


def _suggest(error: dict[str, Any]) -> str:
    """``(did you mean 'x'?)`` for an unknown key close to a valid one of its section."""
    loc = tuple(error["loc"])
    model = _model_at(loc[:-1])
    if model is None:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


#: how pydantic names the branches of a union of plain types in an error's location
_BRANCH = re.compile(r"^(bool|int|float|str|literal\[.*\])$")


def _union_error(errors: list[dict[str, Any]]) -> str | None:
    """One line for a field that matched no branch of a union (``true | false | 'auto'``).

    pydantic reports each branch as its own error located at ``field.bool``,
    ``field.literal['auto']``...; the user needs the field and every accepted value.
    """
    loc = [str(p) for p in errors[0]["loc"]]
    if len(loc) < 2 or not _BRANCH.match(loc[-1]):
        return None
    field = loc[:-1]
    accepted = []
    for e in errors:
        where = [str(p) for p in e["loc"]]
        if where[:-1] != field or not _BRANCH.match(where[-1]):
            continue
        if e["type"].startswith("bool"):
            accepted.append("true or false")
        elif e["type"] == "literal_error":
            accepted.append(str((e.get("ctx") or {}).get("expected", "")))
        else:
            accepted.append(_MESSAGES.get(e["type"], str(e["msg"])).removeprefix("must be "))
    first = dict(errors[0], loc=tuple(field))
    got = first.get("input")
    shown = f" (got {got!r})" if isinstance(got, (str, int, float, bool)) else ""
    return f"{_format_error(first).split(': ', 1)[0]}: must be {' or '.join(accepted)}{shown}"


def format_validation_error(exc: ValidationError, root: str = "recipe") -> str:
    """Summarise a pydantic error as one line naming the first bad field (``root``: the name
    of the validated document's top level, "" where its fields are named alone).

    An unknown key is reported first: a misspelt key also makes its real key "missing",
    and the misspelling is what the user has to fix. A file that is not there comes last:
    in a scan's recorded recipe it has only moved, and the other problems are the damage.
    """
    errors = sorted(exc.errors(), key=lambda e: (e["type"] != "extra_forbidden",
                                                 e["type"] == MISSING_FILE))
    union = _union_error(errors)
    if union is not None:
        return union
    line = _format_error(errors[0], root)
    if errors[0]["type"] == "extra_forbidden":
        line += _suggest(errors[0])
    if len(errors) > 1:
        line += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return line


def parse_recipe(data: Any, base_dir: Path, name: str = "scan") -> Recipe:
    """Validate recipe data (already parsed from YAML).

    Parameters
    ----------
    data : Any
        The YAML document.
    base_dir : Path
        Folder that relative paths in the recipe are resolved against.
    name : str
        Default scan name (the recipe file's stem).

    Raises
    ------
    RecipeError
        With one line naming the field and why.
    """
    if not isinstance(data, dict):
        raise RecipeError(
            "recipe: must be a mapping with sample, microscope, scan, output sections"
        )
    try:  # a recipe file's name that would not make a folder name gives the default
        name = plain_folder_name(name)
    except ValueError:
        name = "scan"
    data = {"name": name, **data}
    try:
        return Recipe.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        raise RecipeError(format_validation_error(exc),
                          frozenset(e["type"] for e in exc.errors())) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: PyYAML keeps the last
    silently, so a second ``sample:`` block would replace the first without a word."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # ``<<: *defaults``: its keys are the defaults the mapping's own override
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping",
                    key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe YAML file.

    Raises
    ------
    RecipeError
        If the file is missing, is not valid YAML, or does not validate.
    """
    path = Path(path)
    if path.is_dir():
        raise RecipeError(f"{path}: a folder, not a recipe file")
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f": line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise RecipeError(f"{path}{where}: {problem}") from None
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: {_not_utf8(path, exc)}") from None
    if data is None:
        raise RecipeError(f"{path}: recipe is empty")
    try:
        return parse_recipe(data, base_dir=path.resolve().parent, name=path.stem)
    except RecipeError as exc:
        raise RecipeError(f"{path.name}: {exc}") from None


def _not_utf8(path: Path, exc: UnicodeDecodeError) -> str:
    """Why a recipe file did not decode: binary data, or text in another encoding than UTF-8
    (a recipe saved as Latin-1 by an editor), with the line of the first byte that is not."""
    raw = path.read_bytes()
    if b"\0" in raw[:8192]:
        return "not a text file"
    line = raw[: exc.start].count(b"\n") + 1
    return (f"line {line}: byte 0x{raw[exc.start]:02x} is not UTF-8 (save the recipe as "
            "UTF-8 text)")


#: where each section a finished scan reads back sits in the recipe ``scan.json`` records
RECORDED_SECTIONS: dict[type[BaseModel], tuple[str, ...]] = {
    StitchSpec: ("stitch",),
    OutputSpec: ("output",),
    StageSpec: ("microscope", "stage"),
}


def recorded(scan: dict[str, Any], section: type[_SectionT]) -> _SectionT:
    """A section of the recipe recorded in ``scan.json``, parsed by its own model.

    The one place later stages (restitch, report) read a scan's settings back: the defaults
    are the model's, never restated by hand. Only the section is validated, so a scan whose
    sample file has moved since still restitches and reports.

    Raises
    ------
    RecipeError
        The recorded section does not validate (it names the field).
    """
    path = RECORDED_SECTIONS[section]
    data: Any = scan.get("recipe") or {}
    for key in path:
        data = (data.get(key) if isinstance(data, dict) else None) or {}
    try:
        return section.model_validate(data)
    except ValidationError as exc:
        where = ".".join(path)
        raise RecipeError(f"scan.json recipe.{where}: {format_validation_error(exc)}") from None


_SAMPLE_ADAPTER: TypeAdapter[Any] = TypeAdapter(Sample)


def recorded_sample(scan: dict[str, Any], base_dir: Path) -> Any:
    """The sample section recorded in ``scan.json``, parsed by the recipe's own models.

    As :func:`recorded`, for the sample (a union of kinds, so not a key of
    :data:`RECORDED_SECTIONS`): relative paths resolve against ``base_dir`` (the scan folder).

    Raises
    ------
    RecipeError
        The recorded sample does not validate (it names the field), or there is none.
    """
    data = (scan.get("recipe") or {}).get("sample")
    if not isinstance(data, dict):
        raise RecipeError("scan.json recipe.sample: missing")
    try:
        return _SAMPLE_ADAPTER.validate_python(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        raise RecipeError(f"scan.json recipe.sample: {format_validation_error(exc)}",
                          frozenset(e["type"] for e in exc.errors())) from None
