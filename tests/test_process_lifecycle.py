"""A process's life around the library, each in a fresh interpreter: import, start-up, first call, exit.

Import-time and first-call behaviour only shows in a process that has not done it yet, so every
test here runs a short script in a new ``python`` (``sys.executable``) and reads what it prints.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest


def run_fresh(script: str, env: dict[str, str] | None = None, timeout: float = 180) -> dict[str, Any]:
    """Run ``script`` in a new interpreter; returns the JSON object on its last stdout line."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        env=env if env is not None else dict(os.environ),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _environment_without(*names: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in names}


ENVIRONMENT_AROUND_IMPORT = """
    import json, os
    before = dict(os.environ)
    import llm_resilience
    after_import = dict(os.environ)
    llm_resilience.Resilience.from_dict({"models": {"m": {"litellm_params": {"model": "openai/gpt-4o"}}}})
    after_engine = dict(os.environ)
    def added(now): return {k: v for k, v in now.items() if before.get(k) != v}
    print(json.dumps({"import": added(after_import), "engine": added(after_engine),
                      "removed": sorted(set(before) - set(after_engine))}))
"""


def test_importing_and_building_an_engine_sets_nothing_but_litellm_own_switch() -> None:
    env = _environment_without("HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", "LITELLM_LOCAL_MODEL_COST_MAP")

    changed = run_fresh(ENVIRONMENT_AROUND_IMPORT, env)

    assert changed["import"] == {"LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    assert changed["engine"] == {"LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    assert changed["removed"] == []


def test_an_application_choice_of_litellm_switch_is_kept() -> None:
    env = _environment_without("HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM")
    env["LITELLM_LOCAL_MODEL_COST_MAP"] = "true"  # the application's own spelling of it

    changed = run_fresh(ENVIRONMENT_AROUND_IMPORT, env)

    assert changed == {"import": {}, "engine": {}, "removed": []}


FIRST_CALL = """
    import asyncio, json, sys
    import llm_resilience
    from llm_resilience.testing import Behavior, FakeProvider

    mode = sys.argv[1]
    with FakeProvider() as big, FakeProvider() as small:
        big.set(Behavior.slow(3.0) if mode == "hedged" else Behavior.error(503))
        route = {"chain": ["big", "small"]}
        if mode == "hedged":
            route["hedge"] = {"after": 0.1, "budget_ratio": 1.0}
        engine = llm_resilience.Resilience.from_dict({
            "models": {
                name: {"litellm_params": {"model": model, "api_base": p.base_url, "api_key": "sk-test"}}
                for name, model, p in (("big", "openai/gpt-4o", big), ("small", "openai/gpt-4o-mini", small))
            },
            "routes": {"chat": route},
            "prompt_classes": {"default": {"timeout_s": 0.3, "deadline_s": 10}},
        })
        messages = [{"role": "user", "content": "hi"}]
        try:
            if mode == "stream":
                chunks = list(engine.completion("chat", messages, stream=True))
                answered_by = "small" if chunks else None  # big answers 503
                attempts = []
            else:
                call = engine.acompletion("chat", messages) if mode == "async" else None
                response = asyncio.run(call) if call else engine.completion("chat", messages)
                summary = response._hidden_params["llm_resilience"]
                answered_by = summary["model"]
                attempts = [(a["model"], a["outcome"], a["reason"]) for a in summary["attempts"]]
        except llm_resilience.AllAttemptsFailed as e:
            answered_by = None
            attempts = [(a.model, a.outcome, a.reason) for a in e.attempts]
        failures = {name: engine.breakers.get(name).fail_counter for name in ("big", "small")}
    print(json.dumps({"answered_by": answered_by, "attempts": attempts, "failures": failures}))
"""


@pytest.mark.parametrize("mode", ["sync", "async", "stream", "hedged"])
def test_the_first_call_of_a_process_is_not_blamed_for_litellm_first_call_costs(mode: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(FIRST_CALL), mode], capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])

    assert result["answered_by"] == "small", result
    assert ["small", "failure", "timeout"] not in result["attempts"], result
    assert result["failures"]["small"] == 0, result


FIRST_CALL_AFTER_WARM_UP = """
    import asyncio, json, sys
    import llm_resilience
    from llm_resilience.testing import FakeProvider

    mode = sys.argv[1]
    with FakeProvider() as provider:
        engine = llm_resilience.Resilience.from_dict({
            "models": {"big": {"litellm_params": {
                "model": "openai/gpt-4o", "api_base": provider.base_url, "api_key": "sk-test"}}},
            "routes": {"chat": {"chain": ["big"]}},
        })
        engine.warm_up()
        messages = [{"role": "user", "content": "hi"}]
        before = set(sys.modules)

        async def first_async():
            if mode == "async stream":
                return "".join([c.choices[0].delta.content or "" async for c in
                                await engine.acompletion("chat", messages, stream=True)])
            return (await engine.acompletion("chat", messages)).choices[0].message.content

        if mode == "sync stream":
            text = "".join(c.choices[0].delta.content or "" for c in engine.completion("chat", messages, stream=True))
        elif mode == "sync":
            text = engine.completion("chat", messages).choices[0].message.content
        else:
            text = asyncio.run(first_async())
        imported = sorted(set(sys.modules) - before)
    print(json.dumps({"text": text, "imported": imported}))
"""


@pytest.mark.parametrize("mode", ["sync stream", "async stream", "sync", "async"])
def test_after_warm_up_the_first_call_of_each_kind_imports_nothing(mode: str) -> None:
    # What litellm and the layer put off until a first call (imports of modules, of litellm's
    # provider configurations, the stream driver, the chunk builder's cost lookups) is what
    # warm_up exists to pay at start-up: a first call that still imports is charged for it.
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(FIRST_CALL_AFTER_WARM_UP), mode],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])

    assert result["text"], result  # the call answered
    assert result["imported"] == [], result


EXIT_DURING_A_HEDGED_CALL = """
    import sys, threading
    import llm_resilience

    engine = llm_resilience.Resilience.from_dict({
        "models": {
            name: {"litellm_params": {"model": "openai/gpt-4o", "api_base": url, "api_key": "sk-test"}}
            for name, url in (("big", sys.argv[1]), ("small", sys.argv[2]))
        },
        "routes": {"chat": {"chain": ["big", "small"], "hedge": {"after": 0.1, "budget_ratio": 1.0}}},
        "prompt_classes": {"default": {"timeout_s": 300, "deadline_s": 600}},
    })
    caller = threading.Thread(target=engine.completion, args=("chat", [{"role": "user", "content": "hi"}]), daemon=True)
    caller.start()
    print("calling", flush=True)
    sys.stdin.readline()  # the parent saw both attempts arrive
    # the main thread ends here, a daemon thread still in a hedged call
"""


def test_a_process_whose_main_thread_ends_during_a_hedged_call_exits_without_waiting_for_it() -> None:
    from llm_resilience.testing import Behavior, FakeProvider

    with FakeProvider() as big, FakeProvider() as small:
        big.set(Behavior.slow(600))
        small.set(Behavior.slow(600))
        child = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(EXIT_DURING_A_HEDGED_CALL), big.base_url, small.base_url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert child.stdout is not None and child.stdout.readline().strip() == "calling"
            deadline = time.monotonic() + 120
            while not (big.request_count and small.request_count):  # both attempts in flight, on pool threads
                assert time.monotonic() < deadline and child.poll() is None, "the hedged call never started"
                time.sleep(0.05)
            assert child.stdin is not None
            child.stdin.write("exit\n")
            child.stdin.flush()
            # Python joins its pool threads at exit: without aborting the daemon caller's attempts the
            # process would wait for their 300 s timeout.
            child.wait(timeout=60)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        assert child.returncode == 0, child.stderr.read() if child.stderr else ""
