"""With no TracerProvider set by the application, OTEL_EXPORTER_OTLP_ENDPOINT turns on OTLP export.

Run in a subprocess: the choice of provider is process-global, and so is the exporter thread.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from conftest import free_port

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
