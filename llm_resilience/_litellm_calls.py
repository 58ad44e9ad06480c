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

__all__ = ["acompletion", "completion"]
