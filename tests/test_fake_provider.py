"""The fake provider driven through litellm's real HTTP path (no mocking)."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"

import httpx
import litellm
import pytest
from litellm.exceptions import (
    AuthenticationError,
    ContextWindowExceededError,
    InternalServerError,
    MidStreamFallbackError,
    RateLimitError,
    ServiceUnavailableError,
    Timeout,
)

from llm_resilience.testing import Behavior, FakeProvider

litellm.suppress_debug_info = True

MESSAGES = [{"role": "user", "content": "Say hello to the fake provider please."}]  # 38 chars


@pytest.fixture
def provider() -> Iterator[FakeProvider]:
    with FakeProvider() as p:
        yield p


def complete(p: FakeProvider, *, model: str = "fake-model", timeout: float = 5.0, **kwargs: Any) -> Any:
    return litellm.completion(
        model=f"openai/{model}",
        api_base=p.base_url,
        api_key="sk-test",
        messages=kwargs.pop("messages", MESSAGES),
        num_retries=0,
        max_retries=0,
        timeout=timeout,
        **kwargs,
    )


def rebuild(chunks: list[Any]) -> Any:
    return litellm.stream_chunk_builder(chunks, messages=MESSAGES)


async def acomplete(p: FakeProvider, *, timeout: float = 5.0, **kwargs: Any) -> Any:
    return await litellm.acompletion(
        model="openai/fake-model",
        api_base=p.base_url,
        api_key="sk-test",
        messages=MESSAGES,
        num_retries=0,
        max_retries=0,
        timeout=timeout,
        **kwargs,
    )


def test_normal_answer_content_usage_and_recording(provider: FakeProvider) -> None:
    provider.set(Behavior.ok("Hi there, friend!"))  # 17 chars

    response = complete(provider)

    assert response.choices[0].message.content == "Hi there, friend!"
    assert response.choices[0].finish_reason == "stop"
    assert response.usage.prompt_tokens == 38 // 4
    assert response.usage.completion_tokens == 17 // 4
    assert response.usage.total_tokens == 38 // 4 + 17 // 4
    assert response.model.endswith("fake-model")

    assert provider.wait_idle(timeout=2.0)  # the server records the exchange just after its last write
    (request,) = provider.requests
    assert request.model == "fake-model"
    assert request.messages == MESSAGES
    assert request.body["messages"] == MESSAGES
    assert request.stream is False
    assert request.headers["authorization"] == "<redacted>"
    assert "sk-test" not in str(request.headers)
    assert request.completed and not request.disconnected
    assert request.finished_at is not None and request.finished_at >= request.received_at


@pytest.mark.parametrize(
    ("behavior", "exception"),
    [
        (Behavior.context_length_exceeded(), ContextWindowExceededError),
        (Behavior.error(401), AuthenticationError),
        (Behavior.error(429, retry_after_s=7), RateLimitError),
        (Behavior.error(500), InternalServerError),
        (Behavior.error(503), ServiceUnavailableError),
    ],
    ids=["400-context", "401", "429", "500", "503"],
)
def test_error_statuses_map_to_litellm_exceptions(
    provider: FakeProvider, behavior: Behavior, exception: type[Exception]
) -> None:
    provider.set(behavior)

    with pytest.raises(exception) as info:
        complete(provider)

    assert provider.request_count == 1  # no hidden client retries
    if behavior.retry_after_s is not None:
        response = getattr(info.value, "response", None)
        assert response is not None and response.headers["retry-after"] == "7"


def test_latency_beyond_timeout_raises_timeout_and_records_disconnect(provider: FakeProvider) -> None:
    provider.set(Behavior.slow(3.0))

    started = time.monotonic()
    with pytest.raises(Timeout):
        complete(provider, timeout=0.3)
    assert time.monotonic() - started < 2.0

    assert provider.wait_idle(timeout=2.0)
    (request,) = provider.requests
    assert request.disconnected and not request.completed
    assert request.finished_at is not None and request.finished_at - request.received_at < 2.0
    assert provider.disconnects == 1


def test_empty_body_and_length_finish_reason(provider: FakeProvider) -> None:
    provider.script(Behavior(body="empty"), Behavior(content="truncat", finish_reason="length"))

    empty = complete(provider)
    truncated = complete(provider)

    assert not empty.choices[0].message.content
    assert truncated.choices[0].message.content == "truncat"
    assert truncated.choices[0].finish_reason == "length"


def test_malformed_body_raises_a_litellm_exception(provider: FakeProvider) -> None:
    provider.set(Behavior(body="malformed"))

    with pytest.raises(InternalServerError, match=r"Unterminated string|Expecting"):  # litellm 1.110.2
        complete(provider)

    # The client may raise on the body before the server thread has marked its write done.
    assert provider.wait_idle(timeout=2.0)
    assert provider.requests[0].completed  # the HTTP exchange itself was complete


def test_reset_raises_and_is_not_completed(provider: FakeProvider) -> None:
    provider.set(Behavior(body="reset"))

    with pytest.raises(InternalServerError, match="Connection error"):  # litellm 1.110.2
        complete(provider)

    assert provider.wait_idle(timeout=2.0)
    assert not provider.requests[0].completed


def test_reset_is_a_tcp_reset(provider: FakeProvider) -> None:
    provider.set(Behavior(body="reset"))

    with pytest.raises(httpx.ReadError) as info:
        httpx.post(f"{provider.base_url}/chat/completions", json={"model": "m", "messages": []})

    chain: list[BaseException] = []
    exc: BaseException | None = info.value
    while exc is not None:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    assert any(isinstance(e, ConnectionResetError) for e in chain)  # RST, not a graceful FIN


def test_stream_yields_content_in_chunks_and_reassembles(provider: FakeProvider) -> None:
    provider.set(Behavior(content="abcdefghi", chunks=3))

    chunks = list(complete(provider, stream=True, stream_options={"include_usage": True}))

    contents = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert contents == ["abc", "def", "ghi"]
    rebuilt = rebuild(chunks)
    assert rebuilt.choices[0].message.content == "abcdefghi"
    assert rebuilt.choices[0].finish_reason == "stop"
    assert rebuilt.usage.completion_tokens == 9 // 4
    assert provider.wait_idle(timeout=2.0)
    (request,) = provider.requests
    assert request.stream and request.completed


def test_stream_cut_after_one_chunk_raises_while_iterating(provider: FakeProvider) -> None:
    provider.set(Behavior(content="abcdefghi", chunks=3, cut_after_chunks=1))

    delivered: list[str] = []
    with pytest.raises(MidStreamFallbackError):  # litellm 1.110.2: a ServiceUnavailableError subclass
        for chunk in complete(provider, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                delivered.append(chunk.choices[0].delta.content)

    assert delivered == ["abc"]
    assert provider.wait_idle(timeout=2.0)
    assert not provider.requests[0].completed


def test_per_model_behaviours_on_one_server(provider: FakeProvider) -> None:
    provider.set(Behavior.ok("default"))
    provider.set(Behavior.ok("from alpha"), model="alpha")
    provider.set(Behavior.error(503), model="beta")

    assert complete(provider, model="alpha").choices[0].message.content == "from alpha"
    assert complete(provider, model="gamma").choices[0].message.content == "default"
    with pytest.raises(ServiceUnavailableError):
        complete(provider, model="beta")
    assert [r.model for r in provider.requests] == ["alpha", "gamma", "beta"]

    models = httpx.get(f"{provider.base_url}/models").json()
    assert {m["id"] for m in models["data"]} == {"alpha", "beta"}


def test_script_queue_is_consumed_in_order_then_falls_back(provider: FakeProvider) -> None:
    provider.set(Behavior.ok("default"))
    provider.script(Behavior.error(500), Behavior.ok("second"))
    provider.script(Behavior.ok("only alpha"), model="alpha")

    with pytest.raises(InternalServerError):
        complete(provider)
    assert complete(provider, model="alpha").choices[0].message.content == "only alpha"
    assert complete(provider).choices[0].message.content == "second"
    assert complete(provider).choices[0].message.content == "default"
    assert complete(provider, model="alpha").choices[0].message.content == "default"

    provider.script(Behavior.error(500))
    provider.reset()
    assert provider.request_count == 0
    assert complete(provider).choices[0].message.content == "default"


def test_tool_calls(provider: FakeProvider) -> None:
    provider.set(Behavior(tool_calls=[{"name": "get_weather", "arguments": {"city": "Paris"}}]))

    message = complete(provider).choices[0]
    chunks = list(complete(provider, stream=True))

    assert message.finish_reason == "tool_calls"
    assert message.message.tool_calls[0].function.name == "get_weather"
    rebuilt = rebuild(chunks).choices[0].message
    assert rebuilt.tool_calls[0].function.arguments == '{"city": "Paris"}'


def test_async_completion_and_stream(provider: FakeProvider) -> None:
    provider.script(Behavior.ok("async hello"), Behavior(content="streamed", chunks=2))

    async def run() -> tuple[str, list[str]]:
        response = await acomplete(provider)
        parts = [
            c.choices[0].delta.content
            async for c in await acomplete(provider, stream=True)
            if c.choices and c.choices[0].delta.content
        ]
        return response.choices[0].message.content, parts

    content, parts = asyncio.run(run())
    assert content == "async hello"
    assert parts == ["stre", "amed"]


def test_async_timeout_records_disconnect(provider: FakeProvider) -> None:
    provider.set(Behavior.slow(3.0))

    async def run() -> bool:
        with pytest.raises(Timeout):
            await acomplete(provider, timeout=0.3)
        # Not provider.wait_idle(): blocking the loop would keep aiohttp from closing the socket.
        return await provider.wait_idle_async(timeout=2.0)

    assert asyncio.run(run())
    assert provider.requests[0].disconnected


def test_50_concurrent_slow_requests_are_served_in_parallel(provider: FakeProvider) -> None:
    # In parallel: every request was received before the first one was answered. (How long 50
    # take is measured in benchmarks/fake_provider.py, not asserted here.)
    provider.set(Behavior.slow(1.0))

    async def run() -> list[Any]:
        return await asyncio.gather(*(acomplete(provider, timeout=30.0) for _ in range(50)))

    responses = asyncio.run(run())

    assert all(r.choices[0].message.content for r in responses)
    assert provider.request_count == 50
    last_received = max(r.received_at for r in provider.requests)
    first_finished = min(r.finished_at for r in provider.requests if r.finished_at is not None)
    assert last_received < first_finished


def test_responses_are_sent_without_nagle_delay(provider: FakeProvider) -> None:
    # The round-trip time itself is measured in benchmarks/fake_provider.py; here: the server's
    # sockets have TCP_NODELAY, which is what keeps the ~40 ms delayed-ACK stall away.
    seen: list[int] = []
    original = provider._server.RequestHandlerClass.setup  # type: ignore[union-attr]

    def setup(handler: Any) -> None:
        original(handler)
        seen.append(handler.connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    provider._server.RequestHandlerClass.setup = setup  # type: ignore[union-attr]
    try:
        assert httpx.post(f"{provider.base_url}/chat/completions", json={"model": "m"}).status_code == 200
    finally:
        provider._server.RequestHandlerClass.setup = original  # type: ignore[union-attr]
    assert seen and all(seen)


def test_unknown_path_is_404_and_models_lists_default(provider: FakeProvider) -> None:
    assert httpx.post(f"{provider.base_url}/completions", json={}).status_code == 404
    assert httpx.get(f"{provider.base_url}/nope").status_code == 404
    models = httpx.get(f"{provider.base_url}/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "fake-model"
    assert httpx.post(f"{provider.base_url.removesuffix('/v1')}/chat/completions", json={}).status_code == 200


def test_stop_is_prompt_with_hanging_and_idle_connections() -> None:
    p = FakeProvider().start()
    p.set(Behavior(body="hang"))
    idle = httpx.Client()
    idle.get(f"{p.base_url}/models")  # leaves a keep-alive connection parked in the server
    errors: list[BaseException] = []

    def hang() -> None:
        try:
            httpx.post(f"{p.base_url}/chat/completions", json={"model": "m"}, timeout=30)
        except httpx.HTTPError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=hang) for _ in range(5)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 2
    while p.request_count < 5 and time.monotonic() < deadline:
        time.sleep(0.01)

    # stop() must not wait for the hanging requests (they would hang 30 s): a liveness bound, not a timing.
    stopper = threading.Thread(target=p.stop)
    stopper.start()
    stopper.join(10)
    assert not stopper.is_alive()
    for t in threads:
        t.join(2)
    idle.close()
    assert len(errors) == 5
    assert all(not r.completed and not r.disconnected for r in p.requests)


def test_behavior_validation_and_latency_fn() -> None:
    with pytest.raises(ValueError):
        Behavior(chunks=0)
    with pytest.raises(ValueError):
        Behavior(body="bogus")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Behavior.error(200)
    assert Behavior(latency_s=5, latency_fn=lambda: 0.25).sample_latency() == 0.25
    assert Behavior.json({"a": 1}).content == '{"a": 1}'
