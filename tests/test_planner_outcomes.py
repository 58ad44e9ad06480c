"""How a call ends, and what the planner reads from the caller's request (no server, injected clock).

The error of an attempt cut at its bound, what the caller gets when every model is exhausted
(``on_all_invalid``), which text the prompt-class rules read, and the once-per-process warning
for caller arguments the planner drops. Mutation testing found these unpinned below the HTTP tests.
"""

from __future__ import annotations

import logging
from typing import Any

import litellm
import pytest
from test_planner_streams import Checks, Ended

from llm_resilience import AllAttemptsFailed, _planner
from llm_resilience import _outcomes as k
from llm_resilience._breakers import BreakerRegistry
from llm_resilience._hooks import HookSet
from llm_resilience._planner import (
    Attempt,
    Call,
    CallRequest,
    Done,
    Fail,
    Launch,
    Planner,
    Wait,
    attempt_timeout,
    last_user_text,
)
from llm_resilience._policy import Policy

pytestmark = pytest.mark.sans_io  # no server: `make mutate` runs these for every mutant

lx = litellm.exceptions
T0 = 1000.0
MESSAGES = [{"role": "user", "content": "hello"}]


def make_planner(*, on_all_invalid: str | None = None, validator: Checks | None = None, **extra: Any) -> Planner:
    route: dict[str, Any] = {"chain": ["a", "b"]}
    if on_all_invalid is not None:
        route["on_all_invalid"] = on_all_invalid
    pol = Policy.from_dict(
        {
            "models": {
                name: {
                    "litellm_params": {
                        "model": f"openai/{name}-model",
                        "api_base": "http://127.0.0.1:9/v1",
                        "api_key": "k",
                    }
                }
                for name in ("a", "b")
            },
            "routes": {"chat": route},
            "prompt_classes": {
                "default": {"timeout_s": 1.0, "deadline_s": 3.0},
                "summarize": {"timeout_s": 4.0, "deadline_s": 8.0, "match": [{"last_user_regex": "(?i)summari[sz]e"}]},
            },
            "breakers": {"default": {"fail_max": 5, "reset_timeout_s": 30}},
        }
    )
    return Planner(
        policy=pol, breakers=BreakerRegistry(pol.breaker_settings), hooks=HookSet(extra.get("hooks", ())),
        validator=validator or Checks(),
    )  # fmt: skip


def start(p: Planner, messages: Any = MESSAGES, stream: bool = False, **kwargs: Any) -> Call:
    return p.start(CallRequest(model="chat", messages=messages, kwargs=kwargs, stream=stream), T0)


def launch(call: Call, now: float) -> Attempt:
    action = call.next_action(now)
    assert isinstance(action, Launch), action
    return action.attempt


# -- an attempt cut at its bound ------------------------------------------------------------------


def test_an_attempt_cut_at_its_bound_fails_with_litellms_timeout_naming_the_bound_and_model() -> None:
    call = start(make_planner())
    first = launch(call, T0)

    error = attempt_timeout(first)

    assert isinstance(error, lx.Timeout)
    assert "no answer within 1 s (whole attempt)" in str(error)
    assert error.model == "openai/a-model"
    assert error.llm_provider == "openai"


def test_the_bound_shows_three_significant_digits() -> None:
    call = start(make_planner(), timeout=0.123456)  # the caller's timeout caps the class's
    first = launch(call, T0)

    assert "no answer within 0.123 s (whole attempt)" in str(attempt_timeout(first))


def test_an_attempt_past_its_bound_is_cut_by_the_planner_and_the_next_model_starts() -> None:
    ended = Ended()
    p = make_planner(hooks=[ended])
    call = start(p)
    first = launch(call, T0)
    assert call.next_action(T0 + 0.5) is not None  # still within its bound

    second = launch(call, T0 + 1.0)  # a non-streaming attempt in flight past its bound: cut

    assert second.spec.name == "b"
    assert (first.record.outcome, first.record.reason) == ("failure", k.TIMEOUT)
    assert isinstance(first.record.error, lx.Timeout)
    assert p.breakers.get("a").fail_counter == 1
    assert [r for _, r in ended.attempts] == [first.record] and ended.told_about(call)


# -- every model exhausted --------------------------------------------------------------------------


def test_when_every_answer_fails_validation_return_best_hands_back_the_first_flagged() -> None:
    call = start(make_planner(on_all_invalid="return_best", validator=Checks(["empty"])))
    answers = [litellm.ModelResponse(), litellm.ModelResponse()]
    for answer in answers:
        call.on_response(launch(call, T0), answer, T0 + 0.1)

    action = call.next_action(T0 + 0.1)

    assert isinstance(action, Done) and action.response is answers[0]
    assert call.answered_by is call.records[0]
    assert call.records[0].extra["returned_as_best"] is True
    summary = call.summary()
    assert summary["flagged"] is True and summary["model"] == "a"
    assert summary["fallbacks"] == 1


def test_when_every_answer_fails_validation_raise_is_all_attempts_failed() -> None:
    ended = Ended()
    call = start(make_planner(on_all_invalid="raise", validator=Checks(["empty"]), hooks=[ended]))
    for _ in range(2):
        call.on_response(launch(call, T0), litellm.ModelResponse(), T0 + 0.1)

    action = call.next_action(T0 + 0.1)

    assert isinstance(action, Fail) and isinstance(action.error, AllAttemptsFailed)
    assert ended.calls == [(None, action.error)] and ended.told_about(call)
    assert "returned_as_best" not in call.records[0].extra


def test_all_attempts_failed_names_route_class_and_attempts_with_the_last_error_as_cause() -> None:
    ended = Ended()
    call = start(make_planner(hooks=[ended]))
    last = lx.ServiceUnavailableError("overloaded", "openai", "b-model")
    call.on_error(launch(call, T0), lx.RateLimitError("slow down", "openai", "a-model"), T0 + 0.1)
    call.on_error(launch(call, T0 + 0.1), last, T0 + 0.2)

    action = call.next_action(T0 + 0.2)

    assert isinstance(action, Fail)
    error = action.error
    assert isinstance(error, AllAttemptsFailed)
    assert (error.route, error.prompt_class) == ("chat", "default")
    assert [(r.model, r.reason) for r in error.attempts] == [("a", k.RATE_LIMIT), ("b", k.SERVER_ERROR)]
    assert error.__cause__ is last
    assert ended.calls == [(None, error)] and ended.told_about(call)
    assert len(ended.attempts) == 2
    assert call.next_action(T0 + 0.3) is action  # decided: the same answer every time


# -- what the class rules read ----------------------------------------------------------------------


def test_the_class_rules_read_the_last_user_message_only() -> None:
    p = make_planner()
    asked = [{"role": "user", "content": "summarise this"}, {"role": "assistant", "content": "ok"},
             {"role": "user", "content": "thanks"}]  # fmt: skip

    assert start(p, asked).prompt_class == "default"
    assert start(p, [*asked, {"role": "user", "content": "now summarize"}]).prompt_class == "summarize"
    assert start(p, [{"role": "system", "content": "summarize"}]).prompt_class == "default"


def test_the_text_of_a_multimodal_message_is_its_text_parts_joined() -> None:
    content = [
        {"type": "text", "text": "first"},
        {"type": "image_url", "image_url": {"url": "http://x/summarize.png"}, "text": "summarize"},
        "not a part",
        {"type": "text", "text": "second"},
        {"type": "text"},
    ]

    assert last_user_text([{"role": "user", "content": content}]) == "first second "
    assert last_user_text([{"role": "user", "content": None}]) == ""
    assert last_user_text([{"role": "assistant", "content": "hi"}]) == ""
    assert start(make_planner(), [{"role": "user", "content": content}]).prompt_class == "default"


# -- dropped caller arguments ------------------------------------------------------------------------


def test_dropped_arguments_are_warned_once_per_process_by_name(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_planner, "_dropped_warned", set())
    p = make_planner()
    with caplog.at_level(logging.WARNING, logger="llm_resilience"):
        start(p, fallbacks=["x"], num_retries=3)
        start(p, fallbacks=["y"], num_retries=4, max_retries=5)
        start(p, stream_timeout=9.0)  # not a stream: litellm's stream_timeout means nothing here
        start(p, stream=True, stream_timeout=9.0)
        start(p, stream=True, stream_timeout=8.0)

    named = [r.getMessage().split("'")[1] for r in caplog.records if "ignores the argument" in r.getMessage()]
    assert sorted(named) == ["fallbacks", "max_retries", "num_retries", "stream_timeout"]  # each once
    assert all(r.levelno == logging.WARNING for r in caplog.records if "ignores" in r.getMessage())


# -- the caller's own timeout= ------------------------------------------------------------------------


def builtin_defaults_planner() -> Planner:
    """A policy that defines no ``default`` class: calls it does not classify run under the built-in one."""
    pol = Policy.from_dict(
        {
            "models": {"a": {"litellm_params": {"model": "openai/a-model", "api_base": "http://127.0.0.1:9/v1"}}},
            "routes": {"chat": {"chain": ["a"]}},
        }
    )
    return Planner(policy=pol, breakers=BreakerRegistry(pol.breaker_settings), hooks=HookSet())


@pytest.mark.parametrize(
    ("timeout", "bound"),
    [(600, 600.0), (0.5, 0.5), (0.008, 0.01), (10**9, 86_400.0)],
    ids=["long", "short", "below_the_minimum", "above_a_day"],
)
def test_under_the_built_in_defaults_the_callers_timeout_is_both_attempt_timeout_and_deadline(
    timeout: float, bound: float
) -> None:
    call = start(builtin_defaults_planner(), timeout=timeout)
    first = launch(call, T0)

    assert call.klass.timeout_s == pytest.approx(bound)
    assert first.timeout_s == pytest.approx(min(bound, timeout))
    assert call.deadline_at == pytest.approx(T0 + min(bound, timeout))
    assert call.caller_deadline_at == pytest.approx(T0 + timeout)


@pytest.mark.parametrize("timeout", [None, 0, -1, True, "600"], ids=["none", "zero", "negative", "bool", "text"])
def test_a_timeout_that_is_not_a_positive_number_leaves_the_built_in_class(timeout: Any) -> None:
    kwargs = {} if timeout is None else {"timeout": timeout}
    call = start(builtin_defaults_planner(), **kwargs)
    first = launch(call, T0)

    assert first.timeout_s == 60.0
    assert call.deadline_at == T0 + 180.0
    assert call.caller_deadline_at is None


def test_a_class_the_policy_defines_keeps_its_timeouts_and_the_callers_timeout_caps_the_call() -> None:
    call = start(make_planner(), timeout=2.5)
    first = launch(call, T0)

    assert first.timeout_s == 1.0  # the class's
    assert call.deadline_at == pytest.approx(T0 + 2.5)  # the class's 3 s deadline, capped


# -- same-model retries ------------------------------------------------------------------------------


def retrying_planner(**retries: Any) -> Planner:
    pol = Policy.from_dict(
        {
            "models": {
                name: {"litellm_params": {"model": f"openai/{name}-model", "api_base": "http://127.0.0.1:9/v1"}}
                for name in ("a", "b")
            },
            "routes": {"chat": {"chain": ["a", "b"], "retries": {"max_retries": 2, "min_per_s": 10.0, **retries}}},
            "prompt_classes": {"default": {"timeout_s": 1.0, "deadline_s": 3.0}},
        }
    )
    p = Planner(policy=pol, breakers=BreakerRegistry(pol.breaker_settings), hooks=HookSet())
    p.rng.seed(7)
    return p


def overloaded(**headers: str) -> Exception:
    import httpx

    response = httpx.Response(503, headers=headers, request=httpx.Request("POST", "http://127.0.0.1:9/v1"))
    return lx.ServiceUnavailableError("overloaded", "openai", "a-model", response=response)


def test_the_retry_kinds_by_default_are_rate_limit_server_error_and_connection() -> None:
    retries = start(retrying_planner()).route.retries
    assert retries is not None and retries.retry_on == ["rate_limit", "server_error", "connection"]


def test_a_retry_waits_at_least_what_the_provider_asked() -> None:
    call = start(retrying_planner(backoff_base_s=0.01))
    first = launch(call, T0)

    call.on_error(first, overloaded(**{"retry-after": "1.5"}), T0 + 0.1)

    waiting = call.next_action(T0 + 0.1)
    assert waiting == _planner.Wait(until=pytest.approx(T0 + 1.6))  # type: ignore[arg-type]
    assert first.record.extra["retry_after_s"] == 1.5
    assert first.record.extra["retry_in_s"] == 1.5
    retry = launch(call, T0 + 1.6)
    assert (retry.spec.name, retry.record.retry_of) == ("a", 0)


def test_a_retry_the_deadline_leaves_no_room_for_moves_on_to_the_next_model() -> None:
    call = start(retrying_planner(retry_after_max_s=10.0))
    first = launch(call, T0)

    call.on_error(first, overloaded(**{"retry-after": "5"}), T0 + 0.1)  # the deadline is 3 s

    assert launch(call, T0 + 0.1).spec.name == "b"
    assert first.record.extra["retry_skipped"] == "deadline"


def test_a_retry_after_longer_than_retry_after_max_s_moves_on_to_the_next_model_at_once() -> None:
    call = start(retrying_planner(retry_after_max_s=2.0, max_retries=1))
    first = launch(call, T0)

    call.on_error(first, overloaded(**{"retry-after": "2.5"}), T0 + 0.1)  # within the 3 s deadline

    assert launch(call, T0 + 0.1).spec.name == "b"
    assert first.record.extra["retry_skipped"] == "retry_after"
    assert first.record.extra["retry_after_s"] == 2.5


def test_a_retry_after_within_retry_after_max_s_is_waited_out_on_the_same_model() -> None:
    call = start(retrying_planner(retry_after_max_s=2.0, max_retries=1))
    first = launch(call, T0)

    call.on_error(first, overloaded(**{"retry-after": "1.5"}), T0 + 0.1)

    assert call.next_action(T0 + 0.2) == Wait(until=pytest.approx(T0 + 1.6))
    assert launch(call, T0 + 1.6).spec.name == "a"


def test_retries_stop_at_max_retries_and_the_chain_moves_on() -> None:
    call = start(retrying_planner(max_retries=1, backoff_base_s=0.01))
    first = launch(call, T0)
    call.on_error(first, overloaded(), T0)
    waiting = call.next_action(T0)
    assert isinstance(waiting, _planner.Wait) and waiting.until is not None
    retry = launch(call, waiting.until)

    call.on_error(retry, overloaded(), waiting.until)

    assert launch(call, waiting.until).spec.name == "b"
    assert retry.record.extra["retry_skipped"] == "max_retries"


# -- panic: every model skipped because its breaker is open -------------------------------------------


def panic_planner(breakers: dict[str, Any] | None = None, *, key_of_b: str = "k") -> Planner:
    pol = Policy.from_dict(
        {
            "models": {
                "a": {
                    "litellm_params": {"model": "openai/a-model", "api_base": "http://127.0.0.1:9/v1", "api_key": "k"}
                },
                "b": {
                    "litellm_params": {
                        "model": "openai/b-model",
                        "api_base": "http://127.0.0.1:9/v1",
                        "api_key": key_of_b,
                    }
                },
            },
            "routes": {"chat": {"chain": ["a", "b"]}},
            "prompt_classes": {"default": {"timeout_s": 1.0, "deadline_s": 3.0}},
            "breakers": breakers or {"default": {"fail_max": 1, "reset_timeout_s": 30}},
        }
    )
    return Planner(policy=pol, breakers=BreakerRegistry(pol.breaker_settings), hooks=HookSet())


def open_breaker(p: Planner, name: str) -> None:
    breaker = p.breakers.get(name)
    breaker.record(breaker.admit_with_ticket()[1], k.CONNECTION)
    assert breaker.state == "open"


def test_no_panic_once_a_request_was_sent() -> None:
    p = panic_planner()
    open_breaker(p, "b")
    call = start(p)
    call.on_error(launch(call, T0), lx.ServiceUnavailableError("overloaded", "openai", "a-model"), T0 + 0.1)

    assert isinstance(call.next_action(T0 + 0.1), Fail)  # a answered (badly): b's open breaker is respected


def test_no_panic_when_a_model_was_skipped_for_another_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLM_RESILIENCE_TEST_UNSET_KEY", raising=False)
    p = panic_planner(key_of_b="os.environ/LLM_RESILIENCE_TEST_UNSET_KEY")
    open_breaker(p, "a")
    call = start(p)

    action = call.next_action(T0)

    assert isinstance(action, Fail)  # b has no key: trying a past its breaker would not be a last resort
    assert [r.reason for r in call.records] == [k.BREAKER_OPEN, k.MISSING_API_KEY]


def test_panic_tries_only_models_whose_breaker_allows_it() -> None:
    p = panic_planner({"default": {"fail_max": 1, "reset_timeout_s": 30}, "a": {"panic": "fail_fast"}})
    open_breaker(p, "a")  # opened first, but its policy says fail fast
    open_breaker(p, "b")
    call = start(p)

    assert launch(call, T0).spec.name == "b"


def test_panic_is_tried_once_per_call() -> None:
    p = panic_planner()
    open_breaker(p, "a")
    open_breaker(p, "b")
    call = start(p)

    assert launch(call, T0).record.extra["panic"] is True
    call.on_error(call.in_flight[0], ConnectionError("refused"), T0 + 0.1)
    assert isinstance(call.next_action(T0 + 0.1), Fail)  # once per call


# -- Retry-After, wherever litellm put it ----------------------------------------------------------------


class HeadersOnly(Exception):
    """An SDK error that carries the response headers itself (litellm's ``litellm_response_headers``)."""

    def __init__(self, headers: dict[str, str]) -> None:
        super().__init__("overloaded")
        self.litellm_response_headers = headers


class LazyResponse(Exception):
    """An SDK error whose ``.response`` is computed on access and fails."""

    @property
    def response(self) -> Any:
        raise RuntimeError("no response object")

    headers = {"retry-after": "3"}


def test_retry_after_is_read_from_litellms_response_headers_too() -> None:
    assert _planner.retry_after_s(HeadersOnly({"Retry-After": "4"})) == 4.0
    assert _planner.retry_after_s(HeadersOnly({"retry-after-ms": "1500"})) == 1.5


def test_retry_after_survives_a_response_that_cannot_be_read() -> None:
    assert _planner.retry_after_s(LazyResponse()) == 3.0


def test_a_retry_after_in_the_past_or_negative_means_no_wait() -> None:
    assert _planner.retry_after_s(HeadersOnly({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})) == 0.0
    assert _planner.retry_after_s(HeadersOnly({"Retry-After": "-3"})) == 0.0
    assert _planner.retry_after_s(HeadersOnly({"retry-after-ms": "-3"})) == 0.0
    assert _planner.retry_after_s(HeadersOnly({"x-other": "3"})) is None
    assert _planner.retry_after_s(None) is None


def test_the_policy_owns_where_a_request_goes_and_as_whom() -> None:
    call = start(make_planner(), api_version="2024-01-01", aws_region_name="eu-west-1", organization="org", top_p=0.5)

    sent = launch(call, T0).kwargs

    assert "api_version" not in sent and "aws_region_name" not in sent and "organization" not in sent
    assert sent["top_p"] == 0.5  # not an endpoint argument: passed through


def test_the_timeout_error_names_the_provider_of_a_model_with_a_path() -> None:
    pol = Policy.from_dict(
        {
            "models": {"a": {"litellm_params": {"model": "openrouter/meta/llama-3", "api_base": "http://127.0.0.1:9"}}},
            "routes": {"chat": {"chain": ["a"]}},
        }
    )
    p = Planner(policy=pol, breakers=BreakerRegistry(pol.breaker_settings), hooks=HookSet())

    error = attempt_timeout(launch(start(p), T0))

    assert (error.llm_provider, error.model) == ("openrouter", "openrouter/meta/llama-3")


def test_the_dropped_argument_warning_says_why_and_stream_timeout_only_for_streams(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_planner, "_dropped_warned", set())
    with caplog.at_level(logging.WARNING, logger="llm_resilience"):
        start(make_planner(), fallbacks=["x"], stream_timeout=9.0)

    messages = [r.getMessage() for r in caplog.records if "ignores" in r.getMessage()]
    assert messages == [
        "llm_resilience ignores the argument 'fallbacks': the policy's chain decides fallbacks (logged once)"
    ]


# -- the caller's errors: raised at once, counted nowhere -----------------------------------------


def _unencodable_body_error() -> Exception:
    """What litellm raises when the body cannot be encoded: a 500 wrapping the UnicodeEncodeError."""
    try:
        "\ud800".encode()
    except UnicodeEncodeError as encode_error:
        inner = encode_error
    outer = lx.InternalServerError("OpenAIException - 'utf-8' codec can't encode", "openai", "a-model")
    outer.__cause__ = inner
    return outer


def test_a_request_that_could_not_be_encoded_fails_the_call_at_once_and_counts_on_no_breaker() -> None:
    p = make_planner()
    call = start(p)
    attempt = launch(call, T0)
    error = _unencodable_body_error()

    call.on_error(attempt, error, T0 + 0.01)

    action = call.next_action(T0 + 0.01)
    assert isinstance(action, Fail) and action.error is error  # the caller's own error, not AllAttemptsFailed
    assert [(r.model, r.outcome, r.reason) for r in call.records] == [("a", "failure", k.CALLER_ERROR)]
    assert p.breakers.get("a").fail_counter == 0
    assert p.breakers.get("a").suspect is False


def test_an_attempt_whose_request_never_left_the_client_is_the_callers_error() -> None:
    p = make_planner()
    call = start(p)
    attempt = launch(call, T0)
    attempt.io_measured, attempt.sent_at = True, None  # the driver saw no request leave

    call.on_error(attempt, lx.InternalServerError("oops", "openai", "a-model"), T0 + 0.01)

    assert isinstance(call.next_action(T0 + 0.01), Fail)
    assert call.records[0].reason == k.CALLER_ERROR and p.breakers.get("a").fail_counter == 0


def test_the_same_error_once_the_request_was_sent_is_the_providers() -> None:
    p = make_planner()
    call = start(p)
    attempt = launch(call, T0)
    attempt.io_measured, attempt.sent_at = True, T0 + 0.001

    call.on_error(attempt, lx.InternalServerError("oops", "openai", "a-model"), T0 + 0.01)

    assert call.records[0].reason == k.SERVER_ERROR and p.breakers.get("a").fail_counter == 1
    assert isinstance(call.next_action(T0 + 0.01), Launch)  # falls back to b


def test_a_bound_that_fired_before_the_request_left_is_still_a_timeout() -> None:
    p = make_planner()
    call = start(p)
    attempt = launch(call, T0)
    attempt.io_measured, attempt.sent_at, attempt.expired = True, None, True

    call.on_error(attempt, attempt_timeout(attempt), T0 + 1.5)

    assert call.records[0].reason == k.TIMEOUT


def test_a_probe_that_never_left_frees_its_slot_without_a_verdict() -> None:
    p = make_planner()
    breaker = p.breakers.get("a")
    for _ in range(5):
        breaker.record(breaker.admit_with_ticket()[1], k.SERVER_ERROR)
    breaker._opened_mono -= 31  # its cooldown passed
    call = start(p)
    attempt = launch(call, T0)
    assert attempt.ticket.probe

    call.on_error(attempt, _unencodable_body_error(), T0 + 0.01)

    assert breaker.state == "half-open" and breaker._probe is None  # the next request probes


def test_a_model_string_longer_than_the_limit_is_refused_before_a_call_starts() -> None:
    p = make_planner()
    with pytest.raises(lx.BadRequestError, match="1025 characters long"):
        p.start(CallRequest(model="m" * (_planner.MAX_MODEL_CHARS + 1), messages=MESSAGES, kwargs={}), T0)
    assert p.breakers.models() == []
    p.start(CallRequest(model="m" * _planner.MAX_MODEL_CHARS, messages=MESSAGES, kwargs={}), T0)  # at the limit
