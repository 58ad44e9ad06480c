"""What llm-resilience costs per call in CPU instructions: repeatable where timings are not.

``overhead.py`` times calls; on a 2-core machine shared with other work its ratios move by a few
percent from run to run, more than the differences it is meant to show. This benchmark counts
instructions instead: it runs the same calls as ``overhead.py`` (one zero-latency fake provider in
its own process, a one-model route) under valgrind's callgrind, which counts every instruction the
process executes, in every thread, whatever else the machine is doing. The garbage collector is
off during the counted calls (its passes land in one phase or another by chance; what the layer
adds to them is measured by ``overhead.py``'s CPU column and the burst benchmarks); the kernel's
work (system calls, thread switches) is not counted either.

Phases, in this order in one process, ``--calls`` calls each, counted separately:

* ``bare litellm, no engine built``: ``litellm.completion`` before any engine registered its
  routes with litellm;
* then four engines are built (tracing off; tracing off plus two bare SDK spans per call; the same
  two spans carrying the attributes of the layer's own call and attempt spans, copied from one
  traced call; tracing on with a ``SimpleSpanProcessor`` and an in-memory exporter), and: ``bare
  litellm`` again (does a built engine make every bare litellm call dearer?), ``llm-resilience,
  tracing off``, ``tracing off + 2 bare SDK spans`` (the SDK's own floor), ``+ 2 SDK spans with the
  layer's attributes`` (the SDK's cost of the span schema itself), ``tracing on``, and the same for
  ``acompletion`` awaited one after another.

Run ``.venv/bin/python benchmarks/instructions.py [--calls N]`` (needs ``valgrind``; ~4 min).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _common as c  # first: sets litellm's offline switches before anything imports it

MESSAGES = [{"role": "user", "content": "Summarise the quarterly report in one sentence."}]
SYNC = ("bare", "off", "floor", "floor_attributes", "on")
IDLE_S = 2.0  # how long each lag probe ticks alone, to count what a tick costs
ASYNC = ("async_bare", "async_on")
LABELS = {
    "bare_no_engine": "bare `litellm.completion`, before any engine was built",
    "bare": "bare `litellm.completion`",
    "off": "llm-resilience, tracing off",
    "floor": "llm-resilience, tracing off + 2 bare SDK spans (the SDK's floor)",
    "floor_attributes": "llm-resilience, tracing off + 2 SDK spans with the layer's attributes",
    "on": "llm-resilience, tracing on",
    "async_bare": "bare `litellm.acompletion`",
    "async_on": "llm-resilience `acompletion`, tracing on",
}


def child(calls: int, ticks_path: Path | None = None) -> None:
    """Run under callgrind: each phase's instructions go to a dump of its own (``callgrind_control -d``).

    ``ticks_path``: where to write the lag probes' ticks per call of each phase (JSON).
    """
    import litellm
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import NoOpTracerProvider

    from llm_resilience import Hook, Policy, Resilience
    from llm_resilience._saturation import monitor
    from llm_resilience.testing import provider_process

    pid = os.getpid()
    ticks: dict[str, float] = {}

    def probe_ticks() -> int:
        lag = monitor()
        return lag.watchdog.samples.added + sum(probe.samples.added for probe in list(lag._loops.values()))

    def control(*args: str) -> None:
        subprocess.run(["callgrind_control", *args, str(pid)], stdout=subprocess.DEVNULL, check=False)
        time.sleep(0.3)  # the request is picked up asynchronously

    loop = asyncio.new_event_loop()

    def phase(name: str, fn: Callable[[], Any], is_async: bool = False) -> None:
        for _ in range(10):  # warm: clients, pools, caches
            loop.run_until_complete(fn()) if is_async else fn()
        gc.collect()
        gc.disable()
        before = probe_ticks()
        control("-i", "on")
        control("-z")
        if is_async:

            async def run() -> None:
                for _ in range(calls):
                    await fn()

            loop.run_until_complete(run())
        else:
            for _ in range(calls):
                fn()
        control("-d", name)
        control("-i", "off")
        ticks[name] = (probe_ticks() - before) / calls
        gc.enable()

    with provider_process(0.0) as base_url:
        params = {"model": "openai/bench-model", "api_base": base_url, "api_key": "sk-bench"}
        bare = {**params, "num_retries": 0, "max_retries": 0, "timeout": 10.0}
        phase("bare_no_engine", lambda: litellm.completion(messages=MESSAGES, **bare))
        policy = Policy.from_dict(
            {
                "models": {"bench": {"litellm_params": params}},
                "routes": {"chat": {"chain": ["bench"]}},
                "prompt_classes": {"default": {"timeout_s": 10.0, "deadline_s": 20.0}},
            }
        )
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        floor_tracer = provider.get_tracer("sdk-floor")

        class TwoSpans(Hook):
            """The SDK's own cost of the layer's two spans: ``attributes`` given as one dict at start,
            the cheapest way the SDK takes them (empty: two bare spans)."""

            def __init__(self, call_attributes: dict[str, Any], attempt_attributes: dict[str, Any]) -> None:
                self.call_attributes, self.attempt_attributes = call_attributes, attempt_attributes

            def call_ended(self, call: Any, response: Any, error: BaseException | None) -> None:
                parent = floor_tracer.start_span("call", attributes=self.call_attributes)
                context = trace.set_span_in_context(parent)
                floor_tracer.start_span("chat", context=context, attributes=self.attempt_attributes).end()
                parent.end()

        engines = {
            "off": Resilience(policy, tracer_provider=NoOpTracerProvider()),
            "floor": Resilience(policy, tracer_provider=NoOpTracerProvider(), hooks=[TwoSpans({}, {})]),
            "on": Resilience(policy, tracer_provider=provider),
        }
        # The attributes of the layer's own spans for one answered call: what the schema makes the SDK carry.
        engines["on"].completion("chat", MESSAGES)
        layer_spans = {span.parent is None: dict(span.attributes or {}) for span in exporter.get_finished_spans()}
        exporter.clear()
        engines["floor_attributes"] = Resilience(
            policy, tracer_provider=NoOpTracerProvider(), hooks=[TwoSpans(layer_spans[True], layer_spans[False])]
        )
        phase("bare", lambda: litellm.completion(messages=MESSAGES, **bare))
        for name in ("off", "floor", "floor_attributes", "on"):
            engine = engines[name]
            phase(name, lambda engine=engine: engine.completion("chat", MESSAGES))
            exporter.clear()
        phase("async_bare", lambda: litellm.acompletion(messages=MESSAGES, **bare), is_async=True)
        phase("async_on", lambda: engines["on"].acompletion("chat", MESSAGES), is_async=True)
    # What one lag-probe tick costs: each probe ticking for IDLE_S with nothing else to do, beside the
    # same wait without it (the dump's own subprocess is in both).
    lag = monitor()

    def idle(name: str, wait: Callable[[], Any], probe: Any = None) -> None:
        gc.collect()
        gc.disable()
        before = probe_ticks()
        control("-i", "on")
        control("-z")
        if probe is not None:
            probe.enter()
        wait()
        if probe is not None:
            probe.exit()
        control("-d", name)
        control("-i", "off")
        ticks[name] = float(probe_ticks() - before)
        gc.enable()

    async def loop_ticking(ticking: bool) -> None:
        probe = lag.loop_probe()
        if ticking:
            probe.enter()
        await asyncio.sleep(IDLE_S)
        if ticking:
            probe.exit()

    idle("idle", lambda: time.sleep(IDLE_S))
    idle("watchdog_ticks", lambda: time.sleep(IDLE_S), lag.watchdog)
    idle("async_idle", lambda: loop.run_until_complete(loop_ticking(False)))
    idle("loop_ticks", lambda: loop.run_until_complete(loop_ticking(True)))
    if ticks_path is not None:
        ticks_path.write_text(json.dumps(ticks))


def parse(directory: Path) -> dict[str, int]:
    """Instructions per phase, from the dumps callgrind wrote (``desc: Trigger: dump NAME``, ``totals:``)."""
    counts: dict[str, int] = {}
    for path in directory.glob("cg.*"):
        text = path.read_text(errors="replace")
        trigger = re.search(r"^desc: Trigger: dump (\S+)", text, re.M)
        totals = re.search(r"^totals: (\d+)", text, re.M)
        if trigger and totals:
            counts[trigger.group(1)] = int(totals.group(1))
    return counts


def tick_costs(counts: dict[str, int], ticks: dict[str, float]) -> dict[str, float]:
    """Instructions per lag-probe tick, ``sync`` (the watchdog's) and ``async`` (an event loop's): a probe
    ticking alone, less the same wait without it."""
    costs = {}
    for kind, ticking, idle in (("sync", "watchdog_ticks", "idle"), ("async", "loop_ticks", "async_idle")):
        if ticks.get(ticking):
            costs[kind] = max(0.0, (counts[ticking] - counts[idle]) / ticks[ticking])
    return costs


def report(
    per_call: dict[str, float],
    calls: int,
    load: tuple[str, str],
    ticks: dict[str, float] | None = None,
    tick_cost: dict[str, float] | None = None,
) -> str:
    ticks, tick_cost = ticks or {}, tick_cost or {}

    def net(name: str) -> float:
        """Instructions per call without the lag-probe ticks that fell into it."""
        kind = "async" if name.startswith("async") else "sync"
        return per_call[name] - ticks.get(name, 0.0) * tick_cost.get(kind, 0.0)

    rows = []
    for name, label in LABELS.items():
        if name not in per_call:
            continue
        ref = "async_bare" if name.startswith("async") else "bare"
        rows.append([
            label, f"{per_call[name] / 1e6:.3f}", f"**{per_call[name] / per_call[ref]:.4f}**",
            f"{ticks.get(name, 0.0):.1f}", f"**{net(name) / net(ref):.4f}**",
        ])  # fmt: skip
    table = c.markdown_table(
        ["calls", "M instructions / call", "ratio to bare", "lag-probe ticks / call", "ratio net of ticks"],
        rows,
        "lrrrr",
    )
    spans = per_call["floor"] - per_call["off"]
    ours_traced = per_call["on"] - per_call["bare"] - spans
    spans_attributed = per_call["floor_attributes"] - per_call["off"]
    ours_beside_attributed = per_call["on"] - per_call["bare"] - spans_attributed
    lines = [
        "# Instructions per call: llm-resilience vs bare litellm (callgrind)",
        "",
        f"`{c.command_line()}`: {calls} calls per phase, counted by valgrind's callgrind (every thread of the "
        "process; the garbage collector off during the counted calls; kernel work not counted). Repeatable "
        "within a few tenths of a percent from run to run whatever the machine's load, unlike the timings "
        "of `overhead.py` (the lag probes' ticks, counted below, are the part that follows wall time).",
        "",
        f"{c.environment_line()}; load average (1 min) at start / end: {load[0]} / {load[1]} "
        "(instruction counts do not depend on it)",
        "",
        table,
        "",
        f"- A built engine and bare litellm: {per_call['bare_no_engine'] / 1e6:.3f} M instructions per bare "
        f"call before any engine existed, {per_call['bare'] / 1e6:.3f} M after "
        f"({100 * (per_call['bare'] / per_call['bare_no_engine'] - 1):+.2f} %).",
        f"- The SDK's two bare spans cost {spans / 1e6:.3f} M instructions "
        f"({100 * spans / per_call['bare']:.2f} % of a bare call); the layer with tracing on adds "
        f"{ours_traced / 1e6:.3f} M on top of them ({100 * ours_traced / per_call['bare']:.2f} %; target <= 1 %), "
        f"with tracing off {(per_call['off'] - per_call['bare']) / 1e6:.3f} M "
        f"({100 * (per_call['off'] / per_call['bare'] - 1):.2f} %; target <= 1 %).",
        f"- The same two spans carrying the attributes the span schema puts on the layer's call and attempt "
        f"spans cost the SDK {spans_attributed / 1e6:.3f} M ({100 * spans_attributed / per_call['bare']:.2f} % "
        f"of a bare call); beside them the layer with tracing on adds {ours_beside_attributed / 1e6:.3f} M "
        f"({100 * ours_beside_attributed / per_call['bare']:.2f} %).",
    ]
    if tick_cost:
        # The one part of the count that follows wall time rather than the calls themselves.
        lines.append(
            "- Lag-probe ticks (the watchdog's for sync calls, the event loop's for async ones) come one every "
            "10 ms while an attempt is in flight: their number follows wall time, and a call lasts tens of times "
            "longer under callgrind than without it. One tick costs "
            + ", ".join(f"{cost / 1e3:.1f} K instructions ({kind})" for kind, cost in tick_cost.items())
            + f", counted with each probe ticking alone for {IDLE_S:.0f} s: about "
            + ", ".join(f"{100 * cost / 1e6:.1f} M ({kind})" for kind, cost in tick_cost.items())
            + " per second of attempts in flight, whatever their number. The last column takes them out."
        )
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=40, help="calls per phase")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ticks", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=c.RESULTS_DIR, help="directory for instructions.md")
    args = parser.parse_args(argv)
    if args.child:
        child(args.calls, args.ticks)
        return 0
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("valgrind (callgrind) is not installed: apt-get install valgrind", file=sys.stderr)
        return 2
    load_start = f"{os.getloadavg()[0]:.1f}"
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            "valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={tmp}/cg.%p",
            sys.executable, __file__, "--child", "--calls", str(args.calls), "--ticks", f"{tmp}/ticks.json",
        ]  # fmt: skip
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        counts = parse(Path(tmp))
        ticks_file = Path(tmp) / "ticks.json"
        ticks = json.loads(ticks_file.read_text()) if ticks_file.exists() else None
    missing = [name for name in LABELS if name not in counts]
    if missing:
        print(f"no count for {missing}", file=sys.stderr)
        return 1
    per_call = {name: count / args.calls for name, count in counts.items()}
    costs = tick_costs(counts, ticks) if ticks and "idle" in counts and "async_idle" in counts else None
    text = report(per_call, args.calls, (load_start, f"{os.getloadavg()[0]:.1f}"), ticks, costs)
    print(text)
    c.write_text(args.out / "instructions.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
