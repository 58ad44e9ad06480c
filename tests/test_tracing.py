"""Spans, read back from an in-memory exporter: structure, GenAI attributes, and what must never appear."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import litellm
import pytest
from conftest import API_KEYS, MESSAGES, PROMPT, Caller, EngineFactory, PolicyBuilder, hidden
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from llm_resilience import AllAttemptsFailed, Hook, Resilience
from llm_resilience._breakers import BreakerTransition
from llm_resilience.testing import Behavior, FakeProvider

NS = "llm_resilience"


def split(spans: Any) -> tuple[ReadableSpan, list[ReadableSpan]]:
    """The call span and its attempt spans (in attempt order)."""
    spans = list(spans)
    parents = [s for s in spans if s.name.startswith(f"{NS}.completion")]
    assert len(parents) == 1, [s.name for s in spans]
    children = [s for s in spans if s is not parents[0]]
    children.sort(key=lambda s: attrs(s)[f"{NS}.attempt.index"])
    return parents[0], children


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def every_string(span: ReadableSpan) -> Iterator[str]:
    """Every piece of text a span carries: name, status, attribute and event values."""
    yield span.name
    if span.status.description:
        yield span.status.description
    sources = [span.attributes or {}] + [e.attributes or {} for e in span.events]
    for event in span.events:
        yield event.name
    for mapping in sources:
        for key, value in mapping.items():
            yield key
            values = value if isinstance(value, tuple | list) else (value,)
            yield from (str(v) for v in values)


@pytest.fixture
def scenario(
    make_engine: EngineFactory,
    policy_dict: PolicyBuilder,
    exporter: InMemorySpanExporter,
    big: FakeProvider,
    small: FakeProvider,
    tiny: FakeProvider,
) -> Resilience:
    """big's breaker already open (fail_max 1), small failing with 500, tiny healthy."""
    big.set(Behavior.error(500))
    engine = make_engine(policy_dict(breakers={"big": {"fail_max": 1}}))
    engine.completion("chat", MESSAGES)
    assert engine.breaker_states()["big"] == "open"
    exporter.clear()
    small.set(Behavior.error(500))
    tiny.set(Behavior.ok("tiny answer"))
    return engine


ISO_UTC = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


def test_one_call_span_and_one_child_per_attempt_skips_as_internal_skip_spans(
    call: Caller, scenario: Resilience, exporter: InMemorySpanExporter
) -> None:
    call(scenario, "chat", MESSAGES)

    parent, children = split(exporter.get_finished_spans())
    assert [c.name for c in children] == ["skip big", "chat gpt-4o-mini", "chat tiny-model"]
    assert [c.kind for c in children] == [SpanKind.INTERNAL, SpanKind.CLIENT, SpanKind.CLIENT]
    assert [attrs(c)[f"{NS}.outcome"] for c in children] == ["skipped", "failure", "success"]
    for child in children:
        assert child.parent is not None
        assert child.parent.span_id == parent.context.span_id
        assert child.context.trace_id == parent.context.trace_id
    assert parent.parent is None
    assert parent.kind == SpanKind.INTERNAL
    assert parent.name == f"{NS}.completion chat rescued"  # answered, but not by the first model
    summary = attrs(parent)
    assert summary[f"{NS}.route"] == "chat"
    assert summary[f"{NS}.answered_by"] == "tiny"
    assert summary[f"{NS}.call_outcome"] == "rescued"
    assert summary[f"{NS}.fallbacks"] == 2
    assert re.fullmatch(
        rf"big: skipped, breaker_open until {ISO_UTC} → small: server_error after \d+ ms → tiny: ok in \d+ ms",
        summary[f"{NS}.path"],
    ), summary[f"{NS}.path"]
    assert parent.status.status_code == StatusCode.UNSET  # the call answered: not an error
    assert not [key for key in summary if key.startswith("gen_ai.")]  # the call span is not a model call


def test_attempt_spans_carry_genai_attributes_and_skips_do_not(
    scenario: Resilience, exporter: InMemorySpanExporter
) -> None:
    scenario.completion("chat", MESSAGES, prompt_class="default")

    _parent, (skipped, failed, answered) = split(exporter.get_finished_spans())
    for index, child in enumerate((skipped, failed, answered)):
        assert attrs(child)[f"{NS}.attempt.index"] == index
    for child in (failed, answered):  # reached a provider: the GenAI set
        child_attrs = attrs(child)
        assert child_attrs["gen_ai.operation.name"] == "chat"
        assert child_attrs["gen_ai.provider.name"] == "openai"
        assert child_attrs["server.address"] == "127.0.0.1"
    skip = attrs(skipped)
    assert not [key for key in skip if key.startswith(("gen_ai.", "server."))], skip
    assert skip[f"{NS}.reason"] == "breaker_open"
    assert skip[f"{NS}.breaker.state"] == "open"
    assert re.fullmatch(ISO_UTC, skip[f"{NS}.open_until"])
    assert skipped.status.status_code == StatusCode.UNSET

    assert attrs(failed)["gen_ai.request.model"] == "gpt-4o-mini"  # the name sent: no litellm prefix
    assert attrs(failed)[f"{NS}.reason"] == "server_error"
    assert attrs(failed)["error.type"] == "InternalServerError"
    assert attrs(failed)[f"{NS}.bound.attempt_ms"] == 1000
    assert f"{NS}.breaker.state" not in attrs(failed)  # closed is the default, not repeated on every span
    assert failed.status.status_code == StatusCode.ERROR

    answered_attrs = attrs(answered)
    assert answered_attrs["gen_ai.request.model"] == "tiny-model"
    assert answered_attrs["gen_ai.response.model"] == "tiny-model"
    assert answered_attrs["gen_ai.usage.input_tokens"] == len(PROMPT) // 4  # what the fake provider reports
    assert answered_attrs["gen_ai.usage.output_tokens"] > 0
    assert tuple(answered_attrs["gen_ai.response.finish_reasons"]) == ("stop",)
    assert answered_attrs[f"{NS}.outcome"] == "success"
    assert f"{NS}.reason" not in answered_attrs
    assert "error.type" not in answered_attrs
    assert answered.status.status_code == StatusCode.UNSET


def test_no_float_noise_and_one_reason_attribute(scenario: Resilience, exporter: InMemorySpanExporter) -> None:
    scenario.completion("chat", MESSAGES)

    for span in exporter.get_finished_spans():
        for key, value in attrs(span).items():
            assert not key.endswith("_s"), key  # durations are integer milliseconds
            assert "fallback_reason" not in key
            if isinstance(value, float):
                assert len(repr(value)) <= 12, (key, value)


def test_breaker_transitions_are_span_events_with_cause_counts_and_open_until(
    make_engine: EngineFactory,
    policy_dict: PolicyBuilder,
    exporter: InMemorySpanExporter,
    big: FakeProvider,
) -> None:
    reset_s = 0.3
    big.set(Behavior.error(503))
    engine = make_engine(policy_dict(fail_max=2, reset_timeout_s=reset_s))
    engine.completion("chat", MESSAGES)
    exporter.clear()

    engine.completion("chat", MESSAGES)

    parent, children = split(exporter.get_finished_spans())
    events = [e for e in children[0].events if e.name == f"{NS}.breaker.transition"]
    assert len(events) == 1
    opened = dict(events[0].attributes or {})
    assert opened[f"{NS}.model"] == "big"
    assert (opened[f"{NS}.breaker.from"], opened[f"{NS}.breaker.to"]) == ("closed", "open")
    assert opened[f"{NS}.breaker.cause"] == "consecutive_failures"
    assert opened[f"{NS}.breaker.failures"] == 2
    assert opened[f"{NS}.breaker.last_failure"] == "server_error"
    assert re.fullmatch(ISO_UTC, opened[f"{NS}.breaker.open_until"])
    assert not any(e.name == f"{NS}.breaker.transition" for c in children[1:] for e in c.events)
    assert ", breaker opened → small" in attrs(parent)[f"{NS}.path"]

    big.set(Behavior.ok("recovered"))
    time.sleep(reset_s + 0.05)  # the breaker's reset timeout runs on the wall clock
    exporter.clear()
    engine.completion("chat", MESSAGES)

    parent, (probe,) = split(exporter.get_finished_spans())
    moves = [dict(e.attributes or {}) for e in probe.events if e.name == f"{NS}.breaker.transition"]
    assert [(m[f"{NS}.breaker.from"], m[f"{NS}.breaker.to"], m[f"{NS}.breaker.cause"]) for m in moves] == [
        ("open", "half-open", "reset_timeout_elapsed"),
        ("half-open", "closed", "probe_succeeded"),
    ]
    assert attrs(probe)[f"{NS}.breaker.admission"] == "probe"
    assert re.fullmatch(r"big: ok in \d+ ms \(probe\), breaker closed", attrs(parent)[f"{NS}.path"])


def test_hooks_get_the_transition_details_when_they_ask_for_them(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider
) -> None:
    seen: list[tuple[str, str, str, Any]] = []
    old_style: list[tuple[str, str, str]] = []

    class Detailed(Hook):
        def breaker_transition(self, model: str, old: str, new: str, info: Any = None) -> None:
            seen.append((model, old, new, info))

    class ThreeArguments(Hook):
        def breaker_transition(self, model: str, old: str, new: str) -> None:
            old_style.append((model, old, new))

    big.set(Behavior.error(500))
    engine = make_engine(policy_dict(fail_max=1), hooks=[Detailed(), ThreeArguments()])
    engine.completion("chat", MESSAGES)

    assert old_style == [("big", "closed", "open")]
    ((model, old, new, info),) = seen
    assert (model, old, new) == ("big", "closed", "open")
    assert isinstance(info, BreakerTransition)
    assert (info.cause, info.failures, info.last_failure) == ("consecutive_failures", 1, "server_error")
    assert info.open_until is not None and info.open_until > time.time() + 25  # reset_timeout_s is 30


def test_failed_call_marks_the_call_span_as_error(
    engine: Resilience, exporter: InMemorySpanExporter, big: FakeProvider, small: FakeProvider, tiny: FakeProvider
) -> None:
    for p in (big, small, tiny):
        p.set(Behavior.error(500))

    with pytest.raises(AllAttemptsFailed):
        engine.completion("chat", MESSAGES)

    parent, children = split(exporter.get_finished_spans())
    assert parent.status.status_code == StatusCode.ERROR
    assert attrs(parent)["error.type"] == "AllAttemptsFailed"
    assert attrs(parent)[f"{NS}.call_outcome"] == "failed"
    assert attrs(parent)[f"{NS}.fallbacks"] == 2  # moves to another model; the last failure has none
    assert f"{NS}.answered_by" not in attrs(parent)
    assert attrs(parent)[f"{NS}.path"].count("server_error after") == 3
    assert len(children) == 3
    assert all(attrs(c)["error.type"] == "InternalServerError" for c in children)
    assert all(c.status.status_code == StatusCode.ERROR for c in children)


def test_timeout_attempt_span_says_timeout_and_by_how_much_it_ran_over(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, exporter: InMemorySpanExporter, big: FakeProvider
) -> None:
    big.set(Behavior.slow(2.0))
    engine = make_engine(policy_dict(["big", "small"], timeout_s=0.2))

    response = engine.completion("chat", MESSAGES)

    parent, (timed_out, answered) = split(exporter.get_finished_spans())
    assert attrs(timed_out)[f"{NS}.reason"] == "timeout"
    assert attrs(timed_out)["error.type"] == "Timeout"
    assert (attrs(timed_out)[f"{NS}.cut_by"], attrs(timed_out)[f"{NS}.bound.attempt_ms"]) == ("attempt", 200)
    latency_s = hidden(response)["attempts"][0]["latency_s"]
    assert latency_s > 0.2
    assert abs(attrs(timed_out)[f"{NS}.overrun_ms"] - (latency_s - 0.2) * 1000) <= 1
    if hidden(response)["attempts"][1]["latency_s"] <= 0.2:  # a busy machine can push even an answer past it
        assert f"{NS}.overrun_ms" not in attrs(answered)
    assert attrs(answered)[f"{NS}.outcome"] == "success"
    assert re.fullmatch(
        r"big: timeout after \d+ ms \(attempt bound 200 ms\) → small: ok in \d+ ms", attrs(parent)[f"{NS}.path"]
    )


def test_nothing_is_built_when_the_sampler_drops_the_call(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider
) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ALWAYS_OFF)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    big.set(Behavior.error(500))
    engine = make_engine(policy_dict(), tracer_provider=provider)

    response = engine.completion("chat", MESSAGES)

    assert hidden(response)["model"] == "small"
    assert exporter.get_finished_spans() == ()


def test_no_prompt_text_and_no_api_key_in_any_span(
    call: Caller,
    make_engine: EngineFactory,
    policy_dict: PolicyBuilder,
    exporter: InMemorySpanExporter,
    big: FakeProvider,
    small: FakeProvider,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LLMR_TEST_TINY_KEY", "sk-env-SECRET-from-environment-77")
    policy = policy_dict(fail_max=1)
    policy["models"]["tiny"]["litellm_params"]["api_key"] = "os.environ/LLMR_TEST_TINY_KEY"
    engine = make_engine(policy)
    big.set(Behavior.error(401))
    small.set(Behavior.error(500))
    call(engine, "chat", MESSAGES, api_key="sk-caller-SECRET-0042")  # opens big's and small's breakers
    call(engine, "chat", MESSAGES)  # skips
    with pytest.raises(AllAttemptsFailed):  # an ad-hoc route with the caller's own key
        engine.completion("openai/adhoc", MESSAGES, api_base=small.base_url, api_key="sk-adhoc-SECRET-1")

    spans = exporter.get_finished_spans()
    assert len(spans) == 10  # 1 + 3, 1 + 3, 1 + 1
    secrets = [*API_KEYS.values(), "sk-env-SECRET-from-environment-77", "sk-caller-SECRET-0042", "sk-adhoc-SECRET-1"]
    for span in spans:
        for text in every_string(span):
            assert PROMPT not in text, (span.name, text)
            assert "otter" not in text, (span.name, text)
            for secret in secrets:
                assert secret not in text, (span.name, text)


def test_record_content_opt_in_records_the_prompt(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, exporter: InMemorySpanExporter, big: FakeProvider
) -> None:
    big.set(Behavior.ok("the answer text"))
    engine = make_engine(policy_dict(telemetry={"record_content": True}))

    engine.completion("chat", MESSAGES)

    parent, children = split(exporter.get_finished_spans())
    assert PROMPT in str(attrs(parent)[f"{NS}.prompt"])
    assert attrs(children[0])[f"{NS}.completion"] == "the answer text"
    for span in (parent, *children):  # content is opt-in; keys never are
        for text in every_string(span):
            assert API_KEYS["big"] not in text


class ExplodingHook(Hook):
    def call_started(self, call: Any) -> None:
        raise RuntimeError("hook bug")

    def attempt_started(self, call: Any, record: Any) -> None:
        raise RuntimeError("hook bug")

    def attempt_ended(self, call: Any, record: Any, response: Any) -> None:
        raise RuntimeError("hook bug")

    def call_ended(self, call: Any, response: Any, error: BaseException | None) -> None:
        raise RuntimeError("hook bug")

    def breaker_transition(self, model: str, old: str, new: str) -> None:
        raise RuntimeError("hook bug")


def test_a_hook_that_raises_does_not_break_the_call(
    call: Caller,
    make_engine: EngineFactory,
    policy_dict: PolicyBuilder,
    exporter: InMemorySpanExporter,
    big: FakeProvider,
) -> None:
    big.set(Behavior.error(500))
    engine = make_engine(policy_dict(fail_max=1), hooks=[ExplodingHook()])

    response = call(engine, "chat", MESSAGES)  # also trips big's breaker: breaker_transition raises too
    again = call(engine, "chat", MESSAGES)

    assert hidden(response)["model"] == "small"
    assert hidden(again)["attempts"][0]["reason"] == "breaker_open"
    assert len(exporter.get_finished_spans()) == 6  # the tracing hook kept working


def test_a_hook_that_raises_does_not_hide_the_callers_error(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider
) -> None:
    big.set(Behavior.error(400))
    engine = make_engine(policy_dict(), hooks=[ExplodingHook()])

    with pytest.raises(litellm.exceptions.BadRequestError):
        engine.completion("chat", MESSAGES)


def test_answer_summary_and_spans_agree(scenario: Resilience, exporter: InMemorySpanExporter) -> None:
    response = scenario.completion("chat", MESSAGES)

    _parent, children = split(exporter.get_finished_spans())
    attempts = hidden(response)["attempts"]
    assert [attrs(c)[f"{NS}.model"] for c in children] == [a["model"] for a in attempts]
    assert [attrs(c)[f"{NS}.outcome"] for c in children] == [a["outcome"] for a in attempts]


def test_a_caller_cancelling_its_task_ends_the_call_span_and_the_attempt_span(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider, exporter: InMemorySpanExporter
) -> None:
    import asyncio

    big.set(Behavior.slow(5.0))
    engine = make_engine(policy_dict(chain=["big", "small"], timeout_s=3.0))

    async def scenario() -> None:
        task = asyncio.ensure_future(engine.acompletion("chat", MESSAGES))
        for _ in range(500):  # until the attempt to big is in flight (the first call in a process is slow)
            if big.request_count:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    parent, children = split(exporter.get_finished_spans())
    assert [attrs(c)[f"{NS}.outcome"] for c in children] == ["cancelled"]
    assert parent.end_time is not None
    assert big.request_count == 1
