# Two entry points for a fresh machine: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; pinned so set-up never pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup test demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev,plots]"
	touch $(STAMP)

test: setup
	$(PY) -m pytest -n 2 -q

demo: setup
	$(PY) sample_models/demo.py

bench: setup
	$(PY) benchmarks/bench_layer.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
