"""The decision core: given the policy, the request and the live state, what happens next.

No I/O happens here. A driver (sync, async, streaming: ``_drivers.py``) runs a loop::

    call = planner.start(request)
    while True:
        action = call.next_action(now)
        Launch(attempt) -> send attempt.kwargs to litellm, then report
                           call.on_response(attempt, response, now) or call.on_error(attempt, exc, now)
        Wait(until)     -> attempts are in flight: wait for one to finish, or until `until`
        Done(response)  -> cancel what is still in flight (call.on_cancelled), return response
        Fail(error)     -> cancel what is still in flight, raise error

Everything that is a *decision* lives here: which model next (chain order, breakers,
context window, deadline), with which timeout, and what an outcome means (fall back,
raise, count toward the breaker). That keeps the drivers thin and lets the rules be
tested without a server (``tests/test_planner.py``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import _outcomes as k
from ._breakers import Admission, BreakerRegistry, ProbeTicket
from ._exceptions import AllAttemptsFailed, UnknownPromptClass
from ._hooks import HookSet
from ._outcomes import AttemptRecord, classify_error
from ._policy import ModelSpec, Policy, PromptClass, ResolvedRoute

log = logging.getLogger("llm_resilience")

# Below this, an attempt cannot realistically complete; treat the deadline as reached.
MIN_ATTEMPT_S = 0.005

# litellm arguments that would make litellm retry or fall back on its own, hiding
# attempts from our breakers and spans. We own retries and fallbacks.
_OWNED_KWARGS = ("num_retries", "max_retries", "fallbacks", "context_window_fallback_dict")


@dataclass(frozen=True)
class CallRequest:
    """What the caller asked for, split into our arguments and litellm's."""

    model: str
    messages: Sequence[Mapping[str, Any]]
    kwargs: Mapping[str, Any]
    prompt_class: str | None = None
    stream: bool = False


@dataclass
class Attempt:
    """One request the driver must send."""

    record: AttemptRecord
    spec: ModelSpec
    kwargs: dict[str, Any]
    ticket: ProbeTicket
    timeout_s: float
    """The timeout this attempt runs with: the soft timeout when that is tighter."""
    hard_timeout_s: float
    first_token_timeout_s: float | None = None
    idle_timeout_s: float | None = None
    hedge_at: float | None = None
    """Monotonic time after which, if no answer came, the next model may start in parallel."""
    soft_timeout_s: float | None = None


@dataclass(frozen=True)
class Launch:
    attempt: Attempt


@dataclass(frozen=True)
class Wait:
    until: float | None
    """Monotonic time to wake up and ask again even if nothing finished (None: wait for one)."""


@dataclass(frozen=True)
class Done:
    response: Any


@dataclass(frozen=True)
class Fail:
    error: BaseException


Action = Launch | Wait | Done | Fail


@dataclass(frozen=True)
class Fit:
    """What the prompt looks like for one model."""

    messages: Sequence[Mapping[str, Any]]
    tokens_before: int | None = None
    tokens_after: int | None = None
    truncated: bool = False
    fits: bool = True


class Fitter(Protocol):
    """Makes a prompt fit a model's context window (``_truncation.py``)."""

    def fit(
        self,
        spec: ModelSpec,
        messages: Sequence[Mapping[str, Any]],
        route: ResolvedRoute,
        prompt_class: PromptClass,
        kwargs: Mapping[str, Any],
        shrink: float,
    ) -> Fit: ...


class Validator(Protocol):
    """Judges a 200 response (``_validators.py``). Returns failed check names."""

    def check(self, route: ResolvedRoute, request: CallRequest, response: Any) -> list[str]: ...


class PassThroughFitter:
    """Sends the prompt unchanged (used when truncation is not configured)."""

    def fit(
        self,
        spec: ModelSpec,
        messages: Sequence[Mapping[str, Any]],
        route: ResolvedRoute,
        prompt_class: PromptClass,
        kwargs: Mapping[str, Any],
        shrink: float,
    ) -> Fit:
        return Fit(messages=messages)


class NoValidation:
    def check(self, route: ResolvedRoute, request: CallRequest, response: Any) -> list[str]:
        return []


class LatencyView(Protocol):
    """Recent latency per (model, prompt class) (``_latency.py``)."""

    def observe(self, model: str, prompt_class: str, latency_s: float) -> None: ...

    def percentile(self, model: str, prompt_class: str, q: float, min_samples: int) -> float | None: ...


class NoLatency:
    def observe(self, model: str, prompt_class: str, latency_s: float) -> None:
        return None

    def percentile(self, model: str, prompt_class: str, q: float, min_samples: int) -> float | None:
        return None


@dataclass
class Planner:
    """Live state shared by every call of an engine, plus the policy in force."""

    policy: Policy
    breakers: BreakerRegistry
    hooks: HookSet
    fitter: Fitter = field(default_factory=PassThroughFitter)
    validator: Validator = field(default_factory=NoValidation)
    latency: LatencyView = field(default_factory=NoLatency)

    def start(self, request: CallRequest, now: float | None = None) -> Call:
        """Decide route and prompt class, and open the call. Raises ``UnknownPromptClass``."""
        return Call(self, request, time.monotonic() if now is None else now)

    def classify(self, request: CallRequest) -> str:
        """The prompt class: the caller's, else the first matching rule, else ``default``."""
        policy = self.policy
        if request.prompt_class is not None:
            if request.prompt_class not in policy.classes:
                raise UnknownPromptClass(
                    f"prompt_class '{request.prompt_class}' is not defined in {policy.source} "
                    f"(defined: {', '.join(policy.classes)})"
                )
            return request.prompt_class
        if not policy.class_rules:
            return "default"
        metadata = request.kwargs.get("metadata") or {}
        text: str | None = None
        for name, rule, regex in policy.class_rules:
            if rule.metadata is not None and not all(
                str(metadata.get(key)) == value for key, value in rule.metadata.items()
            ):
                continue
            if regex is not None:
                if text is None:
                    text = last_user_text(request.messages)
                if not regex.search(text):
                    continue
            return name
        return "default"


class Call:
    """The decision state of one ``completion`` call."""

    def __init__(self, planner: Planner, request: CallRequest, now: float) -> None:
        policy = planner.policy
        self.planner = planner
        self.request = request
        self.started_at = now
        self.prompt_class = planner.classify(request)
        self.klass = policy.classes[self.prompt_class]
        self.route = policy.route_for(request.model, self.prompt_class)
        deadline = self.klass.deadline_s
        caller_timeout = request.kwargs.get("timeout")
        if isinstance(caller_timeout, int | float) and caller_timeout > 0:
            deadline = min(deadline, float(caller_timeout))  # the caller's own bound still holds
        self.deadline_at = now + deadline
        self.records: list[AttemptRecord] = []
        self.hook_data: dict[object, Any] = {}
        self.answered_by: AttemptRecord | None = None
        self._position = 0  # next index in the chain
        self._in_flight: list[Attempt] = []
        self._final: Done | Fail | None = None
        self._last_error: BaseException | None = None
        self._best_flagged: tuple[AttemptRecord, Any] | None = None
        self._shrink = 1.0  # < 1 after a provider said the prompt was too long
        self._base_kwargs = {key: v for key, v in request.kwargs.items() if key not in _OWNED_KWARGS}
        self._base_kwargs.pop("timeout", None)
        planner.hooks.call_started(self)

    # -- what next -------------------------------------------------------------

    def next_action(self, now: float) -> Action:
        if self._final is not None:
            return self._final
        if self._in_flight:
            return Wait(until=self._wake_at(now))
        while self._position < len(self.route.chain):
            spec = self.route.chain[self._position]
            self._position += 1
            attempt = self._prepare(spec, now)
            if attempt is not None:
                return Launch(attempt)
        return self._finish_exhausted()

    def _wake_at(self, now: float) -> float | None:
        return None

    def _prepare(self, spec: ModelSpec, now: float) -> Attempt | None:
        """Turn the next model into an attempt, or record why it is skipped."""
        record = AttemptRecord(
            index=len(self.records), model=spec.name, litellm_model=spec.litellm_model, started_at=now
        )
        left = self.deadline_at - now
        if left < MIN_ATTEMPT_S:
            self._skip(record, k.DEADLINE)
            self._position = len(self.route.chain)  # nothing after this can run either
            return None
        breaker = self.planner.breakers.get(spec.name)
        admission = breaker.admit()
        record.breaker_state = breaker.state
        if admission is Admission.OPEN:
            self._skip(record, k.BREAKER_OPEN)
            return None
        if admission is Admission.PROBE_BUSY:
            self._skip(record, k.PROBE_IN_FLIGHT)
            return None
        ticket = ProbeTicket(probe=admission is Admission.PROBE)
        if ticket.probe:
            record.extra["probe"] = True
        params, missing = spec.resolved_params()
        if missing is not None:
            breaker.release(ticket)
            record.extra["missing_env"] = missing
            self._skip(record, k.MISSING_API_KEY)
            return None
        fit = self.planner.fitter.fit(
            spec, self.request.messages, self.route, self.klass, self._base_kwargs, self._shrink
        )
        record.tokens_before, record.tokens_after, record.truncated = (
            fit.tokens_before, fit.tokens_after, fit.truncated
        )  # fmt: skip
        if not fit.fits:
            breaker.release(ticket)
            self._skip(record, k.CONTEXT_TOO_SMALL)
            return None
        timeout = min(self.klass.timeout_s, left)
        soft = self._soft_timeout(spec)
        kwargs = dict(self._base_kwargs)
        kwargs.update(params)  # the policy's connection settings win over the caller's
        kwargs["messages"] = fit.messages
        kwargs["timeout"] = timeout if soft is None else min(timeout, soft)
        kwargs["num_retries"] = 0
        kwargs["max_retries"] = 0
        if self.request.stream:
            kwargs["stream"] = True
        record.timeout_s = kwargs["timeout"]
        attempt = Attempt(
            record=record,
            spec=spec,
            kwargs=kwargs,
            ticket=ticket,
            timeout_s=kwargs["timeout"],
            hard_timeout_s=timeout,
            first_token_timeout_s=min(self.klass.first_token_timeout_s or timeout, timeout),
            idle_timeout_s=self.klass.idle_timeout_s or self.klass.timeout_s,
            soft_timeout_s=soft,
        )
        self.records.append(record)
        self._in_flight.append(attempt)
        self.planner.hooks.attempt_started(self, record)
        return attempt

    def _soft_timeout(self, spec: ModelSpec) -> float | None:
        cfg = self.klass.soft_timeout
        if cfg is None:
            return None
        learned = self.planner.latency.percentile(spec.name, self.prompt_class, cfg.percentile, cfg.min_samples)
        if learned is None:
            return cfg.warmup_s
        ceiling = cfg.ceiling_s if cfg.ceiling_s is not None else self.klass.timeout_s
        return max(cfg.floor_s, min(ceiling, learned * cfg.multiplier))

    def _skip(self, record: AttemptRecord, reason: str) -> None:
        record.outcome = "skipped"
        record.reason = reason
        self.records.append(record)
        hooks = self.planner.hooks
        hooks.attempt_started(self, record)
        hooks.attempt_ended(self, record, None)

    def _finish_exhausted(self) -> Action:
        if self._best_flagged is not None and self.route.on_all_invalid == "return_best":
            record, response = self._best_flagged
            record.extra["returned_as_best"] = True
            return self._succeed(record, response)
        error = AllAttemptsFailed(self.route.name, self.prompt_class, self.records)
        error.__cause__ = self._last_error
        self._final = Fail(error)
        self.planner.hooks.call_ended(self, None, error)
        return self._final

    # -- what an outcome means ---------------------------------------------------

    def on_response(self, attempt: Attempt, response: Any, now: float) -> None:
        """A 200 came back (for streams: the assembled response)."""
        record = self._settle(attempt, now)
        failed = self.planner.validator.check(self.route, self.request, response)
        fall_back = [name for name in failed if self.route.validators.get(name, "fall_back") == "fall_back"]
        if fall_back:
            record.outcome = "soft_failure"
            record.reason = fall_back[0]
            record.extra["failed_checks"] = failed
            self._count(attempt, fall_back[0])
            if self._best_flagged is None:
                self._best_flagged = (record, response)
            self.planner.hooks.attempt_ended(self, record, response)
            return
        self.planner.latency.observe(attempt.spec.name, self.prompt_class, record.latency_s)
        record.outcome = "flagged" if failed else "success"
        if failed:
            record.reason = failed[0]
            record.extra["failed_checks"] = failed
        self._count(attempt, None)
        self.planner.hooks.attempt_ended(self, record, response)
        self._abandon_in_flight(now)
        self._succeed(record, response)

    def on_error(self, attempt: Attempt, error: BaseException, now: float) -> None:
        """The attempt raised."""
        record = self._settle(attempt, now)
        kind = classify_error(error)
        if kind == k.TIMEOUT and attempt.soft_timeout_s is not None and attempt.soft_timeout_s < attempt.hard_timeout_s:
            kind = k.SOFT_TIMEOUT  # our learned bound fired, not the class's hard timeout
        if kind == k.TIMEOUT or kind == k.SOFT_TIMEOUT:
            # The latency sample is censored at the timeout; still record it so a spike moves the window.
            self.planner.latency.observe(attempt.spec.name, self.prompt_class, record.latency_s)
        record.outcome = "failure"
        record.reason = kind
        record.error = error
        self._last_error = error
        self._count(attempt, kind)
        self.planner.hooks.attempt_ended(self, record, None)
        if kind == k.CONTEXT_WINDOW:
            self._shrink *= 0.75  # the size estimate was wrong: ask the fitter for a smaller prompt
        if kind == k.SOFT_TIMEOUT or kind in self.planner.policy.fall_back_on:
            return
        if self._final is None:
            self._abandon_in_flight(now)
            self._final = Fail(error)  # e.g. an ordinary 400: the request itself is wrong
            self.planner.hooks.call_ended(self, None, error)

    def on_cancelled(self, attempt: Attempt, now: float) -> None:
        """The attempt was abandoned (a hedge lost, or the call ended): neither success nor failure."""
        if attempt not in self._in_flight:
            return
        record = self._settle(attempt, now)
        record.outcome = "cancelled"
        self.planner.breakers.get(attempt.spec.name).release(attempt.ticket)
        self.planner.hooks.attempt_ended(self, record, None)

    def _abandon_in_flight(self, now: float) -> None:
        # The call is decided: attempts still running (hedges) lose. Recording that here,
        # before call_ended, keeps their spans and records complete; the driver then only
        # has to close their connections (its later on_cancelled calls are no-ops).
        for attempt in list(self._in_flight):
            self.on_cancelled(attempt, now)

    def _settle(self, attempt: Attempt, now: float) -> AttemptRecord:
        self._in_flight.remove(attempt)
        record = attempt.record
        record.latency_s = now - record.started_at
        return record

    def _count(self, attempt: Attempt, failure_kind: str | None) -> None:
        breaker = self.planner.breakers.get(attempt.spec.name)
        before = breaker.state
        breaker.record(attempt.ticket, failure_kind)
        after = breaker.state
        if after != before:
            attempt.record.breaker_transitions.append((before, after))

    def _succeed(self, record: AttemptRecord, response: Any) -> Action:
        self.answered_by = record
        _attach_summary(response, self)
        self._final = Done(response)
        self.planner.hooks.call_ended(self, response, None)
        return self._final

    @property
    def in_flight(self) -> list[Attempt]:
        return list(self._in_flight)

    def summary(self) -> dict[str, Any]:
        """What happened, as attached to the response under ``_hidden_params["llm_resilience"]``."""
        answered = self.answered_by
        return {
            "route": self.route.name,
            "prompt_class": self.prompt_class,
            "model": answered.model if answered else None,
            "litellm_model": answered.litellm_model if answered else None,
            "fallbacks": sum(1 for r in self.records if r is not answered and r.outcome != "cancelled"),
            "flagged": answered.outcome == "flagged" if answered else False,
            "attempts": [r.as_dict() for r in self.records],
        }


def _attach_summary(response: Any, call: Call) -> None:
    hidden = getattr(response, "_hidden_params", None)
    if hidden is None:
        try:
            response._hidden_params = hidden = {}
        except AttributeError:  # a response type we cannot annotate: nothing to attach to
            return
    hidden["llm_resilience"] = call.summary()


def last_user_text(messages: Sequence[Mapping[str, Any]]) -> str:
    """Text of the last user message (multimodal parts: their text parts joined)."""
    for message in reversed(messages):
        if message.get("role") == "user":
            return content_text(message.get("content"))
    return ""


def content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            str(part.get("text", "")) for part in content if isinstance(part, Mapping) and part.get("type") == "text"
        )
    return ""
