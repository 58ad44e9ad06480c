"""Drop-in compatibility: the same call shapes as ``litellm.completion`` keep working."""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any

import litellm
import pytest
import yaml
from conftest import MESSAGES, Caller, PolicyBuilder, hidden, outcomes
from litellm.integrations.custom_logger import CustomLogger

import llm_resilience
from llm_resilience import Resilience
from llm_resilience.testing import Behavior, FakeProvider, credential_digest


def test_unknown_litellm_model_string_is_a_one_model_route(call: Caller, engine: Resilience, big: FakeProvider) -> None:
    big.set(Behavior.ok("ad hoc answer"))

    response = call(engine, "openai/some-model", MESSAGES, api_base=big.base_url, api_key="sk-caller")

    assert isinstance(response, litellm.ModelResponse)
    assert response.choices[0].message.content == "ad hoc answer"
    assert big.requests[0].model == "some-model"
    summary = hidden(response)
    assert (summary["route"], summary["model"]) == ("openai/some-model", "openai/some-model")
    assert outcomes(response) == [("openai/some-model", "success", None)]


def test_an_ad_hoc_model_follows_the_openai_environment_from_call_to_call(
    call: Caller, engine: Resilience, big: FakeProvider, small: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As litellm does: OPENAI_BASE_URL / OPENAI_API_KEY / OPENAI_ORGANIZATION are read on every call,
    # so a key rotated (or an endpoint moved) between two calls is the one the next call sends.
    monkeypatch.setenv("OPENAI_BASE_URL", big.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-first")
    call(engine, "openai/some-model", MESSAGES)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-rotated")
    monkeypatch.setenv("OPENAI_ORGANIZATION", "org-ops")
    call(engine, "openai/some-model", MESSAGES)
    monkeypatch.setenv("OPENAI_BASE_URL", small.base_url)
    call(engine, "openai/some-model", MESSAGES)

    assert [r.credential_sha256 for r in big.requests] == [
        credential_digest("Bearer sk-first"),
        credential_digest("Bearer sk-rotated"),
    ]
    assert "openai-organization" not in big.requests[0].headers
    assert big.requests[1].headers["openai-organization"] == "org-ops"
    assert [r.credential_sha256 for r in small.requests] == [credential_digest("Bearer sk-rotated")]


def test_model_name_from_models_section_is_a_one_model_route(
    call: Caller, engine: Resilience, big: FakeProvider, small: FakeProvider
) -> None:
    response = call(engine, "small", MESSAGES)

    assert hidden(response)["model"] == "small"
    assert (big.request_count, small.request_count) == (0, 1)
    assert small.requests[0].model == "gpt-4o-mini"


def test_litellm_model_string_of_a_policy_model_uses_the_policy_connection(
    engine: Resilience, small: FakeProvider
) -> None:
    response = engine.completion("openai/gpt-4o-mini", MESSAGES)

    assert hidden(response)["model"] == "small"
    assert small.request_count == 1


def test_unknown_model_failing_raises_all_attempts_failed_like_a_route(engine: Resilience, big: FakeProvider) -> None:
    big.set(Behavior.error(503))

    # AllAttemptsFailed subclasses litellm's ServiceUnavailableError (drop-in), so asking for the
    # latter would also accept the provider's own 503 passed through unwrapped.
    with pytest.raises(llm_resilience.AllAttemptsFailed) as info:
        engine.completion("openai/some-model", MESSAGES, api_base=big.base_url, api_key="sk-caller")

    assert outcomes(info.value.attempts) == [("openai/some-model", "failure", "server_error")]
    assert isinstance(info.value.__cause__, litellm.exceptions.ServiceUnavailableError)
    assert big.request_count == 1


@pytest.fixture
def policy_file(tmp_path: Path, policy_dict: PolicyBuilder, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy_dict(["big", "small"])), encoding="utf-8")
    monkeypatch.setenv("LLM_RESILIENCE_POLICY", str(path))
    return path


def test_module_level_completion_uses_the_policy_from_the_environment(
    policy_file: Path, big: FakeProvider, small: FakeProvider
) -> None:
    big.set(Behavior.error(500))

    response = llm_resilience.completion(model="chat", messages=MESSAGES)

    assert outcomes(response) == [("big", "failure", "server_error"), ("small", "success", None)]
    assert llm_resilience.default_engine().policy.source == str(policy_file)


def test_module_level_acompletion_shares_the_default_engine(policy_file: Path, big: FakeProvider) -> None:
    big.set(Behavior.error(500))
    engine = llm_resilience.default_engine()
    for _ in range(3):
        llm_resilience.completion(model="chat", messages=MESSAGES)

    response = asyncio.run(llm_resilience.acompletion(model="chat", messages=MESSAGES))

    assert outcomes(response)[0] == ("big", "skipped", "breaker_open")  # breakers opened by the sync calls
    assert llm_resilience.default_engine() is engine


def test_set_default_engine_replaces_and_resets_the_module_engine(
    policy_file: Path, policy_dict: PolicyBuilder, small: FakeProvider
) -> None:
    mine = Resilience.from_dict(policy_dict(["small"]))
    llm_resilience.set_default_engine(mine)
    assert hidden(llm_resilience.completion(model="chat", messages=MESSAGES))["model"] == "small"

    llm_resilience.set_default_engine(None)

    assert llm_resilience.default_engine() is not mine
    assert llm_resilience.default_engine().policy.source == str(policy_file)


def test_module_level_completion_without_a_policy_passes_plain_model_strings_through(
    monkeypatch: pytest.MonkeyPatch, big: FakeProvider
) -> None:
    monkeypatch.delenv("LLM_RESILIENCE_POLICY", raising=False)

    response = llm_resilience.completion(
        model="openai/plain", messages=MESSAGES, api_base=big.base_url, api_key="sk-caller"
    )

    assert hidden(response)["model"] == "openai/plain"
    assert big.requests[0].model == "plain"


CALLER_KWARGS: dict[str, Any] = {
    "temperature": 0.3,
    "max_tokens": 17,
    "top_p": 0.9,
    "stop": ["\n\n"],
    "seed": 7,
    "user": "user-123",
    "metadata": {"task": "chat", "tenant": "acme"},
    "extra_body": {"custom_flag": True},
}


def test_caller_kwargs_reach_the_provider_exactly_as_litellm_sends_them(
    call: Caller, engine: Resilience, big: FakeProvider, small: FakeProvider
) -> None:
    # litellm decides which kwargs go on the wire (metadata is litellm-side only, for example);
    # the drop-in must send byte-for-byte the same body litellm would.
    litellm.completion(
        model="openai/gpt-4o",
        messages=MESSAGES,
        api_base=small.base_url,
        api_key="sk-direct",
        num_retries=0,
        max_retries=0,
        **CALLER_KWARGS,
    )

    call(engine, "chat", MESSAGES, **CALLER_KWARGS)

    sent = big.requests[0].body
    assert sent == small.requests[0].body
    assert (sent["temperature"], sent["max_tokens"], sent["top_p"], sent["seed"]) == (0.3, 17, 0.9, 7)
    assert sent["stop"] == ["\n\n"]
    assert sent["custom_flag"] is True


class MetadataSeen(CustomLogger):
    """A litellm callback (public API) that records the metadata litellm received per request."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dict[str, Any]] = []

    def log_pre_api_call(self, model: str, messages: Any, kwargs: dict[str, Any]) -> None:
        self.seen.append(dict((kwargs.get("litellm_params") or {}).get("metadata") or {}))


def test_callers_metadata_reaches_litellm_on_every_attempt(
    call: Caller, engine: Resilience, big: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    # metadata never goes on the wire (litellm keeps it for its callbacks), so look where litellm keeps it.
    logger = MetadataSeen()
    monkeypatch.setattr(litellm, "callbacks", [logger])
    big.set(Behavior.error(500))

    call(engine, "chat", MESSAGES, metadata={"tenant": "acme"})

    assert len(logger.seen) == 2
    assert all(seen.get("tenant") == "acme" for seen in logger.seen)


def test_each_attempt_gets_its_own_copy_of_the_callers_metadata(
    call: Caller, engine: Resilience, big: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    # litellm writes bookkeeping into the metadata dict it is given; the caller's dict and the
    # second attempt must not see the first attempt's.
    logger = MetadataSeen()
    monkeypatch.setattr(litellm, "callbacks", [logger])
    big.set(Behavior.error(500))
    metadata = {"tenant": "acme"}

    call(engine, "chat", MESSAGES, metadata=metadata)

    assert metadata == {"tenant": "acme"}
    assert logger.seen[1] == {"tenant": "acme"}


def test_caller_kwargs_also_reach_the_fallback_model(
    engine: Resilience, big: FakeProvider, small: FakeProvider
) -> None:
    big.set(Behavior.error(500))

    engine.completion("chat", MESSAGES, temperature=0.1, max_tokens=5)

    assert (small.requests[0].body["temperature"], small.requests[0].body["max_tokens"]) == (0.1, 5)
    assert big.requests[0].body == {**small.requests[0].body, "model": "gpt-4o"}


def test_callers_messages_are_not_mutated(
    call: Caller, engine: Resilience, big: FakeProvider, small: FakeProvider
) -> None:
    big.set(Behavior.context_length_exceeded())
    small.set(Behavior.error(500))
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "part one"}, {"type": "text", "text": "part two"}]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "and then?"},
    ]
    snapshot = copy.deepcopy(messages)

    call(engine, "chat", messages, temperature=0.2)

    assert messages == snapshot
    assert big.requests[0].messages == snapshot  # sent as given, too


def test_callers_retry_settings_cannot_reintroduce_hidden_retries(
    call: Caller, engine: Resilience, big: FakeProvider, small: FakeProvider, tiny: FakeProvider
) -> None:
    for p in (big, small, tiny):
        p.set(Behavior.error(500))

    with pytest.raises(llm_resilience.AllAttemptsFailed):
        call(engine, "chat", MESSAGES, num_retries=3, max_retries=5, fallbacks=["openai/elsewhere"])

    assert (big.request_count, small.request_count, tiny.request_count) == (1, 1, 1)


def test_every_request_is_sent_once_on_success_and_on_timeout(
    call: Caller, make_engine: Any, policy_dict: PolicyBuilder, big: FakeProvider, small: FakeProvider
) -> None:
    big.set(Behavior.slow(2.0))
    engine = make_engine(policy_dict(["big", "small"], timeout_s=0.2))

    call(engine, "chat", MESSAGES)

    assert (big.request_count, small.request_count) == (1, 1)
    small.wait_idle()  # the server marks a request completed just after the client has read the answer
    assert small.requests[0].completed
