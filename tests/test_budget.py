"""The ratio budget that caps hedges and retries, with a fake clock (no I/O)."""

from __future__ import annotations

import threading

import pytest

from llm_resilience._budget import DEFAULT_WINDOW_S, Budgets, RatioBudget

pytestmark = pytest.mark.sans_io  # no server: `make mutate` runs these for every mutant


def test_spending_is_allowed_up_to_the_ratio_of_recent_requests() -> None:
    budget = RatioBudget(window_s=10.0, buckets=10)
    for _ in range(10):
        budget.record_request(1.0)

    assert budget.try_spend(1.0, ratio=0.2)
    assert budget.try_spend(1.0, ratio=0.2)
    assert not budget.try_spend(1.0, ratio=0.2)  # 3 > 0.2 x 10
    assert budget.usage(1.0) == (10, 2)


def test_nothing_is_spent_without_requests_unless_a_floor_allows_it() -> None:
    budget = RatioBudget(window_s=10.0)

    assert not budget.try_spend(0.0, ratio=1.0)
    assert budget.try_spend(0.0, ratio=1.0, min_per_s=0.1)  # 0.1/s x 10 s = 1 always allowed
    assert not budget.try_spend(0.0, ratio=1.0, min_per_s=0.1)
    assert budget.usage(0.0) == (0, 1)


def test_the_exact_boundary_is_inclusive() -> None:
    budget = RatioBudget(window_s=10.0)
    for _ in range(4):
        budget.record_request(0.0)

    assert budget.try_spend(0.0, ratio=0.5)  # 1 <= 2
    assert budget.try_spend(0.0, ratio=0.5)  # 2 <= 2
    assert not budget.try_spend(0.0, ratio=0.5)  # 3 > 2


def test_a_refund_gives_one_back_and_never_goes_negative() -> None:
    budget = RatioBudget(window_s=10.0)
    budget.record_request(0.0)
    assert budget.try_spend(0.0, ratio=1.0)
    assert not budget.try_spend(0.0, ratio=1.0)

    budget.refund(0.0)
    assert budget.usage(0.0) == (1, 0)
    budget.refund(0.0)
    assert budget.usage(0.0) == (1, 0)
    assert budget.try_spend(0.0, ratio=1.0)


def test_old_traffic_leaves_the_window() -> None:
    budget = RatioBudget(window_s=10.0, buckets=10)
    for _ in range(10):
        budget.record_request(0.5)
    assert budget.try_spend(0.5, ratio=0.1)

    assert budget.usage(9.9) == (10, 1)  # the slot [0, 1) is still inside (9.9 - 10, 9.9]
    assert budget.usage(10.5) == (0, 0)  # slot 0 is now 10 slots old
    assert not budget.try_spend(10.5, ratio=0.1)


def test_a_reused_slot_starts_empty() -> None:
    budget = RatioBudget(window_s=1.0, buckets=2)
    budget.record_request(0.1)
    budget.record_request(1.1)  # slot 2 % 2 == slot 0, one window later

    assert budget.usage(1.1) == (1, 0)


def test_slot_width_is_window_over_buckets() -> None:
    budget = RatioBudget(window_s=10.0, buckets=5)  # 2 s slots
    budget.record_request(0.0)
    budget.record_request(1.9)

    assert budget.usage(9.9) == (2, 0)  # slot [0, 2) is 4 slots old: inside
    assert budget.usage(10.0) == (0, 0)  # 5 slots old: out


@pytest.mark.parametrize(("window_s", "buckets"), [(0.0, 10), (-1.0, 10), (10.0, 0)])
def test_invalid_sizes_are_rejected(window_s: float, buckets: int) -> None:
    with pytest.raises(ValueError, match=r"^window_s must be > 0 and buckets >= 1$"):
        RatioBudget(window_s=window_s, buckets=buckets)


def test_budgets_are_per_route_and_per_model_and_created_once() -> None:
    budgets = Budgets(window_s=5.0)

    assert budgets.hedges("chat") is budgets.hedges("chat")
    assert budgets.hedges("chat") is not budgets.hedges("code")
    assert budgets.retries("chat") is not budgets.hedges("chat")
    assert budgets.retries("big").window_s == 5.0
    assert Budgets().hedges("x").window_s == DEFAULT_WINDOW_S == 10.0


def test_concurrent_spenders_never_exceed_the_budget() -> None:
    budget = RatioBudget(window_s=10.0)
    for _ in range(100):
        budget.record_request(0.0)
    granted: list[bool] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def spend() -> None:
        barrier.wait()
        for _ in range(20):
            ok = budget.try_spend(0.0, ratio=0.3)
            with lock:
                granted.append(ok)

    threads = [threading.Thread(target=spend) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)

    assert granted.count(True) == 30
    assert budget.usage(0.0) == (100, 30)


def test_each_model_has_its_own_retry_budget() -> None:
    budgets = Budgets()

    assert budgets.retries("a") is not budgets.retries("b")
    assert budgets.retries("a") is budgets.retries("a")


def test_one_bucket_is_a_valid_window() -> None:
    budget = RatioBudget(window_s=1.0, buckets=1)
    budget.record_request(0.5)

    assert budget.try_spend(0.5, ratio=1.0)
    assert budget.usage(1.0) == (0, 0)  # the next second is a new window


def test_a_refund_gives_back_exactly_one() -> None:
    budget = RatioBudget(window_s=10.0)
    for _ in range(2):
        budget.record_request(0.0)
        assert budget.try_spend(0.0, ratio=1.0)

    budget.refund(0.0)

    assert budget.usage(0.0) == (2, 1)
