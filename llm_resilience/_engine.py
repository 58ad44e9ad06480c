"""The engine: a policy, its live state (breakers, latency), and the public entry points."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from opentelemetry import metrics, trace

from . import _litellm_calls
from ._breakers import BreakerRegistry, BreakerTransition
from ._budget import Budgets
from ._drivers import run_async, run_sync
from ._exceptions import PolicyError
from ._hooks import Hook, HookSet
from ._latency import LatencyStats
from ._metrics import MetricsHook
from ._outcomes import AttemptRecord
from ._planner import Call, CallRequest, Planner
from ._policy import DEFAULT_NAMESPACE, ENV_PREFIX, Policy, StateConfig
from ._reload import DEFAULT_RELOAD_INTERVAL_S, PolicyFileWatcher
from ._review_log import ReviewLogHook
from ._routes import register_routes
from ._saturation import ProcessSaturation, monitor
from ._shared_state import SharedBreakerState, fleet_key
from ._tracing import TracingHook
from ._truncation import TokenFitter
from ._validators import ResponseValidator

log = logging.getLogger("llm_resilience")

POLICY_ENV = "LLM_RESILIENCE_POLICY"


class LoggingHook(Hook):
    """Logs every attempt that did not answer (model, reason, latency; never prompt text)."""

    def attempt_ended(self, call: Call, record: AttemptRecord, response: Any) -> None:
        if record.outcome in ("failure", "soft_failure", "skipped") and log.isEnabledFor(logging.INFO):
            log.info(
                "route=%s class=%s model=%s outcome=%s reason=%s latency_ms=%.0f",
                call.route.name, call.prompt_class, record.model, record.outcome, record.reason,
                record.latency_s * 1000,
            )  # fmt: skip


class Resilience:
    """A resilience engine: a policy plus the live state it needs (breakers, latency stats).

    Most applications use the module-level :func:`llm_resilience.completion`, whose
    engine is built from ``LLM_RESILIENCE_POLICY``. Build one yourself to hold several
    policies in one process, or in tests::

        engine = Resilience.from_file("policies/example.yaml")
        response = engine.completion(model="chat", messages=[{"role": "user", "content": "hi"}])
        response._hidden_params["llm_resilience"]["model"]   # which model answered

    ``hooks`` are extra instrumentation objects (see :class:`llm_resilience.Hook`).
    ``tracer_provider`` overrides the OpenTelemetry provider choice (tests pass one with
    an in-memory exporter); ``meter_provider`` does the same for metrics (e.g. one with an
    ``InMemoryMetricReader``).
    """

    def __init__(
        self,
        policy: Policy | None = None,
        *,
        hooks: Iterable[object] = (),
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        policy = policy or Policy.defaults()
        self._clock = clock
        self._tracer_provider = tracer_provider
        self._user_hooks = list(hooks)
        ResponseValidator(policy)  # first: a policy naming an unknown validator fails here, before threads start
        # Live state: outlives policy reloads (see _install for what a reload resets).
        self.breakers = BreakerRegistry(self._breaker_settings, fleet_key_for=self._fleet_key)
        self.latency = LatencyStats()  # per (model, class): what the soft timeouts and hedges learn from
        self.budgets = Budgets()
        self._saturation = ProcessSaturation()  # client-side delay: never blamed on a provider
        self._metrics = MetricsHook(meter_provider, self.breakers)
        self._logging = LoggingHook()
        self.breakers.listeners.append(self._breaker_transition)
        self._shared: SharedBreakerState | None = None
        self._watcher: PolicyFileWatcher | None = None
        self._reload_lock = threading.Lock()
        self._policy = policy
        self._install(policy, previous=None)

    def _install(self, policy: Policy, previous: Policy | None) -> None:
        """Put ``policy`` in force: everything derived from it is built first, then swapped in at once.

        Calls already running keep the planner (and so the policy, hooks and validator) they
        started with. Kept across a reload: breakers, latency windows and budgets of every
        model whose definition did not change. A model whose ``breakers:`` settings changed
        keeps its breaker state (an open breaker stays open) under the new settings; a model
        whose ``litellm_params`` changed is a different backend, so it gets a fresh breaker
        and forgets its latency.
        """
        validator = ResponseValidator(policy)
        tracing = TracingHook(self._tracer_provider, record_content=policy.document.telemetry.record_content)
        review_log = ReviewLogHook.from_policy(policy, tracing)
        extra = [review_log] if review_log is not None else []
        hooks = HookSet([tracing, self._metrics, self._logging, *extra, *self._user_hooks])
        planner = Planner(
            policy=policy, breakers=self.breakers, hooks=hooks, fitter=TokenFitter(), validator=validator,
            latency=self.latency, budgets=self.budgets, saturation=self._saturation,
        )  # fmt: skip
        self._policy = policy  # first: breakers created from here on take their settings from it
        if previous is not None:
            for model in self.breakers.models():
                old_spec, new_spec = previous.models.get(model), policy.models.get(model)
                if (old_spec and old_spec.litellm_params) != (new_spec and new_spec.litellm_params):
                    self.breakers.drop(model)
                    self.latency.forget(model)
                elif previous.breaker_settings(model) != policy.breaker_settings(model):
                    self.breakers.get(model).reconfigure(policy.breaker_settings(model))
        self.hooks = hooks
        self._planner = planner
        if previous is None or previous.document.state != policy.document.state:
            # After the hooks: the first sync may already mirror an open fleet breaker (a transition).
            self._share_state(policy, first=previous is None)
        # The one place that follows a policy change: anything registered per policy is
        # (re-)registered here, on build and on every reload.
        register_routes(policy, owner=self)  # litellm.get_model_info("<route>") & co.

    def _share_state(self, policy: Policy, *, first: bool) -> None:
        old, self._shared = self._shared, _shared_state_for(policy.document.state)
        self.breakers.share(self._shared)
        if self._shared is not None:  # watched before the first sync: a replica's first request already knows
            for model in policy.models:
                self.breakers.get(model)
            self._shared.start()
            if first:
                # A process that starts during an incident must not send the open models requests
                # before it has read the fleet view. Bounded: a dead Redis answers at once (refused),
                # a hung one costs FIRST_VIEW_WAIT_S once, and a reload (on a call's path) never waits.
                self._shared.wait_for_first_view()
        if old is not None:
            old.close(wait=False)  # it flushes and ends by itself, off the call path

    def _fleet_key(self, model: str) -> str:
        """What the fleet calls ``model``'s breaker: the litellm model string and endpoint it calls."""
        spec = self._policy.models.get(model)
        if spec is None:
            return fleet_key(model, None)
        params, _missing = spec.resolved_params()
        endpoint = params.get("api_base") or params.get("base_url")
        return fleet_key(spec.litellm_model, str(endpoint) if endpoint else None)

    def _breaker_transition(self, model: str, old: str, new: str, info: BreakerTransition) -> None:
        self.hooks.breaker_transition(model, old, new, info)
        shared = self._shared
        if shared is not None:
            breaker = self.breakers.get(model)
            shared.on_transition(breaker.fleet_key, old, new, breaker.open_period_s)

    # -- construction --------------------------------------------------------------

    @classmethod
    def from_file(
        cls, path: str | os.PathLike[str], *, reload_interval_s: float = DEFAULT_RELOAD_INTERVAL_S, **options: Any
    ) -> Resilience:
        """Build an engine from a YAML policy file. Raises :class:`PolicyError`.

        The engine follows edits of the file: at most every ``reload_interval_s`` seconds
        (``0``: never by itself) a call checks whether the file changed, and a valid new
        version is put in force without a restart (see :meth:`reload`).
        """
        p = Path(path)
        try:
            data = p.read_bytes()
        except OSError as e:
            raise PolicyError([f"{p}: cannot read policy file: {e.strerror or e}"]) from None
        policy = Policy.from_yaml(data.decode("utf-8", errors="replace"), source=str(p))
        engine = cls(policy, **options)
        engine._watcher = PolicyFileWatcher(p, reload_interval_s, policy, data)
        return engine

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], **options: Any) -> Resilience:
        """Build an engine from a policy given as a mapping. Raises :class:`PolicyError`."""
        return cls(Policy.from_dict(data), **options)

    @property
    def policy(self) -> Policy:
        """The policy in force."""
        return self._policy

    def _breaker_settings(self, model: str) -> Any:
        return self._policy.breaker_settings(model)

    def reload(self) -> bool:
        """Re-read the policy file now; ``True`` when a new policy was put in force.

        An invalid file is logged (one ERROR line with its ``file:line: field: message``
        problems) and the policy in force keeps serving; this never raises for a bad file.
        Calls already running finish on the policy they started with. Engines not built
        with :meth:`from_file` have no file to read: ``False``.
        """
        return self._check_policy_file(force=True)

    def _check_policy_file(self, *, force: bool = False) -> bool:
        watcher = self._watcher
        if watcher is None:
            return False
        # One reload at a time; a call that finds one under way goes on instead of waiting.
        if not self._reload_lock.acquire(blocking=force):
            return False
        try:
            policy = watcher.poll(force=force)
            if policy is None:
                return False
            try:
                self._install(policy, previous=self._policy)
            except Exception as e:  # e.g. an unknown validator name: same rule as a bad file
                log.error("policy reload rejected, still serving the last good policy from %s: %s", watcher.path, e)
                return False
            watcher.accepted(policy)
            return True
        finally:
            self._reload_lock.release()

    def close(self) -> None:
        """Stop background work (the shared-state sync thread). Calls still work, per process."""
        self._watcher = None
        shared, self._shared = self._shared, None
        self.breakers.share(None)
        if shared is not None:
            shared.close()

    # -- calls ----------------------------------------------------------------------

    def _start(self, model: str, messages: Sequence[Mapping[str, Any]], kwargs: dict[str, Any]) -> Call:
        prompt_class = kwargs.pop("prompt_class", None)
        stream = bool(kwargs.pop("stream", False))
        request = CallRequest(model=model, messages=messages, kwargs=kwargs, prompt_class=prompt_class, stream=stream)
        watcher = self._watcher
        if watcher is not None and time.monotonic() >= watcher.next_check:
            self._check_policy_file()
        return self._planner.start(request, self._clock())

    def completion(self, model: str, messages: Sequence[Mapping[str, Any]] = (), **kwargs: Any) -> Any:
        """Like ``litellm.completion``, through the policy. Extra keyword: ``prompt_class``.

        Returns a ``litellm.ModelResponse``; ``response._hidden_params["llm_resilience"]``
        says which model answered and lists every attempt. Raises
        :class:`AllAttemptsFailed` when the route is exhausted, or the provider's own
        exception when it must not fall back (an ordinary 400).
        """
        call = self._start(model, messages, kwargs)
        if call.request.stream:
            from ._streaming import stream_sync

            return stream_sync(call, self._clock)
        return run_sync(call, self._clock)

    async def acompletion(self, model: str, messages: Sequence[Mapping[str, Any]] = (), **kwargs: Any) -> Any:
        """Like ``litellm.acompletion``, through the policy. See :meth:`completion`."""
        call = self._start(model, messages, kwargs)
        if call.request.stream:
            from ._streaming import stream_async

            return await stream_async(call, self._clock)
        return await run_async(call, self._clock)

    def warm_up(self) -> None:
        """Pay litellm's first-call costs now rather than inside the first real call; see :func:`warm_up`."""
        warm_up()

    def breaker_states(self) -> dict[str, str]:
        """Current breaker state per model that has been used."""
        return self.breakers.states()


def _shared_state_for(cfg: StateConfig) -> SharedBreakerState | None:
    """The shared state the policy asks for; ``None`` for in-process (or when it cannot be had).

    Never raises: a Redis URL that is unset or malformed (it may come from the environment)
    means breakers per process, with a warning, never calls that fail.
    """
    if cfg.backend != "redis" or cfg.url is None:
        return None
    url = cfg.url
    if url.startswith(ENV_PREFIX):
        url = os.environ.get(url[len(ENV_PREFIX) :], "")
        if not url:
            log.warning("state.url %s is not set; breakers are per process", cfg.url)
            return None
    from ._shared_state import from_url

    if cfg.namespace == DEFAULT_NAMESPACE:
        log.warning(
            "state.namespace is %r: every application on this Redis that keeps the default shares breakers "
            "with this one for the models they both call (same litellm model and endpoint); set a namespace "
            "per application",
            DEFAULT_NAMESPACE,
        )

    return from_url(
        url, cfg.namespace, failure_window_s=cfg.failure_window_s, sync_interval_s=cfg.sync_interval_s, start=False
    )


_default: Resilience | None = None
_default_lock = threading.Lock()


def default_engine() -> Resilience:
    """The engine behind the module-level functions, built on first use.

    From the file named by ``LLM_RESILIENCE_POLICY``, or the built-in defaults.
    """
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                path = os.environ.get(POLICY_ENV)
                _default = Resilience.from_file(Path(path)) if path else Resilience()
    return _default


def set_default_engine(engine: Resilience | None) -> None:
    """Replace the engine used by the module-level functions (``None``: rebuild on next use)."""
    global _default
    with _default_lock:
        _default = engine


def completion(model: str, messages: Sequence[Mapping[str, Any]] = (), **kwargs: Any) -> Any:
    """Drop-in for ``litellm.completion`` with fallbacks, breakers, timeouts and spans.

    Same arguments and return value as ``litellm.completion``, plus an optional
    ``prompt_class=``. ``model`` may be a route name from the policy, a model name from
    its ``models:``, or any litellm model string (a one-model route with the policy's
    defaults)::

        import llm_resilience
        response = llm_resilience.completion(model="chat", messages=[{"role": "user", "content": "hi"}])
    """
    return default_engine().completion(model, messages, **kwargs)


async def acompletion(model: str, messages: Sequence[Mapping[str, Any]] = (), **kwargs: Any) -> Any:
    """Drop-in for ``litellm.acompletion``; see :func:`completion`."""
    return await default_engine().acompletion(model, messages, **kwargs)


_warmed = False
_warm_lock = threading.Lock()


def warm_up() -> None:
    """Pay litellm's first-call costs (0.3 to 1 s of lazy imports per call kind) now.

    Sends one sync, one async and one streamed request through litellm's real HTTP path to a
    loopback fake provider started for the purpose (no network, no provider, no API key), then
    stops it. Call it at start-up (a web app's startup hook, a worker's init); until a provider
    call has completed in the process, timeouts are not blamed on providers (``cold_start``).
    Idempotent and thread-safe; later calls return at once.
    """
    global _warmed
    with _warm_lock:
        if _warmed:
            return
        import asyncio

        from .testing import FakeProvider

        with FakeProvider() as provider:
            kwargs: dict[str, Any] = {
                "model": "openai/warm-up", "messages": [{"role": "user", "content": "warm-up"}],
                "api_base": provider.base_url, "api_key": "sk-warm-up", "num_retries": 0, "max_retries": 0,
            }  # fmt: skip
            _litellm_calls.completion(**kwargs)
            for _ in _litellm_calls.completion(**kwargs, stream=True):
                pass

            async def warm_async() -> None:
                await _litellm_calls.acompletion(**kwargs)
                async for _ in await _litellm_calls.acompletion(**kwargs, stream=True):
                    pass

            # Its own thread: asyncio.run cannot nest in a caller's running loop (a startup hook).
            worker = threading.Thread(target=asyncio.run, args=(warm_async(),), name="llm-resilience-warm-up")
            worker.start()
            worker.join()
        monitor().ended()
        _warmed = True
