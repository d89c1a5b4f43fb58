# Every target is self-contained: it creates .venv and installs clipkit into it when needed.
# TORCH_SPEC picks the torch build; on a GPU cluster use the wheel that matches your CUDA, e.g.
#   make install TORCH_SPEC="torch torchvision --index-url https://download.pytorch.org/whl/cu128"
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline

.PHONY: install demo test test-all reliability-long lint format clean gpu-wheels gpu-suite

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# Train the tiny model on the embedded demo data (CPU, offline, a few minutes) and print zero-shot accuracy.
demo: install
	$(VENV)/bin/clipkit train

# The suites run on TEST_WORKERS pytest-xdist workers, a test file per worker at a time (its module fixtures,
# trained runs shared by its tests, are built once). A single-process run idles half of 2 cores (a run's main
# process computes on one); two workers keep both busy. Clean clones on the 2-core CI machine: pytest 875 s on 2
# workers, 906 s on 3; 593 s on 2 since the loader workers' fork server is forked in the tests (benchmarks/RESULTS.md).
# TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

# Lint + the default test suite (unit, distributed on gloo, CLI integration) and the fault-injection suite in its
# fast mode (prints the reliability table), in one pytest session (a fork server and the demo data per worker);
# slow tests are opt-in.
test: install lint
	$(VENV)/bin/python -m pytest -q -m "not slow and not gpu" $(XDIST) --durations=15

# The fault-injection suite with its full trial counts (10 kill -9 trials, every bad config as a process, ...).
reliability-long: install
	CLIPKIT_RELIABILITY=long $(VENV)/bin/python -m pytest -q -m reliability tests/reliability

test-all: install lint
	$(VENV)/bin/python -m pytest -q $(XDIST)

lint: install
	$(VENV)/bin/ruff check clipkit tests benchmarks
	$(VENV)/bin/ruff format --check clipkit tests benchmarks

format: install
	$(VENV)/bin/ruff format clipkit tests benchmarks
	$(VENV)/bin/ruff check --fix clipkit tests benchmarks

clean:
	rm -rf $(VENV) runs build *.egg-info

# What the GPU machine lacks (open_clip, webdataset, Hydra, DeepSpeed, ...) as cp312 wheels in .gpu-wheels/, checked
# to install there; then, on the GPU machine, `bash benchmarks/gpu_suite.sh`. See benchmarks/README.md.
gpu-wheels: install
	$(PY) benchmarks/gpu_wheels.py --out .gpu-wheels $(GPU_WHEELS_ARGS)

gpu-suite:
	bash benchmarks/gpu_suite.sh
