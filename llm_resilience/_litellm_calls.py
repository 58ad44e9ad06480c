"""litellm's own ``completion`` / ``acompletion``, captured once.

The drivers send every attempt through these, never through ``litellm.completion``
looked up at call time: an application (or :func:`llm_resilience.install`) may point
``litellm.completion`` at ``llm_resilience.completion``, and an attempt that went
through that name again would recurse into the policy forever.

They are what ``litellm.completion`` is when this package is imported (in litellm
1.110 a dispatch function over ``litellm.main.completion``; an instrumentation library
that wrapped it earlier stays in the path). Should that already be one of our entry
points (a reload, an odd import order), litellm's own ``litellm.main`` function is used.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import Callable
from typing import Any

from . import _env  # noqa: F401  (litellm offline and quiet before it is imported)


def _original(name: str) -> Callable[..., Any]:
    import litellm
    import litellm.main

    function: Callable[..., Any] = getattr(litellm, name)
    if str(getattr(function, "__module__", "")).partition(".")[0] == "llm_resilience":
        function = getattr(litellm.main, name)
    return function


completion: Callable[..., Any] = _original("completion")
"""litellm's ``completion`` as litellm defined it."""

acompletion: Callable[..., Any] = _original("acompletion")
"""litellm's ``acompletion`` as litellm defined it."""


def _dispatch_code() -> Any:
    import litellm.main

    return getattr(inspect.unwrap(litellm.main.acompletion), "__code__", None)


_DISPATCH_CODE = _dispatch_code()


def in_dispatch(task: asyncio.Task[Any]) -> bool:
    """Whether ``task`` waits on litellm's dispatch step: ``acompletion`` runs the sync request
    builder in the loop's executor, and that step returns the coroutine that does the I/O.

    Cancelling the task then drops that coroutine unawaited once the thread returns it (Python
    prints "coroutine ... was never awaited"); a moment later it is an ordinary suspended request
    that a cancel closes, connection included. Read from the awaiting chain of coroutines
    (``cr_await``, ``cr_code``): with a litellm laid out otherwise this says ``False``.
    """
    coro: Any = task.get_coro()
    while (awaited := getattr(coro, "cr_await", None)) is not None and hasattr(awaited, "cr_code"):
        coro = awaited
    return awaited is not None and getattr(coro, "cr_code", None) is _DISPATCH_CODE


_DISPATCH_WAIT_S = 0.05
"""How long a cut waits for the dispatch step to return: it takes a few milliseconds; one that is
still queued behind a busy executor is cancelled before it runs (nothing is left unawaited then)."""


def cancel_after_dispatch(task: asyncio.Task[Any], cancel: Callable[[], Any] | None = None) -> None:
    """Cut ``task``'s litellm call: ``cancel`` it (``task.cancel`` unless given) now, or once
    litellm's dispatch step has returned (see :func:`in_dispatch`), within ``_DISPATCH_WAIT_S``."""
    cut = task.cancel if cancel is None else cancel
    if task.done() or not in_dispatch(task):
        cut()
        return
    loop = task.get_loop()
    give_up_at = loop.time() + _DISPATCH_WAIT_S

    def check() -> None:
        if task.done():
            return
        if in_dispatch(task) and loop.time() < give_up_at:
            loop.call_later(0.001, check)
        else:
            cut()

    loop.call_later(0.001, check)


def expire_after_dispatch(task: asyncio.Task[Any], scope: asyncio.Timeout) -> None:
    """Expire ``scope`` (an ``asyncio.timeout`` entered by ``task``) as :func:`cancel_after_dispatch` cuts:
    its ``async with`` then raises ``TimeoutError``, as if its own deadline had passed."""
    loop = task.get_loop()

    def expire() -> None:
        with contextlib.suppress(RuntimeError):  # the scope was left meanwhile: nothing to cut
            scope.reschedule(loop.time())

    cancel_after_dispatch(task, expire)


__all__ = ["acompletion", "cancel_after_dispatch", "completion", "expire_after_dispatch", "in_dispatch"]
