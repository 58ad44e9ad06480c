"""Threads and an event loop in one process: what the soak's shape costs the client, with and without the layer.

``make soak`` calls from 32 threads (sync) and 500 asyncio tasks (one event loop) in one process.
On a 2-core machine that shape saturates the client whatever sits between it and the provider: the
loop is one thread among 33 that want the GIL, and each of its socket events waits behind the busy
threads. This benchmark measures the shape against one healthy provider (in its own process,
answering in 50 ms), with no fault and a generous timeout (60 s, so nothing is cut), twice each,
alternating:

* **bare litellm**: ``litellm.completion`` / ``litellm.acompletion``;
* **llm-resilience**: the same provider as a one-model route, ``timeout_s`` / ``deadline_s`` 60.

Each row gives, per kind of caller, the calls finished per second and their latency percentiles.
Closed-loop callers take N / rate seconds per call on average (Little's law), so the latency is the
queueing of the client, not the provider's 50 ms. The soak's 3 s deadline is judged against it.

Run ``.venv/bin/python benchmarks/mixed_callers.py`` (``--seconds``, ``--threads``, ``--tasks``).
Numbers from a machine shared with other work are noisy: re-run on a quiet machine before quoting.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import threading
import time
import warnings
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import _common as c  # first: sets litellm's offline switches before anything imports it
import litellm

from llm_resilience import Policy, Resilience
from llm_resilience.testing import provider_process

MESSAGES = [{"role": "user", "content": "hello"}]
PROVIDER_LATENCY_S = 0.05
TIMEOUT_S = 60.0


CROSSED = {
    "llm-resilience sync + bare async": ("llm-resilience", "bare litellm"),
    "bare sync + llm-resilience async": ("bare litellm", "llm-resilience"),
}
"""Each side of the layer beside bare litellm's other side: which side's cost moves the other's share."""


def callers(system: str, base_url: str) -> tuple[Callable[[], Any], Callable[[], Coroutine[Any, Any, Any]]]:
    """The sync and async call of one system, to the same provider (a :data:`CROSSED` name mixes two)."""
    if system in CROSSED:
        sync_system, async_system = CROSSED[system]
        return callers(sync_system, base_url)[0], callers(async_system, base_url)[1]
    if system == "llm-resilience":
        params = {"model": "openai/bench", "api_base": base_url, "api_key": "sk-bench"}
        engine = Resilience(
            Policy.from_dict(
                {
                    "models": {"bench": {"litellm_params": params}},
                    "routes": {"chat": {"chain": ["bench"]}},
                    "prompt_classes": {"default": {"timeout_s": TIMEOUT_S, "deadline_s": TIMEOUT_S}},
                }
            )
        )
        return (lambda: engine.completion("chat", MESSAGES)), (lambda: engine.acompletion("chat", MESSAGES))
    kwargs: dict[str, Any] = {
        "model": "openai/bench", "api_base": base_url, "api_key": "sk-bench",
        "timeout": TIMEOUT_S, "num_retries": 0, "max_retries": 0, "messages": MESSAGES,
    }  # fmt: skip
    return (lambda: litellm.completion(**kwargs)), (lambda: litellm.acompletion(**kwargs))


def measure(system: str, base_url: str, threads: int, tasks: int, seconds: float) -> dict[str, list[float]]:
    """Latencies of every call that ended, by kind, over ``seconds`` of both kinds at once."""
    sync_call, async_call = callers(system, base_url)
    for _ in range(5):  # warm-up: litellm's lazy imports, connection pools
        sync_call()
    asyncio.run(async_call())
    stop_at = time.monotonic() + seconds
    latencies: dict[str, list[float]] = {"sync": [], "async": []}
    errors: dict[str, int] = {"sync": 0, "async": 0}

    def thread_worker() -> None:
        while time.monotonic() < stop_at:
            started = time.monotonic()
            try:
                sync_call()
            except Exception:
                errors["sync"] += 1
            else:
                latencies["sync"].append(time.monotonic() - started)

    async def task_worker() -> None:
        while time.monotonic() < stop_at:
            started = time.monotonic()
            try:
                await async_call()
            except Exception:
                errors["async"] += 1
            else:
                latencies["async"].append(time.monotonic() - started)

    async def all_tasks() -> None:
        await asyncio.gather(*(task_worker() for _ in range(tasks)))

    workers = [threading.Thread(target=thread_worker) for _ in range(threads)]
    if tasks:
        workers.append(threading.Thread(target=lambda: asyncio.run(all_tasks())))
    started = time.monotonic()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    latencies["elapsed"] = [time.monotonic() - started]
    latencies["errors"] = [float(errors["sync"]), float(errors["async"])]
    return latencies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each run")
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--tasks", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=2, help="runs of each system, alternating")
    parser.add_argument("--out", type=Path, default=c.RESULTS_DIR, help="directory for mixed-callers.md")
    parser.add_argument(
        "--no-crossed", dest="crossed", action="store_false", help="skip the runs that mix the layer's sync side "
        "with bare litellm's async side and the reverse",
    )  # fmt: skip
    args = parser.parse_args(argv)
    for name in ("LiteLLM", "llm_resilience", "asyncio"):  # litellm's loop-change notices, not results
        logging.getLogger(name).setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore")

    rows = []
    runs = [(r, system) for r in range(1, args.rounds + 1) for system in ("bare litellm", "llm-resilience")]
    if args.crossed:
        runs += [(1, system) for system in CROSSED]
    with provider_process(PROVIDER_LATENCY_S) as base_url:
        for round_, system in runs:
            result = measure(system, base_url, args.threads, args.tasks, args.seconds)
            elapsed = result["elapsed"][0]
            for i, (kind, callers_n) in enumerate((("sync", args.threads), ("async", args.tasks))):
                done = result[kind]
                if not callers_n:
                    continue
                rate = len(done) / elapsed
                rows.append(
                    [
                        system, round_, f"{kind} ({callers_n})", f"{rate:.0f}",
                        c.fmt_s(c.median(done)), c.fmt_s(c.percentile(done, 90)),
                        c.fmt_s(max(done) if done else None), int(result["errors"][i]),
                    ]
                )  # fmt: skip
            print(f"  {system} round {round_}: done", file=sys.stderr, flush=True)
    table = c.markdown_table(
        ["system", "round", "callers", "calls/s", "p50 s", "p90 s", "max s", "errors"], rows, "lllrrrrr"
    )
    report = (
        f"# {args.threads} threads and {args.tasks} tasks in one process, one healthy provider "
        f"({PROVIDER_LATENCY_S * 1000:.0f} ms), {args.seconds:g} s per run\n\n{table}\n\n"
        f"{c.environment_line()}; load average {c.load_average()}\n\n`{c.command_line()}`\n"
    )
    print(report)
    c.write_text(args.out / "mixed-callers.md", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
