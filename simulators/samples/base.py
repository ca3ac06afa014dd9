"""The virtual-sample interface of the simulated microscope and its ground-truth record."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .shapes import points_in_polygon

if TYPE_CHECKING:
    from .defects import Defect, DefectField


@dataclass(frozen=True)
class TrueDefect:
    """Ground truth of one synthetic defect, in stage coordinates.

    Attributes
    ----------
    id : int
        Index of the defect on its sample (0, 1, ...).
    kind : str
        ``"particle"``, ``"scratch"``, ``"pit"``, ``"stain"``, ``"missing_pattern"``,
        ``"crack"``, ``"dark_area"`` or ``"finger_interruption"``.
    x_um, y_um : float
        Centre (a point that lies on the defect: the middle of a scratch's curve, the middle
        vertex of a crack's main branch).
    size_um : float
        Largest extent.
    bbox_um : tuple of float
        ``(xmin, ymin, xmax, ymax)`` of the visible defect.
    contrast : float
        Signed reflectance change at its core on the nominal surface of the sample.
    """

    id: int
    kind: str
    x_um: float
    y_um: float
    size_um: float
    bbox_um: tuple[float, float, float, float]
    contrast: float

    def to_dict(self) -> dict:
        """JSON-serialisable dict (the bbox as a list of 4 floats)."""
        d = asdict(self)
        d["bbox_um"] = [float(v) for v in self.bbox_um]
        return d


class VirtualSample(ABC):
    """Something lying on the simulated stage that the simulated camera can image.

    Subclasses render reflectance as a pure function of stage coordinates: a stage region
    renders to the same image whichever tile it belongs to. Coordinates are stage micrometres;
    x grows with the image column and y with the image row.
    """

    kind: str = "sample"

    # defects placed by the subclass constructor (``_place_defects``)
    _field: DefectField | None = None

    @abstractmethod
    def render(
        self, x0_um: float, y0_um: float, shape: tuple[int, int], pixel_size_um: float
    ) -> np.ndarray:
        """Reflectance image of a stage region.

        Parameters
        ----------
        x0_um, y0_um : float
            Stage position of the centre of pixel (0, 0).
        shape : tuple of int
            ``(rows, cols)``.
        pixel_size_um : float
            Pixel pitch ``p`` at the sample: pixel ``(r, c)`` samples stage
            ``(x0_um + c * p, y0_um + r * p)``.

        Returns
        -------
        ndarray of float32 in [0, 1], shape ``(rows, cols)``
            Outside the sample: the chuck (dark, ~0.05, faint texture).
        """

    @abstractmethod
    def bounds_um(self) -> tuple[float, float, float, float]:
        """``(xmin, ymin, xmax, ymax)`` of the whole sample."""

    @abstractmethod
    def usable_polygon_um(self) -> np.ndarray:
        """(K, 2) x, y vertices of the area to scan."""

    def parameters(self) -> dict[str, Any]:
        """Constructor parameters, JSON-serialisable (written to the truth record)."""
        return {}

    def defects(self) -> list[TrueDefect]:
        """Ground truth of the synthetic defects, in id order."""
        return [] if self._field is None else self._field.truths()

    def truth(self) -> dict:
        """JSON-serialisable ground truth: ``{"sample": {...}, "defects": [...]}``."""
        return {
            "sample": {"kind": self.kind, **_jsonable(self.parameters())},
            "defects": [d.to_dict() for d in self.defects()],
        }

    # ------------------------------------------------------------------ defect placement hooks

    def _propose_point(self, rng: np.random.Generator) -> tuple[float, float]:
        """A uniformly random point of the usable polygon (rejection sampling in its box)."""
        poly = self.usable_polygon_um()
        xmin, ymin = poly.min(axis=0)
        xmax, ymax = poly.max(axis=0)
        for _ in range(1000):
            x, y = rng.uniform(xmin, xmax), rng.uniform(ymin, ymax)
            if points_in_polygon(np.array([x]), np.array([y]), poly)[0]:
                return float(x), float(y)
        return float(poly[:, 0].mean()), float(poly[:, 1].mean())

    def _accept_defect(self, defect: Defect) -> bool:
        """Whether a placed defect lies wholly in the usable area (its bbox corners do)."""
        x0, y0, x1, y1 = defect.bbox_um
        xs = np.array([x0, x1, x1, x0, defect.cx])
        ys = np.array([y0, y0, y1, y1, defect.cy])
        return bool(points_in_polygon(xs, ys, self.usable_polygon_um()).all())

    def _adjust_point(self, kind: str, x: float, y: float) -> tuple[float, float]:
        """Move a proposed defect centre where its kind belongs (default: unchanged)."""
        return x, y


def _jsonable(value: Any) -> Any:
    """Tuples to lists, numpy scalars to Python numbers, paths to strings (recursively)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)
