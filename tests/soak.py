"""Soak: many calls with mixed faults from threads and tasks; memory flat, breakers consistent, no leaks.

Run with ``make soak`` (``SOAK_CALLS=100000`` by default; ``make soak SOAK_CALLS=10000`` for a
shorter run). Not part of ``make test``. The fake providers run in their own processes. 32 threads
(sync) and 500 asyncio tasks in one event loop take the calls from one shared budget, so both kinds
run until the end; a fifth of the calls are streams. A chaos thread switches the primary's
behaviour every 200 ms between healthy and one of the provider faults of the fault suite (errors,
resets, silence, slowness, cut and stalled streams, malformed bodies), so its breaker opens, probes
and closes again many times. Exits non-zero when a check fails.

Checks:

* every call ends with an answer, ``AllAttemptsFailed`` or ``StreamInterrupted`` (anything else
  is a bug), within its deadline plus a bound;
* the layer never refuses work it could do: a stretch of 15 s with nothing answered (two of the three
  providers are always healthy) in which most failed calls sent no request at all is a failure (a
  livelock of the breaker gates; found and fixed, see README "Suspect gating"). A stretch in which every
  request was sent and none made its deadline is the client overloaded, printed but not failed;
* breakers are consistent: every model's transitions chain (each starts where the previous
  ended), its final state is the last transition's, and no probe slot is still held;
* nothing leaks: stream helper threads back to zero, threads and file descriptors back near
  their start; memory flat: RSS may grow while caches and pools fill in the first half, but over the
  second half it grows by at most ``RSS_SECOND_HALF_MB``. RSS at start, along the way and at the end
  is printed, with the kinds of live objects whose number grew most over the second half (a census
  of the garbage collector's objects: a leak of ours shows there as a growing type, at no cost to
  the run). ``SOAK_TRACEMALLOC=1`` also compares Python allocations at half-way and at the end and
  prints the lines that grew most (slower: use it to find a leak, not to measure throughput).
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import multiprocessing
import os
import random
import sys
import threading
import time
import tracemalloc
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from multiprocessing.connection import Connection
from typing import Any

import llm_resilience
from llm_resilience import AllAttemptsFailed, Policy, Resilience, StreamInterrupted
from llm_resilience.testing import Behavior, FakeProvider

# The shape: 32 threads and 500 tasks. SOAK_THREADS / SOAK_TASKS change it (0 threads: async
# calls only), e.g. to look at one kind's memory on its own.
THREADS = int(os.environ.get("SOAK_THREADS", "32"))
TASKS = int(os.environ.get("SOAK_TASKS", "500"))
TIMEOUT_S = 1.0
DEADLINE_S = 3.0
# 532 concurrent callers saturate a 2-core machine: the event loop and the GIL are late to wake a
# call at its deadline, so overruns are reported; only one far beyond (a hang) fails the soak. "Far
# beyond" is measured against queueing, for each kind of caller on its own: N closed-loop callers
# that finish R calls/s take N / R seconds per call on average (Little's law, exact for callers that
# always have one call in flight). The 500 tasks share one event loop, which gets a small share of
# the GIL beside 32 busy threads (each of its socket events waits for the GIL behind them): their
# mean is several times the threads'. A hang is a call longer than the deadline + 15 s + 4 x its
# kind's mean.
HANG_S = DEADLINE_S + 15.0
# Over the second half of the run, when caches (credentials, routes, breakers) and pools are full,
# RSS must stay flat. glibc keeps freed arenas, so "flat" allows some noise, not growth per call.
RSS_SECOND_HALF_MB = 24.0
TRACEMALLOC = os.environ.get("SOAK_TRACEMALLOC", "") not in ("", "0")
MESSAGES = [{"role": "user", "content": "soak"}]

FAULTS: list[Behavior] = [
    Behavior.ok("healthy"),
    Behavior.ok("healthy"),
    Behavior.error(500),
    Behavior.error(503),
    Behavior.error(429, retry_after_s=1),
    Behavior(body="reset"),
    Behavior(body="hang"),
    Behavior.slow(1.5),
    Behavior(body="malformed"),
    Behavior(content="cut stream", chunks=4, inter_chunk_s=0.01, cut_after_chunks=2),
    Behavior(content="stalled stream", chunks=3, inter_chunk_s=1.0),
    Behavior(no_done=True),
]


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def census() -> Counter[str]:
    """Live objects the garbage collector tracks, by type (containers: a leaked call leaves some)."""
    gc.collect()
    return Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.get_objects())


def litellm_logging_backlog() -> int:
    """Logging coroutines litellm has queued and not run yet (its LoggingWorker, one per event loop).

    Read for the report only. Async calls queue their logging there; while the loop is saturated the
    worker falls behind (thousands of entries were seen when async calls succeed on a starved loop),
    and the queue (up to ``LOGGING_WORKER_MAX_QUEUE_SIZE``, 50,000) holds each entry's state: memory
    that grows with the backlog, not a leak of ours.
    """
    try:
        from litellm.litellm_core_utils.logging_worker import GLOBAL_LOGGING_WORKER

        queue = GLOBAL_LOGGING_WORKER._queue
        return queue.qsize() if queue is not None else 0
    except (ImportError, AttributeError):
        return -1


def stream_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "llm-resilience-stream")


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.outcomes: Counter[str] = Counter()
        self.late: list[tuple[str, float]] = []  # (kind, seconds) of calls over the deadline + 1 s
        self.unexpected: list[str] = []
        self.done = 0
        # What the attempts of failed calls were (model:outcome/reason, ...): the whole run, and the last 500.
        self.failed: Counter[str] = Counter()
        self.recent_failed: deque[str] = deque(maxlen=500)
        self.untried = 0  # failed calls that sent no request at all (every model skipped)
        self.by_side: Counter[str] = Counter()  # calls finished by the threads (sync) and the tasks (async)
        self.answered_by_side: Counter[str] = Counter()
        # (end time, side, skipped a model because its half-open probe was in flight) per call: is there a
        # stretch where the threads, which could judge a probe at once, all skip a model whose probe starved
        # tasks hold?
        self.probe_skips: list[tuple[float, str, bool]] = []

    def add(
        self,
        outcome: str,
        elapsed: float,
        error: BaseException | None = None,
        side: str = "sync",
        attempts: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        skipped = any(a["reason"] == "probe_in_flight" for a in attempts) or (
            isinstance(error, AllAttemptsFailed) and any(a.reason == "probe_in_flight" for a in error.attempts)
        )
        with self.lock:
            self.probe_skips.append((time.monotonic(), side, skipped))
            self.outcomes[outcome] += 1
            self.done += 1
            self.by_side[side] += 1
            if outcome == "answered":
                self.answered_by_side[side] += 1
            if elapsed > DEADLINE_S + 1.0:
                self.late.append((side, elapsed))
            if outcome == "unexpected" and error is not None and len(self.unexpected) < 20:
                self.unexpected.append(f"{type(error).__name__}: {str(error)[:200]}")
            if isinstance(error, AllAttemptsFailed):
                if all(a.outcome == "skipped" for a in error.attempts):
                    self.untried += 1
                signature = ", ".join(f"{a.model}:{a.outcome}/{a.reason}" for a in error.attempts) or "no attempt"
                self.failed[signature] += 1
                self.recent_failed.append(signature)


def classify(error: BaseException | None) -> str:
    if error is None:
        return "answered"
    if isinstance(error, AllAttemptsFailed):
        return "AllAttemptsFailed"
    if isinstance(error, StreamInterrupted):
        return "StreamInterrupted"
    return "unexpected"


def sync_call(engine: Resilience, stream: bool, tally: Tally) -> None:
    started = time.monotonic()
    error: BaseException | None = None
    summary: Mapping[str, Any] = {}
    try:
        if stream:
            with engine.completion("chat", MESSAGES, stream=True) as s:
                for _ in s:
                    pass
            summary = s.llm_resilience
        else:
            summary = engine.completion("chat", MESSAGES)._hidden_params["llm_resilience"]
    except Exception as e:
        error = e
    outcome = classify(error)
    tally.add(outcome, time.monotonic() - started, error, "sync", summary.get("attempts", ()))


async def async_call(engine: Resilience, stream: bool, tally: Tally) -> None:
    started = time.monotonic()
    error: BaseException | None = None
    summary: Mapping[str, Any] = {}
    try:
        if stream:
            s = await engine.acompletion("chat", MESSAGES, stream=True)
            async with s:
                async for _ in s:
                    pass
            summary = s.llm_resilience
        else:
            summary = (await engine.acompletion("chat", MESSAGES))._hidden_params["llm_resilience"]
    except Exception as e:
        error = e
    outcome = classify(error)
    tally.add(outcome, time.monotonic() - started, error, "async", summary.get("attempts", ()))


def all_skipping_stretch(calls: Sequence[tuple[float, str, bool]], side: str, min_calls: int = 5) -> float:
    """The longest time over which every call of ``side`` (at least ``min_calls`` in a row) skipped a
    model because its probe was in flight."""
    longest, run_start, run_calls = 0.0, 0.0, 0
    for at, call_side, skipped in calls:
        if call_side != side:
            continue
        if not skipped:
            run_calls = 0
            continue
        if run_calls == 0:
            run_start = at
        run_calls += 1
        if run_calls >= min_calls:
            longest = max(longest, at - run_start)
    return longest


class CallBudget:
    """The run's calls, taken one at a time by threads and tasks alike.

    One shared budget keeps the mix of sync and async calls the same until the end. With a fixed half
    each, the faster side (the threads: 2-4 x the tasks on a busy machine) finished early and the last stretch ran
    async calls alone: a different workload whose memory showed up as "growth" late in the run.
    """

    def __init__(self, calls: int) -> None:
        self._left = calls
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self._left <= 0:
                return False
            self._left -= 1
            return True


def run_threads(engine: Resilience, budget: CallBudget, tally: Tally) -> None:
    def worker(seed: int) -> None:
        rng = random.Random(seed)
        while budget.take():
            sync_call(engine, rng.random() < 0.2, tally)

    threads = [threading.Thread(target=worker, args=(i,), name=f"soak-{i}") for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


async def run_tasks(engine: Resilience, budget: CallBudget, tally: Tally) -> None:
    async def worker(seed: int) -> None:
        rng = random.Random(seed)
        while budget.take():
            await async_call(engine, rng.random() < 0.2, tally)

    await asyncio.gather(*(worker(1000 + i) for i in range(TASKS)))


def _serve(conn: Connection) -> None:
    """A child process: one FakeProvider whose behaviour the parent sets over ``conn``."""
    provider = FakeProvider().start()
    conn.send(provider.base_url)
    while (message := conn.recv()) is not None:
        if message == "idle":
            conn.send(provider.wait_idle(5.0))
        else:
            provider.set(message)
    provider.stop()


class ProviderProcess:
    """A FakeProvider in its own process (spawned), scripted from this one.

    In the soak's own process, 500 connections' server threads would compete with the 532 callers
    for the GIL and its request log would grow with every call: the soak would measure the fake
    provider, not the library (the standard for load tests: providers in their own processes).
    """

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child,), name="soak-provider", daemon=True)
        self._process.start()
        self._lock = threading.Lock()
        self.base_url: str = self._conn.recv()

    def set(self, behavior: Behavior) -> None:
        with self._lock:
            self._conn.send(behavior)

    def wait_idle(self, timeout: float = 5.0) -> bool:
        with self._lock:
            self._conn.send("idle")
            return bool(self._conn.recv()) if self._conn.poll(timeout + 5.0) else False

    def stop(self) -> None:
        with self._lock:
            self._conn.send(None)
        self._process.join(5.0)
        if self._process.is_alive():
            self._process.kill()


def chaos(provider: ProviderProcess, stop: threading.Event) -> None:
    rng = random.Random(7)
    while not stop.wait(0.2):
        provider.set(rng.choice(FAULTS))
    provider.set(Behavior.ok("healthy"))


def main() -> int:
    calls = int(os.environ.get("SOAK_CALLS", "100000"))
    providers = {name: ProviderProcess() for name in ("big", "small", "tiny")}
    policy = Policy.from_dict(
        {
            "models": {
                name: {"litellm_params": {"model": f"openai/{name}", "api_base": p.base_url, "api_key": "sk-soak"}}
                for name, p in providers.items()
            },
            "routes": {"chat": {"chain": ["big", "small", "tiny"]}},
            "prompt_classes": {
                "default": {
                    "timeout_s": TIMEOUT_S,
                    "deadline_s": DEADLINE_S,
                    "first_token_timeout_s": TIMEOUT_S,
                    "idle_timeout_s": 0.5,
                }
            },
            "breakers": {"default": {"fail_max": 5, "reset_timeout_s": 0.5}},
        }
    )
    transitions: dict[str, list[tuple[str, str]]] = {}
    transitions_lock = threading.Lock()

    opened_by: dict[str, Counter[str]] = {}  # model -> what opened it (cause: last failure kind)

    def on_transition(model: str, old: str, new: str, info: Any) -> None:
        with transitions_lock:
            transitions.setdefault(model, []).append((old, new))
            if new == "open":
                why = f"{getattr(info, 'cause', '?')}: {getattr(info, 'last_failure', '?')}"
                opened_by.setdefault(model, Counter())[why] += 1

    engine = Resilience(policy)
    engine.breakers.listeners.append(on_transition)
    # Warm up (litellm's lazy imports, connection pools), then measure from here.
    for _ in range(20):
        sync_call(engine, False, Tally())
        sync_call(engine, True, Tally())
    asyncio.run(async_call(engine, True, Tally()))
    gc.collect()
    start = {"rss_mb": rss_mb(), "threads": threading.active_count(), "fds": fds()}
    print(f"soak: {calls} calls, {THREADS} threads + {TASKS} tasks; start {start}", flush=True)

    stop = threading.Event()
    chaos_thread = threading.Thread(target=chaos, args=(providers["big"], stop), name="chaos")
    chaos_thread.start()
    tally = Tally()
    samples: list[tuple[int, float]] = []
    sampling = threading.Event()

    halfway: dict[str, Any] = {}
    answered: list[tuple[int, int, int]] = []
    stuck: list[str] = []
    overloaded: list[str] = []

    def sample() -> None:
        while not sampling.wait(5.0):
            samples.append((tally.done, rss_mb()))
            if not halfway and tally.done >= calls // 2:
                gc.collect()
                halfway["rss_mb"] = rss_mb()
                halfway["calls"] = tally.done
                halfway["threads"] = threading.active_count()
                halfway["fds"] = fds()
                halfway["census"] = census()
                if TRACEMALLOC:
                    halfway["snapshot"] = tracemalloc.take_snapshot()
            sides = f"sync {tally.by_side['sync']} async {tally.by_side['async']}"
            backlog = litellm_logging_backlog()
            print(
                f"  {tally.done:>7} calls ({sides})  rss {samples[-1][1]:.0f} MB  litellm log backlog {backlog}"
                f"  {dict(tally.outcomes)}",
                flush=True,
            )
            answered.append((tally.outcomes["answered"], tally.done, tally.untried))
            if len(answered) >= 4 and answered[-1][0] == answered[-4][0] and tally.done < calls:
                # Nothing answered for 15 s although two providers are healthy. If most calls of the
                # window failed without sending anything, the layer refuses work it could do: stuck.
                # Otherwise every request was sent and none made its deadline: the client is
                # overloaded (532 callers on 2 shared cores), which is reported, not failed.
                failed = answered[-1][1] - answered[-4][1]
                untried = answered[-1][2] - answered[-4][2]
                where = f"after {tally.done} calls ({untried}/{failed} untried): {breaker_internals(engine, providers)}"
                (stuck if untried * 2 >= failed else overloaded).append(where)
                label = "STUCK" if untried * 2 >= failed else "OVERLOADED"
                print(f"  {label}: nothing answered for 15 s {where}", flush=True)

    if TRACEMALLOC:
        tracemalloc.start(8)
    sampler = threading.Thread(target=sample, name="sampler", daemon=True)
    sampler.start()
    started = time.monotonic()
    budget = CallBudget(calls)
    task_runner = threading.Thread(target=lambda: asyncio.run(run_tasks(engine, budget, tally)))
    task_runner.start()
    run_threads(engine, budget, tally)
    task_runner.join()
    elapsed = time.monotonic() - started
    stop.set()
    chaos_thread.join()
    sampling.set()

    for p in providers.values():
        p.wait_idle(5.0)
    wait_for(lambda: stream_threads() == 0)
    gc.collect()
    end = {"rss_mb": rss_mb(), "threads": threading.active_count(), "fds": fds()}

    problems: list[str] = []
    if tally.outcomes["unexpected"]:
        problems.append(f"{tally.outcomes['unexpected']} calls raised something else: {tally.unexpected[:5]}")
    callers = {"sync": THREADS, "async": TASKS}
    mean_s = {side: n / max(tally.by_side[side] / elapsed, 1e-9) for side, n in callers.items() if n}
    hang_s = {side: HANG_S + 4 * mean for side, mean in mean_s.items()}
    for side, bound in hang_s.items():
        hung = [t for kind, t in tally.late if kind == side and t > bound]
        if hung:
            problems.append(f"{len(hung)} {side} calls took longer than {bound:.0f} s (max {max(hung):.2f} s)")
    if tally.done != calls:
        problems.append(f"{tally.done} calls finished out of {calls}")
    for name in providers:
        b = engine.breakers.get(name)
        chain = transitions.get(name, [])
        for (_, new), (old, _) in itertools.pairwise(chain):
            if new != old:
                problems.append(f"breaker {name}: transition from {old} after one to {new}")
                break
        if chain and chain[-1][1] != b.state:
            problems.append(f"breaker {name}: state {b.state} but last transition to {chain[-1][1]}")
        if b._probe is not None:
            problems.append(f"breaker {name}: a probe slot is still held after every call ended")
        if b._suspect_slots:
            problems.append(f"breaker {name}: {b._suspect_slots} suspect slots still held after every call ended")
    if stuck:
        problems.append(f"nothing answered for 15 s or more, {len(stuck)} times; first {stuck[0]}")
    if stream_threads():
        problems.append(f"{stream_threads()} stream helper threads left")
    # Pools fill once in the first half (the attempt pool's 64 threads, litellm's logging threads,
    # kept-alive connections: up to 100 per host in litellm's aiohttp pool, 16 idle leases per
    # host); a leak keeps growing, so the second half is what is checked.
    if halfway and end["threads"] > halfway["threads"] + 16:
        problems.append(f"threads {halfway['threads']} at half-way -> {end['threads']}: {thread_census()}")
    if halfway and end["fds"] > halfway["fds"] + 32:
        problems.append(f"file descriptors {halfway['fds']} at half-way -> {end['fds']}")
    if halfway and end["rss_mb"] - halfway["rss_mb"] > RSS_SECOND_HALF_MB:
        problems.append(
            f"memory not flat: RSS {halfway['rss_mb']:.0f} MB after {halfway['calls']} calls, {end['rss_mb']:.0f} MB"
            f" at the end (more than {RSS_SECOND_HALF_MB:g} MB over the second half)"
        )

    counts = {name: Counter(f"{o}->{n}" for o, n in transitions.get(name, [])) for name in providers}
    print(f"soak: {tally.done} calls in {elapsed:.0f} s ({tally.done / elapsed:.0f}/s)")
    print(f"  outcomes: {dict(tally.outcomes)}")
    print(
        "  answered by kind: "
        + ", ".join(f"{side} {tally.answered_by_side[side]}/{tally.by_side[side]}" for side in ("sync", "async"))
    )
    for side in mean_s:
        late = [t for kind, t in tally.late if kind == side]
        worst = f"max {max(late):.2f} s" if late else "none"
        print(
            f"  {side} calls: {tally.by_side[side] / elapsed:.0f}/s, {mean_s[side]:.1f} s each on average (Little's"
            f" law); over deadline + 1 s: {len(late)} ({worst}); hang bound {hang_s[side]:.0f} s"
        )
    for side in ("sync", "async"):
        skips = sum(1 for _at, call_side, skipped in tally.probe_skips if call_side == side and skipped)
        print(
            f"  {side} calls that skipped a model because its probe was in flight: {skips}/{tally.by_side[side]};"
            f" longest stretch where every {side} call did: {all_skipping_stretch(tally.probe_skips, side):.1f} s"
        )
    print(f"  breaker transitions: {counts}")
    print(f"  what opened them: { {model: dict(why) for model, why in opened_by.items()} }")
    print(f"  breaker states at end: {engine.breaker_states()}")
    print(f"  breakers inside at end: {breaker_internals(engine, providers)}")
    print(f"  failed without sending a request: {tally.untried}")
    if overloaded:
        print(f"  client overloaded (nothing answered for 15 s, every request sent): {len(overloaded)} times")
    print("  failed calls' attempts, whole run (top 6):")
    for signature, n in tally.failed.most_common(6):
        print(f"    {n:>6}  {signature[:300]}")
    print("  failed calls' attempts, last 500 (top 4):")
    for signature, n in Counter(tally.recent_failed).most_common(4):
        print(f"    {n:>6}  {signature[:300]}")
    print(f"  start {start}")
    if halfway:
        half = {
            k: round(v, 1) if isinstance(v, float) else v for k, v in halfway.items() if k not in ("snapshot", "census")
        }
        print(f"  half  {half}")
    print(f"  end   {end}")
    if "census" in halfway:
        grew = census()
        grew.subtract(halfway["census"])
        top = [(kind, n) for kind, n in grew.most_common(6) if n > 0]
        print(
            "  live objects that grew most over the second half: "
            + (", ".join(f"{k} {n:+d}" for k, n in top) or "none")
        )
    if TRACEMALLOC and "snapshot" in halfway:
        grown = tracemalloc.take_snapshot().compare_to(halfway["snapshot"], "traceback")
        print("  python allocations that grew most over the second half:")
        for stat in grown[:8]:
            frames = list(stat.traceback)  # oldest first: the allocation, and our own frame above it
            ours = [f for f in frames if "llm_resilience" in f.filename]
            where = " <- ".join(f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno}" for f in [frames[-1], *ours[-1:]])
            print(f"    {stat.size_diff / 1024:+.0f} KiB in {stat.count_diff:+d} blocks  {where}")
    if samples:
        print(
            "  rss along the way (calls, MB): "
            + ", ".join(f"({n}, {m:.0f})" for n, m in samples[:: max(1, len(samples) // 10)])
        )
    for p in providers.values():
        p.stop()
    if problems:
        print("soak: FAILED\n  " + "\n  ".join(problems))
        return 1
    print("soak: OK")
    return 0


def breaker_internals(engine: Resilience, names: Any) -> dict[str, str]:
    """Each breaker's state with its gates: probe in flight, suspect flag and suspect slots held."""
    out = {}
    for name in names:
        b = engine.breakers.get(name)
        out[name] = f"{b.state} probe={b._probe is not None} suspect={b.suspect} slots={b._suspect_slots}"
    return out


def thread_census() -> str:
    """Live threads by name, each with where one of them is blocked (what a leak is waiting on)."""
    frames = sys._current_frames()
    by_name: dict[str, list[threading.Thread]] = {}
    for t in threading.enumerate():
        by_name.setdefault(t.name.split(" ")[0].rstrip("_0123456789-"), []).append(t)
    parts = []
    for name, threads in sorted(by_name.items(), key=lambda kv: -len(kv[1])):
        frame = frames.get(threads[0].ident or -1)
        where: list[str] = []
        while frame is not None and len(where) < 4:
            where.append(f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno} {frame.f_code.co_name}")
            frame = frame.f_back
        parts.append(f"{len(threads)} x {name} [{' <- '.join(where)}]")
    return "; ".join(parts)


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


if __name__ == "__main__":
    llm_resilience.set_default_engine(None)
    sys.exit(main())
