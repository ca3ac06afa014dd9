"""Training batches of the inspection network: crops of good images with synthetic anomalies.

Random (or hard, :func:`mine_hard_crops`) crops of good images, randomly flipped and rotated,
with anomalies painted on part of them (:mod:`models.synth`), as :func:`models.train.train_model`
trains on; :class:`EpochBatches` makes an epoch's batches in ``DataLoader`` worker processes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from .data import GoodImage
from .modelfile import GAIN
from .network import OUTPUT_STRIDE, InspectionNet
from .synth import add_anomalies


def _crop_origin(h: int, w: int, size: int, rng: np.random.Generator) -> tuple[int, int]:
    """Random top-left corner of a ``size`` crop of an ``h`` x ``w`` image (0 when smaller)."""
    return int(rng.integers(0, max(h - size, 0) + 1)), int(rng.integers(0, max(w - size, 0) + 1))


def _network_input(x: np.ndarray) -> np.ndarray:
    """Relative reflectance to network input (what ``normalize_image`` does to raw counts)."""
    return (x - np.float32(1.0)) * np.float32(GAIN)


def _crop(img: GoodImage, size: int, rng: np.random.Generator,
          at: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A random crop (and its Sa map, NaN where unknown), randomly flipped / rotated.

    ``at`` gives the crop's top-left corner instead of a random one (hard examples).
    """
    h, w = img.image.shape
    if h < size or w < size:  # small images are reflected up to the crop size
        ph, pw = max(0, size - h), max(0, size - w)
        im = np.pad(img.image, ((0, ph), (0, pw)), mode="reflect")
        sa = None if img.sa_nm is None else np.pad(img.sa_nm, ((0, ph), (0, pw)), mode="edge")
        h, w = im.shape
    else:
        im, sa = img.image, img.sa_nm
    r0, c0 = _crop_origin(h, w, size, rng) if at is None else (min(at[0], h - size),
                                                                 min(at[1], w - size))
    x = im[r0:r0 + size, c0:c0 + size]
    s = (np.full((size, size), np.nan, np.float32) if sa is None
         else sa[r0:r0 + size, c0:c0 + size])
    k = int(rng.integers(4))
    x, s = np.rot90(x, k), np.rot90(s, k)
    if rng.random() < 0.5:
        x, s = x[:, ::-1], s[:, ::-1]
    return np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(s, dtype=np.float32)


#: a crop of a good image: (index in the image list, top row, left column)
CropRef = tuple[int, int, int]


def make_batch(
    images: Sequence[GoodImage],
    n: int,
    size: int,
    rng: np.random.Generator,
    anomaly_fraction: float = 0.6,
    hard: Sequence[CropRef] = (),
    hard_fraction: float = 0.25,
) -> dict[str, torch.Tensor]:
    """A training batch: normalised crops, anomaly targets and Sa targets at stride 4.

    With ``hard`` crops given (good crops the model scored highest, :func:`mine_hard_crops`),
    a ``hard_fraction`` of the batch is drawn from them.
    """
    xs, targets, sas = [], [], []
    donors = [_crop(images[int(rng.integers(len(images)))], size, rng)[0] for _ in range(2)]
    for _ in range(n):
        if hard and rng.random() < hard_fraction:
            i, r0, c0 = hard[int(rng.integers(len(hard)))]
            x, sa = _crop(images[i], size, rng, at=(r0, c0))
        else:
            x, sa = _crop(images[int(rng.integers(len(images)))], size, rng)
        x = x * np.float32(rng.uniform(0.92, 1.08))  # residual brightness-level error
        if rng.random() < anomaly_fraction:
            x, t = add_anomalies(x, rng, donors=donors)
        else:
            t = np.zeros_like(x)
        xs.append(_network_input(x))
        targets.append(t)
        sas.append(np.where(t > 0, np.nan, sa))  # roughness is undefined on a defect
    x = torch.from_numpy(np.stack(xs))[:, None]
    t = torch.from_numpy(np.stack(targets))[:, None]
    s = torch.from_numpy(np.stack(sas).astype(np.float32))[:, None]
    s_known = torch.isfinite(s).float()
    pool = OUTPUT_STRIDE
    return {
        "x": x,
        "target": F.max_pool2d(t, pool),  # a cell with any defect pixel is defective
        # Sa of a cell: mean over its pixels, defined only where every pixel is known
        "sa": F.avg_pool2d(torch.nan_to_num(s), pool),
        "sa_known": (F.avg_pool2d(s_known, pool) > 0.999).float(),
    }


class EpochBatches(torch.utils.data.IterableDataset):
    """The training batches of one epoch, made in ``DataLoader`` worker processes.

    Painting synthetic anomalies costs more than a training step on a GPU, so batches are made
    in parallel. Worker ``i`` of ``n`` makes every ``n``-th batch from its own generator seeded
    by ``(seed, epoch, i)``; the loader hands batches out in a fixed round-robin order, so a run
    is reproducible for a given number of workers (0: made in the training process).
    Batches travel as numpy arrays (pickled through a pipe): tensors would travel through
    shared memory, which a container may hold to a few tens of MB.
    """

    def __init__(self, images: Sequence[GoodImage], steps: int, batch_size: int, patch: int,
                 seed: int, epoch: int, hard: Sequence[CropRef] = ()) -> None:
        super().__init__()
        self.images, self.steps, self.batch_size, self.patch = images, steps, batch_size, patch
        self.seed, self.epoch, self.hard = seed, epoch, list(hard)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        rng = np.random.default_rng([self.seed, self.epoch, worker])
        for _ in range(worker, self.steps, workers):
            batch = make_batch(self.images, self.batch_size, self.patch, rng, hard=self.hard)
            yield {key: v.numpy() for key, v in batch.items()}


def _as_is(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return batch


def epoch_loader(dataset: EpochBatches, workers: int) -> torch.utils.data.DataLoader:
    """A loader over one epoch's batches (already batched; numpy arrays, see EpochBatches)."""
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                       collate_fn=_as_is,
                                       prefetch_factor=4 if workers else None)


def _device_of(net: torch.nn.Module) -> torch.device:
    """Where a network's parameters live (the CPU for one without parameters)."""
    return next(net.parameters(), torch.empty(0)).device


def mine_hard_crops(
    net: InspectionNet, images: Sequence[GoodImage], size: int, rng: np.random.Generator,
    candidates: int = 256, keep: int = 48,
) -> list[CropRef]:
    """Good crops on which the model's anomaly score peaks highest (hard negative mining).

    Uniform crops rarely hold the few normal structures that look most like a defect (grain
    boundaries, alignment marks, dense pattern blocks); the model learns them as normal only
    when it sees them often. Scores ``candidates`` random crops of good images (no synthetic
    anomaly) and returns the ``keep`` with the highest peak, for the next epoch's batches.
    """
    refs: list[CropRef] = []
    xs = []
    for _ in range(candidates):
        i = int(rng.integers(len(images)))
        r0, c0 = _crop_origin(*images[i].image.shape, size, rng)
        x, _ = _crop(images[i], size, rng, at=(r0, c0))
        refs.append((i, r0, c0))
        xs.append(_network_input(x))
    was_training = net.training
    net.eval()
    device = _device_of(net)
    peaks = []
    with torch.inference_mode():
        for k in range(0, candidates, 16):
            out = net(torch.from_numpy(np.stack(xs[k:k + 16]))[:, None].to(device))
            p = torch.sigmoid(out["anomaly_logits"]).mean(1)
            peaks.append(p.flatten(1).max(1).values.cpu().numpy())
    net.train(was_training)
    order = np.argsort(np.concatenate(peaks))[::-1]
    return [refs[int(j)] for j in order[:keep]]
