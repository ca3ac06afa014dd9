"""What a loaded core holds: devices, their roles, libraries and ports (for ``scan.json``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict
from pymmcore_plus import CMMCorePlus

#: Micro-Manager's usual names of a serial port property (C++ adapters and waferscope's)
_PORT_PROPERTIES = ("Port", "COM Port", "SerialPort")


class DeviceRecord(BaseModel):
    """One loaded device as ``scan.json`` records it."""

    model_config = ConfigDict(frozen=True)

    label: str
    role: str | None
    library: str
    name: str
    type: str
    port: str | None = None


def roles(core: CMMCorePlus) -> dict[str, str]:
    """Device label → the role the core gives it (camera, xy_stage, focus, ...)."""
    current = {
        "camera": core.getCameraDevice(),
        "xy_stage": core.getXYStageDevice(),
        "focus": core.getFocusDevice(),
        "autofocus": core.getAutoFocusDevice(),
        "shutter": core.getShutterDevice(),
    }
    return {label: role for role, label in current.items() if label}


def inventory(core: CMMCorePlus) -> list[DeviceRecord]:
    """Every loaded device but the Core itself, with its role and serial port if any."""
    by_label = roles(core)
    records = []
    for label in core.getLoadedDevices():
        if label == "Core":
            continue
        props = set(map(str, core.getDevicePropertyNames(label)))
        port = next((core.getProperty(label, p) for p in _PORT_PROPERTIES if p in props), None)
        records.append(DeviceRecord(
            label=label,
            role=by_label.get(label),
            library=core.getDeviceLibrary(label),
            name=core.getDeviceName(label),
            type=str(core.getDeviceType(label)).rsplit(".", 1)[-1],
            port=str(port) if port else None,
        ))
    return records


def inventory_json(core: CMMCorePlus) -> list[dict[str, Any]]:
    """:func:`inventory` as plain data."""
    return [r.model_dump() for r in inventory(core)]
