"""The first calls of a latency spike, one after another: each should cost one learned bound plus the fallback.

Sequential calls through litellm's real HTTP path, providers in their own processes: ``primary``
answers in ~60 ms (lognormal, sigma 0.3), ``fast`` in 40 ms. Policy: ``timeout_s: 2``,
``deadline_s: 4``, ``soft_timeout: p95``, route hedge ``{after: p95, max_extra: 1}``, breakers
``fail_max: 3``. 40 healthy calls, then the primary goes to 1.2 s; the next calls are timed. Until
its breaker opens, a spike call waits for its hedge threshold (the learned p95 at that moment), then
the fallback answers: the target is ``hedge threshold + fallback latency + 20 ms`` per call, where
the fallback latency is the median of ``fast`` measured beside it. Sync and async calls, several runs
(each with fresh providers and a fresh engine).

Run ``.venv/bin/python benchmarks/spike_calls.py`` (part of ``make bench``); the table lands in
``benchmarks/results/spike-calls.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import _common as c  # first: sets litellm's offline switches before anything imports it
import litellm

import llm_resilience
from llm_resilience import AttemptRecord, Hook, Resilience
from llm_resilience.testing import provider_process, scripted_provider_process

MESSAGES = [{"role": "user", "content": "hello"}]
SPIKE_AT_S = 1000.0  # the primary's schedule: healthy until then (the clock is moved to it after warm-up)
SLACK_S = 0.020


class Records(Hook):
    """The attempt records of the current call."""

    def __init__(self) -> None:
        self.records: list[AttemptRecord] = []

    def attempt_ended(self, call: Any, record: AttemptRecord, response: Any) -> None:
        self.records.append(record)


def policy(primary_url: str, fast_url: str) -> dict[str, Any]:
    def model(wire: str, url: str, key: str) -> dict[str, Any]:
        return {"litellm_params": {"model": f"openai/{wire}", "api_base": url, "api_key": key}}

    return {
        "models": {"primary": model("gpt-4o", primary_url, "sk-p"), "fast": model("gpt-4o-mini", fast_url, "sk-f")},
        "routes": {"chat": {"chain": ["primary", "fast"], "hedge": {"after": "p95", "max_extra": 1}}},
        "prompt_classes": {"default": {"timeout_s": 2, "deadline_s": 4, "soft_timeout": {"percentile": 95}}},
        "breakers": {"default": {"fail_max": 3, "reset_timeout_s": 30}},
    }


def one_run(mode: str, seed: int, warm: int, spike_calls: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    phases = [(SPIKE_AT_S, SPIKE_AT_S + 1000.0, 1.2)]
    with (
        scripted_provider_process(0.060, sigma=0.3, seed=str(seed), phases=phases) as primary,
        provider_process(0.040) as fast_url,
    ):
        records = Records()
        engine = Resilience.from_dict(policy(primary.base_url, fast_url), hooks=[records])
        primary.start()

        async def acall() -> Any:
            return await engine.acompletion("chat", MESSAGES)

        def call() -> Any:
            return engine.completion("chat", MESSAGES) if mode == "sync" else asyncio.run(acall())

        fast_kwargs = {"model": "openai/gpt-4o-mini", "api_base": fast_url, "api_key": "sk-f", "max_retries": 0}
        send_fast: Callable[[], Any] = (
            (lambda: litellm.completion(messages=MESSAGES, **fast_kwargs))
            if mode == "sync"
            else (lambda: asyncio.run(litellm.acompletion(messages=MESSAGES, **fast_kwargs)))
        )
        for _ in range(warm):
            call()
        fast_s = []
        for _ in range(5):  # the fallback's own latency through this client, beside the run
            started = time.perf_counter()
            send_fast()
            fast_s.append(time.perf_counter() - started)
        primary.start(time.monotonic() - SPIKE_AT_S)  # the spike starts now
        for i in range(spike_calls):
            records.records.clear()
            started = time.perf_counter()
            call()
            latency = time.perf_counter() - started
            slow = next((r for r in records.records if r.model == "primary" and r.outcome != "skipped"), None)
            bound = slow.extra.get("hedge_after_s") if slow is not None else None
            rows.append({
                "mode": mode, "seed": seed, "call": i + 1, "latency_s": latency, "hedge_after_s": bound,
                "fast_s": statistics.median(fast_s), "primary_tried": slow is not None,
                "client_delay_s": slow.extra.get("client_delay_s") if slow is not None else None,
            })  # fmt: skip
    return rows


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    headers = [
        "mode", "run", "call", "latency ms", "hedge threshold ms", "fallback ms", "target ms", "over target ms",
        "client delay ms", "within target",
    ]  # fmt: skip
    body = []
    for r in rows:
        if not r["primary_tried"]:
            body.append(
                [r["mode"], r["seed"], r["call"], c.fmt_ms(r["latency_s"]), "— (breaker open)", "", "", "", "", ""]
            )
            continue
        target = (r["hedge_after_s"] or 0.0) + r["fast_s"] + SLACK_S
        over = r["latency_s"] - target
        body.append([
            r["mode"], r["seed"], r["call"], c.fmt_ms(r["latency_s"]), c.fmt_ms(r["hedge_after_s"] or 0.0),
            c.fmt_ms(r["fast_s"]), c.fmt_ms(target), c.fmt_ms(max(0.0, over)),
            "—" if r["client_delay_s"] is None else c.fmt_ms(r["client_delay_s"]), "yes" if over <= 0 else "**no**",
        ])  # fmt: skip
    tried = [r for r in rows if r["primary_tried"]]
    met = sum(1 for r in tried if r["latency_s"] <= (r["hedge_after_s"] or 0.0) + r["fast_s"] + SLACK_S)
    return "\n".join([
        "# The first calls of a latency spike, sequential",
        "",
        f"`{c.command_line()}` — {c.environment_line()}; load average {c.load_average()}.",
        "",
        "Primary ~60 ms (lognormal, sigma 0.3), then 1.2 s; fallback 40 ms; providers in their own processes. "
        "Policy: timeout 2 s, deadline 4 s, soft timeout p95, hedge {after: p95, max_extra: 1}, fail_max 3. "
        f"{args.warm} healthy calls, then the spike. Target per call that tries the primary: its hedge threshold "
        "(the learned p95 when it started) + the fallback's median latency measured beside the run + 20 ms. "
        "Client delay: what the layer measured as the client's own time in the primary's attempt.",
        "",
        c.markdown_table(headers, body, "llrrrrrrrl"),
        "",
        f"**{met} of {len(tried)}** spike calls that tried the primary were within target.",
        "",
    ])  # fmt: skip


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per mode (fresh providers and engine each)")
    parser.add_argument("--modes", nargs="*", default=["sync", "async"])
    parser.add_argument("--warm", type=int, default=40)
    parser.add_argument("--spike-calls", type=int, default=5)
    parser.add_argument("--out", type=Path, default=c.RESULTS_DIR)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for name in ("LiteLLM", "llm_resilience", "asyncio"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore")
    llm_resilience.Resilience().warm_up()  # litellm's lazy imports, before anything is timed
    rows: list[dict[str, Any]] = []
    for mode in args.modes:
        for seed in range(args.runs):
            print(f"  {mode} run {seed} ...", file=sys.stderr, flush=True)
            rows += one_run(mode, seed, args.warm, args.spike_calls)
            c.write_text(args.out / "spike-calls.md", report(rows, args))
    text = report(rows, args)
    c.write_text(args.out / "spike-calls.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
