# make demo: create .venv when missing and run the main job on bundled data.
# make test: create .venv when missing and run the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stable-md-installed
# One thread per process: two threads on a shared core were measured 10-150x slower.
export OMP_NUM_THREADS ?= 1
export MKL_NUM_THREADS ?= 1

.PHONY: demo test env clean-env test-openmmtorch

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
	$(PY) examples/demo.py

clean-env:
	rm -rf $(VENV)

# make test-openmmtorch: the TorchForce backend's tests, in their own environment.
# Why separate: the only openmmtorch on PyPI (1.5, built 2025-11-07 against the then-current
# torch 2.9.0 with CUDA 12) links libtorch_cuda.so, libc10_cuda.so and libnvrtc.so.12, so it
# needs that CUDA build of torch 2.9 (about 7 GB with its nvidia-* wheels), whereas .venv
# holds the pinned torch==2.13.0+cpu. One environment cannot hold both, and installing our
# package normally would replace torch 2.9 with the pinned 2.13, so it goes in with --no-deps
# and its other runtime dependencies are listed here. `make test` does not need any of this
# (those tests skip when openmmtorch is absent).
OMM_TORCH_VENV ?= .venv-openmmtorch
OMM_TORCH_PY := $(OMM_TORCH_VENV)/bin/python
OMM_TORCH_STAMP := $(OMM_TORCH_VENV)/.stable-md-installed
OMM_TORCH_TORCH ?= torch==2.9.0
OMM_TORCH_DEPS := openmmtorch==1.5 "openmm>=8.5" "numpy>=1.24" "ase>=3.29" "tqdm>=4.60" \
	"matplotlib>=3.7" "scipy>=1.13" "mdtraj>=1.10" "pytest>=7"

$(OMM_TORCH_STAMP): pyproject.toml
	test -x $(OMM_TORCH_PY) || $(PYTHON) -m venv $(OMM_TORCH_VENV)
	$(OMM_TORCH_PY) -m pip install --quiet $(OMM_TORCH_TORCH)
	$(OMM_TORCH_PY) -m pip install --quiet $(OMM_TORCH_TORCH) $(OMM_TORCH_DEPS)
	$(OMM_TORCH_PY) -m pip install --quiet --no-deps -e .
	$(OMM_TORCH_PY) -c "import torch, openmmtorch; print('torch', torch.__version__, 'openmmtorch', openmmtorch.__file__)"
	touch $(OMM_TORCH_STAMP)

test-openmmtorch: $(OMM_TORCH_STAMP)
	$(OMM_TORCH_PY) -m pytest -q tests/test_openmm_torchforce.py
