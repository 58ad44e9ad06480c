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
from ._outcomes import AttemptRecord, hidden_params
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
        from ._otlp_export import QuietSpanExporter

        chosen = ConsoleSpanExporter() if exporter == "console" else QuietSpanExporter(otlp_exporter("traces"))
        provider.add_span_processor(BatchSpanProcessor(chosen))
        _otlp = provider
    return _otlp


# litellm's provider names -> the GenAI conventions' well-known ``gen_ai.provider.name`` values
# (any other provider keeps litellm's name: the conventions allow names they do not list).
_SEMCONV_PROVIDERS = {
    "anthropic": "anthropic",
    "azure": "azure.ai.openai",
    "azure_ai": "azure.ai.inference",
    "bedrock": "aws.bedrock",
    "cohere": "cohere",
    "cohere_chat": "cohere",
    "deepseek": "deepseek",
    "gemini": "gcp.gemini",
    "groq": "groq",
    "mistral": "mistral_ai",
    "openai": "openai",
    "perplexity": "perplexity",
    "vertex_ai": "gcp.vertex_ai",
    "watsonx": "ibm.watsonx.ai",
    "xai": "x_ai",
}


@functools.lru_cache(maxsize=1024)
def model_and_provider(litellm_model: str, custom_provider: str | None = None) -> tuple[str, str]:
    """(``gen_ai.request.model``, ``gen_ai.provider.name``) for a litellm model string.

    The model is the name sent to the provider, without litellm's provider prefix
    (``openai/gpt-4o`` -> ``gpt-4o``, ``openrouter/meta/llama-3`` -> ``meta/llama-3``); the
    provider is litellm's, spelled as the conventions spell it (``bedrock`` -> ``aws.bedrock``).
    """
    model, provider = litellm_model, custom_provider
    try:
        from ._env import litellm

        model, provider, _key, _base = litellm.get_llm_provider(
            model=litellm_model, custom_llm_provider=custom_provider
        )
    except Exception:  # a string litellm cannot place: its prefix, if any, is the provider
        head, sep, rest = litellm_model.partition("/")
        if sep and not custom_provider:
            model, provider = rest, head
    provider = str(provider or "openai")
    return str(model), _SEMCONV_PROVIDERS.get(provider, provider)


def provider_name(litellm_model: str, params: Any = None) -> str:
    """``gen_ai.provider.name`` for a model (see :func:`model_and_provider`)."""
    custom = params.get("custom_llm_provider") if params else None
    return model_and_provider(litellm_model, str(custom) if custom else None)[1]


# Call outcomes, as the call span's name and ``llm_resilience.call_outcome`` give them.
ANSWERED = "answered"  # the call's first request answered
RESCUED = "rescued"  # answered, but not by the first request: a fallback, hedge, retry, panic or continuation
FLAGGED = "flagged"  # answered with an answer a validator flagged
RETURNED_AS_BEST = "returned_as_best"  # every answer failed validation; the first one is returned
FAILED = "failed"  # the call raised
CANCELLED = "cancelled"  # the caller stopped waiting (cancelled its task, closed its stream)
CALL_OUTCOMES = (ANSWERED, RESCUED, FLAGGED, RETURNED_AS_BEST, FAILED, CANCELLED)


def call_outcome(call: Call, response: Any, error: BaseException | None) -> str:
    """The call's outcome in one word (one of the constants above)."""
    if error is not None:
        return FAILED
    answered = call.answered_by
    if answered is None or response is None:
        return CANCELLED
    if answered.outcome == "flagged":
        return FLAGGED
    if answered.outcome == "soft_failure":
        return RETURNED_AS_BEST
    return ANSWERED if call.records and answered is call.records[0] else RESCUED


class TracingHook(Hook):
    """Emits the spans described in the module docstring. One instance per engine."""

    def __init__(self, provider: trace.TracerProvider | None = None, record_content: bool = False) -> None:
        from . import __version__

        self.tracer = (provider or default_tracer_provider()).get_tracer("llm_resilience", __version__)
        self.record_content = record_content
        self._call_attrs: dict[tuple[Any, ...], tuple[str, dict[str, Any]]] = {}
        self._attempt_base: dict[tuple[Any, ...], tuple[Any, dict[str, Any]]] = {}
        self._names: dict[tuple[str, str], str] = {}

    @property
    def may_record(self) -> bool:
        """False when the provider is OpenTelemetry's no-op one: no span of it is ever recorded, so the
        engine leaves this hook out (``call_span`` then gives ``None``, as for a call it never saw).
        A proxy provider may get a real one later: its hook stays."""
        return not isinstance(self.tracer, trace.NoOpTracer)

    def call_started(self, call: Call) -> None:
        request = call.request
        # The call span's name and attributes repeat call after call: built once per combination.
        key = (call.route.name, request.model, call.prompt_class, request.stream)
        cached = self._call_attrs.get(key)
        if cached is None:
            attrs: dict[str, Any] = {f"{NS}.route": call.route.name, f"{NS}.prompt_class": call.prompt_class}
            if request.model not in call.planner.policy.document.routes:
                # a policy model name or a litellm string used as a one-model route: what the caller asked for
                attrs[f"{NS}.requested_model"] = request.model
            if request.stream:
                attrs[f"{NS}.delivery"] = "stream"
            # never mutated afterwards: the span copies it
            cached = _bounded_put(self._call_attrs, key, (f"{NS}.completion {call.route.name}", attrs))
        name, attrs = cached
        span = self.tracer.start_span(name, kind=SpanKind.INTERNAL, attributes=attrs)
        if not span.is_recording():
            # Nobody listens (no provider set, or the sampler dropped the call): no attempt spans,
            # no attributes. Kept so that call_span() still hands out the (non-recording) span.
            call.hook_data[self] = (span, None, None, None)
            return
        if self.record_content:
            span.set_attribute(f"{NS}.prompt", _messages_text(request.messages))
        params = _request_attributes(request.kwargs) if request.kwargs else _NO_ATTRIBUTES
        call.hook_data[self] = (span, trace.set_span_in_context(span), {}, params)

    def call_span(self, call: Call) -> trace.Span | None:
        """The span of ``call`` while it is open (the review log reads its trace id)."""
        data = call.hook_data.get(self)
        return data[0] if data is not None else None

    def attempt_started(self, call: Call, record: AttemptRecord) -> None:
        data = call.hook_data.get(self)
        if data is None or data[2] is None or record.outcome == "skipped":
            return  # a skip gets its span in attempt_ended: it has started and ended by then
        # The span itself is created when the attempt ends, with every attribute in one pass (the
        # SDK validates attributes on each call) and this start time, moved back by the time spent
        # preparing the request (counting, truncating): the attempt's span covers all of its time.
        data[2][record.index] = time.time_ns() - int(record.prepare_s * 1e9)

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
        spec, base = self._base(call, record)
        outcome = record.outcome or "unknown"
        attrs: dict[str, Any] = {**data[3], **base, f"{NS}.attempt.index": record.index, f"{NS}.outcome": outcome}
        if record.reason:
            attrs[f"{NS}.reason"] = record.reason
        attrs[f"{NS}.attempt.role"] = _role(record)
        _record_attributes(attrs, record)
        for key, seconds in record.bounds.items():
            attrs[f"{NS}.bound.{key}_ms"] = _ms(seconds)
        cut_by = record.cut_by
        if cut_by is not None:
            attrs[f"{NS}.cut_by"] = cut_by
            bound = record.bounds.get(cut_by)
            if bound is not None and cut_by != "idle" and record.latency_s > bound:
                # The bound limits the wait for the provider; litellm's own work before the request
                # is written and after the timer fires (and a busy CPU) comes on top of it.
                attrs[f"{NS}.overrun_ms"] = _ms(record.latency_s - bound)
        if record.retry_of is not None:
            attrs[f"{NS}.retry_of"] = record.retry_of
        if record.tokens_before is not None:
            attrs[f"{NS}.truncation"] = "truncated" if record.truncated else "none"
            attrs[f"{NS}.tokens.before"] = record.tokens_before
            attrs[f"{NS}.tokens.after"] = record.tokens_after
            attrs[f"{NS}.prepare_ms"] = _ms(record.prepare_s)
        if record.time_to_first_chunk_s is not None:
            attrs["gen_ai.response.time_to_first_chunk"] = round(record.time_to_first_chunk_s, 3)
            attrs[f"{NS}.stream.chunks"] = record.chunks
        delay = record.extra.get("client_delay_s")
        if isinstance(delay, int | float):  # a share of the attempt's time, never more than all of it
            attrs[f"{NS}.client_delay_ms"] = _ms(min(float(delay), record.latency_s))
        if response is not None:
            _response_attributes(attrs, response, spec, self.record_content)
        failed = outcome in _ERROR_OUTCOMES
        if failed:
            attrs["error.type"] = (
                type(record.error).__name__ if record.error is not None else (record.reason or "error")
            )
        span = self.tracer.start_span(
            f"chat {base['gen_ai.request.model']}", context=data[1], kind=SpanKind.CLIENT, attributes=attrs,
            start_time=started_ns,
        )  # fmt: skip
        # The span ends when the attempt did, not when this hook runs (after the validators, and on a
        # busy machine milliseconds later): its duration is the attempt's latency, as the path says.
        ended_ns = started_ns + int(record.latency_s * 1e9)
        # (Events are stamped then too, inside the span: the hook learns of them only now.)
        for info in record.breaker_events:  # open -> half-open (the probe), then what the outcome did
            span.add_event(_BREAKER_EVENT, _transition_attributes(info), timestamp=ended_ns)
        for name, event_attrs in record.events:
            span.add_event(name, event_attrs, timestamp=ended_ns)
        if failed:
            span.set_status(Status(StatusCode.ERROR, attempt_problem(record)))
        span.end(end_time=ended_ns)

    def _base(self, call: Call, record: AttemptRecord) -> tuple[Any, dict[str, Any]]:
        """The attributes fixed for a model on this route (and, for an ad-hoc model, its caller's endpoint)."""
        # The requested model and the class determine the route, hence the model's spec and the
        # attributes fixed for it: looked up once per combination, not on every attempt.
        kwargs = call.request.kwargs
        adhoc_base = kwargs.get("api_base") or kwargs.get("base_url") if kwargs else None
        key = (call.request.model, call.prompt_class, record.model, adhoc_base)
        cached = self._attempt_base.get(key)
        if cached is None:
            spec = next((s for s in call.route.chain if s.name == record.model), None)
            params = spec.litellm_params if spec is not None else {}
            api_base = params.get("api_base")
            if api_base is None and spec is not None and spec.adhoc:
                api_base = adhoc_base  # the caller's own model string goes where the caller said
            base: dict[str, Any] = {
                **_request_attributes(params),  # the policy's own settings for this model win
                **_model_attributes(record.litellm_model, api_base, params.get("custom_llm_provider")),
                f"{NS}.model": record.model,
            }
            cached = _bounded_put(self._attempt_base, key, (spec, base))
        return cached

    def _skip_span(self, context: Any, record: AttemptRecord) -> None:
        """A model passed over without a request: INTERNAL ``skip MODEL``, no ``gen_ai.*``/``server.*``."""
        attrs: dict[str, Any] = {
            f"{NS}.model": record.model,
            f"{NS}.attempt.index": record.index,
            f"{NS}.outcome": "skipped",
            f"{NS}.reason": record.reason or "unknown",
        }
        _record_attributes(attrs, record)
        if record.tokens_before is not None:  # skipped after counting (context_too_small): that took time
            attrs[f"{NS}.tokens.before"] = record.tokens_before
            attrs[f"{NS}.prepare_ms"] = _ms(record.prepare_s)
        start = time.time_ns() - int(record.prepare_s * 1e9) if record.prepare_s else None
        span = self.tracer.start_span(
            f"skip {record.model}", context=context, kind=SpanKind.INTERNAL, attributes=attrs, start_time=start
        )
        for info in record.breaker_events:
            span.add_event(_BREAKER_EVENT, _transition_attributes(info))
        span.end()

    def call_ended(self, call: Call, response: Any, error: BaseException | None) -> None:
        data = call.hook_data.pop(self, None)
        if data is None:
            return
        span = data[0]
        if data[2] is None:
            span.end()
            return
        records = call.records
        answered = call.answered_by
        outcome = call_outcome(call, response, error)
        attrs: dict[str, Any] = {
            f"{NS}.path": call_path(records),
            f"{NS}.fallbacks": call.fallbacks,
            f"{NS}.call_outcome": outcome,
            f"{NS}.deadline_ms": _ms(call.deadline_at - call.started_at),
        }
        if answered is not None:
            attrs[f"{NS}.answered_by"] = answered.model
        if error is not None:
            attrs["error.type"] = type(error).__name__
        span.set_attributes(attrs)
        # The outcome in the name: Jaeger's search list shows only the root span's name (and a count
        # of error spans, which a call rescued from a failed attempt has too). Six outcomes per route.
        name_key = (call.route.name, outcome)
        name = self._names.get(name_key)
        if name is None:
            name = _bounded_put(self._names, name_key, f"{NS}.completion {call.route.name} {outcome}")
        span.update_name(name)
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, call_problem(call, error)))
        span.end()


_BREAKER_EVENT = f"{NS}.breaker.transition"
_NO_ATTRIBUTES: dict[str, Any] = {}
_ERROR_OUTCOMES = frozenset(("failure", "soft_failure", "client_overload"))
"""Outcomes that put an error status on an attempt span: no answer came back, or none that could be used.
(A skip or a cancelled hedge is not an error; a client_overload timeout is, and says it was the client's.)"""
_HTTP_REASONS = frozenset(
    ("rate_limit", "server_error", "auth", "not_found", "bad_request", "context_window", "content_policy", "unknown")
)
"""Error kinds a provider's HTTP status explains (a timeout's or a broken connection's status is litellm's own)."""
_PATH_FLAGS = (("probe", "probe"), ("panic", "panic"), ("hedged", "hedge"), ("join", "join"))
"""``record.extra`` flags the path shows in brackets, and how."""
_TIME_EXTRAS = frozenset(("open_until",))
"""``record.extra`` values that are epoch seconds: shown as UTC times."""
_ADMISSIONS = ("suspect_overflow", "panic", "probe", "suspect")
"""How the breaker let a request through, most specific first (``llm_resilience.breaker.admission``)."""
_OWN_EXTRAS = frozenset((*_ADMISSIONS, "join", "slow", "returned_as_best", "soft_timeout_s", "client_delay_s"))
"""``record.extra`` entries given their own attribute (a string, not a boolean) or a bound."""


def _role(record: AttemptRecord) -> str:
    """Why the request was sent: ``first``, ``fallback``, ``hedge``, ``retry`` or ``continuation``."""
    if record.hedged:
        return "hedge"
    if record.retry_of is not None:
        return "retry"
    if "continuation" in record.extra:  # asked to continue a stream that broke
        return "continuation"
    return "first" if record.index == 0 else "fallback"


def _record_attributes(attrs: dict[str, Any], record: AttemptRecord) -> None:
    """What attempt and skip spans share: the breaker's state and admission, and ``record.extra``."""
    if record.breaker_state != "closed":
        attrs[f"{NS}.breaker.state"] = record.breaker_state
    extra = record.extra
    if not extra:
        return
    # Jaeger paints every boolean red, like an error: what a flag says is given as a word.
    for admission in _ADMISSIONS:
        if extra.get(admission):
            attrs[f"{NS}.breaker.admission"] = admission
            break
    if extra.get("slow"):
        attrs[f"{NS}.latency"] = "slow"  # past its soft timeout: counted as slow for the breaker
    _extra_attributes(attrs, extra)


def attempt_problem(record: AttemptRecord) -> str:
    """The status description of a failed attempt: what went wrong, in words an on-call reader can act on.

    Never the provider's message (it may echo the request); the kind, the exception class, the
    HTTP status, the bound that cut it, the failed checks.
    """
    reason = record.reason or record.outcome or "error"
    error = record.error
    detail = type(error).__name__ if error is not None else ""
    status = getattr(error, "status_code", None)
    chars = record.extra.get("interrupted_after_chars")
    if isinstance(status, int) and reason in _HTTP_REASONS and chars is None:
        detail += f", HTTP {status}"  # the provider's answer (litellm also puts a status on its own errors)
    text = f"{reason} ({detail})" if detail else reason
    if record.cut_by is not None:
        bound = record.bounds.get(record.cut_by)
        text += f": cut by the {record.cut_by} bound" + (f" of {_ms(bound)} ms" if bound is not None else "")
    if chars is not None:
        text += f"; the stream broke after {chars} chars had been delivered"
    checks = record.extra.get("failed_checks")
    if checks and list(checks) != [reason]:
        text += f"; failed checks: {', '.join(str(c) for c in checks)}"
    if record.outcome == "client_overload":
        why = record.extra.get("client_overload", "client_saturated")
        text += f"; not the provider's fault ({why}), not counted against its breaker"
    return text


def call_problem(call: Call, error: BaseException) -> str:
    """The status description of a failed call: the error class and what each model did."""
    steps = ", ".join(
        f"{r.model} {r.reason or r.outcome}" for r in call.records if r.outcome != "cancelled" or r.reason
    )
    return f"{type(error).__name__}: {steps}" if steps else type(error).__name__


def call_path(records: list[AttemptRecord]) -> str:
    """One line for the whole call: ``big: timeout after 327 ms (attempt bound 300 ms) → small: ok in 41 ms``."""
    return " → ".join(_step(r) for r in records)


def _step(record: AttemptRecord) -> str:
    outcome = record.outcome
    took = f"{_ms(record.latency_s)} ms"
    cut = ""
    if record.cut_by is not None:
        bound = record.bounds.get(record.cut_by)
        cut = f" ({record.cut_by} bound {_ms(bound)} ms)" if bound is not None else f" ({record.cut_by} bound)"
    chars = record.extra.get("interrupted_after_chars")
    if outcome == "skipped":
        text = f"{record.model}: skipped, {record.reason}"
        until = record.extra.get("open_until")
        if isinstance(until, int | float):
            text += f" until {_utc(until)}"
    elif outcome == "success":
        text = f"{record.model}: ok in {took}"
    elif chars is not None:  # a stream that had delivered text, then broke: not a failed connect
        text = f"{record.model}: stream broke after {chars} chars in {took}, {record.reason or outcome}{cut}"
    elif outcome == "client_overload":
        why = record.extra.get("client_overload", "client_saturated")
        delay = record.extra.get("client_delay_s")
        own = f" {_ms(min(float(delay), record.latency_s))} ms" if isinstance(delay, int | float) else ""
        text = f"{record.model}: {record.reason or 'timeout'} after {took}{cut}, {why}{own}"
    elif outcome in _ERROR_OUTCOMES:
        text = f"{record.model}: {record.reason or outcome} after {took}{cut}"
    else:  # flagged, cancelled, and any kind added later
        reason = f" {record.reason}" if record.reason else ""
        text = f"{record.model}: {outcome}{reason} after {took}{cut}"
    extra = record.extra
    flags = [label for key, label in _PATH_FLAGS if extra.get(key) or (key == "hedged" and record.hedged)]
    if record.retry_of is not None:
        flags.append("retry")
    if record.truncated:
        flags.append(f"truncated {record.tokens_before}→{record.tokens_after} tokens in {_ms(record.prepare_s)} ms")
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
        if value is None or value is False or key in _OWN_EXTRAS:
            continue
        if value is True:
            attrs[f"{NS}.{key}"] = "true"  # a word: Jaeger shows booleans in red, as it does errors
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
    model, provider = model_and_provider(litellm_model, str(custom_provider) if custom_provider else None)
    attrs: dict[str, Any] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": provider,
        "gen_ai.request.model": model,
    }
    if isinstance(api_base, str) and not api_base.startswith("os.environ/"):
        parts = urlsplit(api_base)
        if parts.hostname:
            attrs["server.address"] = parts.hostname
            if parts.port:
                attrs["server.port"] = parts.port
    return attrs


_REQUEST_NUMBERS = (
    ("temperature", "gen_ai.request.temperature", float),
    ("top_p", "gen_ai.request.top_p", float),
    ("top_k", "gen_ai.request.top_k", float),
    ("frequency_penalty", "gen_ai.request.frequency_penalty", float),
    ("presence_penalty", "gen_ai.request.presence_penalty", float),
    ("max_tokens", "gen_ai.request.max_tokens", int),
    ("max_completion_tokens", "gen_ai.request.max_tokens", int),
    ("seed", "gen_ai.request.seed", int),
)


def _request_attributes(params: Any) -> dict[str, Any]:
    """The GenAI request attributes for the litellm arguments ``params`` (those that are set)."""
    attrs: dict[str, Any] = {}
    for name, key, kind in _REQUEST_NUMBERS:
        value = params.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            attrs[key] = kind(value)
    stop = params.get("stop")
    if isinstance(stop, str):
        attrs["gen_ai.request.stop_sequences"] = [stop]
    elif isinstance(stop, list | tuple) and stop:
        attrs["gen_ai.request.stop_sequences"] = [str(s) for s in stop]
    choices = params.get("n")
    if isinstance(choices, int) and not isinstance(choices, bool) and choices != 1:
        attrs["gen_ai.request.choice.count"] = choices
    output = _output_type(params.get("response_format"))
    if output is not None:
        attrs["gen_ai.output.type"] = output
    return attrs


def _output_type(response_format: Any) -> str | None:
    """``gen_ai.output.type`` for litellm's ``response_format``: ``json`` or ``text`` (``None``: not asked)."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind is None and isinstance(response_format, type):
        return "json"  # a pydantic model: litellm asks for a JSON schema
    if kind in ("json_object", "json_schema"):
        return "json"
    if kind == "text":
        return "text"
    return None


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
        hidden = hidden_params(response) or {}
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
