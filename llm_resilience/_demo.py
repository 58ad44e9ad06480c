"""``llm-resilience demo``: replay the incident that started this project, on loopback.

The primary model ("big") answers in ~600 ms, then its latency jumps 20x for a minute
and a half, then it recovers; the fallback ("small") stays fast. Requests arrive at a
steady pace and go one at a time through a real engine, real litellm HTTP calls and
two :class:`~llm_resilience.testing.FakeProvider` servers, so every line printed is
something the library decided, not a simulation of it.

Three parts, kept apart so each can be read alone:

* the scenario, as data (:data:`INCIDENT`) and a runner that yields :class:`RequestResult`;
* the policy the demo runs: ``policies/example.yaml`` (or ``--policy``) with its models
  pointed at the fake providers and every duration multiplied by ``--scale``, so the
  story is the same at any speed;
* the printing (:class:`Printer`) and the summary (:func:`summarize`).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml

from ._engine import POLICY_ENV, Resilience
from ._env import litellm
from ._exceptions import AllAttemptsFailed, PolicyError
from ._hooks import Hook
from ._policy import ENV_PREFIX, Policy
from ._resources import example_policy
from .testing import Behavior, FakeProvider

EXAMPLE_POLICY = example_policy()
DEMO_KEY = "sk-demo-not-a-real-key"
PROMPT = [{"role": "user", "content": "Where is my order #1234? One sentence, please."}]

# ---------------------------------------------------------------------------------------------
# The scenario. Durations and latencies are the real incident's (scale 1); --scale shrinks them.


@dataclass(frozen=True)
class Phase:
    """A stretch of the incident during which the primary behaves one way."""

    name: str
    duration_s: float
    primary_latency_s: float
    """Median latency of the primary; each request draws around it (lognormal)."""
    headline: str
    """Printed when the phase starts; ``{primary}`` and ``{latency}`` are filled in."""


INCIDENT: tuple[Phase, ...] = (
    Phase("healthy", 30.0, 0.6, "{primary} answers in ~{latency}"),
    Phase("spike", 90.0, 12.0, "{primary}'s latency jumps 20x, to ~{latency}"),
    Phase("recovered", 45.0, 0.6, "{primary} is back to ~{latency}"),
)
FALLBACK_LATENCY_S = 0.4
LATENCY_SPREAD = 0.25
"""Sigma of the lognormal latency noise: most answers within ±30% of the median."""
DEFAULT_REQUESTS = 80
DEFAULT_SCALE = 0.1
SEED = 20241124


@dataclass(frozen=True)
class Slot:
    """When a request is sent, relative to the start, and in which phase."""

    number: int
    at_s: float
    phase: Phase


def schedule(requests: int, scale: float, phases: Sequence[Phase] = INCIDENT) -> list[Slot]:
    """Spread ``requests`` evenly over the incident's timeline (steady traffic)."""
    total = sum(p.duration_s for p in phases)
    interval = total / requests
    slots = []
    for i in range(requests):
        t = i * interval
        start = 0.0
        phase = phases[-1]
        for p in phases:
            if t < start + p.duration_s:
                phase = p
                break
            start += p.duration_s
        slots.append(Slot(number=i + 1, at_s=t * scale, phase=phase))
    return slots


def _lognormal(rng: random.Random, median_s: float) -> Callable[[], float]:
    return lambda: median_s * rng.lognormvariate(0.0, LATENCY_SPREAD)


# ---------------------------------------------------------------------------------------------
# The policy the demo runs.


@dataclass
class DemoPolicy:
    """A validated policy rewritten for the fake providers, and what the demo needs to know of it."""

    source: str
    data: dict[str, Any]
    route: str
    primary: str
    fallbacks: list[str]
    env_vars: list[str]

    def build(self, primary_url: str, fallback_url: str, scale: float, review_dir: Path) -> Policy:
        """The policy with its models on the fake providers and its durations scaled."""
        data = _scale_durations(self.data, scale)
        for name, model in data.get("models", {}).items():
            model["litellm_params"] = _demo_params(
                model["litellm_params"], primary_url if name == self.primary else fallback_url
            )
        if isinstance(data.get("review_log"), dict) and data["review_log"].get("path"):
            data["review_log"]["path"] = str(review_dir / "review.jsonl")
        return Policy.from_dict(data, source=f"{self.source} (durations x {scale:g})")


def load_demo_policy(path: str | os.PathLike[str] | None) -> DemoPolicy:
    """Validate the policy file (line-numbered errors) and pick the route the demo replays.

    The route is ``chat`` if the policy has one, else its first route; the first model of
    its chain plays the sick primary, every other model the healthy fallback.
    Raises :class:`~llm_resilience.PolicyError`.
    """
    file = Path(path) if path is not None else EXAMPLE_POLICY
    policy = Policy.from_file(file)  # raises with file:line messages before anything starts
    data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    routes = policy.document.routes
    if not routes:
        raise PolicyError([f"{file}: the demo needs a route (routes: chat: chain: [primary, fallback])"])
    route = "chat" if "chat" in routes else next(iter(routes))
    chain = list(routes[route].chain)
    keys = [model.litellm_params.get("api_key") for model in policy.models.values()]
    env_vars = sorted({k[len(ENV_PREFIX) :] for k in keys if isinstance(k, str) and k.startswith(ENV_PREFIX)})
    return DemoPolicy(
        source=_display_path(file),
        data=data,
        route=route,
        primary=chain[0],
        fallbacks=chain[1:],
        env_vars=env_vars,
    )


def _demo_params(params: Mapping[str, Any], api_base: str) -> dict[str, Any]:
    # Only what reaches a fake OpenAI-compatible server: provider-specific options (Azure API
    # versions, Bedrock regions...) would fail there, and a literal key must never leave the policy.
    model = str(params["model"])
    key = params.get("api_key")
    return {
        "model": "openai/" + model.split("/", 1)[-1],
        "api_base": api_base,
        "api_key": key if isinstance(key, str) and key.startswith(ENV_PREFIX) else DEMO_KEY,
    }


def _scale_durations(node: Any, scale: float) -> Any:
    """Copy of a policy with every duration (``*_s``, numeric ``hedge.after``) times ``scale``."""
    if isinstance(node, list):
        return [_scale_durations(v, scale) for v in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        numeric = isinstance(value, int | float) and not isinstance(value, bool)
        if numeric and str(key).endswith("per_s"):
            out[key] = value / scale  # a rate: same story at a faster pace means more per second
        elif numeric and (str(key).endswith("_s") or key == "after"):
            out[key] = value * scale
        else:
            out[key] = _scale_durations(value, scale)
    return out


def _display_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


@contextlib.contextmanager
def _demo_keys(names: Sequence[str]) -> Iterator[None]:
    """Set the policy's key variables to a dummy for the demo, so no real key reaches the fakes."""
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(dict.fromkeys(names, DEMO_KEY))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# ---------------------------------------------------------------------------------------------
# Running it.


@dataclass(frozen=True)
class Transition:
    model: str
    old: str
    new: str


@dataclass
class RequestResult:
    """What happened to one request of the demo."""

    number: int
    phase: str
    model: str | None
    """The model that answered; ``None`` when the request failed."""
    latency_s: float
    attempts: list[dict[str, Any]]
    """As in ``response._hidden_params["llm_resilience"]["attempts"]``."""
    transitions: list[Transition] = field(default_factory=list)
    error: str | None = None


class _TransitionRecorder(Hook):
    """Collects breaker transitions as they happen; the runner hands them out per request."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[Transition] = []

    def breaker_transition(self, model: str, old: str, new: str) -> None:
        with self._lock:
            self._pending.append(Transition(model, old, new))

    def drain(self) -> list[Transition]:
        with self._lock:
            out, self._pending = self._pending, []
        return out


@dataclass(frozen=True)
class PhaseStarted:
    phase: Phase


Event = PhaseStarted | RequestResult


def run_incident(
    engine: Resilience,
    route: str,
    primary: FakeProvider,
    slots: Sequence[Slot],
    scale: float,
    recorder: _TransitionRecorder,
    rng: random.Random,
) -> Iterator[Event]:
    """Send one request per slot, sequentially, switching the primary's behaviour per phase."""
    t0 = time.monotonic()
    current: Phase | None = None
    for slot in slots:
        if slot.phase is not current:
            current = slot.phase
            primary.set(Behavior(latency_fn=_lognormal(rng, current.primary_latency_s * scale)))
            yield PhaseStarted(current)
        delay = t0 + slot.at_s - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        started = time.monotonic()
        model: str | None = None
        error: str | None = None
        try:
            response = engine.completion(route, PROMPT)
            summary = response._hidden_params["llm_resilience"]
            attempts, model = summary["attempts"], summary["model"]
        except AllAttemptsFailed as e:
            attempts, error = [a.as_dict() for a in e.attempts], "all attempts failed"
        except Exception as e:  # a demo reports what a caller would see, and goes on
            attempts, error = [], f"{type(e).__name__}: {e}".splitlines()[0]
        yield RequestResult(
            number=slot.number,
            phase=slot.phase.name,
            model=model,
            latency_s=time.monotonic() - started,
            attempts=attempts,
            transitions=recorder.drain(),
            error=error,
        )


def _warm_up(policy: Policy) -> None:
    # litellm's first call to an endpoint pays ~120 ms of one-time setup (lazy imports, client
    # creation): at small scales that alone would exceed the timeout. Same params, so the
    # engine reuses the cached clients (the lazy imports of every call kind were paid when the
    # engine was built).
    for spec in policy.models.values():
        params, _missing = spec.resolved_params()
        litellm.completion(messages=PROMPT, num_retries=0, max_retries=0, timeout=10, **params)


def run_demo(
    *,
    policy_path: str | os.PathLike[str] | None = None,
    requests: int = DEFAULT_REQUESTS,
    scale: float = DEFAULT_SCALE,
    quiet: bool = False,
    out: TextIO | None = None,
    color: bool | None = None,
    review_log: str | os.PathLike[str] | None = None,
) -> int:
    """Run the incident demo; print as it goes; return the exit status.

    The policy's review log (if it has one) is written to a temporary directory removed at the
    end; ``review_log`` names a file to keep a copy in. Raises
    :class:`~llm_resilience.PolicyError` when the policy file is invalid.
    """
    with tempfile.TemporaryDirectory(prefix="llm-resilience-demo-", ignore_cleanup_errors=True) as scratch:
        return _run_demo(policy_path, requests, scale, quiet, out, color, Path(scratch), review_log)


def _run_demo(
    policy_path: str | os.PathLike[str] | None,
    requests: int,
    scale: float,
    quiet: bool,
    out: TextIO | None,
    color: bool | None,
    review_dir: Path,
    keep_review_log: str | os.PathLike[str] | None,
) -> int:
    out = out if out is not None else sys.stdout
    demo = load_demo_policy(policy_path)
    style = Style(out, color)
    printer = Printer(out, style, quiet=quiet)
    rng = random.Random(SEED)
    slots = schedule(requests, scale)
    with (
        FakeProvider(behavior=Behavior(latency_fn=_lognormal(rng, INCIDENT[0].primary_latency_s * scale))) as sick,
        FakeProvider(behavior=Behavior(latency_fn=_lognormal(rng, FALLBACK_LATENCY_S * scale))) as healthy,
        _demo_keys(demo.env_vars),
    ):
        policy = demo.build(sick.base_url, healthy.base_url, scale, review_dir)
        recorder = _TransitionRecorder()
        engine = Resilience(policy, hooks=[recorder])
        info = DemoInfo(demo, policy, scale, slots, sick.base_url, healthy.base_url)
        printer.intro(info)
        _warm_up(policy)
        warm_up = getattr(engine, "warm_up", None)  # the engine's own warm-up, where it has one
        if callable(warm_up):
            warm_up()
        sick.reset()
        healthy.reset()
        results: list[RequestResult] = []
        interrupted = False
        try:
            for event in run_incident(engine, demo.route, sick, slots, scale, recorder, rng):
                if isinstance(event, PhaseStarted):
                    printer.phase(event.phase, info)
                else:
                    results.append(event)
                    printer.request(event, info)
        except KeyboardInterrupt:
            interrupted = True
            printer.line(style.yellow("interrupted; summary of the requests so far:"))
        written = review_dir / "review.jsonl"
        if keep_review_log is not None and written.exists():
            shutil.copyfile(written, keep_review_log)
        printer.summary(summarize(results, info), info, written, kept=keep_review_log)
        printer.outro()
    return 130 if interrupted else 0


# ---------------------------------------------------------------------------------------------
# The summary.


@dataclass(frozen=True)
class DemoInfo:
    """What the printer needs to know about the run."""

    demo: DemoPolicy
    policy: Policy
    scale: float
    slots: Sequence[Slot]
    primary_url: str
    fallback_url: str

    def primary_timeout_s(self) -> float:
        return self.policy.classes["default"].timeout_s


@dataclass
class Summary:
    requests: int
    answered_by: Counter[str]
    failed: int
    fallbacks: Counter[str]
    """Why the first model did not answer, per request that fell back."""
    transitions: list[tuple[int, Transition]]
    spike_requests: int
    primary_spike_requests: int
    primary_spike_wait_s: float
    latency: dict[str, tuple[float, float, float, int]]
    """Phase (and ``overall``) -> p50, p99, max seconds, count."""


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), ``q`` in 0-100."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(results: Sequence[RequestResult], info: DemoInfo) -> Summary:
    """The numbers of a run."""
    primary = info.demo.primary
    fallbacks: Counter[str] = Counter()
    for r in results:
        if r.model is not None and r.attempts and r.attempts[0]["model"] != r.model:
            fallbacks[_short_reason(r.attempts[0])] += 1
    spike = [r for r in results if r.phase == "spike"]
    sent = [a for r in spike for a in r.attempts if a["model"] == primary and a["outcome"] != "skipped"]
    latency: dict[str, tuple[float, float, float, int]] = {}
    groups = {"overall": list(results), **{p.name: [r for r in results if r.phase == p.name] for p in INCIDENT}}
    for name, group in groups.items():
        values = [r.latency_s for r in group]
        if values:
            latency[name] = (percentile(values, 50), percentile(values, 99), max(values), len(values))
    return Summary(
        requests=len(results),
        answered_by=Counter(r.model for r in results if r.model is not None),
        failed=sum(1 for r in results if r.model is None),
        fallbacks=fallbacks,
        transitions=[(r.number, t) for r in results for t in r.transitions],
        spike_requests=len(spike),
        primary_spike_requests=len(sent),
        primary_spike_wait_s=sum(a["latency_s"] for a in sent),
        latency=latency,
    )


def _is_probe(attempt: Mapping[str, Any]) -> bool:
    return attempt.get("breaker_state") == "half-open" and attempt["outcome"] != "skipped"


def _short_reason(attempt: Mapping[str, Any]) -> str:
    reason = str(attempt.get("reason") or attempt["outcome"]).replace("_", " ")
    return f"probe {reason}" if _is_probe(attempt) else reason


# ---------------------------------------------------------------------------------------------
# Printing.


class Style:
    """ANSI colours when writing to a terminal (and ``NO_COLOR`` is unset); plain text otherwise."""

    def __init__(self, out: TextIO, color: bool | None = None) -> None:
        if color is None:
            color = out.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"
        self.color = color
        encoding = getattr(out, "encoding", None) or "ascii"
        try:
            symbols = (
                "\N{RIGHTWARDS ARROW}",
                "\N{BOX DRAWINGS LIGHT HORIZONTAL}",
                "\N{MIDDLE DOT}",
                "\N{MULTIPLICATION SIGN}",
            )
            "".join(symbols).encode(encoding)
            self.arrow, self.rule, self.dot, self.times = symbols
        except (UnicodeEncodeError, LookupError):
            self.arrow, self.rule, self.dot, self.times = "->", "-", "|", "x"

    def _wrap(self, code: str, text: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.color else text

    def bold(self, text: str) -> str:
        return self._wrap("1", text)

    def dim(self, text: str) -> str:
        return self._wrap("2", text)

    def red(self, text: str) -> str:
        return self._wrap("31", text)

    def green(self, text: str) -> str:
        return self._wrap("32", text)

    def yellow(self, text: str) -> str:
        return self._wrap("33", text)

    def cyan(self, text: str) -> str:
        return self._wrap("36", text)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


class Printer:
    """Everything the demo prints. ``quiet`` keeps the summary only."""

    def __init__(self, out: TextIO, style: Style, *, quiet: bool = False) -> None:
        self.out = out
        self.s = style
        self.quiet = quiet
        self._widths = (0, 0, 0)

    def line(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def intro(self, info: DemoInfo) -> None:
        s, demo = self.s, info.demo
        primary = info.policy.models[demo.primary]
        fallbacks = ", ".join(demo.fallbacks) or "none"
        interval = info.slots[1].at_s if len(info.slots) > 1 else 0.0
        spike = next(p for p in INCIDENT if p.name == "spike")
        self.line(
            s.bold("llm-resilience demo")
            + f": replaying the incident that started this project. The primary model's latency jumps "
            f"20x for {spike.duration_s * info.scale:g} s, then recovers; watch the policy fall back, "
            "open the breaker, probe, and close it again."
        )
        if self.quiet:
            return
        rows = [
            (
                "policy",
                f"{info.policy.source}, route '{demo.route}' ({f' {s.arrow} '.join([demo.primary, *demo.fallbacks])})",
            ),
            ("primary", f"{demo.primary} ({primary.litellm_model}) on a fake provider at {info.primary_url}"),
            ("fallback", f"{fallbacks} on a fake provider at {info.fallback_url}"),
            ("timeout", f"{_ms(info.primary_timeout_s())} per attempt (prompt class 'default')"),
            ("traffic", f"{len(info.slots)} requests, one every {_ms(interval)}, sequential"),
            ("tracing", _tracing_note()),
        ]
        for label, text in rows:
            self.line(f"  {s.dim(label.ljust(9))}{text}")
        models = [demo.primary, *demo.fallbacks, "-"]
        self._widths = (len(str(len(info.slots))), max(len(p.name) for p in INCIDENT), max(map(len, models)))
        n, p, m = self._widths
        self.line()
        self.line(s.dim(f"  {'#'.rjust(n)}  {'phase'.ljust(p)}  {'model'.ljust(m)}  {'latency':>8}  why"))

    def phase(self, phase: Phase, info: DemoInfo) -> None:
        if self.quiet:
            return
        headline = phase.headline.format(primary=info.demo.primary, latency=_ms(phase.primary_latency_s * info.scale))
        self.line(self.s.bold(f"  {self.s.rule * 2} {phase.name}: {headline} {self.s.rule * 2}"))

    def request(self, r: RequestResult, info: DemoInfo) -> None:
        if self.quiet:
            return
        s = self.s
        n, p, m = self._widths
        model = r.model or "-"
        why = self.why(r, info)
        text = f"  {str(r.number).rjust(n)}  {r.phase.ljust(p)}  {model.ljust(m)}  {_ms(r.latency_s):>8}  {why}"
        if r.model is None:
            text = s.red(text)
        elif r.model != info.demo.primary:
            text = s.yellow(text)
        self.line(text)
        for model_name, chain in _group_transitions(r.transitions):
            self.line(self._transition_line(model_name, chain, info))

    def why(self, r: RequestResult, info: DemoInfo) -> str:
        """One phrase per attempt that did not answer, e.g. ``big timeout 300 ms → small``."""
        arrow = f" {self.s.arrow} "
        parts = []
        for a in r.attempts:
            if a["model"] == r.model and a["outcome"] in ("success", "flagged"):
                if _is_probe(a):
                    closed = any(t.model == a["model"] and t.new == "closed" for t in r.transitions)
                    parts.append(f"{a['model']} probe ok" + (f"{arrow}breaker closed" if closed else ""))
                    return arrow.join(parts)
                parts.append(a["model"] + (f" ({a['reason']}, flagged)" if a["outcome"] == "flagged" else ""))
                break
            parts.append(_describe(a))
        if r.error is not None:
            parts.append(r.error)
        if parts == [info.demo.primary]:
            return ""  # the ordinary case: the first choice answered
        return arrow.join(parts)

    def _transition_line(self, model: str, chain: list[str], info: DemoInfo) -> str:
        s = self.s
        settings = info.policy.breaker_settings(model)
        reset = f"{settings.reset_timeout_s:g} s"
        old, new = chain[0], chain[-1]
        if new == "open" and old == "closed":
            note = f"{settings.fail_max} failures in a row: {model} is skipped for {reset}"
        elif new == "open":
            note = f"probe failed: {model} is skipped for another {reset}"
        elif new == "closed":
            note = f"probe ok: {model} is back in the chain"
        else:
            note = "the next request is a probe"
        text = f"  {'':>{self._widths[0]}}  breaker {model}: {f' {s.arrow} '.join(chain)}  ({note})"
        colour = s.green if new == "closed" else s.red if new == "open" else s.cyan
        return s.bold(colour(text))

    def summary(
        self, sm: Summary, info: DemoInfo, review_log: Path, kept: str | os.PathLike[str] | None = None
    ) -> None:
        s = self.s
        primary = info.demo.primary
        self.line()
        self.line(s.bold("Summary"))
        reasons = ", ".join(f"{reason} {c}" for reason, c in sm.fallbacks.most_common())
        answered = ", ".join(f"{m} {c}" for m, c in sm.answered_by.most_common()) or "none"
        rows: list[tuple[str, str]] = [
            ("requests", f"{sm.requests}: {sm.requests - sm.failed} answered ({answered}), {sm.failed} failed"),
            ("fallbacks", f"{sum(sm.fallbacks.values())}" + (f": {reasons}" if reasons else "")),
        ]
        x = s.times
        models = [primary, *sorted({t.model for _, t in sm.transitions} - {primary})]
        for model in models:
            mine = [(n, t) for n, t in sm.transitions if t.model == model]
            opened = sum(1 for _, t in mine if t.old == "closed" and t.new == "open")
            reopened = sum(1 for _, t in mine if t.old != "closed" and t.new == "open")
            closed = sum(1 for _, t in mine if t.new == "closed")
            rows.append((f"breaker {model}", f"opened {opened}{x}, probe failed {reopened}{x}, closed {closed}{x}"))
            if mine:
                rows.append(("", self._transition_story(mine)))
        if sm.spike_requests:
            spike_latency = next(p for p in INCIDENT if p.name == "spike").primary_latency_s * info.scale
            no_breaker_s = sm.spike_requests * info.primary_timeout_s()
            rows.append(
                (
                    "sick primary",
                    f"{primary} got {sm.primary_spike_requests} of the {sm.spike_requests} spike requests; "
                    f"{sm.primary_spike_wait_s:.1f} s spent waiting on it",
                )
            )
            rows.append(
                (
                    "without",
                    f"the breaker: all {sm.spike_requests}, {no_breaker_s:.1f} s of timeouts; "
                    f"without any policy: each waits ~{_ms(spike_latency)}",
                )
            )
        if review_log.exists():
            entries = len(review_log.read_text(encoding="utf-8").splitlines())
            where = f"in {kept}" if kept is not None else "(not kept: --review-log FILE keeps them)"
            rows.append(("review log", f"{entries} lines (one per fallback) {where}"))
        width = max(len(label) for label, _ in rows) + 2
        for label, text in rows:
            self.line(f"  {label.ljust(width)}{text}")
        header = f"{'p50':>8}  {'p99':>8}  {'max':>8}  requests"
        self.line(f"  {'latency'.ljust(width)}{s.dim(header)}")
        for name, (p50, p99, worst, count) in sm.latency.items():
            self.line(f"  {('  ' + name).ljust(width)}{_ms(p50):>8}  {_ms(p99):>8}  {_ms(worst):>8}  {count:>8}")

    def _transition_story(self, transitions: Sequence[tuple[int, Transition]]) -> str:
        words = {("closed", "open"): "opened", ("half-open", "open"): "probe failed", ("half-open", "closed"): "closed"}
        steps = [f"#{n} {words[(t.old, t.new)]}" for n, t in transitions if (t.old, t.new) in words]
        return f" {self.s.dot} ".join(steps)

    def outro(self) -> None:
        self.line()
        self.line(
            "Next: `llm-resilience init policy.yaml` writes a starter policy with your models; check it with "
            f"`llm-resilience validate policy.yaml`, point {POLICY_ENV} at it and call "
            'llm_resilience.completion(model="chat", ...). Every field is explained in the example policy: '
            f"{_display_path(EXAMPLE_POLICY)}"
        )


def _describe(attempt: Mapping[str, Any]) -> str:
    model, outcome, reason = attempt["model"], attempt["outcome"], attempt.get("reason")
    probe = " probe" if _is_probe(attempt) else ""
    if outcome == "skipped":
        return f"{model} skipped ({str(reason).replace('_', ' ')})"
    if outcome == "failure" and reason in ("timeout", "soft_timeout") and attempt.get("timeout_s"):
        return f"{model}{probe} {str(reason).replace('_', ' ')} {_ms(attempt['timeout_s'])}"
    if outcome == "soft_failure":
        return f"{model}{probe} answer rejected ({reason})"
    return f"{model}{probe} {reason or outcome}"


def _group_transitions(transitions: Sequence[Transition]) -> list[tuple[str, list[str]]]:
    """Consecutive transitions of one model as a chain of states: open → half-open → closed."""
    groups: list[tuple[str, list[str]]] = []
    for t in transitions:
        if groups and groups[-1][0] == t.model and groups[-1][1][-1] == t.old:
            groups[-1][1].append(t.new)
        else:
            groups.append((t.model, [t.old, t.new]))
    return groups


def _tracing_note() -> str:
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if endpoint:
        return f"one span per call and per attempt, exported to {endpoint}"
    return "off (set OTEL_EXPORTER_OTLP_ENDPOINT=http://localhost:4318 to send a span per attempt to a collector)"
