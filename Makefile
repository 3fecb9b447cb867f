# Guided Diffusion, from DDPM to Latent Diffusion
#
#   make course   execute every lesson with full settings (outputs kept), then build site/
#   make test     the library's tests, then every notebook under nbval (COURSE_QUICK=1), then
#                 every notebook again on the simulated GPU (test-sim: COURSE_DEVICE=sim)
#   make lab      JupyterLab in notebooks/
#   make docs     docs/figures/: each executed lesson's first figure (for the README)
#   make clean    remove site/ and caches (never .venv: rm -rf .venv to start over)
#
# Each target creates .venv when it is missing; .venv/.installed records that the install
# finished and is redone only when pyproject.toml changes.

PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
# torch first, pinned to the release the course is tested with (pyproject accepts a range);
# override for another build, e.g. make test TORCH='torch torchvision'
TORCH ?= torch==2.14.1 torchvision==0.29.1
# seconds a notebook cell may take: under nbval (quick settings) and under `make course` (full)
CELL_TIMEOUT ?= 1200
COURSE_CELL_TIMEOUT ?= 7200

# notebook kernels use this venv's Python, never a user-wide kernelspec
export JUPYTER_PREFER_ENV_PATH := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: course test test-lib test-notebooks test-sim lab docs venv clean

venv: $(STAMP)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install $(TORCH)
	$(BIN)/python -m pip install -e ".[dev]"
	touch $@

test: test-lib test-notebooks test-sim

test-lib: $(STAMP)
	COURSE_QUICK=1 $(BIN)/pytest tests

# A separate run: tests/kernels/conftest.py sets TRITON_INTERPRET=1 for the process, which
# the notebook kernels would inherit. Exit code 5 means no notebook was collected (none
# written yet): that is a pass for this step only, as is a missing notebooks/ folder.
test-notebooks: $(STAMP)
	@if [ ! -d notebooks ]; then echo "no notebooks/ folder: no notebooks to run"; exit 0; fi; \
	$(BIN)/course data || exit $$?; \
	rc=0; COURSE_QUICK=1 PATH="$(BIN):$$PATH" $(BIN)/pytest --nbval-lax \
	    --nbval-cell-timeout=$(CELL_TIMEOUT) notebooks/ || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "no notebooks collected in notebooks/: nothing to run"; exit 0; fi; \
	exit $$rc

# The lessons again at quick settings on COURSE_DEVICE=sim, a CPU stand-in for a GPU that raises
# the errors CUDA raises for a misplaced tensor (course_lib/simdevice.py): a lesson that passes
# here moves every tensor it should, so it runs on a GPU too. As in test-notebooks, nbval-lax checks
# that every cell runs (no cell is marked for an output comparison).
test-sim: $(STAMP)
	@if [ ! -d notebooks ]; then echo "no notebooks/ folder: no notebooks to run"; exit 0; fi; \
	$(BIN)/course data || exit $$?; \
	rc=0; COURSE_DEVICE=sim COURSE_QUICK=1 PATH="$(BIN):$$PATH" $(BIN)/pytest --nbval-lax \
	    --nbval-cell-timeout=$(CELL_TIMEOUT) notebooks/ || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "no notebooks collected in notebooks/: nothing to run"; exit 0; fi; \
	exit $$rc

# Full settings: COURSE_QUICK is unset for the kernels. Lessons run in order, in place, then site/
# is built (`course run`; `course run 03 --quick` runs one lesson at test settings into site/ only).
course: $(STAMP)
	$(BIN)/course data
	PATH="$(BIN):$$PATH" $(BIN)/course run --timeout $(COURSE_CELL_TIMEOUT) --notebooks notebooks --out site

# docs/figures/NN_topic.png: each executed lesson's first figure, for the README (site.py picks them)
docs: $(STAMP)
	$(BIN)/python -m course_lib.site --notebooks notebooks --out build/site
	mkdir -p docs/figures && cp build/site/figures/*.png docs/figures/

lab: $(STAMP)
	cd notebooks && PATH="$(BIN):$$PATH" $(BIN)/jupyter lab

clean:
	rm -rf site .pytest_cache .hypothesis build
	find . -path ./$(VENV) -prune -o \( -name __pycache__ -o -name .ipynb_checkpoints \) -type d \
	    -prune -exec rm -rf {} +
