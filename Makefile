# The two commands:  make train  (the main job)  and  make test  (the test suite).
# Both create .venv with the project, its training stack (the `train` extra) and its test extra on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# extras installed with the project: `make test EXTRAS=train,test,hf` adds torch + transformers for
# the live comparisons of tests/test_hf_live.py (.ci/run does); without them those tests skip.
# (No extras at all gives lm.losses and lm.masking only, on jax and numpy.)
# curate: Apache Beam etc. for lm/data/curate and tests/test_curate*.py
# tpu: libtpu, the TPU compiler, for tests/test_tpu_compile.py (they skip without it)
EXTRAS ?= train,test,curate,tpu
PIP_ARGS ?=  # extra pip arguments for the install, e.g. a constraints file (.ci/run pins a CPU-only torch)
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: train test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip uninstall --quiet --yes lm 2>/dev/null || true  # this project's distribution before it was lm-mle
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]' $(PIP_ARGS)
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
