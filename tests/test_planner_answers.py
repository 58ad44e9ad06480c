"""What a 200 answer means: the validator's verdict, slowness, and what hooks hear (no server, injected clock).

README "Validators": each check is ``fall_back`` (try the next model; the soft failure counts toward
the breaker when ``breakers.*.count`` lists it), ``flag`` (returned, marked) or ``off``; the validator
is given the route, the request, the answer and the arguments the attempt was sent with. README
"How it decides": an answer slower than the soft timeout (strictly) is slow; the latency window learns
every answer the client did not slow down; a stream's latency is its time to first content, or the
whole call when no content came.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import litellm
import pytest
from test_planner_streams import first_content, interruption, start_stream, stream_planner
from test_under_load_planner import T0, Scripted, launch, make_planner, start

from llm_resilience import _outcomes as k
from llm_resilience._breakers import Admission, ProbeTicket
from llm_resilience._hooks import HookSet
from llm_resilience._latency import LatencyStats
from llm_resilience._planner import Call, CallRequest, Done, Planner, Wait
from llm_resilience._policy import Policy, ResolvedRoute

pytestmark = pytest.mark.sans_io  # no server: `make mutate` runs these for every mutant

lx = litellm.exceptions
MESSAGES = [{"role": "user", "content": "hello"}]
SOFT = {"warmup_s": 0.5, "min_samples": 50}


class Keeps:
    """A validator that fails the checks it is told and keeps what it was given."""

    def __init__(self, failed: list[str]) -> None:
        self.failed = failed
        self.given: list[tuple[Any, ...]] = []

    def check(self, route: ResolvedRoute, request: Any, response: Any, sent: Any = None) -> list[str]:
        self.given.append((route, request, response, sent))
        return list(self.failed)


class Hears:
    """A hook that keeps every attempt start and end it hears."""

    def __init__(self) -> None:
        self.started: list[tuple[Any, Any]] = []
        self.ended: list[tuple[Any, Any, Any]] = []

    def attempt_started(self, call: Call, record: Any) -> None:
        self.started.append((call, record))

    def attempt_ended(self, call: Call, record: Any, response: Any) -> None:
        self.ended.append((call, record, response))


def validated_planner(failed: list[str], validators: dict[str, str], **breakers: Any) -> Planner:
    pol = Policy.from_dict(
        {
            "models": {
                name: {"litellm_params": {"model": f"openai/{name}", "api_base": "http://127.0.0.1:9/v1"}}
                for name in ("a", "b")
            },
            "routes": {"chat": {"chain": ["a", "b"], "validators": validators}},
            "prompt_classes": {"default": {"timeout_s": 1.0, "deadline_s": 3.0}},
            "breakers": {"default": {"fail_max": 5, "reset_timeout_s": 30, **breakers}},
        }
    )
    from llm_resilience._breakers import BreakerRegistry

    return Planner(policy=pol, breakers=BreakerRegistry(pol.breaker_settings), hooks=HookSet(), validator=Keeps(failed))


def test_the_validator_is_given_the_route_request_answer_and_what_was_sent() -> None:
    p = validated_planner([], {})
    call = p.start(CallRequest(model="chat", messages=MESSAGES, kwargs={"temperature": 0.1}), T0)
    first = launch(call, T0)
    answer = litellm.ModelResponse()

    call.on_response(first, answer, T0 + 0.1)

    assert isinstance(p.validator, Keeps)
    [(route, request, response, sent)] = p.validator.given
    assert route is call.route and request is call.request and response is answer
    assert sent is first.kwargs and sent["temperature"] == 0.1


def test_a_check_set_to_flag_returns_the_answer_marked() -> None:
    p = validated_planner(["empty"], {"empty": "flag"})
    call = start(p)
    first = launch(call, T0)
    answer = litellm.ModelResponse()

    call.on_response(first, answer, T0 + 0.1)

    assert call.next_action(T0 + 0.1) == Done(answer)
    assert (first.record.outcome, first.record.reason) == ("flagged", "empty")
    assert first.record.extra["failed_checks"] == ["empty"]


def test_a_fall_back_check_the_breaker_counts_is_a_failure_of_that_kind_and_the_hooks_see_the_answer() -> None:
    p = validated_planner(["empty"], {"empty": "fall_back"}, fail_max=1, count=["empty"])
    hears = Hears()
    p.hooks = HookSet([hears])
    call = start(p)
    first = launch(call, T0)
    answer = litellm.ModelResponse()

    call.on_response(first, answer, T0 + 0.1)

    assert (first.record.outcome, first.record.reason) == ("soft_failure", "empty")
    assert first.record.extra["failed_checks"] == ["empty"]
    assert p.breakers.get("a").state == "open" and p.breakers.get("a").last_transition.last_failure == "empty"
    assert hears.ended == [(call, first.record, answer)]
    assert launch(call, T0 + 0.1).spec.name == "b"


def test_a_soft_failure_counted_slow_in_flight_is_not_counted_again() -> None:
    p = make_planner(chain=("a",), soft={"warmup_s": 0.2, "min_samples": 50},
                     breakers={"count": ["empty", "soft_timeout"]})  # fmt: skip  # fail_max 2
    p.validator = Keeps(["empty"])
    call = start(p)
    first = launch(call, T0)
    assert isinstance(call.next_action(T0 + 0.3), Wait) and first.record.extra["slow"] is True

    call.on_response(first, litellm.ModelResponse(), T0 + 0.4)  # slow, and then empty: one verdict

    assert first.record.outcome == "soft_failure"
    assert p.breakers.get("a").fail_counter == 1 and p.breakers.get("a").state == "closed"


def test_a_success_and_its_answer_are_what_hooks_hear() -> None:
    hears = Hears()
    p = make_planner()
    p.hooks = HookSet([hears])
    call = start(p)
    first = launch(call, T0)
    answer = litellm.ModelResponse()

    call.on_response(first, answer, T0 + 0.1)

    assert hears.started == [(call, first.record)]
    assert hears.ended == [(call, first.record, answer)]


def test_a_skipped_model_is_started_and_ended_for_the_hooks_of_its_call() -> None:
    hears = Hears()
    p = make_planner()
    p.hooks = HookSet([hears])
    breaker = p.breakers.get("a")
    breaker.record(ProbeTicket(probe=False), k.SERVER_ERROR)
    breaker.record(ProbeTicket(probe=False), k.SERVER_ERROR)
    call = start(p)

    launch(call, T0)

    skipped = call.records[0]
    assert hears.started[0] == (call, skipped) and hears.ended[0] == (call, skipped, None)


# -- slow or not -------------------------------------------------------------------------------------------


def window(p: Planner) -> LatencyStats:
    assert isinstance(p.latency, LatencyStats)
    return p.latency


def test_an_answer_exactly_at_the_soft_timeout_is_not_slow_and_is_learned() -> None:
    p = make_planner(Scripted(delay_s=0.1), chain=("a",), soft=SOFT)
    call = start(p)
    first = launch(call, T0)

    call.on_response(first, object(), T0 + 0.5)

    assert "slow" not in first.record.extra and "client_overload" not in first.record.extra
    assert p.breakers.get("a").fail_counter == 0
    assert window(p).samples("a", "default") == (1, 0)


def test_a_fast_answer_is_learned_even_while_the_client_is_slow() -> None:
    p = make_planner(Scripted(delay_s=0.1), chain=("a",), soft=SOFT)
    call = start(p)
    first = launch(call, T0)

    call.on_response(first, object(), T0 + 0.2)

    assert window(p).samples("a", "default") == (1, 0)


def test_the_planner_wakes_for_a_slow_flag_the_client_postponed_when_the_providers_share_reaches_it() -> None:
    p = make_planner(Scripted(delay_s=0.1), chain=("a",), soft={"warmup_s": 0.2, "min_samples": 50})
    call = start(p)
    first = launch(call, T0)

    waiting = call.next_action(T0 + 0.2)  # 0.1 s of the 0.2 s were the client's: not slow yet

    assert "slow" not in first.record.extra
    assert waiting == Wait(until=pytest.approx(T0 + 0.3))


def test_a_request_that_never_left_the_client_spent_all_its_time_in_the_client() -> None:
    p = make_planner(Scripted(), hedge={"after": 0.3, "budget_ratio": 1.0})
    call = start(p)
    first = launch(call, T0)
    first.io_measured = True  # the driver measures; litellm has not sent the request yet

    assert isinstance(call.next_action(T0 + 0.3), Wait)  # no hedge: the provider has had nothing to do

    assert first.record.extra["client_delay_s"] == pytest.approx(0.3)


def test_a_saturated_probe_whose_providers_share_is_exactly_its_soft_timeout_is_judged() -> None:
    wall = [datetime(2026, 1, 1, tzinfo=UTC)]
    p = make_planner(Scripted(delay_s=0.5), chain=("a",), soft=SOFT, wall=wall)
    breaker = p.breakers.get("a")
    breaker.record(ProbeTicket(probe=False), k.SERVER_ERROR)
    breaker.record(ProbeTicket(probe=False), k.SERVER_ERROR)
    wall[0] += timedelta(seconds=31)
    call = start(p)
    probe = launch(call, T0)
    assert probe.record.extra["probe"] is True

    call.on_response(probe, object(), T0 + 1.0)  # 1 s: half the client's, the provider's 0.5 s is not past 0.5 s

    assert breaker.state == "closed"


# -- streams -------------------------------------------------------------------------------------------------


def test_a_stream_that_ended_without_content_is_timed_by_its_whole_call() -> None:
    p = stream_planner(chain=("a",), soft={"warmup_s": 0.5, "min_samples": 50})
    call = start_stream(p)
    first = launch(call, T0)

    call.on_response(first, litellm.ModelResponse(), T0 + 0.7)  # no chunk with content ever came

    assert first.record.extra["slow"] is True


def test_a_committed_stream_flagged_by_a_fall_back_check_counts_as_that_check() -> None:
    from test_planner_streams import Checks

    p = stream_planner(chain=("a", "b"), validator=Checks(["empty"]), breakers={"fail_max": 1, "count": ["empty"]})
    call = start_stream(p)
    first = launch(call, T0)
    first_content(call, first, T0 + 0.1)

    call.on_response(first, litellm.ModelResponse(), T0 + 0.2)

    assert first.record.outcome == "flagged"
    assert p.breakers.get("a").last_transition.last_failure == "empty"


def test_a_caller_who_stops_reading_while_the_continuation_has_not_started_ends_the_call() -> None:
    p = stream_planner()
    call = start_stream(p)
    first = launch(call, T0)
    first_content(call, first, T0 + 0.1)
    call.on_interrupted(first, interruption("Hel", lx.APIConnectionError("cut", "openai", "a")), "Hel", T0 + 0.2)
    cont = launch(call, T0 + 0.2)

    call.cancel(T0 + 0.3)

    assert call.finished and cont.record.outcome == "cancelled"


def test_a_half_open_model_rejecting_the_prefill_frees_its_probe_slot() -> None:
    wall = [datetime(2026, 1, 1, tzinfo=UTC)]
    p = stream_planner(prefill={"b": True, "c": True}, wall=wall)
    b = p.breakers.get("b")
    b.record(ProbeTicket(probe=False), k.SERVER_ERROR)
    b.record(ProbeTicket(probe=False), k.SERVER_ERROR)
    wall[0] += timedelta(seconds=31)
    call = start_stream(p)
    first = launch(call, T0)
    first_content(call, first, T0 + 0.1)
    call.on_interrupted(first, interruption("Hello", lx.APIConnectionError("cut", "openai", "a")), "Hello", T0 + 0.5)
    cont = launch(call, T0 + 0.5)
    assert (cont.spec.name, cont.record.extra["probe"]) == ("b", True)

    call.on_error(cont, lx.BadRequestError("assistant prefill is not supported", "b", "openai"), T0 + 0.6)

    assert b.state == "half-open"
    admission, ticket = b.admit_with_ticket()
    assert admission is Admission.PROBE and ticket.probe  # the slot is free: the next request to b probes it


def test_a_model_litellms_map_says_can_prefill_continues_the_stream() -> None:
    pol = Policy.from_dict(
        {
            "models": {
                "a": {"litellm_params": {"model": "openai/a", "api_base": "http://127.0.0.1:9/v1", "api_key": "k"}},
                "d": {"litellm_params": {"model": "deepseek/deepseek-chat", "api_base": "http://127.0.0.1:9/v1",
                                         "api_key": "k"}},
            },
            "routes": {"chat": {"chain": ["a", "d"], "streaming": {"on_interrupt": "continue"}}},
        }
    )  # fmt: skip
    from llm_resilience._breakers import BreakerRegistry

    p = Planner(policy=pol, breakers=BreakerRegistry(pol.breaker_settings), hooks=HookSet())
    call = start_stream(p)
    first = launch(call, T0)
    first_content(call, first, T0 + 0.1)
    call.on_interrupted(first, interruption("Hello", lx.APIConnectionError("cut", "openai", "a")), "Hello", T0 + 0.5)

    assert launch(call, T0 + 0.5).spec.name == "d"
