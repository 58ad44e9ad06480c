"""The policy: what ops wrote in YAML, validated, with defaults filled in.

Loading is strict because a policy mistake shows up during an outage, not when it
is written. Every problem is reported at once, each as ``file:line: field: what is
wrong, what was expected`` (see :class:`PolicyError`). The schema is declared once,
with pydantic (already a litellm dependency); the JSON Schema that editors use is
generated from the same declaration (``llm-resilience schema``).
"""

from __future__ import annotations

import ast
import difflib
import functools
import importlib.util
import math
import os
import re
import sys
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import _outcomes as k
from ._base_errors import PolicyError  # not ._exceptions: loading a policy must not import litellm

# Durations are finite and at most a day: a larger one is a typo or `.inf`, and every call
# under it would fail (timers overflow past ~1e10 s). Timeouts leave an attempt room to run.
MAX_SECONDS = 86_400.0
MIN_TIMEOUT_S = 0.01
MIN_CONTEXT_WINDOW = 32  # tokens: below this not even a short chat turn fits, and every call would skip the model
PositiveFloat = Annotated[float, Field(gt=0)]
PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
Seconds = Annotated[float, Field(gt=0, le=MAX_SECONDS)]
TimeoutSeconds = Annotated[float, Field(ge=MIN_TIMEOUT_S, le=MAX_SECONDS)]
ErrorKind = Literal[
    "timeout", "connection", "rate_limit", "server_error", "auth", "not_found",
    "context_window", "content_policy", "bad_request", "unknown",
    "soft_timeout", "empty", "truncated", "invalid_json", "content_filter",
]  # fmt: skip
ValidatorAction = Literal["fall_back", "flag", "off"]
ERROR_KINDS: tuple[str, ...] = get_args(ErrorKind)
DEFAULT_CONTINUE_PROMPT = (
    "Your previous message was cut off. Continue it from exactly where it stopped: do not repeat "
    "anything already written and add no preamble."
)
"""The user turn that asks a model to continue a broken stream (``streaming.continue_prompt``)."""

BUILTIN_VALIDATORS: tuple[str, ...] = (k.EMPTY, k.TRUNCATED, k.INVALID_JSON, k.CONTENT_FILTER)


def _default_fall_back_on() -> list[ErrorKind]:
    return ["timeout", "connection", "rate_limit", "server_error", "auth", "not_found", "context_window"]


def _default_retry_on() -> list[ErrorKind]:
    return ["rate_limit", "server_error", "connection"]


ENV_PREFIX = "os.environ/"

DEFAULT_FALL_BACK_ON: tuple[str, ...] = (
    k.TIMEOUT,
    k.CONNECTION,
    k.RATE_LIMIT,
    k.SERVER_ERROR,
    k.AUTH,
    k.NOT_FOUND,
    k.CONTEXT_WINDOW,
)
DEFAULT_BREAKER_COUNTS: tuple[str, ...] = (
    k.TIMEOUT,
    k.CONNECTION,
    k.RATE_LIMIT,
    k.SERVER_ERROR,
    k.AUTH,
    k.SOFT_TIMEOUT,
)
# A summary-sized default: calls the policy says nothing about still get a bound,
# but a generous one, so that adopting the library never breaks a working call.
BUILTIN_DEFAULT_CLASS: dict[str, Any] = {"timeout_s": 60.0, "deadline_s": 180.0}


class _UnknownKey(ValueError):
    """Every unknown key of one section (each reported at its own line, so one run shows them all)."""

    def __init__(self, keys: Sequence[str], allowed: Sequence[str]) -> None:
        self.keys = list(keys)
        self.allowed = list(allowed)
        super().__init__("; ".join(self.message(key) for key in self.keys))

    def message(self, key: str) -> str:
        close = difflib.get_close_matches(key, self.allowed, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"unknown key '{key}' (expected one of: {', '.join(self.allowed)}){hint}"


class _Strict(BaseModel):
    """Base of every policy section: frozen, and unknown keys are errors with a hint."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            allowed = [f.alias or name for name, f in cls.model_fields.items()]
            unknown = [str(key) for key in data if key not in allowed]
            if unknown:
                raise _UnknownKey(unknown, allowed)
        return data


class ModelConfig(_Strict):
    """One model a route can use. ``litellm_params`` are passed to ``litellm.completion``."""

    litellm_params: dict[str, Any] = Field(
        description="Arguments for litellm.completion: model, api_base, api_key (write secrets as "
        "'os.environ/VAR'), and any provider option. They override the caller's arguments of the same name."
    )
    context_window: Annotated[int, Field(ge=MIN_CONTEXT_WINDOW)] | None = Field(
        None, description="Max input tokens, for models litellm does not know (overrides litellm's map)."
    )
    max_output_tokens: PositiveInt | None = Field(
        None, description="Max output tokens of this model: the truncation reserve never exceeds it."
    )
    input_cost_per_token: NonNegativeFloat | None = Field(None, description="USD per input token.")
    output_cost_per_token: NonNegativeFloat | None = Field(None, description="USD per output token.")
    assistant_prefill: bool | None = Field(
        None,
        description="Streams with on_interrupt: continue: can this model continue a prefilled assistant message? "
        "(default: litellm's supports_assistant_prefill; unknown models: no).",
    )

    @field_validator("litellm_params")
    @classmethod
    def _needs_model(cls, v: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(v.get("model"), str) or not v["model"]:
            raise ValueError("litellm_params needs 'model', a litellm model string such as 'openai/gpt-4o'")
        for name, value in v.items():
            if isinstance(value, str) and value.startswith(ENV_PREFIX) and not value[len(ENV_PREFIX) :]:
                raise ValueError(f"litellm_params.{name}: 'os.environ/' must be followed by a variable name")
        return v


class MatchRule(_Strict):
    """A classification rule; every condition given must hold."""

    last_user_regex: str | None = Field(None, description="Python regex searched in the text of the last user message.")
    metadata: dict[str, str] | None = Field(
        None, description="Key/values that must all be present in the caller's `metadata=` argument."
    )

    @field_validator("last_user_regex")
    @classmethod
    def _compiles(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"not a valid regular expression: {e}") from None
        return v

    @model_validator(mode="after")
    def _not_empty(self) -> MatchRule:
        if self.last_user_regex is None and self.metadata is None:
            raise ValueError("a match rule needs 'last_user_regex' or 'metadata'")
        return self


class SoftTimeoutConfig(_Strict):
    """Adaptive soft timeout: an attempt slower than the model's recent percentile is a soft failure."""

    percentile: Annotated[float, Field(gt=0, le=100)] = Field(95.0, description="Percentile of recent latency.")
    warmup_s: Seconds | None = Field(
        None, description="Soft timeout used until min_samples exist (default: the class timeout_s)."
    )
    min_samples: PositiveInt = Field(20, description="Samples needed before the percentile is trusted.")
    floor_s: Annotated[float, Field(ge=0, le=MAX_SECONDS)] = Field(0.05, description="Never lower than this.")
    ceiling_s: Seconds | None = Field(None, description="Never higher than this (default: timeout_s).")
    multiplier: PositiveFloat = Field(1.0, description="Scale applied to the learned percentile.")

    @model_validator(mode="before")
    @classmethod
    def _from_shorthand(cls, data: Any) -> Any:
        # `soft_timeout: p95` is the documented shorthand for {percentile: 95}.
        if isinstance(data, str):
            m = re.fullmatch(r"p(\d+(?:\.\d+)?)", data.strip())
            if not m:
                raise ValueError(f"expected a percentile such as 'p95' or a mapping, got '{data}'")
            return {"percentile": float(m.group(1))}
        return data


class PromptClass(_Strict):
    """Timing for one kind of request (summaries must be quick, code generation may take longer)."""

    timeout_s: TimeoutSeconds = Field(description="Per-attempt timeout, seconds.")
    deadline_s: TimeoutSeconds = Field(description="Whole-request deadline across all attempts, seconds.")
    first_token_timeout_s: TimeoutSeconds | None = Field(
        None, description="Streams: time allowed until the first content chunk (at most timeout_s; default: timeout_s)."
    )
    idle_timeout_s: TimeoutSeconds | None = Field(
        None, description="Streams: longest gap allowed between chunks (default: timeout_s)."
    )
    soft_timeout: SoftTimeoutConfig | None = Field(
        None, description="Adaptive soft timeout, e.g. 'p95' or {percentile: 95, warmup_s: 1.0}."
    )
    max_output_tokens: PositiveInt | None = Field(
        None, description="Output tokens reserved when the caller sets no max_tokens (truncation budget)."
    )
    match: list[MatchRule] = Field(
        default_factory=list, description="Rules that select this class when the caller passes none."
    )

    @model_validator(mode="after")
    def _timeout_within_deadline(self) -> PromptClass:
        if self.timeout_s > self.deadline_s:
            raise ValueError(
                f"timeout_s ({self.timeout_s}) is longer than deadline_s ({self.deadline_s}); "
                "an attempt can never use it all"
            )
        if self.first_token_timeout_s is not None and self.first_token_timeout_s > self.timeout_s:
            raise ValueError(
                f"first_token_timeout_s ({self.first_token_timeout_s}) is longer than timeout_s ({self.timeout_s}), "
                "which bounds the whole attempt; raise timeout_s or lower first_token_timeout_s"
            )
        return self


class HedgeConfig(_Strict):
    """Start the next model in parallel when the current one is slow."""

    after: float | str = Field(
        "p95", description="Seconds, or a percentile of the model's recent latency such as 'p95'."
    )
    max_extra: PositiveInt = Field(1, description="Extra parallel requests per call.")
    budget_ratio: Annotated[float, Field(ge=0, le=1)] = Field(
        0.1, description="Hedged requests may not exceed this share of recent requests."
    )

    @field_validator("after", mode="before")
    @classmethod
    def _after(cls, v: Any) -> float | str:
        if isinstance(v, bool) or not isinstance(v, int | float | str):
            raise ValueError(f"expected seconds or a percentile such as 'p95', got {_kind(v)}")
        if isinstance(v, str):
            m = re.fullmatch(r"p(\d+(?:\.\d+)?)", v)
            if not m:
                raise ValueError(f"expected seconds or a percentile such as 'p95', got '{v}'")
            if not 0 < float(m.group(1)) <= 100:
                raise ValueError(f"a percentile is between p0 and p100 (p0 excluded), got '{v}'")
        elif not 0 < v <= MAX_SECONDS:  # NaN fails this too
            raise ValueError(f"expected a finite number of seconds above 0 and at most {MAX_SECONDS:g}, got {v}")
        return v


class RetryConfig(_Strict):
    """Same-model retries (off by default: the chain is the retry)."""

    max_retries: Annotated[int, Field(ge=0)] = Field(0, description="Retries per model per call.")
    retry_on: list[ErrorKind] = Field(
        default_factory=_default_retry_on,
        description="Error kinds that may be retried on the same model (never 'timeout').",
    )
    backoff_base_s: Seconds = Field(0.1, description="First backoff; doubles each retry, with jitter.")
    backoff_max_s: Seconds = Field(2.0, description="Backoff cap.")
    retry_after_max_s: Seconds = Field(
        2.0,
        description="A provider's Retry-After longer than this is not waited out: the next model is tried at once.",
    )
    budget_ratio: Annotated[float, Field(ge=0, le=1)] = Field(
        0.2, description="Retries may not exceed this share of recent requests."
    )
    min_per_s: NonNegativeFloat = Field(1.0, description="Retries always allowed per second, budget aside.")

    @field_validator("retry_on")
    @classmethod
    def _never_timeout(cls, v: list[str]) -> list[str]:
        if k.TIMEOUT in v or k.SOFT_TIMEOUT in v:
            raise ValueError("a timeout is never retried on the same model; remove it from 'retry_on'")
        return v


class TruncationConfig(_Strict):
    """How to make a prompt fit a smaller context window."""

    strategy: Literal["drop_oldest", "off"] = Field(
        "drop_oldest",
        description="drop_oldest: keep system messages and the last user turn, drop the oldest turns "
        "(tool call/result pairs together), then shorten the longest message from its middle. "
        "off: never truncate (a model too small is skipped).",
    )
    marker: str = Field("\n[... truncated ...]\n", description="Inserted where text was cut.")
    reserve_output_tokens: PositiveInt = Field(
        1024, description="Output tokens reserved when neither caller nor class sets max_tokens."
    )


class StreamingConfig(_Strict):
    """What a stream does when it breaks after content reached the caller."""

    on_interrupt: Literal["raise", "continue"] = Field(
        "continue",
        description="continue: the next model of the chain finishes the text already sent (an assistant "
        "prefill where the model accepts one, else the text as an assistant turn plus continue_prompt); "
        "when no later model does (a one-model route), the model whose stream broke, once per call. "
        "Only the missing remainder reaches the caller. raise: StreamInterrupted.",
    )
    continue_prompt: str = Field(
        DEFAULT_CONTINUE_PROMPT,
        min_length=1,
        description="The user turn that asks a model without assistant prefill to go on with the text "
        "already sent (it follows that text as an assistant turn; never a system message).",
    )


class RouteOptions(_Strict):
    """Per prompt class overrides inside a route."""

    chain: list[str] | None = Field(
        None, min_length=1, description="Models to try, in order, for this class (omit it to use the route's)."
    )
    validators: dict[str, ValidatorAction] | None = Field(
        None, description="Validator name -> fall_back | flag | off (merged over the route's)."
    )
    on_all_invalid: Literal["raise", "return_best"] | None = Field(
        None, description="Overrides the route's on_all_invalid for this class."
    )
    hedge: HedgeConfig | None = Field(None, description="Overrides the route's hedge for this class.")
    retries: RetryConfig | None = Field(None, description="Overrides the route's retries for this class.")
    streaming: StreamingConfig | None = Field(None, description="Overrides the route's streaming for this class.")


class Route(_Strict):
    """A name the application calls (``completion(model="chat")``) and the models behind it."""

    chain: list[str] = Field(min_length=1, description="Models to try, in order (expensive -> fast).")
    classes: dict[str, RouteOptions] = Field(
        default_factory=dict, description="Prompt class name -> overrides (e.g. a cheap-first chain)."
    )
    validators: dict[str, ValidatorAction] = Field(
        default_factory=dict,
        description="Validator name -> fall_back | flag | off. Built-ins: empty, truncated, invalid_json, "
        "content_filter; plus any registered with llm_resilience.register_validator.",
    )
    on_all_invalid: Literal["raise", "return_best"] = Field(
        "raise", description="When every answer failed validation: raise, or return the best one flagged."
    )
    hedge: HedgeConfig | None = Field(
        None, description="Start the next model in parallel when the current one is slow (off when absent)."
    )
    retries: RetryConfig | None = Field(
        None, description="Retry the same model on listed transient errors before falling back (off when absent)."
    )
    truncation: TruncationConfig = Field(
        default_factory=TruncationConfig, description="Fitting the prompt into each model's context window."
    )
    streaming: StreamingConfig = Field(
        default_factory=StreamingConfig, description="What a stream does when it breaks after content."
    )


DEFAULT_RESET_TIMEOUT_S = 5.0
DEFAULT_RESET_BACKOFF = {"factor": 2.0, "max_s": 60.0}


def default_reset_backoff() -> ResetBackoff:
    """The built-in ``reset_backoff`` (the ``init`` starter writes the same)."""
    return ResetBackoff(**DEFAULT_RESET_BACKOFF)


class ResetBackoff(_Strict):
    """Lengthen the open period after each failed probe (a successful probe resets it)."""

    factor: float = Field(2.0, ge=1.0, le=100.0, description="Open period multiplier per consecutive failed probe.")
    max_s: Seconds = Field(description="Longest open period, seconds.")


class BreakerConfig(_Strict):
    """Circuit breaker settings; under ``default`` or a model name (which overrides the default)."""

    fail_max: PositiveInt | None = Field(None, description="Consecutive failures that open the breaker.")
    reset_timeout_s: Seconds | None = Field(None, description="Seconds open before a probe (default 5).")
    reset_backoff: ResetBackoff | None = Field(
        None,
        description="After n failed probes in a row stay open reset_timeout_s * factor^n, up to max_s "
        "(default: factor 2, max_s 60).",
    )
    success_threshold: PositiveInt | None = Field(None, description="Probe successes needed to close.")
    count: list[str] | None = Field(
        None,
        description="Outcome kinds that count as failures: error kinds (timeout, connection, rate_limit, "
        "server_error, auth, not_found, context_window, content_policy, bad_request, unknown, soft_timeout) "
        "and validator names (built-in or registered).",
    )
    panic: Literal["try_one", "fail_fast"] | None = Field(
        None,
        description="When every model of a chain is skipped as open: try_one sends one request anyway "
        "(to the model whose breaker opened first, among those set to try_one); fail_fast raises at once.",
    )
    suspect_admit: PositiveInt | None = Field(
        None,
        description="New requests let through at a time while a request to the model is already slow "
        "or failed, until a verdict (a success, or the breaker opening).",
    )


class ErrorsConfig(_Strict):
    """Which error kinds move on to the next model. Anything else is raised to the caller at once."""

    fall_back_on: list[ErrorKind] = Field(
        default_factory=_default_fall_back_on,
        description="Error kinds that move on to the next model; any other error is raised to the caller at once.",
    )


class ReviewLogConfig(_Strict):
    """Where fallbacks and validator failures are appended, one JSON line each."""

    path: str | None = Field(None, description="A file path (relative paths: to the policy file).")
    logger: str | None = Field(None, description="A Python logger name (INFO records).")

    @model_validator(mode="after")
    def _one_sink(self) -> ReviewLogConfig:
        if self.path is None and self.logger is None:
            raise ValueError("review_log needs 'path' or 'logger'")
        return self


class TelemetryConfig(_Strict):
    """What spans and logs may contain."""

    record_content: bool = Field(False, description="Opt in to prompt and answer text in spans (off: never recorded).")


DEFAULT_NAMESPACE = "default"


class StateConfig(_Strict):
    """Where breaker state lives: in this process, or shared by every replica through Redis."""

    backend: Literal["in_process", "redis"] = Field(
        "in_process", description="in_process: each process learns alone. redis: breakers are shared by the fleet."
    )
    url: str | None = Field(
        None, description="Redis URL, e.g. os.environ/REDIS_URL or redis://host:6379/0. Required for redis."
    )
    namespace: str = Field(
        DEFAULT_NAMESPACE,
        min_length=1,
        max_length=200,
        description="Processes with the same namespace (and Redis) share breakers; one per application.",
    )
    failure_window_s: PositiveFloat = Field(
        60.0, description="Fleet failures older than this no longer count toward fail_max, seconds."
    )
    sync_interval_s: PositiveFloat = Field(
        0.5, description="How often each process refreshes its view of the fleet's breakers, seconds."
    )

    @model_validator(mode="after")
    def _redis_needs_url(self) -> StateConfig:
        if self.backend == "redis" and not self.url:
            raise ValueError("state.backend redis needs 'url' (e.g. os.environ/REDIS_URL)")
        if self.url and not self.url.startswith(ENV_PREFIX):  # (from the environment: checked when read)
            from ._shared_state import check_redis_url, redacted_url

            problem = check_redis_url(self.url)
            if problem is not None:
                raise ValueError(f"state.url {redacted_url(self.url)} is not a usable Redis URL: {problem}")
        return self


class PolicyDocument(_Strict):
    """The top level of a policy file."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, allow_inf_nan=False, title="llm-resilience policy",
        json_schema_extra={"$schema": "https://json-schema.org/draft/2020-12/schema"},
    )  # fmt: skip

    version: Literal[1] = Field(1, description="Policy format version; only 1 exists.")
    models: dict[str, ModelConfig] = Field(
        default_factory=dict, description="Every model a route may use, by a name of your choosing."
    )
    routes: dict[str, Route] = Field(
        default_factory=dict, description="The names the application passes as model=, each an ordered chain."
    )
    prompt_classes: dict[str, PromptClass] = Field(
        default_factory=dict, description="Timing classes of requests; 'default' applies when no rule matches."
    )
    breakers: dict[str, BreakerConfig] = Field(default_factory=dict, description="'default' and/or model names.")
    errors: ErrorsConfig = Field(default_factory=ErrorsConfig, description="Which provider errors fall back.")
    review_log: ReviewLogConfig | None = Field(
        None, description="One JSON line per fallback and validator failure (off when absent)."
    )
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig, description="What spans may record.")
    state: StateConfig = Field(default_factory=StateConfig, description="Where breaker state lives.")


BUILTIN_CLASS = PromptClass.model_validate(BUILTIN_DEFAULT_CLASS)


def caller_timeout_class(timeout_s: float) -> PromptClass:
    """The class a call runs under when it passed ``timeout=`` and the policy defines no ``default`` class.

    The built-in bounds are a guess for calls the policy says nothing about; the caller's
    own ``timeout=`` knows better, so it becomes both the attempt timeout and the deadline
    (adopting the library never shortens it). Where the policy defines the class, the
    policy's timeouts hold and the caller's ``timeout=`` only caps the whole call.
    """
    bound = min(max(timeout_s, MIN_TIMEOUT_S), MAX_SECONDS)
    return PromptClass.model_construct(timeout_s=bound, deadline_s=bound)


# ---------------------------------------------------------------------------
# The resolved policy the engine uses.


@dataclass(frozen=True)
class BreakerSettings:
    fail_max: int = 5
    # A short first reset, doubled per failed probe up to a minute: back within seconds after the
    # common few-second blip, yet a long outage is probed rarely (benchmarks/results/breaker-reset.md).
    reset_timeout_s: float = DEFAULT_RESET_TIMEOUT_S
    success_threshold: int = 1
    reset_backoff: ResetBackoff | None = field(default_factory=lambda: default_reset_backoff())
    count: frozenset[str] = frozenset(DEFAULT_BREAKER_COUNTS)
    panic: str = "try_one"
    suspect_admit: int = 1


@dataclass(frozen=True)
class ModelSpec:
    """A model as the engine sees it. ``repr`` never shows secrets."""

    name: str
    litellm_params: Mapping[str, Any] = field(repr=False)
    context_window: int | None = None
    max_output_tokens: int | None = None
    input_cost_per_token: float | None = None
    output_cost_per_token: float | None = None
    adhoc: bool = False
    assistant_prefill: bool | None = None
    """Declared by the policy; ``None``: ask litellm's model map."""

    @property
    def litellm_model(self) -> str:
        return str(self.litellm_params["model"])

    def resolved_params(self) -> tuple[dict[str, Any], str | None]:
        """litellm kwargs with ``os.environ/VAR`` resolved now (so rotated keys are picked up).

        Returns the params and the name of the first variable that is not set, if any.
        """
        out: dict[str, Any] = {}
        missing: str | None = None
        for name, value in self.litellm_params.items():
            if isinstance(value, str) and value.startswith(ENV_PREFIX):
                var = value[len(ENV_PREFIX) :]
                resolved = os.environ.get(var)
                if resolved is None:
                    missing = missing or var
                    continue
                value = resolved
            out[name] = value
        return out, missing


@dataclass(frozen=True)
class ResolvedRoute:
    """A route for one prompt class: chain and per-call options, overrides applied."""

    name: str
    chain: tuple[ModelSpec, ...]
    validators: Mapping[str, str]
    on_all_invalid: str
    hedge: HedgeConfig | None
    retries: RetryConfig | None
    truncation: TruncationConfig
    on_interrupt: str = "continue"
    """Streams: ``continue`` with the next model after a break mid-stream, or ``raise``."""
    continue_prompt: str = DEFAULT_CONTINUE_PROMPT
    """Streams: the user turn asking a model without assistant prefill to continue the text."""


@dataclass(frozen=True)
class Policy:
    """A validated policy. Build with :meth:`from_file`, :meth:`from_dict` or :meth:`defaults`."""

    document: PolicyDocument
    source: str = "<dict>"
    models: Mapping[str, ModelSpec] = field(default_factory=dict)
    by_litellm_model: Mapping[str, ModelSpec] = field(default_factory=dict)
    classes: Mapping[str, PromptClass] = field(default_factory=dict)
    class_rules: tuple[tuple[str, MatchRule, re.Pattern[str] | None], ...] = ()
    breaker_default: BreakerSettings = BreakerSettings()
    breaker_overrides: Mapping[str, BreakerSettings] = field(default_factory=dict)
    fall_back_on: frozenset[str] = frozenset(DEFAULT_FALL_BACK_ON)
    name_refs: tuple[tuple[str, str, bool], ...] = field(default=(), repr=False)
    """Validator names the policy uses: (``file:line: field``, name, listed under ``breakers.*.count``)."""
    _routes: dict[tuple[str, str], ResolvedRoute] = field(default_factory=dict, repr=False, compare=False)

    # -- construction -------------------------------------------------------

    @classmethod
    def defaults(cls) -> Policy:
        """The built-in policy used when ``LLM_RESILIENCE_POLICY`` is not set."""
        return cls.from_dict({}, source="<built-in defaults>")

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], *, validators: Collection[str] = ()) -> Policy:
        """Load and validate a YAML policy file. Raises :class:`PolicyError` listing every problem.

        Validator names the policy uses (``validators:`` and ``breakers.*.count``) must be
        built in, registered already (:func:`llm_resilience.register_validator`), or listed
        in ``validators`` (names the application registers before it builds the engine).
        """
        return cls.from_bytes(read_policy_bytes(path), source=str(path), validators=validators)

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<bytes>", *, validators: Collection[str] = ()) -> Policy:
        """Validate a policy file's content: UTF-8 YAML (the one reader of the engine, reloads and ``validate``)."""
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            raise PolicyError(
                [f"{source}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save it as UTF-8"]
            ) from None
        return cls.from_yaml(text, source=source, validators=validators)

    @classmethod
    def from_yaml(cls, text: str, source: str = "<string>", *, validators: Collection[str] = ()) -> Policy:
        """Validate a policy given as YAML text (see :meth:`from_file`)."""
        data, lines, problems = _parse_yaml(text, source)
        if problems and not lines:  # not YAML at all (or too big to be a policy): nothing more to check
            raise PolicyError(_finish(source, problems))
        if data is None and not problems:
            # Empty, or comments only: what a half-written file or a failed template looks like. The
            # built-in policy is Policy.defaults(); a file must say something (`{}` says "defaults").
            raise PolicyError([f"{source}:1: the file is empty (no YAML document in it): not a policy"])
        return cls._build({} if data is None else data, source, lines, problems, validators)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<dict>", *, validators: Collection[str] = ()) -> Policy:
        """Validate a policy given as a Python mapping (same shape as the YAML; see :meth:`from_file`)."""
        return cls._build(data, source, {}, [], validators)

    @classmethod
    def _build(
        cls,
        data: Any,
        source: str,
        lines: Mapping[tuple[Any, ...], int],
        problems: list[str],
        validators: Collection[str],
    ) -> Policy:
        """Schema and cross-reference checks in one pass: every problem is reported at once."""

        def where(path: Sequence[Any]) -> str:
            return _locate(source, lines, tuple(path))

        if not isinstance(data, Mapping):
            problems.append(f"{where(())}: the policy must be a mapping of sections, got {_kind(data)}")
            raise PolicyError(_finish(source, problems))
        doc: PolicyDocument | None = None
        try:
            doc = PolicyDocument.model_validate(data)
        except ValidationError as e:
            problems.extend(problem for err in e.errors() for problem in _format_pydantic_errors(err, where))
        known = _known_validators(validators)
        refs = tuple((f"{where(path)}: {_dotted(path)}", name, counted) for path, name, counted in _name_refs(data))
        problems.extend(f"{where(path)}: {_dotted(path)}: {msg}" for path, msg in _cross_check(data))
        problems.extend(f"{where(path)}: {_dotted(path)}: {msg}" for path, msg in _misspelt_litellm_params(data))
        problems.extend(_unknown_names(refs, known))
        if problems or doc is None:
            raise PolicyError(_finish(source, problems))
        return cls._resolve(doc, source, refs)

    def unknown_validators(self, known: Collection[str]) -> list[str]:
        """Problems (``file:line: field: message``) for validator names neither built in nor in ``known``."""
        return _unknown_names(self.name_refs, frozenset(known))

    @classmethod
    def _resolve(cls, doc: PolicyDocument, source: str, refs: tuple[tuple[str, str, bool], ...] = ()) -> Policy:
        models = {
            name: ModelSpec(
                name=name,
                litellm_params=dict(m.litellm_params),
                context_window=m.context_window,
                max_output_tokens=m.max_output_tokens,
                input_cost_per_token=m.input_cost_per_token,
                output_cost_per_token=m.output_cost_per_token,
                assistant_prefill=m.assistant_prefill,
            )
            for name, m in doc.models.items()
        }
        by_litellm: dict[str, ModelSpec] = {}
        for spec in models.values():
            by_litellm.setdefault(spec.litellm_model, spec)
        classes = dict(doc.prompt_classes)
        classes.setdefault("default", BUILTIN_CLASS)
        rules = tuple(
            (name, rule, re.compile(rule.last_user_regex) if rule.last_user_regex else None)
            for name, pc in doc.prompt_classes.items()
            for rule in pc.match
        )
        base = BreakerSettings()
        default_cfg = doc.breakers.get("default")
        breaker_default = _merge_breaker(base, default_cfg) if default_cfg else base
        overrides = {
            name: _merge_breaker(breaker_default, cfg) for name, cfg in doc.breakers.items() if name != "default"
        }
        return cls(
            document=doc,
            source=source,
            models=models,
            by_litellm_model=by_litellm,
            classes=classes,
            class_rules=rules,
            breaker_default=breaker_default,
            breaker_overrides=overrides,
            fall_back_on=frozenset(doc.errors.fall_back_on),
            name_refs=refs,
        )

    # -- questions the engine asks --------------------------------------------

    def breaker_settings(self, model: str) -> BreakerSettings:
        return self.breaker_overrides.get(model, self.breaker_default)

    def route_for(self, model: str, prompt_class: str) -> ResolvedRoute:
        """The route serving ``completion(model=...)``.

        ``model`` may be a route name, a model name from ``models:``, a litellm model
        string used by one of them, or any other litellm model string (an ad-hoc
        one-model route with the policy defaults, so the drop-in never breaks a call).
        """
        key = (model, prompt_class)
        cached = self._routes.get(key)
        if cached is None:
            cached = self._resolve_route(model, prompt_class)
            if len(self._routes) < 4096:  # ad-hoc model strings come from callers: stay bounded
                self._routes[key] = cached
        return cached

    def _resolve_route(self, model: str, prompt_class: str) -> ResolvedRoute:
        route = self.document.routes.get(model)
        if route is not None:
            over = route.classes.get(prompt_class)
            chain_names = over.chain if over and over.chain else route.chain
            validators = dict(route.validators)
            if over and over.validators:
                validators.update(over.validators)
            return ResolvedRoute(
                name=model,
                chain=tuple(self.models[n] for n in chain_names),
                validators=validators,
                on_all_invalid=(over.on_all_invalid if over and over.on_all_invalid else route.on_all_invalid),
                hedge=over.hedge if over and over.hedge else route.hedge,
                retries=over.retries if over and over.retries else route.retries,
                truncation=route.truncation,
                on_interrupt=(over.streaming if over and over.streaming else route.streaming).on_interrupt,
                continue_prompt=(over.streaming if over and over.streaming else route.streaming).continue_prompt,
            )
        spec = self.models.get(model) or self.by_litellm_model.get(model)
        if spec is None:
            spec = ModelSpec(name=model, litellm_params={"model": model}, adhoc=True)
        return ResolvedRoute(
            name=model, chain=(spec,), validators={}, on_all_invalid="raise",
            hedge=None, retries=None, truncation=TruncationConfig(),
        )  # fmt: skip


def _merge_breaker(base: BreakerSettings, cfg: BreakerConfig) -> BreakerSettings:
    return BreakerSettings(
        fail_max=cfg.fail_max if cfg.fail_max is not None else base.fail_max,
        reset_timeout_s=cfg.reset_timeout_s if cfg.reset_timeout_s is not None else base.reset_timeout_s,
        success_threshold=(cfg.success_threshold if cfg.success_threshold is not None else base.success_threshold),
        reset_backoff=cfg.reset_backoff if cfg.reset_backoff is not None else base.reset_backoff,
        count=frozenset(cfg.count) if cfg.count is not None else base.count,
        panic=cfg.panic if cfg.panic is not None else base.panic,
        suspect_admit=cfg.suspect_admit if cfg.suspect_admit is not None else base.suspect_admit,
    )


def _cross_check(data: Mapping[Any, Any]) -> list[tuple[tuple[Any, ...], str]]:
    """References between sections, which a per-field schema cannot express.

    Works on the raw data, next to the schema check rather than after it, so that a schema
    error never hides a reference error: sections too broken to read are skipped.
    """
    problems: list[tuple[tuple[Any, ...], str]] = []
    models = data.get("models", {})
    classes = data.get("prompt_classes", {})
    defined = ", ".join(map(str, models)) if isinstance(models, Mapping) and models else "none"

    def check_chain(path: tuple[Any, ...], chain: Any) -> None:
        if not isinstance(chain, list) or not isinstance(models, Mapping):
            return
        names = [n for n in chain if isinstance(n, str)]
        for i, name in enumerate(chain):
            if isinstance(name, str) and name not in models:
                problems.append(((*path, i), f"unknown model '{name}' (defined under models: {defined})"))
        seen = [n for i, n in enumerate(names) if n in names[:i]]
        if seen:
            problems.append((path, f"model '{seen[0]}' appears twice in the chain"))

    for rname, route in _items(data.get("routes")):
        if not isinstance(route, Mapping):
            continue
        check_chain(("routes", rname, "chain"), route.get("chain"))
        for cname, over in _items(route.get("classes")):
            if isinstance(classes, Mapping) and cname not in classes and cname != "default":
                known = ", ".join(map(str, classes)) or "none"
                problems.append(
                    (("routes", rname, "classes", cname), f"unknown prompt class '{cname}' (defined: {known})")
                )
            if isinstance(over, Mapping):
                check_chain(("routes", rname, "classes", cname, "chain"), over.get("chain"))
    if isinstance(models, Mapping):
        for bname, _ in _items(data.get("breakers")):
            if bname != "default" and bname not in models:
                problems.append(
                    (("breakers", bname), f"'{bname}' is neither 'default' nor a model (defined: {defined})")
                )
    return problems


@functools.lru_cache(maxsize=1)
def litellm_completion_arguments() -> frozenset[str]:
    """The arguments ``litellm.completion`` reads: its parameters and the ``kwargs`` keys it looks up.

    Read from litellm's source (``litellm/main.py``) without importing litellm (~2 s), so that
    ``validate`` stays fast; empty when litellm or its source cannot be found.
    """
    spec = importlib.util.find_spec("litellm")
    if spec is None or spec.origin is None:
        return frozenset()
    try:
        tree = ast.parse((Path(spec.origin).parent / "main.py").read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return frozenset()
    function = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "completion"), None)
    if function is None:
        return frozenset()
    names = {a.arg for a in (*function.args.args, *function.args.kwonlyargs)}
    for node in ast.walk(function):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("get", "pop")
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "kwargs"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names.add(node.args[0].value)
    return frozenset(names)


def _misspelt_litellm_params(data: Mapping[Any, Any]) -> list[tuple[tuple[Any, ...], str]]:
    """``litellm_params`` keys that are near misses of an argument litellm.completion reads (``api_bse``).

    litellm passes keys it does not know to the provider or drops them silently, so a typo sends
    requests to the provider's default endpoint. A key close to no known argument is left alone
    (provider-specific options such as ``vertex_project`` are legitimate).
    """
    known = litellm_completion_arguments()
    problems: list[tuple[tuple[Any, ...], str]] = []
    if not known:
        return problems
    for name, model in _items(data.get("models")):
        params = model.get("litellm_params") if isinstance(model, Mapping) else None
        for key in params if isinstance(params, Mapping) else ():
            if not isinstance(key, str) or key in known:
                continue
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.8)
            if close:
                problems.append(
                    (
                        ("models", name, "litellm_params", key),
                        f"not an argument litellm.completion takes; did you mean '{close[0]}'?",
                    )
                )
    return problems


def _items(section: Any) -> list[tuple[Any, Any]]:
    return list(section.items()) if isinstance(section, Mapping) else []


def _name_refs(data: Mapping[Any, Any]) -> list[tuple[tuple[Any, ...], str, bool]]:
    """Validator names used: under ``validators:`` (route and class), and under ``breakers.*.count``."""
    refs: list[tuple[tuple[Any, ...], str, bool]] = []
    for rname, route in _items(data.get("routes")):
        if not isinstance(route, Mapping):
            continue
        sections: list[tuple[tuple[Any, ...], Any]] = [(("routes", rname, "validators"), route.get("validators"))]
        sections += [
            (("routes", rname, "classes", cname, "validators"), over.get("validators"))
            for cname, over in _items(route.get("classes"))
            if isinstance(over, Mapping)
        ]
        for path, validators in sections:
            refs += [((*path, name), name, False) for name, _ in _items(validators) if isinstance(name, str)]
    for bname, breaker in _items(data.get("breakers")):
        count = breaker.get("count") if isinstance(breaker, Mapping) else None
        if isinstance(count, list):
            refs += [
                (("breakers", bname, "count", i), name, True)
                for i, name in enumerate(count)
                if isinstance(name, str) and name not in ERROR_KINDS
            ]
    return refs


def _known_validators(extra: Collection[str]) -> frozenset[str]:
    # Registering a validator imports _validators (which imports litellm); when nothing imported it,
    # nothing was registered, and loading a policy (``llm-resilience validate``) stays litellm-free.
    validators = sys.modules.get(f"{__package__}._validators")
    registered = validators.registered_validators() if validators is not None else ()
    return frozenset((*BUILTIN_VALIDATORS, *registered, *extra))


def _unknown_names(refs: Sequence[tuple[str, str, bool]], known: frozenset[str]) -> list[str]:
    problems = []
    for where, name, counted in refs:
        if name in known or name in BUILTIN_VALIDATORS:
            continue
        custom = sorted(set(known) - set(BUILTIN_VALIDATORS))
        close = difflib.get_close_matches(name, [*BUILTIN_VALIDATORS, *custom, *(ERROR_KINDS if counted else ())], n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        what = "neither an error kind nor a validator" if counted else "an unknown validator"
        problems.append(
            f"{where}: '{name}' is {what} (built-in validators: {', '.join(BUILTIN_VALIDATORS)}; "
            f"registered: {', '.join(custom) or 'none'}); {hint}a custom validator must be registered with "
            f"llm_resilience.register_validator('{name}', fn) before the policy is loaded"
        )
    return problems


# ---------------------------------------------------------------------------
# YAML with line numbers, and error messages people can act on.

# Bounds that keep a hostile or mistaken file from costing more than a policy can need: a
# 394-byte alias bomb expands to billions of values, and 5,000 nested brackets overflow the
# parser's recursion. A real policy is a few hundred values, a handful of levels deep.
MAX_POLICY_BYTES = 1_000_000
MAX_YAML_VALUES = 20_000
"""Values after alias expansion (``*name`` repeats the anchored value)."""
MAX_YAML_DEPTH = 32

_MERGE_TAG = "tag:yaml.org,2002:merge"
_PLAIN_TAGS = ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq")


def read_policy_bytes(path: str | os.PathLike[str]) -> bytes:
    """A policy file's bytes; :class:`PolicyError` naming the file when it cannot be read."""
    p = Path(path)
    try:
        return p.read_bytes()
    except OSError as e:
        raise PolicyError([f"{p}: cannot read policy file: {e.strerror or e}"]) from None


class _TooBig(Exception):
    def __init__(self, node: yaml.Node, message: str) -> None:
        super().__init__(message)
        self.node = node


def _parse_yaml(text: str, source: str) -> tuple[Any, dict[tuple[Any, ...], int], list[str]]:
    """Parse YAML, remembering the line of every key and list item; report duplicate keys.

    Never raises: what is not YAML, or too big or too deep to be a policy, comes back as
    problems. Values are built here from the composed nodes (not by PyYAML's constructor)
    so that aliases are counted as they expand, and keys YAML 1.1 reads as something other
    than a string (``on:``, ``yes:``, ``1:``) are reported where they are written.
    """
    if len(text) > MAX_POLICY_BYTES:
        return None, {}, [f"{source}: the file is {len(text):,} characters; a policy is at most {MAX_POLICY_BYTES:,}"]
    try:
        loader = yaml.SafeLoader(text)  # reads the text at once: control characters raise here
    except yaml.reader.ReaderError as e:
        return None, {}, [f"{source}:{text.count(chr(10), 0, e.position) + 1}: not valid YAML: {_reader_problem(e)}"]
    # The reader checked the whole text above: from here on PyYAML raises only marked errors.
    try:
        too_deep = _too_deep(loader)
        if too_deep is not None:
            return None, {}, [f"{source}:{too_deep}: nested more than {MAX_YAML_DEPTH} levels deep; not a policy"]
        loader.dispose()
        loader = yaml.SafeLoader(text)
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as e:
        return None, {}, [_not_yaml(source, e)]
    finally:
        loader.dispose()
    if node is None:
        return None, {}, []
    builder = _Builder(loader, source)
    try:
        data = builder.build(node, (), 0)
    except _TooBig as e:
        return None, {}, [f"{source}:{e.node.start_mark.line + 1}: {e}"]
    except yaml.MarkedYAMLError as e:  # a scalar the safe constructor refuses (an unknown !tag...)
        return None, {}, [_not_yaml(source, e)]
    return data, builder.lines, builder.problems


def _line(mark: Any) -> int:  # a PyYAML Mark (pure Python or libyaml) or None
    """The 1-based line of a PyYAML mark (0 without one; PyYAML's parser always sets it)."""
    return int(mark.line) + 1 if mark is not None else 0


def _not_yaml(source: str, e: yaml.MarkedYAMLError) -> str:
    mark = e.problem_mark
    if "'\\t'" in (e.problem or "") and mark is not None:
        # PyYAML's "found character '\t' that cannot start any token" does not say what to do.
        return (
            f"{source}:{_line(mark)}: not valid YAML: a tab character (column {int(mark.column) + 1}); "
            "YAML indents with spaces only: replace the tab with spaces"
        )
    return f"{source}:{_line(mark)}: not valid YAML: {e.problem or type(e).__name__}"


def _reader_problem(e: yaml.reader.ReaderError) -> str:
    # A text (not bytes) stream: PyYAML's reader passes the character's code point.
    code, at = e.character, e.position
    return f"control character #x{code:04x} at position {at}; remove it (or write it as an escape in quotes)"


def _too_deep(loader: yaml.SafeLoader) -> int | None:
    """The line where nesting first exceeds MAX_YAML_DEPTH (``None``: it never does).

    Walks the parser's events, which PyYAML produces without recursion, before the
    (recursive) composer builds the tree.
    """
    depth = 0
    while loader.check_event():
        event = loader.get_event()  # type: ignore[no-untyped-call]
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                return _line(event.start_mark)
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
    return None


class _Builder:
    """Python values from composed YAML nodes, with the line of every key and item."""

    def __init__(self, loader: yaml.SafeLoader, source: str) -> None:
        self.loader = loader
        self.source = source
        self.lines: dict[tuple[Any, ...], int] = {}
        self.problems: list[str] = []
        self.values = 0

    def build(self, node: yaml.Node, path: tuple[Any, ...], depth: int) -> Any:
        self.values += 1
        if self.values > MAX_YAML_VALUES:
            raise _TooBig(node, f"more than {MAX_YAML_VALUES:,} values once aliases are expanded; not a policy")
        if depth > MAX_YAML_DEPTH:  # an alias can nest a value inside itself
            raise _TooBig(node, f"nested more than {MAX_YAML_DEPTH} levels deep (an alias inside itself?)")
        self.lines.setdefault(path, node.start_mark.line + 1)
        if not isinstance(node, yaml.ScalarNode) and node.tag not in _PLAIN_TAGS:
            raise yaml.constructor.ConstructorError(None, None, f"tag '{node.tag}' is not allowed", node.start_mark)
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path, depth)
        if isinstance(node, yaml.SequenceNode):
            out = []
            for i, item in enumerate(node.value):
                self.lines[(*path, i)] = item.start_mark.line + 1
                out.append(self.build(item, (*path, i), depth + 1))
            return out
        return self.loader.construct_object(node)

    def _mapping(self, node: yaml.MappingNode, path: tuple[Any, ...], depth: int) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        merged: dict[Any, Any] = {}
        seen: set[Any] = set()
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:  # `<<: *base`: keys written here win over merged ones
                sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                for src in sources:
                    value = self.build(src, path, depth + 1)
                    if isinstance(value, dict):
                        merged.update({k: v for k, v in value.items() if k not in merged})
                continue
            key = self._key(key_node, path)
            sub = (*path, key)
            line = key_node.start_mark.line + 1
            if key in seen:
                self.problems.append(
                    f"{self.source}:{line}: {_dotted(sub)}: duplicate key (YAML would silently keep only the last one)"
                )
            seen.add(key)
            self.lines[sub] = line
            out[key] = self.build(value_node, sub, depth + 1)
        return {**merged, **out}

    def _key(self, key_node: yaml.Node, path: tuple[Any, ...]) -> Any:
        line = key_node.start_mark.line + 1
        if not isinstance(key_node, yaml.ScalarNode):
            self.problems.append(f"{self.source}:{line}: {_dotted(path)}: a key must be a name, not a list or mapping")
            return f"<{'list' if isinstance(key_node, yaml.SequenceNode) else 'mapping'} at line {line}>"
        key = self.loader.construct_object(key_node)
        if isinstance(key, str):
            return key
        # YAML 1.1 reads `on`, `yes`, `no`, `off` as booleans, `1` as a number, `~` as null. No policy
        # key is anything but a string: say what YAML did, on this line, and go on with the text as written.
        text = key_node.value
        what = {bool: f"the boolean {str(key).lower()}", type(None): "null"}.get(type(key), f"the {_kind(key)} {key!r}")
        self.problems.append(
            f"{self.source}:{line}: {_dotted((*path, text))}: '{text}' was read as {what}; quote it (\"{text}\")"
        )
        return text


def _locate(source: str, lines: Mapping[tuple[Any, ...], int], path: tuple[Any, ...]) -> str:
    for end in range(len(path), -1, -1):
        line = lines.get(path[:end])
        if line is not None:
            return f"{source}:{line}"
    return source


def _dotted(path: Sequence[Any]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", type(None): "nothing"}.get(
        type(value), type(value).__name__
    )


_SECRETISH = re.compile(r"key|secret|token|password", re.I)
# Secrets by shape, wherever they were pasted: vendor key prefixes, bearer tokens, JWTs, and
# long tokens that mix letters and digits (an API key, not a model name or a word).
_SECRET_SHAPES = re.compile(
    r"(?:sk|pk|rk)[-_][A-Za-z0-9_-]{8,}|(?:xox[abprs]|gh[pousr]|github_pat|glpat)[-_][A-Za-z0-9_-]{8,}"
    r"|AKIA[0-9A-Z]{12,}|AIza[0-9A-Za-z_-]{20,}|eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_.-]+"
    r"|(?i:bearer)\s+[A-Za-z0-9._~+/=-]{8,}"
)
_LONG_TOKEN = re.compile(r"[A-Za-z0-9_+=-]{32,}")


def _looks_secret(token: str) -> bool:
    if not (any(c.isdigit() for c in token) and any(c.isalpha() for c in token)):
        return False
    counts = [token.count(c) for c in set(token)]
    entropy = -sum(n / len(token) * math.log2(n / len(token)) for n in counts)
    return entropy >= 3.5


def redact_secrets(text: str) -> str:
    """``text`` with anything shaped like a credential replaced by ``<redacted>``."""
    text = _SECRET_SHAPES.sub("<redacted>", text)
    return _LONG_TOKEN.sub(lambda m: "<redacted>" if _looks_secret(m.group()) else m.group(), text)


def _finish(source: str, problems: Sequence[str]) -> list[str]:
    """Problems in file order, with secret-shaped text removed (the location is kept as is).

    Every problem starts with ``source`` (then ``:LINE`` when the data came from YAML).
    """

    def line_of(problem: str) -> int:
        m = re.match(r":(\d+):", problem[len(source) :])
        return int(m.group(1)) if m else 0

    # sorted() is stable: same-line problems keep their order
    return [source + redact_secrets(problem[len(source) :]) for problem in sorted(problems, key=line_of)]


_PYDANTIC_TAG = re.compile(
    r"(?:str|float|int|bool|none|function-(?:after|before|wrap|plain)\[.*\]|"
    r"ModelConfig|MatchRule|SoftTimeoutConfig|PromptClass|HedgeConfig|RetryConfig|TruncationConfig|RouteOptions|"
    r"Route|BreakerConfig|ErrorsConfig|ReviewLogConfig|TelemetryConfig|PolicyDocument)\Z"
)


def _format_pydantic_errors(err: Any, where: Any) -> list[str]:
    """One problem per line of the policy: an unknown-keys error names each key where it is written."""
    ctx_err = (err.get("ctx") or {}).get("error")
    if isinstance(ctx_err, _UnknownKey):
        loc = _data_loc(err)
        return [f"{where((*loc, key))}: {_dotted((*loc, key))}: {ctx_err.message(key)}" for key in ctx_err.keys]
    return [_format_pydantic_error(err, where)]


def _data_loc(err: Any) -> tuple[Any, ...]:
    # pydantic's loc includes union/tag names (e.g. 'str', 'SoftTimeoutConfig'); keep data keys only.
    return tuple(p for p in err["loc"] if not (isinstance(p, str) and _PYDANTIC_TAG.match(p)))


def _format_pydantic_error(err: Any, where: Any) -> str:
    loc = _data_loc(err)
    ctx_err = (err.get("ctx") or {}).get("error")
    kind = err["type"]
    value = err.get("input")
    if kind == "missing":
        return f"{where(loc)}: {_dotted(loc)}: required field is missing"
    if isinstance(ctx_err, ValueError):  # raised by one of our validators: its message is for ops
        msg = str(ctx_err)
    else:
        msg = err["msg"][:1].lower() + err["msg"][1:]
        if any(isinstance(p, str) and _SECRETISH.search(p) for p in loc):
            shown = "<redacted>"
        else:
            shown = repr(value) if not isinstance(value, dict | list) else _kind(value)
        msg = f"{msg} (got {shown})"
    return f"{where(loc)}: {_dotted(loc)}: {msg}"


def json_schema() -> dict[str, Any]:
    """The JSON Schema of policy files, for editors and CI linting of ops' YAML."""
    return PolicyDocument.model_json_schema()
