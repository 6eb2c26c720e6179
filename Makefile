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

# A second stack for the declared version range: triton 3.6 (the lent GPU machines' version) beside
# the same torch. A small venv that sees the main one's packages through a .pth file, so only triton
# is installed again (cached: made once, ~5 s).
VENV36  ?= .venv-triton36
PY36    := $(VENV36)/bin/python
STAMP36 := $(VENV36)/.installed
KERNEL_TESTS := tests/test_roi_align.py tests/test_nms.py tests/test_mask_loss.py tests/test_mask_targets.py tests/test_compile.py

$(STAMP36): $(STAMP)
	$(PYTHON) -m venv $(VENV36)
	$(PY) -c "import site; print(site.getsitepackages()[0])" > "$$($(PY36) -c 'import site; print(site.getsitepackages()[0])')/_main_venv.pth"
	$(PY36) -m pip install -q --no-deps triton==3.6.0 2>&1 | grep -v "is ignored" || true
	$(PY36) -c "import triton, kernels; assert triton.__version__.startswith('3.6'), triton.__version__"
	touch $(STAMP36)

.PHONY: install demo test test-triton36 compile-report bench gpu-wheels
install: $(STAMP)

demo: $(STAMP)
	$(PY) -m maskrcnn_fast

# pytest exit code 5 = nothing collected; that is not a failure of the code.
# The bench suite runs too, as a CPU smoke test (tiny shapes, interpreter + fallback).
test: $(STAMP)
	$(PY) -m pytest -q tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; [ $$rc -eq 0 ] || exit $$rc
	$(PY) -m pytest -q bench -p no:cacheprovider; rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; [ $$rc -eq 0 ] || exit $$rc
	$(MAKE) --no-print-directory test-triton36

# The kernel tests and the offline compile check again, on triton 3.6.
test-triton36: $(STAMP36)
	$(PY36) -m pytest -q $(KERNEL_TESTS) -p no:cacheprovider; rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

bench: $(STAMP)
	$(PY) -m pytest -q bench --benchmark-json=bench/results/latest.json

# Wheels for the lent GPU machine (CPython 3.12, no registry there) of what its image lacks; the device
# call carries .whl and bench/run_gpu.sh installs them (bench/README.md).
gpu-wheels:
	mkdir -p .whl
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d .whl pycocotools
