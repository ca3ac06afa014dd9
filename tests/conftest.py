"""Shared fixtures: small recipes written into a temporary folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml


@pytest.fixture
def write_recipe(tmp_path: Path):
    """Write a recipe dict (or raw text) to tmp_path and return its path."""

    def _write(content: dict | str, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        text = content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False)
        path.write_text(text, encoding="utf-8")
        return path

    return _write


def smooth_texture(shape: tuple[int, int], seed: int = 0, sigma: float = 3.0) -> np.ndarray:
    """A band-limited random texture in [0, 1] (good for registration and comparisons)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    img = ndimage.gaussian_filter(rng.random(shape), sigma)
    img -= img.min()
    return img / img.max()


@pytest.fixture
def coupon_tif(tmp_path: Path) -> Path:
    """A 900 x 1200 16-bit TIFF with smooth texture: the sample of image-based recipes."""
    img = (smooth_texture((900, 1200), seed=3, sigma=8.0) * 60000 + 2000).astype(np.uint16)
    path = tmp_path / "coupon.tif"
    tifffile.imwrite(path, img)
    return path
