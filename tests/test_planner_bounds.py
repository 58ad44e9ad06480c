"""When the planner cuts, flags or wakes for an attempt in flight (no server, injected clock, scripted client delay).

README "Under load": every bound of an attempt (hedge, soft timeout, cut, whole-attempt bound) is
judged on the provider's share of its time; a bound the client's own delay postponed moves by that
delay, at least ``MIN_EXTENSION_S`` ahead, a bound later when the client was saturated (late for half
the attempt or more), and never past the deadline minus ``MIN_ATTEMPT_S``. One verdict per attempt.
"""

from __future__ import annotations

import pytest
from test_planner_streams import Ended
from test_under_load_planner import T0, Scripted, launch, make_planner, start

from llm_resilience import _outcomes as k
from llm_resilience._hooks import HookSet
from llm_resilience._planner import MIN_ATTEMPT_S, MIN_EXTENSION_S, Wait

pytestmark = pytest.mark.sans_io  # no server: `make mutate` runs these for every mutant

SOFT = {"warmup_s": 0.5, "min_samples": 50}


# -- the whole-attempt bound ---------------------------------------------------------------------------


def test_the_bound_of_an_attempt_that_already_ended_cuts_nothing() -> None:
    call = start(make_planner(Scripted(delay_s=0.6)))
    first = launch(call, T0)
    call.on_response(first, object(), T0 + 0.9)

    assert call.at_bound(first, T0 + 1.0) is None  # the driver's watchdog fired late: nothing to cut
    assert not first.expired


def test_a_client_late_for_exactly_half_the_attempt_is_saturated_and_looks_again_a_bound_later() -> None:
    p = make_planner(Scripted(delay_s=0.375), soft=SOFT)  # a: soft-cut at 0.5 s (b follows)
    call = start(p)
    first = launch(call, T0)
    assert first.timeout_s == 0.5

    later = call.at_bound(first, T0 + 0.75)  # 0.375 s of 0.75 s the client's: exactly half

    assert later == pytest.approx(T0 + 0.75 + 0.5)  # now + the bound, past start + bound + delay (T0 + 0.875)


def test_a_client_late_for_under_half_the_attempt_moves_the_bound_by_its_delay() -> None:
    p = make_planner(Scripted(delay_s=0.25), soft=SOFT)
    call = start(p)
    first = launch(call, T0)

    later = call.at_bound(first, T0 + 0.625)  # 0.25 s of 0.625 s the client's: under half

    assert later == pytest.approx(T0 + 0.75)  # start + bound + the client's delay


def test_a_postponed_bound_is_at_least_min_extension_ahead() -> None:
    call = start(make_planner(Scripted(delay_s=0.25)))
    first = launch(call, T0)

    later = call.at_bound(first, T0 + 1.248)  # the provider's share (0.998 s) is just under the 1 s bound

    assert later is not None and later - (T0 + 1.248) == pytest.approx(MIN_EXTENSION_S, abs=1e-9)


def test_no_extension_within_min_attempt_time_of_the_deadline() -> None:
    p = make_planner(Scripted(delay_s=2.0))
    call = start(p, 7.0)  # deadline 10.0 (numbers exact in floating point)
    first = launch(call, 7.0)
    now = 10.0 - MIN_ATTEMPT_S
    assert now == call.deadline_at - MIN_ATTEMPT_S

    assert call.at_bound(first, now) is None  # cut, though the client was the slow one
    assert not first.expired  # and not blamed on the provider


def test_an_attempt_past_its_bound_is_cut_even_when_the_one_beside_it_got_more_time() -> None:
    p = make_planner(Scripted(), hedge={"after": 0.3, "budget_ratio": 1.0})
    call = start(p)
    first = launch(call, T0)
    hedge = launch(call, T0 + 0.3)
    first.io_measured = True  # a's request never left the client: all of its time is the client's

    assert isinstance(call.next_action(T0 + 1.3), Wait)  # a: bound postponed; b: at its bound, cut

    assert call.in_flight == [first]
    assert (hedge.record.outcome, hedge.record.reason) == ("failure", k.TIMEOUT)


def test_an_attempt_the_planner_cuts_at_its_soft_timeout_fails_as_soft_timeout() -> None:
    p = make_planner(Scripted(), soft=SOFT)
    call = start(p)
    first = launch(call, T0)
    assert first.soft_cut and first.bound_at == pytest.approx(T0 + 0.5)

    second = launch(call, T0 + 0.5)

    assert second.spec.name == "b"
    assert (first.record.outcome, first.record.reason) == ("failure", k.SOFT_TIMEOUT)
    assert p.latency.samples("a", "default") == (0, 1)  # type: ignore[attr-defined]


def test_an_attempt_flagged_slow_and_then_cut_at_its_bound_counts_once() -> None:
    p = make_planner(Scripted(), chain=("a",), soft={"warmup_s": 0.2, "min_samples": 50})  # fail_max 2
    call = start(p)
    first = launch(call, T0)  # the last model: not cut at its soft timeout
    assert isinstance(call.next_action(T0 + 0.3), Wait)
    assert first.record.extra["slow"] is True

    call.next_action(T0 + 1.0)  # its 1 s bound: cut

    assert (first.record.outcome, first.record.reason) == ("failure", k.TIMEOUT)
    assert p.breakers.get("a").fail_counter == 1 and p.breakers.get("a").state == "closed"


# -- slow in flight ---------------------------------------------------------------------------------------


def test_an_attempt_the_client_made_slow_is_not_flagged_while_the_one_beside_it_is() -> None:
    p = make_planner(Scripted(), soft=SOFT, hedge={"after": 0.1, "budget_ratio": 1.0})
    call = start(p)
    first = launch(call, T0)
    hedge = launch(call, T0 + 0.1)
    first.io_measured = True  # a's request never left the client
    hedge.io_measured, hedge.sent_at = True, T0 + 0.1  # b's did at once

    assert isinstance(call.next_action(T0 + 0.6), Wait)  # both past their soft timeout (0.5 s)

    assert "slow" not in first.record.extra and first.record.extra["client_overload"] == "client_saturated"
    assert hedge.record.extra["slow"] is True


def test_a_slow_attempt_makes_its_model_suspect_even_where_slowness_does_not_count() -> None:
    p = make_planner(Scripted(), chain=("a",), soft={"warmup_s": 0.2, "min_samples": 50},
                     breakers={"count": ["server_error"]})  # fmt: skip
    call = start(p)
    first = launch(call, T0)

    assert isinstance(call.next_action(T0 + 0.3), Wait)

    assert first.record.extra["slow"] is True
    assert p.breakers.get("a").fail_counter == 0 and p.breakers.get("a").suspect


# -- when the planner wakes ------------------------------------------------------------------------------


def test_the_planner_wakes_for_a_postponed_cut_when_the_providers_share_reaches_it() -> None:
    p = make_planner(Scripted(delay_s=0.2), hedge={"after": 0.1, "budget_ratio": 0.0}, soft=SOFT)
    call = start(p)
    launch(call, T0)

    waiting = call.next_action(T0 + 0.5)  # the cut at 0.5 s is postponed by the client's 0.2 s

    assert waiting == Wait(until=pytest.approx(T0 + 0.7))


def test_a_hedged_attempt_flagged_slow_no_longer_wakes_the_planner() -> None:
    p = make_planner(Scripted(), soft=SOFT, hedge={"after": 0.1, "budget_ratio": 1.0})
    call = start(p)
    first = launch(call, T0)
    launch(call, T0 + 0.1)  # b, the last model: no cut, slow at T0 + 0.6

    waiting = call.next_action(T0 + 0.55)  # a: flagged slow at its soft timeout; racing on, hedged

    assert first.record.extra["slow"] is True
    assert waiting == Wait(until=pytest.approx(T0 + 0.6))


def test_a_client_late_for_exactly_a_tenth_of_the_attempt_is_noticed() -> None:
    signal = Scripted(delay_s=0.1)
    call = start(make_planner(signal))
    first = launch(call, T0)

    later = call.at_bound(first, T0 + 1.0)  # 0.1 s of 1 s the client's: the provider's 0.9 s is within the bound

    assert later == pytest.approx(T0 + 1.1)
    assert signal.asked[-1] == (T0, T0 + 1.0)  # the client's delay over the attempt's own time


def test_a_saturated_client_keeps_an_attempt_past_its_cut_and_hooks_hear_the_cut_later() -> None:
    signal = Scripted(delay_s=0.45)
    ended = Ended()
    p = make_planner(signal, hedge={"after": 0.1, "budget_ratio": 0.0}, soft={"warmup_s": 0.4, "min_samples": 50})
    p.hooks = HookSet([ended])
    call = start(p)
    first = launch(call, T0)

    assert isinstance(call.next_action(T0 + 0.9), Wait)  # provider's share 0.45 s > 0.4 s, but the client was saturated
    assert call.in_flight == [first]

    signal.delay = 0.0
    assert launch(call, T0 + 1.0).spec.name == "b"  # the client caught up: past the soft timeout, cut
    assert ended.attempts == [(call, first.record)]
