"""Every exception llm-resilience raises, in one place.

Exception tree::

    LLMResilienceError                      base of everything raised by this package
    ├── PolicyError (ValueError)            a policy file or dict is invalid: names file, line and field
    ├── UnknownPromptClass (ValueError)     the caller passed prompt_class=... that the policy lacks
    ├── AllAttemptsFailed                   every model in the chain failed or was skipped
    │     (litellm.ServiceUnavailableError) ... so ``except litellm.exceptions.ServiceUnavailableError``
    │                                       and ``except openai.APIError`` keep working
    └── StreamInterrupted                   a stream failed after chunks reached the caller
          (litellm.exceptions.MidStreamFallbackError)  ... litellm's own exception for the same situation

Errors from the provider that must not fall back (an ordinary 400, say) are raised
unchanged: the caller's existing ``except litellm.BadRequestError`` stays correct.

``AllAttemptsFailed`` and ``StreamInterrupted`` pickle and copy (a worker process of a
``ProcessPoolExecutor`` may raise them): the copy keeps the message and the fields, while
the provider exceptions they wrap (``__cause__``, ``AttemptRecord.error``), which often
cannot be pickled, are left behind.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ._base_errors import LLMResilienceError, PolicyError, UnknownPromptClass
from ._env import litellm  # offline-safe and quiet before litellm is imported

if TYPE_CHECKING:
    from ._outcomes import AttemptRecord

__all__ = [
    "AllAttemptsFailed",
    "LLMResilienceError",
    "PolicyError",
    "StreamInterrupted",
    "UnknownPromptClass",
]


def _summarize(attempts: Sequence[AttemptRecord]) -> str:
    parts = [f"{a.model}: {a.outcome}" + (f" ({_reason(a)})" if a.reason else "") for a in attempts]
    return "; ".join(parts) if parts else "no model was eligible"


def _reason(attempt: AttemptRecord) -> str:
    missing = attempt.extra.get("missing_env")
    if missing:  # the variable's name says what to set (its value is never known here)
        return f"{attempt.reason}: os.environ/{missing} is not set"
    return str(attempt.reason)


class AllAttemptsFailed(LLMResilienceError, litellm.exceptions.ServiceUnavailableError):  # type: ignore[misc]
    """Every option of the route was exhausted.

    ``.attempts`` is the list of :class:`AttemptRecord` (model, outcome, reason, latency),
    ``.route`` and ``.prompt_class`` say what was being served. The last provider error,
    if any, is chained as ``__cause__``.
    """

    def __init__(self, route: str, prompt_class: str, attempts: Sequence[AttemptRecord]) -> None:
        self.route = route
        self.prompt_class = prompt_class
        self.attempts = list(attempts)
        last_model = self.attempts[-1].model if self.attempts else route
        super().__init__(
            message=f"all attempts failed for route '{route}' (class '{prompt_class}'): {_summarize(self.attempts)}",
            llm_provider="llm_resilience",
            model=last_model,
        )
        self.message = self.message.replace("litellm.ServiceUnavailableError", "llm_resilience.AllAttemptsFailed", 1)

    def __reduce__(self) -> tuple[Any, ...]:
        records = [dataclasses.replace(a, error=None) for a in self.attempts]
        return (type(self), (self.route, self.prompt_class, records))


class StreamInterrupted(LLMResilienceError, litellm.exceptions.MidStreamFallbackError):  # type: ignore[misc]
    """A stream broke after the caller had received chunks.

    It cannot be replaced silently by another model without duplicating or mixing
    output, so it is raised. ``.chunks_delivered`` and ``.chars_delivered`` say how
    much reached the caller; ``.generated_content`` is that text.
    """

    def __init__(
        self,
        model: str,
        chunks_delivered: int,
        generated_content: str,
        reason: str,
        original_exception: BaseException | None = None,
    ) -> None:
        self.chunks_delivered = chunks_delivered
        self.chars_delivered = len(generated_content)
        self.reason = reason
        # litellm wraps a mid-stream failure in its own MidStreamFallbackError: keep what it wraps.
        original: Any = getattr(original_exception, "original_exception", None) or original_exception
        super().__init__(
            message=f"stream from '{model}' interrupted after {chunks_delivered} chunks "
            f"({len(generated_content)} characters delivered): {reason}",
            model=model,
            llm_provider="llm_resilience",
            original_exception=original,
            generated_content=generated_content,
        )
        self.message = self.message.replace("litellm.MidStreamFallbackError", "llm_resilience.StreamInterrupted", 1)

    def __str__(self) -> str:
        # litellm's __str__ appends "Original exception: <type>: <its message>", which repeats
        # litellm's own prefixes; the reason already names the kind and type of the cause.
        return str(self.message)

    def __reduce__(self) -> tuple[Any, ...]:
        args = (self.model, self.chunks_delivered, self.generated_content, self.reason)
        return (type(self), args)
