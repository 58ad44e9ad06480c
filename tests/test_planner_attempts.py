"""What each attempt is sent, with which bounds, and what its record says (no server, injected clocks).

README "How it decides" and the span reference: an attempt's record names the policy model and its
litellm string, whether it is a hedge or a retry, the soft timeout it ran with, the probe that took
a half-open breaker's slot (with the open -> half-open transition it caused), and, when skipped, why
(``open_until`` for an open breaker). The fitter sees the model, route, class and the caller's
arguments; a model the prompt cannot fit is skipped and gives its probe slot back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from test_under_load_planner import T0, Scripted, launch, make_planner, start

from llm_resilience import _outcomes as k
from llm_resilience._breakers import ProbeTicket
from llm_resilience._planner import MIN_ATTEMPT_S, CallRequest, Fit, Planner
from llm_resilience._policy import ModelSpec, PromptClass, ResolvedRoute

pytestmark = pytest.mark.sans_io  # no server: `make mutate` runs these for every mutant

MESSAGES = [{"role": "user", "content": "hello"}]
SOFT = {"warmup_s": 0.5, "min_samples": 50}
WALL0 = datetime(2026, 1, 1, tzinfo=UTC)


def test_a_first_attempt_is_neither_hedge_nor_retry_and_names_its_litellm_model() -> None:
    call = start(make_planner())
    first = launch(call, T0)

    assert (first.record.model, first.record.litellm_model) == ("a", "openai/a")
    assert first.record.hedged is False and first.record.retry_of is None
    assert call.summary()["attempts"][0]["litellm_model"] == "openai/a"
    assert "hedged" not in call.summary()["attempts"][0]


def test_an_attempt_with_exactly_the_minimum_time_left_is_still_sent() -> None:
    p = make_planner()
    call = start(p, 7.0)  # deadline 10.0
    call.on_error(launch(call, 7.0), ConnectionError("refused"), 7.5)
    now = 9.995
    assert call.deadline_at - now >= MIN_ATTEMPT_S  # (the time left is MIN_ATTEMPT_S, in floating point)

    assert launch(call, now).spec.name == "b"


# -- breakers ------------------------------------------------------------------------------------------


def open_a(p: Planner) -> None:
    breaker = p.breakers.get("a")
    breaker.record(ProbeTicket(probe=False), k.SERVER_ERROR)
    breaker.record(ProbeTicket(probe=False), k.SERVER_ERROR)
    assert breaker.state == "open"


def test_a_model_skipped_for_its_open_breaker_says_until_when() -> None:
    wall = [WALL0]
    p = make_planner(wall=wall)
    open_a(p)

    call = start(p)
    second = launch(call, T0)

    skipped = call.records[0]
    assert (skipped.outcome, skipped.reason, second.spec.name) == ("skipped", k.BREAKER_OPEN, "b")
    assert skipped.extra["open_until"] == pytest.approx((WALL0 + timedelta(seconds=30)).timestamp())


def test_the_probe_carries_the_transition_it_caused_and_a_later_probe_does_not_repeat_it() -> None:
    wall = [WALL0]
    p = make_planner(wall=wall)
    open_a(p)
    wall[0] = WALL0 + timedelta(seconds=31)  # past the reset timeout

    call = start(p)
    probe = launch(call, T0)
    assert probe.record.extra["probe"] is True
    [event] = probe.record.breaker_events
    assert (event.old, event.new, event.cause) == ("open", "half-open", "reset_timeout_elapsed")
    call.cancel(T0 + 0.1)  # the probe's slot is free again, the breaker still half-open

    again = start(p, T0 + 1)
    second_probe = launch(again, T0 + 1)
    assert second_probe.record.extra["probe"] is True
    assert second_probe.record.breaker_events == []


def test_an_ordinary_admission_carries_no_breaker_event() -> None:
    p = make_planner()
    breaker = p.breakers.get("a")
    breaker.record(ProbeTicket(probe=False), k.SERVER_ERROR)
    breaker.reset()  # the breaker has a last transition; admitting a request is not one

    assert launch(start(p), T0).record.breaker_events == []


# -- the fitter ----------------------------------------------------------------------------------------


class Fits:
    """A fitter that keeps what it was asked, and fits only the models it is told."""

    def __init__(self, fitting: Sequence[str]) -> None:
        self.fitting = set(fitting)
        self.asked: list[tuple[Any, ...]] = []

    def fit(
        self,
        spec: ModelSpec,
        messages: Sequence[Mapping[str, Any]],
        route: ResolvedRoute,
        prompt_class: PromptClass,
        kwargs: Mapping[str, Any],
        shrink: float,
    ) -> Fit:
        self.asked.append((spec.name, route.name, prompt_class.timeout_s, dict(kwargs), shrink))
        return Fit(messages=messages, fits=spec.name in self.fitting)


def test_the_fitter_sees_the_model_route_class_and_the_callers_arguments() -> None:
    p = make_planner()
    p.fitter = Fits(["a"])
    p.start(CallRequest(model="chat", messages=MESSAGES, kwargs={"max_tokens": 50}), T0).next_action(T0)

    assert p.fitter.asked == [("a", "chat", 1.0, {"max_tokens": 50}, 1.0)]


def test_a_half_open_model_the_prompt_cannot_fit_is_skipped_and_frees_its_probe_slot() -> None:
    wall = [WALL0]
    p = make_planner(wall=wall)
    open_a(p)
    wall[0] = WALL0 + timedelta(seconds=31)
    p.fitter = Fits(["b"])
    call = start(p)

    second = launch(call, T0)

    assert (call.records[0].reason, second.spec.name) == (k.CONTEXT_TOO_SMALL, "b")
    p.fitter = Fits(["a", "b"])
    assert launch(start(p, T0 + 1), T0 + 1).record.extra["probe"] is True  # the next call probes a


# -- bounds --------------------------------------------------------------------------------------------


def test_a_soft_timeout_equal_to_the_class_timeout_is_no_soft_cut() -> None:
    call = start(make_planner(soft={"warmup_s": 1.0, "min_samples": 50}))
    first = launch(call, T0)

    assert not first.soft_cut and first.timeout_s == 1.0
    call.next_action(T0 + 1.0)  # cut at its bound: the class's timeout, not a soft one
    assert first.record.reason == k.TIMEOUT


def stream_attempt(chain: tuple[str, ...], **planner: Any) -> Any:
    p = make_planner(chain=chain, **planner)
    call = p.start(CallRequest(model="chat", messages=MESSAGES, kwargs={}, stream=True), T0)
    return launch(call, T0)


def test_a_streams_first_chunk_is_bounded_by_the_soft_timeout_only_when_a_model_follows() -> None:
    assert stream_attempt(("a", "b"), soft=SOFT).first_token_timeout_s == pytest.approx(0.5)
    assert stream_attempt(("a",), soft=SOFT).first_token_timeout_s == pytest.approx(1.0)  # the last model


def test_a_stream_on_a_hedged_route_gets_no_hedge_threshold() -> None:
    attempt = stream_attempt(("a", "b"), soft=SOFT, hedge={"after": 0.1, "budget_ratio": 1.0})

    assert attempt.hedge_at is None and attempt.cut_at is None and attempt.soft_cut


def test_each_attempt_gets_its_own_copy_of_the_callers_metadata() -> None:
    metadata = {"team": "search"}
    p = make_planner(Scripted())
    call = p.start(CallRequest(model="chat", messages=MESSAGES, kwargs={"metadata": metadata}), T0)

    sent = launch(call, T0).kwargs["metadata"]

    assert sent == metadata and sent is not metadata
