"""The ``llm-resilience`` command: validate, schema, and the incident demo."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tempfile
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from llm_resilience._demo import DEMO_KEY, load_demo_policy, run_demo
from llm_resilience._policy import json_schema
from llm_resilience.cli import main

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "policies" / "example.yaml"
SCHEMA_FILE = REPO / "policies" / "policy.schema.json"

BAD_POLICY = """\
models:
  big:
    litellm_params: {model: openai/gpt-4o}
routes:
  chat:
    chain: [big, medium]
prompt_classes:
  default: {timeout_s: 5, deadline_s: 1}
  summarize: {timeout_s: 1, deadline_s: 2, timeuot_s: 2}
"""


def test_console_script_points_at_main() -> None:
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "llm-resilience"]
    assert script.load() is main


# -- validate -----------------------------------------------------------------------------------


@pytest.mark.sans_io
def test_validate_accepts_a_good_policy(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"ok: {EXAMPLE} ")


@pytest.mark.sans_io
def test_validate_prints_every_problem_with_file_and_line_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_POLICY)
    assert main(["validate", str(bad)]) == 1
    captured = capsys.readouterr()
    assert "ok:" not in captured.out
    problems = captured.err.splitlines()
    assert len(problems) == 3, problems  # schema errors do not hide the cross-reference one (issue 12)
    assert problems[0].startswith(f"{bad}:6: routes.chat.chain[1]: unknown model 'medium'")
    assert problems[1].startswith(f"{bad}:8: prompt_classes.default: timeout_s (5.0) is longer than deadline_s")
    assert problems[2].startswith(f"{bad}:9: prompt_classes.summarize.timeuot_s: unknown key")


@pytest.mark.sans_io
def test_validate_reports_cross_reference_problems(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_POLICY.replace("timeuot_s", "idle_timeout_s").replace("deadline_s: 1}", "deadline_s: 9}"))
    assert main(["validate", str(bad)]) == 1
    assert f"{bad}:6: routes.chat.chain[1]: unknown model 'medium'" in capsys.readouterr().err


@pytest.mark.sans_io
def test_validate_checks_every_file_even_after_a_bad_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_POLICY)
    missing = tmp_path / "missing.yaml"
    assert main(["validate", str(bad), str(missing), str(EXAMPLE)]) == 1
    captured = capsys.readouterr()
    assert f"ok: {EXAMPLE}" in captured.out
    assert f"{bad}:8:" in captured.err
    assert f"{missing}: cannot read policy file" in captured.err


@pytest.mark.sans_io
def test_validate_refuses_an_empty_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "policy.yaml"
    empty.write_text("# to be written\n")

    assert main(["validate", str(empty)]) == 1
    assert f"{empty}:1: the file is empty" in capsys.readouterr().err


TYPOS = """\
models:
  big:
    litellm_params: {model: openai/gpt-4o, api_bse: "http://10.0.0.1/v1", vertex_project: p}
    contxt_window: 64000
    max_ouput_tokens: 900
routes:
  chat: {chain: [big], hedg: {after: 1}, retires: 2}
"""


@pytest.mark.sans_io
def test_validate_reports_every_unknown_key_of_a_section_and_litellm_params_typos_in_one_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(TYPOS)

    assert main(["validate", str(policy)]) == 1

    problems = capsys.readouterr().err.splitlines()
    expected = [
        ("3", "models.big.litellm_params.api_bse", "did you mean 'api_base'?"),
        ("4", "models.big.contxt_window", "did you mean 'context_window'?"),
        ("5", "models.big.max_ouput_tokens", "did you mean 'max_output_tokens'?"),
        ("7", "routes.chat.hedg", "did you mean 'hedge'?"),
        ("7", "routes.chat.retires", "did you mean 'retries'?"),
    ]
    assert len(problems) == len(expected), problems
    for problem, (line, field, hint) in zip(problems, expected, strict=True):
        assert problem.startswith(f"{policy}:{line}: {field}: ") and problem.endswith(hint), problem
    assert "vertex_project" not in "".join(problems)  # a provider option close to nothing litellm reads


@pytest.mark.sans_io
def test_validate_says_what_a_tab_is_and_where(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("models:\n  big:\n    litellm_params:\n\tmodel: openai/gpt-4o\n")

    assert main(["validate", str(policy)]) == 1
    assert capsys.readouterr().err.strip() == (
        f"{policy}:4: not valid YAML: a tab character (column 1); YAML indents with spaces only: "
        "replace the tab with spaces"
    )


@pytest.mark.sans_io
def test_validate_warns_about_every_unset_environment_variable_by_name(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BIG_API_KEY", raising=False)
    monkeypatch.setenv("SMALL_API_KEY", "sk-set")

    assert main(["validate", str(EXAMPLE)]) == 0  # a warning: CI may validate without the secrets

    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: {EXAMPLE}: models.big.litellm_params.api_key: os.environ/BIG_API_KEY is not set in this "
        "environment; calls skip 'big' (missing_api_key) until BIG_API_KEY is set"
    ]


# -- schema -------------------------------------------------------------------------------------


@pytest.mark.sans_io
def test_schema_prints_the_json_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json_schema()
    assert {"models", "routes", "prompt_classes", "breakers"} <= set(printed["properties"])


@pytest.mark.sans_io
def test_committed_schema_file_is_up_to_date() -> None:
    committed = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    assert committed == json_schema(), "policies/policy.schema.json is stale: run `make schema`"


# -- demo ---------------------------------------------------------------------------------------


def _summary_numbers(out: str) -> dict[str, int]:
    requests = re.search(r"^\s+requests\s+(\d+): (\d+) answered .*, (\d+) failed$", out, re.M)
    fallbacks = re.search(r"^\s+fallbacks\s+(\d+)", out, re.M)
    breaker = re.search(r"opened (\d+)\D+probe failed (\d+)\D+closed (\d+)", out)
    spike = re.search(r"got (\d+) of the (\d+) spike requests", out)
    assert requests and fallbacks and breaker and spike, out
    return {
        "requests": int(requests[1]),
        "answered": int(requests[2]),
        "failed": int(requests[3]),
        "fallbacks": int(fallbacks[1]),
        "opened": int(breaker[1]),
        "closed": int(breaker[3]),
        "primary_spike_requests": int(spike[1]),
        "spike_requests": int(spike[2]),
    }


def test_demo_replays_the_incident_falls_back_and_the_breaker_opens_and_closes() -> None:
    # Scale 0.1 (the demo's own): a 300 ms timeout against a 60 ms primary leaves room for a loaded machine
    # and for this VM's loopback wake-up latency after idle (up to ~0.4 s seen on a first request).
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.pop("NO_COLOR", None)
    proc = subprocess.run(
        [sys.executable, "-m", "llm_resilience.cli", "demo", "--requests", "30", "--scale", "0.1", "--quiet"],
        capture_output=True,
        text=True,
        timeout=90,
        env=env,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", "the demo must not print litellm (or any) noise"
    assert "\033[" not in proc.stdout, "no colour codes when stdout is not a terminal"
    n = _summary_numbers(proc.stdout)
    assert n["requests"] == n["answered"] == 30 and n["failed"] == 0
    assert n["fallbacks"] > 0
    assert n["opened"] >= 1 and n["closed"] >= 1
    story = re.search(r"#\d+ opened.*$", proc.stdout, re.M)
    assert story and story[0].endswith("closed"), "the breaker must end the demo closed again"
    # The point of the breaker: most spike requests never reached the sick primary.
    assert n["primary_spike_requests"] < n["spike_requests"]
    assert "Next: `llm-resilience init policy.yaml`" in proc.stdout
    assert not re.search(r"^ +\d+ +(healthy|spike|recovered) ", proc.stdout, re.M), "--quiet prints no request lines"


def test_demo_leaves_no_temporary_directory_and_keeps_the_review_log_only_where_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where mkdtemp & co. put things
    kept = tmp_path / "review.jsonl"

    assert run_demo(requests=30, scale=0.03, quiet=True, out=io.StringIO()) == 0
    assert list(scratch.iterdir()) == []
    out = io.StringIO()
    assert run_demo(requests=30, scale=0.03, quiet=True, out=out, review_log=kept) == 0

    assert list(scratch.iterdir()) == []
    lines = kept.read_text().splitlines()
    assert lines and all(json.loads(line)["event"] for line in lines)
    assert f"{len(lines)} lines (one per fallback) in {kept}" in out.getvalue()


CUSTOM_POLICY = """\
models:
  primary:
    litellm_params: {model: anthropic/claude-sonnet-4, api_key: sk-LITERAL-must-not-leave}
  backup:
    litellm_params: {model: openai/gpt-4o-mini, api_key: os.environ/DEMO_TEST_BACKUP_KEY, organization: org-x}
routes:
  main: {chain: [primary, backup]}
prompt_classes:
  default: {timeout_s: 6.0, deadline_s: 20.0}
breakers:
  default: {fail_max: 2, reset_timeout_s: 20.0}
"""


def test_demo_with_a_custom_policy_prints_one_line_per_request_that_matches_the_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy = tmp_path / "custom.yaml"
    # At scale 0.05: 300 ms timeout, 30 ms healthy, 600 ms sick. Scale 0.02 (120 ms timeout, 400 ms
    # deadline) left too little room on a loaded CI machine: one request now and then missed both models.
    policy.write_text(CUSTOM_POLICY)
    monkeypatch.setenv("DEMO_TEST_BACKUP_KEY", "sk-real-key")
    out = io.StringIO()
    assert run_demo(policy_path=policy, requests=20, scale=0.05, out=out, color=False) == 0
    text = out.getvalue()
    assert "→" not in text, "a stream without an encoding gets ASCII arrows"
    text = text.replace(" -> ", " → ")
    assert os.environ["DEMO_TEST_BACKUP_KEY"] == "sk-real-key", "the demo restores the key variables it replaced"
    lines = re.findall(r"^ +(\d+) +(healthy|spike|recovered) +(\S+) +(\d+) ms *(.*)$", text, re.M)
    assert [int(n) for n, *_ in lines] == list(range(1, 21))
    assert {model for _, _, model, _, _ in lines} == {"primary", "backup"}
    skipped = sum(1 for *_, why in lines if why == "primary skipped (breaker open) → backup")
    fell_back = sum(1 for _, _, model, _, _ in lines if model == "backup")
    n = _summary_numbers(text)
    assert fell_back == n["fallbacks"] > 0
    assert skipped > 0 and f"breaker open {skipped}" in text
    assert any(why == "primary probe ok → breaker closed" for *_, why in lines)
    assert "breaker primary: closed → open" in text
    assert "breaker primary: open → half-open → closed" in text


def test_demo_points_every_model_at_the_fakes_and_never_sends_a_literal_key(tmp_path: Path) -> None:
    policy = tmp_path / "custom.yaml"
    policy.write_text(CUSTOM_POLICY)
    demo = load_demo_policy(policy)
    assert (demo.route, demo.primary, demo.fallbacks) == ("main", "primary", ["backup"])
    assert demo.env_vars == ["DEMO_TEST_BACKUP_KEY"]
    built = demo.build("http://127.0.0.1:1/v1", "http://127.0.0.1:2/v1", 0.5, tmp_path)
    primary, backup = built.models["primary"].litellm_params, built.models["backup"].litellm_params
    assert primary == {"model": "openai/claude-sonnet-4", "api_base": "http://127.0.0.1:1/v1", "api_key": DEMO_KEY}
    assert backup == {
        "model": "openai/gpt-4o-mini",
        "api_base": "http://127.0.0.1:2/v1",
        "api_key": "os.environ/DEMO_TEST_BACKUP_KEY",
    }


def test_demo_scales_every_duration_of_the_policy() -> None:
    demo = load_demo_policy(EXAMPLE)
    built = demo.build("http://127.0.0.1:1/v1", "http://127.0.0.1:2/v1", 0.1, Path("/nonexistent"))
    original = load_demo_policy(EXAMPLE).build("http://a/v1", "http://b/v1", 1.0, Path("/nonexistent"))
    assert built.classes["default"].timeout_s == pytest.approx(original.classes["default"].timeout_s * 0.1)
    assert built.breaker_settings("big").reset_timeout_s == pytest.approx(
        original.breaker_settings("big").reset_timeout_s * 0.1
    )
    code, code_1 = built.classes["code"].soft_timeout, original.classes["code"].soft_timeout
    assert code is not None and code_1 is not None
    assert code.floor_s == pytest.approx(code_1.floor_s * 0.1)
    assert code.percentile == code_1.percentile, "a percentile is not a duration"
    extract, extract_1 = built.route_for("extract", "default").hedge, original.route_for("extract", "default").hedge
    assert extract is not None and extract_1 is not None
    assert extract.after == pytest.approx(float(extract_1.after) * 0.1)
    retries = built.route_for("chat", "code").retries
    retries_1 = original.route_for("chat", "code").retries
    assert retries is not None and retries_1 is not None
    assert retries.min_per_s == pytest.approx(retries_1.min_per_s / 0.1), "a rate scales the other way"


def test_demo_with_an_invalid_policy_prints_the_problems_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_POLICY)
    assert main(["demo", "--policy", str(bad)]) == 2
    assert f"{bad}:8:" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--requests", "3"], ["--scale", "0"], ["--scale", "fast"]])
def test_demo_rejects_settings_that_cannot_tell_the_story(args: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["demo", *args])
    assert exc.value.code == 2
