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

from ._breakers import BreakerRegistry
from ._drivers import run_async, run_sync
from ._env import litellm
from ._hooks import Hook, HookSet
from ._latency import LatencyStats
from ._metrics import MetricsHook
from ._outcomes import AttemptRecord
from ._planner import Call, CallRequest, Planner
from ._policy import Policy
from ._review_log import ReviewLogHook
from ._saturation import ProcessSaturation, monitor
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
        self._policy = policy or Policy.defaults()
        self._clock = clock
        validator = ResponseValidator(self._policy)  # first: a policy naming an unknown validator fails here
        self.breakers = BreakerRegistry(self._breaker_settings)
        tracing = TracingHook(tracer_provider, record_content=self._policy.document.telemetry.record_content)
        review_log = ReviewLogHook.from_policy(self._policy, tracing)
        self.latency = LatencyStats()  # per (model, class): what the soft timeouts and hedges learn from
        hook_list: list[object] = [
            tracing,
            MetricsHook(meter_provider, self.breakers),
            LoggingHook(),
            *([review_log] if review_log is not None else []),
            *hooks,
        ]
        self.hooks = HookSet(hook_list)
        self.breakers.listeners.append(self.hooks.breaker_transition)
        self._planner = Planner(
            policy=self._policy, breakers=self.breakers, hooks=self.hooks, fitter=TokenFitter(), validator=validator,
            latency=self.latency, saturation=ProcessSaturation(),
        )  # fmt: skip

    # -- construction --------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **options: Any) -> Resilience:
        """Build an engine from a YAML policy file. Raises :class:`PolicyError`."""
        return cls(Policy.from_file(path), **options)

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

    # -- calls ----------------------------------------------------------------------

    def _start(self, model: str, messages: Sequence[Mapping[str, Any]], kwargs: dict[str, Any]) -> Call:
        prompt_class = kwargs.pop("prompt_class", None)
        stream = bool(kwargs.pop("stream", False))
        request = CallRequest(model=model, messages=messages, kwargs=kwargs, prompt_class=prompt_class, stream=stream)
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
            litellm.completion(**kwargs)
            for _ in litellm.completion(**kwargs, stream=True):
                pass

            async def warm_async() -> None:
                await litellm.acompletion(**kwargs)
                async for _ in await litellm.acompletion(**kwargs, stream=True):
                    pass

            # Its own thread: asyncio.run cannot nest in a caller's running loop (a startup hook).
            worker = threading.Thread(target=asyncio.run, args=(warm_async(),), name="llm-resilience-warm-up")
            worker.start()
            worker.join()
        monitor().ended()
        _warmed = True
