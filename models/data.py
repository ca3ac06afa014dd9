"""Training data: a user's good images, and simulated good surfaces with known roughness.

Every image becomes a :class:`GoodImage`: relative reflectance (the raw image divided by its
brightness level, i.e. what :func:`models.modelfile.normalize_image` feeds the network, before
the fixed gain) plus, where known, the true roughness Sa (nm) per pixel.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from simulators.errors import UserError, first_line
from simulators.picture import (
    MIN_IMAGE_PX,
    cmyk_to_rgb,
    main_series,
    read_picture,
    tiff_image_axes,
    tiff_is_cmyk,
    tiff_light,
)

from .modelfile import brightness_level, to_luminance

#: file types read as good images
IMAGE_SUFFIXES = {".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp"}


@dataclass
class GoodImage:
    """One good image for training.

    Attributes
    ----------
    image : ndarray (H, W) float32
        Relative reflectance: the raw image divided by its brightness level.
    sa_nm : ndarray (H, W) float32 or None
        True roughness Sa per pixel when known (simulated surfaces), else None.
    source : str
        Where it came from (file name, scan folder, simulator and seed).
    kind : str
        ``"user"`` or the simulated sample kind.
    usable : ndarray (H, W) bool or None
        Where the sample's usable area is, for windows over a sample's edge (what inspection
        of a scan would look at); None: all of the image.
    """

    image: np.ndarray
    sa_nm: np.ndarray | None = None
    source: str = ""
    kind: str = "user"
    meta: dict = field(default_factory=dict)
    usable: np.ndarray | None = None


def relative(raw: np.ndarray, level: float | None = None) -> np.ndarray:
    """Raw image (any dtype, grey or colour) divided by its brightness level."""
    lum = to_luminance(raw)
    level = brightness_level(lum) if level is None else level
    return (lum * np.float32(1.0 / level)).astype(np.float32)


def read_image(path: Path) -> np.ndarray:
    """A 2-D float32 luminance image from a TIFF/PNG/JPEG/BMP file of any dtype and size
    (planar RGB TIFFs, grey + alpha and CMYK included): the one image reader of training
    and inspection.

    Raises
    ------
    UserError
        The file cannot be read as an image, or holds non-finite pixels (it names the file
        and why, in one line).
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise UserError(f"{path}: empty file (0 bytes): nothing was written to it")
    except OSError as exc:
        raise UserError(f"{path}: cannot read image ({exc.strerror or exc})") from None
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                series = main_series(tif)
                axes = tiff_image_axes(series)
                img = series.asarray()
                if img.ndim == len(axes) and "S" in axes and axes.index("S") < axes.index("Y"):
                    # samples stored plane by plane (S, Y, X): colour last, before the ink
                    # of a CMYK file is looked for there (its planes were read as R, G, B, A)
                    img = np.moveaxis(img, axes.index("S"), -1)
                img = tiff_light(series.keyframe, img)
                if tiff_is_cmyk(tif) and img.shape[-1] == 4:
                    img = cmyk_to_rgb(img)
        else:
            img = read_picture(path)
    except Exception as exc:  # any decoder error is a bad input file
        if str(exc).startswith("Could not find a backend"):
            # imageio's words for content that no decoder knows (a text file named .png)
            raise UserError(f"{path}: not a picture: no decoder knows its content (PNG, JPEG, "
                            "TIFF, BMP and the other picture formats are read)") from None
        raise UserError(f"{path}: cannot read image ({type(exc).__name__}: "
                        f"{first_line(exc)})") from None
    img = np.asarray(img)
    # singleton axes dropped, but never rows or columns: a 1-pixel-thin picture is too small,
    # not "not 2-D"
    while img.ndim > 2 and img.shape[0] == 1:
        img = img[0]
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim == 3 and img.shape[0] in (3, 4) and img.shape[-1] not in (3, 4):
        img = np.moveaxis(img, 0, -1)  # planar RGB TIFF
    if img.ndim == 3 and img.shape[-1] == 2:  # grey + alpha
        img = img[..., 0]
    if img.ndim not in (2, 3):
        raise UserError(f"{path}: not a 2-D image (shape {img.shape})")
    if min(img.shape[:2]) < MIN_IMAGE_PX:
        raise UserError(f"{path}: {img.shape[0]} x {img.shape[1]} px is too small to inspect "
                        f"({MIN_IMAGE_PX} px a side at least)")
    if img.dtype == bool:
        img = img.astype(np.uint8)
    if not (np.issubdtype(img.dtype, np.integer) or np.issubdtype(img.dtype, np.floating)):
        raise UserError(f"{path}: unsupported pixel type {img.dtype}")
    if np.issubdtype(img.dtype, np.floating) and not np.isfinite(img).all():
        # damaged data is refused, never read as some number (NaN would flow into the maps)
        raise UserError(f"{path}: image holds non-finite pixels (NaN or infinity)")
    lo, hi = img.min(), img.max()
    if lo < -0.05 * max(float(hi), 0.0):
        # light is never negative: an image standardised or differenced away from its counts
        # (read as it is, its dark half scored as defects); a dark-subtracted camera frame's
        # noise dips a little below zero and is read
        raise UserError(f"{path}: pixels down to {lo.item():g}: give intensities (0 or more), "
                        "not an image shifted below zero")
    if lo == hi:
        # no camera gives one value everywhere: a blank frame (lamp, shutter, exposure) or a
        # file written empty, which a model would learn from or pass as a flawless part
        raise UserError(f"{path}: every pixel is {lo.item():g}: a blank image, nothing imaged")
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            lum = to_luminance(img)
    except ValueError as exc:
        raise UserError(f"{path}: {exc}") from None
    if not np.isfinite(lum).all():
        # float64 pixels beyond float32's range became infinite (and then NaN in the maps)
        raise UserError(f"{path}: pixels up to {hi.item():g} do not fit 32-bit floats: give "
                        "intensities of a camera's range")
    return lum


def load_good_images(paths: Iterable[str | Path]) -> list[GoodImage]:
    """Good images from image files and folders of them (good scan folders are read by
    ``scanner.inspection.goodimages``, which knows the scan folder's layout).

    Raises
    ------
    UserError
        A path that does not exist, an unreadable image, a scan folder, or no image at all.
    """
    out: list[GoodImage] = []
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise UserError(f"{path}: good image path not found")
        if path.is_file():
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise UserError(f"{path}: not an image file ({', '.join(sorted(IMAGE_SUFFIXES))})")
            out.append(GoodImage(relative(read_image(path)), source=path.name))
            continue
        if (path / "scan.json").exists() or path.name.endswith(".ome.zarr"):
            raise UserError(f"{path}: a scan folder (build from it with waferscope train)")
        for f in image_files(path):
            out.append(GoodImage(relative(read_image(f)), source=str(f.relative_to(path))))
    if not out and list(paths):
        raise UserError(f"--good: no images found in {', '.join(str(p) for p in paths)}")
    return out


#: what waferscope writes into a folder of image inspection results (``scores.csv``, the
#: overlays' folder) and of a scan (``scan.json``, ``scanner.scanfolder.SCAN_JSON``, which
#: stays free of this torch-importing module): such folders hold no one's images
INSPECTION_SCORES = "scores.csv"
OVERLAYS_FOLDER = "overlays"
SCAN_RECORD = "scan.json"


def image_files(folder: Path) -> list[Path]:
    """The image files under ``folder``, sorted; hidden files and folders are no one's images
    (macOS's "._name.png" resource forks beside every picture copied from a Mac), nor are
    waferscope's own outputs: a scan folder's or an inspection's below ``folder``, and the
    overlays of an inspection written into ``folder`` itself (:func:`is_output_folder`)."""
    verdicts: dict[Path, bool] = {}

    def output(d: Path) -> bool:
        if d not in verdicts:
            verdicts[d] = is_output_folder(d)
        return verdicts[d]

    def ours(f: Path) -> bool:
        parents = f.relative_to(folder).parents  # "a/b/x.png": "a/b", "a", "."
        if any(output(folder / p) for p in list(parents)[:-1]):
            return True
        top = f.relative_to(folder).parts
        return len(top) > 1 and top[0] == OVERLAYS_FOLDER and output(folder)

    found = sorted(f for f in folder.rglob("*")
                   if (f.is_file() or (f.is_symlink() and not f.exists()))
                   and f.suffix.lower() in IMAGE_SUFFIXES
                   and not any(part.startswith(".") for part in f.relative_to(folder).parts)
                   and not ours(f))
    for f in found:
        if not f.exists():  # an image whose file is gone is refused, as a damaged one is
            raise UserError(f"{f}: broken link (its target is missing)")
    return found


def is_output_folder(folder: Path) -> bool:
    """Whether waferscope wrote ``folder``: the results of an image inspection (its scores and
    the pictures of its defects, which a later inspection or training of the folder above
    read as images: boxes drawn on a copy of each image) or a scan folder (its wafer map and
    alignment pictures)."""
    return (folder / INSPECTION_SCORES).is_file() or (folder / SCAN_RECORD).is_file()


def scan_pixel_size_um(paths: Iterable[str | Path]) -> float | None:
    """Pixel size recorded in a good scan folder's scan.json, if any of the paths is one."""
    for p in paths:
        scan = Path(p) / SCAN_RECORD
        if scan.is_file():
            try:
                recipe = json.loads(scan.read_text())["recipe"]
                return float(recipe["microscope"]["camera"]["pixel_size_um"])
            except (KeyError, TypeError, ValueError, json.JSONDecodeError):
                continue
    return None


# ---------------------------------------------------------------------- simulated surfaces


#: pixel sizes (µm) at which each simulated kind is typically imaged (multi-scale training):
#: wafers under a 2x to 20x objective, PV cells in electroluminescence, rough surfaces where
#: their texture is resolved
PIXEL_RANGES_UM: dict[str, tuple[float, float]] = {
    "wafer": (1.0, 10.0),
    "pv_cell": (8.0, 40.0),
    "rough": (0.5, 2.0),
}


def simulated_good_images(
    n: int, size: int, pixel_size_um: float, seed: int,
    kinds: tuple[str, ...] = ("wafer", "pv_cell", "rough"),
    pixel_ranges_um: dict[str, tuple[float, float]] | None = None,
) -> list[GoodImage]:
    """Good simulated images (no defects) through the simulator's camera model.

    Wafers with random die pitch, scribe width and roughness; PV cells with random grain size,
    finger pitch and busbars; plain rough surfaces (rectangles) with Sa from 0 to 25 nm varying
    across the sample. Camera shot and read noise and a small random defocus are applied, as
    in a scan. The true Sa map is kept for wafers and rough surfaces (0 where not rough).

    Parameters
    ----------
    n : int
        Number of images (spread over ``kinds``).
    size : int
        Side of each square image (pixels).
    pixel_size_um : float
        Pixel size to render at (when ``pixel_ranges_um`` is None).
    seed : int
        Seed of everything (sample layouts, positions, roughness, noise).
    kinds : tuple of str
        Sample kinds, used in turn.
    pixel_ranges_um : dict, optional
        Per kind ``(min, max)`` pixel size drawn log-uniformly per image (multi-scale
        training, e.g. :data:`PIXEL_RANGES_UM`); None renders everything at ``pixel_size_um``.
    """
    from simulators.camera import CameraModel, Optics
    from simulators.samples.shapes import pixel_axes

    rng = np.random.default_rng(seed)
    cam = CameraModel(width=size, height=size, bit_depth=12)
    optics = Optics()
    out: list[GoodImage] = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        p = float(pixel_size_um)
        if pixel_ranges_um is not None and kind in pixel_ranges_um:
            lo, hi = pixel_ranges_um[kind]
            p = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        s = int(rng.integers(0, 2**31 - 1))
        sample, rough = _simulated_sample(kind, s, rng)
        poly = sample.usable_polygon_um()
        half = size * p / 2
        cx, cy, level = _window_centre(sample, kind, half, p, poly, rng)
        ox, oy = cx - half, cy - half
        refl = sample.render(ox, oy, (size, size), p)
        sa = None
        if kind != "pv_cell":
            xs, ys = pixel_axes(ox, oy, (size, size), p)
            if rough is not None:
                refl = rough.apply(refl, xs, ys, p)
                sa = rough.sa_map(xs, ys)
            else:
                sa = np.zeros((size, size), dtype=np.float32)
        refl = optics.apply(refl, float(rng.uniform(-3.0, 3.0)), p)
        exposure = float(rng.uniform(6.0, 12.0))
        counts = cam.digitise(refl, exposure, rng)
        if level is not None:
            level *= 0.8 * cam.full_well_e * exposure / cam.exposure_ref_ms
            level *= (2**cam.bit_depth - 1) / cam.full_well_e
        usable = None
        if level is not None:  # an edge window: part of it is chuck or background
            usable = _usable_mask(ox, oy, size, p, poly)
        out.append(GoodImage(relative(counts, level), sa_nm=sa, source=f"sim:{kind}:{s}", kind=kind,
                             meta={"pixel_size_um": p, "edge": level is not None},
                             usable=usable))
    return out


def _simulated_sample(kind: str, s: int, rng: np.random.Generator) -> tuple[Any, Any]:
    """A random defect-free virtual sample of ``kind`` (seed ``s``) and its roughness field
    (None: no roughness added)."""
    from simulators.roughness import RoughnessField
    from simulators.samples import PVCellSample, RectangleSample, WaferSample

    rough = None
    if kind == "wafer":
        # log-uniform: small dies, seen whole (with their marks) at 2-10 µm px, as often
        # as large ones
        pitch = float(np.exp(rng.uniform(np.log(1.5), np.log(12.0))))
        wafer = {"diameter_mm": float(rng.choice([50.0, 100.0, 150.0])), "n_defects": 0,
                 "seed": s, "scribe_width_um": float(rng.uniform(30, 150)),
                 "edge_exclusion_mm": 2.0}
        try:
            sample = WaferSample(
                die_pitch_mm=(pitch, pitch * float(rng.uniform(0.6, 1.4))), **wafer)
        except ValueError:
            # DieTemplate's pyramid fails for some unequal pitches (sides whose halvings
            # stop being even at different levels); square dies always work
            sample = WaferSample(die_pitch_mm=(pitch, pitch), **wafer)
        if rng.random() < 0.5:
            rough = RoughnessField(sa_nm=float(rng.uniform(0.5, 20.0)),
                                   variation=float(rng.uniform(0.0, 0.6)),
                                   variation_period_mm=float(rng.uniform(0.2, 2.0)),
                                   seed=s)
    elif kind == "pv_cell":
        sample = PVCellSample(
            n_defects=0, seed=s, grain_size_mm=float(rng.choice([0.0, 2.0, 5.0, 8.0])),
            finger_pitch_mm=float(rng.uniform(1.2, 2.5)), busbars=int(rng.integers(2, 7)),
            finger_width_um=float(rng.uniform(30, 90)),
        )
    else:
        sample = RectangleSample(40.0, 40.0, n_defects=0, seed=s)
        rough = RoughnessField(sa_nm=float(rng.uniform(0.0, 25.0)),
                               variation=float(rng.uniform(0.0, 0.8)),
                               variation_period_mm=float(rng.uniform(0.2, 2.0)), seed=s)
    return sample, rough


def _window_centre(sample: Any, kind: str, half: float, p: float, poly: np.ndarray,
                   rng: np.random.Generator) -> tuple[float, float, float | None]:
    """Centre of a window of half-side ``half`` (µm) on ``sample``, and the sample surface's
    raw level for a window over its edge (None: a window wholly on the sample)."""
    x0, y0 = poly.min(axis=0)
    x1, y1 = poly.max(axis=0)
    for _ in range(200):  # a window wholly inside the usable area
        cx, cy = rng.uniform(x0 + half, x1 - half), rng.uniform(y0 + half, y1 - half)
        if _window_inside(cx, cy, half, poly):
            break
    cx, cy = _structured_window(sample, kind, cx, cy, half, poly, rng)
    level = None
    if kind == "wafer" and rng.random() < 0.25:
        # a window on the wafer edge (notch, flat, chuck around it): normal, too; scaled by
        # the level of the wafer surface, as a whole-mosaic level would
        level = float(np.median(sample.render(cx - half, cy - half, (64, 64), p)))
        r_edge = sample.diameter_mm * 500.0 + rng.uniform(-1.5, 0.5) * half
        ang = rng.uniform(0, 2 * np.pi)
        cx = sample.center_um[0] + r_edge * np.cos(ang)
        cy = sample.center_um[1] + r_edge * np.sin(ang)
    if kind == "pv_cell" and level is None and rng.random() < 0.15:
        # a window over the cell's edge (busbar ends, dimmer rim, background): normal
        level = float(np.median(sample.render(cx - half, cy - half, (64, 64), p)))
        bx0, by0, bx1, by1 = sample.bounds_um()
        side = int(rng.integers(4))
        off = rng.uniform(-0.8, 0.3) * half
        if side < 2:
            cx = (bx0 - off) if side == 0 else (bx1 + off)
        else:
            cy = (by0 - off) if side == 2 else (by1 + off)
    return cx, cy, level


def _usable_mask(ox: float, oy: float, size: int, p: float, poly: np.ndarray) -> np.ndarray:
    """Which pixels of a window at ``(ox, oy)`` lie on the sample's usable area.

    Tested on every 4th pixel (the anomaly map's resolution; a full-resolution test of a
    1024 px window against the wafer's polygon takes seconds).
    """
    from simulators.samples.shapes import pixel_axes, points_in_polygon

    xs, ys = pixel_axes(ox, oy, (size, size), p)
    gx, gy = np.meshgrid(xs[1::4] + p / 2, ys[1::4] + p / 2)
    coarse = points_in_polygon(gx, gy, poly)
    return np.repeat(np.repeat(coarse, 4, axis=0), 4, axis=1)[:size, :size]


def _structured_window(
    sample: object, kind: str, cx: float, cy: float, half: float, poly: np.ndarray,
    rng: np.random.Generator,
) -> tuple[float, float]:
    """Move a window centre onto the structures that score highest on good surfaces.

    Uniformly placed windows rarely hold the few strong, normal edges of a sample, so the
    anomaly head learned to call them defects: on PV cells the busbar edges (the brightest
    response on good cells, which set the calibrated threshold), on wafers the die-cell
    corners where the alignment mark sits. Half of the wafer and PV windows are moved there
    (kept only when still wholly inside the usable area).
    """
    if rng.random() >= 0.5:
        return cx, cy
    nx, ny = cx, cy
    if kind == "pv_cell" and getattr(sample, "busbars", 0) > 0:
        x0, _, x1, _ = sample.bounds_um()  # type: ignore[attr-defined]
        spacing = (x1 - x0) / sample.busbars  # type: ignore[attr-defined]
        k = int(rng.integers(sample.busbars))  # type: ignore[attr-defined]
        edge = rng.choice([-0.5, 0.5]) * sample.busbar_width_mm * 1000.0  # type: ignore
        nx = x0 + (k + 0.5) * spacing + edge + rng.uniform(-0.6, 0.6) * half
    elif kind == "wafer":
        ox = sample.center_um[0] + sample.die_origin_mm[0] * 1000.0  # type: ignore[attr-defined]
        oy = sample.center_um[1] + sample.die_origin_mm[1] * 1000.0  # type: ignore[attr-defined]
        px, py = (v * 1000.0 for v in sample.die_pitch_mm)  # type: ignore[attr-defined]
        # nearest die-cell corner, then into the die by up to a quarter pitch (the mark lies
        # in the die's top-left corner; flips and rotations in training cover the others)
        nx = ox + round((cx - ox) / px) * px + rng.uniform(-0.3, 1.0) * min(half, 0.25 * px)
        ny = oy + round((cy - oy) / py) * py + rng.uniform(-0.3, 1.0) * min(half, 0.25 * py)
    else:
        return cx, cy
    if _window_inside(nx, ny, half, poly):
        return float(nx), float(ny)
    return cx, cy


def _window_inside(cx: float, cy: float, half: float, poly: np.ndarray) -> bool:
    """Whether the square window of half-side ``half`` centred on ``(cx, cy)`` lies in ``poly``."""
    from simulators.samples.shapes import points_in_polygon

    xs = np.array([cx - half, cx + half, cx + half, cx - half])
    ys = np.array([cy - half, cy - half, cy + half, cy + half])
    return bool(points_in_polygon(xs, ys, poly).all())
