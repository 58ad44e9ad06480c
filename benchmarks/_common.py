"""Helpers shared by the benchmarks: offline litellm, percentiles, Markdown tables, output files.

Imported by ``incident.py`` and ``overhead.py`` as a sibling module (``python benchmarks/x.py`` puts
this directory first on ``sys.path``). Importing it never imports litellm.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import platform
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

# Before anything imports litellm: no network fetch of the cost map at import (see the shared notes).
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between ranks (numpy's default).

    ``nan`` for an empty sequence, so a table shows a gap instead of the benchmark crashing.
    """
    if not values:
        return math.nan
    data = sorted(values)
    pos = (len(data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    """The 50th percentile (``nan`` when empty)."""
    return percentile(values, 50.0)


def fmt_ms(seconds: float) -> str:
    """Seconds as whole milliseconds, ``—`` for a missing value."""
    if math.isnan(seconds):
        return "—"
    return f"{seconds * 1000:.0f}"


def fmt_s(seconds: float | None) -> str:
    """Seconds with two decimals, ``—`` for a missing value."""
    if seconds is None or math.isnan(seconds):
        return "—"
    return f"{seconds:.2f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: str = "") -> str:
    """A GitHub-flavoured Markdown table. ``align`` has one of ``l``/``r``/``c`` per column (default ``l``)."""
    marks = {"l": "---", "r": "--:", "c": ":-:"}
    spec = [marks[align[i]] if i < len(align) else "---" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(spec) + "|"]
    for row in rows:
        cells = [str(c).replace("|", "\\|").replace("\n", " ") for c in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def environment_line() -> str:
    """When and on what the numbers were measured (they mean little without it)."""
    versions = []
    for dist in ("litellm", "llm-resilience", "pybreaker", "opentelemetry-sdk"):
        try:
            versions.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            versions.append(f"{dist} ?")
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"Measured {when} on {machine()}. Python {platform.python_version()} on {platform.system()}; " + ", ".join(
        versions
    )


def machine() -> str:
    """The processor, core count and memory of this machine, e.g. ``AMD EPYC, 2 CPUs, 24 GiB``."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    parts = [cpu, f"{os.cpu_count() or 0} CPUs"]
    with contextlib.suppress(ValueError, OSError, AttributeError):
        parts.append(f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB")
    return ", ".join(parts)


def command_line() -> str:
    """The command that produced a result file, relative to the repository root."""
    script = Path(sys.argv[0])
    with contextlib.suppress(ValueError):  # run from elsewhere: keep the path as given
        script = script.resolve().relative_to(BENCH_DIR.parent)
    return " ".join([".venv/bin/python", str(script), *sys.argv[1:]])


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, creating the directory first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def load_average() -> str:
    """The machine's load average (1 / 5 / 15 min): other processes' CPU use makes timings noisy."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "unknown"
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"
