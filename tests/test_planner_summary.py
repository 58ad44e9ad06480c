"""The call summary the caller finds on the response (``_hidden_params["llm_resilience"]``), without a server.

README tour: route, prompt class, the model that answered (policy name and litellm string), how many
attempts were fallbacks (hedge losers cancelled because another answered are not), whether the answer
is flagged, and every attempt. Attached next to litellm's own hidden params, never in their place.
"""

from __future__ import annotations

from typing import Any

import litellm
import pytest
from test_under_load_planner import T0, launch, make_planner, start

from llm_resilience._planner import Done, Fail

pytestmark = pytest.mark.sans_io  # no server: `make mutate` runs these for every mutant

lx = litellm.exceptions


def answer(call: Any, attempt: Any, response: Any, now: float) -> Any:
    call.on_response(attempt, response, now)
    action = call.next_action(now)
    assert isinstance(action, Done), action
    return action.response


def test_the_summary_names_route_class_and_the_model_that_answered() -> None:
    call = start(make_planner())
    first = launch(call, T0)
    call.on_error(first, lx.ServiceUnavailableError("overloaded", "openai", "a"), T0 + 0.1)
    second = launch(call, T0 + 0.1)

    summary = answer(call, second, litellm.ModelResponse(), T0 + 0.2)._hidden_params["llm_resilience"]

    assert (summary["route"], summary["prompt_class"]) == ("chat", "default")
    assert (summary["model"], summary["litellm_model"]) == ("b", "openai/b")
    assert summary["fallbacks"] == 1 and summary["flagged"] is False
    assert [a["model"] for a in summary["attempts"]] == ["a", "b"]


def test_a_hedge_loser_cancelled_because_the_other_answered_is_not_a_fallback() -> None:
    call = start(make_planner(hedge={"after": 0.1, "budget_ratio": 1.0}))
    first = launch(call, T0)
    launch(call, T0 + 0.1)

    summary = answer(call, first, litellm.ModelResponse(), T0 + 0.2)._hidden_params["llm_resilience"]

    assert [a["outcome"] for a in summary["attempts"]] == ["success", "cancelled"]
    assert summary["fallbacks"] == 0


def test_a_call_nothing_answered_names_no_model_and_is_not_flagged() -> None:
    call = start(make_planner(chain=("a",)))
    first = launch(call, T0)
    call.on_error(first, lx.ServiceUnavailableError("overloaded", "openai", "a"), T0 + 0.1)
    assert isinstance(call.next_action(T0 + 0.1), Fail)

    summary = call.summary()

    assert (summary["model"], summary["litellm_model"], summary["flagged"]) == (None, None, False)
    assert summary["fallbacks"] == 0  # its only model failed: there was nothing to fall back to


def test_the_summary_is_added_next_to_litellms_own_hidden_params() -> None:
    response = litellm.ModelResponse()
    response._hidden_params = {"custom_llm_provider": "openai", "response_cost": 0.001}
    call = start(make_planner())

    hidden = answer(call, launch(call, T0), response, T0 + 0.1)._hidden_params

    assert hidden["custom_llm_provider"] == "openai" and hidden["response_cost"] == 0.001
    assert hidden["llm_resilience"]["model"] == "a"


class Plain:
    """A response type without ``_hidden_params`` (a custom provider's, say)."""


class Sealed:
    """A response type that takes no new attributes."""

    __slots__ = ()


def test_a_response_without_hidden_params_gets_them_and_one_that_takes_none_is_returned_as_is() -> None:
    call = start(make_planner())
    plain = answer(call, launch(call, T0), Plain(), T0 + 0.1)
    assert plain._hidden_params["llm_resilience"]["model"] == "a"

    call = start(make_planner())
    sealed = Sealed()
    assert answer(call, launch(call, T0), sealed, T0 + 0.1) is sealed
