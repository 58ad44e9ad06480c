"""The exceptions that need no litellm, so the policy loader and the CLI stay light.

``_exceptions.py`` is the one place users look (and re-exports these); they live here
because ``import litellm`` costs ~2 s, and ``llm-resilience validate`` must not pay it.
"""

from __future__ import annotations

from collections.abc import Sequence


class LLMResilienceError(Exception):
    """Base class of every exception defined by llm-resilience."""


class PolicyError(LLMResilienceError, ValueError):
    """A policy is invalid.

    The message names the file, the line and the field, and says what was expected::

        policies/prod.yaml:14: routes.chat.chain[1]: unknown model 'medium' (defined: big, small)

    ``.problems`` lists every problem found, not only the first.
    """

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems) if self.problems else "invalid policy")


class UnknownPromptClass(LLMResilienceError, ValueError):
    """``prompt_class=`` named a class the policy does not define."""
