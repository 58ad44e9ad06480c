"""The environment switches that make litellm offline-safe, set before anything imports it.

``import llm_resilience`` applies them at once (cheap: no litellm import), so they hold
whoever imports litellm next; ``_env`` imports litellm itself, once they are set.
See ``_env.py`` for why each one matters.

When the application imported litellm *before* llm_resilience, its import-time cost-map
fetch has already run. What can still be put right is, here and at once (litellm is
loaded already, so this costs nothing): the quiet and no-download switches (plain
attributes); later cost-map reloads (litellm reads ``LITELLM_LOCAL_MODEL_COST_MAP`` each
time); and a remote map litellm adopted, swapped back for the map bundled with litellm so
context windows and capabilities do not depend on import order. A background fetch still
running cannot be stopped: that case gets one :class:`ImportOrderWarning` saying what to do.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings

# The one environment variable set: litellm's own switch, read when litellm is imported (so it
# must be in the environment, not an attribute). setdefault: an application that set it keeps its
# choice (``LITELLM_LOCAL_MODEL_COST_MAP=False``: litellm fetches its map as it would without us).
# Nothing outside litellm is switched: Hugging Face downloads stay off through litellm's own
# ``disable_hf_tokenizer_download`` attribute (``_env``), never ``HF_HUB_OFFLINE``, which would turn
# the Hub off for the whole application.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

_RETRY_THREAD = "litellm-model-cost-map-retry"  # litellm's background cost-map fetch (1.110+)


class ImportOrderWarning(RuntimeWarning):
    """litellm was imported before llm_resilience and is still fetching its model cost map."""


def _settle_after_late_import() -> None:
    """Undo what litellm's import did online, when it was imported before us (see module docstring)."""
    import litellm

    litellm.suppress_debug_info = True
    litellm.disable_hf_tokenizer_download = True
    if os.environ.get("LITELLM_LOCAL_MODEL_COST_MAP", "").lower() != "true":
        return  # the application chose the remote map on purpose
    try:
        from litellm.litellm_core_utils import get_model_cost_map as cost_map_module
    except ImportError:  # an older litellm: nothing we know how to inspect
        return
    info_of = getattr(cost_map_module, "get_model_cost_map_source_info", None)
    info = info_of() if info_of is not None else None
    if not isinstance(info, dict) or info.get("is_env_forced"):
        return  # litellm was offline when it was imported
    if any(thread.name == _RETRY_THREAD and thread.is_alive() for thread in threading.enumerate()):
        warnings.warn(
            "litellm was imported before llm_resilience without LITELLM_LOCAL_MODEL_COST_MAP=True: it is fetching "
            "its model cost map from the network in a background thread and may replace the bundled map when it "
            "succeeds. Set LITELLM_LOCAL_MODEL_COST_MAP=True in the environment (or import llm_resilience before "
            "litellm) to keep litellm offline.",
            ImportOrderWarning,
            stacklevel=3,
        )
        return
    adopt = getattr(cost_map_module, "adopt_model_cost_map", None)
    if info.get("source") == "remote" and adopt is not None:
        # With the variable now set, litellm's own loader returns its bundled map; adopting it
        # re-applies what the application registered with register_model().
        adopt(cost_map_module.get_model_cost_map(url=litellm.model_cost_map_url))


if "litellm" in sys.modules:
    _settle_after_late_import()
