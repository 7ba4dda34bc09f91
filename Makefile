# Two commands on a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
WORKDIR ?= runs/demo
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test setup clean parity parity-venv onnx

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

# Trains the demo config into a fresh WORKDIR (the shapes dataset is built
# into ~/tensorflow_datasets on first use) and prints the COCO AP table.
demo: $(STAMP)
	rm -rf $(WORKDIR)
	$(PY) train.py --config=configs/demo.py --workdir=$(WORKDIR)

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile

clean:
	rm -rf $(VENV)

# Checks the Model Garden import against Model Garden itself: a separate venv
# with tf-models-official (not a dependency of this project) and this
# project, then the parity tests: outputs of converted SpineNet 49S, 49, 96,
# Mobile-49 RetinaNets (PARITY_MODEL_IDS=49,96 picks others), and our MACs
# against those counted in Model Garden's TF graph.
PARITY_VENV ?= .venv-parity
PARITY_PY := $(PARITY_VENV)/bin/python
PARITY_STAMP := $(PARITY_VENV)/.installed

$(PARITY_STAMP): pyproject.toml
	test -x $(PARITY_PY) || $(PYTHON) -m venv $(PARITY_VENV)
	$(PARITY_PY) -m pip install --quiet --upgrade pip
	$(PARITY_PY) -m pip install --quiet tf-models-official
	$(PARITY_PY) -m pip install --quiet jax flax optax orbax-checkpoint ml-collections pytest
	$(PARITY_PY) -m pip install --quiet --no-deps -e .
	touch $(PARITY_STAMP)

# The environment alone (benchmarks/vs_model_garden.py runs in it).
parity-venv: $(PARITY_STAMP)

parity: $(PARITY_STAMP)
	$(PARITY_PY) -m pytest -p no:cacheprovider -s -k parity tests/test_convert_model_garden.py

# ONNX export (spinenet_jax/export_onnx.py): jax2onnx pins
# orbax-checkpoint<0.11.37, so it gets its own venv with this project, which
# `python -m spinenet_jax.export --format=onnx` hands the conversion to; then
# the ONNX export test runs (it is skipped in `make test` without this venv).
ONNX_VENV ?= .venv-onnx
ONNX_PY := $(ONNX_VENV)/bin/python
ONNX_STAMP := $(ONNX_VENV)/.installed

$(ONNX_STAMP): pyproject.toml
	test -x $(ONNX_PY) || $(PYTHON) -m venv $(ONNX_VENV)
	$(ONNX_PY) -m pip install --quiet --upgrade pip
	$(ONNX_PY) -m pip install --quiet -e '.[test,onnx]'
	touch $(ONNX_STAMP)

onnx: $(STAMP) $(ONNX_STAMP)
	$(PY) -m pytest -p no:cacheprovider -k onnx tests/test_export.py
