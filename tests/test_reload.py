"""Hot reload: an engine built from a policy file follows edits of the file without a restart."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import MESSAGES, PolicyBuilder, hidden, outcomes

import llm_resilience
from llm_resilience import Resilience
from llm_resilience.testing import Behavior, FakeProvider

BOUND_S = 10.0


def write(path: Path, policy: dict[str, Any]) -> str:
    text = yaml.safe_dump(policy, sort_keys=False)
    path.write_text(text, encoding="utf-8")
    return text


def answered_by(engine: Resilience) -> str:
    model: str = hidden(engine.completion("chat", MESSAGES))["model"]
    return model


def wait_until_answered_by(engine: Resilience, model: str) -> None:
    """Call until the engine's answer comes from ``model`` (the new policy is in force), within a bound."""
    deadline = time.monotonic() + BOUND_S
    while answered_by(engine) != model:
        if time.monotonic() > deadline:
            raise AssertionError(f"the edit was not picked up: still not answered by {model}")
        time.sleep(0.01)


def age(path: Path, seconds: float = 3600) -> None:
    """Give the file an old mtime (as a file that was not touched for a while)."""
    t = time.time() - seconds
    os.utime(path, (t, t), follow_symlinks=False) if path.is_symlink() else os.utime(path, (t, t))


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    return tmp_path / "policy.yaml"


def test_an_edit_in_place_is_picked_up_by_calls(
    policy_file: Path, policy_dict: PolicyBuilder, big: FakeProvider, small: FakeProvider
) -> None:
    write(policy_file, policy_dict(chain=("big", "small")))
    engine = Resilience.from_file(policy_file, reload_interval_s=0.01)
    assert answered_by(engine) == "big"
    write(policy_file, policy_dict(chain=("small", "big")))
    wait_until_answered_by(engine, "small")
    assert engine.policy.document.routes["chat"].chain == ["small", "big"]


def test_reload_interval_zero_never_checks_by_itself_but_reload_does(
    policy_file: Path, policy_dict: PolicyBuilder, big: FakeProvider, small: FakeProvider
) -> None:
    write(policy_file, policy_dict(chain=("big", "small")))
    engine = Resilience.from_file(policy_file, reload_interval_s=0)
    write(policy_file, policy_dict(chain=("small", "big")))
    for _ in range(3):
        assert answered_by(engine) == "big"
    assert engine.reload() is True
    assert answered_by(engine) == "small"
    assert engine.reload() is False  # nothing new


def test_an_editor_rename_replace_is_picked_up(
    policy_file: Path, policy_dict: PolicyBuilder, big: FakeProvider, small: FakeProvider
) -> None:
    write(policy_file, policy_dict(chain=("big", "small")))
    engine = Resilience.from_file(policy_file, reload_interval_s=0.01)
    assert answered_by(engine) == "big"
    tmp = policy_file.with_name(".policy.yaml.swp")
    write(tmp, policy_dict(chain=("small", "big")))
    os.replace(tmp, policy_file)
    wait_until_answered_by(engine, "small")


def test_a_configmap_symlink_swap_is_picked_up_even_with_equal_size_and_mtime(
    tmp_path: Path, policy_dict: PolicyBuilder, big: FakeProvider, small: FakeProvider
) -> None:
    # The layout a Kubernetes ConfigMap volume has, and the atomic ..data flip of an update.
    first, second = tmp_path / "..2026_11_29_23_00_00.1", tmp_path / "..2026_11_29_23_05_00.2"
    first.mkdir()
    second.mkdir()
    old_text = write(first / "policy.yaml", policy_dict(chain=("big", "small")))
    new_text = write(second / "policy.yaml", policy_dict(chain=("small", "big")))
    assert len(old_text) == len(new_text)
    age(first / "policy.yaml")
    st = os.stat(first / "policy.yaml")
    os.utime(second / "policy.yaml", ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: only the inode
    (tmp_path / "..data").symlink_to(first.name)
    mounted = tmp_path / "policy.yaml"
    mounted.symlink_to("..data/policy.yaml")

    engine = Resilience.from_file(mounted, reload_interval_s=0.01)
    assert answered_by(engine) == "big"
    (tmp_path / "..data_tmp").symlink_to(second.name)
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    wait_until_answered_by(engine, "small")


def test_an_invalid_edit_is_logged_once_and_the_last_good_policy_keeps_serving(
    policy_file: Path,
    policy_dict: PolicyBuilder,
    big: FakeProvider,
    small: FakeProvider,
    caplog: pytest.LogCaptureFixture,
) -> None:
    write(policy_file, policy_dict(chain=("big", "small")))
    engine = Resilience.from_file(policy_file, reload_interval_s=0.01)
    bad = yaml.safe_dump(policy_dict(chain=("small", "big")), sort_keys=False).replace("    chain:", "    chian:")
    policy_file.write_text(bad, encoding="utf-8")
    line = next(i for i, text in enumerate(bad.splitlines(), 1) if "chian:" in text)
    with caplog.at_level(logging.WARNING, logger="llm_resilience"):
        assert engine.reload() is False
        for _ in range(5):  # several check intervals pass: still one line for the same bad content
            assert answered_by(engine) == "big"
            time.sleep(0.02)
        assert engine.reload() is False
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name == "llm_resilience"]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert errors[0].levelno == logging.ERROR
    assert f"{policy_file}:{line}: routes.chat.chian: unknown key 'chian'" in errors[0].getMessage()
    # Fixing the file puts the fixed policy in force.
    write(policy_file, policy_dict(chain=("small", "big")))
    wait_until_answered_by(engine, "small")


def test_breaker_and_latency_state_of_unchanged_models_survive_a_reload(
    policy_file: Path,
    policy_dict: PolicyBuilder,
    big: FakeProvider,
    small: FakeProvider,
    tiny: FakeProvider,
) -> None:
    routes = {"chat": {"chain": ["big", "small"]}, "t": {"chain": ["tiny"]}}
    v1 = policy_dict(fail_max=1, routes=routes)
    write(policy_file, v1)
    engine = Resilience.from_file(policy_file, reload_interval_s=0)
    big.set(Behavior.error(503))
    assert outcomes(engine.completion("chat", MESSAGES)) == [
        ("big", "failure", "server_error"),
        ("small", "success", None),
    ]
    engine.completion("t", MESSAGES)
    assert engine.breaker_states()["big"] == "open"
    big_breaker, small_breaker, tiny_breaker = (engine.breakers.get(m) for m in ("big", "small", "tiny"))
    assert engine.latency.samples("tiny", "default")[0] == 1 and engine.latency.samples("small", "default")[0] == 1

    # v2: big's breaker settings change, small now points at another endpoint, tiny is untouched.
    v2 = policy_dict(fail_max=1, routes=routes, breakers={"big": {"reset_timeout_s": 60.0}})
    v2["models"]["small"]["litellm_params"]["api_base"] = tiny.base_url
    write(policy_file, v2)
    assert engine.reload() is True

    assert engine.breakers.get("big") is big_breaker and engine.breaker_states()["big"] == "open"
    assert big_breaker.settings.reset_timeout_s == 60.0  # new settings, state kept
    assert engine.breakers.get("tiny") is tiny_breaker
    assert engine.latency.samples("tiny", "default")[0] == 1
    assert engine.breakers.get("small") is not small_breaker  # a different backend: fresh state
    assert engine.latency.samples("small", "default")[0] == 0
    requests = big.request_count
    response = engine.completion("chat", MESSAGES)
    assert outcomes(response)[0] == ("big", "skipped", "breaker_open")
    assert big.request_count == requests


def test_a_call_in_flight_finishes_on_the_policy_it_started_with(
    policy_file: Path, policy_dict: PolicyBuilder, big: FakeProvider, small: FakeProvider, tiny: FakeProvider
) -> None:
    write(policy_file, policy_dict(chain=("big", "small"), timeout_s=3.0, deadline_s=10.0))
    engine = Resilience.from_file(policy_file, reload_interval_s=0)
    big.set(Behavior.error(503, latency_s=0.8))
    result: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: result.update(response=engine.completion("chat", MESSAGES)))
    worker.start()
    deadline = time.monotonic() + BOUND_S
    while big.request_count == 0:  # the call is in flight at big
        assert time.monotonic() < deadline, "the call never reached big"
        time.sleep(0.005)
    write(policy_file, policy_dict(chain=("big", "tiny"), timeout_s=3.0, deadline_s=10.0))
    assert engine.reload() is True
    worker.join(BOUND_S)
    # big failed after the reload: the call fell back along the chain it started with.
    assert outcomes(result["response"]) == [("big", "failure", "server_error"), ("small", "success", None)]
    assert outcomes(engine.completion("chat", MESSAGES)) == [
        ("big", "failure", "server_error"),
        ("tiny", "success", None),
    ]


def test_the_module_level_engine_follows_its_policy_file(
    policy_file: Path,
    policy_dict: PolicyBuilder,
    big: FakeProvider,
    small: FakeProvider,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    write(policy_file, policy_dict(chain=("big", "small")))
    monkeypatch.setenv("LLM_RESILIENCE_POLICY", str(policy_file))
    response = llm_resilience.completion(model="chat", messages=MESSAGES)
    assert hidden(response)["model"] == "big"
    engine = llm_resilience.default_engine()
    assert engine._watcher is not None and engine._watcher.interval_s == 2.0  # on by default
    write(policy_file, policy_dict(chain=("small", "big")))
    assert engine.reload() is True
    assert hidden(llm_resilience.completion(model="chat", messages=MESSAGES))["model"] == "small"


def test_a_touch_does_not_rebuild_the_policy(policy_file: Path, policy_dict: PolicyBuilder, big: FakeProvider) -> None:
    write(policy_file, policy_dict())
    engine = Resilience.from_file(policy_file, reload_interval_s=0.01)
    policy = engine.policy
    os.utime(policy_file)
    assert engine.reload() is False
    for _ in range(3):
        answered_by(engine)
        time.sleep(0.02)
    assert engine.policy is policy


# -- a file being written, or missing something, never serves ----------------------------------------


def test_the_periodic_check_waits_until_a_file_is_no_longer_being_written(
    policy_file: Path, policy_dict: PolicyBuilder, big: FakeProvider, small: FakeProvider
) -> None:
    write(policy_file, policy_dict(chain=("big", "small")))
    age(policy_file)
    engine = Resilience.from_file(policy_file, reload_interval_s=0.01)
    half = write(policy_file, policy_dict(chain=("small", "big")))  # just written: perhaps not finished

    for _ in range(5):  # several check intervals: the file was modified too recently to be trusted
        assert answered_by(engine) == "big"
        time.sleep(0.02)
    age(policy_file, seconds=5)  # nothing wrote to it for a while: it is the version to serve
    wait_until_answered_by(engine, "small")
    assert policy_file.read_text(encoding="utf-8") == half


@pytest.mark.parametrize("empty", ["", "# policy being rewritten\n"])
def test_an_in_place_rewrite_caught_empty_is_refused_and_the_policy_keeps_serving(
    policy_file: Path,
    policy_dict: PolicyBuilder,
    big: FakeProvider,
    small: FakeProvider,
    caplog: pytest.LogCaptureFixture,
    empty: str,
) -> None:
    write(policy_file, policy_dict(chain=("big", "small")))
    engine = Resilience.from_file(policy_file, reload_interval_s=0)
    policy_file.write_text(empty, encoding="utf-8")  # `cat new > policy.yaml` between truncate and write

    with caplog.at_level(logging.ERROR, logger="llm_resilience"):
        assert engine.reload() is False

    assert answered_by(engine) == "big"
    assert engine.policy.document.routes["chat"].chain == ["big", "small"]
    assert "the file is empty" in caplog.text


def test_a_version_that_drops_a_route_in_use_is_refused(
    policy_file: Path,
    policy_dict: PolicyBuilder,
    big: FakeProvider,
    small: FakeProvider,
    caplog: pytest.LogCaptureFixture,
) -> None:
    routes = {"chat": {"chain": ["big", "small"]}, "extract": {"chain": ["small"]}}
    write(policy_file, policy_dict(routes=routes))
    engine = Resilience.from_file(policy_file, reload_interval_s=0)
    assert hidden(engine.completion("extract", MESSAGES))["model"] == "small"
    write(policy_file, policy_dict(chain=("small", "big")))  # a half file: "extract" is missing

    with caplog.at_level(logging.ERROR, logger="llm_resilience"):
        assert engine.reload() is False

    assert "drops route(s) 'extract'" in caplog.text
    assert hidden(engine.completion("extract", MESSAGES))["route"] == "extract"
    assert answered_by(engine) == "big"  # nothing of that version is in force


def test_a_model_missing_from_one_version_keeps_its_open_breaker_when_it_comes_back(
    policy_file: Path, policy_dict: PolicyBuilder, big: FakeProvider, small: FakeProvider
) -> None:
    write(policy_file, policy_dict(chain=("big", "small"), fail_max=1))
    engine = Resilience.from_file(policy_file, reload_interval_s=0)
    big.set(Behavior.error(503))
    engine.completion("chat", MESSAGES)
    assert engine.breaker_states()["big"] == "open"
    without_big = policy_dict(chain=("small",), fail_max=1)
    del without_big["models"]["big"]
    write(policy_file, without_big)
    assert engine.reload() is True

    write(policy_file, policy_dict(chain=("big", "small"), fail_max=1))
    assert engine.reload() is True

    assert engine.breaker_states()["big"] == "open"  # the sick provider is still skipped
    requests = big.request_count
    assert outcomes(engine.completion("chat", MESSAGES))[0] == ("big", "skipped", "breaker_open")
    assert big.request_count == requests


def test_the_engine_reads_a_policy_file_as_validate_does(policy_file: Path, policy_dict: PolicyBuilder) -> None:
    text = yaml.safe_dump(policy_dict(), sort_keys=False)
    policy_file.write_bytes(b"# caf\xe9 policy (Latin-1)\n" + text.encode())  # not UTF-8

    with pytest.raises(llm_resilience.PolicyError) as by_validate:
        llm_resilience.Policy.from_file(policy_file)  # what `llm-resilience validate` runs
    with pytest.raises(llm_resilience.PolicyError) as by_engine:
        Resilience.from_file(policy_file)

    assert (
        by_engine.value.problems
        == by_validate.value.problems
        == [f"{policy_file}:1: not UTF-8 text (byte 0xe9); save it as UTF-8"]
    )
