"""How a call opens: its clock, prompt class, route and budgets, and what hooks are told (no server).

README "Prompt classes" and "How it decides": a caller's ``prompt_class`` must be defined (the error
lists the defined ones), else the first rule whose every condition holds decides; a class may
override the route's chain; streams are never hedged, so they take no share of the hedge budget.
Hooks (tracing, metrics, review log) keep per-call state in ``call.hook_data`` and hear every end.
"""

from __future__ import annotations

import time
from typing import Any

import litellm
import pytest
from test_planner_streams import Ended
from test_under_load_planner import T0, launch, make_planner, start

from llm_resilience import UnknownPromptClass
from llm_resilience import _outcomes as k
from llm_resilience._breakers import BreakerRegistry, ProbeTicket
from llm_resilience._hooks import HookSet
from llm_resilience._planner import CallRequest, Done, Fail, Planner
from llm_resilience._policy import Policy

pytestmark = pytest.mark.sans_io  # no server: `make mutate` runs these for every mutant

lx = litellm.exceptions
MESSAGES = [{"role": "user", "content": "hello"}]


def classes_planner() -> Planner:
    pol = Policy.from_dict(
        {
            "models": {
                name: {"litellm_params": {"model": f"openai/{name}", "api_base": "http://127.0.0.1:9/v1"}}
                for name in ("a", "b")
            },
            "routes": {"chat": {"chain": ["a", "b"], "classes": {"batch": {"chain": ["b"]}}}},
            "prompt_classes": {
                "default": {"timeout_s": 1.0, "deadline_s": 3.0},
                "interactive": {"timeout_s": 1.0, "deadline_s": 3.0, "match": [{"metadata": {"tier": "gold"}}]},
                "batch": {"timeout_s": 5.0, "deadline_s": 9.0, "match": [{"metadata": {"job": "nightly"}}]},
            },
        }
    )
    return Planner(policy=pol, breakers=BreakerRegistry(pol.breaker_settings), hooks=HookSet())


def test_a_call_started_without_a_time_runs_on_the_monotonic_clock() -> None:
    before = time.monotonic()
    call = make_planner().start(CallRequest(model="chat", messages=MESSAGES, kwargs={}))
    after = time.monotonic()

    assert before <= call.started_at <= after
    assert before + 3.0 <= call.deadline_at <= after + 3.0


def test_an_unknown_prompt_class_names_the_classes_defined() -> None:
    p = classes_planner()
    with pytest.raises(UnknownPromptClass) as raised:
        p.start(CallRequest(model="chat", messages=MESSAGES, kwargs={}, prompt_class="nightly"), T0)

    assert str(raised.value).endswith("(defined: default, interactive, batch)")


def test_a_rule_that_does_not_match_lets_the_next_rule_decide() -> None:
    p = classes_planner()
    call = p.start(CallRequest(model="chat", messages=MESSAGES, kwargs={"metadata": {"job": "nightly"}}), T0)

    assert call.prompt_class == "batch"


def test_a_class_that_overrides_the_chain_is_routed_on_it() -> None:
    p = classes_planner()
    call = p.start(CallRequest(model="chat", messages=MESSAGES, kwargs={"metadata": {"job": "nightly"}}), T0)

    assert launch(call, T0).spec.name == "b"


def test_streams_take_no_share_of_the_hedge_budget() -> None:
    p = make_planner(hedge={"after": 0.1, "budget_ratio": 1.0})

    p.start(CallRequest(model="chat", messages=MESSAGES, kwargs={}, stream=True), T0)
    assert p.budgets.hedges("chat").usage(T0) == (0, 0)
    start(p)
    assert p.budgets.hedges("chat").usage(T0) == (1, 0)


class KeepsState:
    """A hook that keeps per-call state where hooks do: ``call.hook_data``."""

    def __init__(self) -> None:
        self.ended: list[Any] = []

    def call_started(self, call: Any) -> None:
        call.hook_data[self] = "started"

    def call_ended(self, call: Any, response: Any, error: BaseException | None) -> None:
        self.ended.append(call.hook_data.pop(self))


def test_hooks_keep_per_call_state_in_hook_data_and_hear_the_answer() -> None:
    keeps, ended = KeepsState(), Ended()
    p = make_planner()
    p.hooks = HookSet([keeps, ended])
    call = start(p)
    answer = litellm.ModelResponse()
    call.on_response(launch(call, T0), answer, T0 + 0.1)

    assert call.next_action(T0 + 0.1) == Done(answer)
    assert keeps.ended == ["started"]
    assert ended.calls == [(answer, None)] and ended.of == [call]


def test_no_suspect_overflow_when_another_model_was_skipped_for_another_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("LLM_RESILIENCE_TEST_UNSET_KEY", raising=False)
    pol = Policy.from_dict(
        {
            "models": {
                "a": {"litellm_params": {"model": "openai/a", "api_base": "http://127.0.0.1:9/v1", "api_key": "k"}},
                "b": {
                    "litellm_params": {
                        "model": "openai/b",
                        "api_base": "http://127.0.0.1:9/v1",
                        "api_key": "os.environ/LLM_RESILIENCE_TEST_UNSET_KEY",
                    }
                },
            },
            "routes": {"chat": {"chain": ["a", "b"]}},
            "breakers": {"default": {"fail_max": 5, "suspect_admit": 1}},
        }
    )
    p = Planner(policy=pol, breakers=BreakerRegistry(pol.breaker_settings), hooks=HookSet())
    a = p.breakers.get("a")
    a.record(ProbeTicket(probe=False), k.SERVER_ERROR)
    a.mark_suspect()
    assert a.take_suspect_slot()  # a's one suspect slot is taken by a request in flight

    action = start(p).next_action(T0)

    assert isinstance(action, Fail)  # b cannot be sent at all: a past its gate would not be a last resort
