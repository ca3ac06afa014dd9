"""Read a camera calibration file written by ``waferscope calibrate``.

The file is JSON with ``pixel_size_um`` and (optionally, default 0) ``rotation_deg``: the
measured pixel size at the sample and the sensor's rotation against the stage axes. The device
layer applies them to the core (:func:`devices.core.apply_calibration`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .errors import UserError

#: largest pixel size at the sample a calibration may give (µm), as ``camera.pixel_size_um``
MAX_PIXEL_SIZE_UM = 1000.0
#: largest camera rotation a calibration may give (degrees): turned further, the camera's rows
#: run along the stage's y axis and its tile grid no longer fits the plan's (``calibrate``
#: itself measures a few degrees at most)
MAX_ROTATION_DEG = 45.0


def read_camera_calibration(path: str | Path) -> tuple[float, float]:
    """``(pixel_size_um, rotation_deg)`` of a calibration file.

    Raises
    ------
    UserError
        If the file is missing or does not hold ``pixel_size_um`` and ``rotation_deg``, or
        they are out of range (a pixel size finite and in (0, :data:`MAX_PIXEL_SIZE_UM`], a
        rotation finite and within +-:data:`MAX_ROTATION_DEG`).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        pixel, rotation = data["pixel_size_um"], data.get("rotation_deg", 0.0)
        if isinstance(pixel, bool) or isinstance(rotation, bool):
            raise TypeError("true/false is not a number")
        pixel, rotation = float(pixel), float(rotation)
    except FileNotFoundError:
        raise UserError(f"{path}: calibration file not found") from None
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path}: not a calibration file (needs pixel_size_um, rotation_deg)")\
            from None
    # json reads NaN and Infinity, and a file may be edited by hand: a pixel size of 0 divided
    # by zero, a negative one emptied the plan, a NaN rotation moved the stage to nowhere
    if not (math.isfinite(pixel) and 0 < pixel <= MAX_PIXEL_SIZE_UM):
        raise UserError(f"{path}: pixel_size_um must be a finite number > 0 and <= "
                        f"{MAX_PIXEL_SIZE_UM:g} µm (got {pixel!r})")
    if not (math.isfinite(rotation) and abs(rotation) <= MAX_ROTATION_DEG):
        raise UserError(f"{path}: rotation_deg must be a finite number of degrees within "
                        f"+-{MAX_ROTATION_DEG:g} (got {rotation!r})")
    return pixel, rotation
