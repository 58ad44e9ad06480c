"""The environment switches that make litellm offline-safe, set before anything imports it.

``import llm_resilience`` applies them at once (cheap: no litellm import), so they hold
whoever imports litellm next; ``_env`` imports litellm itself, once they are set.
See ``_env.py`` for why each one matters.
"""

from __future__ import annotations

import os

# setdefault: an application that deliberately set these keeps its choice.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
