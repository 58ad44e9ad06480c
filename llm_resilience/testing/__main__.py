"""Run the fake provider in the foreground: ``python -m llm_resilience.testing --port 8001``.

With ``--control`` the process also reads commands on stdin (one a line, answered on stdout), which
is how :func:`llm_resilience.testing.scripted_provider_process` drives a latency schedule from
another process: ``start T0`` (``T0`` a ``time.monotonic()`` reading, shared by every process
on the machine) forgets the requests so far and starts the schedule's clock; ``received``
waits until no request is in flight and answers a JSON list of when each request arrived,
seconds since ``T0``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import get_args

from llm_resilience.testing._fake_provider import DEFAULT_CONTENT, Behavior, BodyMode, FakeProvider


class LatencySchedule:
    """Lognormal latencies (median x exp(sigma x N(0, 1)), seeded) whose median changes on a timeline.

    Until :meth:`start`, and outside every ``(start_s, end_s, median_s)`` phase, the median is
    ``median_s``; a request arriving ``t`` seconds after the start inside a phase gets that phase's
    median. Handler threads draw concurrently, hence the lock.
    """

    def __init__(
        self,
        median_s: float,
        sigma: float,
        seed: str,
        phases: Sequence[tuple[float, float, float]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.median_s = median_s
        self.clock = clock
        self.sigma = sigma
        self.phases = tuple(phases)
        self.t0 = math.inf
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def start(self, t0: float) -> None:
        self.t0 = t0

    def __call__(self) -> float:
        t = self.clock() - self.t0
        median = next((m for start, end, m in self.phases if start <= t < end), self.median_s)
        with self._lock:
            z = self._rng.gauss(0.0, 1.0)
        return median * math.exp(self.sigma * z)


def _serve_commands(provider: FakeProvider, schedule: LatencySchedule | None) -> None:
    """Answer ``start T0`` / ``received`` lines on stdin until it closes (the parent went away)."""
    t0 = 0.0
    for line in sys.stdin:
        command, _, arg = line.strip().partition(" ")
        if command == "start":
            provider.wait_idle(5.0)
            provider.reset()
            t0 = float(arg)
            if schedule is not None:
                schedule.start(t0)
            print("ok", flush=True)
        elif command == "received":
            provider.wait_idle(10.0)
            print(json.dumps([r.received_at - t0 for r in provider.requests]), flush=True)
        else:
            print(json.dumps({"error": f"unknown command {command!r}"}), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llm_resilience.testing",
        description="Serve a fake OpenAI-compatible chat-completions API until Ctrl-C.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before answering")
    parser.add_argument("--sigma", type=float, default=0.0,
                        help="lognormal spread: each latency is --latency x exp(sigma x N(0, 1))")  # fmt: skip
    parser.add_argument("--seed", default="0", help="seed of the lognormal draws")
    parser.add_argument("--phase", type=float, nargs=3, action="append", default=[],
                        metavar=("START_S", "END_S", "LATENCY_S"),
                        help="median latency from START_S to END_S after the 'start' command (repeatable)")  # fmt: skip
    parser.add_argument("--control", action="store_true", help="read 'start T0' / 'received' commands on stdin")
    parser.add_argument("--status", type=int, default=200)
    parser.add_argument("--error-message", default=None)
    parser.add_argument("--retry-after", type=float, default=None, help="Retry-After header, seconds")
    parser.add_argument("--content", default=DEFAULT_CONTENT)
    parser.add_argument("--body", choices=get_args(BodyMode), default="normal")
    parser.add_argument("--chunks", type=int, default=3, help="content chunks per stream")
    parser.add_argument("--inter-chunk", type=float, default=0.0, help="seconds between stream chunks")
    args = parser.parse_args(argv)

    scripted = args.sigma > 0 or bool(args.phase)
    schedule = LatencySchedule(args.latency, args.sigma, args.seed, args.phase) if scripted else None
    behavior = Behavior(
        latency_s=args.latency,
        latency_fn=schedule,
        status=args.status,
        error_message=args.error_message,
        retry_after_s=args.retry_after,
        content=args.content,
        body=args.body,
        chunks=args.chunks,
        inter_chunk_s=args.inter_chunk,
    )
    with FakeProvider(args.host, args.port, behavior=behavior) as provider:
        print(f"fake provider listening on {provider.base_url}", flush=True)
        try:
            if args.control:
                _serve_commands(provider, schedule)
            else:
                while True:
                    time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
