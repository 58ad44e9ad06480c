"""``llm-resilience simulate``: replay a scripted incident against the real decision core, in simulated time.

The planner is sans-I/O and takes ``now`` on every step, so a discrete-event loop can
drive it exactly as the drivers do (``Call.next_action`` / ``on_response`` /
``on_error`` / ``on_cancelled``) while the clock jumps from event to event: a
30-minute incident replays in seconds, and the same seed gives the same table.

What is real: the planner (chains, timeouts, soft timeouts, hedging, retries with
``Retry-After``, budgets), the breakers (pybreaker, on an injected simulated clock), the
latency windows (on the simulated clock), the validators, and the error classification
(synthetic answers are ``litellm.ModelResponse`` objects and synthetic failures real
litellm exceptions, with the status and ``Retry-After`` headers a provider would send).
What is simulated: the providers (:mod:`._scenario`), arrivals (Poisson per prompt
class), and no prompt truncation (every prompt fits).

Everything the simulator knows of the planner is in this module, so a change of the
planner's protocol is adapted here and only here.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import math
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

from ._breakers import BreakerRegistry
from ._budget import Budgets
from ._env import litellm
from ._hooks import HookSet
from ._latency import LatencyStats
from ._outcomes import AttemptRecord
from ._planner import Attempt, Call, CallRequest, Done, Fail, Launch, PassThroughFitter, Planner, Wait
from ._policy import ENV_PREFIX, ModelSpec, Policy
from ._scenario import Behaviour, ErrorConfig, Phase, Scenario
from ._validators import ResponseValidator

EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
"""Simulated time 0 as a wall-clock instant (pybreaker's ``opened_at`` is a datetime)."""
PROMPT = ({"role": "user", "content": "simulated request"},)
_SIMULATED_URL = "https://simulated.invalid/v1/chat/completions"


# ---------------------------------------------------------------------------------------------
# One run: a policy against a scenario.


@dataclass
class CallOutcome:
    """One simulated ``completion`` call."""

    started_s: float
    ended_s: float
    phase: str
    prompt_class: str
    ok: bool
    model: str | None
    records: list[AttemptRecord]
    cost_usd: float = 0.0


@dataclass
class RunResult:
    label: str
    calls: list[CallOutcome] = field(default_factory=list)
    transitions: list[tuple[float, str, str, str]] = field(default_factory=list)
    """(time, model, old state, new state)."""
    wall_s: float = 0.0


@dataclass
class _Live:
    call: Call
    outcome: CallOutcome
    done: bool = False
    wakes: set[float] = field(default_factory=set)


class Simulation:
    """A discrete-event loop around a real :class:`Planner`; the clock is ``self.now``."""

    def __init__(self, policy: Policy, scenario: Scenario, seed: int, label: str = "") -> None:
        self.policy = policy
        self.scenario = scenario
        self.seed = seed
        self.now = 0.0
        self.route = scenario.route_for(policy)
        self.primary = scenario.primary(policy)
        self.result = RunResult(label=label or policy.source)
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self._provider_rng: dict[str, random.Random] = {}
        breakers = BreakerRegistry(policy.breaker_settings, clock=lambda: EPOCH + timedelta(seconds=self.now))
        breakers.listeners.append(self._on_transition)
        self.planner = Planner(
            policy=policy,
            breakers=breakers,
            hooks=HookSet([]),
            fitter=PassThroughFitter(),
            validator=ResponseValidator(policy),
            latency=LatencyStats(clock=lambda: self.now),
            budgets=Budgets(),
            rng=random.Random(f"{seed}:planner"),
        )
        self._prices = {spec.name: _prices(spec) for spec in policy.models.values()}

    def run(self) -> RunResult:
        started = time.perf_counter()
        for at, prompt_class in arrivals(self.scenario, self.seed):
            self._at(at, lambda c=prompt_class: self._arrive(c))  # type: ignore[misc]
        with _dummy_keys([self.policy]):
            while self._queue:
                at, _, event = heapq.heappop(self._queue)
                self.now = at
                event()
        self.result.wall_s = time.perf_counter() - started
        return self.result

    def _on_transition(self, model: str, old: str, new: str, _info: object = None) -> None:
        self.result.transitions.append((self.now, model, old, new))

    def _at(self, at: float, event: Callable[[], None]) -> None:
        heapq.heappush(self._queue, (at, next(self._order), event))

    # -- the driver: what _drivers.run_async does, with simulated I/O ---------------------------

    def _arrive(self, prompt_class: str) -> None:
        request = CallRequest(model=self.route, messages=PROMPT, kwargs={}, prompt_class=prompt_class)
        call = self.planner.start(request, self.now)
        phase = self.scenario.phase_at(self.now)
        outcome = CallOutcome(self.now, self.now, phase.name, prompt_class, ok=False, model=None, records=call.records)
        self.result.calls.append(outcome)
        self._drive(_Live(call, outcome))

    def _drive(self, live: _Live) -> None:
        call = live.call
        while not live.done:
            action = call.next_action(self.now)
            if isinstance(action, Launch):
                self._launch(live, action.attempt)
            elif isinstance(action, Wait):
                if action.until is not None and action.until not in live.wakes:
                    live.wakes.add(action.until)
                    self._at(action.until, lambda: self._wake(live))
                return  # an answer in flight, or the wake-up, drives the call on
            elif isinstance(action, Done | Fail):
                for attempt in call.in_flight:  # hedge losers: the driver cancels them
                    call.on_cancelled(attempt, self.now)
                live.done = True
                live.outcome.ended_s = self.now
                live.outcome.ok = isinstance(action, Done)
                live.outcome.model = call.answered_by.model if call.answered_by is not None else None

    def _wake(self, live: _Live) -> None:
        live.wakes.discard(self.now)
        self._drive(live)

    def _launch(self, live: _Live, attempt: Attempt) -> None:
        phase = self.scenario.phase_at(self.now)
        behaviour = self.scenario.behaviour(attempt.spec.name, phase, self.primary)
        if behaviour is None:  # check_against rules this out for the route's models
            raise RuntimeError(f"no behaviour for model {attempt.spec.name}")
        delay, result = self._provider(attempt.spec, behaviour)
        if delay > attempt.timeout_s:  # the attempt's own timeout fires first (litellm raises Timeout)
            delay, result = attempt.timeout_s, _error("timeout", attempt.spec.litellm_model, None)
        self._at(self.now + delay, lambda: self._settle(live, attempt, result))

    def _settle(self, live: _Live, attempt: Attempt, result: Any) -> None:
        if live.done or attempt not in live.call.in_flight:
            return  # the call ended, or the planner cut this attempt off: the driver closed it
        if isinstance(result, BaseException):
            live.call.on_error(attempt, result, self.now)
        else:
            live.outcome.cost_usd += self._cost(attempt.spec.name, result)
            live.call.on_response(attempt, result, self.now)
        self._drive(live)

    # -- the providers ----------------------------------------------------------------------------

    def _provider(self, spec: ModelSpec, behaviour: Behaviour) -> tuple[float, Any]:
        """(seconds until the answer, the answer or the exception) for one request."""
        rng = self._provider_rng.get(spec.name)
        if rng is None:
            rng = self._provider_rng[spec.name] = random.Random(f"{self.seed}:provider:{spec.name}")
        draw = rng.random()
        latency = behaviour.latency_s.p50 * math.exp(behaviour.latency_s.sigma * rng.gauss(0.0, 1.0))
        model = spec.litellm_model
        for error in behaviour.errors:
            if draw < error.rate:
                if error.status == "timeout":
                    return math.inf, None  # never answers: the attempt's timeout decides
                return behaviour.error_latency_s, _error(error.status, model, error)
            draw -= error.rate
        tokens = self.scenario.document.tokens
        if draw < behaviour.empty_rate:
            return latency, _response(model, "", "stop", tokens.input, 0)
        draw -= behaviour.empty_rate
        if draw < behaviour.truncated_rate:
            return latency, _response(model, "a simulated answer, cut", "length", tokens.input, tokens.output)
        return latency, _response(model, "a simulated answer", "stop", tokens.input, tokens.output)

    def _cost(self, model: str, response: Any) -> float:
        usage = getattr(response, "usage", None)
        price_in, price_out = self._prices.get(model, (0.0, 0.0))
        if usage is None:
            return 0.0
        return float(usage.prompt_tokens) * price_in + float(usage.completion_tokens) * price_out


def arrivals(scenario: Scenario, seed: int) -> list[tuple[float, str]]:
    """Request times per prompt class: Poisson arrivals at each phase's rate, the same for every policy."""
    out: list[tuple[float, str]] = []
    for phase in scenario.phases:
        for prompt_class, rate in phase.traffic.items():
            if rate <= 0:
                continue
            rng = random.Random(f"{seed}:arrivals:{phase.name}:{prompt_class}")
            t = phase.start_s + rng.expovariate(rate)
            while t < phase.end_s:
                out.append((t, prompt_class))
                t += rng.expovariate(rate)
    out.sort()
    return out


def _prices(spec: ModelSpec) -> tuple[float, float]:
    """USD per input and output token: the policy's, else litellm's cost map, else 0."""
    known: dict[str, Any] = {}
    if spec.input_cost_per_token is None or spec.output_cost_per_token is None:
        with contextlib.suppress(Exception):  # unknown to litellm: free, as far as we can tell
            known = dict(litellm.get_model_info(spec.litellm_model))
    price_in = spec.input_cost_per_token if spec.input_cost_per_token is not None else known.get("input_cost_per_token")
    price_out = (
        spec.output_cost_per_token if spec.output_cost_per_token is not None else known.get("output_cost_per_token")
    )
    return float(price_in or 0.0), float(price_out or 0.0)


def _response(model: str, content: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> Any:
    return litellm.ModelResponse(
        model=model,
        choices=[{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish_reason}],
        usage={
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    )


def _error(status: int | str, model: str, error: ErrorConfig | None) -> BaseException:
    """The exception litellm raises for this provider failure (so ``classify_error`` sees the real thing)."""
    import httpx

    lx = litellm.exceptions
    message = f"simulated {status}"
    request = httpx.Request("POST", _SIMULATED_URL)
    if status == "timeout" or status == 408:
        return lx.Timeout(message=message, model=model, llm_provider="openai")
    if status == "connection":
        return lx.APIConnectionError(message=message, llm_provider="openai", model=model, request=request)
    headers = {}
    if error is not None and error.retry_after_s is not None:
        headers["retry-after"] = f"{error.retry_after_s:g}"
    code = int(status)
    response = httpx.Response(code, headers=headers, request=request)
    by_status: dict[int, Callable[..., BaseException]] = {
        401: lx.AuthenticationError,
        404: lx.NotFoundError,
        429: lx.RateLimitError,
        500: lx.InternalServerError,
        502: lx.BadGatewayError,
        503: lx.ServiceUnavailableError,
    }
    make = by_status.get(code)
    if make is not None:
        return make(message=message, llm_provider="openai", model=model, response=response)
    if code < 500:
        return lx.BadRequestError(message=message, model=model, llm_provider="openai", response=response)
    return lx.APIError(
        status_code=code, message=message, llm_provider="openai", model=model, request=request, response=response
    )


@contextlib.contextmanager
def _dummy_keys(policies: Sequence[Policy]) -> Iterator[None]:
    """Set unset ``os.environ/VAR`` key variables for the run: no request is sent, but the planner skips
    a model whose key is missing, which would be a different story from the one the scenario tells."""
    names = {
        value[len(ENV_PREFIX) :]
        for policy in policies
        for spec in policy.models.values()
        for value in spec.litellm_params.values()
        if isinstance(value, str) and value.startswith(ENV_PREFIX)
    }
    missing = sorted(name for name in names if name not in os.environ)
    os.environ.update(dict.fromkeys(missing, "sk-simulated"))
    try:
        yield
    finally:
        for name in missing:
            os.environ.pop(name, None)


# ---------------------------------------------------------------------------------------------
# The command.


def run_simulation(
    files: Sequence[str],
    policies: Sequence[Policy],
    scenario: Scenario,
    *,
    seed: int | None = None,
    plot: str | None = None,
    out: TextIO,
) -> int:
    """Simulate ``scenario`` against one or two loaded policies; print the table. Returns the exit status.

    Raises :class:`~llm_resilience.PolicyError` when a policy names a validator that is not registered.
    """
    seed = scenario.document.seed if seed is None else seed
    labels = _labels(files)
    results = [Simulation(p, scenario, seed, label).run() for p, label in zip(policies, labels, strict=True)]
    print_report(scenario, seed, results, out)
    if plot is not None:
        return write_plot(scenario, results, plot, out)
    return 0


def _labels(files: Sequence[str]) -> list[str]:
    names = [Path(f).name for f in files]
    return list(files) if len(set(names)) < len(names) else names


# -- the report -------------------------------------------------------------------------------------


@dataclass
class PhaseStats:
    requests: int
    success: float
    p50_s: float | None
    p99_s: float | None
    answered_by: Counter[str]
    fallbacks: Counter[str]
    transitions: list[tuple[float, str, str, str]]
    sent: Counter[str]
    cost_usd: float


def phase_stats(result: RunResult, phase: Phase) -> PhaseStats:
    calls = [c for c in result.calls if c.phase == phase.name]
    latencies = sorted(c.ended_s - c.started_s for c in calls)
    answered: Counter[str] = Counter(c.model for c in calls if c.model is not None)
    fallbacks: Counter[str] = Counter()
    sent: Counter[str] = Counter()
    for c in calls:
        answering = next((r for r in c.records if r.model == c.model and r.outcome in ("success", "flagged")), None)
        for r in c.records:
            if r.outcome != "skipped":
                sent[r.model] += 1
            if r is not answering and r.outcome != "cancelled" and r.reason is not None:
                fallbacks[r.reason] += 1
    return PhaseStats(
        requests=len(calls),
        success=sum(c.ok for c in calls) / len(calls) if calls else 1.0,
        p50_s=_percentile(latencies, 50),
        p99_s=_percentile(latencies, 99),
        answered_by=answered,
        fallbacks=fallbacks,
        transitions=[t for t in result.transitions if phase.start_s <= t[0] < phase.end_s],
        sent=sent,
        cost_usd=sum(c.cost_usd for c in calls),
    )


def _percentile(sorted_values: Sequence[float], q: float) -> float | None:
    if not sorted_values:
        return None
    rank = max(0, math.ceil(q / 100 * len(sorted_values)) - 1)
    return sorted_values[rank]


def print_report(scenario: Scenario, seed: int, results: Sequence[RunResult], out: TextIO) -> None:
    doc = scenario.document
    w = out.write
    w(f"{doc.name}  ({scenario.source}, seed {seed})\n")
    if doc.description:
        w(f"{doc.description.strip()}\n")
    traffic = ", ".join(f"{k} {v:g}/s" for k, v in doc.traffic.items())
    replayed = ", ".join(f"{r.label} in {r.wall_s:.1f} s" for r in results)
    w(f"{_clock(scenario.duration_s)} of simulated time; traffic {traffic}; replayed: {replayed}\n")
    all_models = sorted({m for r in results for c in r.calls for rec in c.records for m in [rec.model]})
    for phase in scenario.phases:
        stats = [phase_stats(r, phase) for r in results]
        w(f"\nphase '{phase.name}'  {_clock(phase.start_s)}-{_clock(phase.end_s)}\n")
        rows: list[tuple[str, list[str]]] = [
            ("requests", [f"{s.requests:,}" for s in stats]),
            ("success", [f"{s.success:.1%}" for s in stats]),
            ("latency p50 / p99", [f"{_dur(s.p50_s)} / {_dur(s.p99_s)}" for s in stats]),
            ("answered by", [_shares(s.answered_by, s.requests) for s in stats]),
            ("fallbacks by reason", [_counts(s.fallbacks) for s in stats]),
            ("breaker transitions", [_transitions(s.transitions) for s in stats]),
            ("requests per model", [", ".join(f"{m} {s.sent.get(m, 0):,}" for m in all_models) for s in stats]),
            ("cost", [f"${s.cost_usd:,.2f}" for s in stats]),
        ]
        _table(w, [r.label for r in results] if len(results) > 1 else [], rows)


def _table(w: Callable[[str], Any], headers: Sequence[str], rows: Sequence[tuple[str, Sequence[str]]]) -> None:
    label_width = max(len(label) for label, _ in rows) + 2
    columns = len(rows[0][1])
    widths = [max([len(cells[i]) for _, cells in rows] + [len(headers[i]) if headers else 0]) for i in range(columns)]
    if headers:
        w("  " + " " * label_width + "   ".join(h.ljust(widths[i]) for i, h in enumerate(headers)).rstrip() + "\n")
    for label, cells in rows:
        w("  " + label.ljust(label_width) + "   ".join(c.ljust(widths[i]) for i, c in enumerate(cells)).rstrip() + "\n")


def _clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}:{secs:02d}"


def _dur(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _shares(counter: Mapping[str, int], total: int) -> str:
    if not counter:
        return "-"
    return ", ".join(f"{name} {n / total:.0%}" for name, n in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])))


def _counts(counter: Mapping[str, int]) -> str:
    if not counter:
        return "-"
    return ", ".join(f"{name} {n:,}" for name, n in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])))


def _transitions(transitions: Sequence[tuple[float, str, str, str]]) -> str:
    if not transitions:
        return "-"
    parts = []
    for model in dict.fromkeys(t[1] for t in transitions):
        mine = [t for t in transitions if t[1] == model]
        opened = [t[0] for t in mine if t[3] == "open" and t[2] == "closed"]
        reopened = sum(1 for t in mine if t[2] == "half-open" and t[3] == "open")
        closed = [t[0] for t in mine if t[3] == "closed"]
        words = []
        if opened:
            words.append(
                f"opened {_clock(opened[0])}" if len(opened) == 1 else f"opened {len(opened)}x from {_clock(opened[0])}"
            )
        if reopened:
            words.append(f"{reopened} failed probe{'s' if reopened != 1 else ''}")
        if closed:
            words.append(
                f"closed {_clock(closed[0])}"
                if len(closed) == 1
                else f"closed {len(closed)}x, last {_clock(closed[-1])}"
            )
        parts.append(f"{model}: {', '.join(words) or 'half-open'}")
    return "; ".join(parts)


# -- the plot ---------------------------------------------------------------------------------------


def write_plot(scenario: Scenario, results: Sequence[RunResult], path: str, out: TextIO) -> int:
    """Call latency over time, coloured by the model that answered; one panel per policy."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        import sys

        print(
            "--plot needs matplotlib, which is not installed: pip install 'llm-resilience[bench]' "
            "(the table above is complete without it)",
            file=sys.stderr,
        )
        return 1
    fig, axes = plt.subplots(len(results), 1, figsize=(11, 3.6 * len(results)), sharex=True, squeeze=False)
    models = sorted({c.model for r in results for c in r.calls if c.model is not None})
    for ax, result in zip(axes[:, 0], results, strict=True):
        for model in models:
            calls = [c for c in result.calls if c.model == model]
            ax.scatter([c.started_s / 60 for c in calls], [c.ended_s - c.started_s for c in calls], s=4, label=model)
        failed = [c for c in result.calls if not c.ok]
        if failed:
            ax.scatter(
                [c.started_s / 60 for c in failed], [c.ended_s - c.started_s for c in failed], s=8, marker="x",
                color="red", label="failed",
            )  # fmt: skip
        for phase in scenario.phases[1:]:
            ax.axvline(phase.start_s / 60, color="grey", linewidth=0.8, linestyle="--")
        for t, _model, _old, new in result.transitions:
            if new == "open":
                ax.axvline(t / 60, color="black", linewidth=0.5, linestyle=":", alpha=0.6)
        ax.set_yscale("log")
        ax.set_ylabel("call latency (s)")
        ax.set_title(f"{scenario.document.name}: {result.label}", fontsize=10)
        ax.legend(loc="upper right", fontsize=8, markerscale=2)
    axes[-1, 0].set_xlabel("simulated minutes (dashed: phases; dotted: a breaker opened)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    out.write(f"\nplot written to {path}\n")
    return 0
