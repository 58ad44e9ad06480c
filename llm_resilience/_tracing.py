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
import time
from datetime import UTC, datetime
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
    exporter = exporter_choice("traces")
    if exporter is None:
        return current  # a proxy: follows a provider the application may set later
    return _otlp_provider(exporter)


def exporter_choice(signal: str) -> str | None:
    """What our private provider for ``signal`` ("traces"/"metrics") exports to, per the standard
    variables: ``"otlp"``, ``"console"``, or ``None`` for no private provider at all.

    ``OTEL_SDK_DISABLED=true`` and ``OTEL_{SIGNAL}_EXPORTER=none`` turn it off; an explicit
    ``otlp``/``console`` turns it on; unset, OTLP is on when an OTLP endpoint variable
    (``OTEL_EXPORTER_OTLP_ENDPOINT`` or the signal's own ``..._{SIGNAL}_ENDPOINT``) is set.
    """
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    names = [n.strip().lower() for n in os.environ.get(f"OTEL_{signal.upper()}_EXPORTER", "").split(",")]
    names = [n for n in names if n]
    if "none" in names:
        return None
    for name in names:
        if name in ("otlp", "console"):
            return name
    if names:
        log.warning("OTEL_%s_EXPORTER=%s: only otlp, console and none are supported here", signal.upper(), names)
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
        f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT"
    )
    return "otlp" if endpoint else None


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


def _otlp_provider(exporter: str = "otlp") -> trace.TracerProvider:
    global _otlp
    if _otlp is None:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

        provider = TracerProvider(resource=otlp_resource())
        provider.add_span_processor(
            BatchSpanProcessor(ConsoleSpanExporter() if exporter == "console" else otlp_exporter("traces"))
        )
        _otlp = provider
    return _otlp


def provider_name(litellm_model: str, params: Any = None) -> str:
    """``gen_ai.provider.name``: litellm's provider prefix (``openai/gpt-4o`` -> ``openai``)."""
    if params and params.get("custom_llm_provider"):
        return str(params["custom_llm_provider"])
    head, sep, _ = litellm_model.partition("/")
    return head if sep else "openai"


class TracingHook(Hook):
    """Emits the spans described in the module docstring. One instance per engine."""

    def __init__(self, provider: trace.TracerProvider | None = None, record_content: bool = False) -> None:
        from . import __version__

        self.tracer = (provider or default_tracer_provider()).get_tracer("llm_resilience", __version__)
        self.record_content = record_content
        self._call_attrs: dict[tuple[Any, ...], tuple[str, dict[str, Any]]] = {}
        self._attempt_base: dict[tuple[Any, ...], tuple[Any, dict[str, Any]]] = {}

    def call_started(self, call: Call) -> None:
        request = call.request
        # The call span's name and attributes repeat call after call: built once per combination.
        key = (call.route.name, request.model, call.prompt_class, request.stream)
        cached = self._call_attrs.get(key)
        if cached is None:
            attrs: dict[str, Any] = {f"{NS}.route": call.route.name, f"{NS}.prompt_class": call.prompt_class}
            if request.model != call.route.name:  # a model name or litellm string used as a one-model route
                attrs[f"{NS}.requested_model"] = request.model
            if request.stream:
                attrs[f"{NS}.stream"] = True
            # never mutated afterwards: the span copies it
            cached = _bounded_put(self._call_attrs, key, (f"{NS}.completion {call.route.name}", attrs))
        name, attrs = cached
        span = self.tracer.start_span(name, kind=SpanKind.INTERNAL, attributes=attrs)
        if not span.is_recording():
            # Nobody listens (no provider set, or the sampler dropped the call): no attempt spans,
            # no attributes. Kept so that call_span() still hands out the (non-recording) span.
            call.hook_data[self] = (span, None, None)
            return
        if self.record_content:
            span.set_attribute(f"{NS}.prompt", _messages_text(request.messages))
        call.hook_data[self] = (span, trace.set_span_in_context(span), {})

    def call_span(self, call: Call) -> trace.Span | None:
        """The span of ``call`` while it is open (the review log reads its trace id)."""
        data = call.hook_data.get(self)
        return data[0] if data is not None else None

    def attempt_started(self, call: Call, record: AttemptRecord) -> None:
        data = call.hook_data.get(self)
        if data is None or data[2] is None or record.outcome == "skipped":
            return  # a skip gets its span in attempt_ended: it has started and ended by then
        # The span itself is created when the attempt ends, with every attribute in one pass (the
        # SDK validates attributes on each call) and this start time: the same span, built once.
        data[2][record.index] = time.time_ns()

    def attempt_ended(self, call: Call, record: AttemptRecord, response: Any) -> None:
        data = call.hook_data.get(self)
        if data is None or data[2] is None:
            return
        if record.outcome == "skipped":
            self._skip_span(data[1], record)
            return
        started_ns = data[2].pop(record.index, None)
        if started_ns is None:
            return
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
            }
            cached = _bounded_put(self._attempt_base, key, (spec, base))
        spec, base = cached
        outcome = record.outcome or "unknown"
        attrs: dict[str, Any] = {**base, f"{NS}.attempt.index": record.index, f"{NS}.outcome": outcome}
        if record.timeout_s is not None:
            attrs[f"{NS}.timeout_ms"] = _ms(record.timeout_s)
            if record.latency_s > record.timeout_s:
                # The timeout bounds the wait for the provider; litellm's own work before the request
                # is written and after the timer fires (and a busy CPU) comes on top of it.
                attrs[f"{NS}.overrun_ms"] = _ms(record.latency_s - record.timeout_s)
        if record.reason:
            attrs[f"{NS}.reason"] = record.reason
        if record.breaker_state != "closed":
            attrs[f"{NS}.breaker.state"] = record.breaker_state
        if record.hedged:
            attrs[f"{NS}.hedged"] = True
        if record.retry_of is not None:
            attrs[f"{NS}.retry_of"] = record.retry_of
        if record.extra:
            _extra_attributes(attrs, record.extra)
        if record.truncated:
            attrs[f"{NS}.truncated"] = True
            attrs[f"{NS}.tokens.before"] = record.tokens_before
            attrs[f"{NS}.tokens.after"] = record.tokens_after
        if record.time_to_first_chunk_s is not None:
            attrs["gen_ai.response.time_to_first_chunk"] = round(record.time_to_first_chunk_s, 3)
            attrs[f"{NS}.stream.chunks"] = record.chunks
        if response is not None:
            _response_attributes(attrs, response, spec, self.record_content)
        failed = outcome in _ERROR_OUTCOMES
        if failed:
            attrs["error.type"] = (
                type(record.error).__name__ if record.error is not None else (record.reason or "error")
            )
        span = self.tracer.start_span(
            f"chat {record.litellm_model}", context=data[1], kind=SpanKind.CLIENT, attributes=attrs,
            start_time=started_ns,
        )  # fmt: skip
        for info in record.breaker_events:  # open -> half-open (the probe), then what the outcome did
            span.add_event(_BREAKER_EVENT, _transition_attributes(info))
        for name, event_attrs in record.events:
            span.add_event(name, event_attrs)
        if failed:
            span.set_status(_ERROR)  # the reason and error.type say the rest
        span.end()

    def _skip_span(self, context: Any, record: AttemptRecord) -> None:
        """A model passed over without a request: INTERNAL ``skip MODEL``, no ``gen_ai.*``/``server.*``."""
        attrs: dict[str, Any] = {
            f"{NS}.model": record.model,
            f"{NS}.attempt.index": record.index,
            f"{NS}.outcome": "skipped",
            f"{NS}.reason": record.reason or "unknown",
        }
        if record.breaker_state != "closed":
            attrs[f"{NS}.breaker.state"] = record.breaker_state
        if record.extra:
            _extra_attributes(attrs, record.extra)
        span = self.tracer.start_span(f"skip {record.model}", context=context, kind=SpanKind.INTERNAL, attributes=attrs)
        for info in record.breaker_events:
            span.add_event(_BREAKER_EVENT, _transition_attributes(info))
        span.end()

    def call_ended(self, call: Call, response: Any, error: BaseException | None) -> None:
        data = call.hook_data.pop(self, None)
        if data is None:
            return
        span, _context, spans = data
        if spans is None:
            span.end()
            return
        records = call.records
        answered = call.answered_by
        attrs: dict[str, Any] = {
            f"{NS}.path": call_path(records),
            # moves to another model: attempts that did not answer and had a successor
            f"{NS}.fallbacks": sum(1 for r in records[:-1] if r is not answered and r.outcome != "cancelled"),
        }
        if answered is not None:
            attrs[f"{NS}.answered_by"] = answered.model
            if answered.outcome == "flagged":
                attrs[f"{NS}.call_outcome"] = "flagged"
            elif answered.outcome == "soft_failure":
                attrs[f"{NS}.call_outcome"] = "returned_as_best"
            else:
                attrs[f"{NS}.call_outcome"] = "answered"
        elif error is not None:
            attrs[f"{NS}.call_outcome"] = "failed"
            attrs["error.type"] = type(error).__name__
        else:
            attrs[f"{NS}.call_outcome"] = "cancelled"
        span.set_attributes(attrs)
        if error is not None:
            span.set_status(_ERROR)
        span.end()


_BREAKER_EVENT = f"{NS}.breaker.transition"
_ERROR = Status(StatusCode.ERROR)
_ERROR_OUTCOMES = frozenset(("failure", "soft_failure"))
"""Outcomes that put an error status on an attempt span (a skip or a cancelled hedge is not an error)."""
_PATH_FLAGS = (("probe", "probe"), ("panic", "panic"), ("hedged", "hedge"), ("join", "join"))
"""``record.extra`` flags the path shows in brackets, and how."""
_TIME_EXTRAS = frozenset(("open_until",))
"""``record.extra`` values that are epoch seconds: shown as UTC times."""


def call_path(records: list[AttemptRecord]) -> str:
    """One line for the whole call: ``big: timeout after 327 ms → small: ok in 41 ms``."""
    return " → ".join(_step(r) for r in records)


def _step(record: AttemptRecord) -> str:
    outcome = record.outcome
    if outcome == "skipped":
        text = f"{record.model}: skipped, {record.reason}"
        until = record.extra.get("open_until")
        if isinstance(until, int | float):
            text += f" until {_utc(until)}"
    elif outcome == "success":
        text = f"{record.model}: ok in {_ms(record.latency_s)} ms"
    elif outcome in _ERROR_OUTCOMES:
        text = f"{record.model}: {record.reason or outcome} after {_ms(record.latency_s)} ms"
    else:  # flagged, cancelled, and any kind added later
        reason = f" {record.reason}" if record.reason else ""
        text = f"{record.model}: {outcome}{reason} after {_ms(record.latency_s)} ms"
    extra = record.extra
    flags = [label for key, label in _PATH_FLAGS if extra.get(key) or (key == "hedged" and record.hedged)]
    if record.retry_of is not None:
        flags.append("retry")
    if flags:
        text += f" ({', '.join(flags)})"
    for info in record.breaker_events:
        if info.new != "half-open":
            text += f", breaker {'opened' if info.new == 'open' else info.new}"
    return text


def _extra_attributes(attrs: dict[str, Any], extra: dict[str, Any]) -> None:
    """Every ``record.extra`` entry as an attribute: durations in integer ms, times as UTC, lists of text.

    Generic on purpose: a new kind of outcome detail shows up in spans without a change here.
    """
    for key, value in extra.items():
        if value is None:
            continue
        if key in _TIME_EXTRAS and isinstance(value, int | float):
            attrs[f"{NS}.{key}"] = _utc(value)
        elif key.endswith("_s") and isinstance(value, int | float) and not isinstance(value, bool):
            attrs[f"{NS}.{key[:-2]}_ms"] = _ms(value)
        elif isinstance(value, bool | int | str):
            attrs[f"{NS}.{key}"] = value
        elif isinstance(value, float):
            attrs[f"{NS}.{key}"] = round(value, 6)
        elif isinstance(value, list | tuple | set | frozenset):
            attrs[f"{NS}.{key}"] = [str(v) for v in value]
        else:
            attrs[f"{NS}.{key}"] = str(value)


def _transition_attributes(info: Any) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        f"{NS}.model": info.model,
        f"{NS}.breaker.from": info.old,
        f"{NS}.breaker.to": info.new,
        f"{NS}.breaker.cause": info.cause,
        f"{NS}.breaker.failures": info.failures,
    }
    if info.last_failure:
        attrs[f"{NS}.breaker.last_failure"] = info.last_failure
    if info.open_until is not None:
        attrs[f"{NS}.breaker.open_until"] = _utc(info.open_until)
    return attrs


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def _utc(epoch_s: float) -> str:
    """``2026-11-29T23:41:07.250Z``: what a human compares with the trace's clock."""
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


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
        attrs[f"{NS}.cost_usd"] = float(f"{cost:.6g}")  # 9.75e-05, not 9.750000000000001e-05
    if record_content and choices:
        message = getattr(choices[0], "message", None)
        text = getattr(message, "content", None)
        if text:
            attrs[f"{NS}.completion"] = str(text)


def _messages_text(messages: Any) -> str:
    from ._planner import content_text

    return "\n".join(f"{m.get('role')}: {content_text(m.get('content'))}" for m in messages)
