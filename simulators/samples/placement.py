"""A sample lying off its nominal place on the chuck: shifted and turned about its centre.

A loader or a hand never puts a wafer exactly where the recipe says. :class:`PlacedSample`
wraps any virtual sample (defined in its own, nominal frame) and shows it at
``stage = c + offset + R(rotation) @ (nominal - c)``, ``c`` the nominal centre of the sample.
The truth record carries the placement, and each defect's stage position where it now lies
beside its nominal position (``sample_x_um``, ``sample_y_um``: where it lies on the sample,
from which its true die index follows).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import ndimage

from .base import VirtualSample
from .shapes import pixel_axes

#: extra pixels around a rotated footprint, so the spline's edge effects stay outside
_PAD = 6


def draw_placement(seed: int, max_offset_um: float = 500.0,
                   max_rotation_deg: float = 1.0) -> tuple[float, float, float]:
    """A random placement ``(dx_um, dy_um, rotation_deg)``, uniform in the given ranges."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x9A1])
    dx, dy = rng.uniform(-max_offset_um, max_offset_um, size=2)
    return float(dx), float(dy), float(rng.uniform(-max_rotation_deg, max_rotation_deg))


class PlacedSample(VirtualSample):
    """A virtual sample shifted by ``offset_um`` and turned by ``rotation_deg`` on the stage.

    Parameters
    ----------
    base : VirtualSample
        The sample in its nominal frame (where the recipe puts it).
    offset_um : (float, float)
        Shift of its centre on the stage.
    rotation_deg : float
        Turn about its centre, from +x towards +y (clockwise on screen, y pointing down).
    extra : dict, optional
        More keys for the truth's ``placement`` record (``random``, ``seed``).
    """

    def __init__(self, base: VirtualSample, offset_um: tuple[float, float],
                 rotation_deg: float, extra: dict[str, Any] | None = None) -> None:
        self.base = base
        self.kind = base.kind
        self.offset = (float(offset_um[0]), float(offset_um[1]))
        self.rotation_deg = float(rotation_deg)
        x0, y0, x1, y1 = base.bounds_um()
        # wafers and cells are centred on their bounds (a wafer's circle, a cell's box)
        self.nominal_center = ((x0 + x1) / 2, (y0 + y1) / 2)
        th = math.radians(self.rotation_deg)
        self._cos, self._sin = math.cos(th), math.sin(th)
        self._extra = dict(extra or {})

    def __getattr__(self, name: str) -> Any:  # geometry helpers of the wrapped sample
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    # ------------------------------------------------------------------ frames

    def to_stage(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Nominal (sample) coordinates to stage coordinates."""
        cx, cy = self.nominal_center
        u, v = np.asarray(x, float) - cx, np.asarray(y, float) - cy
        return (cx + self.offset[0] + self._cos * u - self._sin * v,
                cy + self.offset[1] + self._sin * u + self._cos * v)

    def to_sample(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stage coordinates to nominal (sample) coordinates."""
        cx, cy = self.nominal_center
        u = np.asarray(x, float) - cx - self.offset[0]
        v = np.asarray(y, float) - cy - self.offset[1]
        return cx + self._cos * u + self._sin * v, cy - self._sin * u + self._cos * v

    @property
    def center_um(self) -> tuple[float, float]:
        """True centre of the sample on the stage."""
        return (self.nominal_center[0] + self.offset[0], self.nominal_center[1] + self.offset[1])

    # ------------------------------------------------------------------ VirtualSample

    def render(
        self, x0_um: float, y0_um: float, shape: tuple[int, int], pixel_size_um: float
    ) -> np.ndarray:
        """The sample where it lies (see ``VirtualSample.render``).

        Unturned, the nominal sample renders shifted (exact). Turned, an axis-aligned patch
        of the nominal sample that covers the tile's footprint is rendered on a lattice
        anchored at the nominal centre (so overlapping tiles resample the same pixels) and
        resampled with a cubic spline, as the simulated camera does for a turned sensor.
        """
        p = float(pixel_size_um)
        if self.rotation_deg == 0.0:
            return self.base.render(x0_um - self.offset[0], y0_um - self.offset[1], shape, p)
        rows, cols = (int(v) for v in shape)
        xs, ys = pixel_axes(x0_um, y0_um, shape, p)
        corners_x = np.array([xs[0], xs[-1], xs[0], xs[-1]])
        corners_y = np.array([ys[0], ys[0], ys[-1], ys[-1]])
        qx, qy = self.to_sample(corners_x, corners_y)
        cx, cy = self.nominal_center
        c0 = math.floor((qx.min() - cx) / p) - _PAD
        c1 = math.ceil((qx.max() - cx) / p) + _PAD
        r0 = math.floor((qy.min() - cy) / p) - _PAD
        r1 = math.ceil((qy.max() - cy) / p) + _PAD
        px0, py0 = cx + c0 * p, cy + r0 * p
        patch = self.base.render(px0, py0, (r1 - r0 + 1, c1 - c0 + 1), p)
        gx, gy = np.meshgrid(xs, ys)
        sx, sy = self.to_sample(gx, gy)
        out = ndimage.map_coordinates(patch.astype(np.float32), [(sy - py0) / p, (sx - px0) / p],
                                      order=3, mode="nearest")
        return np.clip(out, 0.0, 1.0).astype(np.float32).reshape(rows, cols)

    def bounds_um(self) -> tuple[float, float, float, float]:
        """Box around the placed sample's nominal box, turned."""
        x0, y0, x1, y1 = self.base.bounds_um()
        sx, sy = self.to_stage(np.array([x0, x1, x1, x0]), np.array([y0, y0, y1, y1]))
        return float(sx.min()), float(sy.min()), float(sx.max()), float(sy.max())

    def usable_polygon_um(self) -> np.ndarray:
        """The wrapped sample's usable area where it lies."""
        poly = self.base.usable_polygon_um()
        sx, sy = self.to_stage(poly[:, 0], poly[:, 1])
        return np.c_[sx, sy]

    def parameters(self) -> dict[str, Any]:
        """The wrapped sample's parameters plus ``placement``."""
        return {**self.base.parameters(), "placement": self.placement()}

    def placement(self) -> dict[str, Any]:
        """The true placement: offset, rotation and the centre on the stage."""
        return {"offset_um": list(self.offset), "rotation_deg": self.rotation_deg,
                "nominal_center_um": list(self.nominal_center),
                "center_um": list(self.center_um), **self._extra}

    def truth(self) -> dict:
        """The wrapped sample's truth, its defects where they lie, and ``placement``."""
        out = self.base.truth()
        out["sample"]["placement"] = self.placement()
        out["placement"] = self.placement()
        for d in out["defects"]:
            sx, sy = self.to_stage(np.array([d["x_um"]]), np.array([d["y_um"]]))
            x0, y0, x1, y1 = d["bbox_um"]
            bx, by = self.to_stage(np.array([x0, x1, x1, x0]), np.array([y0, y0, y1, y1]))
            d["sample_x_um"], d["sample_y_um"] = d["x_um"], d["y_um"]
            d["x_um"], d["y_um"] = float(sx[0]), float(sy[0])
            d["bbox_um"] = [float(bx.min()), float(by.min()), float(bx.max()), float(by.max())]
        return out
