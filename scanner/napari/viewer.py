"""Open a scan folder in napari (``waferscope view SCAN``)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from scanner.errors import UserError
from scanner.napari._reader import _scan_folder, inspected_mosaic, read_scan
from scanner.scanfolder import MOSAIC, SCAN_JSON


def check_napari() -> None:
    """Raise a :class:`UserError` naming the install command when napari is missing."""
    if importlib.util.find_spec("napari") is None:
        raise UserError("napari is not installed: pip install 'waferscope[napari]'")


def _check_display() -> None:
    """Qt aborts the process without a display; say so first (Linux only)."""
    if sys.platform.startswith("linux") and not (
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
        or os.environ.get("QT_QPA_PLATFORM")
    ):
        raise UserError("no display to open napari on (DISPLAY is not set); run it in a desktop "
                        "session, over ssh -X, or under xvfb-run for --screenshot")


def add_scan(viewer: Any, folder: Path) -> list[Any]:
    """Add the layers of a scan folder to a napari viewer; returns the layers."""
    layers = []
    for data, kwargs, kind in read_scan(str(folder)):
        layers.append(getattr(viewer, f"add_{kind}")(data, **kwargs))
    return layers


def view(folder: Path, screenshot: Path | None = None, size: tuple[int, int] = (1400, 1000),
         canvas_only: bool = True) -> Path | None:
    """Open a scan folder in a napari viewer.

    Parameters
    ----------
    folder : Path
        Scan folder.
    screenshot : Path, optional
        Save a screenshot of the canvas there and close, instead of running the viewer.
    size : (int, int)
        Window size (width, height) in pixels.
    canvas_only : bool
        Screenshot of the canvas only; False includes the layer list and controls.

    Raises
    ------
    UserError
        If napari is not installed, no display is available, or the folder is not a scan.
    """
    found = _scan_folder(folder)
    if found is None:
        raise UserError(f"{folder}: not a scan folder (no {SCAN_JSON} or {MOSAIC})")
    if inspected_mosaic(found) is None:  # nothing to show: an empty canvas is no review
        raise UserError(f"{found}: no {MOSAIC} yet (the scan was not stitched); run "
                        "`waferscope resume` or `waferscope stitch` on it")
    check_napari()
    _check_display()
    import napari

    viewer = napari.Viewer(title=f"waferscope: {Path(folder).resolve().name}", show=True)
    viewer.window.resize(*size)
    add_scan(viewer, Path(folder))
    viewer.reset_view()
    viewer.scale_bar.visible = True
    if screenshot is None:
        napari.run()
        return None
    from qtpy.QtWidgets import QApplication

    for _ in range(5):  # let the window map and draw before grabbing the canvas
        QApplication.processEvents()
    viewer.reset_view()
    QApplication.processEvents()
    Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(screenshot), canvas_only=canvas_only, flash=False)
    viewer.close()
    return Path(screenshot)
