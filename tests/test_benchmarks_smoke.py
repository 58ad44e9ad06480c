"""The benchmarks still run: each once with tiny parameters, checking what it reports, never timings.

They run as the Makefile runs them (``python benchmarks/<script>.py``), in a subprocess, writing
into a temporary directory instead of ``benchmarks/results/``.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SYSTEMS = list("abcdefgh")


def run_benchmark(script: str, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args, "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=110,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def table_rows(markdown: str, first_header: str) -> list[list[str]]:
    """Cells of the data rows of the table whose first column header is ``first_header``."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return rows


def test_incident_benchmark_reports_every_system_targets_and_a_plot(tmp_path: Path) -> None:
    proc = run_benchmark(
        "incident.py", tmp_path, "--healthy-s", "0.4", "--spike-s", "0.4", "--recovery-s", "0.3", "--reset-s", "0.2"
    )
    report = (tmp_path / "incident.md").read_text(encoding="utf-8")
    assert report.strip() in proc.stdout  # the same table on stdout and in the file

    rows = {re.match(r"\((\w)\)", r[0]).group(1): r for r in table_rows(report, "system")}  # type: ignore[union-attr]
    assert list(rows) == SYSTEMS
    success, sick, extra, back = 1, 8, 9, 10
    # A single model sends every spike call to the sick primary and never routes away from it.
    assert int(rows["a"][sick]) > 0
    assert rows["a"][back] == "never left"
    assert rows["a"][extra] == "0"
    # Every attempt of the naive loop times out during the spike: it retries the sick primary.
    assert "retries" in rows["b"][extra]
    assert int(rows["b"][sick]) > 0
    # The oracle never touches the primary and always answers.
    assert rows["h"][sick] == "0"
    assert rows["h"][back] == "never on primary"
    assert rows["h"][success] == "100.0 %"

    targets = table_rows(report, "target")
    assert len(targets) == 5
    assert all(t[-1] in ("PASS", "**FAIL**") for t in targets)
    assert (tmp_path / "incident.png").read_bytes().startswith(b"\x89PNG")


def test_concurrent_incident_runs_providers_in_processes_and_dumps_the_attempts(tmp_path: Path) -> None:
    run_benchmark(
        "incident.py", tmp_path, "--rate", "40", "--systems", "dgh", "--no-plot", "--attempts", str(tmp_path),
        "--healthy-s", "0.6", "--spike-s", "0.4", "--recovery-s", "0.3", "--reset-s", "0.2",
    )  # fmt: skip
    report = (tmp_path / "incident-40rps.md").read_text(encoding="utf-8")
    assert "its own OS process" in report
    assert "](incident-40rps.png)" in report  # its own plot, not the 20 calls/s one
    assert re.search(r"Measured \d{4}-\d\d-\d\d \d\d:\d\d UTC on .+, \d+ CPUs", report)  # when, and on what
    rows = {re.match(r"\((\w)\)", r[0]).group(1): r for r in table_rows(report, "system")}  # type: ignore[union-attr]
    assert list(rows) == list("dgh")
    assert rows["h"][8] == "0" and rows["h"][1] == "100.0 %"  # counted by the provider processes
    assert int(rows["d"][8]) > 0  # the Router sends spike calls to the sick primary (its first failures)
    targets = [t[0] for t in table_rows(report, "target")]
    assert any("one soft timeout of the spike" in t for t in targets)
    lines = (tmp_path / "incident-40rps-attempts.jsonl").read_text(encoding="utf-8").splitlines()
    assert lines and all('"system": "g"' in line for line in lines)


def test_incident_simulation_reports_requests_to_the_sick_primary_beside_the_floor(tmp_path: Path) -> None:
    run_benchmark("incident_sim.py", tmp_path, "--rates", "50", "--seeds", "1")
    rows = table_rows((tmp_path / "incident-sim.md").read_text(encoding="utf-8"), "calls/s")
    assert [r[1] for r in rows] == ["(f) llm-resilience adaptive", "(g) llm-resilience adaptive+hedge"]
    assert all(int(r[2]) > 0 and int(r[3]) > 0 for r in rows)


def test_overhead_benchmark_reports_each_mode_and_the_import_delta(tmp_path: Path) -> None:
    proc = run_benchmark(
        "overhead.py", tmp_path, "--blocks", "2", "--calls", "5", "--concurrency", "10", "--import-runs", "1"
    )
    report = (tmp_path / "overhead.md").read_text(encoding="utf-8")
    assert report.strip() in proc.stdout

    rows = table_rows(report, "mode")
    assert [r[0] for r in rows] == [
        "sync",
        "sync, tracing off (reference)",
        "sync, tracing off + 2 bare SDK spans (reference: the SDK's floor)",
        "sync, tracing on, BatchSpanProcessor + OTLP/HTTP exporter (what OTEL_EXPORTER_OTLP_ENDPOINT gives)",
        "async",
        "async x10",
    ]
    for row in rows:
        bare, ours, ratio = (float(x.strip("*")) for x in row[1:4])
        assert bare > 0 and ours > 0
        assert abs(ratio - ours / bare) < 0.01  # the ratio is of the two medians shown
        assert row[-1] in ("PASS", "**FAIL**", "—")
    calls = {row[0]: re.fullmatch(r"([\d,]+) / ([\d,]+) \(\*\*([\d.]+)\*\*\)", row[7]) for row in rows}
    for mode in ("sync", "sync, tracing off (reference)", "async"):
        counted = calls[mode]
        assert counted is not None, mode
        bare_calls, our_calls = (float(counted.group(i).replace(",", "")) for i in (1, 2))
        assert our_calls > bare_calls > 1000  # litellm alone makes thousands; ours adds to them
    assert rows[1][-1] == rows[2][-1] == "—"  # references are not held to the target
    spans = re.search(r"(\d+) spans per call", report)
    assert spans is not None and int(spans.group(1)) > 0  # tracing really was on
    assert re.search(r"\*\*delta\*\* \| \*\*[+-]\d+\*\*", report)


def test_burst_benchmark_reports_every_contestant_for_each_burst(tmp_path: Path) -> None:
    proc = run_benchmark(
        "burst.py", tmp_path, "--bursts", "5", "--threads", "3", "--throughput", "5", "--warm", "2", "--after", "2",
        "--rounds", "2",
    )  # fmt: skip
    report = (tmp_path / "burst.md").read_text(encoding="utf-8")
    assert report.strip() in proc.stdout

    rows = table_rows(report, "burst")
    assert [(r[0], r[1]) for r in rows] == [
        *[("5 acompletion", c) for c in ("llm-resilience", "LiteLLM Router", "bare litellm")],
        ("5 acompletion", "llm-resilience, deadline 30 s"),  # the throughput run (bare litellm's row is reused)
        *[(f"3 threads (round {n})", c) for n in (1, 2) for c in ("llm-resilience", "LiteLLM Router", "bare litellm")],
    ]
    ours = [r for r in rows if r[1] == "llm-resilience"]
    assert all(r[7].isdigit() and r[8].isdigit() for r in ours)  # breaker opens, client_overload attempts
    assert all(r[9] for r in rows)  # what the next calls got
    assert re.search(r"Throughput at 5 concurrent .*\*\*\d+\.\d\dx\*\*", report)
    assert re.search(r"llm-resilience: \d of 2 rounds opened no breaker", report)
    assert re.search(r"- 3 threads: p50 / the Router's p50 per round: \d+\.\d\d, \d+\.\d\d", report)


def test_spike_calls_benchmark_times_each_call_against_its_bound(tmp_path: Path) -> None:
    proc = run_benchmark(
        "spike_calls.py", tmp_path, "--runs", "1", "--modes", "sync", "--warm", "25", "--spike-calls", "5"
    )
    report = (tmp_path / "spike-calls.md").read_text(encoding="utf-8")
    assert report.strip() in proc.stdout

    rows = table_rows(report, "mode")
    assert [(r[0], r[2]) for r in rows] == [("sync", str(n)) for n in range(1, 6)]
    assert rows[0][4].isdigit()  # the first spike call tried the primary and waited for its hedge threshold
    assert rows[-1][4] == "— (breaker open)"  # three slow calls opened the breaker
    assert re.search(r"\*\*\d of \d\*\* spike calls that tried the primary were within target", report)


def test_mixed_callers_benchmark_reports_both_kinds_of_caller_for_each_system(tmp_path: Path) -> None:
    proc = run_benchmark(
        "mixed_callers.py", tmp_path, "--seconds", "1", "--threads", "2", "--tasks", "5", "--rounds", "1"
    )
    report = (tmp_path / "mixed-callers.md").read_text(encoding="utf-8")
    assert report.strip() in proc.stdout

    rows = table_rows(report, "system")
    systems = ("bare litellm", "llm-resilience", "llm-resilience sync + bare async", "bare sync + llm-resilience async")
    assert [(r[0], r[2]) for r in rows] == [(system, kind) for system in systems for kind in ("sync (2)", "async (5)")]
    for row in rows:
        assert int(row[3]) > 0  # calls really finished against the healthy provider
        assert row[-1] == "0"  # and none failed: nothing is cut at a 60 s timeout
