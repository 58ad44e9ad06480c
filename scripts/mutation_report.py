"""The per-module kill rate of a mutmut run (``make mutate``), read from ``mutmut results --all true`` on stdin.

Raw kill rate = (killed + timeout + caught by type check) / mutants checked. The second rate leaves
out the survivors judged equivalent in ``mutation-equivalents.txt`` (one ``mutant name  # reason``
a line): they are neither killed nor counted. A listed name that is no longer a survivor (killed,
or renumbered after a code change) is reported, so the list cannot go stale silently.
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path

EQUIVALENTS = Path(__file__).resolve().parents[1] / "mutation-equivalents.txt"
KILLED = ("killed", "timeout", "caught by type check")


def equivalents() -> dict[str, str]:
    listed: dict[str, str] = {}
    if EQUIVALENTS.exists():
        for line in EQUIVALENTS.read_text(encoding="utf-8").splitlines():
            name, _, reason = line.partition("#")
            if name.strip():
                listed[name.strip()] = reason.strip()
    return listed


def main() -> int:
    status_of: dict[str, str] = {}
    for line in sys.stdin:
        name, _, status = line.strip().rpartition(": ")
        if name:
            status_of[name] = status
    listed = equivalents()
    counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for name, status in status_of.items():
        module = name.split(".")[1]
        counts[module][status] += 1
        if status == "survived" and name in listed:
            counts[module]["equivalent"] += 1
    header = (
        f"{'module':11} {'mutants':>7} {'killed':>6} {'timeout':>7} {'survived':>8} {'equiv.':>6} {'no tests':>8} "
        f"{'unchecked':>9} {'raw kill rate':>13} {'excl. equiv.':>12}"
    )
    print(header)
    print("-" * len(header))
    for module, c in sorted(counts.items()):
        total = sum(v for k, v in c.items() if k != "equivalent")
        checked = total - c["not checked"]
        killed = sum(c[k] for k in KILLED)
        raw = 100 * killed / max(checked, 1)
        excl = 100 * killed / max(checked - c["equivalent"], 1)
        print(
            f"{module:11} {total:7} {killed - c['timeout']:6} {c['timeout']:7} {c['survived']:8} {c['equivalent']:6} "
            f"{c['no tests']:8} {c['not checked']:9} {raw:12.1f}% {excl:11.1f}%"
        )
    stale = sorted(name for name in listed if status_of.get(name) != "survived")
    if stale:
        print(f"\n{len(stale)} listed equivalent(s) not among the survivors (killed or renumbered): {', '.join(stale)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
