"""The shapes of synthetic defects: analytic profiles in stage coordinates, box-filtered for
the pixel size, and the ground truth each gives (see :mod:`simulators.samples.defects` for the
kinds, their random draws and placement).
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field, replace

import numpy as np

from .base import TrueDefect
from .shapes import interval_coverage, pixel_window


@dataclass(frozen=True, eq=False)  # array fields: compare truths, not shapes
class Defect:
    """A defect shape placed at ``(cx, cy)``; subclasses define its profile.

    Attributes
    ----------
    kind : str
        Defect kind.
    cx, cy : float
        Centre, stage µm.
    rel_bbox : tuple of float
        Visible extent relative to the centre.
    rel_reach : tuple of float
        Extent that drawing must cover (soft tails included), relative to the centre.
    size_um : float
        Largest extent.
    mode : str
        ``"add"``, ``"mul"`` or ``"bare"`` (module docstring).
    amp : float
        Amplitude: reflectance change (add), relative change (mul), unused (bare).
    """

    kind: str
    cx: float
    cy: float
    rel_bbox: tuple[float, float, float, float]
    rel_reach: tuple[float, float, float, float]
    size_um: float
    mode: str
    amp: float

    @property
    def bbox_um(self) -> tuple[float, float, float, float]:
        """Visible extent in stage µm."""
        b = self.rel_bbox
        return (self.cx + b[0], self.cy + b[1], self.cx + b[2], self.cy + b[3])

    @property
    def reach_um(self) -> tuple[float, float, float, float]:
        """Drawn extent in stage µm (before the pixel-size margin)."""
        b = self.rel_reach
        return (self.cx + b[0], self.cy + b[1], self.cx + b[2], self.cy + b[3])

    def moved(self, x_um: float, y_um: float) -> Defect:
        """The same shape centred elsewhere."""
        return replace(self, cx=float(x_um), cy=float(y_um))

    @abstractmethod
    def profile(self, dx: np.ndarray, dy: np.ndarray, p: float) -> np.ndarray:
        """Profile on the pixel grid ``dy x dx`` (offsets from the centre, float32, µm)."""

    def draw(
        self, img: np.ndarray, xs: np.ndarray, ys: np.ndarray, p: float, bare: float
    ) -> None:
        """Draw into ``img`` (in place) whose pixel axes are ``xs`` and ``ys``."""
        x0, y0, x1, y1 = self.reach_um
        m = 2.0 * p
        r0, r1, c0, c1 = pixel_window(
            float(xs[0]), float(ys[0]), img.shape, p, (x0 - m, y0 - m, x1 + m, y1 + m)
        )
        if r0 >= r1 or c0 >= c1:
            return
        dx = (xs[c0:c1] - self.cx).astype(np.float32)
        dy = (ys[r0:r1] - self.cy).astype(np.float32)
        prof = self.profile(dx, dy, p)
        view = img[r0:r1, c0:c1]
        if self.mode == "add":
            view += np.float32(self.amp) * prof
        elif self.mode == "mul":
            view *= np.float32(1.0) + np.float32(self.amp) * prof
        else:
            view += (np.float32(bare) - view) * prof

    def truth(self, index: int, nominal: float, bare: float) -> TrueDefect:
        """Ground-truth record; ``contrast`` is the change on a surface of reflectance
        ``nominal``."""
        if self.mode == "add":
            contrast = self.amp
        elif self.mode == "mul":
            contrast = self.amp * nominal
        else:
            contrast = bare - nominal
        return TrueDefect(
            id=int(index),
            kind=self.kind,
            x_um=float(self.cx),
            y_um=float(self.cy),
            size_um=float(self.size_um),
            bbox_um=tuple(float(v) for v in self.bbox_um),
            contrast=float(contrast),
        )


def _soft_disk(inside_um: np.ndarray, p: float, edge_um: float, area_um2: float) -> np.ndarray:
    """Coverage of a disk-like shape from the signed distance to its edge (positive inside).

    The edge ramps over ``hypot(edge, p)``; a shape smaller than a pixel is scaled by its area
    over the pixel area so that it fades instead of staying fully dark at any pixel size.
    """
    soft = np.float32(np.hypot(edge_um, p))
    cov = np.clip(np.float32(0.5) + inside_um / soft, 0.0, 1.0)
    scale = min(1.0, area_um2 / (p * p))
    return cov if scale >= 1.0 else cov * np.float32(scale)


@dataclass(frozen=True, eq=False)
class Blob(Defect):
    """Particle: a rotated ellipse with four soft lobes and a soft edge."""

    a: float = 1.0
    b: float = 1.0
    theta: float = 0.0
    lobe: float = 0.0
    edge_um: float = 1.0

    def profile(self, dx: np.ndarray, dy: np.ndarray, p: float) -> np.ndarray:
        """Coverage (0..1) of the lobed ellipse, its edge ramped over ``hypot(edge_um, p)``."""
        c, s = np.float32(np.cos(self.theta)), np.float32(np.sin(self.theta))
        u = dx[None, :] * c + dy[:, None] * s
        v = dy[:, None] * c - dx[None, :] * s
        r = np.sqrt(u * u + v * v) + np.float32(1e-6)
        cos_phi2 = (u / r) ** 2
        # cos(4 phi) = 8 cos^4 - 8 cos^2 + 1: a symmetric, lumpy outline
        lobes = np.float32(1.0) + np.float32(self.lobe) * (
            np.float32(8.0) * cos_phi2 * cos_phi2 - np.float32(8.0) * cos_phi2 + np.float32(1.0)
        )
        rho = np.sqrt((u / np.float32(self.a)) ** 2 + (v / np.float32(self.b)) ** 2)
        inside = (np.float32(1.0) - rho / lobes) * np.float32(np.sqrt(self.a * self.b))
        return _soft_disk(inside, p, self.edge_um, np.pi * self.a * self.b)


@dataclass(frozen=True, eq=False)
class Pit(Defect):
    """Pit: a dark disk (``amp`` < 0) with a bright rim of ``rim_ratio * |amp|``."""

    radius: float = 1.0
    rim_ratio: float = 0.5
    rim_width: float = 1.0

    def profile(self, dx: np.ndarray, dy: np.ndarray, p: float) -> np.ndarray:
        """Coverage (0..1) of the disk minus a Gaussian rim of ``rim_ratio`` along its edge."""
        d = np.sqrt(dx[None, :] ** 2 + dy[:, None] ** 2)
        core = _soft_disk(np.float32(self.radius) - d, p, 0.5, np.pi * self.radius**2)
        s0 = self.rim_width
        s2 = s0 * s0 + p * p / 12.0  # a box pixel has variance p^2 / 12
        rim = np.exp((d - np.float32(self.radius)) ** 2 * np.float32(-0.5 / s2))
        return core - np.float32(self.rim_ratio * s0 / np.sqrt(s2)) * rim


@dataclass(frozen=True, eq=False)
class Polylines(Defect):
    """Scratch or crack: Gaussian-profile lines along polylines with per-vertex width.

    ``lines`` holds, per polyline, an (N, 4) array of vertex ``x, y`` (relative to the
    centre), full width at half maximum and strength (0..1).
    """

    lines: tuple[np.ndarray, ...] = ()

    def profile(self, dx: np.ndarray, dy: np.ndarray, p: float) -> np.ndarray:
        """Maximum over all segments of their tapered Gaussian line profiles (strength 0..1)."""
        out = np.zeros((len(dy), len(dx)), dtype=np.float32)
        pix_var = p * p / 12.0
        for line in self.lines:
            for a, b in zip(line[:-1], line[1:], strict=True):
                self._segment(out, dx, dy, a, b, pix_var)
        return out

    @staticmethod
    def _segment(
        out: np.ndarray, dx: np.ndarray, dy: np.ndarray, a: np.ndarray, b: np.ndarray,
        pix_var: float,
    ) -> None:
        """Max-combine one tapered segment into ``out`` (only on its own small window)."""
        s_max2 = (max(a[2], b[2]) / 2.3548) ** 2 + pix_var
        reach = 3.5 * np.sqrt(s_max2)
        c0 = np.searchsorted(dx, min(a[0], b[0]) - reach)
        c1 = np.searchsorted(dx, max(a[0], b[0]) + reach, side="right")
        r0 = np.searchsorted(dy, min(a[1], b[1]) - reach)
        r1 = np.searchsorted(dy, max(a[1], b[1]) + reach, side="right")
        if c0 >= c1 or r0 >= r1:
            return
        ex, ey = np.float32(b[0] - a[0]), np.float32(b[1] - a[1])
        length2 = max(float(ex * ex + ey * ey), 1e-12)
        px = dx[c0:c1] - np.float32(a[0])
        py = dy[r0:r1] - np.float32(a[1])
        t = np.clip((px[None, :] * ex + py[:, None] * ey) * np.float32(1.0 / length2), 0.0, 1.0)
        qx = px[None, :] - t * ex
        qy = py[:, None] - t * ey
        d2 = qx * qx + qy * qy
        s0 = (np.float32(a[2]) + t * np.float32(b[2] - a[2])) * np.float32(1.0 / 2.3548)
        s2 = s0 * s0 + np.float32(pix_var)
        strength = np.float32(a[3]) + t * np.float32(b[3] - a[3])
        val = strength * s0 / np.sqrt(s2) * np.exp(d2 / s2 * np.float32(-0.5))
        np.maximum(out[r0:r1, c0:c1], val, out=out[r0:r1, c0:c1])


@dataclass(frozen=True, eq=False)
class Metaballs(Defect):
    """Stain or dark area: thresholded sum of Gaussian balls (an irregular soft blob).

    ``balls`` is a (K, 3) array of ``x, y, sigma`` relative to the centre; the profile is
    ``smoothstep((F - t0) / (t1 - t0))`` of the field ``F``.
    """

    balls: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    t0: float = 0.4
    t1: float = 0.6

    def profile(self, dx: np.ndarray, dy: np.ndarray, p: float) -> np.ndarray:
        """Smoothstep (0..1) of the summed Gaussian balls' field between ``t0`` and ``t1``."""
        field = np.zeros((len(dy), len(dx)), dtype=np.float32)
        for bx, by, sigma in self.balls:
            k = np.float32(-0.5 / sigma**2)
            gx = np.exp((dx - np.float32(bx)) ** 2 * k)
            gy = np.exp((dy - np.float32(by)) ** 2 * k)
            field += gy[:, None] * gx[None, :]  # separable: one outer product per ball
        f = np.clip((field - np.float32(self.t0)) * np.float32(1.0 / (self.t1 - self.t0)), 0, 1)
        return f * f * (np.float32(3.0) - np.float32(2.0) * f)


@dataclass(frozen=True, eq=False)
class Patch(Defect):
    """Missing pattern: an axis-aligned rectangle of bare surface."""

    half_w: float = 1.0
    half_h: float = 1.0

    def profile(self, dx: np.ndarray, dy: np.ndarray, p: float) -> np.ndarray:
        """Fraction (0..1) of each pixel that the rectangle covers (box-filtered, exact)."""
        cx = interval_coverage(dx, -self.half_w, self.half_w, p)
        cy = interval_coverage(dy, -self.half_h, self.half_h, p)
        return cy[:, None] * cx[None, :]


@dataclass(frozen=True, eq=False)
class Streak(Defect):
    """Finger interruption: an anisotropic Gaussian darkening along a finger (x)."""

    sx: float = 1.0
    sy: float = 1.0

    def profile(self, dx: np.ndarray, dy: np.ndarray, p: float) -> np.ndarray:
        """Separable Gaussian of widths ``sx`` and ``sy``, widened by the pixel (integral kept)."""
        pv = p * p / 12.0
        sx2, sy2 = self.sx**2 + pv, self.sy**2 + pv
        gx = np.exp(dx * dx * np.float32(-0.5 / sx2)) * np.float32(self.sx / np.sqrt(sx2))
        gy = np.exp(dy * dy * np.float32(-0.5 / sy2)) * np.float32(self.sy / np.sqrt(sy2))
        return gy[:, None] * gx[None, :]
