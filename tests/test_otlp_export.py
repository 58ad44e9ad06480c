"""With no TracerProvider set by the application, OTEL_EXPORTER_OTLP_ENDPOINT turns on OTLP export.

Run in a subprocess: the choice of provider is process-global, and so is the exporter thread.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from conftest import OtlpReceiver, free_port
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from llm_resilience._tracing import exporter_choice

SCRIPT = textwrap.dedent(
    """
    import llm_resilience
    from llm_resilience._tracing import default_tracer_provider
    from llm_resilience.testing import FakeProvider

    provider = default_tracer_provider()
    print("provider", type(provider).__module__, type(provider).__name__)
    with FakeProvider() as fake:
        for _ in range(5):
            r = llm_resilience.completion(
                "openai/any-model", [{"role": "user", "content": "hi"}], api_base=fake.base_url, api_key="k"
            )
            assert r.choices[0].message.content
    print("calls ok")
    """
)


def test_a_dead_collector_never_breaks_a_call() -> None:
    env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    env.pop("LLM_RESILIENCE_POLICY", None)
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "provider opentelemetry.sdk.trace TracerProvider" in done.stdout  # an SDK provider was installed
    assert "calls ok" in done.stdout


def test_spans_reach_a_real_otlp_receiver(otlp_receiver: OtlpReceiver) -> None:
    env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.endpoint}
    env.pop("LLM_RESILIENCE_POLICY", None)
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]

    bodies = otlp_receiver.wait_for("/v1/traces")  # flushed at the latest when the process exits

    names: list[str] = []
    for body in bodies:
        request = ExportTraceServiceRequest.FromString(body)
        for resource_spans in request.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                names += [span.name for span in scope_spans.spans]
    assert names.count("llm_resilience.completion openai/any-model answered") == 5, names
    assert sum(1 for n in names if n.startswith("chat ")) == 5, names


WIRING = textwrap.dedent(
    """
    from llm_resilience._metrics import default_meter_provider
    from llm_resilience._tracing import default_tracer_provider

    print("traces", type(default_tracer_provider()).__name__)
    print("metrics", type(default_meter_provider()).__name__)
    """
)


def test_jaeger_as_the_endpoint_with_metrics_turned_off_exports_traces_only() -> None:
    # Jaeger takes no OTLP metrics: OTEL_METRICS_EXPORTER=none is how to avoid the 404 at exit.
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{free_port()}", OTEL_METRICS_EXPORTER="none")
    done = subprocess.run([sys.executable, "-c", WIRING], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["traces TracerProvider", "metrics _ProxyMeterProvider"]


@pytest.mark.parametrize(
    ("variables", "traces", "metrics"),
    [
        ({}, None, None),  # nothing asked for: nothing exported
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://h:4318"}, "otlp", "otlp"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://h:4318", "OTEL_METRICS_EXPORTER": "none"}, "otlp", None),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://h:4318/v1/traces"}, "otlp", None),
        ({"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://h:4318/v1/metrics"}, None, "otlp"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://h:4318", "OTEL_TRACES_EXPORTER": "none"}, None, "otlp"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://h:4318", "OTEL_SDK_DISABLED": "true"}, None, None),
        ({"OTEL_TRACES_EXPORTER": "console", "OTEL_METRICS_EXPORTER": "otlp"}, "console", "otlp"),
        ({"OTEL_TRACES_EXPORTER": "zipkin,otlp"}, "otlp", None),  # the first one supported here
    ],
)
def test_the_standard_otel_variables_choose_what_is_exported(
    variables: dict[str, str], traces: str | None, metrics: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [k for k in os.environ if k.startswith("OTEL_")]:
        monkeypatch.delenv(name)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)

    assert (exporter_choice("traces"), exporter_choice("metrics")) == (traces, metrics)
