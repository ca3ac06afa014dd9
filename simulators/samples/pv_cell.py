"""A photovoltaic cell imaged like electroluminescence (EL)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .base import VirtualSample
from .defects import ALL_KINDS, CELL_KINDS, Defect, DefectField, place_defects, resolve_kinds
from .shapes import interval_coverage, periodic_coverage, pixel_axes, rect_polygon
from .texture import chuck_background, fractal_noise, hash_uniform, over_chuck

#: EL brightness range of the grains
GRAIN_LO, GRAIN_HI = 0.55, 0.8
#: busbars block the emission entirely
BUSBAR = 0.06
#: fraction of light a finger blocks
FINGER_SHADE = 0.45
#: typical brightness (for the truth ``contrast`` of relative defects)
NOMINAL = 0.62


class PVCellSample(VirtualSample):
    """A PV cell as it looks in electroluminescence.

    A bright cell with multicrystalline grains (a jittered-grid Voronoi tessellation hashed
    from the grid cell indices, so it is tile-independent), darker grain boundaries and
    dislocation clusters, dimmer edges, dark busbars running along y and dark fingers along
    x, plus synthetic defects (dark cracks, dark areas, finger interruptions, ...).

    Parameters
    ----------
    width_mm, height_mm : float
        Cell size.
    busbars : int
        Number of busbars (along y, evenly spaced: busbar k is centred at
        ``(k + 0.5) * width / busbars`` from the left edge).
    busbar_width_mm : float
        Busbar width.
    finger_pitch_mm : float
        Finger pitch (fingers along x, the first centred half a pitch from the top edge).
    finger_width_um : float
        Finger width.
    center_um : (float, float)
        Cell centre on the stage.
    grain_size_mm : float
        Mean grain size; 0 for a monocrystalline cell (no grains).
    n_defects : int
        Number of synthetic defects.
    defect_kinds : sequence of str, optional
        Kinds to place (default ``CELL_KINDS``).
    seed : int
        Seed of the defects, and of the grains and texture unless ``design_seed`` is given.
    design_seed : int, optional
        Seed of the grains and texture (default ``seed``): copies of one product share it,
        whatever their defects.
    """

    kind = "pv_cell"

    def __init__(
        self,
        width_mm: float = 156.0,
        height_mm: float = 156.0,
        busbars: int = 5,
        busbar_width_mm: float = 1.2,
        finger_pitch_mm: float = 2.0,
        finger_width_um: float = 60.0,
        center_um: Sequence[float] = (0.0, 0.0),
        grain_size_mm: float = 5.0,
        n_defects: int = 20,
        defect_kinds: Sequence[str] | None = None,
        seed: int = 0,
        design_seed: int | None = None,
    ) -> None:
        if width_mm <= 0 or height_mm <= 0 or finger_pitch_mm <= 0 or busbars < 0:
            raise ValueError("width_mm, height_mm, finger_pitch_mm must be > 0, busbars >= 0")
        self.width_mm, self.height_mm = float(width_mm), float(height_mm)
        self.busbars = int(busbars)
        self.busbar_width_mm = float(busbar_width_mm)
        self.finger_pitch_mm = float(finger_pitch_mm)
        self.finger_width_um = float(finger_width_um)
        self.center_um = (float(center_um[0]), float(center_um[1]))
        self.grain_size_mm = float(grain_size_mm)
        self.n_defects = int(n_defects)
        self.seed = int(seed)
        self.design_seed = None if design_seed is None else int(design_seed)
        self._design = self.seed if self.design_seed is None else self.design_seed
        allowed = tuple(k for k in ALL_KINDS if k != "missing_pattern")
        self.defect_kinds = resolve_kinds(defect_kinds, CELL_KINDS, allowed, "pv_cell")

        cx, cy = self.center_um
        hw, hh = self.width_mm * 500.0, self.height_mm * 500.0
        self._box = (cx - hw, cy - hh, cx + hw, cy + hh)
        spacing = 2 * hw / max(self.busbars, 1)
        self._busbar_x = cx - hw + (np.arange(self.busbars) + 0.5) * spacing
        self._pitch = self.finger_pitch_mm * 1000.0
        self._finger_y0 = cy - hh + 0.5 * self._pitch - 0.5 * self.finger_width_um

        pitch = self._pitch
        sizes = {
            "particle": (60.0, 600.0),
            "pit": (60.0, 300.0),
            "scratch": (2000.0, 20000.0),
            "scratch_width": (20.0, 60.0),
            "stain": (2000.0, 15000.0),
            "finger_interruption_width": (0.6 * pitch, 1.0 * pitch),
        }
        self._field = DefectField(
            place_defects(self, self.n_defects, self.defect_kinds, self.seed, sizes),
            nominal=NOMINAL, bare=NOMINAL,
        )

    def parameters(self) -> dict[str, Any]:
        """Constructor parameters."""
        out = {
            "width_mm": self.width_mm, "height_mm": self.height_mm, "busbars": self.busbars,
            "busbar_width_mm": self.busbar_width_mm, "finger_pitch_mm": self.finger_pitch_mm,
            "finger_width_um": self.finger_width_um, "center_um": self.center_um,
            "grain_size_mm": self.grain_size_mm, "n_defects": self.n_defects,
            "defect_kinds": list(self.defect_kinds), "seed": self.seed,
        }
        if self.design_seed is not None:
            out["design_seed"] = self.design_seed
        return out

    def bounds_um(self) -> tuple[float, float, float, float]:
        """The cell rectangle."""
        return self._box

    def usable_polygon_um(self) -> np.ndarray:
        """The whole cell."""
        return rect_polygon(*self._box)

    def _adjust_point(self, kind: str, x: float, y: float) -> tuple[float, float]:
        """Finger interruptions sit on a finger, between busbars."""
        if kind != "finger_interruption":
            return x, y
        k = round((y - self._finger_y0 - 0.5 * self.finger_width_um) / self._pitch)
        y = self._finger_y0 + 0.5 * self.finger_width_um + k * self._pitch
        if self.busbars:
            near = self._busbar_x[np.argmin(np.abs(self._busbar_x - x))]
            half_gap = 0.5 * (self._busbar_x[1] - self._busbar_x[0]) if self.busbars > 1 else 0
            if abs(x - near) < self.busbar_width_mm * 1000.0 and half_gap:
                x = near + math.copysign(half_gap, x - near if x != near else 1.0)
        return float(x), float(y)

    def _accept_defect(self, defect: Defect) -> bool:
        x0, y0, x1, y1 = defect.bbox_um
        bx0, by0, bx1, by1 = self._box
        return x0 >= bx0 and y0 >= by0 and x1 <= bx1 and y1 <= by1

    # ------------------------------------------------------------------ rendering

    def _grains(self, xs: np.ndarray, ys: np.ndarray, p: float) -> np.ndarray:
        """Voronoi grains: brightness of the nearest grain centre, darker boundaries.

        Grain centres are one per cell of a square grid (size ``grain_size_mm``), jittered by
        a hash of the cell index, so the nearest centre is one of the 3 x 3 around the pixel's
        grid cell. The tile is processed in blocks (within one grid cell, at most 128 px a
        side); a candidate centre is dropped for a block when it is farther from every block
        pixel than another candidate plus the reach of the boundary darkening. Since that
        darkening has compact support, dropping is exact (identical values in any tile).
        """
        g = self.grain_size_mm * 1000.0
        out = np.empty((len(ys), len(xs)), dtype=np.float32)
        gi = np.floor(xs / g).astype(np.int64)
        gj = np.floor(ys / g).astype(np.int64)
        i_lo, j_lo = gi[0], gj[0]
        ci = np.arange(i_lo - 1, gi[-1] + 2)
        cj = np.arange(j_lo - 1, gj[-1] + 2)
        s = self._design * 31 + 5
        ccx = (ci[None, :] + 0.1 + 0.8 * hash_uniform(ci[None, :], cj[:, None], s)) * g
        ccy = (cj[:, None] + 0.1 + 0.8 * hash_uniform(ci[None, :], cj[:, None], s + 1)) * g
        bright = GRAIN_LO + (GRAIN_HI - GRAIN_LO) * hash_uniform(ci[None, :], cj[:, None], s + 2)
        reach = 2.5 * max(25.0, 0.7 * p)  # boundary darkening is zero beyond this
        inv_reach = np.float32(1.0 / reach)
        for r0, r1 in _blocks(gj):
            b = gj[r0] - j_lo + 1
            by = ys[r0:r1]
            for c0, c1 in _blocks(gi):
                a = gi[c0] - i_lo + 1
                bx = xs[c0:c1]
                cand = [(b + dj, a + di) for dj in (-1, 0, 1) for di in (-1, 0, 1)]
                px = np.array([ccx[k] for k in cand])
                py = np.array([ccy[k] for k in cand])
                # nearest / farthest distance from each candidate to the block's pixels
                gx = np.maximum(np.maximum(bx[0] - px, px - bx[-1]), 0.0)
                gy = np.maximum(np.maximum(by[0] - py, py - by[-1]), 0.0)
                dmin = np.hypot(gx, gy)
                dmax = np.hypot(np.maximum(abs(px - bx[0]), abs(px - bx[-1])),
                                np.maximum(abs(py - by[0]), abs(py - by[-1])))
                keep = [k for k, d in zip(cand, dmin, strict=True) if d <= dmax.min() + reach]
                if len(keep) == 1:
                    out[r0:r1, c0:c1] = bright[keep[0]]
                    continue
                d1 = np.full((r1 - r0, c1 - c0), np.inf, dtype=np.float32)
                d2 = d1.copy()
                val = np.zeros_like(d1)
                for k in keep:
                    ex = ((bx - ccx[k]) ** 2).astype(np.float32)
                    ey = ((by - ccy[k]) ** 2).astype(np.float32)
                    d = ey[:, None] + ex[None, :]
                    closer = d < d1
                    np.minimum(d2, np.where(closer, d1, d), out=d2)
                    np.minimum(d1, d, out=d1)
                    np.copyto(val, bright[k], where=closer)
                # (d2 - d1) is about twice the distance to the grain boundary
                t = np.clip(np.float32(1.0) - ((np.sqrt(d2) - np.sqrt(d1)) * inv_reach) ** 2,
                            0.0, 1.0)
                val *= np.float32(1.0) - np.float32(0.25) * t * t
                out[r0:r1, c0:c1] = val
        return out

    def _emission(self, xs: np.ndarray, ys: np.ndarray, p: float) -> np.ndarray:
        """EL brightness of the silicon before metallisation shading."""
        if self.grain_size_mm > 0:
            img = self._grains(xs, ys, p)
        else:
            img = np.full((len(ys), len(xs)), 0.5 * (GRAIN_LO + GRAIN_HI), dtype=np.float32)
        # cloudy intra-grain variation (dislocation density, lifetime)
        img *= np.float32(1.0) + fractal_noise(
            xs, ys, p, [(2500.0, 0.25), (700.0, 0.12)], self._design * 31 + 7
        )
        # emission falls off towards the cell edges (recombination at the cut surfaces)
        x0, y0, x1, y1 = self._box
        fx = 1.0 - 0.3 * np.exp(-np.minimum(np.abs(xs - x0), np.abs(x1 - xs)) / 1500.0)
        fy = 1.0 - 0.3 * np.exp(-np.minimum(np.abs(ys - y0), np.abs(y1 - ys)) / 1500.0)
        img *= fy.astype(np.float32)[:, None] * fx.astype(np.float32)[None, :]
        return img

    def render(
        self, x0_um: float, y0_um: float, shape: tuple[int, int], pixel_size_um: float
    ) -> np.ndarray:
        """EL image of a stage region (see ``VirtualSample.render``)."""
        p = float(pixel_size_um)
        xs, ys = pixel_axes(x0_um, y0_um, shape, p)
        bx0, by0, bx1, by1 = self._box
        cov_x = interval_coverage(xs, bx0, bx1, p)
        cov_y = interval_coverage(ys, by0, by1, p)
        if not cov_x.any() or not cov_y.any():
            return chuck_background(xs, ys, p)
        img = self._emission(xs, ys, p)
        fingers = periodic_coverage(ys, self._pitch, self._finger_y0, self.finger_width_um, p)
        img *= (np.float32(1.0) - np.float32(FINGER_SHADE) * fingers)[:, None]
        bus = np.zeros(len(xs), dtype=np.float32)
        half = 500.0 * self.busbar_width_mm
        for bx in self._busbar_x:
            if bx + half >= xs[0] - p and bx - half <= xs[-1] + p:
                bus += interval_coverage(xs, bx - half, bx + half, p)
        if bus.any():
            bus = np.minimum(bus, 1.0)[None, :]
            img += (np.float32(BUSBAR) - img) * bus
        self._field.draw(img, xs, ys, p)
        if cov_x.min() < 1.0 or cov_y.min() < 1.0:
            img = over_chuck(img, cov_y[:, None] * cov_x[None, :], xs, ys, p)
        return np.clip(img, 0.0, 1.0, out=img)


def _blocks(cell: np.ndarray, max_len: int = 128) -> list[tuple[int, int]]:
    """Runs of equal grid-cell index along one axis, cut into pieces of at most max_len."""
    edges = np.flatnonzero(np.diff(cell)) + 1
    out = []
    for start, stop in zip(np.r_[0, edges], np.r_[edges, len(cell)], strict=True):
        for a in range(int(start), int(stop), max_len):
            out.append((a, min(a + max_len, int(stop))))
    return out
