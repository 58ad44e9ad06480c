"""The fallback review log: one JSON line per fallback and per validator failure.

The incident review asked that answers served by a fallback model can be reviewed later.
With ``review_log:`` in the policy, every call that fell back or failed a validator
appends one line per such event, written when the call ends (only then is the model it
moved to known)::

    {"time": "2026-11-24T18:32:42.125Z", "event": "fallback", "trace_id": "4bf92f35...",
     "route": "chat", "prompt_class": "default", "attempt": 0,
     "from_model": "big", "to_model": "small", "answered_by": "small", "call_outcome": "answered",
     "outcome": "failure", "reason": "timeout", "failed_checks": null, "check_details": null,
     "latency_s": 0.301, "to_latency_s": 0.012, "elapsed_s": 0.315,
     "tokens_before": null, "tokens_after": null, "truncated": false,
     "input_tokens": null, "output_tokens": null,
     "prompt_sha256": "9f86d081..."}

Events, per attempt of the call:

``fallback``
    The attempt failed, was skipped (breaker open, context too small...), failed a
    ``fall_back`` validator, or lost a hedge, and the call moved on to ``to_model``.
    A hard failure followed by a same-model retry is not a fallback and is not logged.
``flagged``
    The answer was returned although a ``flag`` validator failed.
``validator_failure``
    A ``fall_back`` validator failed on the last model: the call raised, or (with
    ``on_all_invalid: return_best``) returned this answer (``call_outcome``
    ``returned_as_best``).

``call_outcome`` says how the call ended: ``answered`` (``answered_by`` wrote the whole
answer), ``continued`` (a stream broke after delivering text and ``answered_by`` was asked to
continue it: the caller's answer is joined, its head from the broken stream), ``flagged``,
``returned_as_best`` or ``failed``. A stream continued by the model whose stream broke (a
one-model route, or a same-model retry) is, like a retry, no fallback and writes no line.

``time`` is when the attempt ended (UTC); ``trace_id`` the call span's trace id when it is
recorded (else ``null``), so a line leads to its trace. ``to_latency_s`` is the latency of
the attempt at ``to_model``, ``elapsed_s`` the whole call's. ``tokens_*`` are the
truncation counts (``null`` when the prompt was not counted, see ``_truncation.py``);
``input_tokens``/``output_tokens`` the provider's usage for this attempt, when it answered.
``prompt_sha256`` hashes the caller's messages as canonical JSON (sorted keys, no spaces,
UTF-8), so identical prompts hash alike across lines and processes; the text itself is
written (``prompt``, and ``answer`` for the returned answer) only with
``telemetry.record_content: true``.

Sinks: ``path`` (appended; a relative path is relative to the policy file, or to the
working directory for policies not loaded from a file) and/or ``logger`` (INFO records of
that Python logger, the line as message). Lines of one call are written together under a
lock and flushed. A sink that cannot be written (missing directory, a directory, disk
full, permissions) never fails the call: a warning is logged once, and later calls keep
trying silently, so the log resumes when the problem is fixed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._hooks import Hook
from ._outcomes import AttemptRecord

if TYPE_CHECKING:
    from ._planner import Call
    from ._policy import Policy
    from ._tracing import TracingHook

log = logging.getLogger("llm_resilience")

_NOT_ANSWERS = ("failure", "soft_failure", "skipped")


@dataclass
class _CallState:
    trace_id: str | None
    started: float
    ended_at: dict[int, float] = field(default_factory=dict)
    usage: dict[int, tuple[int | None, int | None]] = field(default_factory=dict)


class ReviewLogHook(Hook):
    """Writes the review log (see the module docstring). One instance per engine."""

    def __init__(
        self,
        path: str | Path | None = None,
        logger: str | None = None,
        *,
        record_content: bool = False,
        tracing: TracingHook | None = None,
    ) -> None:
        self.path = Path(path) if path is not None else None
        self.logger = logging.getLogger(logger) if logger is not None else None
        self.record_content = record_content
        self.tracing = tracing
        self._lock = threading.Lock()
        self._warned = False

    @classmethod
    def from_policy(cls, policy: Policy, tracing: TracingHook | None = None) -> ReviewLogHook | None:
        """The hook for ``policy.review_log``, or ``None`` when the policy has none."""
        doc = policy.document
        cfg = doc.review_log
        if cfg is None:
            return None
        path: Path | None = None
        if cfg.path is not None:
            path = Path(cfg.path).expanduser()
            source = Path(policy.source)
            if not path.is_absolute() and not policy.source.startswith("<") and source.is_file():
                path = source.parent / path
            path = path.absolute()  # fixed now: a later chdir must not move the log
        return cls(path, cfg.logger, record_content=doc.telemetry.record_content, tracing=tracing)

    # -- events ----------------------------------------------------------------------------------

    def call_started(self, call: Call) -> None:
        call.hook_data[self] = _CallState(trace_id=self._trace_id(call), started=time.time())

    def attempt_ended(self, call: Call, record: AttemptRecord, response: Any) -> None:
        state = call.hook_data.get(self)
        if state is None:
            return
        state.ended_at[record.index] = time.time()
        usage = getattr(response, "usage", None) if response is not None else None
        if usage is not None:
            state.usage[record.index] = (
                _int_or_none(getattr(usage, "prompt_tokens", None)),
                _int_or_none(getattr(usage, "completion_tokens", None)),
            )

    def call_ended(self, call: Call, response: Any, error: BaseException | None) -> None:
        state = call.hook_data.pop(self, None)
        if state is None:
            return
        lines = self._lines(call, state, response)
        if lines:
            self._write(lines)

    # -- what is written -------------------------------------------------------------------------

    def _trace_id(self, call: Call) -> str | None:
        span = self.tracing.call_span(call) if self.tracing is not None else None
        if span is None or not span.is_recording():
            return None
        return format(span.get_span_context().trace_id, "032x")

    def _lines(self, call: Call, state: _CallState, response: Any) -> list[str]:
        records = call.records
        answered = call.answered_by
        events: list[tuple[AttemptRecord, str, AttemptRecord | None]] = []
        for i, record in enumerate(records):
            after = records[i + 1] if i + 1 < len(records) else None
            if record is answered:
                if record.outcome == "flagged":
                    events.append((record, "flagged", None))
                elif record.outcome == "soft_failure":  # returned as the best of invalid answers
                    events.append((record, "validator_failure", None))
            elif record.outcome == "cancelled":
                # Only a hedge that lost to a later model is a fallback; one abandoned because
                # an earlier model answered is not.
                if answered is not None and answered.index > record.index:
                    events.append((record, "fallback", after))
            elif record.outcome in _NOT_ANSWERS and after is not None:
                if record.outcome == "soft_failure" or not _is_retry(after, record):
                    events.append((record, "fallback", after))
            elif record.outcome == "soft_failure":
                events.append((record, "validator_failure", None))
        if not events:
            return []
        if answered is None:
            call_outcome = "failed"
        elif answered.outcome == "soft_failure":
            call_outcome = "returned_as_best"
        elif answered.outcome == "flagged":
            call_outcome = "flagged"
        elif answered.extra.get("join"):
            # A stream broke after delivering text and this attempt finished it: the answer is
            # joined, its head from the broken stream(s), only the rest from ``answered_by``.
            call_outcome = "continued"
        else:
            call_outcome = "answered"
        now = time.time()
        base: dict[str, Any] = {
            "trace_id": state.trace_id,
            "route": call.route.name,
            "prompt_class": call.prompt_class,
        }
        digest = prompt_sha256(call.request.messages)
        lines = []
        for record, event, to in events:
            checks = record.extra.get("failed_checks")
            details = {str(c): c.detail for c in checks or () if getattr(c, "detail", None)}
            input_tokens, output_tokens = state.usage.get(record.index, (None, None))
            line: dict[str, Any] = {
                "time": _iso(state.ended_at.get(record.index, now)),
                "event": event,
                **base,
                "attempt": record.index,
                "from_model": record.model,
                "to_model": to.model if to is not None else None,
                "answered_by": answered.model if answered is not None else None,
                "call_outcome": call_outcome,
                "outcome": record.outcome,
                "reason": record.reason or record.outcome,
                "failed_checks": [str(c) for c in checks] if checks else None,
                "check_details": details or None,
                "latency_s": round(record.latency_s, 6),
                "to_latency_s": round(to.latency_s, 6) if to is not None else None,
                "elapsed_s": round(now - state.started, 6),
                "tokens_before": record.tokens_before,
                "tokens_after": record.tokens_after,
                "truncated": record.truncated,
                "input_tokens": input_tokens,
                "output_tokens": output_tokens,
                "prompt_sha256": digest,
            }
            if self.record_content:
                line["prompt"] = _jsonable(call.request.messages)
                if record is answered and response is not None:
                    line["answer"] = _answer_text(response)
            lines.append(json.dumps(line, ensure_ascii=False, default=str))
        return lines

    # -- sinks -----------------------------------------------------------------------------------

    def _write(self, lines: list[str]) -> None:
        if self.logger is not None:
            for line in lines:
                self.logger.info(line)
        if self.path is None:
            return
        data = "".join(line + "\n" for line in lines)
        with self._lock:
            try:
                # Opened per write: follows log rotation, and O_APPEND keeps lines of several
                # processes whole. Only calls that fell back pay for it.
                with self.path.open("a", encoding="utf-8") as f:
                    f.write(data)
                    f.flush()
            except (OSError, ValueError) as e:
                if not self._warned:
                    self._warned = True
                    log.warning(
                        "review log %s cannot be written (%s: %s); calls go on, fallbacks are not logged there "
                        "until it can be written (this warning is shown once)",
                        self.path, type(e).__name__, e,
                    )  # fmt: skip


def _is_retry(after: AttemptRecord, record: AttemptRecord) -> bool:
    # A same-model retry (``retries:`` in the policy), or a model asked to continue its own broken
    # stream (sent or skipped), is not a fallback: the model did not change.
    return after.model == record.model


def prompt_sha256(messages: Any) -> str:
    """SHA-256 of the messages as canonical JSON (sorted keys, compact, UTF-8)."""
    canonical = json.dumps(_jsonable(messages), sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


def _jsonable(messages: Any) -> Any:
    out = []
    for m in messages:
        dump = getattr(m, "model_dump", None)
        out.append(dump(exclude_none=True) if callable(dump) else m)
    return out


def _answer_text(response: Any) -> str | None:
    choices = getattr(response, "choices", None) or []
    message = getattr(choices[0], "message", None) if choices else None
    content = getattr(message, "content", None)
    return content if isinstance(content, str) else None


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) else None
