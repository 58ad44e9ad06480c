"""llm-resilience: make LLM calls survive a sick provider.

Change one import::

    import llm_resilience
    response = llm_resilience.completion(model="chat", messages=[...])

and a YAML policy (``LLM_RESILIENCE_POLICY``) decides fallbacks, breakers, timeouts and
what counts as a failure. Libraries that call ``litellm.completion`` themselves are
covered by ``llm_resilience.install()``. The policy reference is docs/reference/policy.md.

The public names are loaded on first use (PEP 562): ``import litellm`` costs ~2 s, and
``import llm_resilience`` (the CLI's ``--help``, ``validate``) must not pay it. The
offline switches (``_offline``) are set at once, so litellm is offline-safe whoever
imports it next, the application included.
"""

from __future__ import annotations

import importlib
import logging
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from . import _offline  # noqa: F401  (first: litellm must never be imported without these settings)

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ below loads them
    from ._engine import Resilience, acompletion, completion, default_engine, set_default_engine, warm_up
    from ._exceptions import (
        AllAttemptsFailed,
        LLMResilienceError,
        PolicyError,
        StreamInterrupted,
        UnknownPromptClass,
    )
    from ._hooks import Hook
    from ._install import install, uninstall
    from ._offline import ImportOrderWarning
    from ._outcomes import AttemptRecord
    from ._policy import Policy
    from ._validators import register_validator

# Public name -> the private module defining it. Adding a public name is one line here
# (plus its TYPE_CHECKING import above and its entry in __all__).
_EXPORTS: dict[str, str] = {
    "AllAttemptsFailed": "._exceptions",
    "AttemptRecord": "._outcomes",
    "Hook": "._hooks",
    "ImportOrderWarning": "._offline",
    "LLMResilienceError": "._exceptions",
    "Policy": "._policy",
    "PolicyError": "._exceptions",
    "Resilience": "._engine",
    "StreamInterrupted": "._exceptions",
    "UnknownPromptClass": "._exceptions",
    "acompletion": "._engine",
    "completion": "._engine",
    "default_engine": "._engine",
    "install": "._install",
    "register_validator": "._validators",
    "set_default_engine": "._engine",
    "uninstall": "._install",
    "warm_up": "._engine",
}

# A library logs, the application decides where logs go (nothing reaches stderr by default).
logging.getLogger("llm_resilience").addHandler(logging.NullHandler())

try:
    __version__ = version("llm-resilience")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "AllAttemptsFailed",
    "AttemptRecord",
    "Hook",
    "ImportOrderWarning",
    "LLMResilienceError",
    "Policy",
    "PolicyError",
    "Resilience",
    "StreamInterrupted",
    "UnknownPromptClass",
    "__version__",
    "acompletion",
    "completion",
    "default_engine",
    "install",
    "register_validator",
    "set_default_engine",
    "uninstall",
    "warm_up",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'llm_resilience' has no attribute '{name}'")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # next time a plain module attribute: no __getattr__ on the hot path
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
