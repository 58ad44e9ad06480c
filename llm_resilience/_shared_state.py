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

Keys, all under the hash tag ``{namespace}``; ``<model>`` is the fleet key of a model (the litellm
model string and endpoint it calls: :func:`fleet_key`), never the policy's name for it::

    llmr:{ns}:<model>:open    open_until (server ms); present = open, or half-open once passed
    llmr:{ns}:<model>:probe   id of the process that holds the fleet's single half-open probe (TTL)
    llmr:{ns}:<model>:fails   sorted set of failure times (server ms): a sliding-window count
    llmr:{ns}:<model>:closed  the open_until of the last open a probe closed (a stamp; TTL)

The fleet state machine: failures from every replica land in ``fails``; when the count
within ``failure_window_s`` reaches the model's ``fail_max``, the script that added the last
one writes ``open``. Until ``open_until`` every replica skips the model. After it, the first
replica that has traffic for the model takes the ``probe`` key (``SET NX`` with a short TTL);
every other replica keeps skipping. The holder sends the probe and keeps the key alive for as
long as that call may last, or, with no request to send, gives the key up. The probe's outcome
closes the fleet breaker (deletes the keys, stamps ``closed``) or re-opens it. A success
anywhere resets the failure count (pybreaker counts consecutive failures, and so does the fleet,
approximately), but only when there is a count to reset: the healthy path writes nothing.

Only a stamped close closes: a key that vanished without one (``FLUSHALL``, eviction, a restart)
is no verdict, and a process whose local breaker is still open publishes it again.

Each process keeps its own pybreaker too (``_breakers.py``); fleet transitions seen in the
refresh are mirrored onto it (cause ``fleet``), so metrics and logs of every replica show the
breaker open, and when Redis is unreachable the local breaker simply goes on alone (one warning,
and sharing resumes by itself when Redis answers again). Redis Cluster and read-only replicas
are refused (one warning): only a standalone primary holds shared state.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import hashlib
import logging
import os
import re
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

log = logging.getLogger("llm_resilience.shared_state")

MirrorFn = Callable[[str, str], None]
"""Called on the sync thread with (key, "open" | "closed") when the fleet state of a model changes."""
OpenForFn = Callable[[], "float | None"]
"""Seconds the local breaker of a model stays open (``None``: not open)."""
ProbingFn = Callable[[], bool]
"""Whether this process has a probe of the model in flight."""


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
    raw_until: int | None = None
    """``open_until`` as Redis stored it (server ms); ``None`` while this process's own open is unconfirmed."""


_CLOSED = FleetView()

# Every script reads the server's clock, so that no replica's own clock matters.
_NOW = "local t = redis.call('TIME') local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) "
# Every script answers {now, then per model: open_until|'', probe owner|'', failures, closed|''}.
# ``closed`` is the open_until of the last open that a probe closed: it tells a breaker the fleet
# closed from one whose keys were lost (FLUSHALL, eviction, a restart), which is no verdict at all.
_STATE = "redis.call('GET', KEYS[2]) or '', {n}, redis.call('GET', KEYS[4]) or ''"

# KEYS: (open, probe, fails, closed) per model. ARGV: window_ms.
_SNAPSHOT = (
    _NOW
    + """
local out = {now}
for i = 1, #KEYS, 4 do
  out[#out + 1] = redis.call('GET', KEYS[i]) or ''
  out[#out + 1] = redis.call('GET', KEYS[i + 1]) or ''
  out[#out + 1] = redis.call('ZCOUNT', KEYS[i + 2], now - tonumber(ARGV[1]), '+inf')
  out[#out + 1] = redis.call('GET', KEYS[i + 3]) or ''
end
return out
"""
)

# KEYS: open, probe, fails, closed. ARGV: member, window_ms, fail_max, open_ms, keep_ms.
_RECORD_FAILURE = (
    _NOW
    + """
local open_until = redis.call('GET', KEYS[1])
if open_until then  -- already open or probing: a late failure must not extend the cooldown
  return {now, open_until, """
    + _STATE.format(n="0")
    + """}
end
redis.call('ZADD', KEYS[3], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[3], ARGV[2])
local n = redis.call('ZCARD', KEYS[3])
if n >= tonumber(ARGV[3]) then
  open_until = string.format('%d', now + tonumber(ARGV[4]))
  redis.call('SET', KEYS[1], open_until, 'PX', tonumber(ARGV[4]) + tonumber(ARGV[5]))
  redis.call('DEL', KEYS[2], KEYS[3])
  return {now, open_until, '', n, redis.call('GET', KEYS[4]) or ''}
end
return {now, '', """
    + _STATE.format(n="n")
    + """}
"""
)

# KEYS: open, probe, fails, closed. ARGV: open_ms, keep_ms, extend ('1': a failed probe re-opens even if
# open), known (server ms of the open this process re-publishes, '0': none; skipped if a probe closed it since).
_PUBLISH_OPEN = (
    _NOW
    + """
local open_until = redis.call('GET', KEYS[1])
if open_until and ARGV[3] ~= '1' then
  return {now, open_until, """
    + _STATE.format(n="0")
    + """}
end
local closed = redis.call('GET', KEYS[4])
if ARGV[4] ~= '0' and closed and tonumber(closed) >= tonumber(ARGV[4]) then
  return {now, '', '', 0, closed}
end
open_until = string.format('%d', now + tonumber(ARGV[1]))
redis.call('SET', KEYS[1], open_until, 'PX', tonumber(ARGV[1]) + tonumber(ARGV[2]))
redis.call('DEL', KEYS[2], KEYS[3])
return {now, open_until, '', 0, closed or ''}
"""
)

# KEYS: open, probe, fails, closed. ARGV: me, known (server ms of the open this process probed), keep_ms.
# Only the holder of the fleet probe may close the fleet breaker; the close is stamped (see _STATE).
_PUBLISH_CLOSED = (
    _NOW
    + """
local open_until = redis.call('GET', KEYS[1])
local owner = redis.call('GET', KEYS[2]) or ''
if open_until and owner ~= ARGV[1] then
  return {now, open_until, owner, 0, redis.call('GET', KEYS[4]) or ''}
end
local closed = math.max(tonumber(open_until or '0'), tonumber(ARGV[2]))
if closed > 0 then
  redis.call('SET', KEYS[4], string.format('%d', closed), 'PX', ARGV[3])
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
return {now, '', '', 0, redis.call('GET', KEYS[4]) or ''}
"""
)

# KEYS: open, probe, fails, closed. ARGV: me, ttl_ms. Take the fleet's probe if half-open and nobody has it.
_ACQUIRE_PROBE = (
    _NOW
    + """
local open_until = redis.call('GET', KEYS[1])
if not open_until then
  return {now, '', """
    + _STATE.format(n="0")
    + """}
end
if tonumber(open_until) <= now then
  redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2])
end
return {now, open_until, """
    + _STATE.format(n="0")
    + """}
"""
)

# KEYS: open, probe, fails, closed. ARGV: me, ttl_ms ('0': release). The holder keeps its probe key alive
# while its probe is in flight, or gives it up at once when it has no request to send.
_HOLD_PROBE = (
    _NOW
    + """
if redis.call('GET', KEYS[2]) == ARGV[1] then
  if ARGV[2] == '0' then
    redis.call('DEL', KEYS[2])
  else
    redis.call('PEXPIRE', KEYS[2], ARGV[2])
  end
end
return {now, redis.call('GET', KEYS[1]) or '', """
    + _STATE.format(n="0")
    + """}
"""
)

_RESET = "reset"  # an op that only deletes the failure count

# Keep a fleet breaker's record this long after its open period (then a replica-less fleet forgets it).
KEEP_AFTER_OPEN_MS = 600_000
RECONNECT_S = 1.0
"""The longest wait between attempts to reach Redis while it is unreachable (the first ones come sooner)."""
FIRST_VIEW_WAIT_S = 0.5
"""How long building an engine waits for its first read of the fleet view (Redis slow or hung: no longer)."""
EXIT_FLUSH_S = 1.0
"""How long interpreter exit waits, in all, for queued failures and transitions to reach Redis."""


@dataclass(frozen=True)
class _Op:
    script: str
    model: str
    args: tuple[Any, ...]


@dataclass(eq=False)
class _Watcher:
    owner: object
    mirror: MirrorFn
    open_for_s: OpenForFn | None
    probing: ProbingFn | None


class RedisRoleError(Exception):
    """The Redis at the URL cannot keep shared state (a read-only replica, a cluster node)."""


class SharedBreakerState:
    """The fleet view of every breaker an engine uses, kept in sync with Redis in the background.

    ``client_factory`` returns a redis-py ``Redis`` client (tests and :func:`from_url` pass one
    with short timeouts); it is called on the sync thread only, again after every error.
    Models are named by their fleet key (``_breakers.ModelBreaker.fleet_key``).
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
        self._watchers: dict[str, list[_Watcher]] = {}
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
        self._claimed: dict[str, float] = {}  # probe keys this process took, and when (monotonic)
        self._probe_ttl_ms: dict[str, int] = {}  # how long the probe in flight may last, per model
        self._written: dict[str, int] = {}  # local writes per model: replies read before one are stale
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: Any = None
        self._scripts: dict[str, Any] = {}
        self._down_since: float | None = None
        self._warned = False
        self.synced = threading.Event()
        """Set after each successful sync (tests wait on it)."""
        self.first_round = threading.Event()
        """Set when the first sync ended, whether Redis answered or not."""

    def start(self) -> None:
        """Start the sync thread (once). An engine first watches its models, so the first sync covers them."""
        if self._closed or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name=f"llm-resilience-state-{self.namespace}", daemon=True)
        self._thread.start()

    def wait_for_first_view(self, timeout: float = FIRST_VIEW_WAIT_S) -> bool:
        """Wait, at most ``timeout`` seconds, until the fleet view was read once (or Redis failed to answer)."""
        return self.first_round.wait(timeout)

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

    def watch(
        self,
        model: str,
        mirror: MirrorFn,
        open_for_s: OpenForFn | None = None,
        probing: ProbingFn | None = None,
        *,
        owner: object | None = None,
    ) -> None:
        """Keep ``model`` in the fleet view; ``mirror`` hears about its fleet transitions.

        ``open_for_s`` tells whether the local breaker is open: breakers that opened while Redis
        was unreachable (or whose keys Redis lost) are published again. ``probing`` tells whether
        a probe of this process is in flight: the fleet's probe key is kept alive while it is,
        and given up when this process holds it without one. ``owner`` (default: ``mirror``)
        identifies the watcher for :meth:`unwatch`; several may watch one model.
        """
        watcher = _Watcher(owner if owner is not None else mirror, mirror, open_for_s, probing)
        watchers = [w for w in self._watchers.get(model, ()) if w.owner is not watcher.owner]
        self._watchers[model] = [*watchers, watcher]
        self._wake.set()

    def unwatch(self, model: str, owner: object | None = None) -> None:
        """Stop following ``model`` for ``owner`` (``None``: for everyone)."""
        left = [w for w in self._watchers.get(model, ()) if owner is not None and w.owner is not owner]
        if left:
            self._watchers[model] = left
            return
        self._watchers.pop(model, None)
        self._views.pop(model, None)
        self._claimed.pop(model, None)
        self._probe_ttl_ms.pop(model, None)
        self._written.pop(model, None)

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
            self._set_view(model, FleetView(v.open_until, v.probe_owner, 0, v.raw_until))  # one reset per count seen
            self._queue(_RESET, model, ())

    def publish_open(self, model: str, open_s: float, *, extend: bool) -> None:
        """This process opened ``model``'s breaker (``extend``: a failed probe, which re-opens it)."""
        if not self._healthy:
            return
        v = self._views.get(model, _CLOSED)
        if extend or v.open_until is None:  # seen at once by this process's own admissions
            self._set_view(model, FleetView(time.monotonic() + open_s))
        self._queue(_PUBLISH_OPEN, model, (int(open_s * 1000), KEEP_AFTER_OPEN_MS, "1" if extend else "0", 0))

    def publish_closed(self, model: str) -> None:
        """This process closed ``model``'s breaker (its probe succeeded)."""
        if not self._healthy:
            return
        v = self._views.get(model, _CLOSED)
        if v.open_until is None or v.probe_owner == self.id:
            self._set_view(model, _CLOSED)
        self._queue(_PUBLISH_CLOSED, model, (self.id, v.raw_until or 0, KEEP_AFTER_OPEN_MS))

    def hold_probe(self, model: str, for_s: float) -> None:
        """This process sends the fleet's probe now; it may take ``for_s`` seconds: keep the key that long."""
        if self._healthy and self._views.get(model, _CLOSED).probe_owner == self.id:
            ttl_ms = int((for_s + self._claim_ttl_s()) * 1000)
            self._probe_ttl_ms[model] = ttl_ms
            self._queue(_HOLD_PROBE, model, (self.id, ttl_ms))

    def release_probe(self, model: str) -> None:
        """This process's probe ended without a verdict (cancelled, not sent): another may probe at once."""
        if self._healthy and self._views.get(model, _CLOSED).probe_owner == self.id:
            self._probe_ttl_ms.pop(model, None)
            self._queue(_HOLD_PROBE, model, (self.id, 0))

    def on_transition(self, model: str, old: str, new: str, open_s: float) -> None:
        """Publishes a local breaker transition; mirrored transitions (made by the sync thread) are not echoed."""
        if threading.current_thread() is self._thread:
            return
        if new == "open":
            self.publish_open(model, open_s, extend=(old == "half-open"))
        elif new == "closed":
            self.publish_closed(model)

    def _set_view(self, model: str, view: FleetView) -> None:
        # A local write: any reply the sync thread read before it is older than what this process knows.
        self._written[model] = self._written.get(model, 0) + 1
        self._views[model] = view

    def _queue(self, script: str, model: str, args: tuple[Any, ...]) -> None:
        self._ops.append(_Op(script, model, args))
        self._wake.set()

    def close(self, *, wait: bool = True, timeout: float = 5.0) -> None:
        """Stop the sync thread (the engine is being discarded); queued writes are flushed first.

        ``wait=False`` returns at once (the thread flushes and ends by itself): a policy reload
        retires its old shared state so, never holding up the call that noticed the reload.
        """
        self._closed = True
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if wait and thread is not None and thread is not threading.current_thread():
            thread.join(timeout=timeout)
        _INSTANCES.discard(self)

    # -- the sync thread -------------------------------------------------------------------------

    def _keys(self, model: str) -> list[str]:
        base = f"{self._prefix}{model}:"
        return [base + "open", base + "probe", base + "fails", base + "closed"]

    def _claim_ttl_s(self) -> float:
        # A probe key taken for a request that has not come yet, or a holder that died: freed
        # after a few sync rounds (the holder refreshes it every round while its probe runs).
        return max(2.0, 4 * self.sync_interval_s)

    def _unused_claim_s(self) -> float:
        # The request that found the model half-open went elsewhere (the probe key is taken in the
        # background); the next one of this process probes. If none comes this soon, another
        # replica with traffic must get the probe instead of waiting for the key's TTL.
        return max(1.0, 2 * self.sync_interval_s)

    def _run(self) -> None:
        retry_in: float | None = None  # None: Redis answered the last sync
        while True:
            stopping = self._stop.is_set()  # one last sync after close(): queued writes are flushed
            try:
                self._sync_once()
                retry_in = None
            except Exception as e:  # redis errors, and anything else: never kill the thread
                # The first error after a good sync is retried at once (a restarted Redis drops
                # every connection, and a new one works at once); then after 0.1 s, doubling up to
                # RECONNECT_S: a short outage ends for this process as soon as Redis is back.
                first = retry_in is None and self._healthy
                self._went_down(e, warn=not first)
                self.first_round.set()
                if stopping:
                    break
                retry_in = 0.0 if first else min(RECONNECT_S, max(0.1, 2 * (retry_in or 0.0)))
                if retry_in:
                    self._stop.wait(retry_in)
                continue
            self.first_round.set()
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

    def _connect(self) -> Any:
        client = self._client_factory()
        try:
            role = client.execute_command("ROLE")
        except Exception as e:
            if not _is_response_error(e):  # ROLE refused (an ACL): assume a primary
                raise
            return client
        if role and _text(role[0]) in ("slave", "replica"):
            with contextlib.suppress(Exception):
                client.close()
            raise RedisRoleError("it is a replica (read-only); point state.url at the primary")
        if _cluster_enabled(client):
            with contextlib.suppress(Exception):
                client.close()
            raise RedisRoleError(
                "it is a Redis Cluster node, and Redis Cluster is not supported; use a standalone Redis primary"
            )
        return client

    def _run_script(self, source: str, model: str, args: Sequence[Any]) -> None:
        written = self._written.get(model, 0)
        reply = self._script(source)(keys=self._keys(model), args=list(args))
        self._apply(model, reply[0], reply[1:], written)

    def _sync_once(self) -> None:
        if self._client is None:
            self._client = self._connect()
            self._scripts = {}
        # Writes first (in order), then probes wanted, then one snapshot of every watched model.
        while self._ops:
            op = self._ops.popleft()
            if op.script == _RESET:
                self._client.delete(self._keys(op.model)[2])
                continue
            self._run_script(op.script, op.model, op.args)
        for model in list(self._want_probe):
            self._want_probe.pop(model, None)
            if model in self._watchers:
                self._run_script(_ACQUIRE_PROBE, model, (self.id, int(self._claim_ttl_s() * 1000)))
                if self._views.get(model, _CLOSED).probe_owner == self.id:
                    self._claimed[model] = time.monotonic()
        self._tend_probes()
        models = list(self._watchers)
        if models:
            written = dict(self._written)
            keys = [key for m in models for key in self._keys(m)]
            reply = self._script(_SNAPSHOT)(keys=keys, args=[int(self.failure_window_s * 1000)])
            now_ms = reply[0]
            for i, model in enumerate(models):
                self._apply(model, now_ms, reply[1 + 4 * i : 5 + 4 * i], written.get(model, 0))
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

    def _tend_probes(self) -> None:
        """The fleet's probe keys this process holds: kept while its probe runs, else given up at once."""
        now = time.monotonic()
        for model, claimed_at in list(self._claimed.items()):
            if self._views.get(model, _CLOSED).probe_owner != self.id:
                self._claimed.pop(model, None)
                self._probe_ttl_ms.pop(model, None)
                continue
            if any(w.probing is not None and w.probing() for w in self._watchers.get(model, ())):
                ttl_ms = self._probe_ttl_ms.get(model, int(self._claim_ttl_s() * 1000))
                self._run_script(_HOLD_PROBE, model, (self.id, ttl_ms))
            elif now - claimed_at >= self._unused_claim_s():  # taken for a request that did not come
                self._claimed.pop(model, None)
                self._run_script(_HOLD_PROBE, model, (self.id, 0))

    def _publish_local_opens(self) -> None:
        # What this process learned alone is told to the fleet (NX: an open the fleet already has wins).
        for model in list(self._watchers):
            self._publish_local_open(model)

    def _publish_local_open(self, model: str) -> bool:
        """Tell the fleet about the local open breaker of ``model`` (if it is one); ``True`` if queued."""
        view = self._views.get(model, _CLOSED)
        for watcher in self._watchers.get(model, ()):
            left = watcher.open_for_s() if watcher.open_for_s is not None else None
            if left is not None:
                args = (int(left * 1000), KEEP_AFTER_OPEN_MS, "0", view.raw_until or 0)
                self._queue(_PUBLISH_OPEN, model, args)
                return True
        return False

    def _apply(self, model: str, server_now_ms: int, fields: Sequence[Any], written: int) -> None:
        """Turn a script's answer into the local view; mirror the fleet's transitions.

        ``written``: the count of local writes for ``model`` when the request was sent. A reply
        read before a later local write (a breaker that just opened here) is stale for that
        model: applying it would undo the write (the next sync reads the model again).
        """
        if self._written.get(model, 0) != written:
            return
        received = time.monotonic()
        raw_until, owner, failures, raw_closed = (_text(fields[0]), _text(fields[1]), int(fields[2]), _text(fields[3]))
        old = self._views.get(model, _CLOSED)
        if raw_until:
            until = int(raw_until)
            new = FleetView(received + (until - int(server_now_ms)) / 1000, owner, failures, until)
            self._views[model] = new
            if old.open_until is None:
                self._mirror(model, "open")
            return
        if old.open_until is not None:
            closed_since = raw_closed and old.raw_until is not None and int(raw_closed) >= old.raw_until
            if not closed_since:
                # The open key is gone but no probe closed it: Redis lost it (FLUSHALL, eviction,
                # a restart) or it expired unprobed. Absence is no verdict: the local breaker keeps
                # deciding, and an open one is told to the fleet again.
                if old.raw_until is None:
                    return  # this process's own open, not written yet
                self._views[model] = FleetView(failures=failures)
                self._publish_local_open(model)
                return
        self._views[model] = FleetView(failures=failures) if failures else _CLOSED
        if old.open_until is not None:
            self._mirror(model, "closed")

    def _mirror(self, model: str, fleet_state: str) -> None:
        for watcher in list(self._watchers.get(model, ())):
            watcher.mirror(model, fleet_state)

    def _went_down(self, error: BaseException, *, warn: bool = True) -> None:
        self._healthy = False
        self._ops.clear()  # failures seen while Redis was away stay local; the local breaker counted them
        self._want_probe.clear()
        self._claimed.clear()
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()
        if warn and not self._warned:
            self._warned = True
            self._down_since = time.monotonic()
            if isinstance(error, RedisRoleError):
                log.warning(
                    "shared breaker state: %s cannot hold shared state: %s; breakers are per process "
                    "(calls are not affected; this warning is shown once)",
                    self.describe, error,
                )  # fmt: skip
                return
            log.warning(
                "shared breaker state: %s unreachable (%s: %s); breakers are per process until it answers "
                "(calls are not affected; this warning is shown once per outage)",
                self.describe, type(error).__name__, redact_text(str(error)),
            )  # fmt: skip


def fleet_key(litellm_model: str, endpoint: str | None) -> str:
    """The name of a model's breaker in Redis: what is called (the litellm model string and endpoint).

    Not the policy's name for it: a policy that points a name at a new endpoint gets a fresh
    fleet breaker, and two applications' ``big`` share one only if they call the same thing.
    Bounded in size (a readable prefix and a digest), whatever the caller passes as a model.
    """
    digest = hashlib.sha256(f"{litellm_model}\n{endpoint or ''}".encode("utf-8", "surrogatepass")).hexdigest()
    readable = re.sub(r"[^A-Za-z0-9._/@-]", "_", litellm_model[:48])
    return f"{readable}#{digest[:16]}"


def _cluster_enabled(client: Any) -> bool:
    try:
        info = client.info("cluster")
    except Exception as e:
        if not _is_response_error(e):  # INFO refused (an ACL): assume a standalone server
            raise
        return False
    return bool(isinstance(info, dict) and int(info.get("cluster_enabled", 0) or 0))


def _is_response_error(error: BaseException) -> bool:
    """A command Redis refused (not a connection problem)."""
    return any(c.__name__ == "ResponseError" for c in type(error).__mro__)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


_INSTANCES: weakref.WeakSet[SharedBreakerState] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for state in list(_INSTANCES):
        if not state._closed:
            state._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _flush_at_exit() -> None:
    # Short-lived processes (jobs, serverless, workers recycled after N requests) must not take the
    # failures they counted with them: the sync threads flush their queues, within EXIT_FLUSH_S in all.
    deadline = time.monotonic() + EXIT_FLUSH_S
    for state in list(_INSTANCES):
        if not state._closed and state._thread is not None and state._thread.is_alive():
            state.close(timeout=max(0.0, deadline - time.monotonic()))


atexit.register(_flush_at_exit)

# Query arguments of a Redis URL that carry no secret (every other value is masked in logs).
_PLAIN_QUERY_ARGS = frozenset(
    {
        "db", "socket_timeout", "socket_connect_timeout", "socket_keepalive", "retry_on_timeout",
        "max_connections", "health_check_interval", "ssl_cert_reqs", "ssl_check_hostname", "protocol",
        "client_name", "timeout", "decode_responses", "encoding",
    }
)  # fmt: skip


def redacted_url(url: str) -> str:
    """The URL without any credential (password or username in it, query values that may be secrets), for logs.

    Never raises: a URL that cannot be parsed is shown as its scheme only.
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        if parts.port is not None:
            host = f"{host}:{parts.port}"
        if parts.password is not None:
            userinfo = f"{parts.username}:***@" if parts.username else ":***@"
        elif parts.username is not None:
            userinfo = "***@"  # a lone user part may be a password (redis://secret@host)
        else:
            userinfo = ""
        query = "&".join(
            f"{name}={value if name in _PLAIN_QUERY_ARGS else '***'}"
            for name, value in parse_qsl(parts.query, keep_blank_values=True)
        )
        return urlunsplit((parts.scheme, userinfo + host, parts.path, query, ""))
    except ValueError:
        scheme = url.split("://", 1)[0] if "://" in url else ""
        return f"{scheme[:16]}://<unparsable URL>" if scheme.isalnum() else "<unparsable URL>"


def redact_text(text: str) -> str:
    """``text`` (an error message) with anything that looks like a Redis URL's credentials masked."""
    text = re.sub(r"(\w+://)[^@/\s]*@", r"\1***@", text)
    return re.sub(r"((?:pass|password|username|user|token|secret)\w*=)[^&\s]+", r"\1***", text, flags=re.I)


def check_redis_url(url: str) -> str | None:
    """Why ``url`` is not a Redis URL redis-py can use (``None``: it is). No I/O; never raises."""
    try:
        import redis
    except ImportError:
        redis = None  # type: ignore[assignment]
    try:
        if redis is None:
            parts = urlsplit(url)
            if parts.scheme not in ("redis", "rediss", "unix"):
                return "the scheme must be redis://, rediss:// or unix://"
            _ = parts.port
            return None
        client = redis.Redis.from_url(url)
        client.connection_pool.make_connection()  # builds the connection object (checks its arguments)
    except Exception as e:  # ValueError, TypeError (an unknown query argument), ...
        return redact_text(str(e)) or type(e).__name__
    return None


CONNECT_TIMEOUT_S = 0.5
READ_TIMEOUT_S = 0.5


def from_url(
    url: str, namespace: str, *, failure_window_s: float = 60.0, sync_interval_s: float = 0.5, start: bool = True
) -> SharedBreakerState | None:
    """A shared state on the Redis at ``url``, or ``None`` (with one warning) when redis-py is missing
    or ``url`` is not a Redis URL it can use: a Redis that cannot be had is never a reason for a call to fail."""
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
    problem = check_redis_url(url)
    if problem is not None:
        log.warning("state.url %s is not a usable Redis URL (%s); breakers are per process", redacted_url(url), problem)
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
