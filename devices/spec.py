"""The pydantic models of a recipe's ``microscope:`` section, and what they are built from.

``microscope`` is tagged by ``kind``: :class:`SimulatedMicroscope` (the built-in simulator) or
:class:`MicroManagerMicroscope` (a Micro-Manager configuration file). The device layer builds a
core from them (:mod:`devices.core`); ``scanner.recipe`` puts them into a whole recipe and
re-exports them. :class:`SpecModel` and the path helpers are the base of every recipe section.
"""

from __future__ import annotations

from pathlib import Path
from types import UnionType
from typing import Annotated, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from .calibration import MAX_PIXEL_SIZE_UM, read_camera_calibration
from .errors import UserError

PositiveFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
#: the largest coordinate or length a recipe may give (1 km in µm, or in mm): beyond any stage
#: or sample; at 1e19 µm adding a sample's half-width is lost in rounding, and a polygon of
#: one point was refused deep in the plan (exit 1, naming no field)
MAX_COORDINATE = 1e9
Coordinate = Annotated[float, Field(ge=-MAX_COORDINATE, le=MAX_COORDINATE)]
XY = tuple[Coordinate, Coordinate]
#: a random seed: numpy's generators refuse a negative one (deep in the build, with no field)
Seed = Annotated[int, Field(ge=0)]
#: a pixel size at the sample (µm): above a millimetre it is a slip of the unit, and it was
#: reported as a die pitch too small to see
PixelSize = Annotated[float, Field(gt=0, le=MAX_PIXEL_SIZE_UM)]


class SpecModel(BaseModel):
    """Base for recipe sections: unknown keys are errors (a typo must not pass silently)."""

    # inf/NaN would pass every range check of a float field and fail deep inside the plan
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_yes_no_numbers(cls, data: object) -> object:
        # pydantic's lax mode takes `true` for 1.0: `pixel_size_um: true` would scan at 1 um
        if isinstance(data, dict):
            for key, value in data.items():
                field = cls.model_fields.get(key) if isinstance(key, str) else None
                if field is None:
                    continue
                if isinstance(value, bool) and _numeric(field.annotation):
                    raise ValueError(f"{key}: a number, not true/false")
                # the same in a pair or list of numbers: `die_pitch_mm: [true, true]` is 1 mm
                if isinstance(value, (list, tuple)) and any(isinstance(v, bool) for v in value) \
                        and _numeric_items(field.annotation):
                    raise ValueError(f"{key}: numbers, not true/false (got {list(value)!r})")
                # pydantic's own words name a Python class ("Input is not a valid path for
                # <class 'pathlib.Path'>"), not what to write
                if _takes(field.annotation, Path) and not isinstance(value, (str, Path)) \
                        and not (value is None and _takes(field.annotation, type(None))):
                    raise ValueError(f"{key}: a file path (text), got {value!r}")
        return data


def _numeric(annotation: object) -> bool:
    """Whether a field takes numbers and not true/false (``float``, ``int | None``, ...)."""
    if annotation in (int, float):
        return True
    args = get_args(annotation)
    if not args or bool in args:
        return False
    if get_origin(annotation) is Annotated:
        return _numeric(args[0])
    return get_origin(annotation) in (Union, UnionType) and any(_numeric(a) for a in args)


def _numeric_items(annotation: object) -> bool:
    """Whether a field takes a tuple or list of numbers (``tuple[float, float] | None``...)."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _numeric_items(get_args(annotation)[0])
    if origin in (tuple, list):
        return any(_numeric(a) for a in get_args(annotation) if a is not Ellipsis)
    return origin in (Union, UnionType) and any(_numeric_items(a) for a in get_args(annotation))


def _takes(annotation: object, kind: type) -> bool:
    """Whether a field's annotation is ``kind`` or a union holding it."""
    if annotation is kind:
        return True
    if get_origin(annotation) is Annotated:
        return _takes(get_args(annotation)[0], kind)
    return get_origin(annotation) in (Union, UnionType) and \
        any(_takes(a, kind) for a in get_args(annotation))


def resolve_path(value: Path, info: ValidationInfo) -> Path:
    """Resolve a relative path against the recipe's folder (given in the validation context)."""
    base = (info.context or {}).get("base_dir")
    path = Path(value).expanduser()
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    return path.resolve()


#: pydantic error type of a named file that is not there (or is a folder): a recorded recipe
#: whose sample or configuration file has moved since the scan is told from a damaged one by it
MISSING_FILE = "file_missing"


def existing_file(value: Path | None, info: ValidationInfo) -> Path | None:
    """Resolve an optional path and check that the file exists (error type
    :data:`MISSING_FILE` when it does not)."""
    if value is None:
        return None
    path = resolve_path(value, info)
    if path.is_dir():
        raise PydanticCustomError(MISSING_FILE, "{path} is a folder, not a file",
                                  {"path": str(path)})
    if not path.is_file():
        raise PydanticCustomError(MISSING_FILE, "file not found: {path}", {"path": str(path)})
    return path



class CameraSpec(SpecModel):
    """Camera sensor and image formation."""

    width: Annotated[int, Field(gt=0, le=16384)] = 1024
    height: Annotated[int, Field(gt=0, le=16384)] = 1024
    pixel_size_um: PixelSize = 1.0
    bit_depth: Literal[8, 10, 12, 14, 16] = 12
    exposure_ms: PositiveFloat = 10.0
    readout_ms: NonNegFloat = 20.0
    full_well_e: PositiveFloat = 10000.0
    read_noise_e: NonNegFloat = 5.0
    noise: bool = True
    vignetting: Annotated[float, Field(ge=0.0, lt=0.9)] = Field(
        0.08, description="simulated illumination loss at the sensor corners (0.08 = 8 %)"
    )
    rotation_deg: Annotated[float, Field(ge=-5.0, le=5.0)] = Field(
        0.0, description="simulated sensor rotation against the stage axes (truth; calibrate it)"
    )
    pixel_size_error: Annotated[float, Field(gt=-0.1, lt=0.1)] = Field(
        0.0, description="simulated true pixel size = pixel_size_um * (1 + error) (truth)"
    )


class StageSpec(SpecModel):
    """XY stage travel and mechanics, and (simulated microscope) how it is driven."""

    travel_x_um: XY = (-100_000.0, 100_000.0)
    travel_y_um: XY = (-100_000.0, 100_000.0)
    speed_um_s: PositiveFloat = 20_000.0
    acceleration_um_s2: PositiveFloat = 200_000.0
    settle_ms: NonNegFloat = 30.0
    repeatability_um: NonNegFloat = 2.0
    driver: Literal["direct", "prior", "asi"] = Field(
        "direct", description="simulated microscope: direct (a Python device moves the "
        "simulated stage), or prior / asi (the Prior ProScan III / ASI MS-2000 serial driver "
        "talking to an emulated controller that moves it)")
    port: str | None = Field(
        None, description="simulated microscope with driver prior / asi: default the emulator "
        "bound to the simulated stage; a waferscope-emu:// URL may add emulator options")

    @field_validator("travel_x_um", "travel_y_um")
    @classmethod
    def _ordered(cls, value: XY) -> XY:
        if value[0] >= value[1]:
            raise ValueError("must be (min, max) with min < max")
        return value


class FocusSpec(SpecModel):
    """Focus drive (Z) range and mechanics."""

    z_um: float = 0.0
    range_um: XY = (-500.0, 500.0)
    speed_um_s: PositiveFloat = 1000.0
    settle_ms: NonNegFloat = 10.0

    @model_validator(mode="after")
    def _z_in_range(self) -> FocusSpec:
        lo, hi = self.range_um
        if lo >= hi:
            raise ValueError("range_um: must be (min, max) with min < max")
        if not lo <= self.z_um <= hi:
            raise ValueError(f"z_um: {self.z_um} is outside range_um {self.range_um}")
        return self


class ObjectiveSpec(SpecModel):
    """Objective lens; its depth of field sets the focus tolerances."""

    numerical_aperture: Annotated[float, Field(gt=0, lt=1.0)] = 0.3
    wavelength_um: PositiveFloat = 0.55
    magnification: PositiveFloat = 10.0

    @property
    def depth_of_field_um(self) -> float:
        """Wave-optical depth of field ``lambda / NA**2``."""
        return self.wavelength_um / self.numerical_aperture**2

    def effective_depth_of_field_um(self, pixel_size_um: float) -> float:
        """Depth of field seen through a camera pixel: ``lambda / NA**2 + pixel / NA``.

        Where the pixel (in sample space) is coarser than the optics resolve, the image
        hardly changes until the blur spans a pixel; the focus targets still use the
        stricter optical ``depth_of_field_um``.
        """
        return self.depth_of_field_um + pixel_size_um / self.numerical_aperture


class _CalibratedMicroscope(SpecModel):
    """What every microscope section has: an optional camera calibration."""

    calibration: Path | None = Field(
        None, description="camera calibration file from `waferscope calibrate` (pixel size, "
        "rotation) used to place tiles"
    )

    @field_validator("calibration")
    @classmethod
    def _calibration_exists(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        path = existing_file(value, info)
        if path is not None:
            # its values too: a NaN or zero pixel size failed inside the plan, with no field
            try:
                read_camera_calibration(path)
            except UserError as exc:
                raise ValueError(str(exc)) from None
        return path


class FaultsSpec(SpecModel):
    """Hardware faults injected into the simulated microscope (to exercise the retries)."""

    serial_error_rate: Annotated[float, Field(ge=0.0, lt=1.0)] = Field(
        0.0, description="share of serial commands to the emulated stage controller that fail "
        "(garbled, lost or error reply, stuck busy flag, limit switch); needs stage.driver "
        "prior or asi")
    camera_timeout_rate: Annotated[float, Field(ge=0.0, lt=1.0)] = Field(
        0.0, description="share of snaps that time out")
    seed: Seed = Field(0, description="seed of the fault draws")


class SimulatedMicroscope(_CalibratedMicroscope):
    """The built-in simulated microscope (pure-Python Micro-Manager devices)."""

    kind: Literal["simulated"] = "simulated"
    camera: CameraSpec = CameraSpec()
    stage: StageSpec = StageSpec()
    focus: FocusSpec = FocusSpec()
    objective: ObjectiveSpec = ObjectiveSpec()
    realtime: bool = Field(False, description="really sleep the simulated hardware time")
    seed: Seed = 0
    faults: FaultsSpec = FaultsSpec()

    @field_validator("stage")
    @classmethod
    def _emulated_port(cls, value: StageSpec) -> StageSpec:
        scheme = "waferscope-emu://"
        if value.port is None:
            return value
        if value.driver == "direct":
            raise ValueError("port: only with driver prior or asi")
        if not value.port.lower().startswith(f"{scheme}{value.driver}"):
            raise ValueError(f"port: the simulated microscope's {value.driver} stage is the "
                             f"emulator; leave port unset or give a {scheme}{value.driver} URL")
        return value

    # a field validator (not a model validator) so the error names faults.serial_error_rate;
    # stage is declared before faults, so it is validated already
    @field_validator("faults")
    @classmethod
    def _serial_faults_need_a_serial_stage(
        cls, value: FaultsSpec, info: ValidationInfo
    ) -> FaultsSpec:
        stage = info.data.get("stage")
        if value.serial_error_rate > 0 and stage is not None and stage.driver == "direct":
            raise ValueError("serial_error_rate: needs microscope.stage.driver prior or asi "
                             "(the direct stage has no serial line)")
        return value


class RolesSpec(SpecModel):
    """Which device of a Micro-Manager configuration plays each role (device labels)."""

    camera: str | None = None
    xy_stage: str | None = None
    focus: str | None = None
    autofocus: str | None = None
    shutter: str | None = None


class MicroManagerMicroscope(_CalibratedMicroscope):
    """Real hardware through a Micro-Manager configuration file."""

    kind: Literal["micromanager"] = "micromanager"
    config: Path
    adapter_path: Path | None = None
    pixel_size_um: PixelSize | None = Field(
        None, description="pixel size when neither a calibration nor the configuration's "
        "pixel-size presets give one"
    )
    roles: RolesSpec | None = Field(
        None, description="device labels of each role (default: the configuration's Core "
        "properties)")
    stage: StageSpec = Field(
        StageSpec(), description="travel limits (required: Micro-Manager does not report them) "
        "and mechanics"
    )
    focus: FocusSpec = FocusSpec()
    objective: ObjectiveSpec = ObjectiveSpec()

    @field_validator("stage")
    @classmethod
    def _travel_given(cls, value: StageSpec) -> StageSpec:
        # a real stage has no safe default travel: the recipe must say where its limits are
        for key in ("travel_x_um", "travel_y_um"):
            if key not in value.model_fields_set:
                raise ValueError(f"{key}: required for kind: micromanager (the stage's safe "
                                 "travel in stage µm, e.g. [-50000, 50000])")
        # each key named on its own: a port alone was reported as the driver
        if value.driver != "direct":
            raise ValueError("driver: only for kind: simulated (a real rig names its stage "
                             "driver in the .cfg)")
        if value.port is not None:
            raise ValueError("port: only for kind: simulated (a real rig names its stage's "
                             "port in the .cfg)")
        return value

    @field_validator("config")
    @classmethod
    def _config_exists(cls, value: Path, info: ValidationInfo) -> Path:
        path = existing_file(value, info)
        if path.suffix.lower() != ".cfg":
            raise ValueError(f"not a Micro-Manager .cfg file: {path}")
        return path

    @field_validator("adapter_path")
    @classmethod
    def _adapters_exist(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is None:
            return None
        path = resolve_path(value, info)
        if not path.is_dir():
            raise ValueError(f"folder not found: {path}")
        return path


Microscope = Annotated[
    SimulatedMicroscope | MicroManagerMicroscope, Field(discriminator="kind")
]
