"""The README says what the code does, where a test can tell: module map, policy reference, defaults.

Each failure names what to update: the prose or the code. (Changing a built-in default without the
README, e.g. ``fail_max`` 5 -> 50, fails here.)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from llm_resilience import _policy
from llm_resilience._policy import (
    BUILTIN_DEFAULT_CLASS,
    DEFAULT_BREAKER_COUNTS,
    BreakerConfig,
    BreakerSettings,
    ErrorsConfig,
    MatchRule,
    ModelConfig,
    PromptClass,
    ReviewLogConfig,
    Route,
    RouteOptions,
    StateConfig,
    TelemetryConfig,
)

pytestmark = pytest.mark.sans_io  # no server: `make mutate` runs these for every mutant

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
PACKAGE = ROOT / "llm_resilience"

SECTIONS: dict[str, type[BaseModel]] = {
    "models.NAME": ModelConfig,
    "routes.NAME": Route,
    "prompt_classes.NAME": PromptClass,
    "breakers.default / breakers.MODEL": BreakerConfig,
    "errors": ErrorsConfig,
    "review_log": ReviewLogConfig,
    "telemetry": TelemetryConfig,
    "state": StateConfig,
}
# Defaults the table states in words, because the code's default is not a literal value.
WORDED_DEFAULTS = {
    ("models.NAME", "context_window"): "litellm's map",
    ("models.NAME", "input_cost_per_token"): "litellm's map",
    ("models.NAME", "output_cost_per_token"): "litellm's map",
    ("routes.NAME", "validators"): "all built-ins `fall_back`",
    ("prompt_classes.NAME", "first_token_timeout_s"): "`timeout_s`",
    ("prompt_classes.NAME", "idle_timeout_s"): "`timeout_s`",
    ("models.NAME", "assistant_prefill"): "litellm's map; unknown: no",
}
NONE_WORDS = ("—", "off", "none")


def reference_rows() -> list[tuple[str, list[str], str, str]]:
    """(section, keys, meaning, default) for every row of the policy reference table."""
    body = README.split("## Policy reference", 1)[1].split("\n## ", 1)[0]
    rows = []
    section = ""
    for line in body.splitlines():
        if not line.startswith("| ") or line.startswith("| section") or line.startswith("|---"):
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        first, key_cell, meaning, default = cells
        section = first.replace("`", "") or section
        rows.append((section, re.findall(r"`([^`]+)`", key_cell), meaning, default))
    assert rows, "the policy reference table was not found"
    return rows


def test_module_map_lists_exactly_the_package_modules() -> None:
    block = README.split("## How it decides", 1)[1].split("```", 2)[1]
    named = set(re.findall(r"\b(\w+\.py)\b", block))
    present = {p.name for p in PACKAGE.glob("*.py")}

    assert named == present, f"README module map: missing {present - named}, stale {named - present}"
    assert "testing/" in block and (PACKAGE / "testing").is_dir()


def test_every_reference_key_exists_in_the_schema_and_every_schema_key_is_in_the_table() -> None:
    documented: dict[str, set[str]] = {name: set() for name in SECTIONS}
    for section, keys, meaning, _ in reference_rows():
        assert section in SECTIONS, f"README table section {section!r} is not a policy section"
        model = SECTIONS[section]
        for key in keys:
            name = key.split(".")[0]  # `classes.CLASS` -> classes
            assert name in model.model_fields, f"README documents {section}.{name}, which the schema does not have"
            documented[section].add(name)
            nested = _nested_model(model.model_fields[name].annotation)
            if nested is not None:  # e.g. hedge: `{after: p95 | seconds, max_extra, budget_ratio}`
                listed = _listed_subkeys(meaning)
                assert listed == set(nested.model_fields), (
                    f"README {section}.{name} lists {sorted(listed)}; the schema has {sorted(nested.model_fields)}"
                )
    for section, model in SECTIONS.items():
        assert documented[section] == set(model.model_fields), (
            f"README table for {section}: missing {set(model.model_fields) - documented[section]}"
        )


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    for candidate in (annotation, *getattr(annotation, "__args__", ())):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
        for inner in getattr(candidate, "__args__", ()):  # dict[str, RouteOptions], list[MatchRule]
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                return inner
    return None


def _listed_subkeys(meaning: str) -> set[str]:
    braces = re.search(r"\{([^}]*)\}", meaning)
    if braces:
        return {part.split(":")[0].strip().strip("`") for part in braces.group(1).split(",")}
    after_colon = meaning.split(":", 1)[1] if ":" in meaning else meaning
    return set(re.findall(r"`([a-z_]+)`", after_colon))


def _fmt(value: Any) -> str:
    if value is None:
        return "—"  # no default (e.g. a URL the policy must give)
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple | frozenset):
        return ", ".join(sorted(map(str, value)))
    return str(value)


def code_default(section: str, key: str) -> Any:
    """The default the engine applies: BreakerSettings for breakers (the schema's None means 'inherit')."""
    if section.startswith("breakers"):
        return getattr(BreakerSettings(), key)
    field = SECTIONS[section].model_fields[key]
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
        return getattr(value, "strategy", getattr(value, "on_interrupt", value))  # a section named by its mode
    return None if field.default is PydanticUndefined else field.default


@pytest.mark.parametrize("row", reference_rows(), ids=lambda r: f"{r[0]}:{','.join(r[1])}")
def test_the_defaults_column_is_what_the_code_applies(row: tuple[str, list[str], str, str]) -> None:
    section, keys, _, default = row
    names = [k.split(".")[0] for k in keys]
    if all((section, name) in WORDED_DEFAULTS for name in names):
        assert {WORDED_DEFAULTS[(section, name)] for name in names} == {default}
        return
    values = [code_default(section, name) for name in names]
    if default.strip("`") in NONE_WORDS:
        assert all(v in (None, [], {}) for v in values), f"README says {section}.{names} has no default: {values}"
        return
    stated = [part.strip().strip("`") for part in default.split(", ")] if len(names) > 1 else [default.strip("`")]
    assert [_fmt(v) for v in values] == (stated if len(names) > 1 else [", ".join(sorted(stated[0].split(", ")))]), (
        f"README default for {section}.{names}: {default!r}; the code: {values}"
    )


def test_breaker_counts_default_is_one_list() -> None:
    assert frozenset(DEFAULT_BREAKER_COUNTS) == BreakerSettings().count


def test_the_built_in_class_in_the_prose_is_the_one_in_the_code() -> None:
    m = re.search(r"a built-in one applies\s+\(`timeout_s: ([\d.]+), deadline_s: ([\d.]+)`\)", README)
    assert m, "README no longer states the built-in class"
    assert (float(m.group(1)), float(m.group(2))) == (
        BUILTIN_DEFAULT_CLASS["timeout_s"],
        BUILTIN_DEFAULT_CLASS["deadline_s"],
    )


def test_the_stated_parsing_limits_are_the_code_limits() -> None:
    assert f"nested deeper than {_policy.MAX_YAML_DEPTH} levels" in README
    assert f"more than {_policy.MAX_YAML_VALUES:,} values" in README
    assert f"at most a day ({_policy.MAX_SECONDS:g} s)" in README
    assert f"timeouts are at least {_policy.MIN_TIMEOUT_S:g} s" in README


def test_match_rules_and_class_overrides_are_documented() -> None:
    # Sub-sections the table reaches through `match` and `classes.CLASS` (checked above via the braces).
    assert _nested_model(PromptClass.model_fields["match"].annotation) is MatchRule
    assert _nested_model(Route.model_fields["classes"].annotation) is RouteOptions
