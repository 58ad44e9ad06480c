# Two commands matter (see README): `make demo` and `make test`. Both set up .venv first.
# VENV / OLD_VENV may be overridden (.ci/run builds everything in virtualenvs it creates fresh).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | cksum | cut -d' ' -f1)

# A second venv on the oldest versions pyproject.toml allows (requirements-oldest.lock): the
# lower bounds are tested, not guessed. It runs the tests that touch litellm's API most.
OLD_VENV   ?= .venv-oldest
OLD_STAMP  := $(OLD_VENV)/.installed-$(shell cat requirements-oldest.lock pyproject.toml | cksum | cut -d' ' -f1)
OLDEST_TESTS := tests/test_dropin.py tests/test_install.py tests/test_routes.py tests/test_fallback.py \
	tests/test_streaming.py tests/test_truncation.py tests/test_hedging.py

.PHONY: setup demo test docs docs-serve lint typecheck unit jaeger wheel-check test-oldest bench soak schema lock check-compat clean test-services unit-random fuzz mutate

setup: $(STAMP)

# Installs exactly what requirements.lock pins, hash-checked; then this package without deps.
# --no-deps: the lock is complete, and the pip a fresh venv comes with (23.2 on Python 3.11) refuses
# extra-qualified requirements such as litellm's `httpx[http2]` in --require-hashes mode even when the
# lock pins every package. `pip check` then proves the set is consistent.
PIP_LOCKED = --quiet --disable-pip-version-check --no-deps --require-hashes
$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@$(BIN)/pip --version
	$(BIN)/pip install $(PIP_LOCKED) -r requirements.lock
	$(BIN)/pip check
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.installed-* && touch $(STAMP)

demo: setup
	$(BIN)/llm-resilience demo

test: setup lint typecheck docs jaeger unit wheel-check test-oldest

# The documentation site (mkdocs.yml, docs/) into site/. --strict: a broken link, a missing snippet
# (benchmarks/results/*.md) or an unresolved API reference fails the build. Offline: nothing is fetched.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

# The site on http://127.0.0.1:8000, rebuilt on every edit.
docs-serve: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

lint: setup
	$(BIN)/ruff check llm_resilience tests benchmarks scripts
	$(BIN)/ruff format --check llm_resilience tests benchmarks scripts

typecheck: setup
	$(BIN)/mypy

unit: setup test-services
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# The real-Jaeger test's server: reuses a cached binary or builds it (~5 min the first time; needs Go).
jaeger:
	bash scripts/jaeger.sh

# The built wheel in a fresh virtualenv, run from outside the checkout (scripts/check_wheel.sh).
wheel-check: setup
	PYTHON=$(BIN)/python bash scripts/check_wheel.sh

$(OLD_STAMP): requirements-oldest.lock pyproject.toml
	test -x $(OLD_VENV)/bin/python || $(PY) -m venv $(OLD_VENV)
	@$(OLD_VENV)/bin/pip --version
	$(OLD_VENV)/bin/pip install $(PIP_LOCKED) -r requirements-oldest.lock
	$(OLD_VENV)/bin/pip check
	$(OLD_VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	rm -f $(OLD_VENV)/.installed-* && touch $(OLD_STAMP)

test-oldest: $(OLD_STAMP)
	$(OLD_VENV)/bin/python -m pytest -q -p no:cacheprovider $(OLDEST_TESTS)

# Services the tests use for real: redis-server (the shared-state tests start their own on a free
# port). Installed from Debian when missing (CI runs as root); elsewhere, says how.
test-services:
	@command -v redis-server >/dev/null 2>&1 || test -x /usr/bin/redis-server || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	  else \
	    echo "redis-server is missing: sudo apt-get install -y redis-server (Redis tests are skipped without it)"; \
	  fi; }

# The suite in a random order (pytest-random-order, modules and tests within them shuffled): tests must
# not depend on each other's leftovers. The seed is printed; `make unit-random RANDOM_SEED=N` replays it.
unit-random: setup test-services
	@seed=$${RANDOM_SEED:-$$(od -An -N2 -tu2 /dev/urandom | tr -d ' ')}; \
	echo "random order seed $$seed (replay: make unit-random RANDOM_SEED=$$seed)"; \
	$(BIN)/python -m pytest -q -p no:cacheprovider --random-order --random-order-seed=$$seed $(PYTEST_ARGS)

# Long fuzzing of the policy loader (20,000 random examples per property; `make test` runs 60, derandomized).
fuzz: setup
	HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest -q -p no:cacheprovider tests/test_policy_fuzz.py

# Mutation testing of the decision core (mutmut 3, config in pyproject.toml [tool.mutmut]; tests marked
# sans_io); ~45 min with one child on 2 cores: run it in the background. Prints the kill rate per module
# (scripts/mutation_report.py); `mutmut results` lists the survivors, `mutmut show NAME` one mutant.
mutate: setup
	rm -rf mutants
	-$(BIN)/mutmut run --max-children 1
	$(BIN)/mutmut results --all true | $(BIN)/python scripts/mutation_report.py

bench: setup
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/incident.py
	$(BIN)/python benchmarks/incident.py --quick --rate 100 --systems dfgh
	$(BIN)/python benchmarks/incident.py --quick --rate 200 --systems dfgh
	$(BIN)/python benchmarks/incident_sim.py
	$(BIN)/python benchmarks/burst.py
	$(BIN)/python benchmarks/spike_calls.py
	$(BIN)/python benchmarks/mixed_callers.py

# Robustness under sustained mixed faults (not part of `make test`): SOAK_CALLS calls, default 100000.
SOAK_CALLS ?= 100000
soak: setup
	SOAK_CALLS=$(SOAK_CALLS) $(BIN)/python tests/soak.py

schema: setup
	$(BIN)/llm-resilience schema > policies/policy.schema.json

# Re-pin after editing pyproject.toml dependencies (needs network to PyPI). requirements.lock: the
# newest vetted set, integration clients included (they must co-resolve); requirements-oldest.lock:
# every direct dependency at the lower bound of its range.
lock: setup
	$(BIN)/pip install --quiet uv==0.13.9
	$(BIN)/uv pip compile pyproject.toml --extra dev --extra bench --extra mutation --extra integration --extra redis --extra docs --generate-hashes \
		--python-version 3.11 -o requirements.lock
	$(BIN)/uv pip compile pyproject.toml --extra dev --resolution lowest-direct --generate-hashes \
		--python-version 3.11 -o requirements-oldest.lock

# Does `pip install llm-resilience` resolve next to the client libraries people use it with? (network)
check-compat: setup
	$(BIN)/pip install --quiet uv==0.13.9
	printf '%s\n' . instructor langchain-litellm smolagents openai-agents dspy \
		| $(BIN)/uv pip compile - --python-version 3.11 --quiet -o /dev/null

clean:
	rm -rf $(VENV) $(OLD_VENV) .mypy_cache .ruff_cache build dist site

