"""A plain rectangular region of polished surface (a coupon, a die, a test area)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .base import VirtualSample
from .defects import ALL_KINDS, SURFACE_KINDS, DefectField, place_defects, resolve_kinds
from .shapes import interval_coverage, pixel_axes, rect_polygon
from .texture import chuck_background, fractal_noise, over_chuck

#: mean reflectance of the polished surface
SURFACE = 0.5
#: texture octaves (lattice µm, peak-to-peak amplitude): faint polishing haze and grain
TEXTURE = [(400.0, 0.04), (60.0, 0.02), (12.0, 0.012)]


class RectangleSample(VirtualSample):
    """A mid-grey polished rectangle with fine, low-contrast texture and synthetic defects.

    Parameters
    ----------
    width_mm, height_mm : float
        Size of the rectangle.
    center_um : (float, float)
        Its centre on the stage.
    n_defects : int
        Number of synthetic defects.
    defect_kinds : sequence of str, optional
        Kinds to place (default ``SURFACE_KINDS``: particle, scratch, pit, stain).
    seed : int
        Seed of the defects, and of the texture unless ``design_seed`` is given.
    design_seed : int, optional
        Seed of the texture (default ``seed``): copies of one product share it, whatever
        their defects.
    """

    kind = "rectangle"

    def __init__(
        self,
        width_mm: float,
        height_mm: float,
        center_um: Sequence[float] = (0.0, 0.0),
        n_defects: int = 10,
        defect_kinds: Sequence[str] | None = None,
        seed: int = 0,
        design_seed: int | None = None,
    ) -> None:
        if width_mm <= 0 or height_mm <= 0:
            raise ValueError("width_mm and height_mm must be > 0")
        self.width_mm, self.height_mm = float(width_mm), float(height_mm)
        self.center_um = (float(center_um[0]), float(center_um[1]))
        self.n_defects = int(n_defects)
        self.seed = int(seed)
        self.design_seed = None if design_seed is None else int(design_seed)
        self._design = self.seed if self.design_seed is None else self.design_seed
        allowed = tuple(k for k in ALL_KINDS if k not in ("missing_pattern",))
        self.defect_kinds = resolve_kinds(defect_kinds, SURFACE_KINDS, allowed, "rectangle")
        cx, cy = self.center_um
        hw, hh = self.width_mm * 500.0, self.height_mm * 500.0
        self._box = (cx - hw, cy - hh, cx + hw, cy + hh)
        self._field = DefectField(
            place_defects(self, self.n_defects, self.defect_kinds, self.seed),
            nominal=SURFACE, bare=SURFACE,
        )

    def parameters(self) -> dict[str, Any]:
        """Constructor parameters."""
        out = {
            "width_mm": self.width_mm, "height_mm": self.height_mm, "center_um": self.center_um,
            "n_defects": self.n_defects, "defect_kinds": list(self.defect_kinds),
            "seed": self.seed,
        }
        if self.design_seed is not None:
            out["design_seed"] = self.design_seed
        return out

    def bounds_um(self) -> tuple[float, float, float, float]:
        """The rectangle."""
        return self._box

    def usable_polygon_um(self) -> np.ndarray:
        """The whole rectangle."""
        return rect_polygon(*self._box)

    def render(
        self, x0_um: float, y0_um: float, shape: tuple[int, int], pixel_size_um: float
    ) -> np.ndarray:
        """Reflectance of a stage region (see ``VirtualSample.render``)."""
        p = float(pixel_size_um)
        xs, ys = pixel_axes(x0_um, y0_um, shape, p)
        bx0, by0, bx1, by1 = self._box
        cov_x = interval_coverage(xs, bx0, bx1, p)
        cov_y = interval_coverage(ys, by0, by1, p)
        if not cov_x.any() or not cov_y.any():
            return chuck_background(xs, ys, p)
        img = fractal_noise(xs, ys, p, TEXTURE, seed=self._design * 131 + 17)
        img += np.float32(SURFACE)
        self._field.draw(img, xs, ys, p)
        if cov_x.min() < 1.0 or cov_y.min() < 1.0:
            img = over_chuck(img, cov_y[:, None] * cov_x[None, :], xs, ys, p)
        return np.clip(img, 0.0, 1.0, out=img)
