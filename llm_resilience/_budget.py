"""Budgets for extra requests: hedges and retries may only add a share of recent traffic.

A retry storm is how a client turns a provider's bad minute into an outage: every
failing request is sent two or three times, exactly when the provider can least take
it. Envoy's answer is a *retry budget*: retries may not exceed a percentage of recent
requests (plus a small floor, so a quiet service can still retry at all).
:class:`RatioBudget` is that rule over a sliding time window::

    extra requests in the window + 1  <=  ratio x requests in the window + min_per_s x window_s

Hedges use the same rule per route (``hedge.budget_ratio``, no floor), retries per
model (``retries.budget_ratio`` and ``retries.min_per_s``). The window is made of
``buckets`` fixed slots, so memory and time per call are constant.
"""

from __future__ import annotations

import threading

DEFAULT_WINDOW_S = 10.0


class RatioBudget:
    """Counts requests and the extra requests spent on them over a sliding window.

    Thread-safe; every method takes ``now`` (monotonic seconds) so that decisions are
    reproducible with a fake clock::

        budget = RatioBudget()
        budget.record_request(now)
        if budget.try_spend(now, ratio=0.1):
            ...  # send the hedge
    """

    def __init__(self, window_s: float = DEFAULT_WINDOW_S, buckets: int = 10) -> None:
        if window_s <= 0 or buckets < 1:
            raise ValueError("window_s must be > 0 and buckets >= 1")
        self.window_s = window_s
        self._width = window_s / buckets
        self._n = buckets
        # Per slot: [epoch, requests, spent]; a slot whose epoch is stale counts as empty.
        self._slots: list[list[float]] = [[-1.0, 0.0, 0.0] for _ in range(buckets)]
        self._lock = threading.Lock()

    def _slot(self, now: float) -> list[float]:
        epoch = float(int(now // self._width))
        slot = self._slots[int(epoch) % self._n]
        if slot[0] != epoch:
            slot[0], slot[1], slot[2] = epoch, 0.0, 0.0
        return slot

    def _totals(self, now: float) -> tuple[float, float]:
        oldest = int(now // self._width) - self._n
        requests = spent = 0.0
        for epoch, r, s in self._slots:
            if epoch > oldest:
                requests += r
                spent += s
        return requests, spent

    def record_request(self, now: float) -> None:
        """One request that could be hedged or retried was sent."""
        with self._lock:
            self._slot(now)[1] += 1

    def try_spend(self, now: float, ratio: float, min_per_s: float = 0.0) -> bool:
        """Take one extra request from the budget; ``False`` (and nothing taken) if over it."""
        with self._lock:
            requests, spent = self._totals(now)
            if spent + 1 > ratio * requests + min_per_s * self.window_s:
                return False
            self._slot(now)[2] += 1
            return True

    def refund(self, now: float) -> None:
        """Give back an extra request that was taken but never sent."""
        with self._lock:
            slot = self._slot(now)
            slot[2] = max(0.0, slot[2] - 1)

    def usage(self, now: float) -> tuple[int, int]:
        """(requests, extra requests) in the window."""
        with self._lock:
            requests, spent = self._totals(now)
        return int(requests), int(spent)


class Budgets:
    """The budgets of one engine: hedges per route, retries per model. Created on first use."""

    def __init__(self, window_s: float = DEFAULT_WINDOW_S) -> None:
        self.window_s = window_s
        self._hedges: dict[str, RatioBudget] = {}
        self._retries: dict[str, RatioBudget] = {}
        self._lock = threading.Lock()

    def _get(self, table: dict[str, RatioBudget], key: str) -> RatioBudget:
        budget = table.get(key)
        if budget is None:
            with self._lock:
                budget = table.setdefault(key, RatioBudget(self.window_s))
        return budget

    def hedges(self, route: str) -> RatioBudget:
        """Hedge budget of a route: requests are calls on the route."""
        return self._get(self._hedges, route)

    def retries(self, model: str) -> RatioBudget:
        """Retry budget of a model: requests are first attempts sent to the model."""
        return self._get(self._retries, model)
