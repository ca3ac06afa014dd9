"""Map a recipe's ``sample:`` section onto a virtual sample of the simulator."""

from __future__ import annotations

from typing import Any

from simulators.samples import VirtualSample, make_sample

from scanner.errors import UserError


def sample_for_recipe(sample: Any) -> VirtualSample:
    """Build the simulator's virtual sample for a recipe sample model.

    Parameters
    ----------
    sample : WaferSample | PVCellSample | ImageSample | RectangleSample
        The validated ``sample:`` section.
    """
    params = sample.model_dump(exclude={"kind", "defects", "lot_id", "wafer_id"})
    params["n_defects"] = sample.defects.count
    params["seed"] = sample.defects.seed
    if sample.defects.kinds is not None:
        params["defect_kinds"] = list(sample.defects.kinds)
    try:
        return make_sample(sample.kind, **params)
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(f"sample: {exc}") from None
