"""The planner's rules under load (README "Under load"), with an injected clock and saturation signal.

``Scripted`` stands in for the process's saturation monitor: the test says how long the client
itself held things up, and whether the process is still cold. No server, no sleeps.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from llm_resilience import AllAttemptsFailed
from llm_resilience._breakers import BreakerRegistry, ProbeTicket
from llm_resilience._hooks import HookSet
from llm_resilience._latency import LatencyStats
from llm_resilience._planner import Attempt, Call, CallRequest, Fail, Launch, Planner, Wait
from llm_resilience._policy import Policy
from llm_resilience._saturation import _HISTORY, _Samples

pytestmark = pytest.mark.sans_io  # no server: `make mutate` runs these for every mutant

T0 = 1000.0
MESSAGES = [{"role": "user", "content": "hello"}]


class Scripted:
    """A saturation signal whose answers the test sets."""

    def __init__(self, delay_s: float = 0.0, cold: bool = False) -> None:
        self.delay = delay_s
        self.is_cold = cold
        self.asked: list[tuple[float, float]] = []

    def delay_s(self, since: float, now: float) -> float:
        self.asked.append((since, now))
        return self.delay

    def cold(self) -> bool:
        return self.is_cold

    def ended(self) -> None:
        self.is_cold = False


def make_planner(
    signal: Scripted | None = None,
    *,
    chain: tuple[str, ...] = ("a", "b"),
    soft: dict[str, Any] | None = None,
    hedge: dict[str, Any] | None = None,
    breakers: dict[str, Any] | None = None,
    wall: list[datetime] | None = None,
) -> Planner:
    classes: dict[str, Any] = {"default": {"timeout_s": 1.0, "deadline_s": 3.0}}
    if soft is not None:
        classes["default"]["soft_timeout"] = soft
    route: dict[str, Any] = {"chain": list(chain)}
    if hedge is not None:
        route["hedge"] = hedge
    pol = Policy.from_dict(
        {
            "models": {
                name: {
                    "litellm_params": {"model": f"openai/{name}", "api_base": "http://127.0.0.1:9/v1", "api_key": "k"}
                }
                for name in ("a", "b", "c")
            },
            "routes": {"chat": route},
            "prompt_classes": classes,
            "breakers": {"default": {"fail_max": 2, "reset_timeout_s": 30, **(breakers or {})}},
        }
    )
    registry = BreakerRegistry(pol.breaker_settings, clock=None if wall is None else (lambda: wall[0]))
    return Planner(
        policy=pol, breakers=registry, hooks=HookSet(), latency=LatencyStats(),
        saturation=signal or Scripted(),
    )  # fmt: skip


def start(p: Planner, now: float = T0) -> Call:
    return p.start(CallRequest(model="chat", messages=MESSAGES, kwargs={}), now)


def launch(call: Call, now: float) -> Attempt:
    action = call.next_action(now)
    assert isinstance(action, Launch), action
    return action.attempt


# -- whole-attempt bound and client saturation ---------------------------------------------------


def test_a_healthy_client_gets_its_attempt_cut_at_the_bound() -> None:
    call = start(make_planner(Scripted(delay_s=0.0)))
    first = launch(call, T0)
    assert first.bound_at == pytest.approx(T0 + 1.0)
    assert first.read_timeout_s == pytest.approx(3.0)  # per read: the deadline (the bound is the whole attempt)

    assert call.at_bound(first, T0 + 1.0) is None
    assert first.expired


def test_a_saturated_client_keeps_its_attempt_until_the_providers_share_exceeds_the_bound() -> None:
    signal = Scripted(delay_s=0.4)
    p = make_planner(signal)
    call = start(p)
    first = launch(call, T0)

    later = call.at_bound(first, T0 + 1.0)  # 1.0 s of wall time, 0.4 s of it the client's

    assert later == pytest.approx(T0 + 1.4)
    assert first.record.extra["client_overload"] == "client_saturated"
    assert first.record.extra["client_delay_s"] == pytest.approx(0.4)
    assert call.at_bound(first, T0 + 1.4) is None  # the provider's share reached 1.0 s: cut
    call.on_error(first, TimeoutError("cut"), T0 + 1.4)
    assert (first.record.outcome, first.record.reason) == ("failure", "timeout")
    assert p.breakers.get("a").fail_counter == 1


def test_an_attempt_timed_out_while_saturated_is_client_overload_and_not_counted() -> None:
    signal = Scripted(delay_s=0.4)
    p = make_planner(signal, soft={"warmup_s": 0.2, "min_samples": 50})
    call = start(p)
    first = launch(call, T0)
    assert first.soft_cut and first.timeout_s == pytest.approx(0.2)

    call.on_error(first, TimeoutError("litellm's own read timeout"), T0 + 0.25)

    assert (first.record.outcome, first.record.reason) == ("client_overload", "soft_timeout")
    assert p.breakers.get("a").fail_counter == 0
    assert p.latency.percentile("a", "default", 50, 1) is None  # not fed into the latency window
    summary = call.summary()["attempts"][0]
    assert (summary["outcome"], summary["client_overload"]) == ("client_overload", "client_saturated")


def test_the_deadline_still_holds_under_saturation() -> None:
    call = start(make_planner(Scripted(delay_s=10.0)))
    first = launch(call, T0)

    assert call.at_bound(first, T0 + 1.0) == pytest.approx(T0 + 3.0)  # extended, but only to the deadline
    assert call.at_bound(first, T0 + 3.0) is None


def test_a_cold_process_does_not_blame_the_first_call() -> None:
    signal = Scripted(cold=True)
    p = make_planner(signal)
    call = start(p)
    first = launch(call, T0)

    assert call.at_bound(first, T0 + 1.0) == pytest.approx(T0 + 3.0)
    assert first.record.extra["client_overload"] == "cold_start"
    call.on_error(first, TimeoutError("deadline"), T0 + 3.0)
    assert first.record.outcome == "client_overload"
    assert p.breakers.get("a").fail_counter == 0
    assert not signal.is_cold  # an attempt ended: the next one is judged normally


def test_a_slow_success_while_saturated_is_neither_slow_for_the_breaker_nor_learned() -> None:
    p = make_planner(Scripted(delay_s=0.3), chain=("a",), soft={"warmup_s": 0.2, "min_samples": 50})
    call = start(p)
    first = launch(call, T0)  # the last model: never cut at the soft timeout, judged when it ends

    call.on_response(first, object(), T0 + 0.45)

    assert first.record.outcome == "success" and "slow" not in first.record.extra
    assert first.record.extra["client_overload"] == "client_saturated"
    assert p.breakers.get("a").fail_counter == 0
    assert p.latency.percentile("a", "default", 50, 1) is None


def test_a_slow_success_without_saturation_still_counts() -> None:
    p = make_planner(Scripted(delay_s=0.0), chain=("a",), soft={"warmup_s": 0.2, "min_samples": 50})
    call = start(p)
    first = launch(call, T0)

    call.on_response(first, object(), T0 + 0.45)

    assert first.record.extra["slow"] is True
    assert p.breakers.get("a").fail_counter == 1


def test_time_before_the_request_left_and_after_its_answer_was_read_is_the_clients() -> None:
    # Sync threads queueing on the GIL: no lag probe sees it, the driver's request timing does.
    p = make_planner(Scripted(delay_s=0.0), chain=("a",), soft={"warmup_s": 0.2, "min_samples": 50})
    call = start(p)
    first = launch(call, T0)
    first.io_measured, first.sent_at, first.answered_at = True, T0 + 0.15, T0 + 0.30

    call.on_response(first, object(), T0 + 0.35)  # 0.35 s of wall time, 0.15 s of it the provider's

    assert "slow" not in first.record.extra
    assert p.breakers.get("a").fail_counter == 0
    assert first.record.extra["client_overload"] == "client_saturated"
    assert first.record.extra["client_delay_s"] == pytest.approx(0.2)


def test_a_provider_slow_between_request_and_answer_is_still_blamed() -> None:
    p = make_planner(Scripted(delay_s=0.0), chain=("a",), soft={"warmup_s": 0.2, "min_samples": 50})
    call = start(p)
    first = launch(call, T0)
    first.io_measured, first.sent_at, first.answered_at = True, T0 + 0.01, T0 + 0.44

    call.on_response(first, object(), T0 + 0.45)

    assert first.record.extra["slow"] is True
    assert p.breakers.get("a").fail_counter == 1


def test_an_attempt_timed_at_the_wire_is_hedged_at_its_threshold_whatever_the_lag_probes_say() -> None:
    # The sequential incident: after a few late ticks of the thread probe, its estimate (16 x the mean
    # lateness) postponed the third spike call's hedge by ~300 ms, while the request had been at the
    # provider since the attempt began. The wire says where the time went: the provider's.
    p = make_planner(Scripted(delay_s=0.3), hedge={"after": 0.1, "budget_ratio": 1.0})
    call = start(p)
    first = launch(call, T0)
    first.io_measured, first.sent_at = True, T0 + 0.002

    action = call.next_action(T0 + 0.1)

    assert isinstance(action, Launch) and action.attempt.spec.name == "b"
    assert "hedge_skipped" not in first.record.extra


def test_a_slow_answer_timed_at_the_wire_is_blamed_on_the_provider_whatever_the_lag_probes_say() -> None:
    p = make_planner(Scripted(delay_s=0.3), chain=("a",), soft={"warmup_s": 0.2, "min_samples": 50})
    call = start(p)
    first = launch(call, T0)
    first.io_measured, first.sent_at, first.answered_at = True, T0 + 0.01, T0 + 0.44

    call.on_response(first, object(), T0 + 0.45)

    assert first.record.extra["slow"] is True
    assert "client_overload" not in first.record.extra
    assert p.breakers.get("a").fail_counter == 1


def test_an_attempt_whose_request_has_not_left_the_client_is_not_cut_at_its_bound() -> None:
    p = make_planner(Scripted(delay_s=0.0))
    call = start(p)
    first = launch(call, T0)
    first.io_measured = True  # the driver measures, and litellm has not sent the request yet

    later = call.at_bound(first, T0 + 1.0)

    assert later is not None and later > T0 + 1.0
    assert not first.expired
    first.sent_at = T0 + 1.1
    assert call.at_bound(first, T0 + 2.4) is None  # 1.3 s on the wire: the provider's, cut
    assert first.expired


def test_planner_bounds_attempts_in_flight_and_wakes_at_the_bound() -> None:
    p = make_planner(Scripted(delay_s=0.0), hedge={"after": 0.3, "budget_ratio": 1.0})
    call = start(p)
    first = launch(call, T0)
    hedge = launch(call, T0 + 0.3)
    assert hedge.spec.name == "b"
    assert call.next_action(T0 + 0.4) == Wait(until=pytest.approx(T0 + 1.0))

    action = call.next_action(T0 + 1.0)  # a's bound: cut (the driver stops it); b still runs

    assert isinstance(action, Wait)
    assert (first.record.outcome, first.record.reason) == ("failure", "timeout")
    assert call.in_flight == [hedge]


def test_a_hedge_waits_while_the_client_is_the_slow_one() -> None:
    signal = Scripted(delay_s=0.2)
    p = make_planner(signal, hedge={"after": 0.3, "budget_ratio": 1.0})
    call = start(p)
    first = launch(call, T0)

    waiting = call.next_action(T0 + 0.3)  # 0.3 s of wall time, 0.2 s of it the client's: no hedge yet

    assert isinstance(waiting, Wait) and waiting.until == pytest.approx(T0 + 0.5)
    hedge = launch(call, T0 + 0.5)
    assert hedge.spec.name == "b" and first.record.extra["hedged_by"] == hedge.record.index


def test_a_hedge_the_client_keeps_excusing_says_why_it_did_not_start() -> None:
    signal = Scripted(delay_s=0.3)  # the client was late for 0.3 s of the attempt's first 0.35 s
    p = make_planner(signal, hedge={"after": 0.1, "budget_ratio": 1.0})
    call = start(p)
    first = launch(call, T0)
    first.client_delay_s = 0.25  # the attempt's estimate so far: its (moved) hedge threshold is due

    waiting = call.next_action(T0 + 0.35)

    assert isinstance(waiting, Wait)
    assert first.record.extra["hedge_skipped"] == "client_overload"  # on the span: why on-call saw no hedge
    signal.delay = 0.0  # the client caught up: the hedge starts, and the stale reason goes
    hedge = launch(call, T0 + 0.8)
    assert hedge.spec.name == "b" and "hedge_skipped" not in first.record.extra


# -- panic mode --------------------------------------------------------------------------------


def open_breakers(p: Planner, *names: str) -> None:
    for name in names:  # in this order: the first one opened first
        breaker = p.breakers.get(name)
        for _ in range(breaker.settings.fail_max):
            breaker.record(ProbeTicket(probe=False), "connection")
        assert breaker.state == "open"


def test_panic_tries_the_model_whose_breaker_opened_first() -> None:
    p = make_planner()
    open_breakers(p, "b", "a")
    call = start(p, T0 + 1)

    panic = launch(call, T0 + 1)

    assert panic.spec.name == "b"
    assert panic.record.extra["panic"] is True and "probe" not in panic.record.extra
    assert [r.reason for r in call.records[:2]] == ["breaker_open", "breaker_open"]
    call.on_response(panic, object(), T0 + 1.1)
    assert p.breakers.get("b").state == "open"  # a panic outcome moves nothing
    assert call.summary()["attempts"][2]["panic"] is True


def test_a_failed_panic_attempt_is_not_counted_and_the_call_fails() -> None:
    p = make_planner()
    open_breakers(p, "a", "b")
    counter = p.breakers.get("a").fail_counter
    call = start(p, T0 + 1)
    panic = launch(call, T0 + 1)
    assert panic.spec.name == "a"

    call.on_error(panic, ConnectionError("refused"), T0 + 1.1)
    action = call.next_action(T0 + 1.1)

    assert isinstance(action, Fail) and isinstance(action.error, AllAttemptsFailed)
    assert p.breakers.get("a").fail_counter == counter


def test_fail_fast_raises_at_once() -> None:
    p = make_planner(breakers={"panic": "fail_fast"})
    open_breakers(p, "a", "b")
    call = start(p, T0 + 1)

    action = call.next_action(T0 + 1)

    assert isinstance(action, Fail) and isinstance(action.error, AllAttemptsFailed)


# -- suspect gating ----------------------------------------------------------------------------


def test_a_suspect_model_gets_one_new_request_at_a_time_until_a_verdict() -> None:
    p = make_planner(breakers={"fail_max": 5})
    slow_call = start(p)
    slow = launch(slow_call, T0)
    slow_call.on_error(slow, ConnectionError("reset"), T0 + 0.1)  # a's first failure is known
    assert p.breakers.get("a").suspect

    admitted = launch(start(p, T0 + 0.2), T0 + 0.2)
    gated_call = start(p, T0 + 0.2)
    gated = launch(gated_call, T0 + 0.2)

    assert admitted.spec.name == "a" and admitted.record.extra["suspect"] is True
    assert gated.spec.name == "b"
    assert (gated_call.records[0].outcome, gated_call.records[0].reason) == ("skipped", "suspect")
    # While the admitted one runs, its slot stays taken: the next requests still go down the chain.
    later_call = start(p, T0 + 0.3)
    assert launch(later_call, T0 + 0.3).spec.name == "b"


def test_when_every_model_is_suspect_a_call_still_tries_the_first_one() -> None:
    # Suspect gating diverts requests down the chain; with no model left to divert to it must
    # not turn into failing every call at once (the soak's livelock: callers retrying instantly
    # starved the few admitted requests whose answers would have cleared the suspicion).
    p = make_planner(breakers={"fail_max": 5})
    for name in ("a", "b"):
        p.breakers.get(name).mark_suspect()
    holders = [launch(start(p, T0), T0) for _ in range(2)]  # one suspect slot each, still in flight
    assert [h.spec.name for h in holders] == ["a", "b"]

    call = start(p, T0 + 0.1)
    overflow = launch(call, T0 + 0.1)

    assert overflow.spec.name == "a"
    assert overflow.record.extra["suspect_overflow"] is True and not overflow.suspect_slot
    assert [(r.model, r.reason) for r in call.records[:2]] == [("a", "suspect"), ("b", "suspect")]
    # An ordinary request: its failure counts (the breaker is closed), and frees no slot it never took.
    call.on_error(overflow, ConnectionError("reset"), T0 + 0.2)
    assert p.breakers.get("a").fail_counter == 1
    assert not p.breakers.get("a").take_suspect_slot()  # the holder's slot is still the only one


def test_a_slow_attempt_in_flight_makes_its_model_suspect() -> None:
    p = make_planner(hedge={"after": 0.5, "budget_ratio": 0.0}, soft={"warmup_s": 0.2, "min_samples": 50})
    call = start(p)
    launch(call, T0)
    call.next_action(T0 + 0.2)  # past its soft timeout, still running: slow for the breaker

    assert p.breakers.get("a").suspect
    first_new = launch(start(p, T0 + 0.21), T0 + 0.21)
    second_call = start(p, T0 + 0.21)
    second_new = launch(second_call, T0 + 0.21)
    assert (first_new.spec.name, second_new.spec.name) == ("a", "b")


def test_a_success_clears_suspicion() -> None:
    p = make_planner(breakers={"fail_max": 5})
    call = start(p)
    first = launch(call, T0)
    call.on_error(first, ConnectionError("reset"), T0 + 0.1)
    admitted_call = start(p, T0 + 0.2)
    admitted = launch(admitted_call, T0 + 0.2)

    admitted_call.on_response(admitted, object(), T0 + 0.3)

    assert not p.breakers.get("a").suspect
    names = [launch(start(p, T0 + 0.4), T0 + 0.4).spec.name for _ in range(3)]
    assert names == ["a", "a", "a"]


def test_a_suspect_model_with_nothing_after_it_still_gets_the_request() -> None:
    # Seen in the 20 calls/s replay: primary open, the fast model suspect after a stall; calls that
    # skipped both failed at once (AllAttemptsFailed) although the fast model was closed and healthy.
    p = make_planner(chain=("a",), breakers={"fail_max": 5})
    failing_call = start(p)
    failing = launch(failing_call, T0)
    failing_call.on_error(failing, ConnectionError("reset"), T0 + 0.1)
    launch(start(p, T0 + 0.2), T0 + 0.2)  # takes the one suspect slot

    crowded = start(p, T0 + 0.2)
    attempt = launch(crowded, T0 + 0.2)

    assert attempt.spec.name == "a"  # the gate sends a request elsewhere, never nowhere
    assert [(r.model, r.reason) for r in crowded.records[:-1]] == [("a", "suspect")]


def test_a_suspect_model_is_tried_when_every_later_model_is_out() -> None:
    p = make_planner(breakers={"fail_max": 1, "suspect_admit": 1})
    b_call = p.start(CallRequest(model="b", messages=MESSAGES, kwargs={}), T0)  # a model name: a one-model route
    b_attempt = launch(b_call, T0)
    b_call.on_error(b_attempt, ConnectionError("reset"), T0 + 0.01)
    assert p.breakers.get("b").state == "open"
    p.breakers.get("a").mark_suspect()
    launch(start(p, T0 + 0.02), T0 + 0.02)  # a's slot

    attempt = launch(start(p, T0 + 0.03), T0 + 0.03)

    assert attempt.spec.name == "a" and "panic" not in attempt.record.extra


def test_an_answer_to_a_request_sent_after_the_failure_still_resets_the_count() -> None:
    p = make_planner(breakers={"fail_max": 2, "suspect_admit": 5})
    calls = [start(p, T0 + 0.01 * i) for i in (0, 1)]
    slow = [launch(c, T0 + 0.01 * i) for i, c in enumerate(calls)]
    calls[0].on_error(slow[0], TimeoutError("cut"), T0 + 1.0)
    fresh_call = start(p, T0 + 1.0)
    fresh = launch(fresh_call, T0 + 1.0)
    assert fresh.spec.name == "a"

    fresh_call.on_response(fresh, object(), T0 + 1.005)
    calls[1].on_error(slow[1], TimeoutError("cut"), T0 + 1.01)

    assert p.breakers.get("a").state == "closed"  # success in between: not two in a row
    assert p.breakers.get("a").suspect  # the last failure is news again


# -- a probe that times out while the client is saturated judged nothing: its slot is free again ------


def _probing(signal: Scripted, **options: Any) -> tuple[Planner, Call, Attempt, list[datetime]]:
    wall = [datetime(2030, 1, 1, tzinfo=UTC)]
    p = make_planner(signal, breakers={"fail_max": 1, "reset_timeout_s": 10}, wall=wall, **options)
    call = start(p)
    first = launch(call, T0)
    call.on_error(first, TimeoutError("cut"), T0 + 1.0)  # quiet client: blamed, a opens
    assert p.breakers.get("a").state == "open"
    wall[0] += timedelta(seconds=11)
    probing = start(p, T0 + 11)
    probe = launch(probing, T0 + 11)
    assert probe.spec.name == "a" and probe.ticket.probe
    return p, probing, probe, wall


def test_a_probe_timed_out_while_the_client_was_saturated_frees_its_slot() -> None:
    signal = Scripted()
    p, probing, probe, _ = _probing(signal)
    signal.delay = 0.8  # from now on the client is the slow one

    probing.on_error(probe, TimeoutError("litellm's own read timeout"), T0 + 12.0)

    assert probe.record.outcome == "client_overload"
    assert p.breakers.get("a").state == "half-open"
    nxt = launch(start(p, T0 + 12.0), T0 + 12.0)
    assert (nxt.spec.name, nxt.ticket.probe) == ("a", True)  # not skipped as probe_in_flight forever


def test_a_probe_cut_at_its_bound_while_the_client_was_saturated_frees_its_slot() -> None:
    signal = Scripted()
    p, probing, probe, _ = _probing(signal)
    signal.delay = 2.5  # of the 3 s until the deadline: saturated

    # Its bound keeps moving while the client is saturated; at the deadline it is cut, unblamed.
    assert probing.next_action(probing.deadline_at) is not None

    assert probe.record.outcome == "client_overload"
    nxt = launch(start(p, T0 + 15.0), T0 + 15.0)
    assert (nxt.spec.name, nxt.ticket.probe) == ("a", True)


SOFT = {"soft": {"warmup_s": 0.2, "min_samples": 50}}


def test_a_probe_answered_slowly_while_the_client_was_saturated_does_not_close_the_breaker() -> None:
    # Seen in the incident replay at 100 calls/s: a probe to the sick model answered in 1.8 s, 1.2 s
    # of it the client's. The provider's own 0.6 s is 3x the soft timeout: whose fault the rest
    # was is unknown, so it is no verdict. As a success it closed the breaker and the spike
    # took ~300 more requests.
    signal = Scripted()
    p, probing, probe, _ = _probing(signal, **SOFT)
    signal.delay = 1.2

    probing.on_response(probe, object(), T0 + 12.8)

    assert probe.record.outcome == "success"  # the caller has its answer
    assert p.breakers.get("a").state == "half-open"
    nxt = launch(start(p, T0 + 12.8), T0 + 12.8)
    assert (nxt.spec.name, nxt.ticket.probe) == ("a", True)  # the next request probes again


def test_a_probe_the_provider_answered_in_time_closes_the_breaker_however_late_the_client_was() -> None:
    signal = Scripted()
    p, probing, probe, _ = _probing(signal, **SOFT)
    signal.delay = 1.7

    probing.on_response(probe, object(), T0 + 12.8)  # 1.8 s, of it 0.1 s the provider's: in time

    assert p.breakers.get("a").state == "closed"


def test_a_slow_answer_the_client_excused_still_counts_as_an_answer_while_closed() -> None:
    # Only a probe's excused answer is withheld: in a burst against healthy providers most answers
    # are excused, and the count must still reset between the few unexcused slow ones.
    signal = Scripted()
    p = make_planner(signal, breakers={"fail_max": 2, "suspect_admit": 5}, **SOFT)
    failing_call, slow_call = start(p), start(p, T0 + 0.01)
    failing = launch(failing_call, T0)
    failing_call.on_error(failing, ConnectionError("reset"), T0 + 0.005)
    slow = launch(slow_call, T0 + 0.01)
    signal.delay = 0.6

    slow_call.on_response(slow, object(), T0 + 1.01)  # 0.4 s of the provider's: past the soft timeout

    breaker = p.breakers.get("a")
    assert (breaker.fail_counter, breaker.suspect) == (0, False)


# -- the monitor's estimate: late probes of an idle process are not saturation -------------------


def _late_probes(cpu_used_s: float, queued_share: float = 0.0) -> float:
    """Twenty probes each 50 ms late over one second, while the process used ``cpu_used_s`` of CPU
    and the probing thread spent ``queued_share`` of each probe's lateness on the OS's run queue."""
    samples = _Samples()
    cpu_now = time.process_time()
    for i in range(20):
        due = T0 + 0.05 * i
        samples.append(due, due + 0.05, cpu_now - cpu_used_s * (1 - i / 20), 0.05 * queued_share * i)
    return samples.delay(T0, T0 + 1.0)


def test_late_probes_of_a_busy_process_are_the_clients_delay() -> None:
    assert _late_probes(cpu_used_s=0.9) == pytest.approx(1.0)  # overdue for the whole second


def test_late_probes_of_a_mostly_idle_process_are_the_os_waking_it_not_saturation() -> None:
    # An idle VM wakes a sleeping thread 50-400 ms late; the process did no work to cause it.
    assert _late_probes(cpu_used_s=0.01) == 0.0
    assert _late_probes(cpu_used_s=0.01, queued_share=0.3) == 0.0  # a little queueing does not explain it


def test_late_probes_of_an_idle_process_starved_by_other_processes_are_the_clients_delay() -> None:
    # Noisy neighbours: the process did little work, but its probes were late because they waited
    # for a core other processes held. The provider is not to blame for that time either.
    # Its delay is the run-queue wait measured (19 probes x 50 ms x 0.9), not a multiple of the lateness.
    assert _late_probes(cpu_used_s=0.01, queued_share=0.9) == pytest.approx(19 * 0.05 * 0.9)


def test_only_the_probes_that_ran_during_the_attempt_count_however_full_the_ring() -> None:
    # The window is read from the ring's newest end (a bound check must not walk 1,024 samples).
    samples = _Samples()
    cpu_now = time.process_time()
    for i in range(1024):  # a full ring: ~10 s of punctual probes, then the attempt's second, late ones
        due = T0 - 10.0 + 0.01 * i
        samples.append(due, due, cpu_now - 1.0, 0.0)
    for i in range(20):
        due = T0 + 0.05 * i
        samples.append(due, due + 0.05, cpu_now - 0.9 * (1 - i / 20), 0.0)
    assert samples.delay(T0, T0 + 1.0) == pytest.approx(1.0)
    assert samples.delay(T0 + 2.0, T0 + 3.0) == 0.0  # no probe ran since: nothing to blame on the client


def test_a_ring_appended_to_while_it_is_read_gives_the_same_estimate() -> None:
    # The probing thread appends while an attempt's bound check reads the window by index: a full
    # ring then drops its oldest sample and every index moves. The reader notices and reads again.
    samples = _Samples()
    cpu_now = time.process_time()

    class AppendedMeanwhile(deque[tuple[float, float, float, float, float]]):
        reads = 0

        def __getitem__(self, index: Any) -> Any:
            AppendedMeanwhile.reads += 1
            if AppendedMeanwhile.reads == 2:  # mid-read: a punctual probe runs after the window
                samples.append(T0 + 2.0, T0 + 2.0, cpu_now, 0.0)
            return super().__getitem__(index)

    samples.ring = AppendedMeanwhile(maxlen=_HISTORY)
    for i in range(20):
        due = T0 + 0.05 * i
        samples.append(due, due + 0.05, cpu_now - 0.9 * (1 - i / 20), 0.0)
    assert samples.delay(T0, T0 + 1.0) == pytest.approx(1.0)
    assert AppendedMeanwhile.reads > 2  # it did read again


def test_a_probe_reads_its_threads_run_queue_wait() -> None:
    samples = _Samples()
    samples.add(T0, T0)
    queued = samples.ring[-1][3]
    if sys.platform.startswith("linux"):
        assert queued > 0.0  # this thread has waited on a run queue at some point since it started
    else:
        assert queued == 0.0


def _walked(samples: list[tuple[float, float]], pending: float | None, since: float, now: float) -> float:
    """The estimate of a busy process, by walking every sample (what the running sums must equal)."""
    late = [(due, now)] if (due := pending) is not None and due < now else []
    late += [(due, ran) for due, ran in samples if ran >= since]
    if not late:
        return 0.0
    summed = sum(ran - due for due, ran in late if ran - due >= 0.010)
    total = sum(max(0.0, min(ran, now) - max(due, since)) for due, ran in late if ran - due >= 0.010)
    return max(total, 16 * summed / len(late))


@pytest.mark.parametrize("seed", range(6))
def test_the_estimate_read_from_running_sums_is_the_one_walking_the_window_gives(seed: int) -> None:
    import random

    rng = random.Random(seed)
    samples, rows = _Samples(), []
    cpu_now = time.process_time()
    t = T0
    for _ in range(rng.randint(1, 1500)):  # past the ring's size too: the oldest fall out
        due = t + 0.01
        ran = due + rng.choice([0.0, 0.004, 0.012, 0.03, 0.25])
        rows.append((due, ran))
        samples.append(due, ran, cpu_now - 1000.0, 0.0)  # a busy process (no idle-VM exemption)
        t = ran
    kept = rows[-_HISTORY:]
    pending = rng.choice([None, t + 0.01, t - 0.02])
    samples.pending_due = pending
    for since in (kept[0][1] - 1.0, kept[len(kept) // 2][1], kept[-1][1], t + 1.0):
        for now in (t, t + 0.3, kept[-1][1] - 0.001):
            assert samples.delay(since, now) == pytest.approx(_walked(kept, pending, since, now), abs=1e-9)


def test_an_attempt_started_cold_is_excused_even_when_it_ends_after_the_process_warmed() -> None:
    signal = Scripted(cold=True)
    p = make_planner(signal)
    call = start(p)
    first = launch(call, T0)  # e.g. a stream's first attempt, judged at its first-token timeout

    call.on_error(first, TimeoutError("no content within 1 s"), T0 + 1.0)  # it leaves the call first: warm now

    assert first.record.outcome == "client_overload"
    assert first.record.extra["client_overload"] == "cold_start"
    assert p.breakers.get("a").fail_counter == 0
    second = launch(call, T0 + 1.0)
    call.on_error(second, TimeoutError("no content within 1 s"), T0 + 2.0)
    assert second.record.outcome == "failure"  # started warm: judged normally


# -- where a sync attempt's time went, by the wire (the driver's report) ---------------------------


def test_time_between_the_connect_and_the_request_leaving_is_the_clients() -> None:
    # A thread burst: the handshake took 1 ms, then the thread waited ~80 ms for the GIL between the
    # request's headers and its body. The provider could not answer a request it did not have.
    p = make_planner(Scripted(delay_s=0.0), soft={"warmup_s": 0.1, "min_samples": 50})
    call = start(p)
    first = launch(call, T0)
    assert first.soft_cut and first.bound_at == pytest.approx(T0 + 0.1)
    first.io_measured, first.on_wire, first.network_s = True, True, 0.001

    later = call.at_bound(first, T0 + 0.1)

    assert later is not None and not first.expired  # nothing of it was the provider's yet: not cut
    first.sent_at = T0 + 0.08
    assert call.at_bound(first, T0 + 0.15) is not None  # 71 ms of the provider's time: within the bound
    assert call.at_bound(first, T0 + 0.2) is None  # 121 ms, the client's 79 ms: the provider's, cut
    assert first.expired


def test_a_connect_in_progress_is_the_providers_time() -> None:
    p = make_planner(Scripted(delay_s=0.0), soft={"warmup_s": 0.1, "min_samples": 50})
    call = start(p)
    first = launch(call, T0)
    first.io_measured, first.on_wire, first.connecting_since = True, True, T0 + 0.002

    assert call.at_bound(first, T0 + 0.1) is None  # a handshake that does not complete: the host's side
    assert first.expired


def test_an_error_after_the_connect_began_is_the_providers_not_the_callers() -> None:
    p = make_planner()
    call = start(p)
    first = launch(call, T0)
    first.io_measured, first.on_wire = True, True  # connecting (or writing) when the connection broke

    call.on_error(first, ConnectionError("connection reset by peer"), T0 + 0.01)

    assert first.record.reason != "caller_error" and first.record.outcome == "failure"
    assert p.breakers.get("a").fail_counter == 1


def test_a_hedge_starts_at_its_threshold_on_the_callers_clock_when_the_client_is_busy_but_not_saturated() -> None:
    # The first calls of a spike, sync: litellm built the request for 30 ms in a pool thread busy with
    # the previous call's aborted loser. The threshold was learned from wall times, which carry that
    # share: postponing the hedge by it made each spike call cost the threshold plus the client's time.
    p = make_planner(Scripted(delay_s=0.0), hedge={"after": 0.1, "budget_ratio": 1.0})
    call = start(p)
    first = launch(call, T0)
    first.io_measured, first.on_wire, first.sent_at = True, True, T0 + 0.03

    action = call.next_action(T0 + 0.1)

    assert isinstance(action, Launch) and action.attempt.spec.name == "b"
    assert "hedge_skipped" not in first.record.extra


def test_a_hedge_waits_while_the_request_has_not_left_a_saturated_client() -> None:
    p = make_planner(Scripted(delay_s=0.0), hedge={"after": 0.1, "budget_ratio": 1.0})
    call = start(p)
    first = launch(call, T0)
    first.io_measured, first.on_wire = True, True  # 100 ms and the request has not left: all the client's

    waiting = call.next_action(T0 + 0.1)

    assert isinstance(waiting, Wait) and waiting.until is not None and waiting.until > T0 + 0.1
    assert first.record.extra["hedge_skipped"] == "client_overload"
    first.sent_at = T0 + 0.1  # it left: by T0 + 0.25 the client's share is 40 %, the provider's 150 ms
    assert isinstance(call.next_action(T0 + 0.25), Launch)
