"""Which breaker reset default: fixed 30 s, fixed 10 s, or a short first reset with backoff?

    python benchmarks/breaker_reset.py [--out benchmarks/results/breaker-reset.md]

The real breaker (``_breakers.BreakerRegistry`` over pybreaker) on a virtual clock: a primary takes
5 calls/s; it fails every request during an outage of D seconds, then answers again. Measured per
setting and D: how long after the outage ended the primary answered its first call again (the
fallback answered meanwhile: cheaper or weaker answers for that long), and how many requests reached
the sick primary while it was down (each one a failed request some caller waited on before falling
back). ``fail_max`` is the starter primary's 3. Deterministic: no I/O, no sleeps.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import _common as c  # first: sets litellm's offline switches before anything imports it

from llm_resilience._breakers import Admission, BreakerRegistry
from llm_resilience._policy import Policy

RATE_PER_S = 5.0
OUTAGES_S = (3.0, 10.0, 30.0, 120.0, 600.0)
SHIFTS = 50  # each outage length is run 50 times, 0 to 9.8 s longer, so no setting gains from alignment
SETTINGS = {
    "fixed 30 s (the starter before)": {"reset_timeout_s": 30.0, "reset_backoff": {"factor": 1.0, "max_s": 30.0}},
    "fixed 10 s (the built-in before)": {"reset_timeout_s": 10.0, "reset_backoff": {"factor": 1.0, "max_s": 10.0}},
    "5 s, x2 per failed probe, max 60 s (the default now)": {
        "reset_timeout_s": 5.0,
        "reset_backoff": {"factor": 2.0, "max_s": 60.0},
    },
    "5 s, x2 per failed probe, max 30 s": {"reset_timeout_s": 5.0, "reset_backoff": {"factor": 2.0, "max_s": 30.0}},
    "2 s, x2 per failed probe, max 60 s": {"reset_timeout_s": 2.0, "reset_backoff": {"factor": 2.0, "max_s": 60.0}},
}


def simulate(breaker_cfg: dict[str, object], outage_s: float) -> tuple[float, int]:
    """(seconds from the outage's end to the primary's first answer, requests sent while it was down)."""
    policy = Policy.from_dict(
        {
            "models": {"primary": {"litellm_params": {"model": "openai/p"}}},
            "routes": {"chat": {"chain": ["primary"]}},
            "breakers": {"default": {"fail_max": 3, **breaker_cfg}},
        }
    )
    start = datetime(2030, 1, 1, tzinfo=UTC)
    now = [start]
    registry = BreakerRegistry(policy.breaker_settings, clock=lambda: now[0])
    breaker = registry.get("primary")
    step = 1.0 / RATE_PER_S
    sent_while_down = 0
    t = 0.0
    while t < outage_s + 3600:
        now[0] = start + timedelta(seconds=t)
        admission, ticket = breaker.admit_with_ticket()
        if admission in (Admission.ADMIT, Admission.PROBE):
            down = t < outage_s
            breaker.record(ticket, "server_error" if down else None)
            if down:
                sent_while_down += 1
            else:
                return t - outage_s, sent_while_down
        t += step
    return float("inf"), sent_while_down


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    lines = [
        "# Breaker reset: time to use a healed primary again, requests sent to it while down",
        "",
        c.environment_line() + ".",
        "",
        "`python benchmarks/breaker_reset.py` (virtual clock, the real breaker; primary at 5 calls/s, "
        "`fail_max` 3; each outage run 50 times, 0 to 9.8 s longer). Cell: mean (and worst) seconds until the "
        "healed primary answered again / mean requests that reached it while it was down.",
        "",
        "| reset | " + " | ".join(f"outage {d:g} to {d + 9.8:g} s" for d in OUTAGES_S) + " |",
        "|---|" + "---|" * len(OUTAGES_S),
    ]
    for name, cfg in SETTINGS.items():
        cells = []
        for outage in OUTAGES_S:
            runs = [simulate(cfg, outage + 0.2 * k) for k in range(SHIFTS)]
            back = sum(r[0] for r in runs) / SHIFTS
            worst = max(r[0] for r in runs)
            sent = sum(r[1] for r in runs) / SHIFTS
            cells.append(f"{back:.1f} s (max {worst:.0f}) / {sent:.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    report = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(report, encoding="utf-8")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
