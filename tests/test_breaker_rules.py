"""The breaker's rules with an injected wall clock and a scripted fleet view (no server, no Redis, no sleeps).

``test_shared_state.py`` runs the fleet against a real Redis; these pin what a breaker does with
the fleet's answer (``FleetAdmission``), how it follows the fleet's transitions, and the operator
and reload paths, which mutation testing found unpinned (README "Circuit breakers").
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from llm_resilience import _outcomes as k
from llm_resilience._breakers import Admission, BreakerRegistry, ModelBreaker, ProbeTicket
from llm_resilience._policy import BreakerSettings
from llm_resilience._shared_state import FleetAdmission, SharedBreakerState

pytestmark = pytest.mark.sans_io  # no server: `make mutate` runs these for every mutant

T0 = datetime(2030, 1, 1, tzinfo=UTC)


class ScriptedFleet(SharedBreakerState):
    """The fleet view as the test sets it; what the breaker reports to it is kept (never sent anywhere)."""

    def __init__(self, answer: FleetAdmission = FleetAdmission.DEFER, open_until: float | None = None) -> None:
        super().__init__(lambda: None, "test", start=False)
        self.answer = answer
        self.until = open_until
        self.watched: dict[str, tuple[Any, Any]] = {}
        self.reported: list[tuple[Any, ...]] = []

    def admission(self, model: str) -> FleetAdmission:
        return self.answer

    def open_until_epoch(self, model: str) -> float | None:
        return self.until

    def watch(self, model: str, mirror: Any, open_for_s: Any = None, probing: Any = None, **_: Any) -> None:
        self.watched[model] = (mirror, open_for_s)

    def unwatch(self, model: str, owner: object | None = None) -> None:
        self.watched.pop(model, None)

    def record_failure(self, model: str, fail_max: int, open_s: float) -> None:
        self.reported.append(("failure", model, fail_max, open_s))

    def record_success(self, model: str) -> None:
        self.reported.append(("success", model))


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def breaker(
    clock: Clock | None = None,
    fleet: ScriptedFleet | None = None,
    *,
    fail_max: int = 2,
    reset_timeout_s: float = 10.0,
    **more: Any,
) -> ModelBreaker:
    settings = BreakerSettings(fail_max=fail_max, reset_timeout_s=reset_timeout_s, **more)
    return ModelBreaker("m", settings, [], clock=clock or Clock(), fleet=fleet)


def open_it(b: ModelBreaker) -> None:
    for _ in range(b.settings.fail_max):
        b.record(b.admit_with_ticket()[1], k.SERVER_ERROR)
    assert b.state == "open"


# -- the fleet's view decides first ---------------------------------------------------------------


def test_an_open_fleet_breaker_skips_the_model_and_says_until_when() -> None:
    b = breaker(fleet=ScriptedFleet(FleetAdmission.OPEN, open_until=1_900_000_000.0))

    admission, ticket = b.admit_with_ticket()

    assert admission is Admission.OPEN and not ticket.probe
    assert b.open_until() == 1_900_000_000.0
    assert b.state == "closed"  # the local breaker is not moved by a skip


def test_the_fleets_probe_is_one_request_of_this_process_and_the_local_breaker_is_half_open() -> None:
    b = breaker(fleet=ScriptedFleet(FleetAdmission.PROBE))

    admission, ticket = b.admit_with_ticket()

    assert admission is Admission.PROBE and ticket.probe
    assert b.state == "half-open"
    assert ticket.generation == b.generation  # its outcome is not stale
    assert b.admit_with_ticket()[0] is Admission.PROBE_BUSY  # one request, even though the fleet says probe


def test_the_fleets_probe_through_an_already_half_open_breaker_moves_nothing() -> None:
    clock = Clock()
    fleet = ScriptedFleet()
    b = breaker(clock, fleet)
    open_it(b)
    clock.advance(11)
    b.release(b.admit_with_ticket()[1])  # the local probe half-opened it; its request was never sent
    generation = b.generation

    fleet.answer = FleetAdmission.PROBE
    admission, ticket = b.admit_with_ticket()

    assert admission is Admission.PROBE and b.state == "half-open"
    assert b.generation == generation == ticket.generation


def test_while_another_process_probes_the_model_is_skipped() -> None:
    b = breaker(fleet=ScriptedFleet(FleetAdmission.PROBE_BUSY))

    admission, ticket = b.admit_with_ticket()

    assert admission is Admission.PROBE_BUSY and not ticket.probe
    assert b.state == "closed"


def test_without_a_fleet_opinion_the_local_breaker_decides() -> None:
    fleet = ScriptedFleet(FleetAdmission.DEFER)
    b = breaker(fleet=fleet)
    assert b.admit_with_ticket()[0] is Admission.ADMIT
    open_it(b)
    assert b.admit_with_ticket()[0] is Admission.OPEN


def test_outcomes_are_reported_to_the_fleet_only_when_they_count() -> None:
    fleet = ScriptedFleet()
    b = breaker(fleet=fleet, fail_max=3, reset_timeout_s=7.0)

    b.record(b.admit_with_ticket()[1], None)
    b.record(b.admit_with_ticket()[1], k.BAD_REQUEST)  # not counted: the caller's error
    b.record(b.admit_with_ticket()[1], k.SERVER_ERROR)

    assert fleet.reported == [("success", "m"), ("failure", "m", 3, 7.0)]


# -- sharing --------------------------------------------------------------------------------------


def test_sharing_a_registry_shares_its_breakers_now_and_later_and_none_stops_it() -> None:
    registry = BreakerRegistry(lambda model: BreakerSettings(), clock=Clock())
    before = registry.get("a")
    fleet = ScriptedFleet(FleetAdmission.OPEN)

    registry.share(fleet)
    after = registry.get("b")

    assert set(fleet.watched) == {"a", "b"}
    assert before.admit() is Admission.OPEN and after.admit() is Admission.OPEN
    registry.share(None)
    assert before.admit() is Admission.ADMIT and registry.get("c").admit() is Admission.ADMIT


def test_the_local_breaker_follows_the_fleets_transitions() -> None:
    fleet = ScriptedFleet()
    b = breaker(fleet=fleet)
    mirror, _ = fleet.watched["m"]

    mirror("m", "open")
    assert b.state == "open"
    generation = b.generation
    mirror("m", "open")  # already open: no second transition
    assert b.generation == generation

    mirror("m", "closed")
    assert b.state == "closed"
    generation = b.generation
    mirror("m", "closed")
    assert b.generation == generation


def test_a_half_open_breaker_closes_when_the_fleet_closes_it() -> None:
    clock = Clock()
    fleet = ScriptedFleet()
    b = breaker(clock, fleet)
    open_it(b)
    clock.advance(11)
    b.admit_with_ticket()  # half-open, probing

    fleet.watched["m"][0]("m", "closed")

    assert b.state == "closed"


def test_the_fleet_hears_how_long_the_local_breaker_stays_open() -> None:
    clock = Clock()
    fleet = ScriptedFleet()
    b = breaker(clock, fleet, reset_timeout_s=10.0)
    _, open_for_s = fleet.watched["m"]
    assert open_for_s() is None  # closed

    open_it(b)
    clock.advance(4)
    assert open_for_s() == pytest.approx(6.0)
    clock.advance(6)
    assert open_for_s() is None  # its open period is over
    clock.advance(-0.5)
    assert open_for_s() == pytest.approx(0.5)


def test_a_half_open_breaker_is_not_open_for_the_fleet() -> None:
    clock = Clock()
    fleet = ScriptedFleet()
    b = breaker(clock, fleet)
    open_it(b)
    clock.advance(11)
    b.admit_with_ticket()

    assert fleet.watched["m"][1]() is None


# -- operators, reloads, probes -------------------------------------------------------------------


def test_reset_closes_the_breaker_frees_the_probe_slot_and_forgets_suspicion() -> None:
    clock = Clock()
    b = breaker(clock)
    open_it(b)
    clock.advance(11)
    assert b.admit_with_ticket()[0] is Admission.PROBE
    b.mark_suspect()

    b.reset()

    assert (b.state, b.suspect) == ("closed", False)
    assert b.last_transition is not None and b.last_transition.cause == "reset"
    open_it(b)
    clock.advance(11)
    assert b.admit_with_ticket()[0] is Admission.PROBE  # the slot was freed


def test_a_passed_probe_closes_the_breaker_and_its_later_failure_counts_as_an_ordinary_one() -> None:
    clock = Clock()
    b = breaker(clock, fail_max=1)
    open_it(b)
    clock.advance(11)
    admission, ticket = b.admit_with_ticket()
    assert admission is Admission.PROBE

    b.probe_passed(ticket)
    assert b.state == "closed"
    assert b.last_transition is not None and b.last_transition.cause == "probe_succeeded"
    assert not ticket.probe and ticket.generation == b.generation

    b.record(ticket, k.CONNECTION)
    assert b.state == "open"


def test_probe_passed_with_an_ordinary_ticket_records_nothing() -> None:
    b = breaker(fail_max=2)
    b.record(b.admit_with_ticket()[1], k.SERVER_ERROR)
    ticket = ProbeTicket(probe=False, generation=b.generation)

    b.probe_passed(ticket)

    assert b.fail_counter == 1  # a success would have reset it


def test_a_reload_changes_the_settings_and_keeps_the_state() -> None:
    b = breaker(fail_max=5)
    b.record(b.admit_with_ticket()[1], k.SERVER_ERROR)

    b.reconfigure(BreakerSettings(fail_max=2, reset_timeout_s=3.0, success_threshold=2))

    assert b.settings.fail_max == 2
    b.record(b.admit_with_ticket()[1], k.SERVER_ERROR)
    assert b.state == "open"  # the new fail_max applies to the count already there
    assert b.open_period_s == 3.0


def test_a_dropped_breaker_is_fresh_on_next_use() -> None:
    registry = BreakerRegistry(lambda model: BreakerSettings(fail_max=1), clock=Clock())
    old = registry.get("a")
    open_it(old)
    registry.get("b")

    registry.drop("a")

    assert registry.models() == ["b"]
    assert registry.get("a") is not old and registry.get("a").state == "closed"
    registry.drop("never-used")  # nothing to forget: no error


def test_an_evicted_breaker_stops_being_watched_by_the_fleet() -> None:
    fleet = ScriptedFleet()
    registry = BreakerRegistry(lambda model: BreakerSettings(), clock=Clock(), max_breakers=8, fleet=fleet)
    for i in range(8):
        registry.get(f"m{i}")

    registry.get("m8")  # over the bound: the least recently used go, down to 7/8 of it

    assert len(registry) == 8
    assert set(fleet.watched) == set(registry.models())
    assert "m0" not in fleet.watched


def test_an_open_breaker_says_until_when_it_skips() -> None:
    clock = Clock()
    b = breaker(clock, reset_timeout_s=10.0)
    open_it(b)
    clock.advance(3)

    assert b.admit_with_ticket()[0] is Admission.OPEN
    assert b.open_until() == pytest.approx(T0.timestamp() + 10.0, abs=1e-3)


def test_the_probe_is_admitted_exactly_at_the_reset_timeout() -> None:
    clock = Clock()
    b = breaker(clock, reset_timeout_s=10.0)
    open_it(b)
    clock.advance(10)

    assert b.admit_with_ticket()[0] is Admission.PROBE


def test_a_reload_to_more_successes_keeps_a_half_open_breaker_probing() -> None:
    clock = Clock()
    b = breaker(clock, reset_timeout_s=10.0)
    open_it(b)
    b.reconfigure(BreakerSettings(fail_max=2, reset_timeout_s=10.0, success_threshold=2))
    clock.advance(10)
    admission, ticket = b.admit_with_ticket()
    assert admission is Admission.PROBE

    b.record(ticket, None)

    assert b.state == "half-open"  # one success of the two now required


def test_every_transition_is_told_with_its_cause_count_last_failure_and_open_until(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    heard: list[tuple[Any, ...]] = []
    settings = BreakerSettings(fail_max=2, reset_timeout_s=10.0, reset_backoff=None)
    registry = BreakerRegistry(lambda model: settings, clock=clock)
    registry.listeners.append(lambda *args: heard.append(args))
    b = registry.get("m")
    generation = b.generation

    with caplog.at_level("WARNING", logger="llm_resilience.breaker"):
        b.record(b.admit_with_ticket()[1], k.SERVER_ERROR)
        b.record(b.admit_with_ticket()[1], k.TIMEOUT)  # opens
        clock.advance(10)
        b.record(b.admit_with_ticket()[1], k.CONNECTION)  # the probe fails: open again
        clock.advance(10)
        b.record(b.admit_with_ticket()[1], None)  # the probe answers: closed

    assert [(model, old, new) for model, old, new, _ in heard] == [
        ("m", "closed", "open"), ("m", "open", "half-open"), ("m", "half-open", "open"),
        ("m", "open", "half-open"), ("m", "half-open", "closed"),
    ]  # fmt: skip
    infos = [info for *_, info in heard]
    assert [(i.model, i.old, i.new, i.cause, i.failures, i.last_failure) for i in infos] == [
        ("m", "closed", "open", "consecutive_failures", 2, k.TIMEOUT),
        ("m", "open", "half-open", "reset_timeout_elapsed", 2, None),
        ("m", "half-open", "open", "probe_failed", 3, k.CONNECTION),
        ("m", "open", "half-open", "reset_timeout_elapsed", 3, None),
        ("m", "half-open", "closed", "probe_succeeded", 0, None),
    ]
    assert infos[0].open_until == pytest.approx(T0.timestamp() + 10.0, abs=1e-3)
    assert infos[2].open_until == pytest.approx(T0.timestamp() + 20.0, abs=1e-3)
    assert [i.open_until for i in infos[1::2]] + [infos[4].open_until] == [None, None, None]
    assert b.generation == generation + 5
    assert caplog.messages[0] == "breaker m: closed -> open (consecutive_failures, 2 failures)"


# -- what a breaker reports and hands out -----------------------------------------------------------


def test_a_fresh_breaker_is_closed_and_has_nothing_to_report() -> None:
    b = breaker()

    assert (b.state, b.fail_counter, b.suspect, b.evictable) == ("closed", 0, False, True)
    assert (b.last_transition, b.open_until(), b.opened_at) == (None, None, None)  # nothing for spans or logs


def test_a_closed_breaker_admits_an_ordinary_request_of_its_current_generation() -> None:
    clock = Clock()
    b = breaker(clock)
    open_it(b)
    clock.advance(10)
    b.record(b.admit_with_ticket()[1], None)  # the probe answers: closed, two generations later

    assert b.admit_with_ticket() == (Admission.ADMIT, ProbeTicket(probe=False, generation=b.generation))


def test_a_released_probe_ticket_is_an_ordinary_one_and_the_slot_is_free_again() -> None:
    clock = Clock()
    b = breaker(clock)
    open_it(b)
    clock.advance(10)
    admission, ticket = b.admit_with_ticket()
    assert admission is Admission.PROBE and not b.evictable

    b.release(ticket)

    assert ticket == ProbeTicket(probe=False, generation=b.generation)
    assert b.admit_with_ticket()[0] is Admission.PROBE


def test_a_probe_cut_off_by_a_reset_cannot_free_the_slot_of_the_next_probe() -> None:
    # An operator resets the breaker while a probe is in flight; it opens again and a new probe is
    # admitted. When the old probe finally ends, the new one must still be the only one.
    clock = Clock()
    b = breaker(clock, fail_max=1)
    open_it(b)
    clock.advance(10)
    old_admission, old_probe = b.admit_with_ticket()
    assert old_admission is Admission.PROBE
    b.reset()
    open_it(b)
    clock.advance(10)
    assert b.admit_with_ticket()[0] is Admission.PROBE

    b.record(old_probe, None)  # stale: moves nothing, and its slot is long gone

    assert b.admit_with_ticket()[0] is Admission.PROBE_BUSY
    assert b.state == "half-open"


def test_with_a_success_threshold_of_two_the_breaker_closes_after_two_passed_probes() -> None:
    clock = Clock()
    b = breaker(clock, success_threshold=2)
    open_it(b)
    clock.advance(10)

    b.record(b.admit_with_ticket()[1], None)
    assert b.state == "half-open"
    admission, ticket = b.admit_with_ticket()
    assert admission is Admission.PROBE  # the next request probes again
    b.record(ticket, None)
    assert b.state == "closed"


def test_a_breaker_opened_by_the_fleet_names_no_failure_and_closes_when_its_own_probe_passes() -> None:
    clock = Clock()
    fleet = ScriptedFleet()
    b = breaker(clock, fleet)

    fleet.watched["m"][0]("m", "open")  # another process opened it; nothing was counted here
    assert b.last_transition is not None and b.last_transition.last_failure is None
    assert b.fail_counter == 0
    clock.advance(10)
    admission, ticket = b.admit_with_ticket()
    assert admission is Admission.PROBE
    b.record(ticket, None)

    assert b.state == "closed"


def test_the_fleets_opinion_is_per_model() -> None:
    class OneSickModel(ScriptedFleet):
        def admission(self, model: str) -> FleetAdmission:
            return FleetAdmission.OPEN if model == "sick" else FleetAdmission.DEFER

        def open_until_epoch(self, model: str) -> float | None:
            return 1_900_000_000.0 if model == "sick" else None

    registry = BreakerRegistry(lambda model: BreakerSettings(), clock=Clock(), fleet=OneSickModel())
    sick, well = registry.get("sick"), registry.get("well")

    assert sick.admit() is Admission.OPEN and sick.open_until() == 1_900_000_000.0
    assert well.admit() is Admission.ADMIT and well.open_until() is None


def test_a_breaker_closed_again_is_not_open_for_the_fleet() -> None:
    clock = Clock()
    fleet = ScriptedFleet()
    b = breaker(clock, fleet)
    open_it(b)

    b.reset()

    assert fleet.watched["m"][1]() is None  # it was opened 0 s ago, but it is closed now


def test_without_an_injected_clock_the_open_period_runs_on_the_wall_clock() -> None:
    fleet = ScriptedFleet()
    b = ModelBreaker("m", BreakerSettings(fail_max=1, reset_timeout_s=600.0), [], fleet=fleet)
    open_it(b)

    left = fleet.watched["m"][1]()

    assert left is not None and 590.0 < left <= 600.0  # (10 minutes of slack for a loaded machine)
    assert b.admit() is Admission.OPEN


def test_suspect_slots_are_counted_up_to_suspect_admit_and_freed_one_at_a_time() -> None:
    b = breaker(suspect_admit=2)

    assert [b.take_suspect_slot() for _ in range(3)] == [True, True, False]
    b.release_suspect_slot()
    assert [b.take_suspect_slot() for _ in range(2)] == [True, False]
    for _ in range(3):
        b.release_suspect_slot()  # more releases than slots taken: none is owed
    assert [b.take_suspect_slot() for _ in range(3)] == [True, True, False]


# -- the registry -------------------------------------------------------------------------------------


def test_the_registry_keeps_1024_breakers_before_it_evicts_by_default() -> None:
    registry = BreakerRegistry(lambda model: BreakerSettings(), clock=Clock())  # README "Bounded state"
    for i in range(1024):
        registry.get(f"m{i}")
    assert len(registry) == 1024

    registry.get("one-more")

    assert len(registry) == 1024 * 7 // 8 + 1  # the least recently used went, down to 7/8 of the bound


class Turnstile:
    """A lock that says when a second thread has to wait for it (to line up a race, no sleeps)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.contended = threading.Event()

    def __enter__(self) -> None:
        if not self._lock.acquire(blocking=False):
            self.contended.set()
            self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def test_threads_asking_for_a_new_models_breaker_at_once_share_one_breaker() -> None:
    got: list[ModelBreaker] = []
    settings_asked: list[str] = []

    def settings_for(model: str) -> BreakerSettings:
        # The first thread is creating the breaker (under the registry's lock): a second one asks now.
        settings_asked.append(model)
        if len(settings_asked) == 1:
            second.start()
            assert turnstile.contended.wait(10), "the second thread never reached the registry's lock"
        return BreakerSettings()

    registry = BreakerRegistry(settings_for, clock=Clock())
    turnstile = Turnstile()
    registry._lock = turnstile  # type: ignore[assignment]
    second = threading.Thread(target=lambda: got.append(registry.get("m")))

    first = registry.get("m")
    second.join(10)

    assert got == [first] and registry.models() == ["m"]
    assert settings_asked == ["m"]  # created once


# -- the fleet's transitions, the process's clocks, the registry's bound --------------------------


def test_a_transition_mirrored_from_the_fleet_says_it_came_from_the_fleet() -> None:
    fleet = ScriptedFleet()
    seen: list[Any] = []
    b = ModelBreaker("m", BreakerSettings(fail_max=3), [lambda *args: seen.append(args[3])], clock=Clock(), fleet=fleet)
    mirror, _ = fleet.watched["m"]

    mirror("m", "open")
    mirror("m", "closed")

    assert [(t.old, t.new, t.cause) for t in seen] == [("closed", "open", "fleet"), ("open", "closed", "fleet")]
    open_it(b)  # this process's own transitions keep their causes
    assert seen[-1].cause == "consecutive_failures"


def test_the_cooldown_runs_on_a_monotonic_clock_whatever_the_wall_clock_does(monkeypatch: pytest.MonkeyPatch) -> None:
    import pybreaker

    from llm_resilience import _breakers

    wall = [T0]
    mono = [5000.0]

    class SteppedDatetime(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> Any:
            return wall[0]

    monkeypatch.setattr(pybreaker, "datetime", SteppedDatetime)  # pybreaker stamps opened_at with it
    monkeypatch.setattr(_breakers, "_utc_now", lambda: wall[0], raising=False)
    monkeypatch.setattr(_breakers, "_monotonic", lambda: mono[0], raising=False)
    b = ModelBreaker("m", BreakerSettings(fail_max=1, reset_timeout_s=10.0), [])  # the process's own clocks
    b.record(b.admit_with_ticket()[1], k.SERVER_ERROR)
    assert b.state == "open"

    wall[0] = T0 - timedelta(hours=1)  # NTP steps the wall clock back an hour...
    mono[0] += 9.0
    assert b.admit_with_ticket()[0] is Admission.OPEN
    mono[0] += 2.0  # ...while 11 s pass
    assert b.admit_with_ticket()[0] is Admission.PROBE

    wall[0] = T0 + timedelta(hours=1)  # and a step forward does not end a cooldown early
    b2 = ModelBreaker("m2", BreakerSettings(fail_max=1, reset_timeout_s=10.0), [])
    b2.record(b2.admit_with_ticket()[1], k.SERVER_ERROR)
    wall[0] = T0 + timedelta(hours=2)
    assert b2.admit_with_ticket()[0] is Admission.OPEN


def test_an_open_breaker_past_its_cooldown_without_traffic_is_evictable() -> None:
    clock = Clock()
    b = breaker(clock, reset_timeout_s=10.0)
    open_it(b)
    assert not b.evictable  # inside its cooldown it keeps traffic off the model
    clock.advance(10.5)
    assert b.evictable
    b.admit_with_ticket()  # the probe is in flight: it stays
    assert not b.evictable


def test_the_registry_bound_holds_when_every_breaker_is_open() -> None:
    clock = Clock()
    fleet = ScriptedFleet()
    registry = BreakerRegistry(
        lambda model: BreakerSettings(fail_max=1, reset_timeout_s=300.0), clock=clock, max_breakers=8, fleet=fleet
    )
    for i in range(40):  # caller-supplied model strings against a dead endpoint: every one opens
        b = registry.get(f"m{i}")
        b.record(b.admit_with_ticket()[1], k.SERVER_ERROR)
        assert b.state == "open"
        clock.advance(0.001)

    assert len(registry) <= 8
    assert set(fleet.watched) == set(registry.models())
    assert "m39" in registry.models()  # the most recently used stay


def test_eviction_takes_idle_breakers_before_open_ones() -> None:
    clock = Clock()
    registry = BreakerRegistry(
        lambda model: BreakerSettings(fail_max=1, reset_timeout_s=300.0), clock=clock, max_breakers=8
    )
    sick = registry.get("sick")
    sick.record(sick.admit_with_ticket()[1], k.SERVER_ERROR)
    for i in range(8):
        registry.get(f"ok{i}")

    assert "sick" in registry.models()  # the oldest, but open: closed ones went first
    assert len(registry) <= 8
