"""Spans as on-call sees them: exported over OTLP to a real Jaeger v2, read back from its query API.

The fixture starts the Jaeger all-in-one binary that ``scripts/jaeger.sh`` builds (``make test``
runs it first), on free loopback ports with in-memory storage, and stops it afterwards. Point the
test at a Jaeger you run yourself with ``JAEGER_QUERY_URL`` (e.g. ``http://localhost:16686``) and
``OTEL_EXPORTER_OTLP_ENDPOINT`` (e.g. ``http://localhost:4318``). Without a Go toolchain (so no
binary) the test skips and says so.

What the engineer must see, asserted on what Jaeger returns (``/api/traces``, what its UI shows):
one trace per call, whose root span's name (the search list's row) says how the call ended; the call
span's summary (path, answered_by, fallbacks, deadline, error only when the call failed, with a status
description); attempt spans in order with the error on the failed one, named and tagged as the GenAI
conventions say (model name without litellm's prefix, provider, request parameters); a skipped model as
a skip, not as a call; the breaker's transition with its cause; no boolean tag but Jaeger's own ``error``;
and no API key or prompt text anywhere.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _jaeger_server import JaegerFailed, JaegerUnavailable, get_json, running_jaeger
from conftest import API_KEYS, MESSAGES, PROMPT, PolicyBuilder
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from llm_resilience import AllAttemptsFailed, Resilience
from llm_resilience._tracing import otlp_exporter
from llm_resilience.testing import Behavior, FakeProvider

NS = "llm_resilience"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def jaeger(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(query API base URL, OTLP/HTTP endpoint) of a running Jaeger."""
    try:
        with running_jaeger(tmp_path_factory.mktemp("jaeger")) as endpoints:
            yield endpoints
    except JaegerUnavailable as why:
        pytest.skip(str(why))
    except JaegerFailed as why:
        pytest.fail(str(why))


def _tags(span: dict[str, Any]) -> dict[str, Any]:
    return {tag["key"]: tag["value"] for tag in span.get("tags", [])}


def _parent_id(span: dict[str, Any]) -> str | None:
    refs = [r for r in span.get("references", []) if r.get("refType") == "CHILD_OF"]
    return refs[0]["spanID"] if refs else None


class Trace:
    """One trace from the query API: its root (the call span) and the attempt spans in order."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        spans = data["spans"]
        roots = [s for s in spans if _parent_id(s) is None]
        assert len(roots) == 1, [s["operationName"] for s in spans]
        self.root = roots[0]
        self.tags = _tags(self.root)
        children = [s for s in spans if s is not self.root]
        assert all(_parent_id(s) == self.root["spanID"] for s in children)
        self.attempts = sorted(children, key=lambda s: _tags(s)[f"{NS}.attempt.index"])

    @property
    def names(self) -> list[str]:
        return [s["operationName"] for s in self.attempts]


def _search(query_url: str, service: str, tags: dict[str, str] | None = None) -> list[dict[str, Any]]:
    params = {"service": service, "limit": "50", "lookback": "1h"}
    if tags:
        params["tags"] = json.dumps(tags)
    return list(get_json(f"{query_url}/api/traces?{urllib.parse.urlencode(params)}")["data"] or [])


def test_traces_in_a_real_jaeger_read_at_first_glance(
    jaeger: tuple[str, str],
    policy_dict: PolicyBuilder,
    big: FakeProvider,
    small: FakeProvider,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    query_url, otlp_endpoint = jaeger
    service = f"llm-resilience-test-{uuid.uuid4().hex[:12]}"
    # The project's own OTLP exporter choice, pointed at Jaeger by the standard variable.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"{otlp_endpoint}/v1/traces")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf")
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(otlp_exporter("traces")))
    reset_s = 2.0  # long enough for calls 3 and 4 to find big's breaker open, short to wait for the probe
    policy = policy_dict(["big", "small"], timeout_s=1.0, breakers={"big": {"fail_max": 1, "reset_timeout_s": reset_s}})
    engine = Resilience.from_dict(policy, tracer_provider=provider)

    engine.completion("chat", MESSAGES, temperature=0.3, max_tokens=50)  # 1. big answers
    big.set(Behavior.slow(3.0))
    engine.completion("chat", MESSAGES)  # 2. big times out, its breaker opens, small answers
    engine.completion("chat", MESSAGES)  # 3. big skipped (breaker open), small answers
    small.set(Behavior.error(500))
    with pytest.raises(AllAttemptsFailed):
        engine.completion("chat", MESSAGES)  # 4. big skipped, small fails: the call fails
    big.set(Behavior.ok())
    time.sleep(reset_s)  # the breaker's reset timeout runs on the wall clock
    engine.completion("chat", MESSAGES)  # 5. big's half-open probe answers: the breaker closes
    assert provider.force_flush(10_000)
    provider.shutdown()

    deadline = time.monotonic() + 20
    found: list[dict[str, Any]] = []
    while time.monotonic() < deadline:  # Jaeger stores what it receives in a batch: poll until all four are in
        found = _search(query_url, service)
        if len(found) >= 5 and sum(len(t["spans"]) for t in found) >= 13:
            break
        time.sleep(0.2)
    traces = sorted((Trace(t) for t in found), key=lambda t: t.root["startTime"])
    assert len(traces) == 5, [[s["operationName"] for s in t["spans"]] for t in found]  # one trace per call
    plain, timed_out, skipped, failed, probe = traces

    # The search list: one row per call, named after the root span. A rescued call and a failed one
    # no longer look alike there (both have an error span).
    assert [t.root["operationName"] for t in traces] == [
        f"{NS}.completion chat {outcome}" for outcome in ("answered", "rescued", "rescued", "failed", "answered")
    ]
    for t in traces:
        assert t.data["processes"][t.root["processID"]]["serviceName"] == service
        assert _tags(t.root)["span.kind"] == "internal"
        assert not [k for k in t.tags if k.startswith("gen_ai.")]  # the call span is not a model call
        assert t.tags[f"{NS}.deadline_ms"] == 5000
        # Jaeger shows booleans in red: the only one is its own error flag.
        booleans = [
            (s["operationName"], tag["key"]) for s in t.data["spans"] for tag in s["tags"] if tag["type"] == "bool"
        ]
        assert {key for _name, key in booleans} <= {"error"}, booleans

    # 1. A plain call: one attempt, no error anywhere.
    assert plain.names == ["chat gpt-4o"]  # GenAI: the model name sent, not litellm's "openai/gpt-4o"
    genai = _tags(plain.attempts[0])
    assert (genai["gen_ai.request.model"], genai["gen_ai.provider.name"]) == ("gpt-4o", "openai")
    assert (genai["gen_ai.request.temperature"], genai["gen_ai.request.max_tokens"]) == (0.3, 50)
    assert (genai["gen_ai.operation.name"], genai["server.address"]) == ("chat", "127.0.0.1")
    assert re.fullmatch(r"big: ok in \d+ ms", plain.tags[f"{NS}.path"])
    assert (plain.tags[f"{NS}.answered_by"], plain.tags[f"{NS}.fallbacks"]) == ("big", 0)
    assert "error" not in plain.tags

    # 2. A fallback: the failed attempt is red and says why and how long; the call is not red.
    assert timed_out.names == ["chat gpt-4o", "chat gpt-4o-mini"]
    assert re.fullmatch(
        r"big: timeout after \d+ ms \(attempt bound 1000 ms\), breaker opened → small: ok in \d+ ms",
        timed_out.tags[f"{NS}.path"],
    ), timed_out.tags[f"{NS}.path"]
    assert (timed_out.tags[f"{NS}.answered_by"], timed_out.tags[f"{NS}.fallbacks"]) == ("small", 1)
    assert "error" not in timed_out.tags
    first, second = (_tags(s) for s in timed_out.attempts)
    assert first["error"] is True
    assert (first["error.type"], first[f"{NS}.reason"], first[f"{NS}.cut_by"]) == ("Timeout", "timeout", "attempt")
    assert first[f"{NS}.bound.attempt_ms"] == 1000
    assert first["otel.status_description"] == "timeout (Timeout): cut by the attempt bound of 1000 ms"
    assert first["span.kind"] == "client" and first["gen_ai.request.model"] == "gpt-4o"
    assert timed_out.attempts[0]["duration"] >= 1_000_000  # µs: it waited its timeout
    assert "error" not in second and second["gen_ai.response.model"] == "gpt-4o-mini"
    transition = {f["key"]: f["value"] for f in timed_out.attempts[0]["logs"][0]["fields"]}
    assert transition["event"] == f"{NS}.breaker.transition"
    assert (transition[f"{NS}.breaker.from"], transition[f"{NS}.breaker.to"]) == ("closed", "open")
    assert transition[f"{NS}.breaker.cause"] == "consecutive_failures"
    assert transition[f"{NS}.breaker.last_failure"] == "timeout"
    assert f"{NS}.breaker.open_until" in transition

    # 3. After the breaker opened: big is a skip, not a call (no request, no server, no error).
    assert skipped.names == ["skip big", "chat gpt-4o-mini"]
    skip = _tags(skipped.attempts[0])
    assert skip["span.kind"] == "internal"
    assert skip[f"{NS}.reason"] == "breaker_open" and skip[f"{NS}.breaker.state"] == "open"
    assert not [k for k in skip if k.startswith(("server.", "gen_ai."))] and "error" not in skip
    assert re.fullmatch(r"big: skipped, breaker_open until \S+Z → small: ok in \d+ ms", skipped.tags[f"{NS}.path"])

    # 4. A failed call: the call span is red and says what failed; so is the failed attempt.
    assert failed.names == ["skip big", "chat gpt-4o-mini"]
    assert failed.tags["error"] is True
    assert failed.tags["otel.status_description"] == "AllAttemptsFailed: big breaker_open, small server_error"
    assert (failed.tags["error.type"], failed.tags[f"{NS}.call_outcome"]) == ("AllAttemptsFailed", "failed")
    assert f"{NS}.answered_by" not in failed.tags
    assert _tags(failed.attempts[1])["error"] is True
    assert _tags(failed.attempts[1])["error.type"] == "InternalServerError"
    assert "error" not in _tags(failed.attempts[0])

    # 5. The probe: the attempt carries both transitions, open -> half-open and half-open -> closed.
    assert probe.names == ["chat gpt-4o"]
    assert _tags(probe.attempts[0])[f"{NS}.breaker.admission"] == "probe"
    assert re.fullmatch(r"big: ok in \d+ ms \(probe\), breaker closed", probe.tags[f"{NS}.path"])
    moves = [{f["key"]: f["value"] for f in log["fields"]} for log in probe.attempts[0]["logs"]]
    assert [(m[f"{NS}.breaker.to"], m[f"{NS}.breaker.cause"]) for m in moves] == [
        ("half-open", "reset_timeout_elapsed"),
        ("closed", "probe_succeeded"),
    ]

    # The searches the README gives find what they promise (tags match on any span of a trace).
    by_tag = {
        "fallbacks=1": _search(query_url, service, {f"{NS}.fallbacks": "1"}),
        "error.type=Timeout": _search(query_url, service, {"error.type": "Timeout"}),
        "reason=breaker_open": _search(query_url, service, {f"{NS}.reason": "breaker_open"}),
        "call_outcome=failed": _search(query_url, service, {f"{NS}.call_outcome": "failed"}),
        "admission=probe": _search(query_url, service, {f"{NS}.breaker.admission": "probe"}),
        "call_outcome=rescued": _search(query_url, service, {f"{NS}.call_outcome": "rescued"}),
        "cut_by=attempt": _search(query_url, service, {f"{NS}.cut_by": "attempt"}),
        "request.model=gpt-4o": _search(query_url, service, {"gen_ai.request.model": "gpt-4o"}),
        "cause=consecutive_failures": _search(query_url, service, {f"{NS}.breaker.cause": "consecutive_failures"}),
    }
    ids = {name: {t["traceID"] for t in hits} for name, hits in by_tag.items()}
    assert ids["fallbacks=1"] == {timed_out.data["traceID"], skipped.data["traceID"], failed.data["traceID"]}
    assert ids["error.type=Timeout"] == {timed_out.data["traceID"]}
    assert ids["reason=breaker_open"] == {skipped.data["traceID"], failed.data["traceID"]}
    assert ids["call_outcome=failed"] == {failed.data["traceID"]}
    assert ids["admission=probe"] == {probe.data["traceID"]}
    assert ids["call_outcome=rescued"] == {timed_out.data["traceID"], skipped.data["traceID"]}
    assert ids["cut_by=attempt"] == {timed_out.data["traceID"]}
    assert ids["request.model=gpt-4o"] == {plain.data["traceID"], timed_out.data["traceID"], probe.data["traceID"]}
    # The operation the search list shows is one of the search form's choices, and finds only those calls.
    params = {"service": service, "operation": f"{NS}.completion chat failed", "limit": "50", "lookback": "1h"}
    by_operation = get_json(f"{query_url}/api/traces?{urllib.parse.urlencode(params)}")["data"]
    assert {t["traceID"] for t in by_operation} == {failed.data["traceID"]}
    assert ids["cause=consecutive_failures"] == {timed_out.data["traceID"]}  # event attributes are searched too

    # Nothing secret went to Jaeger.
    everything = json.dumps(found)
    for secret in (PROMPT, "otter", *API_KEYS.values()):
        assert secret not in everything


def test_the_trace_examples_page_still_reads_as_it_says(jaeger: tuple[str, str]) -> None:
    """``scripts/trace_examples.py --check``: every fault kind's search-list row is still the one the page shows."""
    query_url, otlp_endpoint = jaeger
    env = {**os.environ, "JAEGER_QUERY_URL": query_url, "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_endpoint}
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "trace_examples.py"), "--check"],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
