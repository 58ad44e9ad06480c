"""OpenTelemetry metrics, read back with an in-memory metric reader."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from conftest import MESSAGES, EngineFactory, OtlpReceiver, PolicyBuilder
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from llm_resilience import _metrics
from llm_resilience._metrics import default_meter_provider
from llm_resilience.testing import Behavior, FakeProvider


@pytest.fixture
def reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


@pytest.fixture
def meter_provider(reader: InMemoryMetricReader) -> Iterator[MeterProvider]:
    provider = MeterProvider(metric_readers=[reader])
    yield provider
    provider.shutdown()


def points(reader: InMemoryMetricReader) -> dict[str, list[tuple[dict[str, Any], Any]]]:
    """metric name -> [(attributes, data point)]"""
    out: dict[str, list[tuple[dict[str, Any], Any]]] = {}
    data = reader.get_metrics_data()
    assert data is not None
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    out.setdefault(metric.name, []).append((dict(point.attributes or {}), point))
    return out


def units(reader: InMemoryMetricReader) -> dict[str, str | None]:
    data = reader.get_metrics_data()
    assert data is not None
    return {m.name: m.unit for r in data.resource_metrics for s in r.scope_metrics for m in s.metrics}


def only(found: list[tuple[dict[str, Any], Any]], **attrs: Any) -> Any:
    matching = [p for a, p in found if all(a.get(k.replace("__", ".")) == v for k, v in attrs.items())]
    assert len(matching) == 1, (attrs, [a for a, _ in found])
    return matching[0]


def test_fallback_call_records_duration_tokens_attempts_and_fallbacks(
    make_engine: EngineFactory,
    policy_dict: PolicyBuilder,
    meter_provider: MeterProvider,
    reader: InMemoryMetricReader,
    big: FakeProvider,
) -> None:
    engine = make_engine(policy_dict(["big", "small"]), meter_provider=meter_provider)
    big.set(Behavior.error(503))

    engine.completion("chat", MESSAGES)

    found = points(reader)
    duration = found["gen_ai.client.operation.duration"]
    failed = only(duration, llm_resilience__model="big")
    assert failed.count == 1
    big_attrs = next(a for a, p in duration if p is failed)
    assert big_attrs["llm_resilience.outcome"] == "failure"
    assert big_attrs["error.type"] == "ServiceUnavailableError"
    assert big_attrs["gen_ai.operation.name"] == "chat"
    assert big_attrs["gen_ai.provider.name"] == "openai"
    assert big_attrs["gen_ai.request.model"] == "gpt-4o"
    assert big_attrs["llm_resilience.route"] == "chat"
    assert big_attrs["llm_resilience.prompt_class"] == "default"
    answered = only(duration, llm_resilience__model="small", llm_resilience__outcome="success")
    assert answered.count == 1 and answered.sum > 0
    small_attrs = next(a for a, p in duration if p is answered)
    assert "error.type" not in small_attrs
    assert small_attrs["gen_ai.response.model"] == "gpt-4o-mini"

    tokens = found["gen_ai.client.token.usage"]
    assert only(tokens, gen_ai__token__type="input", llm_resilience__model="small").sum > 0
    assert only(tokens, gen_ai__token__type="output", llm_resilience__model="small").sum > 0

    attempts = found["llm_resilience.attempts"]
    assert only(attempts, llm_resilience__model="big", llm_resilience__reason="server_error").value == 1
    assert only(attempts, llm_resilience__model="small", llm_resilience__outcome="success").value == 1
    assert only(found["llm_resilience.fallbacks"], llm_resilience__reason="server_error").value == 1

    assert units(reader)["gen_ai.client.operation.duration"] == "s"
    assert units(reader)["gen_ai.client.token.usage"] == "{token}"


def test_breaker_state_gauge_and_transitions(
    make_engine: EngineFactory,
    policy_dict: PolicyBuilder,
    meter_provider: MeterProvider,
    reader: InMemoryMetricReader,
    big: FakeProvider,
) -> None:
    engine = make_engine(policy_dict(["big", "small"], fail_max=2), meter_provider=meter_provider)
    big.set(Behavior.error(500))

    for _ in range(3):
        engine.completion("chat", MESSAGES)

    found = points(reader)
    state = found["llm_resilience.breaker.state"]
    assert only(state, llm_resilience__model="big").value == 2
    assert only(state, llm_resilience__model="small").value == 0
    opened = only(found["llm_resilience.breaker.transitions"], llm_resilience__breaker__to="open")
    assert opened.value == 1
    skipped = only(found["llm_resilience.fallbacks"], llm_resilience__reason="breaker_open")
    assert skipped.value == 1


def test_hedges_and_retries_are_counted_with_their_decision(
    make_engine: EngineFactory,
    policy_dict: PolicyBuilder,
    meter_provider: MeterProvider,
    reader: InMemoryMetricReader,
    big: FakeProvider,
) -> None:
    policy = policy_dict(["big", "small"], timeout_s=2.0)
    policy["routes"]["chat"]["hedge"] = {"after": 0.05, "budget_ratio": 0.5}
    # The retry runs on a route without hedging: on a loaded machine the 503 itself can take longer
    # than hedge.after, and a third hedge decision would be counted.
    policy["routes"]["plain"] = {"chain": ["big", "small"], "retries": {"max_retries": 1, "backoff_base_s": 0.01}}
    engine = make_engine(policy, meter_provider=meter_provider)
    big.set(Behavior.slow(0.2))
    for _ in range(2):  # 1st: over the budget (1 hedge > 0.5 x 1 call); 2nd: hedged
        engine.completion("chat", MESSAGES)
    big.set(Behavior.ok())
    big.script(Behavior.error(503))
    engine.completion("plain", MESSAGES)  # retried once on big

    found = points(reader)
    hedges = found["llm_resilience.hedges"]
    assert only(hedges, llm_resilience__decision="budget").value == 1
    assert only(hedges, llm_resilience__decision="launched").value == 1
    retries = found["llm_resilience.retries"]
    assert only(retries, llm_resilience__decision="launched").value == 1
    cancelled = only(found["gen_ai.client.operation.duration"], llm_resilience__outcome="cancelled")
    assert cancelled.count == 1


def test_streams_record_time_to_first_chunk(
    make_engine: EngineFactory,
    policy_dict: PolicyBuilder,
    meter_provider: MeterProvider,
    reader: InMemoryMetricReader,
    big: FakeProvider,
) -> None:
    engine = make_engine(policy_dict(["big"], timeout_s=4.0), meter_provider=meter_provider)

    for _ in engine.completion("chat", MESSAGES, stream=True):
        pass

    first_chunk = only(points(reader)["gen_ai.client.operation.time_to_first_chunk"], llm_resilience__model="big")
    assert first_chunk.count == 1


def test_no_provider_configured_records_into_the_global_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", raising=False)

    assert type(default_meter_provider()).__name__ == "_ProxyMeterProvider"


def test_otlp_endpoint_gives_a_private_exporting_provider(
    monkeypatch: pytest.MonkeyPatch,
    otlp_receiver: OtlpReceiver,
    make_engine: EngineFactory,
    policy_dict: PolicyBuilder,
    big: FakeProvider,
    small: FakeProvider,
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp_receiver.endpoint)
    monkeypatch.setattr(_metrics, "_otlp", None)

    provider = default_meter_provider()
    assert isinstance(provider, MeterProvider)
    try:
        assert default_meter_provider() is provider  # one per process
        big.set(Behavior.error(503))
        make_engine(policy_dict(["big", "small"]), meter_provider=provider).completion("chat", MESSAGES)
        assert provider.force_flush(timeout_millis=10_000)
    finally:
        provider.shutdown(timeout_millis=1000)

    exported: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for body in otlp_receiver.wait_for("/v1/metrics"):
        for resource_metrics in ExportMetricsServiceRequest.FromString(body).resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    if metric.WhichOneof("data") != "sum":
                        continue
                    for point in metric.sum.data_points:
                        attrs = tuple(sorted((a.key, a.value.string_value) for a in point.attributes))
                        exported[(metric.name, attrs)] = point.as_int
    attempts = {
        dict(attrs)["llm_resilience.model"] + ":" + dict(attrs)["llm_resilience.outcome"]: value
        for (name, attrs), value in exported.items()
        if name == "llm_resilience.attempts"
    }
    assert attempts == {"big:failure": 1, "small:success": 1}, exported
    assert [v for (name, _), v in exported.items() if name == "llm_resilience.fallbacks"] == [1], exported


def test_breaker_transitions_of_many_models_keep_no_copy_beside_the_bounded_registry() -> None:
    from llm_resilience._breakers import BreakerRegistry
    from llm_resilience._metrics import MetricsHook
    from llm_resilience._policy import BreakerSettings

    registry = BreakerRegistry(lambda model: BreakerSettings(fail_max=1), max_breakers=8)
    hook = MetricsHook(None, registry)
    for i in range(100):  # caller-supplied model strings, each opening its breaker
        hook.breaker_transition(f"m{i}", "closed", "open")
    assert len(hook._seen_states) == 0  # the gauge reads the registry, whose bound holds
