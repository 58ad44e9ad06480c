"""Bursts against healthy providers: does the layer stay out of the way when the client is the bottleneck?

Two healthy fake providers, each in its own process (``python -m llm_resilience.testing``, listen
backlog 1,024), so they neither compete with the client for the GIL nor drop connects: ``big``
answers in 60 ms, ``small`` in 40 ms. Three ways of calling them, one after another in this
process, each with fresh state:

* **llm-resilience**: route ``[big, small]``, ``timeout_s: 0.3``, ``deadline_s: 2``,
  ``soft_timeout: p95``, breakers ``fail_max: 3, reset_timeout_s: 30``; tracing on (every span
  exported synchronously to memory, the worst case);
* **LiteLLM Router**: the same two deployments, ``fallbacks big -> small``, ``timeout=0.3``,
  ``allowed_fails=2``, ``cooldown_time=30``, retries off;
* **bare litellm**: ``litellm.acompletion`` / ``litellm.completion`` to ``big``, no fallback and a
  generous timeout (30 s): what the client alone can do, the reference for throughput.

Each row: 30 sequential warm-up calls (the soft timeout learns ~60 ms), then N calls started
together (N tasks in one event loop, or N threads with one sync call each), then 20 sequential
calls: which model answers them shows whether the burst left a breaker (or a cooldown) open.
Thread bursts run ``--rounds`` times (default 3), each round with fresh state.

Run ``make bench`` or ``.venv/bin/python benchmarks/burst.py [--quick]``. Numbers from a machine
shared with other work are noisy: re-run on a quiet machine before quoting them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import sys
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _common as c  # first: sets litellm's offline switches before anything imports it
import litellm
from litellm.router import Router
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import llm_resilience
from llm_resilience import AttemptRecord, Hook, Resilience
from llm_resilience.testing import provider_process

MESSAGES = [{"role": "user", "content": "hello"}]
LATENCY_S = {"big": 0.060, "small": 0.040}
WIRE_MODEL = {"big": "gpt-4o", "small": "gpt-4o-mini"}
MODEL_OF_WIRE = {wire: name for name, wire in WIRE_MODEL.items()}
API_KEY = {"big": "sk-bench-big", "small": "sk-bench-small"}
TIMEOUT_S = 0.3
DEADLINE_S = 2.0


@dataclass
class Row:
    contestant: str
    shape: str
    n: int
    answered: int = 0
    latencies: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    opens: int | None = None
    next_calls: Counter[str] = field(default_factory=Counter)
    overloads: int | None = None
    round: int | None = None

    @property
    def answered_pct(self) -> float:
        return 100.0 * self.answered / self.n if self.n else 0.0

    @property
    def calls_per_s(self) -> float:
        return self.answered / self.wall_s if self.wall_s > 0 else 0.0


# ---------------------------------------------------------------------------
# Providers, each in its own process


def litellm_params(name: str, urls: dict[str, str]) -> dict[str, Any]:
    return {"model": f"openai/{WIRE_MODEL[name]}", "api_base": urls[name], "api_key": API_KEY[name]}


def answered_by(response: Any) -> str:
    return MODEL_OF_WIRE.get(str(response.model).removeprefix("openai/"), str(response.model))


# ---------------------------------------------------------------------------
# Contestants: one async and one sync way of making a call, plus what they report


class Counts(Hook):
    """Breaker openings and client_overload attempts of one engine."""

    def __init__(self) -> None:
        self.opens = 0
        self.overloads = 0
        self._lock = threading.Lock()

    def breaker_transition(self, model: str, old: str, new: str) -> None:
        if new == "open":
            with self._lock:
                self.opens += 1

    def attempt_ended(self, call: Any, record: AttemptRecord, response: Any) -> None:
        if "client_overload" in record.extra or record.outcome == "client_overload":
            with self._lock:
                self.overloads += 1


class Contestant:
    name = ""

    async def acall(self) -> str:
        raise NotImplementedError

    def call(self) -> str:
        raise NotImplementedError

    def opens(self) -> int | None:
        return None

    def overloads(self) -> int | None:
        return None


class Ours(Contestant):
    name = "llm-resilience"
    deadline_s = DEADLINE_S

    def __init__(self, urls: dict[str, str]) -> None:
        policy = {
            "models": {name: {"litellm_params": litellm_params(name, urls)} for name in WIRE_MODEL},
            "routes": {"chat": {"chain": ["big", "small"]}},
            "prompt_classes": {
                "default": {"timeout_s": TIMEOUT_S, "deadline_s": self.deadline_s, "soft_timeout": {"percentile": 95}}
            },
            "breakers": {"default": {"fail_max": 3, "reset_timeout_s": 30}},
        }
        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
        self.counts = Counts()
        self.engine = Resilience.from_dict(policy, hooks=[self.counts], tracer_provider=tracer_provider)

    async def acall(self) -> str:
        return answered_by(await self.engine.acompletion("chat", MESSAGES))

    def call(self) -> str:
        return answered_by(self.engine.completion("chat", MESSAGES))

    def opens(self) -> int | None:
        return self.counts.opens

    def overloads(self) -> int | None:
        return self.counts.overloads


class OursNoDeadline(Ours):
    """The same policy with a deadline as long as the bare call's timeout: the throughput comparison.

    With a 2 s deadline no contestant can answer 2,000 calls that the client alone needs ~12 s
    for; the throughput ratio compares work done when every call is allowed to finish.
    """

    name = "llm-resilience, deadline 30 s"
    deadline_s = 30.0


class LiteLLMRouter(Contestant):
    name = "LiteLLM Router"

    def __init__(self, urls: dict[str, str]) -> None:
        model_list = [{"model_name": name, "litellm_params": litellm_params(name, urls)} for name in WIRE_MODEL]
        self.router = Router(
            model_list=model_list, fallbacks=[{"big": ["small"]}], timeout=TIMEOUT_S, allowed_fails=2,
            cooldown_time=30, num_retries=0,
        )  # fmt: skip
        self.ids = [str(d["model_info"]["id"]) for d in self.router.model_list]

    async def acall(self) -> str:
        return answered_by(await self.router.acompletion(model="big", messages=MESSAGES))

    def call(self) -> str:
        return answered_by(self.router.completion(model="big", messages=MESSAGES))

    def opens(self) -> int | None:
        return len(self.router.cooldown_cache.get_active_cooldowns(self.ids, None))


class Bare(Contestant):
    name = "bare litellm"

    def __init__(self, urls: dict[str, str]) -> None:
        self.kwargs = {**litellm_params("big", urls), "timeout": 30.0, "num_retries": 0, "max_retries": 0}

    async def acall(self) -> str:
        return answered_by(await litellm.acompletion(messages=MESSAGES, **self.kwargs))

    def call(self) -> str:
        return answered_by(litellm.completion(messages=MESSAGES, **self.kwargs))


CONTESTANTS: list[Callable[[dict[str, str]], Contestant]] = [Ours, LiteLLMRouter, Bare]


# ---------------------------------------------------------------------------
# One row: warm up, burst, then the next calls


async def _timed(contestant: Contestant, started: float, row: Row) -> None:
    with contextlib.suppress(Exception):
        await contestant.acall()
        row.answered += 1
        row.latencies.append(time.perf_counter() - started)


async def async_row(contestant: Contestant, n: int, warm: int, after: int) -> Row:
    row = Row(contestant.name, "acompletion", n)
    for _ in range(warm):
        with contextlib.suppress(Exception):
            await contestant.acall()
    started = time.perf_counter()
    await asyncio.gather(*(_timed(contestant, started, row) for _ in range(n)))
    row.wall_s = time.perf_counter() - started
    row.opens, row.overloads = contestant.opens(), contestant.overloads()
    for _ in range(after):
        try:
            row.next_calls[await contestant.acall()] += 1
        except Exception:
            row.next_calls["failed"] += 1
    return row


def thread_row(contestant: Contestant, n: int, warm: int, after: int) -> Row:
    row = Row(contestant.name, "threads", n)
    for _ in range(warm):
        with contextlib.suppress(Exception):
            contestant.call()
    barrier = threading.Barrier(n + 1)
    lock = threading.Lock()
    started = 0.0

    def worker() -> None:
        barrier.wait()
        try:
            contestant.call()
        except Exception:
            return
        latency = time.perf_counter() - started
        with lock:
            row.answered += 1
            row.latencies.append(latency)

    threads = [threading.Thread(target=worker) for _ in range(n)]
    for t in threads:
        t.start()
    started = time.perf_counter()
    barrier.wait()
    for t in threads:
        t.join()
    row.wall_s = time.perf_counter() - started
    row.opens, row.overloads = contestant.opens(), contestant.overloads()
    for _ in range(after):
        try:
            row.next_calls[contestant.call()] += 1
        except Exception:
            row.next_calls["failed"] += 1
    return row


# ---------------------------------------------------------------------------
# Report


def next_text(row: Row) -> str:
    return ", ".join(f"{name} {count}" for name, count in row.next_calls.most_common()) or "—"


def report(rows: list[Row], args: argparse.Namespace) -> str:
    headers = [
        "burst", "contestant", "answered %", "p50 ms", "p99 ms", "wall s", "calls/s", "breaker opens",
        "client_overload attempts", f"next {args.after} calls",
    ]  # fmt: skip
    body = [
        [
            f"{r.n} {r.shape}" + (f" (round {r.round})" if r.round is not None else ""),
            r.contestant,
            f"{r.answered_pct:.1f}",
            c.fmt_ms(c.percentile(r.latencies, 50)),
            c.fmt_ms(c.percentile(r.latencies, 99)),
            f"{r.wall_s:.2f}",
            f"{r.calls_per_s:.0f}",
            "—" if r.opens is None else r.opens,
            "—" if r.overloads is None else r.overloads,
            next_text(r),
        ]
        for r in rows
    ]
    lines = [
        "# Bursts against healthy providers",
        "",
        f"`{c.command_line()}` — {c.environment_line()}.",
        "",
        "Providers in their own processes: big 60 ms, small 40 ms. llm-resilience: `[big, small]`, "
        f"timeout {TIMEOUT_S} s, deadline {DEADLINE_S} s, soft timeout p95, fail_max 3, tracing on. Router: same "
        "deployments, fallback big -> small, timeout 0.3, allowed_fails 2. Bare: litellm to big, timeout 30 s. "
        "Latency: from the burst's start to each answer. Breaker opens: ours counts transitions to open; "
        "the Router's figure is the deployments in cooldown after the burst.",
        "",
        c.markdown_table(headers, body, "llrrrrrrrl"),
    ]
    threaded = [r for r in rows if r.shape == "threads" and r.contestant == Ours.name]
    if threaded:
        opened = [r for r in threaded if r.opens]
        primary = [r for r in threaded if r.next_calls.get("big", 0) == sum(r.next_calls.values())]
        lines += [
            "",
            f"Thread bursts ({', '.join(str(n) for n in args.threads)} threads, {args.rounds} round(s) each, fresh "
            f"state per round), llm-resilience: {len(threaded) - len(opened)} of {len(threaded)} rounds opened no "
            f"breaker; in {len(primary)} of {len(threaded)} the next {args.after} calls all went to big; "
            f"{sum(r.answered for r in threaded)} of {sum(r.n for r in threaded)} calls answered.",
        ]
        for n in args.threads:
            ratios = []
            for r in (r for r in threaded if r.n == n):
                router = next(
                    (x for x in rows if x.shape == "threads" and x.n == n and x.round == r.round
                     and x.contestant == LiteLLMRouter.name), None,
                )  # fmt: skip
                if router is not None and r.latencies and router.latencies:
                    ratios.append(c.percentile(r.latencies, 50) / c.percentile(router.latencies, 50))
            if ratios:
                lines.append(
                    f"- {n} threads: p50 / the Router's p50 per round: {', '.join(f'{x:.2f}' for x in ratios)}"
                )
    for n in args.throughput:
        ours = next((r for r in rows if r.n == n and r.contestant == OursNoDeadline.name), None)
        bare = next((r for r in rows if r.n == n and r.shape == "acompletion" and r.contestant == Bare.name), None)
        if ours is not None and bare is not None and bare.calls_per_s > 0:
            ratio = ours.calls_per_s / bare.calls_per_s
            lines += [
                "",
                f"Throughput at {n} concurrent `acompletion` calls, every call allowed to finish (deadline 30 s, "
                f"tracing on): llm-resilience {ours.calls_per_s:.0f} calls/s, bare litellm {bare.calls_per_s:.0f} "
                f"calls/s: **{ratio:.2f}x** (target >= 0.95x).",
            ]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small bursts only (a smoke test, ~1 min)")
    parser.add_argument("--bursts", type=int, nargs="*", default=None, help="async burst sizes")
    parser.add_argument("--threads", type=int, nargs="*", default=None, help="thread burst sizes")
    parser.add_argument(
        "--throughput", type=int, nargs="*", default=None, help="async burst sizes for the throughput ratio"
    )
    parser.add_argument("--rounds", type=int, default=None, help="rounds of each thread burst (fresh state each)")
    parser.add_argument("--warm", type=int, default=None, help="sequential calls before each burst")
    parser.add_argument("--after", type=int, default=None, help="sequential calls after each burst")
    parser.add_argument("--out", type=Path, default=c.RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.bursts is None:
        args.bursts = [20, 50] if args.quick else [20, 50, 200, 2000]
    if args.threads is None:
        args.threads = [8] if args.quick else [8, 16, 32, 64]
    if args.throughput is None:  # the largest default burst, when it is run
        args.throughput = [n for n in args.bursts if n >= 2000][-1:]
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.warm is None:
        args.warm = 10 if args.quick else 30
    if args.after is None:
        args.after = 5 if args.quick else 20
    return args


def _quiet() -> None:
    for name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy", "llm_resilience", "asyncio"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    _quiet()
    llm_resilience.Resilience().warm_up()  # litellm's lazy imports, before any contestant is timed
    rows: list[Row] = []
    with provider_process(LATENCY_S["big"]) as big_url, provider_process(LATENCY_S["small"]) as small_url:
        urls = {"big": big_url, "small": small_url}
        gc.collect()
        gc.freeze()  # litellm's import-time heap: a full collection of it would stall one contestant
        for n in args.bursts:
            for make in CONTESTANTS:
                print(f"  {n} acompletion: {make.__name__} ...", file=sys.stderr, flush=True)
                rows.append(asyncio.run(async_row(make(urls), n, args.warm, args.after)))
                c.write_text(args.out / "burst.md", report(rows, args))  # a killed run keeps its rows
        for n in args.throughput:
            for make in (OursNoDeadline, Bare):
                if make is Bare and any(
                    r.n == n and r.shape == "acompletion" and r.contestant == Bare.name for r in rows
                ):
                    continue  # measured in the bursts above
                print(f"  {n} acompletion (throughput): {make.__name__} ...", file=sys.stderr, flush=True)
                rows.append(asyncio.run(async_row(make(urls), n, args.warm, args.after)))
                c.write_text(args.out / "burst.md", report(rows, args))
        for n in args.threads:
            for round_ in range(1, args.rounds + 1):
                for make in CONTESTANTS:
                    print(f"  {n} threads, round {round_}: {make.__name__} ...", file=sys.stderr, flush=True)
                    row = thread_row(make(urls), n, args.warm, args.after)
                    row.round = round_ if args.rounds > 1 else None
                    rows.append(row)
                    c.write_text(args.out / "burst.md", report(rows, args))
    text = report(rows, args)
    c.write_text(args.out / "burst.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
