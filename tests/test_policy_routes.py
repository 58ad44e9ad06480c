"""Which route serves a call, with its per-class overrides applied, and each model's breaker settings.

README "Policy reference": ``routes.NAME.classes.CLASS`` overrides the route's chain, validators,
on_all_invalid, hedge, retries and streaming for that class; ``breakers.MODEL`` overrides
``breakers.default`` field by field; a model name or a litellm model string the policy does not
list gets a one-model route with the defaults. Mutation testing found these unpinned without a server.
"""

from __future__ import annotations

from typing import Any

import pytest

from llm_resilience import Policy
from llm_resilience._policy import BreakerSettings, ResetBackoff, TruncationConfig

pytestmark = pytest.mark.sans_io  # no server: `make mutate` runs these for every mutant

MODELS = {
    name: {"litellm_params": {"model": f"openai/{name}-model", "api_base": "http://127.0.0.1:9/v1"}}
    for name in ("a", "b", "c")
}
CLASSES = {"default": {"timeout_s": 1.0, "deadline_s": 3.0}, "code": {"timeout_s": 5.0, "deadline_s": 10.0}}


def policy(route: dict[str, Any], breakers: dict[str, Any] | None = None) -> Policy:
    return Policy.from_dict(
        {
            "models": MODELS,
            "routes": {"chat": route},
            "prompt_classes": CLASSES,
            "breakers": breakers or {"default": {"fail_max": 3}},
        }
    )


OVERRIDDEN = {
    "chain": ["a", "b"],
    "validators": {"empty": "flag", "invalid_json": "fall_back"},
    "truncation": {"strategy": "off"},
    "classes": {
        "code": {
            "chain": ["c", "a"],
            "validators": {"empty": "off"},
            "on_all_invalid": "return_best",
            "hedge": {"after": 0.5},
            "retries": {"max_retries": 1},
            "streaming": {"on_interrupt": "raise"},
        }
    },
}


def test_a_class_override_replaces_what_it_sets_and_merges_validators() -> None:
    route = policy(OVERRIDDEN).route_for("chat", "code")

    assert [m.name for m in route.chain] == ["c", "a"]
    assert route.validators == {"empty": "off", "invalid_json": "fall_back"}
    assert route.on_all_invalid == "return_best"
    assert route.hedge is not None and route.hedge.after == 0.5
    assert route.retries is not None and route.retries.max_retries == 1
    assert route.on_interrupt == "raise"  # raise stays available per class
    assert route.truncation.strategy == "off"  # the route's: not overridable per class


def test_other_classes_get_the_route_as_written() -> None:
    route = policy(OVERRIDDEN).route_for("chat", "default")

    assert route.name == "chat"
    assert [m.name for m in route.chain] == ["a", "b"]
    assert route.validators == {"empty": "flag", "invalid_json": "fall_back"}
    assert (route.on_all_invalid, route.hedge, route.retries, route.on_interrupt) == ("raise", None, None, "continue")


def test_an_override_that_sets_only_some_fields_keeps_the_routes_others() -> None:
    route = policy(
        {"chain": ["a", "b"], "on_all_invalid": "return_best", "hedge": {"after": 0.2}, "retries": {"max_retries": 2},
         "streaming": {"on_interrupt": "continue"}, "classes": {"code": {"chain": ["b"]}}}
    ).route_for("chat", "code")  # fmt: skip

    assert [m.name for m in route.chain] == ["b"]
    assert route.on_all_invalid == "return_best"
    assert route.hedge is not None and route.hedge.after == 0.2
    assert route.retries is not None and route.retries.max_retries == 2
    assert route.on_interrupt == "continue"


def test_a_routes_resolution_is_kept_per_class() -> None:
    pol = policy(OVERRIDDEN)

    assert pol.route_for("chat", "code") is pol.route_for("chat", "code")
    assert pol.route_for("chat", "code") is not pol.route_for("chat", "default")


def test_a_model_name_or_its_litellm_string_is_a_one_model_route_with_the_defaults() -> None:
    pol = policy(OVERRIDDEN)

    by_name = pol.route_for("b", "default")
    by_litellm = pol.route_for("openai/b-model", "default")

    assert [m.name for m in by_name.chain] == [m.name for m in by_litellm.chain] == ["b"]
    assert not by_name.chain[0].adhoc
    assert (by_name.name, by_litellm.name) == ("b", "openai/b-model")
    assert (by_name.validators, by_name.on_all_invalid, by_name.hedge, by_name.retries) == ({}, "raise", None, None)
    assert by_name.truncation == TruncationConfig()


def test_any_other_litellm_model_string_is_an_ad_hoc_route() -> None:
    route = policy(OVERRIDDEN).route_for("anthropic/claude-x", "code")

    (spec,) = route.chain
    assert (spec.name, spec.adhoc, dict(spec.litellm_params)) == (
        "anthropic/claude-x",
        True,
        {"model": "anthropic/claude-x"},
    )
    assert (route.name, route.on_all_invalid) == ("anthropic/claude-x", "raise")


def test_a_models_breaker_overrides_the_default_field_by_field() -> None:
    pol = policy(
        {"chain": ["a", "b"]},
        {
            "default": {"fail_max": 3, "reset_timeout_s": 20, "success_threshold": 2, "suspect_admit": 4,
                        "reset_backoff": {"factor": 2.0, "max_s": 60}},
            "b": {"fail_max": 7, "success_threshold": 3, "suspect_admit": 1,
                  "reset_backoff": {"factor": 3.0, "max_s": 90}, "panic": "fail_fast", "count": ["timeout"]},
        },
    )  # fmt: skip

    a, b = pol.breaker_settings("a"), pol.breaker_settings("b")

    assert (a.fail_max, a.reset_timeout_s, a.success_threshold, a.suspect_admit) == (3, 20.0, 2, 4)
    assert a.reset_backoff == ResetBackoff(factor=2.0, max_s=60)
    assert (b.fail_max, b.reset_timeout_s, b.success_threshold, b.suspect_admit) == (7, 20.0, 3, 1)
    assert b.reset_backoff == ResetBackoff(factor=3.0, max_s=90)
    assert (b.panic, b.count) == ("fail_fast", frozenset({"timeout"}))
    assert a.panic == BreakerSettings().panic
