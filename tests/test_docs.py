"""The documentation says what the code does, where a test can tell.

The README is the front page; the rest is the MkDocs site in docs/. Parts of the site are generated at
build time (scripts/docs_hooks.py: the policy reference, command output); the parts written by hand are
held to the code here: the glossary against the outcome vocabulary, the module map (CONTRIBUTING.md)
against the package, the defaults and limits the policy guide states, the tests the guarantees page
names, and the README's links. Each failure names what to update: the prose or the code.
"""

from __future__ import annotations

import importlib.util
import inspect
import re
import typing
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from llm_resilience import _outcomes, _planner, _policy, _tracing
from llm_resilience._policy import BUILTIN_DEFAULT_CLASS, DEFAULT_BREAKER_COUNTS, BreakerSettings

pytestmark = pytest.mark.sans_io  # no server: `make mutate` runs these for every mutant

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "llm_resilience"
DOCS = ROOT / "docs"
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _hooks() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "scripts" / "docs_hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _page(relative: str) -> str:
    return (DOCS / relative).read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# The front page.


def test_the_readme_is_a_front_page_of_about_10_kb() -> None:
    size = len(README.encode("utf-8"))
    assert size <= 12_000, f"README.md is {size} bytes: move detail to a docs/ page and link it"


def test_every_relative_link_of_the_readme_resolves_to_a_file_and_its_anchor() -> None:
    links = re.findall(r"\]\(([^)\s]+)\)", README)
    assert links, "no links found in README.md"
    for link in links:
        if re.match(r"[a-z]+://", link):
            continue
        path, _, anchor = link.partition("#")
        target = ROOT / path
        assert target.is_file(), f"README links to {link}, which does not exist"
        if anchor:
            assert anchor in _anchors(target.read_text(encoding="utf-8")), f"README links to {link}: no such heading"


def _anchors(markdown: str) -> set[str]:
    """Heading ids as MkDocs' toc extension and GitHub make them (lowercase, punctuation dropped)."""
    ids = set()
    for heading in re.findall(r"^#+ (.+)$", markdown, re.MULTILINE):
        explicit = re.search(r"\{#([\w-]+)\}\s*$", heading)
        if explicit:
            ids.add(explicit.group(1))
            continue
        text = re.sub(r"[^\w\s-]", "", heading.replace("`", "")).strip().lower()
        ids.add(re.sub(r"[\s]+", "-", text))
    return ids


def test_the_user_facing_docs_carry_no_issue_numbers_or_session_history() -> None:
    pages = {"README.md": README} | {str(p.relative_to(ROOT)): p.read_text() for p in DOCS.rglob("*.md")}
    pages |= {f"benchmarks/{p.name}": p.read_text() for p in (ROOT / "benchmarks").rglob("*.md")}
    for name, text in pages.items():
        found = re.findall(r"(?i)\bissue \d+|\blast session\b|\bthis session\b", text)
        assert not found, f"{name} mentions {found}: history goes to CHANGELOG.md"


# ---------------------------------------------------------------------------------------------
# The policy reference is generated; what the guide states by hand is checked.


def test_the_generated_policy_reference_has_a_row_for_every_field_of_every_policy_model() -> None:
    hooks = _hooks()
    reference = hooks.policy_reference()
    sections = re.split(r"^### ", reference, flags=re.MULTILINE)[1:]
    by_path = {s.split("`")[1]: s for s in sections}
    for _, path, model in hooks._sections():
        rows = re.findall(r"^\| `([^`]+)` \|", by_path[path], re.MULTILINE)
        assert rows == [f.alias or n for n, f in model.model_fields.items()], path
    assert set(hooks.policy_models()) == {m for _, _, m in hooks._sections()}


def test_every_policy_field_has_a_description_for_the_reference() -> None:
    for model in _hooks().policy_models():
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name}: add Field(description=...) (it is the docs)"


def _default_row(model: type[BaseModel], key: str) -> str:
    hooks = _hooks()
    return hooks.field_default(model, key)


@pytest.mark.parametrize(
    ("key", "value"),
    [(k, getattr(BreakerSettings(), k)) for k in ("fail_max", "reset_timeout_s", "success_threshold", "panic")],
)
def test_the_reference_shows_the_breaker_defaults_the_engine_applies(key: str, value: Any) -> None:
    # The schema's None means "inherit"; the reference must show what the engine then uses.
    shown = _default_row(_policy.BreakerConfig, key)
    assert shown == (f"`{value:g}`" if isinstance(value, float) else f"`{value}`")


def test_the_reference_shows_the_default_breaker_counts_and_fallback_kinds() -> None:
    counts = _default_row(_policy.BreakerConfig, "count")
    assert set(re.findall(r"`(\w+)`", counts)) == set(DEFAULT_BREAKER_COUNTS) == BreakerSettings().count
    fall_back = _default_row(_policy.ErrorsConfig, "fall_back_on")
    assert set(re.findall(r"`(\w+)`", fall_back)) == set(_policy.DEFAULT_FALL_BACK_ON)


def test_required_fields_are_marked_required_and_literal_defaults_are_shown() -> None:
    for model in _hooks().policy_models():
        for name, field in model.model_fields.items():
            shown = _default_row(model, name)
            if model is _policy.BreakerConfig:
                continue
            if field.default is PydanticUndefined and field.default_factory is None:
                assert shown == "**required**", (model.__name__, name)
            elif isinstance(field.default, int | float | str) and not isinstance(field.default, bool):
                assert str(field.default).strip() in shown or f"{field.default:g}" in shown, (model.__name__, name)


def test_the_built_in_class_the_guide_states_is_the_one_in_the_code() -> None:
    guide = _page("guides/policies.md")
    m = re.search(r"a built-in one applies\s+\(`timeout_s: ([\d.]+), deadline_s: ([\d.]+)`\)", guide)
    assert m, "docs/guides/policies.md no longer states the built-in class"
    assert (float(m.group(1)), float(m.group(2))) == (
        BUILTIN_DEFAULT_CLASS["timeout_s"],
        BUILTIN_DEFAULT_CLASS["deadline_s"],
    )


def test_the_limits_the_guide_states_are_the_code_limits() -> None:
    guide = re.sub(r"\s+", " ", _page("guides/policies.md"))
    assert f"nested deeper than {_policy.MAX_YAML_DEPTH} levels" in guide
    assert f"more than {_policy.MAX_YAML_VALUES:,} values" in guide
    assert f"at most a day ({_policy.MAX_SECONDS:g} s)" in guide
    assert f"timeouts are at least {_policy.MIN_TIMEOUT_S:g} s" in guide


# ---------------------------------------------------------------------------------------------
# The glossary covers every word the layer prints.


def _glossary_words() -> set[str]:
    return set(re.findall(r"^\| `([^`]+)` \|", _page("reference/glossary.md"), re.MULTILINE))


def _source(name: str) -> str:
    return (PACKAGE / name).read_text(encoding="utf-8")


def code_vocabulary() -> set[str]:
    """Outcome, reason, breaker and decision words the package can print."""
    words = {v for k, v in vars(_outcomes).items() if k.isupper() and isinstance(v, str)}
    words |= set(typing.get_args(_outcomes.Outcome))
    words |= set(_tracing.CALL_OUTCOMES)
    words |= set(re.findall(r'call_outcome = "(\w+)"', _source("_review_log.py")))
    for line in re.findall(r"cause = (.*)", _source("_breakers.py")):
        words |= set(re.findall(r'"(\w+)"', line))
    words |= set(re.findall(r'reason = "(\w+)"', _source("_planner.py")))
    words |= set(re.findall(r'extra\["(?:hedge|retry)_skipped"\] = "(\w+)"', _source("_planner.py")))
    words |= set(_tracing._ADMISSIONS)  # llm_resilience.breaker.admission
    role_rule = inspect.getsource(_tracing._role)  # llm_resilience.attempt.role
    words |= set(re.findall(r'return "(\w+)"', role_rule)) | set(re.findall(r'else "(\w+)"', role_rule))
    cut_rule = inspect.getsource(_planner.Call._cut_by)  # llm_resilience.cut_by
    words |= set(re.findall(r'return "(\w+)"', cut_rule)) | set(re.findall(r'named = "(\w+)"', cut_rule))
    words |= set(re.findall(r'bounds\.get\("(\w+)"', cut_rule)) | set(
        re.findall(r'cut_by = "(\w+)"', _source("_planner.py"))
    )
    words |= {"launched", "closed", "open", "half-open"}
    return {w for w in words if w}


def test_the_glossary_explains_every_word_the_code_can_print() -> None:
    missing = code_vocabulary() - _glossary_words()
    assert not missing, f"docs/reference/glossary.md lacks {sorted(missing)}"


def test_every_glossary_word_is_one_the_code_prints() -> None:
    source = "\n".join(p.read_text(encoding="utf-8") for p in PACKAGE.rglob("*.py"))
    for word in _glossary_words() - {"(probe)", "(hedge)", "(retry)", "(join)", "(panic)"}:
        assert f'"{word}"' in source or f"'{word}'" in source, f"the glossary explains {word!r}, which no code prints"
    for mark in ("probe", "hedge", "retry", "join", "panic"):
        assert f'"{mark}"' in _source("_tracing.py"), f"path mark ({mark}) is not in _tracing.py"


def test_the_breaker_counts_default_is_one_list() -> None:
    assert frozenset(DEFAULT_BREAKER_COUNTS) == BreakerSettings().count


# ---------------------------------------------------------------------------------------------
# The module map and the guarantees.


def test_the_module_map_lists_exactly_the_package_modules() -> None:
    contributing = (ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8")
    block = contributing.split("## Module map", 1)[1].split("```", 2)[1]
    named = set(re.findall(r"\b(\w+\.py)\b", block))
    present = {p.name for p in PACKAGE.glob("*.py")}

    assert named == present, f"CONTRIBUTING.md module map: missing {present - named}, stale {named - present}"
    assert "testing/" in block and (PACKAGE / "testing").is_dir()


def test_every_test_the_guarantees_page_names_exists() -> None:
    named = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", _page("guarantees.md"))
    assert len(named) >= 10
    for path, name in named:
        source = (ROOT / path).read_text(encoding="utf-8")
        assert re.search(rf"^(async )?def {name}\(", source, re.MULTILINE), f"guarantees.md names {path}::{name}"


def test_the_docs_benchmark_pages_include_results_files_and_copy_no_figures() -> None:
    results = {p.name for p in (ROOT / "benchmarks" / "results").glob("*.md")}
    included = set()
    for page in (DOCS / "benchmarks").glob("*.md"):
        text = page.read_text(encoding="utf-8")
        included |= {Path(p).name for p in re.findall(r'--8<-- "benchmarks/results/([\w.-]+)"', text)}
        own_tables = [line for line in text.splitlines() if line.startswith("|") and re.search(r"\d", line)]
        figures = [line for line in own_tables if re.search(r"\|\s*[\d,.]+\s*(ms|%)?\s*\|", line)]
        assert not figures, f"{page.name} has a table of figures of its own: include the results file instead"
    assert included == results, f"results files no page includes: {results - included}"


def test_every_results_file_says_when_and_on_what_machine() -> None:
    for path in (ROOT / "benchmarks" / "results").glob("*.md"):
        head = path.read_text(encoding="utf-8")[:1500]
        assert re.search(r"Measured (by )?\d{4}-\d\d-\d\d \d\d:\d\d UTC", head), f"{path.name}: no date"
        assert re.search(r"\d+ CPUs", head), f"{path.name}: no machine"


def test_every_public_name_is_on_the_api_page_with_a_docstring() -> None:
    import llm_resilience
    import llm_resilience.testing

    api = _page("reference/api.md")
    for name in (n for n in llm_resilience.__all__ if n != "__version__"):
        assert f"::: llm_resilience.{name}\n" in api, f"docs/reference/api.md does not document llm_resilience.{name}"
        assert (getattr(llm_resilience, name).__doc__ or "").strip(), f"llm_resilience.{name} has no docstring"
    for name in ("FakeProvider", "Behavior", "provider_process"):
        assert f"::: llm_resilience.testing.{name}\n" in api
        assert (getattr(llm_resilience.testing, name).__doc__ or "").strip(), f"testing.{name} has no docstring"
