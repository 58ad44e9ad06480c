"""Thin drivers: run a :class:`~._planner.Call` with real I/O.

Both drivers execute the same protocol (Launch / Wait / Done / Fail) and differ only
in their I/O primitives: the sync one sends requests from the calling thread (a worker
thread only when attempts must overlap, i.e. hedging), the async one awaits in the
calling task (a child task only when attempts overlap). Neither makes a decision, and
the sync driver never starts an event loop, so it is safe from any thread, including
threads of a running event loop's executor.

The whole attempt is bounded (``Attempt.bound_at``), not only each socket read (litellm's
``timeout`` is httpx's per-read timeout: a body trickling in a byte at a time never trips
it). Attempts running beside others are bounded by the planner (the driver wakes at
``Wait.until`` and stops what the planner dropped). An attempt awaited inline is bounded
by a timer that asks :meth:`Call.at_bound`: for async, a loop callback that cancels it;
for sync, the process's watchdog thread (``_saturation.Watchdog``), which shuts down the
sockets of the attempt's leased client (below). A sync attempt whose provider cannot take
our client runs in a worker thread instead, so that the caller's wait is still bounded (the
worker ends at litellm's per-read timeout). Both drivers report to the saturation monitor
which attempts are in flight, so it samples scheduling lag only while it matters.

Cancelling a losing hedge must close its connection, so the provider stops working on
it (and billing it). Async: cancelling the task does that (httpx closes the connection
of an interrupted request). Sync: a thread cannot be cancelled, and closing a socket
another thread is blocked reading does not wake that read on Linux; so an attempt that
may lose runs on an httpx client lent to it alone (:class:`_Lease`), whose sockets the
driver shuts down (``shutdown(SHUT_RDWR)``: the read fails at once, the provider sees
the disconnect). That needs litellm's ``client=`` argument, which for the ``openai``
provider (every OpenAI-compatible endpoint reached as ``openai/...``) takes an
``openai.OpenAI`` client. Other providers' losers are abandoned: their thread ends at
the attempt's own timeout and the result is dropped.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from . import _litellm_calls, _wire
from ._env import litellm
from ._planner import Attempt, Call, Done, Fail, Launch, Wait, attempt_timeout
from ._saturation import monitor

Clock = Callable[[], float]
log = logging.getLogger("llm_resilience")

_pool_lock = threading.Lock()
_pool: cf.ThreadPoolExecutor | None = None


def _thread_pool() -> cf.ThreadPoolExecutor:
    # Created on first hedge only: calls that never overlap attempts never pay for threads.
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = cf.ThreadPoolExecutor(max_workers=64, thread_name_prefix="llm-resilience-attempt")
        return _pool


FORK_WAIT_S = 2.0
"""How long a fork waits for the worker threads of stopped attempts to finish (normally milliseconds)."""


class _Stragglers:
    """Attempts the driver aborted whose worker thread is still finishing inside litellm.

    Aborting a losing hedge makes its read fail at once, but its thread then runs litellm's
    error path (exception mapping, failure callbacks), after the call has returned to the caller.
    That code takes locks, among them importlib's per-module locks: litellm imports
    ``litellm.proxy.guardrails.exception_utils`` on the first error and tries ``import fastapi``
    on every one. A process forked at that moment hands the child a module lock owned by a thread
    that does not exist there, and the child's first import of the same name blocks forever (CPython
    resets only its global import lock at fork). So a fork waits, up to :data:`FORK_WAIT_S`, until
    no aborted attempt is still running: the caller cannot know these threads exist.
    """

    def __init__(self) -> None:
        self._running = 0
        self._cond = threading.Condition(threading.Lock())

    def add(self, future: cf.Future[Any]) -> None:
        with self._cond:
            self._running += 1
        future.add_done_callback(self._finished)  # runs at once if it already finished

    def _finished(self, _future: cf.Future[Any]) -> None:
        with self._cond:
            self._running -= 1
            if self._running == 0:
                self._cond.notify_all()

    def wait(self, timeout: float) -> bool:
        """Whether every aborted attempt finished within ``timeout`` seconds."""
        with self._cond:
            return self._cond.wait_for(lambda: self._running == 0, timeout)


_stragglers = _Stragglers()


def _before_fork() -> None:
    if not _stragglers.wait(FORK_WAIT_S):
        log.warning("forking while an aborted attempt's thread still runs; the child may inherit its locks")


def _after_fork_in_child() -> None:
    # A forked child inherits the pool object without its threads (work submitted to it would
    # never run), locks possibly held by a thread that does not exist in the child, and idle
    # keep-alive connections shared with the parent. Start afresh; nothing is closed (the
    # parent still uses those connections).
    global _pool, _pool_lock, _leases, _stragglers
    _pool_lock = threading.Lock()
    _pool = None
    _leases = _Leases()
    _stragglers = _Stragglers()


def _send_kwargs(attempt: Attempt) -> dict[str, Any]:
    """litellm's arguments when the driver bounds the whole attempt: per-read timeout up to the deadline."""
    if attempt.read_timeout_s is None:
        return attempt.kwargs
    return {**attempt.kwargs, "timeout": attempt.read_timeout_s}


def _settle(call: Call, attempt: Attempt, clock: Clock, send: Callable[[], Any]) -> None:
    """Run one attempt to completion in this thread and report its outcome."""
    try:
        response = send()
    except Exception as error:
        call.on_error(attempt, error, clock())
    except BaseException:
        call.on_cancelled(attempt, clock())  # KeyboardInterrupt, SystemExit: not the provider's fault
        raise
    else:
        call.on_response(attempt, response, clock())


class _Lease:
    """An httpx client lent to one sync attempt at a time; its sockets can be shut down from any thread.

    Its connections are made by :class:`_WatchedBackend`, whose streams show the lease their sockets
    and (:class:`_WireStream`, not on HTTP/2) when the attempt's bytes go and come (see :meth:`watch`).
    """

    def __init__(self, key: str, http: Any) -> None:
        self.key = key
        self.aborted = False
        self.in_use = False  # between lease() and give_back(); abort() only acts in between
        self.client: Any = None  # the openai.OpenAI wrapper for the current attempt
        self.wrappers: dict[tuple[str, str, str | None], Any] = {}  # per credentials: built once
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self.http = http
        self._wired = _WatchedBackend.install(http, self)
        self.attempt: Attempt | None = None  # whose request timing this lease reports (see watch())
        self.clock: Clock = time.monotonic
        self._sending_since: float | None = None  # the current request's first write began (None: not sending)
        self._connecting: socket.socket | None = None  # a TCP connect in progress (see _WatchedBackend)
        self._reading: tuple[socket.socket, int | None] | None = None  # a read in progress: bytes taken before it

    def watch(self, attempt: Attempt, clock: Clock) -> None:
        """Report where ``attempt``'s time goes: handshakes, the request leaving, the answer arriving.

        The planner then knows how much of the attempt's wall time was the client's own (litellm's
        CPU before and after the request, waiting for the GIL or a pool thread): 16 threads calling
        a 60 ms provider take 70-95 ms each on 2 cores, a delay no lag probe sees. The times are
        the kernel's where Linux says (``_wire.py``): a thread that waits for the GIL writes its
        request and reads its answer late, but the socket knows when the bytes went and came.
        A client whose connections are not made by our backend (another httpx or httpcore layout,
        HTTP/2) reports nothing: the planner then judges the attempt by the lag probes.
        """
        attempt.io_measured = self._wired
        self.attempt, self.clock = attempt, clock
        self._sending_since = self._connecting = None  # (a previous attempt's connect may have failed)

    def _live_sockets(self) -> list[socket.socket]:
        with self._lock:
            return [s for s in self._sockets if s.fileno() != -1]

    # -- what the backend and its streams report (in the attempt's own thread) ----------------

    def connecting(self, sock: socket.socket | None) -> None:
        """A handshake with the provider's host begins (``sock``: a TCP connect, about to call
        ``connect()``; ``None``: TLS on a connected socket). The provider's side has the time from
        now on, until the handshake completes; the time before (resolving the name, the GIL after
        it) was the client's."""
        self._connecting = sock
        attempt = self.attempt
        if attempt is not None:
            attempt.on_wire = True
            if attempt.sent_at is None:
                attempt.connecting_since = self.clock()

    def connected(self, sock: socket.socket | None, tls: bool) -> None:
        """The handshake :meth:`connecting` announced completed; ``sock`` carries the connection from now on
        (``None``: a stream without a socket of its own, e.g. TLS inside a proxy's TLS)."""
        self._connecting = None
        attempt = self.attempt
        if attempt is not None and attempt.connecting_since is not None:  # (else note_wire() timed it already)
            since, attempt.connecting_since = attempt.connecting_since, None
            now = self.clock()
            network = now - since
            rtt = _wire.handshake_s(sock, since, now) if sock is not None else None
            if rtt is not None:
                # A TCP handshake is one round trip; TLS's takes one or two more.
                network = min(network, 2 * rtt) if tls else rtt
            attempt.network_s += network
        if sock is None:
            return
        with self._lock:  # (TLS wraps the TCP socket in a new one, detaching the first)
            self._sockets = [s for s in self._sockets if s.fileno() != -1]
            self._sockets.append(sock)
            aborted = self.aborted
        if aborted:  # connected after abort() ran: it must not get through either
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def writing(self) -> None:
        """A write of the request begins (the first of a request marks when it began to go out)."""
        if self._sending_since is None:
            self._sending_since = self.clock()
            if self.attempt is not None:
                self.attempt.on_wire = True

    def reading(self, sock: socket.socket | None) -> None:
        """A read begins; the first after a request's writes means the whole request has gone."""
        now = self.clock()
        left, taken = _wire.read_begins(sock, now) if sock is not None else (None, None)
        attempt = self.attempt
        if attempt is not None and self._sending_since is not None:
            # The provider's clock starts when the last byte of the request left, by the kernel's
            # clock: the thread may have waited for the GIL before the connect, between the headers
            # and the body, or after the write returned.
            attempt.sent_at = now if left is None else min(now, max(self._sending_since, left))
            attempt.answered_at = None
        self._sending_since = None
        # (what the kernel had received and no read had taken yet is for this read too: note_wire())
        self._reading = (sock, taken) if sock is not None else None

    def read(self, sock: socket.socket | None, data: bytes) -> None:
        """A read returned ``data``: the answer (so far) arrived when the kernel received its last
        bytes. What follows (parsing, litellm's wrapping, the GIL) is the client's."""
        self._reading = None
        attempt = self.attempt
        if attempt is None or attempt.sent_at is None or not data:
            return
        now = self.clock()
        arrived = _wire.received_at(sock, now) if sock is not None else None
        if arrived is None or arrived > now or arrived < attempt.sent_at:
            arrived = now
        attempt.answered_at = arrived

    def note_wire(self) -> None:
        """Bring the attempt's wire times up to what the kernel knows now (called before the planner
        judges the attempt in flight), though its thread may not have run since.

        A connect whose handshake completed ended then: what follows is the thread waiting for the
        GIL. An answer that came in and that the thread has not processed yet arrived when the kernel
        says: from then on the wait is the client's. Either it sits unread on the socket, or a read in
        progress has it already and its thread waits for the GIL.
        """
        attempt = self.attempt
        if attempt is None:
            return
        now = self.clock()
        since, connecting = attempt.connecting_since, self._connecting
        if since is not None and connecting is not None and _wire.established(connecting):
            attempt.connecting_since = None  # (connected(), when the thread gets there, adds nothing)
            attempt.network_s += _wire.handshake_s(connecting, since, now) or 0.0
        if attempt.sent_at is None:
            return
        arrived = _wire.waiting_since(self._live_sockets(), now)
        reading = self._reading
        if arrived is None and reading is not None:
            sock, mark = reading
            received = _wire.received_bytes(sock)
            if mark is not None and received is not None and received > mark:
                arrived = _wire.last_received_at([sock], now)
            elif attempt.answered_at is not None:
                attempt.answered_at = None  # reading again, nothing new yet: the provider's time again
        if arrived is not None:
            attempt.answered_at = min(now, max(attempt.sent_at, arrived))

    def abort(self) -> None:
        """Fail the attempt's read at once and close its connection (the provider sees the disconnect)."""
        with self._lock:
            if not self.in_use:  # the attempt already finished and handed the client back
                return
            self.aborted = True
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.http.close()


class _SocketStream:
    """httpcore's sync network stream, showing its lease the socket it runs on (a TLS upgrade brings a
    new one), so that :meth:`_Lease.abort` can shut it down from another thread."""

    __slots__ = ("_inner", "_lease", "_sock")

    def __init__(self, inner: Any, sock: socket.socket | None, lease: weakref.ref[_Lease]) -> None:
        self._inner = inner
        self._sock = sock
        self._lease = lease

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, timeout)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        data: bytes = self._inner.read(max_bytes, timeout)
        return data

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None) -> Any:
        lease = self._lease()
        if lease is not None:
            lease.connecting(None)
        stream = self._inner.start_tls(ssl_context, server_hostname, timeout)
        return type(self).over(stream, self._lease, tls=True)

    @classmethod
    def over(cls, stream: Any, lease_ref: weakref.ref[_Lease], tls: bool) -> _SocketStream:
        """``stream``, a connection that has just completed its handshake, shown to the lease."""
        sock = stream.get_extra_info("socket")
        if not isinstance(sock, socket.socket):
            sock = None
        lease = lease_ref()
        if lease is not None:
            lease.connected(sock, tls)
        return cls(stream, sock, lease_ref)

    def close(self) -> None:
        self._inner.close()

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _WireStream(_SocketStream):
    """A :class:`_SocketStream` that also reports to its lease when a request's bytes go and come.

    httpcore writes a request (headers, then body) and then reads its answer, on whatever connection
    the pool gives it: the stream sees exactly that, with no help from httpcore (its ``trace``
    extension would tell the same, at ten callbacks per request, each with a dict and an f-string).
    """

    __slots__ = ()

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        lease = self._lease()
        if lease is not None:
            lease.writing()
        self._inner.write(buffer, timeout)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        lease = self._lease()
        if lease is None:
            data: bytes = self._inner.read(max_bytes, timeout)
            return data
        lease.reading(self._sock)
        data = b""
        try:
            data = self._inner.read(max_bytes, timeout)
        finally:
            lease.read(self._sock, data)
        return data


class _WatchedBackend:
    """httpcore's sync network backend, except that the lease sees its connections' bytes go and come.

    httpcore hands over a new connection's socket only once ``connect()`` has returned *and* the
    thread holds the GIL again: in a thread burst that is hundreds of ms after the handshake
    completed, all of it counted as the provider's. With the socket known from the start, the
    kernel says when the handshake completed (:meth:`_Lease.note_wire`). Each connection's stream
    is a :class:`_WireStream`, which reports the request's writes and the answer's reads (a
    :class:`_SocketStream`, which reports its sockets only, on a pool the lease does not time).
    """

    def __init__(
        self, lease: _Lease, inner: Any, stream: Callable[[socket.socket], Any], wrap: type[_SocketStream]
    ) -> None:
        self._lease = weakref.ref(lease)  # the lease owns the client that owns this backend
        self._inner = inner
        self._stream = stream
        self._wrap = wrap

    @classmethod
    def install(cls, http: Any, lease: _Lease) -> bool:
        """Make every connection pool of ``http`` (its own, and a proxy's from the environment) use
        this backend. Whether the lease times the wire: ``False`` when a pool cannot take the
        backend, or speaks HTTP/2 (whose streams interleave the writes and reads of several
        requests: window updates). Where the backend is in, the lease sees every socket, timed or not:
        :meth:`_Lease.abort` needs them (without them a body trickling in outlives the deadline)."""
        # httpx builds its httpcore pools without a way to pass a backend: it is swapped in. A pool
        # of another shape (another httpx or httpcore version) keeps its own.
        try:
            import httpcore
            from httpcore._backends.sync import SyncStream
        except ImportError:
            return False
        transports = [getattr(http, "_transport", None), *getattr(http, "_mounts", {}).values()]
        pools = [getattr(transport, "_pool", None) for transport in transports if transport is not None]
        known = [
            pool
            for pool in pools
            if isinstance(pool, httpcore.ConnectionPool)
            and type(getattr(pool, "_network_backend", None)).__name__ == "SyncBackend"
        ]
        timed = bool(pools) and len(known) == len(pools) and not any(getattr(p, "_http2", True) for p in known)
        wrap = _WireStream if timed else _SocketStream
        for pool in known:
            pool._network_backend = cls(lease, pool._network_backend, SyncStream, wrap)  # type: ignore[assignment]
        return timed

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> Any:
        import httpcore

        # What socket.create_connection does (and then httpcore), with the socket shown to the lease
        # before connect().
        error: OSError | None = None
        try:
            for family, kind, proto, _name, address in socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM):
                sock = socket.socket(family, kind, proto)
                try:
                    sock.settimeout(timeout)
                    if local_address is not None:
                        sock.bind((local_address, 0))
                    lease = self._lease()
                    if lease is not None:
                        lease.connecting(sock)
                    sock.connect(address)
                except OSError as failed:
                    sock.close()
                    error = failed
                    continue
                for option in socket_options or ():
                    sock.setsockopt(*option)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return self._wrap.over(self._stream(sock), self._lease, tls=False)
        except TimeoutError as failed:
            raise httpcore.ConnectTimeout(str(failed)) from failed
        except OSError as failed:
            raise httpcore.ConnectError(str(failed)) from failed
        if isinstance(error, TimeoutError):
            raise httpcore.ConnectTimeout(str(error)) from error
        raise httpcore.ConnectError(str(error or f"getaddrinfo returns no address for {host}")) from error

    def __getattr__(self, name: str) -> Any:  # connect_unix_socket, sleep: httpcore's own
        return getattr(self._inner, name)


class _Leases:
    """Idle :class:`_Lease` clients per API base, so hedged routes keep their keep-alive connections."""

    def __init__(self, max_idle: int = 16) -> None:
        self.max_idle = max_idle
        self._idle: dict[str, list[_Lease]] = {}
        self._lock = threading.Lock()

    def lease(self, kwargs: Mapping[str, Any]) -> _Lease | None:
        """A lease for this attempt, or ``None`` when its provider cannot take our client."""
        try:
            credentials = _openai_credentials(kwargs)
            if credentials is None:
                return None
            base_url, api_key, organization = credentials
            with self._lock:
                idle = self._idle.get(base_url)
                lease = idle.pop() if idle else None
            if lease is None:
                lease = _Lease(base_url, _new_http_client())
            with lease._lock:
                lease.in_use = True
            lease.client = lease.wrappers.get(credentials)
            if lease.client is None:
                import openai

                lease.client = lease.wrappers[credentials] = openai.OpenAI(
                    api_key=api_key, base_url=base_url, organization=organization, http_client=lease.http, max_retries=0
                )
            return lease
        except Exception:  # never let the cancellation machinery fail a call: send without it
            return None

    def forget(self, base_url: str) -> None:
        prefix = base_url.rstrip("/")
        with self._lock:
            gone = [key for key in self._idle if key.rstrip("/") == prefix]
            idle = [lease for key in gone for lease in self._idle.pop(key)]
        for lease in idle:
            lease.close()

    def give_back(self, lease: _Lease) -> None:
        _pooled.pop(id(lease), None)
        lease.client = None
        lease.attempt = None
        with lease._lock:
            lease.in_use = False
        if not lease.aborted:
            with self._lock:
                idle = self._idle.setdefault(lease.key, [])
                if len(idle) < self.max_idle:
                    idle.append(lease)
                    return
        lease.close()


def _openai_credentials(kwargs: Mapping[str, Any]) -> tuple[str, str, str | None] | None:
    """(base_url, api_key, organization) as litellm would use them, if the attempt goes to litellm's
    OpenAI client and nothing the application configured would be bypassed by passing our own."""
    if kwargs.get("client") is not None or litellm.client_session is not None:
        return None
    if (_getenv("EXPERIMENTAL_OPENAI_BASE_LLM_HTTP_HANDLER") or "").lower() in ("1", "true", "yes"):
        return None  # litellm then sends through its own HTTP handler, which takes another client type
    # Resolving them takes litellm ~100 µs; every sync call needs them (its lease), so they are
    # cached per argument set and the environment they are read from.
    # A variable the arguments override is not read.
    api_base, base_url, api_key, organization = (
        kwargs.get("api_base"), kwargs.get("base_url"), kwargs.get("api_key"), kwargs.get("organization")
    )  # fmt: skip
    endpoint_given = bool(api_base or base_url)
    key = (
        kwargs["model"], kwargs.get("custom_llm_provider"), api_base, base_url, api_key, organization,
        None if api_key else _getenv("OPENAI_API_KEY"),
        None if endpoint_given else _getenv("OPENAI_BASE_URL"),
        None if endpoint_given else _getenv("OPENAI_API_BASE"),
        None if organization else _getenv("OPENAI_ORGANIZATION"),
    )  # fmt: skip
    try:
        return _credentials_cache[key]
    except KeyError:
        pass
    except TypeError:  # an argument that cannot be hashed: resolve every time
        return _resolve_openai_credentials(kwargs)
    creds = _resolve_openai_credentials(kwargs)
    if len(_credentials_cache) >= 256:
        _credentials_cache.clear()
    _credentials_cache[key] = creds
    return creds


_credentials_cache: dict[tuple[Any, ...], tuple[str, str, str | None] | None] = {}


def _getenv(name: str) -> str | None:
    """``os.environ.get(name)``, for the variables every sync call reads.

    For a variable that is not set, ``os.environ`` raises and catches two ``KeyError``s (~2 µs;
    a call reads two or three such): on POSIX the dict it keeps of the environment (its keys are
    the names encoded, as here) answers that at once, and only a variable that is set is read the
    ordinary way.
    """
    data = getattr(os.environ, "_data", None) if _POSIX else None
    if isinstance(data, dict) and name.encode() not in data:
        return None
    return os.environ.get(name)


_POSIX = os.name == "posix"


def _resolve_openai_credentials(kwargs: Mapping[str, Any]) -> tuple[str, str, str | None] | None:
    _model, provider, dynamic_key, api_base = litellm.get_llm_provider(
        model=kwargs["model"],
        custom_llm_provider=kwargs.get("custom_llm_provider"),
        api_base=kwargs.get("api_base") or kwargs.get("base_url"),
        api_key=kwargs.get("api_key"),
    )
    if provider != "openai":
        return None
    from litellm.llms.openai.common_utils import get_openai_credentials

    creds = get_openai_credentials(
        api_base=api_base, api_key=kwargs.get("api_key") or dynamic_key, organization=kwargs.get("organization")
    )
    if not creds.api_key:
        return None  # let litellm raise its own "no API key" error
    return creds.api_base, creds.api_key, creds.organization


def _new_http_client() -> Any:
    import httpx

    # The same transport settings litellm uses for its own sync OpenAI clients (its SSL
    # context is cached, so a new client costs microseconds, not a CA bundle load).
    from litellm.llms.custom_httpx.http_handler import get_ssl_configuration, http2_enabled

    http2 = http2_enabled()
    return httpx.Client(verify=get_ssl_configuration(http2=http2), follow_redirects=True, http2=http2)


_leases = _Leases()


def lease_client(kwargs: Mapping[str, Any]) -> _Lease | None:
    """An httpx client for one attempt whose sockets :meth:`_Lease.abort` shuts down from any thread
    (``None`` when the attempt's provider cannot take our client); hand it back with :func:`return_client`."""
    return _leases.lease(kwargs)


def openai_credentials(kwargs: Mapping[str, Any]) -> tuple[str, str, str | None] | None:
    """(base_url, api_key, organization) when the attempt may go through our own OpenAI client, else ``None``."""
    return _openai_credentials(kwargs)


def return_client(lease: _Lease) -> None:
    """Hand a :func:`lease_client` client back (an aborted one is closed, not reused)."""
    _leases.give_back(lease)


def forget_clients(base_url: str) -> None:
    """Close the idle leased clients of ``base_url`` (an endpoint that is gone: the warm-up's provider)."""
    _leases.forget(base_url)


os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)

_pooled: dict[int, tuple[_Lease, threading.Thread]] = {}
"""Leases of attempts running on pool threads, with the thread whose call they belong to."""


def _abort_daemon_callers_attempts() -> None:
    """At interpreter exit, before the pool's threads are joined: stop the attempts nobody will wait for.

    Python joins every pool thread at exit, so a process whose main thread ends while a daemon
    thread is in a hedged call would wait for that call's attempts to time out (30 s and more).
    Attempts of a daemon (or finished) caller are aborted: their reads fail at once. A
    non-daemon caller is waited for by Python anyway; its attempts are left alone.
    """
    for lease, caller in list(_pooled.values()):
        if caller.daemon or not caller.is_alive():
            lease.abort()


_register_thread_exit = getattr(threading, "_register_atexit", None)  # CPython: runs before threads are joined
if _register_thread_exit is not None:
    _register_thread_exit(_abort_daemon_callers_attempts)


def _send_leased(kwargs: dict[str, Any], lease: _Lease | None) -> Any:
    watchdog = monitor().watchdog
    watchdog.enter()
    try:
        if lease is None:
            return _litellm_calls.completion(**kwargs)
        return _litellm_calls.completion(**kwargs, client=lease.client)
    finally:
        watchdog.exit()
        if lease is not None:
            _leases.give_back(lease)


def _run_inline(call: Call, attempt: Attempt, lease: _Lease, clock: Clock) -> None:
    """Send ``attempt`` from this thread on ``lease``; the watchdog aborts it when :meth:`Call.at_bound` says so."""
    watchdog = monitor().watchdog

    def at_bound(now: float) -> float | None:
        lease.note_wire()  # a connect or an answer the thread has not got to yet (the GIL) is not late
        later = call.at_bound(attempt, now)
        if later is None:
            lease.abort()  # the read fails at once; litellm raises in this thread
        return later

    lease.watch(attempt, clock)
    bound = watchdog.enter(attempt.bound_at, at_bound)
    try:
        response = _litellm_calls.completion(**_send_kwargs(attempt), client=lease.client)
    except Exception as error:
        if bound is not None:
            bound.cancel()  # returns once at_bound is not running: the outcome below is the only one
        if lease.aborted:
            cut = attempt_timeout(attempt)
            cut.__cause__ = error
            error = cut
        call.on_error(attempt, error, clock())
    except BaseException:
        if bound is not None:
            bound.cancel()
        call.on_cancelled(attempt, clock())  # KeyboardInterrupt, SystemExit: not the provider's fault
        raise
    else:
        if bound is not None:
            bound.cancel()
        call.on_response(attempt, response, clock())
    finally:
        watchdog.exit()
        _leases.give_back(lease)


def _dropped(call: Call, running: dict[Any, Any]) -> list[Any]:
    """Keys of ``running`` whose attempt the planner no longer has in flight (it cut them off)."""
    live = {id(attempt) for attempt in call.in_flight}
    return [key for key, value in running.items() if id(value[0] if isinstance(value, tuple) else value) not in live]


def _stop(future: cf.Future[Any], lease: _Lease | None) -> None:
    if future.cancel():  # never started: nothing was sent
        if lease is not None:
            _leases.give_back(lease)
    elif lease is not None:
        lease.abort()  # its thread gets a connection error at once and returns the lease
        _stragglers.add(future)  # ... but runs litellm's error path after the call returned


def run_sync(call: Call, clock: Clock = time.monotonic) -> Any:
    """Drive ``call`` with blocking ``litellm.completion`` calls."""
    running: dict[cf.Future[Any], tuple[Attempt, _Lease | None]] = {}
    try:
        while True:
            for _attempt, watched in running.values():
                if watched is not None:
                    watched.note_wire()  # judged below: an unread answer is not the provider's delay
            action = call.next_action(clock())
            for future in _dropped(call, running) if running else ():
                _stop(future, running.pop(future)[1])
            if isinstance(action, Launch):
                attempt = action.attempt
                lease = _leases.lease(attempt.kwargs)
                if attempt.hedge_at is None and not running and lease is not None:
                    _run_inline(call, attempt, lease, clock)
                else:
                    # Overlapping attempts, or a provider we cannot abort: a worker thread, so the
                    # planner bounds the caller's wait and the driver stops what it drops.
                    kwargs = _send_kwargs(attempt) if lease is not None else attempt.kwargs
                    if lease is not None:
                        lease.watch(attempt, clock)  # a queued pool thread is the client's time too
                        _pooled[id(lease)] = (lease, threading.current_thread())
                    running[_thread_pool().submit(_send_leased, kwargs, lease)] = (attempt, lease)
            elif isinstance(action, Wait):
                timeout = None if action.until is None else max(0.0, action.until - clock())
                if not running:  # a retry's backoff
                    time.sleep(timeout or 0.0)
                    continue
                done, _ = cf.wait(running, timeout=timeout, return_when=cf.FIRST_COMPLETED)
                for future in done:
                    attempt, _lease = running.pop(future)
                    _settle(call, attempt, clock, future.result)
            elif isinstance(action, Done):
                return action.response
            elif isinstance(action, Fail):
                raise action.error
    finally:
        for future, (attempt, lease) in running.items():
            call.on_cancelled(attempt, clock())
            _stop(future, lease)
        call.cancel(clock())  # KeyboardInterrupt and the like: end the call's span too (no-op when decided)


async def _send_async(attempt: Attempt) -> Any:
    """An attempt running beside others (the planner bounds it: the driver cancels what it drops)."""
    probe = monitor().loop_probe()
    probe.enter()
    try:
        return await _litellm_calls.acompletion(**_send_kwargs(attempt))
    finally:
        probe.exit()


def running_task(loop: asyncio.AbstractEventLoop) -> asyncio.Task[Any]:
    """The task running an ``asyncio.timeout`` scope just entered (it refuses to run outside one)."""
    task = asyncio.current_task(loop)
    if task is None:
        raise RuntimeError("an attempt's timeout scope runs outside a task")
    return task


class _AsyncBound:
    """The loop timer of an attempt awaited inline: asks :meth:`Call.at_bound` when its bound passes.

    One object rather than a closure: a closure over these five names is seven more objects per
    attempt in flight for the garbage collector to walk, thousands at once under a burst.
    """

    __slots__ = ("attempt", "call", "clock", "handle", "loop", "scope", "task")
    handle: asyncio.TimerHandle

    def __init__(
        self, loop: asyncio.AbstractEventLoop, call: Call, attempt: Attempt, clock: Clock, scope: asyncio.Timeout
    ) -> None:
        self.loop, self.call, self.attempt, self.clock, self.scope = loop, call, attempt, clock, scope
        self.task = running_task(loop)

    def arm(self, after_s: float) -> None:
        self.handle = self.loop.call_at(self.loop.time() + after_s, self.fire)

    def fire(self) -> None:
        now = self.clock()
        later = self.call.at_bound(self.attempt, now)
        if later is None:  # cut: cancels the request (closing its connection)
            _litellm_calls.expire_after_dispatch(self.task, self.scope)
        else:
            self.arm(later - now)


async def _send_async_bounded(call: Call, attempt: Attempt, clock: Clock) -> Any:
    """An attempt awaited inline: a loop timer asks :meth:`Call.at_bound` when its bound passes."""
    loop = asyncio.get_running_loop()
    probe = monitor().loop_probe()
    probe.enter()
    try:
        async with asyncio.timeout(None) as scope:
            bound_at = attempt.bound_at if attempt.bound_at is not None else clock() + attempt.timeout_s
            timer = _AsyncBound(loop, call, attempt, clock, scope)
            timer.arm(bound_at - clock())
            try:
                return await _litellm_calls.acompletion(**_send_kwargs(attempt))
            finally:
                timer.handle.cancel()
    except TimeoutError as error:
        if not scope.expired():  # not our bound: litellm's or the caller's own
            raise
        raise attempt_timeout(attempt) from error
    finally:
        probe.exit()


async def _settle_async(call: Call, attempt: Attempt, clock: Clock, pending: Any) -> None:
    try:
        response = await pending
    except asyncio.CancelledError:
        call.on_cancelled(attempt, clock())
        raise
    except Exception as error:
        call.on_error(attempt, error, clock())
    else:
        call.on_response(attempt, response, clock())


async def run_async(call: Call, clock: Clock = time.monotonic) -> Any:
    """Drive ``call`` with ``litellm.acompletion``; cancelling the caller cancels every attempt."""
    running: dict[asyncio.Task[Any], Attempt] = {}
    sent = False
    try:
        while True:
            action = call.next_action(clock())
            for task in _dropped(call, running) if running else ():
                del running[task]
                _litellm_calls.cancel_after_dispatch(task)  # closes its connection
            if isinstance(action, Launch):
                sent = True
                attempt = action.attempt
                if attempt.hedge_at is None and not running:
                    await _settle_async(call, attempt, clock, _send_async_bounded(call, attempt, clock))
                else:
                    running[asyncio.ensure_future(_send_async(attempt))] = attempt
            elif isinstance(action, Wait):
                timeout = None if action.until is None else max(0.0, action.until - clock())
                if not running:  # a retry's backoff
                    await asyncio.sleep(timeout or 0.0)
                    continue
                done, _ = await asyncio.wait(running, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    attempt = running.pop(task)
                    await _settle_async(call, attempt, clock, task)
            elif isinstance(action, Done):
                return action.response
            elif isinstance(action, Fail):
                if not sent:
                    # Failing without a single await would never yield to the loop: a caller that
                    # retries at once then runs on and on, and the attempts whose answers would
                    # reopen the route (probes in flight on this loop) never get to run (soak).
                    await asyncio.sleep(0)
                raise action.error
    finally:
        for task, attempt in running.items():
            _litellm_calls.cancel_after_dispatch(task)  # closes the loser's connection
            call.on_cancelled(attempt, clock())
        call.cancel(clock())  # the caller cancelled its task: end the call's span too (no-op when decided)
