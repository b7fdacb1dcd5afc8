"""A bug after admission (an unexpected exception) still settles the request, brings the in-flight
gauge back to 0, counts it in `llm_proxy_requests_total` and the request log, and logs its
traceback once; inside a stream it is logged and told to the client, never swallowed.

The proxy runs on uvicorn on a port, with the mock upstream; one step is patched to raise.
"""

from __future__ import annotations

import io
import logging

import httpx
import openai
import orjson
import pytest

import proxy.app
from proxy.observe import RequestLog
from proxy.request import forward
from proxy.upstream import sse
from tests.support.configs import KEYS, make_config
from tests.support.errors import error_reply, openai_error
from tests.support.metrics import samples

CHAT = {"model": "chat-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}


class Bug(RuntimeError):
    pass


@pytest.fixture
def proxy_with_log(mock_upstream, start_proxy, monkeypatch):
    """(server, recorder, request log lines): the request log written to a buffer at `info`."""
    lines = io.StringIO()
    monkeypatch.setattr(proxy.app, "RequestLog", lambda level: RequestLog("info", stream=lines))
    server, recorder = start_proxy(make_config(mock_upstream.url))
    return server, recorder, lambda: [orjson.loads(line) for line in lines.getvalue().splitlines()]


def metric(server, name: str) -> dict[str, float]:
    found = samples(httpx.get(server.url + "/metrics", timeout=10).text)
    return {labels.get("status", labels.get("team", "")): value for labels, value in found[name]}


def tracebacks(caplog, exc_type) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.exc_info and isinstance(r.exc_info[1], exc_type)]


def test_a_bug_after_admission_is_settled_counted_and_logged_once(proxy_with_log, monkeypatch, caplog):
    server, recorder, logged = proxy_with_log

    def broken(*args, **kwargs):
        raise Bug("a bug in the forwarding step")

    monkeypatch.setattr(forward, "open_upstream", broken)
    with caplog.at_level(logging.ERROR):
        response = httpx.post(
            server.base_url + "/chat/completions",
            json=CHAT,
            headers={"Authorization": f"Bearer {KEYS['alice']}"},
            timeout=10,
        )
    assert error_reply(response) == (500, openai_error("The proxy had an internal error.", "server_error", None))
    assert "Bug" not in response.text and "a bug" not in response.text  # no internals to the client

    server.wait_settled()
    outcome = recorder.outcomes[-1]
    assert outcome.ticket is not None and outcome.ticket.settled
    assert metric(server, "llm_proxy_inflight_requests") == {"platform": 0.0}
    assert metric(server, "llm_proxy_requests_total") == {"500": 1.0}
    assert [(line["status"], line["request_id"]) for line in logged()] == [(500, outcome.request_id)]
    assert len(tracebacks(caplog, Bug)) == 1, [r.getMessage() for r in caplog.records]


def test_a_bug_inside_a_stream_is_logged_told_and_settled(proxy_with_log, mock_upstream, monkeypatch, caplog):
    server, recorder, logged = proxy_with_log
    mock_upstream.add_faults([{"chunk_delay_s": 0.05}])  # each event its own read: one block each
    calls = {"n": 0}
    real = sse.text_length

    def broken(event):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Bug("a bug in the relay")
        return real(event)

    monkeypatch.setattr(sse, "text_length", broken)
    received = []
    with (
        caplog.at_level(logging.ERROR),
        openai.OpenAI(base_url=server.base_url, api_key=KEYS["alice"], max_retries=0) as sdk,
    ):
        stream = sdk.chat.completions.create(**CHAT, stream=True)
        with pytest.raises(openai.APIError) as caught:
            for chunk in stream:
                received.append(chunk)
        server.wait_settled()
    assert caught.value.body == openai_error("The proxy had an internal error.", "server_error", None)["error"]
    assert len(received) == 2  # the blocks before the failing one
    outcome = recorder.outcomes[-1]
    assert outcome.ticket.settled and outcome.stream_error == "internal_error"
    assert outcome.usage.completion_tokens > 0  # charged what was relayed (chars / 4)
    assert metric(server, "llm_proxy_inflight_requests") == {"platform": 0.0}
    assert metric(server, "llm_proxy_requests_total") == {"200": 1.0}
    assert [line["error"] for line in logged()] == ["internal_error"]
    assert len(tracebacks(caplog, Bug)) == 1, [r.getMessage() for r in caplog.records]
