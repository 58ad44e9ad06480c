"""Make litellm offline-safe and quiet before anything imports it.

litellm fetches its model cost map over the network at import time (a blocking
5 s ``httpx.get`` on machines without internet), downloads Hugging Face tokenizers
for some model names, and prints "Give Feedback" banners to stdout on errors. A
resilience layer must not add a network dependency or noise, so this module is
imported first by the package and sets the switches the user has not set.
"""

from __future__ import annotations

import os

# setdefault: an application that deliberately set these keeps its choice.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import litellm

litellm.suppress_debug_info = True
litellm.disable_hf_tokenizer_download = True

__all__ = ["litellm"]
