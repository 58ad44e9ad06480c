"""Streaming through the chain: fall back until the first token, then commit (real litellm HTTP path).

Chunk content from the fake providers: ``big`` answers "BIG ANSWER", ``small`` "SMALL ANSWER"
(in 3 content chunks plus a finish chunk), so any mixing of models shows in the text, and every
chunk says which wire model produced it (``chunk.model``).
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import pytest
from conftest import (
    MESSAGES,
    WIRE_MODELS,
    EngineFactory,
    PolicyBuilder,
    model_entry,
    wait_until_async,
)
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import llm_resilience
from llm_resilience import AllAttemptsFailed, Resilience, StreamInterrupted
from llm_resilience._env import litellm
from llm_resilience.testing import Behavior, FakeProvider

BIG = "BIG ANSWER"
SMALL = "SMALL ANSWER"
FIRST_TOKEN_S = 0.3
IDLE_S = 0.3
SLOW_S = 3.0  # far beyond every timeout here: a test that waited for it would be obvious


# -- helpers -------------------------------------------------------------------------------------


def stream_class(first_token_s: float = FIRST_TOKEN_S, idle_s: float = IDLE_S) -> dict[str, Any]:
    return {
        "default": {
            "timeout_s": max(2.0, first_token_s, idle_s),  # the policy rejects a first token beyond the attempt
            "deadline_s": 8.0,
            "first_token_timeout_s": first_token_s,
            "idle_timeout_s": idle_s,
        }
    }


@pytest.fixture(scope="module", autouse=True)
def _warm_litellm() -> Iterator[None]:
    # litellm's first stream in a process (sync and async each) spends ~0.6 s importing lazily:
    # longer than the first-token timeouts below. Pay it once, outside the tests, on a provider of
    # its own: the shared ones may be left failing or slow by whatever test ran before this module.
    provider = FakeProvider().start()
    try:
        policy = {
            "models": {name: model_entry(name, provider.base_url) for name in WIRE_MODELS},
            "routes": {"chat": {"chain": list(WIRE_MODELS)}},
            "prompt_classes": {"default": {"timeout_s": 10.0, "deadline_s": 30.0}},
        }
        engine = Resilience(llm_resilience.Policy.from_dict(policy))
        for name in WIRE_MODELS:
            list(engine.completion(name, MESSAGES, stream=True))

            async def consume(model: str) -> None:
                async for _ in await engine.acompletion(model, MESSAGES, stream=True):
                    pass

            asyncio.run(consume(name))
        provider.wait_idle(2.0)
        yield
    finally:
        provider.stop()


@pytest.fixture
def providers(big: FakeProvider, small: FakeProvider) -> tuple[FakeProvider, FakeProvider]:
    big.set(Behavior.ok(BIG))
    small.set(Behavior.ok(SMALL))
    return big, small


@pytest.fixture
def engine(make_engine: EngineFactory, policy_dict: PolicyBuilder, providers: Any) -> Resilience:
    """Route ``chat`` = big -> small, first-token and idle timeouts 0.3 s, breaker fail_max 3."""
    return make_engine(policy_dict(["big", "small"], prompt_classes=stream_class()))


def collect_sync(engine: Resilience, **kwargs: Any) -> tuple[list[Any], Any]:
    stream = engine.completion("chat", MESSAGES, stream=True, **kwargs)
    return list(stream), stream


def collect_async(engine: Resilience, **kwargs: Any) -> tuple[list[Any], Any]:
    async def run() -> tuple[list[Any], Any]:
        stream = await engine.acompletion("chat", MESSAGES, stream=True, **kwargs)
        return [chunk async for chunk in stream], stream

    return asyncio.run(run())


Collect = Callable[..., tuple[list[Any], Any]]


@pytest.fixture(params=["sync", "async"])
def collect(request: pytest.FixtureRequest) -> Collect:
    """``collect(engine) -> (chunks, stream)``: a whole stream through ``completion`` or ``acompletion``."""
    return collect_sync if request.param == "sync" else collect_async


def collect_until_interrupted(mode: str, engine: Resilience) -> tuple[list[Any], StreamInterrupted, Any]:
    """Iterate until ``StreamInterrupted``; returns the chunks received before it, the error, the stream."""
    received: list[Any] = []
    if mode == "sync":
        stream = engine.completion("chat", MESSAGES, stream=True)
        with pytest.raises(StreamInterrupted) as info:
            for chunk in stream:
                received.append(chunk)
        return received, info.value, stream

    async def run() -> tuple[StreamInterrupted, Any]:
        stream = await engine.acompletion("chat", MESSAGES, stream=True)
        with pytest.raises(StreamInterrupted) as info:
            async for chunk in stream:
                received.append(chunk)
        return info.value, stream

    error, stream = asyncio.run(run())
    return received, error, stream


def text(chunks: Sequence[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def attempts(stream: Any) -> list[tuple[str, str | None, str | None]]:
    return [(a["model"], a["outcome"], a["reason"]) for a in stream.llm_resilience["attempts"]]


def attempt_spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name.startswith("chat ")]


def call_spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name.startswith("llm_resilience.completion")]


def attrs(span: ReadableSpan) -> Mapping[str, Any]:
    return span.attributes or {}


# -- normal streams ------------------------------------------------------------------------------


def test_stream_yields_litellm_chunks_that_rebuild_the_answer(
    collect: Collect, engine: Resilience, big: FakeProvider, small: FakeProvider
) -> None:
    chunks, stream = collect(engine)

    assert all(isinstance(c, litellm.ModelResponseStream) for c in chunks)
    rebuilt = litellm.stream_chunk_builder(chunks)
    assert rebuilt.choices[0].message.content == BIG
    assert rebuilt.choices[0].finish_reason == "stop"
    assert stream.response.choices[0].message.content == BIG  # what validators saw
    assert attempts(stream) == [("big", "success", None)]
    assert big.requests[0].stream and small.request_count == 0


def test_stream_kwarg_reaches_the_provider_and_tool_calls_stream_too(
    engine: Resilience, big: FakeProvider, small: FakeProvider
) -> None:
    big.set(Behavior(tool_calls=[{"name": "lookup", "arguments": {"q": "otters"}}], latency_s=0.0))

    chunks, stream = collect_sync(engine)

    rebuilt = litellm.stream_chunk_builder(chunks)
    assert rebuilt.choices[0].message.tool_calls[0].function.name == "lookup"
    assert attempts(stream) == [("big", "success", None)]
    assert small.request_count == 0  # a tool-call delta is content: the first-token timer stopped there


# -- before the first token: transparent fallback ------------------------------------------------


@pytest.mark.parametrize(
    "stall",
    [
        pytest.param(Behavior.slow(SLOW_S, BIG), id="no-headers"),
        # A role-only chunk at once, then nothing: the first *content* chunk is what counts.
        pytest.param(Behavior(body="empty", cut_after_chunks=1, inter_chunk_s=SLOW_S), id="role-chunk-then-stall"),
    ],
)
def test_first_token_timeout_falls_back_and_the_caller_sees_only_the_fallbacks_chunks(
    collect: Collect, engine: Resilience, big: FakeProvider, small: FakeProvider, stall: Behavior
) -> None:
    big.set(stall)

    started = time.monotonic()
    chunks, stream = collect(engine)
    elapsed = time.monotonic() - started

    assert elapsed < SLOW_S / 2  # abandoned at the first-token timeout, not at the provider's pace
    assert text(chunks) == SMALL
    assert {c.model for c in chunks} == {WIRE_MODELS["small"]}  # no chunk of big's, not even its role chunk
    assert [c.choices[0].delta.role for c in chunks].count("assistant") == 1
    assert len(chunks) == len(small_stream_chunks(small))
    assert attempts(stream) == [("big", "failure", "timeout"), ("small", "success", None)]
    # The abandoned request's connection was closed (not left to run to the provider's end).
    assert big.wait_idle(SLOW_S / 2)
    assert big.requests[0].disconnected


def small_stream_chunks(small: FakeProvider) -> list[Any]:
    """What litellm yields for small's answer when streamed directly: the reference chunk sequence."""
    return list(
        litellm.completion(
            model=f"openai/{WIRE_MODELS['small']}",
            api_base=small.base_url,
            api_key="sk-test",
            messages=MESSAGES,
            stream=True,
            num_retries=0,
            max_retries=0,
        )
    )


@pytest.mark.parametrize(
    ("failure", "reason"),
    [
        (Behavior.error(503), "server_error"),
        (Behavior(body="reset"), "connection"),
        (Behavior(cut_after_chunks=0), "connection"),  # headers, then the connection drops
        (Behavior(body="malformed"), "server_error"),  # a bad first event is never skipped: nothing lost
    ],
    ids=["503", "reset", "cut-before-content", "malformed-first-event"],
)
def test_stream_failing_before_content_falls_back(
    collect: Collect, engine: Resilience, big: FakeProvider, failure: Behavior, reason: str
) -> None:
    big.set(failure)

    chunks, stream = collect(engine)

    assert text(chunks) == SMALL
    assert {c.model for c in chunks} == {WIRE_MODELS["small"]}
    assert attempts(stream) == [("big", "failure", reason), ("small", "success", None)]


def test_every_model_failing_before_content_raises_all_attempts_failed_at_call_time(
    engine: Resilience, big: FakeProvider, small: FakeProvider
) -> None:
    big.set(Behavior.error(503))
    small.set(Behavior.slow(SLOW_S))

    with pytest.raises(AllAttemptsFailed) as info:
        engine.completion("chat", MESSAGES, stream=True)  # like litellm: a stream that cannot open raises here

    assert [(a.model, a.outcome, a.reason) for a in info.value.attempts] == [
        ("big", "failure", "server_error"),
        ("small", "failure", "timeout"),
    ]
    assert type(info.value.__cause__).__name__ == "FirstTokenTimeout"


def test_empty_stream_is_delivered_whole_when_the_empty_validator_is_off(
    collect: Collect, make_engine: EngineFactory, policy_dict: PolicyBuilder, providers: Any
) -> None:
    big, small = providers
    route = {"chain": ["big", "small"], "validators": {"empty": "off"}}
    engine = make_engine(policy_dict(prompt_classes=stream_class(), routes={"chat": route}))
    big.set(Behavior(body="empty"))

    chunks, stream = collect(engine)

    assert text(chunks) == ""
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert {c.model for c in chunks} == {WIRE_MODELS["big"]}
    assert attempts(stream) == [("big", "success", None)]
    assert small.request_count == 0


def test_empty_stream_failing_validation_falls_back_invisibly(
    collect: Collect, engine: Resilience, big: FakeProvider, small: FakeProvider
) -> None:
    # The stream ended before any content reached the caller, so the empty check may still fall back.
    big.set(Behavior(body="empty"))

    chunks, stream = collect(engine)

    assert text(chunks) == SMALL
    assert {c.model for c in chunks} == {WIRE_MODELS["small"]}
    assert attempts(stream) == [("big", "soft_failure", "empty"), ("small", "success", None)]


def test_retry_backoff_before_the_first_token_retries_the_same_model(
    collect: Collect, make_engine: EngineFactory, policy_dict: PolicyBuilder, providers: Any
) -> None:
    big, small = providers
    route = {"chain": ["big", "small"], "retries": {"max_retries": 1, "backoff_base_s": 0.05, "backoff_max_s": 0.1}}
    engine = make_engine(policy_dict(prompt_classes=stream_class(), routes={"chat": route}))
    big.script(Behavior.error(503))  # the next request only; the retry gets the normal answer

    chunks, stream = collect(engine)

    assert text(chunks) == BIG
    assert attempts(stream) == [("big", "failure", "server_error"), ("big", "success", None)]
    assert stream.llm_resilience["attempts"][1]["retry_of"] == 0
    assert small.request_count == 0


# -- after the first token: committed ------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_idle_timeout_mid_stream_raises_stream_interrupted(
    mode: str, make_engine: EngineFactory, policy_dict: PolicyBuilder, providers: Any, exporter: InMemorySpanExporter
) -> None:
    big, small = providers
    # First-token timeout far above the idle timeout: the connection must be closed at the idle
    # timeout itself, not when litellm's per-read backstop (above both) would fire.
    raising = {"streaming": {"on_interrupt": "raise"}}
    policy = policy_dict(["big", "small"], fail_max=1, prompt_classes=stream_class(SLOW_S, IDLE_S))
    policy["routes"]["chat"].update(raising)
    engine = make_engine(policy)
    big.set(Behavior(content="abcdefgh", chunks=4, inter_chunk_s=SLOW_S * 2))

    started = time.monotonic()
    received, error, stream = collect_until_interrupted(mode, engine)

    assert time.monotonic() - started < SLOW_S
    assert text(received) == "ab"
    assert (error.chunks_delivered, error.chars_delivered, error.generated_content) == (1, 2, "ab")
    assert "idle timeout" in str(error)
    assert isinstance(error, litellm.exceptions.MidStreamFallbackError)  # litellm-compatible
    assert small.request_count == 0  # never replaced by another model
    assert attempts(stream) == [("big", "failure", "timeout")]
    assert engine.breaker_states()["big"] == "open"  # a stream failure counts like any other
    assert big.wait_idle(SLOW_S / 2)
    assert big.requests[0].disconnected
    (span,) = attempt_spans(exporter)
    assert attrs(span)["llm_resilience.outcome"] == "failure"
    assert attrs(span)["llm_resilience.reason"] == "timeout"
    assert attrs(span)["error.type"] == "StreamInterrupted"
    assert attrs(span)["llm_resilience.stream.chunks"] == 1
    (parent,) = call_spans(exporter)
    assert attrs(parent)["error.type"] == "StreamInterrupted"


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_cut_mid_stream_raises_with_delivered_content_intact(
    mode: str, make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider, small: FakeProvider
) -> None:
    policy = policy_dict()
    policy["routes"]["chat"]["streaming"] = {"on_interrupt": "raise"}
    engine = make_engine(policy)
    big.set(Behavior(content="abcdefgh", chunks=4, cut_after_chunks=2))

    received, error, stream = collect_until_interrupted(mode, engine)

    assert text(received) == "abcd"
    assert {c.model for c in received} == {WIRE_MODELS["big"]}
    assert (error.chunks_delivered, error.generated_content) == (2, "abcd")
    assert small.request_count == 0
    assert attempts(stream) == [("big", "failure", "connection")]
    # The stream is over: nothing is ever appended after the error.
    if mode == "sync":
        assert list(stream) == []
    else:
        with pytest.raises(StopAsyncIteration):
            asyncio.run(stream.__anext__())


JSON_REQUEST = {"response_format": {"type": "json_object"}}


def test_validator_failing_a_committed_stream_flags_it_and_does_not_replay_another_model(
    collect: Collect, engine: Resilience, big: FakeProvider, small: FakeProvider
) -> None:
    small.set(Behavior.json({"ok": True}))  # a valid answer was available: still not used

    chunks, stream = collect(engine, **JSON_REQUEST)  # big's "BIG ANSWER" is not JSON

    assert text(chunks) == BIG  # the caller already had the text: neither cut nor followed by more
    assert attempts(stream) == [("big", "flagged", "invalid_json")]
    assert stream.llm_resilience["flagged"] is True
    assert small.request_count == 0


def test_the_same_validation_failure_without_streaming_falls_back(engine: Resilience, small: FakeProvider) -> None:
    # The contrast with the test above: only a committed stream turns fall_back into a flag.
    small.set(Behavior.json({"ok": True}))

    response = engine.completion("chat", MESSAGES, **JSON_REQUEST)

    attempts_made = response._hidden_params["llm_resilience"]["attempts"]
    assert [(a["model"], a["outcome"], a["reason"]) for a in attempts_made] == [
        ("big", "soft_failure", "invalid_json"),
        ("small", "success", None),
    ]


def test_validator_failure_of_a_committed_stream_still_counts_toward_the_breaker(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, providers: Any
) -> None:
    breakers = {"default": {"fail_max": 1, "reset_timeout_s": 30, "count": ["invalid_json", "timeout"]}}
    engine = make_engine(policy_dict(["big", "small"], prompt_classes=stream_class(), breakers=breakers))

    collect_sync(engine, **JSON_REQUEST)

    assert engine.breaker_states()["big"] == "open"


# -- breakers -------------------------------------------------------------------------------------


def test_first_token_timeouts_open_the_breaker_then_the_model_is_skipped_without_a_request(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, providers: Any
) -> None:
    big, _ = providers
    engine = make_engine(policy_dict(["big", "small"], fail_max=2, prompt_classes=stream_class()))
    big.set(Behavior.slow(SLOW_S, BIG))

    for _ in range(2):
        chunks, _stream = collect_sync(engine)
        assert text(chunks) == SMALL
    assert engine.breaker_states()["big"] == "open"
    big.wait_idle(SLOW_S)
    sent_to_big = big.request_count

    chunks, stream = collect_async(engine)

    assert text(chunks) == SMALL
    assert attempts(stream) == [("big", "skipped", "breaker_open"), ("small", "success", None)]
    assert big.request_count == sent_to_big == 2


def test_stream_through_a_route_whose_first_model_has_an_open_breaker(
    collect: Collect, make_engine: EngineFactory, policy_dict: PolicyBuilder, providers: Any
) -> None:
    big, _ = providers
    engine = make_engine(policy_dict(["big", "small"], fail_max=2, prompt_classes=stream_class()))
    big.set(Behavior.error(503))
    for _ in range(2):  # non-stream calls open the breaker: streams share it
        engine.completion("chat", MESSAGES)
    assert engine.breaker_states()["big"] == "open"

    chunks, stream = collect(engine)

    assert text(chunks) == SMALL
    assert attempts(stream) == [("big", "skipped", "breaker_open"), ("small", "success", None)]
    assert big.request_count == 2


# -- spans ----------------------------------------------------------------------------------------


def test_stream_attempt_span_stays_open_until_the_stream_ends_and_records_first_chunk_and_count(
    engine: Resilience, big: FakeProvider, exporter: InMemorySpanExporter
) -> None:
    big.set(Behavior(content=BIG, chunks=3, inter_chunk_s=0.05))

    stream = engine.completion("chat", MESSAGES, stream=True)
    first = next(stream)
    assert first.choices[0].delta.content
    assert attempt_spans(exporter) == [] and call_spans(exporter) == []  # still streaming
    rest = list(stream)
    ended_at_ns = time.time_ns()

    (span,) = attempt_spans(exporter)
    a = attrs(span)
    assert a["llm_resilience.outcome"] == "success"
    assert span.end_time is not None and span.start_time is not None
    duration_s = (span.end_time - span.start_time) / 1e9
    assert 0 < a["gen_ai.response.time_to_first_chunk"] < duration_s
    assert a["llm_resilience.stream.chunks"] == 1 + len(rest) == 4
    assert a["gen_ai.response.finish_reasons"] == ("stop",)
    assert span.end_time <= ended_at_ns
    assert duration_s >= 2 * 0.05  # it covers the whole stream, not just its opening
    (parent,) = call_spans(exporter)
    assert attrs(parent)["llm_resilience.answered_by"] == "big"
    assert attrs(parent)["llm_resilience.delivery"] == "stream"


def test_abandoned_stream_attempt_span_records_the_first_token_timeout(
    engine: Resilience, big: FakeProvider, exporter: InMemorySpanExporter
) -> None:
    big.set(Behavior.slow(SLOW_S))

    collect_sync(engine)

    big_span, small_span = attempt_spans(exporter)
    assert attrs(big_span)["llm_resilience.model"] == "big"
    assert attrs(big_span)["llm_resilience.reason"] == "timeout"
    assert attrs(big_span)["error.type"] == "FirstTokenTimeout"
    assert "gen_ai.response.time_to_first_chunk" not in attrs(big_span)
    assert attrs(small_span)["llm_resilience.outcome"] == "success"
    assert attrs(small_span)["gen_ai.response.time_to_first_chunk"] > 0


# -- the caller stops early -----------------------------------------------------------------------


SLOW_STREAM = Behavior(content="abcdefghij", chunks=5, inter_chunk_s=1.0)


def _assert_cancelled(
    engine: Resilience, big: FakeProvider, small: FakeProvider, exporter: InMemorySpanExporter
) -> None:
    assert big.wait_idle(2.0)  # the server noticed well before its 4 s of remaining chunks
    assert big.requests[0].disconnected
    (span,) = attempt_spans(exporter)
    assert attrs(span)["llm_resilience.outcome"] == "cancelled"
    (parent,) = call_spans(exporter)
    assert attrs(parent)["llm_resilience.answered_by"] == "big"
    assert parent.status.is_ok
    assert engine.breaker_states()["big"] == "closed"  # the caller's choice is not the model's failure
    assert small.request_count == 0


def _iterate_then_break(engine: Resilience) -> list[Any]:
    received = []
    for chunk in engine.completion("chat", MESSAGES, stream=True):
        received.append(chunk)
        break  # the stream object is a temporary: dropping it closes it
    return received


def _close_explicitly(engine: Resilience) -> list[Any]:
    stream = engine.completion("chat", MESSAGES, stream=True)
    received = [next(stream)]
    stream.close()
    return received


def _leave_with_block(engine: Resilience) -> list[Any]:
    with engine.completion("chat", MESSAGES, stream=True) as stream:
        return [next(stream)]


def _drop_reference(engine: Resilience) -> list[Any]:
    stream = engine.completion("chat", MESSAGES, stream=True)
    received = [next(stream)]
    del stream
    gc.collect()
    return received


@pytest.mark.parametrize("stop", [_iterate_then_break, _close_explicitly, _leave_with_block, _drop_reference])
def test_caller_stopping_a_sync_stream_closes_the_connection_and_ends_the_spans(
    stop: Callable[[Resilience], list[Any]],
    engine: Resilience,
    big: FakeProvider,
    small: FakeProvider,
    exporter: InMemorySpanExporter,
) -> None:
    big.set(SLOW_STREAM)

    received = stop(engine)

    assert text(received) == "ab"
    _assert_cancelled(engine, big, small, exporter)


async def _aclose(engine: Resilience) -> None:
    stream = await engine.acompletion("chat", MESSAGES, stream=True)
    await stream.__anext__()
    await stream.aclose()


async def _leave_async_with(engine: Resilience) -> None:
    async with await engine.acompletion("chat", MESSAGES, stream=True) as stream:
        await stream.__anext__()


async def _cancel_the_task(engine: Resilience) -> None:
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in await engine.acompletion("chat", MESSAGES, stream=True):
            first.set()

    task = asyncio.create_task(consume())
    await first.wait()
    await asyncio.sleep(0.1)  # now blocked waiting for the next chunk
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.parametrize("stop", [_aclose, _leave_async_with, _cancel_the_task])
def test_caller_stopping_an_async_stream_closes_the_connection_and_ends_the_spans(
    stop: Callable[[Resilience], Any],
    engine: Resilience,
    big: FakeProvider,
    small: FakeProvider,
    exporter: InMemorySpanExporter,
) -> None:
    big.set(SLOW_STREAM)

    asyncio.run(stop(engine))

    _assert_cancelled(engine, big, small, exporter)


def test_cancelling_the_task_before_the_first_token_closes_the_request_and_ends_the_spans(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, providers: Any, exporter: InMemorySpanExporter
) -> None:
    big, small = providers
    engine = make_engine(policy_dict(["big", "small"], prompt_classes=stream_class(SLOW_S * 2, IDLE_S)))
    big.set(Behavior.slow(SLOW_S, BIG))

    async def run() -> None:
        task = asyncio.create_task(engine.acompletion("chat", MESSAGES, stream=True))
        assert await wait_until_async(lambda: big.request_count == 1)  # sent: waiting for big's first token
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())

    assert big.wait_idle(SLOW_S / 2)
    assert big.requests[0].disconnected
    (span,) = attempt_spans(exporter)
    assert attrs(span)["llm_resilience.outcome"] == "cancelled"
    (parent,) = call_spans(exporter)
    assert "llm_resilience.answered_by" not in attrs(parent)
    assert small.request_count == 0


def test_dropped_async_stream_is_closed_by_the_loop(
    engine: Resilience, big: FakeProvider, small: FakeProvider, exporter: InMemorySpanExporter
) -> None:
    big.set(SLOW_STREAM)

    async def run() -> bool:
        stream = await engine.acompletion("chat", MESSAGES, stream=True)
        await stream.__anext__()
        del stream
        gc.collect()
        # The close is scheduled on this loop: it happens while the loop runs, not at its shutdown.
        return await big.wait_idle_async(2.0)

    assert asyncio.run(run())

    _assert_cancelled(engine, big, small, exporter)


def test_many_abandoned_async_streams_leave_no_connection_open_while_the_loop_runs(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, providers: Any
) -> None:
    # The loop's client lives as long as the loop (keep-alive between calls); what must not live on
    # is the connection of a stream the caller stopped reading: its unread body makes it unusable,
    # and the provider would keep generating (and billing) into it.
    big, _small = providers
    engine = make_engine(policy_dict(["big"], prompt_classes=stream_class(5.0, 5.0)))
    words = " ".join(f"w{i}" for i in range(200))
    big.set(Behavior(content=words, chunks=200, inter_chunk_s=0.05))  # 10 s per stream, read to the end

    kept: list[Any] = []  # streams closed or cancelled but still referenced: only the close may free them

    async def abandon(how: str) -> None:
        stream = await engine.acompletion("chat", MESSAGES, stream=True)
        if how == "aclose":
            await stream.__anext__()
            await stream.aclose()
            kept.append(stream)
        elif how == "drop":
            await stream.__anext__()
            del stream
        elif how == "break":
            async for _ in stream:
                break
        else:

            async def read() -> None:
                async for _ in stream:
                    pass

            task = asyncio.create_task(read())
            await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            kept.append(stream)

    # Idle keep-alive connections of earlier tests' clients (in this process) may be open already.
    before = big.open_connections

    async def run() -> tuple[int, int]:
        for _ in range(20):
            for how in ("aclose", "drop", "break", "cancel"):
                await abandon(how)
        gc.collect()
        settled = lambda: big.open_connections <= before + 1 and big.disconnects == 80  # noqa: E731
        await wait_until_async(settled, timeout=10.0)
        return big.open_connections, big.disconnects  # the loop still runs: its client is not closed yet

    still_open, disconnects = asyncio.run(run())

    assert big.request_count == 80
    assert still_open <= before + 1  # at most one more idle keep-alive connection, not one per abandoned stream
    assert disconnects == 80


def test_sync_streams_leave_no_reader_thread_behind(engine: Resilience, big: FakeProvider) -> None:
    def readers() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "llm-resilience-stream"]

    before = set(readers())
    collect_sync(engine)  # read to the end
    big.set(SLOW_STREAM)
    _close_explicitly(engine)  # closed while the reader waits for the next request
    big.set(Behavior(body="empty", cut_after_chunks=1, inter_chunk_s=SLOW_S))
    collect_sync(engine)  # abandoned in the middle of a read (first-token timeout)

    for thread in set(readers()) - before:
        thread.join(timeout=2.0)
        assert not thread.is_alive()


# -- streams and the module-level API -------------------------------------------------------------


def test_module_level_completion_streams(
    policy_dict: PolicyBuilder, providers: Any, exporter: InMemorySpanExporter, make_engine: EngineFactory
) -> None:
    llm_resilience.set_default_engine(make_engine(policy_dict(["big", "small"], prompt_classes=stream_class())))

    chunks = list(llm_resilience.completion(model="chat", messages=MESSAGES, stream=True))

    assert text(chunks) == BIG


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_callers_own_timeout_caps_a_committed_stream(
    mode: str, make_engine: EngineFactory, policy_dict: PolicyBuilder, providers: Any
) -> None:
    """Issue 12 item 3: ``timeout=0.5`` held for plain calls, but streams ran 1.52 s."""
    big, small = providers
    # Every gap (0.2 s) is well within the idle timeout: only the caller's bound can stop it.
    engine = make_engine(policy_dict(["big", "small"], prompt_classes=stream_class(2.0, 2.0)))
    big.set(Behavior(content="abcdefghijkl", chunks=12, inter_chunk_s=0.2))
    engine.completion("chat", MESSAGES)  # not the first request of this engine: no lazy imports inside the bound

    started = time.monotonic()
    received: list[Any] = []
    if mode == "sync":
        with pytest.raises(StreamInterrupted) as info:
            for chunk in engine.completion("chat", MESSAGES, stream=True, timeout=0.5):
                received.append(chunk)
    else:

        async def run() -> None:
            async for chunk in await engine.acompletion("chat", MESSAGES, stream=True, timeout=0.5):
                received.append(chunk)

        with pytest.raises(StreamInterrupted) as info:
            asyncio.run(run())
    elapsed = time.monotonic() - started

    assert elapsed < 0.5 + 1.0, elapsed  # the whole stream ended near the caller's bound, not after 12 x 0.2 s
    assert 0 < len(text(received)) < 12
    assert "timeout (0.5 s) elapsed" in str(info.value)
    assert small.request_count == 0
    assert engine.breakers.get("big").fail_counter == 0  # the caller chose the bound: not the provider's fault
    assert big.wait_idle(2.0)
    assert big.requests[-1].disconnected
