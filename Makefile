# make demo: create .venv when missing and run the main job on bundled data.
# make test: create .venv when missing and run the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stable-md-installed
# One thread per process: two threads on a shared core were measured 10-150x slower.
export OMP_NUM_THREADS ?= 1
export MKL_NUM_THREADS ?= 1

.PHONY: demo test env clean-env

env: $(STAMP)

# torch first, pinned: an unpinned torch would pull GBs of CUDA packages.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[all,test]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) examples/pretrain_ethanol.py

clean-env:
	rm -rf $(VENV)
