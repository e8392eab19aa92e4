# The two set-up commands of the README, plus a few helpers.
#   make demo   the main job on the built-in default (synthetic data), outputs under out/demo
#   make test   ruff + the whole test suite
# Both create (or reuse) a virtual environment in .venv and install what they need into it.
# torch is pinned: on this project's CPU machines torch==2.13.0 is the CPU build on disk; on a GPU
# machine the same pin installs the regular build.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
# The GPU machine's triton; CI pins the same so the kernels are tested against one version.
TRITON_SPEC ?= triton==3.6.0
# The demo runs on the CPU: no triton (the GPU kernels), no DALI (199 MB), no test tools; the tests need everything.
DEMO_EXTRAS ?= video,eval
TEST_EXTRAS ?= triton,video,eval,dali,deploy,dev
DEMO_STAMP := $(VENV)/.stpcore-demo
STAMP := $(VENV)/.stpcore-test
PYTEST_ARGS ?=
DEMO_OUT ?= out/demo

.PHONY: demo test lint bench install clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

# Reinstall when the packaging changes; otherwise reuse the environment.
$(DEMO_STAMP): $(PY) pyproject.toml setup.py
	$(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install "$(TORCH_SPEC)" -e ".[$(DEMO_EXTRAS)]"
	touch $(DEMO_STAMP)

$(STAMP): $(PY) pyproject.toml setup.py
	$(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install "$(TORCH_SPEC)" "$(TRITON_SPEC)" -e ".[$(TEST_EXTRAS)]"
	touch $(STAMP) $(DEMO_STAMP)

install: $(STAMP)

demo: $(DEMO_STAMP)
	$(PY) -m stpcore demo --out $(DEMO_OUT)

lint: $(STAMP)
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest -n 2 $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m pytest benchmarks --benchmark-only $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) out .pytest_cache .benchmarks
