"""Review pictures of inspected image files: each image with its defects outlined.

A scan is reviewed in napari and on its wafer map; a folder of image files had only tables
(``scores.csv``, ``defects.csv``), whose boxes in micrometres a reviewer had to find by hand in
each picture. ``overlays/NAME.png`` shows an image that has defects, its grey levels stretched
between the 0.5th and 99.5th percentiles and scaled down to at most :data:`MAX_SIDE_PX` a
side, with each defect's box in its class colour (:data:`scanner.reports.style.CLASS_COLORS`),
at least :data:`MIN_BOX_PX` a side and drawn thicker where the defect is flagged for review.
Images without defects get none.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models.data import OVERLAYS_FOLDER, read_image
from scanner.reports.style import CLASS_COLORS

#: folder of the pictures, inside the inspection's output folder
OVERLAYS = OVERLAYS_FOLDER  # (models.data: image folders skip it)
#: longest side of a picture (px): a review picture, not a copy of the image
MAX_SIDE_PX = 2048
#: least side of a box on the picture (px)
MIN_BOX_PX = 16


def write_overlays(defects_json: Path, images: Sequence[tuple[str, Path]]) -> Path | None:
    """Write ``overlays/NAME.png`` next to ``defects_json`` for each image with defects.

    Parameters
    ----------
    defects_json : Path
        The ``defects.json`` of an inspection of image files (its ``images`` by name, its
        header's ``pixel_size_um``).
    images : sequence of (str, Path)
        The images inspected, as :func:`scanner.inspection.images.list_images` names them.

    Returns
    -------
    Path or None
        The folder written, None when no image has a defect.
    """
    doc = json.loads(Path(defects_json).read_text())
    pixel_um = float(doc["header"]["pixel_size_um"])
    found = {name: d for name, d in doc["images"].items() if d}
    out = Path(defects_json).parent / OVERLAYS
    written: set[Path] = set()
    for name, path in images:
        if name in found:
            picture = overlay(read_image(path), found[name], pixel_um)
            target = out / (name.replace("/", "__") + ".png")
            out.mkdir(exist_ok=True)
            _write_png(target, picture)
            written.add(target)
    # the pictures of an earlier inspection into the same folder that this one did not draw
    # again (an image now without defects, or no longer inspected) would show boxes the new
    # defect list does not hold
    for stale in sorted(out.glob("*.png")) if out.is_dir() else []:
        if stale not in written:
            stale.unlink()
    return out if written else None


def overlay(image: np.ndarray, defects: list[dict[str, Any]], pixel_um: float) -> np.ndarray:
    """An RGB uint8 picture of ``image`` with the boxes of ``defects`` (``bbox_um`` from the
    centre of pixel (0, 0), ``defect_class``, ``review``) drawn on it."""
    from skimage.draw import rectangle_perimeter
    from skimage.transform import resize

    grey = np.asarray(image, dtype=np.float32)
    if grey.ndim == 3:  # a stack or colour image read as planes: its first plane
        grey = grey[..., 0] if grey.shape[-1] in (3, 4) else grey[0]
    lo, hi = np.percentile(grey, (0.5, 99.5))
    grey = np.clip((grey - lo) / max(float(hi - lo), 1e-12), 0.0, 1.0)
    scale = min(1.0, MAX_SIDE_PX / max(grey.shape))
    if scale < 1.0:
        shape = tuple(max(1, round(n * scale)) for n in grey.shape)
        grey = resize(grey, shape, anti_aliasing=True)
    rgb = np.repeat((grey * 255).astype(np.uint8)[..., None], 3, axis=2)
    for d in defects:
        xmin, ymin, xmax, ymax = (v / pixel_um * scale for v in d["bbox_um"])
        # at least MIN_BOX_PX a side: a particle of a few pixels stays in sight
        cx, cy = (xmin + xmax) / 2, (ymin + ymax) / 2
        hw, hh = (max(extent / 2, MIN_BOX_PX / 2) for extent in (xmax - xmin, ymax - ymin))
        xmin, xmax, ymin, ymax = cx - hw, cx + hw, cy - hh, cy + hh
        colour = _rgb(CLASS_COLORS.get(d.get("defect_class") or "other",
                                       CLASS_COLORS["other"]))
        # outside the defect, so that its edge stays visible; thicker when flagged for review
        for grow in range(1, 4 if d.get("review") else 3):
            r0, c0 = round(ymin) - grow, round(xmin) - grow
            r1, c1 = round(ymax) + grow, round(xmax) + grow
            rr, cc = rectangle_perimeter((r0, c0), end=(r1, c1), shape=rgb.shape[:2],
                                         clip=True)
            rgb[rr, cc] = colour
    return rgb


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    h = hex_colour.lstrip("#")
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)


def _write_png(path: Path, rgb: np.ndarray) -> None:
    """Write atomically: a stopped inspection leaves no half picture."""
    import imageio.v3 as iio

    tmp = path.with_name(path.name + ".tmp")
    iio.imwrite(tmp, rgb, extension=".png")
    tmp.replace(path)
