"""Replay the incident (a latency spike, not an error storm) against eight ways of calling an LLM.

Two loopback fake providers, reached through litellm's real HTTP path:

* ``primary`` answers in ~60 ms (lognormal), then spikes to ~1.2 s for a while, then recovers;
* ``fast`` answers in ~40 ms throughout.

That is the production incident (600 ms -> 12 s) time-scaled x0.1. Every system gets the same
open-loop request schedule (Poisson arrivals, fixed seed: a slow system does not get fewer
requests, which is what a closed loop of workers would hide) and its own fresh providers, breakers
and router, whose latencies are drawn from generators seeded identically. Systems run one after
another in one process, so they never compete for the CPU.

Run ``make bench`` or ``.venv/bin/python benchmarks/incident.py [--quick]``; see
``benchmarks/README.md`` for what each system is and how to read the table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import math
import random
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import _common as c  # first: sets litellm's offline switches before anything imports it
import litellm
from litellm.router import Router

import llm_resilience
from llm_resilience import AttemptRecord, Hook, Policy, Resilience
from llm_resilience.testing import Behavior, FakeProvider, scripted_provider_process

# ---------------------------------------------------------------------------
# The scenario


@dataclass(frozen=True)
class Scenario:
    """Every number of the replay, in (time-scaled) seconds."""

    healthy_s: float = 6.0
    spike_s: float = 10.0
    recovery_s: float = 8.0
    rate_per_s: float = 20.0
    primary_s: float = 0.060
    spike_latency_s: float = 1.2
    fast_s: float = 0.040
    sigma: float = 0.3
    """Lognormal shape: median x exp(sigma x N(0, 1)); 0.3 puts p99 at ~2x the median."""
    timeout_s: float = 0.3
    """The static per-attempt timeout of (b), (d) and (e)."""
    fail_max: int = 3
    reset_s: float = 3.0
    """Breaker reset timeout of (e)-(g), and the Router's cooldown_time."""
    soft_percentile: float = 99.0
    """The slow-call bound of (f) and (g): p99, while (g) hedges at p95 (see ``engine_policy``)."""
    soft_floor_s: float = 0.1
    soft_ceiling_s: float = 0.5
    soft_warmup_s: float = 0.5
    adaptive_timeout_s: float = 2.0
    """The hard per-attempt timeout of (f) and (g), above which the soft timeout adapts."""
    generous_timeout_s: float = 30.0
    seed: int = 2024

    @property
    def spike_start(self) -> float:
        return self.healthy_s

    @property
    def spike_end(self) -> float:
        return self.healthy_s + self.spike_s

    @property
    def total_s(self) -> float:
        return self.healthy_s + self.spike_s + self.recovery_s

    def in_spike(self, t: float) -> bool:
        return self.spike_start <= t < self.spike_end

    @property
    def return_bound_s(self) -> float:
        """Target for traffic back on the primary: reset timeout + one probe (at most the soft ceiling)."""
        return self.reset_s + self.soft_ceiling_s


DEFAULT = Scenario()
# ~40 s: shorter phases, and the reset/cooldown shortened for every system alike so that the
# return to the primary still fits in the recovery phase.
QUICK = replace(DEFAULT, healthy_s=1.0, spike_s=1.2, recovery_s=1.6, reset_s=0.8)

WIRE_MODEL = {"primary": "primary-model", "fast": "fast-model"}
MODEL_OF_WIRE = {wire: name for name, wire in WIRE_MODEL.items()}
API_KEY = {"primary": "sk-bench-primary", "fast": "sk-bench-fast"}

# USD per token (input, output): list prices of a gpt-4o-class primary and a gpt-4o-mini-class fast model.
PRICE = {"primary": (2.50e-6, 10.00e-6), "fast": (0.15e-6, 0.60e-6)}

_FILLER = (
    "Quarterly report, support queue: ticket volume rose in the first weeks, fell after the "
    "self-service page shipped, and the backlog of escalations is now under the agreed target. "
)
MESSAGES: list[dict[str, str]] = [
    {"role": "system", "content": "You summarise internal reports in three sentences."},
    {"role": "user", "content": "Summarise this report:\n" + _FILLER * 9},
]
ANSWER = ("Ticket volume peaked early and fell after self-service shipped; escalations are under target. " * 6).strip()
# The fake provider's usage: characters / 4 (see FakeProvider); every system sends the same prompt.
PROMPT_TOKENS = max(1, sum(len(m["content"]) for m in MESSAGES) // 4)
COMPLETION_TOKENS = max(1, len(ANSWER) // 4)


def request_cost(model: str) -> float:
    """USD for one request, billed in full (a provider bills a generation the client abandoned)."""
    price_in, price_out = PRICE[model]
    return PROMPT_TOKENS * price_in + COMPLETION_TOKENS * price_out


def arrival_schedule(scn: Scenario) -> list[float]:
    """Open-loop Poisson arrivals over the whole run, seconds from its start (same for every system)."""
    rng = random.Random(scn.seed)
    out: list[float] = []
    t = rng.expovariate(scn.rate_per_s)
    while t < scn.total_s:
        out.append(t)
        t += rng.expovariate(scn.rate_per_s)
    return out


class LatencyScript:
    """Latency of each request, drawn when it reaches the provider, from the phase it arrives in.

    Before ``t0`` (warm-up) the primary is healthy. Each model has its own generator, seeded the
    same way for every system.
    """

    def __init__(self, scn: Scenario) -> None:
        self.scn = scn
        self.t0 = math.inf
        self._rng = {name: random.Random(f"{scn.seed}-{name}") for name in WIRE_MODEL}
        self._lock = threading.Lock()  # the provider's handler threads draw concurrently

    def _draw(self, model: str, median_s: float) -> float:
        with self._lock:
            z = self._rng[model].gauss(0.0, 1.0)
        return median_s * math.exp(self.scn.sigma * z)

    def primary(self) -> float:
        sick = self.scn.in_spike(time.monotonic() - self.t0)
        return self._draw("primary", self.scn.spike_latency_s if sick else self.scn.primary_s)

    def fast(self) -> float:
        return self._draw("fast", self.scn.fast_s)


# ---------------------------------------------------------------------------
# The systems


def litellm_kwargs(model: str, urls: dict[str, str]) -> dict[str, Any]:
    """What a hand-written caller passes to ``litellm.acompletion``: exactly one request per call."""
    return {
        "model": f"openai/{WIRE_MODEL[model]}",
        "api_base": urls[model],
        "api_key": API_KEY[model],
        "num_retries": 0,
        "max_retries": 0,
    }


class System:
    """One way of calling the LLM. ``call`` returns the model that answered, or raises."""

    def __init__(self, scn: Scenario, urls: dict[str, str]) -> None:
        self.scn = scn
        self.urls = urls

    async def warm_up(self) -> None:
        """Pay first-call costs (client creation, connections) for every model, before the clock starts."""
        for model in WIRE_MODEL:
            await litellm.acompletion(messages=MESSAGES, timeout=self.scn.generous_timeout_s, **self._kw(model))

    def reset(self) -> None:
        """Forget what the warm-up counted."""

    async def call(self) -> str:
        raise NotImplementedError

    def _kw(self, model: str) -> dict[str, Any]:
        return litellm_kwargs(model, self.urls)


class SingleModel(System):
    """(a) The primary alone, with a generous timeout."""

    async def call(self) -> str:
        await litellm.acompletion(messages=MESSAGES, timeout=self.scn.generous_timeout_s, **self._kw("primary"))
        return "primary"


class NaiveRetry(System):
    """(b) The primary again on any exception, with the same per-attempt timeout as (d) and (e)."""

    attempts = 4  # the first try and 3 retries

    async def call(self) -> str:
        for attempt in range(self.attempts):
            try:
                await litellm.acompletion(messages=MESSAGES, timeout=self.scn.timeout_s, **self._kw("primary"))
                return "primary"
            except Exception:
                if attempt == self.attempts - 1:
                    raise
        raise AssertionError("unreachable")


class TryExcept(System):
    """(c) The loop from the incident review: no timeout, so a slow answer is never an exception."""

    async def call(self) -> str:
        try:
            await litellm.acompletion(messages=MESSAGES, **self._kw("primary"))
            return "primary"
        except Exception:
            await litellm.acompletion(messages=MESSAGES, **self._kw("fast"))
            return "fast"


class LiteLLMRouter(System):
    """(d) ``litellm.Router`` with a fallback group, a timeout and cooldowns, retries off.

    ``allowed_fails=fail_max-1``: the Router cools a deployment down when its failures in the
    window *exceed* ``allowed_fails``, so the cooldown starts at the same failure that opens our
    breaker. ``cooldown_time`` equals our reset timeout.
    """

    def __init__(self, scn: Scenario, urls: dict[str, str]) -> None:
        super().__init__(scn, urls)
        model_list = [
            {
                "model_name": name,
                "litellm_params": {
                    "model": f"openai/{WIRE_MODEL[name]}",
                    "api_base": urls[name],
                    "api_key": API_KEY[name],
                },
            }
            for name in WIRE_MODEL
        ]
        self.router = Router(
            model_list=model_list,
            fallbacks=[{"primary": ["fast"]}],
            timeout=scn.timeout_s,
            allowed_fails=scn.fail_max - 1,
            cooldown_time=scn.reset_s,
            num_retries=0,
        )

    async def warm_up(self) -> None:
        for model in WIRE_MODEL:
            await self.router.acompletion(model=model, messages=MESSAGES)

    async def call(self) -> str:
        response = await self.router.acompletion(model="primary", messages=MESSAGES)
        return MODEL_OF_WIRE[str(response.model).removeprefix("openai/")]


class AttemptLog(Hook):
    """Keeps every attempt record and breaker opening of an engine."""

    def __init__(self) -> None:
        self.records: list[AttemptRecord] = []
        self.opens: list[tuple[float, str]] = []

    def attempt_ended(self, call: Any, record: AttemptRecord, response: Any) -> None:
        self.records.append(record)

    def breaker_transition(self, model: str, old: str, new: str) -> None:
        if new == "open":
            self.opens.append((time.monotonic(), model))

    def clear(self) -> None:
        self.records.clear()
        self.opens.clear()


class LLMResilience(System):
    """(e), (f), (g): llm-resilience with one of three policies: ``static``, ``adaptive`` or ``hedged``."""

    def __init__(self, scn: Scenario, urls: dict[str, str], kind: str) -> None:
        super().__init__(scn, urls)
        self.log = AttemptLog()
        self.policy = engine_policy(scn, urls, kind)
        self.engine = Resilience(Policy.from_dict(self.policy), hooks=[self.log])

    async def warm_up(self) -> None:
        for model in WIRE_MODEL:  # a model name from `models:` is a one-model route
            await self.engine.acompletion(model, MESSAGES)

    def reset(self) -> None:
        self.log.clear()

    async def call(self) -> str:
        response = await self.engine.acompletion("chat", MESSAGES)
        return str(response._hidden_params["llm_resilience"]["model"])


class Oracle(System):
    """(h) Always the fast model: the best any router could do in this incident."""

    async def call(self) -> str:
        await litellm.acompletion(messages=MESSAGES, timeout=self.scn.generous_timeout_s, **self._kw("fast"))
        return "fast"


def engine_policy(scn: Scenario, urls: dict[str, str], kind: str) -> dict[str, Any]:
    """The YAML policy of (e), (f) or (g), as a dict."""
    models = {
        name: {
            "litellm_params": {"model": f"openai/{WIRE_MODEL[name]}", "api_base": urls[name], "api_key": API_KEY[name]},
            "input_cost_per_token": PRICE[name][0],
            "output_cost_per_token": PRICE[name][1],
        }
        for name in WIRE_MODEL
    }
    route: dict[str, Any] = {"chain": ["primary", "fast"]}
    if kind == "static":
        klass: dict[str, Any] = {"timeout_s": scn.timeout_s, "deadline_s": 3 * scn.timeout_s}
    else:
        klass = {
            "timeout_s": scn.adaptive_timeout_s,
            "deadline_s": 1.5 * scn.adaptive_timeout_s,
            # The soft timeout is the breaker's slow-call verdict; the hedge threshold only buys a
            # spare request. At p95, 1 healthy call in 20 is "slow" (and a client-side stall makes
            # several slow at once), so a healthy model's breaker may open; p99 (~120 ms here vs
            # ~100 ms) keeps that rare and still judges a spike at once. 1.5 x p95 (~160 ms) was
            # tried and is worse: it falls after the hedge usually answers, so cancelled primaries
            # and probes go unjudged (benchmarks/README.md). Hedging stays at p95: a hedge is
            # cheap, an open breaker is not.
            "soft_timeout": {
                "percentile": scn.soft_percentile,
                "warmup_s": scn.soft_warmup_s,
                "floor_s": scn.soft_floor_s,
                "ceiling_s": scn.soft_ceiling_s,
            },
        }
        if kind == "hedged":
            route["hedge"] = {"after": "p95", "max_extra": 1, "budget_ratio": 0.1}
    return {
        "models": models,
        "routes": {"chat": route},
        "prompt_classes": {"default": klass},
        # A fixed open period, as the Router's cooldown_time: the systems are compared on one reset. (The
        # built-in doubles it per failed probe; benchmarks/breaker_reset.py weighs that trade.)
        "breakers": {
            "default": {
                "fail_max": scn.fail_max,
                "reset_timeout_s": scn.reset_s,
                "reset_backoff": {"factor": 1.0, "max_s": scn.reset_s},
            }
        },
    }


@dataclass(frozen=True)
class SystemSpec:
    key: str
    name: str
    build: Callable[[Scenario, dict[str, str]], System]
    extra_kind: str = "fallbacks"
    """What its requests beyond one per call are (hedges are counted separately, from the engine)."""


SYSTEMS: tuple[SystemSpec, ...] = (
    SystemSpec("a", "single model", SingleModel),
    SystemSpec("b", "naive retry x3", NaiveRetry, "retries"),
    SystemSpec("c", "try/except fallback", TryExcept),
    SystemSpec("d", "litellm Router", LiteLLMRouter),
    SystemSpec("e", "llm-resilience static", lambda s, u: LLMResilience(s, u, "static")),
    SystemSpec("f", "llm-resilience adaptive", lambda s, u: LLMResilience(s, u, "adaptive")),
    SystemSpec("g", "llm-resilience adaptive+hedge", lambda s, u: LLMResilience(s, u, "hedged")),
    SystemSpec("h", "oracle (fast model only)", Oracle),
)


# ---------------------------------------------------------------------------
# Running


@dataclass(frozen=True)
class CallResult:
    arrival: float
    """Scheduled send time, seconds from the start of the run."""
    latency: float
    """From the scheduled send time to the answer or the error (a late start counts against the system)."""
    served_by: str | None
    error: str | None = None
    start_lag: float = 0.0
    """How late the call started (event loop busy): part of ``latency``, reported so noise is visible."""

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class Run:
    spec: SystemSpec
    scn: Scenario
    calls: list[CallResult]
    received: dict[str, list[float]]
    """When each request reached each provider, seconds from the start of the run (counted server-side)."""
    engine_log: AttemptLog | None = None
    t0: float = 0.0
    wall_s: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)


async def _timed(system: System, t0: float, arrival: float) -> CallResult:
    lag = time.monotonic() - (t0 + arrival)
    try:
        served = await system.call()
    except Exception as e:
        return CallResult(arrival, time.monotonic() - (t0 + arrival), None, type(e).__name__, lag)
    return CallResult(arrival, time.monotonic() - (t0 + arrival), served, None, lag)


async def run_system(spec: SystemSpec, scn: Scenario, arrivals: Sequence[float], providers: str) -> Run:
    """Fresh providers and a fresh system; warm up; replay the schedule; collect what each side saw.

    ``providers="thread"``: both fake providers serve from threads of this process (the 20 calls/s
    replay). ``"process"``: each runs in its own OS process with the same latency schedule, so that
    at 100-200 calls/s the providers' threads do not take the client's CPU and GIL.
    """
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        if providers == "process":
            handles = {
                name: stack.enter_context(
                    scripted_provider_process(
                        scn.primary_s if name == "primary" else scn.fast_s,
                        sigma=scn.sigma,
                        seed=f"{scn.seed}-{name}",
                        phases=[(scn.spike_start, scn.spike_end, scn.spike_latency_s)] if name == "primary" else [],
                        args=["--content", ANSWER],
                    )
                )
                for name in WIRE_MODEL
            }
            urls = {name: h.base_url for name, h in handles.items()}
        else:
            script = LatencyScript(scn)
            fakes = {
                "primary": FakeProvider(behavior=Behavior(latency_fn=script.primary, content=ANSWER)).start(),
                "fast": FakeProvider(behavior=Behavior(latency_fn=script.fast, content=ANSWER)).start(),
            }
            for fake in fakes.values():
                stack.callback(fake.stop)
            urls = {name: p.base_url for name, p in fakes.items()}
        system = spec.build(scn, urls)
        await system.warm_up()
        t0 = time.monotonic() + 0.05
        if providers == "process":
            for h in handles.values():
                await asyncio.to_thread(h.start, t0)  # waits until the warm-up's requests are done
        else:
            for fake in fakes.values():
                await fake.wait_idle_async(5.0)
                fake.reset()
            script.t0 = t0
        system.reset()
        tasks: list[asyncio.Task[CallResult]] = []
        for arrival in arrivals:
            delay = t0 + arrival - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_timed(system, t0, arrival)))
        calls = list(await asyncio.gather(*tasks))
        if providers == "process":
            received = {name: await asyncio.to_thread(h.received) for name, h in handles.items()}
        else:
            for fake in fakes.values():
                await fake.wait_idle_async(5.0)
            received = {name: [r.received_at - t0 for r in fake.requests] for name, fake in fakes.items()}
    return Run(
        spec=spec,
        scn=scn,
        calls=calls,
        received=received,
        engine_log=system.log if isinstance(system, LLMResilience) else None,
        t0=t0,
        wall_s=time.monotonic() - started,
    )


async def warm_process(scn: Scenario) -> None:
    """Exercise every failure path once, on throwaway providers and instances, before any system runs.

    litellm's first call, its first timeout, the Router's first fallback and cooldown, and the
    engine's first fallback, breaker opening and hedge each import modules lazily (up to ~0.7 s
    with the event loop blocked). A long-running process pays that once; here it would land in
    whichever system hits the path first, so it is paid up front, for all of them.
    """
    hang = FakeProvider(behavior=Behavior(body="hang")).start()
    ok = FakeProvider(behavior=Behavior.ok(ANSWER)).start()
    urls = {"primary": hang.base_url, "fast": ok.base_url}
    quick = replace(scn, timeout_s=0.05, soft_warmup_s=0.05, soft_floor_s=0.01, fail_max=1, reset_s=60.0)
    try:
        with contextlib.suppress(Exception):
            await litellm.acompletion(messages=MESSAGES, timeout=0.05, **litellm_kwargs("primary", urls))
        await litellm.acompletion(messages=MESSAGES, timeout=5.0, **litellm_kwargs("fast", urls))
        for system in (
            LiteLLMRouter(quick, urls),
            LLMResilience(quick, urls, "static"),
            LLMResilience(quick, urls, "adaptive"),
            LLMResilience(quick, urls, "hedged"),
        ):
            for _ in range(2):  # the first falls back and trips the breaker/cooldown, the second skips
                with contextlib.suppress(Exception):
                    await system.call()
    finally:
        hang.stop()
        ok.stop()


# ---------------------------------------------------------------------------
# Metrics


def compute_metrics(run: Run) -> dict[str, Any]:
    scn = run.scn
    calls = run.calls
    spike = [r for r in calls if scn.in_spike(r.arrival)]
    all_lat = [r.latency for r in calls]
    spike_lat = [r.latency for r in spike]
    total_requests = sum(len(v) for v in run.received.values())
    m: dict[str, Any] = {
        "calls": len(calls),
        "success": sum(r.ok for r in calls) / len(calls) if calls else math.nan,
        "p50": c.percentile(all_lat, 50),
        "p95": c.percentile(all_lat, 95),
        "p99": c.percentile(all_lat, 99),
        "spike_calls": len(spike),
        "spike_p50": c.percentile(spike_lat, 50),
        "spike_p95": c.percentile(spike_lat, 95),
        "spike_p99": c.percentile(spike_lat, 99),
        "sick_primary": sum(1 for t in run.received["primary"] if scn.in_spike(t)),
        "requests": {name: len(v) for name, v in run.received.items()},
        "extra": total_requests - len(calls),
        "start_lag": max((r.start_lag for r in calls), default=0.0),
        "cost_per_1k": 1000 * sum(request_cost(name) * len(v) for name, v in run.received.items()) / len(calls)
        if calls
        else math.nan,
    }
    log = run.engine_log
    if log is not None:
        sent = [r for r in log.records if r.outcome != "skipped"]
        m["hedges"] = sum(1 for r in sent if r.hedged)
        m["probes_in_spike"] = sum(
            1 for r in sent if r.model == "primary" and r.extra.get("probe") and scn.in_spike(r.started_at - run.t0)
        )
        m["soft_timeouts"] = sum(1 for r in sent if r.reason == "soft_timeout")
        m["timeouts"] = sum(1 for r in sent if r.reason == "timeout")
        m["cancelled"] = sum(1 for r in sent if r.outcome == "cancelled")
        m["breaker_opens"] = sum(1 for _, model in log.opens if model == "primary")
        healthy = [r for r in sent if r.model == "primary" and r.started_at - run.t0 < scn.spike_start]
        m["timeout_healthy"] = [r.timeout_s for r in healthy if r.timeout_s is not None]
        m["hedge_after_healthy"] = [float(r.extra["hedge_after_s"]) for r in healthy if "hedge_after_s" in r.extra]
        m["hedges_refused"] = sum(1 for r in sent if r.extra.get("hedge_skipped") == "budget")
        m["soft_healthy"] = [float(r.extra["soft_timeout_s"]) for r in healthy if "soft_timeout_s" in r.extra]
        # What no rule that waits for one request to pass the soft timeout can avoid: every call sent
        # between the spike's start and one soft timeout later (plus the half-open probes).
        window = c.median(m["soft_healthy"]) if m["soft_healthy"] else scn.timeout_s
        m["floor_window_s"] = window
        m["floor"] = (
            sum(1 for r in calls if scn.spike_start <= r.arrival < scn.spike_start + window) + m["probes_in_spike"]
        )
    m.update(_return_to_primary(run))
    return m


def _return_to_primary(run: Run) -> dict[str, Any]:
    """When traffic came back to the primary: the first call sent after recovery that it answered."""
    scn = run.scn
    spike = [r for r in run.calls if scn.in_spike(r.arrival)]
    if not any(r.served_by == "primary" for r in run.calls):
        return {"back_s": None, "back": "never on primary"}
    if not any(r.served_by not in (None, "primary") for r in spike):
        return {"back_s": None, "back": "never left"}
    for r in run.calls:
        if r.arrival >= scn.spike_end and r.served_by == "primary":
            back = r.arrival - scn.spike_end
            return {"back_s": back, "back": f"{back:.2f} s"}
    return {"back_s": math.inf, "back": f"not within {scn.recovery_s:g} s"}


def _extra_text(spec: SystemSpec, m: dict[str, Any]) -> str:
    # Counted server-side: an attempt whose timeout fired before it reached the provider is not one.
    extra = m["extra"]
    if extra < 0:  # the event loop was so late that timeouts fired before requests were sent
        return f"{extra} (timed out unsent)"
    if extra == 0:
        return "0"
    hedges = min(m.get("hedges", 0), extra)
    parts = [f"{hedges} hedges"] if hedges else []
    if extra - hedges:
        parts.append(f"{extra - hedges} {spec.extra_kind}")
    return f"{extra} ({', '.join(parts)})"


def results_table(runs: Sequence[Run]) -> str:
    headers = [
        "system", "success", "p50 ms", "p95 ms", "p99 ms", "spike p50", "spike p95", "spike p99",
        "to sick primary", "extra requests", "back on primary", "$ / 1k calls",
    ]  # fmt: skip
    rows = []
    for run in runs:
        m = run.metrics
        rows.append(
            [
                f"({run.spec.key}) {run.spec.name}",
                f"{100 * m['success']:.1f} %",
                c.fmt_ms(m["p50"]),
                c.fmt_ms(m["p95"]),
                c.fmt_ms(m["p99"]),
                c.fmt_ms(m["spike_p50"]),
                c.fmt_ms(m["spike_p95"]),
                c.fmt_ms(m["spike_p99"]),
                str(m["sick_primary"]),
                _extra_text(run.spec, m),
                m["back"],
                f"{m['cost_per_1k']:.3f}",
            ]
        )
    return c.markdown_table(headers, rows, "lrrrrrrrrrlr")


def _spread(values: Sequence[float]) -> str:
    if not values:
        return "—"
    return f"{c.fmt_ms(min(values))} / {c.fmt_ms(c.median(values))} / {c.fmt_ms(max(values))}"


def internals_table(runs: Sequence[Run]) -> str:
    headers = [
        "system", "primary attempt timeout, healthy (min / median / max ms)", "hedge after, healthy (ms)",
        "soft timeouts", "hard timeouts", "hedges", "hedges refused (budget)", "cancelled",
        "breaker opens (primary)", "probes during spike",
    ]  # fmt: skip
    rows = []
    for run in runs:
        m = run.metrics
        if run.engine_log is None:
            continue
        rows.append(
            [
                f"({run.spec.key}) {run.spec.name}",
                _spread(m["timeout_healthy"]),
                _spread(m["hedge_after_healthy"]),
                m["soft_timeouts"],
                m["timeouts"],
                m["hedges"],
                m["hedges_refused"],
                m["cancelled"],
                m["breaker_opens"],
                m["probes_in_spike"],
            ]
        )
    return c.markdown_table(headers, rows, "lrrrrrrrrr")


@dataclass(frozen=True)
class Target:
    name: str
    measured: str
    limit: str
    passed: bool


def check_targets(runs: Sequence[Run]) -> list[Target]:
    """The issue's targets for (g), against (d) and (h); empty when one of them did not run."""
    by_key = {run.spec.key: run for run in runs}
    if not all(k in by_key for k in "dgh"):
        return []
    g, d, h = by_key["g"].metrics, by_key["d"].metrics, by_key["h"].metrics
    scn = by_key["g"].scn
    targets = [
        Target(
            "(g) spike p99 within 2.5x the oracle's",
            f"{c.fmt_ms(g['spike_p99'])} ms (oracle {c.fmt_ms(h['spike_p99'])} ms)",
            f"<= {c.fmt_ms(2.5 * h['spike_p99'])} ms",
            g["spike_p99"] <= 2.5 * h["spike_p99"],
        )
    ]
    ratio = d["spike_p99"] / g["spike_p99"] if g["spike_p99"] > 0 else math.nan
    targets.append(
        Target(
            "(g) spike p99 at least 3x better than (d)",
            f"{ratio:.2f}x ((d) {c.fmt_ms(d['spike_p99'])} ms)",
            ">= 3.00x",
            ratio >= 3.0,
        )
    )
    concurrent = scn.rate_per_s > DEFAULT.rate_per_s
    limit = scn.fail_max + g["probes_in_spike"] + (2 if concurrent else 0)  # issue 13 allows 2 more at 200/s
    targets.append(
        Target(
            "(g) requests to the sick primary <= fail_max + half-open probes" + (" + 2" if concurrent else ""),
            str(g["sick_primary"]),
            f"<= {limit} ({scn.fail_max} + {g['probes_in_spike']} probes{' + 2' if concurrent else ''})",
            g["sick_primary"] <= limit,
        )
    )
    if concurrent:
        targets.append(
            Target(
                "(g) requests to the sick primary <= calls sent within one soft timeout of the spike + probes",
                str(g["sick_primary"]),
                f"<= {g['floor']} (soft timeout {c.fmt_ms(g['floor_window_s'])} ms)",
                g["sick_primary"] <= g["floor"],
            )
        )
    share = g["hedges"] / g["calls"] if g["calls"] else math.nan
    targets.append(
        Target(
            "(g) hedge extra requests <= 5 % of all requests",
            f"{100 * share:.1f} % ({g['hedges']} of {g['calls']})",
            "<= 5.0 %",
            share <= 0.05,
        )
    )
    back = g["back_s"]
    targets.append(
        Target(
            "(g) traffic back on the primary within reset_timeout + one probe",
            g["back"],
            f"<= {scn.return_bound_s:.2f} s ({scn.reset_s:g} s + {scn.soft_ceiling_s:g} s)",
            back is not None and back <= scn.return_bound_s,
        )
    )
    return targets


def targets_table(targets: Sequence[Target]) -> str:
    rows = [[t.name, t.measured, t.limit, "PASS" if t.passed else "**FAIL**"] for t in targets]
    return c.markdown_table(["target", "measured", "limit", "result"], rows, "lrrc")


# ---------------------------------------------------------------------------
# Output


def plot(runs: Sequence[Run], path: Path) -> None:
    """Latency of every call over time, one panel per system, the spike shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    scn = runs[0].scn
    fig, axes = plt.subplots(
        len(runs), 1, figsize=(10, 1.45 * len(runs) + 1.0), sharex=True, sharey=True, squeeze=False
    )
    colors = {"primary": "tab:blue", "fast": "tab:orange"}
    for ax, run in zip(axes[:, 0], runs, strict=True):
        ax.axvspan(scn.spike_start, scn.spike_end, color="tab:red", alpha=0.10, linewidth=0)
        for model, color in colors.items():
            pts = [(r.arrival, 1000 * r.latency) for r in run.calls if r.served_by == model]
            if pts:
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=5, color=color, linewidths=0)
        failed = [(r.arrival, 1000 * r.latency) for r in run.calls if not r.ok]
        if failed:
            ax.scatter([p[0] for p in failed], [p[1] for p in failed], s=14, color="tab:red", marker="x")
        ax.set_yscale("log")
        ax.set_title(f"({run.spec.key}) {run.spec.name}", loc="left", fontsize=9)
        ax.set_ylabel("ms", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, which="major", axis="y", alpha=0.3)
    axes[-1, 0].set_xlabel("request sent at (s since start; the incident time-scaled x0.1)", fontsize=8)
    legend = [
        Patch(color="tab:red", alpha=0.10, label="primary spike"),
        Line2D([], [], marker="o", linestyle="", color="tab:blue", markersize=4, label="answered by primary"),
        Line2D([], [], marker="o", linestyle="", color="tab:orange", markersize=4, label="answered by fast model"),
        Line2D([], [], marker="x", linestyle="", color="tab:red", markersize=5, label="failed"),
    ]
    fig.legend(handles=legend, loc="upper center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def describe(scn: Scenario, n_calls: int) -> str:
    return (
        f"Primary ~{scn.primary_s * 1000:.0f} ms, spiking to ~{scn.spike_latency_s * 1000:.0f} ms from "
        f"t={scn.spike_start:g} s to t={scn.spike_end:g} s, healthy again until t={scn.total_s:g} s; fast model "
        f"~{scn.fast_s * 1000:.0f} ms (lognormal medians, sigma {scn.sigma:g}). {n_calls} calls per system, "
        f"open-loop Poisson arrivals at {scn.rate_per_s:g}/s, seed {scn.seed}. Static timeout "
        f"{scn.timeout_s:g} s; breakers fail_max {scn.fail_max}, reset {scn.reset_s:g} s, not lengthened after a "
        f"failed probe (Router: "
        f"allowed_fails {scn.fail_max - 1}, cooldown_time {scn.reset_s:g} s); soft timeout "
        f"p{scn.soft_percentile:g} ((g) hedges at p95), floor {scn.soft_floor_s:g} s, ceiling "
        f"{scn.soft_ceiling_s:g} s, warm-up {scn.soft_warmup_s:g} s. Prices "
        f"(USD per 1M tokens, in/out): primary {PRICE['primary'][0] * 1e6:g}/{PRICE['primary'][1] * 1e6:g}, fast "
        f"{PRICE['fast'][0] * 1e6:g}/{PRICE['fast'][1] * 1e6:g}; {PROMPT_TOKENS} prompt + {COMPLETION_TOKENS} "
        "completion tokens per request, every request a provider received billed in full."
    )


READING = """\
- **success**: calls that returned an answer. **p50/p95/p99**: milliseconds from the scheduled send
  time to the answer (or the error), over all calls; **spike** columns: calls sent during the spike.
- **to sick primary**: requests the primary provider received during the spike (counted server-side).
- **extra requests**: requests the providers received beyond one per call (fallbacks after a failed
  attempt, retries, hedges).
- **back on primary**: seconds from the end of the spike to the first call the primary answered again;
  "never left": the system kept sending everything to the primary.
- **$ / 1k calls**: estimated provider bill per 1,000 calls at the prices above.
"""


def report(runs: Sequence[Run], targets: Sequence[Target], providers: str, stem: str = "incident") -> str:
    scn = runs[0].scn
    where = (
        "Each fake provider runs in its own OS process (`scripted_provider_process`)."
        if providers == "process"
        else "The fake providers serve from threads of the benchmark's own process."
    )
    parts = [
        "# Incident replay: a latency spike on the primary model",
        "",
        f"`{c.command_line()}` — {c.environment_line()}.",
        "",
        describe(scn, runs[0].metrics["calls"]) + " " + where + f" Load average at the end: {c.load_average()}.",
        "",
        results_table(runs),
        "",
        READING,
        "Latest call start per system (event loop busy; counted in latency): "
        + ", ".join(f"({r.spec.key}) {c.fmt_ms(r.metrics['start_lag'])} ms" for r in runs)
        + ".",
        "",
    ]
    internals = internals_table(runs)
    if internals.count("\n") > 1:
        parts += ["## Inside llm-resilience", "", internals, ""]
    if targets:
        parts += ["## Targets", "", targets_table(targets), ""]
    parts += [f"![latency over time per system]({stem}.png)", ""]
    return "\n".join(parts)


def write_attempts(runs: Sequence[Run], path: Path) -> None:
    """Every attempt record (skips too) of the engine systems, times in seconds from the run's start.

    For reading why a model got the requests it got: ``t`` when the attempt started (or was
    skipped), ``end`` when it settled, and the decisions recorded in ``extra`` (``suspect``,
    ``slow``, ``probe``, ``client_overload``, ...). Breaker openings are lines with ``"open"``.
    """
    lines = []
    for run in runs:
        log = run.engine_log
        if log is None:
            continue
        for r in sorted(log.records, key=lambda r: r.started_at):
            extra = {k: v for k, v in r.extra.items() if isinstance(v, str | int | float | bool)}
            row = {
                "system": run.spec.key, "t": round(r.started_at - run.t0, 4),
                "end": round(r.started_at + r.latency_s - run.t0, 4), "model": r.model,
                "outcome": r.outcome, "reason": r.reason, "hedged": r.hedged,
                "state": r.breaker_state, "transitions": r.breaker_transitions, **extra,
            }  # fmt: skip
            lines.append(json.dumps(row))
        lines += [json.dumps({"system": run.spec.key, "t": round(at - run.t0, 4), "open": m}) for at, m in log.opens]
    c.write_text(path, "\n".join(lines) + "\n")


def _quiet() -> None:
    # The Router logs every fallback and cooldown at ERROR/WARNING: right in production, noise here.
    for name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy", "llm_resilience", "asyncio"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore")


async def run_all(scn: Scenario, keys: str, providers: str) -> list[Run]:
    arrivals = arrival_schedule(scn)
    await warm_process(scn)
    # litellm leaves ~400k objects on the heap; one full collection of them stalls the event loop
    # for ~0.5 s, in whichever system happens to trigger it. Freeze them out of the collector.
    gc.collect()
    gc.freeze()
    runs = []
    for spec in SYSTEMS:
        if spec.key not in keys:
            continue
        gc.collect()  # the previous system's garbage is not this one's to collect
        print(f"  ({spec.key}) {spec.name} ...", end="", file=sys.stderr, flush=True)
        run = await run_system(spec, scn, arrivals, providers)
        run.metrics = compute_metrics(run)
        lag = max((r.start_lag for r in run.calls), default=0.0)
        print(
            f" {run.wall_s:.1f} s (latest call start {lag * 1000:.0f} ms late; load {c.load_average()})",
            file=sys.stderr, flush=True,
        )  # fmt: skip
        runs.append(run)
    return runs


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="short phases and a 1 s reset (~40 s instead of ~3.5 min)")
    p.add_argument("--healthy-s", type=float, help="healthy phase before the spike, seconds")
    p.add_argument("--spike-s", type=float, help="spike duration, seconds")
    p.add_argument("--recovery-s", type=float, help="healthy phase after the spike, seconds")
    p.add_argument("--reset-s", type=float, help="breaker reset timeout and Router cooldown_time, seconds")
    p.add_argument("--rate", type=float, help="arrivals per second")
    p.add_argument("--seed", type=int)
    p.add_argument("--systems", default="abcdefgh", help="which systems to run, e.g. 'dgh' (default: all)")
    p.add_argument("--out", type=Path, default=c.RESULTS_DIR, help="directory for incident.md and incident.png")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--attempts", type=Path, help="also write every attempt record of (e)-(g) here, one JSON line each")
    p.add_argument(
        "--providers", choices=("thread", "process", "auto"), default="auto",
        help="fake providers as threads of this process or each in its own process "
        "(auto: threads at <= 20 calls/s, as the published 20 calls/s table, processes above)",
    )  # fmt: skip
    return p.parse_args(argv)


def scenario_from(args: argparse.Namespace) -> Scenario:
    scn = QUICK if args.quick else DEFAULT
    overrides = {
        "healthy_s": args.healthy_s,
        "spike_s": args.spike_s,
        "recovery_s": args.recovery_s,
        "reset_s": args.reset_s,
        "rate_per_s": args.rate,
        "seed": args.seed,
    }
    return replace(scn, **{k: v for k, v in overrides.items() if v is not None})


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    scn = scenario_from(args)
    unknown = set(args.systems) - {s.key for s in SYSTEMS}
    if unknown:
        print(f"unknown system(s): {', '.join(sorted(unknown))} (expected letters a-h)", file=sys.stderr)
        return 2
    _quiet()
    version = llm_resilience.__version__
    print(f"incident replay, {scn.total_s:g} s per system (llm-resilience {version})", file=sys.stderr)
    providers = args.providers
    if providers == "auto":
        providers = "thread" if scn.rate_per_s <= 20 else "process"
    runs = asyncio.run(run_all(scn, args.systems, providers))
    targets = check_targets(runs)
    # The concurrent variants (--rate 100, 200) get their own files beside the 20 calls/s replay.
    stem = "incident" if scn.rate_per_s == Scenario().rate_per_s else f"incident-{scn.rate_per_s:g}rps"
    text = report(runs, targets, providers, stem)
    c.write_text(args.out / f"{stem}.md", text)
    if not args.no_plot:
        plot(runs, args.out / f"{stem}.png")
    if args.attempts is not None:
        write_attempts(runs, args.attempts / f"{stem}-attempts.jsonl")
    print(text)
    failed = [t for t in targets if not t.passed]
    if failed:
        banner = "!" * 78
        lines = [banner, f"!!  {len(failed)} of {len(targets)} TARGETS MISSED (a measurement: exit status stays 0)"]
        lines += [f"!!  FAIL  {t.name}: {t.measured}, limit {t.limit}" for t in failed]
        print("\n".join([*lines, banner]), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
