"""Breaker state shared by every replica through Redis (policy ``state: {backend: redis}``).

When one replica learns that a provider is sick, the others should stop sending to it too.
This module keeps, per model, a *fleet view* of the breaker that every process sharing a
namespace agrees on, and it does so without putting Redis on the call path:

* **Reads are local.** A background thread (one per engine) refreshes a local copy of the
  fleet state every ``sync_interval_s`` (one Lua script for all the models this process
  uses). :meth:`SharedBreakerState.admission` only reads that copy: a dict lookup and a
  clock read. Redis being slow or down can never slow a call.
* **Writes are rare and asynchronous.** Only counted failures and breaker transitions are
  written, queued for the background thread, which is woken at once (so an open breaker
  reaches the other replicas within one round trip plus their next refresh).
* **Times are Redis server times.** An open breaker is stored as ``open_until`` in the Redis
  server's clock (``TIME`` inside the scripts) and turned into this process's monotonic time
  as "``open_until - server_now`` from the moment the reply arrived". No replica's wall
  clock is trusted, so clock skew between hosts cannot shorten or stretch a cooldown, and a
  failed probe re-opens with a fresh ``open_until`` (cooldowns extend).

Keys, all under the hash tag ``{namespace}`` so that a Redis Cluster keeps them in one slot::

    llmr:{ns}:<model>:open    open_until (server ms); present = open, or half-open once passed
    llmr:{ns}:<model>:probe   id of the process that holds the fleet's single half-open probe (TTL)
    llmr:{ns}:<model>:fails   sorted set of failure times (server ms): a sliding-window count

The fleet state machine: failures from every replica land in ``fails``; when the count
within ``failure_window_s`` reaches the model's ``fail_max``, the script that added the last
one writes ``open``. Until ``open_until`` every replica skips the model. After it, the first
replica that has traffic for the model takes the ``probe`` key (``SET NX`` with a TTL, so a
replica that dies mid-probe frees it); every other replica keeps skipping. The probe's
outcome closes the fleet breaker (deletes the keys) or re-opens it. A success anywhere
resets the failure count (pybreaker counts consecutive failures, and so does the fleet,
approximately), but only when there is a count to reset: the healthy path writes nothing.

Each process keeps its own pybreaker too (``_breakers.py``); fleet transitions seen in the
refresh are mirrored onto it, so metrics and logs of every replica show the breaker open,
and when Redis is unreachable the local breaker simply goes on alone (one warning, and
sharing resumes by itself when Redis answers again).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger("llm_resilience.shared_state")

MirrorFn = Callable[[str, str], None]
"""Called on the sync thread with (model, "open" | "closed") when the fleet state of a model changes."""
OpenForFn = Callable[[], "float | None"]
"""Seconds the local breaker of a model stays open (``None``: not open)."""


class FleetAdmission(Enum):
    """What the fleet says about sending a request to a model now."""

    DEFER = "defer"  # no fleet opinion (closed, unknown, or Redis unreachable): the local breaker decides
    OPEN = "open"  # the fleet breaker is open: skip
    PROBE_BUSY = "probe_busy"  # half-open and another process (or nobody yet) holds the probe: skip
    PROBE = "probe"  # half-open and this process holds the fleet's probe: send one trial request


@dataclass(frozen=True)
class FleetView:
    """The fleet state of one model as last read from Redis, in this process's monotonic time."""

    open_until: float | None = None
    """Open until then; half-open after it; ``None``: closed."""
    probe_owner: str = ""
    failures: int = 0
    """Failures within the window (all replicas)."""


_CLOSED = FleetView()

# Every script reads the server's clock, so that no replica's own clock matters.
_NOW = "local t = redis.call('TIME') local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) "

# KEYS: (open, probe, fails) per model. ARGV: window_ms. -> now, then (open_until|'', owner|'', failures) per model.
_SNAPSHOT = (
    _NOW
    + """
local out = {now}
for i = 1, #KEYS, 3 do
  out[#out + 1] = redis.call('GET', KEYS[i]) or ''
  out[#out + 1] = redis.call('GET', KEYS[i + 1]) or ''
  out[#out + 1] = redis.call('ZCOUNT', KEYS[i + 2], now - tonumber(ARGV[1]), '+inf')
end
return out
"""
)

# KEYS: open, probe, fails. ARGV: member, window_ms, fail_max, open_ms, keep_ms. -> now, open_until|'', owner, n
_RECORD_FAILURE = (
    _NOW
    + """
local open_until = redis.call('GET', KEYS[1])
if open_until then  -- already open or probing: a late failure must not extend the cooldown
  return {now, open_until, redis.call('GET', KEYS[2]) or '', 0}
end
redis.call('ZADD', KEYS[3], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[3], ARGV[2])
local n = redis.call('ZCARD', KEYS[3])
if n >= tonumber(ARGV[3]) then
  open_until = string.format('%d', now + tonumber(ARGV[4]))
  redis.call('SET', KEYS[1], open_until, 'PX', tonumber(ARGV[4]) + tonumber(ARGV[5]))
  redis.call('DEL', KEYS[3])
  return {now, open_until, '', n}
end
return {now, '', '', n}
"""
)

# KEYS: open, probe, fails. ARGV: open_ms, keep_ms, extend ('1': a failed probe re-opens even if open).
_PUBLISH_OPEN = (
    _NOW
    + """
local open_until = redis.call('GET', KEYS[1])
if open_until and ARGV[3] ~= '1' then
  return {now, open_until, redis.call('GET', KEYS[2]) or '', 0}
end
open_until = string.format('%d', now + tonumber(ARGV[1]))
redis.call('SET', KEYS[1], open_until, 'PX', tonumber(ARGV[1]) + tonumber(ARGV[2]))
redis.call('DEL', KEYS[2], KEYS[3])
return {now, open_until, '', 0}
"""
)

# KEYS: open, probe, fails. ARGV: me. Only the holder of the fleet probe may close the fleet breaker.
_PUBLISH_CLOSED = (
    _NOW
    + """
local open_until = redis.call('GET', KEYS[1])
local owner = redis.call('GET', KEYS[2]) or ''
if open_until and owner ~= ARGV[1] then
  return {now, open_until, owner, 0}
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
return {now, '', '', 0}
"""
)

# KEYS: open, probe, fails. ARGV: me, ttl_ms. Take the fleet's probe if the breaker is half-open and nobody has it.
_ACQUIRE_PROBE = (
    _NOW
    + """
local open_until = redis.call('GET', KEYS[1])
if not open_until then
  return {now, '', '', 0}
end
if tonumber(open_until) <= now then
  redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2])
end
return {now, open_until, redis.call('GET', KEYS[2]) or '', 0}
"""
)

# Keep a fleet breaker's record this long after its open period (then a replica-less fleet forgets it).
KEEP_AFTER_OPEN_MS = 600_000
RECONNECT_S = 1.0
"""Seconds between attempts to reach Redis while it is unreachable."""


@dataclass(frozen=True)
class _Op:
    script: str
    model: str
    args: tuple[Any, ...]


class SharedBreakerState:
    """The fleet view of every breaker an engine uses, kept in sync with Redis in the background.

    ``client_factory`` returns a redis-py ``Redis`` client (tests and :func:`from_url` pass one
    with short timeouts); it is called on the sync thread only, again after every error.
    """

    def __init__(
        self,
        client_factory: Callable[[], Any],
        namespace: str,
        *,
        failure_window_s: float = 60.0,
        sync_interval_s: float = 0.5,
        describe: str = "redis",
        start: bool = True,
    ) -> None:
        self._client_factory = client_factory
        self.namespace = namespace
        self.failure_window_s = failure_window_s
        self.sync_interval_s = sync_interval_s
        self.describe = describe
        self.id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._prefix = f"llmr:{{{namespace}}}:"
        self._mirrors: dict[str, MirrorFn] = {}
        self._local_open: dict[str, OpenForFn] = {}
        self._closed = False
        self._reset_process_state()
        _INSTANCES.add(self)
        if start:
            self.start()

    def _reset_process_state(self) -> None:
        """Everything that belongs to one process (recreated in a forked child)."""
        self._views: dict[str, FleetView] = {}
        self._healthy = False
        self._ops: collections.deque[_Op] = collections.deque(maxlen=10_000)
        self._want_probe: dict[str, float] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: Any = None
        self._scripts: dict[str, Any] = {}
        self._down_since: float | None = None
        self._warned = False
        self.synced = threading.Event()
        """Set after each successful sync (tests wait on it)."""

    def start(self) -> None:
        """Start the sync thread (once). An engine first watches its models, so the first sync covers them."""
        if self._closed or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name=f"llm-resilience-state-{self.namespace}", daemon=True)
        self._thread.start()

    def _after_fork_in_child(self) -> None:
        # The parent's thread does not exist here and its socket is shared with the parent:
        # start over with a fresh connection and an empty view (in-process until the first sync).
        self.id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._reset_process_state()
        self.start()

    # -- the hot path: local reads only ---------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """Redis answered the last sync: the fleet view is current."""
        return self._healthy

    def view(self, model: str) -> FleetView:
        return self._views.get(model, _CLOSED)

    def open_until_epoch(self, model: str) -> float | None:
        """When the fleet breaker of ``model`` admits a probe, in epoch seconds (for spans and logs)."""
        until = self._views.get(model, _CLOSED).open_until
        return None if until is None else time.time() + (until - time.monotonic())

    def admission(self, model: str) -> FleetAdmission:
        """What the fleet says about ``model`` now. Never blocks, never touches Redis."""
        if not self._healthy:
            return FleetAdmission.DEFER
        v = self._views.get(model)
        if v is None or v.open_until is None:
            return FleetAdmission.DEFER
        if time.monotonic() < v.open_until:
            return FleetAdmission.OPEN
        if v.probe_owner == self.id:
            return FleetAdmission.PROBE
        if not v.probe_owner:  # nobody probes yet: ask the sync thread to take the probe for us
            self._want_probe[model] = time.monotonic()
            self._wake.set()
        return FleetAdmission.PROBE_BUSY

    # -- writes: queued for the sync thread ------------------------------------------------------

    def watch(self, model: str, mirror: MirrorFn, open_for_s: OpenForFn | None = None) -> None:
        """Keep ``model`` in the fleet view; ``mirror`` hears about its fleet transitions.

        ``open_for_s`` tells whether the local breaker is open: breakers that opened while Redis
        was unreachable (or lost its data in a restart) are published when it answers again.
        """
        self._mirrors[model] = mirror
        if open_for_s is not None:
            self._local_open[model] = open_for_s
        self._wake.set()

    def unwatch(self, model: str) -> None:
        """Stop following ``model`` (its breaker was evicted from the registry)."""
        self._mirrors.pop(model, None)
        self._local_open.pop(model, None)
        self._views.pop(model, None)

    def record_failure(self, model: str, fail_max: int, open_s: float) -> None:
        """A counted failure of ``model`` in this process (the breaker was closed)."""
        if self._healthy:
            member = f"{self.id}:{uuid.uuid4().hex[:12]}"
            window_ms = int(self.failure_window_s * 1000)
            self._queue(_RECORD_FAILURE, model, (member, window_ms, fail_max, int(open_s * 1000), KEEP_AFTER_OPEN_MS))

    def record_success(self, model: str) -> None:
        """A success of ``model``: resets the fleet's failure count, if there is one to reset."""
        if self._healthy and self._views.get(model, _CLOSED).failures > 0:
            v = self._views[model]
            self._views[model] = FleetView(v.open_until, v.probe_owner, 0)  # one reset per count seen
            self._queue("reset", model, ())

    def publish_open(self, model: str, open_s: float, *, extend: bool) -> None:
        """This process opened ``model``'s breaker (``extend``: a failed probe, which re-opens it)."""
        if not self._healthy:
            return
        v = self._views.get(model, _CLOSED)
        if extend or v.open_until is None:  # seen at once by this process's own admissions
            self._views[model] = FleetView(time.monotonic() + open_s, "", 0)
        self._queue(_PUBLISH_OPEN, model, (int(open_s * 1000), KEEP_AFTER_OPEN_MS, "1" if extend else "0"))

    def publish_closed(self, model: str) -> None:
        """This process closed ``model``'s breaker (its probe succeeded)."""
        if not self._healthy:
            return
        v = self._views.get(model, _CLOSED)
        if v.open_until is None or v.probe_owner == self.id:
            self._views[model] = _CLOSED
        self._queue(_PUBLISH_CLOSED, model, (self.id,))

    def on_transition(self, model: str, old: str, new: str, open_s: float) -> None:
        """Publishes a local breaker transition; mirrored transitions (made by the sync thread) are not echoed."""
        if threading.current_thread() is self._thread:
            return
        if new == "open":
            self.publish_open(model, open_s, extend=(old == "half-open"))
        elif new == "closed":
            self.publish_closed(model)

    def _queue(self, script: str, model: str, args: tuple[Any, ...]) -> None:
        self._ops.append(_Op(script, model, args))
        self._wake.set()

    def close(self) -> None:
        """Stop the sync thread (the engine is being discarded)."""
        self._closed = True
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
        _INSTANCES.discard(self)

    # -- the sync thread -------------------------------------------------------------------------

    def _keys(self, model: str) -> list[str]:
        base = f"{self._prefix}{model}:"
        return [base + "open", base + "probe", base + "fails"]

    def _run(self) -> None:
        while True:
            stopping = self._stop.is_set()  # one last sync after close(): queued writes are flushed
            try:
                self._sync_once()
            except Exception as e:  # redis errors, and anything else: never kill the thread
                self._went_down(e)
                if stopping:
                    break
                self._stop.wait(RECONNECT_S)
                continue
            if stopping:
                break
            self._wake.wait(self.sync_interval_s)
            self._wake.clear()
        client = self._client
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()

    def _script(self, source: str) -> Any:
        script = self._scripts.get(source)
        if script is None:
            script = self._scripts[source] = self._client.register_script(source)
        return script

    def _sync_once(self) -> None:
        if self._client is None:
            self._client = self._client_factory()
            self._scripts = {}
        # Writes first (in order), then probes wanted, then one snapshot of every watched model.
        while self._ops:
            op = self._ops.popleft()
            if op.script == "reset":
                self._client.delete(self._keys(op.model)[2])
                continue
            reply = self._script(op.script)(keys=self._keys(op.model), args=list(op.args))
            self._apply(op.model, reply[0], reply[1:])
        for model in list(self._want_probe):
            self._want_probe.pop(model, None)
            if model in self._mirrors:
                ttl_ms = max(int(self._probe_ttl_s(model) * 1000), 1000)
                reply = self._script(_ACQUIRE_PROBE)(keys=self._keys(model), args=[self.id, ttl_ms])
                self._apply(model, reply[0], reply[1:])
        models = list(self._mirrors)
        if models:
            keys = [key for m in models for key in self._keys(m)]
            reply = self._script(_SNAPSHOT)(keys=keys, args=[int(self.failure_window_s * 1000)])
            now_ms = reply[0]
            for i, model in enumerate(models):
                self._apply(model, now_ms, reply[1 + 3 * i : 4 + 3 * i])
        else:
            self._client.ping()
        if not self._healthy:
            if self._warned:
                log.warning("shared breaker state: %s answers again; breakers are shared again", self.describe)
            self._warned = False
            self._down_since = None
            self._healthy = True
            self._publish_local_opens()
        self.synced.set()

    def _publish_local_opens(self) -> None:
        # What this process learned alone is told to the fleet (NX: an open the fleet already has wins).
        for model, open_for_s in list(self._local_open.items()):
            left = open_for_s()
            if left is not None and self._views.get(model, _CLOSED).open_until is None:
                self._queue(_PUBLISH_OPEN, model, (int(left * 1000), KEEP_AFTER_OPEN_MS, "0"))

    def _probe_ttl_s(self, model: str) -> float:
        # A replica that dies while probing must not hold the fleet's probe for ever; one
        # sync interval is far too short for a slow provider, a few minutes too long to wait.
        return max(30.0, 10 * self.sync_interval_s)

    def _apply(self, model: str, server_now_ms: int, fields: Sequence[Any]) -> None:
        """Turn a script's answer (open_until, owner, failures) into the local view; mirror changes."""
        received = time.monotonic()
        raw_until, raw_owner, failures = (_text(fields[0]), _text(fields[1]), int(fields[2]))
        open_until = received + (int(raw_until) - int(server_now_ms)) / 1000 if raw_until else None
        old = self._views.get(model)
        new = FleetView(open_until, raw_owner, failures)
        self._views[model] = new
        was_open = old is not None and old.open_until is not None
        mirror = self._mirrors.get(model)
        if mirror is None:
            return
        if open_until is not None and not was_open:
            mirror(model, "open")
        elif open_until is None and was_open:
            mirror(model, "closed")

    def _went_down(self, error: BaseException) -> None:
        self._healthy = False
        self._views = {}
        self._ops.clear()  # failures seen while Redis was away stay local; the local breaker counted them
        self._want_probe.clear()
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()
        if not self._warned:
            self._warned = True
            self._down_since = time.monotonic()
            log.warning(
                "shared breaker state: %s unreachable (%s: %s); breakers are per process until it answers "
                "(calls are not affected; this warning is shown once per outage)",
                self.describe, type(error).__name__, error,
            )  # fmt: skip


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


_INSTANCES: weakref.WeakSet[SharedBreakerState] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for state in list(_INSTANCES):
        if not state._closed:
            state._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def redacted_url(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit((parts.scheme, user + host, parts.path, parts.query, parts.fragment))


CONNECT_TIMEOUT_S = 0.5
READ_TIMEOUT_S = 0.5


def from_url(
    url: str, namespace: str, *, failure_window_s: float = 60.0, sync_interval_s: float = 0.5, start: bool = True
) -> SharedBreakerState | None:
    """A shared state on the Redis at ``url``, or ``None`` (with one warning) when redis-py is missing."""
    try:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry
    except ImportError:
        log.warning(
            "policy asks for state.backend: redis but the 'redis' package is not installed "
            "(pip install 'llm-resilience[redis]'); breakers are per process"
        )
        return None

    def client() -> Any:
        # Short timeouts and no retries: this runs on the sync thread, and a slow Redis must
        # only make the fleet view older, never hold anything else up.
        return redis.Redis.from_url(
            url,
            socket_connect_timeout=CONNECT_TIMEOUT_S,
            socket_timeout=READ_TIMEOUT_S,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )

    return SharedBreakerState(
        client, namespace, failure_window_s=failure_window_s, sync_interval_s=sync_interval_s,
        describe=f"redis {redacted_url(url)}", start=start,
    )  # fmt: skip
