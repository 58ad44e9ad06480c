"""openai-agents' LitellmModel, wired only through ``llm_resilience.install()``.

LitellmModel calls ``litellm.acompletion`` and has no injection point: install() is the
only wiring. Its own ``base_url``/``api_key`` point elsewhere on purpose: for a route of
the policy, the policy's endpoints win.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import EngineFactory, PolicyBuilder, free_port

import llm_resilience
from llm_resilience.testing import Behavior, FakeProvider

agents = pytest.importorskip("agents")
litellm_model = pytest.importorskip("agents.extensions.models.litellm_model")


@pytest.fixture(autouse=True)
def _installed(make_engine: EngineFactory, policy_dict: PolicyBuilder) -> Iterator[None]:
    agents.set_tracing_disabled(True)  # its default exporter would send traces to OpenAI
    llm_resilience.install(make_engine(policy_dict(["big", "small"], timeout_s=3.0, deadline_s=8.0)))
    yield
    llm_resilience.uninstall()


def _agent(**options: Any) -> Any:
    model = litellm_model.LitellmModel(
        model="chat", base_url=f"http://127.0.0.1:{free_port()}/v1", api_key="sk-agent-not-used"
    )
    return agents.Agent(name="assistant", instructions="Be brief.", model=model, **options)


def test_run_answers_through_the_route(big: FakeProvider) -> None:
    big.set(Behavior.ok("hello from big"))

    result = agents.Runner.run_sync(_agent(), "hi")

    assert result.final_output == "hello from big"
    assert big.request_count == 1


@pytest.mark.parametrize("primary", [Behavior.error(503), Behavior.slow(4.0)], ids=["503", "slow"])
def test_run_falls_back(primary: Behavior, big: FakeProvider, small: FakeProvider) -> None:
    big.set(primary)
    small.set(Behavior.ok("hello from small"))

    result = agents.Runner.run_sync(_agent(), "hi")

    assert result.final_output == "hello from small"
    assert (big.request_count, small.request_count) == (1, 1)


def test_streamed_run_falls_back(big: FakeProvider, small: FakeProvider) -> None:
    big.set(Behavior.error(503))
    small.set(Behavior.ok("streamed from small"))

    async def run() -> tuple[list[str], Any]:
        result = agents.Runner.run_streamed(_agent(), "hi")
        deltas = [
            event.data.delta
            async for event in result.stream_events()
            if event.type == "raw_response_event" and getattr(event.data, "type", "") == "response.output_text.delta"
        ]
        return deltas, result.final_output

    deltas, final = asyncio.run(run())

    assert final == "streamed from small"
    assert len(deltas) > 1 and "".join(deltas) == "streamed from small"
    assert small.requests[0].stream is True


def test_tool_call_runs_the_tool_and_the_answer_follows(big: FakeProvider, small: FakeProvider) -> None:
    seen: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        seen.append(city)
        return "rain"

    big.set(Behavior.error(503))
    small.script(
        Behavior(tool_calls=[{"name": "get_weather", "arguments": {"city": "Oslo"}}]),
        Behavior.ok("It rains in Oslo."),
    )

    result = agents.Runner.run_sync(_agent(tools=[get_weather]), "weather in Oslo?")

    assert seen == ["Oslo"]
    assert result.final_output == "It rains in Oslo."
    assert small.requests[0].body["tools"][0]["function"]["name"] == "get_weather"
    assert small.requests[1].messages[-1]["role"] == "tool"
