"""llm-resilience: make LLM calls survive a sick provider.

Change one import::

    import llm_resilience
    response = llm_resilience.completion(model="chat", messages=[...])

and a YAML policy (``LLM_RESILIENCE_POLICY``) decides fallbacks, breakers, timeouts and
what counts as a failure. See README.md for the policy reference.
"""

import logging
from importlib.metadata import PackageNotFoundError, version

from . import _env  # noqa: F401  (first: makes litellm offline-safe and quiet)
from ._engine import Resilience, acompletion, completion, default_engine, set_default_engine
from ._exceptions import (
    AllAttemptsFailed,
    LLMResilienceError,
    PolicyError,
    StreamInterrupted,
    UnknownPromptClass,
)
from ._hooks import Hook
from ._outcomes import AttemptRecord
from ._policy import Policy
from ._validators import register_validator

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
    "register_validator",
    "set_default_engine",
]
