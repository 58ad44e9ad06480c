"""The engine: a policy, its live state (breakers, latency), and the public entry points."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from opentelemetry import metrics, trace

from . import _drivers, _litellm_calls
from ._breakers import BreakerRegistry, BreakerTransition
from ._budget import Budgets
from ._drivers import run_async, run_sync
from ._hooks import Hook, HookSet
from ._latency import LatencyStats
from ._metrics import MetricsHook
from ._outcomes import AttemptRecord
from ._planner import Call, CallRequest, Planner
from ._policy import DEFAULT_NAMESPACE, ENV_PREFIX, Policy, StateConfig, read_policy_bytes
from ._reload import DEFAULT_RELOAD_INTERVAL_S, PolicyFileWatcher
from ._review_log import ReviewLogHook
from ._routes import register_routes
from ._saturation import CallerContexts, ProcessSaturation, monitor
from ._shared_state import SharedBreakerState, fleet_key
from ._tracing import TracingHook
from ._truncation import TokenFitter, load_tokenizer
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
        self._contexts = CallerContexts()  # which callers' probes can judge (a starved loop's cannot)
        self._metrics = MetricsHook(meter_provider, self.breakers)
        self._logging = LoggingHook()
        self.breakers.listeners.append(self._breaker_transition)
        self._shared: SharedBreakerState | None = None
        self._watcher: PolicyFileWatcher | None = None
        self._reload_lock = threading.Lock()
        self._routes_used: set[str] = set()  # route names calls have used (engines built from a file)
        self._known_params: dict[str, Mapping[str, Any]] = {}  # model name -> its last litellm_params
        self._policy = policy
        self._install(policy, previous=None)
        # litellm's first call of each kind (sync, async, stream; answer and error) imports modules
        # lazily for 0.3 to 1 s: paid here, once per process, not inside the first attempts.
        _warm_litellm()

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
        for spec in policy.models.values():  # not inside the first attempt on each model (see load_tokenizer)
            load_tokenizer(spec.litellm_model)
        tracing = TracingHook(self._tracer_provider, record_content=policy.document.telemetry.record_content)
        review_log = ReviewLogHook.from_policy(policy, tracing)
        extra = [review_log] if review_log is not None else []
        spans = [tracing] if tracing.may_record else []
        hooks = HookSet([*spans, self._metrics, self._logging, self._contexts, *extra, *self._user_hooks])
        planner = Planner(
            policy=policy, breakers=self.breakers, hooks=hooks, fitter=TokenFitter(), validator=validator,
            latency=self.latency, budgets=self.budgets, saturation=self._saturation, contexts=self._contexts,
        )  # fmt: skip
        self._policy = policy  # first: breakers created from here on take their settings from it
        if previous is not None:
            for model in self.breakers.models():
                new_spec = policy.models.get(model)
                if new_spec is None:
                    continue  # gone from this version: its state waits, should the model come back
                known = self._known_params.get(model)
                if known is not None and known != new_spec.litellm_params:
                    self.breakers.drop(model)
                    self.latency.forget(model)
                elif previous.breaker_settings(model) != policy.breaker_settings(model):
                    self.breakers.get(model).reconfigure(policy.breaker_settings(model))
        self._known_params.update((name, spec.litellm_params) for name, spec in policy.models.items())
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
        data = read_policy_bytes(p)
        policy = Policy.from_bytes(data, source=str(p))  # the reader `llm-resilience validate` uses
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
            dropped = sorted(self._routes_used.difference(policy.document.routes))
            if dropped:  # a half-written file, or a mistake: calls would fail; a restart removes routes
                watcher.refused(
                    f"{watcher.path}: routes: drops route(s) {', '.join(map(repr, dropped))}, which calls of this "
                    "process use; restore them (a route is removed by restarting with the new policy)"
                )
                return False
            try:
                self._install(policy, previous=self._policy)
            except Exception as e:  # e.g. an unknown validator name: same rule as a bad file
                watcher.refused(str(e))
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
        if watcher is not None:
            if model not in self._routes_used and model in self._policy.document.routes:
                self._routes_used.add(model)  # a reload must not drop it (see _check_policy_file)
            if time.monotonic() >= watcher.next_check:
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
        """Pay litellm's first-call costs now rather than inside the first real call; see :func:`warm_up`.

        The tokenizers of this engine's models are loaded when its policy is put in force; this
        adds the first-call work of the sync, async and streaming paths, litellm's and the layer's
        (once per process).
        """
        _warm_litellm()

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

    :func:`completion`, :func:`acompletion` and :func:`install` use it. It is built once per
    process, thread-safely, from the file named by the ``LLM_RESILIENCE_POLICY`` environment
    variable (and then follows edits of that file: hot reload), or from the built-in defaults
    when the variable is unset. Call it (or :func:`warm_up`) at start-up to fail fast: a policy
    that cannot be loaded raises :class:`PolicyError` here (every ``file:line: field: message``),
    not at the application's first LLM call, and the routes' capabilities are registered with
    litellm before any client asks about them. A failed build is retried at the next use.

    Use it to reach the live engine, e.g. to read breaker states or reload now::

        import llm_resilience

        engine = llm_resilience.default_engine()
        engine.breaker_states()  # {'big': 'open', 'small': 'closed'}
    """
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                path = os.environ.get(POLICY_ENV)
                _default = Resilience.from_file(Path(path)) if path else Resilience()
    return _default


def set_default_engine(engine: Resilience | None) -> None:
    """Replace the engine used by the module-level functions.

    For an application that builds its engine itself (a policy from somewhere other than
    ``LLM_RESILIENCE_POLICY``, hooks of its own) but wants :func:`completion` and
    :func:`install` to use it, and for tests. ``None`` forgets the current engine: the next
    call builds a fresh one from the environment. The engine replaced is not closed: call its
    :meth:`Resilience.close` if it shares state through Redis::

        import llm_resilience
        from llm_resilience import Resilience

        llm_resilience.set_default_engine(Resilience.from_file("policies/prod.yaml", hooks=[MyHook()]))
    """
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
    """Start-up in one call: build the default engine (fail fast) and pay litellm's first-call costs now.

    Builds :func:`default_engine` (a broken policy raises :class:`PolicyError` here), which
    loads the tokenizers of the policy's models, then sends sync, async and streamed requests
    (answered and failed) through litellm's real HTTP path and through the layer's own drivers
    to a loopback fake provider started for the purpose (no network, no provider, no API key),
    then stops it: 0.3 to 1 s of lazy imports per call kind that would otherwise run inside the
    first real attempts. Call it at start-up
    (a web app's startup hook, a worker's init)::

        import llm_resilience
        llm_resilience.warm_up()      # raises PolicyError now if LLM_RESILIENCE_POLICY is broken

    Without it, an attempt that started before any attempt ended in the process is not blamed
    for a timeout (``cold_start``). Thread-safe; the litellm part runs once per process.
    """
    default_engine().warm_up()


def _warm_litellm() -> None:
    """First-call work of the sync, async and streaming paths, once per process (see :func:`warm_up`).

    Each path is taken once to an answer and once to a 503 (litellm's error mapping imports
    modules of its own the first time), by litellm alone and through the layer's drivers. A
    warm-up that cannot run (no loopback socket) is logged and not retried; calls then start
    cold, and a cold attempt is never blamed.
    """
    global _warmed
    with _warm_lock:
        if _warmed:
            return
        _warmed = True
        try:
            _warm_each_path()
        except Exception:
            log.warning("litellm warm-up failed; the first calls of this process pay litellm's costs", exc_info=True)
            return
        monitor().ended()


_WARM_UP_MODELS = {"warm-up": "gpt-3.5-turbo", "warm-up-error": "warm-up-error"}
"""Route name -> model sent to the warm-up provider. The answering one is a model litellm knows as
OpenAI's: those take a provider-configuration path (building litellm's map of every provider's
config, which imports modules of its own) that a model name it does not know skips."""


def _warm_each_path() -> None:
    import asyncio

    from .testing import Behavior, FakeProvider

    with FakeProvider() as provider:
        provider.set(Behavior.error(503), model="warm-up-error")
        common: dict[str, Any] = {
            "messages": [{"role": "user", "content": "warm-up"}], "api_base": provider.base_url,
            "api_key": "sk-warm-up", "num_retries": 0, "max_retries": 0,
        }  # fmt: skip
        calls = [
            {**common, "model": f"openai/{model}", "stream": stream}
            for model in _WARM_UP_MODELS.values()
            for stream in (False, True)
        ]
        for kwargs in calls:
            with contextlib.suppress(Exception):  # the 503s
                response = _litellm_calls.completion(**kwargs)
                for _ in response if kwargs["stream"] else ():
                    pass

        async def warm_async() -> None:
            for kwargs in calls:
                with contextlib.suppress(Exception):
                    response = await _litellm_calls.acompletion(**kwargs)
                    async for _ in response if kwargs["stream"] else _no_chunks():
                        pass

        # Then the layer's own drivers, sync and async, plain and streamed, to an answer and to a
        # 503: litellm's calls above take none of their paths (our leased and per-loop clients
        # that skip malformed events, the stream reader thread, the stream module itself, and
        # litellm's chunk builder and its cost lookups, which import modules of their own).
        # A planner without hooks: no span, metric or log line for the warm-up.
        planner = _warm_up_planner(provider.base_url)

        def start(route: str, stream: bool) -> Call:
            return planner.start(CallRequest(model=route, messages=common["messages"], kwargs={}, stream=stream))

        from ._streaming import stream_async, stream_sync

        for route in _WARM_UP_MODELS:
            with contextlib.suppress(Exception):  # the 503s (AllAttemptsFailed)
                run_sync(start(route, False))
            with contextlib.suppress(Exception):
                for _ in stream_sync(start(route, True)):
                    pass

        async def warm_drivers() -> None:
            for route in _WARM_UP_MODELS:
                with contextlib.suppress(Exception):
                    await run_async(start(route, False))
                with contextlib.suppress(Exception):
                    async for _ in await stream_async(start(route, True)):
                        pass

        async def warm_all_async() -> None:
            await warm_async()
            await warm_drivers()

        # Its own thread: asyncio.run cannot nest in a caller's running loop (a startup hook).
        worker = threading.Thread(target=asyncio.run, args=(warm_all_async(),), name="llm-resilience-warm-up")
        worker.start()
        worker.join()
        _drivers.forget_clients(provider.base_url)  # the provider stops now: its idle clients are of no use


def _warm_up_planner(base_url: str) -> Planner:
    """A planner for the warm-up provider: one route per model, no retries or fallbacks, no hooks."""
    models = {
        name: {"litellm_params": {"model": f"openai/{model}", "api_base": base_url, "api_key": "sk-warm-up"}}
        for name, model in _WARM_UP_MODELS.items()
    }
    policy = Policy.from_dict(
        {
            "models": models,
            "routes": {name: {"chain": [name]} for name in models},
            "prompt_classes": {"default": {"timeout_s": 30.0, "deadline_s": 60.0}},
        }
    )
    return Planner(
        policy=policy, breakers=BreakerRegistry(policy.breaker_settings), hooks=HookSet([]), fitter=TokenFitter(),
        validator=ResponseValidator(policy),
    )  # fmt: skip


async def _no_chunks() -> AsyncIterator[Any]:
    return
    yield
