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
  cancelled probe (a hedging loser) release its slot without counting either way.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Any

import pybreaker

from ._policy import BreakerSettings

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
    ``probe_succeeded`` (half-open -> closed) or ``reset`` (closed by an operator or a test).
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


class Admission(Enum):
    """What the breaker says about sending a request now."""

    ADMIT = "admit"
    PROBE = "probe"  # half-open: this request is the single trial call
    OPEN = "open"  # skip: still inside reset_timeout
    PROBE_BUSY = "probe_busy"  # skip: another request is already probing


class _CountedFailure(Exception):
    """Stands in for the real outcome when it is reported to pybreaker."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


class _Listener(pybreaker.CircuitBreakerListener):
    def __init__(
        self, breaker: ModelBreaker, on_transition: list[TransitionListener], clock: WallClock | None = None
    ) -> None:
        self.breaker = breaker
        self.on_transition = on_transition
        self.clock = clock

    def state_change(self, cb: pybreaker.CircuitBreaker, old_state: Any, new_state: Any) -> None:
        if self.clock is not None and new_state.name == OPEN:
            cb._state_storage.opened_at = self.clock()  # pybreaker stamped the wall clock; use ours
        old = old_state.name if old_state is not None else "none"
        new = str(new_state.name)
        breaker = self.breaker
        failures = int(cb.fail_counter)
        open_until = None
        if new == OPEN:
            cause = "probe_failed" if old == HALF_OPEN else "consecutive_failures"
            opened_at: datetime | None = cb._state_storage.opened_at
            if opened_at is not None:
                open_until = opened_at.timestamp() + breaker.settings.reset_timeout_s
        elif new == HALF_OPEN:
            cause = "reset_timeout_elapsed"
        else:
            cause = "probe_succeeded" if old == HALF_OPEN and breaker.last_kind != _RESET else "reset"
        info = BreakerTransition(
            breaker.model, old, new, cause, failures, breaker.last_kind if new == OPEN else None, open_until
        )
        breaker.last_transition = info
        log.warning("breaker %s: %s -> %s (%s, %d failures)", breaker.model, old, new, cause, failures)
        for fn in list(self.on_transition):
            fn(breaker.model, old, new, info)


@dataclass
class ProbeTicket:
    """Handed out with every admission; tells :meth:`ModelBreaker.record` whether to release the gate."""

    probe: bool


_RESET = "reset"  # ModelBreaker.last_kind while an operator closes the breaker


class ModelBreaker:
    """The breaker of one model, shared by every thread and task of an engine."""

    def __init__(
        self,
        model: str,
        settings: BreakerSettings,
        on_transition: list[TransitionListener],
        state_storage: pybreaker.CircuitBreakerStorage | None = None,
        clock: WallClock | None = None,
    ) -> None:
        self.model = model
        self.settings = settings
        self.last_kind: str | None = None  # the outcome being recorded, for the transition's cause
        self.last_transition: BreakerTransition | None = None
        self._open_until: float | None = None
        self._clock = clock
        self._cb = pybreaker.CircuitBreaker(
            fail_max=settings.fail_max,
            reset_timeout=settings.reset_timeout_s,
            success_threshold=settings.success_threshold,
            listeners=[_Listener(self, on_transition, clock)],
            state_storage=state_storage,
            name=model,
            throw_new_error_on_trip=True,
        )
        self._gate = threading.Lock()
        self._probe_in_flight = False

    @property
    def state(self) -> str:
        return str(self._cb.current_state)

    @property
    def fail_counter(self) -> int:
        return int(self._cb.fail_counter)

    def _reset_timeout_elapsed(self) -> bool:
        # pybreaker keeps opened_at in its storage (wall clock, so Redis-shared breakers agree).
        opened_at: datetime | None = self._cb._state_storage.opened_at
        if opened_at is None:
            return True
        self._open_until = opened_at.timestamp() + self.settings.reset_timeout_s  # for open_until()
        now = self._clock() if self._clock is not None else datetime.now(UTC)
        return (now - opened_at).total_seconds() >= self.settings.reset_timeout_s

    def admit(self) -> Admission:
        """May a request go to this model now? Never blocks; never sends anything."""
        state = self._cb.current_state
        if state == CLOSED:
            return Admission.ADMIT
        if state == OPEN and not self._reset_timeout_elapsed():
            return Admission.OPEN
        with self._gate:
            if self._probe_in_flight:
                return Admission.PROBE_BUSY
            self._probe_in_flight = True
        if self._cb.current_state == OPEN:
            self._cb.half_open()
        return Admission.PROBE

    def record(self, ticket: ProbeTicket, failure_kind: str | None) -> None:
        """Report an attempt's outcome: ``None`` for success, else the kind of failure.

        Kinds the policy does not count (``breakers.*.count``) are neutral: they neither
        count nor reset the consecutive-failure counter, so a stream of caller errors
        cannot hide a provider that is failing.
        """
        self.last_kind = failure_kind
        try:
            if failure_kind is None:
                self._cb.call(_succeed)
            elif failure_kind in self.settings.count:
                self._cb.call(_fail, failure_kind)
        except _CountedFailure:
            pass
        except pybreaker.CircuitBreakerError:
            # Raised by the call that trips the breaker, or when an attempt admitted before
            # the breaker opened reports late: either way the state is already right.
            pass
        finally:
            if ticket.probe:
                self.release(ticket)

    def release(self, ticket: ProbeTicket) -> None:
        """Free the probe slot without counting (the attempt was cancelled or never sent)."""
        if ticket.probe:
            ticket.probe = False
            with self._gate:
                self._probe_in_flight = False

    def open_until(self) -> float | None:
        """When (epoch seconds) the open breaker admits a probe, as the last :meth:`admit` saw it.

        Read from what ``admit`` already fetched, so a skip costs no second storage (Redis) read.
        """
        return self._open_until

    def reset(self) -> None:
        """Close the breaker (used by tests and by ``llm-resilience`` operators)."""
        self.last_kind = _RESET
        self._cb.close()
        with self._gate:
            self._probe_in_flight = False


def _succeed() -> None:
    return None


def _fail(kind: str) -> None:
    raise _CountedFailure(kind)


class BreakerRegistry:
    """Creates breakers on first use; one per model name."""

    def __init__(self, settings_for: Callable[[str], BreakerSettings], clock: WallClock | None = None) -> None:
        self._settings_for = settings_for
        self._clock = clock  # None: the wall clock (simulations pass their own)
        self._breakers: dict[str, ModelBreaker] = {}
        self._lock = threading.Lock()
        self.listeners: list[TransitionListener] = []

    def get(self, model: str) -> ModelBreaker:
        b = self._breakers.get(model)
        if b is None:
            with self._lock:
                b = self._breakers.get(model)
                if b is None:
                    b = ModelBreaker(model, self._settings_for(model), self.listeners, clock=self._clock)
                    self._breakers[model] = b
        return b

    def states(self) -> dict[str, str]:
        return {name: b.state for name, b in self._breakers.items()}
