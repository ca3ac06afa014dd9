"""Focus strategies during a scan: none, every tile, every n tiles, or a focus map.

The controller decides the Z of each tile. It talks to the hardware only through the core
(``setPosition``, ``snapImage``, ``fullFocus``), so the same code runs on the simulator and on
a real microscope. Z is never driven outside the focus drive's safe range from the recipe.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pymmcore_plus import CMMCorePlus

from scanner.acquisition.focus.measures import DEFAULT_MEASURE, MEASURES
from scanner.acquisition.focus.points import focus_map_points, inside_tiles, tour_order
from scanner.acquisition.focus.recheck import (
    BandEnergy,
    PairNoise,
    RecheckCalibration,
    band_energy,
    calibrate,
    estimate_defocus_sq,
    log_ratio,
    strip_energies,
)
from scanner.acquisition.focus.search import FocusResult, autofocus
from scanner.acquisition.focus.surface import MIN_POINTS, FocusSurface, fit_focus_surface
from scanner.acquisition.plan import ScanPlan
from scanner.recipe import Recipe

log = logging.getLogger("waferscope.focus")


@dataclass
class TileFocus:
    """How the Z of one tile was chosen."""

    z_um: float
    source: str  # "fixed", "map", "autofocus", "neighbour", "remeasured"
    confidence: float = float("nan")
    images: int = 0


@dataclass
class FocusController:
    """Chooses the focus of every tile according to ``scan.focus`` of the recipe.

    Parameters
    ----------
    core : CMMCorePlus
        The microscope.
    recipe : Recipe
        The scan's recipe.
    plan : ScanPlan
        The tiles.
    depth_of_field_um : float
        Depth of field of the objective; sets search steps and tolerances.
    """

    core: CMMCorePlus
    recipe: Recipe
    plan: ScanPlan
    depth_of_field_um: float
    surface: FocusSurface | None = None
    map_points: list[dict[str, Any]] = field(default_factory=list)
    last_good_z: float | None = None
    af_images: int = 0
    af_runs: int = 0
    remeasured: int = 0
    recheck: RecheckCalibration | None = None
    recheck_log: list[dict[str, Any]] = field(default_factory=list)
    checked_tiles: int = 0
    _frames: list[tuple[float, BandEnergy]] | None = None
    _sweeps: list[list[tuple[float, BandEnergy]]] = field(default_factory=list)
    _current: int | None = None
    _pair_noise: PairNoise | None = None
    _tiles: dict[tuple[int, int], dict[str, Any]] = field(default_factory=dict)
    #: runs a device action with the scan's retries (``ScanEngine._retry``: transient faults
    #: retried with back-off, a RuntimeError once given up); None: each action runs once
    retry: Callable[[Callable[[], object], str], None] | None = None

    def _act(self, action: Callable[[], object], what: str) -> None:
        if self.retry is None:
            action()
        else:
            self.retry(action, what)

    @property
    def spec(self):  # noqa: ANN201 - the recipe's FocusPlan model
        """The recipe's focus plan (``scan.focus``)."""
        return self.recipe.scan.focus

    @property
    def z_range(self) -> tuple[float, float]:
        """Safe range ``(min, max)`` of the focus drive in µm (``microscope.focus.range_um``)."""
        return tuple(self.recipe.microscope.focus.range_um)  # type: ignore[return-value]

    @property
    def measure(self) -> str:
        """Name of the sharpness measure autofocus uses: the plan's, or ``DEFAULT_MEASURE``."""
        return self.spec.measure or DEFAULT_MEASURE

    # -- low level ----------------------------------------------------------------------------

    def _move_z(self, z: float) -> None:
        lo, hi = self.z_range
        if not lo <= z <= hi:  # never drive outside the safe range, whatever asked for it
            raise ValueError(f"focus {z:.2f} µm outside the safe range [{lo}, {hi}] µm")
        core = self.core
        self._act(lambda: (core.setPosition(z), core.waitForDevice(core.getFocusDevice())),
                  f"focus move to {z:.2f} µm")

    def _snap_at(self, z: float) -> np.ndarray:
        self._move_z(z)
        self._act(self.core.snapImage, "autofocus snap")
        image = self.core.getImage()
        if self._frames is not None:  # focus-map point: evidence for the re-check
            self._frames.append((z, band_energy(image)))
        return image

    def _autofocus_here(self, z_start: float) -> FocusResult | None:
        """Run the configured autofocus at the current XY; None if it could not run."""
        lo, hi = self.z_range
        z_start = min(max(z_start, lo), hi)
        if self.spec.method == "hardware":
            try:
                self.core.fullFocus()
                z = float(self.core.getPosition())
            except Exception as exc:  # device adapters raise plain RuntimeErrors
                log.warning("hardware autofocus failed: %s", exc)
                return None
            self.af_runs += 1
            ok = lo <= z <= hi
            return FocusResult(z_um=z if ok else z_start, confidence=1.0 if ok else 0.0,
                               n_images=0, samples=[], ok=ok,
                               reason="" if ok else "outside the safe range")
        try:
            result = autofocus(
                self._snap_at,
                z_start,
                self.depth_of_field_um,
                (lo, hi),
                measure=self.measure,
                search_span_um=self.spec.search_span_um,
            )
        except RuntimeError as exc:  # a device fault its retries did not clear
            log.warning("autofocus failed: %s", exc)
            return None
        self.af_runs += 1
        self.af_images += result.n_images
        if result.ok and not lo <= result.z_um <= hi:
            result.ok = False
            result.reason = "outside the safe range"
            result.z_um = z_start
        return result

    # -- before the scan ----------------------------------------------------------------------

    def prepare(self) -> None:
        """Measure the focus map (strategy ``focus_map``) before the first tile."""
        if self.spec.strategy != "focus_map":
            return
        fov = min(self.plan.fov_um)
        tiles = np.array([(t.x_um, t.y_um) for t in self.plan.tiles])
        points = inside_tiles(
            focus_map_points(self.plan.region, fov, self.spec.points, self.spec.layout), tiles)
        # a short stage path from where the stage is to the scan's first tile
        first = self.plan.tiles[0]
        points = points[tour_order(points, self.core.getXYPosition(), (first.x_um, first.y_um))]
        z_guess = self.recipe.microscope.focus.z_um
        inner = self.plan.region.buffer(-fov / 2)
        for x, y in points:
            result, frames = self._measure_point(float(x), float(y), z_guess)
            # A featureless field (bare area between dies, a busbar) says nothing: try up to
            # two places one field of view away, towards the centre first.
            for ax, ay in self._alternatives(float(x), float(y), fov, inner, tiles):
                if result is None or result.ok or "featureless" not in result.reason:
                    break
                result, frames = self._measure_point(ax, ay, z_guess)
            if result is None:
                continue
            if result.ok:
                self._sweeps.append([((z - result.z_um) / self.depth_of_field_um, e)
                                     for z, e in frames])
            rx, ry = self.core.getXYPosition()
            self.map_points.append({"x_um": rx, "y_um": ry, "z_um": result.z_um,
                                    "confidence": result.confidence, "ok": result.ok,
                                    "images": result.n_images, "reason": result.reason})
            if result.ok:
                z_guess = result.z_um  # neighbouring points start near the last good focus
        self._refit()
        if self.spec.recheck:
            self.recheck = calibrate(self._sweeps, self.spec.recheck_dof)
            # until the scan's own neighbour pairs say otherwise, assume 10 % comparison noise
            self._pair_noise = PairNoise(prior=max(self.recheck.scatter, 0.1))
            if not self.recheck.enabled:
                log.warning("sharpness re-check off for this scan: %s", self.recheck.reason)

    def _measure_point(self, x: float, y: float, z_guess: float
                       ) -> tuple[FocusResult | None, list[tuple[float, BandEnergy]]]:
        """Autofocus at one focus-map point, keeping its frames' evidence for the re-check
        (``(None, [])``: the stage could not be moved there; the map does without it)."""
        core = self.core
        try:
            self._act(lambda: (core.setXYPosition(x, y),
                               core.waitForDevice(core.getXYStageDevice())),
                      f"focus-map move to ({x:.0f}, {y:.0f}) µm")
        except RuntimeError as exc:
            log.warning("focus-map point (%.0f, %.0f) µm left out: %s", x, y, exc)
            return None, []
        self._frames = []
        result = self._autofocus_here(z_guess)
        frames, self._frames = self._frames, None
        return result, frames

    def _alternatives(self, x: float, y: float, fov: float, inner: Any, tiles: np.ndarray
                      ) -> list[tuple[float, float]]:
        """Up to two positions one field away, inside the region and the tiles' box (which
        the travel holds: :func:`inside_tiles`), nearest the centre first."""
        from shapely import contains_xy

        c = inner.centroid if not inner.is_empty else self.plan.region.centroid
        cand = [(x + dx * fov, y + dy * fov) for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1))]
        lo, hi = tiles.min(axis=0), tiles.max(axis=0)
        cand = [p for p in cand if not inner.is_empty and contains_xy(inner, *p)
                and lo[0] <= p[0] <= hi[0] and lo[1] <= p[1] <= hi[1]]
        cand.sort(key=lambda p: math.hypot(p[0] - c.x, p[1] - c.y))
        return cand[:2]

    def _refit(self) -> None:
        good = [p for p in self.map_points if p["ok"]]
        if len(good) < 3:
            log.warning("focus map: only %d trusted points; using the fixed focus", len(good))
            self.surface = None
            return
        xs, ys, zs = (np.array([p[k] for p in good]) for k in ("x_um", "y_um", "z_um"))
        model = self.spec.model
        if model != "auto" and len(good) < MIN_POINTS[model]:
            log.warning("focus map: %d trusted points are too few for a %s fit; choosing the "
                        "model automatically", len(good), model)
            model = "auto"
        self.surface = fit_focus_surface(xs, ys, zs, model,
                                         outlier_threshold_um=self.depth_of_field_um)

    # -- during the scan ----------------------------------------------------------------------

    def z_ahead(self, x_um: float, y_um: float) -> float | None:
        """Z of a tile known before the stage gets there (the map's), else None.

        The engine then commands the focus drive together with the XY move, so the focus
        move costs no time of its own.
        """
        if self.spec.strategy != "focus_map" or self.surface is None:
            return None
        lo, hi = self.z_range
        z = float(self.surface.predict(np.array([x_um]), np.array([y_um]))[0])
        return min(max(z, lo), hi)

    def z_for(self, index: int, x_um: float, y_um: float) -> TileFocus:
        """Z for a tile (the stage is already at its XY); may run an autofocus."""
        spec = self.spec
        self._current = index
        fixed = self.recipe.microscope.focus.z_um
        base = self.last_good_z if self.last_good_z is not None else fixed
        if spec.strategy == "none":
            return TileFocus(fixed, "fixed")
        if spec.strategy == "focus_map":
            z = self.z_ahead(x_um, y_um)
            return TileFocus(base, "fixed") if z is None else TileFocus(z, "map")
        if spec.strategy == "every_n_tiles" and index % spec.every_n != 0:
            return TileFocus(base, "neighbour")
        result = self._autofocus_here(self._predict_start(x_um, y_um, base))
        if result is None or not result.ok:
            return TileFocus(base, "neighbour", 0.0 if result is None else result.confidence,
                             0 if result is None else result.n_images)
        self.last_good_z = result.z_um
        return TileFocus(result.z_um, "autofocus", result.confidence, result.n_images)

    def _predict_start(self, x_um: float, y_um: float, base: float) -> float:
        if self.surface is not None:
            return float(self.surface.predict(np.array([x_um]), np.array([y_um]))[0])
        return base

    # -- sharpness re-check (focus_map) -----------------------------------------------------

    @property
    def _recheck_on(self) -> bool:
        return (self.spec.strategy == "focus_map" and self.recheck is not None
                and self.recheck.enabled and self.surface is not None)

    def _tile(self, index: int) -> Any:
        """The planned tile of an MDA position index."""
        tile = self.plan.tiles[index]
        if tile.index != index:  # plans are built in index order; make sure of it
            tile = next(t for t in self.plan.tiles if t.index == index)
        return tile

    def _overlap_px(self) -> tuple[int, int]:
        p = self.core.getPixelSizeUm()
        (fx, fy), (sx, sy) = self.plan.fov_um, self.plan.step_um
        return int(round((fx - sx) / p)), int(round((fy - sy) / p))

    def _neighbour_pairs(self, tile: Any, strips: dict[str, BandEnergy]
                         ) -> list[tuple[BandEnergy, BandEnergy, float]]:
        """(this tile's strip, the neighbour's strip, the neighbour's dz**2) per neighbour."""
        pairs = []
        for dr, dc in ((0, -1), (0, 1), (-1, 0), (1, 0)):
            nb = self._tiles.get((tile.row + dr, tile.col + dc))
            if nb is None:
                continue
            dx, dy = nb["x_um"] - tile.x_um, nb["y_um"] - tile.y_um
            if abs(dx) >= abs(dy):
                side, other = ("right", "left") if dx > 0 else ("left", "right")
            else:
                side, other = ("bottom", "top") if dy > 0 else ("top", "bottom")
            if side in strips and other in nb["strips"]:
                pairs.append((strips[side], nb["strips"][other], nb["dz2"]))
        return pairs

    def check_tile(self, image: np.ndarray, focus: TileFocus) -> bool:
        """True when a tile taken at the map's Z looks defocused and should be re-measured.

        Only for ``focus_map`` with ``recheck`` and a calibration that can see
        ``recheck_dof`` of defocus (``focus.recheck.calibrate``). The tile's squared defocus
        is estimated from the strips it shares with already acquired neighbours
        (``estimate_defocus_sq``); a tile with no textured strip in common with them is
        never re-measured (nothing to go by), nor is a tile not placed by the map.
        """
        if not self._recheck_on or self._current is None:
            return False
        tile = self._tile(self._current)
        strips = strip_energies(image, self._overlap_px())
        cal, noise = self.recheck, self._pair_noise
        assert cal is not None and noise is not None
        dz2 = None
        if focus.source == "map":
            self.checked_tiles += 1
            pairs = self._neighbour_pairs(tile, strips)
            dz2 = estimate_defocus_sq(pairs, cal.c_per_dof2, noise.sigma)
            # the comparison noise is learnt from the pairs that do not trigger
            triggered = dz2 is not None and self._significant(dz2)
            if not triggered:
                for a, b, _ in pairs:
                    if a.usable and b.usable:
                        noise.add(log_ratio(a, b))
        self._record(tile, strips, focus, 0.0 if dz2 is None else dz2)
        return dz2 is not None and self._significant(dz2)

    def _significant(self, dz2: float) -> bool:
        """Beyond the tolerance, and beyond 3 sigma of the comparison noise."""
        cal, noise = self.recheck, self._pair_noise
        assert cal is not None and noise is not None
        return dz2 > cal.tolerance_dof**2 and dz2 * cal.c_per_dof2 > 3.0 * noise.sigma

    def record_tile(self, image: np.ndarray, focus: TileFocus) -> None:
        """Record the final frame of a re-measured tile (the reference for its neighbours)."""
        if not self._recheck_on or self._current is None:
            return
        tile = self._tile(self._current)
        old = self._tiles.get((tile.row, tile.col), {})
        dz2 = 0.0 if focus.source == "remeasured" else old.get("dz2", 0.0)
        self._record(tile, strip_energies(image, self._overlap_px()), focus, dz2)

    def _record(self, tile: Any, strips: dict[str, BandEnergy], focus: TileFocus,
                dz2: float) -> None:
        self._tiles[(tile.row, tile.col)] = {"x_um": tile.x_um, "y_um": tile.y_um,
                                             "strips": strips, "dz2": dz2, "z_um": focus.z_um,
                                             "source": focus.source}

    def remeasure(self, x_um: float, y_um: float, focus: TileFocus) -> TileFocus:
        """Autofocus a tile whose predicted Z failed (recorded in ``recheck_log``).

        The search starts from the map's Z plus the map's error at re-measured neighbours (a
        local bump spans several tiles).
        """
        tile = self._tile(self._current) if self._current is not None else None
        entry: dict[str, Any] = {"index": None if tile is None else tile.index,
                                 "x_um": x_um, "y_um": y_um, "z_map_um": focus.z_um}
        if tile is not None:
            entry["defocus_estimate_dof"] = math.sqrt(
                self._tiles.get((tile.row, tile.col), {}).get("dz2", 0.0))
        start = focus.z_um
        if tile is not None and self.surface is not None:
            offsets = []
            for dr, dc in ((0, -1), (0, 1), (-1, 0), (1, 0)):
                nb = self._tiles.get((tile.row + dr, tile.col + dc))
                if nb is not None and nb["source"] == "remeasured":
                    pred = self.surface.predict(np.array([nb["x_um"]]), np.array([nb["y_um"]]))
                    offsets.append(nb["z_um"] - float(pred[0]))
            if offsets:
                start = focus.z_um + float(np.median(offsets))
        result = self._autofocus_here(start)
        if result is None or not result.ok:
            entry.update(ok=False, reason="" if result is None else result.reason)
            self.recheck_log.append(entry)
            return focus
        self.remeasured += 1
        entry.update(ok=True, z_um=result.z_um, images=result.n_images)
        self.recheck_log.append(entry)
        # Not added to the map's fit: a re-measured tile is, by selection, where the smooth
        # surface does not hold (a local bump), and would bend it for the tiles around.
        return TileFocus(result.z_um, "remeasured", result.confidence, result.n_images)

    def summary(self) -> dict[str, Any]:
        """What ``scan.json`` and ``focus_map.json`` record."""
        out: dict[str, Any] = {
            "strategy": self.spec.strategy,
            "measure": self.measure,
            "depth_of_field_um": self.depth_of_field_um,
            "autofocus_runs": self.af_runs,
            "autofocus_images": self.af_images,
            "remeasured_tiles": self.remeasured,
            "points": self.map_points,
        }
        if self.recheck is not None:
            out["recheck"] = {**self.recheck.to_dict(), "checked_tiles": self.checked_tiles,
                              "pair_noise": None if self._pair_noise is None
                              else self._pair_noise.sigma,
                              "remeasured": self.recheck_log}
        if self.surface is not None:
            out["surface"] = self.surface.to_dict()
        return out


__all__ = ["MEASURES", "FocusController", "TileFocus"]
