# Two commands matter (see README): `make demo` and `make test`. Both set up .venv first.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: setup demo test lint typecheck unit jaeger bench soak schema lock clean

setup: $(STAMP)

# Installs exactly what requirements.lock pins, hash-checked; then this package without deps.
$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --require-hashes -r requirements.lock
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.installed-* && touch $(STAMP)

demo: setup
	$(BIN)/llm-resilience demo

test: setup lint typecheck jaeger unit

lint: setup
	$(BIN)/ruff check llm_resilience tests benchmarks
	$(BIN)/ruff format --check llm_resilience tests benchmarks

typecheck: setup
	$(BIN)/mypy

unit: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# The real-Jaeger test's server: reuses a cached binary or builds it (~5 min the first time; needs Go).
jaeger:
	bash scripts/jaeger.sh

bench: setup
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/incident.py
	$(BIN)/python benchmarks/incident.py --rate 200 --systems dfgh
	$(BIN)/python benchmarks/burst.py

# Robustness under sustained mixed faults (not part of `make test`): SOAK_CALLS calls, default 100000.
SOAK_CALLS ?= 100000
soak: setup
	SOAK_CALLS=$(SOAK_CALLS) $(BIN)/python tests/soak.py

schema: setup
	$(BIN)/llm-resilience schema > policies/policy.schema.json

# Re-pin after editing pyproject.toml dependencies (needs network to PyPI).
lock: setup
	$(BIN)/pip install --quiet uv==0.13.9
	$(BIN)/uv pip compile pyproject.toml --extra dev --extra bench --extra mutation --generate-hashes --python-version 3.11 -o requirements.lock

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache
