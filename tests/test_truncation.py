"""Token-aware truncation, through the real litellm HTTP path (and the fitter on its own where no server is needed).

Small context windows come from the policy's ``context_window`` override, so short prompts
are enough to make truncation happen.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from conftest import Caller, EngineFactory, PolicyBuilder, hidden, outcomes
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from llm_resilience import AllAttemptsFailed
from llm_resilience._env import litellm
from llm_resilience._policy import Policy
from llm_resilience._truncation import MIN_KEEP_CHARS, TokenFitter, droppable_units, upper_bound
from llm_resilience.testing import Behavior, FakeProvider

NS = "llm_resilience"
SYSTEM = {"role": "system", "content": "SYSTEM-RULES: answer briefly and politely."}
LAST_USER = {"role": "user", "content": "LAST-QUESTION: so what should I do next?"}
MARKER = "\n[... truncated ...]\n"


def history(turns: int, words: int = 30) -> list[dict[str, Any]]:
    """system, ``turns`` user/assistant exchanges (~``words`` words each), then the last user turn."""
    msgs: list[dict[str, Any]] = [dict(SYSTEM)]
    for i in range(turns):
        msgs.append({"role": "user", "content": f"Q{i}: " + "tell me more about otters " * (words // 5)})
        msgs.append({"role": "assistant", "content": f"A{i}: " + "otters are lovely animals " * (words // 5)})
    msgs.append(dict(LAST_USER))
    return msgs


def tool_pair(call_id: str, result_words: int = 20) -> list[dict[str, Any]]:
    return [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": call_id, "type": "function", "function": {"name": "lookup", "arguments": '{"q": "otters"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": call_id, "content": f"result {call_id}: " + "data " * result_words},
    ]


def tokens(model: str, messages: list[dict[str, Any]]) -> int:
    return int(litellm.token_counter(model=model, messages=messages))


def sized(policy: dict[str, Any], **windows: int) -> dict[str, Any]:
    for name, window in windows.items():
        policy["models"][name]["context_window"] = window
    return policy


def with_reserve(policy: dict[str, Any], reserve: int, **truncation: Any) -> dict[str, Any]:
    policy["routes"]["chat"]["truncation"] = {"reserve_output_tokens": reserve, **truncation}
    return policy


def attempt(response: Any, index: int) -> dict[str, Any]:
    result: dict[str, Any] = hidden(response)["attempts"][index]
    return result


def assert_tool_pairs_intact(messages: list[dict[str, Any]]) -> None:
    """Every tool result follows the call it answers, and every call has all its results."""
    open_calls: set[str] = set()
    for m in messages:
        if m["role"] == "tool":
            assert m["tool_call_id"] in open_calls, f"tool result {m['tool_call_id']} without its call"
            open_calls.discard(m["tool_call_id"])
        else:
            assert not open_calls, f"calls {open_calls} without results"
            open_calls = {c["id"] for c in m.get("tool_calls") or []}
    assert not open_calls


# -- through the engine ---------------------------------------------------------------------------


def test_fallback_to_a_small_model_drops_the_oldest_turns_and_keeps_system_and_last_user(
    call: Caller, big: FakeProvider, small: FakeProvider, make_engine: EngineFactory, policy_dict: PolicyBuilder
) -> None:
    big.set(Behavior.error(503))
    engine = make_engine(with_reserve(sized(policy_dict(["big", "small"]), small=400), 100))
    messages = history(12)
    assert tokens("openai/gpt-4o-mini", messages) > 1000  # far more than small's 300-token budget

    response = call(engine, "chat", messages)

    assert outcomes(response) == [("big", "failure", "server_error"), ("small", "success", None)]
    assert big.requests[0].messages == messages  # the primary got everything
    sent = small.requests[0].messages
    assert sent[0] == SYSTEM
    assert sent[-1] == LAST_USER
    assert len(sent) < len(messages)
    # What was kept is the newest history, unchanged and in order: a suffix of the original turns.
    kept = sent[1:-1]
    assert kept == messages[len(messages) - 1 - len(kept) : -1]
    assert kept and kept[0]["role"] == "user"  # history never starts with an orphaned answer
    assert tokens("openai/gpt-4o-mini", sent) <= 300
    record = attempt(response, 1)
    assert record["truncated"] is True
    assert record["tokens_before"] > 1000
    assert record["tokens_after"] == tokens("openai/gpt-4o-mini", sent)


def test_tool_calls_and_their_results_are_dropped_or_kept_together(
    small: FakeProvider, make_engine: EngineFactory, policy_dict: PolicyBuilder
) -> None:
    # An agent loop after the last user message: six tool rounds.
    messages = [dict(SYSTEM), dict(LAST_USER)]
    for i in range(6):
        messages += tool_pair(f"call_{i}", result_words=40)
    messages.append({"role": "assistant", "content": "Checked everything."})
    # Over budget by less than the oldest call message alone: dropping messages one by one
    # would remove call_0's request and leave its result orphaned.
    size = tokens("openai/gpt-4o-mini", messages)
    assert tokens("openai/gpt-4o-mini", messages[2:3]) > 5
    engine = make_engine(with_reserve(sized(policy_dict(["small"]), small=size - 5 + 100), 100))

    response = engine.completion("chat", messages)

    sent = small.requests[0].messages
    assert attempt(response, 0)["truncated"] is True
    assert_tool_pairs_intact(sent)
    kept_ids = [m["tool_call_id"] for m in sent if m["role"] == "tool"]
    assert kept_ids == [f"call_{i}" for i in range(1, 6)]  # only the oldest pair went, as a whole
    # (litellm leaves out "content": None on the wire)
    assert sent == [{k: v for k, v in m.items() if v is not None} for m in messages[:2] + messages[4:]]


def test_a_huge_last_user_message_is_shortened_in_its_middle_with_the_marker(
    small: FakeProvider, make_engine: EngineFactory, policy_dict: PolicyBuilder
) -> None:
    engine = make_engine(with_reserve(sized(policy_dict(["small"]), small=400), 100))
    body = "HEAD-OF-DOCUMENT " + " ".join(f"w{i}" for i in range(2000)) + " TAIL-OF-DOCUMENT"
    messages = [dict(SYSTEM), {"role": "user", "content": "old question"}, {"role": "assistant", "content": "old"}]
    messages.append({"role": "user", "content": body})

    response = engine.completion("chat", messages)

    sent = small.requests[0].messages
    assert [m["role"] for m in sent] == ["system", "user"]  # older turns went first
    assert sent[0] == SYSTEM
    text = sent[1]["content"]
    assert text.startswith("HEAD-OF-DOCUMENT") and text.endswith("TAIL-OF-DOCUMENT")
    assert MARKER in text
    head, tail = text.split(MARKER)
    assert body.startswith(head) and body.endswith(tail)
    assert tokens("openai/gpt-4o-mini", sent) <= 300
    assert attempt(response, 0)["tokens_after"] <= 300


def test_the_newest_exchange_is_shortened_before_it_is_dropped(
    small: FakeProvider, make_engine: EngineFactory, policy_dict: PolicyBuilder
) -> None:
    engine = make_engine(with_reserve(sized(policy_dict(["small"]), small=500), 100))
    code = "def start():\n" + "    x = compute()\n" * 300 + "    return x  # END-OF-CODE\n"
    messages = [
        dict(SYSTEM),
        {"role": "user", "content": "an old, unrelated question " * 10},
        {"role": "assistant", "content": "an old answer " * 10},
        {"role": "user", "content": "write the function"},
        {"role": "assistant", "content": code},
        {"role": "user", "content": "fix the bug above"},
    ]

    engine.completion("chat", messages)

    sent = small.requests[0].messages
    assert [m["content"] for m in sent[:2]] == [SYSTEM["content"], "write the function"]
    assert sent[2]["content"].startswith("def start():") and sent[2]["content"].endswith("END-OF-CODE\n")
    assert MARKER in sent[2]["content"]
    assert sent[3]["content"] == "fix the bug above"


def test_model_is_skipped_without_a_request_when_even_the_truncated_prompt_is_too_large(
    call: Caller, big: FakeProvider, small: FakeProvider, make_engine: EngineFactory, policy_dict: PolicyBuilder
) -> None:
    engine = make_engine(with_reserve(sized(policy_dict(["small", "big"]), small=300), 100))
    messages = [{"role": "system", "content": "RULES " * 400}, dict(LAST_USER)]  # the system prompt alone: ~400

    response = call(engine, "chat", messages)

    assert small.request_count == 0
    assert outcomes(response) == [("small", "skipped", "context_too_small"), ("big", "success", None)]
    assert attempt(response, 0)["tokens_before"] > 300
    assert big.requests[0].messages == messages


def test_strategy_off_never_truncates_and_skips_a_model_too_small(
    big: FakeProvider, small: FakeProvider, make_engine: EngineFactory, policy_dict: PolicyBuilder
) -> None:
    policy = with_reserve(sized(policy_dict(["small", "big"]), small=400), 100, strategy="off")
    engine = make_engine(policy)
    messages = history(12)  # would fit after dropping old turns, but "off" does not drop

    response = engine.completion("chat", messages)

    assert small.request_count == 0
    assert outcomes(response)[0] == ("small", "skipped", "context_too_small")
    assert big.requests[0].messages == messages

    small_prompt = history(1, words=5)
    response = engine.completion("chat", small_prompt)
    assert small.requests[0].messages == small_prompt  # a prompt that fits still goes to small
    assert hidden(response)["model"] == "small"


def test_when_every_model_is_too_small_the_call_fails_without_any_request(
    big: FakeProvider, small: FakeProvider, make_engine: EngineFactory, policy_dict: PolicyBuilder
) -> None:
    engine = make_engine(with_reserve(sized(policy_dict(["big", "small"]), big=200, small=200), 50))
    messages = [{"role": "system", "content": "RULES " * 400}, dict(LAST_USER)]

    with pytest.raises(AllAttemptsFailed) as info:
        engine.completion("chat", messages)

    assert [a.reason for a in info.value.attempts] == ["context_too_small", "context_too_small"]
    assert big.request_count == 0 and small.request_count == 0


def test_a_providers_context_length_error_makes_the_next_model_get_a_shorter_prompt(
    call: Caller, big: FakeProvider, small: FakeProvider, make_engine: EngineFactory, policy_dict: PolicyBuilder
) -> None:
    # Both windows say the prompt fits; big's provider disagrees (its real window is smaller).
    engine = make_engine(with_reserve(sized(policy_dict(["big", "small"]), big=900, small=900), 100))
    big.set(Behavior.context_length_exceeded())
    messages = history(8)
    size = tokens("openai/gpt-4o-mini", messages)
    assert 0.75 * 800 < size <= 800  # fits the budget, but not three quarters of it

    response = call(engine, "chat", messages)

    assert outcomes(response) == [("big", "failure", "context_window"), ("small", "success", None)]
    assert big.requests[0].messages == messages
    sent = small.requests[0].messages
    assert len(json.dumps(sent)) < len(json.dumps(big.requests[0].messages))
    assert tokens("openai/gpt-4o-mini", sent) <= 0.75 * 800
    assert sent[0] == SYSTEM and sent[-1] == LAST_USER
    assert attempt(response, 1)["truncated"] is True


def test_the_callers_messages_are_never_modified(
    small: FakeProvider, make_engine: EngineFactory, policy_dict: PolicyBuilder
) -> None:
    engine = make_engine(with_reserve(sized(policy_dict(["small"]), small=400), 100))
    messages: list[dict[str, Any]] = history(6)
    messages += tool_pair("call_x", result_words=10)
    messages[-1 - 2] = {  # the last user turn, as content parts: the part that is cut is nested
        "role": "user",
        "content": [
            {"type": "text", "text": "START " + "lorem ipsum dolor " * 300 + " END"},
            {"type": "text", "text": "second part"},
        ],
    }
    messages.append({"role": "user", "content": [{"type": "text", "text": "final " + "words here " * 400}]})
    before = copy.deepcopy(messages)
    inner = messages[-1]["content"]

    response = engine.completion("chat", messages)

    assert attempt(response, 0)["truncated"] is True
    assert MARKER in small.requests[0].messages[-1]["content"][0]["text"]
    assert messages == before
    assert messages[-1]["content"] is inner and inner == before[-1]["content"]


def test_attempt_spans_record_tokens_before_and_after_and_truncation(
    big: FakeProvider,
    small: FakeProvider,
    make_engine: EngineFactory,
    policy_dict: PolicyBuilder,
    exporter: InMemorySpanExporter,
) -> None:
    big.set(Behavior.error(500))
    engine = make_engine(with_reserve(sized(policy_dict(["big", "small"]), big=100_000, small=400), 100))
    messages = history(12)

    engine.completion("chat", messages)

    spans = {
        s.attributes[f"{NS}.model"]: s.attributes
        for s in exporter.get_finished_spans()
        if f"{NS}.model" in s.attributes
    }
    size = tokens("openai/gpt-4o-mini", messages)
    assert f"{NS}.tokens.before" not in spans["big"]  # 100k window: fits by the byte bound, not counted
    assert spans["small"][f"{NS}.tokens.before"] == size
    assert spans["small"][f"{NS}.tokens.after"] == tokens("openai/gpt-4o-mini", small.requests[0].messages)
    assert spans["small"][f"{NS}.tokens.after"] < size
    assert spans["small"][f"{NS}.truncation"] == "truncated"


def test_a_prompt_that_obviously_fits_is_sent_as_is_and_not_counted(
    small: FakeProvider, make_engine: EngineFactory, policy_dict: PolicyBuilder
) -> None:
    engine = make_engine(policy_dict(["small"]))  # gpt-4o-mini: litellm knows its 128k window
    messages = history(3)

    response = engine.completion("chat", messages)

    assert small.requests[0].messages == messages
    record = attempt(response, 0)
    assert "tokens_before" not in record  # not counted: the byte bound already fits (documented)


def test_a_model_with_an_unknown_window_gets_the_prompt_untouched(
    tiny: FakeProvider, make_engine: EngineFactory, policy_dict: PolicyBuilder
) -> None:
    engine = make_engine(policy_dict(["tiny"]))  # openai/tiny-model: not in litellm's map, no override
    messages = history(200)

    response = engine.completion("chat", messages)

    assert tiny.requests[0].messages == messages
    assert "tokens_before" not in attempt(response, 0)


def test_the_output_reserve_comes_from_max_tokens_and_is_capped_at_half_a_tiny_window(
    small: FakeProvider, make_engine: EngineFactory, policy_dict: PolicyBuilder
) -> None:
    # Window 400 and the default reserve of 1024: capped at 200, leaving a 200-token budget.
    engine = make_engine(sized(policy_dict(["small"]), small=400))
    messages = history(4)
    size = tokens("openai/gpt-4o-mini", messages)
    assert 200 < size <= 370

    engine.completion("chat", messages)
    assert tokens("openai/gpt-4o-mini", small.requests[0].messages) <= 200  # truncated, not skipped

    engine.completion("chat", messages, max_tokens=30)  # the caller reserves only 30: 370 for the prompt
    assert small.requests[1].messages == messages
    assert small.requests[1].body["max_tokens"] == 30


# -- the fitter alone (no I/O) ----------------------------------------------------------------------


def _fitter_setup(window: int, reserve: int = 100) -> tuple[Any, Any, Any]:
    policy = Policy.from_dict(
        {
            "models": {"m": {"litellm_params": {"model": "openai/some-model"}, "context_window": window}},
            "routes": {"r": {"chain": ["m"], "truncation": {"reserve_output_tokens": reserve}}},
        }
    )
    route = policy.route_for("r", "default")
    return route.chain[0], route, policy.classes["default"]


def test_shrink_after_a_context_error_lowers_the_budget() -> None:
    spec, route, klass = _fitter_setup(700)
    messages = history(6)
    size = tokens("openai/some-model", messages)
    assert 0.75 * 0.75 * 600 < size <= 600

    assert TokenFitter().fit(spec, messages, route, klass, {}, 1.0).truncated is False
    shrunk = TokenFitter().fit(spec, messages, route, klass, {}, 0.75 * 0.75)
    assert shrunk.truncated and shrunk.fits
    assert shrunk.tokens_after is not None and shrunk.tokens_after <= int(600 * 0.75 * 0.75)


def test_upper_bound_is_never_below_litellms_count() -> None:
    samples: list[list[dict[str, Any]]] = [
        history(3),
        [{"role": "user", "content": "héllo wörld — ünïcödé 你好 🎉 " * 20}],
        [{"role": "user", "name": "bob", "content": [{"type": "text", "text": "parts " * 50}]}],
        [dict(SYSTEM), dict(LAST_USER), *tool_pair("c1"), *tool_pair("c2", 200)],
        [{"role": "user", "content": "a"}],
        [],
    ]
    parameters = {"type": "object", "properties": {"q": {"type": "string", "description": "query"}}, "required": ["q"]}
    function = {"name": "lookup", "description": "find things", "parameters": parameters}
    tools = [{"type": "function", "function": function}]
    for model in ("openai/gpt-4o", "openai/gpt-4o-mini", "openai/unknown-model", "gpt-3.5-turbo"):
        for messages in samples:
            for t in (None, tools):
                bound = upper_bound(messages, t)
                assert bound is not None
                assert bound >= litellm.token_counter(model=model, messages=messages, tools=t), (model, messages)


def test_upper_bound_declines_images() -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    assert upper_bound([{"role": "user", "content": [{"type": "text", "text": "hi"}, image]}]) is None


def test_droppable_units_group_exchanges_and_tool_pairs() -> None:
    messages = [
        {"role": "system", "content": "s"},  # 0 pinned
        {"role": "assistant", "content": "greeting"},  # 1 before any user: own unit
        {"role": "user", "content": "q1"},  # 2 exchange
        *tool_pair("a"),  # 3, 4 in q1's exchange
        {"role": "assistant", "content": "a1"},  # 5
        {"role": "user", "content": "q2"},  # 6 last user: pinned
        *tool_pair("b"),  # 7, 8 one unit
        {"role": "assistant", "content": "done"},  # 9 own unit
    ]
    units, pinned, last_user = droppable_units(messages)
    assert last_user == 6
    assert pinned == {0, 6}
    assert units == [[1], [2, 3, 4, 5], [7, 8], [9]]


def test_a_message_is_never_cut_below_the_minimum_and_then_the_model_is_skipped() -> None:
    spec, route, klass = _fitter_setup(200, reserve=50)  # a 150-token budget
    system = {"role": "system", "content": "rules " * 138}
    messages = [system, {"role": "user", "content": "question " * 200}]
    stub = {"role": "user", "content": "q" * MIN_KEEP_CHARS}
    assert tokens("openai/some-model", [system]) <= 150 < tokens("openai/some-model", [system, stub])

    fit = TokenFitter().fit(spec, messages, route, klass, {}, 1.0)

    # The system prompt alone nearly fills the budget: the question would shrink below
    # MIN_KEEP_CHARS, so the model is skipped rather than sent a meaningless stub.
    assert not fit.fits
    assert fit.messages == messages
