"""Image-based autofocus and focus maps: focus measures, the Z search, focal-surface fits.

Pure maths on numpy arrays; nothing here talks to hardware. ``autofocus`` takes a
``snap_at(z)`` callable that moves the focus drive and returns a frame. See docs/focus.md.
"""

from __future__ import annotations

from scanner.acquisition.focus.measures import (
    DEFAULT_MEASURE,
    MEASURES,
    brenner,
    estimate_noise_sigma,
    normalized_variance,
    tenengrad,
    texture_strength,
    variance_of_laplacian,
)
from scanner.acquisition.focus.search import FocusResult, autofocus
from scanner.acquisition.focus.surface import FocusSurface, fit_focus_surface, focus_points_layout

__all__ = [
    "DEFAULT_MEASURE",
    "MEASURES",
    "FocusResult",
    "FocusSurface",
    "autofocus",
    "brenner",
    "estimate_noise_sigma",
    "fit_focus_surface",
    "focus_points_layout",
    "normalized_variance",
    "tenengrad",
    "texture_strength",
    "variance_of_laplacian",
]
