"""``scripted_provider_process``: a fake provider in its own process, on a latency timeline."""

from __future__ import annotations

import time

import httpx

from llm_resilience.testing import scripted_provider_process
from llm_resilience.testing.__main__ import LatencySchedule

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_the_schedule_switches_median_on_its_timeline_and_draws_the_same_values_for_a_seed() -> None:
    clock = [100.0]
    schedule = LatencySchedule(0.05, 0.3, "s", [(1.0, 2.0, 1.0)], clock=lambda: clock[0])
    twin = LatencySchedule(0.05, 0.3, "s", [(1.0, 2.0, 1.0)], clock=lambda: clock[0])

    before = [schedule() for _ in range(50)]  # not started: the healthy median
    schedule.start(100.0)
    clock[0] = 101.5
    spike = [schedule() for _ in range(50)]
    clock[0] = 102.5
    after = [schedule() for _ in range(50)]
    twin.start(100.0)
    clock[0] = 100.0
    twin_before = [twin() for _ in range(50)]

    assert max(before) < 0.2 and max(after) < 0.2 and min(spike) > 0.3
    assert twin_before == before  # same seed, same draws


def test_a_provider_process_follows_its_phases_and_reports_when_requests_arrived() -> None:
    with scripted_provider_process(0.0, phases=[(0.4, 30.0, 0.3)]) as provider:
        t0 = provider.start()
        with httpx.Client(timeout=10) as client:
            client.post(provider.base_url + "/chat/completions", json=BODY)  # before the phase: at once
            while time.monotonic() < t0 + 0.45:
                time.sleep(0.01)
            sent = time.monotonic()
            answer = client.post(provider.base_url + "/chat/completions", json=BODY)
            slow_s = time.monotonic() - sent
        received = provider.received()

    assert answer.status_code == 200
    assert slow_s >= 0.3  # inside the phase: its latency
    assert len(received) == 2
    assert received[0] < 0.4 <= received[1]
