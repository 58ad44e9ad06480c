"""Slow-call breakers: a latency spike with no error at all opens the breaker.

The incident was a primary answering in 12 s instead of 600 ms, never failing. Soft timeouts
(and slow successes, and hedge losers that had already run past their soft timeout) count toward
the model's breaker; a half-open probe's own latency decides whether it closes.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import litellm
import pytest
from conftest import MESSAGES, Caller, EngineFactory, PolicyBuilder, hidden, outcomes, wait_until

from llm_resilience import AllAttemptsFailed, Resilience
from llm_resilience._breakers import BreakerRegistry
from llm_resilience._hooks import HookSet
from llm_resilience._latency import LatencyStats
from llm_resilience._planner import Attempt, Call, CallRequest, Launch, Planner, Wait
from llm_resilience._policy import Policy
from llm_resilience.testing import Behavior, FakeProvider

RESET_S = 0.4
FAST_S = 0.02
SLOW_S = 0.4


def slow_policy(
    policy_dict: PolicyBuilder, chain: list[str], soft: Any | None = None, panic: str = "try_one", **route: Any
) -> dict[str, Any]:
    policy = policy_dict(chain, timeout_s=1.0, deadline_s=4.0, fail_max=3, reset_timeout_s=RESET_S)
    policy["breakers"]["default"]["panic"] = panic  # fail_fast: an open breaker shows as an immediate failure
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
    engine = make_engine(slow_policy(policy_dict, ["big"], panic="fail_fast"))
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


def open_by_slow_successes(engine: Resilience, big: FakeProvider, latency_s: float = 0.25) -> None:
    big.set(Behavior.slow(latency_s))
    for _ in range(3):
        engine.completion("chat", MESSAGES)
    assert engine.breaker_states()["big"] == "open"
    time.sleep(RESET_S + 0.05)


def test_a_slow_half_open_probe_keeps_the_breaker_open(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider
) -> None:
    engine = make_engine(slow_policy(policy_dict, ["big"], panic="fail_fast"))
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
    # A 0.6 s soft bound: a loopback request right after an idle pause can take ~0.1-0.4 s to be served
    # on a small VM (measured: the first request after 0.5-1 s idle), which must not look slow here.
    engine = make_engine(slow_policy(policy_dict, ["big"], soft={"warmup_s": 0.6, "min_samples": 50}))
    open_by_slow_successes(engine, big, latency_s=0.8)
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
    # Soft 0.4 s, hedge at 0.3 s: big (0.45 s) is slow; small, cancelled when big answers, has run
    # ~0.15 s of its 0.4 s, leaving room for the VM's wake-up latency on loopback.
    soft = {"warmup_s": 0.4, "min_samples": 50}
    policy = slow_policy(policy_dict, ["big", "small"], soft=soft, hedge={"after": 0.3, "budget_ratio": 1.0})
    engine = make_engine(policy)
    big.set(Behavior.slow(0.45, "big"))  # past its 0.4 s soft timeout, but before the hedge answers
    small.set(Behavior.slow(1.5, "small"))  # cancelled after ~0.15 s: not past its own soft timeout

    response = engine.completion("chat", MESSAGES)

    assert response.choices[0].message.content == "big"
    assert outcomes(response) == [("big", "success", None), ("small", "cancelled", None)]
    assert engine.breakers.get("big").fail_counter == 1
    assert engine.breakers.get("small").fail_counter == 0


def test_hedged_primaries_open_the_breaker_at_their_soft_timeout_not_when_cancelled(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider, small: FakeProvider
) -> None:
    # The hedge answers only at ~0.9 s, but each primary is slow from its 0.15 s soft timeout on:
    # the breaker must know then, so calls arriving meanwhile no longer reach the sick model.
    policy = slow_policy(policy_dict, ["big", "small"], hedge={"after": 0.1, "budget_ratio": 1.0})
    policy["breakers"]["default"]["fail_max"] = 2
    policy["prompt_classes"]["default"]["timeout_s"] = 2.5  # big's own bound far after the hedges' answers
    # The hedges are slow too (past their own soft timeout): their model must stay available.
    policy["breakers"]["small"] = {"fail_max": 100, "reset_timeout_s": RESET_S}
    engine = make_engine(policy)
    big.set(Behavior.slow(1.5, "big"))
    small.set(Behavior.slow(0.8, "small"))

    with ThreadPoolExecutor(max_workers=2) as pool:
        first = [pool.submit(engine.completion, "chat", MESSAGES) for _ in range(2)]
        # Opened by the primaries' soft timeouts (0.15 s), long before any answer (the hedges take 0.8 s).
        assert wait_until(lambda: engine.breaker_states().get("big") == "open", timeout=5.0)
        assert not any(f.done() for f in first)  # both primaries still racing their hedges
        meanwhile = engine.completion("chat", MESSAGES)
        earlier = [f.result() for f in first]

    assert outcomes(meanwhile) == [("big", "skipped", "breaker_open"), ("small", "success", None)]
    for response in earlier:
        assert outcomes(response) == [("big", "cancelled", "soft_timeout"), ("small", "success", None)]
    opened = [hidden(r)["attempts"][0].get("breaker_transitions") for r in earlier]
    assert sorted(opened, key=str) == [None, [["closed", "open"]]]  # opened by the second primary
    assert big.request_count == 2


# -- the planner alone: the slow verdict at the soft timeout ------------------------------------

T0 = 1000.0


def slow_planner(fail_max: int, reset_timeout_s: float = 60.0) -> Planner:
    pol = Policy.from_dict(
        {
            "models": {
                name: {
                    "litellm_params": {"model": f"openai/{name}", "api_base": "http://127.0.0.1:9/v1", "api_key": "k"}
                }
                for name in ("a", "b")
            },
            "routes": {"chat": {"chain": ["a", "b"], "hedge": {"after": 0.1, "budget_ratio": 1.0}}},
            "prompt_classes": {
                "default": {"timeout_s": 2.0, "deadline_s": 5.0, "soft_timeout": {"warmup_s": 0.2, "min_samples": 50}}
            },
            "breakers": {"default": {"fail_max": fail_max, "reset_timeout_s": reset_timeout_s}},
        }
    )
    return Planner(policy=pol, breakers=BreakerRegistry(pol.breaker_settings), hooks=HookSet(), latency=LatencyStats())


def hedged_primary(p: Planner, now: float) -> tuple[Call, Attempt, Attempt]:
    """A call whose primary ``a`` was hedged by ``b`` 0.1 s after it started; both in flight."""
    call = p.start(CallRequest(model="chat", messages=MESSAGES, kwargs={}), now)
    primary = call.next_action(now)
    assert isinstance(primary, Launch) and primary.attempt.spec.name == "a"
    hedge = call.next_action(now + 0.1)
    assert isinstance(hedge, Launch) and hedge.attempt.record.hedged
    return call, primary.attempt, hedge.attempt


def test_planner_wakes_at_the_soft_timeout_of_an_attempt_in_flight() -> None:
    call, primary, _hedge = hedged_primary(slow_planner(fail_max=3), T0)

    waiting = call.next_action(T0 + 0.15)

    assert waiting == Wait(until=pytest.approx(T0 + 0.2))  # a's soft timeout, before b's (T0 + 0.3)
    assert "slow" not in primary.record.extra


def test_planner_opens_the_breaker_when_hedged_primaries_pass_their_soft_timeout() -> None:
    p = slow_planner(fail_max=2)
    breaker = p.breakers.get("a")
    calls = [hedged_primary(p, T0 + 0.05 * i) for i in range(2)]

    assert isinstance(calls[0][0].next_action(T0 + 0.2), Wait)
    assert (breaker.state, breaker.fail_counter) == ("closed", 1)
    assert isinstance(calls[1][0].next_action(T0 + 0.25), Wait)

    assert breaker.state == "open"
    for call, primary, hedge in calls:  # neither primary was cancelled nor answered yet
        assert call.in_flight == [primary, hedge]
        assert primary.record.extra["slow"] is True and primary.record.outcome is None
    third = p.start(CallRequest(model="chat", messages=MESSAGES, kwargs={}), T0 + 0.26)
    launch = third.next_action(T0 + 0.26)
    assert isinstance(launch, Launch) and launch.attempt.spec.name == "b"
    assert (third.records[0].outcome, third.records[0].reason) == ("skipped", "breaker_open")


def test_planner_counts_a_slow_hedge_loser_once() -> None:
    p = slow_planner(fail_max=3)
    call, primary, hedge = hedged_primary(p, T0)
    call.next_action(T0 + 0.2)
    assert p.breakers.get("a").fail_counter == 1

    call.on_response(hedge, litellm.ModelResponse(model="b"), T0 + 0.25)

    assert (primary.record.outcome, primary.record.reason) == ("cancelled", "soft_timeout")
    assert p.breakers.get("a").fail_counter == 1


def test_planner_late_success_of_a_slow_attempt_does_not_reset_the_breaker() -> None:
    p = slow_planner(fail_max=3)
    call, primary, _hedge = hedged_primary(p, T0)
    call.next_action(T0 + 0.2)

    call.on_response(primary, litellm.ModelResponse(model="a"), T0 + 0.22)

    assert primary.record.outcome == "success" and primary.record.extra["slow"] is True
    assert p.breakers.get("a").fail_counter == 1  # neither reset by the success nor counted twice


def test_planner_late_error_of_a_slow_attempt_is_not_counted_again() -> None:
    p = slow_planner(fail_max=3)
    call, primary, _hedge = hedged_primary(p, T0)
    call.next_action(T0 + 0.2)

    call.on_error(primary, ConnectionError("reset"), T0 + 0.3)

    assert primary.record.outcome == "failure"
    assert p.breakers.get("a").fail_counter == 1


def test_planner_slow_probe_reopens_the_breaker_before_it_answers() -> None:
    p = slow_planner(fail_max=1, reset_timeout_s=0.05)
    breaker = p.breakers.get("a")
    call, _primary, _hedge = hedged_primary(p, T0)
    call.next_action(T0 + 0.2)
    assert breaker.state == "open"
    time.sleep(0.06)  # the breaker's reset timeout runs on the wall clock

    probe_call, probe, probe_hedge = hedged_primary(p, T0 + 1.0)
    assert probe.record.extra["probe"] is True and breaker.state == "half-open"
    probe_call.next_action(T0 + 1.2)

    assert breaker.state == "open"  # re-opened at its soft timeout, while still in flight
    assert probe_call.in_flight == [probe, probe_hedge]
    probe_call.on_response(probe, litellm.ModelResponse(model="a"), T0 + 1.25)
    assert breaker.state == "open"  # its late answer is still a slow one
