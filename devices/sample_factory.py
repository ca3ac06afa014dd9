"""Map a recipe's ``sample:`` section onto a virtual sample of the simulator."""

from __future__ import annotations

from typing import Any

import numpy as np

from simulators.samples import VirtualSample, make_sample
from simulators.surface import FocalSurface

from .errors import UserError

#: the simulator's parameters that a recipe names otherwise (its errors name the recipe's)
_RECIPE_FIELD = {"defect_kinds": "defects.kinds", "n_defects": "defects.count"}


def sample_for_recipe(sample: Any) -> VirtualSample:
    """Build the simulator's virtual sample for a recipe sample model.

    Parameters
    ----------
    sample : WaferSample | PVCellSample | ImageSample | RectangleSample
        The validated ``sample:`` section.
    """
    # die_to_die is how the inspection treats the sample, not how the sample looks; an image
    # or a coupon looks as its file or the simulator draws it, whatever die grid it is given
    exclude = {"kind", "defects", "surface", "die_to_die", "placement"}
    if sample.kind in ("image", "rectangle"):
        exclude |= {"die_pitch_mm", "die_origin_mm"}
    params = sample.model_dump(exclude=exclude)
    params["n_defects"] = sample.defects.count
    params["seed"] = sample.defects.seed
    # the design (die layout, texture) follows defects.seed unless the recipe seeds it apart
    if params.get("design_seed") is None:
        params.pop("design_seed", None)
    if sample.defects.kinds is not None:
        params["defect_kinds"] = list(sample.defects.kinds)
    try:
        built = make_sample(sample.kind, **params)
    except (FileNotFoundError, ValueError) as exc:
        # "path: cannot read ..." from the sample names its field: say sample.path
        field, sep, rest = str(exc).partition(": ")
        field = _RECIPE_FIELD.get(field, field)
        known = field in type(sample).model_fields or field in _RECIPE_FIELD.values()
        where = f"sample.{field}" if sep and known else "sample"
        raise UserError(f"{where}: {rest if where != 'sample' else exc}") from None
    return placed(built, getattr(sample, "placement", None))


def placed(sample: VirtualSample, spec: Any) -> VirtualSample:
    """The sample where ``sample.placement`` puts it (itself when it lies exactly in place)."""
    from simulators.samples.placement import PlacedSample, draw_placement

    if spec is None:
        return sample
    if spec.random:
        dx, dy, rot = draw_placement(spec.seed, spec.max_offset_um, spec.max_rotation_deg)
        return PlacedSample(sample, (dx, dy), rot, {"random": True, "seed": spec.seed})
    if tuple(spec.offset_um) == (0.0, 0.0) and spec.rotation_deg == 0.0:
        return sample  # the default: exactly where the recipe says, rendered as before
    return PlacedSample(sample, spec.offset_um, spec.rotation_deg)


def focal_surface_for_recipe(sample: Any) -> FocalSurface:
    """The simulated focal surface of a recipe sample, centred on the sample's region."""
    from simulators.geometry import usable_polygon

    region = usable_polygon(sample, notch=False)  # centred on the wafer's circle
    cx, cy = region.centroid.x, region.centroid.y
    xs, ys = np.asarray(region.exterior.coords).T
    radius = float(np.max(np.hypot(xs - cx, ys - cy)))
    if sample.kind == "wafer":
        radius = sample.diameter_mm * 500.0  # the bow is referenced to the wafer's own edge
    spec = sample.surface
    return FocalSurface(
        tilt_um_per_mm=spec.tilt_um_per_mm,
        bow_um=spec.bow_um,
        waviness_um=spec.waviness_um,
        waviness_period_mm=spec.waviness_period_mm,
        center_um=(cx, cy),
        radius_um=max(radius, 1.0),
        z0_um=spec.z0_um,
        seed=spec.seed,
        bumps=tuple((*b.center_um, b.height_um, b.radius_um) for b in spec.bumps),
    )
