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
import logging
import queue
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from . import _litellm_calls
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


# -- the decisions -----------------------------------------------------------------------------


class _StreamCore:
    """Every decision of a streaming call, without I/O.

    The driver loop is::

        step = core.next_step(now)            # Attempt to open | Wait | list of chunks (the whole answer)
        event = read(core.read_timeout(now))  # one chunk, the end, an error, or a timeout
        chunks, over = core.feed(event, now)  # chunks to hand out; over: close this attempt's reader

    ``feed`` raises :class:`StreamInterrupted` (already reported) when a committed stream
    breaks; ``next_step`` raises the call's error when the chain is exhausted.
    """

    def __init__(self, call: Call) -> None:
        self.call = call
        self.attempt: Attempt | None = None
        self.committed = False
        self.finished = False
        self.response: Any = None
        self._first_token_by = 0.0
        self._pending: list[Any] = []  # the live attempt's chunks, before its first content
        self._delivered: list[Any] = []  # the committed attempt's chunks, as handed out
        self._text: list[str] = []
        # Streams that ended before any content wait here: the call may still pick one of them
        # (on_all_invalid: return_best), and then its chunks are what the caller gets.
        self._completed: dict[int, tuple[Any, list[Any]]] = {}

    def next_step(self, now: float) -> Attempt | Wait | list[Any]:
        action = self.call.next_action(now)
        if isinstance(action, Launch):
            attempt = self.attempt = action.attempt
            self._pending = []
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
        if self.committed:
            idle = attempt.idle_timeout_s or attempt.timeout_s
            caller_deadline = self.call.caller_deadline_at
            return idle if caller_deadline is None else max(0.0, min(idle, caller_deadline - now))
        return max(0.0, self._first_token_by - now)

    def feed(self, event: _Event, now: float) -> tuple[list[Any], bool]:
        attempt = self.attempt
        assert attempt is not None
        record = attempt.record
        if event.kind == "chunk":
            if self.committed:
                self._deliver([event.chunk])
                return [event.chunk], False
            self._pending.append(event.chunk)
            if not _has_content(event.chunk):
                return [], False  # a role-only chunk: held back until we know this attempt wins
            record.time_to_first_chunk_s = now - record.started_at
            self.committed = True
            self.call.commit(attempt)
            out, self._pending = self._pending, []
            self._deliver(out)
            return out, False
        if event.kind == "timeout":
            caller_deadline = self.call.caller_deadline_at
            if self.committed and caller_deadline is not None and now >= caller_deadline:
                raise self._caller_timeout(now)
            if self.committed:
                idle = attempt.idle_timeout_s or attempt.timeout_s
                return self._interrupt(
                    StreamIdleTimeout(f"no chunk for {idle:g} s"), f"no chunk for {idle:g} s (idle timeout)", now
                )
            waited = attempt.first_token_timeout_s or attempt.timeout_s
            self._pending = []
            self.call.on_error(attempt, FirstTokenTimeout(f"no content within {waited:g} s"), now)
            return [], True
        if event.kind == "error":
            assert event.error is not None
            if self.committed:
                return self._interrupt(event.error, _describe(event.error), now)
            self._pending = []
            self.call.on_error(attempt, event.error, now)
            return [], True
        # The provider ended the stream.
        if self.committed:
            if not _has_finish_reason(self._delivered):
                error = IncompleteStream("the stream ended without a finish reason")
                return self._interrupt(error, "the stream ended without a finish reason", now)
            self.response = self._assemble(self._delivered)
            self.finished = True
            self.call.on_response(attempt, self.response, now)
            return [], True
        chunks, self._pending = self._pending, []
        if not _has_finish_reason(chunks):
            self.call.on_error(attempt, IncompleteStream("the stream ended without a finish reason"), now)
            return [], True
        # Ended before any content (an empty answer): still invisible to the caller, so the
        # validators' verdict can fall back like for a non-stream call.
        if chunks:
            record.time_to_first_chunk_s = now - record.started_at
        record.chunks = len(chunks)
        response = self._assemble(chunks)
        self._completed[id(response)] = (response, chunks)
        self.call.on_response(attempt, response, now)
        return [], True

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
        self.attempt.record.chunks = len(self._delivered)

    def _assemble(self, chunks: list[Any]) -> Any:
        assert self.attempt is not None
        messages = self.attempt.kwargs.get("messages")
        return litellm.stream_chunk_builder(chunks, messages=list(messages) if messages is not None else None)

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

    def _interrupt(self, error: Exception, reason: str, now: float) -> tuple[list[Any], bool]:
        """A committed stream broke: raise :class:`StreamInterrupted`, unless the planner continues it.

        With ``streaming.on_interrupt: continue`` the planner may go on with another model asked
        to continue the text delivered so far; then this attempt is over (its reader is dropped)
        and the next step launches the continuation, whose chunks are held back until its first
        content, like any attempt's.
        """
        attempt = self.attempt
        assert attempt is not None
        # classify_error follows the cause chain: an idle timeout counts as a timeout, a cut as a
        # connection error, on the breaker and in the span.
        interrupted = self._interrupted(error, reason)
        self.call.on_interrupted(attempt, interrupted, "".join(self._text), now)
        if self.call.finished:
            self.finished = True
            raise interrupted
        self.committed = False
        self._pending = []
        return [], True


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
        try:
            try:
                stream = _litellm_calls.completion(**kwargs)
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
            if self._reading and self._stream is not None:
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

    async def read(self, timeout: float) -> _Event:
        scope = asyncio.timeout(timeout)
        try:
            async with scope:
                if self._stream is None:
                    self._stream = await _litellm_calls.acompletion(**self._kwargs)
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
