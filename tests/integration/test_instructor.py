"""instructor on llm_resilience: ``instructor.from_litellm(llm_resilience.completion)``."""

from __future__ import annotations

import asyncio

import pytest
from conftest import MESSAGES, EngineFactory, PolicyBuilder
from pydantic import BaseModel

import llm_resilience
from llm_resilience import Resilience
from llm_resilience.testing import Behavior, FakeProvider

instructor = pytest.importorskip("instructor")


class User(BaseModel):
    name: str
    age: int


ANSWER = Behavior(tool_calls=[{"name": "User", "arguments": {"name": "Ada", "age": 36}}])


@pytest.fixture(autouse=True)
def _engine(make_engine: EngineFactory, policy_dict: PolicyBuilder) -> Resilience:
    engine = make_engine(policy_dict(["big", "small"], timeout_s=3.0, deadline_s=8.0))
    llm_resilience.set_default_engine(engine)
    return engine


def test_response_model_through_the_route(big: FakeProvider) -> None:
    big.set(ANSWER)
    client = instructor.from_litellm(llm_resilience.completion)

    user = client.chat.completions.create(model="chat", messages=MESSAGES, response_model=User)

    assert user.model_dump() == {"name": "Ada", "age": 36}
    assert big.requests[0].body["tools"][0]["function"]["name"] == "User"  # the tool call reached the model


@pytest.mark.parametrize("primary", [Behavior.error(503), Behavior.slow(4.0)], ids=["503", "slow"])
def test_falls_back_when_the_primary_fails(primary: Behavior, big: FakeProvider, small: FakeProvider) -> None:
    big.set(primary)
    small.set(ANSWER)
    client = instructor.from_litellm(llm_resilience.completion)

    user, raw = client.chat.completions.create_with_completion(model="chat", messages=MESSAGES, response_model=User)

    assert user.model_dump() == {"name": "Ada", "age": 36}
    assert raw._hidden_params["llm_resilience"]["model"] == "small"
    assert (big.request_count, small.request_count) == (1, 1)


def test_async_client_falls_back(big: FakeProvider, small: FakeProvider) -> None:
    big.set(Behavior.error(503))
    small.set(ANSWER)
    client = instructor.from_litellm(llm_resilience.acompletion)

    user = asyncio.run(client.chat.completions.create(model="chat", messages=MESSAGES, response_model=User))

    assert user.model_dump() == {"name": "Ada", "age": 36}
    assert small.request_count == 1


def test_create_partial_streams_the_fallbacks_answer(big: FakeProvider, small: FakeProvider) -> None:
    big.set(Behavior.error(503))
    # create_partial offers the tool as "PartialUser": a model answers with the tool it was offered (an
    # answer naming a tool the request did not offer is an invalid tool call, and falls back).
    small.set(Behavior(tool_calls=[{"name": "PartialUser", "arguments": {"name": "Ada", "age": 36}}]))
    client = instructor.from_litellm(llm_resilience.completion)

    partials = list(client.chat.completions.create_partial(model="chat", messages=MESSAGES, response_model=User))

    assert partials and (partials[-1].name, partials[-1].age) == ("Ada", 36)
    assert small.requests[0].stream is True
