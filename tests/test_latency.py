"""Latency tracking and adaptive soft timeouts.

The window itself (``LatencyStats``) is tested with a fake clock; the soft timeout through real
HTTP against fake providers whose latency the test scripts.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import MESSAGES, Caller, EngineFactory, PolicyBuilder, hidden, outcomes

from llm_resilience import Resilience
from llm_resilience._latency import LatencyStats
from llm_resilience.testing import Behavior, FakeProvider


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- the window ----------------------------------------------------------------------------------


@pytest.mark.sans_io
def test_percentile_is_none_until_min_samples_then_nearest_rank() -> None:
    stats = LatencyStats()
    for i in range(1, 20):
        stats.observe("m", "c", i / 100)
    assert stats.percentile("m", "c", 95, min_samples=20) is None

    stats.observe("m", "c", 0.20)

    assert stats.percentile("m", "c", 95, min_samples=20) == 0.19  # rank ceil(0.95 * 20) = 19
    assert stats.percentile("m", "c", 50, min_samples=20) == 0.10
    assert stats.percentile("m", "c", 100, min_samples=20) == 0.20
    assert stats.percentile("other", "c", 95, min_samples=1) is None


@pytest.mark.sans_io
def test_keys_are_model_and_prompt_class() -> None:
    stats = LatencyStats()
    stats.observe("m", "summary", 0.1)
    stats.observe("m", "code", 5.0)

    assert stats.percentile("m", "summary", 99, min_samples=1) == 0.1
    assert stats.percentile("m", "code", 99, min_samples=1) == 5.0


@pytest.mark.sans_io
def test_forgetting_a_model_drops_its_windows_in_every_class_and_no_other() -> None:
    stats = LatencyStats()
    for model, klass in [("m", "summary"), ("m", "code"), ("other", "m"), ("other", "code")]:
        stats.observe(model, klass, 0.1)

    stats.forget("m")

    assert stats.samples("m", "summary") == stats.samples("m", "code") == (0, 0)
    assert stats.samples("other", "m") == stats.samples("other", "code") == (1, 0)


@pytest.mark.sans_io
def test_memory_is_bounded_by_capacity_whatever_the_traffic() -> None:
    stats = LatencyStats(capacity=64)
    for i in range(10_000):
        stats.observe("m", "c", i / 1000)

    assert stats.samples("m", "c") == (64, 0)
    assert stats.percentile("m", "c", 0.1, min_samples=1) == 9.936  # only the newest 64 remain


@pytest.mark.sans_io
def test_number_of_keys_is_bounded() -> None:
    stats = LatencyStats(max_keys=3)
    for model in ("a", "b", "c", "d"):
        stats.observe(model, "c", 0.1)

    assert stats.samples("a", "c") == (0, 0)  # the oldest key was forgotten
    assert stats.samples("d", "c") == (1, 0)


@pytest.mark.sans_io
def test_samples_older_than_max_age_expire() -> None:
    clock = FakeClock()
    stats = LatencyStats(max_age_s=60, clock=clock)
    for _ in range(20):
        stats.observe("m", "c", 0.5)
    clock.now += 30
    for _ in range(5):
        stats.observe("m", "c", 0.1)

    clock.now += 31  # the first 20 are now 61 s old

    assert stats.samples("m", "c") == (5, 0)
    assert stats.percentile("m", "c", 95, min_samples=20) is None


@pytest.mark.sans_io
def test_cut_off_calls_keep_their_rank_so_the_percentile_is_not_biased_down() -> None:
    # 100 calls with latencies 0.01 .. 1.00, but the slowest 10 were cut off (timed out or
    # cancelled after a hedge): p80 must still be 0.80. Dropping them would give 0.72.
    stats = LatencyStats()
    for i in range(1, 91):
        stats.observe("m", "c", i / 100)
    for _ in range(10):
        stats.observe_censored("m", "c", 0.9)

    assert stats.percentile("m", "c", 80, min_samples=20) == 0.80
    assert stats.samples("m", "c") == (90, 10)


@pytest.mark.sans_io
def test_cut_off_calls_never_ratchet_the_percentile_above_what_was_observed() -> None:
    # A spike: every call is cut off. The percentile stays at the slowest answer really seen,
    # so a soft timeout of multiplier x p95 cannot grow by itself during the spike.
    stats = LatencyStats()
    for _ in range(30):
        stats.observe("m", "c", 0.1)
    stats.observe("m", "c", 0.15)
    for _ in range(200):
        stats.observe_censored("m", "c", 0.3)

    assert stats.percentile("m", "c", 95, min_samples=20) == 0.15


@pytest.mark.sans_io
def test_min_samples_counts_answers_only() -> None:
    stats = LatencyStats()
    for _ in range(5):
        stats.observe("m", "c", 0.1)
    for _ in range(50):
        stats.observe_censored("m", "c", 1.0)

    assert stats.percentile("m", "c", 95, min_samples=10) is None


@pytest.mark.sans_io
def test_concurrent_observers_and_readers() -> None:
    stats = LatencyStats(capacity=128)
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            for i in range(3000):
                stats.observe("m", "c", (seed * 3000 + i) % 97 / 100)
                if i % 7 == 0:
                    stats.observe_censored("m", "c", 1.0)
                stats.percentile("m", "c", 95, min_samples=1)
        except BaseException as e:  # pragma: no cover - the assertion below reports it
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert errors == []
    complete, censored = stats.samples("m", "c")
    assert complete + censored == 128


@pytest.mark.sans_io
def test_invalid_sizes_are_rejected() -> None:
    message = r"^capacity and max_keys must be >= 1 and max_age_s > 0$"
    with pytest.raises(ValueError, match=message):
        LatencyStats(capacity=0)
    with pytest.raises(ValueError, match=message):
        LatencyStats(max_age_s=0)
    with pytest.raises(ValueError, match=message):
        LatencyStats(max_keys=0)


@pytest.mark.sans_io
def test_the_smallest_sizes_are_valid_one_sample_one_key_under_a_second() -> None:
    clock = FakeClock()
    stats = LatencyStats(capacity=1, max_age_s=0.5, max_keys=1, clock=clock)
    stats.observe("m", "c", 0.3)
    stats.observe("m", "c", 0.2)

    assert stats.samples("m", "c") == (1, 0)
    assert stats.percentile("m", "c", 95, min_samples=1) == 0.2
    clock.now += 0.6
    assert stats.samples("m", "c") == (0, 0)


@pytest.mark.sans_io
def test_a_sample_exactly_max_age_old_still_counts() -> None:
    clock = FakeClock()
    stats = LatencyStats(max_age_s=60, clock=clock)
    stats.observe("m", "c", 0.5)

    clock.now += 60  # "none older than max_age_s": this one is not older yet

    assert stats.samples("m", "c") == (1, 0)


@pytest.mark.sans_io
def test_nearest_rank_over_a_full_window_of_256_samples() -> None:
    stats = LatencyStats(capacity=256)
    for ms in range(256, 0, -1):
        stats.observe("m", "c", ms / 1000)

    assert stats.percentile("m", "c", 50, min_samples=1) == 0.128  # rank ceil(0.5 * 256) = 128
    assert stats.percentile("m", "c", 99, min_samples=1) == 0.254  # rank ceil(0.99 * 256) = 254


# -- soft timeouts through real HTTP --------------------------------------------------------------


def soft_policy(policy_dict: PolicyBuilder, soft: Any, *, timeout_s: float = 1.0, **kwargs: Any) -> dict[str, Any]:
    policy = policy_dict(["big", "small"], timeout_s=timeout_s, deadline_s=4.0, **kwargs)
    policy["prompt_classes"]["default"]["soft_timeout"] = soft
    return policy


def warm(engine: Resilience, provider: FakeProvider, calls: int, latency_s: float = 0.03) -> None:
    provider.set(Behavior.slow(latency_s))
    for _ in range(calls):
        assert hidden(engine.completion("chat", MESSAGES))["model"] == "big"


@pytest.fixture
def litellm_is_warm(small: FakeProvider) -> Iterator[None]:
    # litellm's first call in a process costs ~100 ms more; keep it out of the learned window.
    import litellm

    litellm.completion(
        model="openai/warmup", api_base=small.base_url, api_key="k", messages=MESSAGES, num_retries=0, max_retries=0
    )
    small.reset()
    yield


@pytest.mark.usefixtures("litellm_is_warm")
def test_soft_timeout_fires_at_the_learned_percentile_and_falls_back(
    call: Caller, make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider, small: FakeProvider
) -> None:
    engine = make_engine(soft_policy(policy_dict, {"percentile": 95, "min_samples": 20, "floor_s": 0.05}))
    warm(engine, big, 20)
    learned = engine.latency.percentile("big", "default", 95, 20)
    assert learned is not None and 0.03 <= learned < 0.3

    big.set(Behavior.slow(1.5))  # a spike, far beyond p95 but within nothing else
    started = time.monotonic()
    response = call(engine, "chat", MESSAGES)
    elapsed = time.monotonic() - started

    assert outcomes(response) == [("big", "failure", "soft_timeout"), ("small", "success", None)]
    attempt = hidden(response)["attempts"][0]
    assert attempt["timeout_s"] == pytest.approx(max(0.05, learned))
    assert elapsed < 1.0  # returned after the learned bound, not the provider's 1.5 s nor the 1 s class timeout
    assert engine.latency.samples("big", "default") == (20, 1)  # the cut-off call is a censored sample


def test_soft_timeout_multiplier_floor_and_ceiling(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider
) -> None:
    soft = {"min_samples": 3, "multiplier": 2.0, "floor_s": 0.05, "ceiling_s": 0.3}
    for value, expected in ((0.01, 0.05), (0.1, 0.2), (0.5, 0.3)):
        engine = make_engine(soft_policy(policy_dict, soft))
        for _ in range(3):
            engine.latency.observe("big", "default", value)

        response = engine.completion("chat", MESSAGES)

        assert hidden(response)["attempts"][0]["timeout_s"] == pytest.approx(expected)


def test_warm_up_uses_the_class_timeout_when_warmup_is_not_set(
    call: Caller, make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider, small: FakeProvider
) -> None:
    engine = make_engine(soft_policy(policy_dict, "p95", timeout_s=0.6))
    big.set(Behavior.slow(0.3, "big, slowly"))

    response = call(engine, "chat", MESSAGES)

    assert outcomes(response) == [("big", "success", None)]
    assert hidden(response)["attempts"][0]["timeout_s"] == 0.6
    assert small.request_count == 0
    assert engine.breaker_states()["big"] == "closed"


def test_explicit_warm_up_bound_applies_until_min_samples(
    call: Caller, make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider
) -> None:
    engine = make_engine(soft_policy(policy_dict, {"warmup_s": 0.15, "min_samples": 50}))
    big.set(Behavior.slow(0.5))

    response = call(engine, "chat", MESSAGES)

    assert outcomes(response) == [("big", "failure", "soft_timeout"), ("small", "success", None)]
    assert hidden(response)["attempts"][0]["timeout_s"] == 0.15


def test_the_last_model_is_not_cut_at_its_soft_timeout(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider
) -> None:
    policy = soft_policy(policy_dict, {"warmup_s": 0.1, "min_samples": 50}, timeout_s=1.0)
    policy["routes"]["chat"]["chain"] = ["big"]
    engine = make_engine(policy)
    big.set(Behavior.slow(0.3, "slow but the only one"))

    response = engine.completion("chat", MESSAGES)

    assert response.choices[0].message.content == "slow but the only one"
    assert hidden(response)["attempts"][0]["timeout_s"] == 1.0


def test_no_soft_timeout_configured_means_only_the_class_timeout(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider
) -> None:
    engine = make_engine(policy_dict(["big", "small"], timeout_s=0.8))
    for _ in range(25):
        engine.latency.observe("big", "default", 0.01)
    big.set(Behavior.slow(0.2))

    response = engine.completion("chat", MESSAGES)

    assert outcomes(response) == [("big", "success", None)]
    assert hidden(response)["attempts"][0]["timeout_s"] == 0.8


def test_every_answer_is_observed(make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider) -> None:
    engine = make_engine(policy_dict(["big", "small"]))
    big.set(Behavior.slow(0.05))
    for _ in range(3):
        engine.completion("chat", MESSAGES)

    assert engine.latency.samples("big", "default") == (3, 0)
    p100 = engine.latency.percentile("big", "default", 100, 1)
    assert p100 is not None and p100 >= 0.05


def test_streams_observe_time_to_first_chunk(
    make_engine: EngineFactory, policy_dict: PolicyBuilder, big: FakeProvider
) -> None:
    for _ in make_engine(policy_dict(["big"], timeout_s=4.0)).completion("chat", MESSAGES, stream=True):
        pass  # a process's first stream costs litellm a second or two: keep that out of this test
    engine = make_engine(policy_dict(["big", "small"], timeout_s=4.0))
    big.set(Behavior(latency_s=0.05, chunks=4, inter_chunk_s=0.15))  # first chunk at 0.05 s, last at 0.5 s

    stream = engine.completion("chat", MESSAGES, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)

    assert text
    attempt = stream.llm_resilience["attempts"][0]
    observed = engine.latency.percentile("big", "default", 100, 1)
    assert observed == pytest.approx(attempt["time_to_first_chunk_s"], abs=1e-5)
    assert attempt["latency_s"] - observed >= 0.3  # the first chunk, not the whole stream (3 x 0.15 s later)
