"""A reload while requests run: each request finishes on the config it started with, nothing is
left in flight or uncounted, every setting follows the reload, and a replaced upstream client is
closed once its last request has finished.

Real parts: `llm-proxy serve` processes reloaded by `SIGHUP`, a real redis-server paused with
`SIGSTOP` to hold a request at admission, the mock upstream on a port; and uvicorn on a port in
this process where the test must look at the upstream client objects.
"""

from __future__ import annotations

import copy
import os
import pathlib
import signal
import threading
import time
from contextlib import contextmanager

import httpx
import orjson
import pytest

from proxy.config import parse_config
from proxy.mock_upstream import MockUpstream
from tests.support.configs import KEYS, config_dict
from tests.support.metrics import samples
from tests.support.processes import proxy_process, write_config
from tests.support.redis_server import RedisServer
from tests.test_budgets_e2e import WebhookReceiver

CHAT = {"model": "chat-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
WAIT_S = 10.0
REQUEST_LINE = '{"event":"request"'


def wait_for(condition, what: str, within_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def post(url: str, body: dict = CHAT, client: httpx.Client | None = None, **kwargs) -> httpx.Response:
    send = client.post if client else httpx.post
    return send(
        url + "/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {KEYS['alice']}"},
        timeout=20,
        **kwargs,
    )


def in_background(function):
    """Run `function` in a thread; returns a callable that joins it and gives its result."""
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(value=function()), daemon=True)
    thread.start()

    def join():
        thread.join(WAIT_S * 2)
        assert "value" in result, "the request did not finish"
        return result["value"]

    return join


def metric_values(url: str, name: str) -> dict[str, float]:
    found = samples(httpx.get(url + "/metrics", timeout=10).text)
    return {labels.get("status", labels.get("team", "")): value for labels, value in found[name]}


def renamed(data: dict, new_name: str, base_url: str) -> dict:
    """`data` with its upstream `mock` renamed to `new_name` at `base_url`, and every model moved to it."""
    data = copy.deepcopy(data)
    data["upstreams"] = {new_name: {**data["upstreams"].pop("mock"), "base_url": base_url}}
    for model in data["models"].values():
        for target in model["targets"]:
            target["upstream"] = new_name
    return data


def unread_bytes_at(port: int) -> int:
    """Bytes waiting in the receive queues of the sockets listening or connected on local `port`."""
    total = 0
    for line in pathlib.Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].split(":")[1], 16)
        if local_port == port:
            total += int(fields[4].split(":")[1], 16)
    return total


@contextmanager
def paused(redis: RedisServer):
    """Redis stopped with SIGSTOP (it accepts bytes but answers nothing) until the block ends."""
    pid = redis._process.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


@pytest.fixture
def second_mock():
    with MockUpstream() as mock:
        yield mock


@pytest.fixture
def private_redis():
    server = RedisServer()
    if not server.real:
        server.stop()
        pytest.skip("pausing Redis needs a real redis-server")
    yield server
    server.stop()


@pytest.fixture
def serve(tmp_path):
    started = []

    def start(data: dict):
        path = write_config(tmp_path / "config.yaml", data)
        process = proxy_process(path).start().wait_ready()
        started.append(process)
        return process, path

    yield start
    for process in started:
        process.stop()


def test_request_held_at_admission_finishes_on_its_config_when_a_reload_renames_its_upstream(
    serve, mock_upstream, second_mock, private_redis
):
    data = config_dict(mock_upstream.url, redis_url=private_redis.url)
    data["store"].update(timeout_ms=8000, on_redis_error="deny")
    data["shutdown_grace_s"] = 1
    process, path = serve(data)
    assert post(process.url).status_code == 200  # the store connection is up, the scripts loaded
    wait_for(
        lambda: metric_values(process.url, "llm_proxy_inflight_requests") == {"platform": 0.0},
        "the first request's settlement (after its last byte), so only the next admit reaches Redis",
    )
    mock_upstream.clear()

    with httpx.Client(timeout=20) as http:  # made beforehand: the request is sent at once
        with paused(private_redis):
            # the registry's version poll (every 0.3 s) reaches the paused Redis too, then waits for
            # its answer: once its bytes are there, only the admit adds more (without this baseline the
            # poll's bytes could pass for the admit, and the reload come before the request had arrived)
            wait_for(lambda: unread_bytes_at(private_redis.port) > 0, "the registry poll to reach the paused Redis")
            polled = unread_bytes_at(private_redis.port)
            finish = in_background(lambda: post(process.url, client=http))
            wait_for(lambda: unread_bytes_at(private_redis.port) > polled, "the admit to reach the paused Redis")
            write_config(path, renamed(data, "moved", second_mock.url))
            process.signal(signal.SIGHUP)
            wait_for(lambda: "config reloaded" in process.output(), "the reload")
        response = finish()

    assert response.status_code == 200, response.text
    assert len(mock_upstream.requests) == 1, "the held request did not run on the upstream it started with"
    assert len(second_mock.requests) == 0
    wait_for(
        lambda: metric_values(process.url, "llm_proxy_inflight_requests") == {"platform": 0.0},
        "the in-flight gauge back at 0",
    )
    assert metric_values(process.url, "llm_proxy_requests_total") == {"200": 2.0}
    assert "Traceback" not in process.output()

    assert post(process.url).status_code == 200  # a new request runs on the new config
    assert len(second_mock.requests) == 1


def test_reload_applies_log_level_and_webhook_url(serve, mock_upstream):
    first, second = WebhookReceiver(), WebhookReceiver()
    try:
        data = config_dict(mock_upstream.url)
        data["keys"]["alice"]["daily_budget_usd"] = "0.0001"  # 100 µ$; each CHAT costs 11 µ$
        data.update(budget_alert_ratio=0.5, alert_webhook_url=first.url, log_level="warning")
        process, path = serve(data)
        assert post(process.url).status_code == 200
        assert REQUEST_LINE not in process.output()  # log_level warning: no request log

        changed = renamed(data, "moved", mock_upstream.url)
        changed.update(alert_webhook_url=second.url, log_level="info")
        write_config(path, changed)
        process.signal(signal.SIGHUP)
        wait_for(lambda: "config reloaded" in process.output(), "the reload")

        for _ in range(5):  # the 5th request overall passes 50 µ$: the alert
            assert post(process.url).status_code == 200
        wait_for(lambda: second.events, "the alert at the new webhook URL")
        assert [event["name"] for event in second.events] == ["alice"] and not first.events

        def request_lines() -> list[dict]:
            return [orjson.loads(line) for line in process.output().splitlines() if line.startswith(REQUEST_LINE)]

        # a request's log line is written when it settles, after its last byte: wait for the fifth
        wait_for(lambda: len(request_lines()) >= 5, "the request log to follow log_level: info")
        assert len(request_lines()) == 5, "the request log did not follow log_level: info"
        wait_for(
            lambda: "upstream client 'mock' replaced by a reload: closed" in process.output(),
            "an info log line of the replaced client's closing",
        )
    finally:
        first.close()
        second.close()


def test_a_replaced_upstream_client_is_closed_after_its_last_request(mock_upstream, start_proxy):
    data = config_dict(mock_upstream.url)
    server, _ = start_proxy(parse_config(data))
    snapshots = server.app.state.snapshots
    old = snapshots.current.upstreams["mock"]
    mock_upstream.add_faults([{"first_byte_delay_s": 1.0}])
    finish = in_background(lambda: post(server.url))
    wait_for(lambda: mock_upstream.requests, "the request to reach the upstream")

    server.run(server.app.state.reloader.apply(parse_config(renamed(data, "moved", mock_upstream.url))))
    assert snapshots.current.upstreams.keys() == {"moved"}
    assert not old.closed, "the replaced client was closed under a request still using it"
    response = finish()
    assert response.status_code == 200, response.text
    wait_for(lambda: old.closed, "the replaced client to be closed after its last request", within_s=5)
    assert not snapshots.current.upstreams["moved"].closed
    assert post(server.url).status_code == 200
    server.wait_settled()
    assert metric_values(server.url, "llm_proxy_inflight_requests") == {"platform": 0.0}
