"""The `init` starter policy, unedited, against the 16 failover scenarios of the fault suite.

    python benchmarks/starter_scenarios.py [--out benchmarks/results/starter-scenarios.md] [--label NAME]

The policy is exactly what ``llm-resilience init --chain openai/gpt-4o,openai/gpt-4o-mini`` writes:
its models have no ``api_base``, so litellm sends both to ``OPENAI_BASE_URL``, here one loopback fake
provider that tells the two models apart by name. The primary (``gpt-4o``) has the fault; the fallback
(``gpt-4o-mini``) is healthy. Each scenario runs in sync, async, sync stream and async stream (stream
faults in the stream modes only), each call on a fresh engine (closed breakers).

A cell is ``rescued`` when the call returned the whole answer (for a stream cut mid-answer: the text
the primary sent, then the rest, each word once), else what the caller got. ``content-filter 400`` is
the request's own fault: raising it is the right outcome (``raised (right)``).

The scenario list mirrors ``tests/test_fault_scenarios.py`` (written from the failover benchmark's
descriptions), with the starter's own timing (10 s per attempt, 30 s per call) instead of the suite's
short one; it uses only fake-provider behaviours every version of the package has, so the same file
measures an older checkout (``PYTHONPATH=OLD_CHECKOUT python benchmarks/starter_scenarios.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _common as c  # first: sets litellm's offline switches before anything imports it

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import llm_resilience
from llm_resilience import Policy, Resilience
from llm_resilience._starter import render_starter
from llm_resilience.testing import Behavior, FakeProvider

MODES = ("sync", "async", "sync stream", "async stream")
STREAMS = ("sync stream", "async stream")
MESSAGES = [{"role": "user", "content": "Name three rivers."}]
HEALTHY = "The Nile, the Amazon and the Yangtze."
PRIMARY = "Rivers: the Danube, the Rhine and the Elbe."
HEALTHY_FALLBACK = Behavior(content=HEALTHY)
CUT = Behavior(content=PRIMARY, chunks=6, inter_chunk_s=0.05, cut_after_chunks=3)


@dataclass(frozen=True)
class Scenario:
    name: str
    behavior: Behavior
    modes: tuple[str, ...] = MODES
    fallback: Behavior = HEALTHY_FALLBACK
    refused: bool = False  # the request itself is at fault: raising is right


SCENARIOS = [
    Scenario("429 with Retry-After (1 s)", Behavior.error(429, retry_after_s=1.0)),
    Scenario("429 without Retry-After", Behavior.error(429)),
    Scenario("500", Behavior.error(500)),
    Scenario("503", Behavior.error(503)),
    Scenario("connection reset", Behavior(body="reset")),
    Scenario("silent provider", Behavior(body="hang")),
    Scenario("slow first token (60 s)", Behavior.slow(60.0)),
    Scenario("stream cut after content", CUT, modes=STREAMS),
    Scenario(
        "stream stall after content",
        Behavior(content=PRIMARY, chunks=6, inter_chunk_s=60.0),
        modes=STREAMS,
    ),
    Scenario("malformed SSE event / body", Behavior(body="malformed")),
    Scenario("stream without [DONE]", Behavior(content=PRIMARY, no_done=True), modes=STREAMS),
    Scenario("context-length 400", Behavior.context_length_exceeded()),
    Scenario(
        "content-filter 400",
        Behavior.error(400, "The response was filtered: content management policy.", code="content_filter"),
        refused=True,
    ),
    Scenario(
        "fallback rejects assistant prefill",
        CUT,
        modes=STREAMS,
        fallback=Behavior(content=HEALTHY, reject_prefill=True),
    ),
    Scenario("primary flaps (503 once, then healthy)", Behavior.error(503)),
    Scenario("fallback model name and usage visible", Behavior.error(503)),
]


def starter_engine(directory: Path) -> Resilience:
    path = directory / "policy.yaml"
    path.write_text(render_starter(("openai/gpt-4o", "openai/gpt-4o-mini")), encoding="utf-8")
    return Resilience(Policy.from_file(path))


def run(mode: str, engine: Resilience) -> tuple[str, Any, BaseException | None]:
    """(text the caller got, response or stream, error)."""
    if mode == "sync":
        try:
            response = engine.completion("chat", MESSAGES)
            return response.choices[0].message.content or "", response, None
        except Exception as e:
            return "", None, e
    if mode == "sync stream":
        parts: list[str] = []
        try:
            stream = engine.completion("chat", MESSAGES, stream=True, stream_options={"include_usage": True})
            with stream:
                for chunk in stream:
                    parts.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
            return "".join(parts), stream, None
        except Exception as e:
            return "".join(parts), None, e
    return asyncio.run(_run_async(mode, engine))


async def _run_async(mode: str, engine: Resilience) -> tuple[str, Any, BaseException | None]:
    parts: list[str] = []
    try:
        if mode == "async":
            response = await engine.acompletion("chat", MESSAGES)
            return response.choices[0].message.content or "", response, None
        stream = await engine.acompletion("chat", MESSAGES, stream=True, stream_options={"include_usage": True})
        async with stream:
            async for chunk in stream:
                parts.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
        return "".join(parts), stream, None
    except Exception as e:
        return "".join(parts), None, e


def judge(scenario: Scenario, text: str, error: BaseException | None) -> str:
    if scenario.refused:
        return "raised (right)" if error is not None else "answered (wrong)"
    if error is not None:
        return f"not rescued: {type(error).__name__}"
    if scenario.name == "malformed SSE event / body" and text and text != HEALTHY:
        # a stream's malformed first event skipped in place: the primary's answer without that piece
        return "answered, first piece lost" if text != PRIMARY else "rescued"
    wanted = {HEALTHY, PRIMARY}
    if scenario.behavior is CUT or "stall" in scenario.name:
        # the primary's first part, then the rest from the fallback: not a fresh answer glued on
        return (
            "rescued"
            if text.startswith(PRIMARY[:5]) and text.rstrip().endswith(HEALTHY[-8:])
            else f"not rescued: {text!r}"
        )
    return "rescued" if text in wanted else f"wrong text: {text!r}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--label", default="this checkout")
    args = parser.parse_args()
    cells: dict[tuple[str, str], str] = {}
    seconds: dict[tuple[str, str], float] = {}
    with FakeProvider() as provider, tempfile.TemporaryDirectory() as tmp:
        os.environ["OPENAI_API_KEY"] = "sk-starter-scenarios"
        os.environ["OPENAI_BASE_URL"] = os.environ["OPENAI_API_BASE"] = provider.base_url
        llm_resilience.warm_up()
        for scenario in SCENARIOS:
            for mode in scenario.modes:
                provider.wait_idle(5.0)
                provider.reset(behaviors=True)
                provider.set(scenario.behavior, model="gpt-4o")
                provider.set(scenario.fallback, model="gpt-4o-mini")
                if scenario.name.startswith("primary flaps"):
                    provider.script(scenario.behavior, model="gpt-4o")
                    provider.set(Behavior(content=PRIMARY), model="gpt-4o")
                engine = starter_engine(Path(tmp))
                started = time.monotonic()
                text, _result, error = run(mode, engine)
                seconds[(scenario.name, mode)] = time.monotonic() - started
                cells[(scenario.name, mode)] = judge(scenario, text, error)
                took = seconds[(scenario.name, mode)]
                print(f"{scenario.name:45} {mode:13} {took:6.2f} s  {cells[(scenario.name, mode)]}")
    report = render(cells, seconds, args.label)
    if args.out:
        args.out.write_text(report, encoding="utf-8")
    print(report)
    return 0


def render(cells: dict[tuple[str, str], str], seconds: dict[tuple[str, str], float], label: str) -> str:
    lines = [
        f"# The `init` starter policy against the failover scenarios ({label})",
        "",
        c.environment_line() + ".",
        "",
        f"`python benchmarks/starter_scenarios.py`; load average {os.getloadavg()[0]:.1f} at the end. "
        "Cell: outcome (seconds the call took).",
        "",
        "| scenario | " + " | ".join(MODES) + " |",
        "|---|" + "---|" * len(MODES),
    ]
    for scenario in SCENARIOS:
        row = [
            f"{cells[(scenario.name, m)]} ({seconds[(scenario.name, m)]:.1f})" if (scenario.name, m) in cells else "—"
            for m in MODES
        ]
        lines.append(f"| {scenario.name} | " + " | ".join(row) + " |")
    rescued = sum(1 for v in cells.values() if v in ("rescued", "raised (right)"))
    lines += ["", f"{rescued} of {len(cells)} calls rescued (or rightly raised)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
