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
   for (:mod:`models.thresholds`), and the model is saved (safetensors + JSON card).

The batches are made in :mod:`models.train_batches`, the losses and validation metrics are in
:mod:`models.train_losses`, the card is calibrated in :mod:`models.train_calibration`.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import (
    PIXEL_RANGES_UM,
    GoodImage,
    load_good_images,
    scan_pixel_size_um,
    simulated_good_images,
)
from .errors import InputError as UserError
from .modelfile import GAIN, InspectionModel, card_path_for, load_model, load_network, save_model
from .network import InspectionNet, NetConfig, macs_per_pixel

# the batches, the losses and the card's calibration live in their own modules; their names stay
# importable from here (train_default, tests and benchmarks import them from models.train)
from .train_batches import (  # noqa: F401
    CropRef,
    EpochBatches,
    epoch_loader,
    make_batch,
    mine_hard_crops,
)
from .train_calibration import (  # noqa: F401
    CONTEXT_REFINES,
    MIN_BAND_AREA_CM2,
    PIXEL_BANDS,
    SAMPLE_KIND,
    Progress,
    _context_entries,
    _defects_of,
    calibrate_by_kind,
    calibrate_card,
    calibrate_contexts,
    calibrate_on,
    calibrate_pixel_bands,
    calibrate_review,
    held_out_area_cm2,
    held_out_maps,
    inspected_anomaly,
    recalibrate,
    simulated_calibration_images,
)
from .train_losses import (  # noqa: F401
    POS_WEIGHT,
    ROUGHNESS_WEIGHT,
    SA_UNIT_NM,
    auroc,
    evaluate,
    losses,
)


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


#: maximum epochs of :func:`train_model` (and ``waferscope train``); early stopping ends most
#: runs sooner. 10 stopped short on sample types far from the simulated ones: on 200 good
#: 512 px images (bench/bench_train.py, bench/demo_own_sample.py) a micro-LED array went from
#: cell AUROC 0.77 to 0.96 and brushed metal from 1 to 13 of 40 defects found (0 false on good
#: images either way), training 0.8 -> 1.6 min and 1.0 -> 1.7 min
DEFAULT_EPOCHS = 40


def train_model(
    good: Sequence[str | Path], out: str | Path, *, epochs: int = DEFAULT_EPOCHS,
    seed: int = 0, false_alarms_per_cm2: float = 1.0, pixel_size_um: float | None = None,
    simulated: bool = True, multiscale: bool = False, n_simulated: int = 96,
    simulated_size: int = 256, steps_per_epoch: int | None = None, batch_size: int = 16,
    patch: int = 128, lr: float = 3e-3, patience: int = 4, val_fraction: float = 0.15,
    config: NetConfig | None = None, threads: int | None = None,
    init: str | Path | None = None, device: str | None = None, workers: int = 0,
    time_limit_s: float | None = None, progress: Progress | None = None,
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
        Optimisation opts.
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
    return _train(good, out, _Options(
        epochs, seed, false_alarms_per_cm2, pixel_size_um, simulated, multiscale, n_simulated,
        simulated_size, steps_per_epoch, batch_size, patch, lr, patience, val_fraction, config,
        threads, init, device, workers, time_limit_s, progress))


@dataclass
class _Options:
    """The keyword arguments of :func:`train_model`, as its steps read them."""

    epochs: int
    seed: int
    false_alarms_per_cm2: float
    pixel_size_um: float | None
    simulated: bool
    multiscale: bool
    n_simulated: int
    simulated_size: int
    steps_per_epoch: int | None
    batch_size: int
    patch: int
    lr: float
    patience: int
    val_fraction: float
    config: NetConfig | None
    threads: int | None
    init: str | Path | None
    device: str | None
    workers: int
    time_limit_s: float | None
    progress: Progress | None


def _train(good: Sequence[str | Path], out: str | Path, opts: _Options) -> TrainReport:
    """:func:`train_model`: prepare the data, train, keep the best epoch, calibrate, save."""
    t_start = time.perf_counter()
    notify = opts.progress or (lambda *a: None)
    if opts.threads:
        torch.set_num_threads(int(opts.threads))
    dev = resolve_device(opts.device)
    if opts.workers < 0:
        raise UserError(f"--workers: must be >= 0, got {opts.workers}")
    torch.manual_seed(opts.seed)
    rng = np.random.default_rng(opts.seed)
    good = [Path(p) for p in good]
    pixel_size_um = _checked_pixel_size(good, opts.pixel_size_um, opts.false_alarms_per_cm2)
    start = _start_network(opts.init, opts.config)  # before the data: a bad --init fails at once
    data = _training_data(good, opts, pixel_size_um, rng, notify)
    train_pool, val_batches = _pools(data, opts.batch_size, opts.patch, opts.seed)
    notify("data", 3, 3, {})

    if start is not None:
        net, config = start, start.config
    else:
        config = opts.config or NetConfig()
        net = InspectionNet(config)
    net.to(dev).train()
    steps_per_epoch = opts.steps_per_epoch
    if steps_per_epoch is None:
        pixels = sum(g.image.size for g in data.user_train + data.sim_train)
        steps_per_epoch = int(np.clip(pixels / (opts.batch_size * opts.patch * opts.patch),
                                      40, 60))
    history, states, epochs = _train_epochs(net, train_pool, val_batches, opts,
                                            steps_per_epoch, rng, dev, notify)
    best_epoch = select_epoch(history)
    net.cpu()
    if best_epoch:
        net.load_state_dict(states[best_epoch - 1])
    net.eval()
    train_seconds = time.perf_counter() - t_start

    card = _calibrated_card(net, data, opts, pixel_size_um, notify)
    training = {
        "user_images": len(data.user),
        "user_sources": sorted({g.source.split("/")[0] for g in data.user})[:20],
        "user_train_images": len(data.user_train),
        "user_val_images": len(data.user_val),
        "simulated_images": len(data.sim_train) + len(data.sim_val) if opts.simulated else 0,
        "simulated_kinds": ["wafer", "pv_cell", "rough"] if opts.simulated else [],
        "epochs_max": epochs,
        "device": dev.type,
        "workers": opts.workers,
        "epochs_run": len(history),
        "best_epoch": best_epoch,
        "steps_per_epoch": steps_per_epoch,
        "batch_size": opts.batch_size,
        "patch_px": opts.patch,
        "lr": opts.lr,
        "init": None if opts.init is None else _init_record(opts.init),
        "train_time_s": round(train_seconds, 1),
        "macs_per_pixel": round(macs_per_pixel(config)),
    }
    _record_training(card, training, history, best_epoch)
    weights = save_model(net, card, out)
    saved = load_model(weights).card
    return TrainReport(weights=weights, card_path=card_path_for(weights), card=saved,
                       epochs_run=len(history), best_epoch=best_epoch,
                       train_time_s=time.perf_counter() - t_start, history=history)


def _checked_pixel_size(good: list[Path], pixel_size_um: float | None,
                        false_alarms_per_cm2: float) -> float:
    """The good images' pixel size (given, else a good scan folder's, else 1.0), with the
    pixel size and the false-alarm rate checked."""
    if pixel_size_um is None:
        pixel_size_um = scan_pixel_size_um(good) or 1.0
    if pixel_size_um <= 0:
        raise UserError(f"--pixel-size-um: must be > 0, got {pixel_size_um}")
    if false_alarms_per_cm2 <= 0:
        raise UserError(f"--false-alarms-per-cm2: must be > 0, got {false_alarms_per_cm2}")
    return pixel_size_um


def _start_network(init: str | Path | None, config: NetConfig | None) -> InspectionNet | None:
    """The network a fine-tuning starts from (``init``), or None to train from scratch."""
    if init is None:
        return None
    if config is not None:
        raise ValueError("give either init or config: a fine-tuned model keeps its start's")
    return load_network(None if str(init) == "default" else init)[0]


@dataclass
class _TrainingData:
    """The good images of a training run, split by image into training and validation."""

    user: list[GoodImage]
    user_train: list[GoodImage]
    user_val: list[GoodImage]
    sim_train: list[GoodImage]
    sim_val: list[GoodImage]
    #: pixel-size range of each simulated kind (multiscale), None: at the one pixel size
    ranges: dict[str, tuple[float, float]] | None


def _training_data(good: list[Path], opts: _Options, pixel_size_um: float,
                   rng: np.random.Generator, notify: Progress) -> _TrainingData:
    """The user's good images and the simulated ones, each split into training and
    validation (``notify`` stage ``"data"``, steps 0 to 2 of 3)."""
    notify("data", 0, 3, {})
    user = load_good_images(good) if good else []
    if not user and not opts.simulated:
        raise UserError("--good: no good images given and --no-simulated: nothing to train on")
    user_train, user_val = _split(user, opts.val_fraction, rng)
    notify("data", 1, 3, {"user_images": len(user)})
    sim_train: list[GoodImage] = []
    sim_val: list[GoodImage] = []
    ranges = PIXEL_RANGES_UM if opts.multiscale else None
    if opts.simulated:
        sim_train = simulated_good_images(opts.n_simulated, opts.simulated_size, pixel_size_um,
                                          opts.seed, pixel_ranges_um=ranges)
        n_val_sim = max(6, opts.n_simulated // 8)
        sim_val = simulated_good_images(n_val_sim, max(opts.simulated_size, 512), pixel_size_um,
                                        opts.seed + 1_000_003, pixel_ranges_um=ranges)
    notify("data", 2, 3, {"simulated_images": len(sim_train) + len(sim_val)})
    return _TrainingData(user, user_train, user_val, sim_train, sim_val, ranges)


def _pools(data: _TrainingData, batch_size: int, patch: int, seed: int
           ) -> tuple[list[GoodImage], list[dict[str, torch.Tensor]]]:
    """The training pool and the fixed validation batches.

    User images weigh as much as all simulated ones together when both exist.
    """
    train_pool = data.user_train + data.sim_train
    if data.user_train and data.sim_train:
        reps = max(1, len(data.sim_train) // max(len(data.user_train), 1))
        train_pool = data.user_train * reps + data.sim_train
    val_pool = data.user_val + data.sim_val or train_pool
    vrng = np.random.default_rng(seed + 7)
    return train_pool, [make_batch(val_pool, batch_size, patch, vrng) for _ in range(16)]


def _train_epochs(net: InspectionNet, train_pool: list[GoodImage],
                  val_batches: list[dict[str, torch.Tensor]], opts: _Options,
                  steps_per_epoch: int, rng: np.random.Generator, dev: torch.device,
                  notify: Progress) -> tuple[list[dict], list[dict[str, torch.Tensor]], int]:
    """Train ``net`` epoch by epoch until early stopping: each epoch's metrics, each epoch's
    weights (on the CPU) and the maximum number of epochs (cut by a time limit)."""
    epochs = opts.epochs
    batch_size, patch = opts.batch_size, opts.patch
    opt = torch.optim.AdamW(net.parameters(), lr=opts.lr, weight_decay=1e-4)
    plan = {"total": epochs * steps_per_epoch}  # shortened by a time limit after epoch 1
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: warmup_cosine(i, plan["total"]))
    wrng = np.random.default_rng([opts.seed, 1])  # bootstrap weights of the heads
    t_loop = time.perf_counter()
    best, bad_epochs = math.inf, 0
    states: list[dict[str, torch.Tensor]] = []  # per epoch (a small net: a few MB each)
    history: list[dict] = []
    k = net.config.heads
    step = 0
    hard: list[CropRef] = []
    epoch = 0
    while epoch < epochs:
        epoch += 1
        running = 0.0
        batches = EpochBatches(train_pool, steps_per_epoch, batch_size, patch, opts.seed,
                               epoch, hard)
        for arrays in epoch_loader(batches, opts.workers):
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
        if opts.time_limit_s is not None and epoch == 1:
            fit = int(opts.time_limit_s / max(time.perf_counter() - t_loop, 1e-6))
            epochs = max(1, min(epochs, fit))
            plan["total"] = epochs * steps_per_epoch
        merit = selection_merit(metrics)
        if merit < best - 1e-4:
            best, bad_epochs = merit, 0
        else:
            bad_epochs += 1
            if bad_epochs >= opts.patience:
                break
    return history, states, epochs


def _calibrated_card(net: InspectionNet, data: _TrainingData, opts: _Options,
                     pixel_size_um: float, notify: Progress) -> dict[str, Any]:
    """The card of a trained network: pixel sizes, normalisation, seed and the calibration
    (:func:`models.train_calibration.calibrate_card`) on held-out good images.

    Simulated windows over the sample's edge (wafer rim and chuck, cell border) calibrate
    only the context thresholds, masked to the usable area as inspection masks a scan.
    """
    held_out = list(data.user_val) if data.user_val else list(data.sim_val)
    if not data.user_val and opts.simulated:
        # larger windows of every kind, so that each kind's calibration has area to count on
        held_out += simulated_calibration_images(max(3, opts.n_simulated // 16),
                                                 pixel_size_um, opts.seed, data.ranges)
    if not held_out:  # a single user image and no simulation: calibrate on it (documented)
        held_out = data.user_train
    if opts.multiscale and opts.simulated and not data.user:
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
        "seed": int(opts.seed),
        "threshold": 0.5,
    }
    inspector = InspectionModel(copy.deepcopy(net), card)
    card.update(calibrate_card(inspector, held_out, pixel_size_um, opts.false_alarms_per_cm2,
                               "user" if data.user_val else "simulated", opts.seed, notify))
    return card


def _record_training(card: dict[str, Any], training: dict[str, Any], history: list[dict],
                     best_epoch: int) -> None:
    """Add the training record, the kept epoch's metrics, the history and the uncertainty
    section (with the review calibration ``calibrate_card`` left under ``review``) to
    ``card``."""
    final = history[best_epoch - 1] if best_epoch else (history[-1] if history else {})
    card.update(
        training=training,
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
