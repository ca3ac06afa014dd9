"""Synthetic defects: seeded placement, and analytic drawing in stage coordinates.

Each defect is an analytic function of stage coordinates, evaluated only on the pixels of a
tile that fall in its reach, so it renders identically in every tile that sees it. Shapes are
generated relative to the defect centre, then moved to a random point of the sample's usable
area (re-drawn until the whole defect lies inside it).

Three ways of combining with the surface underneath (``Defect.mode``):

``"add"``
    reflectance += amp * profile (particle, scratch, pit, stain).
``"mul"``
    reflectance *= 1 + amp * profile (crack, dark_area, finger_interruption: EL defects that
    darken the local emission, whatever its brightness).
``"bare"``
    reflectance -> bare surface, with profile as the mixing weight (missing_pattern).

Every profile is box-filtered for the pixel size (Gaussian lines widen and lose peak contrast
but keep their integral; edges ramp over one pixel), so small defects neither alias nor vanish
between pixel centres. The shapes are in :mod:`simulators.samples.defect_shapes`; their
random draws and placement are here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from .base import TrueDefect
from .defect_shapes import Blob, Defect, Metaballs, Patch, Pit, Polylines, Streak

if TYPE_CHECKING:
    from .base import VirtualSample

#: kinds drawn on wafers by default
WAFER_KINDS: tuple[str, ...] = ("particle", "scratch", "pit", "stain", "missing_pattern")
#: kinds drawn on PV cells by default
CELL_KINDS: tuple[str, ...] = ("crack", "dark_area", "particle", "scratch", "finger_interruption")
#: kinds that need no particular structure underneath (rectangles, images)
SURFACE_KINDS: tuple[str, ...] = ("particle", "scratch", "pit", "stain")
#: every kind this module can draw
ALL_KINDS: tuple[str, ...] = (
    "particle", "scratch", "pit", "stain", "missing_pattern", "crack", "dark_area",
    "finger_interruption",
)

#: size ranges (µm) drawn log-uniformly; samples may override entries
DEFAULT_SIZES: dict[str, tuple[float, float]] = {
    "particle": (10.0, 150.0),  # diameter
    "pit": (12.0, 60.0),  # diameter of the dark core
    "scratch": (200.0, 3000.0),  # length
    "scratch_width": (3.0, 10.0),
    "stain": (150.0, 1500.0),
    "missing_pattern": (30.0, 500.0),  # each side of the patch
    "crack": (2000.0, 30000.0),  # length of the main branch
    "crack_width": (40.0, 120.0),
    "dark_area": (3000.0, 25000.0),
    "finger_interruption": (1000.0, 5000.0),  # length along the finger
    "finger_interruption_width": (600.0, 1200.0),  # across the finger (about a finger pitch)
}


def resolve_kinds(
    requested: Sequence[str] | None, default: Sequence[str], allowed: Sequence[str], where: str
) -> tuple[str, ...]:
    """Validate a list of defect kinds for a sample type.

    Raises
    ------
    ValueError
        An unknown kind, or one that cannot be drawn on this sample type, or an empty list.
    """
    if requested is None:
        return tuple(default)
    kinds = tuple(str(k) for k in requested)
    if not kinds:
        raise ValueError(f"defect_kinds: empty list (choose from {', '.join(allowed)})")
    for k in kinds:
        if k not in allowed:
            raise ValueError(
                f"defect_kinds: {k!r} cannot be drawn on a {where} (choose from "
                f"{', '.join(allowed)})"
            )
    return kinds


# ----------------------------------------------------------------------------- shape builders


def _loguniform(rng: np.random.Generator, lo_hi: tuple[float, float]) -> float:
    lo, hi = lo_hi
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _signed(rng: np.random.Generator, lo: float, hi: float, p_dark: float) -> float:
    mag = float(rng.uniform(lo, hi))
    return -mag if rng.random() < p_dark else mag


def _measure(defect: Defect) -> Defect:
    """Set the visible bbox and size of a soft shape by evaluating it on a fine grid."""
    x0, y0, x1, y1 = defect.rel_reach
    n = 257
    step = max(x1 - x0, y1 - y0) / (n - 1)
    gx = np.linspace(x0, x1, n, dtype=np.float32)
    gy = np.linspace(y0, y1, n, dtype=np.float32)
    prof = np.abs(defect.profile(gx, gy, step * 0.25))
    rr, cc = np.nonzero(prof >= 0.5 * prof.max())
    xs, ys = gx[cc].astype(np.float64), gy[rr].astype(np.float64)
    bbox = (xs.min() - step / 2, ys.min() - step / 2, xs.max() + step / 2, ys.max() + step / 2)
    return replace(defect, rel_bbox=tuple(float(v) for v in bbox), size_um=_feret(xs, ys) + step)


def _feret(xs: np.ndarray, ys: np.ndarray) -> float:
    """Largest extent of a point set (maximum over 32 projection directions)."""
    ang = np.linspace(0.0, np.pi, 32, endpoint=False)
    proj = np.outer(np.cos(ang), xs) + np.outer(np.sin(ang), ys)
    return float((proj.max(axis=1) - proj.min(axis=1)).max())


def _box(half_x: float, half_y: float) -> tuple[float, float, float, float]:
    return (-half_x, -half_y, half_x, half_y)


def build_particle(rng: np.random.Generator, sizes: dict) -> Defect:
    """A bright or dark particle (mostly dark: it scatters light out of the objective)."""
    a = _loguniform(rng, sizes["particle"]) / 2
    b = a / rng.uniform(1.0, 1.5)
    lobe, edge = rng.uniform(0.0, 0.12), rng.uniform(0.5, 2.0)
    reach = a * (1 + lobe) + 3 * edge
    d = Blob("particle", 0.0, 0.0, _box(reach, reach), _box(reach, reach), 2 * a, "add",
             _signed(rng, 0.15, 0.4, 0.65), a=a, b=b, theta=rng.uniform(0, np.pi), lobe=lobe,
             edge_um=edge)
    return _measure(d)


def build_pit(rng: np.random.Generator, sizes: dict) -> Defect:
    """A dark pit with a bright rim."""
    r = _loguniform(rng, sizes["pit"]) / 2
    w = max(0.15 * r, 1.0)
    reach = r + 4 * w + 1
    d = Pit("pit", 0.0, 0.0, _box(reach, reach), _box(reach, reach), 2 * r, "add",
            -rng.uniform(0.2, 0.4), radius=r, rim_ratio=rng.uniform(0.4, 0.7), rim_width=w)
    return _measure(d)


def _polyline_defect(kind: str, lines: list[np.ndarray], mode: str, amp: float) -> Defect:
    pts = np.concatenate(lines)
    half_w = pts[:, 2:3] / 2
    lo = (pts[:, :2] - half_w).min(axis=0)
    hi = (pts[:, :2] + half_w).max(axis=0)
    reach_pad = 2.0 * float(pts[:, 2].max())
    size = _feret(pts[:, 0], pts[:, 1]) + float(pts[:, 2].max())
    bbox = (float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1]))
    reach = (bbox[0] - reach_pad, bbox[1] - reach_pad, bbox[2] + reach_pad, bbox[3] + reach_pad)
    return Polylines(kind, 0.0, 0.0, bbox, reach, size, mode, amp, lines=tuple(lines))


def build_scratch(rng: np.random.Generator, sizes: dict) -> Defect:
    """A thin, slightly curved scratch (quadratic Bezier) tapered at both ends."""
    length = _loguniform(rng, sizes["scratch"])
    width = rng.uniform(*sizes["scratch_width"])
    bend = rng.uniform(-0.12, 0.12) * length
    n = 2 * int(np.clip(length / 80.0, 4, 24))  # even: a vertex sits at the centre
    t = np.linspace(0.0, 1.0, n + 1)
    # control point at 2 * bend puts the curve's midpoint at (0, bend); shift it to the centre
    x = (t - 0.5) * length
    y = 2 * bend * 2 * t * (1 - t) - bend
    taper = np.sqrt(np.sin(np.pi * t))
    theta = rng.uniform(0, np.pi)
    c, s = np.cos(theta), np.sin(theta)
    line = np.c_[x * c - y * s, x * s + y * c, width * (0.35 + 0.65 * taper), 0.3 + 0.7 * taper]
    return _polyline_defect("scratch", [line], "add", _signed(rng, 0.12, 0.3, 0.7))


def _walk(rng: np.random.Generator, start: np.ndarray, heading: float, length: float,
          n: int, width: float, wiggle: float) -> np.ndarray:
    """A random-walk polyline: ``n`` steps of ``length / n`` with a wandering heading."""
    headings = heading + np.cumsum(rng.normal(0.0, wiggle, n))
    steps = (length / n) * np.c_[np.cos(headings), np.sin(headings)]
    xy = np.vstack([start, start + np.cumsum(steps, axis=0)])
    strength = np.linspace(1.0, 0.5, n + 1)
    return np.c_[xy, width * np.linspace(1.0, 0.6, n + 1), strength]


def build_crack(rng: np.random.Generator, sizes: dict) -> Defect:
    """A dark branching crack: two random walks from the centre plus a few side branches."""
    length = _loguniform(rng, sizes["crack"])
    width = rng.uniform(*sizes["crack_width"])
    heading = rng.uniform(0, 2 * np.pi)
    n = int(rng.integers(6, 12))
    origin = np.zeros(2)
    halves = [_walk(rng, origin, heading + k * np.pi, length / 2, n, width, 0.2) for k in (0, 1)]
    lines = list(halves)
    for _ in range(int(rng.integers(1, 4))):
        host = halves[int(rng.integers(0, 2))]
        i = int(rng.integers(1, n))
        prev = host[i, :2] - host[i - 1, :2]
        side = rng.choice([-1.0, 1.0]) * rng.uniform(0.4, 1.1)
        h = np.arctan2(prev[1], prev[0]) + side
        lines.append(_walk(rng, host[i, :2], h, length * rng.uniform(0.1, 0.35),
                           int(rng.integers(3, 7)), host[i, 2] * 0.7, 0.25))
    return _polyline_defect("crack", lines, "mul", -rng.uniform(0.6, 0.85))


def _metaballs(rng: np.random.Generator, kind: str, size: float, t0: float, t1: float,
               mode: str, amp: float) -> Defect:
    k = int(rng.integers(2, 6))
    balls = [(0.0, 0.0, size / 4.5)]  # the main ball keeps the centre inside the blob
    for _ in range(k):
        ang, rad = rng.uniform(0, 2 * np.pi), rng.uniform(0.1, 0.32) * size
        balls.append((rad * np.cos(ang), rad * np.sin(ang), rng.uniform(0.07, 0.16) * size))
    arr = np.array(balls)
    reach = float((np.hypot(arr[:, 0], arr[:, 1]) + 3.5 * arr[:, 2]).max())
    d = Metaballs(kind, 0.0, 0.0, _box(reach, reach), _box(reach, reach), size, mode, amp,
                  balls=arr, t0=t0, t1=t1)
    return _measure(d)


def build_stain(rng: np.random.Generator, sizes: dict) -> Defect:
    """A large, low-contrast irregular blob with a soft edge."""
    size = _loguniform(rng, sizes["stain"])
    return _metaballs(rng, "stain", size, 0.25, 0.75, "add", _signed(rng, 0.05, 0.12, 0.6))


def build_dark_area(rng: np.random.Generator, sizes: dict) -> Defect:
    """A large darkened region (EL: an inactive or poorly contacted part of the cell)."""
    size = _loguniform(rng, sizes["dark_area"])
    return _metaballs(rng, "dark_area", size, 0.45, 0.6, "mul", -rng.uniform(0.3, 0.6))


def build_missing_pattern(rng: np.random.Generator, sizes: dict) -> Defect:
    """A rectangle where the die pattern is missing (bare surface shows)."""
    hw = _loguniform(rng, sizes["missing_pattern"]) / 2
    hh = _loguniform(rng, sizes["missing_pattern"]) / 2
    return Patch("missing_pattern", 0.0, 0.0, _box(hw, hh), _box(hw, hh), 2 * max(hw, hh),
                 "bare", 1.0, half_w=hw, half_h=hh)


def build_finger_interruption(rng: np.random.Generator, sizes: dict) -> Defect:
    """A darkened streak along an interrupted finger (EL)."""
    length = rng.uniform(*sizes["finger_interruption"])
    width = rng.uniform(*sizes["finger_interruption_width"])
    sx, sy = length / 2.3548, width / 2.3548
    reach = _box(3.5 * sx, 3.5 * sy)
    d = Streak("finger_interruption", 0.0, 0.0, reach, reach, length, "mul",
               -rng.uniform(0.25, 0.45), sx=sx, sy=sy)
    return _measure(d)


BUILDERS = {
    "particle": build_particle,
    "scratch": build_scratch,
    "pit": build_pit,
    "stain": build_stain,
    "missing_pattern": build_missing_pattern,
    "crack": build_crack,
    "dark_area": build_dark_area,
    "finger_interruption": build_finger_interruption,
}


# ----------------------------------------------------------------------------- placement


def place_defects(
    sample: VirtualSample,
    n: int,
    kinds: Sequence[str],
    seed: int,
    sizes: dict[str, tuple[float, float]] | None = None,
    attempts: int = 200,
) -> list[Defect]:
    """Generate and place ``n`` defects on a sample.

    Kinds are assigned round-robin (``kinds[i % len(kinds)]``) so that every kind appears once
    ``n >= len(kinds)``. Defect ``i`` draws its shape and position from its own generator
    (``seed``, ``i``): raising ``n`` keeps the first defects unchanged. A position is redrawn
    until the sample's ``_accept_defect`` hook accepts it (whole defect inside the usable
    area), and the shape itself is redrawn every 40 tries (a large crack may not fit a small
    cell); after ``attempts`` tries the last proposal is kept (its centre is inside).

    Parameters
    ----------
    sample : VirtualSample
        Provides the ``_propose_point``, ``_adjust_point`` and ``_accept_defect`` hooks.
    n : int
        Number of defects.
    kinds : sequence of str
        Kinds to cycle through.
    seed : int
        Seed of the defect generators.
    sizes : dict, optional
        Overrides of ``DEFAULT_SIZES``.
    attempts : int
        Placement tries per defect.
    """
    if n < 0:
        raise ValueError(f"n_defects: must be >= 0, got {n}")
    table = {**DEFAULT_SIZES, **(sizes or {})}
    out: list[Defect] = []
    for i in range(int(n)):
        kind = kinds[i % len(kinds)]
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0xDEFEC7, i])
        placed = None
        for attempt in range(attempts):
            if attempt % 40 == 0:  # a shape that keeps not fitting is drawn anew
                shape = BUILDERS[kind](rng, table)
            x, y = sample._adjust_point(kind, *sample._propose_point(rng))
            placed = shape.moved(x, y)
            if sample._accept_defect(placed):
                break
        out.append(placed)
    return out


class DefectField:
    """The defects of one sample, with a vectorised test of which ones a tile sees.

    Parameters
    ----------
    defects : list of Defect
        Placed defects (drawn in list order).
    nominal : float
        Typical reflectance of the sample surface (for the truth ``contrast``).
    bare : float
        Reflectance of the bare surface that ``"bare"`` defects reveal.
    """

    def __init__(self, defects: list[Defect], nominal: float, bare: float) -> None:
        self.items = list(defects)
        self.nominal = float(nominal)
        self.bare = float(bare)
        self._reach = np.array([d.reach_um for d in self.items], dtype=np.float64).reshape(-1, 4)

    def __len__(self) -> int:
        return len(self.items)

    def hits(self, xs: np.ndarray, ys: np.ndarray, p: float) -> np.ndarray:
        """Indices of the defects whose reach (plus two pixels) meets the tile."""
        if not self.items:
            return np.zeros(0, dtype=np.intp)
        m = 2.5 * p
        r = self._reach
        hit = (
            (r[:, 0] - m <= xs[-1]) & (r[:, 2] + m >= xs[0])
            & (r[:, 1] - m <= ys[-1]) & (r[:, 3] + m >= ys[0])
        )
        return np.flatnonzero(hit)

    def draw(self, img: np.ndarray, xs: np.ndarray, ys: np.ndarray, p: float) -> None:
        """Draw every defect the tile sees into ``img`` (float32, in place)."""
        for i in self.hits(xs, ys, p):
            self.items[i].draw(img, xs, ys, p, self.bare)

    def truths(self) -> list[TrueDefect]:
        """Ground-truth records in id order."""
        return [d.truth(i, self.nominal, self.bare) for i, d in enumerate(self.items)]
