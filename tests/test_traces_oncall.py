"""What an on-call engineer reads in a trace, read back from an in-memory exporter: nothing on a span may mislead.

Each test is one way a span used to mislead (the outcome invisible in the search list, an excuse longer
than the attempt, a bound that cut an attempt recorded nowhere...). Engine tests go through the real
litellm HTTP path against the fake providers; the rules that need a saturated client or open breakers
drive the planner with a scripted saturation signal and a real tracing hook (no server).
"""

from __future__ import annotations

import http.server
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import MESSAGES, EngineFactory, PolicyBuilder, hidden
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from test_under_load_planner import T0, Scripted, launch, make_planner, open_breakers, start

from llm_resilience import AllAttemptsFailed, StreamInterrupted
from llm_resilience._hooks import HookSet
from llm_resilience._planner import Done, Fail, Planner
from llm_resilience._tracing import TracingHook
from llm_resilience.testing import Behavior, FakeProvider

NS = "llm_resilience"


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def split(exporter: InMemorySpanExporter) -> tuple[ReadableSpan, list[ReadableSpan]]:
    """The call span and its attempt spans, in attempt order."""
    spans = list(exporter.get_finished_spans())
    (call,) = [s for s in spans if s.parent is None]
    children = sorted((s for s in spans if s is not call), key=lambda s: attrs(s)[f"{NS}.attempt.index"])
    return call, children


def traced(planner: Planner) -> InMemorySpanExporter:
    """Give ``planner`` the tracing hook the engine uses, exporting to memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    planner.hooks = HookSet([TracingHook(provider)])
    return exporter


def path_ms(path: str, model: str) -> int:
    found = re.search(rf"{model}: [^→]*?(?:in|after) (\d+) ms", path)
    assert found is not None, path
    return int(found.group(1))


def duration_ms(span: ReadableSpan) -> float:
    assert span.end_time is not None and span.start_time is not None
    return (span.end_time - span.start_time) / 1e6


def warm_up_streams(make_engine: EngineFactory, policy_dict: PolicyBuilder, exporter: InMemorySpanExporter) -> None:
    """litellm's first stream in a process spends ~0.6 s importing: longer than a first-token bound here."""
    list(make_engine(policy_dict(["small"], timeout_s=20.0, deadline_s=30.0)).completion("chat", MESSAGES, stream=True))
    exporter.clear()


# -- 1. the outcome in the search list ------------------------------------------------------------


def test_the_call_span_name_says_whether_the_call_was_answered_rescued_or_failed(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, exporter: InMemorySpanExporter,
    big: FakeProvider, small: FakeProvider,
) -> None:  # fmt: skip
    engine = make_engine(policy_dict(["big", "small"]))
    names = []
    engine.completion("chat", MESSAGES)
    names.append(split(exporter)[0].name)
    exporter.clear()
    big.set(Behavior.error(500))
    engine.completion("chat", MESSAGES)
    names.append(split(exporter)[0].name)
    exporter.clear()
    small.set(Behavior.error(500))
    with pytest.raises(AllAttemptsFailed):
        engine.completion("chat", MESSAGES)
    failed = split(exporter)[0]
    names.append(failed.name)

    # Jaeger's search list shows the root span's name: three calls, three different rows.
    assert names == [f"{NS}.completion chat {outcome}" for outcome in ("answered", "rescued", "failed")]
    assert attrs(failed)[f"{NS}.call_outcome"] == "failed"


# -- 2. client delay: a share of the attempt, never more ------------------------------------------


def test_client_delay_on_a_span_is_never_longer_than_the_attempt() -> None:
    planner = make_planner(Scripted(delay_s=10.0), soft={"warmup_s": 0.2, "min_samples": 50})
    exporter = traced(planner)
    call = start(planner)
    first = launch(call, T0)

    call.on_error(first, TimeoutError("litellm's own read timeout"), T0 + 0.25)  # 10 s "late" in 0.25 s

    spans = [s for s in exporter.get_finished_spans() if s.parent is not None]
    overloaded = attrs(spans[0])
    assert overloaded[f"{NS}.outcome"] == "client_overload"
    assert 0 < overloaded[f"{NS}.client_delay_ms"] <= 250
    assert call.summary()["attempts"][0]["client_delay_s"] <= 0.25


# -- 3. an overloaded attempt that ends a failed call is an error ---------------------------------


def test_an_overloaded_attempt_that_ends_a_failed_call_is_an_error_with_its_type() -> None:
    planner = make_planner(Scripted(delay_s=0.4), chain=("a",))
    exporter = traced(planner)
    call = start(planner)
    only = launch(call, T0)

    call.on_error(only, TimeoutError("read timeout"), T0 + 1.05)  # the provider's share: 0.65 s of 1 s
    assert isinstance(call.next_action(T0 + 1.05), Fail)

    root, (attempt,) = split(exporter)
    assert attrs(attempt)[f"{NS}.outcome"] == "client_overload"
    assert attempt.status.status_code == StatusCode.ERROR
    assert attrs(attempt)["error.type"] == "TimeoutError"
    assert "client_saturated" in (attempt.status.description or "")
    assert root.status.status_code == StatusCode.ERROR


# -- 4. every bound, and the one that cut -----------------------------------------------------------


def test_a_stream_cut_before_its_first_token_names_the_first_token_bound(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, exporter: InMemorySpanExporter,
    big: FakeProvider, small: FakeProvider,
) -> None:  # fmt: skip
    warm_up_streams(make_engine, policy_dict, exporter)
    classes = {"default": {"timeout_s": 2.0, "deadline_s": 8.0, "first_token_timeout_s": 0.4, "idle_timeout_s": 0.5}}
    engine = make_engine(policy_dict(["big", "small"], prompt_classes=classes))
    big.set(Behavior.slow(3.0))

    list(engine.completion("chat", MESSAGES, stream=True))

    root, (cut, answered) = split(exporter)
    a = attrs(cut)
    assert (a[f"{NS}.cut_by"], a[f"{NS}.bound.first_token_ms"], a[f"{NS}.bound.idle_ms"]) == ("first_token", 400, 500)
    assert a[f"{NS}.bound.deadline_ms"] <= 8000 and f"{NS}.bound.attempt_ms" not in a
    assert f"{NS}.cut_by" not in attrs(answered)
    assert re.match(r"big: timeout after \d+ ms \(first_token bound 400 ms\) → small: ok", attrs(root)[f"{NS}.path"])


def test_a_whole_attempt_cut_names_the_attempt_bound_and_its_overrun(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, exporter: InMemorySpanExporter, big: FakeProvider
) -> None:
    big.set(Behavior.slow(2.0))
    engine = make_engine(policy_dict(["big", "small"], timeout_s=0.2))

    response = engine.completion("chat", MESSAGES)

    root, (cut, _answered) = split(exporter)
    a = attrs(cut)
    assert (a[f"{NS}.cut_by"], a[f"{NS}.bound.attempt_ms"]) == ("attempt", 200)
    assert 0 < a[f"{NS}.bound.deadline_ms"] <= 5000  # what was left of the 5 s deadline when the attempt started
    latency_s = hidden(response)["attempts"][0]["latency_s"]
    assert abs(a[f"{NS}.overrun_ms"] - (latency_s - 0.2) * 1000) <= 1
    assert "(attempt bound 200 ms)" in attrs(root)[f"{NS}.path"]


def test_the_soft_timeout_and_the_deadline_are_named_when_they_cut() -> None:
    planner = make_planner(soft={"warmup_s": 0.2, "min_samples": 50})
    exporter = traced(planner)
    call = start(planner)
    first = launch(call, T0)
    call.on_error(first, TimeoutError("read timeout"), T0 + 0.2)  # the soft timeout, as litellm's timeout
    second = launch(call, T0 + 2.5)  # 0.5 s of the 3 s deadline left: tighter than the 1 s attempt bound
    assert call.at_bound(second, T0 + 3.0) is None
    call.on_error(second, TimeoutError("cut"), T0 + 3.0)

    soft, deadline = sorted(exporter.get_finished_spans(), key=lambda s: attrs(s)[f"{NS}.attempt.index"])
    assert (attrs(soft)[f"{NS}.cut_by"], attrs(soft)[f"{NS}.bound.soft_ms"]) == ("soft", 200)
    assert (attrs(deadline)[f"{NS}.cut_by"], attrs(deadline)[f"{NS}.bound.deadline_ms"]) == ("deadline", 500)
    assert attrs(deadline)[f"{NS}.bound.attempt_ms"] == 1000


# -- 5. the call's deadline ---------------------------------------------------------------------------


def test_the_call_span_carries_the_deadline_the_call_ran_under(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, exporter: InMemorySpanExporter
) -> None:
    engine = make_engine(policy_dict(["big", "small"]))
    engine.completion("chat", MESSAGES)
    engine.completion("chat", MESSAGES, timeout=2.0)  # the caller's own timeout is tighter

    roots = [s for s in exporter.get_finished_spans() if s.parent is None]
    assert [attrs(r)[f"{NS}.deadline_ms"] for r in roots] == [5000, 2000]


# -- 6. preparing an attempt is part of its span ------------------------------------------------------


def test_time_spent_truncating_is_on_the_attempt_span_and_agrees_with_the_path(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, exporter: InMemorySpanExporter,
    big: FakeProvider, small: FakeProvider,
) -> None:  # fmt: skip
    policy = policy_dict(["big", "small"])
    policy["models"]["small"]["context_window"] = 2_000
    policy["routes"]["chat"]["truncation"] = {"reserve_output_tokens": 100}
    big.set(Behavior.error(500))
    long_history = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " + "otters " * 400}
                    for i in range(61)]  # fmt: skip
    engine = make_engine(policy)

    engine.completion("chat", long_history)

    root, (_failed, truncated) = split(exporter)
    a = attrs(truncated)
    assert a[f"{NS}.truncation"] == "truncated" and a[f"{NS}.tokens.after"] < a[f"{NS}.tokens.before"]
    assert a[f"{NS}.prepare_ms"] >= 0
    path = attrs(root)[f"{NS}.path"]
    assert abs(duration_ms(truncated) - path_ms(path, "small")) <= 1.5, (duration_ms(truncated), path)
    assert re.search(r"small: ok in \d+ ms \(truncated \d+→\d+ tokens in \d+ ms\)", path), path


# -- 7. panic mode: the first model of the chain answered ---------------------------------------------


def test_a_panic_attempt_answered_by_the_first_model_is_no_fallback() -> None:
    planner = make_planner()
    exporter = traced(planner)
    open_breakers(planner, "a", "b")  # a opened first: the panic attempt goes to a, the chain's first model
    call = start(planner, T0 + 1)
    panic = launch(call, T0 + 1)
    assert panic.spec.name == "a"

    call.on_response(panic, object(), T0 + 1.1)
    assert isinstance(call.next_action(T0 + 1.1), Done)

    root, (_skip_a, _skip_b, answered) = split(exporter)
    assert attrs(root)[f"{NS}.fallbacks"] == 0
    assert call.summary()["fallbacks"] == 0
    assert attrs(root)[f"{NS}.answered_by"] == "a"
    assert attrs(answered)[f"{NS}.breaker.admission"] == "panic"
    assert attrs(root)[f"{NS}.path"].endswith("a: ok in 100 ms (panic)")


# -- 8. a stream that broke mid-answer ----------------------------------------------------------------


def test_a_stream_cut_mid_answer_says_so_and_how_much_had_been_delivered(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, exporter: InMemorySpanExporter, big: FakeProvider
) -> None:
    big.set(Behavior(content="abcdefgh", chunks=4, cut_after_chunks=2))
    policy = policy_dict(["big"])
    policy["routes"]["chat"]["streaming"] = {"on_interrupt": "raise"}  # not even big itself: the caller gets it
    engine = make_engine(policy)

    with pytest.raises(StreamInterrupted):
        list(engine.completion("chat", MESSAGES, stream=True))

    root, (broken,) = split(exporter)
    assert attrs(broken)[f"{NS}.interrupted_after_chars"] == 4
    path = attrs(root)[f"{NS}.path"]
    assert re.fullmatch(r"big: stream broke after 4 chars in \d+ ms, connection", path), path
    assert "delivered" in (broken.status.description or "")


def test_a_stream_the_next_model_finished_reads_as_a_break_then_a_join(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, exporter: InMemorySpanExporter, big: FakeProvider
) -> None:
    big.set(Behavior(content="abcdefgh", chunks=4, cut_after_chunks=2))
    engine = make_engine(policy_dict(["big", "small"]))

    list(engine.completion("chat", MESSAGES, stream=True))

    root, (broken, continued) = split(exporter)
    assert attrs(broken)[f"{NS}.interrupted_after_chars"] == 4
    assert attrs(continued)[f"{NS}.attempt.role"] == "continuation"
    path = attrs(root)[f"{NS}.path"]
    assert re.fullmatch(r"big: stream broke after 4 chars in \d+ ms, connection → small: ok in \d+ ms \(join\)", path)
    assert root.name == f"{NS}.completion chat rescued"


# -- 9. no boolean that Jaeger would paint red ----------------------------------------------------------


def test_no_span_carries_a_boolean(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, exporter: InMemorySpanExporter,
    big: FakeProvider, small: FakeProvider,
) -> None:  # fmt: skip
    import time

    # The hedge waits 0.5 s: long enough that big's 500 below comes back first even on a loaded machine
    # (at 50 ms it was hedged now and then, and no attempt was a fallback).
    hedge = {"after": 0.5, "budget_ratio": 1.0}
    policy = policy_dict(["big", "small"], timeout_s=3.0, breakers={"big": {"fail_max": 1, "reset_timeout_s": 0.3}})
    policy["routes"]["chat"]["hedge"] = hedge
    engine = make_engine(policy)
    big.set(Behavior.slow(2.0))
    engine.completion("chat", MESSAGES)  # big hedged by small
    big.set(Behavior.error(500))
    engine.completion("chat", MESSAGES)  # big fails, its breaker opens
    big.set(Behavior.ok())
    time.sleep(0.35)  # the breaker's reset timeout runs on the wall clock
    engine.completion("chat", MESSAGES)  # big's probe
    list(engine.completion("chat", MESSAGES, stream=True))

    spans = exporter.get_finished_spans()
    booleans = [(s.name, k) for s in spans for k, v in attrs(s).items() if isinstance(v, bool)]
    assert booleans == []
    roles = {attrs(s).get(f"{NS}.attempt.role") for s in spans}
    admissions = {attrs(s).get(f"{NS}.breaker.admission") for s in spans}
    assert {"first", "hedge", "fallback"} <= roles and "probe" in admissions
    assert any(attrs(s).get(f"{NS}.delivery") == "stream" for s in spans)


# -- 10. the GenAI conventions ---------------------------------------------------------------------------


def test_attempt_spans_follow_the_genai_conventions(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, exporter: InMemorySpanExporter,
    big: FakeProvider, small: FakeProvider,
) -> None:  # fmt: skip
    big.set(Behavior.error(503))
    small.set(Behavior.json({"ok": True}))
    engine = make_engine(policy_dict(["big", "small"]))

    engine.completion(
        "chat", MESSAGES, temperature=0.2, max_tokens=64, top_p=0.9, seed=7, response_format={"type": "json_object"}
    )

    _root, (failed, answered) = split(exporter)
    assert answered.name == "chat gpt-4o-mini"  # the model name sent, not litellm's "openai/gpt-4o-mini"
    a = attrs(answered)
    assert (a["gen_ai.request.model"], a["gen_ai.provider.name"]) == ("gpt-4o-mini", "openai")
    assert (a["gen_ai.request.temperature"], a["gen_ai.request.max_tokens"]) == (0.2, 64)
    assert (a["gen_ai.request.top_p"], a["gen_ai.request.seed"]) == (0.9, 7)
    assert a["gen_ai.output.type"] == "json"
    assert failed.status.status_code == StatusCode.ERROR
    assert failed.status.description == "server_error (ServiceUnavailableError, HTTP 503)"


def test_an_adhoc_model_string_with_its_own_api_base_gets_server_address_and_a_requested_model(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, exporter: InMemorySpanExporter, small: FakeProvider
) -> None:
    engine = make_engine(policy_dict(["big"]))

    engine.completion("openai/gpt-4o-mini", MESSAGES, api_base=small.base_url, api_key="sk-adhoc")
    root, (attempt,) = split(exporter)
    a = attrs(attempt)
    assert (a["server.address"], a["server.port"]) == ("127.0.0.1", small.port)
    assert a["gen_ai.request.model"] == "gpt-4o-mini"
    assert not [k for k in a if k.startswith(("gen_ai.request.t", "gen_ai.request.s", "gen_ai.output"))]  # none set
    assert attrs(root)[f"{NS}.requested_model"] == "openai/gpt-4o-mini"


def test_a_policy_model_name_as_the_route_is_recorded_as_the_requested_model(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, exporter: InMemorySpanExporter
) -> None:
    make_engine(policy_dict(["big"])).completion("small", MESSAGES)

    root, _ = split(exporter)
    assert attrs(root)[f"{NS}.requested_model"] == "small"
    assert attrs(root)[f"{NS}.route"] == "small"


def test_a_failed_call_says_why_in_its_status(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, exporter: InMemorySpanExporter,
    big: FakeProvider, small: FakeProvider,
) -> None:  # fmt: skip
    big.set(Behavior.error(500))
    small.set(Behavior.error(429))
    with pytest.raises(AllAttemptsFailed):
        make_engine(policy_dict(["big", "small"])).completion("chat", MESSAGES)

    root, _ = split(exporter)
    assert root.status.description == "AllAttemptsFailed: big server_error, small rate_limit"


# -- 11. metrics to a collector that takes only traces ----------------------------------------------------


class TracesOnlyCollector:
    """Answers 404 to /v1/metrics, as Jaeger does, until something POSTs to /accept.

    With ``refuse`` set to a path, answers that path with ``status`` instead (a collector in trouble).
    """

    def __init__(self, refuse: str = "/v1/metrics", status: int = 404) -> None:
        self.accept_metrics = False
        collector = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                if self.path == "/accept":
                    collector.accept_metrics = True
                ok = self.path != refuse or collector.accept_metrics
                self.send_response(200 if ok else status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def traces_only() -> Iterator[TracesOnlyCollector]:
    collector = TracesOnlyCollector()
    yield collector
    collector.server.shutdown()


EXPORT_THREE_TIMES_THEN_ONCE_MORE = """
import sys, urllib.request
from llm_resilience import _metrics
provider = _metrics.default_meter_provider()
counter = provider.get_meter("t").create_counter("c")
for i in range(3):
    counter.add(1)
    provider.force_flush()
urllib.request.urlopen(sys.argv[1] + "/accept", data=b"")
counter.add(1)
provider.force_flush()
print("done", flush=True)
"""


def test_metrics_to_a_traces_only_collector_are_reported_once_and_again_when_they_work(
    traces_only: TracesOnlyCollector,
) -> None:
    # A fresh process, as an application started with the standard variable pointing at Jaeger.
    env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": traces_only.endpoint, "OTEL_METRIC_EXPORT_INTERVAL": "600000"}
    done = subprocess.run(
        [sys.executable, "-c", EXPORT_THREE_TIMES_THEN_ONCE_MORE, traces_only.endpoint],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip

    assert done.returncode == 0 and "done" in done.stdout, done.stderr
    assert done.stderr.count("Failed to export metrics batch") == 1, done.stderr  # quoted once, in ours
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    failed = [line for line in lines if "exporting metrics to" in line and "failed" in line]
    assert len(failed) == 1, done.stderr  # three failed exports, one message
    assert "404" in failed[0] and "OTEL_METRICS_EXPORTER=none" in failed[0]
    assert len([line for line in lines if "works again" in line]) == 1, done.stderr


EXPORT_SPANS_THREE_TIMES_THEN_ONCE_MORE = """
import sys, urllib.request
from llm_resilience import _tracing
provider = _tracing._otlp_provider()
tracer = provider.get_tracer("t")
for i in range(3):
    tracer.start_span("s").end()
    provider.force_flush()
urllib.request.urlopen(sys.argv[1] + "/accept", data=b"")
tracer.start_span("s").end()
provider.force_flush()
print("done", flush=True)
"""


def test_spans_to_a_failing_collector_are_reported_once_and_again_when_they_work() -> None:
    # 400: a collector that refuses the batch (no retries in the SDK, so the test is quick).
    collector = TracesOnlyCollector(refuse="/v1/traces", status=400)
    try:
        env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint, "OTEL_METRICS_EXPORTER": "none"}
        done = subprocess.run(
            [sys.executable, "-c", EXPORT_SPANS_THREE_TIMES_THEN_ONCE_MORE, collector.endpoint],
            env=env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    finally:
        collector.server.shutdown()

    assert done.returncode == 0 and "done" in done.stdout, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    failed = [line for line in lines if "exporting spans to" in line and "failed" in line]
    assert len(failed) == 1 and len(lines) == 2, done.stderr  # three failed exports, one message; then it works
    assert "400" in failed[0] and "OTEL_TRACES_EXPORTER=none" in failed[0] and "/v1/traces" in failed[0]
    assert "exporting spans to" in lines[1] and "works again" in lines[1]
