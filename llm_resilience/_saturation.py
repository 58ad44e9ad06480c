"""Is the client itself the bottleneck? Measured, so that a provider is blamed only for its own time.

Under a burst, the wall-clock time of an attempt is mostly the client's: litellm spends a few
ms of CPU per call, an event loop with 200 calls queues them, threads queue on the GIL, other
processes take the cores. A timeout measured around the whole call then blames a healthy
provider. What this module measures is *scheduling lag*: how late the process runs work it
scheduled for a given time.

* **Event loops**: while attempts are in flight on a loop, a probe callback runs every
  ``PROBE_INTERVAL_S``; how late it runs (``loop.time()`` minus its due time) is the time any
  ready callback of that loop waits, e.g. the one that would read the provider's answer.
* **Threads**: the process-wide :class:`Watchdog` thread (which also enforces the whole-attempt
  bound of sync calls) ticks at the same interval while sync attempts are in flight; how late
  it wakes is what a thread waiting for the GIL or a core waits.

The planner asks :meth:`SaturationMonitor.lag_s` for the worst lag seen during an attempt, and
:meth:`SaturationMonitor.cold` whether an attempt has ended in this process yet (litellm's first
call imports modules lazily for up to a second; a provider that never answers still ends the
first attempt at the deadline, so a process cannot stay cold). What follows from the numbers (excuse,
extend, blame) is decided in ``_planner.py``; this module only measures. Tests and the
simulator pass their own signal (any object with the :class:`SaturationSignal` methods).

Everything here is per process: :func:`os.register_at_fork` gives a forked child fresh locks,
a fresh (not yet started) watchdog and empty measurements.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import heapq
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from ._outcomes import CLIENT_OVERLOAD

PROBE_INTERVAL_S = 0.010
"""How often lag is sampled while attempts are in flight (never when the process is idle)."""
_HISTORY = 1024  # samples kept per source: ~10 s at the probe interval, more when idle
LAG_FLOOR_S = 0.010
"""Lateness below this is the ordinary jitter of a healthy process: never counted as delay."""
CLIENT_HOPS = 16
"""Scheduler round trips an answer needs in the client (litellm's async path: dozens of awaits)."""
BUSY_SHARE = 0.25
"""A process that used less CPU than this share of one core over the window was not saturated,
whatever its probes say: on an idle VM a sleeping thread is woken 50-400 ms late (measured on the
2-core CI VM), and that is not a delay the client's own work caused."""
QUEUED_SHARE = 0.5
"""A process that did little work is still saturated when its probes were late because they
waited for a core other processes held (noisy neighbours): at least this share of their lateness
was spent runnable, on the OS's run queue (Linux ``schedstat``). An idle VM's late wake-ups are
not run-queue waits: the thread runs as soon as the timer finally fires."""
IDLE_WINDOW_S = 0.05
"""Windows shorter than this are too short to judge the CPU share (the probes alone decide)."""


class SaturationSignal(Protocol):
    """What the planner needs to know about the client (``monotonic`` seconds)."""

    def delay_s(self, since: float, now: float) -> float:
        """How long the client itself held up work between ``since`` and ``now`` (0: not noticeably)."""
        ...

    def cold(self) -> bool:
        """No attempt has ended in this process yet (its first call pays litellm's lazy imports)."""
        ...

    def ended(self) -> None:
        """An attempt ended (whatever its outcome): the process is warm from now on."""
        ...


class NotSaturated:
    """The client is never the bottleneck (planner default; the simulator and planner tests)."""

    def delay_s(self, since: float, now: float) -> float:
        return 0.0

    def cold(self) -> bool:
        return False

    def ended(self) -> None:
        return None


class _Samples:
    """(due, ran, cpu, queued, late_sum) samples of one probe: it was due at ``due`` and ran at ``ran``,
    when the process had used ``cpu`` seconds of CPU (``time.process_time``) and the probing thread had
    waited ``queued`` seconds in all on the OS's run queue (0.0 where the OS does not say).
    ``late_sum`` is the running total of the lateness (``ran - due``) of every sample so far that was
    at least ``LAG_FLOOR_S`` late: an attempt's window is then read in O(log n) (two bisections and a
    difference), not by walking it. Under 2,000 concurrent calls each attempt lasts seconds, its window
    holds up to the whole ring, and each of its ~4 checks walked it (~220 us for a 5 s window).

    One thread adds the samples of one probe (the watchdog's, or a loop's), so the run-queue
    counter read at each sample is that thread's.
    """

    def __init__(self) -> None:
        self.ring: deque[tuple[float, float, float, float, float]] = deque(maxlen=_HISTORY)
        self.added = 0  # samples appended so far: a reader that saw it change re-reads (indices moved)
        self.pending_due: float | None = None  # the next probe's due time, while one is scheduled
        self._late_sum = 0.0
        self._schedstat: int | None = None  # fd of the probing thread's /proc/thread-self/schedstat
        self._schedstat_missing = not os.path.exists("/proc/thread-self/schedstat")

    def add(self, due: float, ran: float) -> None:
        self.append(due, ran, time.process_time(), self._queued_s())

    def append(self, due: float, ran: float, cpu: float, queued: float) -> None:
        """One sample, as :meth:`add` measures it (tests pass their own readings)."""
        if ran - due >= LAG_FLOOR_S:
            self._late_sum += ran - due
        self.ring.append((due, ran, cpu, queued, self._late_sum))
        self.added += 1

    def _queued_s(self) -> float:
        # Kept open: a pread of it costs ~0.5 us where open/read/close costs ~10 us, 100 times a second.
        if self._schedstat_missing:
            return 0.0
        try:
            if self._schedstat is None:
                self._schedstat = os.open("/proc/thread-self/schedstat", os.O_RDONLY | os.O_CLOEXEC)
            return int(os.pread(self._schedstat, 64, 0).split()[1]) / 1e9
        except (OSError, ValueError, IndexError):  # no procfs, or the thread that opened it is gone
            self._schedstat_missing = True
            return 0.0

    def __del__(self) -> None:
        if self._schedstat is not None:
            with contextlib.suppress(OSError):
                os.close(self._schedstat)

    def delay(self, since: float, now: float) -> float:
        """The client's delay estimate over [since, now] (see :class:`SaturationMonitor`)."""
        for _ in range(3):
            added = self.added
            try:
                estimate = _estimate(self.ring, self.pending_due, since, now)
            except IndexError:  # the ring moved under the read: read again
                continue
            if self.added == added:  # no sample appended meanwhile: the indices read were consistent
                return estimate
        return _estimate(deque(tuple(self.ring)), self.pending_due, since, now)  # one atomic copy


def _lateness(sample: tuple[float, ...]) -> float:
    """What a sample adds to the running total: its lateness, if past the jitter floor."""
    late = sample[1] - sample[0]
    return late if late >= LAG_FLOOR_S else 0.0


def _overdue_in(sample: tuple[float, ...], since: float, now: float) -> float:
    """The part of a late sample's lateness that lies within [since, now]."""
    if sample[1] - sample[0] < LAG_FLOOR_S:
        return 0.0
    return max(0.0, min(sample[1], now) - max(sample[0], since))


def _estimate(
    ring: deque[tuple[float, float, float, float, float]], pending_due: float | None, since: float, now: float
) -> float:
    count = 0
    summed = total = 0.0
    if pending_due is not None and pending_due < now:  # overdue right now: the process is late at this very moment
        count = 1
        late = now - pending_due
        if late >= LAG_FLOOR_S:
            summed += late
            total += max(0.0, now - max(pending_due, since))
    size = len(ring)
    # Samples are appended in the order they ran; the window is those that ran since ``since``.
    start = bisect.bisect_left(ring, since, key=_ran) if size and ring[-1][1] >= since else size
    if start < size:
        first, newest = ring[start], ring[-1]
        in_window = newest[4] - first[4] + _lateness(first)  # the lateness of every late sample in it
        if now - first[1] >= IDLE_WINDOW_S:
            busy = (time.process_time() - first[2]) / (now - first[1])
            if busy < BUSY_SHARE:
                # Lateness of the samples after the first, against the run-queue wait over the same span.
                lateness = in_window - _lateness(first)
                queued = newest[3] - first[3]
                if lateness <= 0.0 or queued < QUEUED_SHARE * lateness:
                    # A mostly idle process whose probes were not waiting for a core: the OS woke it late.
                    return 0.0
                # Starved by other processes: the delay is the time spent waiting for a core, as
                # measured. Not CLIENT_HOPS x the lateness: that models an event loop busy with the
                # client's own work, and a process doing little (reading a trickling body) has few hops.
                return queued
        count += size - start
        summed += in_window
        # Overdue time within [since, now]: every late sample after the first lies within it (a probe is
        # due after the previous one ran), except those that ran after ``now`` (appended meanwhile).
        past_now = max(start + 1, bisect.bisect_right(ring, now, lo=start + 1, key=_ran))
        total += _overdue_in(first, since, now)
        if past_now > start + 1:
            total += ring[past_now - 1][4] - first[4]
        for k in range(past_now, size):
            total += _overdue_in(ring[k], since, now)
    if count == 0:
        return 0.0
    return max(total, CLIENT_HOPS * summed / count)


def _ran(sample: tuple[float, ...]) -> float:
    return sample[1]


class _LoopProbe:
    """Lag probe of one event loop; runs only while attempts are in flight on it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.active = 0
        self.samples = _Samples()
        self._handle: asyncio.TimerHandle | None = None

    def enter(self) -> None:
        self.active += 1
        if self._handle is None:
            self._schedule()

    def exit(self) -> None:
        self.active -= 1

    def _schedule(self) -> None:
        due = self.loop.time() + PROBE_INTERVAL_S
        self.samples.pending_due = due
        self._handle = self.loop.call_at(due, self._tick, due)

    def _tick(self, due: float) -> None:
        self.samples.add(due, self.loop.time())
        self.samples.pending_due = None
        self._handle = None
        if self.active > 0:
            self._schedule()


class _Deadline:
    """One entry of the watchdog's heap: ``callback(now)`` runs at ``at`` unless cancelled first.

    The callback returns a later time to be called again, or ``None``. ``lock`` is held while it
    runs, so :meth:`cancel` returning means it is not running and will not run.
    """

    __slots__ = ("at", "callback", "done", "lock")

    def __init__(self, at: float, callback: Callable[[float], float | None]) -> None:
        self.at = at
        self.callback = callback
        self.done = False
        self.lock = threading.Lock()

    def cancel(self) -> None:
        with self.lock:
            self.done = True

    def __lt__(self, other: _Deadline) -> bool:
        return self.at < other.at


class Watchdog:
    """One thread per process: runs deadline callbacks (whole-attempt bounds of sync calls) and,
    while sync attempts are in flight, samples the process's thread scheduling lag.

    Started on first use; it parks on a condition when there is nothing to do.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.samples = _Samples()
        self._heap: list[_Deadline] = []
        self._active = 0  # sync attempts in flight: the thread ticks while > 0
        self._cond = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None
        self._wake_at: float | None = None  # when the parked thread wakes by itself (None: never)

    def enter(
        self, at: float | None = None, callback: Callable[[float], float | None] | None = None
    ) -> _Deadline | None:
        """A sync attempt starts: sample thread lag while it runs, and run ``callback(now)`` at ``at``
        (monotonic; its bound) unless the returned entry's ``cancel()`` comes first. Pair with :meth:`exit`.

        One lock and at most one wake-up of the thread for both: waking it costs about a tick.

        Ticks also while the wire times the attempt, though its planner then reads no samples: the ticks
        keep an event loop's share of the GIL beside busy threads (any loop of the process, running
        our calls or not). In the 32-threads-plus-500-tasks shape (``benchmarks/mixed_callers.py``),
        with the watchdog idle for such attempts the loop's calls fell from 39 to 6-22 per second and
        the threads' rose from 53 to 67-88; a loop of bare litellm calls beside them fell from 40 to 30.
        """
        entry = _Deadline(at, callback) if at is not None and callback is not None else None
        with self._cond:
            self._active += 1
            if entry is not None:
                heap = self._heap
                if len(heap) > 256 and len(heap) > 4 * self._active + 64:
                    # Bounds that were cancelled (the usual case: the attempt answered) pile up until
                    # their time; drop them now and then rather than on every cancel.
                    heap[:] = [e for e in heap if not e.done]
                    heapq.heapify(heap)
                heapq.heappush(heap, entry)
            if self._thread is None:
                self._start_thread()
            # Woken if it would not tick soon enough, or not by the new bound.
            needed_by = self.clock() + 2 * PROBE_INTERVAL_S
            if entry is not None and entry.at < needed_by:
                needed_by = entry.at
            if self._wake_at is None or self._wake_at > needed_by:
                self._cond.notify()
        return entry

    def exit(self) -> None:
        with self._cond:
            self._active -= 1

    def _start_thread(self) -> None:
        self._thread = threading.Thread(target=self._run, name="llm-resilience-watchdog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        cond, heap = self._cond, self._heap
        while True:
            with cond:
                now = self.clock()
                while heap and heap[0].done:
                    heapq.heappop(heap)
                due: list[_Deadline] = []
                while heap and heap[0].at <= now:
                    due.append(heapq.heappop(heap))
                if not due:
                    tick = now + PROBE_INTERVAL_S if self._active > 0 else None
                    wake = heap[0].at if heap else None
                    if tick is not None and (wake is None or tick < wake):
                        wake = tick
                    self.samples.pending_due = tick
                    self._wake_at = wake
                    cond.wait(None if wake is None else max(0.0, wake - now))
                    self._wake_at = None
                    ran = self.clock()
                    if tick is not None and ran >= tick:
                        self.samples.add(tick, ran)
                    self.samples.pending_due = None
                    continue
            for entry in due:  # outside the heap lock: a callback may schedule again
                with entry.lock:
                    if entry.done:
                        continue
                    try:
                        again = entry.callback(self.clock())
                    except Exception:  # a bug in a callback must not kill every later deadline
                        again = None
                    if again is None:
                        entry.done = True
                    else:
                        entry.at = again
                if again is not None:
                    with cond:
                        heapq.heappush(heap, entry)


class SaturationMonitor:
    """The process's :class:`SaturationSignal`: event-loop probes plus the watchdog's thread lag.

    The client's delay over an attempt is the larger of two estimates from the probes that ran
    during it (lateness under ``LAG_FLOOR_S`` is jitter and counts as none): the time they spent
    overdue (a stall, or a process starved of CPU), and ``CLIENT_HOPS`` x their mean lateness (a
    busy event loop: each of the many loop iterations an answer needs waits about that long;
    litellm's async path takes dozens). Measured under a 50-call burst, the overdue time alone
    said 0.19 s where the attempt had queued for 0.55 s. A loop's attempts see the loop's probe
    and the thread probe; a thread's attempts the thread probe.
    """

    def __init__(self) -> None:
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopProbe] = weakref.WeakKeyDictionary()
        self._warm = False
        self.watchdog = Watchdog()

    def loop_probe(self) -> _LoopProbe:
        """The probe of the running loop (created on first use)."""
        loop = asyncio.get_running_loop()
        probe = self._loops.get(loop)
        if probe is None:
            probe = self._loops[loop] = _LoopProbe(loop)
        return probe

    def delay_s(self, since: float, now: float) -> float:
        delay = self.watchdog.samples.delay(since, now)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return delay
        probe = self._loops.get(loop)
        return delay if probe is None else max(delay, probe.samples.delay(since, now))

    def cold(self) -> bool:
        return not self._warm

    def ended(self) -> None:
        self._warm = True


_monitor = SaturationMonitor()
_monitor_pid = os.getpid()


def monitor() -> SaturationMonitor:
    """This process's monitor (a forked child gets a fresh one: threads do not survive fork)."""
    global _monitor, _monitor_pid
    if _monitor_pid != os.getpid():  # forked without register_at_fork having run (e.g. os.fork in C)
        _after_fork_in_child()
    return _monitor


def _after_fork_in_child() -> None:
    global _monitor, _monitor_pid
    warm = _monitor._warm  # the imports done before fork are still done
    _monitor = SaturationMonitor()
    _monitor._warm = warm
    _monitor_pid = os.getpid()


os.register_at_fork(after_in_child=_after_fork_in_child)


class ProcessSaturation:
    """The :class:`SaturationSignal` engines use: always this process's current monitor."""

    def __init__(self) -> None:
        # A warm process stays warm (a forked child inherits it): once seen, the monitor need not
        # be asked again, twice on every attempt.
        self._warm = False

    def delay_s(self, since: float, now: float) -> float:
        return monitor().delay_s(since, now)

    def cold(self) -> bool:
        if self._warm:
            return False
        cold = monitor().cold()
        self._warm = not cold
        return cold

    def ended(self) -> None:
        if not self._warm:
            monitor().ended()
            self._warm = True


# -- which callers may judge a provider ----------------------------------------------------------

STARVED_SHARE = 0.5
"""A context (one event loop, or the process's threads) whose recent attempts ended ``client_overload``
at least this often is starved: its attempts end without a verdict, so its probe would judge nothing."""
CONTEXT_OUTCOMES = 16
"""Recent attempt outcomes kept per context."""
MIN_OUTCOMES = 4
"""A context with fewer recent outcomes than this is not judged starved (too little to go on)."""
CONTEXT_RECENT_S = 10.0
"""Outcomes older than this are forgotten: a context that ended nothing since cannot judge anything now."""

THREADS = "threads"
"""The context of every caller outside an event loop: the threads share the GIL, and starve together."""


def current_context() -> object:
    """The calling context: the running event loop, else :data:`THREADS`."""
    loop = asyncio._get_running_loop()  # (None outside a loop, without raising: this runs on every attempt)
    return THREADS if loop is None else loop


class CallerContexts:
    """Which callers can judge a half-open breaker's probe: each context is judged by its own outcomes.

    A process-wide saturation signal cannot say who should probe: in the soak's shape (32 threads and
    500 tasks on one loop) it called the threads saturated too (0.5-13 s of estimated delay per second)
    while their attempts were answered in 0.4 s. What tells them apart is what their attempts ended
    with: nearly every attempt of the starved loop ended ``client_overload`` (no verdict), the threads'
    did not. So a caller whose context's recent attempts mostly ended ``client_overload`` does not
    take a probe while another context, not starved, ended an attempt recently: that one will judge
    the provider sooner. When every context is starved (or there is only one), callers probe as
    before. A hook (``attempt_ended``) feeds it; the planner asks :meth:`may_probe`.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._threads: deque[tuple[float, bool]] = deque(maxlen=CONTEXT_OUTCOMES)
        self._loops: weakref.WeakKeyDictionary[object, deque[tuple[float, bool]]] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def _ring(self, context: object, create: bool) -> deque[tuple[float, bool]] | None:
        if context is THREADS:
            return self._threads
        ring = self._loops.get(context)
        if ring is None and create:
            ring = self._loops[context] = deque(maxlen=CONTEXT_OUTCOMES)
        return ring

    def ended(self, context: object, overloaded: bool, now: float) -> None:
        """An attempt of ``context`` ended: ``overloaded`` if it ended ``client_overload`` (no verdict)."""
        with self._lock:
            ring = self._ring(context, create=True)
            assert ring is not None
            ring.append((now, overloaded))

    def starved(self, context: object, now: float) -> bool:
        """Whether most of ``context``'s recent attempts ended without a verdict for want of client time."""
        with self._lock:
            return _starved(self._ring(context, create=False), now)

    def may_probe(self, now: float, context: object | None = None) -> bool:
        """May the caller (``context``, default: the calling one) take a half-open breaker's probe?"""
        if context is None:
            context = current_context()
        with self._lock:
            if not _starved(self._ring(context, create=False), now):
                return True
            others = [ring for key, ring in self._loops.items() if key is not context]
            if context is not THREADS:
                others.append(self._threads)
            return not any(_can_judge(ring, now) for ring in others)

    def attempt_ended(self, call: object, record: Any, response: object) -> None:
        """The hook: every attempt that was sent and not cancelled is an outcome of the calling context."""
        if record.outcome in ("skipped", "cancelled"):
            return
        self.ended(current_context(), record.outcome == CLIENT_OVERLOAD, self._clock())


def _recent(ring: deque[tuple[float, bool]] | None, now: float) -> list[bool]:
    if not ring:
        return []
    since = now - CONTEXT_RECENT_S
    return [overloaded for at, overloaded in ring if at >= since]


def _starved(ring: deque[tuple[float, bool]] | None, now: float) -> bool:
    recent = _recent(ring, now)
    return len(recent) >= MIN_OUTCOMES and sum(recent) >= STARVED_SHARE * len(recent)


def _can_judge(ring: deque[tuple[float, bool]], now: float) -> bool:
    recent = _recent(ring, now)
    return bool(recent) and not _starved(ring, now)
