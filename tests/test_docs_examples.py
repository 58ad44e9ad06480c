"""Every Python block of the README and the docs site runs, against the fake provider.

Sybil parses each Markdown file; the blocks of one file run in order in one namespace, as a reader
would paste them, in a fresh directory holding ``policy.yaml``: ``policies/example.yaml`` with its two
models (``big``, ``small``) pointed at two loopback fake providers, which ``LLM_RESILIENCE_POLICY``
names. The namespace also holds ``big`` and ``small`` (the providers), so that an
``<!-- invisible-code-block: python -->`` comment can script a fault or check a result without
showing it. ``<!-- skip: next "reason" -->`` skips a block that needs a framework this environment
lacks; it is reported as skipped with that reason.

Why Sybil rather than pytest-markdown-docs: one namespace per document (a guide's blocks build on
each other like the reader's session), invisible blocks for set-up and checks, skips with a reason
that pytest reports, and one parser for both plain blocks and ``>>>`` sessions.
"""

from __future__ import annotations

import os
import unittest
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sybil import Sybil
from sybil.parsers.markdown import PythonCodeBlockParser, SkipParser

import llm_resilience
from llm_resilience import _validators
from llm_resilience.testing import FakeProvider

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_POLICY = ROOT / "policies" / "example.yaml"
SYBIL = Sybil(parsers=[PythonCodeBlockParser(), SkipParser()])


def documents() -> list[Path]:
    """The Markdown files that have Python blocks: the README, CONTRIBUTING.md and every docs page."""
    candidates = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return [p for p in candidates if any(True for _ in SYBIL.parse(p))]


def test_the_readme_and_the_guides_have_examples_to_run() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in documents()}
    assert {"README.md", "docs/getting-started.md", "docs/guides/applications.md"} <= names


@pytest.fixture
def reader_session(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """Where a reader runs the examples: a policy file whose models are two fake providers."""
    with FakeProvider() as big, FakeProvider() as small:
        policy = EXAMPLE_POLICY.read_text(encoding="utf-8")
        for placeholder, provider in (("http://127.0.0.1:8001/v1", big), ("http://127.0.0.1:8002/v1", small)):
            policy = policy.replace(placeholder, provider.base_url)
        (tmp_path / "policy.yaml").write_text(policy, encoding="utf-8")
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("LLM_RESILIENCE_POLICY", str(tmp_path / "policy.yaml"))
        monkeypatch.setenv("BIG_API_KEY", "sk-docs-big")
        monkeypatch.setenv("SMALL_API_KEY", "sk-docs-small")
        monkeypatch.setenv("OPENAI_AGENTS_DISABLE_TRACING", "1")  # its exporter would post traces to OpenAI
        # A guide registers validators (has_citation) as a reader would, process-wide: the registry is
        # put back afterwards so no other test sees them.
        monkeypatch.setattr(_validators, "_registry", dict(_validators._registry))
        llm_resilience.set_default_engine(None)
        try:
            yield {"big": big, "small": small}
        finally:
            llm_resilience.uninstall()
            engine = llm_resilience.default_engine() if os.environ.get("LLM_RESILIENCE_POLICY") else None
            if engine is not None:
                engine.close()
            llm_resilience.set_default_engine(None)


@pytest.mark.parametrize("path", documents(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_the_python_blocks_run(path: Path, reader_session: dict[str, Any]) -> None:
    document = SYBIL.parse(path)
    document.namespace.update(reader_session)
    ran, skipped = 0, []
    for example in document:
        try:
            example.evaluate()
        except unittest.SkipTest as skip:
            skipped.append(f"line {example.line}: {skip}")
            continue
        ran += 1
    assert ran, f"{path.name}: no example ran"
    if skipped:
        print(f"{path.name}: skipped {'; '.join(skipped)}")
