"""`GET /v1/me` through the whole proxy: real Redis (the store's clock pinned, so no bucket refills
between two reads), uvicorn on a real port, the mock upstream. After requests of known tokens
and cost, each limit shows exactly what remains (requests, tokens, free leases; a stream held
open holds one), and every budget window its spent, held, remaining and end, equal to the
figures of `/admin/usage`; for a config key, a runtime key and a JWT's end user. The answer
never holds a key, a digest or a token."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import httpx
import orjson
import pytest

from proxy.http.me_api import Me
from proxy.limits.redis_store import RedisStore
from proxy.request.authenticate import sha256_hex
from tests.support.clock import Clock
from tests.support.configs import ADMIN_KEY, KEYS, UPSTREAM_KEY, make_config
from tests.test_identity_jwt import AUDIENCE, ISSUER, JwksServer, Signer

CHAT = {"model": "chat-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
# the pinned clock: 2027-01-15 08:00 UTC, 03:00 on a Friday in the budget timezone (New York)
DAY, WEEK, MONTH = "2027-01-15", "2027-W02", "2027-01"
ENDS = {"day": "2027-01-16T05:00:00Z", "week": "2027-01-18T05:00:00Z", "month": "2027-02-01T05:00:00Z"}
PERIODS = {"day": DAY, "week": WEEK, "month": MONTH}
MINUTE_MS = 60_000  # rpm 1 and tpm 1: one request, or one token, back a minute


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer("idp-me", "rsa")


@pytest.fixture
def jwks_server(signer: Signer) -> Iterator[JwksServer]:
    server = JwksServer()
    server.keys = [signer.jwk]
    yield server
    server.stop()


@pytest.fixture
def server(mock_upstream, start_proxy, redis_url, jwks_server):
    def patch(data: dict) -> None:
        data["budget_timezone"] = "America/New_York"
        data["store"]["on_redis_error"] = "deny"
        data["org"] = {"budgets": [{"window": "month", "usd": "5"}]}
        data["teams"]["platform"] = {
            "limits": {"rpm": 1, "rpm_burst": 50, "tpm": 1, "tpm_burst": 200_000, "max_parallel": 5},
            "budgets": [{"window": "day", "usd": "1"}, {"window": "week", "usd": "2"}],
            "end_users": {"daily_budget_usd": "0.5", "limits": {"rpm": 1, "rpm_burst": 20, "max_parallel": 2}},
        }
        data["keys"]["alice"]["limits"] = {"rpm": 1, "rpm_burst": 10, "tpm": 1, "tpm_burst": 100_000, "max_parallel": 3}
        data["keys"]["alice"]["budgets"] = [
            {"window": "day", "usd": "0.5"},
            {"window": "week", "usd": "1"},
            {"window": "month", "usd": "1.5", "enforce": False},
        ]
        data["auth"] = {
            "jwt": {
                "issuer": ISSUER,
                "audience": AUDIENCE,
                "jwks_url": jwks_server.url,
                "team_claim": "team",
                "user_claim": "sub",
            }
        }

    store = RedisStore.from_url(redis_url, clock_us=Clock())
    server, _ = start_proxy(make_config(mock_upstream.url, redis_url=redis_url, patch=patch), store=store)
    return server


def chat(server, secret: str, body: dict = CHAT, headers: dict | None = None) -> httpx.Response:
    response = httpx.post(
        server.base_url + "/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {secret}", **(headers or {})},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    return response


def me(server, secret: str, *secrets: str) -> dict:
    """The answer, checked against the documented model, with no secret anywhere in it."""
    response = httpx.get(server.base_url + "/me", headers={"Authorization": f"Bearer {secret}"}, timeout=10)
    assert response.status_code == 200, response.text
    for hidden in (secret, sha256_hex(secret), *secret.split("."), ADMIN_KEY, UPSTREAM_KEY, *secrets):
        assert hidden not in response.text
    body: dict = response.json()
    assert Me.model_validate(body).model_dump(mode="json", exclude_unset=True) == body
    return body


def usage(server, window: str) -> dict:
    response = httpx.get(
        server.url + f"/admin/usage?window={window}", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10
    )
    assert response.status_code == 200, response.text
    return response.json()


def ledger_spend(server, budget: dict) -> int:
    """The spend `/admin/usage` reports for a budget's scope over its window."""
    report = usage(server, budget["window"])
    team = report["teams"]["platform"]
    scope = budget["scope"]
    if scope == "org":
        return int(report["total"]["spend_micros"])
    if scope == "team":
        return int(team["spend_micros"])
    if scope == "end_user":
        return int(team["end_users"][budget["name"]]["spend_micros"])
    return int(team["keys"][budget["name"]]["spend_micros"])


def budgets_by(body: dict) -> dict[tuple[str, str, str], dict]:
    return {(b["scope"], b["name"], b["window"]): b for b in body["budgets"]}


def assert_settled_budgets_match_the_ledger(server, body: dict) -> None:
    for budget in body["budgets"]:
        assert budget["held_micros"] == 0, budget
        assert budget["spent_micros"] == ledger_spend(server, budget) > 0, budget
        assert budget["remaining_micros"] == budget["limit_micros"] - budget["spent_micros"], budget
        assert (budget["period"], budget["resets_at"]) == (PERIODS[budget["window"]], ENDS[budget["window"]])


def bucket(limit: int, capacity: int, used: int) -> dict:
    """A bucket at rate 1 a minute that `used` have been taken from (the clock does not move)."""
    reset_ms = used * MINUTE_MS
    return {"limit": limit, "capacity": capacity, "remaining": capacity - used, "reset_ms": reset_ms}


def without_reset_text(scope: dict) -> dict:
    return {
        name: {k: v for k, v in value.items() if k != "reset"} if isinstance(value, dict) else value
        for name, value in scope.items()
    }


def test_a_keys_limits_and_budgets_with_what_remains(server):
    secret = KEYS["alice"]
    tokens = sum(chat(server, secret).json()["usage"]["total_tokens"] for _ in range(3))
    server.wait_settled()
    body = me(server, secret)
    assert (body["object"], body["name"], body["team"], body["end_user"]) == ("proxy.me", "alice", "platform", None)
    assert "chat-model" in body["models"]
    assert without_reset_text(body["limits"]["key"]) == {
        "enforce": True,
        "rpm": bucket(1, 10, 3),
        "tpm": bucket(1, 100_000, tokens),
        "max_parallel": {"limit": 3, "in_use": 0, "remaining": 3},
    }
    assert body["limits"]["key"]["rpm"]["reset"] == "3m0s"
    assert without_reset_text(body["limits"]["team"]) == {
        "enforce": True,
        "rpm": bucket(1, 50, 3),
        "tpm": bucket(1, 200_000, tokens),
        "max_parallel": {"limit": 5, "in_use": 0, "remaining": 5},
    }
    assert "end_user" not in body["limits"]  # a key names no end user
    assert sorted(budgets_by(body)) == [
        ("key", "alice", "day"),
        ("key", "alice", "month"),
        ("key", "alice", "week"),
        ("org", "", "month"),
        ("team", "platform", "day"),
        ("team", "platform", "week"),
    ]
    limits = {k: b["limit_micros"] for k, b in budgets_by(body).items()}
    assert limits[("key", "alice", "day")] == 500_000 and limits[("org", "", "month")] == 5_000_000
    assert [b["enforce"] for b in body["budgets"] if b["window"] == "month" and b["scope"] == "key"] == [False]
    assert_settled_budgets_match_the_ledger(server, body)
    head = httpx.head(server.base_url + "/me", headers={"Authorization": f"Bearer {secret}"}, timeout=10)
    assert (head.status_code, head.content) == (200, b"")  # HEAD as on every GET route

    # a stream held open: one lease in use in each scope, its reservation held in every budget
    slow = orjson.dumps({"chunk_delay_s": 0.2, "chunks": 50}).decode()
    first_chunk, done = threading.Event(), threading.Event()

    def stream() -> None:
        with httpx.stream(
            "POST",
            server.base_url + "/chat/completions",
            json={**CHAT, "stream": True},
            headers={"Authorization": f"Bearer {secret}", "x-mock-fault": slow},
            timeout=30,
        ) as response:
            for _ in response.iter_bytes():
                first_chunk.set()
                if done.is_set():
                    break

    thread = threading.Thread(target=stream)
    thread.start()
    try:
        assert first_chunk.wait(10)
        held = me(server, secret)
    finally:
        done.set()
        thread.join(15)
    assert held["limits"]["key"]["max_parallel"] == {"limit": 3, "in_use": 1, "remaining": 2}
    assert held["limits"]["team"]["max_parallel"] == {"limit": 5, "in_use": 1, "remaining": 4}
    assert held["limits"]["key"]["rpm"]["remaining"] == 6
    assert held["limits"]["key"]["tpm"]["remaining"] < 100_000 - tokens  # its tokens reserved
    for key, budget in budgets_by(held).items():
        before = budgets_by(body)[key]
        assert budget["spent_micros"] == before["spent_micros"] and budget["held_micros"] > 0, budget
        assert budget["remaining_micros"] == budget["limit_micros"] - budget["spent_micros"] - budget["held_micros"]
    server.wait_settled()
    after = me(server, secret)
    assert after["limits"]["key"]["max_parallel"]["in_use"] == 0
    assert_settled_budgets_match_the_ledger(server, after)


def admin(server, method: str, path: str, **kwargs) -> httpx.Response:
    return httpx.request(
        method, server.url + path, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10, **kwargs
    )


def test_a_runtime_key_gets_its_own(server):
    spec = {"name": "ci", "team": "platform", "limits": {"rpm": 1, "rpm_burst": 5, "max_parallel": 2}}
    created = admin(server, "POST", "/admin/keys", json={**spec, "budgets": {"daily_usd": "0.25"}})
    assert created.status_code == 201, created.text
    secret = created.json()["key"]
    for _ in range(2):
        chat(server, secret)
    server.wait_settled()
    body = me(server, secret)
    assert (body["name"], body["team"], body["end_user"]) == ("ci", "platform", None)
    assert without_reset_text(body["limits"]["key"]) == {
        "enforce": True,
        "rpm": bucket(1, 5, 2),
        "max_parallel": {"limit": 2, "in_use": 0, "remaining": 2},
    }
    assert body["limits"]["team"]["rpm"]["remaining"] == 48
    assert sorted(budgets_by(body)) == [
        ("key", "ci", "day"),
        ("org", "", "month"),
        ("team", "platform", "day"),
        ("team", "platform", "week"),
    ]
    assert budgets_by(body)[("key", "ci", "day")]["limit_micros"] == 250_000
    assert_settled_budgets_match_the_ledger(server, body)
    assert admin(server, "DELETE", "/admin/keys/ci").status_code == 200
    revoked = httpx.get(server.base_url + "/me", headers={"Authorization": f"Bearer {secret}"}, timeout=10)
    assert revoked.status_code == 401


def test_a_jwt_end_user_gets_its_own(server, signer):
    token = signer.sign(sub="ana@example.com")
    for _ in range(2):
        chat(server, token)
    chat(server, signer.sign(sub="bo@example.com"))  # another end user: the team's figures only
    server.wait_settled()
    body = me(server, token)
    assert (body["name"], body["team"], body["end_user"]) == ("user:ana@example.com", "platform", "ana@example.com")
    assert body["models"] == sorted(body["models"]) and "chat-model" in body["models"]
    ana = {"enforce": True, "rpm": bucket(1, 20, 2), "max_parallel": {"limit": 2, "in_use": 0, "remaining": 2}}
    assert without_reset_text(body["limits"]["key"]) == ana  # the end user's scope, `user:<name>`
    assert without_reset_text(body["limits"]["end_user"]) == ana  # and the team's end-user limits
    assert body["limits"]["team"]["rpm"]["remaining"] == 47
    assert sorted(budgets_by(body)) == [
        ("end_user", "ana@example.com", "day"),
        ("key", "user:ana@example.com", "day"),
        ("org", "", "month"),
        ("team", "platform", "day"),
        ("team", "platform", "week"),
    ]
    mine = budgets_by(body)
    assert (
        mine[("end_user", "ana@example.com", "day")]["spent_micros"] * 3
        == mine[("team", "platform", "day")]["spent_micros"] * 2
    )
    for budget in body["budgets"]:
        if budget["scope"] == "key":  # the JWT's own scope: the ledger has it as the end user's
            budget = {**budget, "scope": "end_user", "name": "ana@example.com"}
        assert budget["spent_micros"] == ledger_spend(server, budget) > 0, budget
        assert (budget["period"], budget["resets_at"]) == (PERIODS[budget["window"]], ENDS[budget["window"]])
