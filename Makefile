# The two commands:  make train  (the main job)  and  make test  (the test suite).
# Both create .venv with the project and its test extra on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: train test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

train: $(STAMP)
	$(PY) -m lm.cli.train --config=configs/default.py --workdir=runs/default $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 $(ARGS)

bench: $(STAMP)
	$(PY) benchmarks/bench_losses.py
	$(PY) benchmarks/bench_train.py

clean:
	rm -rf runs .pytest_cache
