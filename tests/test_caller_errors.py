"""Errors that are the caller's: raised at once, counted on no breaker (README "Circuit breakers").

A request that fails before it reaches the provider (a prompt with a lone surrogate cannot be
encoded as the JSON body) says nothing about the provider. Counted, three such calls opened every
breaker of the chain, and in Redis mode the whole fleet's. Through the real litellm HTTP path.
"""

from __future__ import annotations

import asyncio
from typing import Any

import litellm
import pytest
from conftest import MESSAGES, PolicyBuilder, outcomes

from llm_resilience import AllAttemptsFailed, Policy, Resilience
from llm_resilience.testing import FakeProvider

UNENCODABLE = [{"role": "user", "content": "summarise this: \ud800"}]


def _call(engine: Resilience, mode: str, model: str, messages: Any) -> Any:
    if mode == "async":
        return asyncio.run(engine.acompletion(model, messages))
    if mode == "stream":
        return "".join(
            chunk.choices[0].delta.content or "" for chunk in engine.completion(model, messages, stream=True)
        )
    return engine.completion(model, messages)


def _causes(error: BaseException) -> list[type[BaseException]]:
    out: list[type[BaseException]] = []
    cause: BaseException | None = error
    while cause is not None and len(out) < 20:
        out.append(type(cause))
        cause = cause.__cause__ or cause.__context__
    return out


@pytest.mark.parametrize("mode", ["sync", "async", "stream"])
def test_a_prompt_that_cannot_be_encoded_is_raised_at_once_and_opens_no_breaker(
    mode: str, policy_dict: PolicyBuilder, big: FakeProvider, small: FakeProvider, tiny: FakeProvider
) -> None:
    engine = Resilience(Policy.from_dict(policy_dict(fail_max=1)))
    for _ in range(3):
        with pytest.raises(Exception) as info:
            _call(engine, mode, "chat", UNENCODABLE)
        assert not isinstance(info.value, AllAttemptsFailed)  # not "every model failed": the request is wrong
        assert UnicodeEncodeError in _causes(info.value)
    assert (big.request_count, small.request_count, tiny.request_count) == (0, 0, 0)
    assert set(engine.breaker_states().values()) <= {"closed"}
    # The next caller's good request goes to the first model as usual.
    response = engine.completion("chat", MESSAGES)
    assert outcomes(response) == [("big", "success", None)]


def test_the_callers_error_is_reported_as_such_on_its_attempt(policy_dict: PolicyBuilder, big: FakeProvider) -> None:
    seen: list[Any] = []

    class Recorder:
        def attempt_ended(self, call: Any, record: Any, response: Any) -> None:
            seen.append(record)

    engine = Resilience(Policy.from_dict(policy_dict(fail_max=1)), hooks=[Recorder()])
    with pytest.raises(litellm.exceptions.InternalServerError):  # what litellm.completion itself raises
        engine.completion("chat", UNENCODABLE)
    assert [(r.model, r.outcome, r.reason) for r in seen] == [("big", "failure", "caller_error")]


def test_an_absurd_model_string_is_refused_before_any_work(policy_dict: PolicyBuilder, big: FakeProvider) -> None:
    engine = Resilience(Policy.from_dict(policy_dict()))
    model = "openai/" + "x" * 200_000
    with pytest.raises(litellm.exceptions.BadRequestError, match="characters long"):
        engine.completion(model, MESSAGES, api_base=big.base_url, api_key="sk-test")
    assert big.request_count == 0
    assert all(len(m) <= 1024 for m in engine.breakers.models())  # no breaker, metrics or key for it
    # A long but plausible model string is still a model.
    ok = "openai/" + "m" * 200
    engine.completion(ok, MESSAGES, api_base=big.base_url, api_key="sk-test")
    assert big.request_count == 1
