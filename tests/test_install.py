"""install()/uninstall(), patching litellm by hand, and who owns a policy model's endpoint."""

from __future__ import annotations

import asyncio
import sys
import types
from collections.abc import Iterator
from typing import Any

import litellm
import pytest
from conftest import API_KEYS, MESSAGES, Caller, PolicyBuilder, hidden, outcomes

import llm_resilience
from llm_resilience import Resilience
from llm_resilience.testing import Behavior, FakeProvider, credential_digest

ORIGINAL_COMPLETION = litellm.completion
ORIGINAL_ACOMPLETION = litellm.acompletion


@pytest.fixture(autouse=True)
def _restore_litellm() -> Iterator[None]:
    yield
    llm_resilience.uninstall()
    litellm.completion = ORIGINAL_COMPLETION
    litellm.acompletion = ORIGINAL_ACOMPLETION


def _litellm_call(mode: str, **kwargs: Any) -> Any:
    """A call as a library that knows nothing about us makes it: through the ``litellm`` module."""
    if mode == "sync":
        return litellm.completion(**kwargs)
    if mode == "stream":
        chunks = list(litellm.completion(**kwargs, stream=True))
        return litellm.stream_chunk_builder(chunks)
    return asyncio.run(litellm.acompletion(**kwargs))


@pytest.mark.parametrize("mode", ["sync", "async", "stream"])
def test_installed_litellm_completion_falls_back_through_the_policy(
    mode: str, engine: Resilience, big: FakeProvider, small: FakeProvider
) -> None:
    big.set(Behavior.error(503))
    llm_resilience.install(engine)

    response = _litellm_call(mode, model="chat", messages=MESSAGES)

    assert response.choices[0].message.content
    assert (big.request_count, small.request_count) == (1, 1)
    if mode != "stream":  # an assembled stream carries no summary of ours
        assert outcomes(response) == [("big", "failure", "server_error"), ("small", "success", None)]


@pytest.mark.parametrize("mode", ["sync", "async", "stream"])
def test_litellm_completion_assigned_by_hand_does_not_recurse(
    mode: str, engine: Resilience, big: FakeProvider, small: FakeProvider
) -> None:
    big.set(Behavior.error(503))
    llm_resilience.set_default_engine(engine)
    litellm.completion = llm_resilience.completion
    litellm.acompletion = llm_resilience.acompletion

    response = _litellm_call(mode, model="chat", messages=MESSAGES)

    assert response.choices[0].message.content
    assert (big.request_count, small.request_count) == (1, 1)


def test_uninstall_gives_litellm_its_own_functions_back(engine: Resilience, big: FakeProvider) -> None:
    llm_resilience.install(engine)
    llm_resilience.install(engine)  # twice: still one layer, and uninstall still restores
    assert litellm.completion is not ORIGINAL_COMPLETION
    llm_resilience.uninstall()

    assert litellm.completion is ORIGINAL_COMPLETION
    assert litellm.acompletion is ORIGINAL_ACOMPLETION
    response = litellm.completion(
        model="openai/plain", messages=MESSAGES, api_base=big.base_url, api_key="sk-x", max_retries=0
    )
    assert "llm_resilience" not in response._hidden_params
    llm_resilience.uninstall()  # a no-op now


def test_uninstall_keeps_what_someone_else_assigned_after_install(engine: Resilience) -> None:
    llm_resilience.install(engine)

    def theirs(**_: Any) -> None:
        return None

    litellm.completion = theirs
    llm_resilience.uninstall()

    assert litellm.completion is theirs
    assert litellm.acompletion is ORIGINAL_ACOMPLETION


def test_install_rebinds_names_imported_from_litellm_before_it(
    engine: Resilience, big: FakeProvider, small: FakeProvider
) -> None:
    module = types.ModuleType("client_that_imported_early")
    exec("from litellm import completion, acompletion", module.__dict__)
    sys.modules[module.__name__] = module
    try:
        big.set(Behavior.error(503))
        llm_resilience.install(engine)

        response = module.completion(model="chat", messages=MESSAGES)
        assert hidden(response)["model"] == "small"
        response = asyncio.run(module.acompletion(model="chat", messages=MESSAGES))
        assert hidden(response)["model"] == "small"

        llm_resilience.uninstall()
        assert module.completion is ORIGINAL_COMPLETION
        assert module.acompletion is ORIGINAL_ACOMPLETION
    finally:
        del sys.modules[module.__name__]


def test_installed_default_engine_follows_set_default_engine(
    make_engine: Any, policy_dict: PolicyBuilder, big: FakeProvider, small: FakeProvider
) -> None:
    llm_resilience.install()
    llm_resilience.set_default_engine(make_engine(policy_dict(["small"])))

    response = litellm.completion(model="chat", messages=MESSAGES)

    assert hidden(response)["model"] == "small"
    assert (big.request_count, small.request_count) == (0, 1)


# -- start-up: a broken policy shows at start-up, not at the first LLM call ---------------------------


@pytest.fixture
def broken_policy_in_env(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    path = tmp_path / "policy.yaml"
    path.write_text("routes:\n  chat:\n    chain: [nowhere]\n")
    monkeypatch.setenv("LLM_RESILIENCE_POLICY", str(path))
    llm_resilience.set_default_engine(None)
    yield str(path)
    llm_resilience.set_default_engine(None)


@pytest.mark.parametrize("start_up", ["install", "warm_up"])
def test_a_broken_policy_fails_the_start_up_call_naming_file_and_line(broken_policy_in_env: str, start_up: str) -> None:
    with pytest.raises(llm_resilience.PolicyError) as caught:
        getattr(llm_resilience, start_up)()

    assert f"{broken_policy_in_env}:3" in str(caught.value) and "nowhere" in str(caught.value)
    assert litellm.completion is ORIGINAL_COMPLETION  # install() patched nothing


# -- the policy owns a declared model's endpoint -----------------------------------------------------


@pytest.mark.parametrize(
    "caller_kwargs",
    [
        {"base_url": "WRONG"},
        {"api_base": "WRONG"},
        {"base_url": "WRONG", "api_key": "sk-caller-key"},
        {"api_key": "sk-caller-key", "organization": "org-caller"},
        {"api_version": "2099-01-01", "custom_llm_provider": "openai"},
    ],
    ids=lambda kwargs: "+".join(kwargs),
)
def test_policy_endpoint_wins_over_every_caller_alias(
    call: Caller, engine: Resilience, caller_kwargs: dict[str, Any], big: FakeProvider, tiny: FakeProvider
) -> None:
    kwargs = {key: tiny.base_url if value == "WRONG" else value for key, value in caller_kwargs.items()}

    response = call(engine, "chat", MESSAGES, **kwargs)

    assert hidden(response)["model"] == "big"
    assert (big.request_count, tiny.request_count) == (1, 0)
    sent = big.requests[0]
    assert sent.credential_sha256 == credential_digest(f"Bearer {API_KEYS['big']}")
    assert "openai-organization" not in sent.headers


def test_caller_endpoint_passes_through_for_its_own_model_string(
    call: Caller, engine: Resilience, tiny: FakeProvider
) -> None:
    response = call(engine, "openai/my-own-model", MESSAGES, base_url=tiny.base_url, api_key="sk-caller-key")

    assert tiny.request_count == 1
    assert tiny.requests[0].credential_sha256 == credential_digest("Bearer sk-caller-key")
    assert hidden(response)["model"] == "openai/my-own-model"


def test_other_caller_arguments_pass_through_to_a_policy_model(
    call: Caller, engine: Resilience, big: FakeProvider
) -> None:
    call(engine, "chat", MESSAGES, temperature=0.25, user="u-42", extra_headers={"X-Trace-Me": "yes"})

    sent = big.requests[0]
    assert (sent.body["temperature"], sent.body["user"]) == (0.25, "u-42")
    assert sent.headers.get("x-trace-me") == "yes"
