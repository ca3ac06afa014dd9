"""Train the shipped network: ``python -m models.train_default`` (``models/network.*``).

Simulated good wafers, PV cells and rough surfaces only (no user data, nothing downloaded),
each kind rendered over the pixel sizes it is imaged at, fixed seeds: the same command gives the
same weights on the same software versions. Writes ``models/network.safetensors`` and
``models/network.json``: the roughness network the shipped detector (``models.build_default``)
carries beside its bank; until 2026-12-03 this network was the default inspection model.

Two stages, because early stopping on one long one-cycle schedule cannot be resumed:

1. from scratch on one set of simulated images (``STAGE1``);
2. fine-tuned from stage 1 at a lower learning rate on a *new* set of simulated images
   (``STAGE2``: another seed), which adds data diversity as well as steps.

``--init MODEL`` skips stage 1 and fine-tunes ``MODEL`` (a stage-1 model made earlier).

``--calibrate-contexts N`` trains nothing: it adds the thresholds for the neighbourhood
contexts (quiet, plain, plain near structure: ``models.thresholds.context_masks``) to the card
of ``--out``, calibrated on N new simulated images of each kind (seed ``CONTEXT_SEED``);
models trained now get them from training. ``--calibrate N`` calibrates every threshold of
the card and its review level again alike.

``--plan gpu`` is one longer stage from scratch for a CUDA GPU (``GPU``: larger batches, more
simulated images), with batches made by ``--workers`` processes and the epochs cut to fit
``--time-limit`` seconds of training (the card records the epochs run; ``--epochs`` repeats
them exactly).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .modelfile import network_model_path
from .train import train_model

#: stage 1 (from scratch) of the shipped model (recorded in its card)
STAGE1 = {"epochs": 60, "steps_per_epoch": 200, "n_simulated": 384, "simulated_size": 320,
          "patch": 192, "seed": 0, "patience": 15, "lr": 3e-3}
#: stage 2 (fine-tuning of stage 1 on new simulated images)
STAGE2 = {"epochs": 80, "steps_per_epoch": 200, "n_simulated": 512, "simulated_size": 320,
          "patch": 192, "seed": 1, "patience": 20, "lr": 1e-3}

#: one stage from scratch on a GPU (``--plan gpu``)
GPU = {"epochs": 200, "steps_per_epoch": 400, "batch_size": 32, "n_simulated": 768,
       "simulated_size": 320, "patch": 192, "seed": 0, "patience": 30, "lr": 4e-3}

#: peak learning rate of a second GPU stage (``--plan gpu --init MODEL``)
GPU_FINETUNE_LR = 1.5e-3

#: seed of the simulated images of ``--calibrate-contexts`` (never used in training)
CONTEXT_SEED = 778


def _progress(t0: float):
    def progress(stage: str, done: int, total: int, info: dict) -> None:
        if stage == "epoch":
            print(f"epoch {done}/{total}: " + ", ".join(
                f"{k} {v:.4f}" for k, v in info.items() if isinstance(v, float)) +
                f" ({time.perf_counter() - t0:.0f} s)", flush=True)
        elif stage in ("data", "calibrate") and done == total:
            print(f"{stage} done ({time.perf_counter() - t0:.0f} s)", flush=True)

    return progress


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=network_model_path())
    parser.add_argument("--init", type=Path, default=None,
                        help="fine-tune this model (cpu plan: skip stage 1; gpu plan: a "
                             "second stage on new images)")
    parser.add_argument("--stage2-epochs", type=int, default=STAGE2["epochs"])
    parser.add_argument("--plan", choices=["cpu", "gpu"], default="cpu",
                        help="cpu: two stages (STAGE1, STAGE2); gpu: one long stage (GPU)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--workers", type=int, default=0, help="batch-making processes")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="seconds of training (gpu plan): epochs are cut to fit")
    parser.add_argument("--epochs", type=int, default=None, help="epochs (gpu plan)")
    parser.add_argument("--widths", type=int, nargs=3, default=None,
                        help="network widths at 1/4, 1/8, 1/16 (gpu plan; default NetConfig)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the simulated images (gpu plan; default 0, 1 with --init)")
    parser.add_argument("--calibrate-contexts", type=int, default=None, metavar="N",
                        help="only add the neighbourhood context thresholds (quiet, plain, "
                             "plain near structure) to the card of --out, from N simulated "
                             "images of each kind")
    parser.add_argument("--calibrate", type=int, default=None, metavar="N",
                        help="only calibrate the card of --out again (every threshold and the "
                             "review level) on N new simulated images of each kind")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    if args.calibrate_contexts or args.calibrate:
        from .train import recalibrate

        written = recalibrate(args.out, args.calibrate or args.calibrate_contexts, CONTEXT_SEED,
                              contexts_only=not args.calibrate)
        shown = {k: v for k, v in written.items() if k.startswith("threshold")}
        print(f"thresholds {shown} written to the card of {args.out} "
              f"({(time.perf_counter() - t0) / 60:.1f} min)")
        return
    run = {"device": args.device, "workers": args.workers, "threads": args.threads}
    if args.plan == "gpu":
        from .network import NetConfig

        plan = {**GPU, "epochs": args.epochs or GPU["epochs"]}
        if args.init:  # a second stage: new simulated images, a lower learning rate
            plan.update(seed=1, lr=GPU_FINETUNE_LR)
        if args.seed is not None:
            plan["seed"] = args.seed
        config = NetConfig(widths=tuple(args.widths)) if args.widths else None
        report = train_model([], args.out, simulated=True, multiscale=True, config=config,
                             init=args.init, time_limit_s=args.time_limit,
                             progress=_progress(t0), **plan, **run)
        _summary(report, t0)
        return
    init = args.init
    if init is None:
        init = args.out.with_name(args.out.stem + "-stage1.safetensors")
        print(f"stage 1: from scratch -> {init}", flush=True)
        train_model([], init, simulated=True, multiscale=True, progress=_progress(t0), **STAGE1,
                    **run)
    print(f"stage 2: fine-tuning {init} -> {args.out}", flush=True)
    report = train_model(
        [], args.out, simulated=True, multiscale=True, init=init, progress=_progress(t0),
        **{**STAGE2, "epochs": args.stage2_epochs}, **run,
    )
    _summary(report, t0)


def _summary(report, t0: float) -> None:
    cal = report.card["calibration"]
    print(f"wrote {report.weights} ({report.weights.stat().st_size / 1e6:.2f} MB), threshold "
          f"{report.card['threshold']:.4f} ({cal['components_at_threshold']} false components "
          f"on {cal['area_cm2']:.2f} cm² held out), {(time.perf_counter() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
