"""Half-open decisions belong to the probe: late outcomes, the probe gate, stream probes, recovery time.

Issue 7 item 3: an outcome from a request admitted before the breaker's last transition must not
move it; the reset timeout is checked inside the probe gate; a stream probe is judged when its
provider answers, not when the caller finishes reading. And the recovery defaults: a healed
primary is back in use within the reset timeout, with backoff after failed probes only as an
opt-in with a cap.
"""

from __future__ import annotations

import itertools
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import MESSAGES, EngineFactory, PolicyBuilder, hidden, outcomes

from llm_resilience import Policy, Resilience
from llm_resilience._breakers import Admission, ModelBreaker
from llm_resilience._policy import BreakerSettings, ResetBackoff
from llm_resilience.testing import Behavior, FakeProvider


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll observed state with a bound (no sleeps as synchronisation)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


def breaker(reset_timeout_s: float = 0.05, fail_max: int = 2, **settings: Any) -> ModelBreaker:
    return ModelBreaker("m", BreakerSettings(fail_max=fail_max, reset_timeout_s=reset_timeout_s, **settings), [])


def open_it(b: ModelBreaker) -> None:
    for _ in range(b.settings.fail_max):
        admission, ticket = b.admit_with_ticket()
        assert admission is Admission.ADMIT
        b.record(ticket, "server_error")
    assert b.state == "open"


def take_probe(b: ModelBreaker) -> Any:
    """Wait out the open period, then take the probe slot."""
    result: list[Any] = []

    def probe_admitted() -> bool:
        admission, ticket = b.admit_with_ticket()
        if admission is Admission.PROBE:
            result.append(ticket)
            return True
        return False

    wait_until(probe_admitted)
    return result[0]


# -- the state machine, without a server ---------------------------------------------------------


@pytest.mark.sans_io
def test_success_admitted_before_the_breaker_opened_does_not_close_it_during_a_probe() -> None:
    b = breaker()
    _, sent_before = b.admit_with_ticket()  # a slow request, still in flight while the breaker opens
    open_it(b)
    probe = take_probe(b)
    assert b.state == "half-open"

    b.record(sent_before, None)  # its late success

    assert b.state == "half-open"
    assert b.admit() is Admission.PROBE_BUSY  # the probe still holds the slot
    b.record(probe, None)
    assert b.state == "closed"


@pytest.mark.sans_io
def test_failure_admitted_before_the_breaker_opened_does_not_reopen_it_during_a_probe() -> None:
    b = breaker()
    _, sent_before = b.admit_with_ticket()
    open_it(b)
    probe = take_probe(b)

    b.record(sent_before, "server_error")  # a late 503 from before the outage was noticed

    assert b.state == "half-open"
    b.record(probe, None)  # the probe's success is not dropped
    assert b.state == "closed"


@pytest.mark.sans_io
def test_outcomes_of_the_current_generation_still_count() -> None:
    b = breaker(fail_max=3)
    tickets = [b.admit_with_ticket()[1] for _ in range(3)]
    for ticket in tickets:
        b.record(ticket, "timeout")
    assert b.state == "open"


def test_reset_timeout_is_checked_inside_the_probe_gate() -> None:
    """Many threads, tiny switch interval: never two probes within one open period."""
    reset_s = 0.1
    b = breaker(reset_timeout_s=reset_s, fail_max=1)
    open_it(b)
    probes: list[float] = []
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            admission, ticket = b.admit_with_ticket()
            if admission is Admission.PROBE:
                probes.append(time.monotonic())
                b.record(ticket, "server_error")  # every probe fails: the breaker re-opens at once

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=hammer) for _ in range(16)]
        for t in threads:
            t.start()
        time.sleep(1.0)  # the observation window, not synchronisation
        stop.set()
        for t in threads:
            t.join(5)
    finally:
        sys.setswitchinterval(old)

    gaps = [later - earlier for earlier, later in itertools.pairwise(probes)]
    assert probes, "no probe at all"
    # opened_at has microsecond resolution; allow a hair of clock skew between the two clocks.
    assert min(gaps, default=reset_s) >= reset_s * 0.9, f"back-to-back probes: {gaps}"


@pytest.mark.sans_io
def test_reset_backoff_grows_after_failed_probes_up_to_its_cap_and_resets_on_success() -> None:
    b = breaker(reset_timeout_s=1.0, reset_backoff=ResetBackoff(factor=3.0, max_s=5.0))
    open_it(b)
    assert b.open_period_s == 1.0
    for expected in (3.0, 5.0, 5.0):  # 1 x 3, then 9 capped at 5
        b._cb.half_open()  # the probe slot is not what this checks: only the failed-probe count
        _, probe = b.admit_with_ticket()
        b.record(probe, "server_error")
        assert b.state == "open"
        assert b.open_period_s == expected
    b._cb.half_open()
    _, probe = b.admit_with_ticket()
    b.record(probe, None)
    assert b.state == "closed"
    assert b.open_period_s == 1.0


@pytest.mark.sans_io
def test_without_reset_backoff_every_open_period_is_the_reset_timeout() -> None:
    b = breaker(reset_timeout_s=1.0, reset_backoff=None)
    open_it(b)
    for _ in range(3):
        b._cb.half_open()
        _, probe = b.admit_with_ticket()
        b.record(probe, "server_error")
        assert b.open_period_s == 1.0


@pytest.mark.sans_io
def test_library_defaults_bring_a_healed_primary_back_within_15_s() -> None:
    """The documented defaults: 5 failures open it, 5 s until a probe, doubled per failed probe up to 60 s."""
    settings = Policy.defaults().breaker_default
    assert (settings.fail_max, settings.reset_timeout_s, settings.success_threshold) == (5, 5.0, 1)
    assert settings.reset_backoff is not None
    assert (settings.reset_backoff.factor, settings.reset_backoff.max_s) == (2.0, 60.0)
    # A blip: the primary heals just after the first failed probe; the next comes 10 s later.
    assert settings.reset_timeout_s * settings.reset_backoff.factor < 15.0


# -- through real HTTP ------------------------------------------------------------------------------

RESET_S = 0.3


@pytest.fixture
def generations(make_engine: EngineFactory, policy_dict: PolicyBuilder) -> Resilience:
    return make_engine(policy_dict(["big", "small"], fail_max=2, reset_timeout_s=RESET_S, timeout_s=4.0, deadline_s=8))


def _in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as e:  # surfaced by the test's assertions
            out.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def _open_then_probe(engine: Resilience, big: FakeProvider, late: Behavior, probe: Behavior) -> Iterator[Any]:
    """A request to big that answers late (``late``), two failures that open the breaker, then a probe."""
    big.script(late, Behavior.error(500), Behavior.error(500), probe)
    slow_thread, slow_out = _in_thread(lambda: engine.completion("chat", MESSAGES))
    wait_until(lambda: big.request_count == 1)
    for _ in range(2):
        engine.completion("chat", MESSAGES)
    assert engine.breaker_states()["big"] == "open"
    time.sleep(RESET_S + 0.05)  # let the open period pass (time passing, not synchronisation)
    probe_thread, probe_out = _in_thread(lambda: engine.completion("chat", MESSAGES))
    wait_until(lambda: big.request_count == 4)
    assert engine.breaker_states()["big"] == "half-open"
    yield slow_thread, slow_out, probe_thread, probe_out


def test_late_success_does_not_close_the_breaker_while_the_probe_hangs(
    generations: Resilience, big: FakeProvider, small: FakeProvider
) -> None:
    steps = _open_then_probe(generations, big, Behavior.slow(1.2, "late"), Behavior.slow(2.5, "probe"))
    slow_thread, slow_out, probe_thread, _ = next(steps)

    slow_thread.join(10)
    assert slow_out[0].choices[0].message.content == "late"  # answered, but from before the outage
    assert generations.breaker_states()["big"] == "half-open"
    meanwhile = generations.completion("chat", MESSAGES)
    assert outcomes(meanwhile)[0] == ("big", "skipped", "probe_in_flight")  # not sent to the sick model
    assert big.request_count == 4
    probe_thread.join(10)
    assert generations.breaker_states()["big"] == "closed"


def test_late_failure_does_not_reopen_the_breaker_during_a_successful_probe(
    generations: Resilience, big: FakeProvider, small: FakeProvider
) -> None:
    steps = _open_then_probe(generations, big, Behavior.error(503, latency_s=1.2), Behavior.slow(2.0, "probe"))
    slow_thread, slow_out, probe_thread, probe_out = next(steps)

    slow_thread.join(10)
    assert hidden(slow_out[0])["model"] == "small"  # the late 503 fell back
    assert generations.breaker_states()["big"] == "half-open"
    probe_thread.join(10)
    assert probe_out[0].choices[0].message.content == "probe"
    assert generations.breaker_states()["big"] == "closed"


def test_stream_probe_is_judged_at_its_first_content_not_when_the_reader_finishes(
    generations: Resilience, big: FakeProvider, small: FakeProvider
) -> None:
    big.set(Behavior.error(500))
    for _ in range(2):
        generations.completion("chat", MESSAGES)
    time.sleep(RESET_S + 0.05)
    big.set(Behavior(content="abcdefghij", chunks=5))

    with generations.completion("chat", MESSAGES, stream=True) as stream:
        first = next(stream)  # the caller reads one chunk, then dawdles
        assert first.choices[0].delta.content
        assert generations.breaker_states()["big"] == "closed"
        other = generations.completion("chat", MESSAGES)  # meanwhile, big is back in rotation
        assert hidden(other)["model"] == "big"
        rest = "".join(c.choices[0].delta.content or "" for c in stream)
    assert first.choices[0].delta.content + rest == "abcdefghij"
    probe = stream.llm_resilience["attempts"][0]
    assert probe["breaker_transitions"] == [["half-open", "closed"]]


def test_stream_probe_cut_after_its_first_content_counts_once_as_an_ordinary_failure(
    generations: Resilience, big: FakeProvider, small: FakeProvider
) -> None:

    big.set(Behavior.error(500))
    for _ in range(2):
        generations.completion("chat", MESSAGES)
    time.sleep(RESET_S + 0.05)
    big.set(Behavior(content="abcdefghij", chunks=5, cut_after_chunks=2))
    small.set(Behavior(content="fghij", reject_prefill=True))  # finishes the cut answer (a conversation)

    assert "".join(c.choices[0].delta.content or "" for c in generations.completion("chat", MESSAGES, stream=True))

    assert generations.breaker_states()["big"] == "closed"  # fail_max 2: one cut does not re-open it
    assert generations.breakers.get("big").fail_counter == 1


def test_healed_primary_is_back_within_the_reset_timeout(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider, small: FakeProvider
) -> None:
    """Back-on-primary time: a primary down for a while is used again one reset timeout after it heals."""
    engine = make_engine(policy_dict(["big", "small"], fail_max=2, reset_timeout_s=RESET_S))
    big.set(Behavior.error(503))
    for _ in range(4):  # down: opens, then a probe fails
        engine.completion("chat", MESSAGES)
        time.sleep(RESET_S / 2)
    big.set(Behavior.ok("big"))
    healed_at = time.monotonic()
    while True:
        response = engine.completion("chat", MESSAGES)
        if hidden(response)["model"] == "big":
            break
        assert time.monotonic() - healed_at < RESET_S + 2.0, "the healed primary was not used again"
        time.sleep(0.02)
    back_after = time.monotonic() - healed_at
    print(f"back on primary {back_after:.2f} s after healing (reset_timeout_s {RESET_S})")


# -- a bounded registry -------------------------------------------------------------------------------


@pytest.mark.sans_io
def test_registry_stays_bounded_under_arbitrary_model_strings_and_keeps_open_breakers() -> None:
    from llm_resilience._breakers import BreakerRegistry

    registry = BreakerRegistry(lambda model: BreakerSettings(fail_max=1, reset_timeout_s=60), max_breakers=64)
    sick = registry.get("openai/sick")
    open_it(sick)
    probing = registry.get("openai/probing")
    open_it(probing)
    probing._cb.half_open()
    _, probe = probing.admit_with_ticket()
    assert probe.probe

    for i in range(5000):
        registry.get(f"openai/adhoc-{i}")

    assert len(registry) <= 64
    assert registry.get("openai/sick") is sick  # never evicted: it keeps traffic off a sick model
    assert sick.state == "open"
    assert registry.get("openai/probing") is probing  # never evicted while a probe is in flight
    assert registry.states()["openai/sick"] == "open"


@pytest.mark.sans_io
def test_registry_evicts_the_least_recently_used_first() -> None:
    from llm_resilience._breakers import BreakerRegistry

    registry = BreakerRegistry(lambda model: BreakerSettings(), max_breakers=8)
    hot = registry.get("hot")
    for i in range(100):
        registry.get(f"cold-{i}")
        assert registry.get("hot") is hot  # used all the time: never the one evicted
    assert len(registry) <= 8
