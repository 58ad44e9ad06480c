"""Make litellm offline-safe and quiet, whether or not it was imported before this package.

litellm fetches its model cost map over the network at import time (a blocking
5 s ``httpx.get`` on machines without internet, then retries in a background thread),
downloads Hugging Face tokenizers for some model names, and prints "Give Feedback"
banners to stdout on errors. A resilience layer must not add a network dependency or
noise, so this module is imported first by the package and sets the switches the user
has not set.

When the application imported litellm first, the import-time fetch has already run.
What can still be put right is: the quiet and no-download switches (plain attributes);
later cost-map reloads (they read ``LITELLM_LOCAL_MODEL_COST_MAP`` each time); and a
remote map litellm adopted, which is swapped back for the map bundled with litellm so
context windows and capabilities do not depend on import order. A background retry
still running cannot be stopped: that case gets one warning saying what to do.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings

IMPORTED_BEFORE = "litellm" in sys.modules

# setdefault: an application that deliberately set these keeps its choice.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import litellm  # noqa: E402  (after the environment above)

litellm.suppress_debug_info = True
litellm.disable_hf_tokenizer_download = True

_RETRY_THREAD = "litellm-model-cost-map-retry"  # litellm's background cost-map fetch (1.110+)


class ImportOrderWarning(RuntimeWarning):
    """litellm was imported before llm_resilience and is still fetching its model cost map."""


def _local_cost_map_forced() -> bool:
    return os.environ.get("LITELLM_LOCAL_MODEL_COST_MAP", "").lower() == "true"


def _settle_after_late_import() -> None:
    """Undo what litellm's import did online, when it was imported before us (see module docstring)."""
    if not _local_cost_map_forced():
        return  # the application chose the remote map on purpose
    try:
        from litellm.litellm_core_utils import get_model_cost_map as cost_map_module
    except ImportError:  # an older litellm: nothing we know how to inspect
        return
    info_of = getattr(cost_map_module, "get_model_cost_map_source_info", None)
    info = info_of() if info_of is not None else None
    if not isinstance(info, dict) or info.get("is_env_forced"):
        return  # litellm was already offline when it was imported
    if any(thread.name == _RETRY_THREAD and thread.is_alive() for thread in threading.enumerate()):
        warnings.warn(
            "litellm was imported before llm_resilience without LITELLM_LOCAL_MODEL_COST_MAP=True: it is fetching "
            "its model cost map from the network in a background thread and may replace the bundled map when it "
            "succeeds. Set LITELLM_LOCAL_MODEL_COST_MAP=True in the environment (or import llm_resilience before "
            "litellm) to keep litellm offline.",
            ImportOrderWarning,
            stacklevel=2,
        )
        return
    adopt = getattr(cost_map_module, "adopt_model_cost_map", None)
    if info.get("source") == "remote" and adopt is not None:
        # With the variable now set, litellm's own loader returns its bundled map; adopting it
        # re-applies what the application registered with register_model().
        adopt(cost_map_module.get_model_cost_map(url=litellm.model_cost_map_url))


if IMPORTED_BEFORE:
    _settle_after_late_import()

__all__ = ["ImportOrderWarning", "litellm"]
