# Two commands for a fresh machine:
#   make demo   — set up .venv, train robust-jem on offline MNIST digits with local Ray + MLflow (sqlite),
#                 evaluate it, draw samples in the three generation modes, print a report
#   make test   — set up .venv, run the whole test suite (what CI runs)
# GPU machines: `make venv TORCH_CONSTRAINTS=` installs without the CPU pins (see README).

PYTHON ?= python3
VENV ?= .venv
TORCH_CONSTRAINTS ?= constraints-cpu.txt
PY := $(VENV)/bin/python
RJEM := $(VENV)/bin/rjem
DEMO_OUT ?= runs/demo
STAMP := $(VENV)/.installed

export RAY_USAGE_STATS_ENABLED ?= 0
export MLFLOW_DISABLE_TELEMETRY ?= true

.PHONY: venv demo test test-fast clean

$(STAMP): pyproject.toml $(TORCH_CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(if $(TORCH_CONSTRAINTS),-c $(TORCH_CONSTRAINTS)) -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py --out $(DEMO_OUT)

# GPU-marked tests need CUDA: deselected here by their marker (never skipped), run by scripts/gpu_check.sh.
test: $(STAMP)
	$(PY) -m pytest -q -m "not gpu"

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not gpu"

clean:
	rm -rf runs mlflow.db mlartifacts .rjem_cache .pytest_cache
