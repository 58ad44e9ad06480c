"""What the README promises is what the engine does (issue 12): caller timeouts, dropped arguments,
model output limits, answer text kept out of spans.

Each test names the one-line mutation it was checked against (see the issue note).
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from conftest import MESSAGES, EngineFactory, PolicyBuilder, hidden
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from llm_resilience import Resilience, _planner
from llm_resilience._env import litellm
from llm_resilience._policy import ModelSpec, PromptClass, TruncationConfig
from llm_resilience._truncation import input_budget
from llm_resilience.testing import Behavior, FakeProvider

# -- a caller's own timeout= under the built-in defaults (issue 12, item 4) ---------------------------


@pytest.mark.parametrize("timeout", [600, 0.5])
def test_under_the_built_in_defaults_the_callers_timeout_is_the_attempt_timeout(
    big: FakeProvider, timeout: float
) -> None:
    # Mutation checked: `if self.klass is BUILTIN_CLASS` -> `if False` (600 became a 60 s attempt).
    engine = Resilience()

    response = engine.completion("openai/any", MESSAGES, api_base=big.base_url, api_key="k", timeout=timeout)

    # abs=0.5: the first call of a new engine pays one-off set-up (its leased client) before the attempt starts
    assert hidden(response)["attempts"][0]["timeout_s"] == pytest.approx(timeout, abs=0.5)  # less time spent


def test_a_policy_class_keeps_its_timeouts_and_the_callers_timeout_caps_the_call(
    make_engine: EngineFactory, policy_dict: PolicyBuilder
) -> None:
    engine = make_engine(policy_dict(["big"], timeout_s=0.7, deadline_s=2.0))

    long = engine.completion("chat", MESSAGES, timeout=600)
    short = engine.completion("chat", MESSAGES, timeout=0.4)

    assert hidden(long)["attempts"][0]["timeout_s"] == 0.7
    assert hidden(short)["attempts"][0]["timeout_s"] == pytest.approx(0.4, abs=0.05)


# -- dropped caller arguments are logged once (issue 12, item 8) -------------------------------------


def test_dropped_arguments_are_logged_once_by_name_never_by_value(
    make_engine: EngineFactory,
    policy_dict: PolicyBuilder,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Mutation checked: removing the `_warn_dropped(...)` call.
    # Generous timeouts: a process's first litellm stream imports lazily (~0.6 s, more under load).
    engine = make_engine(policy_dict(["big"], timeout_s=20.0, deadline_s=40.0))
    monkeypatch.setattr(_planner, "_dropped_warned", set())
    dropped: dict[str, Any] = {
        "fallbacks": ["openai/VALUE-fallback-model"],
        "context_window_fallback_dict": {"a": "VALUE-window"},
        "num_retries": 7,
        "max_retries": 9,
    }
    with caplog.at_level(logging.WARNING, logger="llm_resilience"):
        for _ in range(3):
            engine.completion("chat", MESSAGES, **dropped)
        list(engine.completion("chat", MESSAGES, stream=True, stream_timeout=12.5))
        list(engine.completion("chat", MESSAGES, stream=True, stream_timeout=12.5))

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "ignores" in r.getMessage()]
    assert sorted(w.split("'")[1] for w in warnings) == sorted([*dropped, "stream_timeout"])
    for text in warnings:
        assert "VALUE" not in text and "12.5" not in text and "7" not in text and "9" not in text


# -- models.NAME.max_output_tokens is read (issue 12, item 5) -----------------------------------------


@pytest.mark.sans_io
def test_a_models_max_output_tokens_caps_the_reserved_output() -> None:
    # Mutation checked: deleting the `reserve = min(reserve, spec.max_output_tokens)` line.
    klass = PromptClass(timeout_s=1, deadline_s=2)
    plain = ModelSpec(name="m", litellm_params={"model": "openai/m"})
    short_writer = ModelSpec(name="m", litellm_params={"model": "openai/m"}, max_output_tokens=256)

    assert input_budget(100_000, plain, {}, klass, TruncationConfig()) == 100_000 - 1024
    assert input_budget(100_000, short_writer, {}, klass, TruncationConfig()) == 100_000 - 256
    assert input_budget(100_000, short_writer, {"max_tokens": 4000}, klass, TruncationConfig()) == 100_000 - 256


def test_max_output_tokens_in_the_policy_reaches_the_truncation_budget(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider
) -> None:
    # A window 640 tokens larger than the prompt: a 1,024-token reserve truncates it, a 256 one does not.
    long_messages = [{"role": "user", "content": "otter census " * 1000}]
    tokens = litellm.token_counter(model="openai/gpt-4o", messages=long_messages)
    policy = policy_dict(["big"])
    policy["models"]["big"]["context_window"] = tokens + 640
    reserved = make_engine(policy).completion("chat", long_messages)
    policy["models"]["big"]["max_output_tokens"] = 256
    capped = make_engine(policy).completion("chat", long_messages)

    assert hidden(reserved)["attempts"][0].get("truncated") is True
    assert not hidden(capped)["attempts"][0].get("truncated")


# -- answer text stays out of spans unless the policy opts in -----------------------------------------

ANSWER = "ANSWER-MARKER-5be1 the otters number forty-two"


def test_answer_text_is_not_recorded_in_spans_without_record_content(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, exporter: InMemorySpanExporter, big: FakeProvider
) -> None:
    # Mutation checked: `if record_content and choices:` -> `if choices:` in _tracing._response_attributes.
    engine = make_engine(policy_dict(["big"]))
    big.set(Behavior.ok(ANSWER))

    assert engine.completion("chat", MESSAGES).choices[0].message.content == ANSWER
    assert "".join(c.choices[0].delta.content or "" for c in engine.completion("chat", MESSAGES, stream=True)) == (
        ANSWER
    )

    spans = exporter.get_finished_spans()
    assert len(spans) == 4
    for span in spans:
        texts = [str(v) for v in (span.attributes or {}).values()]
        texts += [str(v) for event in span.events for v in (event.attributes or {}).values()]
        texts += [event.name for event in span.events]
        for text in texts:
            assert "ANSWER-MARKER" not in text and "forty-two" not in text, (span.name, text)
