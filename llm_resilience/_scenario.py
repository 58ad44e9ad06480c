"""Incident scenarios for ``llm-resilience simulate``: what each model does, phase by phase.

A scenario is YAML, validated like a policy (every problem as ``file:line: field: message``)::

    name: 503 storm with recovery
    route: chat                      # the route the traffic calls (default: chat, else the first route)
    seed: 7                          # default seed (--seed overrides)
    tokens: {input: 600, output: 150}  # per request, for the cost column
    traffic: {default: 2.0}          # requests per second per prompt class (Poisson arrivals)
    models:                          # baseline behaviour per policy model; "*": any other model
      "*": {latency_s: {p50: 0.4, p99: 0.9}}
    phases:                          # in order; each lists only what differs from the baseline
      - {name: healthy, duration_s: 300}
      - name: storm
        duration_s: 600
        models:
          big: {latency_s: 0.6, errors: [{rate: 0.95, status: 503}]}
      - {name: recovered, duration_s: 900}

Model keys are the policy's model names, ``primary`` (the first model of the route's
chain, whatever the policy calls it: shipped scenarios use it, so they fit any policy)
and ``"*"`` (any other model). A model's behaviour in a phase is the phase's entry for
it, else the baseline's, else the phase's ``"*"``, else the baseline's ``"*"``: an entry
replaces the baseline for that model (it does not merge).

Behaviour: ``latency_s`` (a median, or ``{p50, p99}``: lognormal), ``errors`` (each
``{rate, status, retry_after_s}``: ``status`` an HTTP status, ``timeout`` (never answers)
or ``connection`` (refused)), ``error_latency_s`` (how fast errors come back),
``empty_rate`` and ``truncated_rate`` (200s with no text / cut off by the length limit).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from ._base_errors import PolicyError
from ._policy import Policy, _dotted, _format_pydantic_errors, _locate, _parse_yaml, _Strict
from ._resources import scenarios_dir

PRIMARY = "primary"
"""Scenario key for the first model of the route's chain, whatever the policy calls it."""
Rate = Annotated[float, Field(ge=0, le=1)]
Z99 = 2.3263478740408408  # standard normal quantile of 0.99


class LatencyConfig(_Strict):
    """A lognormal latency: median and 99th percentile, seconds."""

    p50: Annotated[float, Field(gt=0)] = Field(description="Median latency, seconds.")
    p99: Annotated[float, Field(gt=0)] | None = Field(None, description="99th percentile (default: 2 x p50).")

    @model_validator(mode="before")
    @classmethod
    def _from_number(cls, data: Any) -> Any:
        if isinstance(data, int | float) and not isinstance(data, bool):
            return {"p50": data}
        return data

    @model_validator(mode="after")
    def _ordered(self) -> LatencyConfig:
        if self.p99 is not None and self.p99 < self.p50:
            raise ValueError(f"p99 ({self.p99}) is below p50 ({self.p50})")
        return self

    @property
    def sigma(self) -> float:
        p99 = self.p99 if self.p99 is not None else 2 * self.p50
        return math.log(p99 / self.p50) / Z99


class ErrorConfig(_Strict):
    """A share of requests that fail, and how."""

    rate: Rate = Field(description="Share of requests, 0-1.")
    status: int | Literal["timeout", "connection"] = Field(
        description="HTTP status (429, 500, 503...), 'timeout' (no answer) or 'connection' (refused)."
    )
    retry_after_s: Annotated[float, Field(ge=0)] | None = Field(None, description="Retry-After header, seconds.")

    @field_validator("status")
    @classmethod
    def _status(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 400 <= v <= 599:
            raise ValueError(f"expected an HTTP error status 400-599, 'timeout' or 'connection', got {v}")
        return v


class Behaviour(_Strict):
    """What one model does during a phase."""

    latency_s: LatencyConfig = Field(description="Latency of answers: a median, or {p50, p99}.")
    errors: list[ErrorConfig] = Field(default_factory=list, description="Failing shares of requests.")
    error_latency_s: Annotated[float, Field(ge=0)] = Field(0.05, description="How fast an error comes back.")
    empty_rate: Rate = Field(0.0, description="Share of 200s with no text.")
    truncated_rate: Rate = Field(0.0, description="Share of 200s cut off by the length limit.")

    @field_validator("errors", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, Mapping) else v

    @model_validator(mode="after")
    def _shares(self) -> Behaviour:
        total = sum(e.rate for e in self.errors) + self.empty_rate + self.truncated_rate
        if total > 1 + 1e-9:
            raise ValueError(f"error, empty and truncated rates add up to {total:g}, more than 1")
        return self


class PhaseConfig(_Strict):
    """A stretch of the incident."""

    name: str
    duration_s: Annotated[float, Field(gt=0)]
    models: dict[str, Behaviour] = Field(default_factory=dict, description="What differs from the baseline.")
    traffic: dict[str, Annotated[float, Field(ge=0)]] | None = Field(
        None, description="Requests per second per prompt class (default: the scenario's)."
    )


class TokensConfig(_Strict):
    input: Annotated[int, Field(ge=0)] = 500
    output: Annotated[int, Field(ge=0)] = 200


class ScenarioDocument(_Strict):
    """The top level of a scenario file."""

    name: str
    description: str | None = None
    route: str | None = None
    seed: int = 1
    tokens: TokensConfig = Field(default_factory=TokensConfig)
    traffic: dict[str, Annotated[float, Field(ge=0)]] = Field(min_length=1)
    models: dict[str, Behaviour] = Field(default_factory=dict)
    phases: list[PhaseConfig] = Field(min_length=1)


@dataclass(frozen=True)
class Phase:
    name: str
    start_s: float
    end_s: float
    traffic: Mapping[str, float]
    models: Mapping[str, Behaviour]


@dataclass(frozen=True)
class Scenario:
    """A validated scenario."""

    document: ScenarioDocument
    source: str
    lines: Mapping[tuple[Any, ...], int]
    phases: tuple[Phase, ...]

    @property
    def duration_s(self) -> float:
        return self.phases[-1].end_s

    def behaviour(self, model: str, phase: Phase, primary: str | None = None) -> Behaviour | None:
        """The phase's entry for ``model``, else the baseline's; ``primary``/``*`` entries as fallbacks."""
        keys = [model, PRIMARY] if model == primary else [model]
        for models in (phase.models, self.document.models):
            for key in keys:
                if key in models:
                    return models[key]
        return phase.models.get("*") or self.document.models.get("*")

    def primary(self, policy: Policy) -> str | None:
        """The model the ``primary`` entries describe: the first of the route's chain."""
        route = policy.document.routes.get(self.route_for(policy))
        return route.chain[0] if route is not None else None

    def phase_at(self, t: float) -> Phase:
        for phase in self.phases:
            if t < phase.end_s:
                return phase
        return self.phases[-1]

    def where(self, path: Sequence[Any]) -> str:
        return _locate(self.source, self.lines, tuple(path))

    def route_for(self, policy: Policy) -> str:
        routes = policy.document.routes
        if self.document.route is not None:
            return self.document.route
        return "chat" if "chat" in routes or not routes else next(iter(routes))

    def check_against(self, policy: Policy) -> None:
        """Names in the scenario that the policy lacks. Raises :class:`PolicyError` (file:line)."""
        problems: list[str] = []
        doc = self.document
        route = self.route_for(policy)
        if route not in policy.document.routes:
            known = ", ".join(policy.document.routes) or "none"
            problems.append(f"{self.where(('route',))}: route: '{route}' is not a route of {policy.source} ({known})")
        defined = ", ".join(policy.models) or "none"
        sections: list[tuple[tuple[Any, ...], Mapping[str, Any]]] = [(("models",), doc.models)]
        sections += [(("phases", i, "models"), p.models) for i, p in enumerate(doc.phases)]
        for path, models in sections:
            for name in models:
                if name not in ("*", PRIMARY) and name not in policy.models:
                    sub = (*path, name)
                    problems.append(
                        f"{self.where(sub)}: {_dotted(sub)}: '{name}' is not a model of {policy.source} ({defined})"
                    )
        traffic_sections: list[tuple[tuple[Any, ...], Mapping[str, float]]] = [(("traffic",), doc.traffic)]
        traffic_sections += [(("phases", i, "traffic"), p.traffic) for i, p in enumerate(doc.phases) if p.traffic]
        for path, traffic in traffic_sections:
            for klass in traffic:
                if klass not in policy.classes:
                    sub = (*path, klass)
                    known = ", ".join(policy.classes)
                    problems.append(
                        f"{self.where(sub)}: {_dotted(sub)}: '{klass}' is not a prompt class of {policy.source} "
                        f"({known})"
                    )
        if route in policy.document.routes:
            for klass in policy.classes:
                for spec in policy.route_for(route, klass).chain:
                    if all(self.behaviour(spec.name, phase, self.primary(policy)) is None for phase in self.phases):
                        problems.append(
                            f"{self.where(('models',))}: models: nothing says how '{spec.name}' behaves "
                            '(give it an entry, or a "*" entry for every other model)'
                        )
        if problems:
            raise PolicyError(list(dict.fromkeys(problems)))


def resolve_scenario_path(name_or_path: str) -> Path:
    """A file path, or the name of a shipped scenario (``latency-spike``)."""
    path = Path(name_or_path)
    if path.exists() or path.suffix in (".yaml", ".yml") or "/" in name_or_path:
        return path
    return scenarios_dir() / f"{name_or_path}.yaml"


def load_scenario(name_or_path: str) -> Scenario:
    """Load and validate a scenario. Raises :class:`PolicyError` with ``file:line: field: message``."""
    path = resolve_scenario_path(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise PolicyError([f"{path}: cannot read scenario file: {e.strerror or e}"]) from None
    source = str(path)
    data, lines, problems = _parse_yaml(text, source)
    if problems:
        raise PolicyError(problems)

    def where(loc: Sequence[Any]) -> str:
        return _locate(source, lines, tuple(loc))

    if not isinstance(data, Mapping):
        raise PolicyError([f"{where(())}: a scenario must be a mapping (name, traffic, models, phases)"])
    try:
        doc = ScenarioDocument.model_validate(data)
    except ValidationError as e:
        raise PolicyError([p for err in e.errors() for p in _format_pydantic_errors(err, where)]) from None
    phases: list[Phase] = []
    start = 0.0
    for p in doc.phases:
        phases.append(
            Phase(
                name=p.name,
                start_s=start,
                end_s=start + p.duration_s,
                traffic=p.traffic if p.traffic is not None else doc.traffic,
                models=p.models,
            )
        )
        start += p.duration_s
    return Scenario(document=doc, source=source, lines=lines, phases=tuple(phases))
