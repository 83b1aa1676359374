# Two entry points for a fresh machine: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; pinned so set-up never pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup lint test test-fast demo bench zoo clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev,plots]"
	touch $(STAMP)

# Formatting and lint first (ruff, pinned in the dev extra), then every test.
lint: setup
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest -n 2 -q

# Under a minute: everything but the tests marked slow (real processes, training, compiling).
test-fast: setup
	$(PY) -m pytest -n 2 -q -m "not slow"

DEMO := build/demo
ONORM := $(VENV)/bin/onorm

# The main job on a shipped model: convert a trained BatchNorm ResNet to OnlineNorm, then
# fold + strip the clamp + export ONNX, verified against PyTorch on the real held-out digits;
# last, a summary: the files written and each model's accuracy on those digits.
demo: setup
	$(PY) sample_models/test_inputs.py digits_resnet $(DEMO)/digits_test.npy
	$(ONORM) convert sample_models/digits_resnet.pt --arch sample_models.models:digits_resnet \
		--input-shape 1,1,8,8 --inputs $(DEMO)/digits_test.npy -o $(DEMO)/digits_resnet_onorm.pt --force
	$(ONORM) export $(DEMO)/digits_resnet_onorm.pt --strip-clamp --inputs $(DEMO)/digits_test.npy \
		-o $(DEMO)/digits_resnet.onnx --force
	$(PY) sample_models/demo_summary.py $(DEMO)

# Every benchmark; each prints its figures beside a baseline measured in the same process.
bench: setup
	$(PY) benchmarks/bench_layer.py --json benchmarks/results/bench_layer.json
	$(PY) benchmarks/bench_train_step.py
	$(PY) benchmarks/bench_export.py
	$(PY) benchmarks/train_digits.py

# Optional, not part of `make test`: real torchvision/timm models through convert -> fold -> export
# (benchmarks/zoo.py; issue 12's targets). Their wheels do not install beside the CPU torch above,
# so they get a venv of their own (about 5.5 GB; on this project's machines the wheels lie on disk).
ZOO_VENV ?= .venv-zoo
ZOO_STAMP := $(ZOO_VENV)/.installed

$(ZOO_STAMP):
	$(PYTHON) -m venv $(ZOO_VENV)
	$(ZOO_VENV)/bin/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(ZOO_VENV)/bin/pip install --quiet timm onnx onnxruntime onnxscript typer numpy
	$(ZOO_VENV)/bin/pip install --quiet --no-deps -e .
	touch $(ZOO_STAMP)

zoo: $(ZOO_STAMP)
	$(ZOO_VENV)/bin/python benchmarks/zoo.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
