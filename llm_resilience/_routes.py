"""Routes litellm knows: what ``litellm.get_model_info("chat")`` and friends answer for a route.

Clients ask litellm about the model name they were given before they call it: dspy
sends a JSON schema only if ``litellm.supports_response_schema(model)``, agents drop
native tools unless ``supports_function_calling(model)``, others size prompts with
``get_model_info(model)["max_input_tokens"]``. For a route name litellm would say
"unknown", so each route (and each model name of ``models:``, callable as a one-model
route) is registered in ``litellm.model_cost`` with what holds for *every* model its
chains (default and per prompt class) can reach, the weakest link:

- ``supports_function_calling`` / ``supports_response_schema`` / ``supports_vision`` /
  ``supports_parallel_function_calling`` / ``supports_tool_choice``: true only if litellm
  says so for every model (a model litellm does not know counts as not supporting it;
  ``litellm.register_model`` it under its litellm model string before building the engine);
- ``max_input_tokens``: the smallest window among the models whose window is known (the
  model's ``context_window:`` in the policy, else litellm's); a prompt that fits it reaches
  every model untruncated. Models with an unknown window do not lower it;
- ``max_output_tokens``: the smallest known;
- ``litellm_provider``: ``llm-resilience`` (see below). Prices are not registered: a
  response names the model that answered, and its cost is that model's.

``token_counter(model=route)`` counts as litellm does for any name it does not know as an
OpenAI model: with its default tiktoken encoding (no tokenizer downloads, :mod:`._env`).
For OpenAI models since gpt-4o (o200k_base) that is within a few per cent.

A registered name must never reach a provider through litellm itself (a saved reference to
``litellm.completion``, a call after :func:`uninstall`, a ``Router`` deployment,
``text_completion``, ``responses``, ``embedding``): registered like a model, litellm would
take ``"chat"`` for an OpenAI model and send the prompt to ``OPENAI_BASE_URL`` with the
application's ``OPENAI_API_KEY``. Every litellm entry point, capability look-ups included,
finds a bare name's provider with ``litellm.get_llm_provider``, so that is where a
registered name is caught: it is kept out of litellm's per-provider model sets, and one
routing rule (litellm's ``fallback_generalizations``, consulted only after every exact
lookup missed) resolves the names to ``llm-resilience``, a provider registered in
``litellm.custom_provider_map`` whose handler raises a ``BadRequestError`` that says what to
call instead, before any I/O. Capability look-ups resolve the same provider, find the
registered entry and answer. Names that a policy model's own litellm string uses are
registered under that model's provider instead (the engine calls them).

Names litellm already knows as real models are never overwritten (a route called
``gpt-4o`` keeps litellm's entry for ``gpt-4o``). litellm's table is process-wide: when
several engines declare the same route name, the engine built (or reloaded) last
describes it. :func:`register_routes` runs when an engine is built; a reload calls it
again with the new policy, which also removes the names the old one registered and the
new one dropped.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from collections.abc import Iterable
from typing import Any

from litellm.exceptions import BadRequestError
from litellm.litellm_core_utils.fallback_generalizations import (
    get_fallback_generalization_rules,
    set_fallback_generalizations,
)
from litellm.llms.custom_llm import CustomLLM

from ._env import litellm
from ._policy import ModelSpec, Policy
from ._truncation import litellm_context_window

log = logging.getLogger("llm_resilience")

CAPABILITIES = (
    "supports_function_calling",
    "supports_parallel_function_calling",
    "supports_response_schema",
    "supports_tool_choice",
    "supports_vision",
)

REFUSING_PROVIDER = "llm-resilience"
"""The litellm provider every registered name is aliased to: its handler refuses the call."""

_lock = threading.Lock()
_registered: dict[str, tuple[int, dict[str, Any]]] = {}  # name -> (owner id, entry we wrote)
_refused: set[str] = set()  # names our routing rule resolves to the refusing provider
_RULE_NAME = "llm-resilience: route and policy model names"


def _refusal(model: object) -> Exception:
    name = str(model).removeprefix(f"{REFUSING_PROVIDER}/")
    return BadRequestError(
        message=(
            f"{name!r} is an llm-resilience route or policy model, not a model litellm can call: nothing was sent. "
            f"Call llm_resilience.completion(model={name!r}, ...) / acompletion, or llm_resilience.install() "
            "before the client captures litellm.completion."
        ),
        model=name,
        llm_provider=REFUSING_PROVIDER,
    )


class _RouteNameHandler(CustomLLM):
    """litellm's handler for a route name called through litellm itself: refuse at once, before any I/O."""

    def completion(self, *args: Any, **kwargs: Any) -> Any:
        raise _refusal(kwargs.get("model"))

    def streaming(self, *args: Any, **kwargs: Any) -> Any:
        raise _refusal(kwargs.get("model"))

    async def acompletion(self, *args: Any, **kwargs: Any) -> Any:
        raise _refusal(kwargs.get("model"))

    async def astreaming(self, *args: Any, **kwargs: Any) -> Any:
        raise _refusal(kwargs.get("model"))

    def embedding(self, *args: Any, **kwargs: Any) -> Any:
        raise _refusal(kwargs.get("model"))

    async def aembedding(self, *args: Any, **kwargs: Any) -> Any:
        raise _refusal(kwargs.get("model"))

    def image_generation(self, *args: Any, **kwargs: Any) -> Any:
        raise _refusal(kwargs.get("model"))

    async def aimage_generation(self, *args: Any, **kwargs: Any) -> Any:
        raise _refusal(kwargs.get("model"))


_handler = _RouteNameHandler()


def _refuse_through_litellm(written: dict[str, dict[str, Any]]) -> None:
    """Resolve the refused names of ``written`` (and only them) to the refusing provider."""
    if not any(entry.get("custom_handler") is _handler for entry in litellm.custom_provider_map):
        litellm.custom_provider_map.append({"provider": REFUSING_PROVIDER, "custom_handler": _handler})
    providers = litellm.provider_list
    if not providers or providers[0] != REFUSING_PROVIDER:
        # On every call (ours and the application's own) litellm looks each custom provider up in
        # this list; appended at its end (~190 names) that costs ~4 µs a call, found first nothing.
        with contextlib.suppress(ValueError):
            providers.remove(REFUSING_PROVIDER)
        providers.insert(0, REFUSING_PROVIDER)
    for name, entry in written.items():
        if entry["litellm_provider"] == REFUSING_PROVIDER:
            _refused.add(name)
        else:
            _refused.discard(name)
    _install_routing_rule()


def _stop_refusing(name: str) -> None:
    if name in _refused:
        _refused.discard(name)
        _install_routing_rule()


def _install_routing_rule() -> None:
    # litellm's rules are one list, replaced whole (also when its cost map is reloaded, which
    # drops the entries too). Ours goes first: a later rule such as "claude.*" -> anthropic
    # must not claim a route called "claude-chat". Exact names, anchored: nothing else matches.
    theirs = [rule for rule in get_fallback_generalization_rules() if rule.get("name") != _RULE_NAME]
    ours = []
    if _refused:
        pattern = "^(?:" + "|".join(re.escape(name) for name in sorted(_refused)) + ")$"
        ours = [{"name": _RULE_NAME, "pattern": pattern, "model_info": {"litellm_provider": REFUSING_PROVIDER}}]
    set_fallback_generalizations([*ours, *theirs])


def _supports(capability: str, spec: ModelSpec) -> bool:
    check = getattr(litellm, capability, None)
    if check is None:  # an older litellm without this question: read the model map instead
        return bool(_model_info(spec).get(capability))
    try:
        return bool(check(model=spec.litellm_model, custom_llm_provider=spec.litellm_params.get("custom_llm_provider")))
    except Exception:  # an unknown model or provider: not supported as far as anyone can tell
        return False


def _model_info(spec: ModelSpec) -> dict[str, Any]:
    try:
        info = litellm.get_model_info(spec.litellm_model)
    except Exception:  # ModelNotMappedError: unknown to litellm
        return {}
    return dict(info)


def _provider(spec: ModelSpec) -> str:
    given = spec.litellm_params.get("custom_llm_provider")
    if isinstance(given, str) and given:
        return given
    try:
        return str(litellm.get_llm_provider(model=spec.litellm_model)[1])
    except Exception:
        return "openai"


def _smallest(values: Iterable[Any]) -> int | None:
    known = [v for v in values if isinstance(v, int) and v > 0]
    return min(known) if known else None


def route_entry(models: Iterable[ModelSpec], provider: str = REFUSING_PROVIDER) -> dict[str, Any]:
    """The ``litellm.model_cost`` entry for a route whose chains reach ``models`` (weakest link)."""
    specs = list({spec.name: spec for spec in models}.values())  # in chain order, once each
    entry: dict[str, Any] = {"mode": "chat", "litellm_provider": provider}
    window = _smallest(spec.context_window or litellm_context_window(spec.litellm_model) for spec in specs)
    output = _smallest(spec.max_output_tokens or _model_info(spec).get("max_output_tokens") for spec in specs)
    if window is not None:
        entry["max_input_tokens"] = window
    if output is not None:
        entry["max_output_tokens"] = entry["max_tokens"] = output
    for capability in CAPABILITIES:
        entry[capability] = all(_supports(capability, spec) for spec in specs)
    return entry


def route_entries(policy: Policy) -> dict[str, dict[str, Any]]:
    """Entries for every route of ``policy`` and every model name of its ``models:``."""
    # A name some model's litellm string uses is called by the engine under that name: it
    # keeps that model's provider. Every other name resolves to the refusing provider.
    called = {spec.litellm_model: _provider(spec) for spec in policy.models.values()}
    entries: dict[str, dict[str, Any]] = {}
    for name, route in policy.document.routes.items():
        chains = [route.chain, *(over.chain for over in route.classes.values() if over.chain)]
        models = [policy.models[model] for chain in chains for model in chain]
        entries[name] = route_entry(models, called.get(name, REFUSING_PROVIDER))
    for name, spec in policy.models.items():
        entries.setdefault(name, route_entry([spec], called.get(name, REFUSING_PROVIDER)))
    return entries


def register_routes(policy: Policy, owner: object) -> dict[str, dict[str, Any]]:
    """Register ``policy``'s routes with litellm on behalf of ``owner`` (an engine); returns what was written.

    Call again with the new policy on reload: names ``owner`` registered before and the
    new policy no longer has are removed from litellm's table.
    """
    entries = route_entries(policy)
    with _lock:
        written: dict[str, dict[str, Any]] = {}
        for name, entry in entries.items():
            if name in litellm.model_cost and name not in _registered:
                log.debug("route %r is also a model litellm knows: its litellm entry is kept", name)
                continue
            written[name] = entry
        if written:
            _register(written)
        for name, entry in written.items():
            _registered[name] = (id(owner), entry)
        _refuse_through_litellm(written)
        stale = [name for name, (who, _) in _registered.items() if who == id(owner) and name not in entries]
        for name in stale:
            del _registered[name]
            litellm.model_cost.pop(name, None)
            _stop_refusing(name)
        if stale:
            _forget_lookups()
    return written


def _register(entries: dict[str, dict[str, Any]]) -> None:
    # Not replayed over future cost maps (ours to replace), and kept out of the provider model
    # sets except for a name the engine itself calls: membership there is what would make
    # litellm send a bare route name to a real provider.
    refused = {name: entry for name, entry in entries.items() if entry["litellm_provider"] == REFUSING_PROVIDER}
    called = {name: entry for name, entry in entries.items() if name not in refused}
    if refused:
        litellm.register_model(refused, persist_across_reloads=False, add_to_provider_model_sets=False)
    if called:
        litellm.register_model(called, persist_across_reloads=False)
    litellm_context_window.cache_clear()


def _forget_lookups() -> None:
    invalidate = getattr(litellm.utils, "_invalidate_model_cost_lowercase_map", None)
    if invalidate is not None:  # litellm caches a lower-cased copy of the table for lookups
        invalidate()
    litellm_context_window.cache_clear()
