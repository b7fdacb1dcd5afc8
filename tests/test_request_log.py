"""The request log: one JSON line per request on stdout, no secrets, no content unless asked."""

from __future__ import annotations

import hashlib
import time

import httpx
import orjson

from tests.support.configs import ADMIN_KEY, KEYS, UPSTREAM_KEY, make_config

FIELDS = {
    "event",
    "request_id",
    "endpoint",
    "team",
    "key",
    "model",
    "upstream",
    "status",
    "stream",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "cost_usd",
    "duration_ms",
    "ttft_ms",
    "retries",
    "rejection",
    "error",
    "client_gone",
    "queued_ms",
}
SECRET_WORDS = "the secret plan is here"


def request_lines(text: str) -> list[dict]:
    lines = [orjson.loads(line) for line in text.splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == "request"]


def drive(server) -> None:
    """A plain call, a streamed one, one with a bad key, one for a missing model: request ids log-1..4."""
    auth = {"Authorization": f"Bearer {KEYS['alice']}"}
    chat = {"model": "chat-model", "messages": [{"role": "user", "content": SECRET_WORDS}], "max_tokens": 5}
    url = server.base_url + "/chat/completions"
    httpx.post(url, json=chat, headers={**auth, "x-request-id": "log-1"})
    with httpx.stream("POST", url, json={**chat, "stream": True}, headers={**auth, "x-request-id": "log-2"}) as r:
        r.read()
    httpx.post(url, json=chat, headers={"Authorization": "Bearer sk-nope", "x-request-id": "log-3"})
    httpx.post(url, json={**chat, "model": "missing"}, headers={**auth, "x-request-id": "log-4"})


def wait_lines(capsys, count):
    """The request lines, in the order of drive()'s calls: a stream's line is written once it has
    settled, after its last byte, so the next call's line may come first."""
    deadline, text = time.monotonic() + 5, ""
    while True:
        text += capsys.readouterr().out
        if len(request_lines(text)) >= count or time.monotonic() > deadline:
            return sorted(request_lines(text), key=lambda line: str(line["request_id"]))
        time.sleep(0.02)


def test_one_line_per_request_without_secrets_or_content(mock_upstream, start_proxy, capsys):
    server, _ = start_proxy(make_config(mock_upstream.url, patch=lambda d: d.update(log_level="info")))
    drive(server)
    lines = wait_lines(capsys, 4)
    assert len(lines) == 4
    for line in lines:
        assert set(line) == FIELDS
    plain, streamed, bad_key, bad_model = lines
    assert (plain["request_id"], plain["team"], plain["key"], plain["model"], plain["upstream"], plain["status"]) == (
        "log-1",
        "platform",
        "alice",
        "chat-model",
        "mock",
        200,
    )
    assert plain["completion_tokens"] == 5 and plain["cost_usd"] > 0 and plain["duration_ms"] > 0
    assert streamed["stream"] is True and streamed["ttft_ms"] > 0
    assert (bad_key["status"], bad_key["rejection"], bad_key["key"]) == (401, "auth", None)
    assert (bad_model["status"], bad_model["rejection"], bad_model["error"]) == (404, "model", "model_not_found")
    text = orjson.dumps(lines).decode()
    assert SECRET_WORDS not in text and "word0" not in text
    for secret in (*KEYS.values(), UPSTREAM_KEY, ADMIN_KEY, "sk-nope"):
        assert secret not in text and hashlib.sha256(secret.encode()).hexdigest() not in text


def test_log_bodies_includes_content(mock_upstream, start_proxy, capsys):
    server, _ = start_proxy(make_config(mock_upstream.url, patch=lambda d: d.update(log_level="info", log_bodies=True)))
    drive(server)
    plain = wait_lines(capsys, 4)[0]
    assert plain["request_body"]["messages"][0]["content"] == SECRET_WORDS
    assert "word0" in plain["response_body"]
    assert KEYS["alice"] not in orjson.dumps(plain).decode()


def test_level_warning_silences_the_request_log(mock_upstream, start_proxy, capsys):
    server, _ = start_proxy(make_config(mock_upstream.url))  # log_level: warning
    drive(server)
    time.sleep(0.2)
    assert request_lines(capsys.readouterr().out) == []
