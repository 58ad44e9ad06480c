"""Fallback through the real litellm HTTP path: what moves on to the next model, what is raised."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import litellm
import openai
import pytest
from conftest import API_KEYS, MESSAGES, PROMPT, Caller, EngineFactory, PolicyBuilder, free_port, hidden, outcomes

import llm_resilience
from llm_resilience import AllAttemptsFailed, Resilience
from llm_resilience.testing import Behavior, FakeProvider

# name -> (behaviour of the primary, expected reason). "refused" points the primary at a dead port.
TRIGGERS: dict[str, tuple[Behavior | None, str]] = {
    "timeout": (Behavior.slow(3.0), "timeout"),
    "no_answer_at_all": (Behavior(body="hang"), "timeout"),
    "connection_refused": (None, "connection"),
    "connection_reset": (Behavior(body="reset"), "connection"),
    "429": (Behavior.error(429, retry_after_s=1), "rate_limit"),
    "500": (Behavior.error(500), "server_error"),
    "503": (Behavior.error(503), "server_error"),
    "401": (Behavior.error(401), "auth"),
    "403": (Behavior.error(403), "auth"),
    "404": (Behavior.error(404), "not_found"),
    "context_window": (Behavior.context_length_exceeded(), "context_window"),
}


@pytest.mark.parametrize("trigger", list(TRIGGERS))
def test_each_fallback_trigger_moves_on_to_the_next_model(
    trigger: str,
    call: Caller,
    big: FakeProvider,
    small: FakeProvider,
    make_engine: EngineFactory,
    policy_dict: PolicyBuilder,
) -> None:
    behavior, reason = TRIGGERS[trigger]
    policy = policy_dict(["big", "small"], timeout_s=0.3)
    if behavior is None:
        policy["models"]["big"]["litellm_params"]["api_base"] = f"http://127.0.0.1:{free_port()}/v1"
    else:
        big.set(behavior)
    small.set(Behavior.ok("answer from small"))
    engine = make_engine(policy)

    response = call(engine, "chat", MESSAGES)

    assert response.choices[0].message.content == "answer from small"
    summary = hidden(response)
    assert summary["model"] == "small"
    assert summary["litellm_model"] == "openai/gpt-4o-mini"
    assert summary["fallbacks"] == 1
    assert outcomes(response) == [("big", "failure", reason), ("small", "success", None)]
    for attempt in summary["attempts"]:
        assert attempt["latency_s"] > 0
        assert attempt["timeout_s"] is not None
    assert big.request_count == (0 if behavior is None else 1)  # one request: no hidden retry
    assert small.request_count == 1


def test_timed_out_attempt_returns_at_the_timeout_not_the_providers_latency(
    big: FakeProvider, make_engine: EngineFactory, policy_dict: PolicyBuilder
) -> None:
    big.set(Behavior.slow(3.0))
    engine = make_engine(policy_dict(["big", "small"], timeout_s=0.3))

    response = engine.completion("chat", MESSAGES)

    big_attempt = hidden(response)["attempts"][0]
    assert big_attempt["timeout_s"] == 0.3
    assert 0.25 <= big_attempt["latency_s"] < 2.0  # gave up at ~0.3 s, long before the 3 s answer
    assert big.wait_idle(2.0)
    assert big.requests[0].disconnected  # the abandoned request's connection was closed


def test_chain_continues_until_a_model_answers(
    call: Caller, engine: Resilience, big: FakeProvider, small: FakeProvider, tiny: FakeProvider
) -> None:
    big.set(Behavior.error(503))
    small.set(Behavior.error(429))
    tiny.set(Behavior.ok("tiny says hi"))

    response = call(engine, "chat", MESSAGES)

    assert response.choices[0].message.content == "tiny says hi"
    assert hidden(response)["model"] == "tiny"
    assert hidden(response)["fallbacks"] == 2
    assert outcomes(response) == [
        ("big", "failure", "server_error"),
        ("small", "failure", "rate_limit"),
        ("tiny", "success", None),
    ]


def test_healthy_primary_answers_alone(
    call: Caller, engine: Resilience, big: FakeProvider, small: FakeProvider
) -> None:
    response = call(engine, "chat", MESSAGES)

    assert hidden(response)["model"] == "big"
    assert hidden(response)["fallbacks"] == 0
    assert (big.request_count, small.request_count) == (1, 0)


def test_ordinary_400_is_raised_at_once_without_fallback_or_breaker_count(
    call: Caller, engine: Resilience, big: FakeProvider, small: FakeProvider
) -> None:
    big.set(Behavior.error(400, "Unsupported parameter: 'foo'."))

    with pytest.raises(litellm.exceptions.BadRequestError) as info:
        call(engine, "chat", MESSAGES)

    assert not isinstance(info.value, llm_resilience.LLMResilienceError)  # the provider's own error
    assert not isinstance(info.value, litellm.exceptions.ContextWindowExceededError)
    assert big.request_count == 1
    assert small.request_count == 0
    assert engine.breakers.get("big").fail_counter == 0
    assert engine.breaker_states()["big"] == "closed"


def test_everything_failing_raises_all_attempts_failed(
    call: Caller, engine: Resilience, big: FakeProvider, small: FakeProvider, tiny: FakeProvider
) -> None:
    big.set(Behavior.error(503))
    small.set(Behavior.error(500))
    tiny.set(Behavior.error(429))

    with pytest.raises(AllAttemptsFailed) as info:
        call(engine, "chat", MESSAGES, api_key="sk-caller-SECRET-0042")

    error = info.value
    assert [(a.model, a.outcome, a.reason) for a in error.attempts] == [
        ("big", "failure", "server_error"),
        ("small", "failure", "server_error"),
        ("tiny", "failure", "rate_limit"),
    ]
    assert all(a.latency_s > 0 for a in error.attempts)
    assert isinstance(error.__cause__, litellm.exceptions.RateLimitError)  # the last provider error
    assert (error.route, error.prompt_class) == ("chat", "default")
    # One request per model: litellm and the openai client did not retry behind our back.
    assert (big.request_count, small.request_count, tiny.request_count) == (1, 1, 1)


@pytest.mark.parametrize(
    "catch",
    [litellm.exceptions.ServiceUnavailableError, openai.APIError, llm_resilience.LLMResilienceError],
    ids=lambda c: f"{c.__module__}.{c.__name__}",
)
def test_all_attempts_failed_is_caught_by_existing_handlers(
    catch: type[BaseException], engine: Resilience, big: FakeProvider, small: FakeProvider, tiny: FakeProvider
) -> None:
    for p in (big, small, tiny):
        p.set(Behavior.error(500))

    with pytest.raises(catch) as info:
        engine.completion("chat", MESSAGES)

    assert isinstance(info.value, AllAttemptsFailed)
    assert len(info.value.attempts) == 3


def test_all_attempts_failed_message_has_no_key_and_no_prompt(
    engine: Resilience, big: FakeProvider, small: FakeProvider, tiny: FakeProvider
) -> None:
    big.set(Behavior.error(401))
    small.set(Behavior.error(500))
    tiny.set(Behavior.error(503))

    with pytest.raises(AllAttemptsFailed) as info:
        engine.completion("chat", MESSAGES, api_key="sk-caller-SECRET-0042")

    error = info.value
    texts = [str(error), repr(error), error.message, *(repr(a) for a in error.attempts)]
    for text in texts:
        for secret in [*API_KEYS.values(), "sk-caller-SECRET-0042", PROMPT, "otter"]:
            assert secret not in text
    assert "big: failure (auth)" in str(error)
    assert "tiny: failure (server_error)" in str(error)


def test_all_attempts_failed_when_every_model_is_skipped_names_the_reasons(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider, small: FakeProvider
) -> None:
    big.set(Behavior.error(500))
    small.set(Behavior.error(500))
    policy = policy_dict(["big", "small"], fail_max=1)
    policy["breakers"]["default"]["panic"] = "fail_fast"  # else one model is tried anyway (panic mode)
    engine = make_engine(policy)
    with pytest.raises(AllAttemptsFailed):
        engine.completion("chat", MESSAGES)

    with pytest.raises(AllAttemptsFailed) as info:
        engine.completion("chat", MESSAGES)

    assert outcomes(info.value.attempts) == [("big", "skipped", "breaker_open"), ("small", "skipped", "breaker_open")]
    assert "breaker_open" in str(info.value)
    assert (big.request_count, small.request_count) == (1, 1)


SETUPS: dict[str, Callable[[FakeProvider], Any]] = {
    "500": lambda p: p.set(Behavior.error(500)),
    "malformed_body": lambda p: p.set(Behavior(body="malformed")),
}


@pytest.mark.parametrize("setup", list(SETUPS))
def test_a_failing_model_receives_exactly_one_request_per_call(
    setup: str, call: Caller, engine: Resilience, big: FakeProvider, small: FakeProvider
) -> None:
    SETUPS[setup](big)

    for _ in range(2):
        assert hidden(call(engine, "chat", MESSAGES))["model"] == "small"

    assert big.request_count == 2
    assert small.request_count == 2


def test_a_model_whose_key_variable_is_unset_is_skipped_and_the_error_names_the_variable(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LLM_RESILIENCE_TEST_UNSET_KEY", raising=False)
    policy = policy_dict(["big"])
    policy["models"]["big"]["litellm_params"]["api_key"] = "os.environ/LLM_RESILIENCE_TEST_UNSET_KEY"
    engine = make_engine(policy)

    with pytest.raises(AllAttemptsFailed) as caught:
        engine.completion("chat", MESSAGES)

    assert "big: skipped (missing_api_key: os.environ/LLM_RESILIENCE_TEST_UNSET_KEY is not set)" in str(caught.value)
    assert big.request_count == 0
