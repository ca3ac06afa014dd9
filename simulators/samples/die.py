"""The repeating die pattern of a wafer: rasterised once per sample, sampled per tile.

The template covers one cell of the die grid: the die plus half a scribe lane on each side,
so that tiling it periodically gives the whole grid with its scribe lanes. It is stored as
uint8 reflectance (x 255) with a 2x mip pyramid; a tile is rendered by bilinear lookup in the
level whose texel is just finer than the pixel (pre-filtered, so fine circuitry averages to
grey instead of aliasing into moire). Lookups are separable in x and y (an axis-aligned grid),
so the gather indices are two 1-D arrays.
"""

from __future__ import annotations

import math

import numpy as np

#: bare silicon (scribe lanes, unpatterned edge dies, missing pattern)
BARE_SI = 92 / 255  # a uint8 level, so the template and bare dies agree exactly
#: dielectric field between structures
FIELD = 0.55
METAL = 0.82
PAD = 0.9
DARK = 0.22
DIFFUSION = 0.62
MID = 0.7
POLY = 0.28


def _q(value: float) -> np.uint8:
    return np.uint8(round(value * 255))


class DieTemplate:
    """Rasterised die-grid cell with a mip pyramid.

    Parameters
    ----------
    pitch_um : (float, float)
        Die pitch (x, y).
    scribe_um : float
        Scribe lane width (half of it on each side of the cell).
    seed : int
        Layout seed.
    max_texels : int
        Largest template side; the texel is ``max(min_texel_um, pitch / max_texels)``.
    min_texel_um : float
        Finest texel (µm).
    """

    def __init__(
        self,
        pitch_um: tuple[float, float],
        scribe_um: float,
        seed: int,
        max_texels: int = 4096,
        min_texel_um: float = 1.0,
    ) -> None:
        self.pitch = (float(pitch_um[0]), float(pitch_um[1]))
        self.scribe = float(scribe_um)
        align = 32  # sides divisible by 2**5: five exact 2x pyramid levels
        sizes = []
        for pitch in self.pitch:
            n = math.ceil(pitch / max(min_texel_um, pitch / max_texels))
            sizes.append(max(align, math.ceil(n / align) * align))
        self.nx, self.ny = sizes
        self.texel = (self.pitch[0] / self.nx, self.pitch[1] / self.ny)
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0xD1E])
        self._img = np.full((self.ny, self.nx), _q(BARE_SI), dtype=np.uint8)
        self._draw_die(rng)
        # one periodic extra row and column: bilinear lookups never need a modulo
        self._padded = [np.pad(a, ((0, 1), (0, 1)), mode="wrap") for a in self._pyramid(self._img)]
        #: pyramid levels (views without the padding), level 0 the finest
        self.levels = [a[:-1, :-1] for a in self._padded]
        self.mean = float(self.levels[-1].mean()) / 255.0
        self.die_mean = self._die_mean()
        del self._img

    # ------------------------------------------------------------------ rasterising

    def _fill(self, x0: float, y0: float, x1: float, y1: float, value: float) -> None:
        """Fill a rectangle given in cell µm (clipped to the cell)."""
        r0, r1, c0, c1 = self._texel_range(x0, y0, x1, y1)
        if c0 < c1 and r0 < r1:
            self._img[r0:r1, c0:c1] = _q(float(value))

    def _draw_die(self, rng: np.random.Generator) -> None:
        px, py = self.pitch
        s = min(self.scribe / 2, 0.2 * min(px, py))
        x0, y0, x1, y1 = s, s, px - s, py - s  # the die itself
        self._fill(x0, y0, x1, y1, FIELD)
        w, h = x1 - x0, y1 - y0
        short = min(w, h)
        # seal ring just inside the die edge
        ring = max(3 * max(self.texel), 0.004 * short)
        inset = 0.5 * ring
        self._frame(x0 + inset, y0 + inset, x1 - inset, y1 - inset, ring, METAL)
        # bond pads along the four edges
        pad = float(np.clip(0.03 * short, 6 * max(self.texel), 100.0))
        margin = inset + 2.5 * ring
        self._pads(x0 + margin, y0 + margin, x1 - margin, y1 - margin, pad, rng)
        # core: alignment mark in the top-left corner, circuit blocks elsewhere
        core = margin + pad + max(1.5 * pad, 4 * max(self.texel))
        cx0, cy0, cx1, cy1 = x0 + core, y0 + core, x1 - core, y1 - core
        if cx1 - cx0 < 8 * max(self.texel) or cy1 - cy0 < 8 * max(self.texel):
            return  # a die too small for circuitry: pads only
        mark = 0.12 * min(cx1 - cx0, cy1 - cy0)
        self._alignment_mark(cx0, cy0, mark)
        self._blocks(cx0 + mark * 1.2, cy0, cx1, cy1, rng, depth=0)
        self._blocks(cx0, cy0 + mark * 1.2, cx0 + mark * 1.2, cy1, rng, depth=3)

    def _frame(self, x0: float, y0: float, x1: float, y1: float, width: float, value: float):
        self._fill(x0, y0, x1, y0 + width, value)
        self._fill(x0, y1 - width, x1, y1, value)
        self._fill(x0, y0, x0 + width, y1, value)
        self._fill(x1 - width, y0, x1, y1, value)

    def _pads(self, x0: float, y0: float, x1: float, y1: float, pad: float,
              rng: np.random.Generator) -> None:
        pitch = pad * rng.uniform(1.6, 2.4)
        border = max(0.12 * pad, 1.5 * max(self.texel))
        for length, along_x in ((x1 - x0, True), (y1 - y0, False)):
            n = int((length - 2 * pad) // pitch)
            if n <= 0:
                continue
            start = (length - (n - 1) * pitch - pad) / 2
            for k in range(n):
                a = start + k * pitch
                for far in (False, True):
                    if along_x:
                        px0, py0 = x0 + a, (y1 - pad) if far else y0
                    else:
                        px0, py0 = (x1 - pad) if far else x0, y0 + a
                    self._fill(px0, py0, px0 + pad, py0 + pad, MID)
                    self._fill(px0 + border, py0 + border, px0 + pad - border,
                               py0 + pad - border, PAD)

    def _alignment_mark(self, x0: float, y0: float, size: float) -> None:
        self._fill(x0, y0, x0 + size, y0 + size, DARK)
        arm = max(0.12 * size, 2 * max(self.texel))
        c = size / 2
        self._fill(x0 + 0.1 * size, y0 + c - arm / 2, x0 + 0.9 * size, y0 + c + arm / 2, PAD)
        self._fill(x0 + c - arm / 2, y0 + 0.1 * size, x0 + c + arm / 2, y0 + 0.9 * size, PAD)
        # box-in-box corner marks
        b = 0.18 * size
        for bx, by in ((0.06, 0.06), (0.76, 0.76)):
            self._frame(x0 + bx * size, y0 + by * size, x0 + bx * size + b, y0 + by * size + b,
                        max(arm / 2, max(self.texel)), METAL)

    def _blocks(self, x0: float, y0: float, x1: float, y1: float, rng: np.random.Generator,
                depth: int) -> None:
        """Guillotine-split a region into circuit blocks separated by routing channels."""
        w, h = x1 - x0, y1 - y0
        t = max(self.texel)
        if w < 6 * t or h < 6 * t:
            return
        if depth < 4 and max(w, h) > 40 * t and rng.random() < 0.9 - 0.1 * depth:
            gap = min(max(0.02 * max(w, h), 4 * t), 0.1 * max(w, h))
            f = rng.uniform(0.3, 0.7)
            if w >= h:
                xm = x0 + f * w
                self._channel(xm - gap / 2, y0, xm + gap / 2, y1, vertical=True, rng=rng)
                self._blocks(x0, y0, xm - gap / 2, y1, rng, depth + 1)
                self._blocks(xm + gap / 2, y0, x1, y1, rng, depth + 1)
            else:
                ym = y0 + f * h
                self._channel(x0, ym - gap / 2, x1, ym + gap / 2, vertical=False, rng=rng)
                self._blocks(x0, y0, x1, ym - gap / 2, rng, depth + 1)
                self._blocks(x0, ym + gap / 2, x1, y1, rng, depth + 1)
            return
        kind = rng.choice(["memory", "logic", "logic", "analog", "empty"])
        getattr(self, f"_block_{kind}")(x0, y0, x1, y1, rng)

    def _channel(self, x0: float, y0: float, x1: float, y1: float, vertical: bool,
                 rng: np.random.Generator) -> None:
        """Parallel metal routing lines along a channel."""
        t = max(self.texel)
        line = max(2 * t, 3.0)
        pitch = line * rng.uniform(2.0, 3.0)
        across = (x1 - x0) if vertical else (y1 - y0)
        n = int(across // pitch)
        for k in range(n):
            if rng.random() < 0.25:
                continue  # an unused track
            a = k * pitch + (across - n * pitch + pitch - line) / 2
            if vertical:
                self._fill(x0 + a, y0, x0 + a + line, y1, METAL)
            else:
                self._fill(x0, y0 + a, x1, y0 + a + line, METAL)

    def _texel_range(self, x0: float, y0: float, x1: float, y1: float) -> tuple[int, ...]:
        tx, ty = self.texel
        return (max(round(y0 / ty), 0), min(round(y1 / ty), self.ny),
                max(round(x0 / tx), 0), min(round(x1 / tx), self.nx))

    def _block_memory(self, x0: float, y0: float, x1: float, y1: float,
                      rng: np.random.Generator) -> None:
        """A memory array: a fine grating framed by decoder strips."""
        t = max(self.texel)
        strip = max(0.06 * min(x1 - x0, y1 - y0), 2 * t)
        self._fill(x0, y0, x1, y1, DIFFUSION)
        r0, r1, c0, c1 = self._texel_range(x0 + strip, y0 + strip, x1, y1)
        if r0 >= r1 or c0 >= c1:
            return
        period = int(rng.integers(2, 5)) * 2  # texels; >= 4 so the grating is resolved
        on = np.arange(r1 - r0 if rng.random() < 0.5 else c1 - c0) % period < period // 2
        values = np.where(on, _q(METAL), _q(POLY)).astype(np.uint8)
        if len(values) == r1 - r0:
            self._img[r0:r1, c0:c1] = values[:, None]
        else:
            self._img[r0:r1, c0:c1] = values[None, :]

    def _block_logic(self, x0: float, y0: float, x1: float, y1: float,
                     rng: np.random.Generator) -> None:
        """Standard-cell rows: cells of random width with gate stripes, rails between rows."""
        r0, r1, c0, c1 = self._texel_range(x0, y0, x1, y1)
        if r0 >= r1 or c0 >= c1:
            return
        row_h = int(rng.integers(8, 14))
        width = c1 - c0
        idx = np.arange(width)
        # cell types: 0 filler, 1 gates (stripes over diffusion), 2 diffusion, 3 contact strip
        base = np.array([_q(FIELD), _q(DIFFUSION), _q(DIFFUSION), _q(MID)], dtype=np.uint8)
        for r in range(r0, r1, row_h):
            widths = rng.integers(6, 40, size=width // 6 + 2)
            types = rng.choice(4, size=len(widths), p=[0.2, 0.5, 0.2, 0.1])
            cell_type = np.repeat(types, widths)[:width]
            row = base[cell_type]
            gates = (cell_type == 1) & (idx % 4 < 2)
            row = np.where(gates, _q(POLY), row).astype(np.uint8)
            mid = r + row_h // 2
            self._img[r:min(mid, r1), c0:c1] = row[None, :]
            # the second half of the row (the other well) shows the same cells a shade brighter
            self._img[mid:min(r + row_h, r1), c0:c1] = np.where(
                row == _q(DIFFUSION), _q(MID), row
            )[None, :]
            self._img[r, c0:c1] = _q(METAL)  # power rail

    def _block_analog(self, x0: float, y0: float, x1: float, y1: float,
                      rng: np.random.Generator) -> None:
        """A few large devices (capacitors, resistors, transistors)."""
        self._fill(x0, y0, x1, y1, FIELD)
        w, h = x1 - x0, y1 - y0
        for _ in range(int(rng.integers(3, 9))):
            bw, bh = rng.uniform(0.1, 0.45) * w, rng.uniform(0.1, 0.45) * h
            bx, by = x0 + rng.uniform(0, w - bw), y0 + rng.uniform(0, h - bh)
            self._fill(bx, by, bx + bw, by + bh, float(rng.choice([DARK, MID, METAL, POLY])))

    def _block_empty(self, x0: float, y0: float, x1: float, y1: float,
                     rng: np.random.Generator) -> None:
        """Dummy fill: a sparse grid of small squares."""
        r0, r1, c0, c1 = self._texel_range(x0, y0, x1, y1)
        if r0 >= r1 or c0 >= c1:
            return
        period = int(rng.integers(5, 9))
        rr = (np.arange(r0, r1) % period) < 2
        cc = (np.arange(c0, c1) % period) < 2
        block = self._img[r0:r1, c0:c1]
        block[np.ix_(rr, cc)] = _q(DIFFUSION)

    @staticmethod
    def _pyramid(level0: np.ndarray) -> list[np.ndarray]:
        levels = [level0]
        # halve while both sides are even (an odd side cannot be 2x2 block-averaged)
        while all(n % 2 == 0 for n in levels[-1].shape) and min(levels[-1].shape) > 32:
            a = levels[-1].astype(np.uint16)
            s = a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2]
            levels.append(((s + 2) // 4).astype(np.uint8))
        return levels

    def _die_mean(self) -> float:
        """Mean reflectance of the die core (inside the scribe lanes)."""
        level = self.levels[min(2, len(self.levels) - 1)]
        ny, nx = level.shape
        fx, fy = self.scribe / self.pitch[0], self.scribe / self.pitch[1]
        sub = level[int(ny * fy): ny - int(ny * fy), int(nx * fx): nx - int(nx * fx)]
        return float(sub.mean()) / 255.0 if sub.size else self.mean

    # ------------------------------------------------------------------ sampling

    def level_for(self, pixel_size_um: float) -> int:
        """Pyramid level whose texel is the largest one not coarser than the pixel."""
        ratio = pixel_size_um / max(self.texel)
        level = int(math.floor(math.log2(ratio))) if ratio >= 1.0 else 0
        return int(np.clip(level, 0, len(self.levels) - 1))

    def sample(self, ux: np.ndarray, uy: np.ndarray, pixel_size_um: float) -> np.ndarray:
        """Bilinear, periodic lookup of the pattern at cell coordinates.

        Parameters
        ----------
        ux, uy : ndarray
            1-D coordinates (µm) relative to a cell corner (any value: the lookup wraps).
        pixel_size_um : float
            Pixel size, to choose the pyramid level.

        Returns
        -------
        ndarray of float32, shape (len(uy), len(ux))
        """
        level = self.level_for(pixel_size_um)
        ny, nx = self.levels[level].shape
        flat = self._padded[level].ravel()
        ix0, wx = _axis(ux, self.pitch[0] / nx, nx)
        iy0, wy = _axis(uy, self.pitch[1] / ny, ny)
        # flat indices of the lower-left texel; the other three corners are the same
        # indices into views shifted by 1, a row and a row + 1 (the padding does the wrap)
        row = nx + 1
        idx = (iy0 * row)[:, None] + ix0[None, :]
        wx1 = np.float32(1.0) - wx
        top = flat.take(idx) * wx1
        top += flat[1:].take(idx) * wx
        bottom = flat[row:].take(idx) * wx1
        bottom += flat[row + 1:].take(idx) * wx
        top *= ((np.float32(1.0) - wy) * np.float32(1.0 / 255.0))[:, None]
        bottom *= (wy * np.float32(1.0 / 255.0))[:, None]
        top += bottom
        return top


def _axis(u: np.ndarray, texel: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Wrapped lower texel index and the bilinear weight along one axis."""
    g = u / texel - 0.5
    f = np.floor(g)
    return f.astype(np.int64) % n, (g - f).astype(np.float32)
