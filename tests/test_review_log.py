"""The fallback review log: one JSON line per fallback or validator failure, never the prompt text."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import API_KEYS, MESSAGES, PROMPT, EngineFactory, PolicyBuilder, hidden
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from llm_resilience import AllAttemptsFailed, Resilience
from llm_resilience.testing import Behavior, FakeProvider

FIELDS = {
    "time", "event", "trace_id", "route", "prompt_class", "attempt", "from_model", "to_model", "answered_by",
    "call_outcome", "outcome", "reason", "failed_checks", "check_details", "latency_s", "to_latency_s",
    "elapsed_s", "tokens_before", "tokens_after", "truncated", "input_tokens", "output_tokens", "prompt_sha256",
}  # fmt: skip


def read_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def canonical_sha256(messages: Any) -> str:
    text = json.dumps(messages, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "review.jsonl"


def with_log(policy: dict[str, Any], **review_log: Any) -> dict[str, Any]:
    policy["review_log"] = review_log
    return policy


def test_a_fallback_writes_one_line_with_every_field_and_no_prompt_text(
    big: FakeProvider,
    small: FakeProvider,
    make_engine: EngineFactory,
    policy_dict: PolicyBuilder,
    exporter: InMemorySpanExporter,
    log_path: Path,
) -> None:
    big.set(Behavior.error(503))
    engine = make_engine(with_log(policy_dict(["big", "small"]), path=str(log_path)))

    response = engine.completion("chat", MESSAGES)

    [line] = read_lines(log_path)
    assert set(line) == FIELDS
    assert line["event"] == "fallback"
    assert (line["from_model"], line["to_model"], line["answered_by"]) == ("big", "small", "small")
    assert (line["outcome"], line["reason"], line["call_outcome"]) == ("failure", "server_error", "answered")
    assert (line["route"], line["prompt_class"], line["attempt"]) == ("chat", "default", 0)
    attempts = hidden(response)["attempts"]
    assert line["latency_s"] == pytest.approx(attempts[0]["latency_s"], abs=1e-5)
    assert line["to_latency_s"] == pytest.approx(attempts[1]["latency_s"], abs=1e-5)
    assert line["elapsed_s"] >= line["latency_s"] + line["to_latency_s"]
    assert line["time"].endswith("Z") and line["time"][:4].isdigit()
    assert line["prompt_sha256"] == canonical_sha256(MESSAGES)
    call_span = next(s for s in exporter.get_finished_spans() if s.name.startswith("llm_resilience.completion"))
    assert line["trace_id"] == format(call_span.context.trace_id, "032x")
    text = log_path.read_text(encoding="utf-8")
    assert PROMPT not in text
    assert all(key not in text for key in API_KEYS.values())


def test_validator_failures_are_logged_with_the_failed_checks(
    big: FakeProvider, small: FakeProvider, make_engine: EngineFactory, policy_dict: PolicyBuilder, log_path: Path
) -> None:
    big.set(Behavior.json({"name": "Ada", "age": "old"}))
    small.set(Behavior(finish_reason="length", content='{"name": "Ada", "age": 36}'))
    route = {"chain": ["big", "small"], "validators": {"truncated": "flag"}}
    engine = make_engine(with_log(policy_dict(["big", "small"]) | {"routes": {"chat": route}}, path=str(log_path)))
    schema = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}

    engine.completion("chat", MESSAGES, response_format={"type": "json_schema", "json_schema": {"schema": schema}})

    fallback, flagged = read_lines(log_path)
    assert fallback["event"] == "fallback"
    assert (fallback["from_model"], fallback["to_model"]) == ("big", "small")
    assert (fallback["outcome"], fallback["reason"]) == ("soft_failure", "invalid_json")
    assert fallback["failed_checks"] == ["invalid_json"]
    assert fallback["check_details"] == {"invalid_json": "schema mismatch at $.age: type"}
    assert fallback["input_tokens"] is not None and fallback["output_tokens"] is not None  # the provider's usage
    assert flagged["event"] == "flagged"
    assert (flagged["from_model"], flagged["to_model"], flagged["answered_by"]) == ("small", None, "small")
    assert (flagged["reason"], flagged["call_outcome"]) == ("truncated", "flagged")
    assert "old" not in log_path.read_text(encoding="utf-8")  # details never quote the answer


def test_a_call_that_exhausts_on_invalid_answers_logs_each_failure(
    big: FakeProvider, small: FakeProvider, make_engine: EngineFactory, policy_dict: PolicyBuilder, log_path: Path
) -> None:
    big.set(Behavior(body="empty"))
    small.set(Behavior(body="empty"))
    engine = make_engine(with_log(policy_dict(["big", "small"]), path=str(log_path)))

    with pytest.raises(AllAttemptsFailed):
        engine.completion("chat", MESSAGES)

    lines = read_lines(log_path)
    assert [(x["event"], x["from_model"], x["to_model"], x["reason"]) for x in lines] == [
        ("fallback", "big", "small", "empty"),
        ("validator_failure", "small", None, "empty"),
    ]
    assert {x["call_outcome"] for x in lines} == {"failed"}
    assert {x["answered_by"] for x in lines} == {None}


def test_a_skip_for_context_size_is_a_fallback_with_token_counts(
    big: FakeProvider, small: FakeProvider, make_engine: EngineFactory, policy_dict: PolicyBuilder, log_path: Path
) -> None:
    policy = with_log(policy_dict(["small", "big"]), path=str(log_path))
    policy["models"]["small"]["context_window"] = 100
    messages = [{"role": "system", "content": "otters " * 300}, {"role": "user", "content": "hi"}]  # system: never cut

    engine = make_engine(policy)
    engine.completion("chat", messages)

    [line] = read_lines(log_path)
    assert (line["from_model"], line["to_model"], line["outcome"], line["reason"]) == (
        "small", "big", "skipped", "context_too_small",
    )  # fmt: skip
    assert line["tokens_before"] > 100
    assert line["prompt_sha256"] == canonical_sha256(messages)
    assert small.request_count == 0


def test_calls_without_fallback_or_validator_failure_write_nothing(
    big: FakeProvider, make_engine: EngineFactory, policy_dict: PolicyBuilder, log_path: Path
) -> None:
    engine = make_engine(with_log(policy_dict(["big", "small"]), path=str(log_path)))
    engine.completion("chat", MESSAGES)
    big.set(Behavior.error(400))  # raised at once: no fallback happened
    with pytest.raises(Exception, match="Invalid request"):
        engine.completion("chat", MESSAGES)

    assert read_lines(log_path) == []


def test_a_relative_path_is_relative_to_the_policy_file(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    big: FakeProvider,
    small: FakeProvider,
    policy_dict: PolicyBuilder,
) -> None:
    import yaml

    folder = tmp_path / "policies"
    folder.mkdir()
    policy_file = folder / "policy.yaml"
    policy_file.write_text(yaml.safe_dump(with_log(policy_dict(["big", "small"]), path="review.jsonl")))
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    big.set(Behavior.error(500))

    Resilience.from_file(policy_file).completion("chat", MESSAGES)

    assert len(read_lines(folder / "review.jsonl")) == 1
    assert not (elsewhere / "review.jsonl").exists()


def test_a_logger_sink_gets_the_same_json_lines(
    big: FakeProvider,
    make_engine: EngineFactory,
    policy_dict: PolicyBuilder,
    caplog: pytest.LogCaptureFixture,
) -> None:
    big.set(Behavior.error(503))
    engine = make_engine(with_log(policy_dict(["big", "small"]), logger="tests.review"))

    with caplog.at_level(logging.INFO, logger="tests.review"):
        engine.completion("chat", MESSAGES)

    records = [r for r in caplog.records if r.name == "tests.review"]
    assert len(records) == 1 and records[0].levelno == logging.INFO
    line = json.loads(records[0].getMessage())
    assert (line["from_model"], line["to_model"], line["reason"]) == ("big", "small", "server_error")
    assert PROMPT not in records[0].getMessage()


def test_record_content_opt_in_writes_the_prompt(
    big: FakeProvider, make_engine: EngineFactory, policy_dict: PolicyBuilder, log_path: Path
) -> None:
    big.set(Behavior.error(503))
    policy = with_log(policy_dict(["big", "small"]), path=str(log_path)) | {"telemetry": {"record_content": True}}
    engine = make_engine(policy)

    engine.completion("chat", MESSAGES)

    [line] = read_lines(log_path)
    assert line["prompt"] == MESSAGES


@pytest.mark.parametrize("where", ["missing_directory", "a_directory"])
def test_an_unwritable_log_never_breaks_a_call_and_warns_once(
    where: str,
    tmp_path: Path,
    big: FakeProvider,
    make_engine: EngineFactory,
    policy_dict: PolicyBuilder,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "no" / "such" / "dir" / "review.jsonl" if where == "missing_directory" else tmp_path
    big.set(Behavior.error(503))
    engine = make_engine(with_log(policy_dict(["big", "small"]), path=str(path)))

    with caplog.at_level(logging.WARNING, logger="llm_resilience"):
        for _ in range(3):
            response = engine.completion("chat", MESSAGES)
            assert hidden(response)["model"] == "small"

    warnings = [r for r in caplog.records if "review log" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING
    assert not any(r.levelno >= logging.ERROR for r in caplog.records)  # not a failing-hook traceback


def test_concurrent_calls_write_whole_lines(
    big: FakeProvider, make_engine: EngineFactory, policy_dict: PolicyBuilder, log_path: Path
) -> None:
    big.set(Behavior.error(503))
    engine = make_engine(with_log(policy_dict(["big", "small"]), path=str(log_path)))
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(5):
                engine.completion("chat", MESSAGES)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert errors == []
    lines = read_lines(log_path)  # every line parses: none was interleaved with another
    assert len(lines) == 40
    assert len({x["trace_id"] for x in lines}) == 40


def test_a_same_model_retry_is_not_a_fallback(
    big: FakeProvider, make_engine: EngineFactory, policy_dict: PolicyBuilder, log_path: Path
) -> None:
    route = {
        "chain": ["big", "small"],
        "retries": {"max_retries": 1, "retry_on": ["server_error"], "backoff_base_s": 0.01},
    }
    engine = make_engine(with_log(policy_dict(["big", "small"]) | {"routes": {"chat": route}}, path=str(log_path)))
    big.script(Behavior.error(503))

    response = engine.completion("chat", MESSAGES)

    assert [(a["model"], a["outcome"]) for a in hidden(response)["attempts"]] == [
        ("big", "failure"),
        ("big", "success"),
    ]
    assert read_lines(log_path) == []


# -- a stream broken after content, continued ------------------------------------------------------

WORDS = " ".join(f"w{i:02d}" for i in range(60))
STREAM_CLASSES = {
    "default": {"timeout_s": 5.0, "deadline_s": 10.0, "first_token_timeout_s": 4.0, "idle_timeout_s": 0.5}
}


def read_stream(mode: str, engine: Resilience) -> str:
    if mode == "sync":
        return "".join(c.choices[0].delta.content or "" for c in engine.completion("chat", MESSAGES, stream=True))

    async def run() -> str:
        stream = await engine.acompletion("chat", MESSAGES, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream])

    return asyncio.run(run())


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_stream_finished_by_a_continuation_says_continued_not_answered(
    mode: str,
    big: FakeProvider,
    small: FakeProvider,
    make_engine: EngineFactory,
    policy_dict: PolicyBuilder,
    log_path: Path,
) -> None:
    engine = make_engine(with_log(policy_dict(["big", "small"], prompt_classes=STREAM_CLASSES), path=str(log_path)))
    big.set(Behavior(content=WORDS, chunks=60, cut_after_chunks=20))
    small.set(Behavior(content=WORDS, chunks=30, continuation="proper"))

    assert read_stream(mode, engine) == WORDS

    [line] = read_lines(log_path)
    assert set(line) == FIELDS
    assert (line["event"], line["from_model"], line["to_model"]) == ("fallback", "big", "small")
    assert (line["outcome"], line["reason"]) == ("failure", "connection")
    assert (line["answered_by"], line["call_outcome"]) == ("small", "continued")  # small wrote only the rest


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_stream_the_same_model_continued_is_no_fallback(
    mode: str, big: FakeProvider, make_engine: EngineFactory, policy_dict: PolicyBuilder, log_path: Path
) -> None:
    engine = make_engine(with_log(policy_dict(["big"], prompt_classes=STREAM_CLASSES), path=str(log_path)))
    big.script(Behavior(content=WORDS, chunks=60, cut_after_chunks=20))
    big.set(Behavior(content=WORDS, chunks=30, continuation="proper"))

    assert read_stream(mode, engine) == WORDS

    assert big.request_count == 2
    assert read_lines(log_path) == []
