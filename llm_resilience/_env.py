"""Make litellm offline-safe and quiet before anything imports it.

litellm fetches its model cost map over the network at import time (a blocking
5 s ``httpx.get`` on machines without internet), downloads Hugging Face tokenizers
for some model names, and prints "Give Feedback" banners to stdout on errors. A
resilience layer must not add a network dependency or noise, so this module is
imported first by the package and sets the switches the user has not set.
"""

from __future__ import annotations

import os

# setdefault: an application that deliberately set it keeps its choice (see _offline).
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import litellm

# litellm's own switches, process-wide attributes of litellm and nothing else. An application
# that wants litellm's banners or Hugging Face tokenizers sets them back after importing us.
litellm.suppress_debug_info = True
litellm.disable_hf_tokenizer_download = True

__all__ = ["litellm"]
