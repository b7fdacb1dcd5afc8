from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.tokens import estimate_prompt_tokens, estimate_text_tokens, max_output_tokens


@pytest.mark.parametrize(
    ("text", "tokens"),
    [("", 0), ("a", 1), ("abcd", 1), ("abcde", 2), ("x" * 400, 100), ("x" * 401, 101), (None, 0), (7, 0)],
)
def test_estimate_text_tokens(text: Any, tokens: int) -> None:
    assert estimate_text_tokens(text) == tokens


def _chat(*messages: Any) -> dict:
    return {"model": "m", "messages": list(messages)}


@pytest.mark.parametrize(
    ("body", "tokens"),
    [
        (_chat(), 3),
        (_chat({"role": "user", "content": ""}), 4 + 3),
        (_chat({"role": "user", "content": "12345678"}), 2 + 4 + 3),
        (_chat({"role": "system", "content": "abcd"}, {"role": "user", "content": "abcde"}), 1 + 2 + 8 + 3),
        (_chat({"role": "user", "content": None}), 4 + 3),
        (_chat({"role": "user", "name": "alice", "content": "hi"}), 2 + 1 + 4 + 3),
        (
            _chat(
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "12345678"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 10_000}},
                        {"type": "text", "text": "abc"},
                        {"type": "input_audio", "input_audio": {"data": "AAAA"}},
                    ],
                }
            ),
            2 + 85 + 1 + 4 + 3,
        ),
        (
            _chat(
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"name": "get", "arguments": '{"city":"Paris"}'}},
                        {"id": "c2", "type": "function", "function": {"name": "put", "arguments": "{}"}},
                    ],
                }
            ),
            (1 + 4) + (1 + 1) + 4 + 3,
        ),
        (_chat({"role": "assistant", "function_call": {"name": "get", "arguments": "abcdefgh"}}), 1 + 2 + 4 + 3),
        (_chat({"role": "tool", "tool_call_id": "c1", "content": "abcd"}), 1 + 4 + 3),
        # wrong types count 0, never raise
        ({"messages": "hello"}, 0),
        ({}, 0),
        (_chat("hello", 5, None, ["x"]), 3),
        (_chat({"content": 12}), 4 + 3),
        (_chat({"content": [1, "text", None, {"type": "text", "text": 5}, {"type": "text"}]}), 4 + 3),
        (_chat({"tool_calls": "x", "function_call": [1], "name": 3}), 4 + 3),
        (_chat({"tool_calls": [None, {"function": "x"}, {"function": {"arguments": 1}}]}), 4 + 3),
    ],
)
def test_chat(body: dict, tokens: int) -> None:
    assert estimate_prompt_tokens("chat", body) == tokens


@pytest.mark.parametrize(
    ("prompt", "tokens"),
    [
        ("", 0),
        ("abcdefghi", 3),
        (["abcd", "abcde"], 3),
        ([1, 2, 3, 4, 5], 5),
        ([[1, 2], [3], []], 3),
        ([], 0),
        # wrong types count 0
        (None, 0),
        (42, 0),
        ({"text": "abcd"}, 0),
        ([True, None, 1.5, {"a": 1}, 7], 1),
        ([[1, "x", None, [2]]], 1),
    ],
)
def test_completions_and_embeddings(prompt: Any, tokens: int) -> None:
    assert estimate_prompt_tokens("completions", {"model": "m", "prompt": prompt}) == tokens
    assert estimate_prompt_tokens("embeddings", {"model": "m", "input": prompt}) == tokens


def test_endpoints_read_their_own_field() -> None:
    assert estimate_prompt_tokens("completions", {"input": "abcd", "messages": [{}]}) == 0
    assert estimate_prompt_tokens("embeddings", {"prompt": "abcd", "messages": [{}]}) == 0
    assert estimate_prompt_tokens("chat", {"prompt": "abcd", "input": "abcd"}) == 0


@pytest.mark.parametrize("body", [None, [], "x", 3, 1.5, True])
def test_a_body_that_is_not_an_object_counts_zero(body: Any) -> None:
    for endpoint in ("chat", "completions", "embeddings"):
        assert estimate_prompt_tokens(endpoint, body) == 0


def test_unknown_endpoint_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown endpoint 'responses'"):
        estimate_prompt_tokens("responses", {})


@pytest.mark.parametrize(
    ("body", "default", "expected"),
    [
        ({}, 1024, 1024),
        ({"max_tokens": 100}, 1024, 100),
        ({"max_completion_tokens": 50}, 1024, 50),
        ({"max_completion_tokens": 50, "max_tokens": 100}, 1024, 100),  # the larger: either may be honoured
        ({"max_completion_tokens": 1, "max_tokens": 1000}, 1024, 1000),
        ({"max_completion_tokens": 1000, "max_tokens": 1}, 1024, 1000),
        ({"max_completion_tokens": 0, "max_tokens": 7}, 1024, 7),
        ({"max_completion_tokens": 5, "max_tokens": 7, "n": 2}, 1024, 14),
        ({"max_tokens": 0}, 1024, 0),
        ({"max_tokens": 100, "n": 3}, 1024, 300),
        ({"n": 2}, 1024, 2048),
        ({"max_tokens": 100, "n": 1}, 1024, 100),
        ({"max_tokens": 100, "n": 0}, 1024, 100),
        ({"max_tokens": 100, "n": -2}, 1024, 100),
        # wrong types fall through
        ({"max_completion_tokens": None, "max_tokens": 100}, 1024, 100),
        ({"max_completion_tokens": "50", "max_tokens": 100}, 1024, 100),
        ({"max_tokens": -1}, 1024, 1024),
        ({"max_tokens": 10.0}, 1024, 1024),
        ({"max_tokens": True}, 1024, 1024),
        ({"max_tokens": 100, "n": "3"}, 1024, 100),
        ({"max_tokens": 100, "n": 2.0}, 1024, 100),
        ({"max_tokens": 100, "n": True}, 1024, 100),
        (None, 1024, 1024),
        ([], 0, 0),
    ],
)
def test_max_output_tokens(body: Any, default: int, expected: int) -> None:
    assert max_output_tokens(body, default) == expected


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=30,
)
# Bodies that reach the interesting branches with arbitrary values inside.
shaped_bodies = st.fixed_dictionaries(
    {},
    optional={
        "messages": st.lists(
            st.fixed_dictionaries(
                {},
                optional={
                    "content": json_values
                    | st.lists(
                        st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": json_values})
                    ),
                    "name": json_values,
                    "tool_calls": json_values | st.lists(st.fixed_dictionaries({"function": json_values})),
                    "function_call": json_values,
                },
            )
            | json_values,
            max_size=4,
        )
        | json_values,
        "prompt": json_values,
        "input": json_values,
        "max_tokens": json_values,
        "max_completion_tokens": json_values,
        "n": json_values,
    },
)


@given(json_values | shaped_bodies, st.integers(0, 10**6))
def test_arbitrary_json_never_raises(body: Any, default: int) -> None:
    for endpoint in ("chat", "completions", "embeddings"):
        assert estimate_prompt_tokens(endpoint, body) >= 0
    assert max_output_tokens(body, default) >= 0


def test_tool_definitions_and_response_schemas_count_as_prompt():
    from proxy.tokens import estimate_prompt_tokens

    plain = {"messages": [{"role": "user", "content": "hi"}]}
    description = "x" * 4000
    tools = [{"type": "function", "function": {"name": "f", "description": description, "parameters": {}}}]
    assert estimate_prompt_tokens("chat", {**plain, "tools": tools}) >= estimate_prompt_tokens("chat", plain) + 1000
    schema = {"type": "json_schema", "json_schema": {"name": "s", "schema": {"description": description}}}
    assert estimate_prompt_tokens("chat", {**plain, "response_format": schema}) >= 1000
