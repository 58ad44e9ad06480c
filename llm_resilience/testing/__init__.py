"""Test helpers shipped with llm-resilience: a scriptable fake OpenAI-compatible provider."""

from llm_resilience.testing._fake_provider import (
    DEFAULT_CONTENT,
    Behavior,
    BodyMode,
    FakeProvider,
    RecordedRequest,
    credential_digest,
)
from llm_resilience.testing._process import ScriptedProvider, provider_process, scripted_provider_process

__all__ = [
    "DEFAULT_CONTENT",
    "Behavior",
    "BodyMode",
    "FakeProvider",
    "RecordedRequest",
    "ScriptedProvider",
    "credential_digest",
    "provider_process",
    "scripted_provider_process",
]
