"""Partial failures: 200 answers that fail a validator, through the real litellm HTTP path."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping
from typing import Any

import pytest
from conftest import MESSAGES, Caller, EngineFactory, PolicyBuilder, hidden, outcomes
from pydantic import BaseModel

import llm_resilience
from llm_resilience import AllAttemptsFailed, PolicyError
from llm_resilience.testing import Behavior, FakeProvider

PERSON_SCHEMA = {
    "type": "json_schema",
    "json_schema": {
        "name": "person",
        "schema": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
            "required": ["name", "age"],
            "additionalProperties": False,
        },
    },
}
JSON_OBJECT = {"type": "json_object"}

_names = itertools.count()


def unique(prefix: str) -> str:
    """Validator names are process-global: each test registers its own."""
    return f"{prefix}_{next(_names)}"


class Person(BaseModel):
    name: str
    age: int


LOOKUP_TOOL = {
    "type": "function",
    "function": {
        "name": "lookup",
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]},
    },
}

# name -> (big's answer, extra call kwargs, expected reason)
SOFT_FAILURES: dict[str, tuple[Behavior, dict[str, Any], str]] = {
    "empty": (Behavior(body="empty"), {}, "empty"),
    "whitespace_only": (Behavior.ok("  \n "), {}, "empty"),
    "length_without_max_tokens": (Behavior(finish_reason="length"), {}, "truncated"),
    "not_json_for_json_object": (Behavior.ok('{"name": "Ada", '), {"response_format": JSON_OBJECT}, "invalid_json"),
    "json_array_for_json_object": (Behavior.json([1, 2]), {"response_format": JSON_OBJECT}, "invalid_json"),
    "schema_mismatch": (
        Behavior.json({"name": "Ada", "age": "old"}),
        {"response_format": PERSON_SCHEMA},
        "invalid_json",
    ),
    "schema_missing_field": (Behavior.json({"name": "Ada"}), {"response_format": PERSON_SCHEMA}, "invalid_json"),
    "pydantic_mismatch": (Behavior.json({"name": "Ada"}), {"response_format": Person}, "invalid_json"),
    "content_filter": (Behavior(finish_reason="content_filter"), {}, "content_filter"),
    "tool_arguments_not_json": (
        Behavior(tool_calls=[{"name": "lookup", "arguments": '{"q": "x'}]),
        {"tools": [{"type": "function", "function": {"name": "lookup"}}]},
        "invalid_json",
    ),
    "tool_arguments_not_an_object": (Behavior(tool_calls=[{"name": "lookup", "arguments": "[1]"}]), {}, "invalid_json"),
    "tool_arguments_schema_mismatch": (
        Behavior(tool_calls=[{"name": "lookup", "arguments": {"q": 3}}]),
        {"tools": [LOOKUP_TOOL]},
        "invalid_json",
    ),
    "tool_not_offered": (
        Behavior(tool_calls=[{"name": "delete_everything", "arguments": {}}]),
        {"tools": [LOOKUP_TOOL]},
        "invalid_json",
    ),
}


@pytest.mark.parametrize("case", list(SOFT_FAILURES))
def test_every_validator_kind_falls_back_by_default(
    case: str,
    call: Caller,
    big: FakeProvider,
    small: FakeProvider,
    make_engine: EngineFactory,
    policy_dict: PolicyBuilder,
) -> None:
    behavior, kwargs, reason = SOFT_FAILURES[case]
    big.set(behavior)
    small.set(Behavior.json({"name": "Ada", "age": 36}))
    engine = make_engine(policy_dict(["big", "small"]))

    response = call(engine, "chat", MESSAGES, **kwargs)

    assert outcomes(response) == [("big", "soft_failure", reason), ("small", "success", None)]
    assert response.choices[0].message.content == '{"name": "Ada", "age": 36}'
    assert hidden(response)["flagged"] is False
    assert big.request_count == 1 and small.request_count == 1


GOOD_ANSWERS: dict[str, tuple[Behavior, dict[str, Any]]] = {
    "length_with_max_tokens": (Behavior(finish_reason="length"), {"max_tokens": 5}),
    "length_with_max_completion_tokens": (Behavior(finish_reason="length"), {"max_completion_tokens": 5}),
    "tool_call_without_text": (Behavior(tool_calls=[{"name": "lookup", "arguments": {"q": "x"}}]), {}),
    "json_object": (Behavior.json({"a": 1}), {"response_format": JSON_OBJECT}),
    "schema_match": (Behavior.json({"name": "Ada", "age": 36}), {"response_format": PERSON_SCHEMA}),
    "pydantic_match": (Behavior.json({"name": "Ada", "age": 36}), {"response_format": Person}),
    "text_when_no_json_asked": (Behavior.ok("not json at all"), {}),
    "tool_call_when_json_asked": (
        Behavior(tool_calls=[{"name": "lookup", "arguments": {"q": "x"}}]),
        {"response_format": JSON_OBJECT},
    ),
}


@pytest.mark.parametrize("case", list(GOOD_ANSWERS))
def test_answers_that_are_fine_are_accepted_from_the_first_model(
    case: str, big: FakeProvider, small: FakeProvider, make_engine: EngineFactory, policy_dict: PolicyBuilder
) -> None:
    behavior, kwargs = GOOD_ANSWERS[case]
    big.set(behavior)
    engine = make_engine(policy_dict(["big", "small"]))

    response = engine.completion("chat", MESSAGES, **kwargs)

    assert outcomes(response) == [("big", "success", None)]
    assert small.request_count == 0


def test_max_tokens_set_in_the_models_litellm_params_also_means_length_is_expected(
    big: FakeProvider, small: FakeProvider, make_engine: EngineFactory, policy_dict: PolicyBuilder
) -> None:
    policy = policy_dict(["big", "small"])
    policy["models"]["big"]["litellm_params"]["max_tokens"] = 16
    big.set(Behavior(finish_reason="length"))
    engine = make_engine(policy)

    response = engine.completion("chat", MESSAGES)

    assert outcomes(response) == [("big", "success", None)]
    assert big.requests[0].body["max_tokens"] == 16


def test_flag_returns_the_answer_marked_as_flagged(
    call: Caller, big: FakeProvider, small: FakeProvider, make_engine: EngineFactory, policy_dict: PolicyBuilder
) -> None:
    big.set(Behavior(finish_reason="length", content="half an ans"))
    engine = make_engine(policy_dict(["big", "small"]) | {"routes": {"chat": {
        "chain": ["big", "small"], "validators": {"truncated": "flag"}}}})  # fmt: skip

    response = call(engine, "chat", MESSAGES)

    assert response.choices[0].message.content == "half an ans"
    assert outcomes(response) == [("big", "flagged", "truncated")]
    assert hidden(response)["flagged"] is True
    assert hidden(response)["model"] == "big"
    assert small.request_count == 0


def test_off_disables_a_validator(
    big: FakeProvider, small: FakeProvider, make_engine: EngineFactory, policy_dict: PolicyBuilder
) -> None:
    big.set(Behavior(body="empty"))
    engine = make_engine(policy_dict(["big", "small"]) | {"routes": {"chat": {
        "chain": ["big", "small"], "validators": {"empty": "off"}}}})  # fmt: skip

    response = engine.completion("chat", MESSAGES)

    assert outcomes(response) == [("big", "success", None)]
    assert hidden(response)["flagged"] is False
    assert small.request_count == 0


def test_a_prompt_class_overrides_the_routes_validator_action(
    big: FakeProvider, small: FakeProvider, make_engine: EngineFactory, policy_dict: PolicyBuilder
) -> None:
    route = {
        "chain": ["big", "small"],
        "validators": {"empty": "flag"},
        "classes": {"strict": {"validators": {"empty": "fall_back"}}},
    }
    policy = policy_dict(["big", "small"], prompt_classes={"strict": {"timeout_s": 1, "deadline_s": 5}})
    engine = make_engine(policy | {"routes": {"chat": route}})
    big.set(Behavior(body="empty"))

    relaxed = engine.completion("chat", MESSAGES)
    strict = engine.completion("chat", MESSAGES, prompt_class="strict")

    assert outcomes(relaxed) == [("big", "flagged", "empty")]
    assert outcomes(strict) == [("big", "soft_failure", "empty"), ("small", "success", None)]


def test_when_every_answer_is_invalid_the_default_is_to_raise(
    call: Caller, big: FakeProvider, small: FakeProvider, make_engine: EngineFactory, policy_dict: PolicyBuilder
) -> None:
    big.set(Behavior(body="empty"))
    small.set(Behavior(finish_reason="content_filter"))
    engine = make_engine(policy_dict(["big", "small"]))

    with pytest.raises(AllAttemptsFailed) as info:
        call(engine, "chat", MESSAGES)

    assert outcomes(info.value.attempts) == [
        ("big", "soft_failure", "empty"),
        ("small", "soft_failure", "content_filter"),
    ]


def test_return_best_returns_the_first_invalid_answer_flagged(
    big: FakeProvider, small: FakeProvider, make_engine: EngineFactory, policy_dict: PolicyBuilder
) -> None:
    big.set(Behavior.ok('{"name": "Ada"'))
    small.set(Behavior.ok("also not json"))
    engine = make_engine(policy_dict(["big", "small"]) | {"routes": {"chat": {
        "chain": ["big", "small"], "on_all_invalid": "return_best"}}})  # fmt: skip

    response = engine.completion("chat", MESSAGES, response_format=JSON_OBJECT)

    assert response.choices[0].message.content == '{"name": "Ada"'
    summary = hidden(response)
    assert summary["model"] == "big"
    assert summary["flagged"] is True
    assert outcomes(response) == [("big", "soft_failure", "invalid_json"), ("small", "soft_failure", "invalid_json")]


# -- custom validators --------------------------------------------------------------------------


def test_a_registered_custom_validator_referenced_by_the_policy_falls_back(
    call: Caller, big: FakeProvider, small: FakeProvider, make_engine: EngineFactory, policy_dict: PolicyBuilder
) -> None:
    name = unique("no_apology")
    seen: list[Mapping[str, Any]] = []

    def no_apology(response: Any, request: Mapping[str, Any]) -> bool | str | None:
        seen.append(request)
        return None if "sorry" not in response.choices[0].message.content else "apologised"

    llm_resilience.register_validator(name, no_apology)
    big.set(Behavior.ok("sorry, I cannot"))
    small.set(Behavior.ok("here you go"))
    engine = make_engine(policy_dict(["big", "small"]) | {"routes": {"chat": {
        "chain": ["big", "small"], "validators": {name: "fall_back"}}}})  # fmt: skip

    response = call(engine, "chat", MESSAGES, temperature=0.1)

    assert outcomes(response) == [("big", "soft_failure", name), ("small", "success", None)]
    assert response.choices[0].message.content == "here you go"
    assert len(seen) == 2
    assert seen[0]["model"] == "openai/gpt-4o" and seen[0]["temperature"] == 0.1
    assert list(seen[0]["messages"]) == MESSAGES
    assert "api_key" not in seen[0]


def test_a_custom_validator_returning_false_and_flag_action(
    big: FakeProvider, small: FakeProvider, make_engine: EngineFactory, policy_dict: PolicyBuilder
) -> None:
    name = unique("short_enough")
    llm_resilience.register_validator(name, lambda response, request: len(response.choices[0].message.content) < 5)
    big.set(Behavior.ok("far too long an answer"))
    engine = make_engine(policy_dict(["big", "small"]) | {"routes": {"chat": {
        "chain": ["big", "small"], "validators": {name: "flag"}}}})  # fmt: skip

    response = engine.completion("chat", MESSAGES)

    assert outcomes(response) == [("big", "flagged", name)]
    assert hidden(response)["flagged"] is True


def test_a_custom_validator_runs_only_where_the_policy_names_it(
    big: FakeProvider, make_engine: EngineFactory, policy_dict: PolicyBuilder
) -> None:
    name = unique("never_called")
    calls: list[Any] = []
    llm_resilience.register_validator(name, lambda response, request: calls.append(response) or False)
    engine = make_engine(policy_dict(["big", "small"]))

    response = engine.completion("chat", MESSAGES)

    assert outcomes(response) == [("big", "success", None)]
    assert calls == []


def test_a_custom_validator_that_raises_passes_and_is_logged_once(
    big: FakeProvider, make_engine: EngineFactory, policy_dict: PolicyBuilder, caplog: pytest.LogCaptureFixture
) -> None:
    name = unique("buggy")

    def buggy(response: Any, request: Mapping[str, Any]) -> bool:
        raise RuntimeError("bug in the check")

    llm_resilience.register_validator(name, buggy)
    engine = make_engine(policy_dict(["big", "small"]) | {"routes": {"chat": {
        "chain": ["big", "small"], "validators": {name: "fall_back"}}}})  # fmt: skip

    with caplog.at_level(logging.WARNING, logger="llm_resilience"):
        for _ in range(3):
            assert outcomes(engine.completion("chat", MESSAGES)) == [("big", "success", None)]

    warnings = [r for r in caplog.records if name in r.getMessage()]
    assert len(warnings) == 1


def test_a_policy_naming_an_unregistered_validator_is_rejected_at_engine_construction(
    make_engine: EngineFactory, policy_dict: PolicyBuilder
) -> None:
    route = {
        "chain": ["big", "small"],
        "validators": {"empty": "flag", "not_registered_anywhere": "fall_back"},
        "classes": {"default": {"validators": {"also_missing": "flag"}}},
    }

    with pytest.raises(PolicyError) as info:
        make_engine(policy_dict(["big", "small"]) | {"routes": {"chat": route}})

    message = str(info.value)
    assert "routes.chat.validators.not_registered_anywhere" in message
    assert "routes.chat.classes.default.validators.also_missing" in message
    assert "register_validator" in message
    assert len(info.value.problems) == 2


def test_register_validator_rejects_builtin_names_and_accidental_replacement() -> None:
    name = unique("once")
    llm_resilience.register_validator(name, lambda response, request: True)

    with pytest.raises(ValueError, match="built-in"):
        llm_resilience.register_validator("empty", lambda response, request: True)
    with pytest.raises(ValueError, match="already registered"):
        llm_resilience.register_validator(name, lambda response, request: False)
    llm_resilience.register_validator(name, lambda response, request: False, replace=True)


# -- breakers -------------------------------------------------------------------------------------


def test_soft_failures_count_toward_the_breaker_only_when_listed_in_count(
    big: FakeProvider, small: FakeProvider, make_engine: EngineFactory, policy_dict: PolicyBuilder
) -> None:
    big.set(Behavior(body="empty"))
    default_counts = make_engine(policy_dict(["big", "small"], fail_max=1))
    counts_empty = make_engine(policy_dict(["big", "small"], breakers={"big": {"fail_max": 1, "count": ["empty"]}}))

    for _ in range(2):
        default_counts.completion("chat", MESSAGES)
    assert default_counts.breaker_states()["big"] == "closed"
    assert big.request_count == 2

    counts_empty.completion("chat", MESSAGES)
    assert counts_empty.breaker_states()["big"] == "open"
    response = counts_empty.completion("chat", MESSAGES)
    assert outcomes(response) == [("big", "skipped", "breaker_open"), ("small", "success", None)]
    assert big.request_count == 3
