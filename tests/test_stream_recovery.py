"""A broken stream is finished, for any model: the caller reads the whole answer once.

Each row of the promise, sync and async, through litellm's real HTTP path to the loopback fake
providers. The primary streams a 60-word answer; the fallback (``gpt-4o-mini``: litellm's map says
it takes no assistant prefill) is asked in an ordinary conversation to continue, and answers as a
model would: the rest, the whole answer again, or the last words again and then the rest.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import pytest
from conftest import MESSAGES, EngineFactory, PolicyBuilder
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from llm_resilience import Resilience, StreamInterrupted
from llm_resilience._policy import DEFAULT_CONTINUE_PROMPT
from llm_resilience.testing import Behavior, FakeProvider

WORDS = [f"w{i:02d}" for i in range(60)]
ANSWER = " ".join(WORDS)  # 239 characters; 60 chunks of one word (and its space) each
AFTER_20 = " ".join(WORDS[:20]) + " "
CLASSES = {"default": {"timeout_s": 5.0, "deadline_s": 10.0, "first_token_timeout_s": 4.0, "idle_timeout_s": 0.5}}
INCLUDE_USAGE = {"stream_options": {"include_usage": True}}


def engine_for(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, chain: tuple[str, ...] = ("big", "small"), **route: Any
) -> Resilience:
    policy = policy_dict(list(chain), prompt_classes=CLASSES)
    policy["routes"]["chat"].update(route)  # no streaming section: the built-in default applies
    return make_engine(policy)


def primary(**fault: Any) -> Behavior:
    return Behavior(content=ANSWER, chunks=60, **fault)


def read(mode: str, engine: Resilience, **kwargs: Any) -> tuple[list[Any], Any, BaseException | None]:
    """Every chunk received, the stream, and the error that ended it (if any)."""
    chunks: list[Any] = []
    if mode == "sync":
        stream = engine.completion("chat", MESSAGES, stream=True, **kwargs)
        try:
            for chunk in stream:
                chunks.append(chunk)
        except StreamInterrupted as e:
            return chunks, stream, e
        return chunks, stream, None

    async def run() -> tuple[list[Any], Any, BaseException | None]:
        stream = await engine.acompletion("chat", MESSAGES, stream=True, **kwargs)
        try:
            async for chunk in stream:
                chunks.append(chunk)
        except StreamInterrupted as e:
            return chunks, stream, e
        return chunks, stream, None

    return asyncio.run(run())


def text(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def attempts(stream: Any) -> list[tuple[str, str, str | None]]:
    return [(a["model"], a["outcome"], a["reason"]) for a in stream.llm_resilience["attempts"]]


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# -- the rows --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fallback_answers", ["proper", "restart", "tail"])
def test_a_stream_cut_after_20_words_is_finished_by_the_fallback_and_read_once(
    mode: str,
    fallback_answers: str,
    make_engine: EngineFactory,
    policy_dict: PolicyBuilder,
    big: FakeProvider,
    small: FakeProvider,
    exporter: InMemorySpanExporter,
) -> None:
    engine = engine_for(make_engine, policy_dict)
    big.set(primary(cut_after_chunks=20))
    small.set(Behavior(content=ANSWER, chunks=30, continuation=fallback_answers))  # type: ignore[arg-type]

    chunks, stream, error = read(mode, engine)

    assert error is None
    assert text(chunks) == ANSWER  # all 60 words, each once
    (request,) = small.requests
    assert request.messages == [
        *MESSAGES,
        {"role": "assistant", "content": AFTER_20},
        {"role": "user", "content": DEFAULT_CONTINUE_PROMPT},
    ]
    assert attempts(stream) == [("big", "failure", "connection"), ("small", "success", None)]
    assert stream.llm_resilience["joins"] == [{"from": 0, "at_chars": len(AFTER_20), "to": 1, "model": "small"}]
    assert stream.response.choices[0].message.content == ANSWER  # the validators judged the joined answer
    spans = {
        s.attributes["llm_resilience.model"]: s.attributes
        for s in exporter.get_finished_spans()
        if s.name.startswith("chat ")
    }
    assert spans["big"]["llm_resilience.interrupted_after_chars"] == len(AFTER_20)
    assert spans["small"]["llm_resilience.continuation"] == "conversation"
    if fallback_answers == "restart":
        assert spans["small"]["llm_resilience.join_overlap_chars"] == len(AFTER_20)
    elif fallback_answers == "tail":
        assert spans["small"]["llm_resilience.join_overlap_chars"] == len("w18 w19 ")


def test_a_stream_that_stalls_after_20_words_is_finished_within_the_deadline(
    mode: str, make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider, small: FakeProvider
) -> None:
    engine = engine_for(make_engine, policy_dict)
    big.set(primary(stall_after_chunks=20))
    small.set(Behavior(content=ANSWER, chunks=30, continuation="proper"))

    started = time.monotonic()
    chunks, stream, error = read(mode, engine)

    assert error is None and text(chunks) == ANSWER
    assert time.monotonic() - started < CLASSES["default"]["deadline_s"]
    assert attempts(stream) == [("big", "failure", "timeout"), ("small", "success", None)]
    assert big.wait_idle(2.0) and big.requests[0].disconnected  # the stalled stream was closed


def test_a_fallback_that_rejects_prefill_finishes_the_stream_in_conversation_and_its_400_is_never_seen(
    mode: str, make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider, small: FakeProvider
) -> None:
    policy = policy_dict(["big", "small"], prompt_classes=CLASSES)
    policy["models"]["small"]["assistant_prefill"] = True  # it says so; its API disagrees
    engine = make_engine(policy)
    big.set(primary(cut_after_chunks=20))
    small.set(Behavior(content=ANSWER, chunks=30, continuation="proper", reject_prefill=True))

    chunks, stream, error = read(mode, engine)

    assert error is None and text(chunks) == ANSWER
    first, second = small.requests
    assert first.messages[-1] == {"role": "assistant", "content": AFTER_20, "prefix": True}
    assert second.messages[-1] == {"role": "user", "content": DEFAULT_CONTINUE_PROMPT}
    assert attempts(stream) == [
        ("big", "failure", "connection"),
        ("small", "failure", "prefill_rejected"),
        ("small", "success", None),
    ]
    assert engine.breakers.get("small").fail_counter == 0


def test_the_joined_answers_last_chunk_says_how_it_ended_who_finished_it_and_the_usage_of_both(
    mode: str, make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider, small: FakeProvider
) -> None:
    engine = engine_for(make_engine, policy_dict)
    big.set(primary(cut_after_chunks=20))
    small.set(Behavior(content=ANSWER, chunks=30, continuation="proper", finish_reason="length"))

    chunks, stream, error = read(mode, engine, max_tokens=500, **INCLUDE_USAGE)

    assert error is None
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    usage = [c.usage for c in chunks if getattr(c, "usage", None) is not None][-1]
    (continuation,) = small.requests
    alone = max(1, len(" ".join(WORDS[20:])) // 4)  # the fake's own count for the continuation
    assert usage.completion_tokens > alone  # the broken attempt's 20 words are counted too
    assert usage.prompt_tokens > max(1, sum(len(m["content"]) for m in continuation.messages) // 4)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert chunks[-1].model == "gpt-4o-mini"
    assert stream.response.model == "gpt-4o-mini" and stream.response.choices[0].finish_reason == "length"
    assert stream.response.usage.completion_tokens == usage.completion_tokens


def test_an_empty_continuation_fails_that_attempt_and_the_next_model_tries(
    mode: str,
    make_engine: EngineFactory,
    policy_dict: PolicyBuilder,
    big: FakeProvider,
    small: FakeProvider,
    tiny: FakeProvider,
) -> None:
    engine = engine_for(make_engine, policy_dict, ("big", "small", "tiny"))
    big.set(primary(cut_after_chunks=20))
    small.set(Behavior(body="empty"))
    tiny.set(Behavior(content=ANSWER, chunks=30, continuation="proper"))

    chunks, stream, error = read(mode, engine)

    assert error is None and text(chunks) == ANSWER
    assert attempts(stream) == [
        ("big", "failure", "connection"),
        ("small", "soft_failure", "empty"),
        ("tiny", "success", None),
    ]


def test_a_continuation_cut_again_is_continued_by_the_next_model(
    mode: str,
    make_engine: EngineFactory,
    policy_dict: PolicyBuilder,
    big: FakeProvider,
    small: FakeProvider,
    tiny: FakeProvider,
) -> None:
    engine = engine_for(make_engine, policy_dict, ("big", "small", "tiny"))
    big.set(primary(cut_after_chunks=20))
    small.set(Behavior(content=ANSWER, chunks=40, continuation="proper", cut_after_chunks=10))
    tiny.set(Behavior(content=ANSWER, chunks=30, continuation="restart"))

    chunks, stream, error = read(mode, engine)

    assert error is None and text(chunks) == ANSWER
    assert [j["model"] for j in stream.llm_resilience["joins"]] == ["small", "tiny"]


# -- a one-model route: the model finishes its own stream ----------------------------------------


@pytest.mark.parametrize("fault", ["cut", "stall"])
@pytest.mark.parametrize("answers", ["proper", "restart"])
def test_a_broken_stream_on_a_one_model_route_is_finished_by_the_same_model_and_read_once(
    mode: str,
    fault: str,
    answers: str,
    make_engine: EngineFactory,
    policy_dict: PolicyBuilder,
    big: FakeProvider,
    exporter: InMemorySpanExporter,
) -> None:
    engine = engine_for(make_engine, policy_dict, ("big",))
    big.script(primary(cut_after_chunks=20) if fault == "cut" else primary(stall_after_chunks=20))
    big.set(Behavior(content=ANSWER, chunks=30, continuation=answers))  # type: ignore[arg-type]

    chunks, stream, error = read(mode, engine)

    assert error is None
    assert text(chunks) == ANSWER  # all 60 words, each once
    broken, continuation = big.requests
    assert continuation.messages[: len(MESSAGES)] == MESSAGES
    assert any(m["role"] == "assistant" and m["content"] == AFTER_20 for m in continuation.messages)
    reason = "connection" if fault == "cut" else "timeout"
    assert attempts(stream) == [("big", "failure", reason), ("big", "success", None)]
    assert stream.llm_resilience["joins"] == [{"from": 0, "at_chars": len(AFTER_20), "to": 1, "model": "big"}]
    assert stream.response.choices[0].message.content == ANSWER
    assert big.wait_idle(2.0) and broken.disconnected == (fault == "stall")  # the stalled one was closed
    (call_span,) = [s for s in exporter.get_finished_spans() if s.name.startswith("llm_resilience.completion")]
    assert call_span.name.endswith(" rescued")
    assert "(join)" in str((call_span.attributes or {})["llm_resilience.path"])


def test_a_model_continues_its_own_stream_once_per_call(
    mode: str, make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider
) -> None:
    engine = engine_for(make_engine, policy_dict, ("big",))
    big.script(primary(cut_after_chunks=20))
    big.set(Behavior(content=ANSWER, chunks=40, continuation="proper", cut_after_chunks=10))  # cut again

    chunks, stream, error = read(mode, engine)

    assert isinstance(error, StreamInterrupted)
    assert big.request_count == 2  # the model that broke twice is not asked a third time
    assert ANSWER.startswith(text(chunks)) and len(text(chunks)) > len(AFTER_20)  # read once, in order
    assert error.generated_content == text(chunks)
    assert attempts(stream) == [("big", "failure", "connection"), ("big", "failure", "connection")]


def test_a_model_whose_breaker_opened_on_the_break_does_not_continue_its_stream(
    mode: str, make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider
) -> None:
    policy = policy_dict(["big"], prompt_classes=CLASSES, fail_max=1)
    engine = make_engine(policy)
    big.script(primary(cut_after_chunks=20))
    big.set(Behavior(content=ANSWER, chunks=30, continuation="proper"))

    chunks, stream, error = read(mode, engine)

    assert isinstance(error, StreamInterrupted) and text(chunks) == AFTER_20
    assert big.request_count == 1
    assert attempts(stream) == [("big", "failure", "connection"), ("big", "skipped", "breaker_open")]


def test_when_no_later_model_can_continue_the_model_that_broke_finishes_its_stream(
    mode: str, make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider, small: FakeProvider
) -> None:
    engine = engine_for(make_engine, policy_dict)
    big.script(primary(cut_after_chunks=20))
    big.set(Behavior(content=ANSWER, chunks=30, continuation="proper"))
    small.set(Behavior.error(503))

    chunks, stream, error = read(mode, engine)

    assert error is None and text(chunks) == ANSWER
    assert attempts(stream) == [
        ("big", "failure", "connection"),
        ("small", "failure", "server_error"),
        ("big", "success", None),
    ]
    assert stream.llm_resilience["joins"] == [{"from": 0, "at_chars": len(AFTER_20), "to": 2, "model": "big"}]


# -- tool calls and JSON ----------------------------------------------------------------------------

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
CALL = {"name": "get_weather", "arguments": {"city": "Paris, the one in France"}}


def tool_calls(chunks: list[Any]) -> list[tuple[str, str]]:
    """(name, arguments) per call, as a caller accumulates deltas."""
    calls: dict[int, list[str]] = {}
    for chunk in chunks:
        for call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            entry = calls.setdefault(call.index, ["", ""])
            entry[0] += call.function.name or ""
            entry[1] += call.function.arguments or ""
    return [(name, args) for name, args in calls.values()]


def test_a_tool_call_cut_before_it_is_complete_restarts_on_the_next_model_unseen(
    mode: str, make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider, small: FakeProvider
) -> None:
    engine = engine_for(make_engine, policy_dict)
    big.set(Behavior(tool_calls=[CALL], chunks=6, cut_after_chunks=4))
    small.set(Behavior(tool_calls=[CALL], chunks=6))

    chunks, stream, error = read(mode, engine, tools=TOOLS)

    assert error is None
    assert tool_calls(chunks) == [("get_weather", json.dumps(CALL["arguments"]))]  # one whole call, once
    assert {c.model for c in chunks} == {"gpt-4o-mini"}  # nothing of big's partial call reached the caller
    assert attempts(stream) == [("big", "failure", "connection"), ("small", "success", None)]
    assert "joins" not in stream.llm_resilience


def test_tool_call_arguments_that_do_not_match_the_schema_fall_back_unseen(
    mode: str, make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider, small: FakeProvider
) -> None:
    engine = engine_for(make_engine, policy_dict)
    big.set(Behavior(tool_calls=[{"name": "get_weather", "arguments": {"town": "Paris"}}], chunks=3))
    small.set(Behavior(tool_calls=[CALL], chunks=3))

    chunks, stream, error = read(mode, engine, tools=TOOLS)

    assert error is None and tool_calls(chunks) == [("get_weather", json.dumps(CALL["arguments"]))]
    assert attempts(stream) == [("big", "soft_failure", "invalid_json"), ("small", "success", None)]


def test_text_before_a_tool_call_is_continued_and_the_tool_call_arrives_whole(
    mode: str, make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider, small: FakeProvider
) -> None:
    engine = engine_for(make_engine, policy_dict)
    big.set(Behavior(content="Let me look that up for you.", text_before_tools="Let me look", tool_calls=[CALL],
                     chunks=3, cut_after_chunks=2))  # fmt: skip
    small.set(Behavior(text_before_tools=" that up for you.", tool_calls=[CALL], chunks=2))

    chunks, stream, error = read(mode, engine, tools=TOOLS)

    assert error is None
    assert text(chunks).startswith("Let me") and text(chunks).endswith("that up for you.")
    assert tool_calls(chunks) == [("get_weather", json.dumps(CALL["arguments"]))]
    assert stream.llm_resilience["joins"][0]["model"] == "small"


@pytest.mark.parametrize("fallback_prefill", [True, False])
def test_a_json_stream_is_continued_only_where_the_join_is_exact(
    mode: str,
    fallback_prefill: bool,
    make_engine: EngineFactory,
    policy_dict: PolicyBuilder,
    big: FakeProvider,
    small: FakeProvider,
) -> None:
    document = json.dumps({"items": WORDS})
    policy = policy_dict(["big", "small"], prompt_classes=CLASSES)
    policy["models"]["small"]["assistant_prefill"] = fallback_prefill
    engine = make_engine(policy)
    big.set(Behavior(content=document, chunks=30, cut_after_chunks=10))
    small.set(Behavior(content=document, chunks=30, continuation="proper"))

    chunks, stream, error = read(mode, engine, response_format={"type": "json_object"})

    if fallback_prefill:
        assert error is None and json.loads(text(chunks)) == {"items": WORDS}
        assert small.requests[0].messages[-1]["prefix"] is True
    else:
        assert isinstance(error, StreamInterrupted)  # never two JSON documents glued together
        assert small.request_count == 0
        assert attempts(stream) == [("big", "failure", "connection"), ("small", "skipped", "no_prefill")]


# -- an abandoned sync stream is closed at once -----------------------------------------------------


def test_a_silent_first_model_abandoned_at_its_first_token_timeout_is_disconnected_at_once(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider, small: FakeProvider
) -> None:
    # (2 s: above a first stream's lazy imports on a loaded machine; far below the 10 s attempt timeout)
    classes = {"default": {"timeout_s": 10.0, "deadline_s": 30.0, "first_token_timeout_s": 2.0}}
    engine = make_engine(policy_dict(["big", "small"], prompt_classes=classes))
    big.set(Behavior(body="hang"))  # no response headers, ever
    earlier = set(_stream_threads())  # an earlier test's may still be winding down

    with engine.completion("chat", MESSAGES, stream=True) as stream:
        assert text(list(stream)) == small.requests[0].behavior.content

    # The provider sees the disconnect now, not at the attempt's 10 s timeout, and the attempt's
    # helper thread ends with it.
    assert big.wait_idle(2.0) and big.requests[0].disconnected
    ends_by = time.monotonic() + 2.0
    while (mine := set(_stream_threads()) - earlier) and time.monotonic() < ends_by:
        time.sleep(0.02)
    assert not mine


def _stream_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "llm-resilience-stream" and t.is_alive()]


def test_a_keyboard_interrupt_while_waiting_closes_the_silent_request_at_once(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider
) -> None:
    import signal

    classes = {"default": {"timeout_s": 10.0, "deadline_s": 30.0, "first_token_timeout_s": 5.0}}
    engine = make_engine(policy_dict(["big"], prompt_classes=classes))
    big.set(Behavior(body="hang"))

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        with pytest.raises(KeyboardInterrupt):
            engine.completion("chat", MESSAGES, stream=True)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)

    assert big.wait_idle(2.0) and big.requests[0].disconnected


# -- a malformed event mid-stream ---------------------------------------------------------------------


def test_one_malformed_event_mid_stream_is_skipped_in_place_and_the_stream_goes_on(
    mode: str,
    make_engine: EngineFactory,
    policy_dict: PolicyBuilder,
    big: FakeProvider,
    small: FakeProvider,
    exporter: InMemorySpanExporter,
) -> None:
    engine = engine_for(make_engine, policy_dict)
    big.set(primary(malformed_after_chunks=20))

    chunks, stream, error = read(mode, engine)

    assert error is None and text(chunks) == ANSWER
    assert small.request_count == 0 and big.request_count == 1  # the same stream went on
    assert attempts(stream) == [("big", "success", None)]
    (span,) = [s for s in exporter.get_finished_spans() if s.name.startswith("chat ")]
    assert [e.name for e in span.events] == ["llm_resilience.stream.event_skipped"]
    assert span.attributes is not None and span.attributes["llm_resilience.skipped_events"] == 1
