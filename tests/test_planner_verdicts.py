"""What an attempt's end teaches the breaker and the latency window, and the soft timeout learned from it.

No server, injected clock, a scripted saturation signal (``Scripted``). README "How it decides":
the soft timeout is ``multiplier`` x the model's recent percentile within ``[floor_s, ceiling_s]``
(``warmup_s``, else the class timeout, until ``min_samples``); one verdict per attempt; a cut-off
attempt is a censored latency sample; an attempt the client made slow is no verdict on the provider.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import litellm
import pytest
from test_planner_attempts import Fits
from test_planner_streams import Ended
from test_under_load_planner import T0, Scripted, launch, make_planner, start

from llm_resilience import AllAttemptsFailed
from llm_resilience import _outcomes as k
from llm_resilience._breakers import BreakerRegistry
from llm_resilience._hooks import HookSet
from llm_resilience._latency import LatencyStats
from llm_resilience._planner import Call, CallRequest, Fail, Planner, Wait
from llm_resilience._policy import Policy

pytestmark = pytest.mark.sans_io  # no server: `make mutate` runs these for every mutant

lx = litellm.exceptions


def window(p: Planner) -> LatencyStats:
    assert isinstance(p.latency, LatencyStats)
    return p.latency


def overloaded() -> Exception:
    return lx.ServiceUnavailableError("overloaded", "openai", "a")


# -- the soft timeout ----------------------------------------------------------------------------------


def soft_timeout_of_a(soft: dict[str, Any], learned: Sequence[float] = ()) -> float | None:
    """The soft timeout the first attempt (model a, class default; class timeout 1 s) runs with."""
    p = make_planner(soft=soft)
    for latency in learned:
        window(p).observe("a", "default", latency)
    return launch(start(p), T0).soft_timeout_s


def test_the_soft_timeout_is_the_multiplier_times_the_models_learned_percentile_in_this_class() -> None:
    p = make_planner(soft={"percentile": 50, "multiplier": 2.0, "min_samples": 5, "warmup_s": 0.9})
    for latency in (0.1, 0.2, 0.2, 0.2, 0.3):
        window(p).observe("a", "default", latency)
    for latency in (0.45,) * 5:  # another model's, and another class's, latency: not a's in this class
        window(p).observe("b", "default", latency)
        window(p).observe("a", "other", latency)

    attempt = launch(start(p), T0)

    assert attempt.soft_timeout_s == pytest.approx(0.4)
    assert attempt.record.extra["soft_timeout_s"] == pytest.approx(0.4)


def test_the_learned_soft_timeout_stays_under_its_ceiling_and_the_class_timeout() -> None:
    soft = {"percentile": 50, "multiplier": 3.0, "min_samples": 3}
    assert soft_timeout_of_a({**soft, "ceiling_s": 0.5}, [0.3] * 3) == pytest.approx(0.5)
    assert soft_timeout_of_a({**soft, "ceiling_s": 5.0}, [0.4] * 3) == pytest.approx(1.0)  # the class's timeout_s
    assert soft_timeout_of_a({**soft, "ceiling_s": 5.0}, [0.1] * 3) == pytest.approx(0.3)  # under both: as learned


def test_without_a_warm_up_bound_the_soft_timeout_is_the_class_timeout_until_enough_samples() -> None:
    assert soft_timeout_of_a({"min_samples": 3}, [0.1, 0.1]) == pytest.approx(1.0)


# -- one verdict per attempt -----------------------------------------------------------------------------


def test_an_attempt_counted_slow_in_flight_is_not_counted_again_when_it_then_fails() -> None:
    p = make_planner(chain=("a",), soft={"warmup_s": 0.2, "min_samples": 50})  # fail_max 2
    call = start(p)
    first = launch(call, T0)  # the last model: it runs past its soft timeout
    assert isinstance(call.next_action(T0 + 0.3), Wait)
    assert first.record.extra["slow"] is True and p.breakers.get("a").fail_counter == 1

    call.on_error(first, overloaded(), T0 + 0.5)

    assert p.breakers.get("a").fail_counter == 1
    assert p.breakers.get("a").state == "closed"


def test_an_error_that_is_not_a_timeout_teaches_the_latency_window_nothing() -> None:
    p = make_planner()
    call = start(p)
    first = launch(call, T0)

    call.on_error(first, overloaded(), T0 + 0.8)

    assert window(p).samples("a", "default") == (0, 0)


def test_a_timed_out_attempt_is_a_censored_sample_of_its_model_in_this_class() -> None:
    p = make_planner()
    call = start(p)
    first = launch(call, T0)

    call.on_error(first, lx.Timeout("timed out", model="a", llm_provider="openai"), T0 + 1.0)

    assert window(p).samples("a", "default") == (0, 1)


# -- timeouts the client caused --------------------------------------------------------------------------


def test_a_timeout_the_client_caused_is_reported_to_hooks_and_is_the_cause_if_nothing_answers() -> None:
    ended = Ended()
    p = make_planner(Scripted(delay_s=0.8), chain=("a",))
    p.hooks = HookSet([ended])
    call = start(p)
    first = launch(call, T0)
    timeout = lx.Timeout("timed out", model="a", llm_provider="openai")

    call.on_error(first, timeout, T0 + 1.0)  # 0.8 s of the 1 s the client's: client_overload
    action = call.next_action(T0 + 1.0)

    assert first.record.outcome == k.CLIENT_OVERLOAD and first.record.error is timeout
    assert ended.attempts[-1] == (call, first.record)
    assert isinstance(action, Fail) and isinstance(action.error, AllAttemptsFailed)
    assert action.error.__cause__ is timeout


# -- an error that ends the call -----------------------------------------------------------------------------


def test_an_error_the_policy_does_not_fall_back_on_ends_the_call_and_cancels_the_hedge() -> None:
    ended = Ended()
    p = make_planner(hedge={"after": 0.1, "budget_ratio": 1.0})
    p.hooks = HookSet([ended])
    call = start(p)
    primary = launch(call, T0)
    hedge = launch(call, T0 + 0.1)
    error = lx.BadRequestError("Invalid request.", "a", "openai")

    call.on_error(primary, error, T0 + 0.2)  # an ordinary 400: the request itself is wrong

    assert call.next_action(T0 + 0.2) == Fail(error)
    assert (hedge.record.outcome, hedge.record.latency_s) == ("cancelled", pytest.approx(0.1))
    assert ended.calls == [(None, error)] and ended.of == [call]


# -- a prompt too long for the model -----------------------------------------------------------------------------


def test_each_context_window_error_asks_the_fitter_for_a_quarter_less() -> None:
    pol = Policy.from_dict(
        {
            "models": {
                name: {"litellm_params": {"model": f"openai/{name}", "api_base": "http://127.0.0.1:9/v1"}}
                for name in ("a", "b", "c", "d")
            },
            "routes": {"chat": {"chain": ["a", "b", "c", "d"]}},
        }
    )
    fitter = Fits(["a", "b", "c", "d"])
    p = Planner(policy=pol, breakers=BreakerRegistry(pol.breaker_settings), hooks=HookSet(), fitter=fitter)
    call = p.start(CallRequest(model="chat", messages=[{"role": "user", "content": "hi"}], kwargs={}), T0)

    a = launch(call, T0)
    call.on_error(a, lx.ContextWindowExceededError("maximum context length", "a", "openai"), T0 + 0.1)
    b = launch(call, T0 + 0.1)
    call.on_error(b, lx.ContextWindowExceededError("maximum context length", "b", "openai"), T0 + 0.2)
    c = launch(call, T0 + 0.2)
    call.on_error(c, overloaded(), T0 + 0.3)  # another error: the estimate was not the problem
    launch(call, T0 + 0.3)

    assert [(name, shrink) for name, *_, shrink in fitter.asked] == [
        ("a", 1.0),
        ("b", 0.75),
        ("c", pytest.approx(0.5625)),
        ("d", pytest.approx(0.5625)),
    ]


# -- cancelled attempts -------------------------------------------------------------------------------------------


def raced(signal: Scripted | None = None) -> tuple[Planner, Call, Any, Any]:
    """a (hedge threshold 0.1 s, soft timeout 0.5 s) raced by b, started at T0 + 0.1."""
    p = make_planner(signal, soft={"warmup_s": 0.5, "min_samples": 50}, hedge={"after": 0.1, "budget_ratio": 1.0})
    call = start(p)
    primary = launch(call, T0)
    hedge = launch(call, T0 + 0.1)
    return p, call, primary, hedge


def test_a_primary_cancelled_exactly_at_its_soft_timeout_is_not_slow() -> None:
    p, call, primary, hedge = raced()
    call.on_response(hedge, object(), T0 + 0.5)  # b wins; a is cancelled at exactly 0.5 s

    assert primary.record.outcome == "cancelled" and primary.record.reason is None
    assert p.breakers.get("a").fail_counter == 0


def test_a_primary_the_client_made_slow_is_cancelled_without_a_verdict() -> None:
    signal = Scripted(delay_s=0.0)
    p, call, primary, hedge = raced(signal)
    signal.delay = 0.6  # then the client stalls: 0.6 s of a's 0.7 s were the client's

    call.on_response(hedge, object(), T0 + 0.7)

    assert primary.record.outcome == "cancelled" and primary.record.reason is None
    assert primary.record.extra["client_overload"] == "client_saturated"
    assert p.breakers.get("a").fail_counter == 0


def test_a_primary_that_lost_the_race_after_its_hedge_threshold_is_a_censored_sample() -> None:
    p, call, _, hedge = raced()

    call.on_response(hedge, object(), T0 + 0.3)  # a ran past 0.1 s, the hedge threshold: the slow tail

    assert window(p).samples("a", "default") == (0, 1)
    assert window(p).samples("b", "default") == (1, 0)


def test_an_attempt_cancelled_before_its_hedge_threshold_teaches_the_window_nothing() -> None:
    p = make_planner(soft={"warmup_s": 0.5, "min_samples": 50}, hedge={"after": 0.3, "budget_ratio": 1.0})
    call = start(p)
    first = launch(call, T0)

    call.cancel(T0 + 0.2)

    assert first.record.outcome == "cancelled"
    assert window(p).samples("a", "default") == (0, 0)


# -- what the breaker is told ----------------------------------------------------------------------------------------


def test_the_failure_that_opens_a_breaker_carries_the_transition_for_its_span() -> None:
    p = make_planner()  # fail_max 2
    call = start(p)
    call.on_error(launch(call, T0), overloaded(), T0 + 0.1)
    call = start(p, T0 + 1)
    second = launch(call, T0 + 1)

    call.on_error(second, overloaded(), T0 + 1.1)

    assert second.record.breaker_transitions == [("closed", "open")]
    [event] = second.record.breaker_events
    assert (event.model, event.old, event.new, event.cause) == ("a", "closed", "open", "consecutive_failures")


def test_an_error_the_breaker_does_not_count_makes_no_model_suspect() -> None:
    p = make_planner()
    call = start(p)

    call.on_error(launch(call, T0), lx.BadRequestError("Invalid request.", "a", "openai"), T0 + 0.1)

    assert not p.breakers.get("a").suspect and p.breakers.get("a").fail_counter == 0


def test_a_panic_attempts_outcome_moves_nothing_even_if_its_breaker_closed_meanwhile() -> None:
    p = make_planner(chain=("a",), breakers={"fail_max": 1, "panic": "try_one"})
    breaker = p.breakers.get("a")
    breaker.record(breaker.admit_with_ticket()[1], "server_error")
    assert breaker.state == "open"
    call = start(p)
    panic = launch(call, T0)
    assert panic.record.extra["panic"] is True
    breaker.reset()  # an operator (or another call's probe) closed it meanwhile

    call.on_error(panic, overloaded(), T0 + 0.1)

    assert breaker.state == "closed" and breaker.fail_counter == 0
    assert not breaker.suspect


def test_a_call_starts_at_most_max_extra_hedges_however_long_its_chain() -> None:
    pol = Policy.from_dict(
        {
            "models": {
                name: {"litellm_params": {"model": f"openai/{name}", "api_base": "http://127.0.0.1:9/v1"}}
                for name in ("a", "b", "c", "d")
            },
            "routes": {
                "chat": {"chain": ["a", "b", "c", "d"], "hedge": {"after": 0.1, "budget_ratio": 1.0, "max_extra": 2}}
            },
            "prompt_classes": {"default": {"timeout_s": 1.0, "deadline_s": 3.0}},
        }
    )
    p = Planner(policy=pol, breakers=BreakerRegistry(pol.breaker_settings), hooks=HookSet())
    for _ in range(10):
        p.budgets.hedges("chat").record_request(T0)  # room in the budget for every hedge
    call = p.start(CallRequest(model="chat", messages=[{"role": "user", "content": "hi"}], kwargs={}), T0)
    launch(call, T0)
    assert launch(call, T0 + 0.1).spec.name == "b"
    third = launch(call, T0 + 0.2)
    assert third.spec.name == "c"

    assert third.hedge_at is None  # the second hedge: no hedge of its own
    assert isinstance(call.next_action(T0 + 0.5), Wait)
    assert [a.spec.name for a in call.in_flight] == ["a", "b", "c"]
