"""`parse_call`: the reservation (max_output) it reads from a call's token caps."""

from __future__ import annotations

import pytest

from proxy.request.call import parse_call

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("endpoint", "fields", "default", "reserved"),
    [
        ("chat", {}, 64, 64),
        ("chat", {}, None, 0),
        ("chat", {"max_tokens": 1000}, 64, 1000),
        ("chat", {"max_completion_tokens": 1000}, 64, 1000),
        # both caps: the larger, whichever field it is in (an upstream may honour either)
        ("chat", {"max_tokens": 1000, "max_completion_tokens": 1}, 64, 1000),
        ("chat", {"max_tokens": 1, "max_completion_tokens": 1000}, 64, 1000),
        ("chat", {"max_tokens": 30, "max_completion_tokens": 30}, 64, 30),
        ("chat", {"max_tokens": 1000, "max_completion_tokens": 1, "n": 3}, 64, 3000),
        ("chat", {"max_tokens": None, "max_completion_tokens": 5}, 64, 5),
        ("completions", {"max_tokens": 1000, "max_completion_tokens": 1}, 64, 1000),
        ("embeddings", {"max_tokens": 1000}, 64, 0),
    ],
)
def test_reservation_reads_the_larger_token_cap(endpoint, fields, default, reserved):
    body = {"model": "m", **fields}
    body.update(
        {"chat": {"messages": MESSAGES}, "completions": {"prompt": "hi"}, "embeddings": {"input": "hi"}}[endpoint]
    )
    assert parse_call(endpoint, body, default).max_output == reserved
