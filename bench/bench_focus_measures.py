"""Benchmark: focus measures and the autofocus search on simulated defocus.

Fields are synthetic reflectance maps imaged through the simulator's ``Optics`` (defocus blur)
and ``CameraModel`` (shot + read noise, 12-bit): a smooth random texture, a sparse die
pattern (streets and pads on a bare die) and a low-contrast texture (+-3 %), plus four
featureless fields (bare wafer, busbar, dark, vignetted) that autofocus must refuse.

For each measure it reports, from a Z sweep (-6..+6 DOF, step 0.25 DOF), the error of the
interpolated peak, the full width at half maximum above the floor (smaller discriminates
better), the peak-to-floor ratio, the number of steps away from focus where the measure rises
by more than 3 sigma of its frame-to-frame noise (0 = monotonic falloff, no side peaks) and
the compute time on a 1024 x 1024 uint16 frame; then it runs ``autofocus()`` from random
starts within +-5 DOF and reports the images used, the error distribution (|z - z_true| in
DOF) and the fraction of featureless fields refused. Rows "(2x binned)" and "(central 512)"
are the default measure computed on a reduced frame (sweep figures only).

Run: ``.venv/bin/python bench/bench_focus_measures.py [--trials N] [--size PX] [--pixel-um UM]``
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scanner.acquisition.focus import (  # noqa: E402
    DEFAULT_MEASURE,
    MEASURES,
    autofocus,
    estimate_noise_sigma,
    texture_strength,
)
from simulators.camera import CameraModel, Optics  # noqa: E402


# ------------------------------------------------------------------------------ fields
def texture(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Smooth random texture, reflectance 0.2-0.8 (grain, polished-section-like)."""
    t = ndimage.gaussian_filter(rng.random(shape, dtype=np.float32), 2.0)
    return 0.2 + 0.6 * (t - t.min()) / (t.max() - t.min())


def die_pattern(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Sparse: dark 4 px streets every 256 px and a few bright pads on a bare die."""
    img = np.full(shape, 0.6, np.float32)
    oy, ox = rng.integers(0, 256, 2)
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    img[((yy + oy) % 256 < 4).ravel(), :] = 0.15
    img[:, ((xx + ox) % 256 < 4).ravel()] = 0.15
    for _ in range(8):
        y, x = rng.integers(0, shape[0] - 16, 2)
        img[y : y + 12, x : x + 12] = 0.9
    return img


def low_contrast(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Fine texture of +-3 % around 0.5 (anti-reflection coated cell, haze)."""
    t = ndimage.gaussian_filter(rng.random(shape, dtype=np.float32), 1.5)
    return 0.47 + 0.06 * (t - t.min()) / (t.max() - t.min())


def featureless(level: float, vignette: float = 0.0) -> Callable:
    def make(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        yy, xx = np.mgrid[-1 : 1 : shape[0] * 1j, -1 : 1 : shape[1] * 1j]
        return (level * (1 - vignette * (xx**2 + yy**2) / 2)).astype(np.float32)

    return make


FIELDS = {"texture": texture, "die pattern": die_pattern, "low contrast": low_contrast}
FEATURELESS = {
    "bare wafer": featureless(0.5),
    "busbar": featureless(0.9),
    "dark": featureless(0.06),
    "vignetted": featureless(0.5, vignette=0.2),
}


# ----------------------------------------------------------------------------- helpers
class Scope:
    def __init__(self, reflectance, z_true, optics, camera, rng):
        self.reflectance, self.z_true = reflectance, z_true
        self.optics, self.camera, self.rng = optics, camera, rng

    def __call__(self, z: float) -> np.ndarray:
        cam = self.camera
        blurred = self.optics.apply(self.reflectance, z - self.z_true, cam.pixel_size_um)
        return cam.digitise(blurred, cam.exposure_ref_ms, self.rng)


def bin2(img: np.ndarray) -> np.ndarray:
    f = img.astype(np.float32)
    r = f[0::2] + f[1::2]
    return r[:, 0::2] + r[:, 1::2]


def crop512(img: np.ndarray) -> np.ndarray:
    h, w = img.shape
    return img[max(0, h // 2 - 256) : h // 2 + 256, max(0, w // 2 - 256) : w // 2 + 256]


def sweep_figures(dz: np.ndarray, v: np.ndarray, noise: float) -> dict[str, float]:
    """Peak error, FWHM above the floor, peak/floor and non-monotonic steps of a sweep.

    A "rise" is a step away from focus where the measure grows by more than 3 x ``noise``
    (the standard deviation of the measure over repeated frames at one Z).
    """
    i = int(np.argmax(v))
    peak = float(dz[i])
    if 0 < i < len(v) - 1:
        y = np.log(v[i - 1 : i + 2])
        den = y[0] - 2 * y[1] + y[2]
        if den < 0:
            peak += 0.5 * (dz[1] - dz[0]) * (y[0] - y[2]) / den
    lo, hi = float(v.min()), float(v.max())
    n = (v - lo) / (hi - lo)
    above = np.nonzero(n >= 0.5)[0]
    a, b = above[0], above[-1]
    left = dz[a] if a == 0 else np.interp(0.5, [n[a - 1], n[a]], [dz[a - 1], dz[a]])
    right = dz[b] if b == len(v) - 1 else np.interp(0.5, [n[b + 1], n[b]], [dz[b + 1], dz[b]])
    tol = 3.0 * noise
    rises = int(np.sum(np.diff(v[: i + 1]) < -tol) + np.sum(np.diff(v[i:]) > tol))
    return {"err": abs(peak), "fwhm": float(right - left), "ratio": hi / lo, "rises": rises}


def time_ms(fn: Callable[[np.ndarray], float], frame: np.ndarray, reps: int = 30) -> float:
    fn(frame)
    t = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(frame)
        t.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(t))


# -------------------------------------------------------------------------------- main
def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=30, help="autofocus runs per measure/field")
    ap.add_argument("--size", type=int, default=1024, help="frame size (px)")
    ap.add_argument("--pixel-um", type=float, default=1.0, help="pixel size in the sample")
    ap.add_argument("--na", type=float, default=0.3, help="numerical aperture")
    args = ap.parse_args(argv)

    optics = Optics(numerical_aperture=args.na)
    dof = optics.depth_of_field_um
    cam = CameraModel(width=args.size, height=args.size, pixel_size_um=args.pixel_um)
    shape = (args.size, args.size)
    t_start = time.perf_counter()

    variants: dict[str, Callable[[np.ndarray], float]] = dict(MEASURES)
    base = MEASURES[DEFAULT_MEASURE]
    variants[f"{DEFAULT_MEASURE} (2x binned)"] = lambda im: base(bin2(im))
    variants[f"{DEFAULT_MEASURE} (central 512)"] = lambda im: base(crop512(im))

    # timing on a camera-like 1024 x 1024 uint16 frame
    rng = np.random.default_rng(0)
    frame = CameraModel().digitise(texture((1024, 1024), rng), 10.0, rng)
    timing = {name: time_ms(fn, frame) for name, fn in variants.items()}

    # Z sweeps, one per field, shared by all measures
    dz = np.arange(-6.0, 6.0001, 0.25)
    sweeps: dict[str, dict[str, dict[str, float]]] = {}
    for fname, make in FIELDS.items():
        rng = np.random.default_rng(1)
        scope = Scope(make(shape, rng), 0.0, optics, cam, rng)
        frames = [scope(d * dof) for d in dz]
        repeats = [scope(dz[-1] * dof) for _ in range(6)]  # noise of the measure
        sweeps[fname] = {
            name: sweep_figures(dz, np.array([fn(f) for f in frames]),
                                float(np.std([fn(f) for f in repeats], ddof=1)))
            for name, fn in variants.items()
        }

    # autofocus from random starts: the same fields, truths and starts for every measure
    af: dict[str, dict[str, dict[str, float]]] = {name: {} for name in MEASURES}
    for fname, make in {**FIELDS, **FEATURELESS}.items():
        n = args.trials if fname in FIELDS else max(5, args.trials // 3)
        for name in MEASURES:
            rng = np.random.default_rng(2)
            errs, imgs, oks, confs = [], [], [], []
            for _ in range(n):
                z_true = rng.uniform(-100, 100)
                start = z_true + rng.uniform(-5, 5) * dof
                scope = Scope(make(shape, rng), z_true, optics, cam, rng)
                res = autofocus(scope, start, dof, (-500.0, 500.0), measure=name)
                imgs.append(res.n_images)
                oks.append(res.ok)
                confs.append(res.confidence)
                if res.ok:
                    errs.append(abs(res.z_um - z_true) / dof)
            e = np.array(errs) if errs else np.array([np.nan])
            af[name][fname] = {
                "images": float(np.mean(imgs)),
                "median": float(np.median(e)),
                "p95": float(np.percentile(e, 95)),
                "max": float(np.max(e)),
                "ok": float(np.mean(oks)),
                "within": float(np.mean(e <= 0.25)) if errs else float("nan"),
                "conf": float(np.mean(confs)),
            }

    table = Table(
        title=(f"focus measures: {args.size}x{args.size} px, {args.pixel_um} µm/px, "
               f"NA {args.na}, DOF {dof:.2f} µm; autofocus {args.trials} starts within "
               f"+-5 DOF per field; errors in DOF"),
    )
    for col in ("measure", "field", "sweep peak err", "FWHM", "peak/floor", "rises",
                "ms @1024²", "AF images", "AF err med", "AF err p95", "AF err max",
                "AF ok", "AF conf"):
        table.add_column(col, justify="right" if col not in ("measure", "field") else "left")

    def f3(x: float) -> str:
        return "-" if not np.isfinite(x) else f"{x:.3f}"

    for name in variants:
        for k, fname in enumerate(FIELDS):
            s = sweeps[fname][name]
            a = af.get(name, {}).get(fname)
            row = [name if k == 0 else "", fname, f3(s["err"]), f"{s['fwhm']:.2f}",
                   f"{s['ratio']:.1f}", str(s["rises"]), f"{timing[name]:.1f}" if k == 0 else ""]
            if a:
                row += [f"{a['images']:.2f}", f3(a["median"]), f3(a["p95"]), f3(a["max"]),
                        f"{100 * a['ok']:.0f} %", f"{a['conf']:.2f}"]
            else:
                row += ["-"] * 6
            table.add_row(*row)
        if name in MEASURES:
            fl = [af[name][f] for f in FEATURELESS]
            refused = np.mean([1 - a["ok"] for a in fl])
            table.add_row("", "featureless x4", "", "", "", "", "",
                          f"{np.mean([a['images'] for a in fl]):.2f}", "", "", "",
                          f"refused {100 * refused:.0f} %",
                          f"{np.mean([a['conf'] for a in fl]):.2f}", end_section=True)
    Console(width=200).print(table)
    print(f"texture_strength {time_ms(texture_strength, frame):.1f} ms, estimate_noise_sigma "
          f"{time_ms(estimate_noise_sigma, frame):.1f} ms @1024²; default measure: "
          f"{DEFAULT_MEASURE}; bench wall time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
