"""The span schema table of the on-call guide (docs/guides/on-call.md) is what the code emits: every
span matches a row, carries the row's "always" attributes, and carries nothing the row does not list."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import MESSAGES, EngineFactory, PolicyBuilder
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from llm_resilience import AllAttemptsFailed
from llm_resilience.testing import Behavior, FakeProvider

ON_CALL_GUIDE = Path(__file__).resolve().parent.parent / "docs" / "guides" / "on-call.md"


@dataclass
class Row:
    span: str
    kind: str
    name: re.Pattern[str]
    always: set[str]
    optional: set[str]


def schema_rows() -> dict[str, Row]:
    text = ON_CALL_GUIDE.read_text()
    section = text.split("## Span schema", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 5 or cells[0] in ("span", "---"):
            continue
        span, kind, name, always, optional = cells
        # ROUTE, MODEL, LITELLM_MODEL: placeholders for what varies
        pattern = re.sub(r"[A-Z][A-Z_]+", ".+", re.escape(name.strip("`")).replace(r"\ ", " "))
        rows[span] = Row(
            span,
            kind,
            re.compile(pattern),
            set(re.findall(r"`([^`]+)`", always)),
            set(re.findall(r"`([^`]+)`", optional)),
        )
    return rows


def row_for(span: ReadableSpan, rows: dict[str, Row]) -> Row:
    matches = [
        r for r in rows.values() if r.kind == SpanKind(span.kind).name and r.name.fullmatch(span.name) is not None
    ]
    assert len(matches) == 1, (span.name, span.kind, [r.span for r in matches])
    return matches[0]


def check(span: ReadableSpan, row: Row) -> None:
    keys = set(span.attributes or {})
    assert row.always <= keys, (span.name, sorted(row.always - keys))
    assert keys <= row.always | row.optional, (span.name, sorted(keys - row.always - row.optional))


def test_the_readme_table_has_the_four_rows() -> None:
    rows = schema_rows()
    assert set(rows) == {"call", "attempt", "skip", "breaker event"}
    assert "llm_resilience.path" in rows["call"].always
    assert "gen_ai.request.model" in rows["attempt"].always


def test_every_span_and_event_matches_the_readme_schema(
    make_engine: EngineFactory,
    policy_dict: PolicyBuilder,
    exporter: InMemorySpanExporter,
    big: FakeProvider,
    small: FakeProvider,
    tiny: FakeProvider,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("LLMR_SCHEMA_MISSING_KEY", raising=False)
    policy = policy_dict(timeout_s=0.3, breakers={"big": {"fail_max": 1, "reset_timeout_s": 0.3}})
    policy["models"]["tiny"]["litellm_params"]["api_key"] = "os.environ/LLMR_SCHEMA_MISSING_KEY"
    engine = make_engine(policy)
    big.set(Behavior.error(500))
    small.set(Behavior.slow(2.0))
    with pytest.raises(AllAttemptsFailed):  # big fails (breaker opens), small times out, tiny has no key
        engine.completion("chat", MESSAGES)
    small.set(Behavior.ok())
    engine.completion("chat", MESSAGES)  # big skipped (open), small answers
    big.set(Behavior.ok())
    time.sleep(0.35)  # the breaker's reset timeout runs on the wall clock
    engine.completion("chat", MESSAGES)  # big's probe answers

    rows = schema_rows()
    seen: dict[str, int] = {}
    events = 0
    spans = exporter.get_finished_spans()
    for span in spans:
        row = row_for(span, rows)
        check(span, row)
        seen[row.span] = seen.get(row.span, 0) + 1
        for event in span.events:
            assert event.name == "llm_resilience.breaker.transition"
            keys = set(event.attributes or {})
            event_row = rows["breaker event"]
            assert event_row.always <= keys <= event_row.always | event_row.optional, sorted(keys)
            events += 1
    assert set(seen) == {"call", "attempt", "skip"}, seen
    assert events >= 3  # opened; half-open and closed on the probe
