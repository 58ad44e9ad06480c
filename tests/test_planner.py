"""The decision core without a server: drive ``Planner``/``Call`` by hand with a fake clock.

Outcomes are litellm's own exception classes, constructed directly, and ``now`` is a number the
test chooses, so every rule (chain order, timeouts, deadline, breakers, what falls back) is checked
without I/O. Breaker reset timeouts run on pybreaker's wall clock, so the few half-open tests sleep
a few tens of milliseconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import httpx
import litellm
import openai
import pytest

from llm_resilience import AllAttemptsFailed, UnknownPromptClass
from llm_resilience import _outcomes as k
from llm_resilience._breakers import BreakerRegistry
from llm_resilience._hooks import HookSet
from llm_resilience._outcomes import classify_error
from llm_resilience._planner import Attempt, Call, CallRequest, Done, Fail, Launch, Planner
from llm_resilience._policy import Policy

pytestmark = pytest.mark.sans_io  # no server: `make mutate` runs these for every mutant

lx = litellm.exceptions
T0 = 1000.0
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
_REQ = httpx.Request("POST", "http://127.0.0.1:9/v1/chat/completions")


def policy(**sections: Any) -> Policy:
    """Three models on an address nothing listens on (the planner never sends anything)."""
    data: dict[str, Any] = {
        "models": {
            name: {
                "litellm_params": {"model": f"openai/{name}-model", "api_base": "http://127.0.0.1:9/v1", "api_key": "k"}
            }
            for name in ("a", "b", "c")
        },
        "routes": {"chat": {"chain": ["a", "b", "c"]}},
        "prompt_classes": {"default": {"timeout_s": 2.0, "deadline_s": 5.0}},
        "breakers": {"default": {"fail_max": 2, "reset_timeout_s": 30}},
    }
    data.update(sections)
    return Policy.from_dict(data)


def planner(pol: Policy | None = None, hooks: Sequence[object] = ()) -> Planner:
    pol = pol or policy()
    return Planner(policy=pol, breakers=BreakerRegistry(pol.breaker_settings), hooks=HookSet(hooks))


def start(
    p: Planner,
    model: str = "chat",
    *,
    now: float = T0,
    prompt_class: str | None = None,
    messages: Sequence[Mapping[str, Any]] = MESSAGES,
    **kwargs: Any,
) -> Call:
    return p.start(CallRequest(model=model, messages=messages, kwargs=kwargs, prompt_class=prompt_class), now)


def launch(call: Call, now: float) -> Attempt:
    action = call.next_action(now)
    assert isinstance(action, Launch), action
    return action.attempt


def response() -> litellm.ModelResponse:
    return litellm.ModelResponse(model="a-model")


def http_response(status: int) -> httpx.Response:
    return httpx.Response(status, request=_REQ)


def connection_refused_as_litellm_raises_it() -> Exception:
    """What litellm 1.110.2 raises for a refused connection: a 500 with the transport error as cause."""
    transport = httpx.ConnectError("[Errno 111] Connection refused")
    outer = lx.InternalServerError("OpenAIException - Connection error.", "openai", "a-model")
    outer.__cause__ = openai.APIConnectionError(request=_REQ)
    outer.__cause__.__cause__ = transport
    return outer


ERRORS: dict[str, Callable[[], Exception]] = {
    "timeout": lambda: lx.Timeout("Request timed out.", model="a-model", llm_provider="openai"),
    "api_connection": lambda: lx.APIConnectionError("Connection error.", "openai", "a-model"),
    "connection_refused": connection_refused_as_litellm_raises_it,
    "rate_limit": lambda: lx.RateLimitError("slow down", "openai", "a-model"),
    "internal_server_error": lambda: lx.InternalServerError("oops", "openai", "a-model"),
    "service_unavailable": lambda: lx.ServiceUnavailableError("overloaded", "openai", "a-model"),
    "authentication": lambda: lx.AuthenticationError("bad key", "openai", "a-model"),
    "permission_denied": lambda: lx.PermissionDeniedError("no", "openai", "a-model", response=http_response(403)),
    "not_found": lambda: lx.NotFoundError("no such model", "a-model", "openai"),
    "context_window": lambda: lx.ContextWindowExceededError("maximum context length", "a-model", "openai"),
    "bad_request": lambda: lx.BadRequestError("Invalid request.", "a-model", "openai"),
}
EXPECTED_KIND = {
    "timeout": k.TIMEOUT,
    "api_connection": k.CONNECTION,
    "connection_refused": k.CONNECTION,
    "rate_limit": k.RATE_LIMIT,
    "internal_server_error": k.SERVER_ERROR,
    "service_unavailable": k.SERVER_ERROR,
    "authentication": k.AUTH,
    "permission_denied": k.AUTH,
    "not_found": k.NOT_FOUND,
    "context_window": k.CONTEXT_WINDOW,
    "bad_request": k.BAD_REQUEST,
}
FALLBACK_ERRORS = [name for name in ERRORS if name != "bad_request"]


# -- classification of provider errors --------------------------------------------------------


@pytest.mark.parametrize("name", list(ERRORS))
def test_provider_exceptions_map_to_error_kinds(name: str) -> None:
    assert classify_error(ERRORS[name]()) == EXPECTED_KIND[name]


def test_a_plain_500_without_transport_cause_stays_a_server_error() -> None:
    error = lx.InternalServerError("oops", "openai", "a-model")
    error.__context__ = ValueError("unrelated earlier error")
    assert classify_error(error) == k.SERVER_ERROR


# -- the happy path ----------------------------------------------------------------------------


def test_first_model_is_launched_with_class_timeout_and_no_hidden_retries() -> None:
    call = start(planner(), temperature=0.2, metadata={"team": "x"})

    attempt = launch(call, T0)

    assert attempt.spec.name == "a"
    assert attempt.kwargs["model"] == "openai/a-model"
    assert attempt.kwargs["timeout"] == 2.0
    assert attempt.kwargs["num_retries"] == 0
    assert attempt.kwargs["max_retries"] == 0
    assert attempt.kwargs["temperature"] == 0.2
    assert attempt.kwargs["metadata"] == {"team": "x"}
    assert attempt.kwargs["messages"] == MESSAGES


def test_policy_connection_settings_win_over_callers_and_litellm_fallbacks_are_dropped() -> None:
    call = start(planner(), api_base="http://elsewhere/v1", api_key="caller", fallbacks=["x"], num_retries=5)

    attempt = launch(call, T0)

    assert attempt.kwargs["api_base"] == "http://127.0.0.1:9/v1"
    assert attempt.kwargs["api_key"] == "k"
    assert "fallbacks" not in attempt.kwargs
    assert attempt.kwargs["num_retries"] == 0


def test_success_is_done_with_summary_attached() -> None:
    call = start(planner())
    attempt = launch(call, T0)
    resp = response()

    call.on_response(attempt, resp, T0 + 0.25)
    action = call.next_action(T0 + 0.25)

    assert isinstance(action, Done)
    assert action.response is resp
    summary = resp._hidden_params["llm_resilience"]
    assert summary["model"] == "a"
    assert summary["route"] == "chat"
    assert summary["fallbacks"] == 0
    assert summary["attempts"][0]["outcome"] == "success"
    assert summary["attempts"][0]["latency_s"] == pytest.approx(0.25)


# -- what falls back and what does not -----------------------------------------------------------


@pytest.mark.parametrize("name", FALLBACK_ERRORS)
def test_fallback_error_moves_on_to_next_model(name: str) -> None:
    call = start(planner())
    first = launch(call, T0)

    call.on_error(first, ERRORS[name](), T0 + 0.1)
    second = launch(call, T0 + 0.1)

    assert second.spec.name == "b"
    assert (call.records[0].outcome, call.records[0].reason) == ("failure", EXPECTED_KIND[name])
    assert call.records[0].latency_s == pytest.approx(0.1)


def test_ordinary_bad_request_fails_at_once_without_counting() -> None:
    p = planner()
    call = start(p)
    first = launch(call, T0)
    error = ERRORS["bad_request"]()

    call.on_error(first, error, T0 + 0.01)
    action = call.next_action(T0 + 0.01)

    assert isinstance(action, Fail)
    assert action.error is error
    assert [r.model for r in call.records] == ["a"]
    assert p.breakers.get("a").fail_counter == 0


def test_fall_back_on_from_policy_decides_what_is_raised() -> None:
    call = start(planner(policy(errors={"fall_back_on": ["timeout"]})))
    first = launch(call, T0)
    error = ERRORS["internal_server_error"]()

    call.on_error(first, error, T0 + 0.01)

    action = call.next_action(T0 + 0.01)
    assert isinstance(action, Fail)
    assert action.error is error


def test_exhausted_chain_fails_with_all_attempts_and_last_error_as_cause() -> None:
    call = start(planner())
    last: Exception | None = None
    now = T0
    for name in ("timeout", "rate_limit", "service_unavailable"):
        attempt = launch(call, now)
        now += 0.1
        last = ERRORS[name]()
        call.on_error(attempt, last, now)

    action = call.next_action(now)

    assert isinstance(action, Fail)
    error = action.error
    assert isinstance(error, AllAttemptsFailed)
    assert isinstance(error, lx.ServiceUnavailableError)
    assert error.__cause__ is last
    assert [(a.model, a.reason) for a in error.attempts] == [
        ("a", "timeout"),
        ("b", "rate_limit"),
        ("c", "server_error"),
    ]
    assert error.route == "chat"
    assert error.prompt_class == "default"


# -- timeouts and the deadline ------------------------------------------------------------------


def test_attempt_timeout_is_capped_by_what_is_left_of_the_deadline() -> None:
    call = start(planner(policy(prompt_classes={"default": {"timeout_s": 2.0, "deadline_s": 3.0}})))
    first = launch(call, T0)
    call.on_error(first, ERRORS["timeout"](), T0 + 2.0)

    second = launch(call, T0 + 2.0)

    assert second.kwargs["timeout"] == pytest.approx(1.0)
    assert second.record.timeout_s == pytest.approx(1.0)


def test_past_the_deadline_remaining_models_are_skipped_without_a_launch() -> None:
    call = start(planner(policy(prompt_classes={"default": {"timeout_s": 2.0, "deadline_s": 2.0}})))
    first = launch(call, T0)
    call.on_error(first, ERRORS["timeout"](), T0 + 2.0)

    action = call.next_action(T0 + 2.0)

    assert isinstance(action, Fail)
    assert isinstance(action.error, AllAttemptsFailed)
    assert [(r.model, r.outcome, r.reason) for r in call.records] == [
        ("a", "failure", "timeout"),
        ("b", "skipped", "deadline_exceeded"),
    ]


def test_callers_timeout_caps_the_deadline() -> None:
    call = start(planner(), timeout=0.5)

    first = launch(call, T0)

    assert first.kwargs["timeout"] == pytest.approx(0.5)
    assert call.deadline_at == pytest.approx(T0 + 0.5)


def test_callers_timeout_longer_than_deadline_does_not_extend_it() -> None:
    call = start(planner(), timeout=60)

    assert call.deadline_at == pytest.approx(T0 + 5.0)
    assert launch(call, T0).kwargs["timeout"] == pytest.approx(2.0)


# -- prompt classes --------------------------------------------------------------------------------

CLASSES: dict[str, Any] = {
    "default": {"timeout_s": 2.0, "deadline_s": 5.0},
    "summarize": {"timeout_s": 4.0, "deadline_s": 8.0, "match": [{"last_user_regex": "(?i)\\bsummari[sz]e\\b"}]},
    "code": {"timeout_s": 3.0, "deadline_s": 6.0, "match": [{"metadata": {"task": "code"}}]},
}


def test_explicit_prompt_class_sets_timeout_and_deadline() -> None:
    call = start(planner(policy(prompt_classes=CLASSES)), prompt_class="summarize")

    assert call.prompt_class == "summarize"
    assert launch(call, T0).kwargs["timeout"] == 4.0
    assert call.deadline_at == T0 + 8.0


def test_regex_rule_classifies_by_last_user_message() -> None:
    p = planner(policy(prompt_classes=CLASSES))
    messages = [{"role": "user", "content": "Summarize this"}, {"role": "assistant", "content": "ok"}]

    assert start(p, messages=[{"role": "user", "content": "Please summarise this report"}]).prompt_class == "summarize"
    assert start(p, messages=[*messages, {"role": "user", "content": "thanks"}]).prompt_class == "default"


def test_regex_rule_reads_text_parts_of_multimodal_content() -> None:
    p = planner(policy(prompt_classes=CLASSES))
    content = [{"type": "image_url", "image_url": {"url": "data:,"}}, {"type": "text", "text": "summarize it"}]

    assert start(p, messages=[{"role": "user", "content": content}]).prompt_class == "summarize"


def test_metadata_rule_classifies_by_callers_metadata() -> None:
    p = planner(policy(prompt_classes=CLASSES))

    assert start(p, metadata={"task": "code", "user": "u1"}).prompt_class == "code"
    assert start(p, metadata={"task": "chat"}).prompt_class == "default"


def test_unknown_prompt_class_is_rejected_naming_the_defined_ones() -> None:
    with pytest.raises(UnknownPromptClass, match="summarise") as info:
        start(planner(policy(prompt_classes=CLASSES)), prompt_class="summarise")
    assert "summarize" in str(info.value)


# -- breakers ------------------------------------------------------------------------------------


def fail_calls(p: Planner, n: int, error: str = "internal_server_error") -> None:
    """n calls whose first model ``a`` fails and second model ``b`` answers."""
    for _ in range(n):
        call = start(p)
        call.on_error(launch(call, T0), ERRORS[error](), T0 + 0.01)
        attempt = launch(call, T0 + 0.01)
        assert attempt.spec.name == "b"
        call.on_response(attempt, response(), T0 + 0.02)


def test_open_breaker_skips_model_without_a_launch() -> None:
    p = planner()
    fail_calls(p, 2)

    call = start(p)
    attempt = launch(call, T0)

    assert attempt.spec.name == "b"
    assert [(r.model, r.outcome, r.reason) for r in call.records] == [
        ("a", "skipped", "breaker_open"),
        ("b", None, None),
    ]
    assert call.records[0].breaker_state == "open"


def test_transition_to_open_is_recorded_on_the_attempt_that_tripped_it() -> None:
    p = planner()
    fail_calls(p, 1)
    call = start(p)
    first = launch(call, T0)

    call.on_error(first, ERRORS["rate_limit"](), T0 + 0.01)

    assert first.record.breaker_transitions == [("closed", "open")]


def test_bad_request_is_neutral_for_the_breaker() -> None:
    p = planner()
    fail_calls(p, 1)
    call = start(p)
    call.on_error(launch(call, T0), ERRORS["bad_request"](), T0 + 0.01)

    assert p.breakers.get("a").fail_counter == 1  # neither counted nor reset
    assert p.breakers.get("a").state == "closed"


def test_success_resets_the_consecutive_failure_count() -> None:
    p = planner()
    fail_calls(p, 1)
    call = start(p)
    call.on_response(launch(call, T0), response(), T0 + 0.01)

    fail_calls(p, 1)

    assert p.breakers.get("a").state == "closed"


def test_per_model_breaker_override_applies_only_to_that_model() -> None:
    p = planner(policy(breakers={"default": {"fail_max": 5, "reset_timeout_s": 30}, "a": {"fail_max": 1}}))

    fail_calls(p, 1)

    assert p.breakers.get("a").state == "open"
    assert p.breakers.get("a").settings.reset_timeout_s == 30  # inherited from default
    assert p.breakers.get("b").settings.fail_max == 5


def test_breaker_count_list_from_policy_limits_what_counts() -> None:
    p = planner(policy(breakers={"default": {"fail_max": 1, "reset_timeout_s": 30, "count": ["timeout"]}}))

    fail_calls(p, 3, error="internal_server_error")
    assert p.breakers.get("a").state == "closed"

    fail_calls(p, 1, error="timeout")
    assert p.breakers.get("a").state == "open"


def _half_open_planner() -> Planner:
    p = planner(policy(breakers={"default": {"fail_max": 1, "reset_timeout_s": 0.05}}))
    fail_calls(p, 1)
    assert p.breakers.get("a").state == "open"
    time.sleep(0.08)
    return p


def test_after_reset_timeout_one_probe_is_admitted_and_others_skip() -> None:
    p = _half_open_planner()

    probing = start(p)
    probe = launch(probing, T0)
    other = start(p)
    other_attempt = launch(other, T0)

    assert probe.spec.name == "a"
    assert probe.record.extra.get("probe") is True
    assert probe.record.breaker_state == "half-open"
    assert other_attempt.spec.name == "b"
    assert (other.records[0].outcome, other.records[0].reason) == ("skipped", "probe_in_flight")


def test_probe_success_closes_the_breaker() -> None:
    p = _half_open_planner()
    call = start(p)
    probe = launch(call, T0)

    call.on_response(probe, response(), T0 + 0.01)

    assert p.breakers.get("a").state == "closed"
    assert probe.record.breaker_transitions == [("half-open", "closed")]
    assert launch(start(p), T0).spec.name == "a"


def test_probe_failure_opens_the_breaker_again() -> None:
    p = _half_open_planner()
    call = start(p)
    probe = launch(call, T0)

    call.on_error(probe, ERRORS["timeout"](), T0 + 0.01)

    assert p.breakers.get("a").state == "open"
    later = start(p)
    assert launch(later, T0).spec.name == "b"
    assert later.records[0].reason == "breaker_open"


def test_cancelled_probe_frees_the_slot_without_counting() -> None:
    p = _half_open_planner()
    call = start(p)
    probe = launch(call, T0)

    call.on_cancelled(probe, T0 + 0.01)

    assert call.records[0].outcome == "cancelled"
    assert p.breakers.get("a").state == "half-open"
    assert launch(start(p), T0).record.extra.get("probe") is True


def test_probe_ended_by_a_neutral_error_frees_the_slot() -> None:
    p = _half_open_planner()
    call = start(p)
    call.on_error(launch(call, T0), ERRORS["bad_request"](), T0 + 0.01)

    assert launch(start(p), T0).spec.name == "a"


# -- keys from the environment ----------------------------------------------------------------------


def test_unset_api_key_variable_skips_model_with_reason_missing_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLMR_TEST_KEY_A", raising=False)
    models = {
        "a": {"litellm_params": {"model": "openai/a-model", "api_key": "os.environ/LLMR_TEST_KEY_A"}},
        "b": {"litellm_params": {"model": "openai/b-model", "api_key": "k"}},
    }
    p = planner(policy(models=models, routes={"chat": {"chain": ["a", "b"]}}))

    call = start(p)
    attempt = launch(call, T0)

    assert attempt.spec.name == "b"
    assert (call.records[0].outcome, call.records[0].reason) == ("skipped", "missing_api_key")
    assert call.records[0].extra["missing_env"] == "LLMR_TEST_KEY_A"


def test_api_key_variable_is_read_at_call_time(monkeypatch: pytest.MonkeyPatch) -> None:
    models = {"a": {"litellm_params": {"model": "openai/a-model", "api_key": "os.environ/LLMR_TEST_KEY_A"}}}
    p = planner(policy(models=models, routes={"chat": {"chain": ["a"]}}))

    monkeypatch.setenv("LLMR_TEST_KEY_A", "first")
    assert launch(start(p), T0).kwargs["api_key"] == "first"
    monkeypatch.setenv("LLMR_TEST_KEY_A", "rotated")
    assert launch(start(p), T0).kwargs["api_key"] == "rotated"


# -- routes ------------------------------------------------------------------------------------------


def test_model_name_from_models_is_a_one_model_route() -> None:
    call = start(planner(), "b")

    assert launch(call, T0).spec.name == "b"
    assert [s.name for s in call.route.chain] == ["b"]


def test_unknown_litellm_model_string_is_an_adhoc_route_using_callers_connection() -> None:
    call = start(planner(), "openai/other", api_base="http://caller/v1", api_key="caller-key")
    attempt = launch(call, T0)

    assert attempt.kwargs["model"] == "openai/other"
    assert attempt.kwargs["api_base"] == "http://caller/v1"
    assert attempt.kwargs["api_key"] == "caller-key"


def test_callers_messages_are_not_mutated() -> None:
    messages = [{"role": "user", "content": "hi"}]
    snapshot = [dict(m) for m in messages]
    call = start(planner(), messages=messages)
    call.on_error(launch(call, T0), ERRORS["context_window"](), T0 + 0.01)
    launch(call, T0 + 0.01)

    assert messages == snapshot


# -- hooks -------------------------------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def call_started(self, call: Call) -> None:
        self.events.append(("call_started", call.route.name))

    def attempt_started(self, call: Call, record: Any) -> None:
        self.events.append(("attempt_started", record.model))

    def attempt_ended(self, call: Call, record: Any, response: Any) -> None:
        self.events.append(("attempt_ended", (record.model, record.outcome)))

    def call_ended(self, call: Call, response: Any, error: BaseException | None) -> None:
        self.events.append(("call_ended", type(error).__name__ if error else "ok"))


def test_hooks_see_every_attempt_including_skips_in_order() -> None:
    recorder = Recorder()
    p = planner(hooks=[recorder])
    fail_calls(p, 2)  # opens a's breaker
    recorder.events.clear()

    call = start(p)
    attempt = launch(call, T0)
    call.on_response(attempt, response(), T0 + 0.01)

    assert recorder.events == [
        ("call_started", "chat"),
        ("attempt_started", "a"),
        ("attempt_ended", ("a", "skipped")),
        ("attempt_started", "b"),
        ("attempt_ended", ("b", "success")),
        ("call_ended", "ok"),
    ]
