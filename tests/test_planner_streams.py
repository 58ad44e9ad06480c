"""Streams through the decision core, driven as ``_streaming.StreamDriver`` drives it (no server, no sleeps).

The stream driver tells the planner four things the plain drivers never do: the first content
reached the caller (``commit``), a committed stream broke (``on_interrupted``, with the text
delivered so far), the caller's own ``timeout=`` ran out mid-stream (``expire``), and the caller
stopped reading (``cancel``). The HTTP tests in ``test_streaming.py`` and
``test_stream_continuation.py`` show the whole path; these pin each rule of the planner's side
with an injected clock, which mutation testing found unpinned (README "Streaming").
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import litellm
import pytest
from test_under_load_planner import Scripted

from llm_resilience import AllAttemptsFailed, LLMResilienceError, StreamInterrupted
from llm_resilience import _outcomes as k
from llm_resilience._breakers import BreakerRegistry
from llm_resilience._hooks import HookSet
from llm_resilience._latency import LatencyStats
from llm_resilience._planner import Attempt, Call, CallRequest, Done, Fail, Launch, Planner, Wait
from llm_resilience._policy import DEFAULT_CONTINUE_PROMPT, Policy, ResolvedRoute

pytestmark = pytest.mark.sans_io  # no server: `make mutate` runs these for every mutant

lx = litellm.exceptions
T0 = 1000.0
MESSAGES = [{"role": "user", "content": "say hello"}]
SOFT = {"percentile": 99, "min_samples": 10, "warmup_s": 0.5}


class Checks:
    """A validator whose verdict the test sets (names of the checks the answer fails)."""

    def __init__(self, failed: Sequence[str] = ()) -> None:
        self.failed = list(failed)

    def check(self, route: ResolvedRoute, request: Any, response: Any, sent: Any = None) -> list[str]:
        return list(self.failed)


class Ended:
    """A hook that keeps what ``call_ended`` was told."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, BaseException | None]] = []
        self.of: list[Call] = []
        self.attempts: list[tuple[Call, Any]] = []

    def attempt_ended(self, call: Call, record: Any, response: Any) -> None:
        self.attempts.append((call, record))

    def call_ended(self, call: Call, response: Any, error: BaseException | None) -> None:
        self.calls.append((response, error))
        self.of.append(call)

    def told_about(self, call: Call) -> bool:
        """Every event named ``call``, and every attempt_ended one of its records."""
        return all(c is call for c in self.of) and all(c is call and r in call.records for c, r in self.attempts)


def stream_planner(
    *,
    on_interrupt: str = "continue",
    prefill: dict[str, bool] | None = None,
    chain: Sequence[str] = ("a", "b", "c"),
    soft: dict[str, Any] | None = None,
    breakers: dict[str, Any] | None = None,
    wall: list[datetime] | None = None,
    validator: Checks | None = None,
    hooks: Sequence[object] = (),
    idle_s: float | None = None,
    continue_prompt: str | None = None,
) -> Planner:
    prefill = {"b": True, "c": False} if prefill is None else prefill
    klass: dict[str, Any] = {"timeout_s": 2.0, "deadline_s": 5.0}
    if idle_s is not None:
        klass["idle_timeout_s"] = idle_s
    if soft is not None:
        klass["soft_timeout"] = soft
    models: dict[str, Any] = {}
    for name in ("a", "b", "c"):
        models[name] = {
            "litellm_params": {"model": f"openai/{name}", "api_base": "http://127.0.0.1:9/v1", "api_key": "k"}
        }
        if name in prefill:
            models[name]["assistant_prefill"] = prefill[name]
    streaming: dict[str, Any] = {"on_interrupt": on_interrupt}
    if continue_prompt is not None:
        streaming["continue_prompt"] = continue_prompt
    pol = Policy.from_dict(
        {
            "models": models,
            "routes": {"chat": {"chain": list(chain), "streaming": streaming}},
            "prompt_classes": {"default": klass},
            "breakers": {"default": {"fail_max": 2, "reset_timeout_s": 30, **(breakers or {})}},
        }
    )
    registry = BreakerRegistry(pol.breaker_settings, clock=None if wall is None else (lambda: wall[0]))
    return Planner(
        policy=pol, breakers=registry, hooks=HookSet(hooks), latency=LatencyStats(), saturation=Scripted(),
        validator=validator or Checks(),
    )  # fmt: skip


def window(p: Planner) -> LatencyStats:
    assert isinstance(p.latency, LatencyStats)
    return p.latency


def start_stream(p: Planner, now: float = T0, **kwargs: Any) -> Call:
    return p.start(CallRequest(model="chat", messages=MESSAGES, kwargs=kwargs, stream=True), now)


def launch(call: Call, now: float) -> Attempt:
    action = call.next_action(now)
    assert isinstance(action, Launch), action
    return action.attempt


def first_content(call: Call, attempt: Attempt, now: float) -> None:
    """What the driver does when a chunk with content arrives: stamp the first chunk, then commit."""
    attempt.record.time_to_first_chunk_s = now - attempt.record.started_at
    call.commit(attempt)


def interruption(delivered: str, cause: Exception) -> StreamInterrupted:
    """The error the driver builds for a committed stream that broke (``StreamDriver._interrupted``)."""
    error = StreamInterrupted(
        model="a", chunks_delivered=2, generated_content=delivered, reason="cut", original_exception=cause
    )
    error.__cause__ = cause
    return error


def connection_cut() -> Exception:
    return lx.APIConnectionError("Connection error.", "openai", "a")


def final_error(call: Call, now: float) -> BaseException:
    action = call.next_action(now)
    assert isinstance(action, Fail), action
    return action.error


# -- a committed stream cannot be replaced ------------------------------------------------------


def test_a_stream_attempt_waits_for_each_chunk_the_classs_idle_timeout_else_its_timeout() -> None:
    # The stream driver stops waiting for the next chunk after the attempt's idle_timeout_s.
    assert launch(start_stream(stream_planner(idle_s=0.5)), T0).idle_timeout_s == 0.5
    assert launch(start_stream(stream_planner()), T0).idle_timeout_s == 2.0  # the class's timeout_s


def test_a_committed_stream_that_breaks_ends_the_call_when_on_interrupt_is_raise() -> None:
    p = stream_planner(on_interrupt="raise")
    call = start_stream(p)
    first = launch(call, T0)
    first_content(call, first, T0 + 0.1)
    error = interruption("Hello", connection_cut())

    call.on_interrupted(first, error, "Hello", T0 + 0.5)

    assert final_error(call, T0 + 0.5) is error
    assert [r.model for r in call.records] == ["a"]  # no fallback: the caller already has text
    assert (first.record.outcome, first.record.reason) == ("failure", k.CONNECTION)
    assert p.breakers.get("a").fail_counter == 1  # still the provider's failure
    assert first.record.extra["interrupted_after_chars"] == 5  # the span says where it broke


def test_a_stream_that_fails_before_its_first_content_falls_back_invisibly() -> None:
    call = start_stream(stream_planner(on_interrupt="raise"))
    first = launch(call, T0)

    call.on_error(first, connection_cut(), T0 + 0.2)

    assert launch(call, T0 + 0.2).spec.name == "b"


def test_a_validator_failing_a_committed_stream_flags_it_instead_of_falling_back() -> None:
    checks = Checks(["json"])
    call = start_stream(stream_planner(validator=checks))
    first = launch(call, T0)
    first_content(call, first, T0 + 0.1)
    answer = litellm.ModelResponse()

    call.on_response(first, answer, T0 + 0.4)

    action = call.next_action(T0 + 0.4)
    assert isinstance(action, Done) and action.response is answer
    assert (first.record.outcome, first.record.reason) == ("flagged", "json")
    assert call.summary()["flagged"] is True


def test_a_validator_failing_an_uncommitted_answer_falls_back() -> None:
    call = start_stream(stream_planner(validator=Checks(["json"])))
    first = launch(call, T0)

    call.on_response(first, litellm.ModelResponse(), T0 + 0.4)  # ended before any content reached the caller

    assert (first.record.outcome, first.record.reason) == ("soft_failure", "json")
    assert launch(call, T0 + 0.4).spec.name == "b"


@pytest.mark.parametrize(
    "case",
    ["on_interrupt_raise", "nothing_delivered", "error_that_does_not_fall_back"],
)
def test_an_interruption_that_cannot_be_continued_is_an_ordinary_error_of_the_committed_stream(case: str) -> None:
    call = start_stream(stream_planner(on_interrupt="raise" if case == "on_interrupt_raise" else "continue"))
    first = launch(call, T0)
    first_content(call, first, T0 + 0.1)
    cause = lx.BadRequestError("bad", "a", "openai") if case == "error_that_does_not_fall_back" else connection_cut()
    delivered = "" if case == "nothing_delivered" else "Hello"
    error = interruption(delivered, cause)

    call.on_interrupted(first, error, delivered, T0 + 0.5)

    assert final_error(call, T0 + 0.5) is error
    assert len(call.records) == 1
    assert "joins" not in call.summary()


def test_an_interruption_of_an_abandoned_attempt_changes_nothing() -> None:
    call = start_stream(stream_planner())
    first = launch(call, T0)
    first_content(call, first, T0 + 0.1)
    call.cancel(T0 + 0.2)  # the caller stopped reading

    call.on_interrupted(first, interruption("Hello", connection_cut()), "Hello", T0 + 0.3)

    assert (first.record.outcome, first.record.reason) == ("cancelled", None)
    assert "joins" not in call.summary()
    assert "interrupted_after_chars" not in first.record.extra


# -- on_interrupt: continue ---------------------------------------------------------------------


def test_a_broken_stream_is_continued_by_the_next_model_asked_to_continue_the_delivered_text() -> None:
    p = stream_planner()
    call = start_stream(p)
    first = launch(call, T0)
    first_content(call, first, T0 + 0.1)

    call.on_interrupted(first, interruption("Hello, wor", connection_cut()), "Hello, wor", T0 + 0.5)
    cont = launch(call, T0 + 0.5)

    assert cont.spec.name == "b"
    assert cont.kwargs["messages"] == [*MESSAGES, {"role": "assistant", "content": "Hello, wor", "prefix": True}]
    assert cont.record.extra["prefill_chars"] == 10
    assert first.record.extra["interrupted_after_chars"] == 10
    assert (first.record.outcome, first.record.reason) == ("failure", k.CONNECTION)
    assert p.breakers.get("a").fail_counter == 1

    first_content(call, cont, T0 + 0.7)
    assert cont.record.extra["join"] is True
    assert cont.record.extra["continues"] == 0
    answer = litellm.ModelResponse()
    call.on_response(cont, answer, T0 + 0.9)

    action = call.next_action(T0 + 0.9)
    assert isinstance(action, Done) and action.response is answer
    summary = call.summary()
    assert summary["model"] == "b"
    assert summary["joins"] == [{"from": 0, "at_chars": 10, "to": 1, "model": "b"}]


def test_a_continuation_that_breaks_before_its_first_content_moves_on_and_the_join_is_recorded_once() -> None:
    call = start_stream(stream_planner(prefill={"b": True, "c": True}))
    first = launch(call, T0)
    first_content(call, first, T0 + 0.1)
    call.on_interrupted(first, interruption("Hello", connection_cut()), "Hello", T0 + 0.5)
    second = launch(call, T0 + 0.5)

    call.on_error(second, connection_cut(), T0 + 0.6)  # before any content: invisible to the caller
    third = launch(call, T0 + 0.6)

    assert third.spec.name == "c"
    assert third.kwargs["messages"][-1] == {"role": "assistant", "content": "Hello", "prefix": True}
    first_content(call, third, T0 + 0.8)
    assert third.record.extra["continues"] == 0
    assert call.summary()["joins"] == [{"from": 0, "at_chars": 5, "to": 2, "model": "c"}]


def test_a_continued_stream_that_breaks_again_is_continued_from_everything_delivered() -> None:
    call = start_stream(stream_planner(prefill={"b": True, "c": True}))
    first = launch(call, T0)
    first_content(call, first, T0 + 0.1)
    call.on_interrupted(first, interruption("Hel", connection_cut()), "Hel", T0 + 0.2)
    second = launch(call, T0 + 0.2)
    first_content(call, second, T0 + 0.3)

    call.on_interrupted(second, interruption("Hello, wo", connection_cut()), "Hello, wo", T0 + 0.4)
    third = launch(call, T0 + 0.4)
    first_content(call, third, T0 + 0.5)

    assert third.kwargs["messages"][-1]["content"] == "Hello, wo"
    assert call.summary()["joins"] == [
        {"from": 0, "at_chars": 3, "to": 1, "model": "b"},
        {"from": 1, "at_chars": 9, "to": 2, "model": "c"},
    ]
    assert third.record.extra["continues"] == 1


def test_the_continuation_gets_the_class_deadline_anew() -> None:
    call = start_stream(stream_planner())
    first = launch(call, T0)
    first_content(call, first, T0 + 0.1)

    # 4.9 s in, 0.1 s before the first deadline: the broken stream legitimately ran that long.
    call.on_interrupted(first, interruption("Hello", connection_cut()), "Hello", T0 + 4.9)
    cont = launch(call, T0 + 4.9)

    assert cont.spec.name == "b"
    assert call.deadline_at == pytest.approx(T0 + 4.9 + 5.0)
    assert cont.timeout_s == pytest.approx(2.0)  # the class timeout, not the 0.1 s left of the first deadline


def test_the_continuations_deadline_is_capped_by_the_callers_timeout() -> None:
    call = start_stream(stream_planner(), timeout=6.0)
    first = launch(call, T0)
    first_content(call, first, T0 + 0.1)

    call.on_interrupted(first, interruption("Hello", connection_cut()), "Hello", T0 + 4.9)
    cont = launch(call, T0 + 4.9)

    assert call.deadline_at == pytest.approx(T0 + 6.0)
    assert cont.timeout_s == pytest.approx(1.1)  # what the caller's bound leaves


def test_a_json_stream_is_continued_only_by_prefill_and_else_the_caller_gets_the_interruption() -> None:
    ended = Ended()
    p = stream_planner(prefill={"b": True, "c": False}, hooks=[ended])
    call = start_stream(p, response_format={"type": "json_object"})
    first = launch(call, T0)
    first_content(call, first, T0 + 0.1)
    error = interruption('{"a": ', connection_cut())
    call.on_interrupted(first, error, '{"a": ', T0 + 0.5)
    cont = launch(call, T0 + 0.5)

    call.on_error(cont, lx.BadRequestError("assistant prefill is not supported", "b", "openai"), T0 + 0.6)

    assert final_error(call, T0 + 0.6) is error  # not b's 400, not AllAttemptsFailed: the caller has text
    assert ended.calls == [(None, error)] and ended.told_about(call)
    reasons = [(r.model, r.outcome, r.reason) for r in call.records]
    assert reasons == [
        ("a", "failure", k.CONNECTION),
        ("b", "failure", k.PREFILL_REJECTED),  # no conversation retry: JSON needs an exact join
        ("c", "skipped", k.NO_PREFILL),
    ]
    assert p.breakers.get("b").fail_counter == 0  # a model that cannot prefill is not sick


@pytest.mark.parametrize(
    "response_format",
    [{"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}],
)
def test_json_streams_want_an_exact_join(response_format: dict[str, Any]) -> None:
    call = start_stream(stream_planner(prefill={"b": False, "c": True}), response_format=response_format)
    first = launch(call, T0)
    first_content(call, first, T0 + 0.1)
    call.on_interrupted(first, interruption("{", connection_cut()), "{", T0 + 0.5)

    cont = launch(call, T0 + 0.5)

    assert cont.spec.name == "c" and cont.record.extra["continuation"] == "prefill"
    assert [(r.model, r.reason) for r in call.records[1:2]] == [("b", k.NO_PREFILL)]


def test_a_model_without_prefill_continues_in_an_ordinary_conversation() -> None:
    p = stream_planner(prefill={"b": False})
    call = start_stream(p)
    first = launch(call, T0)
    first_content(call, first, T0 + 0.1)
    call.on_interrupted(first, interruption("Hello, wor", connection_cut()), "Hello, wor", T0 + 0.5)

    cont = launch(call, T0 + 0.5)

    assert cont.spec.name == "b"
    assert cont.kwargs["messages"] == [
        *MESSAGES,
        {"role": "assistant", "content": "Hello, wor"},  # a complete turn: no prefix flag
        {"role": "user", "content": DEFAULT_CONTINUE_PROMPT},
    ]
    assert not any(m["role"] == "system" for m in cont.kwargs["messages"])
    assert cont.record.extra["continuation"] == "conversation"
    assert "prefill_chars" not in cont.record.extra


def test_the_continue_prompt_is_the_routes_setting() -> None:
    p = stream_planner(prefill={"b": False}, continue_prompt="Weiter, bitte.")
    call = start_stream(p)
    first = launch(call, T0)
    first_content(call, first, T0 + 0.1)
    call.on_interrupted(first, interruption("Hallo", connection_cut()), "Hallo", T0 + 0.5)

    assert launch(call, T0 + 0.5).kwargs["messages"][-1] == {"role": "user", "content": "Weiter, bitte."}


def test_a_rejected_prefill_is_asked_again_at_once_as_a_conversation_by_the_same_model() -> None:
    p = stream_planner(prefill={"b": True, "c": True})
    call = start_stream(p)
    first = launch(call, T0)
    first_content(call, first, T0 + 0.1)
    call.on_interrupted(first, interruption("Hello", connection_cut()), "Hello", T0 + 0.5)
    cont = launch(call, T0 + 0.5)
    assert cont.record.extra["continuation"] == "prefill"

    call.on_error(cont, lx.BadRequestError("assistant prefill is not supported", "b", "openai"), T0 + 0.6)
    again = launch(call, T0 + 0.6)  # no backoff

    assert again.spec.name == "b" and again.record.retry_of == cont.record.index
    assert again.record.extra["continuation"] == "conversation"
    assert cont.record.extra["continue_as"] == "conversation"
    assert again.kwargs["messages"][-2] == {"role": "assistant", "content": "Hello"}
    first_content(call, again, T0 + 0.7)
    assert call.summary()["joins"] == [{"from": 0, "at_chars": 5, "to": 2, "model": "b"}]
    assert p.breakers.get("b").fail_counter == 0


@pytest.mark.parametrize("says", ["assistant prefill is not supported", "Prefix completion is not available"])
def test_a_400_naming_the_prefill_or_prefix_means_the_model_cannot_continue(says: str) -> None:
    p = stream_planner(prefill={"b": True, "c": True})
    call = start_stream(p)
    first = launch(call, T0)
    first_content(call, first, T0 + 0.1)
    call.on_interrupted(first, interruption("Hello", connection_cut()), "Hello", T0 + 0.5)
    cont = launch(call, T0 + 0.5)

    call.on_error(cont, lx.BadRequestError(says, "b", "openai"), T0 + 0.6)

    assert cont.record.reason == k.PREFILL_REJECTED


def test_a_continuations_own_400_about_something_else_counts_and_still_never_ends_the_call() -> None:
    p = stream_planner(prefill={"b": True, "c": True})
    call = start_stream(p)
    first = launch(call, T0)
    first_content(call, first, T0 + 0.1)
    call.on_interrupted(first, interruption("Hello", connection_cut()), "Hello", T0 + 0.5)
    cont = launch(call, T0 + 0.5)

    call.on_error(cont, lx.BadRequestError("Invalid request.", "b", "openai"), T0 + 0.6)

    assert cont.record.reason == k.BAD_REQUEST
    assert launch(call, T0 + 0.6).spec.name == "c"


def test_a_model_without_a_policy_word_on_prefill_follows_litellms_map() -> None:
    p = stream_planner(prefill={})  # a, b, c are openai/* models litellm's map does not list: no prefill
    call = start_stream(p)
    first = launch(call, T0)
    first_content(call, first, T0 + 0.1)

    call.on_interrupted(first, interruption("Hello", connection_cut()), "Hello", T0 + 0.5)

    assert launch(call, T0 + 0.5).record.extra["continuation"] == "conversation"


def test_a_non_stream_call_never_asks_for_a_prefill() -> None:
    p = stream_planner()
    call = p.start(CallRequest(model="chat", messages=MESSAGES, kwargs={}), T0)
    first = launch(call, T0)

    call.on_error(first, connection_cut(), T0 + 0.1)
    nxt = launch(call, T0 + 0.1)

    assert nxt.kwargs["messages"] == MESSAGES
    assert "prefill_chars" not in nxt.record.extra


# -- half-open probes are judged at their first content -------------------------------------------


def probing_stream(soft: dict[str, Any] | None = None) -> tuple[Planner, Call, Attempt]:
    wall = [datetime(2030, 1, 1, tzinfo=UTC)]
    p = stream_planner(breakers={"fail_max": 1, "reset_timeout_s": 10}, wall=wall, soft=soft, on_interrupt="raise")
    opening = start_stream(p)
    opening.on_error(launch(opening, T0), connection_cut(), T0 + 0.1)
    assert p.breakers.get("a").state == "open"
    wall[0] += timedelta(seconds=11)
    call = start_stream(p, T0 + 11)
    probe = launch(call, T0 + 11)
    assert probe.spec.name == "a" and probe.ticket.probe
    return p, call, probe


def test_a_stream_probe_closes_the_breaker_at_its_first_content() -> None:
    p, call, probe = probing_stream()

    first_content(call, probe, T0 + 11.2)

    assert p.breakers.get("a").state == "closed"  # not when the caller finishes reading
    assert probe.record.breaker_transitions == [("half-open", "closed")]


def test_what_happens_to_a_probe_stream_after_its_first_content_counts_as_an_ordinary_outcome() -> None:
    p, call, probe = probing_stream()
    first_content(call, probe, T0 + 11.2)

    call.on_interrupted(probe, interruption("Hel", connection_cut()), "Hel", T0 + 11.5)

    assert p.breakers.get("a").state == "open"  # fail_max 1: the cut counts once, as any request's failure


def test_a_stream_probe_whose_first_content_is_later_than_the_soft_timeout_fails() -> None:
    p, call, probe = probing_stream(soft=SOFT)  # soft timeout 0.5 s (the warm-up bound)

    first_content(call, probe, T0 + 11.7)

    assert p.breakers.get("a").state == "open"
    assert probe.record.extra["slow"] is True
    assert probe.record.breaker_transitions == [("half-open", "open")]
    failures = p.breakers.get("a").fail_counter
    call.on_response(probe, litellm.ModelResponse(), T0 + 12.0)
    assert p.breakers.get("a").state == "open"  # its end counts nothing more
    assert p.breakers.get("a").fail_counter == failures


def test_a_stream_probe_with_its_first_content_at_the_soft_timeout_passes() -> None:
    p, call, probe = probing_stream(soft=SOFT)

    first_content(call, probe, T0 + 11.5)

    assert p.breakers.get("a").state == "closed"


def test_an_ordinary_streams_first_content_moves_no_breaker() -> None:
    p = stream_planner(breakers={"fail_max": 2})
    p.breakers.get("a").record(launch(start_stream(p), T0).ticket, k.CONNECTION)
    call = start_stream(p)
    first = launch(call, T0)

    first_content(call, first, T0 + 0.9)

    assert p.breakers.get("a").fail_counter == 1  # neither reset nor counted until the stream ends
    assert first.record.breaker_transitions == []


# -- how long a stream took is its time to first content ---------------------------------------------


def test_a_stream_with_fast_first_content_is_not_slow_however_long_it_runs() -> None:
    p = stream_planner(soft=SOFT)
    call = start_stream(p)
    first = launch(call, T0)
    first_content(call, first, T0 + 0.2)

    call.on_response(first, litellm.ModelResponse(), T0 + 1.9)

    assert (first.record.outcome, first.record.reason) == ("success", None)
    assert "slow" not in first.record.extra
    assert p.latency.percentile("a", "default", 50, 1) == pytest.approx(0.2)


def test_a_stream_cut_mid_way_by_a_timeout_teaches_the_window_its_time_to_first_content() -> None:
    p = stream_planner(on_interrupt="raise")
    call = start_stream(p)
    first = launch(call, T0)
    first_content(call, first, T0 + 0.3)

    call.on_interrupted(first, interruption("Hel", TimeoutError("no chunk for 2 s")), "Hel", T0 + 1.8)

    assert first.record.reason == k.TIMEOUT
    assert window(p).samples("a", "default") == (1, 0)  # a complete sample: its first chunk came
    assert p.latency.percentile("a", "default", 50, 1) == pytest.approx(0.3)


def test_a_stream_timing_out_before_its_first_content_is_a_censored_sample() -> None:
    p = stream_planner()
    call = start_stream(p)
    first = launch(call, T0)

    call.on_error(first, TimeoutError("no content within 2 s"), T0 + 2.0)

    assert window(p).samples("a", "default") == (0, 1)


def test_a_cancelled_stream_is_slow_only_if_its_first_content_was() -> None:
    p = stream_planner(soft=SOFT, chain=("a", "b"))
    fast = start_stream(p)
    attempt = launch(fast, T0)
    first_content(fast, attempt, T0 + 0.2)
    fast.cancel(T0 + 1.5)  # the caller stopped reading long after the first chunk
    assert (attempt.record.outcome, attempt.record.reason) == ("cancelled", None)
    assert p.breakers.get("a").fail_counter == 0

    silent = start_stream(p)
    attempt = launch(silent, T0)
    silent.cancel(T0 + 0.8)  # no content for 0.8 s, past the 0.5 s soft timeout
    assert (attempt.record.outcome, attempt.record.reason) == ("cancelled", k.SOFT_TIMEOUT)
    assert p.breakers.get("a").fail_counter == 1


# -- the caller ends a committed stream ------------------------------------------------------------


def test_the_callers_timeout_ends_a_committed_stream_without_blaming_the_provider() -> None:
    ended = Ended()
    p = stream_planner(hooks=[ended])
    call = start_stream(p, timeout=3.0)
    first = launch(call, T0)
    first_content(call, first, T0 + 0.1)
    error = interruption("Hello", TimeoutError("the caller's timeout=3 s elapsed"))

    call.expire(error, T0 + 3.0)

    assert final_error(call, T0 + 3.0) is error
    assert (first.record.outcome, first.record.reason) == ("cancelled", k.DEADLINE)
    assert call.answered_by is first.record
    assert p.breakers.get("a").fail_counter == 0
    assert ended.calls == [(None, error)] and ended.told_about(call)
    assert [r for _, r in ended.attempts] == [first.record]
    call.expire(TimeoutError("again"), T0 + 4.0)  # decided already: nothing changes
    assert final_error(call, T0 + 4.0) is error
    assert len(ended.calls) == 1


def test_the_callers_timeout_before_the_first_content_leaves_no_answer() -> None:
    call = start_stream(stream_planner(), timeout=3.0)
    first = launch(call, T0)

    call.expire(TimeoutError("the caller's timeout=3 s elapsed"), T0 + 3.0)

    assert call.answered_by is None
    assert (first.record.outcome, first.record.reason) == ("cancelled", k.DEADLINE)


def test_a_caller_who_stops_reading_a_committed_stream_was_answered_in_part() -> None:
    ended = Ended()
    call = start_stream(stream_planner(hooks=[ended]))
    first = launch(call, T0)
    first_content(call, first, T0 + 0.1)

    call.cancel(T0 + 0.4)

    assert call.answered_by is first.record
    assert call.summary()["model"] == "a"
    assert ended.calls == [(None, None)] and ended.of == [call] and ended.told_about(call)
    assert [r for _, r in ended.attempts] == [first.record]
    error = final_error(call, T0 + 0.4)
    assert isinstance(error, LLMResilienceError) and str(error) == "the call was cancelled by the caller"
    call.cancel(T0 + 0.5)
    assert len(ended.calls) == 1


def test_a_stream_is_never_hedged_and_waits_for_its_driver() -> None:
    p = stream_planner()
    call = start_stream(p)
    first = launch(call, T0)

    action = call.next_action(T0 + 1.0)

    assert isinstance(action, Wait) and action.until == pytest.approx(T0 + 5.0)  # the deadline
    assert first.bound_at is None and first.hedge_at is None
    assert first.kwargs["stream"] is True


def test_every_model_failing_before_content_is_all_attempts_failed_with_the_last_error_as_cause() -> None:
    call = start_stream(stream_planner())
    errors = []
    for name in ("a", "b", "c"):
        attempt = launch(call, T0)
        assert attempt.spec.name == name
        errors.append(connection_cut())
        call.on_error(attempt, errors[-1], T0 + 0.1)

    error = final_error(call, T0 + 0.1)

    assert isinstance(error, AllAttemptsFailed)
    assert error.__cause__ is errors[-1]


# -- no later model continued: the model whose stream broke does, once --------------------------------


def test_on_a_one_model_route_the_model_that_broke_is_asked_to_continue_its_own_stream_once() -> None:
    call = start_stream(stream_planner(chain=("a",), prefill={"a": False}))
    first = launch(call, T0)
    first_content(call, first, T0 + 0.1)

    call.on_interrupted(first, interruption("Hello, wor", connection_cut()), "Hello, wor", T0 + 4.9)
    again = launch(call, T0 + 4.9)

    assert again.spec.name == "a" and again.record.retry_of is None
    assert again.kwargs["messages"] == [
        *MESSAGES,
        {"role": "assistant", "content": "Hello, wor"},
        {"role": "user", "content": DEFAULT_CONTINUE_PROMPT},
    ]
    assert again.record.extra["continuation"] == "conversation"
    assert again.timeout_s == pytest.approx(2.0)  # the deadline given anew by the break
    first_content(call, again, T0 + 5.0)
    assert call.summary()["joins"] == [{"from": 0, "at_chars": 10, "to": 1, "model": "a"}]

    call.on_interrupted(again, interruption("Hello, world", connection_cut()), "Hello, world", T0 + 5.2)
    error = final_error(call, T0 + 5.2)  # broke again: not asked a third time
    assert isinstance(error, StreamInterrupted) and error.generated_content == "Hello, world"
    assert len(call.records) == 2


def test_the_last_model_of_a_chain_continues_its_own_broken_continuation() -> None:
    call = start_stream(stream_planner(chain=("a", "b"), prefill={"b": True}))
    first = launch(call, T0)
    first_content(call, first, T0 + 0.1)
    call.on_interrupted(first, interruption("Hel", connection_cut()), "Hel", T0 + 0.2)
    second = launch(call, T0 + 0.2)
    first_content(call, second, T0 + 0.3)

    call.on_interrupted(second, interruption("Hello, wo", connection_cut()), "Hello, wo", T0 + 0.4)
    third = launch(call, T0 + 0.4)

    assert third.spec.name == "b"  # the model that broke last, not the first one
    assert third.kwargs["messages"][-1] == {"role": "assistant", "content": "Hello, wo", "prefix": True}


def test_a_model_whose_breaker_opened_on_the_break_is_not_asked_to_continue() -> None:
    call = start_stream(stream_planner(chain=("a",), breakers={"fail_max": 1}))
    first = launch(call, T0)
    first_content(call, first, T0 + 0.1)

    call.on_interrupted(first, interruption("Hello", connection_cut()), "Hello", T0 + 0.5)

    assert isinstance(final_error(call, T0 + 0.5), StreamInterrupted)
    assert [(r.model, r.outcome, r.reason) for r in call.records] == [
        ("a", "failure", k.CONNECTION),
        ("a", "skipped", k.BREAKER_OPEN),
    ]


def test_no_continuation_of_its_own_when_the_callers_timeout_leaves_no_room() -> None:
    call = start_stream(stream_planner(chain=("a",)), timeout=5.0)
    first = launch(call, T0)
    first_content(call, first, T0 + 0.1)

    call.on_interrupted(first, interruption("Hello", connection_cut()), "Hello", T0 + 4.999)

    assert isinstance(final_error(call, T0 + 4.999), StreamInterrupted)
    assert [(r.outcome, r.reason) for r in call.records] == [("failure", k.CONNECTION), ("skipped", k.DEADLINE)]


def test_a_json_stream_is_not_continued_by_its_own_model_without_prefill() -> None:
    call = start_stream(stream_planner(chain=("a",), prefill={"a": False}), response_format={"type": "json_object"})
    first = launch(call, T0)
    first_content(call, first, T0 + 0.1)

    call.on_interrupted(first, interruption("{", connection_cut()), "{", T0 + 0.5)

    assert isinstance(final_error(call, T0 + 0.5), StreamInterrupted)
    assert len(call.records) == 1
