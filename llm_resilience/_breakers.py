"""One circuit breaker per model: pybreaker's state machine plus the two things it lacks.

pybreaker owns the states (closed → open → half-open → closed) and the counting.
What this module adds, beside it rather than inside it:

* **Outcome recording after the fact.** Attempts run in threads, in asyncio tasks, or
  as streams that end long after they started, and some failures are only known after
  a 200 (an empty answer, a slow call). So instead of wrapping the I/O in
  ``breaker.call``, the outcome is fed to pybreaker when it is known, through
  ``breaker.call`` of a function that returns or raises at once. pybreaker's lock is
  held for microseconds, never across a request.
* **A probe gate.** In half-open, pybreaker admits any number of trial calls; a sick
  provider recovering from an outage should get exactly one. The gate also makes a
  cancelled probe (a hedging loser) release its slot without counting either way. The
  reset timeout is checked inside the gate, so a probe that just failed (and re-opened the
  breaker) is never followed at once by a second one from a thread that looked earlier.
* **Generations.** Every transition starts a new generation, and each admission's
  :class:`ProbeTicket` carries the generation it was admitted in. An outcome from an
  earlier generation is stale: a slow success from a request sent before the breaker
  opened must not close it while the probe still hangs, and a late 503 must not re-open
  it during a successful probe. Stale outcomes are dropped (only their probe slot, if
  any, is released).
* **Reset backoff.** ``breakers.*.reset_backoff: {factor, max_s}`` (built in: factor 2,
  60 s) lengthens the open period after each failed probe, up to ``max_s``; a probe that
  succeeds resets it. With ``factor: 1`` every open period is ``reset_timeout_s``.

Every transition goes through :meth:`ModelBreaker._on_transition` (pybreaker's listener):
that is the one place where the generation and the failed-probe count move.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any

import pybreaker

from ._policy import BreakerSettings
from ._shared_state import FleetAdmission, SharedBreakerState

log = logging.getLogger("llm_resilience.breaker")

CLOSED = pybreaker.STATE_CLOSED
OPEN = pybreaker.STATE_OPEN
HALF_OPEN = pybreaker.STATE_HALF_OPEN

TransitionListener = Callable[[str, str, str, "BreakerTransition"], None]
"""Called with (model, old_state, new_state, details) on every transition."""


@dataclass(frozen=True)
class BreakerTransition:
    """Why a breaker changed state, as on-call needs to read it (the hooks get one per transition).

    ``cause`` is ``consecutive_failures`` (closed -> open), ``probe_failed`` (half-open -> open),
    ``reset_timeout_elapsed`` (open -> half-open: the next request is the probe),
    ``probe_succeeded`` (half-open -> closed), ``reset`` (closed by an operator or a test) or
    ``fleet`` (shared state: another process opened it, or the fleet's probe closed it).
    """

    model: str
    old: str
    new: str
    cause: str
    failures: int
    """Consecutive counted failures when it happened (``fail_max`` when it opened)."""
    last_failure: str | None = None
    """The error kind of the failure that opened it."""
    open_until: float | None = None
    """When it opened: the time (epoch seconds) after which the next request is a probe."""


WallClock = Callable[[], datetime]
"""Now, as an aware datetime (pybreaker's ``opened_at`` is one). Injected by ``llm-resilience simulate``."""

FLEET = "fleet"
"""The cause of a transition mirrored from the fleet (shared state): another process made it."""


class Admission(Enum):
    """What the breaker says about sending a request now."""

    ADMIT = "admit"
    PROBE = "probe"  # half-open: this request is the single trial call
    OPEN = "open"  # skip: still inside reset_timeout
    PROBE_BUSY = "probe_busy"  # skip: another request is already probing
    PROBE_DEFERRED = "probe_deferred"  # skip: the probe is due, but this caller may not take it (may_probe)


class _CountedFailure(Exception):
    """Stands in for the real outcome when it is reported to pybreaker (which only counts it)."""


class _Listener(pybreaker.CircuitBreakerListener):
    def __init__(self, breaker: ModelBreaker, clock: WallClock | None = None) -> None:
        self.breaker = breaker
        self.clock = clock

    def state_change(self, cb: pybreaker.CircuitBreaker, old_state: Any, new_state: Any) -> None:
        # pybreaker sets its first state without telling listeners: every call has an old state.
        if self.clock is not None and new_state.name == OPEN:
            cb._state_storage.opened_at = self.clock()  # pybreaker stamped the wall clock; use ours
        self.breaker._on_transition(str(old_state.name), str(new_state.name))


@dataclass
class ProbeTicket:
    """Handed out with every admission.

    ``probe``: this request holds the half-open probe slot (:meth:`ModelBreaker.record`
    releases it). ``generation``: the breaker generation it was admitted in; an outcome
    reported after a later transition is stale and moves nothing.
    """

    probe: bool
    generation: int = 0


_SKIPPED = ProbeTicket(probe=False, generation=-1)
"""The ticket of every skipped admission (OPEN, PROBE_BUSY): no probe slot, no generation (an
outcome reported with it would be stale). Shared: only a probe ticket is ever changed."""

_RESET = "reset"  # ModelBreaker.last_kind while an operator closes the breaker


class ModelBreaker:
    """The breaker of one model, shared by every thread and task of an engine."""

    last_used: float
    """Monotonic; set by :class:`BreakerRegistry` on every lookup (eviction order)."""

    def __init__(
        self,
        model: str,
        settings: BreakerSettings,
        on_transition: list[TransitionListener],
        clock: WallClock | None = None,
        fleet: SharedBreakerState | None = None,
    ) -> None:
        self.model = model
        self.settings = settings
        self.last_kind: str | None = None  # the outcome being recorded, for the transition's cause
        self.last_transition: BreakerTransition | None = None
        self._open_until: float | None = None
        # Cooldowns are measured on a monotonic clock: a wall clock stepped back (NTP, a VM resumed)
        # must not keep a breaker open for ever, nor one stepped forward close it early. A simulation's
        # clock is its own time line, so it serves as both.
        self._wall_clock = clock
        self._elapsed_clock: Callable[[], float] = (lambda: clock().timestamp()) if clock is not None else _monotonic
        self._opened_mono: float = 0.0  # on _elapsed_clock, when it last opened
        self._mirroring = False  # a fleet transition is being mirrored (the cause is the fleet)
        self.fleet_key: str = model
        """What the fleet calls this breaker (shared state is keyed by what is called, not by a policy name)."""
        self._on_transition_listeners = on_transition
        self._generation = 0
        self._failed_probes = 0  # consecutive half-open -> open transitions (reset backoff)
        self.fleet: SharedBreakerState | None = None
        # No reset_timeout: pybreaker's own timer is never consulted (the gate judges the open period,
        # and record() never calls into pybreaker while the breaker is open).
        self._cb = pybreaker.CircuitBreaker(
            fail_max=settings.fail_max, success_threshold=settings.success_threshold, listeners=[_Listener(self, clock)]
        )
        self._storage = self._cb._state_storage  # its failure count, read directly (see record)
        # pybreaker's state, kept here: every transition passes through _on_transition, and reading it
        # through pybreaker costs two property calls, several times on every attempt's path.
        self._state: str = str(self._cb.current_state)
        self._gate = threading.RLock()  # re-entered when a transition happens while it is held
        self._probe: ProbeTicket | None = None  # the ticket holding the half-open probe slot
        self._probe_until = math.inf  # on _elapsed_clock: when the probe's call has no time left
        self.suspect = False
        """A request in flight is past its soft timeout, or a failure was counted while closed."""
        self._suspect_slots = 0  # requests admitted while suspect that are still in flight
        if fleet is not None:
            self.share(fleet)

    @property
    def state(self) -> str:
        return self._state

    @property
    def fail_counter(self) -> int:
        return int(self._storage.counter)

    @property
    def evictable(self) -> bool:
        """Closed with no probe in flight, or open past its cooldown with no probe in flight.

        Forgetting either loses little: a closed one its recent failure count; an open one whose
        cooldown passed without traffic only its claim to the next request being a lone probe.
        """
        if self._probe is not None:
            return False
        state = self._state
        if state == CLOSED:
            return True
        return state == OPEN and self._elapsed_clock() - self._opened_mono >= self.open_period_s

    @property
    def generation(self) -> int:
        """Bumped on every transition; tickets from an older generation are stale."""
        return self._generation

    @property
    def open_period_s(self) -> float:
        """How long the breaker stays open before the next probe (grows with ``reset_backoff``)."""
        base = self.settings.reset_timeout_s
        backoff = self.settings.reset_backoff
        if backoff is None or self._failed_probes == 0:
            return base
        return min(backoff.max_s, base * backoff.factor**self._failed_probes)

    def _on_transition(self, old: str, new: str) -> None:
        """Every state change passes here (pybreaker's listener): the one place the bookkeeping moves."""
        with self._gate:
            self._state = new  # (pybreaker's storage follows once its listeners have run)
            self._generation += 1
            if old == HALF_OPEN and new == OPEN:
                self._failed_probes += 1
            elif new == CLOSED:
                self._failed_probes = 0
            if new == OPEN:
                self._opened_mono = self._elapsed_clock()
        failures = int(self._cb.fail_counter)
        open_until = None
        if new == OPEN:
            cause = "probe_failed" if old == HALF_OPEN else "consecutive_failures"
            open_until = self._epoch(self._opened_mono + self.open_period_s)
        elif new == HALF_OPEN:
            cause = "reset_timeout_elapsed"
        else:
            cause = "probe_succeeded" if old == HALF_OPEN and self.last_kind != _RESET else "reset"
        if self._mirroring:
            cause = FLEET
        info = BreakerTransition(
            self.model, old, new, cause, failures, self.last_kind if new == OPEN else None, open_until
        )
        self.last_transition = info
        log.warning("breaker %s: %s -> %s (%s, %d failures)", self.model, old, new, cause, failures)
        for fn in list(self._on_transition_listeners):
            fn(self.model, old, new, info)

    def _epoch(self, elapsed_clock_time: float) -> float:
        """A time on the elapsed clock as epoch seconds (for spans and logs)."""
        if self._wall_clock is not None:
            return elapsed_clock_time  # a simulation's clock already is epoch seconds
        return time.time() + (elapsed_clock_time - _monotonic())

    def _reset_timeout_elapsed(self) -> bool:
        period = self.open_period_s
        self._open_until = self._epoch(self._opened_mono + period)  # for open_until()
        return self._elapsed_clock() - self._opened_mono >= period

    def admit(self) -> Admission:
        """May a request go to this model now? Never blocks; never sends anything."""
        return self.admit_with_ticket()[0]

    def admit_with_ticket(
        self, may_probe: Callable[[], bool] | None = None, probe_for_s: float | None = None
    ) -> tuple[Admission, ProbeTicket]:
        """:meth:`admit`, plus the ticket to report the outcome with (its generation read atomically).

        ``may_probe``: asked only when this request would take the probe slot; ``False`` leaves the
        slot (and an open breaker past its period: open) for another caller (``PROBE_DEFERRED``).
        ``probe_for_s``: how long the request may take if it becomes the probe (the fleet's probe
        key is kept at least that long, so no other process sends a second probe meanwhile).
        """
        generation = self._generation  # read before the state: a transition in between only makes it stale
        fleet = self.fleet
        if fleet is not None:  # the fleet's view, when Redis is reachable, decides first
            shared = fleet.admission(self.fleet_key)
            if shared is not FleetAdmission.DEFER:
                return self._admit_fleet(fleet, shared, may_probe, probe_for_s)
        if self._state != CLOSED:
            with self._gate:
                # Decided entirely under the gate: a probe that fails re-opens the breaker before it
                # frees the slot, so whoever takes the slot next sees the new opened_at.
                state = self._state
                if state == OPEN and not self._reset_timeout_elapsed():
                    return Admission.OPEN, _SKIPPED
                if state != CLOSED:  # (closed by another thread meanwhile: admitted, with a stale ticket)
                    if not self._probe_held() and may_probe is not None and not may_probe():
                        return Admission.PROBE_DEFERRED, _SKIPPED
                    return self._take_probe_slot(state == OPEN, probe_for_s)
        return Admission.ADMIT, ProbeTicket(probe=False, generation=generation)

    def _probe_held(self) -> bool:
        """A request of this process holds the probe slot, and its call still has time left.

        A probe is bounded by its call's deadline; one still out past it belongs to a caller that
        cannot run its own cut (an event loop starved by threads held one for 9 s in the soak,
        deadline 3 s): its verdict, if one ever comes, answers no caller. The slot is free again
        then, as the fleet's probe key already is, so a caller that can judge the model probes it.
        """
        return self._probe is not None and self._elapsed_clock() < self._probe_until

    def _take_probe_slot(self, half_open_first: bool, probe_for_s: float | None) -> tuple[Admission, ProbeTicket]:
        """Under the gate: the probe, if no other request of this process holds the slot."""
        if self._probe_held():
            return Admission.PROBE_BUSY, _SKIPPED
        if half_open_first:
            self._cb.half_open()
        # (an overdue holder keeps its ticket: its outcome, if one comes, counts like any request's,
        # and its release no longer frees the slot, which is not its own any more)
        self._probe = ProbeTicket(probe=True, generation=self._generation)
        self._probe_until = math.inf if probe_for_s is None else self._elapsed_clock() + probe_for_s
        return Admission.PROBE, self._probe

    def _admit_fleet(
        self,
        fleet: SharedBreakerState,
        shared: FleetAdmission,
        may_probe: Callable[[], bool] | None,
        probe_for_s: float | None,
    ) -> tuple[Admission, ProbeTicket]:
        with self._gate:
            if shared is FleetAdmission.OPEN:
                self._open_until = fleet.open_until_epoch(self.fleet_key)
                return Admission.OPEN, _SKIPPED
            if shared is FleetAdmission.PROBE:
                # This process holds the fleet's probe: one request, through the local gate.
                if not self._probe_held() and may_probe is not None and not may_probe():
                    return Admission.PROBE_DEFERRED, _SKIPPED  # (unused, the key is given up after a second)
                admission, ticket = self._take_probe_slot(self._state != HALF_OPEN, probe_for_s)
                if admission is Admission.PROBE:
                    fleet.hold_probe(self.fleet_key, probe_for_s if probe_for_s is not None else 0.0)
                return admission, ticket
            return Admission.PROBE_BUSY, _SKIPPED

    def share(self, fleet: SharedBreakerState | None) -> None:
        """Share this breaker with other processes through ``fleet`` (``None``: stop sharing)."""
        old, self.fleet = self.fleet, fleet
        if old is not None and old is not fleet:
            old.unwatch(self.fleet_key, self)
        if fleet is not None:
            fleet.watch(self.fleet_key, self._mirror, self._open_for_s, self._probing, owner=self)

    def _open_for_s(self) -> float | None:
        """Seconds this breaker stays open by its own clock (``None``: not open); told to Redis on reconnect."""
        if self._state != OPEN:
            return None
        left = self.open_period_s - (self._elapsed_clock() - self._opened_mono)
        return left if left > 0 else None

    def _probing(self) -> bool:
        """A probe of this process is in flight (the fleet's probe key is kept while it is)."""
        return self._probe_held()

    def _mirror(self, model: str, fleet_state: str) -> None:
        # Called on the fleet's sync thread when another process opened or closed the breaker:
        # the local breaker follows, so this process's logs and metrics show the transition.
        with self._gate:  # the gate first, then pybreaker's lock: the order record() takes them in
            self._mirroring = True
            try:
                if fleet_state == "open" and self._state == CLOSED:
                    self._cb.open()
                elif fleet_state == "closed" and self._state != CLOSED:
                    self._cb.close()
            finally:
                self._mirroring = False

    def reconfigure(self, settings: BreakerSettings) -> None:
        """New settings from a policy reload; the state (open, counts) is kept."""
        self.settings = settings
        self._cb.fail_max = settings.fail_max
        self._cb.success_threshold = settings.success_threshold

    def record(self, ticket: ProbeTicket, failure_kind: str | None) -> None:
        """Report an attempt's outcome: ``None`` for success, else the kind of failure.

        Kinds the policy does not count (``breakers.*.count``) are neutral: they neither
        count nor reset the consecutive-failure counter, so a stream of caller errors
        cannot hide a provider that is failing. An outcome from a request admitted before
        the last transition (a stale ticket) moves nothing.
        """
        self.last_kind = failure_kind
        fleet = self.fleet
        try:
            with self._gate:
                if ticket.generation != self._generation or self._state == OPEN:
                    return  # stale, or nothing to decide while open (only a probe may move it)
                if failure_kind is None:
                    if not (self._state == CLOSED and not self._storage.counter):
                        # (closed with no failures counted: a success changes nothing; pybreaker's
                        # call path costs ~12 Python calls on every answered request)
                        self._cb.call(_succeed)
                    if fleet is not None:
                        fleet.record_success(self.fleet_key)
                elif failure_kind in self.settings.count:
                    if fleet is not None:
                        fleet.record_failure(self.fleet_key, self.settings.fail_max, self.open_period_s)
                    self._cb.call(_fail)
        except _CountedFailure:
            pass
        except pybreaker.CircuitBreakerError:
            # Raised by the call that trips the breaker (or when shared storage says another
            # process opened it): either way the state is already right.
            pass
        finally:
            if ticket.probe:
                self.release(ticket)

    def probe_passed(self, ticket: ProbeTicket) -> None:
        """A probe's provider answered (a stream's first content): record its success now.

        The caller may read the rest of the stream for a long time; the model is not kept
        out of rotation meanwhile. The ticket becomes an ordinary one of the new generation,
        so the attempt's final outcome (a cut later on, say) still counts, once, as any
        request's would.
        """
        if not ticket.probe:
            return
        self.record(ticket, None)
        ticket.generation = self._generation

    def release(self, ticket: ProbeTicket) -> None:
        """Free the probe slot without counting (the attempt was cancelled or never sent)."""
        if ticket.probe:
            ticket.probe = False
            with self._gate:
                if self._probe is ticket:  # (a reset may have freed the slot and a new probe taken it)
                    self._probe = None
                    freed = True
                else:
                    freed = False
            fleet = self.fleet
            if freed and fleet is not None:  # no verdict: another process may probe at once
                fleet.release_probe(self.fleet_key)

    def open_until(self) -> float | None:
        """When (epoch seconds) the open breaker admits a probe, as the last :meth:`admit` saw it.

        Read from what ``admit`` already fetched, so a skip costs no second storage (Redis) read.
        """
        return self._open_until

    @property
    def opened_at(self) -> float | None:
        """When the breaker last opened (POSIX seconds; ``None``: never, or closed since)."""
        if self._state == CLOSED:
            return None
        opened: datetime | None = self._storage.opened_at
        return opened.timestamp() if opened is not None else None

    # Suspect gating (docs/design.md, "Breakers"): a model with a slow or failed request in flight gets
    # at most ``suspect_admit`` new requests at a time until a verdict (a success, or the breaker opening).

    def mark_suspect(self) -> None:
        self.suspect = True

    def clear_suspect(self) -> None:
        self.suspect = False

    def take_suspect_slot(self) -> bool:
        """One of the suspect slots for a new request, if one is free."""
        with self._gate:
            if self._suspect_slots >= self.settings.suspect_admit:
                return False
            self._suspect_slots += 1
            return True

    def release_suspect_slot(self) -> None:
        with self._gate:
            self._suspect_slots = max(0, self._suspect_slots - 1)

    def reset(self) -> None:
        """Close the breaker (used by tests and by ``llm-resilience`` operators)."""
        self.last_kind = _RESET
        with self._gate:  # the gate first, then pybreaker's lock: the order record() takes them in
            self._cb.close()
            self._probe = None
        self.clear_suspect()


def _succeed() -> None:
    return None


def _fail() -> None:
    raise _CountedFailure


_monotonic = time.monotonic


class BreakerRegistry:
    """Creates breakers on first use; one per model name, at most about ``max_breakers``.

    Callers may pass any litellm model string (an ad-hoc route per string), so the registry
    is bounded: when it grows past ``max_breakers`` the least recently used breakers are
    evicted, down to 7/8 of the bound (eviction is amortised: one sort per many inserts).
    Idle breakers go first: closed ones, and open ones whose cooldown passed without traffic
    (a closed breaker that is evicted loses its count of recent failures, as if it had not
    been used for a while, which is what least-recently-used means). If that is not enough,
    the least recently used of the others go too, so the bound holds whatever the states:
    a caller sending thousands of model strings to a dead endpoint must not grow the
    process without limit. Only a breaker with a probe in flight always stays (there are
    at most as many as requests in flight).

    ``fleet_key_for`` names a model's breaker in the shared state (the litellm model string and
    endpoint it calls); by default its name.
    """

    def __init__(
        self,
        settings_for: Callable[[str], BreakerSettings],
        clock: WallClock | None = None,
        max_breakers: int = 1024,
        *,
        fleet: SharedBreakerState | None = None,
        fleet_key_for: Callable[[str], str] | None = None,
    ) -> None:
        self._settings_for = settings_for
        self.fleet_key_for: Callable[[str], str] = fleet_key_for or str
        self._clock = clock  # None: the wall clock (simulations pass their own)
        self.fleet = fleet
        self._breakers: dict[str, ModelBreaker] = {}
        self._lock = threading.Lock()
        self.max_breakers = max_breakers
        self.listeners: list[TransitionListener] = []

    def get(self, model: str) -> ModelBreaker:
        b = self._breakers.get(model)
        if b is None:
            with self._lock:
                b = self._breakers.get(model)
                if b is None:
                    if len(self._breakers) >= self.max_breakers:
                        self._evict()
                    b = ModelBreaker(model, self._settings_for(model), self.listeners, clock=self._clock)
                    b.fleet_key = self.fleet_key_for(model)
                    if self.fleet is not None:
                        b.share(self.fleet)
                    self._breakers[model] = b
        b.last_used = time.monotonic()  # lock-free: an approximate recency is all eviction needs
        return b

    def _evict(self) -> None:
        keep = self.max_breakers * 7 // 8
        candidates = [b for b in self._breakers.values() if b._probe is None]
        candidates.sort(key=lambda b: (not b.evictable, b.last_used))  # idle ones first, then by recency
        for b in candidates[: len(self._breakers) - keep]:  # (positive: called at max_breakers or more)
            del self._breakers[b.model]
            if b.fleet is not None:
                b.share(None)

    def __len__(self) -> int:
        return len(self._breakers)

    def states(self) -> dict[str, str]:
        with self._lock:
            breakers = list(self._breakers.values())
        return {b.model: b.state for b in breakers}

    def models(self) -> list[str]:
        return list(self._breakers)

    def drop(self, model: str) -> None:
        """Forget ``model``'s breaker (a policy reload changed what the model is): a fresh one on next use."""
        with self._lock:
            b = self._breakers.pop(model, None)
        if b is not None and b.fleet is not None:
            b.share(None)

    def share(self, fleet: SharedBreakerState | None) -> None:
        """Share every breaker, present and future, through ``fleet`` (``None``: per process)."""
        with self._lock:
            self.fleet = fleet
            for b in self._breakers.values():
                b.share(fleet)
