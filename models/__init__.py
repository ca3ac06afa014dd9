"""Inspection models: the one-class detector on pretrained features, its training and
calibration, the roughness network beside it, and the shipped default model.

Public interface (used by inspection and the CLI)::

    model = load_model(path_or_None)      # a detector (or a legacy network); None -> default
    x = model.normalize(raw_image)        # float32 model input (see the model's normalize)
    maps = model.predict(batch)           # {'anomaly', 'roughness', 'uncertainty', ...} at 1/4
    report = build_detector(good, out)    # BuildReport; writes OUT.safetensors + OUT.json

Attributes are imported lazily, so that ``models.errors`` can be imported without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "InspectionModel": "models.modelfile",
    "default_model_path": "models.modelfile",
    "network_model_path": "models.modelfile",
    "load_model": "models.modelfile",
    "save_model": "models.modelfile",
    "PatchDetector": "models.detector",
    "build_detector": "models.build",
    "train_model": "models.train",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")


__all__ = sorted(_LAZY)
