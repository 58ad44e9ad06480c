"""Cross-references between policy sections, word for word (README "Policy files").

A per-field schema cannot say that a chain names a model that does not exist, that a route
overrides a prompt class nobody defined, or that a validator name is misspelt. These checks run
next to the schema (a broken section never hides them) and cover the per-class overrides inside a
route as well as the route itself. Mutation testing found the overrides' checks and the words of
these problems unpinned.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

import llm_resilience
from llm_resilience import Policy, PolicyError
from llm_resilience._validators import _registry, register_validator

pytestmark = pytest.mark.sans_io  # no server: `make mutate` runs these for every mutant

MODELS = "models:\n  big: {litellm_params: {model: openai/x}}\n  small: {litellm_params: {model: openai/y}}\n"
CLASSES = "prompt_classes:\n  quick: {timeout_s: 1, deadline_s: 2}\n  long: {timeout_s: 1, deadline_s: 2}\n"
UNREGISTERED = "a custom validator must be registered with llm_resilience.register_validator"
BUILT_IN = "built-in validators: empty, truncated, invalid_json, content_filter"


def problems(text: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        Policy.from_yaml(text)
    return info.value.problems


@pytest.fixture
def _clean_registry() -> Iterator[None]:
    saved = dict(_registry)
    yield None
    _registry.clear()
    _registry.update(saved)


@pytest.mark.parametrize(
    ("routes", "expected"),
    [
        (
            "  chat: {chain: [big], classes: {quick: {chain: [small, ghost]}}}\n",
            [
                "<string>:5: routes.chat.classes.quick.chain[1]: unknown model 'ghost' "
                "(defined under models: big, small)"
            ],
        ),
        (
            "  chat: {chain: [big], classes: {code: {chain: [small]}}}\n",
            ["<string>:5: routes.chat.classes.code: unknown prompt class 'code' (defined: quick, long)"],
        ),
        (
            "  chat: {chain: [big, small, big, small]}\n",
            ["<string>:5: routes.chat.chain: model 'big' appears twice in the chain"],
        ),
        (
            "  chat: {chain: [big], classes: {long: {chain: [small, small]}}}\n",
            ["<string>:5: routes.chat.classes.long.chain: model 'small' appears twice in the chain"],
        ),
        (
            "  broken: 5\n  chat: {chain: [ghost]}\n",
            [
                "<string>:5: routes.broken: input should be a valid dictionary or instance of Route (got 5)",
                "<string>:6: routes.chat.chain[0]: unknown model 'ghost' (defined under models: big, small)",
            ],
        ),
    ],
    ids=["class_chain_unknown_model", "unknown_class", "first_duplicate_named", "class_chain_duplicate",
         "a_broken_route_does_not_stop_the_next"],
)  # fmt: skip
def test_each_cross_reference_problem_names_what_is_wrong_and_what_exists(routes: str, expected: list[str]) -> None:
    assert problems(MODELS + "routes:\n" + routes + CLASSES) == expected


def test_a_class_override_needs_a_defined_class_even_without_a_prompt_classes_section() -> None:
    assert problems(MODELS + "routes:\n  chat: {chain: [big], classes: {code: {chain: [small]}}}\n") == [
        "<string>:5: routes.chat.classes.code: unknown prompt class 'code' (defined: none)"
    ]


def test_the_default_class_may_be_overridden_without_being_defined() -> None:
    policy = Policy.from_yaml(MODELS + "routes:\n  chat: {chain: [big], classes: {default: {chain: [small]}}}\n")

    assert [m.name for m in policy.route_for("chat", "default").chain] == ["small"]


def test_a_misspelt_validator_names_what_exists_and_how_to_register_one() -> None:
    assert problems(MODELS + "routes:\n  chat: {chain: [big], validators: {emty: flag}}\n") == [
        f"<string>:5: routes.chat.validators.emty: 'emty' is an unknown validator ({BUILT_IN}; registered: none); "
        f"did you mean 'empty'? {UNREGISTERED}('emty', fn) before the policy is loaded"
    ]


def test_an_error_kind_is_never_suggested_for_a_validator() -> None:
    (problem,) = problems(MODELS + "routes:\n  chat: {chain: [big], validators: {timout: flag}}\n")

    assert problem == (
        f"<string>:5: routes.chat.validators.timout: 'timout' is an unknown validator ({BUILT_IN}; registered: none); "
        f"{UNREGISTERED}('timout', fn) before the policy is loaded"
    )


def test_a_misspelt_breaker_count_suggests_the_error_kind() -> None:
    text = MODELS + "routes:\n  chat: {chain: [big]}\nbreakers:\n  default: {count: [timeout, server_eror]}\n"

    assert problems(text) == [
        f"<string>:7: breakers.default.count[1]: 'server_eror' is neither an error kind nor a validator ({BUILT_IN}; "
        f"registered: none); did you mean 'server_error'? {UNREGISTERED}('server_eror', fn) before the policy is loaded"
    ]


def test_validators_of_the_route_and_of_its_classes_are_all_checked() -> None:
    text = (
        MODELS
        + "routes:\n  broken: 5\n"
        + "  chat:\n    chain: [big]\n    validators: {empty: flag, emty: flag}\n"
        + "    classes:\n      quick: {validators: {truncate: flag}}\n"
        + CLASSES
    )

    assert [p.split(": ")[1] for p in problems(text)] == [
        "routes.broken",
        "routes.chat.validators.emty",
        "routes.chat.classes.quick.validators.truncate",
    ]


def test_the_registered_validators_are_listed_as_known(_clean_registry: object) -> None:
    register_validator("has_citation", lambda response, request: True)
    register_validator("cites_sources", lambda response, request: True)

    (problem,) = problems(MODELS + "routes:\n  chat: {chain: [big], validators: {has_citaton: flag}}\n")

    assert f"({BUILT_IN}; registered: cites_sources, has_citation); did you mean 'has_citation'? " in problem


def test_a_breaker_section_that_is_not_a_mapping_is_a_problem_not_a_crash() -> None:
    assert problems(MODELS + "routes:\n  chat: {chain: [big]}\nbreakers:\n  default: 5\n") == [
        "<string>:7: breakers.default: input should be a valid dictionary or instance of BreakerConfig (got 5)"
    ]


def test_validator_names_are_checked_without_importing_litellm() -> None:
    # `llm-resilience validate` answers at once: nothing registered a validator, so litellm (~2 s) stays out.
    # The package this test imports (under `make mutate`, the mutated copy), in a fresh process.
    text = MODELS + "routes:\n  chat: {chain: [big], validators: {emty: flag}}\n"
    script = textwrap.dedent(
        f"""
        import sys
        from llm_resilience._policy import Policy, PolicyError
        try:
            Policy.from_yaml({text!r})
        except PolicyError as e:
            print(e.problems[0].split(": ")[1])
        print(sorted(m for m in sys.modules if m == "litellm" or m.startswith("litellm.")))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(Path(llm_resilience.__file__).parent.parent)}

    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["routes.chat.validators.emty", "[]"]
