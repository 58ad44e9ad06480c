# Two commands matter (see README): `make demo` and `make test`. Both set up .venv first.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: setup demo test lint typecheck unit unit-random fuzz mutate jaeger bench soak schema lock clean

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

# The suite in a random order (pytest-random-order; the seed is printed, re-run with -p random_order
# --random-order-seed=N): tests must not depend on each other's leftovers.
unit-random: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider --random-order $(PYTEST_ARGS)

# Long fuzzing of the policy loader (20,000 random examples per property; `make test` runs 60, derandomized).
fuzz: setup
	HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest -q -p no:cacheprovider tests/test_policy_fuzz.py

# Mutation testing of the decision core (mutmut 3, config in pyproject.toml [tool.mutmut]); long: run it
# in the background. Prints the kill rate per module; `mutmut results` lists the survivors.
mutate: setup
	rm -rf mutants
	-$(BIN)/mutmut run --max-children 2
	$(BIN)/mutmut results --all true | $(BIN)/python -c "$$MUTATION_REPORT"

bench: setup
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/incident.py

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

define MUTATION_REPORT
import collections, sys
counts = collections.defaultdict(collections.Counter)
for line in sys.stdin:
    name, _, status = line.strip().rpartition(": ")
    if name:
        counts[name.split(".")[1]][status] += 1
for module, c in sorted(counts.items()):
    tested = sum(c.values()) - c["not checked"]
    killed = c["killed"] + c["timeout"] + c["caught by type check"]
    print(f"{module:12} {killed:4}/{tested:4} killed ({100 * killed / max(tested, 1):.0f} %)  {dict(c)}")
endef
export MUTATION_REPORT
