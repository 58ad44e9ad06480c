"""Partial failures: a 200 answer that is still no answer.

Built-in validators (names used in the policy's ``validators:`` and in spans):

``empty``
    No text (or only whitespace) and no tool call.
``truncated``
    ``finish_reason == "length"`` although nothing in the request asked for a short answer
    (neither the caller nor the model's ``litellm_params`` set ``max_tokens`` /
    ``max_completion_tokens``). When a limit was set, hitting it is what was asked for.
``invalid_json``
    The request asked for JSON (``response_format`` ``json_object``, ``json_schema``, or a
    pydantic model class) and the text does not parse, is not an object (``json_object``),
    or does not match the schema. Schemas are checked with ``jsonschema`` (a litellm
    dependency), pydantic classes with the class itself. The text must be the JSON itself,
    as the caller's ``json.loads(content)`` needs it: JSON inside a Markdown code fence
    fails. Tool calls are checked too, whatever the ``response_format``: each call's
    ``arguments`` must parse as a JSON object, name a tool the request offered (when it
    offered any), and match that tool's ``parameters`` JSON Schema. An answer whose tool
    calls pass is not checked against ``response_format``: the model chose to call a tool.
``content_filter``
    ``finish_reason == "content_filter"``.

With several choices (``n > 1``) a check fails when it fails for any choice.

Each is on by default with action ``fall_back`` (try the next model); a route or prompt
class sets ``flag`` (return the answer, marked) or ``off``. What the actions do lives in
the planner (``Call.on_response``): it reads the names :meth:`ResponseValidator.check`
returns. A soft failure counts toward the model's breaker only when its name is listed in
``breakers.*.count`` (none is by default); a custom validator may be listed there too, once
registered (or declared when the policy is loaded).

Custom validators::

    def has_citation(response, request):
        text = response.choices[0].message.content or ""
        return "[1]" in text or "no citation"      # True/None: fine; False or a reason: failed

    llm_resilience.register_validator("has_citation", has_citation)

    # policy:  routes: {chat: {chain: [...], validators: {has_citation: fall_back}}}

A custom validator runs only where the policy names it. A policy naming a validator that
is neither built in nor registered is rejected when it is loaded, with the file and line
(``Policy.from_file(path, validators=["name"])`` declares names registered later; the
engine then checks they were, when it is built). ``llm-resilience validate --validator NAME``
declares them to the command line. A custom
validator that raises is logged once and treated as passing: a bug in a check must not
turn every answer into a failure and take the application down.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from . import _outcomes as k
from ._exceptions import PolicyError
from ._policy import BUILTIN_VALIDATORS, Policy, ResolvedRoute

log = logging.getLogger("llm_resilience")


ValidatorFn = Callable[[Any, Mapping[str, Any]], "bool | str | None"]
"""``fn(response, request) -> True | None`` (fine) ``| False | "reason"`` (failed).

``response`` is the ``litellm.ModelResponse`` (for streams: the assembled one);
``request`` is a read-only mapping of the litellm arguments sent for this attempt
(``model``, ``messages`` as sent, ``response_format``, ``max_tokens``...; no ``api_key``).
"""

_registry: dict[str, ValidatorFn] = {}
_registry_lock = threading.Lock()
_MAX_KEYS = ("max_tokens", "max_completion_tokens")


def register_validator(name: str, fn: ValidatorFn, *, replace: bool = False) -> None:
    """Register a custom validator under ``name``, for policies to reference.

    ``fn(response, request)`` returns ``True`` or ``None`` when the answer is fine, and
    ``False`` or a short reason (a string, kept with the attempt; never include the
    answer text in it) when it is not. Register before building the engine that uses it::

        llm_resilience.register_validator("no_apology", lambda r, req: "sorry" not in r.choices[0].message.content)

    Raises ``ValueError`` for a built-in name, or for a name already registered to another
    function unless ``replace=True``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError("a validator name must be a non-empty string")
    if name in BUILTIN_VALIDATORS:
        raise ValueError(f"'{name}' is a built-in validator; choose another name")
    if not callable(fn):
        raise TypeError(f"validator '{name}' must be callable, got {type(fn).__name__}")
    with _registry_lock:
        existing = _registry.get(name)
        if existing is not None and existing is not fn and not replace:
            raise ValueError(f"a validator named '{name}' is already registered; pass replace=True to replace it")
        _registry[name] = fn


def registered_validators() -> dict[str, ValidatorFn]:
    """The custom validators registered so far, by name."""
    with _registry_lock:
        return dict(_registry)


class Failed(str):
    """A failed check: its name (a ``str``, as the planner expects) plus an optional ``detail``.

    The detail says what was wrong without quoting the answer (``"not valid JSON: Expecting
    value at line 1 column 1"``, ``"$.age: type"``); the review log records it.
    """

    detail: str | None

    def __new__(cls, name: str, detail: str | None = None) -> Failed:
        failed = super().__new__(cls, name)
        failed.detail = detail
        return failed


class ResponseValidator:
    """The planner's :class:`~._planner.Validator`: the built-ins plus registered validators.

    Built from a policy; raises :class:`PolicyError` when the policy names a validator that
    is neither built in nor registered.
    """

    def __init__(self, policy: Policy) -> None:
        registered = registered_validators()
        # Checked at load already; again here for names declared at load (Policy.from_file(...,
        # validators=[...])) that were never registered. Problems keep the policy's file:line.
        problems = policy.unknown_validators(registered)
        if problems:
            raise PolicyError(problems)
        self._custom = {name: fn for name, fn in registered.items()}
        self._warned: set[str] = set()

    def check(
        self, route: ResolvedRoute, request: Any, response: Any, sent: Mapping[str, Any] | None = None
    ) -> list[str]:
        """Names of the enabled checks ``response`` fails (each a :class:`Failed`).

        ``request`` is the planner's ``CallRequest``; ``sent`` the litellm arguments of the
        attempt (they include the model's ``litellm_params``), when the planner passes them.
        """
        actions = route.validators
        kwargs: Mapping[str, Any] = sent if sent is not None else request.kwargs
        choices = list(getattr(response, "choices", None) or [])
        finish_reasons = [_finish_reason(c) for c in choices]  # read once: pydantic attribute access is not free
        failed: list[str] = []
        if actions.get(k.EMPTY) != "off" and (not choices or any(_is_empty(c) for c in choices)):
            failed.append(Failed(k.EMPTY))
        if (
            actions.get(k.TRUNCATED) != "off"
            and "length" in finish_reasons
            and not any(kwargs.get(key) for key in _MAX_KEYS)
        ):
            failed.append(Failed(k.TRUNCATED, "finish_reason length without max_tokens"))
        if actions.get(k.INVALID_JSON) != "off":
            response_format = kwargs.get("response_format")
            if response_format is None and sent is not None:
                response_format = request.kwargs.get("response_format")
            for choice in choices:
                problem = tool_call_problem(kwargs.get("tools") or request.kwargs.get("tools"), choice)
                if problem is None and response_format is not None:
                    problem = json_problem(response_format, choice)
                if problem is not None:
                    failed.append(Failed(k.INVALID_JSON, problem))
                    break
        if actions.get(k.CONTENT_FILTER) != "off" and "content_filter" in finish_reasons:
            failed.append(Failed(k.CONTENT_FILTER, "finish_reason content_filter"))
        for name, action in actions.items():
            if action != "off" and name not in BUILTIN_VALIDATORS:
                problem = self._run_custom(name, response, kwargs)
                if problem is not None:
                    failed.append(problem)
        return failed

    def _run_custom(self, name: str, response: Any, kwargs: Mapping[str, Any]) -> Failed | None:
        fn = self._custom.get(name)
        if fn is None:  # checked at construction; a route built later from the same policy cannot add names
            return None
        try:
            result = fn(response, MappingProxyType({key: v for key, v in kwargs.items() if key != "api_key"}))
        except Exception:
            self._warn_once(name, "raised; treating the answer as passing it", exc_info=True)
            return None
        if result is None or result is True:
            return None
        if result is False:
            return Failed(name)
        if isinstance(result, str):
            return Failed(name, result[:200])
        self._warn_once(name, f"returned {type(result).__name__}; expected True/None/False/str; treating as passing")
        return None

    def _warn_once(self, name: str, what: str, exc_info: bool = False) -> None:
        if name not in self._warned:
            self._warned.add(name)
            log.warning("custom validator '%s' %s", name, what, exc_info=exc_info)


# -- the built-in checks ---------------------------------------------------------------------------


def _finish_reason(choice: Any) -> Any:
    return getattr(choice, "finish_reason", None)


def _message(choice: Any) -> Any:
    return getattr(choice, "message", None)


def _text(choice: Any) -> str | None:
    content = getattr(_message(choice), "content", None)
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts (rare in answers): their text
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, Mapping))
    return str(content)


def _has_tool_calls(choice: Any) -> bool:
    message = _message(choice)
    return bool(getattr(message, "tool_calls", None) or getattr(message, "function_call", None))


def _is_empty(choice: Any) -> bool:
    text = _text(choice)
    return (text is None or not text.strip()) and not _has_tool_calls(choice)


def tool_call_problem(tools: Any, choice: Any) -> str | None:
    """Why a tool call of ``choice`` is unusable (``None``: every call is fine, or there is none).

    A call's ``arguments`` must parse as a JSON object; when the request offered ``tools``, the
    call must name one of them and match its ``parameters`` schema. Like :func:`json_problem`,
    the reason names the tool and a JSON path, never the arguments.
    """
    message = _message(choice)
    calls = list(getattr(message, "tool_calls", None) or ())
    legacy = getattr(message, "function_call", None)
    if legacy is not None:
        calls.append(_LegacyCall(legacy))
    if not calls:
        return None
    offered = _offered_tools(tools)
    for position, call in enumerate(calls):
        function = getattr(call, "function", None)
        if function is None and isinstance(call, Mapping):
            function = call.get("function")
        name = _field(function, "name")
        arguments = _field(function, "arguments")
        label = f"tool call {position}" + (f" ({name})" if isinstance(name, str) and name else "")
        if isinstance(arguments, Mapping):
            value: Any = dict(arguments)
        else:
            try:
                value = json.loads(arguments or "")
            except (TypeError, ValueError) as e:
                msg = getattr(e, "msg", "not JSON")
                return f"{label}: arguments not valid JSON: {msg}"
        if not isinstance(value, dict):
            return f"{label}: arguments are JSON {_json_type(value)}, expected an object"
        if offered is None:
            continue
        if name not in offered:
            return f"{label}: names a tool the request did not offer"
        schema = offered[name]
        if isinstance(schema, Mapping):
            problem = _schema_problem(schema, value)
            if problem is not None:
                return f"{label}: {problem}"
    return None


class _LegacyCall:
    """A ``function_call`` (the pre-tools form) seen as a tool call."""

    def __init__(self, function: Any) -> None:
        self.function = function


def _field(obj: Any, name: str) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def _offered_tools(tools: Any) -> dict[str, Any] | None:
    """Tool name -> its ``parameters`` schema (``None`` when none given), from the request's ``tools``."""
    if not isinstance(tools, list | tuple) or not tools:
        return None
    offered: dict[str, Any] = {}
    for tool in tools:
        function = _field(tool, "function") if _field(tool, "type") in (None, "function") else None
        name = _field(function, "name")
        if isinstance(name, str):
            offered[name] = _field(function, "parameters")
        else:
            return None  # a tool we cannot read (a provider's built-in tool, say): do not judge names
    return offered


def json_problem(response_format: Any, choice: Any) -> str | None:
    """Why ``choice`` does not satisfy ``response_format`` (``None``: it does, or nothing to check).

    The reason never quotes the answer: positions, JSON paths and schema keywords only.
    """
    if _has_tool_calls(choice) and not (_text(choice) or "").strip():
        return None
    if isinstance(response_format, type):
        return _pydantic_problem(response_format, _text(choice) or "")
    if not isinstance(response_format, Mapping):
        return None
    kind = response_format.get("type")
    if kind not in ("json_object", "json_schema"):
        return None
    text = _text(choice) or ""
    try:
        value = json.loads(text)
    except ValueError as e:
        msg = getattr(e, "msg", "not JSON")
        return f"not valid JSON: {msg} at line {getattr(e, 'lineno', '?')} column {getattr(e, 'colno', '?')}"
    if kind == "json_object":
        schema = response_format.get("response_schema")  # litellm's extension for some providers
        if schema is None:
            return None if isinstance(value, dict) else f"JSON {_json_type(value)}, expected an object"
    else:
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, Mapping) else None
        if schema is None:
            return None
    if not isinstance(schema, Mapping):
        return None
    return _schema_problem(schema, value)


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


def _schema_problem(schema: Mapping[str, Any], value: Any) -> str | None:
    try:
        key = json.dumps(schema, sort_keys=True)
    except (TypeError, ValueError):
        return None
    validator = _compiled_schema(key)
    if validator is None:
        return None
    import jsonschema  # imported by _compiled_schema already

    error = jsonschema.exceptions.best_match(validator.iter_errors(value))
    if error is None:
        return None
    return f"schema mismatch at {error.json_path}: {error.validator}"


@functools.lru_cache(maxsize=256)
def _compiled_schema(schema_json: str) -> Any:
    """A jsonschema validator for a schema (cached: checking a schema costs more than using it)."""
    import jsonschema  # ~30 ms; only requests asking for a schema pay it, once

    schema = json.loads(schema_json)
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.exceptions.SchemaError as e:
        log.warning(
            "response_format schema is not a valid JSON Schema (%s); answers are checked for JSON syntax only",
            e.message[:200],
        )
        return None
    return cls(schema)


def _pydantic_problem(model: type, text: str) -> str | None:
    validate = getattr(model, "model_validate_json", None)
    if not callable(validate):
        return None
    from pydantic import ValidationError

    try:
        validate(text)
    except ValidationError as e:
        errors = e.errors(include_input=False, include_url=False)
        if not errors:
            return f"does not match {model.__name__}"
        loc = ".".join(str(p) for p in errors[0]["loc"]) or "(root)"
        return f"does not match {model.__name__} at {loc}: {errors[0]['type']}"
    return None
