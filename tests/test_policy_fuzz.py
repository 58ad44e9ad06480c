"""Fuzzing the policy loader with hypothesis: generated and mutated policies, as YAML text and as dicts.

Two properties, for every input:

1. It loads, or it raises :class:`PolicyError` whose every problem starts with the source (and, when
   the input parsed as YAML, a line): never another exception.
2. A policy that loads can serve calls: for every route and prompt class, the sans-I/O planner (with the
   engine's own fitter and validators) launches a first attempt for a short prompt, with a finite
   timeout that the drivers' timers accept. "Validates, then fails every call" would show up here.

The default profile is deterministic (derandomized, 60 examples per test: seconds) so CI is reproducible;
``HYPOTHESIS_PROFILE=fuzz`` runs many more random examples (the command is in the README).
"""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm_resilience import Policy, PolicyError
from llm_resilience._breakers import BreakerRegistry
from llm_resilience._hooks import HookSet
from llm_resilience._latency import LatencyStats
from llm_resilience._planner import CallRequest, Launch, Planner
from llm_resilience._policy import MAX_SECONDS
from llm_resilience._truncation import TokenFitter
from llm_resilience._validators import ResponseValidator

settings.register_profile(
    "ci", max_examples=60, derandomize=True, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)  # fmt: skip
settings.register_profile("fuzz", max_examples=20_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = (ROOT / "policies" / "example.yaml").read_text(encoding="utf-8")
SMALL = """\
models:
  big:   {litellm_params: {model: openai/gpt-4o, api_base: "http://127.0.0.1:9/v1", api_key: sk-test}}
  small: {litellm_params: {model: openai/gpt-4o-mini, api_base: "http://127.0.0.1:9/v1"}, context_window: 4000}
routes:
  chat:
    chain: [big, small]
    classes: {summarize: {chain: [small]}}
    hedge: {after: p95}
    retries: {max_retries: 1}
prompt_classes:
  default:   {timeout_s: 0.3, deadline_s: 2, soft_timeout: p95}
  summarize: {timeout_s: 1.0, deadline_s: 3, first_token_timeout_s: 0.5, match: [{last_user_regex: summar}]}
breakers:
  default: {fail_max: 3, reset_timeout_s: 30}
  big: {count: [timeout, empty]}
"""
BASES = [SMALL, EXAMPLE]
SOURCE = "fuzz.yaml"
MESSAGES = [{"role": "user", "content": "hi"}]

YAML_BITS = [
    ":", " ", "\n", "\n  ", "- ", "[", "]", "{", "}", ",", "&a ", "*a", "!!str ", "!!python/name:os.system ",
    "<<: ", "? ", "|", ">", "'", '"', "#", "%", "@", "`", "\t", "\x00", "\x07", "\u2028", "\ufeff", "~", "on",
    "yes", "1e10", ".inf", ".nan", "-1", "0", "p500", "sk-proj-Zx9Qw8Er7Ty6Ui5Op4As3Df", "timeout_s", "chain",
    "big", "default", "os.environ/", "é",
]  # fmt: skip
WORDS = [
    "p95", "p0", "p100", "p500", "p95.5", "big", "small", "ghost", "default", "summarize", "raise", "return_best",
    "drop_oldest", "off", "flag", "fall_back", "timeout", "empty", "os.environ/", "os.environ/FUZZ_UNSET",
    "openai/gpt-4o", "sk-proj-Zx9Qw8Er7Ty6Ui5Op4As3Df",
]  # fmt: skip
LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**12), max_value=10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(WORDS),
)
VALUES = st.recursive(
    LEAVES,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
KEYS = st.one_of(
    st.sampled_from(["timeout_s", "deadline_s", "chain", "classes", "hedge", "after", "count", "fail_max", "match",
                     "validators", "litellm_params", "model", "context_window", "max_output_tokens", "soft_timeout",
                     "first_token_timeout_s", "percentile", "retries", "truncation", "on", "default", "big"]),
    st.text(max_size=8),
)  # fmt: skip


def check_problems(error: PolicyError, parsed_as_yaml: bool) -> None:
    assert error.problems
    for problem in error.problems:
        assert problem.startswith(SOURCE), problem
        if parsed_as_yaml:
            rest = problem[len(SOURCE) :]
            assert rest.startswith(":") or rest.startswith(": "), problem
        assert "Traceback" not in problem


def check_serves_calls(policy: Policy) -> None:
    planner = Planner(
        policy=policy, breakers=BreakerRegistry(policy.breaker_settings), hooks=HookSet(), fitter=TokenFitter(),
        validator=ResponseValidator(policy), latency=LatencyStats(),
    )  # fmt: skip
    for route in [*policy.document.routes, *policy.models, "openai/fuzz-adhoc"]:
        for prompt_class in policy.classes:
            call = planner.start(CallRequest(model=route, messages=MESSAGES, kwargs={}, prompt_class=prompt_class), 0.0)
            action = call.next_action(0.0)
            skipped_for_env = all(r.reason == "missing_api_key" for r in call.records) and call.records
            if skipped_for_env:  # os.environ/VAR unset: the deployment's gap, not the policy's values
                continue
            assert isinstance(action, Launch), (
                route,
                prompt_class,
                action,
                [(r.model, r.reason) for r in call.records],
            )
            timeout = action.attempt.kwargs["timeout"]
            assert math.isfinite(timeout) and 0 < timeout <= MAX_SECONDS, timeout
            assert timeout <= threading.TIMEOUT_MAX
            first_token = action.attempt.first_token_timeout_s
            assert first_token is None or 0 < first_token <= timeout
            call.on_cancelled(action.attempt, 0.01)


def load_yaml(text: str) -> None:
    try:
        policy = Policy.from_yaml(text, source=SOURCE)
    except PolicyError as e:
        check_problems(e, parsed_as_yaml=True)
    else:
        check_serves_calls(policy)


@given(
    base=st.sampled_from(BASES),
    edits=st.lists(
        st.tuples(
            st.floats(min_value=0, max_value=1),
            st.sampled_from(["insert", "delete", "replace", "duplicate_line"]),
            st.lists(st.sampled_from(YAML_BITS), min_size=1, max_size=3).map("".join),
        ),
        min_size=1,
        max_size=4,
    ),
)
def test_mutated_yaml_loads_or_is_a_located_policy_error(base: str, edits: list[tuple[float, str, str]]) -> None:
    text = base
    for where, op, bit in edits:
        i = int(where * len(text))
        if op == "insert":
            text = text[:i] + bit + text[i:]
        elif op == "delete":
            text = text[:i] + text[i + len(bit) :]
        elif op == "replace":
            text = text[:i] + bit + text[i + len(bit) :]
        else:
            lines = text.splitlines(keepends=True)
            j = int(where * (len(lines) - 1))
            text = "".join([*lines[: j + 1], lines[j], *lines[j + 1 :]])
    load_yaml(text)


@given(st.text(max_size=200))
def test_arbitrary_text_loads_or_is_a_located_policy_error(text: str) -> None:
    load_yaml(text)


def paths(data: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(data, dict):
        for key, value in data.items():
            out += paths(value, (*prefix, key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            out += paths(value, (*prefix, i))
    return out


@given(data=st.data(), base=st.sampled_from(BASES))
def test_mutated_dicts_load_or_are_a_located_policy_error(data: st.DataObject, base: str) -> None:
    import yaml

    policy = yaml.safe_load(base)
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        path = data.draw(st.sampled_from(paths(policy)))
        parent: Any = policy
        for part in path[:-1]:
            parent = parent[part]
        op = data.draw(st.sampled_from(["replace", "delete", "add"]))
        if not path:
            policy = data.draw(VALUES) if op == "replace" else policy
        elif op == "replace":
            parent[path[-1]] = data.draw(VALUES)
        elif op == "delete":
            del parent[path[-1]]
        elif isinstance(parent[path[-1]], dict):
            parent[path[-1]][data.draw(KEYS)] = data.draw(VALUES)
        if not isinstance(policy, dict):
            break
    try:
        loaded = Policy.from_dict(policy, source=SOURCE)
    except PolicyError as e:
        check_problems(e, parsed_as_yaml=False)
    else:
        check_serves_calls(loaded)
