"""Same-model retries, decided by the planner (no server, injected clock, scripted jitter).

``routes.NAME.retries`` (README policy reference; ``policies/example.yaml``): only the listed error
kinds, at most ``max_retries`` per model per call, a backoff that doubles per retry with equal
jitter and a cap, never sooner than ``Retry-After``, never past the deadline, never while another
attempt (a hedge) is in flight, never to a model whose breaker is open, and within the retry budget
(``budget_ratio`` of the model's recent requests plus ``min_per_s``). A retry the policy does not
take is recorded (``retry_skipped``, also a metric decision), and then the error is handled as
without retries: the chain moves on, or the call ends when the policy does not fall back on it.
"""

from __future__ import annotations

import random
from typing import Any

import httpx
import litellm
import pytest

from llm_resilience._breakers import BreakerRegistry
from llm_resilience._hooks import HookSet
from llm_resilience._planner import MIN_ATTEMPT_S, Attempt, Call, CallRequest, Fail, Launch, Planner, Wait
from llm_resilience._policy import Policy

pytestmark = pytest.mark.sans_io  # no server: `make mutate` runs these for every mutant

lx = litellm.exceptions
T0 = 1000.0
MESSAGES = [{"role": "user", "content": "hello"}]


class Highest(random.Random):
    """Jitter that always picks the longest wait it may."""

    def uniform(self, a: float, b: float) -> float:
        return b


class Lowest(random.Random):
    """Jitter that always picks the shortest wait it may."""

    def uniform(self, a: float, b: float) -> float:
        return a


def retrying_planner(
    *,
    fall_back_on: list[str] | None = None,
    breakers: dict[str, Any] | None = None,
    hedge: dict[str, Any] | None = None,
    rng: random.Random | None = None,
    **retries: Any,
) -> Planner:
    route: dict[str, Any] = {"chain": ["a", "b"], "retries": {"max_retries": 2, "min_per_s": 10.0, **retries}}
    if hedge is not None:
        route["hedge"] = hedge
    data: dict[str, Any] = {
        "models": {
            name: {"litellm_params": {"model": f"openai/{name}-model", "api_base": "http://127.0.0.1:9/v1"}}
            for name in ("a", "b")
        },
        "routes": {"chat": route},
        "prompt_classes": {"default": {"timeout_s": 1.0, "deadline_s": 3.0}},
        "breakers": {"default": {"fail_max": 5, "reset_timeout_s": 30, **(breakers or {})}},
    }
    if fall_back_on is not None:
        data["errors"] = {"fall_back_on": fall_back_on}
    pol = Policy.from_dict(data)
    return Planner(policy=pol, breakers=BreakerRegistry(pol.breaker_settings), hooks=HookSet(), rng=rng or Highest())


def start(p: Planner, now: float = T0) -> Call:
    return p.start(CallRequest(model="chat", messages=MESSAGES, kwargs={}), now)


def launch(call: Call, now: float) -> Attempt:
    action = call.next_action(now)
    assert isinstance(action, Launch), action
    return action.attempt


def overloaded(**headers: str) -> Exception:
    response = httpx.Response(503, headers=headers, request=httpx.Request("POST", "http://127.0.0.1:9/v1"))
    return lx.ServiceUnavailableError("overloaded", "openai", "a-model", response=response)


def rate_limited() -> Exception:
    return lx.RateLimitError("slow down", "openai", "a-model")


def retry_wait(call: Call, failed: Attempt, error: Exception, now: float) -> float:
    """Fail ``failed`` at ``now``; how long the planner waits before retrying it (it must retry)."""
    call.on_error(failed, error, now)
    action = call.next_action(now)
    assert isinstance(action, Wait) and action.until is not None, action
    return action.until - now


# -- which errors are retried ----------------------------------------------------------------------


def test_only_the_listed_error_kinds_are_retried() -> None:
    call = start(retrying_planner(retry_on=["rate_limit"]))
    first = launch(call, T0)

    call.on_error(first, overloaded(), T0 + 0.1)  # a server_error: not listed

    assert launch(call, T0 + 0.1).spec.name == "b"  # at once, no backoff
    assert "retry_in_s" not in first.record.extra and "retry_skipped" not in first.record.extra


def test_a_listed_error_is_retried_on_the_same_model_after_the_backoff() -> None:
    call = start(retrying_planner(retry_on=["rate_limit"], backoff_base_s=0.2))
    first = launch(call, T0)

    wait = retry_wait(call, first, rate_limited(), T0 + 0.1)
    assert wait == pytest.approx(0.2)
    retry = launch(call, T0 + 0.1 + wait)

    assert (retry.spec.name, retry.record.retry_of) == ("a", first.record.index)
    assert first.record.extra["retry_in_s"] == pytest.approx(0.2)


def test_no_retry_while_a_hedge_is_still_in_flight() -> None:
    call = start(retrying_planner(hedge={"after": 0.1, "budget_ratio": 1.0}))
    primary = launch(call, T0)
    hedge = launch(call, T0 + 0.1)
    assert hedge.record.hedged

    call.on_error(hedge, overloaded(), T0 + 0.2)  # the primary still runs: it is the fallback

    assert "retry_in_s" not in hedge.record.extra
    assert isinstance(call.next_action(T0 + 0.2), Wait) and call.in_flight == [primary]


def test_an_error_the_policy_does_not_fall_back_on_is_still_retried_first() -> None:
    call = start(retrying_planner(fall_back_on=["timeout"]))
    first = launch(call, T0)

    retry_wait(call, first, overloaded(), T0 + 0.1)  # asserts a retry is waiting, not a Fail

    assert not call.finished


# -- the backoff -----------------------------------------------------------------------------------


def test_the_backoff_doubles_with_each_retry_up_to_its_cap() -> None:
    call = start(retrying_planner(max_retries=3, backoff_base_s=0.1, backoff_max_s=0.3, min_per_s=100.0))
    waits = []
    attempt, now = launch(call, T0), T0
    for _ in range(3):
        wait = retry_wait(call, attempt, overloaded(), now)
        waits.append(wait)
        now += wait
        attempt = launch(call, now)

    assert waits == pytest.approx([0.1, 0.2, 0.3])  # 0.4 capped at backoff_max_s


def test_the_jitter_never_waits_less_than_half_the_backoff() -> None:
    call = start(retrying_planner(backoff_base_s=0.4, rng=Lowest()))
    first = launch(call, T0)

    assert retry_wait(call, first, overloaded(), T0) == pytest.approx(0.2)


def test_a_retry_leaving_the_attempt_its_minimum_time_before_the_deadline_is_still_sent() -> None:
    call = start(retrying_planner(backoff_base_s=0.5), now=7.0)  # (numbers exact in floating point)
    first = launch(call, 7.0)
    now = 9.495  # the backoff ends at 9.995: exactly MIN_ATTEMPT_S before the deadline (10.0)
    assert now + 0.5 + MIN_ATTEMPT_S == call.deadline_at

    assert retry_wait(call, first, overloaded(), now) == pytest.approx(0.5)
    assert launch(call, now + 0.5).record.retry_of == first.record.index


def test_a_retry_ending_within_the_minimum_attempt_time_of_the_deadline_is_skipped() -> None:
    call = start(retrying_planner(backoff_base_s=0.5))
    first = launch(call, T0)
    now = call.deadline_at - 0.5 - MIN_ATTEMPT_S / 2  # the retry would have MIN_ATTEMPT_S / 2 left

    call.on_error(first, overloaded(), now)

    assert first.record.extra["retry_skipped"] == "deadline"
    assert launch(call, now).spec.name == "b"


# -- retries the policy does not take ----------------------------------------------------------------


def test_a_model_whose_breaker_the_failure_opened_is_not_retried() -> None:
    call = start(retrying_planner(breakers={"fail_max": 1}))
    first = launch(call, T0)

    call.on_error(first, overloaded(), T0 + 0.1)

    assert call.planner.breakers.get("a").state == "open"
    assert first.record.extra["retry_skipped"] == "breaker_open"
    assert launch(call, T0 + 0.1).spec.name == "b"


def test_retries_stay_within_budget_ratio_of_the_models_recent_requests() -> None:
    p = retrying_planner(budget_ratio=0.5, min_per_s=0.0)
    refused = start(p)
    first = launch(refused, T0)
    refused.on_error(first, overloaded(), T0 + 0.1)  # 1 request to a: half a retry is not one
    assert first.record.extra["retry_skipped"] == "budget"
    assert launch(refused, T0 + 0.1).spec.name == "b"

    allowed = start(p, T0 + 0.2)
    second = launch(allowed, T0 + 0.2)  # 2 requests to a: one retry
    retry_wait(allowed, second, overloaded(), T0 + 0.3)

    assert "retry_skipped" not in second.record.extra


def _skip_max_retries(call: Call, first: Attempt) -> Attempt:
    call.on_error(first, overloaded(), T0)
    retry = launch(call, T0 + 1.0)
    call.on_error(retry, overloaded(), T0 + 1.1)
    return retry


@pytest.mark.parametrize(
    ("reason", "retries", "breakers", "error_at"),
    [
        ("max_retries", {"max_retries": 1, "backoff_base_s": 0.5}, {}, None),
        ("breaker_open", {}, {"fail_max": 1}, T0 + 0.1),
        ("deadline", {"backoff_base_s": 1.0}, {}, T0 + 2.5),
        ("budget", {"budget_ratio": 0.0, "min_per_s": 0.0}, {}, T0 + 0.1),
    ],
)
def test_a_skipped_retry_of_an_error_the_policy_does_not_fall_back_on_ends_the_call_with_it(
    reason: str, retries: dict[str, Any], breakers: dict[str, Any], error_at: float | None
) -> None:
    p = retrying_planner(fall_back_on=["timeout"], breakers=breakers, **retries)
    call = start(p)
    first = launch(call, T0)
    error = overloaded()
    if error_at is None:  # the one retry allowed is used up first
        first = _skip_max_retries(call, first)
        error_at = T0 + 1.1
    else:
        call.on_error(first, error, error_at)
    action = call.next_action(error_at)

    assert first.record.extra["retry_skipped"] == reason
    assert isinstance(action, Fail) and isinstance(action.error, lx.ServiceUnavailableError)
    assert {r.model for r in call.records} == {"a"}  # never moved on to b


def test_only_first_attempts_on_routes_that_retry_earn_retry_budget() -> None:
    p = retrying_planner(max_retries=1, budget_ratio=1.0, min_per_s=0.0)
    call = start(p)
    first = launch(call, T0)  # 1 request to a: room for one retry (max_retries 1 is enough to earn it)
    retry_wait(call, first, overloaded(), T0 + 0.1)
    assert p.budgets.retries("a").usage(T0 + 0.1) == (1, 1)

    for retries in ({"max_retries": 0}, None):  # retries off, or no retries section: nothing earned
        route: dict[str, Any] = {"chain": ["a"]} if retries is None else {"chain": ["a"], "retries": retries}
        pol = Policy.from_dict(
            {"models": {"a": {"litellm_params": {"model": "openai/a", "api_base": "http://127.0.0.1:9/v1"}}},
             "routes": {"chat": route}}
        )  # fmt: skip
        off = Planner(policy=pol, breakers=BreakerRegistry(pol.breaker_settings), hooks=HookSet())
        launch(start(off), T0)
        assert off.budgets.retries("a").usage(T0) == (0, 0)
