"""Headers a client's `Connection` header names are for its hop only (RFC 9110 section 7.6.1):
through the real proxy on a port, the mock upstream records what reached it."""

from __future__ import annotations

import http.client
import socket

import orjson
import pytest

from proxy.app import create_app
from proxy.mock_upstream import MockUpstream
from tests.support.configs import KEYS, make_config
from tests.support.servers import ProxyServer

CHAT = orjson.dumps({"model": "chat-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})


@pytest.fixture(scope="module")
def mock():
    with MockUpstream() as upstream:
        yield upstream


@pytest.fixture(scope="module")
def proxy(mock):
    with ProxyServer(create_app(make_config(mock.url))) as server:
        yield server


def send_raw(port: int, header_lines: list[bytes]) -> int:
    request = (
        b"\r\n".join(
            [
                b"POST /v1/chat/completions HTTP/1.1",
                b"host: 127.0.0.1",
                b"authorization: Bearer " + KEYS["alice"].encode(),
                b"content-type: application/json",
                b"content-length: %d" % len(CHAT),
                *header_lines,
            ]
        )
        + b"\r\n\r\n"
        + CHAT
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        response = http.client.HTTPResponse(sock, method="POST")
        response.begin()
        response.read()
        return response.status


@pytest.mark.parametrize(
    "connection",
    [
        [b"Connection: keep-alive, X-Foo", b"Connection: x-BAR ,close"],  # two Connection headers, any case
        [b"Connection: X-Foo,X-Bar"],
    ],
)
def test_headers_named_by_connection_do_not_reach_the_upstream(proxy, mock, connection):
    mock.clear()
    answer = send_raw(proxy.port, [*connection, b"X-Foo: 1", b"x-bar: 2", b"X-Keep: 3"])
    assert answer == 200
    received = mock.requests[-1]["headers"]
    assert "x-foo" not in received and "x-bar" not in received, received
    assert received["x-keep"] == "3"


def test_plain_keep_alive_forwards_everything_else(proxy, mock):
    mock.clear()
    answer = send_raw(proxy.port, [b"Connection: keep-alive", b"X-Foo: 1"])
    assert answer == 200
    assert mock.requests[-1]["headers"]["x-foo"] == "1"
