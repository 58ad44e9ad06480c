#!/usr/bin/env bash
# What users install, checked the way they use it (`make wheel-check`, part of `make test`):
#   1. build the sdist, and the wheel from that sdist (so the sdist is complete);
#   2. `twine check --strict` both; check the sdist carries what a packager needs;
#   3. install the wheel, NOT editable, into a fresh virtualenv from requirements.lock;
#   4. from a directory outside the checkout: --help, validate the packaged example policy,
#      init, a quick demo, the packaged scenarios, and one llm_resilience.completion call
#      through FakeProvider.
# pip's cache (~/.cache/pip, filled by `make setup`) makes step 3 a local copy, not a download.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
py=${PYTHON:-$repo/.venv/bin/python}
work=$(mktemp -d "${TMPDIR:-/tmp}/llm-resilience-wheel.XXXXXX")
trap '[ -n "${WHEEL_CHECK_KEEP:-}" ] || rm -rf "$work"' EXIT
started=$SECONDS
step() { printf '\n== [%ss] %s\n' "$((SECONDS - started))" "$*"; }

step "build sdist + wheel"
"$py" -m build --no-isolation --outdir "$work/dist" . >"$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
ls "$work/dist"

step "twine check"
"$py" -m twine check --strict "$work"/dist/*

step "sdist contents"
"$py" - "$work"/dist/*.tar.gz <<'PY'
import sys, tarfile
names = {n.split("/", 1)[1] for n in tarfile.open(sys.argv[1]).getnames() if "/" in n}
need = ["README.md", "LICENSE", "CHANGELOG.md", "pyproject.toml", "requirements.lock", "policies/example.yaml",
        "policies/scenarios/latency-spike.yaml", "tests/conftest.py", "llm_resilience/py.typed"]
missing = [n for n in need if n not in names]
if missing:
    sys.exit(f"the sdist lacks: {', '.join(missing)}")
print(f"ok: {len(names)} files, including {', '.join(need)}")
PY

step "fresh virtualenv from requirements.lock (the wheel's runtime part of it), then the wheel (not editable)"
"$py" scripts/runtime_lock.py "$work"/dist/*.whl requirements.lock >"$work/runtime.lock"
"$py" -m venv "$work/venv"
# --no-compile: byte-compiling ~10,000 modules nobody imports here costs more than the rest of the install.
pip_install=("$work/venv/bin/pip" install --quiet --disable-pip-version-check --no-compile)
"$work/venv/bin/pip" --version
# --no-deps: the runtime lock is complete; a fresh venv's own pip (23.2 on 3.11) refuses litellm's
# `httpx[http2]` in --require-hashes mode otherwise. `pip check` proves the set is consistent.
"${pip_install[@]}" --no-deps --require-hashes -r "$work/runtime.lock"
"$work/venv/bin/pip" check
"${pip_install[@]}" --no-deps "$work"/dist/*.whl
bin=$work/venv/bin
mkdir "$work/elsewhere"
cd "$work/elsewhere"  # outside the checkout: nothing may come from it

step "llm-resilience --help"
"$bin/llm-resilience" --help >/dev/null && echo ok
example=$("$bin/python" -c 'from llm_resilience._resources import example_policy; print(example_policy())')
case "$example" in
  "$repo"/*) echo "the packaged example resolves into the checkout: $example" >&2; exit 1 ;;
esac

step "llm-resilience validate (the packaged example)"
"$bin/llm-resilience" validate "$example"

step "llm-resilience init"
"$bin/llm-resilience" init starter.yaml --chain openai/gpt-4o,openai/gpt-4o-mini >/dev/null
"$bin/llm-resilience" validate starter.yaml

step "llm-resilience demo --quick"
"$bin/llm-resilience" demo --quick --quiet >demo.txt
grep -E "^ +requests " demo.txt


step "llm_resilience.completion through FakeProvider"
"$bin/python" "$repo/scripts/wheel_smoke.py"
step "done"
