"""Policy files: broken ones are rejected with file, line and field; valid ones mean what they say."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import MESSAGES, hidden, outcomes

from llm_resilience import Policy, PolicyError, Resilience
from llm_resilience.testing import Behavior, FakeProvider

MINIMAL = """\
models:
  big:   {litellm_params: {model: openai/gpt-4o, api_base: "http://127.0.0.1:8001/v1", api_key: os.environ/BIG_KEY}}
  small: {litellm_params: {model: openai/gpt-4o-mini, api_base: "http://127.0.0.1:8002/v1", api_key: os.environ/SMALL_KEY}}
routes:
  chat: {chain: [big, small]}
prompt_classes:
  default:   {timeout_s: 0.3, deadline_s: 2}
  summarize: {timeout_s: 1.0, deadline_s: 3}
breakers:
  default: {fail_max: 3, reset_timeout_s: 30}
"""  # noqa: E501  (the issue's text, verbatim)


def write(tmp_path: Path, text: str, name: str = "policy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def edit(old: str, new: str) -> str:
    assert MINIMAL.count(old) == 1, old
    return MINIMAL.replace(old, new)


def problems_of(path: Path) -> list[str]:
    with pytest.raises(PolicyError) as info:
        Policy.from_file(path)
    assert info.value.problems
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


# (broken policy text, expected line, expected field path, words the message must contain)
BROKEN: dict[str, tuple[str, int, str, list[str]]] = {
    "unknown_key_with_suggestion": (
        edit("default: {fail_max: 3", "default: {fail_maxx: 3"),
        10,
        "breakers.default.fail_maxx",
        ["unknown key 'fail_maxx'", "did you mean 'fail_max'?"],
    ),
    "unknown_top_level_section": (
        MINIMAL + "route:\n  other: {chain: [big]}\n",
        11,
        "route",
        ["unknown key 'route'", "did you mean 'routes'?"],
    ),
    "wrong_type": (
        edit("deadline_s: 2}", "deadline_s: soon}"),
        7,
        "prompt_classes.default.deadline_s",
        ["valid number", "'soon'"],
    ),
    "chain_names_undefined_model": (
        edit("chain: [big, small]", "chain: [big, medium]"),
        5,
        "routes.chat.chain[1]",
        ["unknown model 'medium'", "big, small"],
    ),
    "chain_in_block_style_points_at_the_item": (
        edit("chat: {chain: [big, small]}", "chat:\n    chain:\n      - big\n      - medium"),
        8,
        "routes.chat.chain[1]",
        ["unknown model 'medium'"],
    ),
    "negative_timeout": (
        edit("timeout_s: 0.3", "timeout_s: -1"),
        7,
        "prompt_classes.default.timeout_s",
        ["greater than or equal to 0.01", "-1"],
    ),
    "timeout_longer_than_deadline": (
        edit("timeout_s: 1.0, deadline_s: 3", "timeout_s: 5, deadline_s: 3"),
        8,
        "prompt_classes.summarize",
        ["timeout_s (5.0)", "deadline_s (3.0)"],
    ),
    "duplicate_yaml_key": (
        edit("  chat: {chain: [big, small]}\n", "  chat: {chain: [big, small]}\n  chat: {chain: [small]}\n"),
        6,
        "routes.chat",
        ["duplicate key"],
    ),
    "invalid_yaml": (
        edit("  chat: {chain: [big, small]}\n", "  chat: {chain: [big, small]}}\n"),
        5,
        "",
        ["not valid YAML"],
    ),
    "tab_indentation": (
        edit("routes:\n", "routes:\n\tchat2: {chain: [big]}\n"),
        5,
        "",
        ["not valid YAML"],
    ),
    "invalid_regex": (
        edit(
            "summarize: {timeout_s: 1.0, deadline_s: 3}",
            "summarize: {timeout_s: 1.0, deadline_s: 3, match: [{last_user_regex: 'summar(ize'}]}",
        ),
        8,
        "prompt_classes.summarize.match[0].last_user_regex",
        ["not a valid regular expression"],
    ),
    "breaker_override_for_unknown_model": (
        MINIMAL + "  medium: {fail_max: 2}\n",
        11,
        "breakers.medium",
        ["'medium' is neither 'default' nor a model", "big, small"],
    ),
    "model_without_model_string": (
        edit("big:   {litellm_params: {model: openai/gpt-4o, ", "big:   {litellm_params: {"),
        2,
        "models.big.litellm_params",
        ["needs 'model'"],
    ),
    "unknown_error_kind": (
        MINIMAL + "errors:\n  fall_back_on: [timeout, server_eror]\n",
        12,
        "errors.fall_back_on[1]",
        ["server_eror"],
    ),
}


@pytest.mark.sans_io
@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_policy_names_file_line_and_field(case: str, tmp_path: Path) -> None:
    text, line, field, words = BROKEN[case]
    path = write(tmp_path, text, f"{case}.yaml")

    problems = problems_of(path)

    assert len(problems) == 1, problems
    problem = problems[0]
    assert problem.startswith(f"{path}:{line}: "), problem
    if field:
        assert problem.startswith(f"{path}:{line}: {field}: "), problem
    for word in words:
        assert word in problem, problem


@pytest.mark.sans_io
def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    text = MINIMAL.replace("timeout_s: 0.3", "timeout_s: -1").replace("fail_max: 3", "fail_maxx: 3")
    path = write(tmp_path, text)

    problems = problems_of(path)

    assert len(problems) == 2, problems
    assert problems[0].startswith(f"{path}:7: prompt_classes.default.timeout_s: ")
    assert problems[1].startswith(f"{path}:10: breakers.default.fail_maxx: ")


@pytest.mark.sans_io
def test_duplicate_key_is_reported_with_other_problems(tmp_path: Path) -> None:
    text = MINIMAL.replace(
        "  chat: {chain: [big, small]}\n", "  chat: {chain: [big, small]}\n  chat: {chain: [medium]}\n"
    )
    path = write(tmp_path, text)

    problems = problems_of(path)

    assert any(p.startswith(f"{path}:6: routes.chat: duplicate key") for p in problems)
    assert any("routes.chat.chain[0]: unknown model 'medium'" in p for p in problems)


@pytest.mark.sans_io
def test_a_misplaced_api_key_is_not_echoed_in_the_error(tmp_path: Path) -> None:
    text = edit("big:   {litellm_params:", "big:   {api_key: sk-literal-SECRET-555, litellm_params:")
    path = write(tmp_path, text)

    problems = problems_of(path)

    assert problems[0].startswith(f"{path}:2: models.big.api_key: unknown key 'api_key'")
    assert not any("sk-literal-SECRET-555" in p for p in problems)


@pytest.mark.sans_io
def test_missing_file_is_a_policy_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read policy file"):
        Policy.from_file(tmp_path / "nope.yaml")


@pytest.mark.sans_io
def test_dict_policies_are_validated_the_same_way() -> None:
    with pytest.raises(PolicyError) as info:
        Resilience.from_dict({"routes": {"chat": {"chain": ["ghost"]}}})

    assert info.value.problems == [
        "<dict>: routes.chat.chain[0]: unknown model 'ghost' (defined under models: none)",
    ]
    assert isinstance(info.value, ValueError)


# -- the minimal policy from the issue ----------------------------------------------------------------


@pytest.mark.sans_io
def test_minimal_policy_loads_and_means_what_it_says(tmp_path: Path) -> None:
    policy = Policy.from_file(write(tmp_path, MINIMAL))

    route = policy.route_for("chat", "default")
    assert [m.name for m in route.chain] == ["big", "small"]
    assert [m.litellm_model for m in route.chain] == ["openai/gpt-4o", "openai/gpt-4o-mini"]
    assert route.chain[0].litellm_params["api_base"] == "http://127.0.0.1:8001/v1"
    assert route.chain[0].litellm_params["api_key"] == "os.environ/BIG_KEY"  # kept as a reference, resolved later
    assert (policy.classes["default"].timeout_s, policy.classes["default"].deadline_s) == (0.3, 2)
    assert (policy.classes["summarize"].timeout_s, policy.classes["summarize"].deadline_s) == (1.0, 3)
    for model in ("big", "small"):
        settings = policy.breaker_settings(model)
        assert (settings.fail_max, settings.reset_timeout_s) == (3, 30)
        assert "bad_request" not in settings.count
    assert {"timeout", "connection", "rate_limit", "server_error", "auth"} <= policy.fall_back_on
    assert "bad_request" not in policy.fall_back_on
    assert not policy.document.telemetry.record_content


def minimal_on(big: FakeProvider, small: FakeProvider) -> str:
    return MINIMAL.replace("http://127.0.0.1:8001/v1", big.base_url).replace("http://127.0.0.1:8002/v1", small.base_url)


def test_minimal_policy_drives_calls_with_keys_from_the_environment(
    tmp_path: Path, big: FakeProvider, small: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BIG_KEY", "sk-big-env")
    monkeypatch.setenv("SMALL_KEY", "sk-small-env")
    engine = Resilience.from_file(write(tmp_path, minimal_on(big, small)))
    big.set(Behavior.slow(1.0))

    response = engine.completion("chat", MESSAGES)

    assert outcomes(response) == [("big", "failure", "timeout"), ("small", "success", None)]
    assert hidden(response)["attempts"][0]["timeout_s"] == 0.3
    assert big.requests[0].headers["authorization"] == "<redacted>"  # a key was sent (the fake hides it)


def test_unset_key_variable_skips_that_model_and_falls_back(
    tmp_path: Path, big: FakeProvider, small: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BIG_KEY", raising=False)
    monkeypatch.setenv("SMALL_KEY", "sk-small-env")
    engine = Resilience.from_file(write(tmp_path, minimal_on(big, small)))

    response = engine.completion("chat", MESSAGES)

    assert outcomes(response) == [("big", "skipped", "missing_api_key"), ("small", "success", None)]
    assert big.request_count == 0
    assert engine.breaker_states().get("big", "closed") == "closed"  # a config gap is not the provider's fault


def test_key_variable_is_resolved_at_call_time(
    tmp_path: Path, big: FakeProvider, small: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BIG_KEY", raising=False)
    monkeypatch.setenv("SMALL_KEY", "sk-small-env")
    engine = Resilience.from_file(write(tmp_path, minimal_on(big, small)))
    assert hidden(engine.completion("chat", MESSAGES))["model"] == "small"

    monkeypatch.setenv("BIG_KEY", "sk-big-set-later")

    assert hidden(engine.completion("chat", MESSAGES))["model"] == "big"
    assert big.request_count == 1
