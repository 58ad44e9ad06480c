"""Run by scripts/check_wheel.sh with the python of a fresh virtualenv, outside the checkout.

One ``llm_resilience.completion`` call through a policy file (``LLM_RESILIENCE_POLICY``)
whose model is a loopback :class:`~llm_resilience.testing.FakeProvider`: the installed
wheel, not the source tree, does a real litellm HTTP call.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path


def main() -> int:
    import llm_resilience
    from llm_resilience.testing import Behavior, FakeProvider

    where = Path(llm_resilience.__file__).resolve()
    if "site-packages" not in where.parts:
        print(f"llm_resilience was imported from {where}, not from the installed wheel", file=sys.stderr)
        return 1
    with (
        FakeProvider(behavior=Behavior.ok("pong from the fake provider")) as provider,
        tempfile.TemporaryDirectory() as d,
    ):
        policy = Path(d) / "policy.yaml"
        policy.write_text(
            "models:\n"
            "  fake:\n"
            f"    litellm_params: {{model: openai/fake-model, api_base: '{provider.base_url}', api_key: sk-test}}\n"
            "routes:\n"
            "  chat: {chain: [fake]}\n"
            "prompt_classes:\n"
            "  default: {timeout_s: 10, deadline_s: 20}\n",
            encoding="utf-8",
        )
        os.environ["LLM_RESILIENCE_POLICY"] = str(policy)
        response = llm_resilience.completion(model="chat", messages=[{"role": "user", "content": "ping"}])
    text = response.choices[0].message.content
    answered = response._hidden_params["llm_resilience"]["model"]
    if text != "pong from the fake provider" or answered != "fake" or provider.request_count != 1:
        print(f"unexpected answer: {text!r} from {answered!r}, {provider.request_count} requests", file=sys.stderr)
        return 1
    print(f"ok: llm_resilience.completion through FakeProvider answered {text!r} ({where.parent})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
