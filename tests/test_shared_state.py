"""Breakers shared across replicas through a real Redis (``state: {backend: redis}``).

Each test gets its own ``redis-server`` on a free loopback port. "Processes" are real OS
processes (``tests/_replica.py``, or ``os.fork``) where the behaviour is about processes;
several :class:`SharedBreakerState` objects in this process (each with its own connection and
sync thread, as in separate replicas) where it is about the shared protocol itself.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from _redis_server import REDIS_SERVER, SKIP_REASON, RedisServer
from conftest import MESSAGES, PolicyBuilder, outcomes

from llm_resilience import Policy, Resilience
from llm_resilience._shared_state import FleetAdmission, SharedBreakerState, from_url
from llm_resilience.testing import Behavior, FakeProvider

# In CI (CI=true) a missing redis-server is an error, never a skip: CI must run these for real.
pytestmark = pytest.mark.skipif(REDIS_SERVER is None and not os.environ.get("CI"), reason=SKIP_REASON)

REPLICA = Path(__file__).resolve().parent / "_replica.py"
# Tests that start replica processes: each imports litellm (~2 s of CPU), slow on a busy machine.
with_replicas = pytest.mark.timeout(400)
BOUND_S = 10.0
"""Upper bound for anything that should happen within about a second (slow, loaded CI machines)."""


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = BOUND_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        time.sleep(0.01)


@pytest.fixture
def server() -> Iterator[RedisServer]:
    srv = RedisServer().start()
    yield srv
    srv.stop()


@pytest.fixture
def states(server: RedisServer) -> Iterator[Callable[..., SharedBreakerState]]:
    """``states(namespace="t")``: a new shared state (as one replica would have) on ``server``.

    ``sends_probes`` (default): when it holds the fleet's probe, its probe is in flight (the
    realistic case: the holder sends it); ``False``: it has no request to send.
    """
    made: list[SharedBreakerState] = []

    def make(namespace: str = "t", *, sends_probes: bool = True, **options: Any) -> SharedBreakerState:
        options.setdefault("sync_interval_s", 0.05)
        state = from_url(server.url, namespace, **options)
        assert state is not None
        state.watch("big", lambda model, fleet_state: None, probing=lambda: sends_probes)
        assert state.synced.wait(BOUND_S)
        made.append(state)
        return state

    yield make
    for state in made:
        state.close()


def redis_policy(policy_dict: PolicyBuilder, url: str, namespace: str = "t", **kwargs: Any) -> dict[str, Any]:
    state = {"backend": "redis", "url": url, "namespace": namespace, "sync_interval_s": 0.05}
    # Generous timeouts: a replica's first litellm call imports lazily, slow on a busy machine.
    kwargs.setdefault("timeout_s", 10.0)
    kwargs.setdefault("deadline_s", 30.0)
    kwargs.setdefault("reset_timeout_s", 300.0)  # an open breaker must not lapse while a slow machine catches up
    return policy_dict(state=state, **kwargs)


def run_replicas(policy: dict[str, Any], calls: int, count: int = 1, **options: Any) -> list[dict[str, Any]]:
    """Run ``count`` replica processes at once, each making ``calls`` calls; their JSON reports."""
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "PYTHONPATH": str(REPLICA.parent.parent)}
    procs = [
        subprocess.Popen(
            [sys.executable, str(REPLICA), json.dumps(policy), str(calls), json.dumps(options)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(count)
    ]
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"replica failed: {out}\n{err[-3000:]}"
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return reports


# -- the protocol, between replicas ------------------------------------------------------------


def test_failures_of_three_replicas_add_up_and_open_the_breaker_for_a_fourth(states: Any) -> None:
    replicas = [states() for _ in range(4)]
    for r in replicas[:3]:
        r.record_failure("big", fail_max=3, open_s=30)
    wait_for(lambda: replicas[3].admission("big") is FleetAdmission.OPEN, "the fourth replica sees big open")
    wait_for(lambda: all(r.admission("big") is FleetAdmission.OPEN for r in replicas[:3]), "and the other three")


def test_fewer_failures_than_fail_max_leave_the_breaker_closed(states: Any) -> None:
    a, b = states(), states()
    a.record_failure("big", fail_max=3, open_s=30)
    b.record_failure("big", fail_max=3, open_s=30)
    wait_for(lambda: a.view("big").failures == 2, "both failures counted")
    assert a.admission("big") is FleetAdmission.DEFER and b.admission("big") is FleetAdmission.DEFER


def test_a_success_resets_the_fleet_failure_count(states: Any) -> None:
    a, b = states(), states()
    a.record_failure("big", fail_max=3, open_s=30)
    b.record_failure("big", fail_max=3, open_s=30)
    wait_for(lambda: b.view("big").failures == 2, "both failures counted")
    b.record_success("big")
    wait_for(lambda: a.view("big").failures == 0, "the count reset")
    a.record_failure("big", fail_max=3, open_s=30)
    wait_for(lambda: a.view("big").failures == 1, "a new failure counted")
    assert a.admission("big") is FleetAdmission.DEFER


def test_old_failures_expire_from_the_window(states: Any) -> None:
    a = states(failure_window_s=0.3)
    a.record_failure("big", fail_max=2, open_s=30)
    wait_for(lambda: a.view("big").failures == 1, "the failure counted")
    wait_for(lambda: a.view("big").failures == 0, "the failure expired")
    a.record_failure("big", fail_max=2, open_s=30)
    wait_for(lambda: a.view("big").failures == 1, "the new failure counted")
    assert a.admission("big") is FleetAdmission.DEFER


def test_one_half_open_probe_for_the_whole_fleet(states: Any) -> None:
    replicas = [states() for _ in range(3)]
    replicas[0].publish_open("big", 0.2, extend=True)
    wait_for(lambda: all(r.view("big").open_until is not None for r in replicas), "everyone sees big open")
    # Once open_until passes, every replica wants to probe; exactly one gets to.
    seen: dict[int, FleetAdmission] = {}

    def someone_probes() -> bool:
        for i, r in enumerate(replicas):
            seen[i] = r.admission("big")
        return FleetAdmission.PROBE in seen.values()

    wait_for(someone_probes, "one replica holds the probe")
    time.sleep(0.2)  # several sync rounds in which the others keep asking (not synchronisation: exposure)
    verdicts = [r.admission("big") for r in replicas]
    assert verdicts.count(FleetAdmission.PROBE) == 1, verdicts
    assert verdicts.count(FleetAdmission.PROBE_BUSY) == 2, verdicts


def test_a_failed_probe_extends_the_cooldown_and_a_good_one_closes_for_everyone(states: Any) -> None:
    a, b = states(), states()
    a.publish_open("big", 0.1, extend=True)
    wait_for(lambda: a.admission("big") is FleetAdmission.PROBE, "a takes the probe")
    a.publish_open("big", 30, extend=True)  # the probe failed
    wait_for(lambda: b.admission("big") is FleetAdmission.OPEN, "b sees the extended cooldown")
    view = b.view("big")
    assert view.open_until is not None and view.open_until > time.monotonic() + 20
    # A late failure while open does not extend it further or count.
    b.record_failure("big", fail_max=1, open_s=300)
    wait_for(lambda: not b._ops, "b's write flushed")
    b.synced.clear()
    assert b.synced.wait(BOUND_S)
    assert b.view("big").open_until < time.monotonic() + 40  # type: ignore[operator]


def test_probe_success_closes_the_breaker_for_every_replica(states: Any) -> None:
    a, b = states(), states()
    a.publish_open("big", 0.1, extend=True)
    wait_for(lambda: a.admission("big") is FleetAdmission.PROBE, "a takes the probe")
    a.publish_closed("big")
    wait_for(lambda: b.view("big").open_until is None, "b sees big closed")
    assert b.admission("big") is FleetAdmission.DEFER


def test_namespaces_are_separate(states: Any) -> None:
    a, other = states("app-a"), states("app-b")
    a.publish_open("big", 30, extend=True)
    wait_for(lambda: a.admission("big") is FleetAdmission.OPEN, "a sees its own open breaker")
    other.synced.clear()
    assert other.synced.wait(BOUND_S)
    assert other.admission("big") is FleetAdmission.DEFER


def test_the_local_view_of_open_until_is_the_time_left_on_the_redis_clock(states: Any, server: RedisServer) -> None:
    a = states()
    a.publish_open("big", 30, extend=True)
    wait_for(lambda: not a._ops, "the write flushed")
    client = redis.Redis.from_url(server.url)
    raw = client.get("llmr:{t}:big:open")
    seconds, micros = client.time()
    client.close()
    assert raw is not None
    remaining_on_server = int(raw) / 1000 - (seconds + micros / 1e6)
    a.synced.clear()
    assert a.synced.wait(BOUND_S)
    remaining_here = a.view("big").open_until - time.monotonic()  # type: ignore[operator]
    assert 28 < remaining_on_server <= 30
    assert abs(remaining_here - remaining_on_server) < 1.0


def test_a_forked_child_shares_through_its_own_connection(states: Any) -> None:
    parent = states()
    pid = os.fork()
    if pid == 0:  # the child: its sync thread and connection were recreated at fork
        code = 1
        try:
            if parent.synced.wait(BOUND_S) and parent._thread is not None and parent._thread.is_alive():
                parent.record_failure("big", fail_max=1, open_s=30)
                parent.close()  # flushes the write
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    wait_for(lambda: parent.admission("big") is FleetAdmission.OPEN, "the parent sees the child's open breaker")


def test_redis_down_at_start_means_per_process_state_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    url = f"redis://127.0.0.1:{RedisServer().port}/0"  # nothing listens there
    with caplog.at_level(logging.WARNING, logger="llm_resilience.shared_state"):
        state = from_url(url, "t", sync_interval_s=0.05)
        assert state is not None
        try:
            state.watch("big", lambda model, fleet_state: None)
            wait_for(lambda: len(caplog.records) >= 1, "the warning")
            state.record_failure("big", fail_max=1, open_s=30)  # dropped, not queued for ever
            assert state.admission("big") is FleetAdmission.DEFER
            time.sleep(1.5)  # more than one reconnect attempt: still a single warning
        finally:
            state.close()
    warnings = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(warnings) == 1 and "127.0.0.1" in warnings[0].getMessage()


# -- engines, real calls, real processes ---------------------------------------------------------


@with_replicas
def test_a_breaker_opened_by_one_process_is_honoured_by_another(
    server: RedisServer, policy_dict: PolicyBuilder, big: FakeProvider, small: FakeProvider
) -> None:
    policy = redis_policy(policy_dict, server.url, chain=("big", "small"), fail_max=2)
    engine = Resilience(Policy.from_dict(policy))
    try:
        big.set(Behavior.error(503))
        [report] = run_replicas(policy, calls=2)
        assert report["breakers"]["big"] == "open"
        assert big.request_count == 2
        wait_for(lambda: engine.breaker_states().get("big") == "open", "this process sees big open")
        response = engine.completion("chat", MESSAGES)
        assert outcomes(response) == [("big", "skipped", "breaker_open"), ("small", "success", None)]
        assert big.request_count == 2  # no request from this process
    finally:
        engine.close()


@with_replicas
def test_three_processes_with_one_failure_each_open_the_breaker_for_a_fourth(
    server: RedisServer, policy_dict: PolicyBuilder, big: FakeProvider, small: FakeProvider
) -> None:
    policy = redis_policy(policy_dict, server.url, chain=("big", "small"), fail_max=3)
    engine = Resilience(Policy.from_dict(policy))
    try:
        big.set(Behavior.error(503))
        reports = run_replicas(policy, calls=1, count=3)
        assert [r["calls"][0][0] for r in reports] == [["big", "failure"]] * 3  # each saw one failure
        assert big.request_count == 3
        wait_for(lambda: engine.breaker_states().get("big") == "open", "the fourth process sees big open")
        response = engine.completion("chat", MESSAGES)
        assert outcomes(response)[0] == ("big", "skipped", "breaker_open")
        assert big.request_count == 3
    finally:
        engine.close()


@with_replicas
def test_calls_go_on_when_redis_dies_and_sharing_resumes_when_it_is_back(
    server: RedisServer,
    policy_dict: PolicyBuilder,
    big: FakeProvider,
    small: FakeProvider,
    tiny: FakeProvider,
    caplog: pytest.LogCaptureFixture,
) -> None:
    policy = redis_policy(policy_dict, server.url, fail_max=2)
    engine = Resilience(Policy.from_dict(policy))
    shared = engine._shared
    assert shared is not None
    try:
        wait_for(lambda: shared.healthy, "first sync")
        with caplog.at_level(logging.WARNING, logger="llm_resilience.shared_state"):
            server.kill()
            for _ in range(3):
                assert outcomes(engine.completion("chat", MESSAGES)) == [("big", "success", None)]
            wait_for(lambda: not shared.healthy, "the engine notices Redis is gone")
            # Per process now: the local breaker still opens and protects.
            big.set(Behavior.error(503))
            for _ in range(2):
                assert outcomes(engine.completion("chat", MESSAGES))[-1] == ("small", "success", None)
            assert outcomes(engine.completion("chat", MESSAGES))[0] == ("big", "skipped", "breaker_open")
            assert big.request_count == 5
            down = [r for r in caplog.records if "unreachable" in r.getMessage()]
            assert len(down) == 1
            server.start()  # same port
            wait_for(lambda: shared.healthy, "sharing resumes")
        assert any("answers again" in r.getMessage() for r in caplog.records)
        # What this process learned alone (big is open) is told to the restarted, empty Redis...
        client = redis.Redis.from_url(server.url)
        key = f"llmr:{{t}}:{engine.breakers.get('big').fleet_key}:open"
        wait_for(lambda: bool(client.exists(key)), "big's open breaker published")
        client.close()
        # ...and sharing works both ways again: another process skips big, and opens small for us.
        small.set(Behavior.error(503))
        before, big_before = small.request_count, big.request_count
        [report] = run_replicas(policy, calls=2)
        assert all(call[0] == ["big", "skipped"] for call in report["calls"]), report
        assert big.request_count == big_before
        assert small.request_count == before + 2
        wait_for(lambda: engine.breaker_states().get("small") == "open", "this process sees small open")
        response = engine.completion("chat", MESSAGES)
        assert outcomes(response)[-1] == ("tiny", "success", None)
        assert ("small", "skipped", "breaker_open") in outcomes(response)
        assert small.request_count == before + 2
    finally:
        engine.close()


def test_a_hung_redis_never_holds_up_a_call(server: RedisServer, policy_dict: PolicyBuilder, big: FakeProvider) -> None:
    # A client with no timeouts at all: if any call waited on Redis, it would wait for ever.
    engine = Resilience(Policy.from_dict(policy_dict()))
    state = SharedBreakerState(lambda: redis.Redis.from_url(server.url), "t", sync_interval_s=0.05)
    engine._shared = state
    engine.breakers.share(state)
    try:
        engine.breakers.get("big")
        wait_for(lambda: state.healthy, "first sync")
        server.freeze()
        state.synced.clear()
        big.set(Behavior.error(503))
        for _ in range(5):  # failures are written (queued) too
            engine.completion("chat", MESSAGES)
        big.set(Behavior.ok())
        assert not state.synced.is_set()  # the sync thread was stuck the whole time
    finally:
        server.thaw()
        engine.close()


@with_replicas
def test_a_policy_reload_can_turn_sharing_on_and_off(
    server: RedisServer, policy_dict: PolicyBuilder, big: FakeProvider, small: FakeProvider, tmp_path: Path
) -> None:
    import yaml

    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy_dict(chain=("big", "small"), fail_max=2)), encoding="utf-8")
    engine = Resilience.from_file(path, reload_interval_s=0)
    try:
        assert engine._shared is None  # in-process first
        shared_policy = redis_policy(policy_dict, server.url, chain=("big", "small"), fail_max=2)
        path.write_text(yaml.safe_dump(shared_policy), encoding="utf-8")
        assert engine.reload() is True
        shared = engine._shared
        assert shared is not None
        big.set(Behavior.error(503))
        run_replicas(shared_policy, calls=2)
        wait_for(lambda: engine.breaker_states().get("big") == "open", "this process sees big open")
        assert outcomes(engine.completion("chat", MESSAGES))[0] == ("big", "skipped", "breaker_open")
        path.write_text(yaml.safe_dump(policy_dict(chain=("big", "small"), fail_max=2)), encoding="utf-8")
        assert engine.reload() is True
        assert engine._shared is None
        thread = shared._thread
        assert thread is not None
        wait_for(lambda: not thread.is_alive(), "its sync thread stopped")  # by itself, off the call path
    finally:
        engine.close()
