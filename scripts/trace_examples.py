"""Writes docs/guides/trace-examples.md: one trace per fault kind, as a real Jaeger's API returns it.

Runs each fault against loopback fake providers through litellm's real HTTP path, exports the spans
over OTLP to a Jaeger v2 (started from the binary ``scripts/jaeger.sh`` builds, or the one named by
``JAEGER_QUERY_URL`` and ``OTEL_EXPORTER_OTLP_ENDPOINT``), reads them back from ``/api/traces`` (what
the UI shows) and writes them out, trimmed of IDs and timestamps. Nothing in the page is typed by hand::

    .venv/bin/python scripts/trace_examples.py            # rewrites docs/guides/trace-examples.md
    .venv/bin/python scripts/trace_examples.py --check    # exit 1 if a fault's trace no longer reads as described
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the Jaeger runner the real-Jaeger test uses

from _jaeger_server import get_json, running_jaeger  # noqa: E402
from opentelemetry.sdk.resources import Resource  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: E402

import llm_resilience  # noqa: E402
from llm_resilience import AllAttemptsFailed, Resilience  # noqa: E402
from llm_resilience._tracing import otlp_exporter  # noqa: E402
from llm_resilience.testing import Behavior, FakeProvider  # noqa: E402

PAGE = ROOT / "docs" / "guides" / "trace-examples.md"
MESSAGES = [{"role": "user", "content": "How many otters live in the bay?"}]
WIRE = {"big": "gpt-4o", "small": "gpt-4o-mini", "tiny": "tiny-model"}
HIDDEN_TAGS = {"otel.scope.name", "otel.scope.version", "internal.span.format"}
"""Tags Jaeger adds that say nothing about the call."""


@dataclass
class Fault:
    title: str
    what: str
    run: Callable[[], None]
    row: str
    """The search list's row (the root span's name), as it must read."""


class Scenarios:
    """The fault kinds, each one call, on three fake providers (big → small → tiny)."""

    def __init__(self, providers: dict[str, FakeProvider], tracer_provider: TracerProvider) -> None:
        self.p = providers
        self.tracer_provider = tracer_provider

    def engine(self, chain: list[str], **options: Any) -> Resilience:
        classes = options.pop("classes", {"default": {"timeout_s": 0.5, "deadline_s": 5.0}})
        policy: dict[str, Any] = {
            "models": {
                name: {
                    "litellm_params": {
                        "model": f"openai/{WIRE[name]}",
                        "api_base": provider.base_url,
                        "api_key": f"sk-example-{name}",
                    }
                }
                for name, provider in self.p.items()
            },
            "routes": {"chat": {"chain": chain, **options.pop("route", {})}},
            "prompt_classes": classes,
            "breakers": {"default": {"fail_max": 3, "reset_timeout_s": 30}, **options.pop("breakers", {})},
        }
        for name, window in options.pop("windows", {}).items():
            policy["models"][name]["context_window"] = window
        return Resilience(llm_resilience.Policy.from_dict(policy), tracer_provider=self.tracer_provider)

    def reset(self) -> None:
        for provider in self.p.values():
            provider.reset(behaviors=True)

    def faults(self) -> list[Fault]:
        p = self.p
        breaker = self.engine(["big", "small", "tiny"], breakers={"big": {"fail_max": 1, "reset_timeout_s": 1.0}})
        streams = {
            "default": {"timeout_s": 2.0, "deadline_s": 8.0, "first_token_timeout_s": 0.4, "idle_timeout_s": 0.5}
        }

        def plain() -> None:
            breaker.completion("chat", MESSAGES, temperature=0.2, max_tokens=200)

        def timeout() -> None:
            p["big"].set(Behavior.slow(3.0))
            breaker.completion("chat", MESSAGES)

        def skipped() -> None:
            breaker.completion("chat", MESSAGES)

        def failed() -> None:
            p["small"].set(Behavior.error(500))
            p["tiny"].set(Behavior.error(429))
            with contextlib.suppress(AllAttemptsFailed):
                breaker.completion("chat", MESSAGES)

        def probe() -> None:
            self.reset()
            time.sleep(1.1)  # big's breaker's reset timeout runs on the wall clock
            breaker.completion("chat", MESSAGES)

        def first_token() -> None:
            self.reset()
            p["big"].set(Behavior.slow(3.0))
            list(self.engine(["big", "small"], classes=streams).completion("chat", MESSAGES, stream=True))

        def mid_stream() -> None:
            self.reset()
            p["big"].set(Behavior(content="Around ninety otters were counted", chunks=6, cut_after_chunks=3))
            list(self.engine(["big", "small"], classes=streams).completion("chat", MESSAGES, stream=True))

        def empty() -> None:
            self.reset()
            p["big"].set(Behavior(body="empty"))
            self.engine(["big", "small"]).completion("chat", MESSAGES)

        def truncated() -> None:
            self.reset()
            p["big"].set(Behavior.error(503))
            engine = self.engine(
                ["big", "small"], windows={"small": 1_500}, route={"truncation": {"reserve_output_tokens": 100}}
            )
            history = [
                {"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}: " + "otters " * 300}
                for i in range(41)
            ]
            engine.completion("chat", history)

        def hedged() -> None:
            self.reset()
            p["big"].set(Behavior.slow(1.0))
            engine = self.engine(["big", "small"], route={"hedge": {"after": 0.1, "budget_ratio": 1.0}})
            engine.completion("chat", MESSAGES)

        def panic() -> None:
            self.reset()
            engine = self.engine(["big", "small"], breakers={"default": {"fail_max": 1, "reset_timeout_s": 60}})
            p["big"].set(Behavior.error(500))
            p["small"].set(Behavior.error(500))
            with contextlib.suppress(AllAttemptsFailed):  # both fail, both breakers open: the set-up (not shown)
                engine.completion("chat", MESSAGES)
            self.reset()
            engine.completion("chat", MESSAGES)

        return [
            Fault("The first model answered", "One request, one answer: the row every healthy call has.", plain,
                  "llm_resilience.completion chat answered"),
            Fault("Timeout, a fallback answered", "big got no answer within its attempt bound (0.5 s); its "
                  "breaker (fail_max 1) opened; small answered.", timeout, "llm_resilience.completion chat rescued"),
            Fault("Skipped: breaker open", "big's breaker is open: no request to it; small answered.", skipped,
                  "llm_resilience.completion chat rescued"),
            Fault("Every model failed", "big skipped (open), small answered 500, tiny 429: the caller got "
                  "AllAttemptsFailed.", failed, "llm_resilience.completion chat failed"),
            Fault("Half-open probe", "big's reset timeout passed: this call's request to big is the probe; "
                  "it answered and the breaker closed.", probe, "llm_resilience.completion chat answered"),
            Fault("Stream: no first token in time", "big sent nothing within the first-token bound (0.4 s); "
                  "small streamed the answer.", first_token, "llm_resilience.completion chat rescued"),
            Fault("Stream broke mid-answer, the next model finished it", "big's connection dropped after "
                  "part of the answer had reached the caller; small continued the text.", mid_stream,
                  "llm_resilience.completion chat rescued"),
            Fault("Empty answer", "big answered 200 with no text: the empty check failed; small answered.",
                  empty, "llm_resilience.completion chat rescued"),
            Fault("Prompt truncated for a smaller fallback", "big answered 503; the prompt did not fit small's "
                  "1,500-token window and was truncated before it was sent.", truncated,
                  "llm_resilience.completion chat rescued"),
            Fault("Hedge", "big was slow; after 0.1 s small was asked in parallel and answered first; big's "
                  "request was cancelled.", hedged, "llm_resilience.completion chat rescued"),
            Fault("Panic: every breaker open", "Both breakers were open; the call tried the model whose breaker "
                  "opened first anyway, and it answered.", panic, "llm_resilience.completion chat rescued"),
        ]  # fmt: skip


def trimmed(trace: dict[str, Any]) -> list[dict[str, Any]]:
    """The trace's spans, root first then in attempt order: name, duration, tags and logs as key: value."""
    spans = trace["spans"]

    def tags(span: dict[str, Any]) -> dict[str, Any]:
        return {t["key"]: t["value"] for t in span.get("tags", []) if t["key"] not in HIDDEN_TAGS}

    def order(span: dict[str, Any]) -> tuple[int, int]:
        is_child = bool(span.get("references"))
        return (int(is_child), int(tags(span).get("llm_resilience.attempt.index", -1)))

    out = []
    for span in sorted(spans, key=order):
        entry: dict[str, Any] = {
            "operationName": span["operationName"],
            "duration_ms": round(span["duration"] / 1000),
            "tags": tags(span),
        }
        logs = [{f["key"]: f["value"] for f in log["fields"]} for log in span.get("logs", [])]
        if logs:
            entry["logs"] = logs
        out.append(entry)
    return out


def search_row(trace: dict[str, Any]) -> str:
    spans = trace["spans"]
    root = next(s for s in spans if not s.get("references"))
    errors = sum(1 for s in spans if any(t["key"] == "error" and t["value"] is True for t in s.get("tags", [])))
    return f"{root['operationName']} · {len(spans)} spans · {errors} error{'s' if errors != 1 else ''}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="run and check, write nothing")
    args = parser.parse_args()
    providers = {name: FakeProvider().start() for name in WIRE}
    service = f"trace-examples-{uuid.uuid4().hex[:8]}"
    try:
        with tempfile.TemporaryDirectory() as tmp, running_jaeger(Path(tmp)) as (query_url, otlp_endpoint):
            os.environ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = f"{otlp_endpoint}/v1/traces"
            llm_resilience.warm_up()
            exporting = TracerProvider(resource=Resource.create({"service.name": service}))
            exporting.add_span_processor(BatchSpanProcessor(otlp_exporter("traces")))
            scenarios = Scenarios(providers, exporting)
            faults = scenarios.faults()
            for fault in faults:
                scenarios.reset()
                fault.run()
                assert exporting.force_flush(10_000)
            exporting.shutdown()
            traces = _read_back(query_url, service, len(faults) + 1)  # + the panic scenario's set-up call
    finally:
        for provider in providers.values():
            provider.stop()
    traces = [t for t in traces if not _is_setup(t)]
    if len(traces) != len(faults):
        print(f"expected {len(faults)} traces, Jaeger has {len(traces)}", file=sys.stderr)
        return 1
    problems = [
        f"{fault.title}: the search row reads {search_row(trace)!r}, expected {fault.row!r}"
        for fault, trace in zip(faults, traces, strict=True)
        if not search_row(trace).startswith(fault.row + " ·")
    ]
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    if not args.check:
        PAGE.write_text(_page(faults, traces), encoding="utf-8")
        print(f"wrote {PAGE.relative_to(ROOT)}")
    return 0


def _is_setup(trace: dict[str, Any]) -> bool:
    """The panic scenario's first call (it opens both breakers): not an example."""
    root = next(s for s in trace["spans"] if not s.get("references"))
    path = next((t["value"] for t in root["tags"] if t["key"] == "llm_resilience.path"), "")
    return root["operationName"].endswith(" failed") and path.startswith("big: server_error") and "small" in path


def _read_back(query_url: str, service: str, expected: int) -> list[dict[str, Any]]:
    params = urllib.parse.urlencode({"service": service, "limit": "100", "lookback": "1h"})
    found: list[dict[str, Any]] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # Jaeger stores what it receives in batches: poll until all are in
        found = list(get_json(f"{query_url}/api/traces?{params}")["data"] or [])
        if len(found) >= expected:
            break
        time.sleep(0.3)
    return sorted(found, key=lambda t: min(s["startTime"] for s in t["spans"]))


def _page(faults: list[Fault], traces: list[dict[str, Any]]) -> str:
    out = [
        "# Trace examples",
        "",
        "One call per fault kind, exported to Jaeger v2 (1.76.0) and read back from its query API",
        "(`/api/traces`, what the UI shows). Generated by `scripts/trace_examples.py`: fake providers on",
        "loopback, litellm's real HTTP path; **do not edit by hand**. Trimmed: span and trace IDs,",
        "timestamps and the process are left out; tags and logs are shown as `key: value`; durations are",
        "from the run that wrote this page. How to read them: [On-call](on-call.md).",
        "",
        "The models: `big` (`openai/gpt-4o`) → `small` (`openai/gpt-4o-mini`) → `tiny`; prompt class",
        "`default` with a 0.5 s attempt bound and a 5 s deadline (streams: 0.4 s first token, 0.5 s idle).",
        "",
    ]
    for fault, trace in zip(faults, traces, strict=True):
        out += [
            f"## {fault.title}",
            "",
            fault.what,
            "",
            f"Search list: `{search_row(trace)}`",
            "",
            "```json",
            json.dumps(trimmed(trace), indent=2, ensure_ascii=False),
            "```",
            "",
        ]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
