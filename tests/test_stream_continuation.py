"""Mid-stream continuation by assistant prefill (``streaming: {on_interrupt: continue}``, the default).

A stream cut or stalled after content reached the caller goes on with the next model, asked to
continue the text already sent (an assistant prefill where the model accepts one); only the
continuation reaches the caller. The conversation form, for models without prefill, is in
``test_stream_recovery.py``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from conftest import MESSAGES, EngineFactory, PolicyBuilder
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from llm_resilience import Resilience, StreamInterrupted
from llm_resilience.testing import Behavior, FakeProvider

CLASSES = {"default": {"timeout_s": 5.0, "deadline_s": 10.0, "first_token_timeout_s": 4.0, "idle_timeout_s": 0.5}}


def continuing_engine(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, chain: list[str], prefill: dict[str, bool | None]
) -> Resilience:
    policy = policy_dict(chain, prompt_classes=CLASSES)
    policy["routes"]["chat"]["streaming"] = {"on_interrupt": "continue"}
    for name, accepts in prefill.items():
        if accepts is not None:
            policy["models"][name]["assistant_prefill"] = accepts
    return make_engine(policy)


def read_all(mode: str, engine: Resilience, **kwargs: Any) -> tuple[str, Any]:
    text, stream, error = read_until_error(mode, engine, **kwargs)
    if error is not None:
        raise error
    return text, stream


def read_until_error(mode: str, engine: Resilience, **kwargs: Any) -> tuple[str, Any, BaseException | None]:
    """The text received, the stream (for its summary) and the error that ended it, if any."""
    parts: list[str] = []
    if mode == "sync":
        stream = engine.completion("chat", MESSAGES, stream=True, **kwargs)
        try:
            for chunk in stream:
                parts.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
        except StreamInterrupted as e:
            return "".join(parts), stream, e
        return "".join(parts), stream, None

    async def run() -> tuple[str, Any, BaseException | None]:
        stream = await engine.acompletion("chat", MESSAGES, stream=True, **kwargs)
        try:
            async for chunk in stream:
                parts.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
        except StreamInterrupted as e:
            return "".join(parts), stream, e
        return "".join(parts), stream, None

    return asyncio.run(run())


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.parametrize("fault", ["cut", "stall"])
def test_broken_stream_is_continued_by_the_next_model(
    mode: str,
    fault: str,
    make_engine: EngineFactory,
    policy_dict: PolicyBuilder,
    big: FakeProvider,
    small: FakeProvider,
    exporter: InMemorySpanExporter,
) -> None:
    engine = continuing_engine(make_engine, policy_dict, ["big", "small"], {"small": True})
    if fault == "cut":
        big.set(Behavior(content="Hello, wor", chunks=2, cut_after_chunks=2, inter_chunk_s=0.05))
    else:
        big.set(Behavior(content="Hello, wor", chunks=2, inter_chunk_s=5.0))  # stalls after "Hello"
    small.set(Behavior(content="ld!", chunks=2))

    text, stream = read_all(mode, engine)

    delivered_before = "Hello, wor" if fault == "cut" else "Hello"
    assert text == delivered_before + "ld!"  # the caller sees the first part, then only the continuation
    (request,) = small.requests
    assert request.messages[-1] == {"role": "assistant", "content": delivered_before, "prefix": True}
    summary = stream.llm_resilience
    assert summary["model"] == "small"
    assert summary["joins"] == [{"from": 0, "at_chars": len(delivered_before), "to": 1, "model": "small"}]
    assert [(a["model"], a["outcome"]) for a in summary["attempts"]] == [("big", "failure"), ("small", "success")]
    assert stream.response.choices[0].message.content == delivered_before + "ld!"
    spans = {
        s.attributes["llm_resilience.model"]: s.attributes
        for s in exporter.get_finished_spans()
        if s.name.startswith("chat ")
    }
    assert spans["big"]["llm_resilience.interrupted_after_chars"] == len(delivered_before)
    assert spans["small"]["llm_resilience.continues"] == 0
    assert spans["small"]["llm_resilience.attempt.role"] == "continuation"
    assert spans["small"]["llm_resilience.prefill_chars"] == len(delivered_before)


def test_a_json_stream_is_never_continued_in_conversation_and_the_400_is_never_the_final_error(
    mode: str,
    make_engine: EngineFactory,
    policy_dict: PolicyBuilder,
    big: FakeProvider,
    small: FakeProvider,
    tiny: FakeProvider,
) -> None:
    # small says it can prefill (policy) but rejects it with a 400; tiny cannot: a JSON answer
    # is continued only where the join is exact, so the caller gets the interruption.
    engine = continuing_engine(make_engine, policy_dict, ["big", "small", "tiny"], {"small": True, "tiny": False})
    big.set(Behavior(content='{"a": 1}', chunks=2, cut_after_chunks=1))
    small.set(Behavior(content='{"a": 1}', reject_prefill=True))

    text, stream, error = read_until_error(mode, engine, response_format={"type": "json_object"})

    assert isinstance(error, StreamInterrupted)  # not small's 400
    assert text == error.generated_content == '{"a"'
    assert small.request_count == 1 and tiny.request_count == 0
    attempts = [(a["model"], a["outcome"], a["reason"]) for a in stream.llm_resilience["attempts"]]
    assert attempts == [
        ("big", "failure", "connection"),
        ("small", "failure", "prefill_rejected"),
        ("tiny", "skipped", "no_prefill"),
    ]
    assert engine.breakers.get("small").fail_counter == 0  # a model that cannot prefill is not sick


def test_raise_stays_available_per_route(
    mode: str, make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider, small: FakeProvider
) -> None:
    policy = policy_dict(["big", "small"], prompt_classes=CLASSES)
    policy["routes"]["chat"]["streaming"] = {"on_interrupt": "raise"}
    engine = make_engine(policy)
    big.set(Behavior(content="Hello, wor", chunks=2, cut_after_chunks=2))

    with pytest.raises(StreamInterrupted):
        read_all(mode, engine)
    assert small.request_count == 0
