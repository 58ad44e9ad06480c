"""Same-model retries: off by default, jittered backoff, Retry-After, and a budget.

Through real HTTP against the fake providers, plus the backoff arithmetic and the Retry-After
parser without I/O.
"""

from __future__ import annotations

import email.utils
import time
from typing import Any

import httpx
import litellm
import pytest
from conftest import MESSAGES, Caller, EngineFactory, PolicyBuilder, hidden, outcomes
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from llm_resilience import PolicyError
from llm_resilience._breakers import BreakerRegistry
from llm_resilience._hooks import HookSet
from llm_resilience._planner import CallRequest, Launch, Planner, Wait, retry_after_s
from llm_resilience._policy import Policy
from llm_resilience.testing import Behavior, FakeProvider

lx = litellm.exceptions
UNUSED_BASE = "http://127.0.0.1:9/v1"  # the planner tests never send anything


def with_retries(policy_dict: PolicyBuilder, *, fail_max: int = 50, deadline_s: float = 4.0, **retries: Any) -> Any:
    policy = policy_dict(["big", "small"], timeout_s=1.0, deadline_s=deadline_s, fail_max=fail_max)
    policy["routes"]["chat"]["retries"] = {"max_retries": 2, "backoff_base_s": 0.05, "min_per_s": 10.0, **retries}
    return policy


def attempt_spans(exporter: InMemorySpanExporter, model: str) -> list[Any]:
    spans = [dict(s.attributes or {}) for s in exporter.get_finished_spans() if s.name.startswith("chat ")]
    return [a for a in spans if a["llm_resilience.model"] == model]


def test_retry_on_503_then_success_on_the_same_model(
    call: Caller, make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider, small: FakeProvider
) -> None:
    engine = make_engine(with_retries(policy_dict))
    big.script(Behavior.error(503))

    response = call(engine, "chat", MESSAGES)

    assert outcomes(response) == [("big", "failure", "server_error"), ("big", "success", None)]
    assert hidden(response)["attempts"][1]["retry_of"] == 0
    assert small.request_count == 0
    gap = big.requests[1].received_at - big.requests[0].received_at
    assert gap >= 0.025  # slept at least half the 0.05 s base backoff (equal jitter) before retrying


def test_retries_are_off_by_default(
    call: Caller, make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider
) -> None:
    engine = make_engine(policy_dict(["big", "small"]))
    big.script(Behavior.error(503))

    response = call(engine, "chat", MESSAGES)

    assert outcomes(response) == [("big", "failure", "server_error"), ("small", "success", None)]
    assert big.request_count == 1


def test_max_retries_then_the_next_model(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, exporter: InMemorySpanExporter, big: FakeProvider
) -> None:
    engine = make_engine(with_retries(policy_dict, backoff_base_s=0.01))
    big.set(Behavior.error(500))

    response = engine.completion("chat", MESSAGES)

    assert [m for m, _, _ in outcomes(response)] == ["big", "big", "big", "small"]
    assert [a.get("retry_of") for a in hidden(response)["attempts"]] == [None, 0, 1, None]
    assert attempt_spans(exporter, "big")[-1]["llm_resilience.retry_skipped"] == "max_retries"


def test_only_the_listed_kinds_are_retried(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider
) -> None:
    engine = make_engine(with_retries(policy_dict, retry_on=["rate_limit"]))
    big.script(Behavior.error(503))

    response = engine.completion("chat", MESSAGES)

    assert outcomes(response)[1][0] == "small"
    assert big.request_count == 1


def test_a_timeout_is_never_retried_on_the_same_model(
    call: Caller, make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider
) -> None:
    policy = with_retries(policy_dict)
    policy["prompt_classes"]["default"]["timeout_s"] = 0.2
    engine = make_engine(policy)
    big.set(Behavior.slow(1.0))

    response = call(engine, "chat", MESSAGES)

    assert outcomes(response) == [("big", "failure", "timeout"), ("small", "success", None)]
    assert big.request_count == 1


def test_policy_refuses_retrying_timeouts(policy_dict: PolicyBuilder) -> None:
    with pytest.raises(PolicyError, match="never retried"):
        Policy.from_dict(with_retries(policy_dict, retry_on=["server_error", "timeout"]))


def test_an_ordinary_400_is_not_retried(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider
) -> None:
    engine = make_engine(with_retries(policy_dict))
    big.set(Behavior.error(400))

    with pytest.raises(lx.BadRequestError):
        engine.completion("chat", MESSAGES)
    assert big.request_count == 1


def test_retry_after_is_honoured(
    call: Caller, make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider, small: FakeProvider
) -> None:
    engine = make_engine(with_retries(policy_dict, backoff_base_s=0.01))
    big.script(Behavior.error(429, retry_after_s=0.4))

    response = call(engine, "chat", MESSAGES)

    assert outcomes(response) == [("big", "failure", "rate_limit"), ("big", "success", None)]
    first, retry = big.requests
    assert first.finished_at is not None
    assert retry.received_at - first.finished_at >= 0.4  # never sooner than the provider asked
    assert small.request_count == 0


def test_retry_after_beyond_the_deadline_moves_on_to_the_next_model(
    call: Caller,
    make_engine: EngineFactory,
    policy_dict: PolicyBuilder,
    exporter: InMemorySpanExporter,
    big: FakeProvider,
    small: FakeProvider,
) -> None:
    engine = make_engine(with_retries(policy_dict, deadline_s=1.5, retry_after_max_s=10.0))
    big.script(Behavior.error(429, retry_after_s=5))

    started = time.monotonic()
    response = call(engine, "chat", MESSAGES)

    assert time.monotonic() - started < 1.0  # did not wait for the Retry-After
    assert outcomes(response) == [("big", "failure", "rate_limit"), ("small", "success", None)]
    assert big.request_count == 1
    span = attempt_spans(exporter, "big")[0]
    assert span["llm_resilience.retry_skipped"] == "deadline"
    assert span["llm_resilience.retry_after_ms"] == 5000


def test_retry_budget_caps_retries_under_sustained_failure(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider, small: FakeProvider
) -> None:
    # Unbudgeted, 20 calls x (1 + 3 retries) = 80 requests to the sick model. With retries capped
    # at 20 % of recent first attempts (no floor): one retry at calls 5, 10, 15 and 20.
    engine = make_engine(with_retries(policy_dict, max_retries=3, budget_ratio=0.2, min_per_s=0, backoff_base_s=0.001))
    big.set(Behavior.error(503))

    for _ in range(20):
        assert hidden(engine.completion("chat", MESSAGES))["model"] == "small"

    assert big.request_count == 24
    assert small.request_count == 20


def test_retry_budget_floor_allows_a_few_retries_on_quiet_traffic(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider
) -> None:
    # ratio 0, min_per_s 0.2 over the 10 s window: 2 retries, whatever the traffic.
    engine = make_engine(with_retries(policy_dict, max_retries=1, budget_ratio=0, min_per_s=0.2, backoff_base_s=0.001))
    big.set(Behavior.error(503))

    for _ in range(6):
        engine.completion("chat", MESSAGES)

    assert big.request_count == 8


def test_no_retry_once_the_failure_opened_the_breaker(
    make_engine: EngineFactory,
    policy_dict: PolicyBuilder,
    exporter: InMemorySpanExporter,
    big: FakeProvider,
    small: FakeProvider,
) -> None:
    engine = make_engine(with_retries(policy_dict, fail_max=1))
    big.set(Behavior.error(503))

    response = engine.completion("chat", MESSAGES)

    assert outcomes(response) == [("big", "failure", "server_error"), ("small", "success", None)]
    assert attempt_spans(exporter, "big")[0]["llm_resilience.retry_skipped"] == "breaker_open"


# -- the planner alone -----------------------------------------------------------------------------


def planner(**retries: Any) -> Planner:
    pol = Policy.from_dict(
        {
            "models": {
                name: {"litellm_params": {"model": f"openai/{name}", "api_base": UNUSED_BASE, "api_key": "k"}}
                for name in ("a", "b")
            },
            "routes": {"chat": {"chain": ["a", "b"], "retries": {"max_retries": 3, "min_per_s": 100, **retries}}},
            "prompt_classes": {"default": {"timeout_s": 2.0, "deadline_s": 30.0}},
            "breakers": {"default": {"fail_max": 100}},
        }
    )
    p = Planner(policy=pol, breakers=BreakerRegistry(pol.breaker_settings), hooks=HookSet())
    p.rng.seed(7)
    return p


@pytest.mark.sans_io
def test_backoff_is_jittered_exponential_and_capped() -> None:
    call = planner(backoff_base_s=0.1, backoff_max_s=0.3).start(CallRequest("chat", MESSAGES, {}), 0.0)
    now = 0.0
    waits = []
    for _ in range(4):
        action = call.next_action(now)
        assert isinstance(action, Launch) and action.attempt.spec.name == "a"
        call.on_error(action.attempt, lx.ServiceUnavailableError("overloaded", "openai", "a"), now)
        wait = call.next_action(now)
        if not isinstance(wait, Wait):
            break
        assert wait.until is not None and call.in_flight == []  # a backoff: nothing in flight
        waits.append(wait.until - now)
        assert call.next_action(now + (wait.until - now) / 4) == wait  # still waiting
        now = wait.until

    assert len(waits) == 3
    for waited, cap in zip(waits, (0.1, 0.2, 0.3), strict=True):
        assert cap / 2 <= waited <= cap


@pytest.mark.sans_io
def test_retry_after_parsing() -> None:
    def error(headers: dict[str, str]) -> Exception:
        response = httpx.Response(429, headers=headers, request=httpx.Request("POST", "http://x"))
        return lx.RateLimitError("slow down", "openai", "a", response=response)

    assert retry_after_s(error({"Retry-After": "2"})) == 2.0
    assert retry_after_s(error({"retry-after": "0.5"})) == 0.5
    assert retry_after_s(error({"retry-after-ms": "250", "retry-after": "9"})) == 0.25
    in_3s = email.utils.formatdate(time.time() + 3, usegmt=True)
    parsed = retry_after_s(error({"Retry-After": in_3s}))
    assert parsed is not None and 1.5 <= parsed <= 3.5
    assert retry_after_s(error({})) is None
    assert retry_after_s(error({"Retry-After": "soon"})) is None
    assert retry_after_s(ValueError("no response at all")) is None
