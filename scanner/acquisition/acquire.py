"""Acquisition: run the plan through pymmcore-plus's MDA runner into the tiles store.

``ScanEngine`` is pymmcore-plus's ``MDAEngine`` with its hooks changed: moves and snaps run
under a watchdog and are retried with back-off when the hardware fails (the stock engine logs a
failed move and carries on at the wrong place); every frame's metadata carries the position
read back from the core after the move, plus the simulator's ground truth when the devices
expose it; and each tile is written to the tiles store by the engine itself. The store is not a
``frameReady`` listener because the runner catches and logs a listener's exceptions: a full
disk would lose tiles silently while the stage kept moving.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pymmcore_plus import CMMCorePlus
from pymmcore_plus.mda import MDAEngine, SkipEvent
from pymmcore_plus.metadata import FrameMetaV1
from useq import MDAEvent

from devices.calls import GaveUp, retried
from devices.core import MicroscopeHandle
from devices.errors import HardwareError

if TYPE_CHECKING:
    from scanner.acquisition.focusing import FocusController, TileFocus

from scanner.acquisition.plan import ScanPlan, to_sequence
from scanner.errors import PlanError
from scanner.recipe import Recipe
from scanner.tilestore import TileRecord, TileStore, read_tiles_csv

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
    focus : FocusController, optional
        Decides each tile's Z.
    tiles : list of int, optional
        Plan index of the tile at each position of the sequence (default: the position
        itself); a resumed scan runs only the missing tiles.
    sink : callable, optional
        ``sink(image, tile_index, where)`` stores a tile; its exceptions stop the run.
    on_lost : callable, optional
        ``on_lost(tile_index, reason)`` journals a tile given up after its retries.
    timeout_s : float
        Watchdog: a move or snap that has not returned after this long is a hardware timeout.
    backoff_s : float
        Wait before the first retry, doubled at each further one.
    position_tolerance_um : float, optional
        A tile whose stage read-back lies farther than this from its planned position is
        lost, not kept at a place it was not planned for (another program moved the stage,
        or it did not go where it was told); None: not checked.
    """

    def __init__(
        self,
        mmcore: CMMCorePlus,
        retries: int = 3,
        clock=time.perf_counter,
        focus: FocusController | None = None,
        tiles: list[int] | None = None,
        sink: Callable[[np.ndarray, int, dict], None] | None = None,
        on_lost: Callable[[int, str], None] | None = None,
        timeout_s: float = 60.0,
        backoff_s: float = 0.05,
        position_tolerance_um: float | None = None,
    ) -> None:
        super().__init__(mmcore)
        self.position_tolerance_um = position_tolerance_um
        self.retries = retries
        self.clock = clock
        self.focus = focus
        self.tiles = tiles
        self.sink = sink
        self.on_lost = on_lost
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self.retried = 0
        self._lost_in_a_row = 0
        self._tile_focus: dict[int, TileFocus] = {}

    def tile_index(self, event: MDAEvent) -> int:
        """The plan index of the tile an event takes."""
        p = event.index.get("p", 0)
        return self.tiles[p] if self.tiles is not None else p

    # -- hooks ------------------------------------------------------------------------------

    def setup_single_event(self, event: MDAEvent) -> None:
        """Move XY then Z with retries; the rest (exposure, channel...) as the stock engine."""
        core = self.mmcore
        index = self.tile_index(event)
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
        except _TileLost as exc:
            self._lose(index, str(exc))
            raise SkipEvent(1, str(exc)) from None
        super().setup_single_event(event.model_copy(update={"x_pos": None, "y_pos": None,
                                                             "z_pos": None}))

    def exec_single_event(
        self, event: MDAEvent
    ) -> Iterator[tuple[np.ndarray, MDAEvent, FrameMetaV1]]:
        """Snap with retries and attach the read-back position to the frame metadata."""
        core = self.mmcore
        index = self.tile_index(event)
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
        except _TileLost as exc:
            self._lose(index, str(exc))
            return
        where: dict[str, float] = {}
        try:  # the read-back is a query too: a serial hiccup there must not stop the run
            self._retry(lambda: where.update(self._where(event)), f"position of tile {index}")
        except _TileLost as exc:
            self._lose(index, str(exc))
            return
        off = self._off_plan(where)
        if off is not None:
            self._lose(index, off)
            return
        meta = self.get_frame_metadata(event, include_position=True)
        meta[META_KEY] = where  # type: ignore[literal-required]
        if self.sink is not None:  # a storage error propagates and stops the run
            self.sink(image, index, meta[META_KEY])
        self._lost_in_a_row = 0
        # the runner unpacks a plain (image, event, metadata) tuple (pymmcore-plus's public
        # engine protocol); its ImagePayload named tuple lives in a private module
        yield image, event, meta

    # -- helpers ----------------------------------------------------------------------------

    def _off_plan(self, where: dict[str, float]) -> str | None:
        """Why a tile's read-back position is not its planned one (None: it is, within the
        tolerance, or nothing to compare)."""
        tol = self.position_tolerance_um
        x, y = where["x_um"], where["y_um"]
        px, py = where["x_planned_um"], where["y_planned_um"]
        if tol is None or not all(np.isfinite((x, y, px, py))):
            return None
        d = float(np.hypot(x - px, y - py))
        if d <= tol:
            return None
        return (f"the stage reads ({x:.0f}, {y:.0f}) µm, {d:.0f} µm from the planned "
                f"({px:.0f}, {py:.0f}) µm (more than {tol:.0f} µm): moved by another program, "
                "or it did not go where it was told; not kept (resume takes it again)")

    def _lose(self, index: int, reason: str) -> None:
        log.error("tile %d lost: %s", index, reason)
        if self.on_lost is not None:
            self.on_lost(index, reason)
        self._lost_in_a_row += 1
        if self._lost_in_a_row >= MAX_LOST_IN_A_ROW:
            # the hardware is gone (a controller unplugged, a camera dead): every further tile
            # would spend its retries and timeouts to be lost the same way
            raise HardwareError(
                f"acquisition stopped: {self._lost_in_a_row} tiles in a row lost (the last, "
                f"tile {index}: {reason}); the tiles taken are kept: put the hardware right "
                "and run `waferscope resume` on the scan folder")

    def _move_z(self, z: float, index: int) -> None:
        core = self.mmcore
        self._retry(
            lambda: (core.setPosition(z), core.waitForDevice(core.getFocusDevice())),
            f"focus of tile {index}",
        )

    def _retry(self, action: Callable[[], object], what: str) -> None:
        """Run ``action`` under the watchdog; retry hardware faults with back-off
        (:func:`devices.calls.retried`).

        Only transient hardware faults (:func:`devices.errors.is_transient`) are retried; a
        move refused for leaving the travel range loses the tile at once, and a programming
        error propagates (it would fail the same way on every tile).
        """
        try:
            retried(action, what, retries=self.retries, timeout_s=self.timeout_s,
                    backoff_s=self.backoff_s, on_retry=self._count_retry)
        except GaveUp as exc:
            raise _TileLost(str(exc)) from None

    def _count_retry(self) -> None:
        self.retried += 1

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
        tile_focus = self._tile_focus.get(self.tile_index(event))
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


#: tiles lost one after another after which the acquisition stops (a random fault loses a
#: tile now and then; five in a row is hardware that no longer answers)
MAX_LOST_IN_A_ROW = 5


class _TileLost(RuntimeError):
    """A tile given up after its retries (journaled as lost; the scan goes on)."""


@dataclass
class AcquisitionResult:
    """What happened during acquisition."""

    n_planned: int
    n_acquired: int
    lost: dict[int, str] = field(default_factory=dict)
    retried: int = 0
    wall_s: float = 0.0
    hardware_s: float = 0.0
    focus: dict = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """True when every planned tile is in the store."""
        return self.n_acquired == self.n_planned


def camera_dtype(core: CMMCorePlus) -> np.dtype:
    """The pixel type the camera's images are stored as (``tiles.zarr``; recorded in
    ``scan.json`` ``microscope.camera_dtype``)."""
    return np.dtype(np.uint8 if core.getBytesPerPixel() == 1 else np.uint16)


def acquire(
    handle: MicroscopeHandle,
    plan: ScanPlan,
    recipe: Recipe,
    folder: Path,
    *,
    only: set[int] | None = None,
    on_tile: Callable[[np.ndarray, TileRecord], None] | None = None,
) -> AcquisitionResult:
    """Acquire the tiles of ``plan`` into the tiles store of ``folder``.

    Progress can be followed on ``handle.core.mda.events.frameReady``. Each tile is written
    and journaled as soon as it is taken; a tile given up after its retries is journaled as
    lost at once; a storage error stops the run (:class:`~scanner.tilestore.StorageError`).

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
    only : set of int, optional
        Take only these tiles (by plan index) and keep what the store already holds
        (``waferscope resume``).
    on_tile : callable, optional
        ``on_tile(image, record)`` once each tile is stored and journaled, on the acquisition
        thread (processing while the stage moves, see ``registration.live``): it must return
        at once; its exceptions are logged and never stop the run.

    Raises
    ------
    PlanError
        The plan was not checked against the stage's travel (made by
        :func:`scanner.acquisition.plan.plan_scan` alone, not by ``resolve_plan``): nothing
        moves.
    """
    if not plan.travel_checked:
        raise PlanError("plan: not checked against the stage's travel (make it with "
                        "resolve_plan); nothing was moved")
    core = handle.core
    core.setExposure(plan.exposure_ms)
    # the core's own wait gives up after 5 s by default, sooner than a long real move
    core.setTimeoutMs(int(recipe.scan.device_timeout_s * 1000))
    hw_start = handle.hardware_time_s()
    wall_start = time.perf_counter()

    def clock() -> float:
        hw = handle.hardware_time_s()
        return (hw - hw_start) if hw is not None and hw_start is not None else (
            time.perf_counter() - wall_start
        )

    shape = (core.getImageHeight(), core.getImageWidth())
    dtype = camera_dtype(core)
    # the store is opened before anything moves: a folder that cannot be written stops here
    store = TileStore(folder, len(plan.tiles), shape, np.dtype(dtype), resume=only is not None)
    focus = _focus_controller(handle, recipe, plan)
    # the focus map is measured before the first tile, so its hardware time counts too
    todo = [t for t in plan.tiles if only is None or t.index in only]
    sink, on_lost = _tile_sinks(store, plan, shape, np.dtype(dtype), clock, on_tile)
    engine = ScanEngine(core, retries=recipe.scan.retries, clock=clock, focus=focus,
                        tiles=[t.index for t in todo], sink=sink, on_lost=on_lost,
                        timeout_s=recipe.scan.device_timeout_s,
                        position_tolerance_um=position_tolerance_um(recipe, plan))
    previous = core.mda.set_engine(engine)
    try:
        if todo:
            core.mda.run(to_sequence(plan, todo))
    finally:
        store.close()
        # the core is left with the engine it had: this one holds the store, the live
        # processing and the handle, which a core kept by its C++ side would keep alive
        if previous is not None and not core.mda.is_running():
            core.mda.set_engine(previous)
    hw_end = handle.hardware_time_s()
    journal = read_tiles_csv(folder)
    return AcquisitionResult(
        n_planned=len(plan.tiles),
        n_acquired=sum(r.status == "ok" for r in journal),
        lost={r.index: r.status.removeprefix("lost: ") for r in journal if r.status != "ok"},
        retried=engine.retried,
        focus=focus.summary() if focus is not None else {"strategy": "none"},
        wall_s=time.perf_counter() - wall_start,
        hardware_s=(hw_end - hw_start) if hw_end is not None and hw_start is not None
        else time.perf_counter() - wall_start,
    )


#: a tile's read-back may lie this many stage repeatabilities (one sigma) from its plan ...
READBACK_SIGMAS = 10.0
#: ... or this share of the field of view, whichever is more
READBACK_FOV_SHARE = 0.05


def position_tolerance_um(recipe: Recipe, plan: ScanPlan) -> float:
    """How far a tile's stage read-back may lie from its planned position: far beyond the
    stage's landing noise, well inside the tiles' overlap."""
    return max(READBACK_SIGMAS * float(recipe.microscope.stage.repeatability_um),
               READBACK_FOV_SHARE * float(min(plan.fov_um)))


def _focus_controller(handle: MicroscopeHandle, recipe: Recipe, plan: ScanPlan
                      ) -> FocusController | None:
    """The scan's focus controller, prepared (its focus map measured); None without focus."""
    if recipe.scan.focus.strategy == "none":
        return None
    from scanner.acquisition.focusing import FocusController

    # the focus's moves and snaps get the tiles' retries: a serial hiccup during a focus
    # search failed the whole scan
    runner = ScanEngine(handle.core, retries=recipe.scan.retries,
                        timeout_s=recipe.scan.device_timeout_s)
    focus = FocusController(handle.core, recipe, plan, handle.depth_of_field_um,
                            retry=runner._retry)
    focus.prepare()
    return focus


def _tile_sinks(store: TileStore, plan: ScanPlan, shape: tuple[int, int], dtype: np.dtype,
                clock: Callable[[], float],
                on_tile: Callable[[np.ndarray, TileRecord], None] | None
                ) -> tuple[Callable[[np.ndarray, int, dict], None], Callable[[int, str], None]]:
    """The engine's ``sink`` (store and journal a tile, then ``on_tile``) and ``on_lost``
    (journal a lost tile, black, at once)."""
    by_index = {t.index: t for t in plan.tiles}

    def sink(image: np.ndarray, index: int, where: dict) -> None:
        tile = by_index[index]
        record = TileRecord(index=tile.index, row=tile.row, col=tile.col, **where)
        store.write(image, record)
        if on_tile is not None:
            try:
                on_tile(image, record)
            except Exception:  # processing is not acquisition: the tile is stored already
                log.exception("processing of tile %d during acquisition failed", index)

    def on_lost(index: int, reason: str) -> None:
        tile = by_index[index]
        store.write(np.zeros(shape, dtype),
                    TileRecord(tile.index, tile.row, tile.col, tile.x_um, tile.y_um, tile.z_um,
                               clock(), status=f"lost: {reason}"[:200].replace(",", ";")))

    return sink, on_lost
