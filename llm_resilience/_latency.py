"""Recent latency per (model, prompt class): what "slow" means, learned from traffic.

:class:`LatencyStats` keeps, for every (model, prompt class), the last ``capacity``
latency samples that are younger than ``max_age_s``: a ring buffer plus a sorted copy
of the values, so memory is bounded (``capacity`` x ``max_keys`` samples) whatever the
traffic, ``observe`` costs a bisect, and ``percentile`` an index lookup.

Two kinds of samples:

* **complete** (``observe``): the attempt answered; its latency is known. For streams,
  the time to the first chunk is what should be observed (the planner does this when
  ``AttemptRecord.time_to_first_chunk_s`` is set).
* **censored** (``observe_censored``): the attempt was cut off (timeout, soft timeout,
  or cancelled after a hedge started), so all we know is "at least this long". A
  censored sample counts in the *rank* of the percentile but never supplies a *value*:
  it is assumed to sit above every complete sample. Two consequences, both wanted:

  - cutting off the slow tail does not bias the percentile down. If timed-out or
    hedged-over attempts were dropped, p95 would be computed over the fastest 95 % of
    calls, i.e. become the true p90, then p85... a spiral of ever earlier soft timeouts
    and hedges;
  - when more than ``100 - q`` percent of recent calls were cut off (a latency spike),
    the percentile is the slowest *complete* sample: it rises to the top of what was
    really observed, but cut-off calls cannot ratchet it up by themselves. With a soft
    timeout of ``multiplier`` x p95, recording the cut-off point as a value would grow
    the bound by ``multiplier`` every time the window filled, until the ceiling, during
    exactly the spike it should detect; and a half-open probe would then be judged
    against the spike's own latency and close the breaker on a still-slow model.

  A slowdown that outlives ``max_age_s`` becomes the new normal: once fewer than
  ``min_samples`` complete samples remain in the window, :meth:`percentile` returns
  ``None`` and the planner falls back to the class's warm-up bound (its timeout by
  default), so a probe that answers within the class timeout is a success again.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections import deque
from collections.abc import Callable

_CENSORED = -1.0  # marks a censored sample in the ring; real latencies are >= 0

DEFAULT_CAPACITY = 256
DEFAULT_MAX_AGE_S = 600.0
DEFAULT_MAX_KEYS = 4096


class _Window:
    __slots__ = ("censored", "ring", "values")

    def __init__(self) -> None:
        self.ring: deque[tuple[float, float]] = deque()  # (observed_at, latency or _CENSORED)
        self.values: list[float] = []  # complete samples, sorted
        self.censored = 0

    def add(self, at: float, value: float, capacity: int) -> None:
        if len(self.ring) >= capacity:
            self._drop_oldest()
        self.ring.append((at, value))
        if value == _CENSORED:
            self.censored += 1
        else:
            bisect.insort(self.values, value)

    def expire(self, older_than: float) -> None:
        ring = self.ring
        while ring and ring[0][0] < older_than:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        _, value = self.ring.popleft()
        if value == _CENSORED:
            self.censored -= 1
        else:
            del self.values[bisect.bisect_left(self.values, value)]


class LatencyStats:
    """Sliding-window latency per (model, prompt class); thread-safe.

    Implements the planner's ``LatencyView``::

        stats = LatencyStats()
        stats.observe("gpt-4o", "default", 0.61)
        stats.percentile("gpt-4o", "default", 95, min_samples=20)   # None until 20 samples

    ``capacity`` samples per key, none older than ``max_age_s``; at most ``max_keys``
    keys (the least recently created is forgotten first, so ad-hoc model strings cannot
    grow memory without bound).
    """

    def __init__(
        self,
        capacity: int = DEFAULT_CAPACITY,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        *,
        max_keys: int = DEFAULT_MAX_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if capacity < 1 or max_age_s <= 0 or max_keys < 1:
            raise ValueError("capacity and max_keys must be >= 1 and max_age_s > 0")
        self.capacity = capacity
        self.max_age_s = max_age_s
        self.max_keys = max_keys
        self._clock = clock
        self._windows: dict[tuple[str, str], _Window] = {}
        self._lock = threading.Lock()

    def _window(self, key: tuple[str, str]) -> _Window:
        window = self._windows.get(key)
        if window is None:
            if len(self._windows) >= self.max_keys:
                del self._windows[next(iter(self._windows))]
            window = self._windows[key] = _Window()
        return window

    def observe(self, model: str, prompt_class: str, latency_s: float) -> None:
        """Record a complete sample: the attempt answered after ``latency_s`` seconds."""
        now = self._clock()
        with self._lock:
            window = self._window((model, prompt_class))
            window.expire(now - self.max_age_s)
            window.add(now, max(0.0, latency_s), self.capacity)

    def observe_censored(self, model: str, prompt_class: str, at_least_s: float) -> None:
        """Record a censored sample: the attempt was cut off after ``at_least_s`` seconds.

        Only the fact that it was slower than the complete samples is kept (see the
        module docstring); ``at_least_s`` documents the call site.
        """
        now = self._clock()
        with self._lock:
            window = self._window((model, prompt_class))
            window.expire(now - self.max_age_s)
            window.add(now, _CENSORED, self.capacity)

    def forget(self, model: str) -> None:
        """Drop every window of ``model`` (a policy reload pointed the name at another backend)."""
        with self._lock:
            for key in [key for key in self._windows if key[0] == model]:
                del self._windows[key]

    def percentile(self, model: str, prompt_class: str, q: float, min_samples: int) -> float | None:
        """The ``q``-th percentile (0-100, nearest rank) of recent latency, in seconds.

        ``None`` while fewer than ``min_samples`` complete samples are in the window.
        """
        now = self._clock()
        with self._lock:
            window = self._windows.get((model, prompt_class))
            if window is None:
                return None
            window.expire(now - self.max_age_s)
            values = window.values
            if len(values) < max(1, min_samples):
                return None
            total = len(values) + window.censored
            rank = max(0, math.ceil(q / 100.0 * total) - 1)
            return values[min(rank, len(values) - 1)]

    def samples(self, model: str, prompt_class: str) -> tuple[int, int]:
        """(complete, censored) samples currently in the window, for diagnostics and tests."""
        now = self._clock()
        with self._lock:
            window = self._windows.get((model, prompt_class))
            if window is None:
                return (0, 0)
            window.expire(now - self.max_age_s)
            return (len(window.values), window.censored)
