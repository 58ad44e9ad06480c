"""Hedged requests: a slow attempt gets a parallel one on the next model; the first answer wins.

Through real HTTP (sync: worker threads, async: tasks), the loser's connection must really be
closed, which the fake provider sees as a disconnect long before the loser would have answered.
The planner's part (when to wake up, what to launch, the budget) is also checked without I/O.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from conftest import MESSAGES, Caller, EngineFactory, PolicyBuilder, hidden, outcomes
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from llm_resilience import Resilience
from llm_resilience._breakers import BreakerRegistry
from llm_resilience._hooks import HookSet
from llm_resilience._latency import LatencyStats
from llm_resilience._planner import Call, CallRequest, Launch, Planner, Wait
from llm_resilience._policy import Policy
from llm_resilience.testing import Behavior, FakeProvider

T0 = 1000.0
UNUSED_BASE = "http://127.0.0.1:9/v1"  # the planner tests never send anything


def hedged(policy_dict: PolicyBuilder, chain: list[str] | None = None, **hedge: Any) -> dict[str, Any]:
    policy = policy_dict(chain or ["big", "small"], timeout_s=2.0, deadline_s=4.0)
    policy["routes"]["chat"]["hedge"] = {"after": 0.1, "budget_ratio": 1.0, **hedge}
    return policy


def attempt_spans(exporter: InMemorySpanExporter) -> list[Any]:
    return [s for s in exporter.get_finished_spans() if s.name.startswith("chat ")]


# -- through real HTTP ---------------------------------------------------------------------------


def test_hedge_returns_the_faster_answer_and_closes_the_losers_connection(
    call: Caller, make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider, small: FakeProvider
) -> None:
    engine = make_engine(hedged(policy_dict))
    call(engine, "chat", MESSAGES)  # litellm's first call in a process is slow: not what is measured
    big.reset()
    big.set(Behavior.slow(1.5, "big"))
    small.set(Behavior.ok("small"))

    started = time.monotonic()
    response = call(engine, "chat", MESSAGES)
    elapsed = time.monotonic() - started

    assert response.choices[0].message.content == "small"
    assert outcomes(response) == [("big", "cancelled", None), ("small", "success", None)]
    assert hidden(response)["attempts"][1]["hedged"] is True
    assert hidden(response)["fallbacks"] == 0
    assert elapsed < 1.0
    assert big.wait_idle(2.0)
    loser = big.requests[0]
    assert loser.disconnected and not loser.completed
    assert loser.duration_s is not None and loser.duration_s < 1.0  # closed by us, not ended by its latency


def test_loser_span_ends_cancelled_and_hedge_span_is_marked(
    make_engine: EngineFactory,
    policy_dict: PolicyBuilder,
    exporter: InMemorySpanExporter,
    big: FakeProvider,
) -> None:
    engine = make_engine(hedged(policy_dict))
    big.set(Behavior.slow(1.0))

    engine.completion("chat", MESSAGES)

    spans = {s.attributes["llm_resilience.model"]: s.attributes for s in attempt_spans(exporter)}
    assert spans["big"]["llm_resilience.outcome"] == "cancelled"
    assert spans["big"]["llm_resilience.hedged_by"] == 1
    assert spans["big"]["llm_resilience.hedge_after_ms"] == 100
    assert "error.type" not in spans["big"]
    assert spans["small"]["llm_resilience.attempt.role"] == "hedge"
    assert spans["small"]["llm_resilience.outcome"] == "success"


def test_cancelled_loser_is_neither_success_nor_failure_for_its_breaker(
    call: Caller, make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider
) -> None:
    engine = make_engine(hedged(policy_dict))  # no soft timeout: nothing is "slow"
    big.set(Behavior.slow(1.0))

    for _ in range(4):  # more than fail_max = 3
        call(engine, "chat", MESSAGES)

    assert engine.breaker_states()["big"] == "closed"
    assert engine.breakers.get("big").fail_counter == 0


def test_primary_that_answers_before_the_threshold_is_not_hedged(
    call: Caller, make_engine: EngineFactory, policy_dict: PolicyBuilder, small: FakeProvider
) -> None:
    engine = make_engine(hedged(policy_dict, after=0.5))

    response = call(engine, "chat", MESSAGES)

    assert outcomes(response) == [("big", "success", None)]
    assert small.request_count == 0


def test_primary_still_wins_if_it_answers_first_after_the_hedge_started(
    call: Caller, make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider, small: FakeProvider
) -> None:
    engine = make_engine(hedged(policy_dict))
    # 0.8 s: the hedge (at 0.1 s, later when the client itself was late: see "Under load") starts well
    # before big answers, even on a first async call whose event loop is still busy setting up.
    big.set(Behavior.slow(0.8, "big"))
    small.set(Behavior.slow(2.5, "small"))

    response = call(engine, "chat", MESSAGES)

    assert response.choices[0].message.content == "big"
    assert outcomes(response) == [("big", "success", None), ("small", "cancelled", None)]
    assert small.wait_idle(2.0)
    assert small.requests[0].disconnected


def test_a_failing_hedge_leaves_the_primary_running(
    call: Caller, make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider, small: FakeProvider
) -> None:
    engine = make_engine(hedged(policy_dict))
    big.set(Behavior.slow(0.3, "big"))
    small.set(Behavior.error(503))

    response = call(engine, "chat", MESSAGES)

    assert response.choices[0].message.content == "big"
    assert outcomes(response) == [("big", "success", None), ("small", "failure", "server_error")]


def test_max_extra_caps_parallel_requests(
    call: Caller,
    make_engine: EngineFactory,
    policy_dict: PolicyBuilder,
    big: FakeProvider,
    small: FakeProvider,
    tiny: FakeProvider,
) -> None:
    engine = make_engine(hedged(policy_dict, ["big", "small", "tiny"], after=0.05, max_extra=1))
    big.set(Behavior.slow(0.4, "big"))
    small.set(Behavior.slow(0.6, "small"))

    response = call(engine, "chat", MESSAGES)

    assert response.choices[0].message.content == "big"
    assert tiny.request_count == 0


def test_max_extra_two_hedges_the_hedge(
    call: Caller,
    make_engine: EngineFactory,
    policy_dict: PolicyBuilder,
    big: FakeProvider,
    small: FakeProvider,
    tiny: FakeProvider,
) -> None:
    engine = make_engine(hedged(policy_dict, ["big", "small", "tiny"], after=0.05, max_extra=2))
    for _ in range(2):  # two hedges in one call are 200 % of one call: over a 100 % budget
        call(engine, "chat", MESSAGES)
    big.set(Behavior.slow(1.0, "big"))
    small.set(Behavior.slow(1.0, "small"))
    tiny.set(Behavior.ok("tiny"))

    response = call(engine, "chat", MESSAGES)

    assert response.choices[0].message.content == "tiny"
    assert outcomes(response) == [("big", "cancelled", None), ("small", "cancelled", None), ("tiny", "success", None)]


def test_hedges_respect_the_budget(
    call: Caller,
    make_engine: EngineFactory,
    policy_dict: PolicyBuilder,
    exporter: InMemorySpanExporter,
    big: FakeProvider,
    small: FakeProvider,
) -> None:
    # 25 % of recent calls: the 4th and the 8th call may hedge, no other.
    engine = make_engine(hedged(policy_dict, after=0.05, budget_ratio=0.25))
    # 0.6 s, far above the hedge threshold: small, idle since the last hedge, must win its race even
    # when this VM wakes its server thread 0.05-0.4 s late (seen in CI with big at 0.2 s).
    big.set(Behavior.slow(0.6, "big"))

    summaries = [hidden(call(engine, "chat", MESSAGES)) for _ in range(8)]
    answered_by = [summary["model"] for summary in summaries]

    assert answered_by == ["big", "big", "big", "small", "big", "big", "big", "small"], [
        s["attempts"] for s in summaries
    ]
    assert small.request_count == 2
    skipped = [
        s.attributes.get("llm_resilience.hedge_skipped")
        for s in attempt_spans(exporter)
        if s.attributes["llm_resilience.model"] == "big"
    ]
    # A hedge the client's own lateness held back (a loaded machine) is not the budget's doing,
    # but it is not a hedge either: every big attempt that did not hedge says why.
    assert skipped.count("budget") + skipped.count("client_overload") == 6, skipped


def test_zero_budget_never_hedges(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider, small: FakeProvider
) -> None:
    engine = make_engine(hedged(policy_dict, after=0.05, budget_ratio=0.0))
    big.set(Behavior.slow(0.15))

    for _ in range(3):
        assert hidden(engine.completion("chat", MESSAGES))["model"] == "big"
    assert small.request_count == 0


def test_over_budget_a_slow_attempt_is_cut_at_its_soft_timeout_instead(
    call: Caller, make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider, small: FakeProvider
) -> None:
    # No hedge may start, so the route behaves as one without hedging: the slow attempt is a
    # soft_timeout failure at its soft timeout, its connection is closed, the next model answers.
    policy = hedged(policy_dict, after=0.05, budget_ratio=0.0)
    policy["prompt_classes"]["default"]["soft_timeout"] = {"warmup_s": 0.2, "min_samples": 50}
    engine = make_engine(policy)
    big.set(Behavior.slow(1.5, "big"))

    started = time.monotonic()
    response = call(engine, "chat", MESSAGES)
    elapsed = time.monotonic() - started

    assert outcomes(response) == [("big", "failure", "soft_timeout"), ("small", "success", None)]
    assert hidden(response)["attempts"][1].get("hedged") is None  # a plain fallback, not a hedge
    assert elapsed < 1.4  # cut well before big's 1.5 s answer (margin: this VM wakes idle threads late)
    assert big.wait_idle(2.0)
    assert big.requests[0].disconnected
    assert big.requests[0].duration_s is not None and big.requests[0].duration_s < 1.0
    assert engine.breakers.get("big").fail_counter == 1


def test_percentile_threshold_waits_for_samples_then_hedges_at_the_learned_value(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider, small: FakeProvider
) -> None:
    policy = hedged(policy_dict, after="p90")
    policy["prompt_classes"]["default"]["soft_timeout"] = {"min_samples": 5, "warmup_s": 2.0}
    engine: Resilience = make_engine(policy)
    big.set(Behavior.slow(0.3, "big"))

    first = engine.completion("chat", MESSAGES)  # no history: no hedge at a guessed threshold
    assert hidden(first)["model"] == "big"
    for _ in range(20):
        engine.latency.observe("big", "default", 0.05)

    second = engine.completion("chat", MESSAGES)

    assert hidden(second)["model"] == "small"
    assert outcomes(second)[0] == ("big", "cancelled", "soft_timeout")  # it also ran past its soft timeout


def test_sync_hedging_against_a_non_openai_provider_string_falls_back_to_abandoning(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider, small: FakeProvider
) -> None:
    # A provider we cannot hand our own client to still hedges correctly; the loser is abandoned
    # (its thread ends at its own timeout) instead of disconnected.
    policy = hedged(policy_dict)
    policy["models"]["big"]["litellm_params"]["model"] = "hosted_vllm/gpt-4o"
    engine = make_engine(policy)
    big.set(Behavior.slow(0.6, "big"))

    response = engine.completion("chat", MESSAGES)

    assert response.choices[0].message.content == "Hello from the fake provider."
    assert outcomes(response) == [("big", "cancelled", None), ("small", "success", None)]


# -- the planner alone -----------------------------------------------------------------------------


def planner(hedge: dict[str, Any], soft: Any = None) -> Planner:
    classes: dict[str, Any] = {"default": {"timeout_s": 2.0, "deadline_s": 5.0}}
    if soft is not None:
        classes["default"]["soft_timeout"] = soft
    pol = Policy.from_dict(
        {
            "models": {
                name: {"litellm_params": {"model": f"openai/{name}", "api_base": UNUSED_BASE, "api_key": "k"}}
                for name in ("a", "b", "c")
            },
            "routes": {"chat": {"chain": ["a", "b", "c"], "hedge": hedge}},
            "prompt_classes": classes,
        }
    )
    return Planner(policy=pol, breakers=BreakerRegistry(pol.breaker_settings), hooks=HookSet(), latency=LatencyStats())


def start(p: Planner, now: float = T0) -> Call:
    return p.start(CallRequest(model="chat", messages=MESSAGES, kwargs={}), now)


def test_planner_waits_until_the_threshold_then_launches_the_next_model_as_a_hedge() -> None:
    call = start(planner({"after": 0.3, "budget_ratio": 1.0}))
    first = call.next_action(T0)
    assert isinstance(first, Launch)
    primary = first.attempt
    assert primary.hedge_at == pytest.approx(T0 + 0.3)
    assert primary.kwargs["timeout"] == 2.0  # hedged routes run to the hard timeout

    waiting = call.next_action(T0 + 0.1)
    assert isinstance(waiting, Wait) and waiting.until == pytest.approx(T0 + 0.3)
    hedge = call.next_action(T0 + 0.3)

    assert isinstance(hedge, Launch)
    assert hedge.attempt.spec.name == "b"
    assert hedge.attempt.record.hedged is True
    assert hedge.attempt.hedge_at is None  # max_extra = 1: no hedge of the hedge
    assert call.next_action(T0 + 0.31) == Wait(until=pytest.approx(T0 + 2.0))  # the attempts' whole bound


def test_planner_records_why_a_hedge_did_not_start() -> None:
    p = planner({"after": 0.3, "budget_ratio": 0.0})
    call = start(p)
    launch = call.next_action(T0)
    assert isinstance(launch, Launch)

    assert call.next_action(T0 + 0.5) == Wait(until=pytest.approx(T0 + 2.0))  # the attempt's whole bound
    assert launch.attempt.record.extra["hedge_skipped"] == "budget"


def test_planner_hedge_threshold_needs_history_for_a_percentile() -> None:
    p = planner({"after": "p95"})
    first = start(p).next_action(T0)
    assert isinstance(first, Launch) and first.attempt.hedge_at is None

    for value in (0.1, 0.2, 0.3, 0.4):
        for _ in range(5):
            p.latency.observe("a", "default", value)
    second = start(p).next_action(T0)

    assert isinstance(second, Launch) and second.attempt.hedge_at == pytest.approx(T0 + 0.4)


def test_planner_does_not_hedge_the_last_model() -> None:
    p = planner({"after": 0.3, "budget_ratio": 1.0})
    call = start(p)
    for name in ("a", "b", "c"):
        action = call.next_action(T0)
        assert isinstance(action, Launch) and action.attempt.spec.name == name
        call.on_error(action.attempt, ConnectionError("refused"), T0)
    last = call.records[-1]

    assert last.model == "c" and "hedge_after_s" not in last.extra


def test_planner_cuts_an_unhedged_attempt_at_its_soft_timeout_and_moves_on() -> None:
    p = planner({"after": 0.1, "budget_ratio": 0.0}, soft={"warmup_s": 0.4, "min_samples": 50})
    call = start(p)
    first = call.next_action(T0)
    assert isinstance(first, Launch)
    assert first.attempt.kwargs["timeout"] == 2.0 and first.attempt.cut_at == pytest.approx(T0 + 0.4)

    waiting = call.next_action(T0 + 0.1)  # hedge refused by the budget: now wait for the cut
    assert isinstance(waiting, Wait) and waiting.until == pytest.approx(T0 + 0.4)
    moved_on = call.next_action(T0 + 0.4)

    assert isinstance(moved_on, Launch) and moved_on.attempt.spec.name == "b"
    assert moved_on.attempt.record.hedged is False
    assert (call.records[0].outcome, call.records[0].reason) == ("failure", "soft_timeout")
    assert call.in_flight == [moved_on.attempt]
