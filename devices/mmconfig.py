"""Offline checks of a Micro-Manager configuration file, before any device is touched.

``UniMMCore.loadSystemConfiguration`` runs a ``.cfg`` line by line and stops at the first
device adapter it cannot load, with a multi-line C++ message. Parsing it first with
``pymmcore_plus.model.Microscope`` (which loads nothing) lets us name every missing adapter and
every Python device (``#py pyDevice`` lines) that cannot be imported, in one line.
"""

from __future__ import annotations

import codecs
import importlib
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pymmcore_plus.model import Microscope

from .errors import ConfigError

#: Core properties that name the device of each role (what ``microscope.roles`` sets)
ROLE_PROPERTIES = {"camera": "Camera", "xy_stage": "XYStage", "focus": "Focus",
                   "autofocus": "AutoFocus", "shutter": "Shutter"}
_PY_PREFIX = "#py "


#: a pixel-size preset's affine when the file gives none (the core then uses the size alone)
_DEFAULT_AFFINE = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


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
    pixel_presets : dict
        Preset name → ``(pixel size µm, affine or None, [(device, property, value), ...])``:
        each pixel-size preset with a size, and the settings it applies to.
    """

    devices: dict[str, tuple[str, str]] = field(default_factory=dict)
    py_devices: dict[str, tuple[str, str]] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)
    pixel_size_um: float | None = None
    pixel_presets: dict[str, tuple[float, tuple[float, ...] | None,
                                   list[tuple[str, str, str]]]] = field(default_factory=dict)


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


def config_text(path: Path) -> str:
    """The text of a ``.cfg``, read as tolerantly as its meaning allows.

    pymmcore-plus reads a file as strict UTF-8, so a byte-order mark (Windows editors save
    one) became part of the first command's name, and a Latin-1 "µ" in a comment refused
    the whole file with a byte offset. The mark is dropped; a comment line (``#``, not
    ``#py``) is never parsed, so its undecodable bytes are replaced; anywhere else they
    are an error naming the line.

    Raises
    ------
    ConfigError
        A command line that is not UTF-8 text.
    """
    path = Path(path)
    raw = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    lines = []
    for number, line in enumerate(raw.splitlines(keepends=True), start=1):
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError as exc:
            command = line.strip()
            if not command.startswith(b"#") or command.startswith(_PY_PREFIX.encode()):
                raise ConfigError(
                    f"microscope.config: {path.name}: line {number} is not UTF-8 text "
                    f"(byte 0x{line[exc.start]:02x}); save the file as UTF-8") from None
            lines.append(line.decode("utf-8", errors="replace"))
    return "".join(lines)


@contextmanager
def loadable_config(path: Path) -> Iterator[Path]:
    """A path that ``loadSystemConfiguration`` reads as :func:`config_text` does.

    The file itself where it is plain UTF-8; else a UTF-8 copy of the same name (and the
    same lines, so errors name the user's line numbers), removed afterwards.
    """
    path = Path(path)
    text = config_text(path)
    if path.read_bytes() == text.encode("utf-8"):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="waferscope-cfg-") as folder:
        copy = Path(folder) / path.name
        copy.write_text(text, encoding="utf-8")
        yield copy


def _mark_py_lines(text: str) -> str:
    """The text with every Python device's line under the ``#py`` prefix.

    UniMMCore also loads them unprefixed (``pyDevice,...`` and the settings of its devices,
    as pymmcore-plus saves a file with ``prefix_py_devices=False``), which the C++ file
    model refuses ("Invalid command name: 'pyDevice'"), as it does a property of a device
    it does not know. (Presets and labels on them are kept: the model keeps those of any
    label, and the pixel-size presets are read from it.)
    """
    lines = text.splitlines()
    labels = set()
    for line in lines:
        tokens = line.strip().removeprefix(_PY_PREFIX).strip().split(",")
        if tokens[0] == "pyDevice" and len(tokens) > 1:
            labels.add(tokens[1])
    if not labels:
        return text
    marked = []
    for line in lines:
        tokens = line.strip().split(",")
        if tokens[0] == "pyDevice" or (tokens[0] == "Property" and len(tokens) > 1
                                       and tokens[1] in labels):
            line = _PY_PREFIX + line.strip()
        marked.append(line)
    return "\n".join(marked) + "\n"


def _where(text: str, exc: Exception) -> str:
    """``line N 'command': `` of the line the model's parser refused, where it can be told."""
    message = str(exc)
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if repr(line) in message or message.endswith(f": {line.split(',')[0]!r}"):
            return f"line {number} {line!r}: "
    return ""


def read_config(path: Path) -> ConfigSummary:
    """Parse a ``.cfg`` without loading anything.

    Raises
    ------
    ConfigError
        If the file cannot be parsed.
    """
    path = Path(path)
    text = _mark_py_lines(config_text(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the model warns about lines it cannot apply offline
        try:
            model = Microscope()
            model.load_config(text)
        except Exception as exc:  # the parser raises plain exceptions with the line
            raise ConfigError(f"microscope.config: {path.name}: cannot be read "
                              f"({_where(text, exc)}{exc})") from None
    summary = ConfigSummary()
    for device in model.devices:
        summary.devices[device.name] = (device.library, device.adapter_name)
    for line in text.splitlines():
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
    for name, preset in model.pixel_size_group.presets.items():
        if preset.pixel_size_um > 0:
            affine = tuple(float(v) for v in preset.affine) if preset.affine else None
            summary.pixel_presets[name] = (
                float(preset.pixel_size_um),
                None if affine == _DEFAULT_AFFINE else affine,
                [(s.device_name, s.property_name, str(s.property_value))
                 for s in preset.settings])
    sizes = [size for size, _, _ in summary.pixel_presets.values()]
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
    name = Path(path).name
    dirs = _adapter_dirs(adapter_path)
    missing = sorted({lib for lib, _ in summary.devices.values()
                      if not _adapter_installed(lib, dirs)})
    # every problem in the one line: installing the adapters must not reveal the next one
    problems = []
    if missing:
        problems.append(f"{name} needs device adapters not installed here: "
                        f"{', '.join(missing)} (run `mmcore install`, or set "
                        "microscope.adapter_path)")
    if str(Path(path).parent) not in sys.path:  # a .cfg may name modules beside it
        sys.path.append(str(Path(path).parent))
    bad = [f"{label} ({module}.{cls})" for label, (module, cls) in summary.py_devices.items()
           if not _py_device_found(module, cls)]
    if bad:
        problems.append(f"{name}: Python devices that cannot be imported: {', '.join(bad)}")
    labels = set(summary.devices) | set(summary.py_devices)
    for role, label in (roles or {}).items():
        if label not in labels:
            problems.append(f"microscope.roles.{role}: {label!r} is not a device of "
                            f"{name} (devices: {', '.join(sorted(labels))})")
    for role, label in summary.roles.items():
        # the loader ignores a Core property naming no device; the role was then missing
        # with no word of the label that was meant
        if role not in (roles or {}) and label not in labels:
            problems.append(
                f"{name}: Core,{ROLE_PROPERTIES[role]},{label} names no device of the file "
                f"(devices: {', '.join(sorted(labels))}; or set microscope.roles.{role})")
    if problems:
        first = problems[0] if problems[0].startswith("microscope.") else (
            f"microscope.config: {problems[0]}")
        raise ConfigError("; ".join([first, *problems[1:]]))
    return summary
