"""A fake provider in a child process, so it does not compete with the client for the GIL."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def provider_process(latency_s: float = 0.0, *args: str) -> Iterator[str]:
    """Run ``python -m llm_resilience.testing`` in a child process; yield its base URL.

    ``latency_s`` is how long each answer takes; ``args`` are further command-line options of
    ``python -m llm_resilience.testing`` (e.g. ``"--status", "503"``). Load tests and benchmarks
    use it: a provider thread in the client's own process would share its CPU and GIL.
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "llm_resilience.testing", "--port", "0", "--latency", str(latency_s), *args],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if "http://" not in line:
            raise RuntimeError(f"fake provider did not start (said {line!r})")
        yield line.strip().rsplit(" ", 1)[-1]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
