"""Focus strategies during a scan: none, every tile, every n tiles, or a focus map.

The controller decides the Z of each tile. It talks to the hardware only through the core
(``setPosition``, ``snapImage``, ``fullFocus``), so the same code runs on the simulator and on
a real microscope. Z is never driven outside the focus drive's safe range from the recipe.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pymmcore_plus import CMMCorePlus

from .focus.measures import DEFAULT_MEASURE, MEASURES
from .focus.search import FocusResult, autofocus
from .focus.surface import FocusSurface, fit_focus_surface, focus_points_layout
from .plan import ScanPlan
from .recipe import Recipe

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
    _sharp_floor: float | None = None

    @property
    def spec(self):  # noqa: ANN201 - the recipe's FocusPlan model
        return self.recipe.scan.focus

    @property
    def z_range(self) -> tuple[float, float]:
        return tuple(self.recipe.microscope.focus.range_um)  # type: ignore[return-value]

    @property
    def measure(self) -> str:
        return self.spec.measure or DEFAULT_MEASURE

    # -- low level ----------------------------------------------------------------------------

    def _move_z(self, z: float) -> None:
        lo, hi = self.z_range
        if not lo <= z <= hi:  # never drive outside the safe range, whatever asked for it
            raise ValueError(f"focus {z:.2f} µm outside the safe range [{lo}, {hi}] µm")
        self.core.setPosition(z)
        self.core.waitForDevice(self.core.getFocusDevice())

    def _snap_at(self, z: float) -> np.ndarray:
        self._move_z(z)
        self.core.snapImage()
        return self.core.getImage()

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
        result = autofocus(
            self._snap_at,
            z_start,
            self.depth_of_field_um,
            (lo, hi),
            measure=self.measure,
            search_span_um=self.spec.search_span_um,
        )
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
        polygon = np.asarray(self.plan.region.exterior.coords)[:-1]
        fov = min(self.plan.fov_um)
        points = focus_points_layout(polygon, self.spec.points, self.spec.layout,
                                     margin_um=fov / 2)
        z_guess = self.recipe.microscope.focus.z_um
        for x, y in points:
            self.core.setXYPosition(float(x), float(y))
            self.core.waitForDevice(self.core.getXYStageDevice())
            result = self._autofocus_here(z_guess)
            if result is None:
                continue
            rx, ry = self.core.getXYPosition()
            self.map_points.append({"x_um": rx, "y_um": ry, "z_um": result.z_um,
                                    "confidence": result.confidence, "ok": result.ok,
                                    "images": result.n_images, "reason": result.reason})
            if result.ok:
                z_guess = result.z_um  # neighbouring points start near the last good focus
        self._refit()

    def _refit(self) -> None:
        good = [p for p in self.map_points if p["ok"]]
        if len(good) < 3:
            log.warning("focus map: only %d trusted points; using the fixed focus", len(good))
            self.surface = None
            return
        xs, ys, zs = (np.array([p[k] for p in good]) for k in ("x_um", "y_um", "z_um"))
        self.surface = fit_focus_surface(xs, ys, zs, self.spec.model,
                                         outlier_threshold_um=self.depth_of_field_um)

    # -- during the scan ----------------------------------------------------------------------

    def z_for(self, index: int, x_um: float, y_um: float) -> TileFocus:
        """Z for a tile (the stage is already at its XY); may run an autofocus."""
        spec = self.spec
        fixed = self.recipe.microscope.focus.z_um
        base = self.last_good_z if self.last_good_z is not None else fixed
        if spec.strategy == "none":
            return TileFocus(fixed, "fixed")
        if spec.strategy == "focus_map":
            if self.surface is None:
                return TileFocus(base, "fixed")
            z = float(self.surface.predict(np.array([x_um]), np.array([y_um]))[0])
            lo, hi = self.z_range
            return TileFocus(min(max(z, lo), hi), "map")
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

    def check_tile(self, image: np.ndarray, focus: TileFocus) -> bool:
        """True when a tile taken at a predicted Z looks defocused and should be re-measured.

        Only for ``focus_map`` with ``recheck``: the tile's sharpness is compared with the
        sharpness its own content would have in focus, estimated from the ratio of fine- to
        coarse-scale gradient energy (which defocus lowers whatever the content).
        """
        if self.spec.strategy != "focus_map" or not self.spec.recheck or focus.source != "map":
            return False
        from .focus.measures import texture_strength

        if texture_strength(image) < 3.0:
            return False  # featureless: sharpness says nothing about focus
        return defocus_ratio(image) < self.spec.recheck_ratio

    def remeasure(self, x_um: float, y_um: float, focus: TileFocus) -> TileFocus:
        """Autofocus a tile whose predicted Z failed; the result also refines the map."""
        result = self._autofocus_here(focus.z_um)
        if result is None or not result.ok:
            return focus
        self.remeasured += 1
        self.map_points.append({"x_um": x_um, "y_um": y_um, "z_um": result.z_um,
                                "confidence": result.confidence, "ok": True,
                                "images": result.n_images, "reason": "re-measured"})
        self._refit()
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
        if self.surface is not None:
            out["surface"] = self.surface.to_dict()
        return out


def defocus_ratio(image: np.ndarray) -> float:
    """Fine- over mid-scale detail energy: falls with defocus whatever the content.

    Difference-of-Gaussian bands at 0.7-1.4 px and 1.4-2.8 px; blur removes the fine band
    first, so the ratio drops below its in-focus value as soon as the image is defocused.
    """
    from scipy import ndimage

    img = np.asarray(image, dtype=np.float32)
    g1 = ndimage.gaussian_filter(img, 0.7)
    g2 = ndimage.gaussian_filter(img, 1.4)
    g3 = ndimage.gaussian_filter(img, 2.8)
    fine = float(np.mean((g1 - g2) ** 2))
    mid = float(np.mean((g2 - g3) ** 2))
    return fine / mid if mid > 0 else 0.0


__all__ = ["MEASURES", "FocusController", "TileFocus", "defocus_ratio"]
