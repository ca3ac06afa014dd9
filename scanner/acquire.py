"""Acquisition: run the plan through pymmcore-plus's MDA runner into the tiles store.

``ScanEngine`` is pymmcore-plus's ``MDAEngine`` with two hooks changed: moves and snaps are
retried when the hardware fails (the stock engine logs the failure and carries on at the wrong
place), and every frame's metadata carries the position read back from the core after the
move, plus the simulator's ground truth when the devices expose it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pymmcore_plus import CMMCorePlus
from pymmcore_plus.mda import MDAEngine
from pymmcore_plus.mda._engine import ImagePayload
from pymmcore_plus.mda._runner import SkipEvent
from useq import MDAEvent

from devices.core import MicroscopeHandle

if TYPE_CHECKING:
    from .focusing import FocusController, TileFocus

from .plan import ScanPlan, exposure_for, to_sequence
from .recipe import Recipe
from .tilestore import TileRecord, TileStore

log = logging.getLogger("waferscope.acquire")

META_KEY = "waferscope"


class ScanEngine(MDAEngine):
    """MDA engine that retries hardware faults and records where each tile really was taken.

    Parameters
    ----------
    mmcore : CMMCorePlus
        The core.
    retries : int
        Extra attempts for a failed move or snap before the tile is given up.
    clock : callable
        Returns the hardware time in seconds (simulated clock, or wall time).
    """

    def __init__(
        self,
        mmcore: CMMCorePlus,
        retries: int = 3,
        clock=time.perf_counter,
        focus: FocusController | None = None,
    ) -> None:
        super().__init__(mmcore)
        self.retries = retries
        self.clock = clock
        self.focus = focus
        self.failures: dict[int, str] = {}
        self._tile_focus: dict[int, TileFocus] = {}

    # -- hooks ------------------------------------------------------------------------------

    def setup_single_event(self, event: MDAEvent) -> None:
        """Move XY then Z with retries; the rest (exposure, channel...) as the stock engine."""
        core = self.mmcore
        index = event.index.get("p", 0)
        try:
            if event.x_pos is not None and event.y_pos is not None:
                # a Z known in advance (focus map) moves together with XY, as the stock
                # engine does; the focus drive is a separate controller
                z_ahead = (self.focus.z_ahead(event.x_pos, event.y_pos)
                           if self.focus is not None else None)
                self._retry(
                    lambda: (
                        core.setXYPosition(event.x_pos, event.y_pos),
                        z_ahead is not None and core.setPosition(z_ahead),
                        core.waitForDevice(core.getXYStageDevice()),
                    ),
                    f"move to tile {index}",
                )
            z = event.z_pos
            if self.focus is not None and event.x_pos is not None and event.y_pos is not None:
                tile_focus = self.focus.z_for(index, event.x_pos, event.y_pos)
                self._tile_focus[index] = tile_focus
                z = tile_focus.z_um
            if z is not None:
                self._move_z(z, index)
        except RuntimeError as exc:
            self.failures[index] = str(exc)
            raise SkipEvent(1, str(exc)) from None
        super().setup_single_event(event.model_copy(update={"x_pos": None, "y_pos": None,
                                                             "z_pos": None}))

    def exec_single_event(self, event: MDAEvent) -> Iterator[ImagePayload]:
        """Snap with retries and attach the read-back position to the frame metadata."""
        core = self.mmcore
        index = event.index.get("p", 0)
        try:
            self._retry(core.snapImage, f"snap of tile {index}")
            image = core.getImage()
            tile_focus = self._tile_focus.get(index)
            if self.focus is not None and tile_focus is not None and self.focus.check_tile(
                image, tile_focus
            ):
                log.info("tile %d looks defocused at the predicted Z; re-measuring", index)
                tile_focus = self.focus.remeasure(event.x_pos, event.y_pos, tile_focus)
                self._tile_focus[index] = tile_focus
                self._move_z(tile_focus.z_um, index)
                self._retry(core.snapImage, f"snap of tile {index}")
                image = core.getImage()
                self.focus.record_tile(image, tile_focus)
        except RuntimeError as exc:
            self.failures[index] = str(exc)
            log.error("tile %d lost after %d attempts: %s", index, self.retries + 1, exc)
            return
        meta = self.get_frame_metadata(event, include_position=True)
        meta[META_KEY] = self._where(event)  # type: ignore[literal-required]
        yield ImagePayload(image, event, meta)

    # -- helpers ----------------------------------------------------------------------------

    def _move_z(self, z: float, index: int) -> None:
        core = self.mmcore
        self._retry(
            lambda: (core.setPosition(z), core.waitForDevice(core.getFocusDevice())),
            f"focus of tile {index}",
        )

    def _retry(self, action, what: str) -> None:
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                action()
                return
            except Exception as exc:  # hardware errors come as plain RuntimeError/OSError
                # a move outside travel is never retried: it will fail the same way again
                if "travel" in str(exc).lower():
                    raise RuntimeError(f"{what}: {exc}") from None
                last = exc
                log.warning("%s failed (attempt %d/%d): %s", what, attempt + 1,
                            self.retries + 1, exc)
        raise RuntimeError(f"{what}: {last}")

    def _where(self, event: MDAEvent) -> dict[str, float]:
        """Read back the stage position and any ground truth the devices expose."""
        core = self.mmcore
        x, y = core.getXYPosition()
        where = {
            "x_um": float(x),
            "y_um": float(y),
            "z_um": float(core.getPosition()),
            "time_s": float(self.clock()),
            "x_planned_um": float(event.x_pos) if event.x_pos is not None else float("nan"),
            "y_planned_um": float(event.y_pos) if event.y_pos is not None else float("nan"),
        }
        tile_focus = self._tile_focus.get(event.index.get("p", 0))
        if tile_focus is not None:
            where["focus_source"] = tile_focus.source
            where["focus_confidence"] = tile_focus.confidence
            where["af_images"] = tile_focus.images
        xy_dev, z_dev = core.getXYStageDevice(), core.getFocusDevice()
        for key, dev, prop in (
            ("x_true_um", xy_dev, "SimTrueX_um"),
            ("y_true_um", xy_dev, "SimTrueY_um"),
            ("z_true_um", z_dev, "SimFocalZ_um"),
        ):
            if dev and core.hasProperty(dev, prop):
                where[key] = float(core.getProperty(dev, prop))
        return where


@dataclass
class AcquisitionResult:
    """What happened during acquisition."""

    n_planned: int
    n_acquired: int
    lost: dict[int, str] = field(default_factory=dict)
    wall_s: float = 0.0
    hardware_s: float = 0.0
    focus: dict = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """True when every planned tile is in the store."""
        return self.n_acquired == self.n_planned


def acquire(
    handle: MicroscopeHandle, plan: ScanPlan, recipe: Recipe, folder: Path
) -> AcquisitionResult:
    """Acquire every tile of ``plan`` into the tiles store of ``folder``.

    Progress can be followed on ``handle.core.mda.events.frameReady``.

    Parameters
    ----------
    handle : MicroscopeHandle
        A built microscope.
    plan : ScanPlan
        Tiles to acquire (already checked against the travel range).
    recipe : Recipe
        The scan's recipe.
    folder : Path
        Scan folder; ``tiles.zarr`` and ``tiles.csv`` are written there.
    """
    core = handle.core
    core.setExposure(exposure_for(recipe))
    hw_start = handle.hardware_time_s()
    wall_start = time.perf_counter()

    def clock() -> float:
        hw = handle.hardware_time_s()
        return (hw - hw_start) if hw is not None and hw_start is not None else (
            time.perf_counter() - wall_start
        )

    focus = None
    if recipe.scan.focus.strategy != "none":
        from .focusing import FocusController

        focus = FocusController(core, recipe, plan, handle.depth_of_field_um)
        focus.prepare()
    # the focus map is measured before the first tile, so its hardware time counts too
    engine = ScanEngine(core, retries=recipe.scan.retries, clock=clock, focus=focus)
    core.mda.set_engine(engine)
    shape = (core.getImageHeight(), core.getImageWidth())
    dtype = np.uint8 if core.getBytesPerPixel() == 1 else np.uint16
    store = TileStore(folder, len(plan.tiles), shape, np.dtype(dtype))
    by_index = {t.index: t for t in plan.tiles}

    def on_frame(image: np.ndarray, event: MDAEvent, meta: dict) -> None:
        tile = by_index[event.index.get("p", 0)]
        where = meta.get(META_KEY, {})
        store.write(image, TileRecord(index=tile.index, row=tile.row, col=tile.col, **where))

    core.mda.events.frameReady.connect(on_frame)
    try:
        core.mda.run(to_sequence(plan, recipe))
    finally:
        core.mda.events.frameReady.disconnect(on_frame)
        for index, reason in engine.failures.items():
            tile = by_index[index]
            store.write(
                np.zeros(shape, dtype),
                TileRecord(tile.index, tile.row, tile.col, tile.x_um, tile.y_um, tile.z_um,
                           clock(), status=f"lost: {reason}"[:200].replace(",", ";")),
            )
        store.close()
    hw_end = handle.hardware_time_s()
    return AcquisitionResult(
        n_planned=len(plan.tiles),
        n_acquired=store.written,
        lost=dict(engine.failures),
        focus=focus.summary() if focus is not None else {"strategy": "none"},
        wall_s=time.perf_counter() - wall_start,
        hardware_s=(hw_end - hw_start) if hw_end is not None and hw_start is not None
        else time.perf_counter() - wall_start,
    )
