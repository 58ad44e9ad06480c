"""Circuit breakers through real HTTP: an open breaker costs the sick provider nothing."""

from __future__ import annotations

import threading
from typing import Any

import litellm
import pytest
from conftest import MESSAGES, Caller, EngineFactory, PolicyBuilder, hidden, outcomes, wait_until

from llm_resilience import Resilience
from llm_resilience.testing import Behavior, FakeProvider

RESET_S = 0.5


def fail_until_open(engine: Resilience, model: str = "big", calls: int = 3) -> None:
    for _ in range(calls):
        engine.completion("chat", MESSAGES)
    assert engine.breaker_states()[model] == "open"


def test_open_breaker_skips_model_without_a_request(
    call: Caller, engine: Resilience, big: FakeProvider, small: FakeProvider
) -> None:
    big.set(Behavior.error(500))
    for _ in range(3):  # fail_max = 3
        assert hidden(call(engine, "chat", MESSAGES))["model"] == "small"
    assert engine.breaker_states()["big"] == "open"
    assert big.request_count == 3

    for _ in range(5):
        response = call(engine, "chat", MESSAGES)
        assert outcomes(response) == [("big", "skipped", "breaker_open"), ("small", "success", None)]
        assert hidden(response)["attempts"][0]["breaker_state"] == "open"

    assert big.request_count == 3  # not one request while open
    assert small.request_count == 8


def test_breaker_opens_on_consecutive_failures_only(engine: Resilience, big: FakeProvider) -> None:
    big.script(Behavior.error(500), Behavior.error(500), Behavior.ok(), Behavior.error(500), Behavior.error(500))

    for _ in range(5):
        engine.completion("chat", MESSAGES)

    assert engine.breaker_states()["big"] == "closed"  # the success in the middle reset the count
    assert big.request_count == 5


def test_timeouts_count_toward_the_breaker(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider
) -> None:
    big.set(Behavior.slow(2.0))
    engine = make_engine(policy_dict(["big", "small"], timeout_s=0.2, fail_max=2))

    for _ in range(2):
        engine.completion("chat", MESSAGES)

    assert engine.breaker_states()["big"] == "open"
    response = engine.completion("chat", MESSAGES)
    assert outcomes(response)[0] == ("big", "skipped", "breaker_open")
    assert big.request_count == 2


def test_breaker_state_is_shared_by_sync_and_async_calls(engine: Resilience, big: FakeProvider) -> None:
    import asyncio

    big.set(Behavior.error(503))
    fail_until_open(engine)

    response = asyncio.run(engine.acompletion("chat", MESSAGES))

    assert outcomes(response)[0] == ("big", "skipped", "breaker_open")
    assert big.request_count == 3


def test_excluded_kind_400_does_not_count(engine: Resilience, big: FakeProvider, small: FakeProvider) -> None:
    big.set(Behavior.error(400))
    for _ in range(5):
        with pytest.raises(litellm.exceptions.BadRequestError):
            engine.completion("chat", MESSAGES)

    assert engine.breaker_states()["big"] == "closed"
    assert engine.breakers.get("big").fail_counter == 0
    big.set(Behavior.ok("big is fine"))
    assert engine.completion("chat", MESSAGES).choices[0].message.content == "big is fine"
    assert small.request_count == 0


def test_400_between_failures_neither_counts_nor_resets(engine: Resilience, big: FakeProvider) -> None:
    big.script(Behavior.error(500), Behavior.error(500), Behavior.error(400), Behavior.error(500))

    engine.completion("chat", MESSAGES)
    engine.completion("chat", MESSAGES)
    with pytest.raises(litellm.exceptions.BadRequestError):
        engine.completion("chat", MESSAGES)
    engine.completion("chat", MESSAGES)

    assert engine.breaker_states()["big"] == "open"


def test_per_model_breaker_override_applies(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider, small: FakeProvider
) -> None:
    big.set(Behavior.error(500))
    small.set(Behavior.error(500))
    engine = make_engine(policy_dict(fail_max=3, breakers={"big": {"fail_max": 1}}))

    response = engine.completion("chat", MESSAGES)

    assert outcomes(response)[-1] == ("tiny", "success", None)
    assert engine.breaker_states() == {"big": "open", "small": "closed", "tiny": "closed"}
    assert engine.breakers.get("big").settings.fail_max == 1
    assert engine.breakers.get("small").settings.fail_max == 3


def test_breaker_count_setting_from_policy_decides_what_opens_it(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider
) -> None:
    big.set(Behavior.error(429))
    engine = make_engine(policy_dict(fail_max=1, breakers={"big": {"count": ["server_error"]}}))

    for _ in range(3):
        assert outcomes(engine.completion("chat", MESSAGES))[0] == ("big", "failure", "rate_limit")

    assert engine.breaker_states()["big"] == "closed"
    assert big.request_count == 3


# -- half-open ---------------------------------------------------------------------------------------


@pytest.fixture
def half_open(make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider) -> Resilience:
    """An engine whose ``big`` breaker was opened and whose reset timeout has just elapsed."""
    big.set(Behavior.error(500))
    # A timeout far above the probe's latency: on a loaded machine a probe must not fail by timing out.
    engine = make_engine(policy_dict(fail_max=2, reset_timeout_s=RESET_S, timeout_s=5.0, deadline_s=10.0))
    fail_until_open(engine, calls=2)
    assert big.request_count == 2
    assert outcomes(engine.completion("chat", MESSAGES))[0][2] == "breaker_open"
    # The reset timeout runs on the breaker's wall clock: poll its own verdict rather than sleep past it.
    assert wait_until(engine.breakers.get("big")._reset_timeout_elapsed, timeout=RESET_S + 5)
    big.reset(behaviors=True)  # healthy again unless the test says otherwise
    return engine


def test_half_open_lets_exactly_one_probe_through_ten_threads(half_open: Resilience, big: FakeProvider) -> None:
    # Slow enough that all ten threads reach the breaker while the probe is still in flight.
    big.set(Behavior.ok("recovered", latency_s=0.4))
    barrier = threading.Barrier(10)
    results: list[Any] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker() -> None:
        barrier.wait()
        try:
            response = half_open.completion("chat", MESSAGES)
        except BaseException as e:
            with lock:
                errors.append(e)
        else:
            with lock:
                results.append(response)

    threads = [threading.Thread(target=worker) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)

    assert errors == []
    assert len(results) == 10
    assert big.request_count == 1
    first = [hidden(r)["attempts"][0] for r in results]
    probes = [a for a in first if a["model"] == "big" and a["outcome"] == "success"]
    skipped = [a for a in first if a["reason"] == "probe_in_flight"]
    assert len(probes) == 1
    assert probes[0]["breaker_state"] == "half-open"
    assert len(skipped) == 9
    assert all(a["outcome"] == "skipped" for a in skipped)
    assert half_open.breaker_states()["big"] == "closed"


def test_probe_success_closes_the_breaker(half_open: Resilience, big: FakeProvider) -> None:
    response = half_open.completion("chat", MESSAGES)

    assert outcomes(response) == [("big", "success", None)]
    assert hidden(response)["attempts"][0]["breaker_transitions"] == [["half-open", "closed"]]
    assert half_open.breaker_states()["big"] == "closed"
    for _ in range(3):
        assert hidden(half_open.completion("chat", MESSAGES))["model"] == "big"
    assert big.request_count == 4


def test_probe_failure_opens_the_breaker_again(half_open: Resilience, big: FakeProvider, small: FakeProvider) -> None:
    big.set(Behavior.error(503))

    response = half_open.completion("chat", MESSAGES)

    assert outcomes(response)[0] == ("big", "failure", "server_error")
    assert hidden(response)["model"] == "small"
    assert half_open.breaker_states()["big"] == "open"
    later = half_open.completion("chat", MESSAGES)
    assert outcomes(later)[0] == ("big", "skipped", "breaker_open")
    assert big.request_count == 1  # the probe only


def test_async_probe_is_gated_too(half_open: Resilience, big: FakeProvider) -> None:
    import asyncio

    big.set(Behavior.ok("recovered", latency_s=0.3))

    async def many() -> list[Any]:
        return await asyncio.gather(*(half_open.acompletion("chat", MESSAGES) for _ in range(10)))

    results = asyncio.run(many())

    assert big.request_count == 1
    reasons = sorted(str(hidden(r)["attempts"][0]["reason"]) for r in results)
    assert reasons == ["None"] + ["probe_in_flight"] * 9
    assert half_open.breaker_states()["big"] == "closed"


@pytest.mark.sans_io
def test_an_injected_clock_decides_when_an_open_breaker_lets_a_probe_through() -> None:
    # What `llm-resilience simulate` relies on: breakers live in simulated time, not wall time.
    from datetime import UTC, datetime, timedelta

    from llm_resilience._breakers import Admission, BreakerRegistry, ProbeTicket
    from llm_resilience._policy import BreakerSettings

    now = [datetime(2030, 1, 1, tzinfo=UTC)]
    registry = BreakerRegistry(lambda model: BreakerSettings(fail_max=2, reset_timeout_s=30.0), clock=lambda: now[0])
    breaker = registry.get("big")
    for _ in range(2):
        breaker.record(ProbeTicket(probe=False), "server_error")
    assert breaker.state == "open"
    now[0] += timedelta(seconds=29.9)
    assert breaker.admit() is Admission.OPEN  # the wall clock barely moved; the injected one says 29.9 s
    now[0] += timedelta(seconds=0.2)
    assert breaker.admit() is Admission.PROBE


def _breaker_past_its_open_period() -> tuple[list[Any], Any]:
    """A breaker on an injected clock (``now[0]``), opened by one failure, 1.1 s later: its 1 s open period is over."""
    from datetime import UTC, datetime, timedelta

    from llm_resilience._breakers import BreakerRegistry, ProbeTicket
    from llm_resilience._policy import BreakerSettings

    now = [datetime(2030, 1, 1, tzinfo=UTC)]
    registry = BreakerRegistry(lambda model: BreakerSettings(fail_max=1, reset_timeout_s=1.0), clock=lambda: now[0])
    breaker = registry.get("big")
    breaker.record(ProbeTicket(probe=False), "server_error")
    now[0] += timedelta(seconds=1.1)
    return now, breaker


@pytest.mark.sans_io
def test_a_probe_still_out_past_its_calls_deadline_no_longer_holds_the_slot() -> None:
    # A starved event loop cannot run its own cut: in the soak one held a probe for 9 s (deadline 3 s)
    # while every thread skipped the model as "probe in flight". Past the time its call had left, the
    # slot is free for a caller that can judge the model; the late holder no longer frees the new one's.
    from datetime import timedelta

    from llm_resilience._breakers import Admission

    now, breaker = _breaker_past_its_open_period()
    starved, starved_ticket = breaker.admit_with_ticket(probe_for_s=3.0)
    assert starved is Admission.PROBE and breaker.state == "half-open"
    now[0] += timedelta(seconds=2.9)
    assert breaker.admit_with_ticket(probe_for_s=3.0)[0] is Admission.PROBE_BUSY  # its call still has time
    now[0] += timedelta(seconds=0.2)
    judge, judge_ticket = breaker.admit_with_ticket(probe_for_s=3.0)
    assert judge is Admission.PROBE and judge_ticket is not starved_ticket

    breaker.release(starved_ticket)  # the starved caller's attempt finally ends, without a verdict
    assert breaker.admit_with_ticket(probe_for_s=3.0)[0] is Admission.PROBE_BUSY  # the new probe keeps its slot
    breaker.record(judge_ticket, None)
    assert breaker.state == "closed"


@pytest.mark.sans_io
def test_a_probe_without_a_time_bound_holds_the_slot_until_it_reports() -> None:
    from datetime import timedelta

    from llm_resilience._breakers import Admission

    now, breaker = _breaker_past_its_open_period()
    assert breaker.admit() is Admission.PROBE
    now[0] += timedelta(hours=1)
    assert breaker.admit() is Admission.PROBE_BUSY
