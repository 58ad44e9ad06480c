"""Per-prompt-class timeouts and the whole-call deadline, against slow fake providers."""

from __future__ import annotations

import time
from typing import Any

import pytest
from conftest import MESSAGES, Caller, EngineFactory, PolicyBuilder, hidden, outcomes

from llm_resilience import AllAttemptsFailed, Resilience, UnknownPromptClass
from llm_resilience.testing import Behavior, FakeProvider

CLASSES: dict[str, Any] = {
    "summarize": {
        "timeout_s": 4.0,
        "deadline_s": 6.0,
        "match": [{"last_user_regex": "(?i)\\b(summari[sz]e|tl;?dr)\\b"}],
    },
    "code": {"timeout_s": 4.0, "deadline_s": 6.0, "match": [{"metadata": {"task": "code"}}]},
}
BIG_S = 1.2  # big's latency: 4.8x the default class's timeout, a third of the longer classes'


@pytest.fixture
def classed(make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider) -> Resilience:
    """big answers in 1.2 s: too slow for ``default`` (0.25 s), fine for ``summarize`` and ``code`` (4 s).

    (1.2, not just above 0.25: the engine excuses time the test process itself stalls, e.g. a GC
    pause late in the suite or a loaded machine, and moves the bound by that much; a stall of a
    few hundred ms must not let big answer in time. And 4 s, not just above 1.2, so that big still
    answers in time on a machine that delays it.)
    """
    big.set(Behavior.slow(BIG_S, "slow but thorough"))
    return make_engine(policy_dict(["big", "small"], timeout_s=0.25, deadline_s=2.0, prompt_classes=CLASSES))


def test_default_class_timeout_applies_per_attempt(call: Caller, classed: Resilience) -> None:
    response = call(classed, "chat", [{"role": "user", "content": "hello"}])

    summary = hidden(response)
    assert summary["prompt_class"] == "default"
    (model, outcome, reason), answered = outcomes(response)
    # (client_overload: a loaded machine's own delay is not blamed on big; it is cut all the same)
    assert (model, reason) == ("big", "timeout") and outcome in ("failure", "client_overload")
    assert answered == ("small", "success", None)
    assert summary["attempts"][0]["timeout_s"] == 0.25


def test_explicit_prompt_class_uses_its_longer_timeout(call: Caller, classed: Resilience, small: FakeProvider) -> None:
    response = call(classed, "chat", [{"role": "user", "content": "hello"}], prompt_class="summarize")

    summary = hidden(response)
    assert summary["prompt_class"] == "summarize"
    assert summary["model"] == "big"
    assert summary["attempts"][0]["timeout_s"] == 4.0
    assert response.choices[0].message.content == "slow but thorough"
    assert small.request_count == 0


def test_prompt_class_is_not_sent_to_the_provider(classed: Resilience, big: FakeProvider) -> None:
    classed.completion("chat", MESSAGES, prompt_class="summarize")

    assert "prompt_class" not in big.requests[0].body


def test_regex_rule_classifies_the_call(call: Caller, classed: Resilience) -> None:
    response = call(classed, "chat", [{"role": "user", "content": "TL;DR of this thread please"}])

    assert hidden(response)["prompt_class"] == "summarize"
    assert hidden(response)["model"] == "big"


def test_regex_rule_looks_at_the_last_user_message_only(classed: Resilience) -> None:
    messages = [
        {"role": "user", "content": "summarize this"},
        {"role": "assistant", "content": "done"},
        {"role": "user", "content": "thanks, now something else"},
    ]

    assert hidden(classed.completion("chat", messages))["prompt_class"] == "default"


def test_metadata_rule_classifies_the_call(call: Caller, classed: Resilience) -> None:
    response = call(classed, "chat", [{"role": "user", "content": "hello"}], metadata={"task": "code"})

    assert hidden(response)["prompt_class"] == "code"
    assert hidden(response)["attempts"][0]["timeout_s"] == 4.0


def test_unknown_prompt_class_raises_before_any_request(
    call: Caller, classed: Resilience, big: FakeProvider, small: FakeProvider
) -> None:
    with pytest.raises(UnknownPromptClass, match="'sumarize'"):
        call(classed, "chat", MESSAGES, prompt_class="sumarize")

    assert big.request_count == small.request_count == 0


def test_whole_call_never_runs_past_the_class_deadline(
    call: Caller,
    make_engine: EngineFactory,
    policy_dict: PolicyBuilder,
    big: FakeProvider,
    small: FakeProvider,
    tiny: FakeProvider,
) -> None:
    for p in (big, small, tiny):
        p.set(Behavior.slow(10.0))
    # Three 1 s timeouts would take 3 s; the 1.4 s deadline must cut the second one short.
    engine = make_engine(policy_dict(timeout_s=1.0, deadline_s=1.4))

    started = time.monotonic()
    with pytest.raises(AllAttemptsFailed) as info:
        call(engine, "chat", MESSAGES)
    elapsed = time.monotonic() - started

    assert 1.3 <= elapsed < 2.4  # (1 s of slack for a loaded machine: still far below the three timeouts)
    attempts = info.value.attempts
    assert (attempts[0].model, attempts[0].reason, attempts[0].timeout_s) == ("big", "timeout", 1.0)
    if attempts[0].outcome == "failure":  # cut at its own 1 s timeout: small gets what is left
        assert attempts[1].model == "small"
        assert attempts[1].reason == "timeout"
        assert attempts[1].timeout_s is not None
        assert attempts[1].timeout_s <= 0.4 + 1e-6  # only what was left of the deadline
    else:
        # A loaded machine: the client, not big, was slow (its probes ran late), so big's bound
        # moved, at most to the deadline (client_overload), and nothing was left for small.
        assert attempts[0].outcome == "client_overload"
    assert all(a.model != "tiny" or (a.outcome, a.reason) == ("skipped", "deadline_exceeded") for a in attempts)
    assert tiny.request_count == 0


def test_callers_timeout_caps_the_deadline(
    call: Caller, make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider, small: FakeProvider
) -> None:
    big.set(Behavior.slow(10.0))
    engine = make_engine(policy_dict(["big", "small"], timeout_s=3.0, deadline_s=5.0))

    started = time.monotonic()
    with pytest.raises(AllAttemptsFailed) as info:
        call(engine, "chat", MESSAGES, timeout=0.3)
    elapsed = time.monotonic() - started

    assert elapsed < 2.0  # the class alone would have given big 3 s
    # (client_overload: on a loaded machine the wait is the client's, not big's, and is not blamed;
    # the caller's bound holds all the same)
    (model, outcome, reason), skipped = outcomes(info.value.attempts)
    assert (model, reason) == ("big", "timeout") and outcome in ("failure", "client_overload")
    assert skipped == ("small", "skipped", "deadline_exceeded")
    assert info.value.attempts[0].timeout_s == pytest.approx(0.3, abs=0.01)
    assert small.request_count == 0


def test_callers_timeout_longer_than_the_class_does_not_extend_it(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider
) -> None:
    big.set(Behavior.slow(3.0))  # 10x the class timeout: cut whatever a loaded machine excuses
    engine = make_engine(policy_dict(["big", "small"], timeout_s=0.3, deadline_s=5.0))

    response = engine.completion("chat", MESSAGES, timeout=30)

    (model, outcome, reason), answered = outcomes(response)
    assert (model, reason) == ("big", "timeout") and outcome in ("failure", "client_overload")
    assert answered == ("small", "success", None)
    assert hidden(response)["attempts"][0]["timeout_s"] == 0.3


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "plain"])
def test_attempts_cut_in_litellms_dispatch_step_leave_no_coroutine_unawaited(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider, stream: bool
) -> None:
    """litellm's ``acompletion`` builds the request in the loop's executor and gets back the coroutine
    that sends it. A cut landing in that step must not drop that coroutine: Python would print
    "coroutine ... was never awaited" into the application's stderr, once per cut attempt.

    150 concurrent calls with a 50 ms timeout keep the executor (a few threads) busy, so many cuts
    land while a request is still being built.
    """
    import asyncio
    import gc
    import warnings

    big.set(Behavior.ok(latency_s=0.02))
    engine = make_engine(policy_dict(["big"], timeout_s=0.05, deadline_s=0.1, fail_max=100_000))

    async def one() -> None:
        try:
            response = await engine.acompletion(model="chat", messages=MESSAGES, stream=stream)
            if stream:
                async for _chunk in response:
                    pass
        except AllAttemptsFailed:
            pass

    async def burst() -> None:
        await asyncio.gather(*(one() for _ in range(150)))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            asyncio.run(burst())
        gc.collect()
    unawaited = [str(w.message) for w in caught if "was never awaited" in str(w.message)]
    assert unawaited == []
