"""The inspection CNN: network, training, threshold calibration and the shipped default model.

Public interface (used by inspection and the CLI)::

    model = load_model(path_or_None)      # InspectionModel; None -> default_model_path()
    x = model.normalize(raw_image)        # float32 network input (see InspectionModel.normalize)
    maps = model.predict(batch)           # {'anomaly', 'roughness', 'uncertainty', ...} at 1/4
    report = train_model(good, out, ...)  # TrainReport; writes OUT.safetensors + OUT.json
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .inspection import InspectionModel, default_model_path, load_model, save_model

if TYPE_CHECKING:
    from .train import TrainReport


def train_model(good: list[Path], out: Path, **options: Any) -> TrainReport:
    """Train a model on good images (+ simulated data) and calibrate its threshold.

    See :func:`models.train.train_model` for the options. Imported lazily: training pulls in
    the simulators, which inference does not need.
    """
    from .train import train_model as _train

    return _train(good, out, **options)


__all__ = [
    "InspectionModel",
    "default_model_path",
    "load_model",
    "save_model",
    "train_model",
]
