"""Spans, read back from an in-memory exporter: structure, GenAI attributes, and what must never appear."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import litellm
import pytest
from conftest import API_KEYS, MESSAGES, PROMPT, Caller, EngineFactory, PolicyBuilder, hidden
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from llm_resilience import AllAttemptsFailed, Hook, Resilience
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


def test_one_call_span_and_one_child_per_attempt_including_skips(
    call: Caller, scenario: Resilience, exporter: InMemorySpanExporter
) -> None:
    call(scenario, "chat", MESSAGES)

    parent, children = split(exporter.get_finished_spans())
    assert [c.name for c in children] == ["chat openai/gpt-4o", "chat openai/gpt-4o-mini", "chat openai/tiny-model"]
    assert [attrs(c)[f"{NS}.outcome"] for c in children] == ["skipped", "failure", "success"]
    for child in children:
        assert child.kind == SpanKind.CLIENT
        assert child.parent is not None
        assert child.parent.span_id == parent.context.span_id
        assert child.context.trace_id == parent.context.trace_id
    assert parent.parent is None
    assert attrs(parent)[f"{NS}.route"] == "chat"
    assert attrs(parent)[f"{NS}.answered_by"] == "tiny"
    assert attrs(parent)[f"{NS}.attempts"] == 3
    assert attrs(parent)[f"{NS}.fallbacks"] == 2
    assert attrs(parent)["gen_ai.response.model"] == "openai/tiny-model"


def test_attempt_spans_carry_genai_and_resilience_attributes(
    scenario: Resilience, exporter: InMemorySpanExporter
) -> None:
    scenario.completion("chat", MESSAGES, prompt_class="default")

    _parent, (skipped, failed, answered) = split(exporter.get_finished_spans())
    for index, child in enumerate((skipped, failed, answered)):
        child_attrs = attrs(child)
        assert child_attrs["gen_ai.operation.name"] == "chat"
        assert child_attrs["gen_ai.provider.name"] == "openai"
        assert child_attrs[f"{NS}.route"] == "chat"
        assert child_attrs[f"{NS}.prompt_class"] == "default"
        assert child_attrs[f"{NS}.attempt.index"] == index
    assert attrs(skipped)["gen_ai.request.model"] == "openai/gpt-4o"
    assert attrs(skipped)[f"{NS}.fallback_reason"] == "breaker_open"
    assert attrs(skipped)[f"{NS}.breaker.state"] == "open"

    assert attrs(failed)[f"{NS}.fallback_reason"] == "server_error"
    assert attrs(failed)["error.type"] == "InternalServerError"
    assert attrs(failed)[f"{NS}.timeout_s"] == 1.0
    assert attrs(failed)[f"{NS}.breaker.state"] == "closed"
    assert failed.status.status_code == StatusCode.ERROR

    answered_attrs = attrs(answered)
    assert answered_attrs["gen_ai.request.model"] == "openai/tiny-model"
    assert answered_attrs["gen_ai.response.model"] == "tiny-model"
    assert answered_attrs["gen_ai.usage.input_tokens"] == len(PROMPT) // 4  # what the fake provider reports
    assert answered_attrs["gen_ai.usage.output_tokens"] > 0
    assert tuple(answered_attrs["gen_ai.response.finish_reasons"]) == ("stop",)
    assert answered_attrs[f"{NS}.outcome"] == "success"
    assert f"{NS}.fallback_reason" not in answered_attrs
    assert "error.type" not in answered_attrs
    assert answered_attrs["server.address"] == "127.0.0.1"


def test_breaker_transitions_are_span_events(
    make_engine: EngineFactory,
    policy_dict: PolicyBuilder,
    exporter: InMemorySpanExporter,
    big: FakeProvider,
) -> None:
    big.set(Behavior.error(503))
    engine = make_engine(policy_dict(fail_max=2))
    engine.completion("chat", MESSAGES)
    exporter.clear()

    engine.completion("chat", MESSAGES)

    _parent, children = split(exporter.get_finished_spans())
    events = [e for e in children[0].events if e.name == f"{NS}.breaker.transition"]
    assert len(events) == 1
    assert events[0].attributes is not None
    assert dict(events[0].attributes) == {"from": "closed", "to": "open", f"{NS}.model": "big"}
    assert not any(e.name == f"{NS}.breaker.transition" for c in children[1:] for e in c.events)


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
    assert len(children) == 3
    assert all(attrs(c)["error.type"] == "InternalServerError" for c in children)


def test_timeout_attempt_span_says_timeout(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, exporter: InMemorySpanExporter, big: FakeProvider
) -> None:
    big.set(Behavior.slow(2.0))
    engine = make_engine(policy_dict(["big", "small"], timeout_s=0.2))

    engine.completion("chat", MESSAGES)

    _parent, (timed_out, answered) = split(exporter.get_finished_spans())
    assert attrs(timed_out)[f"{NS}.fallback_reason"] == "timeout"
    assert attrs(timed_out)["error.type"] == "Timeout"
    assert attrs(timed_out)[f"{NS}.timeout_s"] == 0.2
    assert attrs(answered)[f"{NS}.outcome"] == "success"


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
