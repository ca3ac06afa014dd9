"""Read a camera calibration file written by ``waferscope calibrate``.

The file is JSON with ``pixel_size_um`` and (optionally, default 0) ``rotation_deg``: the
measured pixel size at the sample and the sensor's rotation against the stage axes. The device
layer applies them to the core (:func:`devices.core.apply_calibration`).
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError


def read_camera_calibration(path: str | Path) -> tuple[float, float]:
    """``(pixel_size_um, rotation_deg)`` of a calibration file.

    Raises
    ------
    UserError
        If the file is missing or does not hold ``pixel_size_um`` and ``rotation_deg``.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return float(data["pixel_size_um"]), float(data.get("rotation_deg", 0.0))
    except FileNotFoundError:
        raise UserError(f"{path}: calibration file not found") from None
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path}: not a calibration file (needs pixel_size_um, rotation_deg)")\
            from None
