"""Joining a continuation onto the text the caller has (``_streaming.Join``): pure text in, text out."""

from __future__ import annotations

import pytest

from llm_resilience._streaming import MIN_OVERLAP_CHARS, Join

pytestmark = pytest.mark.sans_io

DELIVERED = "The quick brown fox jumps over the lazy dog. It was a sunny "


def joined(delivered: str, pieces: list[str], exact: bool = False) -> tuple[str, Join]:
    """What the caller reads after ``delivered``, fed the continuation in ``pieces``."""
    join = Join(delivered, exact=exact)
    out = []
    for piece in pieces:
        text = join.feed(piece)
        if text is not None:
            out.append(text)
    out.append(join.finish())
    return "".join(out), join


def chars(text: str, size: int = 3) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def test_a_proper_continuation_passes_through_without_its_leading_space_when_the_caller_has_one() -> None:
    text, join = joined(DELIVERED, chars(" day in the park."))

    assert DELIVERED + text == DELIVERED + "day in the park."
    assert join.overlap_chars == 0 and join.spacing == "removed"


def test_a_restart_from_the_beginning_yields_exactly_the_missing_rest() -> None:
    text, join = joined(DELIVERED, chars(DELIVERED + "day in the park."))

    assert text == "day in the park."
    assert join.overlap_chars == len(DELIVERED)


def test_a_restart_with_a_leading_newline_is_still_a_restart() -> None:
    text, _ = joined(DELIVERED, chars("\n" + DELIVERED + "day."))

    assert text == "day."


def test_a_repeated_tail_of_two_whole_words_is_removed() -> None:
    text, join = joined(DELIVERED, chars("a sunny day in the park."))

    assert text == "day in the park."
    assert join.overlap_chars == len("a sunny ")


def test_a_long_repeated_tail_is_removed_even_inside_words() -> None:
    tail = DELIVERED[-MIN_OVERLAP_CHARS - 3 :]
    text, join = joined(DELIVERED, [tail + "day."])

    assert text == "day." and join.overlap_chars == len(tail)


def test_a_single_short_word_that_happens_to_repeat_the_end_is_kept() -> None:
    # "one" ends the text and starts the continuation: a legitimate "one one" is not guessed away.
    text, join = joined("Count with me: one", [" one two"])

    assert text == " one two" and join.overlap_chars == 0


def test_a_space_the_model_left_out_between_two_words_is_added() -> None:
    text, join = joined("The quick brown fox", ["jumps over."])

    assert text == " jumps over." and join.spacing == "added"


def test_a_space_is_added_after_a_sentence_end_but_not_before_punctuation() -> None:
    assert joined("It was late.", ["Then it rained."])[0] == " Then it rained."
    assert joined("It was late", [", then it rained."])[0] == ", then it rained."


def test_the_head_is_held_while_it_may_still_be_a_restart() -> None:
    join = Join(DELIVERED, exact=False)

    assert join.feed("The quick") is None  # could be a restart
    assert join.feed(" brown") is None
    assert join.feed(" cat") == "The quick brown cat"  # diverged: a new sentence after all, sent whole
    assert join.feed(" sat.") == " sat."  # decided: the rest passes through


def test_whitespace_alone_is_held_until_text_says_where_it_goes() -> None:
    join = Join("Hello", exact=False)

    assert join.feed("  ") is None
    assert join.feed("world") == "  world"  # the model's own spacing is kept


def test_an_exact_join_passes_everything_through() -> None:
    text, join = joined(DELIVERED, chars(DELIVERED + "day."), exact=True)

    assert text == DELIVERED + "day."  # a prefill continues from the last character: never trimmed
    assert join.overlap_chars == 0 and join.spacing is None


def test_a_continuation_that_only_repeats_what_the_caller_has_adds_nothing() -> None:
    text, join = joined(DELIVERED, chars(DELIVERED))

    assert text == "" and join.overlap_chars == len(DELIVERED)


def test_an_empty_continuation_adds_nothing() -> None:
    assert joined(DELIVERED, [])[0] == ""
