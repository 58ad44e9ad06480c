"""When the planner hedges, decided from the policy and the latency it learned (no server, no sleeps).

The HTTP tests in ``test_hedging.py`` show hedges racing real providers; these pin the arithmetic
of the threshold itself, which mutation testing found unpinned (README "Hedging").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from test_under_load_planner import T0, Scripted, launch, make_planner, start

from llm_resilience._planner import Attempt, Planner

SOFT = {"percentile": 99, "floor_s": 0.05, "min_samples": 10, "warmup_s": 0.5}


def first_attempt(
    hedge: dict[str, Any], *, soft: dict[str, Any] | None = None, learned: Sequence[float] = ()
) -> Attempt:
    p: Planner = make_planner(Scripted(), hedge={"budget_ratio": 1.0, **hedge}, soft=soft)
    for latency in learned:
        p.latency.observe("a", "default", latency)
    return launch(start(p), T0)


def test_a_percentile_threshold_is_the_models_learned_latency_in_this_class() -> None:
    attempt = first_attempt({"after": "p95"}, soft=SOFT, learned=[0.2] * 12)

    assert attempt.hedge_at == pytest.approx(T0 + 0.2)
    assert attempt.record.extra["hedge_after_s"] == pytest.approx(0.2)


def test_another_models_or_classes_latency_does_not_set_the_threshold() -> None:
    p = make_planner(Scripted(), hedge={"after": "p95", "budget_ratio": 1.0}, soft=SOFT)
    for _ in range(12):
        p.latency.observe("b", "default", 0.2)  # another model
        p.latency.observe("a", "summarize", 0.2)  # another class
    attempt = launch(start(p), T0)

    assert attempt.hedge_at == pytest.approx(T0 + 0.5)  # no history of its own: the warm-up bound


def test_too_few_samples_mean_the_warm_up_bound_not_a_guess() -> None:
    attempt = first_attempt({"after": "p95"}, soft=SOFT, learned=[0.2] * 9)  # min_samples is 10

    assert attempt.hedge_at == pytest.approx(T0 + 0.5)


def test_without_a_soft_timeout_twenty_samples_are_needed_and_there_is_no_warm_up_hedge() -> None:
    assert first_attempt({"after": "p95"}, learned=[0.2] * 19).hedge_at is None
    assert first_attempt({"after": "p95"}, learned=[0.2] * 20).hedge_at == pytest.approx(T0 + 0.2)


def test_the_soft_timeouts_floor_bounds_a_learned_threshold_from_below() -> None:
    attempt = first_attempt({"after": "p95"}, soft=SOFT, learned=[0.01] * 12)

    assert attempt.hedge_at == pytest.approx(T0 + 0.05)


def test_the_percentile_asked_for_is_the_one_used() -> None:
    learned = [0.1] * 10 + [0.9] * 10  # p25 = 0.1, p95 = 0.9 (the class timeout is 1 s)

    low = first_attempt({"after": "p25"}, soft=SOFT, learned=learned)
    high = first_attempt({"after": "p95"}, soft=SOFT, learned=learned)

    assert low.hedge_at == pytest.approx(T0 + 0.1)
    assert high.hedge_at == pytest.approx(T0 + 0.9)


def test_a_fixed_threshold_is_used_as_given() -> None:
    assert first_attempt({"after": 0.3}).hedge_at == pytest.approx(T0 + 0.3)


def test_a_threshold_at_or_past_the_attempts_timeout_means_no_hedge() -> None:
    assert first_attempt({"after": 1.0}).hedge_at is None  # the class timeout is 1 s
