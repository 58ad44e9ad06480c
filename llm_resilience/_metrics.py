"""OpenTelemetry metrics: the latency of every request, and what the layer did about it.

The incident review's first advice was "log the latency of every request"; these are
the instruments, fed by :class:`MetricsHook` from the same attempt events as the spans.
GenAI semantic-convention names where they exist, ``llm_resilience.*`` otherwise:

======================================================  ===========  ==========================================
instrument                                              kind         attributes (besides the common ones)
======================================================  ===========  ==========================================
``gen_ai.client.operation.duration`` (s)                histogram    ``llm_resilience.outcome``, ``error.type``
``gen_ai.client.operation.time_to_first_chunk`` (s)     histogram    streams only
``gen_ai.client.token.usage`` ({token})                 histogram    ``gen_ai.token.type`` (input / output)
``llm_resilience.attempts`` ({attempt})                 counter      ``llm_resilience.outcome``, ``.reason``
``llm_resilience.fallbacks`` ({fallback})               counter      ``llm_resilience.reason``
``llm_resilience.hedges`` ({hedge})                     counter      ``llm_resilience.decision``
``llm_resilience.retries`` ({retry})                    counter      ``llm_resilience.decision``
``llm_resilience.breaker.state``                        gauge        0 closed, 1 half-open, 2 open; by model
``llm_resilience.breaker.transitions``                  counter      ``.breaker.from`` / ``.to`` / ``.cause``
======================================================  ===========  ==========================================

Common attributes: ``gen_ai.operation.name``, ``gen_ai.provider.name``,
``gen_ai.request.model`` (the model name sent, without litellm's provider prefix), ``llm_resilience.model`` (the
policy's name), ``llm_resilience.route``, ``llm_resilience.prompt_class``. Skipped
models produce no duration (nothing was sent). A *fallback* is an attempt that did not
answer and after which the call went on to another model (so the last failure of an
exhausted chain is not one). ``decision`` is ``launched`` or why not (``budget``,
``no_model``, ``deadline``, ``max_retries``, ``breaker_open``).

Provider choice, as for traces: the application's global MeterProvider if it set one;
else, when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``..._METRICS_ENDPOINT``) is set, a
private provider exporting OTLP every ``OTEL_METRIC_EXPORT_INTERVAL`` ms; else the
global proxy, which records nothing until the application sets a provider.
``OTEL_METRICS_EXPORTER=none`` (e.g. with Jaeger, which takes no OTLP metrics) and
``OTEL_SDK_DISABLED=true`` turn the private provider off (see ``exporter_choice``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from ._hooks import Hook
from ._outcomes import AttemptRecord
from ._tracing import exporter_choice, model_and_provider, otlp_exporter, otlp_resource

if TYPE_CHECKING:
    from ._breakers import BreakerRegistry, BreakerTransition
    from ._planner import Call

NS = "llm_resilience"
BREAKER_STATE_VALUES = {"closed": 0, "half-open": 1, "half_open": 1, "open": 2}

_OUTCOME, _REASON, _DECISION = f"{NS}.outcome", f"{NS}.reason", f"{NS}.decision"
_MAX_CACHED_ATTRS = 4096

# The GenAI conventions' advice for these two histograms.
_DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
_TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)


def default_meter_provider() -> metrics.MeterProvider:
    """The provider metrics go to, chosen as described in the module docstring."""
    current = metrics.get_meter_provider()
    if type(current).__name__ != "_ProxyMeterProvider":
        return current  # the application configured OpenTelemetry: use its choice
    exporter = exporter_choice("metrics")
    if exporter is None:
        return current
    return _otlp_provider(exporter)


_otlp: metrics.MeterProvider | None = None


def _otlp_provider(exporter: str = "otlp") -> metrics.MeterProvider:
    global _otlp
    if _otlp is None:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader

        from ._otlp_export import QuietMetricExporter

        chosen = ConsoleMetricExporter() if exporter == "console" else QuietMetricExporter(otlp_exporter("metrics"))
        _otlp = MeterProvider(metric_readers=[PeriodicExportingMetricReader(chosen)], resource=otlp_resource())
    return _otlp


class MetricsHook(Hook):
    """Records the instruments listed in the module docstring. One instance per engine.

    ``breakers`` (the engine's registry) feeds the breaker-state gauge; without it the
    gauge reports only models that changed state since the hook was created.
    """

    def __init__(self, provider: metrics.MeterProvider | None = None, breakers: BreakerRegistry | None = None) -> None:
        from . import __version__

        meter = (provider or default_meter_provider()).get_meter("llm_resilience", __version__)
        self._meter = meter
        self._breakers = breakers
        self._seen_states: dict[str, str] = {}
        self._attr_cache: dict[tuple[Any, ...], dict[str, Any]] = {}
        self.duration = meter.create_histogram(
            "gen_ai.client.operation.duration",
            unit="s",
            description="Duration of each request sent to a model (one per attempt).",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS,
        )
        self.first_chunk = meter.create_histogram(
            "gen_ai.client.operation.time_to_first_chunk",
            unit="s",
            description="Time to the first content chunk of a streamed answer.",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS,
        )
        self.tokens = meter.create_histogram(
            "gen_ai.client.token.usage",
            unit="{token}",
            description="Input and output tokens per answered request.",
            explicit_bucket_boundaries_advisory=_TOKEN_BUCKETS,
        )
        self.attempts = meter.create_counter(
            f"{NS}.attempts", unit="{attempt}", description="Attempts by outcome and reason (skips included)."
        )
        self.fallbacks = meter.create_counter(
            f"{NS}.fallbacks", unit="{fallback}", description="Moves to the next model, by reason."
        )
        self.hedges = meter.create_counter(
            f"{NS}.hedges", unit="{hedge}", description="Hedged requests launched, or why one was not."
        )
        self.retries = meter.create_counter(
            f"{NS}.retries", unit="{retry}", description="Same-model retries launched, or why one was not."
        )
        self.transitions = meter.create_counter(
            f"{NS}.breaker.transitions", unit="{transition}", description="Circuit breaker state changes."
        )
        meter.create_observable_gauge(
            f"{NS}.breaker.state",
            callbacks=[self._observe_breakers],
            description="Circuit breaker state per model: 0 closed, 1 half-open, 2 open.",
        )

    # -- events ---------------------------------------------------------------------

    def _recording(self) -> bool:
        """False while the meter is the global proxy's and no application has set a provider yet: every
        measurement would be dropped, so none is built (its attributes cost Python calls on every attempt).
        The proxy follows a provider set later; so does this check."""
        return getattr(self._meter, "_real_meter", self) is not None

    def attempt_ended(self, call: Call, record: AttemptRecord, response: Any) -> None:
        if not self._recording():
            return
        outcome = record.outcome or "unknown"
        self.attempts.add(1, self._attrs(call, record, (_OUTCOME, outcome), (_REASON, record.reason or "none")))
        extra = record.extra
        if "hedge_skipped" in extra:
            self.hedges.add(1, self._attrs(call, record, (_DECISION, str(extra["hedge_skipped"]))))
        if "retry_skipped" in extra:
            self.retries.add(1, self._attrs(call, record, (_DECISION, str(extra["retry_skipped"]))))
        if outcome == "skipped":
            return
        if record.hedged:
            self.hedges.add(1, self._attrs(call, record, (_DECISION, "launched")))
        if record.retry_of is not None:
            self.retries.add(1, self._attrs(call, record, (_DECISION, "launched")))
        error_type = None
        if outcome in ("failure", "soft_failure"):
            error_type = type(record.error).__name__ if record.error is not None else (record.reason or "error")
        model = getattr(response, "model", None) if response is not None else None
        response_model = str(model) if model else None
        duration_attrs = self._attrs(
            call, record, (_OUTCOME, outcome), ("error.type", error_type), ("gen_ai.response.model", response_model)
        )
        self.duration.record(record.latency_s, duration_attrs)
        if record.time_to_first_chunk_s is not None:
            self.first_chunk.record(record.time_to_first_chunk_s, duration_attrs)
        usage = getattr(response, "usage", None) if response is not None else None
        if usage is not None:
            for token_type, field in (("input", "prompt_tokens"), ("output", "completion_tokens")):
                value = getattr(usage, field, None)
                if isinstance(value, int):
                    self.tokens.record(value, self._attrs(call, record, ("gen_ai.token.type", token_type)))

    def call_ended(self, call: Call, response: Any, error: BaseException | None) -> None:
        if not self._recording():
            return
        for record in call.records[:-1]:  # the last record has nothing after it to fall back to
            if record.outcome in ("failure", "soft_failure", "skipped") and record is not call.answered_by:
                self.fallbacks.add(1, self._attrs(call, record, (_REASON, record.reason or "unknown")))

    def _attrs(self, call: Call, record: AttemptRecord, *extra: tuple[str, Any]) -> dict[str, Any]:
        """The common attributes plus ``extra`` (pairs whose value is ``None`` are left out).

        Cached: the same few combinations repeat on every call, and a measurement only reads
        its attributes, so one shared dict per combination saves building it each time. The
        requested model and prompt class determine the route, hence the common attributes.
        """
        key = (call.request.model, call.prompt_class, record.model, record.litellm_model, extra)
        attrs = self._attr_cache.get(key)
        if attrs is None:
            if len(self._attr_cache) >= _MAX_CACHED_ATTRS:
                self._attr_cache.clear()  # keys hold provider-given strings (response model): stay bounded
            attrs = _common(call, record)
            attrs.update((name, value) for name, value in extra if value is not None)
            self._attr_cache[key] = attrs
        return attrs

    def breaker_transition(self, model: str, old: str, new: str, info: BreakerTransition | None = None) -> None:
        if self._breakers is None:  # (with the registry the gauge reads it: bounded, no copy to keep)
            self._seen_states[model] = new
        attrs = {f"{NS}.model": model, f"{NS}.breaker.from": old, f"{NS}.breaker.to": new}
        if info is not None:
            attrs[f"{NS}.breaker.cause"] = info.cause
        self.transitions.add(1, attrs)

    def _observe_breakers(self, options: CallbackOptions) -> Iterable[Observation]:
        states = self._breakers.states() if self._breakers is not None else dict(self._seen_states)
        return [
            Observation(BREAKER_STATE_VALUES.get(state, -1), {f"{NS}.model": model}) for model, state in states.items()
        ]


def _common(call: Call, record: AttemptRecord) -> dict[str, Any]:
    spec = next((s for s in call.route.chain if s.name == record.model), None)
    custom = spec.litellm_params.get("custom_llm_provider") if spec else None
    model, provider = model_and_provider(record.litellm_model, str(custom) if custom else None)
    return {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": provider,
        "gen_ai.request.model": model,
        f"{NS}.model": record.model,
        f"{NS}.route": call.route.name,
        f"{NS}.prompt_class": call.prompt_class,
    }
