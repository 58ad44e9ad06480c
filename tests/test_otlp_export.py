"""With no TracerProvider set by the application, OTEL_EXPORTER_OTLP_ENDPOINT turns on OTLP export.

Run in a subprocess: the choice of provider is process-global, and so is the exporter thread.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from conftest import OtlpReceiver, free_port
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

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
    assert names.count("llm_resilience.completion openai/any-model") == 5, names
    assert sum(1 for n in names if n.startswith("chat ")) == 5, names
