"""What a broken policy's problems say, word for word (README "Policy files": file, line, field, what is wrong).

``test_policy.py`` checks that every problem names its file, line and field; these pin the rest of
each line, the part ops read to fix the file: what was expected, and what was found (never the
value itself under a secret-looking key). Mutation testing found the wording unpinned.
"""

from __future__ import annotations

import pytest

from llm_resilience import Policy, PolicyError

pytestmark = pytest.mark.sans_io  # no server: `make mutate` runs these for every mutant

MODELS = "models:\n  big: {litellm_params: {model: openai/x}}\n"
ROUTE = "routes:\n  chat: {chain: [big]}\n"


def problems(text: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        Policy.from_yaml(text)
    return info.value.problems


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("hello\n", "<string>:1: the policy must be a mapping of sections, got a string"),
        ("- a\n- b\n", "<string>:1: the policy must be a mapping of sections, got a list"),
        ("42\n", "<string>:1: the policy must be a mapping of sections, got int"),
        (
            "models:\n  big: {}\n" + ROUTE,
            "<string>:2: models.big.litellm_params: required field is missing",
        ),
        (
            MODELS + ROUTE + "prompt_classes:\n  default: {timeout_s: ~, deadline_s: 5}\n",
            "<string>:6: prompt_classes.default.timeout_s: input should be a valid number (got None)",
        ),
        (
            MODELS + ROUTE + "prompt_classes:\n  default: {timeout_s: 1, deadline_s: soon}\n",
            "<string>:6: prompt_classes.default.deadline_s: input should be a valid number, "
            "unable to parse string as a number (got 'soon')",
        ),
        (
            MODELS + "routes:\n  chat: {chain: 5}\n",
            "<string>:4: routes.chat.chain: input should be a valid list (got 5)",
        ),
        (
            MODELS + "routes:\n  chat: {chain: {big: 1}}\n",
            "<string>:4: routes.chat.chain: input should be a valid list (got a mapping)",
        ),
        (
            MODELS + ROUTE + "prompt_classes:\n  default: {timeout_s: [1], deadline_s: 5}\n",
            "<string>:6: prompt_classes.default.timeout_s: input should be a valid number (got a list)",
        ),
        (
            MODELS + "routes:\n  chat: {chain: [big], retries: {retry_on: [timeout]}}\n",
            "<string>:4: routes.chat.retries.retry_on: a timeout is never retried on the same model; "
            "remove it from 'retry_on'",
        ),
    ],
    ids=[
        "string", "list", "number", "missing", "null", "unparsable", "scalar_for_list", "mapping_for_list",
        "list_for_number", "validator_message",
    ],
)  # fmt: skip
def test_each_problem_says_what_was_expected_and_what_was_found(text: str, expected: str) -> None:
    assert problems(text) == [expected]


@pytest.mark.parametrize(
    ("after", "found"),
    [("[1]", "a list"), ("{a: 1}", "a mapping"), ("~", "nothing"), ("true", "bool")],
)
def test_a_hedge_threshold_of_the_wrong_kind_says_what_it_was(after: str, found: str) -> None:
    text = MODELS + f"routes:\n  chat: {{chain: [big], hedge: {{after: {after}}}}}\n"

    assert problems(text) == [
        f"<string>:4: routes.chat.hedge.after: expected seconds or a percentile such as 'p95', got {found}"
    ]


def test_a_wrong_value_under_a_secret_looking_key_is_not_echoed() -> None:
    text = (
        MODELS
        + ROUTE
        + "prompt_classes:\n  default: {timeout_s: 1, deadline_s: 5}\n"
        + "  tagged: {timeout_s: 1, deadline_s: 5, match: [{metadata: {api_token: [hunter2]}}]}\n"
    )

    (problem,) = problems(text)

    assert problem == (
        "<string>:7: prompt_classes.tagged.match[0].metadata.api_token: input should be a valid string (got <redacted>)"
    )


def test_a_wrong_value_under_an_ordinary_key_is_shown() -> None:
    text = (
        MODELS
        + ROUTE
        + "prompt_classes:\n  default: {timeout_s: 1, deadline_s: 5}\n"
        + "  tagged: {timeout_s: 1, deadline_s: 5, match: [{metadata: {team: [search]}}]}\n"
    )

    assert problems(text) == [
        "<string>:7: prompt_classes.tagged.match[0].metadata.team: input should be a valid string (got a list)"
    ]


def test_a_float_key_says_what_yaml_read_and_is_then_an_unknown_key() -> None:
    assert problems(MODELS + ROUTE + "3.5: x\n") == [
        "<string>:5: 3.5: '3.5' was read as the float 3.5; quote it (\"3.5\")",
        "<string>:5: 3.5: unknown key '3.5' (expected one of: version, models, routes, prompt_classes, breakers, "
        "errors, review_log, telemetry, state)",
    ]


def test_the_built_in_policy_names_its_source_and_has_the_built_in_class() -> None:
    builtin = Policy.defaults()

    assert builtin.source == "<built-in defaults>"
    assert (builtin.classes["default"].timeout_s, builtin.classes["default"].deadline_s) == (60.0, 180.0)
