"""A fake provider in a child process, so it does not compete with the client for the GIL."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence


@contextlib.contextmanager
def provider_process(latency_s: float = 0.0, *args: str) -> Iterator[str]:
    """Run ``python -m llm_resilience.testing`` in a child process; yield its base URL.

    ``latency_s`` is how long each answer takes; ``args`` are further command-line options of
    ``python -m llm_resilience.testing`` (e.g. ``"--status", "503"``). Load tests and benchmarks
    use it: a provider thread in the client's own process would share its CPU and GIL.
    """
    with _child(["--latency", str(latency_s), *args], control=False) as (_, base_url):
        yield base_url


class ScriptedProvider:
    """Handle on a provider process started by :func:`scripted_provider_process`."""

    def __init__(self, proc: subprocess.Popen[str], base_url: str) -> None:
        self._proc = proc
        self.base_url = base_url

    def start(self, t0: float | None = None) -> float:
        """Forget the requests so far and start the latency schedule's clock at ``t0`` (default: now).

        ``t0`` is a ``time.monotonic()`` reading: on Linux and macOS every process reads the same
        monotonic clock, so the client and the provider agree on when a phase begins.
        """
        t0 = time.monotonic() if t0 is None else t0
        if self._ask(f"start {t0!r}") != "ok":
            raise RuntimeError("the provider process refused 'start'")
        return t0

    def received(self) -> list[float]:
        """When each request since :meth:`start` arrived, seconds after ``t0`` (waits until none is in flight)."""
        times = json.loads(self._ask("received"))
        return [float(t) for t in times]

    def _ask(self, command: str) -> str:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(command + "\n")
        self._proc.stdin.flush()
        answer = self._proc.stdout.readline()
        if not answer:
            raise RuntimeError(f"the provider process exited (asked {command!r})")
        return answer.strip()


@contextlib.contextmanager
def scripted_provider_process(
    median_s: float,
    *,
    sigma: float = 0.0,
    seed: str = "0",
    phases: Sequence[tuple[float, float, float]] = (),
    args: Sequence[str] = (),
) -> Iterator[ScriptedProvider]:
    """A provider process whose latency follows a schedule; yields a :class:`ScriptedProvider`.

    Each latency is ``median x exp(sigma x N(0, 1))``, drawn from a generator seeded with
    ``seed``; the median is ``median_s`` except from ``start_s`` to ``end_s`` after
    :meth:`ScriptedProvider.start` for each ``(start_s, end_s, median)`` of ``phases`` (e.g. a
    latency spike). :meth:`ScriptedProvider.received` reads back when each request arrived.
    """
    opts = ["--latency", repr(median_s), "--sigma", repr(sigma), "--seed", seed]
    for start_s, end_s, phase_median_s in phases:
        opts += ["--phase", repr(start_s), repr(end_s), repr(phase_median_s)]
    with _child([*opts, *args], control=True) as (proc, base_url):
        yield ScriptedProvider(proc, base_url)


@contextlib.contextmanager
def _child(args: Sequence[str], *, control: bool) -> Iterator[tuple[subprocess.Popen[str], str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "llm_resilience.testing", "--port", "0", *(["--control"] if control else []), *args],
        stdin=subprocess.PIPE if control else None, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if "http://" not in line:
            raise RuntimeError(f"fake provider did not start (said {line!r})")
        yield proc, line.strip().rsplit(" ", 1)[-1]
    finally:
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
