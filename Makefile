# Set-up and the two main commands. Python >= 3.10 with pip; no GPU needed.
PY ?= python3
PIP ?= $(PY) -m pip

.PHONY: install install-test test test-all demo bench

# Library + training/eval deps (no torch).
install:
	$(PIP) install -q -e .

# Test deps: torch 2.13.0 (CPU wheel; never a looser spec, which pulls multi-GB CUDA builds),
# the PyPI sam2==1.1.0 reference without its dependencies (its modeling code needs no
# torchvision), then this package with the test extra.
install-test:
	$(PIP) install -q "torch==2.13.0"
	SAM2_BUILD_CUDA=0 $(PIP) install -q --no-deps --no-build-isolation "sam2==1.1.0"
	$(PIP) install -q -e ".[test]"

# The default test suite (slow tests excluded; `make test-all` runs them too).
test: install-test
	$(PY) -m pytest -q

test-all: install-test
	$(PY) -m pytest -q -m "slow or not slow"

# The main job on the built-in default: synthetic ego-exo data, small model, CPU.
demo: install
	$(PY) -m train

bench: install-test
	$(PY) benchmarks/bench_image_encoder.py --quick
