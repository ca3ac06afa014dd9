"""Synthetic anomalies on good images, so the anomaly head learns from good images only.

The approach of DRAEM (Zavrtanik et al. 2021: Perlin-noise masks filled with foreign texture)
and CutPaste (Li et al. 2021: pasted patches and thin "scar" strips), extended with the shapes
inspection meets on wafers and cells: blobs and particles, pits, thin scratches and branching
cracks, rectangular missing pattern, and the changes a defect makes inside its mask: brighter
or darker, foreign texture, blur, flattened structure, added grain.

Everything works on relative reflectance ``r`` (1 = the surface's brightness level) and returns
the changed image with a target mask of the pixels that *visibly* changed (a blur on a flat area
changes nothing and must not be called a defect). No simulator defect label is used.

Written by hand: no library synthesises anomaly masks and fills (anomalib's DRAEM augmenter
needs downloaded texture images and torch-side Perlin code tied to its own data modules).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

#: smallest relative change counted as a visible defect pixel
VISIBLE = 0.04


def _noise_mask(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Perlin-like blob mask: thresholded smooth noise, cut to one random window."""
    h, w = shape
    scale = float(rng.choice([4, 8, 16, 32]))
    small = rng.standard_normal((int(np.ceil(h / scale)) + 2, int(np.ceil(w / scale)) + 2))
    field = ndimage.zoom(small, scale, order=3)[:h, :w]
    thr = np.quantile(field, rng.uniform(0.75, 0.97))
    mask = (field > thr).astype(np.float32)
    # keep a random window so the anomaly is local (DRAEM masks can cover a whole patch)
    wh, ww = int(rng.uniform(0.15, 0.7) * h), int(rng.uniform(0.15, 0.7) * w)
    r0, c0 = rng.integers(0, h - wh + 1), rng.integers(0, w - ww + 1)
    keep = np.zeros_like(mask)
    keep[r0:r0 + wh, c0:c0 + ww] = 1
    return mask * keep


def _ellipse_mask(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Particle, pit or blob: a (lumpy) ellipse of 1.5 to 40 px radius."""
    h, w = shape
    a = float(np.exp(rng.uniform(np.log(1.2), np.log(40.0))))
    b = a * rng.uniform(0.4, 1.0)
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    th = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    u = (xx - cx) * np.cos(th) + (yy - cy) * np.sin(th)
    v = -(xx - cx) * np.sin(th) + (yy - cy) * np.cos(th)
    phi = np.arctan2(v, u)
    lobes = 1.0 + rng.uniform(0, 0.3) * np.cos(rng.integers(2, 6) * phi + rng.uniform(0, 6.3))
    rho = np.sqrt((u / a) ** 2 + (v / b) ** 2) / lobes
    return np.clip((1.0 - rho) * min(a, b) + 0.5, 0.0, 1.0).astype(np.float32)


def _polyline_mask(
    shape: tuple[int, int], rng: np.random.Generator, branches: int = 0
) -> np.ndarray:
    """Scratch (smooth, long, 1-6 px wide) or crack (jagged random walk with branches)."""
    h, w = shape
    width = float(np.exp(rng.uniform(np.log(0.8), np.log(6.0))))
    length = rng.uniform(0.2, 1.2) * max(h, w)
    n = int(rng.integers(2, 6)) if branches == 0 else int(rng.integers(6, 14))
    step = length / n
    pts = [np.array([rng.uniform(0, h), rng.uniform(0, w)])]
    ang = rng.uniform(0, 2 * np.pi)
    turn = 0.15 if branches == 0 else 0.7
    for _ in range(n):
        ang += rng.normal(0, turn)
        pts.append(pts[-1] + step * np.array([np.sin(ang), np.cos(ang)]))
    lines = [np.array(pts)]
    for _ in range(branches):
        start = lines[0][rng.integers(1, len(lines[0]) - 1)]
        a2 = ang + rng.choice([-1, 1]) * rng.uniform(0.5, 1.3)
        seg = [start]
        for _ in range(int(rng.integers(2, 6))):
            a2 += rng.normal(0, 0.5)
            seg.append(seg[-1] + 0.6 * step * np.array([np.sin(a2), np.cos(a2)]))
        lines.append(np.array(seg))
    return _draw_lines(shape, lines, width)


def _draw_lines(shape: tuple[int, int], lines: list[np.ndarray], width: float) -> np.ndarray:
    """Coverage of polylines of a given width (distance to the nearest segment, soft edge)."""
    h, w = shape
    d = np.full(shape, np.inf, dtype=np.float32)
    reach = width / 2.0 + 1.0  # beyond this distance a pixel's coverage is 0
    for line in lines:
        for a, b in zip(line[:-1], line[1:], strict=True):
            # only the segment's bounding box (grown by its reach) can be covered
            r0 = int(max(np.floor(min(a[0], b[0]) - reach), 0))
            r1 = int(min(np.ceil(max(a[0], b[0]) + reach) + 1, h))
            c0 = int(max(np.floor(min(a[1], b[1]) - reach), 0))
            c1 = int(min(np.ceil(max(a[1], b[1]) + reach) + 1, w))
            if r0 >= r1 or c0 >= c1:
                continue
            yy, xx = np.mgrid[r0:r1, c0:c1].astype(np.float32)
            e = b - a
            l2 = max(float(e @ e), 1e-9)
            t = np.clip(((yy - a[0]) * e[0] + (xx - a[1]) * e[1]) / l2, 0.0, 1.0)
            dist = np.hypot(yy - (a[0] + t * e[0]), xx - (a[1] + t * e[1]))
            np.minimum(d[r0:r1, c0:c1], dist, out=d[r0:r1, c0:c1])
    return np.clip(width / 2.0 + 0.5 - d, 0.0, 1.0).astype(np.float32)


def _rect_mask(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Missing or extra pattern: an axis-aligned rectangle (CutPaste patch)."""
    h, w = shape
    rh = int(np.exp(rng.uniform(np.log(4), np.log(0.5 * h))))
    rw = int(np.exp(rng.uniform(np.log(4), np.log(0.5 * w))))
    r0, c0 = rng.integers(0, h - rh + 1), rng.integers(0, w - rw + 1)
    m = np.zeros(shape, dtype=np.float32)
    m[r0:r0 + rh, c0:c0 + rw] = 1.0
    return m


def _particles_mask(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A cluster of tiny particles (1-3 px)."""
    h, w = shape
    m = np.zeros(shape, dtype=np.float32)
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    spread = rng.uniform(3, 25)
    for _ in range(int(rng.integers(2, 12))):
        y = int(np.clip(cy + rng.normal(0, spread), 0, h - 1))
        x = int(np.clip(cx + rng.normal(0, spread), 0, w - 1))
        s = int(rng.integers(1, 4))
        m[y:y + s, x:x + s] = 1.0
    return m


_MASKS = (
    (_noise_mask, 0.22),
    (_ellipse_mask, 0.26),
    (lambda s, r: _polyline_mask(s, r, 0), 0.2),
    (lambda s, r: _polyline_mask(s, r, int(r.integers(1, 4))), 0.1),
    (_rect_mask, 0.12),
    (_particles_mask, 0.1),
)


def _foreign_texture(
    r: np.ndarray, donors: list[np.ndarray] | None, rng: np.random.Generator
) -> np.ndarray:
    """A texture from elsewhere: another good patch (rotated, rescaled in contrast) or noise."""
    h, w = r.shape
    if donors and rng.random() < 0.6:
        d = donors[int(rng.integers(len(donors)))]
        if d.shape[0] >= h and d.shape[1] >= w:
            y, x = rng.integers(0, d.shape[0] - h + 1), rng.integers(0, d.shape[1] - w + 1)
            t = np.rot90(d[y:y + h, x:x + w], int(rng.integers(4)))
            if t.shape == (h, w):
                return (t - t.mean()) * rng.uniform(0.5, 2.0) + rng.uniform(0.6, 1.4)
    scale = float(rng.choice([1, 2, 4, 8]))
    small = rng.standard_normal((int(h / scale) + 2, int(w / scale) + 2))
    tex = ndimage.zoom(small, scale, order=1)[:h, :w]
    return (1.0 + rng.uniform(-0.4, 0.4) + rng.uniform(0.05, 0.3) * tex).astype(np.float32)


def _is_flat(r: np.ndarray, mask: np.ndarray, level: float) -> bool:
    """True when the patch has no structure under the mask (local std below 3 % of level)."""
    inside = mask > 0.25
    if not inside.any():
        return True
    mean = ndimage.uniform_filter(r, 7)
    local_sd = np.sqrt(np.maximum(ndimage.uniform_filter(r * r, 7) - mean * mean, 0.0))
    return float(np.median(local_sd[inside])) < 0.03 * max(level, 1e-3)


def add_anomalies(
    r: np.ndarray,
    rng: np.random.Generator,
    n: int | None = None,
    donors: list[np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Paint ``n`` synthetic anomalies into a relative-reflectance patch.

    Parameters
    ----------
    r : ndarray (H, W) float32
        Good patch, relative reflectance (1 = the surface's level).
    rng : numpy.random.Generator
        Source of every random choice (seeded: reproducible training).
    n : int, optional
        Number of anomalies (default 1 to 3).
    donors : list of ndarray, optional
        Other good patches (relative reflectance) to take foreign texture from.

    Returns
    -------
    image : ndarray (H, W) float32
        The patch with anomalies.
    target : ndarray (H, W) float32
        1 where the patch visibly changed inside an anomaly mask, else 0.
    """
    out = r.astype(np.float32, copy=True)
    target = np.zeros(r.shape, dtype=np.float32)
    n = int(rng.integers(1, 4)) if n is None else n
    probs = np.array([p for _, p in _MASKS])
    for _ in range(n):
        make = _MASKS[int(rng.choice(len(_MASKS), p=probs / probs.sum()))][0]
        mask = make(r.shape, rng)
        if mask.max() <= 0:
            continue
        soft = rng.uniform(0.0, 1.2)
        if soft > 0.3:  # soft edge; renormalised so a thin line keeps its full contrast
            mask = ndimage.gaussian_filter(mask, soft)
            mask = np.minimum(mask / max(float(mask.max()), 1e-6), 1.0)
        before = out.copy()
        op = rng.choice(["intensity", "intensity", "relative", "texture", "blur", "flat", "grain"])
        level = float(np.median(before))
        # a change must stand out of the surface's own texture to be a defect at all (an 8 %
        # blob is invisible on a speckled rough surface): scale by the local texture contrast
        tex_sigma = float(np.std(before - ndimage.uniform_filter(before, 5))) / max(level, 1e-3)
        floor = max(0.08, 2.5 * tex_sigma)
        if op == "flat" and _is_flat(before, mask, level):
            # flattening what is already flat teaches the network that plain areas (bare
            # silicon, wide metal) are missing pattern: paint a plain level change instead
            op = "intensity"
        out = _paint(op, out, mask, level, floor, donors, rng)
        changed = np.abs(out - before) > np.float32(VISIBLE * max(level, 1e-3))
        if op == "grain":  # the grain's region is the defect, also where a draw was small
            changed = ndimage.binary_closing(changed, iterations=2) | (mask > 0.5)
        target = np.maximum(target, ((mask > 0.25) & changed).astype(np.float32))
    return out.astype(np.float32), _one_region_each(target, out, r)


def _paint(op: str, out: np.ndarray, mask: np.ndarray, level: float, floor: float,
           donors: list[np.ndarray] | None, rng: np.random.Generator) -> np.ndarray:
    """``out`` with one anomaly of kind ``op`` painted under ``mask`` (weights in [0, 1]);
    ``floor`` is the smallest relative change that stands out of the surface's texture."""
    if op == "intensity":  # particle, pit, stain: brighter or darker
        delta = rng.choice([-1, 1]) * np.exp(rng.uniform(np.log(floor), np.log(
            max(0.7, 2 * floor))))
        out = out + np.float32(delta * level) * mask
    elif op == "relative":  # EL-like darkening (crack, dark area): scales the emission
        out = out * (1.0 - np.float32(rng.uniform(min(floor, 0.5), 0.9)) * mask)
    elif op == "texture":
        tex = _foreign_texture(out, donors, rng)
        # a donor of the same kind is the same texture: shift its level or change its
        # contrast so that the fill is foreign, not a seamless copy
        shift = rng.choice([-1, 1]) * rng.uniform(floor, max(0.5, 2 * floor))
        tex = (tex - tex.mean()) * np.float32(rng.choice([0.3, 2.0]) * rng.uniform(0.8, 1.5))
        tex = (tex + np.float32(1.0 + shift)) * np.float32(level)
        out = out + (tex - out) * mask
    elif op == "blur":
        blurred = ndimage.gaussian_filter(out, rng.uniform(1.5, 5.0))
        out = out + (blurred - out) * mask
    elif op == "flat":  # missing pattern: structure replaced by a plain level
        flat = np.float32(level * rng.uniform(0.5, 1.5))
        out = out + (flat - out) * mask
    else:  # contamination grain
        grain = rng.standard_normal(out.shape).astype(np.float32) * np.float32(
            rng.uniform(floor, max(0.3, 2 * floor)) * level
        )
        out = out + grain * mask
    return out


def _one_region_each(target: np.ndarray, out: np.ndarray, r: np.ndarray) -> np.ndarray:
    """The target closed into one region per anomaly and kept only where the final patch
    ``out`` visibly differs from the good one ``r`` (or right next to it)."""
    # a pixel whose change is isolated inside a mask (noise in a grain fill) still belongs to
    # the defect: close small gaps so the target is one region per anomaly
    if target.any():
        target = ndimage.binary_closing(target > 0, iterations=1)
        # a later anomaly may have painted an earlier one back to normal: keep only what
        # differs from the good patch in the end (or lies right next to such a pixel)
        level0 = max(float(np.median(r)), 1e-3)
        visible = np.abs(out - r) > np.float32(VISIBLE * level0)
        target = (target & ndimage.binary_dilation(visible, iterations=1)).astype(np.float32)
    return target
