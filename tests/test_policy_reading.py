"""Reading a policy file: its limits hold exactly where documented, and each problem has its true line.

README "Policy files": a file is at most 1,000,000 characters, 32 levels deep and 20,000 values once
aliases are expanded; anything else that is not a policy is a ``file:line`` problem, never a traceback.
These pin the limits at their boundary (the largest file accepted, the smallest refused), the line
of reader and decoder errors wherever they are in the file, YAML's own words, and what a valid file
means (empty file, merge keys, per-model values and breaker settings). Mutation testing found them
unpinned. All without a server.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import llm_resilience
from llm_resilience import Policy, PolicyError
from llm_resilience._policy import MAX_POLICY_BYTES, MAX_YAML_DEPTH, MAX_YAML_VALUES, ResetBackoff, redact_secrets

pytestmark = pytest.mark.sans_io  # no server: `make mutate` runs these for every mutant

MODELS = "models:\n  big: {litellm_params: {model: openai/x}}\n"


def problems(text: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        Policy.from_yaml(text)
    return info.value.problems


def nested(levels: int) -> str:
    """A top-level key whose value nests ``levels`` collections in all (the top mapping is the first)."""
    return "x: " + "[" * (levels - 1) + "1" + "]" * (levels - 1) + "\n"


# -- size, depth and value limits, at their boundary ------------------------------------------------


def test_a_file_of_exactly_the_size_limit_is_read_and_one_more_character_is_refused() -> None:
    head = "models: {}\n"
    padding = "#" * (MAX_POLICY_BYTES - len(head) - 1) + "\n"

    assert Policy.from_yaml(head + padding).models == {}
    assert problems(head + padding + "\n") == [
        f"<string>: the file is {MAX_POLICY_BYTES + 1:,} characters; a policy is at most {MAX_POLICY_BYTES:,}"
    ]


def test_nesting_up_to_the_depth_limit_is_read_and_one_level_more_is_refused() -> None:
    assert problems(nested(MAX_YAML_DEPTH)) == [
        "<string>:1: x: unknown key 'x' (expected one of: version, models, routes, prompt_classes, breakers, "
        "errors, review_log, telemetry, state)"
    ]
    assert problems(nested(MAX_YAML_DEPTH + 1)) == [
        f"<string>:1: nested more than {MAX_YAML_DEPTH} levels deep; not a policy"
    ]


def test_depth_is_how_deep_a_value_sits_not_how_many_collections_came_before() -> None:
    # 20 levels, one closed at once, then 12 more inside the 21st: 33 levels (the top mapping included).
    deep = "y: " + "[" * 20 + "[], " + "[" * 12 + "1" + "]" * 12 + "]" * 20 + "\n"
    siblings = "x: [[1], [2], [3], [4], [5], [6], [7], [8], [9], [10]]\n"

    assert problems(siblings + deep) == [f"<string>:2: nested more than {MAX_YAML_DEPTH} levels deep; not a policy"]


@pytest.mark.parametrize(
    ("text", "line"),
    [("models: {}\nm: &m [*m]\n", 2), ("models: {}\nm: &m {<<: *m}\n", 2), ("\n\nm: &m {x: *m}\n", 3)],
    ids=["through_a_list", "through_a_merge_key", "through_a_mapping"],
)
def test_an_alias_inside_itself_is_refused_as_nesting_on_its_line(text: str, line: int) -> None:
    assert problems(text) == [
        f"<string>:{line}: nested more than {MAX_YAML_DEPTH} levels deep (an alias inside itself?)"
    ]


def expanding_to(values: int) -> str:
    """A document of exactly ``values`` values once its aliases are expanded (collections count too)."""
    items = 99  # `a` is a list of 99 scalars: 100 values, repeated by each `*a`
    repeats, rest = divmod(values - 3 - (items + 1), items + 1)  # 3: the top mapping, `b`'s list, `c`'s list
    return f"a: &a [{', '.join(['1'] * items)}]\nb: [{', '.join(['*a'] * repeats)}]\nc: [{', '.join(['1'] * rest)}]\n"


def test_a_file_of_exactly_the_value_limit_is_read_and_one_value_more_is_refused() -> None:
    at_limit = problems(expanding_to(MAX_YAML_VALUES))
    over = problems(expanding_to(MAX_YAML_VALUES + 1))

    assert [p.split(": ")[:3] for p in at_limit] == [  # read: every key is looked at
        [f"<string>:{line}", key, f"unknown key '{key}' (expected one of"]
        for line, key in ((1, "a"), (2, "b"), (3, "c"))
    ]
    assert over == [f"<string>:3: more than {MAX_YAML_VALUES:,} values once aliases are expanded; not a policy"]


# -- the true line of every reading problem -------------------------------------------------------


def test_a_control_character_is_reported_on_its_own_line_counting_every_line() -> None:
    text = "\n# a leading blank line and a comment\nmodels: {a: \x07}\nroutes: {}\nstate: {}\n"

    assert problems(text) == [
        f"<string>:3: not valid YAML: control character #x0007 at position {text.index(chr(7))}; "
        "remove it (or write it as an escape in quotes)"
    ]


def test_a_byte_that_is_not_utf8_is_reported_on_its_own_line_counting_every_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"\nmodels: {}\nroutes: {}  # caf\xe9\nstate: {}\nerrors: {}\n")

    with pytest.raises(PolicyError) as info:
        Policy.from_file(path)

    assert info.value.problems == [f"{path}:3: not UTF-8 text (byte 0xe9); save it as UTF-8"]


def test_a_missing_file_says_why_it_cannot_be_read(tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as info:
        Policy.from_file(tmp_path / "nope.yaml")

    assert info.value.problems == [f"{tmp_path / 'nope.yaml'}: cannot read policy file: No such file or directory"]


def test_a_utf8_policy_is_read_as_utf8_whatever_the_locale(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(MODELS.replace("openai/x", "openai/café") + "routes:\n  chat: {chain: [big]}\n", encoding="utf-8")
    # The package this test imports (under `make mutate`, the mutated copy), in a plain C locale.
    env = {
        **os.environ,
        "LC_ALL": "C",
        "LANG": "C",
        "PYTHONUTF8": "0",
        "PYTHONCOERCECLOCALE": "0",
        "PYTHONPATH": str(Path(llm_resilience.__file__).parent.parent),
    }
    script = "import sys; from llm_resilience._policy import Policy; print(Policy.from_file(sys.argv[1]).models['big'])"

    proc = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, text=True, encoding="utf-8", env=env, timeout=60
    )

    assert proc.returncode == 0, proc.stderr
    assert "ModelSpec(name='big'" in proc.stdout


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("models: !!python/object:os.system {}\n", "<string>:1: not valid YAML: tag 'tag:yaml.org,2002:python/object:os.system' is not allowed"),  # noqa: E501
        ("- &x a\n- *y\n", "<string>:2: not valid YAML: found undefined alias 'y'"),
    ],
    ids=["tag", "undefined_alias"],
)  # fmt: skip
def test_yaml_problems_are_said_in_yamls_own_words(text: str, expected: str) -> None:
    assert problems(text) == [expected]


@pytest.mark.parametrize(("key", "shape"), [("[a, b]", "list"), ("{a: 1}", "mapping")])
def test_a_key_that_is_a_list_or_mapping_is_named_by_its_shape_and_line(key: str, shape: str) -> None:
    assert problems(MODELS + f"? {key}\n: 1\n") == [
        "<string>:3: (top level): a key must be a name, not a list or mapping",
        f"<string>:3: <{shape} at line 3>: unknown key '<{shape} at line 3>' (expected one of: version, models, "
        "routes, prompt_classes, breakers, errors, review_log, telemetry, state)",
    ]


# -- what a valid file means -------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "# nothing configured yet\n", "\n\n"])
def test_an_empty_policy_file_is_refused(text: str) -> None:
    # What an in-place rewrite looks like between its truncate and its write: never a policy to serve.
    with pytest.raises(PolicyError, match=r"^policy\.yaml:1: the file is empty"):
        Policy.from_yaml(text, source="policy.yaml")


def test_an_explicit_empty_mapping_is_the_built_in_policy() -> None:
    policy = Policy.from_yaml("{}\n")

    assert policy.models == {}
    assert policy.classes == Policy.defaults().classes
    assert policy.breaker_default == Policy.defaults().breaker_default


def test_a_merge_key_takes_each_value_from_the_first_mapping_that_has_it() -> None:
    text = (
        MODELS
        + "routes:\n  chat: {chain: [big]}\n"
        + "prompt_classes:\n"
        + "  quick: &quick {timeout_s: 1, deadline_s: 2}\n"
        + "  slow: &slow {timeout_s: 5, deadline_s: 20, max_output_tokens: 100}\n"
        + "  mixed: {<<: [*quick, *slow], deadline_s: 3}\n"
    )

    mixed = Policy.from_yaml(text).classes["mixed"]

    assert (mixed.timeout_s, mixed.deadline_s, mixed.max_output_tokens) == (1, 3, 100)


def test_a_models_declared_sizes_and_prices_reach_the_engine() -> None:
    text = (
        "models:\n  big:\n    litellm_params: {model: openai/x}\n    context_window: 8000\n"
        "    max_output_tokens: 512\n    input_cost_per_token: 0.000002\n    output_cost_per_token: 0.000008\n"
    )

    (spec,) = Policy.from_yaml(text).route_for("big", "default").chain

    assert (spec.context_window, spec.max_output_tokens) == (8000, 512)
    assert (spec.input_cost_per_token, spec.output_cost_per_token) == (0.000002, 0.000008)


def test_a_models_breaker_override_keeps_the_defaults_reset_backoff() -> None:
    text = MODELS + "breakers:\n  default: {reset_backoff: {factor: 3, max_s: 120}}\n  big: {fail_max: 2}\n"

    settings = Policy.from_yaml(text).breaker_settings("big")

    assert (settings.fail_max, settings.reset_backoff) == (2, ResetBackoff(factor=3, max_s=120))


def test_an_unset_variable_leaves_out_only_its_own_parameter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLMR_TEST_UNSET_KEY", raising=False)
    monkeypatch.setenv("LLMR_TEST_BASE", "http://127.0.0.1:9/v1")
    text = (
        "models:\n  big:\n    litellm_params:\n      model: openai/x\n"
        "      api_key: os.environ/LLMR_TEST_UNSET_KEY\n      api_base: os.environ/LLMR_TEST_BASE\n"
    )

    params, missing = Policy.from_yaml(text).models["big"].resolved_params()

    assert (params, missing) == ({"model": "openai/x", "api_base": "http://127.0.0.1:9/v1"}, "LLMR_TEST_UNSET_KEY")


def test_the_route_cache_stays_bounded_whatever_model_strings_callers_pass() -> None:
    policy = Policy.defaults()
    for i in range(4095):
        policy.route_for(f"openai/m{i}", "default")

    last_cached = policy.route_for("openai/last", "default")
    assert policy.route_for("openai/last", "default") is last_cached  # the 4,096th route is kept
    assert policy.route_for("openai/beyond", "default") is not policy.route_for("openai/beyond", "default")
    assert policy.route_for("openai/beyond", "default") == policy.route_for("openai/beyond", "default")


# -- secrets by shape ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("key sk-proj-Ab3dEf9hIjK1mN0pQr5tUv7xYz here", "key <redacted> here"),
        ("azure 3f9a1c0e7b2d48a6915fe3c07d2b8a41 here", "azure <redacted> here"),  # 32 hex digits
        ("at the bar aaaabbbbccccdddd1122334455667788", "at the bar <redacted>"),  # entropy exactly 3.5
        ("alias anthropic_claude_sonnet_latest_model_alias", "alias anthropic_claude_sonnet_latest_model_alias"),
        ("repeated a1b2a1b2a1b2a1b2a1b2a1b2a1b2a1b2a1b2", "repeated a1b2a1b2a1b2a1b2a1b2a1b2a1b2a1b2a1b2"),
    ],
    ids=["vendor_prefix", "hex_key", "threshold", "long_name_without_digits", "repetitive"],
)
def test_a_secret_shaped_token_is_replaced_and_other_text_is_kept(text: str, expected: str) -> None:
    assert redact_secrets(text) == expected
