"""A scriptable fake OpenAI-compatible chat-completions server for tests, demos and benchmarks.

The server speaks enough of the OpenAI wire format (``POST /v1/chat/completions``, streaming and
non-streaming, ``GET /v1/models``) for litellm's ``openai/`` provider to talk to it over real HTTP,
so you can exercise timeouts, retries, fallbacks and circuit breakers against real failure modes
(slow answers, error statuses, connection resets, truncated streams) without touching a real API.

Example::

    import litellm
    from llm_resilience.testing import Behavior, FakeProvider

    with FakeProvider() as provider:
        provider.set(Behavior.ok("fine"))                      # default for every request
        provider.set(Behavior.slow(5.0), model="slow-model")  # only for model "slow-model"
        provider.script(Behavior.error(503))                   # only the next request

        call = dict(api_base=provider.base_url, api_key="sk-test", num_retries=0, max_retries=0,
                    messages=[{"role": "user", "content": "hi"}], timeout=2)
        try:
            litellm.completion(model="openai/fast-model", **call)
        except litellm.ServiceUnavailableError:
            pass
        assert litellm.completion(model="openai/fast-model", **call).choices[0].message.content == "fine"
        assert [r.model for r in provider.requests] == ["fast-model", "fast-model"]

Behaviour lookup for each request, first match wins: the per-model script queue, the global script
queue, the per-model default, the global default.  Note that ``model`` here is the name on the wire,
i.e. without litellm's ``openai/`` prefix.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http
import json
import selectors
import socket
import struct
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import TCPServer
from typing import Any, Literal, cast, get_args

__all__ = ["DEFAULT_CONTENT", "Behavior", "BodyMode", "FakeProvider", "RecordedRequest"]

BodyMode = Literal["normal", "empty", "malformed", "reset", "hang"]
_BODY_MODES: frozenset[str] = frozenset(get_args(BodyMode))

DEFAULT_CONTENT = "Hello from the fake provider."
CONTEXT_LENGTH_MESSAGE = (
    "This model's maximum context length is 4096 tokens. However, your messages resulted in 5000 tokens."
)
PREFILL_REJECTED_MESSAGE = "This model does not support assistant message prefill."
_CHAT_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})
_MODELS_PATHS = frozenset({"/v1/models", "/models"})
_SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "api-key", "x-api-key"})
_REDACTED = "<redacted>"
_HeaderItems = Iterable[tuple[str, str]]
# Keep the accept loop responsive so stop() does not wait out socketserver's 0.5 s default.
_POLL_INTERVAL_S = 0.05

# (error type, default message, default code) roughly as OpenAI sends them.
_ERROR_DEFAULTS: dict[int, tuple[str, str, str | None]] = {
    400: ("invalid_request_error", "Invalid request.", None),
    401: ("invalid_request_error", "Incorrect API key provided: sk-****.", "invalid_api_key"),
    403: ("permission_error", "You are not allowed to access this resource.", None),
    404: (
        "invalid_request_error",
        "The model does not exist or you do not have access to it.",
        "model_not_found",
    ),
    408: ("timeout", "Request timed out.", None),
    409: ("invalid_request_error", "Conflict.", None),
    422: ("invalid_request_error", "Unprocessable entity.", None),
    429: ("requests", "Rate limit reached for requests. Please try again later.", "rate_limit_exceeded"),
    500: ("server_error", "The server had an error while processing your request.", None),
    502: ("server_error", "Bad gateway.", None),
    503: ("server_error", "The engine is currently overloaded, please try again later.", None),
    504: ("server_error", "Gateway timeout.", None),
}


@dataclass(frozen=True)
class Behavior:
    """How the fake provider answers one request.

    ``latency_s`` (or a value drawn from ``latency_fn`` when set) is waited before anything is
    sent, so for streams it is the time to the response headers *and* the first chunk.  A
    ``status`` >= 400 answers with an OpenAI error body (also for streaming requests).  When
    ``tool_calls`` is set the message content is ``null`` and a ``finish_reason`` left at
    ``"stop"`` is sent as ``"tool_calls"``.  ``tool_calls`` entries are either OpenAI-shaped
    (``{"id", "type", "function": {"name", "arguments"}}``) or short ``{"name", "arguments"}``
    dicts where ``arguments`` may be a dict.

    ``body``: ``"empty"`` answers with content ``""``; ``"malformed"`` sends a 200 whose body
    (or first stream event) is not valid JSON; ``"reset"`` aborts the TCP connection (RST) without
    a response; ``"hang"`` never answers until the client disconnects or the server stops.

    Streaming: the content is split into ``chunks`` content chunks sent ``inter_chunk_s`` apart;
    with ``cut_after_chunks=N`` the connection is closed where chunk N+1 would have been sent,
    leaving the chunked HTTP body incomplete (no finish chunk, no ``[DONE]``). ``no_done``
    ends a stream normally (finish chunk, end of the HTTP body) but without ``data: [DONE]``.

    ``trickle_byte_s``: after the headers, the body is written one byte at a time, this many
    seconds apart (every read sees progress, so a per-read timeout never fires).
    ``reject_prefill``: a request whose last message is the assistant's (a prefill) gets a 400
    saying prefill is not supported; other requests are answered as scripted.

    Mid-stream faults: ``stall_after_chunks=N`` sends N content chunks, then nothing until the
    client goes away; ``malformed_after_chunks=N`` sends one event that is not JSON after the
    N-th content chunk, then goes on normally.

    Continuing a broken stream: with ``continuation`` set, a request that carries part of
    ``content`` as an assistant message (a prefill, or an assistant turn followed by a user
    turn asking to go on) is answered with ``"proper"``: the rest of ``content`` after that part
    (its leading space dropped, as a model starting a new message does); ``"restart"``: the
    whole ``content`` again; ``"tail"``: the last ``continuation_overlap_words`` words of that part,
    then the rest. Other requests are answered as scripted.

    Tool calls stream one delta per call unless ``chunks`` > 1: then each call's arguments are
    split into ``chunks`` deltas (``cut_after_chunks`` counts them). ``text_before_tools`` is
    text sent before the tool calls, in the same answer.
    """

    latency_s: float = 0.0
    latency_fn: Callable[[], float] | None = None
    status: int = 200
    error_message: str | None = None
    error_code: str | None = None
    retry_after_s: float | None = None
    content: str = DEFAULT_CONTENT
    finish_reason: str = "stop"
    tool_calls: list[dict[str, Any]] | None = None
    body: BodyMode = "normal"
    chunks: int = 3
    inter_chunk_s: float = 0.0
    cut_after_chunks: int | None = None
    no_done: bool = False
    trickle_byte_s: float | None = None
    reject_prefill: bool = False
    stall_after_chunks: int | None = None
    malformed_after_chunks: int | None = None
    continuation: Literal["proper", "restart", "tail"] | None = None
    continuation_overlap_words: int = 3
    text_before_tools: str | None = None

    def __post_init__(self) -> None:
        if self.latency_s < 0 or self.inter_chunk_s < 0:
            raise ValueError("latency_s and inter_chunk_s must be >= 0")
        if not 100 <= self.status <= 599:
            raise ValueError(f"status must be a valid HTTP status, got {self.status}")
        if self.body not in _BODY_MODES:
            raise ValueError(f"body must be one of {sorted(_BODY_MODES)}, got {self.body!r}")
        if self.chunks < 1:
            raise ValueError("chunks must be >= 1")
        if self.cut_after_chunks is not None and self.cut_after_chunks < 0:
            raise ValueError("cut_after_chunks must be >= 0")
        if self.retry_after_s is not None and self.retry_after_s < 0:
            raise ValueError("retry_after_s must be >= 0")
        for name in ("stall_after_chunks", "malformed_after_chunks"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0")

    @classmethod
    def ok(cls, content: str = DEFAULT_CONTENT, *, latency_s: float = 0.0) -> Behavior:
        return cls(content=content, latency_s=latency_s)

    @classmethod
    def error(
        cls,
        status: int,
        message: str | None = None,
        *,
        code: str | None = None,
        retry_after_s: float | None = None,
        latency_s: float = 0.0,
    ) -> Behavior:
        if status < 400:
            raise ValueError(f"an error status must be >= 400, got {status}")
        return cls(
            status=status,
            error_message=message,
            error_code=code,
            retry_after_s=retry_after_s,
            latency_s=latency_s,
        )

    @classmethod
    def context_length_exceeded(cls) -> Behavior:
        # The exact wording and code are what litellm keys on to raise ContextWindowExceededError.
        return cls(status=400, error_message=CONTEXT_LENGTH_MESSAGE, error_code="context_length_exceeded")

    @classmethod
    def slow(cls, latency_s: float, content: str = DEFAULT_CONTENT) -> Behavior:
        return cls(latency_s=latency_s, content=content)

    @classmethod
    def json(cls, obj: Any, *, latency_s: float = 0.0) -> Behavior:
        """Answer with ``obj`` serialised as the message content (for JSON-mode callers)."""
        return cls(content=json.dumps(obj), latency_s=latency_s)

    def sample_latency(self) -> float:
        value = self.latency_fn() if self.latency_fn is not None else self.latency_s
        return max(0.0, float(value))


def credential_digest(authorization: str) -> str:
    """SHA-256 (hex) of an ``Authorization`` header value, e.g. ``credential_digest("Bearer sk-...")``."""
    return hashlib.sha256(authorization.encode()).hexdigest()


@dataclass
class RecordedRequest:
    """One chat-completions request as the server saw it.

    ``headers`` has lower-cased names, with credentials replaced by ``"<redacted>"``;
    ``credential_sha256`` is the SHA-256 (hex) of the ``Authorization`` header's value, so a
    test can tell which key was sent (compare with :func:`credential_digest`) without storing it.
    ``completed`` means a full, well-formed HTTP response was written (whatever its status);
    ``disconnected`` means the client went away before the server finished answering.
    """

    model: str | None
    messages: list[dict[str, Any]]
    body: dict[str, Any]
    stream: bool
    headers: dict[str, str]
    received_at: float
    behavior: Behavior
    finished_at: float | None = None
    disconnected: bool = False
    completed: bool = False
    credential_sha256: str | None = None

    @property
    def duration_s(self) -> float | None:
        return None if self.finished_at is None else self.finished_at - self.received_at


@dataclass
class _Scripts:
    default: Behavior = field(default_factory=Behavior)
    per_model: dict[str, Behavior] = field(default_factory=dict)
    queue: deque[Behavior] = field(default_factory=deque)
    per_model_queue: dict[str, deque[Behavior]] = field(default_factory=dict)


class FakeProvider:
    """Threaded loopback HTTP server impersonating an OpenAI-compatible provider.

    Use as a context manager or call :meth:`start` / :meth:`stop`.  All scripting methods and
    properties are thread-safe.  ``port`` and ``base_url`` are available once started.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, behavior: Behavior | None = None) -> None:
        self._host = host
        self._requested_port = port
        self._lock = threading.Condition()
        self._initial_behavior = behavior or Behavior()
        self._scripts = _Scripts(default=self._initial_behavior)
        self._requests: list[RecordedRequest] = []
        self._other_paths: list[str] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> FakeProvider:
        if self._server is not None:
            raise RuntimeError("FakeProvider is already running")
        self._server = _Server((self._host, self._requested_port), self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": _POLL_INTERVAL_S},
            name=f"fake-provider-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self, timeout: float = 2.0) -> None:
        """Stop serving; in-flight requests are abandoned (their sleeps are interrupted)."""
        server, thread = self._server, self._thread
        if server is None:
            return
        self._server = self._thread = None
        deadline = time.monotonic() + timeout
        server.begin_stop()
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(max(0.0, deadline - time.monotonic()))
        server.finish_stop(deadline)

    def __enter__(self) -> FakeProvider:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def port(self) -> int:
        return self._running_server().port

    @property
    def base_url(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}/v1"

    def _running_server(self) -> _Server:
        if self._server is None:
            raise RuntimeError("FakeProvider is not running; call start() or use it as a context manager")
        return self._server

    # -- scripting -------------------------------------------------------------------------------

    def set(self, behavior: Behavior, *, model: str | None = None) -> None:
        """Default behaviour for every request, or only for requests whose body names ``model``."""
        with self._lock:
            if model is None:
                self._scripts.default = behavior
            else:
                self._scripts.per_model[model] = behavior

    def script(self, *behaviors: Behavior, model: str | None = None) -> None:
        """Queue behaviours consumed one per request (per ``model`` if given) before the defaults."""
        with self._lock:
            if model is None:
                self._scripts.queue.extend(behaviors)
            else:
                self._scripts.per_model_queue.setdefault(model, deque()).extend(behaviors)

    def reset(self, *, behaviors: bool = False) -> None:
        """Forget recorded requests and pending scripts.

        With ``behaviors=True`` also drop per-model defaults and restore the constructor's default.
        """
        with self._lock:
            self._requests.clear()
            self._other_paths.clear()
            self._scripts.queue.clear()
            self._scripts.per_model_queue.clear()
            if behaviors:
                self._scripts.default = self._initial_behavior
                self._scripts.per_model.clear()

    @property
    def requests(self) -> list[RecordedRequest]:
        """Snapshot of the chat-completions requests received so far (oldest first)."""
        with self._lock:
            return list(self._requests)

    @property
    def other_requests(self) -> list[str]:
        """``"METHOD /path"`` of every request to a path it does not serve (answered 404), oldest first.

        With :attr:`requests` it says whether anything at all reached this endpoint (e.g. one
        standing in for ``OPENAI_BASE_URL``)."""
        with self._lock:
            return list(self._other_paths)

    def _record_other(self, method: str, path: str) -> None:
        with self._lock:
            self._other_paths.append(f"{method} {path}")

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self._requests)

    @property
    def disconnects(self) -> int:
        with self._lock:
            return sum(1 for r in self._requests if r.disconnected)

    @property
    def open_connections(self) -> int:
        """TCP connections open to this provider now (kept-alive idle ones included; 0 when stopped)."""
        server = self._server
        return server.open_connections if server is not None else 0

    @property
    def models(self) -> list[str]:
        with self._lock:
            return sorted(set(self._scripts.per_model) | set(self._scripts.per_model_queue))

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Block until every recorded request has finished; False on timeout.

        Useful after a client-side timeout: the server only notices the disconnect a moment later.
        """
        with self._lock:
            return self._lock.wait_for(self._all_finished, timeout)

    def _all_finished(self) -> bool:
        return all(r.finished_at is not None for r in self._requests)

    async def wait_idle_async(self, timeout: float = 5.0) -> bool:
        """:meth:`wait_idle` for coroutines.

        Blocking the event loop instead would also stop an async client from closing its timed-out
        connections, so the server would never see those disconnects.
        """
        return await asyncio.to_thread(self.wait_idle, timeout)

    # -- used by the request handler -------------------------------------------------------------

    def _begin(self, body: dict[str, Any], headers: _HeaderItems, stream: bool) -> RecordedRequest:
        model = body.get("model")
        model = model if isinstance(model, str) else None
        messages = body.get("messages")
        with self._lock:
            behavior = self._pick(model)
            record = RecordedRequest(
                model=model,
                messages=messages if isinstance(messages, list) else [],
                body=body,
                stream=stream,
                headers={k.lower(): (_REDACTED if k.lower() in _SECRET_HEADERS else v) for k, v in headers},
                received_at=time.monotonic(),
                behavior=behavior,
                credential_sha256=next(
                    (credential_digest(v) for k, v in headers if k.lower() == "authorization"), None
                ),
            )
            self._requests.append(record)
            return record

    def _pick(self, model: str | None) -> Behavior:
        scripts = self._scripts
        if model is not None:
            queue = scripts.per_model_queue.get(model)
            if queue:
                return queue.popleft()
        if scripts.queue:
            return scripts.queue.popleft()
        if model is not None and model in scripts.per_model:
            return scripts.per_model[model]
        return scripts.default

    def _finish(self, record: RecordedRequest, *, completed: bool, disconnected: bool = False) -> None:
        with self._lock:
            if record.finished_at is None:
                record.finished_at = time.monotonic()
                record.completed = completed
                record.disconnected = disconnected
                self._lock.notify_all()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # Idle keep-alive connections would block a join in server_close(); stop() does its own.
    block_on_close = False
    # Bursts of hundreds of concurrent connects overflow the default backlog of 5, and a dropped
    # SYN costs the client a full second before it retries.
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], provider: FakeProvider) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.provider = provider
        self.stopping = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._active_lock = threading.Lock()
        self._active: dict[threading.Thread, socket.socket] = {}
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse-DNS getfqdn() which can stall for seconds.
        TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    @property
    def wake_socket(self) -> socket.socket:
        return self._wake_r

    def track(self, conn: socket.socket) -> None:
        with self._active_lock:
            self._active[threading.current_thread()] = conn

    def untrack(self) -> None:
        with self._active_lock:
            self._active.pop(threading.current_thread(), None)

    @property
    def open_connections(self) -> int:
        with self._active_lock:
            return len(self._active)

    def begin_stop(self) -> None:
        self.stopping.set()
        # Never drained: the byte keeps the socket readable, waking every current and future waiter.
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def finish_stop(self, deadline: float) -> None:
        with self._active_lock:
            active = dict(self._active)
        for conn in active.values():
            # Unblocks handlers parked in readline() on idle keep-alive connections.
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in active:
            thread.join(max(0.0, deadline - time.monotonic()))
        if not any(t.is_alive() for t in active):
            self._wake_r.close()
            self._wake_w.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            return  # clients vanishing mid-request is the point of this server
        super().handle_error(request, client_address)


class _ClientGone(Exception):
    pass


class _Stopping(Exception):
    pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeProvider/1.0"
    sys_version = ""
    # Without TCP_NODELAY the body write waits for the ACK of the header write, which the client
    # delays by ~40 ms.
    disable_nagle_algorithm = True

    @property
    def _srv(self) -> _Server:
        return cast(_Server, self.server)

    def setup(self) -> None:
        super().setup()
        self._srv.track(self.connection)

    def finish(self) -> None:
        self._srv.untrack()
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    # -- routing ---------------------------------------------------------------------------------

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        if path in _MODELS_PATHS:
            created = int(time.time())
            names = self._srv.provider.models or ["fake-model"]
            data = [{"id": n, "object": "model", "created": created, "owned_by": "fake"} for n in names]
            self._send_json(200, {"object": "list", "data": data})
        else:
            self._srv.provider._record_other("GET", path)
            self._send_error_json(404, f"Unknown path {path!r}.", code="not_found")

    def do_POST(self) -> None:
        raw = self._read_body()
        if raw is None:
            return
        path = self.path.split("?", 1)[0].rstrip("/")
        if path not in _CHAT_PATHS:
            self._srv.provider._record_other("POST", path)
            self._send_error_json(404, f"Unknown path {path!r}.", code="not_found")
            return
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        if not isinstance(body, dict):
            self._send_error_json(400, "The request body must be a JSON object.")
            return
        stream = bool(body.get("stream"))
        record = self._srv.provider._begin(body, self.headers.items(), stream)
        try:
            completed = self._answer(record, record.behavior)
        except _ClientGone:
            self.close_connection = True
            self._srv.provider._finish(record, completed=False, disconnected=True)
        except _Stopping:
            self.close_connection = True
            self._srv.provider._finish(record, completed=False)
        except OSError:
            self.close_connection = True
            self._srv.provider._finish(record, completed=False, disconnected=not self._srv.stopping.is_set())
        else:
            self._srv.provider._finish(record, completed=completed)

    def _read_body(self) -> bytes | None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            self._send_error_json(411, "Chunked request bodies are not supported.")
            return None
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            self._send_error_json(400, "Invalid Content-Length.")
            return None
        return self.rfile.read(length) if length else b""

    # -- answering -------------------------------------------------------------------------------

    def _answer(self, record: RecordedRequest, behavior: Behavior) -> bool:
        """Write the scripted answer; returns whether a complete HTTP response was sent."""
        self._wait(behavior.sample_latency())
        if behavior.body == "hang":
            self._wait(None)
        if behavior.body == "reset":
            self._reset_connection()
            return False
        if behavior.reject_prefill and record.messages and record.messages[-1].get("role") == "assistant":
            self._send_error_json(400, PREFILL_REJECTED_MESSAGE)
            return True
        if behavior.continuation is not None:
            behavior = _continuing(behavior, record.messages)
        if behavior.status >= 400:
            err_type, message, code = _error_defaults(behavior.status)
            self._send_error_json(
                behavior.status,
                behavior.error_message or message,
                err_type,
                behavior.error_code if behavior.error_code is not None else code,
                retry_after_s=behavior.retry_after_s,
            )
            return True
        if record.stream:
            return self._send_stream(record, behavior)
        if behavior.body == "malformed":
            self._send_raw(behavior.status, "application/json", _MALFORMED_BODY, behavior.retry_after_s)
            return True
        if behavior.trickle_byte_s is not None:
            self._send_trickle(
                behavior.status, json.dumps(_completion(record, behavior)).encode(), behavior.trickle_byte_s
            )
            return True
        self._send_json(behavior.status, _completion(record, behavior), retry_after_s=behavior.retry_after_s)
        return True

    def _send_trickle(self, status: int, body: bytes, interval_s: float) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.flush()
        for i in range(len(body)):
            self.wfile.write(body[i : i + 1])
            self.wfile.flush()
            self._wait(interval_s)

    def _send_stream(self, record: RecordedRequest, behavior: Behavior) -> bool:
        self.send_response(behavior.status)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        # Chunked rather than Connection: close so that a cut stream is visibly incomplete to the
        # client (an EOF-delimited body would look like a normal end of stream).
        self.send_header("Transfer-Encoding", "chunked")
        if behavior.retry_after_s is not None:
            self.send_header("Retry-After", _format_seconds(behavior.retry_after_s))
        self.end_headers()
        self._trickle_byte_s = behavior.trickle_byte_s

        chunk_id = _new_id()
        created = int(time.time())
        model = record.model or "fake-model"

        def event(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
            return {
                "id": chunk_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_fake",
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
            }

        deltas: list[dict[str, Any]]
        if behavior.tool_calls:
            calls = _tool_calls(behavior.tool_calls)
            deltas = [d for i, call in enumerate(calls) for d in _tool_call_deltas(i, call, behavior.chunks)]
            if behavior.text_before_tools:
                deltas = [{"content": part} for part in _split(behavior.text_before_tools, behavior.chunks)] + deltas
                deltas[0] = {"role": "assistant", **deltas[0]}
            else:
                deltas[0] = {"role": "assistant", "content": None, **deltas[0]}
        else:
            content = "" if behavior.body == "empty" else behavior.content
            deltas = [{"content": part} for part in _split(content, behavior.chunks)]
            deltas[0] = {"role": "assistant", **deltas[0]}

        for index, delta in enumerate(deltas):
            if index > 0:
                self._wait(behavior.inter_chunk_s)
            if behavior.cut_after_chunks is not None and index >= behavior.cut_after_chunks:
                self.close_connection = True
                return False
            if behavior.stall_after_chunks is not None and index >= behavior.stall_after_chunks:
                self._wait(None)  # until the client goes away (or the server stops)
            if index == 0 and behavior.body == "malformed":
                self._write_chunk(b'data: {"id": "' + chunk_id.encode() + b'", "choices": [{"delta": {\n\n')
                continue
            if index > 0 and index == behavior.malformed_after_chunks:
                self._write_chunk(b'data: {"id": "' + chunk_id.encode() + b'", "choices": [{"delta": {\n\n')
            self._write_event(event(delta))

        if behavior.cut_after_chunks is not None and behavior.cut_after_chunks >= len(deltas):
            self._wait(behavior.inter_chunk_s)
            self.close_connection = True
            return False
        self._write_event(event({}, _finish_reason(behavior)))
        stream_options = record.body.get("stream_options")
        if isinstance(stream_options, dict) and stream_options.get("include_usage"):
            usage_chunk = event({})
            usage_chunk["choices"] = []
            usage_chunk["usage"] = _usage(record, behavior)
            self._write_event(usage_chunk)
        if not behavior.no_done:
            self._write_chunk(b"data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")
        return True

    def _write_event(self, payload: dict[str, Any]) -> None:
        self._write_chunk(b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n")

    def _write_chunk(self, data: bytes) -> None:
        frame = b"%x\r\n%s\r\n" % (len(data), data)
        trickle = getattr(self, "_trickle_byte_s", None)
        if trickle is None:
            self.wfile.write(frame)
            return
        for i in range(len(frame)):
            self.wfile.write(frame[i : i + 1])
            self._wait(trickle)

    def _send_json(self, status: int, payload: Any, *, retry_after_s: float | None = None) -> None:
        self._send_raw(status, "application/json", json.dumps(payload).encode(), retry_after_s)

    def _send_error_json(
        self,
        status: int,
        message: str,
        err_type: str = "invalid_request_error",
        code: str | None = None,
        *,
        retry_after_s: float | None = None,
    ) -> None:
        payload = {"error": {"message": message, "type": err_type, "param": None, "code": code}}
        self._send_json(status, payload, retry_after_s=retry_after_s)

    def _send_raw(self, status: int, content_type: str, body: bytes, retry_after_s: float | None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-request-id", f"req_{uuid.uuid4().hex}")
        if retry_after_s is not None:
            self.send_header("Retry-After", _format_seconds(retry_after_s))
        self.end_headers()
        self.wfile.write(body)

    def _reset_connection(self) -> None:
        self.close_connection = True
        conn = self.connection
        # l_onoff=1, l_linger=0: close() then sends RST instead of FIN, so the client sees a reset.
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # The buffered reader holds a reference that would postpone the real close.
        self.rfile.close()
        conn.close()

    # -- waiting ---------------------------------------------------------------------------------

    def _wait(self, seconds: float | None) -> None:
        """Sleep ``seconds`` (forever if None); raise _ClientGone / _Stopping to abandon the answer."""
        if seconds is not None and seconds <= 0:
            return
        deadline = None if seconds is None else time.monotonic() + seconds
        with selectors.DefaultSelector() as selector:
            selector.register(self._srv.wake_socket, selectors.EVENT_READ, "stop")
            selector.register(self.connection, selectors.EVENT_READ, "client")
            while True:
                if self._srv.stopping.is_set():
                    raise _Stopping
                timeout = None if deadline is None else deadline - time.monotonic()
                if timeout is not None and timeout <= 0:
                    return
                for key, _ in selector.select(timeout):
                    if key.data == "stop":
                        raise _Stopping
                    if self._client_gone():
                        raise _ClientGone
                    # Readable but not EOF means a pipelined request; stop watching to avoid spinning.
                    selector.unregister(self.connection)

    def _client_gone(self) -> bool:
        try:
            peeked: bytes = self.connection.recv(1, socket.MSG_PEEK)
            return peeked == b""
        except BlockingIOError:
            return False
        except OSError:
            return True


_MALFORMED_BODY = b'{"id": "chatcmpl-malformed", "object": "chat.completion", "choices": [{"index": 0, "mess'


def _error_defaults(status: int) -> tuple[str, str, str | None]:
    if status in _ERROR_DEFAULTS:
        return _ERROR_DEFAULTS[status]
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    return ("server_error" if status >= 500 else "invalid_request_error", f"{phrase}.", None)


def _format_seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _new_id() -> str:
    return f"chatcmpl-fake{uuid.uuid4().hex[:24]}"


def _split(text: str, parts: int) -> list[str]:
    if not text:
        return [""]
    parts = min(parts, len(text))
    size, extra = divmod(len(text), parts)
    out: list[str] = []
    pos = 0
    for i in range(parts):
        end = pos + size + (1 if i < extra else 0)
        out.append(text[pos:end])
        pos = end
    return out


def _tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    normalised: list[dict[str, Any]] = []
    for i, call in enumerate(calls):
        function = call.get("function", call)
        arguments = function.get("arguments", "{}")
        normalised.append(
            {
                "id": call.get("id", f"call_fake{i}_{uuid.uuid4().hex[:8]}"),
                "type": call.get("type", "function"),
                "function": {
                    "name": function.get("name", "tool"),
                    "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments),
                },
            }
        )
    return normalised


def _tool_call_deltas(index: int, call: dict[str, Any], parts: int) -> list[dict[str, Any]]:
    """One call's stream deltas: whole (``parts`` 1), or its arguments in ``parts`` pieces as OpenAI sends them."""
    if parts <= 1:
        return [{"tool_calls": [{"index": index, **call}]}]
    function = call["function"]
    head = {
        "index": index,
        "id": call["id"],
        "type": call["type"],
        "function": {"name": function["name"], "arguments": ""},
    }
    pieces = _split(function["arguments"], parts)
    return [{"tool_calls": [head]}] + [
        {"tool_calls": [{"index": index, "function": {"arguments": piece}}]} for piece in pieces
    ]


def _continuing(behavior: Behavior, messages: list[dict[str, Any]]) -> Behavior:
    """How a request asking to continue part of ``behavior.content`` is answered (see ``Behavior``)."""
    full = behavior.content
    delivered = next(
        (
            m["content"]
            for m in reversed(messages)
            if isinstance(m, dict) and m.get("role") == "assistant" and isinstance(m.get("content"), str)
        ),
        None,
    )
    if not delivered or not full.startswith(delivered) or delivered == full:
        return behavior
    rest = full[len(delivered) :]
    if behavior.continuation == "restart":
        text = full
    elif behavior.continuation == "tail":
        words = delivered.split(" ")
        text = " ".join(words[-behavior.continuation_overlap_words :]) + rest
    elif messages[-1].get("role") == "assistant":
        text = rest  # a prefill: the model writes on from the last character
    else:
        text = rest.lstrip(" ")
    return replace(behavior, content=text, continuation=None)


def _finish_reason(behavior: Behavior) -> str:
    if behavior.tool_calls and behavior.finish_reason == "stop":
        return "tool_calls"
    return behavior.finish_reason


def _message_chars(messages: list[dict[str, Any]]) -> int:
    total = 0
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(p.get("text", "")) for p in content if isinstance(p, dict))
    return total


def _usage(record: RecordedRequest, behavior: Behavior) -> dict[str, int]:
    if behavior.tool_calls:
        produced = sum(len(c["function"]["arguments"]) for c in _tool_calls(behavior.tool_calls))
    else:
        produced = 0 if behavior.body == "empty" else len(behavior.content)
    prompt = max(1, _message_chars(record.messages) // 4)
    completion = max(1, produced // 4)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _completion(record: RecordedRequest, behavior: Behavior) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant"}
    if behavior.tool_calls:
        message["content"] = None
        message["tool_calls"] = _tool_calls(behavior.tool_calls)
    else:
        message["content"] = "" if behavior.body == "empty" else behavior.content
    finish_reason = _finish_reason(behavior)
    return {
        "id": _new_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": record.model or "fake-model",
        "system_fingerprint": "fp_fake",
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
        "usage": _usage(record, behavior),
    }
