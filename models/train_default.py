"""Train the shipped default model: ``python -m models.train_default`` (or ``make model``).

Simulated good wafers, PV cells and rough surfaces only (no user data, nothing downloaded),
each kind rendered over the pixel sizes it is imaged at, fixed seed: the same command gives the
same weights on the same software versions. Writes ``models/default.safetensors`` and
``models/default.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .inspection import default_model_path
from .train import train_model

#: settings of the shipped model (recorded in its card)
DEFAULTS = {"epochs": 60, "steps_per_epoch": 200, "n_simulated": 384, "simulated_size": 320,
            "patch": 192, "seed": 0, "patience": 15}


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=default_model_path())
    parser.add_argument("--epochs", type=int, default=DEFAULTS["epochs"])
    parser.add_argument("--steps-per-epoch", type=int, default=DEFAULTS["steps_per_epoch"])
    parser.add_argument("--n-simulated", type=int, default=DEFAULTS["n_simulated"])
    parser.add_argument("--simulated-size", type=int, default=DEFAULTS["simulated_size"])
    parser.add_argument("--patch", type=int, default=DEFAULTS["patch"])
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    parser.add_argument("--patience", type=int, default=DEFAULTS["patience"])
    args = parser.parse_args(argv)
    t0 = time.perf_counter()

    def progress(stage: str, done: int, total: int, info: dict) -> None:
        if stage == "epoch":
            print(f"epoch {done}/{total}: " + ", ".join(
                f"{k} {v:.4f}" for k, v in info.items() if isinstance(v, float)) +
                f" ({time.perf_counter() - t0:.0f} s)", flush=True)
        elif stage in ("data", "calibrate") and done == total:
            print(f"{stage} done ({time.perf_counter() - t0:.0f} s)", flush=True)

    report = train_model(
        [], args.out, epochs=args.epochs, steps_per_epoch=args.steps_per_epoch,
        n_simulated=args.n_simulated, simulated_size=args.simulated_size, patch=args.patch,
        seed=args.seed, simulated=True, multiscale=True,
        patience=args.patience,
        progress=progress,
    )
    cal = report.card["calibration"]
    print(f"wrote {report.weights} ({report.weights.stat().st_size / 1e6:.2f} MB), threshold "
          f"{report.card['threshold']:.4f} ({cal['components_at_threshold']} false components "
          f"on {cal['area_cm2']:.2f} cm² held out), {report.train_time_s / 60:.1f} min")


if __name__ == "__main__":
    main()
