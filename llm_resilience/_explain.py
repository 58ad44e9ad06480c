"""``llm-resilience explain``: what a request on a route would get, read from the policy.

Every answer comes from the code the engine runs, not from a second reading of the YAML:
the route and its class overrides from :meth:`Policy.route_for`, the prompt class from
:meth:`Planner.classify`, breaker settings from :meth:`Policy.breaker_settings`, input
budgets from ``_truncation.input_budget`` and, with a prompt, the fit per model from
:class:`~._truncation.TokenFitter` (the same truncation the engine would send).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from ._base_errors import PolicyError
from ._policy import BUILTIN_VALIDATORS, ModelSpec, Policy, PromptClass, ResolvedRoute


@dataclass(frozen=True)
class Prompt:
    """A prompt from ``--messages-file``: the messages and any other completion arguments."""

    messages: list[Mapping[str, Any]]
    kwargs: dict[str, Any]


def load_prompt(path: str | Path) -> Prompt:
    """A JSON list of messages, or an object with ``messages`` and other arguments (``max_tokens``, ``tools``...).

    Raises :class:`PolicyError` (the CLI prints it as ``file: problem``).
    """
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise PolicyError([f"{p}: cannot read messages file: {e.strerror or e}"]) from None
    except json.JSONDecodeError as e:
        raise PolicyError([f"{p}:{e.lineno}: not valid JSON: {e.msg}"]) from None
    kwargs: dict[str, Any] = {}
    if isinstance(data, Mapping):
        kwargs = {key: value for key, value in data.items() if key != "messages"}
        data = data.get("messages")
    if not isinstance(data, list) or not all(isinstance(m, Mapping) and "role" in m for m in data):
        raise PolicyError(
            [f'{p}: expected a JSON list of messages ({{"role": ..., "content": ...}}) or an object with \'messages\'']
        )
    return Prompt(messages=list(data), kwargs=kwargs)


def explain(policy: Policy, route_name: str, prompt_class: str | None, prompt: Prompt | None, out: TextIO) -> int:
    """Print what a request on ``route_name`` would get; return the exit status (2: unknown class)."""
    from ._breakers import BreakerRegistry
    from ._hooks import HookSet
    from ._planner import CallRequest, Planner
    from ._truncation import TokenFitter, input_budget, litellm_context_window

    planner = Planner(policy=policy, breakers=BreakerRegistry(policy.breaker_settings), hooks=HookSet([]))
    request = CallRequest(
        model=route_name,
        messages=prompt.messages if prompt else [],
        kwargs=prompt.kwargs if prompt else {},
        prompt_class=prompt_class,
    )
    try:
        klass_name = planner.classify(request)
    except LookupError as e:  # UnknownPromptClass is a ValueError: see below
        print(f"error: {e}", file=out)
        return 2
    except ValueError as e:
        print(f"error: {e}", file=out)
        return 2
    klass = policy.classes[klass_name]
    route = policy.route_for(route_name, klass_name)
    doc_route = policy.document.routes.get(route_name)
    w = out.write

    how = "given with --class" if prompt_class else _classified_how(policy, klass_name, prompt is not None)
    if doc_route is None:
        w(
            f"'{route_name}' is not a route of {policy.source}: "
            "it is served as a one-model route with the policy's defaults\n"
        )
    else:
        w(f"route '{route_name}' of {policy.source}\n")
    w(f"prompt class '{klass_name}' ({how})\n\n")

    own_chain = doc_route is not None and (over := doc_route.classes.get(klass_name)) is not None and over.chain
    names = " -> ".join(spec.name for spec in route.chain)
    w(f"chain: {names}" + (f"   (class '{klass_name}' has its own chain)" if own_chain else "") + "\n")
    w(_timing(klass))
    w(_rules(policy, route))
    w("\nper model, in order:\n")
    fitter = TokenFitter()
    kwargs = prompt.kwargs if prompt else {}
    for position, spec in enumerate(route.chain, 1):
        w(f"  {position}. {spec.name}  ({spec.litellm_model})\n")
        b = policy.breaker_settings(spec.name)
        counted = ", ".join(sorted(b.count))
        w(
            f"     breaker: opens after {b.fail_max} consecutive failures counted as [{counted}]; "
            f"one probe after {_s(b.reset_timeout_s)}{_backoff(b)}; closes after {b.success_threshold} probe success"
            f"{'es' if b.success_threshold != 1 else ''}\n"
        )
        window = spec.context_window or litellm_context_window(spec.litellm_model)
        if window is None:
            w("     input budget: unknown (litellm does not know this model; set context_window): never truncated\n")
        else:
            budget = input_budget(window, spec, kwargs, klass, route.truncation)
            source = "policy" if spec.context_window else "litellm's model map"
            w(
                f"     input budget: {budget:,} tokens (context window {window:,} from {source}, "
                f"minus {window - budget:,} reserved for the answer)\n"
            )
        if prompt is not None:
            w(f"     this prompt: {_fit_line(fitter, spec, prompt, route, klass)}\n")
    return 0


def _classified_how(policy: Policy, klass_name: str, has_prompt: bool) -> str:
    if has_prompt:
        return "what the policy's match rules pick for this prompt"
    rules = [name for name, _rule, _regex in policy.class_rules]
    if not rules:
        return "no --class given; the policy has no match rules"
    return f"no --class given; with a prompt, match rules may pick: {', '.join(dict.fromkeys(rules))}"


def _timing(klass: PromptClass) -> str:
    lines = [
        f"timeouts: {_s(klass.timeout_s)} per attempt, {_s(klass.deadline_s)} for the whole call (deadline)",
        f"streams: first content within {_s(klass.first_token_timeout_s or klass.timeout_s)}, "
        f"gaps between chunks under {_s(klass.idle_timeout_s or klass.timeout_s)}",
    ]
    soft = klass.soft_timeout
    if soft is None:
        lines.append("soft timeout: none (only the per-attempt timeout cuts a slow model off)")
    else:
        warmup = _s(soft.warmup_s) if soft.warmup_s is not None else f"timeout_s ({_s(klass.timeout_s)})"
        ceiling = _s(soft.ceiling_s) if soft.ceiling_s is not None else _s(klass.timeout_s)
        lines.append(
            f"soft timeout: p{soft.percentile:g} of the model's recent latency x {soft.multiplier:g}, "
            f"within [{_s(soft.floor_s)}, {ceiling}]; {warmup} until {soft.min_samples} samples; "
            "slower counts as a soft_timeout failure for the breaker"
        )
    if klass.max_output_tokens is not None:
        lines.append(f"answer reserve: {klass.max_output_tokens:,} tokens when the caller sets no max_tokens")
    return "".join(f"{line}\n" for line in lines)


def _rules(policy: Policy, route: ResolvedRoute) -> str:
    lines = []
    hedge = route.hedge
    if hedge is None:
        lines.append("hedging: off")
    else:
        after = hedge.after if isinstance(hedge.after, str) else _s(float(hedge.after))
        lines.append(
            f"hedging: start the next model beside a slow one after {after}; at most {hedge.max_extra} extra "
            f"per call; hedges stay under {hedge.budget_ratio:.0%} of recent requests"
        )
    retries = route.retries
    if retries is None or retries.max_retries == 0:
        lines.append("retries: off (the chain is the retry)")
    else:
        lines.append(
            f"retries: up to {retries.max_retries} per model on [{', '.join(retries.retry_on)}], backoff "
            f"{_s(retries.backoff_base_s)} doubling to {_s(retries.backoff_max_s)} (jittered, never before "
            f"Retry-After); budget {retries.budget_ratio:.0%} of recent requests, {retries.min_per_s:g}/s always"
        )
    checks = [f"{name} {route.validators.get(name, 'fall_back')}" for name in BUILTIN_VALIDATORS]
    checks += [f"{name} {action}" for name, action in route.validators.items() if name not in BUILTIN_VALIDATORS]
    lines.append(f"validators: {', '.join(checks)}; when every answer fails: {route.on_all_invalid}")
    lines.append(f"falls back on: {', '.join(sorted(policy.fall_back_on))}; any other error is raised at once")
    t = route.truncation
    lines.append(
        "truncation: off (a prompt too large for a model skips it)"
        if t.strategy == "off"
        else f"truncation: {t.strategy} (reserve {t.reserve_output_tokens:,} answer tokens by default)"
    )
    return "".join(f"{line}\n" for line in lines)


def _fit_line(fitter: Any, spec: ModelSpec, prompt: Prompt, route: ResolvedRoute, klass: PromptClass) -> str:
    from ._truncation import _Counter

    fit = fitter.fit(spec, prompt.messages, route, klass, prompt.kwargs, 1.0)
    tokens = fit.tokens_before
    if tokens is None:  # under the cheap bound: the fitter did not need to count; count for the reader
        try:
            tokens = _Counter(
                spec.litellm_model, prompt.kwargs.get("tools"), prompt.kwargs.get("tool_choice"), prompt.messages
            ).total(prompt.messages)
        except Exception:
            tokens = None
    counted = f"{tokens:,} tokens" if tokens is not None else "tokens not countable for this model"
    if not fit.fits:
        return f"{counted}: does not fit even truncated -> skipped (context_too_small), no request sent"
    if fit.truncated:
        dropped = len(prompt.messages) - len(fit.messages)
        return f"{counted}: would be truncated to {fit.tokens_after:,} tokens" + (
            f" ({dropped} message{'s' if dropped != 1 else ''} dropped)" if dropped else " (shortened)"
        )
    return f"{counted}: fits, sent unchanged"


def _backoff(settings: Any) -> str:
    backoff = getattr(settings, "reset_backoff", None)
    if backoff is None:
        return ""
    return f" (x{backoff.factor:g} after each failed probe, up to {_s(backoff.max_s)})"


def _s(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:g} ms" if seconds < 1 else f"{seconds:g} s"


__all__ = ["Prompt", "explain", "load_prompt"]
