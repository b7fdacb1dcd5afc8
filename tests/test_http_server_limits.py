"""The HTTP server against hostile connections, over raw sockets to a real uvicorn on a port.

A header section over `server.max_header_bytes` is a 431 after reading little more than the
limit; headers or a body that trickle are cut after `server.header_timeout_s` /
`server.body_timeout_s`; beyond `server.max_connections` the oldest connection still sending its
headers makes room, so an authorised client is served while slowloris connections hold the cap.
"""

from __future__ import annotations

import http.client
import socket
import time

import httpx
import openai
import orjson
import pytest

from proxy.app import create_app
from proxy.mock_upstream import MockUpstream
from tests.support.configs import KEYS, config_dict, make_config
from tests.support.errors import INVALID, openai_error
from tests.support.processes import proxy_process, start_all, stop_all, write_config
from tests.support.servers import ProxyServer

KEY = KEYS["alice"]
CHAT = orjson.dumps({"model": "chat-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"


@pytest.fixture(scope="module")
def mock():
    with MockUpstream() as upstream:
        yield upstream


def serve(mock: MockUpstream, **server) -> ProxyServer:
    return ProxyServer(create_app(make_config(mock.url, patch=lambda data: data.update(server=server)))).start()


@pytest.fixture(scope="module")
def proxy(mock):
    """Default header limit (64 KiB); short timeouts so trickling tests end quickly."""
    server = serve(mock, header_timeout_s=1, body_timeout_s=1)
    yield server
    server.stop()


def connect(port: int, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes (a reset after its answer counts as the end)."""
    received = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk


def split_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split(" ")[1]), headers, body


MESSAGES = {
    "request_header_fields_too_large": "The request's headers are too large.",
    "request_timeout": "The request did not arrive in time.",
}


def assert_openai_error(raw: bytes, status: int, code: str) -> None:
    got, headers, body = split_response(raw)
    assert got == status, raw[:300]
    assert headers["content-type"] == "application/json" and headers["connection"] == "close"
    assert orjson.loads(body) == openai_error(MESSAGES[code], INVALID, code)


def authorised_request(port: int) -> httpx.Response:
    return httpx.post(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        content=CHAT,
        timeout=10,
        headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"},
    )


def thread_cpu_s(native_id: int) -> float:
    """CPU seconds (user + system) one thread of this process has used, from /proc."""
    with open(f"/proc/self/task/{native_id}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime, stime in clock ticks (USER_HZ = 100)


def is_closed(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
    finally:
        sock.setblocking(True)


# -- header size ------------------------------------------------------------------------------


def test_an_80kib_header_is_a_431_and_the_connection_closes(proxy):
    with connect(proxy.port) as sock:
        started = time.monotonic()
        sock.sendall(HEAD + b"x-big: " + b"a" * (80 * 1024) + b"\r\ncontent-length: 2\r\n\r\n{}")
        raw = read_all(sock)
        elapsed = time.monotonic() - started
    assert_openai_error(raw, 431, "request_header_fields_too_large")
    assert elapsed < 5, elapsed  # not a timeout: answered as soon as the limit was passed


def test_headers_just_under_the_limit_and_a_large_body_are_served(proxy):
    # one read then holds the end of the headers and the start of a body, past the header limit
    padding = 60 * 1024
    body = orjson.dumps(
        {"model": "chat-model", "messages": [{"role": "user", "content": "a " * 100_000}], "max_tokens": 4}
    )
    response = httpx.post(
        f"{proxy.url}/v1/chat/completions",
        content=body,
        timeout=10,
        headers={"authorization": f"Bearer {KEY}", "content-type": "application/json", "x-padding": "p" * padding},
    )
    assert response.status_code in (200, 400), response.text[:300]  # 400: over the model's context
    assert response.status_code != 431


def test_a_48mib_header_line_is_refused_after_reading_little(proxy):
    """The server stops reading at the limit: the client cannot push more than the socket
    buffers hold before the connection is reset, and the server thread spends little CPU."""
    cpu_before = thread_cpu_s(proxy.thread.native_id)
    line = b"a" * (48 * 1024 * 1024)
    sent = 0
    with connect(proxy.port) as sock:
        sock.sendall(HEAD + b"x-big: ")
        view = memoryview(line)
        try:
            while sent < len(line):
                sent += sock.send(view[sent : sent + 65536])
        except (BrokenPipeError, ConnectionResetError):
            pass
        raw = read_all(sock)
    cpu = thread_cpu_s(proxy.thread.native_id) - cpu_before
    print(f"48 MiB header line: {sent / 2**20:.1f} MiB accepted before the reset, server CPU {cpu:.2f}s")
    assert sent < 16 * 1024 * 1024, sent  # socket buffers only; everything would be read without the limit
    if raw:  # the 431 arrives unless the reset overtook it
        assert_openai_error(raw, 431, "request_header_fields_too_large")
    assert authorised_request(proxy.port).status_code == 200


def test_llm_proxy_serve_uses_the_same_limits(mock, tmp_path):
    data = {**config_dict(mock.url), "server": {"max_header_bytes": 4096, "header_timeout_s": 1}}
    processes = start_all([proxy_process(write_config(tmp_path / "config.yaml", data))])
    try:
        port = processes[0].port
        with connect(port) as sock:
            sock.sendall(HEAD + b"x-big: " + b"a" * 5000 + b"\r\n\r\n")
            assert_openai_error(read_all(sock), 431, "request_header_fields_too_large")
        with connect(port) as sock:
            assert_openai_error(read_all(sock), 408, "request_timeout")
        assert authorised_request(port).status_code == 200
    finally:
        stop_all(processes)


# -- timeouts ---------------------------------------------------------------------------------


def test_headers_that_trickle_are_cut_after_header_timeout(proxy):
    with connect(proxy.port) as sock:
        started = time.monotonic()
        sock.sendall(HEAD)
        raw = b""
        for _ in range(50):  # one header line every 0.2 s: 10 s without the timeout
            try:
                sock.sendall(b"x-slow: 1\r\n")
            except (BrokenPipeError, ConnectionResetError):
                break
            sock.settimeout(0.2)
            try:
                raw = sock.recv(65536)
            except TimeoutError:
                continue
            break
        sock.settimeout(10)
        raw += read_all(sock)
        elapsed = time.monotonic() - started
    assert_openai_error(raw, 408, "request_timeout")
    assert 0.9 < elapsed < 5, elapsed


def test_a_connection_that_sends_nothing_is_closed_after_header_timeout(proxy):
    with connect(proxy.port) as sock:
        started = time.monotonic()
        raw = read_all(sock)
        elapsed = time.monotonic() - started
    assert_openai_error(raw, 408, "request_timeout")
    assert 0.9 < elapsed < 5, elapsed


def test_a_body_that_trickles_is_a_408_after_body_timeout(proxy):
    with connect(proxy.port) as sock:
        started = time.monotonic()
        sock.sendall(HEAD + f"authorization: Bearer {KEY}\r\ncontent-length: {len(CHAT)}\r\n\r\n".encode())
        raw = b""
        for i in range(len(CHAT) - 1):  # one byte every 0.1 s, never the last one
            try:
                sock.sendall(CHAT[i : i + 1])
            except (BrokenPipeError, ConnectionResetError):
                break
            sock.settimeout(0.1)
            try:
                raw = sock.recv(65536)
            except TimeoutError:
                continue
            break
        sock.settimeout(10)
        raw += read_all(sock)
        elapsed = time.monotonic() - started
    assert_openai_error(raw, 408, "request_timeout")
    assert 0.9 < elapsed < 5, elapsed
    assert authorised_request(proxy.port).status_code == 200


def test_an_idle_kept_alive_connection_is_not_cut_by_the_header_timeout(proxy):
    """Idle between requests is uvicorn's keep-alive timeout (5 s), not the header timeout."""
    request = HEAD + f"authorization: Bearer {KEY}\r\ncontent-length: {len(CHAT)}\r\n\r\n".encode() + CHAT
    with connect(proxy.port) as sock:
        for _ in range(2):
            sock.sendall(request)
            response = http.client.HTTPResponse(sock, method="POST")
            response.begin()
            response.read()
            assert response.status == 200
            time.sleep(1.5)  # longer than the header timeout


# -- the connection cap -----------------------------------------------------------------------


def test_slowloris_connections_at_the_cap_do_not_lock_out_authorised_clients(mock):
    server = serve(mock, max_connections=50, header_timeout_s=60)
    slow: list[socket.socket] = []
    try:
        for _ in range(50):
            sock = connect(server.port)
            sock.sendall(HEAD)  # and never the end of the headers
            slow.append(sock)
        time.sleep(0.2)
        clients = [openai.OpenAI(api_key=KEY, base_url=server.base_url, max_retries=0, timeout=10) for _ in range(3)]
        for client in clients:  # each on its own connection, kept open: three new connections
            reply = client.chat.completions.create(
                model="chat-model", max_tokens=4, messages=[{"role": "user", "content": "hi"}]
            )
            assert reply.choices[0].message.content
        time.sleep(0.2)
        assert [is_closed(sock) for sock in slow] == [True] * 3 + [False] * 47  # the oldest made room
        assert len(server.guard.open) == 50
        for client in clients:
            client.close()
    finally:
        for sock in slow:
            sock.close()
        server.stop()
