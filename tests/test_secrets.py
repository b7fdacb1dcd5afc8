"""Secrets never leave: a scripted workload through a real `llm-proxy serve` at debug level, then
every log line, metric, error body, header and /admin answer is searched for every key and hash."""

from __future__ import annotations

import hashlib
import json
import socket
import threading

import httpx

from proxy.config import parse_config
from proxy.request.authenticate import KeyRing, sha256_hex
from tests.support.processes import proxy_process, start_all, write_config
from tests.support.redis_server import RedisServer

PROXY_KEYS = {"alice": "sk-proxy-alice-SECRET-a1", "bob": "sk-proxy-bob-SECRET-b2"}
UPSTREAM_KEY = "sk-upstream-SECRET-u3"
ADMIN_KEY = "sk-admin-SECRET-z4"
CHAT = {"model": "chat-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


def secrets_and_hashes() -> list[str]:
    plain = [*PROXY_KEYS.values(), UPSTREAM_KEY, ADMIN_KEY]
    return plain + [hashlib.sha256(s.encode()).hexdigest() for s in plain]


def config(upstream_url: str, redis_url: str) -> dict:
    return {
        "log_level": "debug",
        "admin_key_env": "TEST_ADMIN_KEY",
        "store": {"redis_url": redis_url, "on_redis_error": "allow", "timeout_ms": 100},
        "upstreams": {"mock": {"base_url": upstream_url, "api_key_env": "TEST_UPSTREAM_KEY", "max_retries": 1}},
        "models": {
            "chat-model": {
                "targets": [{"upstream": "mock", "model": "gpt-4o-mini"}],
                "price_per_mtok": {"input": "0.27", "output": "1.10"},
            }
        },
        "teams": {"platform": {"daily_budget_usd": 1, "limits": {"rpm": 600}}},
        "keys": {
            # one request back every 10 s: the 8 calls in a row below exceed it however slow the machine
            "alice": {"team": "platform", "key_env": "TEST_ALICE_KEY", "limits": {"rpm": 6, "rpm_burst": 6}},
            "bob": {"team": "platform", "key_sha256": sha256_hex(PROXY_KEYS["bob"]), "daily_budget_usd": "0.00002"},
        },
    }


def test_no_secret_reaches_logs_metrics_errors_or_admin(mock_upstream, tmp_path):
    redis = RedisServer()
    env = {"TEST_ADMIN_KEY": ADMIN_KEY, "TEST_UPSTREAM_KEY": UPSTREAM_KEY, "TEST_ALICE_KEY": PROXY_KEYS["alice"]}
    seen: list[str] = []
    try:
        path = write_config(tmp_path / "config.yaml", config(mock_upstream.url, redis.url))
        proxy = start_all([proxy_process(path, env=env)])[0]
        base = proxy.url

        def record(response: httpx.Response) -> httpx.Response:
            seen.append(response.text)
            seen.append(json.dumps(dict(response.headers)))
            return response

        def call(key, body=CHAT, headers=None, path="/v1/chat/completions"):
            auth = {"Authorization": f"Bearer {key}"} if key else {}
            return record(httpx.post(base + path, json=body, headers={**auth, **(headers or {})}, timeout=10))

        alice, bob = PROXY_KEYS["alice"], PROXY_KEYS["bob"]
        assert call(alice).status_code == 200
        assert call(alice, {**CHAT, "stream": True}).status_code == 200
        for wrong in (alice + "x", alice[:-1], UPSTREAM_KEY, ADMIN_KEY, sha256_hex(alice), ""):
            assert call(wrong).status_code == 401
        azure_style = httpx.post(base + "/v1/chat/completions", json=CHAT, headers={"api-key": alice + "y"})
        assert record(azure_style).status_code == 401
        assert call(bob, {**CHAT, "model": "chat-model", "max_tokens": 50}).status_code == 429  # budget
        statuses = [call(alice).status_code for _ in range(8)]
        assert 429 in statuses  # rpm
        mock_upstream.add_faults([{"status": 500}, {"status": 500}])
        assert call(bob).status_code == 502
        assert call(alice, {"model": "nope", "messages": []}).status_code in (400, 404)
        redis.kill()  # an outage: errors are logged
        call(bob)
        redis.start()
        for key in (None, alice, UPSTREAM_KEY, ADMIN_KEY + "!"):
            auth = {"Authorization": f"Bearer {key}"} if key else {}
            response = record(httpx.get(base + "/admin/usage", headers=auth))
            assert response.status_code in (401, 403)
        for admin_path in ("/admin/usage", "/admin/keys", "/admin/openapi.json"):
            response = record(httpx.get(base + admin_path, headers={"Authorization": f"Bearer {ADMIN_KEY}"}))
            assert response.status_code == 200
        seen.append(record(httpx.get(base + "/metrics")).text)
        proxy.stop()
        logs = proxy.output()
        assert '"event": "request"' in logs or '"event":"request"' in logs  # the request log ran
        sent_upstream = json.dumps(mock_upstream.requests)
        assert UPSTREAM_KEY in sent_upstream  # the upstream got its key...
        for key in PROXY_KEYS.values():
            assert key not in sent_upstream  # ...and never a client's
        everything = {"logs": logs, "responses": "\n".join(seen)}
        for where, text in everything.items():
            for secret in secrets_and_hashes():
                assert secret not in text, f"a secret or its hash leaked into {where}"
    finally:
        redis.stop()


def test_keys_are_found_by_hash_lookup_and_never_kept_in_plaintext():
    data = config("http://127.0.0.1:9/v1", "redis://127.0.0.1:9/0")
    ring = KeyRing(parse_config(data), environ={"TEST_ALICE_KEY": PROXY_KEYS["alice"], "TEST_ADMIN_KEY": ADMIN_KEY})
    assert set(ring._by_hash) == {sha256_hex(k) for k in PROXY_KEYS.values()}
    assert ring.authenticate(PROXY_KEYS["alice"]).key_name == "alice"
    kept = json.dumps({h: repr(c) for h, c in ring._by_hash.items()}) + repr(vars(ring))
    for secret in (*PROXY_KEYS.values(), ADMIN_KEY):
        assert secret not in kept
    assert ring.is_admin(ADMIN_KEY) and not ring.is_admin(PROXY_KEYS["alice"])


class Decoy:
    """A listener no request should ever reach: counts connections."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self):
        self.sock.close()


def test_no_request_can_choose_where_the_proxy_connects(mock_upstream, start_proxy):
    from tests.support.configs import KEYS, make_config

    decoy = Decoy()
    try:
        server, _ = start_proxy(make_config(mock_upstream.url))
        target = f"127.0.0.1:{decoy.port}"
        auth = {"Authorization": f"Bearer {KEYS['alice']}"}
        attempts = [
            {"headers": {"Host": target}},
            {"headers": {"X-Forwarded-Host": target, "X-Forwarded-Proto": "http", "Forwarded": f"host={target}"}},
            {"body": {"base_url": f"http://{target}/v1", "api_base": f"http://{target}/v1"}},
            {"body": {"model": f"http://{target}/v1/chat-model"}},
        ]
        for attempt in attempts:
            body = {"model": "chat-model", "messages": [{"role": "user", "content": "hi"}], **attempt.get("body", {})}
            response = httpx.post(
                server.base_url + "/chat/completions", json=body, headers={**auth, **attempt.get("headers", {})}
            )
            assert response.status_code in (200, 404), response.text
        # an absolute-form request target naming another host
        with socket.create_connection(("127.0.0.1", server.port)) as raw:
            payload = json.dumps({"model": "chat-model", "messages": [{"role": "user", "content": "hi"}]}).encode()
            raw.sendall(
                f"POST http://{target}/v1/chat/completions HTTP/1.1\r\nHost: {target}\r\n"
                f"Authorization: Bearer {KEYS['alice']}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
                + payload
            )
            raw.settimeout(5)
            reply = b""
            while chunk := raw.recv(65536):
                reply += chunk
        assert reply.split(b" ", 2)[1] in (b"200", b"400", b"404")
        assert decoy.connections == 0
        assert all(r["path"].startswith("/v1/") for r in mock_upstream.requests)
    finally:
        decoy.close()
