"""The incident replay's decision count in simulated time: requests to the sick primary at 20-200 calls/s.

``incident.py`` measures through litellm's real HTTP path, so at 100-200 calls/s the figures also
carry this machine's CPU (the client alone saturates two cores near 150 calls/s). This script
replays the same scenario (primary ~60 ms -> ~1.2 s -> healthy, fast ~40 ms, lognormal, Poisson
arrivals) with the same policies (e)-(g) against the real decision core (planner, breakers,
latency windows) in simulated time (``llm-resilience simulate``'s engine): no client CPU, the same
table for the same seed. Beside each count: the *floor*, the calls sent between the spike's start
and one soft timeout later (no rule that needs one request past its soft timeout to suspect a
model can avoid them), plus the half-open probes.

Run ``.venv/bin/python benchmarks/incident_sim.py`` (~30 s); it writes ``results/incident-sim.md``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import _common as c  # first: litellm's offline switches
import incident
import yaml

from llm_resilience._policy import Policy
from llm_resilience._scenario import load_scenario
from llm_resilience._simulate import Simulation

KINDS = {"f": ("adaptive", "adaptive"), "g": ("hedged", "adaptive+hedge")}


def scenario_yaml(scn: incident.Scenario) -> str:
    """The incident as a ``llm-resilience simulate`` scenario (lognormal p99 = median x exp(2.326 sigma))."""
    p99 = 2.326 * scn.sigma

    def lat(median: float) -> dict[str, float]:
        return {"p50": median, "p99": median * math.exp(p99)}

    doc = {
        "name": f"incident replay at {scn.rate_per_s:g} calls/s",
        "seed": scn.seed,
        "tokens": {"input": incident.PROMPT_TOKENS, "output": incident.COMPLETION_TOKENS},
        "traffic": {"default": scn.rate_per_s},
        "models": {"primary": {"latency_s": lat(scn.primary_s)}, "*": {"latency_s": lat(scn.fast_s)}},
        "phases": [
            {"name": "healthy", "duration_s": scn.healthy_s},
            {
                "name": "spike",
                "duration_s": scn.spike_s,
                "models": {"primary": {"latency_s": lat(scn.spike_latency_s)}},
            },
            {"name": "recovered", "duration_s": scn.recovery_s},
        ],
    }
    return yaml.safe_dump(doc, sort_keys=False)


def measure(scn: incident.Scenario, kind: str, workdir: Path) -> dict[str, float]:
    urls = dict.fromkeys(incident.WIRE_MODEL, "http://127.0.0.1:9/v1")  # never contacted
    policy_path = workdir / f"{kind}.yaml"
    policy_path.write_text(yaml.safe_dump(incident.engine_policy(scn, urls, kind)), encoding="utf-8")
    scenario_path = workdir / f"spike-{scn.rate_per_s:g}.yaml"
    scenario_path.write_text(scenario_yaml(scn), encoding="utf-8")
    result = Simulation(Policy.from_file(policy_path), load_scenario(str(scenario_path)), scn.seed).run()
    records = [r for call in result.calls for r in call.records]
    sent = [r for r in records if r.model == "primary" and r.outcome != "skipped"]
    in_spike = [r for r in sent if scn.in_spike(r.started_at)]
    probes = sum(1 for r in in_spike if r.extra.get("probe"))
    healthy = [r for r in sent if r.started_at < scn.spike_start and "soft_timeout_s" in r.extra]
    soft = statistics.median(float(r.extra["soft_timeout_s"]) for r in healthy[-200:])
    spike_calls = [call for call in result.calls if scn.in_spike(call.started_s)]
    arrivals = [call.started_s for call in result.calls]
    floor = sum(1 for t in arrivals if scn.spike_start <= t < scn.spike_start + soft) + probes
    first_verdict = min(
        (r.started_at + r.latency_s for r in in_spike if r.reason == "soft_timeout"), default=float("nan")
    )
    latencies = [call.ended_s - call.started_s for call in spike_calls]
    suspect_skips = sum(1 for r in records if r.reason == "suspect" and scn.in_spike(r.started_at))
    return {
        "sick": len(in_spike),
        "probes": probes,
        "floor": floor,
        "soft": soft,
        "verdict_after": first_verdict - scn.spike_start,
        "spike_p99": c.percentile(latencies, 99),
        "success": sum(call.ok for call in spike_calls) / len(spike_calls),
        "suspect_skips": suspect_skips,
    }


def _spread(values: Sequence[float], fmt: Callable[[float], str] = lambda v: f"{v:g}") -> str:
    """Median, and the range over the seeds when they differ."""
    lo, mid, hi = min(values), statistics.median(values), max(values)
    return fmt(mid) if lo == hi else f"{fmt(mid)} ({fmt(lo)}-{fmt(hi)})"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--rates", type=float, nargs="+", default=[20, 100, 200])
    p.add_argument("--seeds", type=int, default=5, help="runs per row, seeds 2024, 2025, ...")
    p.add_argument("--out", type=Path, default=c.RESULTS_DIR)
    args = p.parse_args(argv)
    rows = []
    scn = incident.DEFAULT
    with tempfile.TemporaryDirectory() as tmp:
        for rate in args.rates:
            for key, (kind, name) in KINDS.items():
                print(f"  {rate:g}/s ({key}) ...", file=sys.stderr, flush=True)
                runs = [
                    measure(replace(scn, rate_per_s=rate, seed=scn.seed + i), kind, Path(tmp))
                    for i in range(args.seeds)
                ]

                def col(key: str, runs: list[dict[str, float]] = runs) -> list[float]:
                    return [r[key] for r in runs]

                rows.append(
                    [
                        f"{rate:g}",
                        f"({key}) llm-resilience {name}",
                        _spread(col("sick")),
                        _spread(col("floor")),
                        _spread([scn.fail_max + v + 2 for v in col("probes")]),
                        _spread(col("soft"), c.fmt_ms),
                        _spread(col("verdict_after"), c.fmt_ms),
                        _spread(col("suspect_skips")),
                        _spread(col("success"), lambda v: f"{100 * v:.1f} %"),
                        _spread(col("spike_p99"), c.fmt_ms),
                    ]
                )
    headers = [
        "calls/s",
        "system",
        "to sick primary",
        "floor: sent within one soft timeout of the spike + probes",
        "target (fail_max + probes + 2)",
        "soft timeout, healthy (ms)",
        "first verdict, after the spike began (ms)",
        "skipped as suspect",
        "spike success",
        "spike p99 ms",
    ]
    text = "\n".join(
        [
            "# Incident replay in simulated time: requests to the sick primary",
            "",
            f"`{c.command_line()}` — {c.environment_line()}. Simulated time: no client CPU, deterministic.",
            "",
            f"Scenario and policies (f), (g) of `incident.py`: primary ~{scn.primary_s * 1000:.0f} ms, "
            f"~{scn.spike_latency_s * 1000:.0f} ms from t={scn.spike_start:g} s to t={scn.spike_end:g} s, "
            f"fast ~{scn.fast_s * 1000:.0f} ms (lognormal, sigma {scn.sigma:g}); fail_max {scn.fail_max}, "
            f"reset {scn.reset_s:g} s, soft timeout p{scn.soft_percentile:g}, (g) hedges at p95. "
            f"Median (min-max) over {args.seeds} seeds from {scn.seed}.",
            "",
            c.markdown_table(headers, rows, "llrrrrrrrr"),
            "",
        ]
    )
    c.write_text(args.out / "incident-sim.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
