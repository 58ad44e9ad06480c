"""One engine shared by many threads and tasks while the primary is sick.

How many requests can the sick provider get? A request is admitted only while the breaker is
closed, and each caller has at most one attempt between admission and report. The breaker opens
when the ``fail_max``-th failure is recorded; by then at most ``fail_max`` requests have reported,
and at most ``N - 1`` other callers (N = concurrency) can be holding an admission they got just
before. Afterwards nothing is admitted (reset timeout is long). So the provider sees at most
``fail_max + N - 1`` requests however many calls are made, and none at all once it opened.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import threading
from typing import Any

from conftest import MESSAGES, EngineFactory, PolicyBuilder, hidden

from llm_resilience import Hook, Resilience
from llm_resilience.testing import Behavior, FakeProvider

FAIL_MAX = 3


class Transitions(Hook):
    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()

    def breaker_transition(self, model: str, old: str, new: str) -> None:
        with self._lock:
            self.seen.append((model, old, new))


def sick_primary_engine(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider
) -> tuple[Resilience, Transitions]:
    # A little latency so that many calls really are in flight at the moment the breaker opens.
    big.set(Behavior.error(500, latency_s=0.02))
    transitions = Transitions()
    # Generous timeouts: 200 calls in one event loop queue behind each other's CPU work (litellm spends
    # milliseconds per call), and this test is about the breaker, not about latency.
    policy = policy_dict(["big", "small"], timeout_s=10, deadline_s=20, fail_max=FAIL_MAX, reset_timeout_s=60)
    engine = make_engine(policy, hooks=[transitions])
    return engine, transitions


def test_twenty_threads_breaker_opens_once_and_bounds_requests_to_the_sick_provider(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider, small: FakeProvider
) -> None:
    engine, transitions = sick_primary_engine(make_engine, policy_dict, big)
    threads_n, calls_each = 20, 5
    barrier = threading.Barrier(threads_n)
    answered_by: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker() -> None:
        barrier.wait()
        for _ in range(calls_each):
            try:
                model = hidden(engine.completion("chat", MESSAGES))["model"]
            except BaseException as e:
                with lock:
                    errors.append(e)
            else:
                with lock:
                    answered_by.append(model)

    threads = [threading.Thread(target=worker) for _ in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)

    assert errors == []
    assert answered_by == ["small"] * (threads_n * calls_each)
    assert [t for t in transitions.seen if t[0] == "big"] == [("big", "closed", "open")]
    assert FAIL_MAX <= big.request_count <= FAIL_MAX + threads_n - 1
    assert small.request_count == threads_n * calls_each

    before = big.request_count
    for _ in range(5):
        engine.completion("chat", MESSAGES)
    assert big.request_count == before


def test_two_hundred_tasks_breaker_opens_once_and_bounds_requests_to_the_sick_provider(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider, small: FakeProvider
) -> None:
    engine, transitions = sick_primary_engine(make_engine, policy_dict, big)
    # More calls than callers: the bound (fail_max + tasks - 1) is far below the calls made, so a
    # breaker that never opened would exceed it.
    tasks_n, calls_each = 50, 4

    async def one_task() -> list[str]:
        return [hidden(await engine.acompletion("chat", MESSAGES))["model"] for _ in range(calls_each)]

    async def run_all() -> list[Any]:
        return await asyncio.gather(*(one_task() for _ in range(tasks_n)), return_exceptions=True)

    results = asyncio.run(run_all())

    assert [r for r in results if isinstance(r, BaseException)] == []
    assert all(r == ["small"] * calls_each for r in results)
    assert [t for t in transitions.seen if t[0] == "big"] == [("big", "closed", "open")]
    assert FAIL_MAX + tasks_n - 1 < tasks_n * calls_each
    assert FAIL_MAX <= big.request_count <= FAIL_MAX + tasks_n - 1
    assert small.request_count == tasks_n * calls_each

    before = big.request_count
    asyncio.run(run_all())
    assert big.request_count == before  # open: the second wave never reached the sick provider


def test_sync_completion_works_from_a_running_loops_executor_thread(engine: Resilience, big: FakeProvider) -> None:
    big.set(Behavior.error(503))

    async def main() -> list[Any]:
        loop = asyncio.get_running_loop()
        calls = [loop.run_in_executor(None, functools.partial(engine.completion, "chat", MESSAGES)) for _ in range(4)]
        return await asyncio.gather(*calls)

    responses = asyncio.run(main())

    assert [hidden(r)["model"] for r in responses] == ["small"] * 4


def test_sync_and_async_callers_share_breakers_concurrently(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider, small: FakeProvider
) -> None:
    engine, transitions = sick_primary_engine(make_engine, policy_dict, big)

    callers, calls_each = 20, 3  # 10 threads + 10 tasks, each calling 3 times in a row

    def sync_caller() -> list[Any]:
        return [engine.completion("chat", MESSAGES) for _ in range(calls_each)]

    async def async_caller() -> list[Any]:
        return [await engine.acompletion("chat", MESSAGES) for _ in range(calls_each)]

    async def main() -> list[list[Any]]:
        loop = asyncio.get_running_loop()
        with concurrent.futures.ThreadPoolExecutor(callers // 2) as pool:
            sync_calls = [loop.run_in_executor(pool, sync_caller) for _ in range(callers // 2)]
            async_calls = [async_caller() for _ in range(callers // 2)]
            return await asyncio.gather(*sync_calls, *async_calls)

    responses = [r for caller in asyncio.run(main()) for r in caller]

    assert [hidden(r)["model"] for r in responses] == ["small"] * callers * calls_each
    assert [t for t in transitions.seen if t[0] == "big"] == [("big", "closed", "open")]
    assert FAIL_MAX + callers - 1 < callers * calls_each  # a breaker that never opened would exceed the bound
    assert FAIL_MAX <= big.request_count <= FAIL_MAX + callers - 1
