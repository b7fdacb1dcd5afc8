"""A stream the upstream cuts in the same read as its last content: everything that arrived before
the break reaches the client, then the error event, and it is charged.

aiohttp raises a payload error before handing over data it had already buffered when the
connection drops in the same read; the mock writes N content events and closes the socket in one
write to provoke exactly that.
"""

from __future__ import annotations

import httpx
import openai
import pytest

from proxy.tokens import estimate_text_tokens
from tests.support.configs import ADMIN_KEY, KEYS, make_config
from tests.support.errors import openai_error

CHUNKS = 5


@pytest.mark.parametrize("include_usage", [False, True])
def test_content_before_a_cut_is_relayed_then_charged(mock_upstream, start_proxy, redis_url, include_usage):
    server, recorder = start_proxy(make_config(mock_upstream.url, redis_url=redis_url))
    mock_upstream.add_faults([{"cut_after_chunks": CHUNKS, "cut_in_one_write": True}])
    received = []
    with openai.OpenAI(base_url=server.base_url, api_key=KEYS["alice"], max_retries=0) as sdk:
        stream = sdk.chat.completions.create(
            model="chat-model",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=30,
            stream=True,
            **({"stream_options": {"include_usage": True}} if include_usage else {}),
        )
        with pytest.raises(openai.APIError) as caught:
            for chunk in stream:
                received.append(chunk.choices[0].delta.content or "")
    assert (
        caught.value.body
        == openai_error("The upstream stream was interrupted before it finished.", "server_error", "upstream_error")[
            "error"
        ]
    )
    assert received == [f"word{i}" if i == 0 else f" word{i}" for i in range(CHUNKS)], (
        "content that arrived before the cut was not relayed"
    )

    server.wait_settled()
    text = "".join(received)
    outcome = recorder.outcomes[-1]
    assert outcome.stream_error == "stream_cut"
    assert outcome.usage.completion_tokens == estimate_text_tokens(text) > 0
    usage = httpx.get(server.url + "/admin/usage", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10).json()[
        "teams"
    ]["platform"]
    assert usage["completion_tokens"] == estimate_text_tokens(text)
    assert usage["spend_micros"] == outcome.cost_micros > 0
