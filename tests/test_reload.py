"""`SIGHUP` reloads the config file of a running `llm-proxy serve`: limits change, keys come and go,
and a broken file is refused (logged) while the running config keeps serving."""

from __future__ import annotations

import shutil
import signal
import sys
import time
from pathlib import Path

import httpx
import orjson
import pytest

from tests.support.configs import KEYS, config_dict
from tests.support.errors import INVALID, WRONG_KEY, error_reply, openai_error
from tests.support.metrics import samples
from tests.support.processes import proxy_process, write_config

CHAT = {"model": "chat-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
NEW_KEY = "sk-proxy-dave-4444"
RELOAD_TIMEOUT_S = 10.0


def llm_proxy() -> list[str]:
    """The installed `llm-proxy` script next to this interpreter, else `python -m proxy`."""
    script = Path(sys.executable).parent / "llm-proxy"
    if script.exists():
        return [str(script)]
    found = shutil.which("llm-proxy")
    return [found] if found else [sys.executable, "-m", "proxy"]


def post(url: str, key: str) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"}, timeout=10)


def request_limit(url: str, key: str = KEYS["alice"]) -> str:
    response = post(url, key)
    assert response.status_code == 200, response.text
    return response.headers["x-ratelimit-limit-requests"]


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + RELOAD_TIMEOUT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def serve(tmp_path, mock_upstream):
    """serve(data) -> (process, config path): `llm-proxy serve` on a config dict, in-process store."""
    started = []

    def start(data: dict):
        path = write_config(tmp_path / "config.yaml", data)
        process = proxy_process(path, argv0=llm_proxy()).start().wait_ready()
        started.append(process)
        return process, path

    yield start
    for process in started:
        process.stop()


def base_config(upstream_url: str, rpm: int) -> dict:
    data = config_dict(upstream_url)
    data["shutdown_grace_s"] = 1
    data["keys"]["alice"]["limits"] = {"rpm": rpm}
    return data


def test_sighup_applies_new_limits_and_keys(serve, mock_upstream):
    process, path = serve(base_config(mock_upstream.url, rpm=600))
    assert request_limit(process.url) == "600"
    assert post(process.url, KEYS["carol"]).status_code == 200
    assert post(process.url, NEW_KEY).status_code == 401

    changed = base_config(mock_upstream.url, rpm=1200)
    changed["keys"]["dave"] = {"team": "research", "key": NEW_KEY}
    del changed["keys"]["carol"]
    write_config(path, changed)
    process.signal(signal.SIGHUP)
    wait_for(lambda: request_limit(process.url) == "1200", "the new rpm in x-ratelimit-limit-requests")

    assert post(process.url, NEW_KEY).status_code == 200, "a key added by the reload does not work"
    removed = post(process.url, KEYS["carol"])
    assert error_reply(removed) == (401, openai_error(WRONG_KEY, INVALID, "invalid_api_key")), (
        "a key removed by the reload still works"
    )
    assert "config reloaded" in process.output()


def queue_counts(url: str) -> list:
    return samples(httpx.get(url + "/metrics", timeout=10).text).get("llm_proxy_queue_wait_seconds_count", [])


def test_sighup_that_lets_a_team_wait_exposes_its_queue_series_at_zero(serve, mock_upstream):
    process, path = serve(base_config(mock_upstream.url, rpm=600))
    assert queue_counts(process.url) == []
    changed = base_config(mock_upstream.url, rpm=600)
    changed["teams"]["research"]["limits"] = {"max_wait_ms": 2000}
    write_config(path, changed)
    process.signal(signal.SIGHUP)
    wait_for(lambda: queue_counts(process.url) == [({"team": "research"}, 0)], "research's queue series at zero")


def test_sighup_with_a_broken_file_keeps_the_running_config(serve, mock_upstream):
    process, path = serve(base_config(mock_upstream.url, rpm=600))
    assert request_limit(process.url) == "600"

    write_config(path, base_config(mock_upstream.url, rpm=-1))
    process.signal(signal.SIGHUP)
    wait_for(lambda: "config reload refused" in process.output(), "the refusal in the log")

    assert process.alive
    assert request_limit(process.url) == "600"
    refusals = [line for line in map(orjson.loads, process.output().splitlines()) if line.get("level") == "ERROR"]
    assert refusals == [
        {
            "event": "log",
            "level": "ERROR",
            "logger": "proxy.reload",
            "message": "config reload refused, keeping the running config: keys.alice.limits.rpm: must be > 0",
        }
    ]

    write_config(path, base_config(mock_upstream.url, rpm=900))  # a fixed file is taken by the next SIGHUP
    process.signal(signal.SIGHUP)
    wait_for(lambda: request_limit(process.url) == "900", "the fixed file's rpm")
