"""Instrumentation hooks: how tracing, metrics and the review log watch calls.

The decision core calls these at fixed points and knows nothing about OpenTelemetry
or files. A hook is any object with some of the methods of :class:`Hook`; missing
methods cost nothing. Hooks must not raise: a failing hook is logged once and the
call goes on (observability must never take the application down).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._breakers import BreakerTransition
    from ._outcomes import AttemptRecord
    from ._planner import Call

log = logging.getLogger("llm_resilience")


class Hook:
    """No-op base class; subclass and override what you need."""

    def call_started(self, call: Call) -> None:
        """A call to ``completion``/``acompletion`` began (route and class are decided)."""

    def attempt_started(self, call: Call, record: AttemptRecord) -> None:
        """A request is about to be sent, or a model is about to be skipped."""

    def attempt_ended(self, call: Call, record: AttemptRecord, response: Any) -> None:
        """The attempt has an outcome (``record.outcome``); ``response`` if one came back."""

    def call_ended(self, call: Call, response: Any, error: BaseException | None) -> None:
        """The call returns ``response`` or raises ``error``."""

    def breaker_transition(self, model: str, old: str, new: str) -> None:
        """A model's breaker changed state.

        An override may take a fourth argument, ``info: BreakerTransition | None = None``: it
        then also gets why (cause, consecutive failures, open until). Three-argument hooks
        keep working unchanged.
        """


_METHODS = ("call_started", "attempt_started", "attempt_ended", "call_ended", "breaker_transition")


class HookSet:
    """Dispatches each event to the hooks that implement it, isolating their failures."""

    def __init__(self, hooks: Sequence[object] = ()) -> None:
        self.hooks = list(hooks)
        self._by_event: dict[str, list[Any]] = {}
        self._failed: set[tuple[int, str]] = set()
        self._rebuild()

    def _rebuild(self) -> None:
        self._by_event = {m: [getattr(h, m) for h in self.hooks if _overrides(h, m)] for m in _METHODS}
        self._wants_info = {id(fn) for fn in self._by_event["breaker_transition"] if _accepts_positional(fn, 4)}

    def add(self, hook: object) -> None:
        self.hooks.append(hook)
        self._rebuild()

    def _emit(self, event: str, *args: Any) -> None:
        for fn in self._by_event[event]:
            try:
                fn(*args)
            except Exception:
                self._failed_once(fn, event)

    def _failed_once(self, fn: Any, event: str) -> None:
        key = (id(fn.__self__), event)
        if key not in self._failed:  # once per hook and event, not once per call
            self._failed.add(key)
            log.exception("instrumentation hook %r failed in %s; continuing", fn.__self__, event)

    def call_started(self, call: Call) -> None:
        self._emit("call_started", call)

    def attempt_started(self, call: Call, record: AttemptRecord) -> None:
        self._emit("attempt_started", call, record)

    def attempt_ended(self, call: Call, record: AttemptRecord, response: Any) -> None:
        self._emit("attempt_ended", call, record, response)

    def call_ended(self, call: Call, response: Any, error: BaseException | None) -> None:
        self._emit("call_ended", call, response, error)

    def breaker_transition(self, model: str, old: str, new: str, info: BreakerTransition | None = None) -> None:
        for fn in self._by_event["breaker_transition"]:
            args = (model, old, new, info) if id(fn) in self._wants_info else (model, old, new)
            try:
                fn(*args)
            except Exception:
                self._failed_once(fn, "breaker_transition")


def _overrides(hook: object, method: str) -> bool:
    fn = getattr(type(hook), method, None)
    return fn is not None and fn is not getattr(Hook, method)


def _accepts_positional(fn: Any, count: int) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return True
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(1 for p in params if p.kind in positional) >= count
