"""Offline checks of a Micro-Manager configuration file, before any device is touched.

``UniMMCore.loadSystemConfiguration`` runs a ``.cfg`` line by line and stops at the first
device adapter it cannot load, with a multi-line C++ message. Parsing it first with
``pymmcore_plus.model.Microscope`` (which loads nothing) lets us name every missing adapter and
every Python device (``#py pyDevice`` lines) that cannot be imported, in one line.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from pymmcore_plus.model import Microscope

from .errors import ConfigError

#: Core properties that name the device of each role (what ``microscope.roles`` sets)
ROLE_PROPERTIES = {"camera": "Camera", "xy_stage": "XYStage", "focus": "Focus",
                   "autofocus": "AutoFocus", "shutter": "Shutter"}
_PY_PREFIX = "#py "


@dataclass
class ConfigSummary:
    """What a ``.cfg`` declares.

    Attributes
    ----------
    devices : dict
        Label → ``(library, device name)`` of the C++ devices.
    py_devices : dict
        Label → ``(module, class)`` of the Python devices.
    roles : dict
        Role → device label, from the Core properties the file sets.
    pixel_size_um : float or None
        The first pixel-size preset's size, if the file defines one.
    """

    devices: dict[str, tuple[str, str]] = field(default_factory=dict)
    py_devices: dict[str, tuple[str, str]] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)
    pixel_size_um: float | None = None


def _adapter_dirs(adapter_path: Path | None) -> list[Path]:
    dirs = [Path(adapter_path)] if adapter_path else []
    from pymmcore_plus import find_micromanager

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = find_micromanager(return_first=False) or []
    dirs += [Path(p) for p in found]
    return dirs


def _adapter_installed(library: str, dirs: list[Path]) -> bool:
    # Micro-Manager names its adapter files mmgr_dal_<Library>(.dll) / libmmgr_dal_<Library>(.so)
    stems = (f"mmgr_dal_{library}", f"libmmgr_dal_{library}")
    for d in dirs:
        if not d.is_dir():
            continue
        for entry in os.listdir(d):
            if entry.split(".", 1)[0] in stems:
                return True
    return False


def _py_device_found(module: str, cls: str) -> bool:
    try:
        return hasattr(importlib.import_module(module), cls)
    except ImportError:
        return False


def read_config(path: Path) -> ConfigSummary:
    """Parse a ``.cfg`` without loading anything.

    Raises
    ------
    ConfigError
        If the file cannot be parsed.
    """
    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the model warns about lines it cannot apply offline
        try:
            model = Microscope.create_from_config(str(path))
        except Exception as exc:  # the parser raises plain exceptions with the line
            raise ConfigError(f"microscope.config: {path.name}: cannot be read ({exc})") from None
    summary = ConfigSummary()
    for device in model.devices:
        summary.devices[device.name] = (device.library, device.adapter_name)
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if line.startswith(_PY_PREFIX):
            tokens = [t.strip() for t in line[len(_PY_PREFIX):].split(",")]
            if tokens[0] == "pyDevice" and len(tokens) == 4:
                summary.py_devices[tokens[1]] = (tokens[2], tokens[3])
            elif tokens[:2] == ["Property", "Core"] and len(tokens) == 4:
                role = {v: k for k, v in ROLE_PROPERTIES.items()}.get(tokens[2])
                if role and tokens[3]:
                    summary.roles[role] = tokens[3]
    for prop in model.core_device.properties:
        role = {v: k for k, v in ROLE_PROPERTIES.items()}.get(prop.name)
        if role and prop.value and role not in summary.roles:
            summary.roles[role] = str(prop.value)
    sizes = [p.pixel_size_um for p in model.pixel_size_group.presets.values()
             if p.pixel_size_um > 0]
    summary.pixel_size_um = float(sizes[0]) if sizes else None
    return summary


def check_config(path: Path, adapter_path: Path | None = None,
                 roles: dict[str, str] | None = None) -> ConfigSummary:
    """Refuse a ``.cfg`` whose devices cannot be loaded here, naming all of them at once.

    Parameters
    ----------
    path : Path
        The configuration file.
    adapter_path : Path, optional
        Extra folder of device adapters (``microscope.adapter_path``).
    roles : dict, optional
        ``microscope.roles`` (role → label): every label must be a device of the file.

    Raises
    ------
    ConfigError
        One line: the missing adapters, the Python devices that cannot be imported, or a role
        naming no device.
    """
    summary = read_config(path)
    dirs = _adapter_dirs(adapter_path)
    missing = sorted({lib for lib, _ in summary.devices.values()
                      if not _adapter_installed(lib, dirs)})
    if missing:
        raise ConfigError(
            f"microscope.config: {Path(path).name} needs device adapters not installed here: "
            f"{', '.join(missing)} (run `mmcore install`, or set microscope.adapter_path)")
    if str(Path(path).parent) not in sys.path:  # a .cfg may name modules beside it
        sys.path.append(str(Path(path).parent))
    bad = [f"{label} ({module}.{cls})" for label, (module, cls) in summary.py_devices.items()
           if not _py_device_found(module, cls)]
    if bad:
        raise ConfigError(f"microscope.config: {Path(path).name}: Python devices that cannot "
                          f"be imported: {', '.join(bad)}")
    labels = set(summary.devices) | set(summary.py_devices)
    for role, label in (roles or {}).items():
        if label not in labels:
            raise ConfigError(f"microscope.roles.{role}: {label!r} is not a device of "
                              f"{Path(path).name} (devices: {', '.join(sorted(labels))})")
    return summary
