"""Routes litellm knows: get_model_info / supports_* / token_counter answer for a route's weakest link."""

from __future__ import annotations

import copy
from typing import Any

import litellm
import pytest
from conftest import MESSAGES, EngineFactory, PolicyBuilder

from llm_resilience import Policy
from llm_resilience._routes import register_routes


def _with_models(policy: dict[str, Any], **fields: dict[str, Any]) -> dict[str, Any]:
    for name, extra in fields.items():
        policy["models"][name].update(extra)
    return policy


def test_route_answers_what_holds_for_every_model_of_its_chain(
    make_engine: EngineFactory, policy_dict: PolicyBuilder
) -> None:
    policy = _with_models(policy_dict(["big", "small"]), small={"context_window": 50_000, "max_output_tokens": 900})
    make_engine(policy)

    info = litellm.get_model_info("chat")

    assert info["max_input_tokens"] == 50_000  # the smallest window: small's, from the policy
    assert info["max_output_tokens"] == 900
    assert litellm.supports_function_calling("chat") is True  # gpt-4o and gpt-4o-mini both do
    assert litellm.supports_response_schema("chat") is True
    assert litellm.supports_vision("chat") is True


def test_one_model_litellm_does_not_know_makes_the_route_support_nothing(
    make_engine: EngineFactory, policy_dict: PolicyBuilder
) -> None:
    make_engine(policy_dict(["big", "small", "tiny"]))

    assert litellm.supports_function_calling("chat") is False  # tiny-model: unknown to litellm
    assert litellm.supports_response_schema("chat") is False
    assert litellm.supports_vision("chat") is False
    assert litellm.get_model_info("chat")["max_input_tokens"] == 128_000  # unknown windows do not lower it


def test_prompt_class_chains_count_for_the_route(make_engine: EngineFactory, policy_dict: PolicyBuilder) -> None:
    policy = policy_dict(["big"])
    policy["routes"]["chat"]["classes"] = {"default": {"chain": ["tiny"]}}
    make_engine(policy)

    assert litellm.supports_function_calling("chat") is False


def test_model_names_of_the_policy_are_known_too(make_engine: EngineFactory, policy_dict: PolicyBuilder) -> None:
    make_engine(_with_models(policy_dict(), big={"context_window": 64_000}))

    assert litellm.get_model_info("big")["max_input_tokens"] == 64_000
    assert litellm.supports_function_calling("small") is True


def test_token_counter_for_a_route_counts_like_its_models(
    make_engine: EngineFactory, policy_dict: PolicyBuilder
) -> None:
    make_engine(policy_dict(["big", "small"]))

    counts = {m: litellm.token_counter(model=m, messages=MESSAGES) for m in ("chat", "openai/gpt-4o", "gpt-4o-mini")}

    assert len(set(counts.values())) == 1, counts


def test_a_route_named_like_a_litellm_model_leaves_litellm_entry_alone(
    make_engine: EngineFactory, policy_dict: PolicyBuilder
) -> None:
    before = copy.deepcopy(litellm.model_cost["gpt-4o-mini"])
    policy = policy_dict(["tiny"])
    policy["routes"]["gpt-4o-mini"] = policy["routes"].pop("chat")

    make_engine(policy)

    assert litellm.model_cost["gpt-4o-mini"] == before
    assert litellm.supports_function_calling("gpt-4o-mini") is True


def test_other_models_in_litellm_table_are_untouched(make_engine: EngineFactory, policy_dict: PolicyBuilder) -> None:
    before = {key: copy.deepcopy(value) for key, value in litellm.model_cost.items() if key not in ("chat", "big")}

    make_engine(policy_dict())

    after = {key: value for key, value in litellm.model_cost.items() if key in before}
    assert after == before


def test_reload_updates_routes_and_removes_those_the_new_policy_dropped(
    make_engine: EngineFactory, policy_dict: PolicyBuilder
) -> None:
    old = policy_dict(["big", "small"])
    old["routes"]["extract"] = {"chain": ["big"]}
    engine = make_engine(old)
    assert litellm.supports_function_calling("extract") is True

    register_routes(Policy.from_dict(policy_dict(["big", "tiny"])), owner=engine)

    assert litellm.supports_function_calling("chat") is False
    with pytest.raises(Exception, match="extract"):
        litellm.get_model_info("extract")


def test_the_engine_built_last_describes_a_shared_route_name(
    make_engine: EngineFactory, policy_dict: PolicyBuilder
) -> None:
    make_engine(policy_dict(["big", "tiny"]))
    make_engine(policy_dict(["big", "small"]))

    assert litellm.supports_function_calling("chat") is True
