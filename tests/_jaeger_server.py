"""A real Jaeger v2 (all-in-one, in-memory storage) for the tests and ``scripts/trace_examples.py``.

``scripts/jaeger.sh`` builds and caches the binary. It is started on free loopback ports and stopped
afterwards. Point it at a Jaeger you run yourself with ``JAEGER_QUERY_URL`` (e.g.
``http://localhost:16686``) and ``OTEL_EXPORTER_OTLP_ENDPOINT`` (e.g. ``http://localhost:4318``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


class JaegerUnavailable(Exception):
    """No Jaeger here and none can be built (no Go toolchain): skip."""


class JaegerFailed(Exception):
    """A Jaeger was to be built or started and was not: fail."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


CONFIG = """
service:
  extensions: [jaeger_storage, jaeger_query, healthcheckv2]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [jaeger_storage_exporter]
  telemetry:
    metrics:
      level: none
    logs:
      level: warn
extensions:
  jaeger_storage:
    backends:
      memstore:
        memory:
          max_traces: 10000
  jaeger_query:
    storage:
      traces: memstore
    http:
      endpoint: 127.0.0.1:{query}
    grpc:
      endpoint: 127.0.0.1:{query_grpc}
  healthcheckv2:
    use_v2: true
    http:
      endpoint: 127.0.0.1:{health}
receivers:
  otlp:
    protocols:
      http:
        endpoint: 127.0.0.1:{otlp}
processors:
  batch:
    timeout: 100ms
exporters:
  jaeger_storage_exporter:
    trace_storage: memstore
"""
"""All-in-one minus what the test does not use, every port free (another run may hold 4318/16686)."""


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def _jaeger_binary() -> str:
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "jaeger.sh")], capture_output=True, text=True, timeout=1200, check=False
    )
    if done.returncode != 0:
        raise JaegerFailed(f"scripts/jaeger.sh failed to provide Jaeger:\n{done.stderr[-3000:]}")
    path = done.stdout.strip()
    if not path:
        raise JaegerUnavailable(f"no Jaeger binary and none can be built here: {done.stderr.strip()}")
    return path


@contextlib.contextmanager
def running_jaeger(workdir: Path) -> Iterator[tuple[str, str]]:
    """(query API base URL, OTLP/HTTP endpoint) of a running Jaeger, stopped on exit."""
    query_url = os.environ.get("JAEGER_QUERY_URL")
    if query_url:
        endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        if not endpoint:
            raise JaegerFailed("JAEGER_QUERY_URL is set: set OTEL_EXPORTER_OTLP_ENDPOINT (OTLP/HTTP, e.g. :4318) too")
        yield query_url.rstrip("/"), endpoint.rstrip("/")
        return
    binary = _jaeger_binary()
    ports = {name: free_port() for name in ("query", "query_grpc", "health", "otlp")}
    config = workdir / "config.yaml"
    config.write_text(CONFIG.format(**ports))
    log_path = workdir / "jaeger.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([binary, "--config", str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        health = f"http://127.0.0.1:{ports['health']}/status"
        deadline = time.monotonic() + 60
        while True:
            try:
                if get_json(health).get("healthy"):
                    break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise JaegerFailed(f"Jaeger did not become healthy; its log:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)  # polling a server's readiness: no event to wait on
        yield f"http://127.0.0.1:{ports['query']}", f"http://127.0.0.1:{ports['otlp']}"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)  # measured: ~11 s to stop gracefully
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
