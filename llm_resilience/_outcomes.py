"""What can happen to one attempt, and what a provider error *is*.

The vocabulary is shared by the policy (``errors.fall_back_on``, ``breakers.*.count``),
the planner, the spans and the review log, so it lives in one small module.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any, Final, Literal

# Hard error kinds: what a provider exception means.
TIMEOUT: Final = "timeout"
CONNECTION: Final = "connection"
RATE_LIMIT: Final = "rate_limit"
SERVER_ERROR: Final = "server_error"
AUTH: Final = "auth"
NOT_FOUND: Final = "not_found"
CONTEXT_WINDOW: Final = "context_window"
CONTENT_POLICY: Final = "content_policy"
BAD_REQUEST: Final = "bad_request"
UNKNOWN: Final = "unknown"

# Soft failures: the provider answered, but not usefully.
SOFT_TIMEOUT: Final = "soft_timeout"
EMPTY: Final = "empty"
TRUNCATED: Final = "truncated"
INVALID_JSON: Final = "invalid_json"
CONTENT_FILTER: Final = "content_filter"

# Reasons a model is skipped without sending a request.
BREAKER_OPEN: Final = "breaker_open"
PROBE_IN_FLIGHT: Final = "probe_in_flight"
PROBE_DEFERRED: Final = "probe_deferred"
"""Skipped: the half-open probe is due, but this caller's context is starved and another can judge it."""
CONTEXT_TOO_SMALL: Final = "context_too_small"
DEADLINE: Final = "deadline_exceeded"
MISSING_API_KEY: Final = "missing_api_key"
NO_PREFILL: Final = "no_prefill"  # a stream continuation needs a model that accepts an assistant prefill

# A continuation attempt's 400 that names the prefill: the model cannot continue text, not a bad request.
PREFILL_REJECTED: Final = "prefill_rejected"
SUSPECT: Final = "suspect"
"""Skipped: a request to the model is already slow or failed, and its few suspect slots are taken."""

# Outcome of an attempt that timed out because the client (not the provider) was saturated.
CLIENT_OVERLOAD: Final = "client_overload"

CALLER_ERROR: Final = "caller_error"
"""The request failed before it reached the provider (a prompt that cannot be encoded, say): the caller's
error, raised to it at once, counted on no breaker and never a reason to fall back."""

ERROR_KINDS: Final = (
    TIMEOUT,
    CONNECTION,
    RATE_LIMIT,
    SERVER_ERROR,
    AUTH,
    NOT_FOUND,
    CONTEXT_WINDOW,
    CONTENT_POLICY,
    BAD_REQUEST,
    UNKNOWN,
)
SOFT_KINDS: Final = (SOFT_TIMEOUT, EMPTY, TRUNCATED, INVALID_JSON, CONTENT_FILTER)

Outcome = Literal["success", "flagged", "failure", "soft_failure", "skipped", "cancelled", "client_overload"]


def _litellm_exceptions() -> types.ModuleType:
    # Imported on first use, not with this module: the policy loader (and so the CLI's
    # ``validate``) needs the vocabulary above but must not pay ~2 s for litellm.
    from ._env import litellm

    return litellm.exceptions


def classify_error(exc: BaseException) -> str:
    """Map a provider exception to an error kind.

    Order matters: litellm's context-window and content-policy errors are subclasses
    of ``BadRequestError``, and its ``Timeout`` is an ``APIConnectionError`` in openai's
    tree, so the specific checks come first.
    """
    if never_sent(exc):
        return CALLER_ERROR
    lx = _litellm_exceptions()
    if isinstance(exc, lx.Timeout | TimeoutError):
        return TIMEOUT
    if isinstance(exc, lx.ContextWindowExceededError):
        return CONTEXT_WINDOW
    if isinstance(exc, lx.ContentPolicyViolationError):
        return CONTENT_POLICY
    if isinstance(exc, lx.RateLimitError):
        return RATE_LIMIT
    if isinstance(exc, lx.AuthenticationError | lx.PermissionDeniedError):
        return AUTH
    if isinstance(exc, lx.NotFoundError):
        return NOT_FOUND
    if isinstance(exc, lx.BadRequestError | lx.UnprocessableEntityError):
        return BAD_REQUEST
    if isinstance(exc, lx.APIConnectionError | ConnectionError):
        return CONNECTION
    transport = _transport_failure(exc)
    if transport is not None:
        return transport
    status = getattr(exc, "status_code", None)
    if isinstance(status, int):
        if status == 408:
            return TIMEOUT
        if status == 429:
            return RATE_LIMIT
        if status in (401, 403):
            return AUTH
        if status >= 500:
            return SERVER_ERROR
        if 400 <= status < 500:
            return BAD_REQUEST
    if isinstance(exc, lx.APIError | lx.ServiceUnavailableError | lx.InternalServerError):
        return SERVER_ERROR
    return UNKNOWN


def never_sent(exc: BaseException) -> bool:
    """The request could not be built, so nothing reached the provider: the body did not encode.

    litellm wraps what the HTTP client raised while encoding a body (a lone surrogate such as
    ``"\\ud800"`` in a prompt, a value JSON cannot hold) in its own exceptions, as ``server_error``
    or ``connection``; only the cause chain tells that the provider never saw the request.
    """
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, UnicodeEncodeError):
            return True
        if isinstance(cause, TypeError) and "JSON serializable" in str(cause):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def _transport_failure(exc: BaseException) -> str | None:
    """TIMEOUT or CONNECTION when a transport error caused ``exc``, else None.

    litellm 1.110.2 wraps a refused or reset connection in ``InternalServerError``
    (status 500); only the cause chain (openai ``APIConnectionError`` -> httpx) tells it
    apart from a real 500, and an operator reading spans needs that difference.
    """
    import httpx
    import openai

    seen: set[int] = set()
    cause = exc.__cause__ or exc.__context__
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, TimeoutError | httpx.TimeoutException | openai.APITimeoutError):
            return TIMEOUT
        if isinstance(cause, openai.APIConnectionError | httpx.TransportError | ConnectionError):
            return CONNECTION
        cause = cause.__cause__ or cause.__context__
    return None


def hidden_params(response: Any) -> dict[str, Any] | None:
    """litellm's ``_hidden_params`` dict of ``response`` (``None``: it has none).

    On litellm's pydantic responses it is a private attribute, and reading it the ordinary way
    misses twice inside pydantic's ``__getattr__`` (two ``AttributeError``s raised and caught:
    ~5 µs, about a tenth of what the layer adds to a call). Its slot is read directly instead.
    """
    private = getattr(response, "__pydantic_private__", None)
    if isinstance(private, dict):
        hidden = private.get("_hidden_params")
        if isinstance(hidden, dict):
            return hidden
    hidden = getattr(response, "_hidden_params", None)
    return hidden if isinstance(hidden, dict) else None


@dataclass
class AttemptRecord:
    """One step of a call: a request sent to a model, or a model skipped.

    Attached to the response (``response._hidden_params["llm_resilience"]["attempts"]``)
    and to :class:`AllAttemptsFailed` as ``.attempts``.
    """

    index: int
    model: str
    """The policy's name for the model (or the litellm model string for an ad-hoc route)."""
    litellm_model: str
    outcome: Outcome | None = None
    reason: str | None = None
    """Error kind, validator name or skip reason; ``None`` on success."""
    latency_s: float = 0.0
    timeout_s: float | None = None
    breaker_state: str = "closed"
    hedged: bool = False
    retry_of: int | None = None
    tokens_before: int | None = None
    tokens_after: int | None = None
    truncated: bool = False
    time_to_first_chunk_s: float | None = None
    chunks: int = 0
    error: BaseException | None = field(default=None, repr=False)
    breaker_transitions: list[tuple[str, str]] = field(default_factory=list)
    """(old, new) states of the transitions this attempt's outcome caused."""
    breaker_events: list[Any] = field(default_factory=list, repr=False)
    """Every transition this attempt saw, with its cause (``BreakerTransition``): those its outcome
    caused, and open -> half-open when the attempt was admitted as the probe."""
    started_at: float = 0.0
    bounds: dict[str, float] = field(default_factory=dict)
    """Every time limit that applied to the attempt, in seconds: ``attempt`` (the class's ``timeout_s``;
    not for streams), ``first_token`` and ``idle`` (streams), ``soft`` (a soft timeout is configured),
    ``deadline`` (what was left of the call's deadline when the attempt started)."""
    cut_by: str | None = None
    """The key of :attr:`bounds` that cut the attempt off, if one did."""
    prepare_s: float = 0.0
    """Time spent preparing the request before it was handed to litellm (token counting, truncation)."""
    extra: dict[str, Any] = field(default_factory=dict)
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list, repr=False)
    """Things that happened during the attempt, as (name, attributes): span events (a skipped SSE event)."""

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly summary (no exception object, no prompt text)."""
        d: dict[str, Any] = {
            "index": self.index,
            "model": self.model,
            "litellm_model": self.litellm_model,
            "outcome": self.outcome,
            "reason": self.reason,
            "latency_s": round(self.latency_s, 6),
            "timeout_s": self.timeout_s,
            "breaker_state": self.breaker_state,
        }
        if self.hedged:
            d["hedged"] = True
        if self.retry_of is not None:
            d["retry_of"] = self.retry_of
        if self.tokens_before is not None:
            d["tokens_before"] = self.tokens_before
            d["tokens_after"] = self.tokens_after
            d["truncated"] = self.truncated
        if self.time_to_first_chunk_s is not None:
            d["time_to_first_chunk_s"] = round(self.time_to_first_chunk_s, 6)
            d["chunks"] = self.chunks
        if self.cut_by is not None:
            d["cut_by"] = self.cut_by
        if self.breaker_transitions:
            d["breaker_transitions"] = [list(t) for t in self.breaker_transitions]
        if self.extra:
            for key in _SUMMARY_EXTRA:
                if key in self.extra:
                    d[key] = self.extra[key]
        return d


_SUMMARY_EXTRA = ("client_overload", "client_delay_s", "panic", "suspect")
"""Decisions taken under load (docs/design.md, "Saturation") that the call summary shows."""
