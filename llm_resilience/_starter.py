"""``llm-resilience init``: a commented starter policy with the user's models.

The starter is the example policy's essentials (one route, two prompt classes, breakers,
validators, errors), each line commented, with the caller's models in the chain. Every
other field is documented in the example policy the package ships (``_resources``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

DEFAULT_CHAIN = ("openai/gpt-4o", "openai/gpt-4o-mini")

# Providers whose key litellm reads from one well-known variable. Others (Bedrock, Vertex,
# Azure AD...) authenticate from their own environment: no api_key line is written for them.
_KEY_VARIABLES = {
    "anthropic": "ANTHROPIC_API_KEY",
    "azure": "AZURE_API_KEY",
    "cohere": "COHERE_API_KEY",
    "deepseek": "DEEPSEEK_API_KEY",
    "fireworks_ai": "FIREWORKS_AI_API_KEY",
    "gemini": "GEMINI_API_KEY",
    "groq": "GROQ_API_KEY",
    "mistral": "MISTRAL_API_KEY",
    "openai": "OPENAI_API_KEY",
    "openrouter": "OPENROUTER_API_KEY",
    "together_ai": "TOGETHERAI_API_KEY",
    "xai": "XAI_API_KEY",
}


def model_names(chain: Sequence[str]) -> list[str]:
    """Policy names for litellm model strings: the part after the provider, made unique."""
    names: list[str] = []
    for model in chain:
        base = re.sub(r"[^A-Za-z0-9_.-]+", "-", model.rsplit("/", 1)[-1]).strip("-") or "model"
        name, n = base, 2
        while name in names:
            name, n = f"{base}-{n}", n + 1
        names.append(name)
    return names


def _yaml_scalar(text: str) -> str:
    # Plain when YAML reads it back unchanged; otherwise double-quoted (JSON strings are YAML).
    return text if re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_./@:+-]*", text) and ": " not in text else json.dumps(text)


def render_starter(chain: Sequence[str] = DEFAULT_CHAIN) -> str:
    """The starter policy's YAML text for ``chain`` (primary first)."""
    names = model_names(chain)
    models = []
    for position, (name, model) in enumerate(zip(names, chain, strict=True)):
        role = "the primary: tried first" if position == 0 else f"fallback {position}: tried when the ones before fail"
        provider = model.split("/", 1)[0] if "/" in model else "openai"
        variable = _KEY_VARIABLES.get(provider)
        key = (
            f"      api_key: os.environ/{variable}  # secrets: always os.environ/VAR, read at every call\n"
            if variable
            else "      # credentials: litellm reads them from this provider's usual environment variables\n"
        )
        models.append(
            f"  {name}:  # {role}\n"
            "    litellm_params:  # passed to litellm.completion as is\n"
            f"      model: {_yaml_scalar(model)}  # litellm model string, provider prefix included\n"
            f"{key}"
            "      # api_base: https://...  # your endpoint, for proxies and self-hosted models\n"
            "    # context_window: 128000  # max input tokens, for models litellm does not know\n"
        )
    return _TEMPLATE.format(models="".join(models), chain=", ".join(names), first=names[0])


def write_starter(path: str | os.PathLike[str], chain: Sequence[str] | None, out: TextIO, err: TextIO) -> int:
    """Write the starter to ``path`` unless it exists; print the next steps. Returns the exit status."""
    target = Path(path)
    text = render_starter(chain or DEFAULT_CHAIN)
    try:
        with target.open("x", encoding="utf-8") as f:  # "x": never overwrite, not even in a race
            f.write(text)
    except FileExistsError:
        print(f"{target} already exists; not overwriting it (choose another PATH, or remove it first)", file=err)
        return 1
    except OSError as e:
        print(f"{target}: cannot write: {e.strerror or e}", file=err)
        return 1
    names = model_names(chain or DEFAULT_CHAIN)
    print(f"wrote {target}: route 'chat' tries {' -> '.join(names)}", file=out)
    print("next:", file=out)
    print(f"  1. export LLM_RESILIENCE_POLICY={target.resolve()}", file=out)
    print(f"  2. llm-resilience validate {target}", file=out)
    print(
        'then call llm_resilience.completion(model="chat", messages=[...]) where you called litellm.completion',
        file=out,
    )
    return 0


_TEMPLATE = """\
# An llm-resilience policy, written by `llm-resilience init`.
#
#   llm-resilience validate THIS_FILE            # check it (do it in CI too)
#   llm-resilience explain THIS_FILE --route chat # what a request on "chat" gets
#   LLM_RESILIENCE_POLICY=THIS_FILE               # the policy llm_resilience.completion() uses
#
# In the application: llm_resilience.completion(model="chat", messages=[...]).
# Durations are in seconds. Every field, with its default, is documented in the example
# policy shipped with the package (policies/example.yaml in the repository).

version: 1

# models: every model a route may use, by a name of your choosing.
models:
{models}
# routes: the names the application passes as model=; each is an ordered chain of models.
routes:
  chat:  # completion(model="chat", ...)
    chain: [{chain}]  # tried in order: the next one when the current one fails or is skipped
    validators:  # checks on a 200 answer: fall_back (try the next model), flag (return it, marked), off
      empty: fall_back  # no text and no tool call
      truncated: flag  # cut off by the length limit although no max_tokens was set
      invalid_json: fall_back  # JSON was asked for (response_format) and the text does not parse
      content_filter: fall_back  # the provider filtered the answer
    # hedge: {{after: p95, max_extra: 1, budget_ratio: 0.1}}  # race the next model when one is slow
    retries:  # one 5xx: ask the same model once more (a ~0.1 s backoff) before falling back
      max_retries: 1
      retry_on: [server_error]  # not rate_limit: waiting out a Retry-After is slower than the next model
    streaming:  # a stream that breaks (cut, stalled) after text reached the caller
      on_interrupt: continue  # the next model (else the same, once) finishes it; only the rest reaches the caller
      # (on_interrupt: raise gives the caller StreamInterrupted instead)

# prompt_classes: timing per kind of request. The caller passes prompt_class="...", or the
# first class whose match rule holds is used, else "default".
prompt_classes:
  default:
    timeout_s: 10.0  # per attempt: a model slower than this is abandoned for the next one
    deadline_s: 30.0  # the whole call, across every attempt
  summarize:
    timeout_s: 3.0  # summaries must be quick
    deadline_s: 8.0
    soft_timeout: p95  # also move on when slower than the model's recent p95 latency
    match:
      - last_user_regex: '(?i)^\\s*(summari[sz]e|tl;?dr)\\b'  # Python regex on the last user message

# breakers: one circuit breaker per model. While open, the model is skipped without a request;
# after reset_timeout_s one probe request decides whether it closes again.
breakers:
  default:
    fail_max: 5  # consecutive counted failures that open the breaker
    reset_timeout_s: 5.0  # seconds open before one probe: back within seconds after a short blip
    reset_backoff: {{factor: 2.0, max_s: 60.0}}  # each failed probe doubles the wait, up to a minute
  {first}:
    fail_max: 3  # the primary: open sooner, so calls stop waiting on it

# Error kinds that move on to the next model; anything else (an ordinary 400) is raised at once.
errors:
  fall_back_on: [timeout, connection, rate_limit, server_error, auth, not_found, context_window]

# What spans may contain.
telemetry:
  record_content: false  # true puts prompt and answer text in spans
"""
