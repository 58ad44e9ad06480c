"""What the fleet's breakers believe stays true when Redis misbehaves (README "Shared state across replicas").

Through a real ``redis-server`` started per test: keys lost to ``FLUSHALL`` or eviction, a restart,
a hung server (``DEBUG SLEEP``, SIGSTOP), a read-only replica; real OS processes where the
behaviour is about processes (``tests/_replica.py``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from _redis_server import REDIS_SERVER, SKIP_REASON, RedisServer, free_port
from conftest import MESSAGES, PolicyBuilder, model_entry, outcomes
from test_shared_state import BOUND_S, redis_policy, run_replicas, server, states, wait_for, with_replicas

from llm_resilience import AllAttemptsFailed, Policy, PolicyError, Resilience
from llm_resilience import _shared_state as shared_state
from llm_resilience._shared_state import FleetAdmission, SharedBreakerState, from_url
from llm_resilience.testing import Behavior, FakeProvider

pytestmark = pytest.mark.skipif(REDIS_SERVER is None and not os.environ.get("CI"), reason=SKIP_REASON)

__all__ = ["server", "states"]  # fixtures, used by name


def fleet_key(engine: Resilience, model: str) -> str:
    """What Redis calls ``model``'s breaker (before fleet keys existed, the policy's name: a test on an
    older version fails on what it checks, not on a missing attribute)."""
    return str(getattr(engine.breakers.get(model), "fleet_key", model))


def open_key(engine: Resilience, model: str, namespace: str = "t") -> str:
    return f"llmr:{{{namespace}}}:{fleet_key(engine, model)}:open"


def next_syncs(state: SharedBreakerState, rounds: int = 3) -> None:
    """Let ``state`` complete ``rounds`` more syncs (exposure to what Redis now holds)."""
    for _ in range(rounds):
        state.synced.clear()
        assert state.synced.wait(BOUND_S)


def transitions_of(engine: Resilience, model: str) -> list[tuple[str, str, str]]:
    seen: list[tuple[str, str, str]] = []
    engine.breakers.listeners.append(
        lambda m, old, new, info: seen.append((old, new, info.cause)) if m == model else None
    )
    return seen


# -- absence of a key is not a verdict ------------------------------------------------------------


@with_replicas
@pytest.mark.parametrize("loss", ["flushall", "eviction"])
def test_keys_lost_by_redis_do_not_close_open_breakers_and_are_published_again(
    loss: str, server: RedisServer, policy_dict: PolicyBuilder, big: FakeProvider, small: FakeProvider
) -> None:
    policy = redis_policy(policy_dict, server.url, chain=("big", "small"), fail_max=2)
    engine = Resilience(Policy.from_dict(policy))
    shared = engine._shared
    assert shared is not None
    client = redis.Redis.from_url(server.url)
    try:
        big.set(Behavior.error(503))
        run_replicas(policy, calls=2)  # another process opens big for the fleet
        wait_for(lambda: engine.breaker_states().get("big") == "open", "this process sees big open")
        seen = transitions_of(engine, "big")
        key = open_key(engine, "big")
        if loss == "flushall":
            client.flushall()
        else:  # a Redis with maxmemory evicts keys that have a TTL (ours all do)
            client.config_set("maxmemory-policy", "volatile-random")
            client.config_set("maxmemory", str(int(client.info("memory")["used_memory"]) + 1_000_000))
            for i in range(2000):
                client.set(f"filler:{i}", b"x" * 100_000, ex=600)
                if not client.exists(key):
                    break
            else:
                pytest.fail("nothing was evicted")
            client.delete(*[f"filler:{j}" for j in range(i + 1)])
            client.config_set("maxmemory", "0")
        wait_for(lambda: bool(client.exists(key)), "big's open breaker published again")
        next_syncs(shared)
        assert engine.breaker_states()["big"] == "open" and seen == []  # never closed, not even briefly
        before = big.request_count
        [report] = run_replicas(policy, calls=1)  # and the fleet still keeps traffic off big
        assert report["calls"][0][0] == ["big", "skipped"]
        assert big.request_count == before
    finally:
        client.close()
        engine.close()


def test_a_probe_that_closed_the_fleet_breaker_is_told_from_a_lost_key(states: Any) -> None:
    a, b = states(), states()
    a.publish_open("big", 0.2, extend=True)
    wait_for(lambda: b.view("big").open_until is not None, "b sees big open")
    wait_for(lambda: a.admission("big") is FleetAdmission.PROBE, "a takes the probe")
    a.publish_closed("big")  # the probe succeeded: a real close, which b follows
    closed: list[str] = []
    b.watch("big", lambda model, state: closed.append(state), owner="second watcher")
    wait_for(lambda: closed == ["closed"], "b mirrors the close")
    assert b.view("big").open_until is None


def test_after_a_restart_sharing_resumes_without_waiting_to_reconnect(
    server: RedisServer, policy_dict: PolicyBuilder, big: FakeProvider, small: FakeProvider, monkeypatch: Any
) -> None:
    monkeypatch.setattr(shared_state, "RECONNECT_S", 60.0)  # an outage would show: nothing comes back for a minute
    policy = redis_policy(policy_dict, server.url, chain=("big", "small"), fail_max=2)
    first, second = Resilience(Policy.from_dict(policy)), Resilience(Policy.from_dict(policy))
    try:
        shareds = [engine._shared for engine in (first, second)]
        for shared in shareds:
            assert shared is not None
            next_syncs(shared, 1)
        server.kill()
        wait_for(lambda: not any(s is not None and s.healthy for s in shareds), "both notice Redis is gone")
        server.start()  # restarted, empty
        big.set(Behavior.error(503))
        for _ in range(2):
            first.completion("chat", MESSAGES)
        assert first.breaker_states()["big"] == "open"
        wait_for(lambda: second.breaker_states().get("big") == "open", "the other process honours it")
        assert outcomes(second.completion("chat", MESSAGES))[0] == ("big", "skipped", "breaker_open")
        assert big.request_count == 2
    finally:
        first.close()
        second.close()


# -- one probe for the fleet ----------------------------------------------------------------------


def test_the_fleet_probe_key_lives_as_long_as_the_probe_may_take(
    server: RedisServer, policy_dict: PolicyBuilder, big: FakeProvider, small: FakeProvider
) -> None:
    policy = redis_policy(policy_dict, server.url, chain=("big", "small"), timeout_s=45.0, deadline_s=60.0)
    engine = Resilience(Policy.from_dict(policy))
    shared = engine._shared
    assert shared is not None
    other = from_url(server.url, "t", sync_interval_s=0.05)
    assert other is not None
    client = redis.Redis.from_url(server.url)
    key = fleet_key(engine, "big")
    try:
        other.watch(key, lambda model, state: None)
        assert other.synced.wait(BOUND_S)
        other.publish_open(key, 0.2, extend=True)  # another replica opened big; its cooldown ends at once
        wait_for(lambda: engine.breaker_states().get("big") == "open", "this process sees big open")
        time.sleep(0.3)
        # The first call finds big half-open: the probe key is taken for this process.
        engine.completion("chat", MESSAGES)
        wait_for(lambda: shared.admission(key) is FleetAdmission.PROBE, "this process holds the probe")
        big.set(Behavior.ok(latency_s=3.0))
        caller = threading.Thread(target=engine.completion, args=("chat", MESSAGES))
        caller.start()  # the probe: up to 45 s (the class's timeout)
        wait_for(lambda: big.request_count == 1, "the probe is in flight")
        next_syncs(shared, 2)
        ttl_ms = client.pttl(f"llmr:{{t}}:{key}:probe")
        assert ttl_ms > 40_000, ttl_ms  # no second probe from another replica while this one may still answer
        caller.join(30)
        wait_for(lambda: engine.breaker_states()["big"] == "closed", "the probe closed big")
    finally:
        client.close()
        other.close()
        engine.close()


def test_a_process_that_took_the_probe_without_traffic_gives_it_up(states: Any) -> None:
    idle, busy = states(sends_probes=False), states()
    idle.publish_open("big", 0.2, extend=True)
    wait_for(lambda: busy.view("big").open_until is not None, "everyone sees big open")
    time.sleep(0.25)
    # The idle replica's last request found big half-open and asked for the probe; then its traffic stopped.
    wait_for(lambda: idle.admission("big") is FleetAdmission.PROBE, "the idle replica holds the probe")
    # A replica that has traffic gets it soon after (not at the end of a long TTL).
    wait_for(lambda: busy.admission("big") is FleetAdmission.PROBE, "the busy replica takes the probe", timeout=5.0)


def test_a_snapshot_in_flight_does_not_undo_a_fresh_open(
    server: RedisServer, policy_dict: PolicyBuilder, big: FakeProvider, small: FakeProvider
) -> None:
    policy = redis_policy(policy_dict, server.url, chain=("big", "small"), fail_max=2)
    engine = Resilience(Policy.from_dict(policy))
    shared = engine._shared
    assert shared is not None
    client = redis.Redis.from_url(server.url)
    try:
        next_syncs(shared, 1)
        seen = transitions_of(engine, "big")
        big.set(Behavior.error(503))
        # Redis answers nothing for 0.3 s: the sync thread's next snapshot (of a closed big) waits behind it.
        sleeper = threading.Thread(target=client.execute_command, args=("DEBUG", "SLEEP", "0.3"))
        sleeper.start()
        time.sleep(0.1)
        for _ in range(2):  # big opens here meanwhile
            engine.completion("chat", MESSAGES)
        sleeper.join()
        next_syncs(shared)
        assert seen == [("closed", "open", "consecutive_failures")]  # the older reply did not close it again
        assert engine.breaker_states()["big"] == "open"
    finally:
        client.close()
        engine.close()


# -- what is called, not what it is called ---------------------------------------------------------


@with_replicas
def test_a_reload_that_points_a_model_at_a_new_endpoint_starts_it_fresh_in_the_fleet(
    server: RedisServer, policy_dict: PolicyBuilder, big: FakeProvider, small: FakeProvider, tiny: FakeProvider,
    tmp_path: Path,
) -> None:  # fmt: skip
    policy = redis_policy(policy_dict, server.url, chain=("big", "small"), fail_max=2)
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy), encoding="utf-8")
    engine = Resilience.from_file(path, reload_interval_s=0)
    try:
        big.set(Behavior.error(503))
        run_replicas(policy, calls=2)
        wait_for(lambda: engine.breaker_states().get("big") == "open", "this process sees big open")
        moved = dict(policy, models={**policy["models"], "big": model_entry("tiny", tiny.base_url)})
        path.write_text(yaml.safe_dump(moved), encoding="utf-8")
        assert engine.reload() is True
        assert engine._shared is not None
        next_syncs(engine._shared)
        response = engine.completion("chat", MESSAGES)
        assert outcomes(response) == [("big", "success", None)]  # the new endpoint is called
        assert tiny.request_count == 1
    finally:
        engine.close()


def test_two_applications_with_the_default_namespace_share_only_what_they_both_call(
    server: RedisServer, policy_dict: PolicyBuilder, big: FakeProvider, small: FakeProvider, tiny: FakeProvider,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    state = {"backend": "redis", "url": server.url, "sync_interval_s": 0.05}  # no namespace: "default"
    mine = policy_dict(chain=("big", "small"), fail_max=2, state=state)
    theirs = dict(mine, models={**mine["models"], "big": model_entry("tiny", tiny.base_url)})
    with caplog.at_level(logging.WARNING, logger="llm_resilience"):
        app_a, app_b = Resilience(Policy.from_dict(mine)), Resilience(Policy.from_dict(theirs))
    try:
        assert any("namespace" in r.getMessage() and "default" in r.getMessage() for r in caplog.records)
        big.set(Behavior.error(503))
        for _ in range(2):
            app_a.completion("chat", MESSAGES)
        assert app_a.breaker_states()["big"] == "open"
        assert app_b._shared is not None
        next_syncs(app_b._shared)
        assert outcomes(app_b.completion("chat", MESSAGES)) == [("big", "success", None)]  # its own big
        assert tiny.request_count == 1
    finally:
        app_a.close()
        app_b.close()


# -- processes that start and end ---------------------------------------------------------------


@with_replicas
def test_a_process_that_starts_during_an_incident_skips_the_open_model_from_its_first_call(
    server: RedisServer, policy_dict: PolicyBuilder, big: FakeProvider, small: FakeProvider
) -> None:
    policy = redis_policy(policy_dict, server.url, chain=("big", "small"), fail_max=2)
    engine = Resilience(Policy.from_dict(policy))
    try:
        big.set(Behavior.error(503))
        for _ in range(2):
            engine.completion("chat", MESSAGES)
        client = redis.Redis.from_url(server.url)
        wait_for(lambda: bool(client.exists(open_key(engine, "big"))), "big open in Redis")
        client.close()
        reports = run_replicas(policy, calls=1, count=2, wait=False)  # first call right after start-up
        assert [r["calls"][0][0] for r in reports] == [["big", "skipped"]] * 2
        assert big.request_count == 2
    finally:
        engine.close()


@with_replicas
def test_failures_of_processes_that_exit_without_close_still_count(
    server: RedisServer, policy_dict: PolicyBuilder, big: FakeProvider, small: FakeProvider
) -> None:
    no_panic = {"default": {"fail_max": 3, "reset_timeout_s": 300.0, "panic": "fail_fast"}}
    policy = redis_policy(policy_dict, server.url, chain=("big",), breakers=no_panic)
    engine = Resilience(Policy.from_dict(policy))
    try:
        big.set(Behavior.error(503))
        reports = run_replicas(policy, calls=1, count=3, close=False)  # jobs that end with a failed call
        assert [r["calls"][0][0] for r in reports] == [["big", "failure"]] * 3
        wait_for(lambda: engine.breaker_states().get("big") == "open", "the fourth process sees big open")
        with pytest.raises(AllAttemptsFailed) as info:
            engine.completion("chat", MESSAGES)
        assert outcomes(info.value.attempts) == [("big", "skipped", "breaker_open")]  # (no panic request)
        assert big.request_count == 3
    finally:
        engine.close()


def test_a_reload_that_changes_state_never_waits_for_a_hung_redis(
    server: RedisServer, policy_dict: PolicyBuilder, big: FakeProvider, tmp_path: Path
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(redis_policy(policy_dict, server.url)), encoding="utf-8")
    engine = Resilience.from_file(path, reload_interval_s=0)
    old = engine._shared
    assert old is not None and old._thread is not None
    try:
        next_syncs(old, 1)
        server.freeze()  # SIGSTOP: the sync thread's next read hangs (for its 0.5 s read timeout)
        old.synced.clear()
        time.sleep(0.1)
        path.write_text(yaml.safe_dump(redis_policy(policy_dict, server.url, namespace="other")), encoding="utf-8")
        assert engine.reload() is True
        assert old._thread.is_alive()  # retired, not joined: the reload did not wait for it
        assert not old.synced.is_set()
        assert outcomes(engine.completion("chat", MESSAGES)) == [("big", "success", None)]
    finally:
        server.thaw()
        engine.close()
    wait_for(lambda: old._thread is not None and not old._thread.is_alive(), "the old sync thread ends by itself")


# -- the URL: validated, never a reason for a call to fail, never logged with a secret -------------


@pytest.mark.parametrize("url", ["redis://:pw@host:abc/0", "redis://[::1/0", "http://host:6379/0", "redis://h/0?x=1"])
def test_a_malformed_state_url_is_a_policy_error_naming_the_field(url: str, policy_dict: PolicyBuilder) -> None:
    with pytest.raises(PolicyError) as info:
        Policy.from_dict(policy_dict(state={"backend": "redis", "url": url}))
    message = str(info.value)
    assert "state" in message and "url" in message
    assert "pw" not in message


@pytest.mark.parametrize("url", ["redis://:pw@host:abc/0", "redis://[::1/0"])
def test_a_malformed_url_from_the_environment_leaves_calls_working_with_a_warning(
    url: str, policy_dict: PolicyBuilder, big: FakeProvider, monkeypatch: Any, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("FLEET_TEST_REDIS_URL", url)
    policy = policy_dict(state={"backend": "redis", "url": "os.environ/FLEET_TEST_REDIS_URL", "namespace": "t"})
    with caplog.at_level(logging.WARNING, logger="llm_resilience"):
        engine = Resilience(Policy.from_dict(policy))
    try:
        assert engine._shared is None  # per process
        assert outcomes(engine.completion("chat", MESSAGES)) == [("big", "success", None)]
        warnings = [r.getMessage() for r in caplog.records if "state.url" in r.getMessage()]
        assert len(warnings) == 1 and "pw" not in warnings[0]
    finally:
        engine.close()


@pytest.mark.parametrize("userinfo", ["", ":hunter2-secret@", "admin:hunter2-secret@", "hunter2-secret@"])
@pytest.mark.parametrize("query", ["", "?password=hunter2-secret", "?username=admin&password=hunter2-secret"])
def test_no_credential_of_the_url_is_logged(userinfo: str, query: str, caplog: pytest.LogCaptureFixture) -> None:
    url = f"redis://{userinfo}127.0.0.1:{RedisServer().port}/0{query}"  # nothing listens there
    with caplog.at_level(logging.WARNING, logger="llm_resilience.shared_state"):
        state = from_url(url, "t", sync_interval_s=0.05)
        assert state is not None
        try:
            wait_for(lambda: any("unreachable" in r.getMessage() for r in caplog.records), "the warning")
        finally:
            state.close()
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "hunter2" not in logged and "127.0.0.1" in logged


def test_a_read_only_replica_gives_one_warning_and_no_false_recovery(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    replica = RedisServer("--replicaof", "127.0.0.1", str(server.port), "--replica-read-only", "yes").start()

    def mine() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "llm_resilience.shared_state"]

    try:
        with caplog.at_level(logging.WARNING, logger="llm_resilience.shared_state"):
            state = from_url(replica.url, "t", sync_interval_s=0.05)
            assert state is not None
            try:
                state.watch("big", lambda model, fleet_state: None)
                wait_for(lambda: len(mine()) >= 1, "the warning")
                state.record_failure("big", fail_max=1, open_s=30)
                time.sleep(2.5)  # a few reconnect attempts: still one warning, never "shared again"
                assert not state.healthy and state.admission("big") is FleetAdmission.DEFER
            finally:
                state.close()
        messages = mine()
        assert len(messages) == 1, messages
        assert "replica" in messages[0]
    finally:
        replica.stop()


def test_a_redis_cluster_node_is_refused_with_one_clear_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The cluster bus listens on port + 10000 unless told otherwise: a free port above 55535 would put
    # it past 65535, so the bus gets a free port of its own.
    node = RedisServer(
        "--cluster-enabled", "yes", "--cluster-config-file", str(tmp_path / "nodes.conf"), "--dir", str(tmp_path),
        "--cluster-port", str(free_port()),
    ).start()  # fmt: skip
    try:
        with caplog.at_level(logging.WARNING, logger="llm_resilience.shared_state"):
            state = from_url(node.url, "t", sync_interval_s=0.05)
            assert state is not None
            try:
                state.watch("big", lambda model, fleet_state: None)
                wait_for(lambda: bool(caplog.records), "the warning")
                time.sleep(1.5)  # a few reconnect attempts: still one warning
                assert not state.healthy and state.admission("big") is FleetAdmission.DEFER
            finally:
                state.close()
        messages = [r.getMessage() for r in caplog.records if r.name == "llm_resilience.shared_state"]
        assert len(messages) == 1 and "Redis Cluster is not supported" in messages[0], messages
    finally:
        node.stop()
