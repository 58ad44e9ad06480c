"""The decision core: given the policy, the request and the live state, what happens next.

No I/O happens here. A driver (sync, async, streaming: ``_drivers.py``) runs a loop::

    call = planner.start(request)
    while True:
        action = call.next_action(now)
        Launch(attempt) -> send attempt.kwargs to litellm, then report
                           call.on_response(attempt, response, now) or call.on_error(attempt, exc, now)
        Wait(until)     -> attempts are in flight: wait for one to finish, or until `until`;
                           nothing in flight (a retry's backoff): sleep until `until`
        Done(response)  -> cancel what is still in flight (call.on_cancelled), return response
        Fail(error)     -> cancel what is still in flight, raise error

Everything that is a *decision* lives here: which model next (chain order, breakers,
context window, deadline), with which timeout, and what an outcome means (fall back,
raise, count toward the breaker). That keeps the drivers thin and lets the rules be
tested without a server (``tests/test_planner.py``).
"""

from __future__ import annotations

import email.utils
import logging
import random
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import _outcomes as k
from ._breakers import CLOSED, OPEN, Admission, BreakerRegistry, ProbeTicket
from ._budget import Budgets
from ._exceptions import AllAttemptsFailed, LLMResilienceError, UnknownPromptClass
from ._hooks import HookSet
from ._outcomes import AttemptRecord, classify_error, hidden_params
from ._policy import ModelSpec, Policy, PromptClass, ResolvedRoute, caller_timeout_class
from ._saturation import NotSaturated, SaturationSignal

log = logging.getLogger("llm_resilience")

# Below this, an attempt cannot realistically complete; treat the deadline as reached.
MIN_ATTEMPT_S = 0.005

# A bound the client's own delay postponed is checked again no sooner than this.
MIN_EXTENSION_S = 0.005
# When the client itself was late for at least this share of an attempt, the client was saturated:
# its clock cannot judge the provider, and no timeout of that attempt is the provider's (issue 13).
SATURATED_SHARE = 0.5
# A client late for less than this share of an attempt did not make it time out: no excuse.
NOTICEABLE_SHARE = 0.1

# litellm arguments that would make litellm retry or fall back on its own, hiding
# attempts from our breakers and spans. We own retries and fallbacks.
_OWNED_KWARGS = ("num_retries", "max_retries", "fallbacks", "context_window_fallback_dict")
_WHY_DROPPED = {
    "num_retries": "the policy's retries decide same-model retries",
    "max_retries": "the policy's retries decide same-model retries",
    "fallbacks": "the policy's chain decides fallbacks",
    "context_window_fallback_dict": "the policy's chain and truncation handle context windows",
    "stream_timeout": "streams use the class's first_token_timeout_s and idle_timeout_s",
}
_dropped_warned: set[str] = set()
_dropped_lock = threading.Lock()


def _warn_dropped(kwargs: Mapping[str, Any], stream: bool) -> None:
    """Log, once per process and argument, a caller argument we do not pass on (its name, never its value)."""
    for name in (*_OWNED_KWARGS, "stream_timeout") if stream else _OWNED_KWARGS:
        if name not in kwargs:
            continue
        with _dropped_lock:  # (only calls that pass such an argument get here)
            first = name not in _dropped_warned
            _dropped_warned.add(name)
        if first:
            log.warning("llm_resilience ignores the argument %r: %s (logged once)", name, _WHY_DROPPED[name])


# Caller arguments that choose where a request goes, or as whom (every alias litellm 1.110's
# completion accepts). For a model declared in the policy, the policy owns all of them: the
# caller's are dropped, even those the policy leaves unset (litellm then uses its environment,
# as for every other call to that model), so spans and breakers describe the endpoint called.
_ENDPOINT_KWARGS = frozenset({
    "api_base", "base_url", "api_key", "api_version", "custom_llm_provider", "organization", "deployment_id",
    "model_list", "client", "use_litellm_proxy", "litellm_credential_name",
    "client_id", "client_secret", "tenant_id",
})  # fmt: skip
_ENDPOINT_PREFIXES = ("azure_", "aws_", "vertex_")  # provider credentials and regions


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
    first_token_timeout_s: float | None = None
    idle_timeout_s: float | None = None
    """Streams: the longest wait for the next chunk (the class's ``idle_timeout_s``, else its ``timeout_s``)."""
    hedge_at: float | None = None
    """Monotonic time after which, if no answer came, the next model may start in parallel."""
    hedge_check_at: float | None = None
    """A hedge due but held back while the client is saturated: when to look again."""
    soft_timeout_s: float | None = None
    """Slower than this is a slow call for the breaker (``None``: no soft timeout configured)."""
    soft_cut: bool = False
    """The attempt is cut off at its soft timeout (``timeout_s``, or the first chunk for streams)."""
    cut_at: float | None = None
    """May be hedged: if no hedge started for it by then, the planner drops it as a soft timeout."""
    bound_at: float | None = None
    """Monotonic time its whole-attempt bound (``timeout_s``) passes; :meth:`Call.at_bound` then judges
    it (a new bound if the client, not the provider, was slow). Drivers that can stop an attempt
    send it with ``read_timeout_s`` and enforce this; streams keep their own timing."""
    read_timeout_s: float | None = None
    """litellm's (per-read) ``timeout`` when the driver enforces ``bound_at``: the call's whole deadline."""
    expired: bool = False
    """:meth:`Call.at_bound` cut it off: its error is a timeout the provider is blamed for."""
    client_delay_s: float = 0.0
    """The client's own share of the attempt's time so far (``_saturation.py``); every bound of the
    attempt (hedge, soft timeout, cut, whole-attempt bound) is judged on the provider's share, i.e.
    postponed by this much."""
    io_measured: bool = False
    """The driver reports where the attempt's time went (sync attempts on the driver's own HTTP client):
    ``on_wire``, ``connecting_since``, ``network_s``, ``sent_at`` and ``answered_at``."""
    on_wire: bool = False
    """The driver began to connect or to send the request: an error from then on is not a request that
    could not be built."""
    connecting_since: float | None = None
    """A TCP (or TLS) handshake with the provider's host is in progress since then: the provider's time."""
    network_s: float = 0.0
    """The provider's share of the time before the request left: handshakes, as the kernel timed them.
    The rest of that time (building the request, waiting for the GIL between writes) is the client's."""
    sent_at: float | None = None
    """When the whole request had left for the provider (``None``: not yet; the time so far is the client's,
    apart from ``network_s`` and a handshake in progress)."""
    answered_at: float | None = None
    """When the provider's answer had arrived; the time after it (waiting to read it, parsing) is the client's."""
    suspect_slot: bool = False
    """Admitted while its model was suspect: frees one of the suspect slots when it ends."""
    started_cold: bool = False
    """Started before any attempt had ended in the process: it may carry litellm's first-call costs,
    whenever it ends (a stream's first-token timeout is judged after the attempt left the call)."""


def _client_time(attempt: Attempt, now: float) -> float:
    """The client's own time in ``attempt`` so far, as its driver measured it (0 when it does not).

    The provider's time is what the driver saw on the wire: handshakes with its host (``network_s``,
    and one in progress), and from the moment the whole request had left (``sent_at``) until its
    answer arrived (``answered_at``, else now). Everything else (litellm building the request, the
    thread waiting for the GIL before the connect, between the request's writes or after the answer
    came in, parsing) is the client's: under a thread burst those waits are hundreds of ms, and a
    request half written is no time the provider could have spent answering it.
    """
    if not attempt.io_measured:
        return 0.0
    provider = attempt.network_s
    if attempt.connecting_since is not None:
        provider += max(0.0, now - attempt.connecting_since)
    if attempt.sent_at is not None:
        answered = attempt.answered_at if attempt.answered_at is not None else now
        provider += max(0.0, min(answered, now) - attempt.sent_at)
    return max(0.0, now - attempt.record.started_at - provider)


@dataclass(frozen=True)
class Launch:
    attempt: Attempt


@dataclass(frozen=True)
class Wait:
    until: float | None
    """Monotonic time to wake up and ask again even if nothing finished (None: wait for one).

    With nothing in flight (a retry waiting out its backoff), the driver sleeps until then.
    """


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

    def check(
        self, route: ResolvedRoute, request: CallRequest, response: Any, sent: Mapping[str, Any] | None = None
    ) -> list[str]:
        """``sent``: the litellm arguments of the attempt (the model's ``litellm_params`` included)."""
        ...


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
    def check(
        self, route: ResolvedRoute, request: CallRequest, response: Any, sent: Mapping[str, Any] | None = None
    ) -> list[str]:
        return []


class LatencyView(Protocol):
    """Recent latency per (model, prompt class) (``_latency.py``)."""

    def observe(self, model: str, prompt_class: str, latency_s: float) -> None: ...

    def observe_censored(self, model: str, prompt_class: str, at_least_s: float) -> None:
        """The attempt was cut off (timeout, cancelled hedge loser): its latency is only a lower bound."""
        ...

    def percentile(self, model: str, prompt_class: str, q: float, min_samples: int) -> float | None: ...


class ProbeContexts(Protocol):
    """Which callers may take a half-open breaker's probe (``_saturation.CallerContexts``)."""

    def may_probe(self, now: float) -> bool: ...


class AnyCaller:
    """Every caller may probe (planner default; the simulator)."""

    def may_probe(self, now: float) -> bool:
        return True


class NoLatency:
    def observe(self, model: str, prompt_class: str, latency_s: float) -> None:
        return None

    def observe_censored(self, model: str, prompt_class: str, at_least_s: float) -> None:
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
    budgets: Budgets = field(default_factory=Budgets)
    """Hedge and retry budgets (``_budget.py``): extra requests as a share of recent traffic."""
    rng: random.Random = field(default_factory=random.Random)
    """Jitter for retry backoff (seed it in tests)."""
    saturation: SaturationSignal = field(default_factory=NotSaturated)
    """Whether the client itself is the bottleneck (``_saturation.py``; tests script it)."""
    contexts: ProbeContexts = field(default_factory=lambda: AnyCaller())
    """Whether the calling context may take a half-open probe (``_saturation.CallerContexts``; tests script it)."""

    def start(self, request: CallRequest, now: float | None = None) -> Call:
        """Decide route and prompt class, and open the call.

        Raises ``UnknownPromptClass``, and litellm's ``BadRequestError`` for a model string longer
        than :data:`MAX_MODEL_CHARS` (no model is called that; refused before it costs anything).
        """
        if len(request.model) > MAX_MODEL_CHARS:
            raise model_too_long(request.model)
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
        caller_timeout = request.kwargs.get("timeout")
        self.caller_deadline_at: float | None = None
        """The caller's own ``timeout=``, as a monotonic time: it caps even a committed stream."""
        if isinstance(caller_timeout, int | float) and not isinstance(caller_timeout, bool) and caller_timeout > 0:
            if self.prompt_class == "default" and "default" not in policy.document.prompt_classes:
                # the built-in class (see caller_timeout_class): never shorter than the caller asked
                self.klass = caller_timeout_class(float(caller_timeout))
            deadline = min(self.klass.deadline_s, float(caller_timeout))  # the caller's own bound still holds
            self.caller_deadline_at = now + float(caller_timeout)
        else:
            deadline = self.klass.deadline_s
        self.deadline_at = now + deadline
        self._deadline_s = deadline
        self.records: list[AttemptRecord] = []
        self.hook_data: dict[object, Any] = {}
        self.answered_by: AttemptRecord | None = None
        self._position = 0  # next index in the chain
        self._in_flight: list[Attempt] = []
        self._final: Done | Fail | None = None
        self._last_error: BaseException | None = None
        self._best_flagged: tuple[AttemptRecord, Any] | None = None
        self._committed: Attempt | None = None  # a stream whose output reached the caller (see commit)
        # Streams with on_interrupt: continue, after a committed stream broke: the text the caller
        # already has (the next model is asked to continue it) and the error to raise if none can.
        self._continue_text: str | None = None
        self._interrupted: BaseException | None = None
        self._joins: list[dict[str, Any]] = []
        self._no_prefill: set[str] = set()  # models that rejected an assistant prefill in this call
        self._continued_itself = False  # a model whose stream broke was asked to continue it (once per call)
        # JSON is continued only where the join is exact (a prefill): a model asked in conversation
        # may start a new JSON document, and no overlap rule can make two documents one.
        self._exact_join_only = wants_json(request.kwargs.get("response_format"))
        self._shrink = 1.0  # < 1 after a provider said the prompt was too long
        self._base_kwargs = {key: v for key, v in request.kwargs.items() if key not in _OWNED_KWARGS}
        if len(self._base_kwargs) != len(request.kwargs) or (request.stream and "stream_timeout" in request.kwargs):
            _warn_dropped(request.kwargs, request.stream)
        # (The caller's `timeout` stays here: every attempt's kwargs["timeout"] is set in _prepare.)
        self._hedges = 0  # hedges launched by this call (route.hedge.max_extra caps it)
        self._hedge_due: set[int] = set()  # attempts whose hedge threshold passed (hedged or not)
        self._retry: tuple[ModelSpec, float, int] | None = None  # (model, not before, retry of index)
        self._retries: dict[str, int] = {}  # retries sent per model in this call
        if self.route.hedge is not None and not request.stream:
            planner.budgets.hedges(self.route.name).record_request(now)
        planner.hooks.call_started(self)

    # -- what next -------------------------------------------------------------

    def next_action(self, now: float) -> Action:
        if self._final is not None:
            return self._final
        if self._in_flight:
            if not self.request.stream:
                self._expire(now)
            self._flag_slow(now)
            hedge = self._maybe_hedge(now)
            if hedge is not None:
                return Launch(hedge)
            self._cut_unhedged(now)
            if self._in_flight:
                return Wait(until=self._wake_at())
        if self._retry is not None:
            spec, not_before, retry_of = self._retry
            if now < not_before:
                return Wait(until=not_before)  # backoff: nothing in flight, the driver sleeps
            self._retry = None
            attempt = self._prepare(spec, now, retry_of=retry_of)
            if attempt is not None:
                return Launch(attempt)
        while self._position < len(self.route.chain):
            spec = self.route.chain[self._position]
            self._position += 1
            attempt = self._prepare(spec, now)
            if attempt is not None:
                return Launch(attempt)
        panic = self._panic_attempt(now)
        if panic is not None:
            return Launch(panic)
        own = self._continue_itself(now)
        if own is not None:
            return Launch(own)
        return self._finish_exhausted()

    def _wake_at(self) -> float | None:
        """The next hedge threshold, cut or soft timeout among attempts in flight (``None``: wait for one)."""
        due = self._hedge_due
        times = [
            a.hedge_check_at or a.hedge_at
            for a in self._in_flight if a.hedge_at is not None and a.record.index not in due
        ]  # fmt: skip
        times += [
            a.cut_at + a.client_delay_s
            for a in self._in_flight if a.cut_at is not None and "hedged_by" not in a.record.extra
        ]  # fmt: skip
        times += [at for a in self._in_flight if (at := self._slow_at(a)) is not None]
        times += [a.bound_at for a in self._in_flight if a.bound_at is not None]
        times.append(self.deadline_at)  # whatever happens, the caller's wait ends at the deadline
        return min(times)

    def _slow_at(self, attempt: Attempt) -> float | None:
        """When an attempt in flight becomes slow for its breaker (``None``: never, or already counted).

        Only non-streaming attempts: a stream's latency sample is its first chunk, which the
        planner hears about only at the end, so a stream is judged when it ends.
        """
        soft = attempt.soft_timeout_s
        if soft is None or self.request.stream or "slow" in attempt.record.extra:
            return None
        return attempt.record.started_at + soft + attempt.client_delay_s

    def _flag_slow(self, now: float) -> None:
        """Count attempts still in flight past their soft timeout as slow, now rather than when they end.

        A breaker can only stop calls once it knows they are slow. An attempt that runs past its
        soft timeout (a hedged one racing its hedge, the last model) is slow whatever happens
        next, so it counts as one ``soft_timeout`` failure the moment it crosses the bound; the
        record is marked ``slow`` and its later end (cancelled, failed, even a success: it was
        slow) counts nothing more, so a slow half-open probe re-opens the breaker at once and
        its late answer cannot close it. Waiting for the hedge to win and the loser to be
        cancelled would let more calls reach the sick model meanwhile.
        """
        for attempt in self._in_flight:
            at = self._slow_at(attempt)
            if at is None or now < at:
                continue
            if attempt.soft_timeout_s is not None and self._client_excuse(attempt, attempt.soft_timeout_s, now):
                continue  # the client made it slow: no verdict on the provider (never asked again)
            attempt.record.extra["slow"] = True
            self._count(attempt, k.SOFT_TIMEOUT)  # also frees a probe slot: the probe failed
            self.planner.breakers.get(attempt.spec.name).mark_suspect()

    def _cut_unhedged(self, now: float) -> None:
        """Drop attempts past their soft timeout for which no hedge started (budget, no model left).

        Without a hedge racing it, a slow attempt is handled as on a route without hedging: a
        soft_timeout failure, and the chain moves on. The driver closes its connection, since
        the planner no longer counts it as in flight.
        """
        for attempt in list(self._in_flight):
            if attempt.cut_at is None or "hedged_by" in attempt.record.extra:
                continue
            if attempt.cut_at + attempt.client_delay_s > now:
                continue
            if attempt.soft_timeout_s is not None and self._client_excuse(attempt, attempt.soft_timeout_s, now):
                continue  # the client's share postponed it: checked again later (_wake_at)
            record = self._settle(attempt, now)
            self.planner.latency.observe_censored(attempt.spec.name, self.prompt_class, record.latency_s)
            record.outcome = "failure"
            record.reason = k.SOFT_TIMEOUT
            record.cut_by = "soft"
            record.error = self._last_error = TimeoutError(
                f"no answer within the soft timeout ({attempt.soft_timeout_s or 0:.3g} s) and no hedge started"
            )
            # Not counted here: _flag_slow, run just before in next_action, saw it cross the same
            # bound (cut_at is its start + soft timeout) and counted it as slow.
            self.planner.hooks.attempt_ended(self, record, None)

    def _maybe_hedge(self, now: float) -> Attempt | None:
        """An attempt in flight passed its hedge threshold: start the next model beside it, if allowed.

        Starting a hedge is not a verdict on the slow attempt: it keeps running, and whichever
        answers first wins. Why a hedge did not start is recorded on the slow attempt
        (``hedge_skipped``: ``budget``, ``no_model``, or ``client_overload`` while the client, not the
        provider, is what makes it slow). ``max_extra`` is enforced earlier: :meth:`_prepare` gives no
        hedge threshold to an attempt once that many hedges ran.
        """
        cfg = self.route.hedge
        if cfg is None:
            return None
        due = [
            a for a in self._in_flight
            if a.hedge_at is not None and a.hedge_at <= now and (a.hedge_check_at or a.hedge_at) <= now
        ]  # fmt: skip
        due = [a for a in due if a.record.index not in self._hedge_due]
        # Slow because the client is saturated (or cold), not because of the provider: a hedge
        # would queue for the same CPU. Checked again at the next wake-up; the reason stays on the
        # attempt unless a hedge starts.
        slow_here: list[Attempt] = []
        for waiting in due:
            if self._hedge_waits_for_client(waiting, now):
                waiting.record.extra["hedge_skipped"] = k.CLIENT_OVERLOAD
                # Its threshold moves by the client's delay (never less than a little later).
                hedge_at = waiting.hedge_at or now
                waiting.hedge_check_at = max(hedge_at + waiting.client_delay_s, now + MIN_EXTENSION_S)
            else:
                slow_here.append(waiting)
        due = slow_here
        if not due:
            return None
        self._hedge_due.update(a.record.index for a in due)
        slow = due[0].record
        slow.extra.pop("hedge_skipped", None)  # a client_overload reason from an earlier check
        budget = self.planner.budgets.hedges(self.route.name)
        if not budget.try_spend(now, cfg.budget_ratio):
            slow.extra["hedge_skipped"] = "budget"
            return None
        self._hedges += 1
        while self._position < len(self.route.chain):
            spec = self.route.chain[self._position]
            self._position += 1
            attempt = self._prepare(spec, now, hedged=True)
            if attempt is not None:
                slow.extra["hedged_by"] = attempt.record.index
                return attempt
        # (self._hedges stays counted: no model is left, so no later attempt can be hedged anyway.)
        budget.refund(now)  # every remaining model was skipped: nothing was sent
        slow.extra["hedge_skipped"] = "no_model"
        return None

    def _hedge_waits_for_client(self, attempt: Attempt, now: float) -> bool:
        """Whether a hedge due on the caller's clock waits because the client, not the provider, is slow.

        A hedge is for the caller: past the threshold on the wall clock, the next model starts,
        even when part of that time was the client's (litellm building the request, a pool thread
        busy with another call's aborted loser): the threshold was learned from wall times, which
        carry that share already, and postponing the hedge by it made the first calls of a spike
        cost the threshold *plus* the client's time. Only a client that is saturated (late for at
        least half of the attempt) or cold holds the hedge back: then it would queue for the same
        CPU, and in a burst against healthy providers every attempt would be doubled.
        """
        excuse = self._client_excuse(attempt, (attempt.hedge_at or now) - attempt.record.started_at, now)
        if excuse is None:
            return False
        return excuse == "cold_start" or attempt.client_delay_s >= SATURATED_SHARE * (now - attempt.record.started_at)

    def _hedge_after(self, spec: ModelSpec) -> float | None:
        """Seconds after which an attempt on ``spec`` is hedged (``None``: not yet known)."""
        cfg = self.route.hedge
        if cfg is None:
            return None
        if not isinstance(cfg.after, str):
            return float(cfg.after)
        soft = self.klass.soft_timeout
        learned = self.planner.latency.percentile(
            spec.name, self.prompt_class, float(cfg.after[1:]), soft.min_samples if soft else 20
        )
        if learned is None:
            # No latency history: hedge only at a bound ops chose, never at a guess.
            return soft.warmup_s if soft is not None else None
        return max(soft.floor_s if soft is not None else 0.0, learned)

    def _prepare(
        self,
        spec: ModelSpec,
        now: float,
        *,
        hedged: bool = False,
        retry_of: int | None = None,
        panic: bool = False,
        overflow: bool = False,
    ) -> Attempt | None:
        """Turn the next model into an attempt, or record why it is skipped (``overflow``: past its suspect gate)."""
        record = AttemptRecord(
            index=len(self.records), model=spec.name, litellm_model=spec.litellm_model, started_at=now,
            hedged=hedged, retry_of=retry_of,
        )  # fmt: skip
        left = self.deadline_at - now
        if left < MIN_ATTEMPT_S:
            self._skip(record, k.DEADLINE)
            self._position = len(self.route.chain)  # nothing after this can run either
            return None
        breaker = self.planner.breakers.get(spec.name)
        seen = breaker.last_transition
        if panic:  # bypasses the breaker: not a probe, and its outcome is not counted (_count)
            admission, ticket = Admission.ADMIT, ProbeTicket(probe=False)
        else:
            admission, ticket = breaker.admit_with_ticket(
                lambda: self.planner.contexts.may_probe(now), probe_for_s=left
            )
        record.breaker_state = breaker.state
        if admission is Admission.PROBE and breaker.last_transition is not seen and breaker.last_transition:
            record.breaker_events.append(breaker.last_transition)  # open -> half-open: this is the probe
        if admission is Admission.OPEN:
            record.extra["open_until"] = breaker.open_until()
            self._skip(record, k.BREAKER_OPEN)
            return None
        if admission is Admission.PROBE_BUSY:
            self._skip(record, k.PROBE_IN_FLIGHT)
            return None
        if admission is Admission.PROBE_DEFERRED:  # a starved caller's probe would judge nothing
            self._skip(record, k.PROBE_DEFERRED)
            return None
        suspect_slot = False
        if admission is Admission.ADMIT and not panic and breaker.suspect:
            # A request in flight to this model is already slow or failed: few new ones until a verdict.
            if overflow:
                record.extra["suspect_overflow"] = True  # every model's gate was shut: this one anyway
            elif breaker.take_suspect_slot():
                suspect_slot = True
            else:
                self._skip(record, k.SUSPECT)
                return None
            record.extra["suspect"] = True
        if ticket.probe:
            record.extra["probe"] = True
        form = self.continuation_form(spec) if self._continue_text is not None else None
        if self._continue_text is not None and form is None:
            breaker.release(ticket)
            if suspect_slot:
                breaker.release_suspect_slot()
            self._skip(record, k.NO_PREFILL)
            return None
        if panic:
            record.extra["panic"] = True
        params, missing = spec.resolved_params()
        if missing is not None:
            breaker.release(ticket)
            if suspect_slot:
                breaker.release_suspect_slot()
            record.extra["missing_env"] = missing
            self._skip(record, k.MISSING_API_KEY)
            return None
        preparing = time.perf_counter()  # a measurement for the span, not an input to any decision
        fit = self.planner.fitter.fit(
            spec, self.request.messages, self.route, self.klass, self._base_kwargs, self._shrink
        )
        record.prepare_s = time.perf_counter() - preparing
        record.tokens_before, record.tokens_after, record.truncated = (
            fit.tokens_before, fit.tokens_after, fit.truncated
        )  # fmt: skip
        if not fit.fits:
            breaker.release(ticket)
            if suspect_slot:
                breaker.release_suspect_slot()
            self._skip(record, k.CONTEXT_TOO_SMALL)
            return None
        timeout = min(self.klass.timeout_s, left)
        soft = self._soft_timeout(spec)
        # The stream driver runs one attempt at a time: streams are cut at the soft timeout, never hedged.
        hedge_cfg = None if self.request.stream else self.route.hedge
        later = self._position < len(self.route.chain)  # a model to move on to
        hedge_at: float | None = None
        if hedge_cfg is not None and later and self._hedges < hedge_cfg.max_extra:
            after = self._hedge_after(spec)
            if after is not None and after < timeout:
                hedge_at = now + after
                record.extra["hedge_after_s"] = round(after, 6)
        # The soft timeout cuts an attempt off only when there is somewhere to go (the last model
        # is better slow than cut). An attempt that may be hedged runs to its hard timeout, so
        # the hedge can race it; the planner cuts it at the soft timeout only if no hedge started
        # for it by then (cut_at). Either way, slower than the soft timeout counts as slow for the breaker.
        slow_matters = soft is not None and soft < timeout and later
        soft_cut = slow_matters and hedge_at is None
        cut_at = now + soft if slow_matters and hedge_at is not None and soft is not None else None
        first_token = min(self.klass.first_token_timeout_s or timeout, timeout)
        if soft_cut and soft is not None and self.request.stream:
            first_token = min(first_token, soft)  # streams: the soft timeout bounds the first chunk
        if soft is not None:
            record.extra["soft_timeout_s"] = round(soft, 6)
        klass = self.klass
        if self.request.stream:
            record.bounds = {
                "first_token": klass.first_token_timeout_s or klass.timeout_s,
                "idle": klass.idle_timeout_s or klass.timeout_s,
                "deadline": left,
            }
        else:
            record.bounds = {"attempt": klass.timeout_s, "deadline": left}
        if soft is not None:
            record.bounds["soft"] = soft
        if spec.adhoc:  # the caller's own model string: its endpoint arguments are the caller's to give
            kwargs = dict(self._base_kwargs)
        else:
            kwargs = {
                key: v
                for key, v in self._base_kwargs.items()
                if key not in _ENDPOINT_KWARGS and not key.startswith(_ENDPOINT_PREFIXES)  # (inline: a call per key)
            }
        kwargs.update(params)
        if isinstance(kwargs.get("metadata"), dict):
            # litellm writes into `metadata` (timings, hidden params): each attempt gets its own copy,
            # so one attempt's bookkeeping never leaks into the next one or back to the caller.
            kwargs["metadata"] = dict(kwargs["metadata"])
        kwargs["messages"] = fit.messages
        if self._continue_text is not None and form is not None:
            kwargs["messages"] = [*fit.messages, *continuation_messages(form, self._continue_text, self.route)]
            record.extra["continuation"] = form
            if form == PREFILL:
                record.extra["prefill_chars"] = len(self._continue_text)
        kwargs["timeout"] = soft if soft_cut and soft is not None and not self.request.stream else timeout
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
            first_token_timeout_s=first_token,
            idle_timeout_s=self.klass.idle_timeout_s or self.klass.timeout_s,
            hedge_at=hedge_at,
            soft_timeout_s=soft,
            soft_cut=soft_cut,
            cut_at=cut_at,
            suspect_slot=suspect_slot,
            started_cold=self.planner.saturation.cold(),
        )
        if not self.request.stream:
            attempt.bound_at = now + attempt.timeout_s
            # The whole deadline, not the time left: a value that is the same for every call of the
            # class, since litellm caches one HTTP client per distinct timeout (a new pool per call otherwise).
            attempt.read_timeout_s = self._deadline_s
        retries = self.route.retries
        if retries is not None and retries.max_retries > 0 and retry_of is None:
            self.planner.budgets.retries(spec.name).record_request(now)
        self.records.append(record)
        self._in_flight.append(attempt)
        self.planner.hooks.attempt_started(self, record)
        return attempt

    # -- client saturation, panic ---------------------------------------------------

    def _client_excuse(self, attempt: Attempt, bound_s: float, now: float) -> str | None:
        """Why the client, not the provider, made ``attempt`` exceed ``bound_s`` by ``now`` (``None``: it did not).

        ``cold_start``: no attempt had ended in this process when this one started (litellm's lazy imports).
        ``client_saturated``: the wall time minus the client's own delay (the saturation signal's
        estimate) is still within the bound. Either way the attempt records the reason and the
        delay (``client_overload``, ``client_delay_s``), and its bounds move by the delay.
        """
        signal = self.planner.saturation
        record = attempt.record
        if attempt.started_cold:
            attempt.client_delay_s = float("inf")
            reason = "cold_start"
        else:
            # An attempt timed at the wire has its client time measured, not estimated: while its
            # request is at the provider, the provider is working whatever the lag probes say. The
            # thread probe's estimate (CLIENT_HOPS x its lateness) postponed a spike call's hedge by up
            # to 179 ms where the wire said 40 ms (sequential incident, measured).
            delay = _client_time(attempt, now) if attempt.io_measured else signal.delay_s(record.started_at, now)
            attempt.client_delay_s = max(attempt.client_delay_s, delay)
            wall = now - record.started_at
            provider_s = wall - attempt.client_delay_s
            saturated = attempt.client_delay_s >= SATURATED_SHARE * wall
            # (1e-9: float noise; at the bound is past it)
            if attempt.client_delay_s < NOTICEABLE_SHARE * wall or (provider_s >= bound_s - 1e-9 and not saturated):
                return None
            reason = "client_saturated"
            # What the record says is a share of the attempt's elapsed time (the estimate that moves
            # its bounds may model more hops than have happened yet).
            record.extra["client_delay_s"] = round(min(attempt.client_delay_s, wall), 6)
        record.extra[k.CLIENT_OVERLOAD] = reason
        return reason

    def at_bound(self, attempt: Attempt, now: float) -> float | None:
        """The attempt's whole-attempt bound passed: a later bound to check again, or ``None`` to cut it.

        Called by the drivers (a sync attempt's watchdog, an async attempt's timer) and by
        :meth:`next_action` for attempts running beside others. When the client was saturated,
        the attempt keeps running (the next model would wait for the same CPU), at most until the
        deadline; the bound moves to where the provider's own share of the time would exceed it.
        """
        if attempt not in self._in_flight or attempt.expired:
            return None
        excuse = self._client_excuse(attempt, attempt.timeout_s, now)
        if excuse is not None and now < self.deadline_at - MIN_ATTEMPT_S:
            later = attempt.record.started_at + attempt.timeout_s + attempt.client_delay_s
            if attempt.client_delay_s >= SATURATED_SHARE * (now - attempt.record.started_at):
                later = max(later, now + attempt.timeout_s)  # saturated: look again a bound later
            attempt.bound_at = min(self.deadline_at, max(later, now + MIN_EXTENSION_S))
            return attempt.bound_at
        attempt.expired = excuse is None  # cut; blamed on the provider only if the client was not the slow one
        return None

    def _cut_by(self, attempt: Attempt) -> str:
        """Which of the attempt's bounds (``record.bounds``) cut it off when it timed out: the tightest
        of those that applied at that point (a stream waits for its first token, then chunk by chunk)."""
        record = attempt.record
        bounds = record.bounds
        if self.request.stream:
            if record.time_to_first_chunk_s is not None:
                return "idle"  # content had come: only the wait for the next chunk was bounded
            named = "first_token"
        else:
            named = "attempt"
        limit = bounds.get(named, attempt.timeout_s)
        soft = bounds.get("soft")
        if attempt.soft_cut and soft is not None and soft <= limit:
            return "soft"
        if bounds.get("deadline", limit) < limit:
            return "deadline"
        return named

    def _expire(self, now: float) -> None:
        """Attempts in flight past their bound: judged by :meth:`at_bound`; the driver stops those cut."""
        for attempt in list(self._in_flight):
            if attempt.bound_at is None or attempt.bound_at > now or self.at_bound(attempt, now) is not None:
                continue
            blamed = attempt.expired
            record = self._settle(attempt, now)
            kind = k.SOFT_TIMEOUT if attempt.soft_cut else k.TIMEOUT
            record.cut_by = self._cut_by(attempt)
            record.outcome = "failure" if blamed else k.CLIENT_OVERLOAD
            record.reason = kind
            record.error = self._last_error = attempt_timeout(attempt)
            if blamed:
                self.planner.latency.observe_censored(attempt.spec.name, self.prompt_class, record.latency_s)
                if "slow" not in record.extra:
                    self._count(attempt, kind)
            else:  # client_overload: no verdict, so a probe's slot is free again (see on_error)
                self.planner.breakers.get(attempt.spec.name).release(attempt.ticket)
            self.planner.hooks.attempt_ended(self, record, None)

    def _panic_attempt(self, now: float) -> Attempt | None:
        """Every model of the chain was skipped for its breaker's state: try one anyway.

        A model skipped only as *suspect* (its breaker is closed; its few suspect slots are
        taken) goes first: the first such model in chain order gets the request past its gate
        (``suspect_overflow``), an ordinary request whose outcome counts. Without it, a chain whose
        every model is suspect fails each call in microseconds; callers that retry at once then
        take the CPU from the very requests whose answers would clear the suspicion (seen in the
        soak: 20,000 calls failed that way, nothing answered for 35 s).

        Otherwise, when every model's breaker is open (``breakers.*.panic: try_one``), the one whose
        breaker opened first: it has been out of traffic the longest, so it is the likeliest to have
        healed, and it is the one its own probe would pick next anyway. (The last model to succeed
        is often the one that just failed too.) Only once per call, only if no request was sent
        yet, and never past the deadline.
        """
        # (Once per call: after the panic attempt, a record is not "skipped", or the call is decided.)
        if any(r.outcome != "skipped" for r in self.records):
            return None
        reasons = {r.model: r.reason for r in self.records}
        breaker_reasons = (k.BREAKER_OPEN, k.PROBE_IN_FLIGHT, k.PROBE_DEFERRED, k.SUSPECT)
        if not reasons or any(reason not in breaker_reasons for reason in reasons.values()):
            return None  # some model was skipped for another reason (context, key): panic cannot help
        suspects = [spec for spec in self.route.chain if reasons.get(spec.name) == k.SUSPECT]
        if suspects:
            return self._prepare(suspects[0], now, overflow=True)
        skipped = {model for model, reason in reasons.items() if reason == k.BREAKER_OPEN}
        if len(skipped) != len(reasons):
            return None  # a half-open model's probe is in flight: its verdict is near, no second request
        breakers = self.planner.breakers
        candidates = [
            spec for spec in self.route.chain
            if spec.name in skipped and breakers.get(spec.name).settings.panic == "try_one"
        ]  # fmt: skip
        if not candidates:
            return None
        spec = min(candidates, key=lambda s: breakers.get(s.name).opened_at or float("inf"))
        return self._prepare(spec, now, panic=True)

    def _continue_itself(self, now: float) -> Attempt | None:
        """No later model of the chain continued a broken stream: the model whose stream broke continues it.

        A cut or stalled stream is most often one bad connection, not a sick model, and on a
        one-model route (a drop-in ``model="openai/gpt-4o"`` call) there is no other model to ask.
        So, once per call, the model of the attempt that broke last is asked to continue the text
        the caller has (as any continuation: a prefill or a conversation, joined without
        repeating anything), provided its breaker admits it (the break was counted: a breaker
        that opened on it skips the model, ``breaker_open``) and the deadline, given anew by the
        break, leaves room. Otherwise, or if that continuation fails too, the caller gets the
        ``StreamInterrupted``.
        """
        if self._interrupted is None or self._continued_itself or not self._joins:
            return None
        self._continued_itself = True
        broken = self.records[self._joins[-1]["from"]]
        spec = next((s for s in self.route.chain if s.name == broken.model), None)
        if spec is None or self.continuation_form(spec) is None:
            return None  # (a JSON answer only a prefill may continue, and it takes none: nothing to ask)
        return self._prepare(spec, now)

    def _soft_timeout(self, spec: ModelSpec) -> float | None:
        """``multiplier`` x the learned percentile, within [floor, ceiling]; the warm-up bound before that."""
        cfg = self.klass.soft_timeout
        if cfg is None:
            return None
        hard = self.klass.timeout_s
        learned = self.planner.latency.percentile(spec.name, self.prompt_class, cfg.percentile, cfg.min_samples)
        if learned is None:
            return min(cfg.warmup_s, hard) if cfg.warmup_s is not None else hard
        ceiling = min(cfg.ceiling_s, hard) if cfg.ceiling_s is not None else hard
        return min(ceiling, max(cfg.floor_s, learned * cfg.multiplier))

    def _skip(self, record: AttemptRecord, reason: str) -> None:
        record.outcome = "skipped"
        record.reason = reason
        self.records.append(record)
        hooks = self.planner.hooks
        hooks.attempt_started(self, record)
        hooks.attempt_ended(self, record, None)

    def _finish_exhausted(self) -> Action:
        if self._interrupted is not None:  # no model could continue the stream: the caller has part of it
            self._final = Fail(self._interrupted)
            self.planner.hooks.call_ended(self, None, self._interrupted)
            return self._final
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

    def commit(self, attempt: Attempt) -> None:
        """A stream delivered its first content to the caller: this attempt can no longer be replaced.

        From now on a failure of it ends the call (the stream driver raises ``StreamInterrupted``)
        instead of falling back, and a validator that says ``fall_back`` only flags the answer,
        since the caller already has the text. Both still count toward the model's breaker.

        A half-open probe is judged here, at its first content, not when the caller finishes
        reading: the provider has shown it accepts requests and generates, which is what the
        probe asks, and a slow reader must not keep a healed model out of rotation. (Waiting
        for the provider's end would need reading ahead of the caller, giving up back-pressure.)
        A first chunk later than the soft timeout is a failed probe. Whatever happens to the
        stream afterwards counts once more, as an ordinary request's outcome.
        """
        self._committed = attempt
        if self._continue_text is not None:  # the continuation took over: the join is complete
            attempt.record.extra["join"] = True  # the path shows it: "(join)"
            join = self._joins[-1]  # (on_interrupted records the join whenever it sets _continue_text)
            attempt.record.extra["continues"] = join["from"]
            join["to"] = attempt.record.index
            join["model"] = attempt.record.model
            self._continue_text = None
            self._interrupted = None
        if not attempt.ticket.probe:
            return
        ttfc = attempt.record.time_to_first_chunk_s
        soft = attempt.soft_timeout_s
        if soft is not None and ttfc is not None and ttfc > soft:
            attempt.record.extra["slow"] = True  # the end of the stream counts nothing more
            self._count(attempt, k.SOFT_TIMEOUT)
            return
        breaker = self.planner.breakers.get(attempt.spec.name)
        before = breaker.state
        breaker.probe_passed(attempt.ticket)
        if breaker.state != before:
            attempt.record.breaker_transitions.append((before, breaker.state))

    def on_response(self, attempt: Attempt, response: Any, now: float) -> None:
        """A 200 came back (for streams: the assembled response)."""
        if attempt not in self._in_flight:
            return  # already abandoned: another attempt decided the call first
        counted = "slow" in attempt.record.extra  # _flag_slow already counted it as one slow call
        record = self._settle(attempt, now)
        failed = self.planner.validator.check(self.route, self.request, response, attempt.kwargs)
        fall_back = [name for name in failed if self.route.validators.get(name, "fall_back") == "fall_back"]
        if fall_back and attempt is not self._committed:
            record.outcome = "soft_failure"
            record.reason = fall_back[0]
            record.extra["failed_checks"] = failed
            if not counted:
                self._count(attempt, fall_back[0])
            if self._best_flagged is None:
                self._best_flagged = (record, response)
            self.planner.hooks.attempt_ended(self, record, response)
            return
        latency = self._latency_sample(attempt)
        excused = False
        if not counted and attempt.soft_timeout_s is not None and latency > attempt.soft_timeout_s:
            excused = self._client_excuse(attempt, attempt.soft_timeout_s, now) is not None
        if not excused:  # a latency the client inflated would teach the windows the client's queue
            self.planner.latency.observe(attempt.spec.name, self.prompt_class, latency)
        # A slow success (possible when hedging or the last model let it run past its soft
        # timeout) is answered, but counts as a soft_timeout failure for the breaker: a latency
        # spike without errors must open it, and a slow half-open probe must not close it.
        # Counted already (``counted``): neither again nor as a success that would reset the breaker.
        slow = counted or (not excused and attempt.soft_timeout_s is not None and latency > attempt.soft_timeout_s)
        if slow:
            record.extra["slow"] = True
        record.outcome = "flagged" if failed else "success"
        if failed:
            record.reason = failed[0]
            record.extra["failed_checks"] = failed
        # A half-open probe excused, yet with the provider's own share past the soft timeout too:
        # whether the provider is well is unknown, so it is no verdict (its slot is freed, the next
        # request probes). As a success it closed a sick model's breaker while the client was
        # saturated. While closed, such an answer still counts as one: in a burst against healthy
        # providers most answers are excused, and without them resetting the count the few
        # unexcused slow ones open a healthy breaker.
        unjudged = (
            excused
            and not fall_back
            and attempt.ticket.probe
            and latency - attempt.client_delay_s > (attempt.soft_timeout_s or 0.0)
        )
        if unjudged:
            self.planner.breakers.get(attempt.spec.name).release(attempt.ticket)
        elif not counted:  # a committed stream's bad answer still counts
            self._count(attempt, fall_back[0] if fall_back else (k.SOFT_TIMEOUT if slow else None))
        self.planner.hooks.attempt_ended(self, record, response)
        self._abandon_in_flight(now)
        self._succeed(record, response)

    def continuation_form(self, spec: ModelSpec) -> str | None:
        """How ``spec`` is asked to continue a broken stream: ``prefill``, ``conversation``, or ``None`` (it cannot).

        An assistant prefill where the model accepts one (the policy's ``assistant_prefill``, else
        litellm's map) and has not rejected one in this call: the join is then exact. Otherwise an
        ordinary conversation (the text so far as an assistant turn, then the route's
        ``continue_prompt`` as a user turn), except for JSON answers, which only an exact join
        can continue.
        """
        if spec.name not in self._no_prefill and _accepts_prefill(spec):
            return PREFILL
        return None if self._exact_join_only else CONVERSATION

    def on_interrupted(self, attempt: Attempt, error: BaseException, delivered_text: str, now: float) -> None:
        """A committed stream broke (``error`` is the ``StreamInterrupted`` the caller would get).

        With the route's ``streaming.on_interrupt: continue``, text delivered and an error kind
        that falls back, the call goes on: the next models are asked to continue
        ``delivered_text`` (see :meth:`continuation_form`; models that cannot are skipped), and
        only a continuation reaches the caller. The continuation gets the class deadline anew (the
        broken stream legitimately ran past the first one), capped by the caller's ``timeout=``.
        When no later model continues, the model whose stream broke is asked to, once per call
        (:meth:`_continue_itself`). If none does, the call ends with ``error``. Otherwise this is
        :meth:`on_error`.
        """
        if attempt in self._in_flight:  # however the call goes on, the span says where the stream broke
            attempt.record.extra["interrupted_after_chars"] = len(delivered_text)
        kind = classify_error(error)
        fall_back = kind in self.planner.policy.fall_back_on
        if (
            self.route.on_interrupt != "continue"
            or not delivered_text
            or not fall_back
            or attempt not in self._in_flight
        ):
            self.on_error(attempt, error, now)
            return
        self._committed = None  # from here on, an ordinary failure that falls back
        self._continue_text = delivered_text
        self._interrupted = error
        self._joins.append({"from": attempt.record.index, "at_chars": len(delivered_text), "to": None})
        deadline = now + self.klass.deadline_s
        if self.caller_deadline_at is not None:
            deadline = min(deadline, self.caller_deadline_at)
        self.deadline_at = max(self.deadline_at, deadline)
        self.on_error(attempt, error, now)

    def on_error(self, attempt: Attempt, error: BaseException, now: float) -> None:
        """The attempt raised."""
        if attempt not in self._in_flight:
            return  # already abandoned: another attempt decided the call first
        counted = "slow" in attempt.record.extra  # _flag_slow already counted it as one slow call
        record = self._settle(attempt, now)
        kind = classify_error(error)
        if kind == k.CALLER_ERROR or (
            attempt.io_measured
            and attempt.sent_at is None
            and not attempt.on_wire
            and not attempt.expired
            and kind != k.TIMEOUT
        ):
            self._caller_error(attempt, record, error, now)
            return
        continuing = self._continue_text is not None and attempt is not self._committed
        if continuing and kind == k.BAD_REQUEST and _names_prefill(error):
            kind = k.PREFILL_REJECTED  # this model cannot continue text this way, never the final error
            counted = True  # not the provider's sickness: nothing for the breaker
            self.planner.breakers.get(attempt.spec.name).release(attempt.ticket)
            self._no_prefill.add(attempt.spec.name)
            if attempt.record.extra.get("continuation") == PREFILL and self.continuation_form(attempt.spec):
                # Ask the same model again at once, in an ordinary conversation (no backoff: it is
                # healthy, it only declined the prefill form).
                self._retry = (attempt.spec, now, record.index)
                record.extra["continue_as"] = CONVERSATION
        if kind == k.TIMEOUT and attempt.soft_cut and record.time_to_first_chunk_s is None:
            kind = k.SOFT_TIMEOUT  # our learned bound fired, not the class's hard timeout
        if kind in (k.TIMEOUT, k.SOFT_TIMEOUT):
            record.cut_by = self._cut_by(attempt)
        if (
            kind in (k.TIMEOUT, k.SOFT_TIMEOUT)
            and not attempt.expired
            and not counted
            and self._client_excuse(attempt, attempt.timeout_s, now)
        ):
            # Timed out while the client was saturated (or cold): not the provider's verdict.
            # A probe judged nothing either: free its slot, or the model stays half-open with its
            # only probe slot held and every later call skips it (found by the 100,000-call soak).
            self.planner.breakers.get(attempt.spec.name).release(attempt.ticket)
            record.outcome = k.CLIENT_OVERLOAD
            record.reason = kind
            record.error = self._last_error = error
            self.planner.hooks.attempt_ended(self, record, None)
            return
        if kind == k.TIMEOUT or kind == k.SOFT_TIMEOUT:
            if self.request.stream and record.time_to_first_chunk_s is not None:
                self.planner.latency.observe(attempt.spec.name, self.prompt_class, record.time_to_first_chunk_s)
            else:  # cut off: only a lower bound (see _latency.py for why it still counts)
                self.planner.latency.observe_censored(attempt.spec.name, self.prompt_class, record.latency_s)
        record.outcome = "failure"
        record.reason = kind
        record.error = error
        self._last_error = error
        if not counted:  # one verdict per attempt: its later timeout or error is the same slow call
            self._count(attempt, kind)
        retrying = attempt is not self._committed and self._final is None and self._schedule_retry(attempt, kind, now)
        self.planner.hooks.attempt_ended(self, record, None)
        if kind == k.CONTEXT_WINDOW:
            self._shrink *= 0.75  # the size estimate was wrong: ask the fitter for a smaller prompt
        if retrying:
            return
        if attempt is not self._committed and (
            kind == k.SOFT_TIMEOUT or kind in self.planner.policy.fall_back_on or continuing
        ):
            return  # (a continuation never ends the call with its own error: the caller has text)
        if self._final is None:
            self._abandon_in_flight(now)
            self._final = Fail(error)  # e.g. an ordinary 400: the request itself is wrong
            self.planner.hooks.call_ended(self, None, error)

    def _caller_error(self, attempt: Attempt, record: AttemptRecord, error: BaseException, now: float) -> None:
        """The request never reached the provider (it could not be built): the caller's error, at once.

        No breaker counts it, no latency window learns from it, no other model is tried (the same
        request would fail the same way there), and a probe's slot is freed without a verdict.
        """
        self.planner.breakers.get(attempt.spec.name).release(attempt.ticket)
        record.outcome = "failure"
        record.reason = k.CALLER_ERROR
        record.error = self._last_error = error
        self.planner.hooks.attempt_ended(self, record, None)
        if self._final is None:
            self._abandon_in_flight(now)
            self._final = Fail(error)
            self.planner.hooks.call_ended(self, None, error)

    def on_cancelled(self, attempt: Attempt, now: float) -> None:
        """The attempt was abandoned (a hedge lost, or the call ended): neither success nor failure...

        ...unless it had already run past its soft timeout: then it was slow whoever won, and it
        counts as a ``soft_timeout`` failure for its breaker (reason ``soft_timeout``, outcome
        still ``cancelled``). Otherwise hedging would hide a latency spike from the breaker: the
        hedge answers, the slow primary is cancelled, and nothing would ever open. (An attempt
        the planner saw cross its soft timeout while in flight was counted then, by
        ``_flag_slow``; its cancellation only records the reason.)
        """
        if attempt not in self._in_flight:
            return
        counted = "slow" in attempt.record.extra  # _flag_slow already counted it (and freed its probe slot)
        record = self._settle(attempt, now)
        record.outcome = "cancelled"
        ttfc = record.time_to_first_chunk_s
        latency = ttfc if self.request.stream and ttfc is not None else record.latency_s
        slow = counted or (attempt.soft_timeout_s is not None and latency > attempt.soft_timeout_s)
        if slow and not counted and attempt.soft_timeout_s is not None:
            slow = self._client_excuse(attempt, attempt.soft_timeout_s, now) is None
        if slow or record.index in self._hedge_due:
            # Ran past the hedge threshold or the soft timeout: a censored sample of the slow tail.
            # Dropping it would let hedging bias the percentile down (see _latency.py).
            self.planner.latency.observe_censored(attempt.spec.name, self.prompt_class, latency)
        if slow:
            record.reason = k.SOFT_TIMEOUT
            if not counted:
                self._count(attempt, k.SOFT_TIMEOUT)  # also frees a probe slot
        else:
            self.planner.breakers.get(attempt.spec.name).release(attempt.ticket)
        self.planner.hooks.attempt_ended(self, record, None)

    def _latency_sample(self, attempt: Attempt) -> float:
        """What the latency window learns from: time to first chunk for streams, else the whole call."""
        record = attempt.record
        if self.request.stream and record.time_to_first_chunk_s is not None:
            return record.time_to_first_chunk_s
        return record.latency_s

    def _schedule_retry(self, attempt: Attempt, kind: str, now: float) -> bool:
        """Retry the same model after a backoff, if the policy, the deadline and the budget allow.

        Never while another attempt is in flight (a hedge already is the fallback), never for a
        timeout (the policy schema forbids it), never sooner than the provider's ``Retry-After``
        (and not at all when that is longer than ``retry_after_max_s``), and never past the
        deadline: then the chain moves on to the next model at once.
        """
        cfg = self.route.retries
        if cfg is None or cfg.max_retries == 0 or kind not in cfg.retry_on or self._in_flight:
            return False
        record, spec = attempt.record, attempt.spec
        done = self._retries.get(spec.name, 0)
        if done >= cfg.max_retries:
            record.extra["retry_skipped"] = "max_retries"
            return False
        if self.planner.breakers.get(spec.name).state == OPEN:
            record.extra["retry_skipped"] = "breaker_open"
            return False
        backoff = min(cfg.backoff_max_s, cfg.backoff_base_s * 2**done)
        wait = self.planner.rng.uniform(backoff / 2, backoff)  # "equal jitter": spread, but never ~0
        retry_after = retry_after_s(record.error)
        if retry_after is not None:
            record.extra["retry_after_s"] = round(retry_after, 6)
            if retry_after > cfg.retry_after_max_s:
                record.extra["retry_skipped"] = "retry_after"  # a long wait: the next model answers sooner
                return False
            wait = max(wait, retry_after)
        if now + wait + MIN_ATTEMPT_S > self.deadline_at:
            record.extra["retry_skipped"] = "deadline"
            return False
        if not self.planner.budgets.retries(spec.name).try_spend(now, cfg.budget_ratio, cfg.min_per_s):
            record.extra["retry_skipped"] = "budget"
            return False
        self._retries[spec.name] = done + 1
        self._retry = (spec, now + wait, record.index)
        record.extra["retry_in_s"] = round(wait, 6)
        return True

    def cancel(self, now: float) -> None:
        """The caller gave up (closed a stream early, cancelled its task): end the call without an outcome.

        Attempts in flight are recorded as cancelled; hooks see ``call_ended(call, None, None)``.
        """
        if self._final is not None:
            return
        self._abandon_in_flight(now)
        if self._committed is not None:
            self.answered_by = self._committed.record  # it answered in part before the caller stopped reading
        self._final = Fail(LLMResilienceError("the call was cancelled by the caller"))
        self.planner.hooks.call_ended(self, None, None)

    def expire(self, error: BaseException, now: float) -> None:
        """The caller's own ``timeout=`` ran out while a committed stream was still delivering.

        The call ends with ``error`` (a ``StreamInterrupted``); the attempt is recorded as
        cancelled with reason ``deadline`` and does not count toward the breaker: the provider
        was answering, the caller chose the bound.
        """
        if self._final is not None:
            return
        delivered = getattr(error, "generated_content", None)
        for attempt in self._in_flight:
            attempt.record.reason = k.DEADLINE
            attempt.record.cut_by = "deadline"
            if isinstance(delivered, str) and attempt is self._committed:
                attempt.record.extra["interrupted_after_chars"] = len(delivered)
        self._abandon_in_flight(now)
        if self._committed is not None:
            self.answered_by = self._committed.record
            self._committed.record.reason = k.DEADLINE
        self._final = Fail(error)
        self.planner.hooks.call_ended(self, None, error)

    def _abandon_in_flight(self, now: float) -> None:
        # The call is decided: attempts still running (hedges) lose. Recording that here,
        # before call_ended, keeps their spans and records complete; the driver then only
        # has to close their connections (its later on_cancelled calls are no-ops).
        for attempt in list(self._in_flight):
            self.on_cancelled(attempt, now)

    def _settle(self, attempt: Attempt, now: float) -> AttemptRecord:
        self._in_flight.remove(attempt)
        self.planner.saturation.ended()
        if attempt.suspect_slot:  # (settled once: it leaves _in_flight here)
            self.planner.breakers.get(attempt.spec.name).release_suspect_slot()
        record = attempt.record
        record.latency_s = now - record.started_at
        return record

    def _count(self, attempt: Attempt, failure_kind: str | None) -> None:
        if "panic" in attempt.record.extra:
            return  # sent past an open breaker: its outcome must not move the state (nor count as a probe)
        breaker = self.planner.breakers.get(attempt.spec.name)
        before = breaker.state
        breaker.record(attempt.ticket, failure_kind)
        after = breaker.state
        if failure_kind is None:
            breaker.clear_suspect()  # a verdict: the model answers
        elif after == before == CLOSED and failure_kind in breaker.settings.count:
            breaker.mark_suspect()  # its first failure is known: few new requests until a verdict
        if after != before:
            attempt.record.breaker_transitions.append((before, after))
            if breaker.last_transition is not None:
                attempt.record.breaker_events.append(breaker.last_transition)

    def _succeed(self, record: AttemptRecord, response: Any) -> Action:
        self.answered_by = record
        _attach_summary(response, self)
        self._final = Done(response)
        self.planner.hooks.call_ended(self, response, None)
        return self._final

    @property
    def finished(self) -> bool:
        """The call is decided (answered, failed or cancelled)."""
        return self._final is not None

    @property
    def fallbacks(self) -> int:
        """How many models of the chain the call passed over (failed, flagged or skipped) on its way to the
        furthest model whose request counted (not a hedge that lost). A retry of the same model, a hedge
        that lost, and a panic attempt going back to a model passed over add none."""
        records = self.records
        if len(records) < 2:
            return 0  # one record passes over nothing (the common case: read on every answered call)
        order = {spec.name: position for position, spec in enumerate(self.route.chain)}
        counted = [r for r in records if r.outcome not in ("skipped", "cancelled")] or records
        reached = max((order.get(r.model, 0) for r in counted), default=0)
        return len({r.model for r in records if r.outcome != "cancelled" and order.get(r.model, reached) < reached})

    @property
    def in_flight(self) -> list[Attempt]:
        return list(self._in_flight)

    def summary(self) -> dict[str, Any]:
        """What happened, as attached to the response under ``_hidden_params["llm_resilience"]``."""
        answered = self.answered_by
        joins = {"joins": [dict(j) for j in self._joins]} if self._joins else {}
        return joins | {
            "route": self.route.name,
            "prompt_class": self.prompt_class,
            "model": answered.model if answered else None,
            "litellm_model": answered.litellm_model if answered else None,
            "fallbacks": self.fallbacks,
            # return_best hands back an answer that failed validation: flagged as well
            "flagged": (answered.outcome == "flagged" or "returned_as_best" in answered.extra) if answered else False,
            "attempts": [r.as_dict() for r in self.records],
        }


PREFILL = "prefill"
CONVERSATION = "conversation"


def continuation_messages(form: str, delivered_text: str, route: ResolvedRoute) -> list[dict[str, Any]]:
    """The messages appended to the prompt to ask for the rest of ``delivered_text``.

    ``prefill``: litellm's assistant-prefill form (the model writes on from the last character).
    ``conversation``: the text as a complete assistant turn, then the route's ``continue_prompt``
    as a user turn (never a system message: the caller's system prompt stays the only one).
    """
    if form == PREFILL:
        return [{"role": "assistant", "content": delivered_text, "prefix": True}]
    return [{"role": "assistant", "content": delivered_text}, {"role": "user", "content": route.continue_prompt}]


def wants_json(response_format: Any) -> bool:
    """The request asked for a JSON answer (``json_object``, ``json_schema`` or a pydantic class)."""
    if response_format is None:
        return False
    if isinstance(response_format, Mapping):
        return response_format.get("type") in ("json_object", "json_schema")
    return isinstance(response_format, type)


def _accepts_prefill(spec: ModelSpec) -> bool:
    """Can this model continue a prefilled assistant message? The policy's word, else litellm's map."""
    if spec.assistant_prefill is not None:
        return spec.assistant_prefill
    try:
        from litellm.utils import supports_assistant_prefill

        return bool(supports_assistant_prefill(spec.litellm_model))
    except Exception:  # unknown to litellm's map: assume not (litellm's own choice)
        return False


def _names_prefill(error: BaseException) -> bool:
    text = str(error).lower()
    return "prefill" in text or "prefix" in text


MAX_MODEL_CHARS = 1024
"""The longest ``model=`` accepted (litellm model strings, ARNs included, are far shorter)."""


def model_too_long(model: str) -> Exception:
    """The caller's error for an absurd model string: litellm's ``BadRequestError``, raised before any work."""
    from ._env import litellm  # here, not at import: the simulator and `validate` run without litellm

    return litellm.exceptions.BadRequestError(
        message=f"model= is {len(model)} characters long (at most {MAX_MODEL_CHARS}): not a model name",
        model=model[:64],
        llm_provider="",
    )


def attempt_timeout(attempt: Attempt) -> Exception:
    """The error of an attempt cut off at its whole-attempt bound: litellm's own ``Timeout``, as for a read timeout."""
    from ._env import litellm  # here, not at import: the simulator and `validate` run without litellm

    provider = str(attempt.kwargs.get("model", "")).partition("/")[0]
    return litellm.exceptions.Timeout(
        message=f"no answer within {attempt.timeout_s:.3g} s (whole attempt)",
        model=str(attempt.kwargs.get("model", attempt.spec.litellm_model)),
        llm_provider=provider,
    )


def retry_after_s(error: BaseException | None) -> float | None:
    """Seconds the provider asked us to wait (``Retry-After`` / ``retry-after-ms``), if it said."""
    headers: Any = None
    for source_of in (lambda: getattr(error, "response", None), lambda: error):
        try:  # some SDK errors compute .response lazily and may raise
            source = source_of()
            headers = getattr(source, "headers", None) or getattr(source, "litellm_response_headers", None)
        except Exception:
            headers = None
        if headers:
            break
    if not headers:
        return None
    lower = {str(key).lower(): str(value) for key, value in headers.items()}
    try:
        if "retry-after-ms" in lower:
            return max(0.0, float(lower["retry-after-ms"]) / 1000.0)
        value = lower.get("retry-after")
        if value is None:
            return None
        return max(0.0, float(value))
    except ValueError:
        pass
    try:  # the HTTP-date form
        when = email.utils.parsedate_to_datetime(lower["retry-after"])
    except (KeyError, TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _attach_summary(response: Any, call: Call) -> None:
    hidden = hidden_params(response)
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
