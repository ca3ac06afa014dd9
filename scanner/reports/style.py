"""Colours shared by the wafer map and the napari review layers (no plotting import here).

One colour per defect class, fixed (not cycled in order of appearance), so that a particle is
the same colour in ``wafermap.png``, in napari and from one scan to the next. The palette is
saturated on purpose: defects must stand out on a grey mosaic.
"""

from __future__ import annotations

#: hex colour per defect class (keys are exactly :data:`scanner.defectlist.CLASSES`)
CLASS_COLORS: dict[str, str] = {
    "particle": "#e6194b",  # red
    "scratch": "#1f77ff",  # blue
    "pit": "#ff9f1c",  # orange
    "stain": "#2ecc40",  # green
    "crack": "#d633ff",  # magenta
    "pattern": "#00d9e6",  # cyan
    "other": "#ffe119",  # yellow
}
#: repeater defects (one in-die position in many dies): apart from every class colour
REPEATER_COLOR = "#8b4513"  # brown


def class_rgba(name: str, alpha: float = 1.0) -> tuple[float, float, float, float]:
    """The class colour as an RGBA tuple of floats in [0, 1]."""
    h = CLASS_COLORS.get(name, CLASS_COLORS["other"]).lstrip("#")
    r, g, b = (int(h[i : i + 2], 16) / 255.0 for i in (0, 2, 4))
    return (r, g, b, float(alpha))
