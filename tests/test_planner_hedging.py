"""When the planner hedges, decided from the policy and the latency it learned (no server, no sleeps).

The HTTP tests in ``test_hedging.py`` show hedges racing real providers; these pin the arithmetic
of the threshold itself, which mutation testing found unpinned (README "Hedging").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from test_under_load_planner import T0, Scripted, launch, make_planner, start

from llm_resilience._breakers import ProbeTicket
from llm_resilience._planner import Attempt, Call, Planner, Wait

pytestmark = pytest.mark.sans_io  # no server: `make mutate` runs these for every mutant

SOFT = {"percentile": 99, "floor_s": 0.05, "min_samples": 10, "warmup_s": 0.5}


def first_attempt(
    hedge: dict[str, Any], *, soft: dict[str, Any] | None = None, learned: Sequence[float] = ()
) -> Attempt:

    p: Planner = make_planner(Scripted(), hedge={"budget_ratio": 1.0, **hedge}, soft=soft)
    for latency in learned:
        p.latency.observe("a", "default", latency)
    return launch(start(p), T0)


def test_a_percentile_threshold_is_the_models_learned_latency_in_this_class() -> None:
    attempt = first_attempt({"after": "p95"}, soft=SOFT, learned=[0.2] * 12)

    assert attempt.hedge_at == pytest.approx(T0 + 0.2)
    assert attempt.record.extra["hedge_after_s"] == pytest.approx(0.2)


def test_another_models_or_classes_latency_does_not_set_the_threshold() -> None:
    p = make_planner(Scripted(), hedge={"after": "p95", "budget_ratio": 1.0}, soft=SOFT)
    for _ in range(12):
        p.latency.observe("b", "default", 0.2)  # another model
        p.latency.observe("a", "summarize", 0.2)  # another class
    attempt = launch(start(p), T0)

    assert attempt.hedge_at == pytest.approx(T0 + 0.5)  # no history of its own: the warm-up bound


def test_too_few_samples_mean_the_warm_up_bound_not_a_guess() -> None:
    attempt = first_attempt({"after": "p95"}, soft=SOFT, learned=[0.2] * 9)  # min_samples is 10

    assert attempt.hedge_at == pytest.approx(T0 + 0.5)


def test_without_a_soft_timeout_twenty_samples_are_needed_and_there_is_no_warm_up_hedge() -> None:
    assert first_attempt({"after": "p95"}, learned=[0.2] * 19).hedge_at is None
    assert first_attempt({"after": "p95"}, learned=[0.2] * 20).hedge_at == pytest.approx(T0 + 0.2)


def test_the_soft_timeouts_floor_bounds_a_learned_threshold_from_below() -> None:
    attempt = first_attempt({"after": "p95"}, soft=SOFT, learned=[0.01] * 12)

    assert attempt.hedge_at == pytest.approx(T0 + 0.05)


def test_the_percentile_asked_for_is_the_one_used() -> None:
    learned = [0.1] * 10 + [0.9] * 10  # p25 = 0.1, p95 = 0.9 (the class timeout is 1 s)

    low = first_attempt({"after": "p25"}, soft=SOFT, learned=learned)
    high = first_attempt({"after": "p95"}, soft=SOFT, learned=learned)

    assert low.hedge_at == pytest.approx(T0 + 0.1)
    assert high.hedge_at == pytest.approx(T0 + 0.9)


def test_a_fixed_threshold_is_used_as_given() -> None:
    assert first_attempt({"after": 0.3}).hedge_at == pytest.approx(T0 + 0.3)


def test_a_threshold_at_or_past_the_attempts_timeout_means_no_hedge() -> None:
    assert first_attempt({"after": 1.0}).hedge_at is None  # the class timeout is 1 s


# -- whether a due hedge starts -----------------------------------------------------------------


def test_a_hedge_the_budget_refuses_is_recorded_on_the_slow_attempt() -> None:
    p = make_planner(Scripted(), hedge={"after": 0.1, "budget_ratio": 0.0})
    call = start(p)
    first = launch(call, T0)

    assert isinstance(call.next_action(T0 + 0.1), Wait)
    assert first.record.extra["hedge_skipped"] == "budget"
    assert call.in_flight == [first]


def test_a_hedge_with_no_model_left_to_try_refunds_its_budget() -> None:
    p = make_planner(Scripted(), hedge={"after": 0.1, "budget_ratio": 1.0}, breakers={"fail_max": 1})
    p.breakers.get("b").record(ProbeTicket(probe=False), "server_error")  # b is open
    call = start(p)
    first = launch(call, T0)

    assert isinstance(call.next_action(T0 + 0.1), Wait)
    assert first.record.extra["hedge_skipped"] == "no_model"
    assert [r.reason for r in call.records[1:]] == ["breaker_open"]
    assert call.in_flight == [first]  # nothing was sent


def test_a_client_delay_under_a_tenth_of_the_attempt_does_not_postpone_the_hedge() -> None:
    p = make_planner(Scripted(delay_s=0.02), hedge={"after": 0.3, "budget_ratio": 1.0})
    call = start(p)
    launch(call, T0)

    assert launch(call, T0 + 0.3).spec.name == "b"


def test_a_hedge_waits_while_the_client_is_the_slow_one_then_starts_on_the_providers_time() -> None:
    p = make_planner(Scripted(delay_s=0.2), hedge={"after": 0.3, "budget_ratio": 1.0})
    call = start(p)
    first = launch(call, T0)

    assert isinstance(call.next_action(T0 + 0.3), Wait)  # 0.3 s of wall time, 0.1 s of it the provider's
    assert first.record.extra["client_overload"] == "client_saturated"
    hedge = launch(call, T0 + 0.55)  # the provider's share (0.35 s) is past the threshold

    assert hedge.spec.name == "b"
    assert first.record.extra["hedged_by"] == hedge.record.index


# -- the attempt that lost the race ------------------------------------------------------------------


def _raced(soft: dict[str, Any]) -> tuple[Planner, Call, Attempt, Attempt]:
    p = make_planner(Scripted(), hedge={"after": 0.1, "budget_ratio": 1.0}, soft=soft)
    call = start(p)
    first = launch(call, T0)
    hedge = launch(call, T0 + 0.1)
    return p, call, first, hedge


def test_a_primary_that_lost_the_race_before_its_soft_timeout_is_cancelled_and_not_counted() -> None:
    p, call, first, hedge = _raced({"warmup_s": 0.4, "min_samples": 50})

    call.on_response(hedge, object(), T0 + 0.2)

    assert (first.record.outcome, first.record.reason) == ("cancelled", None)
    assert p.breakers.get("a").fail_counter == 0


def test_a_primary_that_lost_the_race_after_its_soft_timeout_counts_as_slow_once() -> None:
    p, call, first, hedge = _raced({"warmup_s": 0.4, "min_samples": 50})

    call.on_response(hedge, object(), T0 + 0.5)  # the planner never looked in between: judged at cancel

    assert (first.record.outcome, first.record.reason) == ("cancelled", "soft_timeout")
    assert p.breakers.get("a").fail_counter == 1
    assert p.breakers.get("b").fail_counter == 0


def test_a_primary_already_flagged_slow_is_not_counted_again_when_it_loses() -> None:
    p, call, first, hedge = _raced({"warmup_s": 0.4, "min_samples": 50})
    assert isinstance(call.next_action(T0 + 0.45), Wait)  # past a's soft timeout: flagged and counted
    assert p.breakers.get("a").fail_counter == 1

    call.on_response(hedge, object(), T0 + 0.5)

    assert first.record.reason == "soft_timeout"
    assert p.breakers.get("a").fail_counter == 1


# -- an attempt no hedge started for is cut at its soft timeout ---------------------------------------

CUT_SOFT = {"warmup_s": 0.4, "min_samples": 50}


def test_an_attempt_no_hedge_started_for_is_cut_at_its_soft_timeout_and_the_chain_moves_on() -> None:
    p = make_planner(Scripted(), hedge={"after": 0.1, "budget_ratio": 0.0}, soft=CUT_SOFT)
    call = start(p)
    first = launch(call, T0)
    assert first.cut_at == pytest.approx(T0 + 0.4)

    waiting = call.next_action(T0 + 0.1)  # the hedge is refused (budget): wait for the cut
    assert isinstance(waiting, Wait) and waiting.until == pytest.approx(T0 + 0.4)
    assert isinstance(call.next_action(T0 + 0.39), Wait)
    second = launch(call, T0 + 0.4)

    assert second.spec.name == "b"
    assert call.in_flight == [second]
    assert (first.record.outcome, first.record.reason) == ("failure", "soft_timeout")
    assert isinstance(first.record.error, TimeoutError)
    assert str(first.record.error) == "no answer within the soft timeout (0.4 s) and no hedge started"
    assert p.breakers.get("a").fail_counter == 1  # once: slow, and cut for it
    assert p.latency.percentile("a", "default", 50, 1) is None  # cut off: only a lower bound was learned
    assert p.latency.samples("a", "default") == (0, 1)  # type: ignore[attr-defined]


def test_the_cut_waits_while_the_client_is_the_slow_one() -> None:
    p = make_planner(Scripted(delay_s=0.2), hedge={"after": 0.1, "budget_ratio": 0.0}, soft=CUT_SOFT)
    call = start(p)
    first = launch(call, T0)

    assert isinstance(call.next_action(T0 + 0.4), Wait)  # 0.4 s of wall time, 0.2 s of it the client's
    assert isinstance(call.next_action(T0 + 0.55), Wait)
    assert call.in_flight == [first]
    assert launch(call, T0 + 0.6).spec.name == "b"  # the provider's share reached the soft timeout
    assert first.record.reason == "soft_timeout"


def test_a_hedged_attempt_races_on_past_its_soft_timeout_and_the_unhedged_one_beside_it_is_cut() -> None:
    p = make_planner(Scripted(), chain=("a", "b", "c"), hedge={"after": 0.1, "budget_ratio": 1.0, "max_extra": 2},
                     soft=CUT_SOFT)  # fmt: skip
    call = start(p)
    first = launch(call, T0)
    hedge = launch(call, T0 + 0.1)
    assert isinstance(call.next_action(T0 + 0.2), Wait)  # b's own hedge is due: refused by the budget
    assert hedge.record.extra["hedge_skipped"] == "budget"

    assert isinstance(call.next_action(T0 + 0.51), Wait)  # b passed its soft timeout with no hedge of its own

    assert (hedge.record.outcome, hedge.record.reason) == ("failure", "soft_timeout")  # cut
    assert call.in_flight == [first]  # still racing: it was hedged


@pytest.mark.parametrize("max_extra", [1, 2])
def test_max_extra_is_how_many_hedges_one_call_may_start(max_extra: int) -> None:
    p = make_planner(
        Scripted(), chain=("a", "b", "c"), hedge={"after": 0.1, "budget_ratio": 1.0, "max_extra": max_extra}
    )
    call = start(p)
    launch(call, T0)

    hedge = launch(call, T0 + 0.1)

    if max_extra == 1:
        assert hedge.hedge_at is None  # no hedge of the hedge
        assert isinstance(call.next_action(T0 + 0.3), Wait)
    else:
        assert hedge.hedge_at == pytest.approx(T0 + 0.2)
        p.budgets.hedges("chat").record_request(T0)  # room in the budget for a second hedge
        assert launch(call, T0 + 0.2).spec.name == "c"


def test_each_attempt_in_flight_is_flagged_slow_the_moment_it_crosses_its_soft_timeout() -> None:
    p, call, first, hedge = _raced({"warmup_s": 0.4, "min_samples": 50})

    assert isinstance(call.next_action(T0 + 0.4), Wait)  # exactly at a's soft timeout
    assert first.record.extra["slow"] is True and "slow" not in hedge.record.extra
    assert p.breakers.get("a").suspect  # few new requests to a until a verdict

    assert isinstance(call.next_action(T0 + 0.5), Wait)  # the hedge started at 0.1: its own soft timeout
    assert hedge.record.extra["slow"] is True
    assert (p.breakers.get("a").fail_counter, p.breakers.get("b").fail_counter) == (1, 1)
