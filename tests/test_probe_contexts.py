"""Who takes a half-open breaker's probe: a caller whose own context is starved leaves it to one that can judge.

In the soak's shape (32 threads, 500 tasks on one loop) the starved loop's calls took the primary's
probe one after another, each ended ``client_overload`` seconds later (no verdict), and the threads,
which would have judged it in 0.4 s, skipped the model as ``probe_in_flight`` for the whole run. Each
context (an event loop, or the threads) is judged by its own recent outcomes (``CallerContexts``),
the breaker asks only when it would hand out the probe, and the planner skips the model for that
caller (``probe_deferred``). Injected clocks, no server.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from llm_resilience import _outcomes as k
from llm_resilience._breakers import Admission, BreakerRegistry, ModelBreaker
from llm_resilience._hooks import HookSet
from llm_resilience._outcomes import AttemptRecord
from llm_resilience._planner import CallRequest, Launch, Planner
from llm_resilience._policy import BreakerSettings, Policy
from llm_resilience._saturation import CONTEXT_RECENT_S, MIN_OUTCOMES, THREADS, CallerContexts

pytestmark = pytest.mark.sans_io

T0 = 1000.0


class _Loop:
    """A weakly referenceable stand-in for an event loop."""


def starved_loop_and_healthy_threads(contexts: CallerContexts, loop: object, now: float = T0) -> None:
    for i in range(MIN_OUTCOMES):
        contexts.ended(loop, True, now - 1.0 + i * 0.1)  # every attempt of the loop: client_overload
        contexts.ended(THREADS, False, now - 1.0 + i * 0.1)  # the threads' were judged


# -- CallerContexts: each context judged by its own outcomes ---------------------------------------


def test_a_context_whose_recent_attempts_mostly_ended_client_overload_is_starved() -> None:
    contexts, loop = CallerContexts(), _Loop()
    starved_loop_and_healthy_threads(contexts, loop)

    assert contexts.starved(loop, T0)
    assert not contexts.starved(THREADS, T0)


def test_a_starved_context_may_not_probe_while_another_context_can_judge() -> None:
    contexts, loop = CallerContexts(), _Loop()
    starved_loop_and_healthy_threads(contexts, loop)

    assert not contexts.may_probe(T0, context=loop)
    assert contexts.may_probe(T0, context=THREADS)


def test_starved_threads_leave_the_probe_to_a_loop_that_can_judge() -> None:
    contexts, loop = CallerContexts(), _Loop()
    for i in range(MIN_OUTCOMES):
        contexts.ended(THREADS, True, T0 - 1.0 + i * 0.1)
        contexts.ended(loop, False, T0 - 1.0 + i * 0.1)

    assert not contexts.may_probe(T0, context=THREADS)
    assert contexts.may_probe(T0, context=loop)


def test_when_every_context_is_starved_callers_probe_as_before() -> None:
    contexts, loop, other = CallerContexts(), _Loop(), _Loop()
    for i in range(MIN_OUTCOMES):
        for context in (loop, other, THREADS):
            contexts.ended(context, True, T0 - 1.0 + i * 0.1)

    assert contexts.may_probe(T0, context=loop)
    assert contexts.may_probe(T0, context=THREADS)


def test_a_lone_starved_context_still_probes() -> None:
    contexts, loop = CallerContexts(), _Loop()
    for i in range(MIN_OUTCOMES):
        contexts.ended(loop, True, T0 - 1.0 + i * 0.1)

    assert contexts.starved(loop, T0)
    assert contexts.may_probe(T0, context=loop)  # no one else could judge it


def test_half_the_recent_attempts_without_a_verdict_is_starved_and_fewer_is_not() -> None:
    contexts, loop = CallerContexts(), _Loop()
    for i, overloaded in enumerate([True, False, True, False]):
        contexts.ended(loop, overloaded, T0 - 1.0 + i * 0.1)
    assert contexts.starved(loop, T0)

    contexts.ended(loop, False, T0 - 0.5)  # 2 of 5
    assert not contexts.starved(loop, T0)


def test_too_few_outcomes_are_not_starvation() -> None:
    contexts, loop = CallerContexts(), _Loop()
    for i in range(MIN_OUTCOMES - 1):
        contexts.ended(loop, True, T0 - 1.0 + i * 0.1)

    assert not contexts.starved(loop, T0)


def test_old_outcomes_are_forgotten() -> None:
    contexts, loop = CallerContexts(), _Loop()
    starved_loop_and_healthy_threads(contexts, loop)

    later = T0 + CONTEXT_RECENT_S  # the outcomes were 0.7-1.0 s before T0: all older than the window now
    assert not contexts.starved(loop, later)
    assert contexts.may_probe(later, context=loop)


def test_a_context_that_ended_nothing_recently_cannot_judge() -> None:
    contexts, loop = CallerContexts(), _Loop()
    for i in range(MIN_OUTCOMES):
        contexts.ended(THREADS, False, T0 - CONTEXT_RECENT_S - 5.0 + i * 0.1)  # the threads went quiet
        contexts.ended(loop, True, T0 - 1.0 + i * 0.1)

    assert contexts.may_probe(T0, context=loop)


def test_the_hook_counts_sent_attempts_of_the_calling_context_only() -> None:
    clock = [T0]
    contexts = CallerContexts(clock=lambda: clock[0])

    def ended(outcome: str) -> None:
        record = AttemptRecord(index=0, model="a", litellm_model="openai/a", started_at=T0)
        record.outcome = outcome  # type: ignore[assignment]
        contexts.attempt_ended(None, record, None)

    for outcome in ("skipped", "cancelled", "cancelled", "skipped"):
        ended(outcome)
    assert not contexts.starved(THREADS, T0)  # neither skipped nor cancelled attempts say anything
    for _ in range(MIN_OUTCOMES):
        ended(k.CLIENT_OVERLOAD)  # (called from a plain thread: the threads' context)
    assert contexts.starved(THREADS, T0)
    ended("success")
    ended("failure")
    ended("soft_failure")
    ended("flagged")
    assert contexts.starved(THREADS, T0)  # 4 of 8
    ended("success")
    assert not contexts.starved(THREADS, T0)  # 4 of 9


# -- the breaker asks only when it would hand out the probe ---------------------------------------


class Wall:
    def __init__(self) -> None:
        self.now = datetime(2030, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def open_breaker(wall: Wall) -> ModelBreaker:
    b = ModelBreaker("m", BreakerSettings(fail_max=1, reset_timeout_s=10.0), [], clock=wall)
    b.record(b.admit_with_ticket()[1], k.SERVER_ERROR)
    assert b.state == "open"
    return b


def never_asked() -> bool:
    raise AssertionError("may_probe was asked though no probe was due")


def test_a_caller_that_may_not_probe_leaves_the_breaker_open_and_the_slot_free() -> None:
    wall = Wall()
    b = open_breaker(wall)
    wall.now += timedelta(seconds=11)

    admission, ticket = b.admit_with_ticket(lambda: False)

    assert admission is Admission.PROBE_DEFERRED and not ticket.probe
    assert b.state == "open"  # not half-open without a probe in flight
    admission, ticket = b.admit_with_ticket(lambda: True)  # the next caller that can judge probes
    assert admission is Admission.PROBE and ticket.probe
    assert b.state == "half-open"


def test_a_half_open_breaker_whose_probe_ended_without_a_verdict_waits_for_a_caller_that_may_probe() -> None:
    wall = Wall()
    b = open_breaker(wall)
    wall.now += timedelta(seconds=11)
    _, ticket = b.admit_with_ticket()
    b.release(ticket)  # the probe ended client_overload: half-open, slot free

    assert b.admit_with_ticket(lambda: False)[0] is Admission.PROBE_DEFERRED
    assert b.state == "half-open"
    assert b.admit_with_ticket(lambda: True)[0] is Admission.PROBE


def test_may_probe_is_asked_only_when_a_probe_is_due() -> None:
    wall = Wall()
    b = ModelBreaker("m", BreakerSettings(fail_max=1, reset_timeout_s=10.0), [], clock=wall)
    assert b.admit_with_ticket(never_asked)[0] is Admission.ADMIT  # closed
    b.record(b.admit_with_ticket()[1], k.SERVER_ERROR)
    assert b.admit_with_ticket(never_asked)[0] is Admission.OPEN  # inside the open period
    wall.now += timedelta(seconds=11)
    assert b.admit_with_ticket(lambda: True)[0] is Admission.PROBE
    assert b.admit_with_ticket(never_asked)[0] is Admission.PROBE_BUSY  # the slot is taken anyway


# -- the planner skips the model for that caller --------------------------------------------------


class ScriptedContexts:
    def __init__(self, may: bool) -> None:
        self.may = may
        self.asked: list[float] = []

    def may_probe(self, now: float) -> bool:
        self.asked.append(now)
        return self.may


def planner_with_open_a(contexts: ScriptedContexts, wall: Wall) -> Planner:
    policy = Policy.from_dict(
        {
            "models": {
                name: {
                    "litellm_params": {"model": f"openai/{name}", "api_base": "http://127.0.0.1:9/v1", "api_key": "k"}
                }
                for name in ("a", "b")
            },
            "routes": {"chat": {"chain": ["a", "b"]}},
            "breakers": {"default": {"fail_max": 1, "reset_timeout_s": 10}},
        }
    )
    registry = BreakerRegistry(policy.breaker_settings, clock=wall)
    breaker = registry.get("a")
    breaker.record(breaker.admit_with_ticket()[1], k.SERVER_ERROR)
    return Planner(policy=policy, breakers=registry, hooks=HookSet(), contexts=contexts)


def first_launch(p: Planner, now: float) -> Any:
    call = p.start(CallRequest(model="chat", messages=[{"role": "user", "content": "hi"}], kwargs={}), now)
    action = call.next_action(now)
    assert isinstance(action, Launch), action
    return call, action.attempt


def test_a_starved_caller_skips_a_model_whose_probe_is_due_and_goes_down_the_chain() -> None:
    wall, contexts = Wall(), ScriptedContexts(may=False)
    p = planner_with_open_a(contexts, wall)
    wall.now += timedelta(seconds=11)

    call, attempt = first_launch(p, T0)

    assert attempt.spec.name == "b"
    skipped = call.records[0]
    assert (skipped.model, skipped.outcome, skipped.reason) == ("a", "skipped", k.PROBE_DEFERRED)
    assert contexts.asked == [T0]
    assert p.breakers.get("a").state == "open"


def test_a_caller_that_can_judge_takes_the_probe() -> None:
    wall, contexts = Wall(), ScriptedContexts(may=True)
    p = planner_with_open_a(contexts, wall)
    wall.now += timedelta(seconds=11)

    _, attempt = first_launch(p, T0)

    assert attempt.spec.name == "a" and attempt.ticket.probe
    assert attempt.record.extra["probe"] is True
