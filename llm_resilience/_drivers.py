"""Thin drivers: run a :class:`~._planner.Call` with real I/O.

Both drivers execute the same protocol (Launch / Wait / Done / Fail) and differ only
in their I/O primitives: the sync one sends requests from the calling thread (a worker
thread only when attempts must overlap, i.e. hedging), the async one awaits in the
calling task (a child task only when attempts overlap). Neither makes a decision, and
the sync driver never starts an event loop, so it is safe from any thread, including
threads of a running event loop's executor.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import functools
import threading
import time
from collections.abc import Callable
from typing import Any

from ._env import litellm
from ._planner import Attempt, Call, Done, Fail, Launch, Wait

Clock = Callable[[], float]

_pool_lock = threading.Lock()
_pool: cf.ThreadPoolExecutor | None = None


def _thread_pool() -> cf.ThreadPoolExecutor:
    # Created on first hedge only: calls that never overlap attempts never pay for threads.
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = cf.ThreadPoolExecutor(max_workers=64, thread_name_prefix="llm-resilience-attempt")
        return _pool


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


def run_sync(call: Call, clock: Clock = time.monotonic) -> Any:
    """Drive ``call`` with blocking ``litellm.completion`` calls."""
    running: dict[cf.Future[Any], Attempt] = {}
    try:
        while True:
            action = call.next_action(clock())
            if isinstance(action, Launch):
                attempt = action.attempt
                if attempt.hedge_at is None and not running:
                    _settle(call, attempt, clock, functools.partial(litellm.completion, **attempt.kwargs))
                else:
                    running[_thread_pool().submit(litellm.completion, **attempt.kwargs)] = attempt
            elif isinstance(action, Wait):
                timeout = None if action.until is None else max(0.0, action.until - clock())
                done, _ = cf.wait(running, timeout=timeout, return_when=cf.FIRST_COMPLETED)
                for future in done:
                    attempt = running.pop(future)
                    _settle(call, attempt, clock, future.result)
            elif isinstance(action, Done):
                return action.response
            elif isinstance(action, Fail):
                raise action.error
    finally:
        for future, attempt in running.items():
            future.cancel()  # not started yet: never sent; already running: ends at its own timeout
            call.on_cancelled(attempt, clock())


async def _send_async(attempt: Attempt) -> Any:
    # litellm's timeout bounds each socket read; asyncio.timeout bounds the whole attempt.
    async with asyncio.timeout(attempt.timeout_s):
        return await litellm.acompletion(**attempt.kwargs)


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
    try:
        while True:
            action = call.next_action(clock())
            if isinstance(action, Launch):
                attempt = action.attempt
                if attempt.hedge_at is None and not running:
                    await _settle_async(call, attempt, clock, _send_async(attempt))
                else:
                    running[asyncio.ensure_future(_send_async(attempt))] = attempt
            elif isinstance(action, Wait):
                timeout = None if action.until is None else max(0.0, action.until - clock())
                done, _ = await asyncio.wait(running, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    attempt = running.pop(task)
                    await _settle_async(call, attempt, clock, task)
            elif isinstance(action, Done):
                return action.response
            elif isinstance(action, Fail):
                raise action.error
    finally:
        for task, attempt in running.items():
            task.cancel()  # closes the loser's connection
            call.on_cancelled(attempt, clock())
