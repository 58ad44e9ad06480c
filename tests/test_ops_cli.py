"""The command line ops use: init, explain, simulate, and a CLI that starts without litellm."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llm_resilience._planner import CallRequest
from llm_resilience._policy import Policy
from llm_resilience._resources import example_policy, scenario_names
from llm_resilience._scenario import load_scenario
from llm_resilience._simulate import Simulation, phase_stats
from llm_resilience._truncation import TokenFitter
from llm_resilience.cli import main

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "policies" / "example.yaml"

BAD_POLICY = """\
models:
  big:
    litellm_params: {model: openai/gpt-4o}
routes:
  chat:
    chain: [big]
prompt_classes:
  default: {timeout_s: 5, deadline_s: 1}
"""

# Two models, quick timings: one simulated minute per phase is plenty of traffic at 10/s.
SIM_POLICY = """\
models:
  big:
    litellm_params: {model: openai/gpt-4o, api_key: os.environ/SIM_TEST_UNSET_KEY}
    input_cost_per_token: 0.00001
    output_cost_per_token: 0.00003
  small:
    litellm_params: {model: openai/gpt-4o-mini}
    input_cost_per_token: 0.000001
    output_cost_per_token: 0.000002
routes:
  chat:
    chain: [big, small]
prompt_classes:
  default: {timeout_s: 2.0, deadline_s: 10.0}
breakers:
  default: {fail_max: 3, reset_timeout_s: 10.0, reset_backoff: {factor: 1.0, max_s: 10.0}}
"""

STORM = """\
name: test storm
seed: 3
tokens: {input: 100, output: 10}
traffic: {default: 10}
models:
  "*": {latency_s: {p50: 0.2, p99: 0.4}}
phases:
  - {name: healthy, duration_s: 60}
  - name: storm
    duration_s: 60
    models:
      big: {latency_s: 0.2, errors: [{rate: 1.0, status: 503}]}
  - {name: recovered, duration_s: 60}
"""


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llm_resilience.cli", *args], capture_output=True, text=True, timeout=120, cwd=cwd
    )


# -- start-up: no litellm unless a command needs it ------------------------------------------------


def test_help_validate_init_and_schema_never_import_litellm(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import contextlib, io, os, sys
        import llm_resilience
        assert os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] == "True", "offline switches are set at import"
        from llm_resilience.cli import main
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            with contextlib.suppress(SystemExit):
                main(["--help"])
            with contextlib.suppress(SystemExit):
                main(["simulate", "--help"])
            assert main(["validate", {str(EXAMPLE)!r}]) == 0
            assert main(["init", {str(tmp_path / "p.yaml")!r}]) == 0
            assert main(["schema"]) == 0
        print(sorted(m for m in sys.modules if m == "litellm" or m.startswith("litellm.")))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_public_names_load_on_first_use() -> None:
    import litellm

    import llm_resilience

    missing = [n for n in llm_resilience.__all__ if getattr(llm_resilience, n, None) is None]
    assert not missing, missing
    assert set(llm_resilience.__all__) <= set(dir(llm_resilience))
    assert issubclass(llm_resilience.AllAttemptsFailed, litellm.exceptions.ServiceUnavailableError)
    assert issubclass(llm_resilience.PolicyError, llm_resilience.LLMResilienceError)
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        llm_resilience.no_such_name  # noqa: B018


def test_every_command_has_examples_in_its_help() -> None:
    for command in ("init", "validate", "explain", "simulate", "demo", "schema"):
        proc = run_cli(command, "--help")
        assert proc.returncode == 0
        assert "examples:" in proc.stdout and f"llm-resilience {command}" in proc.stdout, command


# -- init ------------------------------------------------------------------------------------------


def test_init_writes_a_commented_starter_with_the_given_chain_that_validates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "prod.yaml"
    assert main(["init", str(target), "--chain", "anthropic/claude-sonnet-4-5,openai/gpt-4o-mini"]) == 0
    out = capsys.readouterr().out
    assert f"export LLM_RESILIENCE_POLICY={target.resolve()}" in out
    assert f"llm-resilience validate {target}" in out
    text = target.read_text()
    assert text.count("#") > 20, "a starter explains itself"
    policy = Policy.from_file(target)
    chain = policy.route_for("chat", "default").chain
    assert [spec.litellm_model for spec in chain] == ["anthropic/claude-sonnet-4-5", "openai/gpt-4o-mini"]
    assert chain[0].litellm_params["api_key"] == "os.environ/ANTHROPIC_API_KEY"
    assert policy.breaker_settings(chain[0].name).fail_max == 3


def test_init_refuses_to_overwrite_an_existing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "policy.yaml"
    target.write_text("mine\n")
    assert main(["init", str(target)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert target.read_text() == "mine\n"


def test_init_without_a_chain_writes_the_default_one(tmp_path: Path) -> None:
    target = tmp_path / "policy.yaml"
    assert main(["init", str(target)]) == 0
    route = Policy.from_file(target).route_for("chat", "default")
    assert [spec.litellm_model for spec in route.chain] == ["openai/gpt-4o", "openai/gpt-4o-mini"]
    assert route.on_interrupt == "continue" and "on_interrupt: continue" in target.read_text()
    # One breaker default: the starter writes what the library does when nothing is written.
    policy = Policy.from_file(target)
    assert policy.breaker_settings("gpt-4o-mini") == Policy.defaults().breaker_default
    assert route.retries is not None and (route.retries.max_retries, route.retries.retry_on) == (1, ["server_error"])


# -- explain ---------------------------------------------------------------------------------------


def test_explain_shows_the_class_chain_timing_rules_breakers_and_budgets(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", str(EXAMPLE), "--route", "chat", "--class", "summarize"]) == 0
    out = capsys.readouterr().out
    assert "chain: small -> big   (class 'summarize' has its own chain)" in out
    assert "timeouts: 1 s per attempt, 4 s for the whole call" in out
    assert "soft timeout: p95 of the model's recent latency" in out
    assert "hedging: start the next model beside a slow one after p90; at most 1 extra" in out
    assert "retries: off" in out
    assert "truncated fall_back" in out and "when every answer fails: return_best" in out
    # small: 128,000-token window, minus the class's 300 output tokens
    assert "input budget: 127,700 tokens" in out
    big = out[out.index("2. big") :]
    settings = Policy.from_file(EXAMPLE).breaker_settings("big")
    assert f"opens after {settings.fail_max} consecutive failures" in big
    assert f"one probe after {settings.reset_timeout_s:g} s" in big


def test_explain_with_a_prompt_says_per_model_whether_it_fits_is_truncated_or_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy_file = tmp_path / "p.yaml"
    policy_file.write_text(
        textwrap.dedent(
            """\
            models:
              wide: {litellm_params: {model: openai/gpt-4o}, context_window: 100000}
              narrow: {litellm_params: {model: openai/gpt-4o-mini}, context_window: 600}
              tiny: {litellm_params: {model: openai/gpt-4o-mini}, context_window: 40}
            routes:
              chat: {chain: [wide, narrow, tiny], truncation: {reserve_output_tokens: 100}}
            """
        )
    )
    history = [{"role": "system", "content": "You are terse and precise. " * 8}]  # longer than tiny's budget
    for i in range(12):
        history += [
            {"role": "user", "content": f"question {i} " + "word " * 60},
            {"role": "assistant", "content": "ok"},
        ]
    history.append({"role": "user", "content": "and the last question?"})
    prompt_file = tmp_path / "prompt.json"
    prompt_file.write_text(json.dumps(history))

    assert main(["explain", str(policy_file), "--route", "chat", "--messages-file", str(prompt_file)]) == 0
    out = capsys.readouterr().out
    lines = {m: next(line for line in out.splitlines()[i:] if "this prompt" in line) for m, i in _model_lines(out)}
    policy = Policy.from_file(policy_file)
    route = policy.route_for("chat", "default")
    narrow_fit = TokenFitter().fit(route.chain[1], history, route, policy.classes["default"], {}, 1.0)
    assert narrow_fit.truncated and narrow_fit.tokens_before is not None
    assert f"{narrow_fit.tokens_before:,} tokens: fits, sent unchanged" in lines["wide"]
    assert f"would be truncated to {narrow_fit.tokens_after:,} tokens" in lines["narrow"]
    assert "skipped (context_too_small)" in lines["tiny"]


def _model_lines(out: str) -> list[tuple[str, int]]:
    found = []
    for i, line in enumerate(out.splitlines()):
        stripped = line.strip()
        if stripped[:2] in ("1.", "2.", "3.") and "(" in stripped:
            found.append((stripped.split()[1], i))
    return found


def test_explain_classifies_a_prompt_with_the_policy_rules(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompt_file = tmp_path / "prompt.json"
    prompt_file.write_text(json.dumps({"messages": [{"role": "user", "content": "Summarize: the otters"}]}))
    assert main(["explain", str(EXAMPLE), "--route", "chat", "--messages-file", str(prompt_file)]) == 0
    assert "prompt class 'summarize' (what the policy's match rules pick for this prompt)" in capsys.readouterr().out


def test_explain_rejects_an_unknown_class_and_a_broken_policy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["explain", str(EXAMPLE), "--route", "chat", "--class", "poetry"]) == 2
    assert "prompt_class 'poetry' is not defined" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_POLICY)
    assert main(["explain", str(bad), "--route", "chat"]) == 2
    assert f"{bad}:8: prompt_classes.default: timeout_s (5.0) is longer than deadline_s" in capsys.readouterr().err


# -- simulate --------------------------------------------------------------------------------------


@pytest.fixture
def sim_files(tmp_path: Path) -> tuple[Path, Path]:
    policy, scenario = tmp_path / "policy.yaml", tmp_path / "storm.yaml"
    policy.write_text(SIM_POLICY)
    scenario.write_text(STORM)
    return policy, scenario


def simulate(policy: Path, scenario: Path, seed: int = 3) -> tuple[Simulation, list]:  # type: ignore[type-arg]
    pol, scn = Policy.from_file(policy), load_scenario(str(scenario))
    sim = Simulation(pol, scn, seed)
    result = sim.run()
    return sim, [phase_stats(result, phase) for phase in scn.phases]


def test_simulate_a_503_storm_opens_the_breaker_and_recovery_closes_it(sim_files: tuple[Path, Path]) -> None:
    sim, (healthy, storm, recovered) = simulate(*sim_files)
    assert healthy.answered_by["big"] == healthy.requests and not healthy.transitions
    # The storm: big's breaker opens, most calls skip big without a request, every call succeeds on small.
    assert storm.success == 1.0 and storm.answered_by["small"] == storm.requests
    assert ("big", "closed", "open") in [t[1:] for t in storm.transitions]
    assert storm.sent["big"] < storm.requests / 4, "an open breaker spares the sick model"
    assert storm.fallbacks["breaker_open"] > storm.fallbacks["server_error"]
    # A probe every reset_timeout_s (10 s) fails while the storm lasts, then one succeeds after it.
    assert [t[1:] for t in recovered.transitions][-1] == ("big", "half-open", "closed")
    assert recovered.answered_by["big"] > 0.9 * recovered.requests
    assert 0 < storm.cost_usd < healthy.cost_usd, "small is cheaper than big"
    assert sim.now < 200, "the clock is simulated: it ends near the scenario's 180 s"


def test_simulate_gives_the_same_table_for_the_same_seed_and_another_for_another(
    sim_files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    def table(seed: str) -> str:
        assert main(["simulate", str(sim_files[0]), "--scenario", str(sim_files[1]), "--seed", seed]) == 0
        return "\n".join(line for line in capsys.readouterr().out.splitlines() if "replayed:" not in line)

    first = table("5")
    assert "phase 'storm'" in first and "big: opened" in first
    assert table("5") == first
    assert table("6") != first


def test_simulate_waits_out_retry_after_before_retrying(tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(
        SIM_POLICY.replace(
            "chain: [big, small]",
            "chain: [big, small]\n    retries: {max_retries: 1, min_per_s: 100, retry_after_max_s: 5}",
        )
    )
    scenario = tmp_path / "wave.yaml"
    scenario.write_text(
        STORM.replace("errors: [{rate: 1.0, status: 503}]", "errors: [{rate: 0.5, status: 429, retry_after_s: 3}]")
    )
    sim = Simulation(Policy.from_file(policy), load_scenario(str(scenario)), 3)
    calls = sim.run().calls
    retried = [c for c in calls if any(r.retry_of is not None for r in c.records)]
    assert retried, "some 429s were retried on the same model"
    for call in retried:
        retry = next(r for r in call.records if r.retry_of is not None)
        failed = call.records[retry.retry_of]
        assert failed.reason == "rate_limit" and failed.extra["retry_after_s"] == 3
        assert retry.started_at - (failed.started_at + failed.latency_s) >= 3 - 1e-9


def test_simulate_compares_two_policies_side_by_side(
    sim_files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    edited = tmp_path / "edited.yaml"
    edited.write_text(SIM_POLICY.replace("fail_max: 3", "fail_max: 1000"))  # a breaker that never opens
    assert main(["simulate", str(sim_files[0]), str(edited), "--scenario", str(sim_files[1])]) == 0
    out = capsys.readouterr().out
    storm = out[out.index("phase 'storm'") : out.index("phase 'recovered'")]
    header, *rows = storm.splitlines()[1:]
    assert header.split() == ["policy.yaml", "edited.yaml"]
    transitions = next(row for row in rows if "breaker transitions" in row)
    assert "big: opened" in transitions and transitions.rstrip().endswith("-")
    sent = next(row for row in rows if "requests per model" in row)
    big_sent = [int(n.replace(",", "")) for n in _after(sent, "big ")]
    assert big_sent[0] < big_sent[1], "without a breaker every storm call still reaches big"


def _after(text: str, word: str) -> list[str]:
    parts = text.split(word)[1:]
    return [part.split(",")[0].split()[0] for part in parts]


def test_simulate_refuses_a_broken_policy_with_the_same_messages_as_validate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_POLICY)
    assert main(["validate", str(bad)]) == 1
    validated = capsys.readouterr().err
    assert main(["simulate", str(bad), "--scenario", "latency-spike"]) == 2
    assert capsys.readouterr().err == validated
    assert validated.startswith(f"{bad}:8: prompt_classes.default: timeout_s")


def test_a_broken_scenario_names_file_line_and_field(
    tmp_path: Path, sim_files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    scenario = tmp_path / "typo.yaml"
    scenario.write_text(STORM.replace("errors: [{rate: 1.0", "erors: [{rate: 1.0").replace("big:", "bigg:"))
    assert main(["simulate", str(sim_files[0]), "--scenario", str(scenario)]) == 2
    assert f"{scenario}:12: phases[1].models.bigg.erors: unknown key 'erors'" in capsys.readouterr().err
    scenario.write_text(STORM.replace("big:", "bigg:"))
    assert main(["simulate", str(sim_files[0]), "--scenario", str(scenario)]) == 2
    err = capsys.readouterr().err
    assert f"{scenario}:12: phases[1].models.bigg: 'bigg' is not a model of {sim_files[0]}" in err


def test_shipped_scenarios_fit_the_example_policy() -> None:
    assert {"latency-spike", "503-storm", "429-wave"} <= set(scenario_names())
    policy = Policy.from_file(example_policy())
    for name in scenario_names():
        scenario = load_scenario(name)
        scenario.check_against(policy)
        assert scenario.duration_s >= 1200, "an incident of twenty minutes or more"


def test_simulate_plot_without_matplotlib_says_what_to_install(
    sim_files: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("matplotlib", "matplotlib.pyplot"):
        monkeypatch.setitem(sys.modules, name, None)  # what `import matplotlib` meets where it is not installed
    target = tmp_path / "x.png"
    assert main(["simulate", str(sim_files[0]), "--scenario", str(sim_files[1]), "--plot", str(target)]) == 1
    captured = capsys.readouterr()
    assert "phase 'storm'" in captured.out, "the table is printed all the same"
    assert "--plot needs matplotlib" in captured.err and "llm-resilience[bench]" in captured.err
    assert not target.exists()


def test_simulate_plot_writes_a_png(sim_files: tuple[Path, Path], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "storm.png"
    assert main(["simulate", str(sim_files[0]), "--scenario", str(sim_files[1]), "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- packaging -------------------------------------------------------------------------------------


def test_the_repository_policies_are_the_packaged_ones() -> None:
    # policies/ is the single source: the wheel maps it to llm_resilience/_policies (pyproject.toml);
    # in a checkout the package reads it in place. `make wheel-check` checks the installed side.
    assert example_policy().resolve() == EXAMPLE.resolve()


def test_license_file_matches_the_declared_license() -> None:
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT"
    assert (REPO / "LICENSE").read_text().startswith("MIT License")
    assert "Typing :: Typed" in project["classifiers"]


def test_request_is_classified_like_the_engine_would(capsys: pytest.CaptureFixture[str]) -> None:
    # explain reuses Planner.classify: a metadata rule picks the class too.
    del capsys
    from llm_resilience._breakers import BreakerRegistry
    from llm_resilience._hooks import HookSet
    from llm_resilience._planner import Planner

    policy = Policy.from_file(EXAMPLE)
    planner = Planner(policy=policy, breakers=BreakerRegistry(policy.breaker_settings), hooks=HookSet([]))
    request = CallRequest(
        model="chat", messages=[{"role": "user", "content": "x"}], kwargs={"metadata": {"task": "summary"}}
    )
    assert planner.classify(request) == "summarize"
