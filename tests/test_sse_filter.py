"""Skipping a malformed server-sent event in place (``_streaming.SSEFilter``): bytes in, bytes out."""

from __future__ import annotations

import json

import pytest

from llm_resilience._streaming import SSEFilter

pytestmark = pytest.mark.sans_io


def event(payload: object) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


GOOD_1, GOOD_2, GOOD_3 = event({"n": 1}), event({"n": 2}), event({"n": 3})
BAD = b'data: {"id": "x", "choices": [{"delta": {\n\n'
DONE = b"data: [DONE]\n\n"


def through(*parts: bytes, size: int | None = None) -> tuple[bytes, SSEFilter]:
    sse = SSEFilter()
    data = b"".join(parts)
    pieces = [data] if size is None else [data[i : i + size] for i in range(0, len(data), size)]
    out = b"".join(sse.feed(piece) for piece in pieces) + sse.end()
    return out, sse


def test_a_bad_event_followed_by_a_good_one_is_dropped() -> None:
    out, sse = through(GOOD_1, BAD, GOOD_2, DONE)

    assert out == GOOD_1 + GOOD_2 + DONE and sse.skipped == 1


def test_events_split_across_reads_are_judged_whole() -> None:
    out, sse = through(GOOD_1, BAD, GOOD_2, GOOD_3, DONE, size=5)

    assert out == GOOD_1 + GOOD_2 + GOOD_3 + DONE and sse.skipped == 1


def test_two_bad_events_in_a_row_are_handed_on_so_the_attempt_fails_as_before() -> None:
    out, sse = through(GOOD_1, BAD, BAD, GOOD_2)

    assert out == GOOD_1 + BAD + BAD + GOOD_2 and sse.skipped == 0


def test_a_bad_first_event_is_handed_on_so_the_next_model_answers_whole() -> None:
    out, sse = through(BAD, GOOD_1, GOOD_2)

    assert out == BAD + GOOD_1 + GOOD_2 and sse.skipped == 0


def test_a_bad_last_event_is_handed_on() -> None:
    out, sse = through(GOOD_1, BAD)

    assert out == GOOD_1 + BAD and sse.skipped == 0


def test_a_bad_event_before_done_is_skipped() -> None:
    out, sse = through(GOOD_1, BAD, DONE)

    assert out == GOOD_1 + DONE and sse.skipped == 1


def test_comments_and_crlf_events_pass_through() -> None:
    keep_alive = b": ping\r\n\r\n"
    crlf = b'data: {"n": 4}\r\n\r\n'

    out, sse = through(keep_alive, crlf, GOOD_1)

    assert out == keep_alive + crlf + GOOD_1 and sse.skipped == 0
