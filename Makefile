# Two commands on a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
WORKDIR ?= runs/demo
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test setup clean

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
	$(PY) -m pytest

clean:
	rm -rf $(VENV)
