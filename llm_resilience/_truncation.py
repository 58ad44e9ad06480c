"""Token-aware truncation: make a prompt fit the context window of the model about to be tried.

The fallback model often has a smaller window than the primary. Before every attempt the
planner asks :class:`TokenFitter` what the prompt looks like for that model:

Budget
    The input budget is the model's window minus the output tokens the request reserves.
    Window: the policy's ``context_window`` if set (it wins), else litellm's
    ``max_input_tokens`` for the litellm model string (cached per model). A model whose
    window is unknown gets the prompt untouched and uncounted: we cannot truncate toward a
    size we do not know (set ``context_window`` for it in the policy).
    Reserve: ``max_completion_tokens``/``max_tokens`` as sent (the model's ``litellm_params``
    win over the caller's arguments; the larger when both are set), else the prompt class's
    ``max_output_tokens``, else the route's ``truncation.reserve_output_tokens``; never more
    than the model's own ``max_output_tokens`` (policy ``models.NAME.max_output_tokens``),
    since the model cannot write more than that.
    The reserve is capped at half the window: with a tiny local model (say 1,024 tokens)
    the default reserve of 1,024 would otherwise leave no room for any prompt, and a model
    that could answer would be skipped. The cost of the cap: a request that reserves more
    than half the window may still be refused by the provider (its context-length error
    falls back like any other) or cut short (``finish_reason == "length"``, which the
    ``truncated`` validator sees).
    After a provider's own context-length error the planner passes ``shrink`` < 1 and the
    budget is scaled by it, so the next models get a harder cut.

Cost
    Counting tokens costs ~0.05 ms for a short prompt and ~1 ms for 7,000 tokens (measured
    here), a sizeable share of a ~2.5 ms litellm call, so it is avoided when the answer is
    obvious: the UTF-8 byte length
    of every string in the prompt plus a per-message allowance is an upper bound of its
    tokens (a byte-level BPE token covers at least one byte), and when that bound fits the
    budget the prompt is sent without counting. ``tokens_before``/``tokens_after`` of the
    attempt are then ``None`` (not an estimate: the bound overstates English text about
    four times and would mislead a dashboard). They are exact (litellm's
    ``token_counter``) whenever the prompt was counted, i.e. when it was near or over the
    budget. Images and other non-text parts have no byte bound, so such prompts are always
    counted (without fetching image URLs).

``drop_oldest`` (the default strategy), when the prompt does not fit:

1. System (and ``developer``) messages and the last user message are never dropped.
2. The other messages form droppable units, oldest first: before the last user message,
   one unit per exchange (a user message and the replies that follow it), so the history
   never starts with an answer to a dropped question; elsewhere one unit per message,
   except that an assistant message with ``tool_calls`` (or ``function_call``) and the
   ``tool`` (``function``) results answering it are one unit: they are dropped or kept
   together, never split (providers reject a tool result without its call).
3. Units are dropped oldest first while the prompt is too long, except the newest one:
   it is what the last user message most likely refers to ("fix the bug above"), so its
   longest messages are shortened from the middle first, and it is dropped only when that
   is not enough.
4. Then the last user message is shortened from its middle (its head and tail survive).
5. System messages are never shortened: they carry the operator's instructions, and a
   model that cannot hold them is the wrong model. If the prompt still does not fit,
   the model is skipped (``context_too_small``) and no request is sent.

A shortened message keeps at least :data:`MIN_KEEP_CHARS` characters of its text around
the policy's ``marker``; below that it would carry no meaning. Tool-call arguments are
never cut (they must stay valid JSON). Strategy ``off`` never truncates: a prompt too
large for a model skips it.

The caller's ``messages`` are never modified: messages that change are copied (with
their content list, if any), unchanged ones are passed as they are.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from ._env import litellm
from ._planner import Fit
from ._policy import ModelSpec, PromptClass, ResolvedRoute, TruncationConfig

log = logging.getLogger("llm_resilience")

MIN_KEEP_CHARS = 64
"""A shortened message keeps at least this many characters of its text."""

# Upper-bound allowances (tokens). litellm counts 3-4 tokens per message, 1 per name and 3
# to prime the reply; the rest is slack for tokenizers that add a BOS or prefix token per
# string (SentencePiece), so the bound stays a bound for non-tiktoken models too.
_BOUND_FIXED = 16
_BOUND_PER_MESSAGE = 8
_BOUND_PER_STRING = 2
_BOUND_PER_TOOL = 64  # tool definitions are rendered with some boilerplate around their JSON

_SHORTEN_ROUNDS = 8
_MAX_OUTPUT_KEYS = ("max_completion_tokens", "max_tokens")
_SYSTEM_ROLES = frozenset({"system", "developer"})
_TOOL_RESULT_ROLES = frozenset({"tool", "function"})


@functools.lru_cache(maxsize=1024)
def load_tokenizer(model: str) -> None:
    """Load the tokenizer litellm uses for ``model`` now, once per model string per process.

    litellm counts tokens to fill in a stream's usage (and the cost of answers without usage),
    and loads the model's tokenizer the first time: 0.3 to 3 s of CPU for ``o200k_base``, spent
    inside the first attempt on that model, where a first-token timeout would blame the provider
    for it. The engine calls this for every model of its policy when a policy is put in force,
    outside any attempt's time.
    """
    try:
        litellm.token_counter(model=model, text="tokenizer")
    except Exception:  # a model litellm cannot count for: it will not count for it inside a call either
        log.debug("no tokenizer loaded for %s", model, exc_info=True)


@functools.lru_cache(maxsize=1024)
def litellm_context_window(model: str) -> int | None:
    """``max_input_tokens`` from litellm's model map, or ``None`` when litellm does not know the model.

    Cached per model string, unknown ones included (the lookup of an unknown model costs
    ~0.05 ms, and raising is its normal answer). Models registered with
    ``litellm.register_model`` after a first lookup need ``litellm_context_window.cache_clear()``.
    """
    try:
        info = litellm.get_model_info(model)
    except Exception:  # ModelNotMappedError, or anything litellm's lookup trips on: unknown
        return None
    value = info.get("max_input_tokens")
    return value if isinstance(value, int) and value > 0 else None


def input_budget(
    window: int, spec: ModelSpec, kwargs: Mapping[str, Any], prompt_class: PromptClass, cfg: TruncationConfig
) -> int:
    """Tokens the prompt may use: window minus the reserved output (capped at half the window)."""
    params = spec.litellm_params
    # What is sent: the caller's arguments with the model's litellm_params over them.
    asked = [_positive_int(params[key] if key in params else kwargs.get(key)) for key in _MAX_OUTPUT_KEYS]
    reserve = max((a for a in asked if a is not None), default=None)
    if reserve is None:
        reserve = prompt_class.max_output_tokens or cfg.reserve_output_tokens
    if spec.max_output_tokens is not None:
        reserve = min(reserve, spec.max_output_tokens)  # the model never writes more: reserving more wastes input
    return window - min(reserve, window // 2)


class TokenFitter:
    """The planner's :class:`~._planner.Fitter`: counts and truncates as the module docstring says."""

    def fit(
        self,
        spec: ModelSpec,
        messages: Sequence[Mapping[str, Any]],
        route: ResolvedRoute,
        prompt_class: PromptClass,
        kwargs: Mapping[str, Any],
        shrink: float,
    ) -> Fit:
        """What ``messages`` look like for ``spec``; ``Fit(fits=False)`` when they cannot fit."""
        window = spec.context_window or litellm_context_window(spec.litellm_model)
        if window is None:
            return Fit(messages=messages)
        cfg = route.truncation
        budget = int(input_budget(window, spec, kwargs, prompt_class, cfg) * min(shrink, 1.0))
        tools = kwargs.get("tools") or None
        tool_choice = kwargs.get("tool_choice") or None
        bound = upper_bound(messages, tools, tool_choice)
        if bound is not None and bound <= budget:
            return Fit(messages=messages)
        counter = _Counter(spec.litellm_model, tools, tool_choice, messages)
        try:
            total = counter.total(messages)
        except Exception as e:  # a content shape litellm cannot count: sending it beats failing the call
            log.debug("cannot count tokens for %s (%s); sending the prompt unchanged", spec.name, type(e).__name__)
            return Fit(messages=messages)
        if total <= budget:
            return Fit(messages=messages, tokens_before=total, tokens_after=total)
        if cfg.strategy == "off":
            return Fit(messages=messages, tokens_before=total, fits=False)
        try:
            result = _drop_oldest(messages, total, budget, counter, cfg.marker)
        except Exception as e:  # counting a part failed midway: treat as "cannot be made to fit"
            log.debug("cannot truncate the prompt for %s (%s)", spec.name, type(e).__name__)
            result = None
        if result is None:
            return Fit(messages=messages, tokens_before=total, fits=False)
        return Fit(messages=result[0], tokens_before=total, tokens_after=result[1], truncated=True)


# -- the cheap upper bound -----------------------------------------------------------------------


def upper_bound(messages: Sequence[Any], tools: Any = None, tool_choice: Any = None) -> int | None:
    """An upper bound of the prompt's tokens from byte lengths, or ``None`` when there is none.

    ``None`` for parts without a byte bound (images, files, audio) and for message objects
    that are not mappings: those prompts must be counted.
    """
    total = _BOUND_FIXED
    for message in messages:
        if not isinstance(message, Mapping):
            return None
        total += _BOUND_PER_MESSAGE
        for key, value in message.items():
            if value is None:
                continue
            if isinstance(value, str):
                total += _nbytes(value) + _BOUND_PER_STRING
            elif key == "content" and isinstance(value, list):
                for part in value:
                    if isinstance(part, str):
                        total += _nbytes(part) + _BOUND_PER_STRING
                    elif isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str):
                        total += _nbytes(part["text"]) + _BOUND_PER_STRING
                    else:
                        return None
            else:  # tool_calls, function_call, provider fields: every string in them, JSON-escaped (longer)
                size = _json_bytes(value)
                if size is None:
                    return None
                total += size
    if tools:
        size = _json_bytes(tools)
        if size is None:
            return None
        total += size + _BOUND_PER_TOOL * (len(tools) + 1)
    if tool_choice:
        size = _json_bytes(tool_choice)
        if size is None:
            return None
        total += size + _BOUND_PER_TOOL
    return total


def _nbytes(text: str) -> int:
    # isascii() is O(1) in CPython: ASCII text (the common case) needs no encoding pass.
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _json_bytes(value: Any) -> int | None:
    try:
        return _nbytes(json.dumps(value, ensure_ascii=False))
    except (TypeError, ValueError):
        return None


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


# -- exact counting --------------------------------------------------------------------------------


class _Counter:
    """litellm's ``token_counter`` for one model, with the request's tools."""

    def __init__(self, model: str, tools: Any, tool_choice: Any, messages: Sequence[Any]) -> None:
        self.model = model
        self.tools = tools
        self.tool_choice = tool_choice
        # litellm downloads an image URL to size a detail="high" image; never do network I/O
        # here, use its default image size for those prompts instead.
        self.default_images = _has_remote_high_detail_image(messages)

    def total(self, messages: Sequence[Any]) -> int:
        return int(
            litellm.token_counter(
                model=self.model,
                messages=list(messages),
                tools=self.tools,
                tool_choice=self.tool_choice,
                use_default_image_token_count=self.default_images,
            )
        )

    def message(self, message: Any) -> int:
        """One message's share of :meth:`total` (litellm's count is a sum over messages)."""
        return int(
            litellm.token_counter(
                model=self.model,
                messages=[message],
                count_response_tokens=True,  # without the reply primer and tool definitions
                use_default_image_token_count=self.default_images,
            )
        )


def _has_remote_high_detail_image(messages: Sequence[Any]) -> bool:
    for message in messages:
        content = message.get("content") if isinstance(message, Mapping) else None
        if not isinstance(content, list):
            continue
        for part in content:
            image = part.get("image_url") if isinstance(part, Mapping) else None
            if isinstance(image, Mapping) and image.get("detail") == "high":
                url = image.get("url")
                if isinstance(url, str) and url.startswith(("http://", "https://")):
                    return True
    return False


# -- drop_oldest -----------------------------------------------------------------------------------


def _as_mapping(message: Any) -> Mapping[str, Any]:
    if isinstance(message, Mapping):
        return message
    dump = getattr(message, "model_dump", None)  # a litellm/openai Message object
    return dict(dump(exclude_none=True)) if callable(dump) else dict(message)


def _calls_tools(message: Mapping[str, Any]) -> bool:
    return message.get("role") == "assistant" and bool(message.get("tool_calls") or message.get("function_call"))


def droppable_units(messages: Sequence[Mapping[str, Any]]) -> tuple[list[list[int]], set[int], int | None]:
    """(droppable units oldest first, pinned indexes, index of the last user message)."""
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    pinned = {i for i, m in enumerate(messages) if m.get("role") in _SYSTEM_ROLES}
    if last_user is not None:
        pinned.add(last_user)
    units: list[list[int]] = []
    exchange: list[int] | None = None
    i, n = 0, len(messages)
    while i < n:
        if i in pinned:
            i += 1
            continue
        before_last_user = last_user is not None and i < last_user
        if before_last_user and messages[i].get("role") == "user":
            exchange = [i]
            units.append(exchange)
            i += 1
            continue
        group = [i]
        j = i + 1
        if _calls_tools(messages[i]):
            while j < n and j not in pinned and messages[j].get("role") in _TOOL_RESULT_ROLES:
                group.append(j)
                j += 1
        if exchange is not None and before_last_user:
            exchange.extend(group)
        else:
            units.append(group)
        i = j
    return units, pinned, last_user


def _drop_oldest(
    original: Sequence[Any], total: int, budget: int, counter: _Counter, marker: str
) -> tuple[list[Any], int] | None:
    """The truncated messages and their exact token count, or ``None`` when they cannot fit."""
    messages = [_as_mapping(m) for m in original]
    costs = [counter.message(m) for m in messages]
    units, _pinned, last_user = droppable_units(messages)
    kept = [True] * len(messages)
    replaced: dict[int, Mapping[str, Any]] = {}

    def drop(unit: list[int]) -> None:
        nonlocal total
        for i in unit:
            kept[i] = False
            total -= costs[i]

    while total > budget and len(units) > 1:
        drop(units.pop(0))
    if total > budget and units:
        newest = units.pop()
        trial: dict[int, Mapping[str, Any]] = {}
        trial_total = total
        for i in sorted(newest, key=lambda i: costs[i], reverse=True):
            if trial_total <= budget:
                break
            shortened = _shorten(messages[i], costs[i], costs[i] - (trial_total - budget), counter, marker)
            if shortened is not None:
                trial[i] = shortened[0]
                trial_total += shortened[1] - costs[i]
        if trial_total <= budget:
            replaced.update(trial)
            total = trial_total
        else:
            drop(newest)
    if total > budget and last_user is not None:
        cost = costs[last_user]
        shortened = _shorten(messages[last_user], cost, cost - (total - budget), counter, marker)
        if shortened is None:
            return None
        replaced[last_user] = shortened[0]
        total += shortened[1] - cost
    if total > budget:
        return None
    out = [replaced.get(i, original[i]) for i in range(len(original)) if kept[i]]
    exact = counter.total(out)  # the sum above is litellm's arithmetic; confirm it, report the real figure
    return (out, exact) if exact <= budget else None


def _shorten(
    message: Mapping[str, Any], cost: int, target: int, counter: _Counter, marker: str
) -> tuple[Mapping[str, Any], int] | None:
    """``message`` cut in the middle of its (longest) text to at most ``target`` tokens.

    Returns the shortest acceptable version even when it is still above ``target`` (the
    caller decides), or ``None`` when there is no text long enough to cut.
    """
    content = message.get("content")
    part_index: int | None = None
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        texts = [
            (len(p["text"]), k)
            for k, p in enumerate(content)
            if isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str)
        ]
        if not texts:
            return None
        part_index = max(texts)[1]
        text = content[part_index]["text"]
    else:
        return None
    if len(text) <= MIN_KEEP_CHARS:
        return None
    chars_per_token = len(text) / max(cost, 1)
    keep = len(text) - int((cost - target) * chars_per_token) - len(marker)
    best: tuple[Mapping[str, Any], int] | None = None
    for round_ in range(_SHORTEN_ROUNDS):
        keep = max(min(keep, len(text) - 1), MIN_KEEP_CHARS)
        head = (keep + 1) // 2
        tail = keep - head
        candidate = _with_text(message, part_index, text[:head] + marker + (text[len(text) - tail :] if tail else ""))
        tokens = counter.message(candidate)
        best = (candidate, tokens)
        if tokens <= target or keep == MIN_KEEP_CHARS:
            break
        # Overshot: cut the estimated excess again, a little more each round so it converges.
        keep -= int((tokens - target) * chars_per_token * (1.1 + 0.5 * round_)) + 1
    return best


def _with_text(message: Mapping[str, Any], part_index: int | None, text: str) -> dict[str, Any]:
    """A copy of ``message`` with new text; the original and its content list are left alone."""
    copy = dict(message)
    if part_index is None:
        copy["content"] = text
    else:
        parts = list(message["content"])
        part = dict(parts[part_index])
        part["text"] = text
        parts[part_index] = part
        copy["content"] = parts
    return copy
