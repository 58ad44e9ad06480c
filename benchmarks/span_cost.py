"""What the spans of one call cost: the tracing hook alone, against the OpenTelemetry SDK's own floor.

A micro-benchmark (``mock_response`` builds the answer once; no HTTP): one answered one-attempt call
goes through the planner and the tracing hook, and the table gives CPU microseconds per call for

* the planner alone (the reference the others are measured above),
* the tracing hook on an SDK provider with a ``SimpleSpanProcessor`` (export on the calling thread,
  what ``benchmarks/overhead.py`` uses) and with a ``BatchSpanProcessor`` (what production uses),
* the hook when nobody listens (no provider set: the call span does not record),
* the SDK floor: two bare spans (start, child, end, end) with no attributes, on the same processor.

CPU time (``time.process_time``), blocks interleaved, minimum and median over rounds: the machine
this runs on is shared, so compare rows of one run, not runs.

Run ``.venv/bin/python benchmarks/span_cost.py [--rounds N]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import _common  # noqa: F401  (first: litellm's offline switches)
import litellm
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NoOpTracerProvider

from llm_resilience import Policy, Resilience
from llm_resilience._planner import CallRequest, Launch
from llm_resilience._tracing import TracingHook

MESSAGES = [{"role": "user", "content": "Summarise the quarterly report in one sentence."}]
BENCH_PARAMS = {"model": "openai/bench-model", "api_base": "http://127.0.0.1:9/v1", "api_key": "k"}
POLICY = {"models": {"bench": {"litellm_params": BENCH_PARAMS}}, "routes": {"chat": {"chain": ["bench"]}}}


def provider_with(processor: Callable[[SpanExporter], Any]) -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(processor(exporter))
    return provider, exporter


def main(rounds: int, calls: int) -> None:
    response = litellm.completion(model="openai/bench-model", messages=MESSAGES, mock_response="A fine quarter.")
    planner = Resilience(Policy.from_dict(POLICY), tracer_provider=NoOpTracerProvider())._planner
    simple, simple_exporter = provider_with(SimpleSpanProcessor)
    batch, batch_exporter = provider_with(lambda e: BatchSpanProcessor(e, max_queue_size=1_000_000))
    exporters = (simple_exporter, batch_exporter)
    floor_tracer = simple.get_tracer("floor")

    def one_call(hook: TracingHook | None) -> None:
        call = planner.start(CallRequest(model="chat", messages=MESSAGES, kwargs={}), time.monotonic())
        action = call.next_action(time.monotonic())
        assert isinstance(action, Launch)
        record = action.attempt.record
        if hook is not None:
            hook.call_started(call)
            hook.attempt_started(call, record)
        record.outcome, record.latency_s = "success", 0.0123
        if hook is not None:
            hook.attempt_ended(call, record, response)
        call.answered_by = record
        if hook is not None:
            hook.call_ended(call, response, None)

    def floor() -> None:
        one_call(None)
        parent = floor_tracer.start_span("call")
        floor_tracer.start_span("chat", context=trace.set_span_in_context(parent)).end()
        parent.end()

    hooks = (TracingHook(simple), TracingHook(batch), TracingHook(NoOpTracerProvider()))
    rows: dict[str, Callable[[], None]] = {
        "planner alone (reference)": lambda: one_call(None),
        "tracing, SimpleSpanProcessor": lambda: one_call(hooks[0]),
        "tracing, BatchSpanProcessor": lambda: one_call(hooks[1]),
        "tracing, nobody listening": lambda: one_call(hooks[2]),
        "SDK floor: 2 bare spans, Simple": floor,
    }
    samples: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(rounds):
        for name, run in rows.items():
            for exporter in exporters:
                exporter.clear()
            started = time.process_time()
            for _ in range(calls):
                run()
            samples[name].append((time.process_time() - started) / calls * 1e6)
    batch.shutdown()
    base_min = min(samples["planner alone (reference)"])
    base_median = statistics.median(samples["planner alone (reference)"])
    print(f"{calls} calls x {rounds} rounds, CPU µs per call above the planner alone\n")
    print("| row | min µs | median µs |\n|---|--:|--:|")
    for name, values in samples.items():
        if name.startswith("planner"):
            print(f"| {name} | {base_min:.1f} (absolute) | {base_median:.1f} (absolute) |")
        else:
            print(f"| {name} | {min(values) - base_min:.1f} | {statistics.median(values) - base_median:.1f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=1000)
    args = parser.parse_args()
    main(args.rounds, args.calls)
