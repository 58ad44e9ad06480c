"""One replica of an application, in its own OS process, for the shared-state tests.

``python tests/_replica.py POLICY_JSON CALLS [OPTIONS_JSON]``: builds an engine from the policy,
waits for its first sync with Redis, makes CALLS calls to route ``chat``, flushes its shared-state
writes (``close``) and prints, as JSON, the attempts of every call and the engine's breaker states.
Options: ``{"wait": false}`` calls as soon as the engine is built (a process that starts, with
litellm already imported and warm, and serves at once), ``{"close": false}`` exits without
``close()`` right after its last call (a job that simply ends). A call that fails with
``AllAttemptsFailed`` is reported with its attempts.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import llm_resilience
from llm_resilience import AllAttemptsFailed, Policy, Resilience


def main() -> int:
    policy, calls = json.loads(sys.argv[1]), int(sys.argv[2])
    options = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    if not options.get("wait", True):
        llm_resilience.warm_up()  # the application is up; the engine is built by its first call
    engine = Resilience(Policy.from_dict(policy))
    shared = engine._shared
    if shared is None or (options.get("wait", True) and not shared.synced.wait(10)):
        print(json.dumps({"error": "no shared state"}))
        return 1
    out = []
    for _ in range(calls):
        try:
            response = engine.completion("chat", [{"role": "user", "content": "hi"}])
        except AllAttemptsFailed as e:
            out.append([[a.model, a.outcome] for a in e.attempts])
            continue
        out.append([[a["model"], a["outcome"]] for a in response._hidden_params["llm_resilience"]["attempts"]])
    if options.get("close", True):
        engine.close()
    print(json.dumps({"calls": out, "breakers": engine.breaker_states(), "version": llm_resilience.__version__}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
