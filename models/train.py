"""Training: good images (+ simulated surfaces) -> a calibrated inspection model.

1. Good images are split by image into training and validation sets (fixed seed).
2. Each training step draws random crops, paints synthetic anomalies on part of them
   (:mod:`models.synth`; no real defect label is ever used) and trains the anomaly heads on
   "visibly changed or not" with a weighted cross-entropy (each head on its own bootstrap
   weights of the batch, so the ensemble's spread means something) and the roughness head
   (at a tenth of the weight) with a Gaussian
   negative log-likelihood where the true Sa is known (simulated surfaces).
3. After each epoch a fixed validation set scores the model; training stops early when the
   selection merit (AUROC and roughness error, :func:`selection_merit`) has not improved
   for ``patience`` epochs, and the best epoch within a roughness guard is kept.
4. The decision threshold is calibrated on held-out good images to the false-alarm rate asked
   for (:mod:`models.calibrate`), and the model is saved (safetensors + JSON card).
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from .calibrate import (
    CONTEXT_CARD_KEYS,
    Calibration,
    calibrate_contexts_on,
    calibrate_threshold,
    kind_contexts,
    map_resolution,
    review_level,
)
from .data import (
    PIXEL_RANGES_UM,
    GoodImage,
    load_good_images,
    scan_pixel_size_um,
    simulated_good_images,
)
from .errors import InputError as UserError
from .inspection import GAIN, InspectionModel, card_path_for, load_model, load_network, save_model
from .network import OUTPUT_STRIDE, InspectionNet, NetConfig, macs_per_pixel
from .synth import add_anomalies

#: roughness targets and predictions are compared in units of this many nm
SA_UNIT_NM = 5.0

Progress = Callable[[str, int, int, dict], None]


@dataclass
class TrainReport:
    """What :func:`train_model` did.

    Attributes
    ----------
    weights, card_path : Path
        Files written.
    card : dict
        The model card.
    epochs_run, best_epoch : int
        Epochs trained and the epoch whose weights were kept (1-based).
    train_time_s : float
        Wall-clock time of the whole call.
    history : list of dict
        Per epoch: training loss, validation loss, validation AUROC, roughness MAE.
    """

    weights: Path
    card_path: Path
    card: dict
    epochs_run: int
    best_epoch: int
    train_time_s: float
    history: list[dict] = field(default_factory=list)


# ---------------------------------------------------------------------- batches


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


def warmup_cosine(step: int, total: int, warmup: float = 0.15, floor: float = 1e-3) -> float:
    """Learning-rate factor: linear warm-up over ``warmup`` of ``total`` steps, cosine decay.

    The shape of one-cycle's learning rate, written as a plain function of ``total`` so that a
    time-limited run can shorten its schedule after measuring its first epoch.
    """
    w = max(1, int(warmup * total))
    if step < w:
        return floor + (1.0 - floor) * step / w
    t = min(1.0, (step - w) / max(1, total - w))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def resolve_device(device: str | None) -> torch.device:
    """``None``/``"cpu"``: the CPU; ``"auto"``: CUDA when available; else as torch reads it."""
    if device in (None, "", "cpu"):
        return torch.device("cpu")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise UserError(f"--device: not a torch device: {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device: {device} asked for but no CUDA GPU is available")
    return dev


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


# ---------------------------------------------------------------------- losses


#: weight of the anomaly pixels in the cross-entropy (defect cells are a minority of a batch)
POS_WEIGHT = 3.0
#: weight of the roughness loss against the anomaly loss: its Gaussian NLL is unbounded
#: (``exp(-logvar)``), and at weight 1 its gradients took over the shared trunk (gradient norm
#: clipped on half the steps) and the anomaly heads stayed near a constant
ROUGHNESS_WEIGHT = 0.1


def losses(out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor],
           weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Anomaly (cross-entropy per head, bootstrap-weighted) and roughness (Gaussian NLL) losses.

    Plain weighted cross-entropy, not focal loss: focal loss down-weights the confident cells
    and left the heads under-confident (obvious blobs scored 0.4, the surface 0.2), which
    no threshold separates well.
    """
    logits = out["anomaly_logits"]  # (N, K, h, w)
    target = batch["target"].expand_as(logits)
    ce = F.binary_cross_entropy_with_logits(
        logits, target, reduction="none", pos_weight=logits.new_tensor(POS_WEIGHT)
    ).mean(dim=(2, 3))  # (N, K)
    if weights is not None:
        ce = ce * weights
    anomaly = ce.mean()
    known = batch["sa_known"]
    if known.sum() > 0:
        mu = out["roughness"] / SA_UNIT_NM
        y = batch["sa"] / SA_UNIT_NM
        logvar = out["roughness_logvar"]
        nll = 0.5 * (logvar + (y - mu) ** 2 * torch.exp(-logvar))
        l1 = (y - mu).abs()
        rough = ((nll + l1) * known).sum() / known.sum()
    else:
        rough = logits.sum() * 0.0
    return {"anomaly": anomaly, "roughness": rough,
            "total": anomaly + ROUGHNESS_WEIGHT * rough}


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum (Mann-Whitney) formula; NaN if one class."""
    from scipy.stats import rankdata

    labels = labels.astype(bool).ravel()
    scores = np.asarray(scores, dtype=float).ravel()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def evaluate(net: InspectionNet, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Validation loss, stride-level AUROC of synthetic anomalies and roughness MAE (nm)."""
    net.eval()
    device = _device_of(net)
    total, scores, labels, err, n_known = 0.0, [], [], 0.0, 0.0
    with torch.inference_mode():
        for b in batches:
            b = {k: v.to(device) for k, v in b.items()}
            out = net(b["x"])
            total += float(losses(out, b)["total"])
            scores.append(torch.sigmoid(out["anomaly_logits"]).mean(1).cpu().numpy().ravel())
            labels.append(b["target"].cpu().numpy().ravel())
            k = b["sa_known"]
            err += float(((out["roughness"] - b["sa"]).abs() * k).sum())
            n_known += float(k.sum())
    net.train()
    return {
        "val_loss": total / max(len(batches), 1),
        "val_auroc": auroc(np.concatenate(scores), np.concatenate(labels) > 0.5),
        "val_sa_mae_nm": err / n_known if n_known else float("nan"),
    }


# ---------------------------------------------------------------------- training


#: an epoch is eligible only if its roughness MAE is within this factor of the best epoch's
ROUGHNESS_GUARD = 1.2


def selection_merit(metrics: dict[str, float]) -> float:
    """Lower is better: anomaly ranking error ``1 - AUROC`` plus roughness MAE / 50 nm.

    Not the validation loss: its roughness NLL is unbounded and jumped by 5x between epochs,
    so early stopping on it ended runs whose detection was still improving. A 0.05 AUROC
    gain is worth 2.5 nm of roughness error.
    """
    auc = metrics.get("val_auroc", float("nan"))
    mae = metrics.get("val_sa_mae_nm", float("nan"))
    return (1.0 - (auc if math.isfinite(auc) else 0.5)) + (mae / 50.0 if math.isfinite(mae)
                                                            else 0.0)


def select_epoch(history: Sequence[dict[str, float]]) -> int:
    """The epoch (1-based) to keep: best :func:`selection_merit` with a roughness guard.

    Epochs whose roughness MAE exceeds :data:`ROUGHNESS_GUARD` times the best MAE of the run
    are not eligible (where the MAE is known), so detection is not bought with roughness.
    """
    if not history:
        return 0
    maes = [h.get("val_sa_mae_nm", float("nan")) for h in history]
    known = [m for m in maes if math.isfinite(m)]
    limit = ROUGHNESS_GUARD * min(known) if known else math.inf
    eligible = [i for i, m in enumerate(maes) if not math.isfinite(m) or m <= limit]
    return 1 + min(eligible, key=lambda i: selection_merit(history[i]))


def _split(images: list[GoodImage], fraction: float, rng: np.random.Generator
           ) -> tuple[list[GoodImage], list[GoodImage]]:
    """Split by image; at least one validation image when there are two or more."""
    if len(images) < 2:
        return images, []
    order = rng.permutation(len(images))
    n_val = min(len(images) - 1, max(1, int(round(fraction * len(images)))))
    return [images[i] for i in order[n_val:]], [images[i] for i in order[:n_val]]


def _init_record(init: str | Path) -> dict[str, str]:
    """Card entry naming the model a fine-tuning started from (file name and weights hash)."""
    _net, card, weights = load_network(None if str(init) == "default" else init)
    return {"model": weights.stem, "weights_sha256": str(card.get("weights_sha256", ""))}


def held_out_maps(
    model: InspectionModel, held_out: Sequence[GoodImage], notify: Progress | None = None,
) -> list[dict[str, np.ndarray]]:
    """The model's maps of held-out good images (up to 2048 x 2048 px of each)."""
    maps = []
    for i, g in enumerate(held_out):
        maps.append(model.predict_image(g.image[:2048, :2048]))
        if notify:
            notify("calibrate", i + 1, len(held_out), {})
    return maps


def calibrate_on(
    model: InspectionModel,
    held_out: Sequence[GoodImage],
    pixel_size_um: float,
    false_alarms_per_cm2: float,
    notify: Progress | None = None,
    maps: Sequence[dict[str, np.ndarray]] | None = None,
) -> Calibration:
    """Calibrate a model's threshold on held-out good images (up to 2048 x 2048 px of each).

    ``pixel_size_um`` is the pixel size of images whose ``meta`` does not give one; ``maps``
    are the model's maps of ``held_out`` when already computed (:func:`held_out_maps`).
    """
    if maps is None:
        maps = held_out_maps(model, held_out, notify)
    return calibrate_threshold([m["anomaly"] for m in maps],
                               held_out_area_cm2(held_out, pixel_size_um), false_alarms_per_cm2)


def held_out_area_cm2(held_out: Sequence[GoodImage], pixel_size_um: float) -> float:
    """Sample area (cm²) the maps of :func:`held_out_maps` cover (up to 2048 x 2048 px each).

    ``pixel_size_um`` is the pixel size of images whose ``meta`` does not give one.
    """
    return sum(g.image[:2048, :2048].size * g.meta.get("pixel_size_um", pixel_size_um) ** 2
               for g in held_out) / 1e8


def _indices_by_kind(held_out: Sequence[GoodImage]) -> dict[str, list[int]]:
    """Indices of the simulated held-out images of each recipe sample kind (:data:`SAMPLE_KIND`)."""
    return {SAMPLE_KIND[kind]: [i for i, g in enumerate(held_out) if g.kind == kind]
            for kind in sorted({g.kind for g in held_out} & set(SAMPLE_KIND))}


#: recipe sample kind of each simulated kind (``scanner.recipe``: plain rough surfaces are
#: imaged as rectangle coupons)
SAMPLE_KIND = {"wafer": "wafer", "pv_cell": "pv_cell", "rough": "rectangle"}


def calibrate_by_kind(
    model: InspectionModel,
    held_out: Sequence[GoodImage],
    maps: Sequence[dict[str, np.ndarray]],
    pixel_size_um: float,
    false_alarms_per_cm2: float,
) -> dict[str, Calibration]:
    """One calibration per recipe sample kind of simulated held-out images.

    A pooled calibration counts false alarms over the pooled area, and the kinds differ in
    both: PV-cell windows at 30 µm pixels hold 36 times the area of wafer windows at 5 µm,
    so the pooled threshold let wafers have several false defects per cm² while PV cells had
    a twentieth of one. Calibrating each kind on its own held-out images gives every kind
    the asked-for rate. User images (kind ``"user"``) get no entry: their pooled threshold is
    their own.
    """
    return {kind: calibrate_on(model, [held_out[i] for i in idx], pixel_size_um,
                               false_alarms_per_cm2, maps=[maps[i] for i in idx])
            for kind, idx in _indices_by_kind(held_out).items()}


def inspected_anomaly(image: GoodImage, anomaly: np.ndarray, stride: int = OUTPUT_STRIDE,
                      edge_px: int = 2) -> np.ndarray:
    """A held-out anomaly map as inspection of a scan would see it: 0 outside the sample.

    Inspection masks a scan to the sample's usable area, eroded by two map pixels
    (``scanner.inspect.infer_mosaic``), and the quiet and plain masks count that border as
    busy; the chuck or background of an edge window must not count as plain area that cannot
    hold a false alarm.
    """
    if image.usable is None:
        return anomaly
    from scipy import ndimage

    inside = map_resolution(image.usable[:2048, :2048].astype(np.float32), stride,
                            anomaly.shape) > 0.5
    inside = ndimage.binary_erosion(inside, iterations=edge_px)
    return np.where(inside, anomaly, 0.0).astype(np.float32)


def calibrate_contexts(
    held_out: Sequence[GoodImage],
    maps: Sequence[dict[str, np.ndarray]],
    pixel_size_um: float,
    false_alarms_per_cm2: float,
    thresholds_by_kind: dict[str, float],
    default: float,
) -> dict[str, dict[str, Calibration]]:
    """The thresholds of each neighbourhood context per recipe sample kind (``{"quiet": ...,
    "plain": ..., "plain_near_structure": ...}``).

    :func:`models.calibrate.calibrate_contexts_on` each kind's held-out maps as inspection
    sees them (:func:`inspected_anomaly`). Each is kept only below the one it refines
    (:data:`CONTEXT_REFINES`; the kind's threshold where that one was not kept): quiet and
    plain near structure below the kind's threshold (``thresholds_by_kind``, else
    ``default``: the pooled one), plain below the kind's quiet threshold; kinds with too
    little area of a context in their held-out images get no entry for it, and each kind
    only its own contexts (:func:`models.calibrate.kind_contexts`).
    """
    out: dict[str, dict[str, Calibration]] = {context: {} for context in CONTEXT_CARD_KEYS}
    for kind, idx in _indices_by_kind(held_out).items():
        areas = [held_out_area_cm2([held_out[i]], pixel_size_um) for i in idx]
        amaps = [inspected_anomaly(held_out[i], maps[i]["anomaly"]) for i in idx]
        images = [map_resolution(held_out[i].image[:2048, :2048], OUTPUT_STRIDE, a.shape)
                  for i, a in zip(idx, amaps, strict=True)]
        cals = calibrate_contexts_on(amaps, images, areas, false_alarms_per_cm2,
                                     contexts=kind_contexts(kind))
        ceiling = {"kind": thresholds_by_kind.get(kind, default)}
        for context, refines in CONTEXT_REFINES.items():
            cal = cals.get(context)
            if cal is not None and cal.threshold < ceiling.get(refines, ceiling["kind"]):
                out[context][kind] = cal
                ceiling[context] = cal.threshold
    return out


#: the context (or the kind's own threshold) each context's threshold must stay below:
#: plain areas are quiet ones, plain ones near structure need not be
CONTEXT_REFINES = {"quiet": "kind", "plain": "quiet", "plain_near_structure": "kind"}


#: pixel-size bands: each kind's held-out windows are split into this many bands, equal in
#: log pixel size over the sizes they were drawn at, and each band is calibrated on its own
PIXEL_BANDS = 3
#: a kind gets bands only when every band holds at least this much held-out area (whole
#: windows): at 1 µm a 1024 px wafer window is 0.01 cm², too little to count false alarms on
MIN_BAND_AREA_CM2 = 20.0


def calibrate_pixel_bands(
    held_out: Sequence[GoodImage],
    maps: Sequence[dict[str, np.ndarray]],
    pixel_size_um: float,
    false_alarms_per_cm2: float,
    model: InspectionModel,
    floors: dict[str, dict[str, float]],
) -> dict[str, list[dict[str, Any]]]:
    """Thresholds of each kind per band of pixel sizes (card ``thresholds_by_pixel_size``).

    A kind's threshold holds the asked-for rate per cm² over all its held-out area, and the
    windows at coarse pixels hold most of it (a 1024 px PV window at 40 µm is 16 cm², at
    8 µm 0.7 cm²), while a finer pixel puts more of the network's false alarms in each cm²:
    defect-free PV cells inspected at 10 µm had 3.5-4.3 false defects per cm² at the pooled
    PV threshold, at 30 µm 0.56. Each band gets the kind's threshold and its context
    thresholds (:func:`calibrate_contexts`) from its own windows; inspection takes the band of
    the scan's pixel size. ``{kind: [{"pixel_size_um": [lo, hi], "threshold": t, "quiet": t,
    ...}, ...]}``; kinds whose bands would rest on too little area
    (:data:`MIN_BAND_AREA_CM2`) get none and keep their one threshold.

    A band only raises its kind's thresholds (``floors``: ``{kind: {"threshold": t,
    "quiet": t, ...}}``, the kind's own), never lowers them, and has only the contexts its
    kind has. Each context holds the rate on its own area, so the rates of a scan's contexts
    add up; a band's own lower threshold, right for its context alone, let whole scans
    exceed the target: the 23-40 µm PV band's own quiet threshold (0.23 against the kind's
    0.29) put defect-free PV cells at 30 µm at 1.2 false defects per cm² instead of 0.5,
    the benchmark's at 1.5-1.6 instead of 0.9-1.0.
    """
    out: dict[str, list[dict[str, Any]]] = {}
    for kind, idx in _indices_by_kind(held_out).items():
        sizes = np.array([float(held_out[i].meta.get("pixel_size_um", pixel_size_um))
                          for i in idx])
        if sizes.max() <= sizes.min() * 1.01:
            continue  # one pixel size: nothing to band
        edges = np.geomspace(sizes.min(), sizes.max(), PIXEL_BANDS + 1)
        # each window's band; the largest size falls on the last edge and into the last band
        band_of = np.minimum(np.searchsorted(edges, sizes, side="right") - 1, PIXEL_BANDS - 1)
        bands = []
        for b in range(PIXEL_BANDS):
            band = [i for i, k in zip(idx, band_of, strict=True) if k == b]
            whole = [i for i in band if not held_out[i].meta.get("edge")]
            area = held_out_area_cm2([held_out[i] for i in whole], pixel_size_um)
            if area < MIN_BAND_AREA_CM2:
                bands = []
                break
            cal = calibrate_on(model, [held_out[i] for i in whole], pixel_size_um,
                               false_alarms_per_cm2, maps=[maps[i] for i in whole])
            contexts = calibrate_contexts([held_out[i] for i in band], [maps[i] for i in band],
                                          pixel_size_um, false_alarms_per_cm2,
                                          {kind: cal.threshold}, cal.threshold)
            floor = floors.get(kind, {})
            own = {c: v[kind].threshold for c, v in contexts.items() if kind in v}
            bands.append({"pixel_size_um": [round(float(edges[b]), 3),
                                             round(float(edges[b + 1]), 3)],
                          "threshold": max(cal.threshold, floor.get("threshold", 0.0)),
                          "area_cm2": round(area, 2),
                          **{c: max(own.get(c, t), t) for c, t in floor.items()
                             if c != "threshold"}})
        if bands:
            out[kind] = bands
    return out


def recalibrate(model_path: str | Path, n_per_kind: int, seed: int,
                false_alarms_per_cm2: float = 1.0, contexts_only: bool = False,
                ) -> dict[str, Any]:
    """Calibrate a trained model's card again on new simulated held-out images.

    ``n_per_kind`` new 1024 px windows of each kind (seed ``seed``: one never used in the
    model's training). The pooled and per-kind thresholds and the review level come from the
    windows wholly on the sample (as in training); the quiet and plain thresholds from all of
    them, windows over a sample's edge masked to its usable area as inspection masks a scan
    (:func:`inspected_anomaly`): plain area lies mostly at a wafer's rim, and without those
    windows a wafer's plain threshold rested on 1.8 cm² instead of 4.4. With ``contexts_only``
    only the context thresholds per kind are written (the per-kind ones and the bands of
    pixel sizes kept as they are: run it without to renew the bands too). Returns the card's
    new entries.
    """
    model = load_model(model_path)
    ranges = PIXEL_RANGES_UM if model.card.get("pixel_size_range_um") else None
    pixel_size_um = float(model.pixel_size_um)
    images = simulated_calibration_images(n_per_kind, pixel_size_um, seed, ranges)
    maps = held_out_maps(model, images)
    held = (f"simulated, {n_per_kind} images per kind, seed {seed} "
            f"(models.train.simulated_calibration_images)")
    path = card_path_for(Path(model.path))
    card = json.loads(path.read_text(encoding="utf-8"))
    if contexts_only:
        cals = calibrate_contexts(images, maps, pixel_size_um, false_alarms_per_cm2,
                                  card.get("thresholds_by_sample_kind") or {},
                                  float(card["threshold"]))
        new, records = _context_entries(cals, held)
        card.setdefault("calibration", {}).update(records)
    else:
        new = calibrate_card(model, images, pixel_size_um, false_alarms_per_cm2, "simulated",
                             seed, maps=maps)
        new["calibration"]["held_out"] = held
        card.setdefault("uncertainty", {})["review"] = new.pop("review")
        # entries calibrate_card leaves out when it finds none must not survive from before
        for key in ("thresholds_by_sample_kind", "thresholds_by_pixel_size",
                    "review_uncertainty", *CONTEXT_CARD_KEYS.values()):
            card.pop(key, None)
    card.update(new)
    path.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return new


def simulated_calibration_images(n_per_kind: int, pixel_size_um: float, seed: int,
                                 ranges: dict[str, tuple[float, float]] | None,
                                 size: int = 1024) -> list[GoodImage]:
    """Held-out simulated windows for calibration only: ``n_per_kind`` of each kind.

    Larger than the validation windows: a wafer window of 512 x 512 px at 2 µm is 0.01 cm²,
    and a per-kind rate of 1 per cm² needs a few cm² of each kind to count on.
    """
    kinds = tuple(SAMPLE_KIND)
    return simulated_good_images(n_per_kind * len(kinds), size, pixel_size_um,
                                 seed + 2_000_003, kinds=kinds, pixel_ranges_um=ranges)


def calibrate_card(
    model: InspectionModel,
    held_out: Sequence[GoodImage],
    pixel_size_um: float,
    false_alarms_per_cm2: float,
    source: str,
    seed: int,
    notify: Progress | None = None,
    maps: Sequence[dict[str, np.ndarray]] | None = None,
) -> dict[str, Any]:
    """Everything a card says about calibration, from held-out good images.

    The pooled threshold, one per sample kind of simulated held-out images
    (:func:`calibrate_by_kind`; not for ``source == "user"``), and the review level of a
    defect's uncertainty (:func:`calibrate_review`). Returns the card's ``threshold``,
    ``calibration``, ``thresholds_by_sample_kind``, ``review_uncertainty`` (when found) and
    ``review`` (the review calibration's summary, for the card's uncertainty section).
    ``maps`` are the model's maps of ``held_out`` when already computed.

    Simulated windows over a sample's edge (``meta["edge"]``: wafer rim and chuck, cell
    border) count for the quiet and plain thresholds only, masked to the sample's usable area
    as inspection masks a scan (:func:`calibrate_contexts`): plain area lies mostly near a
    wafer's rim (without them a wafer's plain threshold rested on 1.8 cm² of 384 windows
    instead of 4.4). The other calibrations count whole-image areas, so they use the windows
    wholly on the sample.
    """
    if maps is None:
        maps = held_out_maps(model, held_out, notify)
    all_images, all_maps = held_out, maps
    whole = [i for i, g in enumerate(held_out) if not g.meta.get("edge")] or list(
        range(len(held_out)))
    held_out, maps = [held_out[i] for i in whole], [maps[i] for i in whole]
    cal = calibrate_on(model, held_out, pixel_size_um, false_alarms_per_cm2, maps=maps)
    by_kind = (calibrate_by_kind(model, held_out, maps, pixel_size_um, false_alarms_per_cm2)
               if source != "user" else {})
    contexts = (calibrate_contexts(all_images, all_maps, pixel_size_um, false_alarms_per_cm2,
                                   {k: c.threshold for k, c in by_kind.items()}, cal.threshold)
                if source != "user" else {})
    floors = {kind: {"threshold": c.threshold,
                     **{context: cals[kind].threshold for context, cals in contexts.items()
                        if kind in cals}}
              for kind, c in by_kind.items()}
    bands = (calibrate_pixel_bands(all_images, all_maps, pixel_size_um, false_alarms_per_cm2,
                                   model, floors) if source != "user" else {})
    review = calibrate_review(model, held_out, maps, cal.threshold,
                              np.random.default_rng(seed + 11))
    thresholds, records = _context_entries(contexts)
    out: dict[str, Any] = {
        "threshold": cal.threshold,
        "calibration": {**cal.to_dict(), "held_out": source,
                        "held_out_images": len(held_out),
                        "by_sample_kind": {k: c.to_dict() for k, c in by_kind.items()},
                        **records},
        "review": review,
    }
    if by_kind:
        out["thresholds_by_sample_kind"] = {k: c.threshold for k, c in by_kind.items()}
    if bands:
        out["thresholds_by_pixel_size"] = bands
    out.update({key: t for key, t in thresholds.items() if t})
    if review["review_uncertainty"] is not None:
        out["review_uncertainty"] = review["review_uncertainty"]
    return out


def _context_entries(contexts: dict[str, dict[str, Calibration]], held_out: str | None = None
                     ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, Any]]]:
    """A card's entries for context calibrations (:func:`calibrate_contexts`): the thresholds
    under :data:`CONTEXT_CARD_KEYS` and the records for its ``calibration`` section
    (``quiet_by_sample_kind``, ...), each noting ``held_out`` when given."""
    note = {"held_out": held_out} if held_out else {}
    thresholds = {CONTEXT_CARD_KEYS[context]: {k: c.threshold for k, c in cals.items()}
                  for context, cals in contexts.items()}
    records = {f"{context}_by_sample_kind": {**{k: c.to_dict() for k, c in cals.items()},
                                             **note}
               for context, cals in contexts.items()}
    return thresholds, records


@dataclass
class _MapDefect:
    """A defect of one image's maps: its box (image pixels) and uncertainty at its peak."""

    bbox_um: tuple[float, float, float, float]
    uncertainty: float


def _defects_of(maps: dict[str, np.ndarray], threshold: float) -> list[_MapDefect]:
    """Defects of one image's maps as inspection groups them (``scanner.defects``: the
    hysteresis extent halfway from the map's median to the threshold, fragments closer than
    the merge distance joined), with boxes in image pixels."""
    from scipy import ndimage

    from .calibrate import DEFECT_MERGE_MAP_PX, label_defects

    a = np.asarray(maps["anomaly"], dtype=np.float32)
    high = a > threshold
    if not high.any():
        return []
    low = a > 0.5 * (float(np.median(a)) + threshold)
    labels = label_defects(low, high, DEFECT_MERGE_MAP_PX)
    s = OUTPUT_STRIDE
    out = []
    for k, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        region = np.where(labels[sl] == k, a[sl], -np.inf)
        peak = np.unravel_index(int(np.argmax(region)), region.shape)
        unc = float(np.asarray(maps["uncertainty"])[sl][peak])
        out.append(_MapDefect((sl[1].start * s, sl[0].start * s, sl[1].stop * s - 1,
                               sl[0].stop * s - 1), unc))
    return out


def calibrate_review(
    model: InspectionModel,
    held_out: Sequence[GoodImage],
    good_maps: Sequence[dict[str, np.ndarray]],
    threshold: float,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """The review level of a defect's uncertainty, from held-out data.

    False defects: every defect on the held-out good images, and defects off the painted
    anomalies on the same images with synthetic anomalies added; true defects: those on a
    painted anomaly. The level best separates the two (:func:`models.calibrate.review_level`).
    """
    false_u = [d.uncertainty for m in good_maps for d in _defects_of(m, threshold)]
    true_u: list[float] = []
    for g in held_out:
        image, target = add_anomalies(g.image[:1024, :1024], rng)
        for d in _defects_of(model.predict_image(image), threshold):
            x0, y0, x1, y1 = (int(round(v)) for v in d.bbox_um)
            pad = OUTPUT_STRIDE
            hit = target[max(y0 - pad, 0):y1 + pad + 1, max(x0 - pad, 0):x1 + pad + 1].any()
            (true_u if hit else false_u).append(d.uncertainty)
    level = review_level(false_u, true_u)

    def share(u: list[float]) -> float | None:
        return None if level is None else round(float(np.mean(np.asarray(u) >= level)), 3)

    return {"review_uncertainty": level, "false_defects": len(false_u),
            "true_defects": len(true_u), "false_flagged": share(false_u),
            "true_flagged": share(true_u)}


#: maximum epochs of :func:`train_model` (and ``waferscope train``); early stopping ends most
#: runs sooner. 10 stopped short on sample types far from the simulated ones: on 200 good
#: 512 px images (bench/bench_train.py, bench/demo_own_sample.py) a micro-LED array went from
#: cell AUROC 0.77 to 0.96 and brushed metal from 1 to 13 of 40 defects found (0 false on good
#: images either way), training 0.8 -> 1.6 min and 1.0 -> 1.7 min
DEFAULT_EPOCHS = 40


def train_model(
    good: Sequence[str | Path],
    out: str | Path,
    *,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = 0,
    false_alarms_per_cm2: float = 1.0,
    pixel_size_um: float | None = None,
    simulated: bool = True,
    multiscale: bool = False,
    n_simulated: int = 96,
    simulated_size: int = 256,
    steps_per_epoch: int | None = None,
    batch_size: int = 16,
    patch: int = 128,
    lr: float = 3e-3,
    patience: int = 4,
    val_fraction: float = 0.15,
    config: NetConfig | None = None,
    threads: int | None = None,
    init: str | Path | None = None,
    device: str | None = None,
    workers: int = 0,
    time_limit_s: float | None = None,
    progress: Progress | None = None,
) -> TrainReport:
    """Train an inspection model and calibrate its threshold.

    Parameters
    ----------
    good : sequence of path
        Good images: image files, folders of images, good scan folders. May be empty with
        ``simulated=True`` (simulated surfaces only: how the default model is made).
    out : path
        Output weights path (``.safetensors`` added when missing); the card goes beside it.
    epochs : int
        Maximum epochs (early stopping may end sooner).
    seed : int
        Seed of every random choice: the same inputs and seed give the same model.
    false_alarms_per_cm2 : float
        Target false-alarm rate for the threshold calibration.
    pixel_size_um : float, optional
        Pixel size of the good images (default: from a good scan folder, else 1.0);
        simulated surfaces are rendered at it.
    simulated : bool
        Add simulated good surfaces (wafers, PV cells, rough surfaces) to the training data.
    multiscale : bool
        Render each simulated kind over the range of pixel sizes it is imaged at
        (``models.data.PIXEL_RANGES_UM``) instead of at ``pixel_size_um`` only: a model for
        any scan (the default model), recorded as ``pixel_size_range_um`` in the card.
    n_simulated, simulated_size : int
        Number and side of simulated training images.
    steps_per_epoch : int, optional
        Default: enough batches to see the training pixels about once, between 40 and 60
        (10 epochs of 60 steps: 200 good 512 x 512 images train in about 10 minutes on 2
        cores).
    batch_size, patch, lr, patience, val_fraction :
        Optimisation settings.
    config : NetConfig, optional
        Architecture (default :class:`NetConfig`).
    threads : int, optional
        Torch threads (default: torch's choice).
    init : path, optional
        Start from this model's weights (fine-tuning; ``"default"`` for the shipped model)
        instead of a random initialisation. Its architecture is used and ``config`` must not
        be given. Fine-tuning usually wants a lower ``lr`` than training from scratch.
    device : str, optional
        Where to train: ``"cpu"`` (default), ``"cuda"``, ``"auto"`` (CUDA when available).
        Calibration and the saved model are on the CPU either way.
    workers : int
        Processes that make training batches (0: the training process itself). With a GPU
        the batches, not the network, limit the speed: use about the number of free cores.
    time_limit_s : float, optional
        Wall-clock budget of the training loop: after the first epoch the number of epochs is
        cut to what fits, and the learning-rate schedule is shortened to match.
    progress : callable, optional
        ``progress(stage, done, total, info)`` for progress bars; stages are
        ``"data"``, ``"train"``, ``"calibrate"``.

    Returns
    -------
    TrainReport

    Raises
    ------
    UserError
        No usable good image (and no simulated data), unreadable inputs.
    """
    t_start = time.perf_counter()
    notify = progress or (lambda *a: None)
    if threads:
        torch.set_num_threads(int(threads))
    dev = resolve_device(device)
    if workers < 0:
        raise UserError(f"--workers: must be >= 0, got {workers}")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    good = [Path(p) for p in good]
    if pixel_size_um is None:
        pixel_size_um = scan_pixel_size_um(good) or 1.0
    if pixel_size_um <= 0:
        raise UserError(f"--pixel-size-um: must be > 0, got {pixel_size_um}")
    if false_alarms_per_cm2 <= 0:
        raise UserError(f"--false-alarms-per-cm2: must be > 0, got {false_alarms_per_cm2}")

    start = None  # checked before the data are prepared: a bad --init fails at once
    if init is not None:
        if config is not None:
            raise ValueError("give either init or config: a fine-tuned model keeps its start's")
        start = load_network(None if str(init) == "default" else init)[0]
    notify("data", 0, 3, {})
    user = load_good_images(good) if good else []
    if not user and not simulated:
        raise UserError("--good: no good images given and --no-simulated: nothing to train on")
    user_train, user_val = _split(user, val_fraction, rng)
    notify("data", 1, 3, {"user_images": len(user)})
    sim_train: list[GoodImage] = []
    sim_val: list[GoodImage] = []
    if simulated:
        ranges = PIXEL_RANGES_UM if multiscale else None
        sim_train = simulated_good_images(n_simulated, simulated_size, pixel_size_um, seed,
                                          pixel_ranges_um=ranges)
        n_val_sim = max(6, n_simulated // 8)
        sim_val = simulated_good_images(n_val_sim, max(simulated_size, 512), pixel_size_um,
                                        seed + 1_000_003, pixel_ranges_um=ranges)
    notify("data", 2, 3, {"simulated_images": len(sim_train) + len(sim_val)})

    # training pool: user images weigh as much as all simulated ones together when both exist
    train_pool = user_train + sim_train
    if user_train and sim_train:
        reps = max(1, len(sim_train) // max(len(user_train), 1))
        train_pool = user_train * reps + sim_train
    val_pool = user_val + sim_val or train_pool
    vrng = np.random.default_rng(seed + 7)
    val_batches = [make_batch(val_pool, batch_size, patch, vrng) for _ in range(16)]
    notify("data", 3, 3, {})

    if start is not None:
        net, config = start, start.config
    else:
        config = config or NetConfig()
        net = InspectionNet(config)
    net.to(dev).train()
    if steps_per_epoch is None:
        pixels = sum(g.image.size for g in user_train + sim_train)
        steps_per_epoch = int(np.clip(pixels / (batch_size * patch * patch), 40, 60))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    plan = {"total": epochs * steps_per_epoch}  # shortened by a time limit after epoch 1
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: warmup_cosine(i, plan["total"]))
    wrng = np.random.default_rng([seed, 1])  # bootstrap weights of the heads
    t_loop = time.perf_counter()
    best, bad_epochs = math.inf, 0
    states: list[dict[str, torch.Tensor]] = []  # per epoch (a small net: a few MB each)
    history: list[dict] = []
    k = config.heads
    step = 0
    hard: list[CropRef] = []
    epoch = 0
    while epoch < epochs:
        epoch += 1
        running = 0.0
        batches = EpochBatches(train_pool, steps_per_epoch, batch_size, patch, seed, epoch, hard)
        for arrays in epoch_loader(batches, workers):
            batch = {key: torch.from_numpy(v).to(dev) for key, v in arrays.items()}
            # bootstrap: each head sees the batch with its own Poisson(1) sample weights
            w = torch.from_numpy(wrng.poisson(1.0, (batch_size, k)).astype(np.float32)).to(dev)
            out_ = net(batch["x"])
            loss = losses(out_, batch, w)
            opt.zero_grad(set_to_none=True)
            loss["total"].backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
            opt.step()
            sched.step()
            step += 1
            running += float(loss["total"].detach())
            notify("train", step, plan["total"], {"epoch": epoch, "loss": running /
                                                  max(1, (step - 1) % steps_per_epoch + 1)})
        hard = mine_hard_crops(net, train_pool, patch, rng)
        metrics = evaluate(net, val_batches)
        metrics.update(epoch=epoch, train_loss=running / steps_per_epoch)
        history.append(metrics)
        notify("epoch", epoch, epochs, metrics)
        states.append({key: v.detach().cpu().clone() for key, v in net.state_dict().items()})
        if time_limit_s is not None and epoch == 1:
            fit = int(time_limit_s / max(time.perf_counter() - t_loop, 1e-6))
            epochs = max(1, min(epochs, fit))
            plan["total"] = epochs * steps_per_epoch
        merit = selection_merit(metrics)
        if merit < best - 1e-4:
            best, bad_epochs = merit, 0
        else:
            bad_epochs += 1
            if bad_epochs >= patience:
                break
    best_epoch = select_epoch(history)
    net.cpu()
    if best_epoch:
        net.load_state_dict(states[best_epoch - 1])
    net.eval()
    train_seconds = time.perf_counter() - t_start

    # ------------------------------------------------------------------ calibration
    # simulated windows over the sample's edge (wafer rim and chuck, cell border) calibrate
    # only the context thresholds, masked to the usable area as inspection masks a scan
    # (calibrate_card)
    held_out = list(user_val) if user_val else list(sim_val)
    if not user_val and simulated:
        # larger windows of every kind, so that each kind's calibration has area to count on
        held_out += simulated_calibration_images(max(3, n_simulated // 16), pixel_size_um,
                                                 seed, ranges)
    if not held_out:  # a single user image and no simulation: calibrate on it (documented)
        held_out = user_train
    if multiscale and simulated and not user:
        lo = min(r[0] for r in PIXEL_RANGES_UM.values())
        hi = max(r[1] for r in PIXEL_RANGES_UM.values())
    else:
        lo = hi = float(pixel_size_um)
    card: dict[str, Any] = {
        "pixel_size_um": float(pixel_size_um),
        "pixel_size_range_um": [lo, hi],
        "normalization": {
            "method": "relative",
            "formula": "(x / level - 1) * gain, level = median of the image or mosaic",
            "gain": GAIN,
            "colour": "converted to luminance (Rec. 709) by normalize",
        },
        "seed": int(seed),
        "threshold": 0.5,
    }
    inspector = InspectionModel(copy.deepcopy(net), card)
    card.update(calibrate_card(inspector, held_out, pixel_size_um, false_alarms_per_cm2,
                               "user" if user_val else "simulated", seed, notify))
    final = history[best_epoch - 1] if best_epoch else (history[-1] if history else {})
    card.update(
        training={
            "user_images": len(user),
            "user_sources": sorted({g.source.split("/")[0] for g in user})[:20],
            "user_train_images": len(user_train),
            "user_val_images": len(user_val),
            "simulated_images": len(sim_train) + len(sim_val) if simulated else 0,
            "simulated_kinds": ["wafer", "pv_cell", "rough"] if simulated else [],
            "epochs_max": epochs,
            "device": dev.type,
            "workers": workers,
            "epochs_run": len(history),
            "best_epoch": best_epoch,
            "steps_per_epoch": steps_per_epoch,
            "batch_size": batch_size,
            "patch_px": patch,
            "lr": lr,
            "init": None if init is None else _init_record(init),
            "train_time_s": round(train_seconds, 1),
            "macs_per_pixel": round(macs_per_pixel(config)),
        },
        metrics={k2: (round(v, 5) if isinstance(v, float) else v) for k2, v in final.items()},
        history=[{k2: (round(v, 5) if isinstance(v, float) else v) for k2, v in h.items()}
                 for h in history],
        uncertainty={
            "method": "multi-head ensemble",
            "anomaly": "entropy (bits) of the heads' mean anomaly probability",
            "review": card.pop("review"),
            "roughness": "predicted standard deviation (nm), heteroscedastic Gaussian head",
        },
        roughness_units="nm (areal Sa)",
    )
    weights = save_model(net, card, out)
    saved = load_model(weights).card
    return TrainReport(
        weights=weights,
        card_path=card_path_for(weights),
        card=saved,
        epochs_run=len(history),
        best_epoch=best_epoch,
        train_time_s=time.perf_counter() - t_start,
        history=history,
    )
