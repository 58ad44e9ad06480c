"""``install()`` / ``uninstall()``: every ``litellm.completion`` call in the process goes through the policy.

Libraries that offer no injection point (dspy, openai-agents, smolagents, code that
calls ``litellm.completion`` itself) look the function up on the ``litellm`` module
when they call it. :func:`install` points ``litellm.completion`` and
``litellm.acompletion`` there at entry points of an engine; our drivers send every
attempt through litellm's own functions, captured once in ``_litellm_calls``, so the
patch cannot recurse.

A module that ran ``from litellm import completion, acompletion`` before holds litellm's
function itself; :func:`install` rebinds those module-level names too (exactly the names
``completion`` and ``acompletion``, in every imported module outside litellm and this
package), and :func:`uninstall` puts them back. Other references (``as`` aliases,
closures, attributes, ``instructor.from_litellm(litellm.completion)`` built before
``install()``) are left alone, since a saved original is not a call site: install
first, or pass ``llm_resilience.completion`` to such clients directly.

Only the public names are patched, never ``litellm.main.completion``: litellm's own
``acompletion`` runs that one in an executor, so patching it would send every async
attempt back into the policy.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import _litellm_calls
from ._env import litellm

if TYPE_CHECKING:
    from ._engine import Resilience

_NAMES = ("completion", "acompletion")
_SKIP_PACKAGES = frozenset({"litellm", "llm_resilience"})  # they must keep calling litellm's own functions


@dataclass
class _Installation:
    entry_points: dict[str, Callable[..., Any]]
    replaced: dict[str, Any]  # litellm.<name> before install
    rebound: list[tuple[dict[str, Any], str, Any]] = field(default_factory=list)  # (namespace, name, old value)


_lock = threading.Lock()
_current: _Installation | None = None


def _entry_points(engine: Resilience | None) -> dict[str, Callable[..., Any]]:
    from ._engine import default_engine

    def completion(model: str, messages: Any = (), **kwargs: Any) -> Any:
        return (engine or default_engine()).completion(model, messages, **kwargs)

    async def acompletion(model: str, messages: Any = (), **kwargs: Any) -> Any:
        return await (engine or default_engine()).acompletion(model, messages, **kwargs)

    for function, original in ((completion, _litellm_calls.completion), (acompletion, _litellm_calls.acompletion)):
        function.__doc__ = f"``litellm.{function.__name__}`` through llm-resilience's policy (see install())."
        function.__module__ = "llm_resilience"
        setattr(function, "__wrapped__", original)  # noqa: B010  (inspect.signature shows litellm's)
    return {"completion": completion, "acompletion": acompletion}


def _rebind(replacements: dict[int, Any]) -> list[tuple[dict[str, Any], str, Any]]:
    """Rebind module-level ``completion``/``acompletion`` names bound to a key of ``replacements`` (by identity)."""
    changed = []
    for module_name, module in list(sys.modules.items()):
        if module is None or module_name.partition(".")[0] in _SKIP_PACKAGES:
            continue
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for name in _NAMES:
            value = namespace.get(name)
            new = replacements.get(id(value))
            if new is not None:
                namespace[name] = new
                changed.append((namespace, name, value))
    return changed


def install(engine: Resilience | None = None) -> None:
    """Route every ``litellm.completion`` / ``litellm.acompletion`` call in this process through the policy.

    ``engine``: the :class:`Resilience` to use; by default the module-level engine
    (``LLM_RESILIENCE_POLICY``), built now, so a broken policy raises :class:`PolicyError` from
    ``install()`` at start-up rather than from the first LLM call, and clients that ask litellm
    about a route before calling it see its capabilities; it is looked up again at each call, so
    ``set_default_engine`` applies. Calling it again replaces the engine. Undo with :func:`uninstall`::

        import llm_resilience
        llm_resilience.install()
        import dspy
        dspy.configure(lm=dspy.LM("chat", num_retries=0))   # dspy now calls the route "chat"
    """
    global _current
    if engine is None:
        from ._engine import default_engine

        default_engine()  # fail fast: before anything is patched
    with _lock:
        _uninstall()
        points = _entry_points(engine)
        replaced = {name: getattr(litellm, name) for name in _NAMES}
        for name in _NAMES:
            setattr(litellm, name, points[name])
        rebound = _rebind({id(getattr(_litellm_calls, name)): points[name] for name in _NAMES})
        _current = _Installation(entry_points=points, replaced=replaced, rebound=rebound)


def uninstall() -> None:
    """Undo :func:`install`: ``litellm.completion`` / ``acompletion`` are what they were before.

    Names someone else re-assigned after :func:`install` are left as they are. A no-op
    when nothing is installed.
    """
    with _lock:
        _uninstall()


def _uninstall() -> None:
    global _current
    if _current is None:
        return
    ours = {id(point) for point in _current.entry_points.values()}
    for name in _NAMES:
        if id(getattr(litellm, name)) in ours:
            setattr(litellm, name, _current.replaced[name])
    for namespace, name, old in _current.rebound:
        if id(namespace.get(name)) in ours:
            namespace[name] = old
    _current = None
