"""Hostile and mistaken policy input: bounded, located, honest messages, nothing echoed that looks secret.

Every case here is a file someone could write (or paste) and ``llm-resilience validate`` must answer
with ``FILE:LINE: field: message`` and exit 1, never a traceback, never a policy that loads and
then fails every call.
"""

from __future__ import annotations

import subprocess
import sys
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_policy import MINIMAL, edit, problems_of, write

from llm_resilience import Policy, PolicyError, Resilience
from llm_resilience._policy import MAX_YAML_DEPTH, MAX_YAML_VALUES, redact_secrets
from llm_resilience._validators import _registry, register_validator
from llm_resilience.cli import main

# 394 bytes that expand to 9^9 values (issue 7: 14 s and 2.4 GB before the bound).
ALIAS_BOMB = (
    'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    "b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
    "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
    "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n"
    "e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\n"
    "f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\n"
    "g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]\n"
    "h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]\n"
    "i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]\n"
)


@pytest.mark.sans_io
def test_an_alias_bomb_is_rejected_within_bounded_memory(tmp_path: Path) -> None:
    path = write(tmp_path, ALIAS_BOMB)

    tracemalloc.start()
    try:
        problems = problems_of(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{path}:")
    assert f"more than {MAX_YAML_VALUES:,} values once aliases are expanded" in problems[0]
    assert peak < 50_000_000, f"parsing took {peak / 1e6:.0f} MB"  # a resource bound, not a timing


@pytest.mark.sans_io
def test_ordinary_aliases_and_merge_keys_still_work() -> None:
    text = MINIMAL.replace(
        "prompt_classes:\n  default:   {timeout_s: 0.3, deadline_s: 2}",
        "prompt_classes:\n  default: &quick {timeout_s: 0.3, deadline_s: 2}\n  chat_like: *quick\n"
        "  longer: {<<: *quick, deadline_s: 4}",
    )
    policy = Policy.from_yaml(text)

    assert policy.classes["chat_like"] == policy.classes["default"]
    assert (policy.classes["longer"].timeout_s, policy.classes["longer"].deadline_s) == (0.3, 4)


@pytest.mark.sans_io
def test_an_alias_inside_itself_is_rejected() -> None:
    with pytest.raises(PolicyError, match="nested more than"):
        Policy.from_yaml("models: &m {x: *m}\n")


@pytest.mark.sans_io
@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("models:\n  big: {litellm_params: {model: a\x00b}}\n", 2, ["control character #x0000"]),
        ("routes:\n  chat:\x07 {chain: [a]}\n", 2, ["control character #x0007"]),
        ("routes:\n  chat: " + "[" * 5000 + "]" * 5000 + "\n", 2, [f"nested more than {MAX_YAML_DEPTH} levels"]),
        ("routes:\n  chat: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n", 2, ["nested more than"]),
        ("models: !!python/object:os.system {}\n", 1, ["not valid YAML"]),
        ("a: !!binary 'not base64!'\n", 1, ["not valid YAML"]),
        ("- &x a\n- *y\n", 2, ["not valid YAML"]),
        ("? [a, b]\n: 1\n", 1, ["a key must be a name"]),
    ],
    ids=["nul", "bell", "5000_brackets", "3000_braces", "python_tag", "bad_binary", "undefined_alias", "list_key"],
)
def test_malformed_input_is_a_located_policy_error(tmp_path: Path, text: str, line: int, words: list[str]) -> None:
    path = write(tmp_path, text)

    problems = problems_of(path)

    assert problems[0].startswith(f"{path}:{line}: "), problems
    for word in words:
        assert word in problems[0], problems


@pytest.mark.sans_io
def test_a_file_that_is_not_utf8_is_a_located_policy_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"models: {}\nroutes: {}  # caf\xe9\n")

    assert problems_of(path) == [f"{path}:2: not UTF-8 text (byte 0xe9); save it as UTF-8"]


def test_the_cli_prints_problems_not_tracebacks_for_malformed_files(tmp_path: Path) -> None:
    files = [
        write(tmp_path, "a: 1\x00\n", "nul.yaml"),
        write(tmp_path, "x: " + "[" * 5000 + "\n", "deep.yaml"),
        write(tmp_path, ALIAS_BOMB, "bomb.yaml"),
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "llm_resilience.cli", "validate", *map(str, files)],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert [line.split(":")[0] for line in proc.stderr.splitlines()] == [str(f) for f in files]


# -- values that validate and would then fail every call -----------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "line", "field", "words"),
    [
        ("timeout_s: 0.3", "timeout_s: .inf", 7, "prompt_classes.default.timeout_s", ["finite"]),
        ("deadline_s: 2}", "deadline_s: 1e10}", 7, "prompt_classes.default.deadline_s", ["86400"]),
        ("deadline_s: 2}", "deadline_s: .nan}", 7, "prompt_classes.default.deadline_s", ["finite"]),
        ("timeout_s: 0.3", "timeout_s: 0.001", 7, "prompt_classes.default.timeout_s", ["0.01"]),
        ("reset_timeout_s: 30", "reset_timeout_s: .inf", 10, "breakers.default.reset_timeout_s", ["finite"]),
        ("chat: {chain: [big, small]}", "chat: {chain: [big, small], hedge: {after: .nan}}", 5, "routes.chat.hedge.after", ["finite"]),  # noqa: E501
        ("chat: {chain: [big, small]}", "chat: {chain: [big, small], hedge: {after: p500}}", 5, "routes.chat.hedge.after", ["p500"]),  # noqa: E501
        ("chat: {chain: [big, small]}", "chat: {chain: [big, small], hedge: {after: 1.0e+12}}", 5, "routes.chat.hedge.after", ["86400"]),  # noqa: E501
        ("deadline_s: 2}", "deadline_s: 2, soft_timeout: p500}", 7, "prompt_classes.default.soft_timeout.percentile", ["100"]),  # noqa: E501
        ("chat: {chain: [big, small]}", "chat: {chain: [big, small], classes: {summarize: {chain: []}}}", 5, "routes.chat.classes.summarize.chain", ["at least 1"]),  # noqa: E501
        ("timeout_s: 1.0, deadline_s: 3", "timeout_s: 1.0, deadline_s: 3, first_token_timeout_s: 5", 8, "prompt_classes.summarize", ["first_token_timeout_s (5.0) is longer than timeout_s (1.0)"]),  # noqa: E501
    ],
    ids=[
        "inf_timeout", "huge_deadline", "nan_deadline", "tiny_timeout", "inf_reset", "nan_hedge", "p500_hedge",
        "huge_hedge", "p500_soft", "empty_class_chain", "first_token_over_timeout",
    ],
)  # fmt: skip
@pytest.mark.sans_io
def test_values_that_cannot_work_are_rejected_at_load(
    tmp_path: Path, old: str, new: str, line: int, field: str, words: list[str]
) -> None:
    path = write(tmp_path, edit(old, new))

    problems = problems_of(path)

    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{path}:{line}: {field}: "), problems
    for word in words:
        assert word in problems[0], problems


# -- what YAML did, where it did it ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "what"), [("on", "the boolean true"), ("yes", "the boolean true"), ("off", "the boolean false"),
                      ("no", "the boolean false"), ("1", "the int 1"), ("~", "null")],
)  # fmt: skip
@pytest.mark.sans_io
def test_a_key_yaml_reads_as_a_non_string_says_so_on_its_own_line(tmp_path: Path, key: str, what: str) -> None:
    path = write(tmp_path, MINIMAL.replace("  summarize:", f"  {key}:"))

    problems = problems_of(path)

    assert problems == [f"{path}:8: prompt_classes.{key}: '{key}' was read as {what}; quote it (\"{key}\")"]


@pytest.mark.sans_io
def test_a_quoted_on_key_is_an_ordinary_name(tmp_path: Path) -> None:
    policy = Policy.from_file(write(tmp_path, MINIMAL.replace("  summarize:", '  "on":')))

    assert "on" in policy.classes


# -- secrets are never echoed ----------------------------------------------------------------------

SECRETS = [
    "sk-proj-Ab3dEf9hIjK1mN0pQr5tUv7xYz",
    "sk-ant-api03-abcdefghij0123456789",
    "AKIAIOSFODNN7EXAMPLE",
    "ghp_16C7e42F292c6912E7710c838347Ae178B4a",
    "xoxb-1234567890-abcdefghij",
    "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig",
    "q7Zr4X1mB8pL2nV6cT9sK3wH5jD0fG4aY7uE",  # no prefix: a long high-entropy token
]


@pytest.mark.sans_io
@pytest.mark.parametrize("secret", SECRETS)
@pytest.mark.parametrize(
    "place",
    ["models.big", "unknown_key", "route_name_key", "hedge_after"],
)
def test_a_secret_pasted_anywhere_is_not_echoed(tmp_path: Path, secret: str, place: str) -> None:
    text = {
        "models.big": edit(
            'big:   {litellm_params: {model: openai/gpt-4o, api_base: "http://127.0.0.1:8001/v1", api_key: os.environ/BIG_KEY}}',  # noqa: E501
            f'big: "{secret}"',
        ),
        "unknown_key": edit("routes:\n", f'"{secret}": 1\nroutes:\n'),
        "route_name_key": edit("  chat: {chain: [big, small]}", f'  chat: {{chain: [big, small]}}\n  "{secret}": 3'),
        "hedge_after": edit(
            "chat: {chain: [big, small]}", f'chat: {{chain: [big, small], hedge: {{after: "{secret}"}}}}'
        ),
    }[place]
    path = write(tmp_path, text)

    problems = problems_of(path)

    assert problems
    assert all(p.startswith(f"{path}:") for p in problems), problems
    for p in problems:
        for part in (secret, secret.split()[-1], secret[6:18]):
            assert part not in p, p
    assert any("<redacted>" in p for p in problems), problems


@pytest.mark.sans_io
@pytest.mark.parametrize(
    "text", ["openai/gpt-4o-mini-2024-07-18", "anthropic.claude-3-5-sonnet-20241022-v2:0", "fall_back_on", "p95"]
)
def test_ordinary_names_are_not_taken_for_secrets(text: str) -> None:
    assert redact_secrets(f"unknown model '{text}'") == f"unknown model '{text}'"


# -- one pass, one loader ------------------------------------------------------------------------


@pytest.mark.sans_io
def test_schema_errors_do_not_hide_cross_reference_errors(tmp_path: Path) -> None:
    text = edit("timeout_s: 0.3", "timout_s: 0.3").replace("chain: [big, small]", "chain: [big, medium]")
    path = write(tmp_path, text)

    problems = problems_of(path)

    assert [p.split(": ")[0:2] for p in problems] == [
        [f"{path}:5", "routes.chat.chain[1]"],
        [f"{path}:7", "prompt_classes.default.timout_s"],
    ], problems


@pytest.fixture
def _clean_registry() -> Iterator[None]:
    saved = dict(_registry)
    yield None
    _registry.clear()
    _registry.update(saved)


BAD_VALIDATOR = MINIMAL.replace(
    "chat: {chain: [big, small]}", "chat: {chain: [big, small], validators: {truncate: flag}}"
)


@pytest.mark.sans_io
def test_a_misspelt_validator_fails_validate_with_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], _clean_registry: object
) -> None:
    path = write(tmp_path, BAD_VALIDATOR)

    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err.splitlines()

    assert len(err) == 1, err
    assert err[0].startswith(f"{path}:5: routes.chat.validators.truncate: 'truncate' is an unknown validator"), err
    assert "did you mean 'truncated'?" in err[0]
    with pytest.raises(PolicyError) as info:
        Resilience.from_file(path)
    assert info.value.problems == err  # the engine says the same thing, line included


@pytest.mark.sans_io
def test_validate_accepts_custom_validators_it_is_told_about(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], _clean_registry: object
) -> None:
    path = write(tmp_path, BAD_VALIDATOR.replace("truncate: flag", "has_citation: flag"))

    assert main(["validate", str(path)]) == 1
    assert main(["validate", "--validator", "has_citation", str(path)]) == 0


@pytest.mark.sans_io
def test_a_registered_custom_validator_may_count_toward_the_breaker(tmp_path: Path, _clean_registry: object) -> None:
    text = BAD_VALIDATOR.replace("truncate: flag", "has_citation: fall_back").replace(
        "default: {fail_max: 3, reset_timeout_s: 30}",
        "default: {fail_max: 3, reset_timeout_s: 30, count: [timeout, has_citation]}",
    )
    path = write(tmp_path, text)
    with pytest.raises(PolicyError) as info:
        Policy.from_file(path)
    assert [p.split(": ")[1] for p in info.value.problems] == [
        "routes.chat.validators.has_citation",
        "breakers.default.count[1]",
    ]
    assert "'has_citation' is neither an error kind nor a validator" in info.value.problems[1]

    register_validator("has_citation", lambda response, request: True)
    policy = Policy.from_file(path)

    assert "has_citation" in policy.breaker_settings("big").count


@pytest.mark.sans_io
def test_a_validator_declared_at_load_must_be_registered_before_the_engine(
    tmp_path: Path, _clean_registry: object
) -> None:
    path = write(tmp_path, BAD_VALIDATOR.replace("truncate: flag", "has_citation: flag"))
    policy = Policy.from_file(path, validators=["has_citation"])

    with pytest.raises(PolicyError) as info:
        Resilience(policy)
    assert info.value.problems[0].startswith(f"{path}:5: routes.chat.validators.has_citation: ")

    register_validator("has_citation", lambda response, request: True)
    Resilience(policy)
