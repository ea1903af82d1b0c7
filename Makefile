# Two commands for a fresh clone: `make train` and `make test`. Both create .venv and install LAM first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# Corpora are read from LAM_DATA_DIR (downloaded there when missing). A ../shared/data folder beside the
# checkout (the layout of our CI machines) is used when present.
LAM_DATA_DIR ?= $(abspath $(firstword $(wildcard ../shared/data)))
ifneq ($(LAM_DATA_DIR),)
export LAM_DATA_DIR
endif

.PHONY: setup train test test-fast bench bench-attention clean

setup: $(VENV)/.installed

# The CPU build of PyTorch goes in first where no torch and no GPU are found; otherwise pip resolves torch
# to a multi-GB CUDA build. It comes from PyTorch's CPU index, or from a local wheel where pip has one
# (an unreachable index costs a few seconds of retries).
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	if ! $(PY) -c "import torch" 2>/dev/null && ! command -v nvidia-smi >/dev/null 2>&1; then \
		$(PIP) install --quiet --retries 0 --timeout 10 --extra-index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"; fi
	$(PIP) install --quiet -e ".[dev]"
	touch $@

train: setup
	$(PY) -m lam.train $(ARGS)

test: setup
	$(PY) -m pytest $(ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(ARGS)

bench: setup
	$(PY) -m benchmarks.train_speed $(ARGS)

bench-attention: setup
	$(PY) -m benchmarks.attention $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build dist *.egg-info
