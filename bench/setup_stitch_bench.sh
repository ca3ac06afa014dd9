#!/usr/bin/env bash
# Benchmark-only environment with ASHLAR and m2stitch (NOT dependencies of waferscope).
# Creates bench/.venv-stitch (gitignored) with waferscope itself plus the two reference stitchers.
# torch is pinned by constraints.txt in case anything pulls it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=bench/.venv-stitch
PYTHON=${PYTHON:-python3.11}
test -d "$VENV" || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet torch==2.13.0
"$VENV/bin/python" -m pip install --quiet -c constraints.txt -e .
"$VENV/bin/python" -m pip install --quiet -c constraints.txt m2stitch
# ASHLAR needs pyjnius (a JDK to build) for Bio-Formats readers; its stitching core is pure Python.
"$VENV/bin/python" -m pip install --quiet -c constraints.txt ashlar
"$VENV/bin/python" -c "import m2stitch, ashlar; print('m2stitch', m2stitch.__version__ if hasattr(m2stitch,'__version__') else '?', 'ashlar ok')"
