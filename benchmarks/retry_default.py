"""Same-model retry on a 429 / one 5xx, or fail over at once? Measured on the `init` starter's chain.

    python benchmarks/retry_default.py [--out benchmarks/results/retry-default.md] [--calls N]

The primary (``gpt-4o``) and its fallback (``gpt-4o-mini``) are one loopback fake provider; the
primary's fault is one of the shapes below, the fallback is healthy. Each call runs on a fresh engine
(closed breakers), sync, through litellm's real HTTP path. Policies compared: the starter as written
before this measurement (no retries: the chain is the retry), and the starter plus
``retries: {max_retries: 1, retry_on: [rate_limit, server_error], retry_after_max_s: 2}`` (a 429 whose
``Retry-After`` is longer than 2 s fails over at once). Reported per fault: the median call time and
which model answered (the primary is the model the application chose).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import _common as c  # first: sets litellm's offline switches before anything imports it

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import yaml

import llm_resilience
from llm_resilience import Policy, Resilience
from llm_resilience._starter import render_starter
from llm_resilience.testing import Behavior, FakeProvider

MESSAGES = [{"role": "user", "content": "Name three rivers."}]
FAULTS: dict[str, tuple[list[Behavior], Behavior]] = {
    # name: (scripted answers of the primary, its answer after the script)
    "one 503, then healthy": ([Behavior.error(503)], Behavior.ok("primary")),
    "503 throughout": ([], Behavior.error(503)),
    "one 429 (Retry-After 1 s), then healthy": ([Behavior.error(429, retry_after_s=1.0)], Behavior.ok("primary")),
    "429 (Retry-After 1 s) throughout": ([], Behavior.error(429, retry_after_s=1.0)),
    "429 (Retry-After 20 s) throughout": ([], Behavior.error(429, retry_after_s=20.0)),
}
RETRIES = {"max_retries": 1, "retry_on": ["rate_limit", "server_error"], "retry_after_max_s": 2.0}


def engine(directory: Path, retries: dict[str, Any] | None) -> Resilience:
    document = yaml.safe_load(render_starter(("openai/gpt-4o", "openai/gpt-4o-mini")))
    document["routes"]["chat"].pop("retries", None)
    if retries is not None:
        document["routes"]["chat"]["retries"] = retries
    return Resilience(Policy.from_dict(document))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--calls", type=int, default=10)
    args = parser.parse_args()
    rows = []
    with FakeProvider() as provider, tempfile.TemporaryDirectory() as tmp:
        os.environ["OPENAI_API_KEY"] = "sk-retry-default"
        os.environ["OPENAI_BASE_URL"] = os.environ["OPENAI_API_BASE"] = provider.base_url
        llm_resilience.warm_up()
        for fault, (script, after) in FAULTS.items():
            for label, retries in (("fail over at once", None), ("retry once", RETRIES)):
                times, answered = [], Counter()
                for _ in range(args.calls):
                    provider.wait_idle(5.0)
                    provider.reset(behaviors=True)
                    provider.set(Behavior.ok("fallback"), model="gpt-4o-mini")
                    provider.set(after, model="gpt-4o")
                    provider.script(*script, model="gpt-4o")
                    e = engine(Path(tmp), retries)
                    started = time.monotonic()
                    response = e.completion("chat", MESSAGES)
                    times.append(time.monotonic() - started)
                    answered[response._hidden_params["llm_resilience"]["model"]] += 1
                line = (fault, label, statistics.median(times), max(times), dict(answered))
                print(line)
                rows.append(line)
    lines = [
        "# Same-model retry or immediate failover (the starter's chain)",
        "",
        c.environment_line() + ".",
        "",
        f"`python benchmarks/retry_default.py --calls {args.calls}`; load average {os.getloadavg()[0]:.1f} at the "
        "end. Retry: `max_retries: 1, retry_on: [rate_limit, server_error], retry_after_max_s: 2`.",
        "",
        "| primary's fault | policy | median call | slowest | answered by |",
        "|---|---|---|---|---|",
    ]
    for fault, label, median, worst, answered in rows:
        who = ", ".join(f"{model} {n}" for model, n in sorted(answered.items()))
        lines.append(f"| {fault} | {label} | {median * 1000:.0f} ms | {worst * 1000:.0f} ms | {who} |")
    report = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(report, encoding="utf-8")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
