"""OpenTelemetry spans: one parent span per call, one child span per attempt.

Attempt spans follow the GenAI semantic conventions (``chat {model}``, kind CLIENT,
``gen_ai.*`` attributes); what the conventions have no name for (route, prompt class,
fallback reason, breaker state...) lives under ``llm_resilience.*``. Prompt and answer
text are recorded only when the policy sets ``telemetry.record_content: true``; API
keys never are.

Provider choice: the application's global TracerProvider if it set one; else, when
``OTEL_EXPORTER_OTLP_ENDPOINT`` is set, a private provider exporting OTLP in a
background batch (a dead collector never slows a call); else nothing is recorded.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from typing import Any, TypeVar
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from ._hooks import Hook
from ._outcomes import AttemptRecord
from ._planner import Call

log = logging.getLogger("llm_resilience")

NS = "llm_resilience"

_V = TypeVar("_V")


def default_tracer_provider() -> trace.TracerProvider:
    """The provider spans go to, chosen as described in the module docstring."""
    current = trace.get_tracer_provider()
    if not isinstance(current, trace.ProxyTracerProvider):
        return current  # the application configured OpenTelemetry: use its choice
    if not (os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        return current  # a proxy: follows a provider the application may set later
    return _otlp_provider()


_otlp: trace.TracerProvider | None = None


def export_timeout_s() -> float:
    """OTLP export timeout: the standard variable if set, else 2 s (the SDK's 10 s, retried with
    backoff, kept a process with a dead collector alive ~17 s at exit; a call is never affected)."""
    value = os.environ.get("OTEL_EXPORTER_OTLP_TIMEOUT")
    try:
        return float(value) / 1000 if value else 2.0  # the variable is in milliseconds
    except ValueError:
        return 2.0


_OTLP_EXPORTERS = {
    ("traces", "grpc"): ("opentelemetry.exporter.otlp.proto.grpc.trace_exporter", "OTLPSpanExporter"),
    ("traces", "http"): ("opentelemetry.exporter.otlp.proto.http.trace_exporter", "OTLPSpanExporter"),
    ("metrics", "grpc"): ("opentelemetry.exporter.otlp.proto.grpc.metric_exporter", "OTLPMetricExporter"),
    ("metrics", "http"): ("opentelemetry.exporter.otlp.proto.http.metric_exporter", "OTLPMetricExporter"),
}


def otlp_exporter(signal: str) -> Any:
    """The OTLP exporter for ``signal`` ("traces" or "metrics") per the standard OTEL_* variables.

    Imported on demand: the gRPC stack is heavy and most processes never export.
    """
    protocol = os.environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL") or os.environ.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
    )
    module, name = _OTLP_EXPORTERS[(signal, "grpc" if protocol == "grpc" else "http")]
    return getattr(importlib.import_module(module), name)(timeout=export_timeout_s())


def otlp_resource() -> Any:
    """The resource of our private providers: ``service.name`` from OTEL_SERVICE_NAME."""
    from opentelemetry.sdk.resources import Resource

    return Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "llm-resilience")})


def _otlp_provider() -> trace.TracerProvider:
    global _otlp
    if _otlp is None:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider = TracerProvider(resource=otlp_resource())
        provider.add_span_processor(BatchSpanProcessor(otlp_exporter("traces")))
        _otlp = provider
    return _otlp


def provider_name(litellm_model: str, params: Any = None) -> str:
    """``gen_ai.provider.name``: litellm's provider prefix (``openai/gpt-4o`` -> ``openai``)."""
    if params and params.get("custom_llm_provider"):
        return str(params["custom_llm_provider"])
    head, sep, _ = litellm_model.partition("/")
    return head if sep else "openai"


class TracingHook(Hook):
    """Emits the spans. One instance per engine."""

    def __init__(self, provider: trace.TracerProvider | None = None, record_content: bool = False) -> None:
        from . import __version__

        self.tracer = (provider or default_tracer_provider()).get_tracer("llm_resilience", __version__)
        self.record_content = record_content
        self._parent_attrs: dict[tuple[Any, ...], dict[str, Any]] = {}
        self._attempt_base: dict[tuple[Any, ...], tuple[Any, dict[str, Any]]] = {}

    def call_started(self, call: Call) -> None:
        request = call.request
        # The parent's attributes repeat call after call: built once per combination.
        key = (call.route.name, request.model, call.prompt_class, request.stream, call.klass.deadline_s)
        attrs = self._parent_attrs.get(key)
        if attrs is None:
            attrs = {
                "gen_ai.operation.name": "chat",
                "gen_ai.request.model": request.model,
                f"{NS}.route": call.route.name,
                f"{NS}.prompt_class": call.prompt_class,
                f"{NS}.stream": request.stream,
                f"{NS}.deadline_s": call.klass.deadline_s,
            }
            _bounded_put(self._parent_attrs, key, attrs)  # never mutated afterwards: the span copies it
        span = self.tracer.start_span(f"{NS}.completion {call.route.name}", kind=SpanKind.INTERNAL, attributes=attrs)
        if self.record_content:
            span.set_attribute(f"{NS}.prompt", _messages_text(request.messages))
        call.hook_data[self] = (span, trace.set_span_in_context(span), {})

    def call_span(self, call: Call) -> trace.Span | None:
        """The span of ``call`` while it is open (the review log reads its trace id)."""
        data = call.hook_data.get(self)
        return data[0] if data is not None else None

    def attempt_started(self, call: Call, record: AttemptRecord) -> None:
        data = call.hook_data.get(self)
        if data is None:
            return
        _parent, context, spans = data
        # The requested model and the class determine the route, hence the model's spec and the
        # attributes fixed for it: looked up once per combination, not on every attempt.
        key = (call.request.model, call.prompt_class, record.model)
        cached = self._attempt_base.get(key)
        if cached is None:
            spec = next((s for s in call.route.chain if s.name == record.model), None)
            params = spec.litellm_params if spec is not None else {}
            base: dict[str, Any] = {
                **_model_attributes(record.litellm_model, params.get("api_base"), params.get("custom_llm_provider")),
                f"{NS}.model": record.model,
                f"{NS}.route": call.route.name,
                f"{NS}.prompt_class": call.prompt_class,
            }
            cached = _bounded_put(self._attempt_base, key, (spec, base))
        spec, base = cached
        attrs: dict[str, Any] = {
            **base,
            f"{NS}.attempt.index": record.index,
            f"{NS}.breaker.state": record.breaker_state,
        }
        if record.timeout_s is not None:
            attrs[f"{NS}.timeout_s"] = record.timeout_s
        if record.hedged:
            attrs[f"{NS}.hedged"] = True
        if record.retry_of is not None:
            attrs[f"{NS}.retry_of"] = record.retry_of
        spans[record.index] = (
            self.tracer.start_span(
                f"chat {record.litellm_model}", context=context, kind=SpanKind.CLIENT, attributes=attrs
            ),
            spec,
        )

    def attempt_ended(self, call: Call, record: AttemptRecord, response: Any) -> None:
        data = call.hook_data.get(self)
        if data is None:
            return
        entry = data[2].pop(record.index, None)
        if entry is None:
            return
        span, spec = entry
        # One set_attributes call: each set_attribute takes the span's lock and re-validates.
        attrs: dict[str, Any] = {f"{NS}.outcome": record.outcome or "unknown", f"{NS}.latency_s": record.latency_s}
        if record.reason:
            attrs[f"{NS}.reason"] = record.reason
            if record.outcome in ("failure", "soft_failure", "skipped"):
                attrs[f"{NS}.fallback_reason"] = record.reason
        if record.extra:
            for key in _EXTRA_ATTRIBUTES:
                if key in record.extra:
                    value = record.extra[key]
                    attrs[f"{NS}.{key}"] = list(value) if isinstance(value, list) else value
        if record.tokens_before is not None:
            attrs[f"{NS}.tokens.before"] = record.tokens_before
            if record.tokens_after is not None:
                attrs[f"{NS}.tokens.after"] = record.tokens_after
            attrs[f"{NS}.truncated"] = record.truncated
        if record.time_to_first_chunk_s is not None:
            attrs["gen_ai.response.time_to_first_chunk"] = record.time_to_first_chunk_s
            attrs[f"{NS}.stream.chunks"] = record.chunks
        if response is not None:
            _response_attributes(attrs, response, spec, self.record_content)
        error_type = None
        if record.outcome in ("failure", "soft_failure"):
            error_type = type(record.error).__name__ if record.error is not None else (record.reason or "error")
            attrs["error.type"] = error_type
        span.set_attributes(attrs)
        for old, new in record.breaker_transitions:
            span.add_event(f"{NS}.breaker.transition", {"from": old, "to": new, f"{NS}.model": record.model})
        if error_type is not None:
            span.set_status(Status(StatusCode.ERROR, record.reason or error_type))
        span.end()

    def call_ended(self, call: Call, response: Any, error: BaseException | None) -> None:
        data = call.hook_data.pop(self, None)
        if data is None:
            return
        span, _context, spans = data
        for leftover, _spec in spans.values():  # defensive: never leak an open span
            leftover.end()
        answered = call.answered_by
        attrs: dict[str, Any] = {
            f"{NS}.attempts": len(call.records),
            f"{NS}.fallbacks": sum(1 for r in call.records if r is not answered),
        }
        if answered is not None:
            attrs[f"{NS}.answered_by"] = answered.model
            attrs["gen_ai.response.model"] = answered.litellm_model
            attrs[f"{NS}.outcome"] = answered.outcome or "success"
        if error is not None:
            attrs["error.type"] = type(error).__name__
            attrs[f"{NS}.outcome"] = "error"
        span.set_attributes(attrs)
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        span.end()


# record.extra keys worth showing on a span (others are internal bookkeeping).
_EXTRA_ATTRIBUTES = (
    "probe", "missing_env", "failed_checks", "retry_after_s", "retry_in_s", "retry_skipped",
    "soft_timeout_s", "slow", "hedge_after_s", "hedge_skipped", "hedged_by",
)  # fmt: skip


_MAX_CACHED = 1024


def _bounded_put(cache: dict[Any, _V], key: Any, value: _V) -> _V:
    """Store ``value`` in a per-hook cache; ad-hoc model strings come from callers, so it stays bounded."""
    if len(cache) >= _MAX_CACHED:
        cache.clear()
    cache[key] = value
    return value


@functools.lru_cache(maxsize=1024)
def _model_attributes(litellm_model: str, api_base: Any, custom_provider: Any) -> dict[str, Any]:
    """Attributes fixed per model; cached because urlsplit and friends cost more than the lookup."""
    attrs: dict[str, Any] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": provider_name(litellm_model, {"custom_llm_provider": custom_provider}),
        "gen_ai.request.model": litellm_model,
    }
    if isinstance(api_base, str) and not api_base.startswith("os.environ/"):
        parts = urlsplit(api_base)
        if parts.hostname:
            attrs["server.address"] = parts.hostname
            if parts.port:
                attrs["server.port"] = parts.port
    return attrs


def _response_attributes(attrs: dict[str, Any], response: Any, spec: Any, record_content: bool) -> None:
    model = getattr(response, "model", None)
    if model:
        attrs["gen_ai.response.model"] = str(model)
    rid = getattr(response, "id", None)
    if rid:
        attrs["gen_ai.response.id"] = str(rid)
    usage = getattr(response, "usage", None)
    prompt_tokens = getattr(usage, "prompt_tokens", None)
    completion_tokens = getattr(usage, "completion_tokens", None)
    if prompt_tokens is not None:
        attrs["gen_ai.usage.input_tokens"] = int(prompt_tokens)
    if completion_tokens is not None:
        attrs["gen_ai.usage.output_tokens"] = int(completion_tokens)
    choices = getattr(response, "choices", None) or []
    reasons = [str(c.finish_reason) for c in choices if getattr(c, "finish_reason", None)]
    if reasons:
        attrs["gen_ai.response.finish_reasons"] = reasons
    cost: Any = None
    if spec is not None and (spec.input_cost_per_token is not None or spec.output_cost_per_token is not None):
        # The policy's prices win: they exist for models litellm's price map does not know.
        cost = (prompt_tokens or 0) * (spec.input_cost_per_token or 0.0) + (completion_tokens or 0) * (
            spec.output_cost_per_token or 0.0
        )
    else:
        hidden = getattr(response, "_hidden_params", None) or {}
        cost = hidden.get("response_cost")
    if isinstance(cost, int | float):
        attrs[f"{NS}.cost_usd"] = float(cost)
    if record_content and choices:
        message = getattr(choices[0], "message", None)
        text = getattr(message, "content", None)
        if text:
            attrs[f"{NS}.completion"] = str(text)


def _messages_text(messages: Any) -> str:
    from ._planner import content_text

    return "\n".join(f"{m.get('role')}: {content_text(m.get('content'))}" for m in messages)
