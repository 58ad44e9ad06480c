"""Slow-call breakers: a latency spike with no error at all opens the breaker.

The incident was a primary answering in 12 s instead of 600 ms, never failing. Soft timeouts
(and slow successes, and hedge losers that had already run past their soft timeout) count toward
the model's breaker; a half-open probe's own latency decides whether it closes.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from conftest import MESSAGES, Caller, EngineFactory, PolicyBuilder, hidden, outcomes

from llm_resilience import AllAttemptsFailed, Resilience
from llm_resilience.testing import Behavior, FakeProvider

RESET_S = 0.4
FAST_S = 0.02
SLOW_S = 0.4


def slow_policy(policy_dict: PolicyBuilder, chain: list[str], soft: Any | None = None, **route: Any) -> dict[str, Any]:
    policy = policy_dict(chain, timeout_s=1.0, deadline_s=4.0, fail_max=3, reset_timeout_s=RESET_S)
    # A fixed learned bound keeps the tests independent of machine speed: 0.15 s until 50 samples.
    policy["prompt_classes"]["default"]["soft_timeout"] = soft or {"warmup_s": 0.15, "min_samples": 50}
    policy["routes"]["chat"].update(route)
    return policy


def test_slow_calls_without_errors_open_the_breaker(
    call: Caller, make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider, small: FakeProvider
) -> None:
    engine = make_engine(slow_policy(policy_dict, ["big", "small"]))
    big.set(Behavior.slow(SLOW_S))  # always answers 200, just slowly

    for _ in range(3):  # fail_max
        response = call(engine, "chat", MESSAGES)
        assert outcomes(response) == [("big", "failure", "soft_timeout"), ("small", "success", None)]
    assert engine.breaker_states()["big"] == "open"

    response = call(engine, "chat", MESSAGES)

    assert outcomes(response) == [("big", "skipped", "breaker_open"), ("small", "success", None)]
    assert big.request_count == 3


def test_learned_soft_timeout_opens_the_breaker_on_a_spike(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider
) -> None:
    engine = make_engine(slow_policy(policy_dict, ["big", "small"], soft={"min_samples": 10, "multiplier": 2.0}))
    big.set(Behavior.slow(FAST_S))
    for _ in range(10):
        engine.completion("chat", MESSAGES)
    assert engine.breaker_states()["big"] == "closed"

    big.set(Behavior.slow(SLOW_S * 2))
    for _ in range(3):
        engine.completion("chat", MESSAGES)

    assert engine.breaker_states()["big"] == "open"
    assert big.request_count == 13


def test_slow_successes_count_as_failures(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider
) -> None:
    # One model only: the last model is never cut at its soft timeout, so it answers, slowly.
    engine = make_engine(slow_policy(policy_dict, ["big"]))
    big.set(Behavior.slow(0.25, "slow answer"))

    for _ in range(3):
        response = engine.completion("chat", MESSAGES)
        assert response.choices[0].message.content == "slow answer"
        assert outcomes(response) == [("big", "success", None)]

    assert engine.breaker_states()["big"] == "open"
    with pytest.raises(AllAttemptsFailed) as failed:
        engine.completion("chat", MESSAGES)
    assert outcomes(failed.value.attempts) == [("big", "skipped", "breaker_open")]


def test_a_fast_success_resets_the_slow_count(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider
) -> None:
    engine = make_engine(slow_policy(policy_dict, ["big"]))
    big.script(Behavior.slow(0.25), Behavior.slow(0.25), Behavior.ok(), Behavior.slow(0.25), Behavior.slow(0.25))

    for _ in range(5):
        engine.completion("chat", MESSAGES)

    assert engine.breaker_states()["big"] == "closed"


def open_by_slow_successes(engine: Resilience, big: FakeProvider) -> None:
    big.set(Behavior.slow(0.25))
    for _ in range(3):
        engine.completion("chat", MESSAGES)
    assert engine.breaker_states()["big"] == "open"
    time.sleep(RESET_S + 0.05)


def test_a_slow_half_open_probe_keeps_the_breaker_open(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider
) -> None:
    engine = make_engine(slow_policy(policy_dict, ["big"]))
    open_by_slow_successes(engine, big)

    probe = engine.completion("chat", MESSAGES)  # still slow: answered, but judged by its latency

    attempt = hidden(probe)["attempts"][0]
    assert (attempt["outcome"], attempt["breaker_state"]) == ("success", "half-open")
    assert attempt["breaker_transitions"] == [["half-open", "open"]]
    assert engine.breaker_states()["big"] == "open"
    with pytest.raises(AllAttemptsFailed):
        engine.completion("chat", MESSAGES)  # skipped without a request
    assert big.request_count == 4


def test_a_fast_half_open_probe_closes_the_breaker(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider
) -> None:
    engine = make_engine(slow_policy(policy_dict, ["big"]))
    open_by_slow_successes(engine, big)
    big.set(Behavior.slow(FAST_S))

    probe = engine.completion("chat", MESSAGES)

    assert hidden(probe)["attempts"][0]["breaker_transitions"] == [["half-open", "closed"]]
    assert engine.breaker_states()["big"] == "closed"


def test_a_probe_cut_at_its_soft_timeout_keeps_the_breaker_open(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider, small: FakeProvider
) -> None:
    engine = make_engine(slow_policy(policy_dict, ["big", "small"]))
    big.set(Behavior.slow(SLOW_S))
    for _ in range(3):
        engine.completion("chat", MESSAGES)
    time.sleep(RESET_S + 0.05)

    response = engine.completion("chat", MESSAGES)

    assert outcomes(response) == [("big", "failure", "soft_timeout"), ("small", "success", None)]
    assert engine.breaker_states()["big"] == "open"


# -- with hedging ------------------------------------------------------------------------------


def test_hedged_spike_still_opens_the_breaker(
    call: Caller, make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider, small: FakeProvider
) -> None:
    # The hedge starts at the soft timeout and wins; the cancelled primary had already run past
    # its soft timeout, so it counts as slow. Otherwise hedging would hide the spike for ever.
    engine = make_engine(slow_policy(policy_dict, ["big", "small"], hedge={"after": "p95", "budget_ratio": 1.0}))
    big.set(Behavior.slow(1.0, "big"))
    small.set(Behavior.slow(0.05, "small"))

    for _ in range(3):
        response = call(engine, "chat", MESSAGES)
        assert response.choices[0].message.content == "small"
        assert outcomes(response) == [("big", "cancelled", "soft_timeout"), ("small", "success", None)]
    assert engine.breaker_states()["big"] == "open"

    response = call(engine, "chat", MESSAGES)

    assert outcomes(response) == [("big", "skipped", "breaker_open"), ("small", "success", None)]
    assert big.request_count == 3


def test_hedge_loser_cancelled_before_its_soft_timeout_is_neutral(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider, small: FakeProvider
) -> None:
    soft, hedge = {"warmup_s": 0.8, "min_samples": 50}, {"after": 0.05, "budget_ratio": 1.0}
    engine = make_engine(slow_policy(policy_dict, ["big", "small"], soft=soft, hedge=hedge))
    big.set(Behavior.slow(0.6))

    for _ in range(5):
        response = engine.completion("chat", MESSAGES)
        assert outcomes(response) == [("big", "cancelled", None), ("small", "success", None)]

    assert engine.breaker_states()["big"] == "closed"
    assert engine.breakers.get("big").fail_counter == 0


def test_slow_primary_that_wins_the_race_still_counts_as_slow(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider, small: FakeProvider
) -> None:
    engine = make_engine(slow_policy(policy_dict, ["big", "small"], hedge={"after": 0.1, "budget_ratio": 1.0}))
    big.set(Behavior.slow(0.2, "big"))  # past its 0.15 s soft timeout, but before the hedge answers
    small.set(Behavior.slow(0.8, "small"))  # cancelled after ~0.1 s: not past its own soft timeout

    response = engine.completion("chat", MESSAGES)

    assert response.choices[0].message.content == "big"
    assert outcomes(response) == [("big", "success", None), ("small", "cancelled", None)]
    assert engine.breakers.get("big").fail_counter == 1
    assert engine.breakers.get("small").fail_counter == 0
