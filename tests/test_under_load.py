"""Real calls under adverse conditions: a body that trickles in, a forked process, a burst.

The trickle and fork cases are defects of issue 7 (each test failed before its fix): a sync attempt
was bounded only per socket read, so a provider sending a byte every 50 ms kept a call for 20 s
past its deadline; and a forked child inherited the hedging thread pool without its threads. The
burst is issue 13's: healthy providers, many concurrent calls, every call answered and no breaker
opened, because the client's own queueing is not blamed on the provider.
"""

from __future__ import annotations

import asyncio
import faulthandler
import importlib
import multiprocessing
import os
import signal
import sys
import threading
import time
import types
import uuid
from pathlib import Path
from typing import Any

import litellm
import pytest
from conftest import MESSAGES, Caller, EngineFactory, PolicyBuilder, hidden, model_entry, outcomes, wait_until

from llm_resilience import AllAttemptsFailed, AttemptRecord, Hook, Resilience
from llm_resilience._breakers import ProbeTicket
from llm_resilience.testing import Behavior, FakeProvider, provider_process

TRICKLE = Behavior(trickle_byte_s=0.05)  # headers at once, then one byte every 50 ms: ~20 s for the body
SLACK_S = 4.0  # what a loaded 2-core CI machine may add (1 s was overrun at load 6); the defect overran by ~20 s


def test_the_deadline_holds_while_the_body_trickles(
    call: Caller, make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider
) -> None:
    big.set(TRICKLE)
    engine = make_engine(policy_dict(["big"], timeout_s=1.5, deadline_s=1.5))

    started = time.monotonic()
    with pytest.raises(AllAttemptsFailed) as failed:
        call(engine, "chat", MESSAGES)

    assert time.monotonic() - started < 1.5 + SLACK_S
    assert outcomes(failed.value.attempts) == [("big", "failure", "timeout")]


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2-on"])
def test_the_attempt_timeout_holds_while_the_body_trickles_and_the_next_model_answers(
    call: Caller,
    make_engine: EngineFactory,
    policy_dict: PolicyBuilder,
    big: FakeProvider,
    small: FakeProvider,
    monkeypatch: pytest.MonkeyPatch,
    http2: bool,
) -> None:
    if http2:
        # LITELLM_HTTP2 makes litellm's (and so the leases') clients HTTP/2-capable: the driver cannot time
        # those requests on the wire, but it must still cut the attempt off (it went on for ~20 s before).
        monkeypatch.setenv("LITELLM_HTTP2", "true")
    big.set(TRICKLE)
    engine = make_engine(policy_dict(["big", "small"], timeout_s=0.5, deadline_s=5.0))

    started = time.monotonic()
    response = call(engine, "chat", MESSAGES)

    assert time.monotonic() - started < 0.5 + SLACK_S
    assert outcomes(response) == [("big", "failure", "timeout"), ("small", "success", None)]
    assert big.wait_idle(2.0) and big.disconnects == 1  # the trickling connection was closed, not left running
    big.set(Behavior())  # recovered: answered on the same clients
    assert outcomes(call(engine, "chat", MESSAGES)) == [("big", "success", None)]


def test_the_callers_timeout_holds_while_the_body_trickles(
    call: Caller, make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider
) -> None:
    big.set(TRICKLE)
    engine = make_engine(policy_dict(["big"], timeout_s=5.0, deadline_s=5.0))

    started = time.monotonic()
    with pytest.raises(AllAttemptsFailed):
        call(engine, "chat", MESSAGES, timeout=1.0)

    assert time.monotonic() - started < 1.0 + SLACK_S


def test_a_hedged_sync_call_where_every_model_trickles_ends_at_the_deadline(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider, small: FakeProvider
) -> None:
    big.set(TRICKLE)
    small.set(TRICKLE)
    policy = policy_dict(["big", "small"], timeout_s=1.5, deadline_s=1.5)
    policy["routes"]["chat"]["hedge"] = {"after": 0.1, "budget_ratio": 1.0}
    engine = make_engine(policy)

    started = time.monotonic()
    with pytest.raises(AllAttemptsFailed):
        engine.completion("chat", MESSAGES)

    assert time.monotonic() - started < 1.5 + SLACK_S


# -- fork ----------------------------------------------------------------------------------------

HEDGED_SLOW_S = 4.0
"""big's latency in the fork tests: small (hedged at 50 ms) must win even when the planner postpones the
hedge by the client's own delay on a loaded machine (a 1 s big won there now and then)."""


def _hedged_call_in_child(engine: Resilience, results: Any, stacks_path: str) -> None:
    stacks = open(stacks_path, "w")  # noqa: SIM115  # open until the child exits: SIGUSR1 writes there
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
    try:
        response = engine.completion("chat", MESSAGES)
        results.put(("answered", hidden(response)["model"]))
    except BaseException as error:  # report anything: the parent asserts on it
        results.put(("raised", repr(error)))


def _run_in_forked_child(engine: Resilience, stacks_path: Path) -> tuple[str | None, Any]:
    """(the child's thread stacks if it hung, else None; what it reported) for one hedged call in a forked child."""
    context = multiprocessing.get_context("fork")
    results = context.SimpleQueue()
    child = context.Process(target=_hedged_call_in_child, args=(engine, results, str(stacks_path)))
    child.start()
    child.join(20)  # the call takes ~50 ms; a hang is forever (the child joins its pool threads at exit)
    hung: str | None = None
    if child.is_alive():
        assert child.pid is not None
        os.kill(child.pid, signal.SIGUSR1)  # the child's threads, for the failure message
        wait_until(lambda: "Current thread" in stacks_path.read_text(), timeout=5.0)  # the main thread's is last
        hung = stacks_path.read_text()
        child.kill()
        child.join()
    return hung, None if results.empty() else results.get()


@pytest.mark.skipif(sys.platform == "win32", reason="no fork on Windows")
def test_a_hedged_sync_call_works_in_a_forked_child(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider, small: FakeProvider, tmp_path: Path
) -> None:
    policy = policy_dict(["big", "small"], timeout_s=10.0, deadline_s=10.0)
    policy["routes"]["chat"]["hedge"] = {"after": 0.05, "budget_ratio": 1.0}
    engine = make_engine(policy)
    big.set(Behavior.slow(HEDGED_SLOW_S))
    first = engine.completion("chat", MESSAGES)  # the parent's worker threads and watchdog now exist
    assert hidden(first)["model"] == "small"

    hung, reported = _run_in_forked_child(engine, tmp_path / "stacks")  # big's aborted thread may be in litellm

    assert hung is None, f"the forked child hung after reporting {reported}; its threads:\n{hung}"
    assert reported == ("answered", "small")


# The parent's fork hook of the test below; registered after llm_resilience's own (imported above), so
# it runs first: before-fork hooks run in reverse order of registration.
_released_at_fork: list[threading.Event] = []


def _release_before_fork() -> None:
    while _released_at_fork:
        _released_at_fork.pop().set()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_release_before_fork)


@pytest.mark.skipif(sys.platform == "win32", reason="no fork on Windows")
def test_a_fork_waits_for_the_aborted_losers_thread_to_leave_litellm(
    make_engine: EngineFactory,
    policy_dict: PolicyBuilder,
    big: FakeProvider,
    small: FakeProvider,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The cause of the hang above, forced: the losing hedge's thread, aborted, runs litellm's error
    path after the call has returned; litellm imports modules there (the fastapi probe of its guardrail
    check, on every error). A fork in that moment gave the child a module lock owned by a thread that
    does not exist in the child, and the child's loser blocked on it forever. Here the loser's failure
    callback imports a module whose body waits until the fork starts: the fork must wait for it."""
    module = f"fork_probe_{uuid.uuid4().hex}"
    (tmp_path / f"{module}.py").write_text(
        "import fork_probe_gate as gate\ngate.importing.set()\ngate.fork_started.wait(10)\n"
    )
    gate = types.ModuleType("fork_probe_gate")
    gate.importing, gate.fork_started = threading.Event(), threading.Event()  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fork_probe_gate", gate)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(litellm, "failure_callback", [lambda *_: importlib.import_module(module)])
    policy = policy_dict(["big", "small"], timeout_s=10.0, deadline_s=10.0)
    policy["routes"]["chat"]["hedge"] = {"after": 0.05, "budget_ratio": 1.0}
    engine = make_engine(policy)
    big.set(Behavior.slow(HEDGED_SLOW_S))

    first = engine.completion("chat", MESSAGES)
    assert hidden(first)["model"] == "small"
    assert gate.importing.wait(10)  # type: ignore[attr-defined]  # big's thread holds the module's import lock
    _released_at_fork.append(gate.fork_started)  # type: ignore[attr-defined]
    hung, reported = _run_in_forked_child(engine, tmp_path / "stacks")

    assert hung is None, f"the forked child hung after reporting {reported}; its threads:\n{hung}"
    assert reported == ("answered", "small")


# -- a burst against healthy providers, each in its own process ----------------------------------


class _CountedFailures(Hook):
    """The attempts a breaker counted as failures: (thread, model, outcome, reason, latency, extra)."""

    def __init__(self) -> None:
        self.records: list[tuple[Any, ...]] = []

    def attempt_ended(self, call: Any, record: AttemptRecord, response: Any) -> None:
        if record.outcome in ("failure", "soft_failure") or record.extra.get("slow"):
            self.records.append(
                (
                    threading.current_thread().name.split(" ")[0],  # MainThread: the async burst
                    record.model,
                    record.outcome,
                    record.reason,
                    round(record.latency_s or 0, 3),
                    dict(record.extra),
                )
            )


def test_a_burst_against_healthy_providers_is_answered_and_opens_no_breaker(make_engine: EngineFactory) -> None:
    with provider_process(0.06) as big_url, provider_process(0.04) as small_url:
        policy: dict[str, Any] = {
            "models": {"big": model_entry("big", big_url), "small": model_entry("small", small_url)},
            "routes": {"chat": {"chain": ["big", "small"]}},
            # The floor: 16 threads on 2 shared cores wait 40-100 ms for the GIL *after* the answer has
            # arrived, which no wire timing can tell from the provider's time (measured on the 2-core VM:
            # with p95 alone, 70 ms, big was "slow" in 2-4 runs of 6). The async burst still needs the
            # saturation excuse: its calls take 200-600 ms of wall time against the 0.2 s floor.
            # deadline_s: 10 s, not 2: on a machine loaded by other processes (load 8-12 on 2 cores) the
            # 50 async calls queue for the CPU for seconds; whether each is answered is the question
            # here, not how fast, and the saturation excuse extends a bound at most to the deadline.
            "prompt_classes": {
                "default": {"timeout_s": 0.3, "deadline_s": 10.0, "soft_timeout": {"percentile": 95, "floor_s": 0.2}}
            },
            "breakers": {"default": {"fail_max": 3, "reset_timeout_s": 30}},
        }
        counted = _CountedFailures()
        engine = make_engine(policy, hooks=[counted])
        for _ in range(25):  # enough samples for the soft timeout to be learned (p95 of ~60 ms)
            engine.completion("chat", MESSAGES)

        async def burst() -> list[Any]:
            calls = [engine.acompletion("chat", MESSAGES) for _ in range(50)]
            return await asyncio.gather(*calls, return_exceptions=True)

        answered = asyncio.run(burst())
        threaded: list[Any] = []

        def worker() -> None:
            try:
                threaded.append(engine.completion("chat", MESSAGES))
            except Exception as error:  # collected: the assertion below names them
                threaded.append(error)

        threads = [threading.Thread(target=worker) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)

    failures = [r for r in [*answered, *threaded] if isinstance(r, BaseException)]
    assert not failures, failures[:3]
    assert len(answered) == 50 and len(threaded) == 16
    assert set(engine.breaker_states().values()) == {"closed"}, counted.records[:6]


def _thread_burst(engine: Resilience, n: int) -> list[Any]:
    """``n`` threads released together, one sync call each: the answering model's name, or the error."""
    results: list[Any] = []
    barrier = threading.Barrier(n)

    def worker() -> None:
        barrier.wait()
        try:
            results.append(hidden(engine.completion("chat", MESSAGES))["model"])
        except Exception as error:  # collected: the assertion names them
            results.append(error)

    threads = [threading.Thread(target=worker) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def test_thread_bursts_against_healthy_providers_open_no_breaker(make_engine: EngineFactory) -> None:
    # The soft timeout is the learned p95 alone (~70 ms), no floor. 64 threads on 2 cores wait for the
    # GIL for hundreds of ms: before connecting, between a request's headers and its body, after the
    # answer came in. Timed from the first write, those waits made a healthy big "slow" and opened its
    # breaker (this test failed in 2 of 3 runs at load 5); timed by the kernel (when the whole request
    # had left, when the answer's bytes came in), they are the client's. (With 16 or 32 threads the old
    # timing passed as often as not: no test.)
    rounds, threads = 3, 64
    with provider_process(0.06) as big_url, provider_process(0.04) as small_url:
        policy: dict[str, Any] = {
            "models": {"big": model_entry("big", big_url), "small": model_entry("small", small_url)},
            "routes": {"chat": {"chain": ["big", "small"]}},
            # (deadline_s 10 s: room for a loaded machine's queue; see the burst test above)
            "prompt_classes": {"default": {"timeout_s": 0.3, "deadline_s": 10.0, "soft_timeout": {"percentile": 95}}},
            "breakers": {"default": {"fail_max": 3, "reset_timeout_s": 30}},
        }
        for _ in range(rounds):
            counted = _CountedFailures()
            engine = make_engine(policy, hooks=[counted])  # fresh breakers and latency windows
            for _ in range(25):
                engine.completion("chat", MESSAGES)
            results = _thread_burst(engine, threads)
            assert len(results) == threads and all(isinstance(r, str) for r in results), results
            assert set(engine.breaker_states().values()) == {"closed"}, counted.records[:6]


# -- a call that fails without sending anything still yields to the event loop -------------------


def test_an_async_call_that_fails_at_once_lets_the_loop_run_other_work(
    make_engine: EngineFactory, policy_dict: PolicyBuilder
) -> None:
    # Found by the soak: callers retrying a call that failed without a single await kept the loop to
    # themselves, and the probes in flight on it, whose answers would have reopened the route, never ran.
    engine = make_engine(
        policy_dict(["big", "small"], fail_max=1, breakers={"default": {"fail_max": 1, "panic": "fail_fast"}})
    )
    for name in ("big", "small"):
        engine.breakers.get(name).record(ProbeTicket(probe=False), "connection")
    assert set(engine.breaker_states().values()) == {"open"}

    async def scenario() -> list[str]:
        events: list[str] = []

        async def other_work() -> None:
            events.append("other work ran")

        pending = asyncio.ensure_future(other_work())  # ready to run at the loop's next turn
        with pytest.raises(AllAttemptsFailed):
            await engine.acompletion("chat", MESSAGES)
        events.append("call failed")
        await pending
        return events

    assert asyncio.run(scenario()) == ["other work ran", "call failed"]
