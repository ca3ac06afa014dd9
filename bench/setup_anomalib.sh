#!/usr/bin/env bash
# A separate, git-ignored virtual environment with anomalib, for the side-by-side comparison in
# bench/bench_anomalib.py only: the product never imports anomalib.
#
# torchvision from PyPI does not import beside the project's torch 2.13.0 CPU build, so this
# environment pins the pair that does: torch 2.14.1 + torchvision 0.29.1 (constraints written
# below, so that anomalib's dependencies cannot pull another torch).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3.11}
VENV=.venv-anomalib
test -d "$VENV" || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
printf 'torch==2.14.1\ntorchvision==0.29.1\n' > "$VENV/constraints.txt"
"$VENV/bin/python" -m pip install --quiet torch==2.14.1 torchvision==0.29.1
"$VENV/bin/python" -m pip install --quiet -c "$VENV/constraints.txt" "anomalib==2.7.0" \
    tifffile scikit-learn
"$VENV/bin/python" -c "import anomalib, torch, torchvision; print('anomalib', anomalib.__version__, 'torch', torch.__version__)"
