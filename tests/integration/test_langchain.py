"""langchain-litellm's ChatLiteLLM on llm_resilience: ``llm.client = llm_resilience``."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from conftest import EngineFactory, PolicyBuilder

import llm_resilience
from llm_resilience import Resilience
from llm_resilience.testing import Behavior, FakeProvider

chat_models = pytest.importorskip("langchain_litellm")


@pytest.fixture(autouse=True)
def _engine(make_engine: EngineFactory, policy_dict: PolicyBuilder) -> Resilience:
    engine = make_engine(policy_dict(["big", "small"], timeout_s=3.0, deadline_s=8.0))
    llm_resilience.set_default_engine(engine)
    return engine


def _llm(**options: Any) -> Any:
    llm = chat_models.ChatLiteLLM(model="chat", max_retries=0, **options)
    llm.client = llm_resilience
    return llm


def test_invoke_answers_through_the_route(big: FakeProvider) -> None:
    big.set(Behavior.ok("hello from big"))

    message = _llm().invoke("hi")

    assert message.content == "hello from big"
    assert big.requests[0].model == "gpt-4o"


@pytest.mark.parametrize("primary", [Behavior.error(503), Behavior.slow(4.0)], ids=["503", "slow"])
def test_invoke_falls_back(primary: Behavior, big: FakeProvider, small: FakeProvider) -> None:
    big.set(primary)
    small.set(Behavior.ok("hello from small"))

    message = _llm().invoke("hi")

    assert message.content == "hello from small"
    assert (big.request_count, small.request_count) == (1, 1)


def test_stream_falls_back_and_yields_the_fallbacks_chunks(big: FakeProvider, small: FakeProvider) -> None:
    big.set(Behavior.error(503))
    small.set(Behavior.ok("streamed from small"))

    chunks = list(_llm().stream("hi"))

    assert len(chunks) > 1
    assert "".join(str(chunk.content) for chunk in chunks) == "streamed from small"
    assert small.requests[0].stream is True


def test_bound_tools_reach_the_model_and_the_tool_call_comes_back(big: FakeProvider, small: FakeProvider) -> None:
    big.set(Behavior.error(503))
    small.set(Behavior(tool_calls=[{"name": "get_weather", "arguments": {"city": "Oslo"}}]))

    def get_weather(city: str) -> str:
        """The weather in a city."""
        return "rain"

    message = _llm().bind_tools([get_weather]).invoke("weather in Oslo?")

    assert [(call["name"], call["args"]) for call in message.tool_calls] == [("get_weather", {"city": "Oslo"})]
    assert small.requests[0].body["tools"][0]["function"]["name"] == "get_weather"


def test_ainvoke_falls_back(big: FakeProvider, small: FakeProvider) -> None:
    big.set(Behavior.error(503))
    small.set(Behavior.ok("async from small"))

    message = asyncio.run(_llm().ainvoke("hi"))

    assert message.content == "async from small"
