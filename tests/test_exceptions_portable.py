"""Our exceptions cross process boundaries and copy cleanly; their messages read cleanly.

Issue 7 item 8 (a ProcessPoolExecutor worker that raised one broke the pool) and issue 8's
last bullet (``StreamInterrupted``'s message repeated litellm's prefixes).
"""

from __future__ import annotations

import copy
import multiprocessing
import pickle
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import pytest
from conftest import MESSAGES, free_port
from litellm.exceptions import MidStreamFallbackError

import llm_resilience
from llm_resilience import AllAttemptsFailed, Policy, Resilience, StreamInterrupted


def _all_attempts_failed() -> None:
    """A real call to a port nothing listens on: AllAttemptsFailed with litellm's error as its cause."""
    policy = Policy.from_dict(
        {
            "models": {"dead": {"litellm_params": {"model": "openai/dead", "api_base": f"http://127.0.0.1:{free_port()}/v1",
                                                   "api_key": "sk-x"}}},
            "routes": {"chat": {"chain": ["dead"]}},
            "prompt_classes": {"default": {"timeout_s": 2, "deadline_s": 3}},
        }
    )  # fmt: skip
    Resilience(policy).completion("chat", MESSAGES)


def _stream_interrupted() -> None:
    inner = MidStreamFallbackError("boom", "openai/x", "openai", original_exception=ConnectionError("cut"))
    raise StreamInterrupted("big", 3, "partial", "connection error (ConnectionError)", original_exception=inner)


def _ok() -> str:
    return "still serving"


@pytest.mark.parametrize("raiser", [_all_attempts_failed, _stream_interrupted])
def test_worker_raising_one_does_not_break_a_process_pool(raiser: Any) -> None:
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("fork")) as pool:
        with pytest.raises((AllAttemptsFailed, StreamInterrupted)) as caught:
            pool.submit(raiser).result(timeout=60)
        assert pool.submit(_ok).result(timeout=60) == "still serving"  # the pool is not broken
    error = caught.value
    assert "llm_resilience." in str(error)
    if isinstance(error, AllAttemptsFailed):
        assert error.route == "chat"
        assert [(a.model, a.outcome) for a in error.attempts] == [("dead", "failure")]
    else:
        assert (error.chunks_delivered, error.generated_content, error.model) == (3, "partial", "big")


def test_all_attempts_failed_pickles_and_copies_with_its_fields() -> None:
    with pytest.raises(AllAttemptsFailed) as caught:
        _all_attempts_failed()
    original = caught.value
    for clone in (pickle.loads(pickle.dumps(original)), copy.copy(original), copy.deepcopy(original)):
        assert type(clone) is AllAttemptsFailed
        assert str(clone) == str(original)
        assert (clone.route, clone.prompt_class) == (original.route, original.prompt_class)
        assert [a.as_dict() for a in clone.attempts] == [a.as_dict() for a in original.attempts]


def test_stream_interrupted_pickles_and_copies_with_its_fields() -> None:
    with pytest.raises(StreamInterrupted) as caught:
        _stream_interrupted()
    original = caught.value
    for clone in (pickle.loads(pickle.dumps(original)), copy.copy(original), copy.deepcopy(original)):
        assert type(clone) is StreamInterrupted
        assert str(clone) == str(original)
        assert (clone.chunks_delivered, clone.chars_delivered, clone.reason) == (3, 7, original.reason)


def test_stream_interrupted_message_reads_cleanly() -> None:
    with pytest.raises(StreamInterrupted) as caught:
        _stream_interrupted()
    text = str(caught.value)
    assert text == (
        "llm_resilience.StreamInterrupted: stream from 'big' interrupted after 3 chunks "
        "(7 characters delivered): connection error (ConnectionError)"
    )
    assert "MidStreamFallbackError" not in text
    assert "Original exception" not in text
    assert isinstance(caught.value.original_exception, ConnectionError)  # litellm's wrapper unwrapped
    assert isinstance(caught.value, llm_resilience.LLMResilienceError)
