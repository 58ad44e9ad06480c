"""Streaming driver: fall back until the first token, then commit.

``completion(..., stream=True)`` walks the chain like a non-stream call (same
:class:`~._planner.Call` decisions: breakers, deadline, skips), but an attempt only
*wins* when its first content chunk arrives. Until then nothing has reached the caller,
so a stream that is slow to start (``first_token_timeout_s``), fails to open, or breaks
before any content is abandoned (its connection closed) and the next model is tried;
chunks it sent before content (a role-only chunk, say) are discarded with it. Once the
first content chunk is handed out the attempt is committed (:meth:`Call.commit`): its
chunks pass straight through, and if it then breaks (an exception, a gap longer than
``idle_timeout_s``, an end without a finish reason) :class:`StreamInterrupted` is raised,
because replaying another model would duplicate or mix output. "Content" is text, tool
calls or reasoning text: a model that is reasoning is alive, and what it sends is output.
Only the wait for the first token is bounded by the call's deadline (the planner caps the
first-token timeout by the time left); a committed stream runs as long as chunks keep
coming within the idle timeout, since cutting a healthy answer would only turn it into a
``StreamInterrupted``.

When a stream ends normally the chunks are assembled (``litellm.stream_chunk_builder``)
and reported as the attempt's response, so validators and breakers see it. If a
validator then says ``fall_back``, the caller already has the text: the verdict is
recorded (outcome ``flagged``, the failure counts toward the breaker) and the stream
ends normally; it is never followed by another model's output. A stream that ends
before any content (an empty answer) is still invisible to the caller, so there a
failed validation falls back as usual.

The attempt span stays open until the stream ends: outcomes are reported only then.
Closing the stream early (``close()``/``aclose()``, ``break`` out of a loop over a
temporary, garbage collection, cancelling the task) closes the provider connection and
ends the call with the attempt ``cancelled``.

Timeouts:

* async: ``asyncio.timeout`` around each read (the opening request included) is exact,
  and cancelling the read closes its connection.
* sync: a blocking socket read cannot be interrupted from its own thread, and litellm's
  ``timeout`` is a *per-read* timeout fixed when the request is sent, so it cannot be
  the first-token timeout for the first reads and the idle timeout afterwards. Each
  sync attempt is therefore read by a helper thread, one chunk per request from the
  caller, and the caller's thread waits on a queue with the exact timeout. On a timeout
  the helper's socket is shut down (which, unlike ``close()``, wakes a read blocked in
  another thread), so the provider sees the disconnect at once; the helper then closes
  the stream itself. Reading only on demand keeps litellm's back-pressure: nothing is
  read ahead of the caller. litellm still gets a per-read timeout, a little above both
  of ours, as a backstop so a helper can never hang (and, while the request is still
  waiting for response headers, there is no socket to shut down yet: an abandoned
  request is then closed when that backstop fires).

The sync and async drivers share one sans-I/O core (:class:`_StreamCore`) that makes
every decision; they only differ in how they read a chunk with a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import queue
import re
import socket
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import httpx

from . import _drivers, _litellm_calls
from ._env import litellm
from ._exceptions import StreamInterrupted
from ._outcomes import classify_error
from ._planner import Attempt, Call, Done, Fail, Launch, Wait

log = logging.getLogger("llm_resilience")

Clock = Callable[[], float]


class FirstTokenTimeout(TimeoutError):
    """No content chunk arrived within the prompt class's ``first_token_timeout_s``.

    Recorded as the attempt's error (kind ``timeout``, so it counts toward the breaker);
    the caller sees it only as the ``__cause__`` of :class:`AllAttemptsFailed`.
    """


class StreamIdleTimeout(TimeoutError):
    """No chunk arrived within ``idle_timeout_s`` of the previous one (raised as the cause of ``StreamInterrupted``)."""


class IncompleteStream(ConnectionError):
    """The stream ended without a finish reason (kind ``connection``)."""


# -- what a reader reports -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Event:
    kind: Literal["chunk", "end", "error", "timeout"]
    chunk: Any = None
    error: Exception | None = None


_END = _Event("end")
_TIMED_OUT = _Event("timeout")


def _has_content(chunk: Any) -> bool:
    """A chunk that carries output (text, tool calls, reasoning): what the first-token timeout waits for."""
    for choice in getattr(chunk, "choices", None) or ():
        delta = getattr(choice, "delta", None)
        if delta is None:
            continue
        for name in ("content", "tool_calls", "function_call", "reasoning_content"):
            if getattr(delta, name, None):
                return True
    return False


def _text(chunk: Any) -> str:
    parts = []
    for choice in getattr(chunk, "choices", None) or ():
        content = getattr(getattr(choice, "delta", None), "content", None)
        if isinstance(content, str):
            parts.append(content)
    return "".join(parts)


def _has_finish_reason(chunks: list[Any]) -> bool:
    return any(getattr(c, "finish_reason", None) for chunk in chunks for c in getattr(chunk, "choices", None) or ())


def _stream_kwargs(attempt: Attempt) -> dict[str, Any]:
    kwargs = dict(attempt.kwargs)
    kwargs["stream"] = True
    # Our own timers are exact; litellm's per-read timeout is only a backstop that must never
    # fire before them, so it sits a little above the larger of the two. A caller's
    # stream_timeout would replace it (litellm prefers it for streams): the policy's stream
    # timeouts govern instead.
    kwargs.pop("stream_timeout", None)
    first = attempt.first_token_timeout_s or attempt.timeout_s
    idle = attempt.idle_timeout_s or attempt.timeout_s
    longest = max(first, idle)
    kwargs["timeout"] = longest + max(0.05, 0.1 * longest)
    return kwargs


def _describe(error: BaseException) -> str:
    inner = getattr(error, "original_exception", None) or error  # litellm's MidStreamFallbackError wraps the cause
    # The kind and type only: provider messages may echo request details.
    return f"{classify_error(error)} error ({type(inner).__name__})"


# -- malformed events ----------------------------------------------------------------------------

_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
SKIPPED_EVENT = "llm_resilience.stream.event_skipped"
"""The span event recorded on an attempt for each malformed SSE event skipped in place."""


class SSEFilter:
    """Drops a malformed server-sent event in place when the event after it parses.

    Fed the raw bytes of an event stream, it hands on whole events only. An event whose ``data``
    is not JSON (nor ``[DONE]``) is held back; if the next event parses, the bad one is dropped
    (counted in ``skipped``) and the stream goes on as if it had never been sent. Two in a row,
    or a bad event at the end, cannot be judged safe to skip: they are handed on, and the SDK
    fails the attempt on them as it would have. So is a bad event before any good one: then
    nothing has reached the caller, and failing over loses nothing, while skipping would lose
    whatever the event carried. Pure bytes in, bytes out.
    """

    def __init__(self) -> None:
        self.skipped = 0
        self._buffer = b""
        self._suspect: bytes | None = None
        self._seen_data = False

    def feed(self, data: bytes) -> bytes:
        self._buffer += data
        out: list[bytes] = []
        while (found := _EVENT_END.search(self._buffer)) is not None:
            event, self._buffer = self._buffer[: found.end()], self._buffer[found.end() :]
            out.append(self._judge(event))
        return b"".join(out)

    def end(self) -> bytes:
        """The body ended: whatever is held goes on (a bad last event is not known to be skippable)."""
        rest, self._suspect, self._buffer = (self._suspect or b"") + self._buffer, None, b""
        return rest

    def _judge(self, event: bytes) -> bytes:
        if _event_parses(event):
            self._seen_data = self._seen_data or b"data:" in event
            if self._suspect is not None:
                self._suspect = None  # the stream went on normally after it: drop it
                self.skipped += 1
            return event
        if self._suspect is not None:  # two bad events in a row: not a glitch; let the attempt fail
            held, self._suspect = self._suspect, None
            return held + event
        if not self._seen_data:
            return event
        self._suspect = event
        return b""


def _event_parses(event: bytes) -> bool:
    lines = [line for line in event.splitlines() if line.startswith(b"data:")]
    if not lines:
        return True  # a comment, a keep-alive, an event name: nothing the SDK parses
    data = b"\n".join(line[5:].removeprefix(b" ") for line in lines)
    if data.strip() == b"[DONE]":
        return True
    try:
        json.loads(data)
    except ValueError:
        return False
    return True


_filters: contextvars.ContextVar[list[SSEFilter] | None] = contextvars.ContextVar("llm_resilience_sse", default=None)
"""The filters of the attempt being read in this context (its reader sets it; the HTTP hook adds to it)."""


def _is_event_stream(response: Any) -> bool:
    return str(response.headers.get("content-type", "")).startswith("text/event-stream")


def _new_filter() -> SSEFilter:
    sse = SSEFilter()
    sink = _filters.get()
    if sink is not None:
        sink.append(sse)
    return sse


class _FilteredStream(httpx.SyncByteStream):
    """A sync httpx byte stream that passes through an :class:`SSEFilter`."""

    def __init__(self, inner: Any, sse: SSEFilter) -> None:
        self._inner, self._sse = inner, sse

    def __iter__(self) -> Iterator[bytes]:
        for data in self._inner:
            if out := self._sse.feed(data):
                yield out
        if rest := self._sse.end():
            yield rest

    def close(self) -> None:
        self._inner.close()


class _AsyncFilteredStream(httpx.AsyncByteStream):
    """:class:`_FilteredStream` for httpx's async byte streams."""

    def __init__(self, inner: Any, sse: SSEFilter) -> None:
        self._inner, self._sse = inner, sse

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for data in self._inner:
            if out := self._sse.feed(data):
                yield out
        if rest := self._sse.end():
            yield rest

    async def aclose(self) -> None:
        await self._inner.aclose()


def _skip_malformed_events(response: Any) -> None:
    """httpx response hook (sync clients): event streams go through an :class:`SSEFilter`."""
    if _is_event_stream(response):
        response.stream = _FilteredStream(response.stream, _new_filter())


async def _askip_malformed_events(response: Any) -> None:
    """httpx response hook (async clients)."""
    if _is_event_stream(response):
        response.stream = _AsyncFilteredStream(response.stream, _new_filter())


def _with_event_filter(http: Any) -> None:
    """Add the filtering hook to a leased sync httpx client (once; other responses are untouched)."""
    hooks = http.event_hooks
    if _skip_malformed_events not in hooks.get("response", []):
        http.event_hooks = {**hooks, "response": [*hooks.get("response", []), _skip_malformed_events]}


# -- joining a continuation -------------------------------------------------------------------

MIN_OVERLAP_CHARS = 16
"""A repeated tail this long is removed even when it does not fall on word boundaries."""

_SPACE_AFTER = ".,;:!?"


class Join:
    """Joins a continuation onto the text the caller already has, so nothing is read twice.

    ``feed`` takes the continuation's text as it streams and returns what may be handed out
    (``None`` while the head is held back). An exact join (an assistant prefill: the model writes
    on from the last character) passes everything through. Otherwise the head is held while it
    could still be a repeat of the delivered text: a model that starts over from the beginning,
    or repeats the last words, is only known once its head stops matching. Then the repeated
    part is dropped: the whole delivered text (a restart, any length), else the longest
    repeated tail of at least :data:`MIN_OVERLAP_CHARS` characters, or of two whole words.
    Without a repeat, the joining whitespace is made right: a space the caller already has is
    not sent again, and a space the model left out between two words or after a punctuation
    mark is added. Pure text in, text out: no I/O.
    """

    def __init__(self, delivered: str, exact: bool) -> None:
        self.delivered = delivered
        self.exact = exact
        self.decided = exact or not delivered
        self.overlap_chars = 0
        self.spacing: str | None = None  # "added" | "removed": what the join did to whitespace
        self._head = ""

    def feed(self, text: str) -> str | None:
        if self.decided:
            return text
        self._head += text
        if self._may_repeat():
            return None
        return self._decide()

    def finish(self) -> str:
        """The continuation ended: decide on whatever head is held."""
        return "" if self.decided else self._decide()

    def _may_repeat(self) -> bool:
        head = self._head.lstrip()
        delivered = self.delivered
        if not head:
            return True  # only whitespace so far: where it goes depends on what follows
        # Held while the head occurs in the delivered text short of its end: it may still be a
        # restart (an occurrence at 0) or become a repeated tail (one that reaches the end).
        return len(head) < len(delivered) and head in delivered[:-1]

    def _decide(self) -> str:
        self.decided = True
        head, delivered = self._head, self.delivered
        self._head = ""
        stripped = head.lstrip()
        overlap = _overlap(delivered, stripped)
        if overlap:
            self.overlap_chars = overlap
            return stripped[overlap:]
        if not head:
            return head
        last = delivered[-1]
        if last.isspace():
            rest = head.lstrip(" \t")
            if len(rest) != len(head):
                self.spacing = "removed"
            return rest
        if not head[0].isspace() and head[0].isalnum() and (last.isalnum() or last in _SPACE_AFTER):
            self.spacing = "added"
            return " " + head
        return head


def _overlap(delivered: str, head: str) -> int:
    """Characters at the start of ``head`` that repeat the end of ``delivered`` (0: none worth removing)."""
    if head.startswith(delivered):
        return len(delivered)  # started over from the beginning
    for size in range(min(len(delivered), len(head)), 0, -1):
        if not delivered.endswith(head[:size]):
            continue
        if size >= MIN_OVERLAP_CHARS:
            return size
        # Whole words: the repeat neither starts nor ends inside a word.
        starts_word = size == len(delivered) or not (delivered[-size - 1].isalnum() and head[0].isalnum())
        ends_word = size == len(head) or not (head[size - 1].isalnum() and head[size].isalnum())
        if starts_word and ends_word and " " in head[:size].strip():
            return size
    return 0


def _set_text(chunk: Any, text: str) -> None:
    for choice in getattr(chunk, "choices", None) or ():
        delta = getattr(choice, "delta", None)
        if delta is not None and isinstance(getattr(delta, "content", None), str):
            delta.content = text
            text = ""


def _has_tool_call(chunk: Any) -> bool:
    for choice in getattr(chunk, "choices", None) or ():
        delta = getattr(choice, "delta", None)
        if delta is not None and (getattr(delta, "tool_calls", None) or getattr(delta, "function_call", None)):
            return True
    return False


def _usage_of(chunk: Any) -> Any:
    return getattr(chunk, "usage", None)


# -- the decisions -----------------------------------------------------------------------------


class _StreamCore:
    """Every decision of a streaming call, without I/O.

    The driver loop is::

        step = core.next_step(now)            # Attempt to open | Wait | list of chunks (the whole answer)
        event = read(core.read_timeout(now))  # one chunk, the end, an error, or a timeout
        chunks, over = core.feed(event, now)  # chunks to hand out; over: close this attempt's reader

    An attempt is *alive* from its first content chunk (then the idle timeout applies) and
    *committed* from the first chunk handed to the caller. Chunks are held back, and the
    attempt can still be replaced invisibly, while they are only a role, a tool call whose
    arguments are not complete yet (a tool-call stream is released at its end), or the head of
    a continuation that may repeat what the caller has (:class:`Join`).

    ``feed`` raises :class:`StreamInterrupted` (already reported) when a committed stream
    breaks and the planner does not continue it; ``next_step`` raises the call's error when
    the chain is exhausted.
    """

    def __init__(self, call: Call) -> None:
        self.call = call
        self.attempt: Attempt | None = None
        self.alive = False
        self.committed = False
        self.finished = False
        self.response: Any = None
        self._first_token_by = 0.0
        self._pending: list[Any] = []  # the live attempt's chunks not handed out yet
        self._holding_tools = False  # a tool call started: everything after it waits for the end
        self._delivered: list[Any] = []  # every chunk handed out, across joined attempts
        self._text: list[str] = []
        self._join: Join | None = None  # the live attempt continues a broken stream
        self._joined = False  # some attempt continued another: the answer is joined
        kwargs = call.request.kwargs
        self._tools = bool(kwargs.get("tools") or kwargs.get("functions"))
        self._prior_usage: tuple[int, int] = (0, 0)  # tokens of the broken attempts a join continues
        # Streams that ended before any content wait here: the call may still pick one of them
        # (on_all_invalid: return_best), and then its chunks are what the caller gets.
        self._completed: dict[int, tuple[Any, list[Any]]] = {}

    def next_step(self, now: float) -> Attempt | Wait | list[Any]:
        action = self.call.next_action(now)
        if isinstance(action, Launch):
            attempt = self.attempt = action.attempt
            self._pending = []
            self.alive = self.committed = self._holding_tools = False
            form = attempt.record.extra.get("continuation")
            self._join = Join("".join(self._text), exact=form == "prefill") if form is not None else None
            self._joined = self._joined or self._join is not None
            self._first_token_by = now + (attempt.first_token_timeout_s or attempt.timeout_s)
            return attempt
        if isinstance(action, Wait):
            if action.until is None:  # nothing of ours is in flight, so nothing would wake us
                raise RuntimeError("the planner is waiting for an attempt the stream driver is not running")
            return action
        self.finished = True
        if isinstance(action, Fail):
            raise action.error
        assert isinstance(action, Done)
        found = self._completed.get(id(action.response))
        if found is None:
            raise RuntimeError("the planner returned a response the stream driver did not produce")
        self.response = action.response
        return found[1]

    def read_timeout(self, now: float) -> float:
        """Seconds the next read may wait: until the first-token deadline, then the idle timeout."""
        attempt = self.attempt
        assert attempt is not None
        if self.alive:
            idle = attempt.idle_timeout_s or attempt.timeout_s
            caller_deadline = self.call.caller_deadline_at
            return idle if caller_deadline is None else max(0.0, min(idle, caller_deadline - now))
        return max(0.0, self._first_token_by - now)

    def feed(self, event: _Event, now: float) -> tuple[list[Any], bool]:
        attempt = self.attempt
        assert attempt is not None
        if event.kind == "chunk":
            return self._on_chunk(event.chunk, now), False
        if event.kind == "timeout":
            caller_deadline = self.call.caller_deadline_at
            if self.alive and caller_deadline is not None and now >= caller_deadline:
                raise self._caller_timeout(now)
            if self.alive:
                idle = attempt.idle_timeout_s or attempt.timeout_s
                return self._broke(
                    StreamIdleTimeout(f"no chunk for {idle:g} s"), f"no chunk for {idle:g} s (idle timeout)", now
                )
            waited = attempt.first_token_timeout_s or attempt.timeout_s
            self._pending = []
            self.call.on_error(attempt, FirstTokenTimeout(f"no content within {waited:g} s"), now)
            return [], True
        if event.kind == "error":
            assert event.error is not None
            return self._broke(event.error, _describe(event.error), now)
        return self._ended(now)

    def _on_chunk(self, chunk: Any, now: float) -> list[Any]:
        attempt = self.attempt
        assert attempt is not None
        if not self.alive:
            if not _has_content(chunk):
                self._pending.append(chunk)
                return []  # a role-only chunk: held back until we know this attempt wins
            self.alive = True
            attempt.record.time_to_first_chunk_s = now - attempt.record.started_at
        if self._tools and (self._holding_tools or _has_tool_call(chunk)):
            # A tool call is usable only whole: its deltas wait for the end of the stream, so a
            # break before it is complete can still go to the next model unseen.
            self._holding_tools = True
            self._pending.append(chunk)
            return []
        join = self._join
        if join is not None and not join.decided:
            self._pending.append(chunk)
            text = join.feed(_text(chunk))
            if text is None:
                return []
            return self._release(text)
        if not self.committed:
            self._pending.append(chunk)
            return self._release(None)
        self._deliver([self._with_prior_usage(chunk)])
        return [chunk]

    def _release(self, joined_text: str | None) -> list[Any]:
        """Hand out the held chunks (commits the attempt); ``joined_text``: their text after the join."""
        out, self._pending = self._pending, []
        if joined_text is not None:
            # The text decided by the join replaces the held chunks' text: it goes into the last
            # chunk that carried text, the others are dropped (they carried nothing else we hand out).
            carriers = [c for c in out if _text(c)]
            last = carriers[-1] if carriers else None
            out = [c for c in out if c is last or not (_text(c) or _is_role_only(c))]
            if last is not None:
                _set_text(last, joined_text)
                if not joined_text and not _has_finish_reason([last]) and _usage_of(last) is None:
                    out.remove(last)
            self._note_join()
        out = [self._with_prior_usage(c) for c in out]
        if not self.committed:
            self.committed = True
            assert self.attempt is not None
            self.call.commit(self.attempt)
        self._deliver(out)
        return out

    def _note_join(self) -> None:
        join, attempt = self._join, self.attempt
        assert join is not None and attempt is not None
        if join.overlap_chars:
            attempt.record.extra["join_overlap_chars"] = join.overlap_chars
        if join.spacing is not None:
            attempt.record.extra["join_spacing"] = join.spacing

    def _ended(self, now: float) -> tuple[list[Any], bool]:
        """The provider ended the stream."""
        attempt = self.attempt
        assert attempt is not None
        record = attempt.record
        out: list[Any] = []
        if self.alive and (self.committed or self._join is not None) and _has_finish_reason(self._pending):
            # A continuation (or a committed stream's held tool calls): what was held is released,
            # and the joined answer is judged below as one.
            join = self._join
            out = self._release(join.finish() if join is not None and not join.decided else None)
        if self.committed:
            if not _has_finish_reason(self._delivered):  # (a tool call held back is dropped: it is not whole)
                error = IncompleteStream("the stream ended without a finish reason")
                self._broke(error, "the stream ended without a finish reason", now)
                return out, True
            self.response = self._assemble(self._delivered)
            self.finished = True
            self.call.on_response(attempt, self.response, now)
            return out, True
        chunks, self._pending = self._pending, []
        if not _has_finish_reason(chunks):
            self.call.on_error(attempt, IncompleteStream("the stream ended without a finish reason"), now)
            return [], True
        # Nothing reached the caller (an empty answer, a tool call held back): still invisible,
        # so the validators' verdict can fall back like for a non-stream call.
        if chunks and record.time_to_first_chunk_s is None:
            record.time_to_first_chunk_s = now - record.started_at
        record.chunks = len(chunks)
        response = self._assemble(chunks)
        self._completed[id(response)] = (response, chunks)
        self.call.on_response(attempt, response, now)
        return [], True

    def note_skipped(self, skipped: int) -> None:
        """The live attempt's reader has skipped this many malformed events so far (span events on the attempt)."""
        attempt = self.attempt
        if attempt is None or skipped <= attempt.record.extra.get("skipped_events", 0):
            return
        record = attempt.record
        for _ in range(skipped - record.extra.get("skipped_events", 0)):
            record.events.append((SKIPPED_EVENT, {"llm_resilience.stream.chunks": len(self._pending) + record.chunks}))
        record.extra["skipped_events"] = skipped

    def cancel(self, now: float) -> None:
        """The caller stopped reading: the live attempt is cancelled and the call ends."""
        self.finished = True
        self.call.cancel(now)

    def summary(self) -> dict[str, Any]:
        return self.call.summary()

    def _deliver(self, chunks: list[Any]) -> None:
        self._delivered.extend(chunks)
        self._text.extend(_text(chunk) for chunk in chunks)
        assert self.attempt is not None
        self.attempt.record.chunks += len(chunks)

    def _with_prior_usage(self, chunk: Any) -> Any:
        """A usage report of a continuation counts the broken attempts' tokens too: the caller paid for them."""
        usage = _usage_of(chunk)
        prompt, completion = self._prior_usage
        if usage is None or not (prompt or completion):
            return chunk
        with contextlib.suppress(Exception):  # a usage object we cannot add to: left as the provider sent it
            usage.prompt_tokens = (usage.prompt_tokens or 0) + prompt
            usage.completion_tokens = (usage.completion_tokens or 0) + completion
            usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
        return chunk

    def _assemble(self, chunks: list[Any]) -> Any:
        assert self.attempt is not None
        # A joined answer is the answer to the caller's messages, not to the last continuation request.
        messages = self.call.request.messages if self._joined else self.attempt.kwargs.get("messages")
        response = litellm.stream_chunk_builder(chunks, messages=list(messages) if messages is not None else None)
        last_model = next((getattr(c, "model", None) for c in reversed(chunks) if getattr(c, "model", None)), None)
        if response is not None and last_model:
            with contextlib.suppress(Exception):
                response.model = last_model  # the model that finished the answer (stream_chunk_builder takes the first)
        return response

    def _caller_timeout(self, now: float) -> StreamInterrupted:
        """The caller's own ``timeout=`` ran out mid-stream: end it; the provider is not blamed."""
        attempt = self.attempt
        assert attempt is not None
        bound = self.call.request.kwargs.get("timeout")
        error = TimeoutError(f"the caller's timeout={bound:g} s elapsed")
        interrupted = self._interrupted(error, f"the caller's timeout ({bound:g} s) elapsed")
        self.finished = True
        self.call.expire(interrupted, now)
        return interrupted

    def _interrupted(self, error: Exception, reason: str) -> StreamInterrupted:
        attempt = self.attempt
        assert attempt is not None
        interrupted = StreamInterrupted(
            model=attempt.record.model,
            chunks_delivered=len(self._delivered),
            generated_content="".join(self._text),
            reason=reason,
            original_exception=error,
        )
        interrupted.__cause__ = error
        return interrupted

    def _broke(self, error: Exception, reason: str, now: float) -> tuple[list[Any], bool]:
        """The live attempt failed mid-way (an error, an idle gap, an end without a finish reason).

        Before anything of it reached the caller it is an ordinary failure (the next model is
        tried; a continuation's next model continues the same text). Once committed, the planner
        may continue it with another model (``streaming.on_interrupt: continue``): then this
        attempt is over and the next step launches the continuation, held back like any attempt
        until its first content. Otherwise :class:`StreamInterrupted` is raised.
        """
        attempt = self.attempt
        assert attempt is not None
        self._pending = []
        if not self.committed:
            self.call.on_error(attempt, error, now)
            return [], True
        # classify_error follows the cause chain: an idle timeout counts as a timeout, a cut as a
        # connection error, on the breaker and in the span.
        interrupted = self._interrupted(error, reason)
        delivered = "".join(self._text)
        self.call.on_interrupted(attempt, interrupted, delivered, now)
        if self.call.finished:
            self.finished = True
            raise interrupted
        self._count_broken(attempt, delivered)
        self.committed = self.alive = False
        return [], True

    def _count_broken(self, attempt: Attempt, delivered: str) -> None:
        """Estimate the tokens the broken attempt used (it never sent its usage): the join's usage adds them."""
        sent = "".join(_text(c) for c in self._delivered_by(attempt))
        try:
            model = str(attempt.kwargs.get("model", ""))
            prompt = litellm.token_counter(model=model, messages=list(attempt.kwargs.get("messages") or []))
            completion = litellm.token_counter(model=model, text=sent) if sent else 0
        except Exception:  # no tokenizer for this model: its share stays uncounted
            log.debug("could not count the tokens of a broken stream", exc_info=True)
            return
        before_prompt, before_completion = self._prior_usage
        self._prior_usage = (before_prompt + int(prompt), before_completion + int(completion))

    def _delivered_by(self, attempt: Attempt) -> list[Any]:
        return self._delivered[len(self._delivered) - attempt.record.chunks :] if attempt.record.chunks else []


def _is_role_only(chunk: Any) -> bool:
    return not _has_content(chunk) and not _has_finish_reason([chunk]) and _usage_of(chunk) is None


class _StreamInfo:
    _core: _StreamCore

    @property
    def llm_resilience(self) -> dict[str, Any]:
        """What happened so far: route, class, answering model, attempts (as on a response's ``_hidden_params``)."""
        return self._core.summary()

    @property
    def response(self) -> Any:
        """The assembled ``ModelResponse`` once the stream has ended normally, else ``None``."""
        return self._core.response


# -- sync --------------------------------------------------------------------------------------


def _interrupt_read(stream: Any) -> None:
    """Wake a read blocked in another thread: shut its socket down (``close()`` would not wake it)."""
    try:
        network_stream = stream.completion_stream.response.extensions["network_stream"]
        network_stream.get_extra_info("socket").shutdown(socket.SHUT_RDWR)
    except Exception:  # not an httpx-backed stream, or already closed: the backstop timeout ends the read
        log.debug("could not interrupt a stream read; it ends at litellm's timeout", exc_info=True)


class _ThreadReader:
    """Reads one sync litellm stream in a helper thread, one chunk per :meth:`read`, so waits can time out.

    Only the helper thread touches the litellm stream (opening, reading, closing); the
    caller's thread only exchanges messages with it and, to abandon a blocked read, shuts
    the socket down.
    """

    def __init__(self, kwargs: dict[str, Any]) -> None:
        # An httpx client lent to this attempt alone (OpenAI-compatible providers): its sockets can
        # be shut down from the caller's thread at any time, also while the request still waits
        # for the response headers, so an abandoned attempt ends at once, not at litellm's timeout.
        self._lease = _drivers.lease_client(kwargs)
        if self._lease is not None:
            _with_event_filter(self._lease.http)
        self.filters: list[SSEFilter] = []
        self._demand: queue.SimpleQueue[bool] = queue.SimpleQueue()
        self._results: queue.SimpleQueue[_Event] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._stream: Any = None
        self._reading = False
        self._abandoned = False
        self._asked = False
        context = contextvars.copy_context()  # the caller's OTel context and litellm's context variables
        thread = threading.Thread(
            target=context.run, args=(self._run, kwargs), name="llm-resilience-stream", daemon=True
        )
        thread.start()

    def _run(self, kwargs: dict[str, Any]) -> None:
        stream: Any = None
        _filters.set(self.filters)  # (this thread's own copy of the caller's context)
        try:
            try:
                lease = self._lease
                stream = _litellm_calls.completion(**kwargs, **({"client": lease.client} if lease else {}))
            except Exception as error:
                self._results.put(_Event("error", error=error))
                return
            with self._lock:
                if self._abandoned:
                    return
                self._stream = stream
            while self._demand.get():
                with self._lock:
                    if self._abandoned:
                        return
                    self._reading = True
                try:
                    event = _Event("chunk", chunk=next(stream))
                except StopIteration:
                    event = _END
                except Exception as error:
                    event = _Event("error", error=error)
                finally:
                    with self._lock:
                        self._reading = False
                self._results.put(event)
                if event.kind != "chunk":
                    return
        finally:
            with self._lock:
                self._stream = None
            if stream is not None:
                with contextlib.suppress(Exception):
                    stream.close()
            if self._lease is not None:
                _drivers.return_client(self._lease)

    def skipped_events(self) -> int:
        return sum(f.skipped for f in list(self.filters))

    def read(self, timeout: float) -> _Event:
        if not self._asked:
            self._demand.put(True)
            self._asked = True
        try:
            event = self._results.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return _TIMED_OUT
        self._asked = False
        return event

    def close(self) -> None:
        """Abandon the stream; never blocks. The helper thread closes the connection."""
        with self._lock:
            if self._abandoned:
                return
            self._abandoned = True
            if self._lease is not None:
                self._lease.abort()  # wakes the helper wherever it waits: connecting, headers, a chunk
            elif self._reading and self._stream is not None:
                _interrupt_read(self._stream)
        self._demand.put(False)


class ResilientStream(_StreamInfo):
    """What ``completion(..., stream=True)`` returns: iterate it for litellm chunk objects.

    ``litellm.stream_chunk_builder(list(stream))`` rebuilds the response. By the time the
    call returns, a model has already produced its first content chunk (earlier models
    that failed or were too slow were abandoned without the caller seeing them), or the
    whole chain failed and the call raised. Iterating may raise :class:`StreamInterrupted`
    if the chosen model's stream breaks. ``close()`` (or leaving a ``with`` block) stops
    the stream and closes its connection::

        with engine.completion("chat", messages, stream=True) as stream:
            for chunk in stream:
                print(chunk.choices[0].delta.content or "", end="")
        stream.llm_resilience["model"]   # which model answered
    """

    def __init__(self, call: Call, clock: Clock = time.monotonic) -> None:
        self._core = _StreamCore(call)
        self._clock = clock
        self._reader: _ThreadReader | None = None
        self._out: deque[Any] = deque()
        self._closed = False

    def _fill(self) -> None:
        """Advance until a chunk is ready to hand out or the stream is over."""
        core = self._core
        try:
            while not self._out and not core.finished:
                if self._reader is None:
                    step = core.next_step(self._clock())
                    if isinstance(step, Wait):
                        time.sleep(max(0.0, (step.until or 0.0) - self._clock()))
                        continue
                    if isinstance(step, list):
                        self._out.extend(step)
                        break
                    self._reader = _ThreadReader(_stream_kwargs(step))
                event = self._reader.read(core.read_timeout(self._clock()))
                core.note_skipped(self._reader.skipped_events())
                chunks, over = core.feed(event, self._clock())
                self._out.extend(chunks)
                if over:
                    self._drop_reader()
        except BaseException:
            self._shutdown()  # after StreamInterrupted / AllAttemptsFailed the call has already ended
            raise

    def __iter__(self) -> ResilientStream:
        return self

    def __next__(self) -> Any:
        if not self._out and not self._closed:
            self._fill()
        if self._out:
            return self._out.popleft()
        self._shutdown()
        raise StopIteration

    def close(self) -> None:
        """Stop the stream: close the provider connection, record the attempt as cancelled, end the spans."""
        self._out.clear()
        self._shutdown()

    def __enter__(self) -> ResilientStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def _drop_reader(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()

    def _shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._drop_reader()
        self._core.cancel(self._clock())  # a no-op when the call already ended


def stream_sync(call: Call, clock: Clock = time.monotonic) -> ResilientStream:
    """Drive a streaming ``call``: returns once a model produced content (or raises, like ``litellm.completion``)."""
    stream = ResilientStream(call, clock)
    stream._fill()
    return stream


# -- async -------------------------------------------------------------------------------------


class _TaskReader:
    """Reads one async litellm stream; each read (the opening request included) has its own timeout."""

    def __init__(self, kwargs: dict[str, Any]) -> None:
        self._kwargs = kwargs
        self._stream: Any = None
        self.filters: list[SSEFilter] = []

    def skipped_events(self) -> int:
        return sum(f.skipped for f in self.filters)

    async def read(self, timeout: float) -> _Event:
        opening = self._stream is None
        # The opening request may be cut in litellm's dispatch step: its own timer cuts it cleanly.
        scope = asyncio.timeout(None if opening else timeout)
        _filters.set(self.filters)  # the HTTP hook runs in this task: it reports to this attempt
        try:
            async with scope:
                if opening:
                    loop = asyncio.get_running_loop()
                    deadline = loop.time() + timeout
                    task = _drivers.running_task(loop)
                    timer = loop.call_at(deadline, _litellm_calls.expire_after_dispatch, task, scope)
                    try:
                        client = _async_client(self._kwargs)
                        extra = {"client": client} if client is not None else {}
                        self._stream = await _litellm_calls.acompletion(**self._kwargs, **extra)
                    finally:
                        timer.cancel()
                    scope.reschedule(deadline)  # the first chunk: within the same timeout
                chunk = await self._stream.__anext__()
        except StopAsyncIteration:
            return _END
        except TimeoutError as error:
            return _TIMED_OUT if scope.expired() else _Event("error", error=error)
        except Exception as error:
            return _Event("error", error=error)
        return _Event("chunk", chunk=chunk)

    async def aclose(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            with contextlib.suppress(Exception):
                await stream.aclose()

    def close_later(self, loop: asyncio.AbstractEventLoop) -> None:
        """Close from a finalizer, where nothing can be awaited: schedule it on the stream's loop."""
        if self._stream is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(_spawn, loop, self.aclose())


_loop_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Any, Any]] = weakref.WeakKeyDictionary()
_loop_clients_lock = threading.Lock()


def _async_client(kwargs: dict[str, Any]) -> Any:
    """An ``openai.AsyncOpenAI`` on this event loop's own httpx client (which skips malformed events), or ``None``.

    One client per loop and endpoint keeps connections alive between attempts. They are closed
    when the loop shuts down its async generators (``asyncio.run`` does): a generator parked in
    the loop holds the closing code, so a loop's connections never outlive it.

    Living as long as the loop is right for the client, not for a stream's connection, and that
    connection does not wait for it: a stream the caller stops reading (``aclose()``, dropped,
    its task cancelled) or the driver abandons closes its response at once, and a response whose
    body was not read to the end closes its connection (the pool cannot reuse it). What the
    client keeps are idle keep-alive connections of streams read to the end, at most httpx's
    keep-alive limit (20) per client.
    """
    try:
        credentials = _drivers.openai_credentials(kwargs)
        if credentials is None or litellm.aclient_session is not None:
            return None
        loop = asyncio.get_running_loop()
        with _loop_clients_lock:
            clients = _loop_clients.get(loop)
            if clients is None:
                clients = _loop_clients[loop] = {}
                closer = _close_at_loop_end(clients)
                clients["closer"] = closer  # a strong reference: the loop only tracks it weakly
                _spawn(loop, anext(closer))  # runs to its first yield: the loop now finalizes it at shutdown
            client = clients.get(credentials)
            if client is None:
                client = clients[credentials] = _new_async_client(*credentials)
        return client
    except Exception:  # never let the filtering fail a call: litellm's own client then
        log.debug("could not make an async client for a stream; litellm's own is used", exc_info=True)
        return None


def _new_async_client(base_url: str, api_key: str, organization: str | None) -> Any:
    import httpx
    import openai
    from litellm.llms.custom_httpx.http_handler import get_ssl_configuration, http2_enabled

    http2 = http2_enabled()
    http: Any = httpx.AsyncClient(  # (openai accepts an httpx client beside its own httpx2)
        verify=get_ssl_configuration(http2=http2), http2=http2, follow_redirects=True,
        event_hooks={"response": [_askip_malformed_events]},
    )  # fmt: skip
    return openai.AsyncOpenAI(
        api_key=api_key, base_url=base_url, organization=organization, http_client=http, max_retries=0
    )


async def _close_at_loop_end(clients: dict[Any, Any]) -> Any:
    try:
        yield
    finally:
        for key, client in list(clients.items()):
            if key != "closer":
                with contextlib.suppress(Exception):
                    await client.close()
        clients.clear()


_closing: set[asyncio.Task[None]] = set()  # strong references: a pending task may otherwise be collected


def _spawn(loop: asyncio.AbstractEventLoop, closing: Any) -> None:
    task = loop.create_task(closing)
    _closing.add(task)
    task.add_done_callback(_closing.discard)


class AsyncResilientStream(_StreamInfo):
    """What ``await acompletion(..., stream=True)`` returns: ``async for`` it for litellm chunk objects.

    Same behaviour as :class:`ResilientStream`; stop early with ``await stream.aclose()``
    (or ``async with``). Cancelling the task that iterates closes the connection too.
    """

    def __init__(self, call: Call, clock: Clock = time.monotonic) -> None:
        self._core = _StreamCore(call)
        self._clock = clock
        self._reader: _TaskReader | None = None
        self._out: deque[Any] = deque()
        self._closed = False
        self._loop = asyncio.get_running_loop()

    async def _fill(self) -> None:
        """Advance until a chunk is ready to hand out or the stream is over."""
        core = self._core
        try:
            while not self._out and not core.finished:
                if self._reader is None:
                    step = core.next_step(self._clock())
                    if isinstance(step, Wait):
                        await asyncio.sleep(max(0.0, (step.until or 0.0) - self._clock()))
                        continue
                    if isinstance(step, list):
                        self._out.extend(step)
                        break
                    self._reader = _TaskReader(_stream_kwargs(step))
                event = await self._reader.read(core.read_timeout(self._clock()))
                core.note_skipped(self._reader.skipped_events())
                chunks, over = core.feed(event, self._clock())
                self._out.extend(chunks)
                if over:
                    await self._drop_reader()
        except BaseException:  # CancelledError included: the caller's task was cancelled
            await self._shutdown()
            raise

    def __aiter__(self) -> AsyncResilientStream:
        return self

    async def __anext__(self) -> Any:
        if not self._out and not self._closed:
            await self._fill()
        if self._out:
            return self._out.popleft()
        await self._shutdown()
        raise StopAsyncIteration

    async def aclose(self) -> None:
        """Stop the stream: close the provider connection, record the attempt as cancelled, end the spans."""
        self._out.clear()
        await self._shutdown()

    async def __aenter__(self) -> AsyncResilientStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __del__(self) -> None:
        if getattr(self, "_closed", True):
            return
        with contextlib.suppress(Exception):
            self._closed = True
            reader, self._reader = self._reader, None
            if reader is not None:
                reader.close_later(self._loop)
            self._core.cancel(self._clock())

    async def _drop_reader(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            await reader.aclose()

    async def _shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._drop_reader()
        finally:
            self._core.cancel(self._clock())  # a no-op when the call already ended


async def stream_async(call: Call, clock: Clock = time.monotonic) -> AsyncResilientStream:
    """Async twin of :func:`stream_sync`: returns once a model produced content, or raises."""
    stream = AsyncResilientStream(call, clock)
    await stream._fill()
    return stream
