"""Routes litellm knows: get_model_info / supports_* / token_counter answer for a route's weakest link."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable
from typing import Any

import litellm
import pytest
from conftest import MESSAGES, EngineFactory, PolicyBuilder
from litellm.litellm_core_utils.fallback_generalizations import (
    get_fallback_generalization_rules,
    set_fallback_generalizations,
)

from llm_resilience import Policy
from llm_resilience._routes import register_routes
from llm_resilience.testing import FakeProvider


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


def test_token_counter_for_a_route_counts_with_litellm_default_tokenizer(
    make_engine: EngineFactory, policy_dict: PolicyBuilder
) -> None:
    make_engine(policy_dict(["big", "small"]))
    long = [{"role": "user", "content": "the quarterly otter census, river by river. " * 200}]

    for messages in (MESSAGES, long):
        route = litellm.token_counter(model="chat", messages=messages)
        assert route == litellm.token_counter(model="a-model-litellm-does-not-know", messages=messages)
        model = litellm.token_counter(model="openai/gpt-4o", messages=messages)  # o200k_base
        assert abs(route - model) <= 0.1 * model, (route, model)  # close enough to size a prompt by


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


def _stand_in_for_openai(monkeypatch: pytest.MonkeyPatch, provider: FakeProvider) -> None:
    """litellm sends a bare OpenAI model name to ``OPENAI_BASE_URL`` with ``OPENAI_API_KEY``: point both here."""
    monkeypatch.setenv("OPENAI_BASE_URL", provider.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-application-key")


def _through_litellm(name: str) -> dict[str, Callable[[], Any]]:
    kwargs: dict[str, Any] = {"messages": MESSAGES, "num_retries": 0, "max_retries": 0}
    deployment = [{"model_name": "deployment", "litellm_params": {"model": name}}]
    return {
        "completion": lambda: litellm.completion(model=name, **kwargs),
        "acompletion": lambda: asyncio.run(litellm.acompletion(model=name, **kwargs)),
        "stream": lambda: list(litellm.completion(model=name, stream=True, **kwargs)),
        "text_completion": lambda: litellm.text_completion(model=name, prompt="hi", max_retries=0),
        "responses": lambda: litellm.responses(model=name, input="hi", max_retries=0),
        "aresponses": lambda: asyncio.run(litellm.aresponses(model=name, input="hi", max_retries=0)),
        "embedding": lambda: litellm.embedding(model=name, input=["hi"], max_retries=0),
        "aembedding": lambda: asyncio.run(litellm.aembedding(model=name, input=["hi"], max_retries=0)),
        "image_generation": lambda: litellm.image_generation(model=name, prompt="hi", max_retries=0),
        "router": lambda: litellm.Router(model_list=deployment).completion(model="deployment", **kwargs),
        "async router": lambda: asyncio.run(
            litellm.Router(model_list=deployment).acompletion(model="deployment", **kwargs)
        ),
        "router responses": lambda: litellm.Router(model_list=deployment).responses(model="deployment", input="hi"),
    }


@pytest.mark.parametrize("name", ["chat", "big"])
def test_a_route_name_called_through_litellm_itself_fails_loudly_and_sends_nothing(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    make_engine(policy_dict(["big", "small"]))
    with FakeProvider() as stand_in:
        _stand_in_for_openai(monkeypatch, stand_in)
        for how, call in _through_litellm(name).items():
            with pytest.raises(litellm.BadRequestError, match=r"llm_resilience\.completion") as caught:
                call()
            assert "sk-application-key" not in str(caught.value), how

        assert stand_in.requests == [] and stand_in.other_requests == []
    assert litellm.supports_function_calling(name) is True  # capability look-ups still answer


def test_a_route_name_the_new_policy_dropped_is_litellm_own_again(
    make_engine: EngineFactory, policy_dict: PolicyBuilder
) -> None:
    old = policy_dict(["big"])
    old["routes"]["extract"] = {"chain": ["big"]}
    engine = make_engine(old)

    register_routes(Policy.from_dict(policy_dict(["big"])), owner=engine)

    assert litellm.get_llm_provider("chat")[1] == "llm-resilience"
    with pytest.raises(litellm.BadRequestError, match="LLM Provider NOT provided"):
        litellm.get_llm_provider("extract")  # unknown to litellm, as before the engine: no longer ours to refuse


def test_a_litellm_routing_rule_never_claims_a_route_name(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, monkeypatch: pytest.MonkeyPatch
) -> None:
    # litellm resolves unknown names by pattern rules from its cost map (e.g. future claude-* -> anthropic).
    rules = get_fallback_generalization_rules()
    claude_rule = {"pattern": "^claude", "model_info": {"litellm_provider": "anthropic"}}
    set_fallback_generalizations([*rules, claude_rule])
    try:
        policy = policy_dict(["big", "small"])
        policy["routes"]["claude-chat"] = {"chain": ["big"]}
        make_engine(policy)
        assert litellm.get_llm_provider("claude-chat")[1] == "llm-resilience"
        assert litellm.get_llm_provider("claude-next")[1] == "anthropic"  # litellm's rule still works
        with pytest.raises(litellm.BadRequestError, match=r"llm_resilience\.completion"):
            litellm.responses(model="claude-chat", input="hi", max_retries=0)
    finally:
        set_fallback_generalizations(rules)
