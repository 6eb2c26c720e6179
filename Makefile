# Two entry points on a fresh clone: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# torch/torchvision are pinned to the wheels on local disk; installing them first keeps
# pip's resolver from fetching a newer multi-GB CUDA build for `torch>=2.6`.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1 2>&1 | grep -v "is ignored" || true
	$(PY) -m pip install -q -e '.[test]' 2>&1 | grep -v "is ignored" || true
	$(PY) -c "import torch, torchvision, triton, kernels, maskrcnn_fast"
	touch $(STAMP)

.PHONY: install demo test compile-report bench
install: $(STAMP)

demo: $(STAMP)
	$(PY) -m maskrcnn_fast

# pytest exit code 5 = nothing collected; that is not a failure of the code.
# The bench suite runs too, as a CPU smoke test (tiny shapes, interpreter + fallback).
test: $(STAMP)
	$(PY) -m pytest -q tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; [ $$rc -eq 0 ] || exit $$rc
	$(PY) -m pytest -q bench -p no:cacheprovider; rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

bench: $(STAMP)
	$(PY) -m pytest -q bench --benchmark-json=bench/results/latest.json
