"""Runtime keys and teams through the whole proxy: the admin API (scoped admins, config entries
read-only, audit), the request path (limits and budgets from the runtime entry, rotation grace,
revocation by the fence), and `/v1/me` against the ledger. In-process store; the multi-replica
guarantees are in tests/test_runtime_replicas.py."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta

import httpx
import openai
import pytest

from proxy.request.authenticate import sha256_hex
from proxy.request.runtime_keys import RuntimeKeys
from tests.support.configs import ADMIN_KEY, KEYS, make_config
from tests.support.errors import clocked

PLATFORM_ADMIN = "sk-admin-platform-5555"
CHAT = {"model": "chat-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
COST = 11  # micro-dollars the mock's reply costs at chat-model's price (see test_budgets_e2e)


def scoped_admins(data: dict) -> None:
    data["admin_keys"] = {"platform-ops": {"key_sha256": sha256_hex(PLATFORM_ADMIN), "scope": {"team": "platform"}}}


@pytest.fixture
def server(mock_upstream, start_proxy):
    server, _ = start_proxy(make_config(mock_upstream.url, patch=scoped_admins))
    return server


def admin(server, method: str, path: str, key: str = ADMIN_KEY, **kwargs) -> httpx.Response:
    return httpx.request(method, server.url + path, headers={"Authorization": f"Bearer {key}"}, timeout=10, **kwargs)


def chat(server, key: str, body: dict = CHAT) -> httpx.Response:
    return httpx.post(
        server.base_url + "/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=10
    )


def error_of(response: httpx.Response) -> tuple[int, str, str]:
    error = response.json()["error"]
    return response.status_code, error["type"], error["code"]


def test_a_created_key_serves_at_once_under_its_own_limits(server):
    created = admin(server, "POST", "/admin/keys", json={"name": "ci", "team": "platform", "limits": {"rpm": 2}})
    assert created.status_code == 201, created.text
    body = created.json()
    secret = body.pop("key")
    assert secret.startswith("sk-proxy-") and body["source"] == "api" and body["team"] == "platform"
    assert "credentials" not in body and sha256_hex(secret) not in created.text

    client = openai.OpenAI(base_url=server.base_url, api_key=secret, max_retries=0)
    assert client.chat.completions.create(**CHAT).choices
    assert chat(server, secret).status_code == 200
    refused = chat(server, secret)
    assert error_of(refused) == (429, "requests", "rate_limit_exceeded")
    assert "key 'ci'" in refused.json()["error"]["message"]  # the runtime key's own scope refused it


def test_a_runtime_team_carries_its_budget(server):
    team = admin(server, "POST", "/admin/teams", json={"name": "lab", "budgets": {"daily_usd": "0.000020"}})
    assert team.status_code == 201
    secret = admin(server, "POST", "/admin/keys", json={"name": "lab-bot", "team": "lab"}).json()["key"]
    assert chat(server, secret).status_code == 200  # reserves 14, costs 11
    refused = chat(server, secret)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "insufficient_quota"
    assert refused.json()["error"]["message"] == clocked(
        "Team `lab` has spent $0.000011 of its $0.00002 daily budget; it resets at {instant}."
    )


def test_revoked_and_rotated_keys(server):
    first = admin(server, "POST", "/admin/keys", json={"name": "svc", "team": "research"}).json()["key"]
    rotated = admin(server, "POST", "/admin/keys/svc/rotate", json={"grace_s": 1})
    assert rotated.status_code == 200, rotated.text
    second = rotated.json()["key"]
    assert chat(server, first).status_code == 200 and chat(server, second).status_code == 200  # within the grace
    time.sleep(1.1)
    assert error_of(chat(server, first)) == (401, "invalid_request_error", "invalid_api_key")
    assert chat(server, second).status_code == 200

    assert admin(server, "DELETE", "/admin/keys/svc").json() == {"name": "svc", "revoked": True}
    refused = chat(server, second)
    assert error_of(refused) == (401, "invalid_request_error", "invalid_api_key")
    assert refused.json()["error"]["message"] == "Incorrect API key provided."
    assert admin(server, "GET", "/admin/keys/svc").status_code == 404


def test_config_entries_are_read_only(server):
    shown = admin(server, "GET", "/admin/keys/alice")
    assert shown.status_code == 200 and shown.json()["source"] == "config"
    for method, path, body in (
        ("PATCH", "/admin/keys/alice", {"limits": {"rpm": 1}}),
        ("POST", "/admin/keys/alice/rotate", {"grace_s": 0}),
        ("DELETE", "/admin/keys/alice", None),
        ("POST", "/admin/keys", {"name": "alice", "team": "platform"}),
        ("POST", "/admin/teams", {"name": "platform"}),
        ("PATCH", "/admin/teams/research", {"limits": {"rpm": 1}}),
    ):
        refused = admin(server, method, path, json=body)
        assert error_of(refused) == (409, "invalid_request_error", "managed_by_config"), (method, path)
    listing = admin(server, "GET", "/admin/keys").json()
    assert listing["keys"]["alice"]["source"] == "config"
    assert chat(server, KEYS["alice"]).status_code == 200


def test_a_scoped_admin_manages_only_its_team(server):
    made = admin(server, "POST", "/admin/keys", PLATFORM_ADMIN, json={"name": "p1", "team": "platform"})
    assert made.status_code == 201
    assert admin(server, "POST", "/admin/keys", json={"name": "r1", "team": "research"}).status_code == 201
    for method, path, body in (
        ("POST", "/admin/keys", {"name": "r2", "team": "research"}),
        ("GET", "/admin/keys/r1", None),
        ("PATCH", "/admin/keys/r1", {"limits": {"rpm": 1}}),
        ("POST", "/admin/keys/r1/rotate", {"grace_s": 0}),
        ("DELETE", "/admin/keys/r1", None),
        ("GET", "/admin/keys/carol", None),
        ("POST", "/admin/teams", {"name": "new-team"}),
        ("GET", "/admin/teams/research", None),
    ):
        refused = admin(server, method, path, PLATFORM_ADMIN, json=body)
        assert error_of(refused) == (403, "invalid_request_error", "out_of_scope"), (method, path, refused.text)
    listing = admin(server, "GET", "/admin/keys", PLATFORM_ADMIN).json()
    assert set(listing["keys"]) == {"alice", "bob", "p1"} and set(listing["teams"]) == {"platform"}
    usage = admin(server, "GET", "/admin/usage", PLATFORM_ADMIN).json()
    assert set(usage["teams"]) == {"platform"}
    audit = admin(server, "GET", "/admin/audit", PLATFORM_ADMIN).json()["data"]
    assert [(r["action"], r["target"]) for r in audit] == [("create", "p1")]
    user = admin(server, "GET", "/admin/keys", KEYS["alice"])
    assert error_of(user) == (403, "invalid_request_error", "admin_key_required")


def test_every_change_is_audited_without_a_secret(server, caplog):
    caplog.set_level(logging.INFO, logger="proxy.registry")
    calls = [
        ("POST", "/admin/teams", {"name": "lab", "limits": {"rpm": 50}}),
        ("PATCH", "/admin/teams/lab", {"budgets": {"daily_usd": "5"}}),
        ("POST", "/admin/keys", {"name": "k", "team": "lab", "metadata": {"owner": "ana"}}),
        ("PATCH", "/admin/keys/k", {"limits": {"tpm": 1000}}),
        ("POST", "/admin/keys/k/rotate", {"grace_s": 0}),
        ("DELETE", "/admin/keys/k", None),
        ("DELETE", "/admin/teams/lab", None),
    ]
    replies = [admin(server, method, path, json=body) for method, path, body in calls]
    assert [r.status_code for r in replies] == [201, 200, 201, 200, 200, 200, 200]
    secrets = [r.json()["key"] for r in replies if "key" in r.json()]
    audit = admin(server, "GET", "/admin/audit")
    records = audit.json()["data"]
    assert [(r["action"], r["kind"], r["target"], r["admin"]) for r in reversed(records)] == [
        ("create", "team", "lab", "admin"),
        ("update", "team", "lab", "admin"),
        ("create", "key", "k", "admin"),
        ("update", "key", "k", "admin"),
        ("rotate", "key", "k", "admin"),
        ("revoke", "key", "k", "admin"),
        ("delete", "team", "lab", "admin"),
    ]
    assert records[3]["changes"] == {"limits": {"tpm": 1000}}  # newest first: the key's update
    logged = [r.getMessage() for r in caplog.records if r.name == "proxy.registry"]
    assert logged[:3] == [
        "registry create team 'lab' by admin 'admin' "
        "(fields: budgets, end_user_defaults, limits, max_queue, metadata, share)",
        "registry update team 'lab' by admin 'admin' (fields: budgets)",
        "registry create key 'k' by admin 'admin' "
        "(fields: budgets, expires_at, limits, metadata, models, priority, team)",
    ]
    assert len(logged) == 7
    for secret in secrets:
        for text in (audit.text, *logged):
            assert secret not in text and hashlib.sha256(secret.encode()).hexdigest() not in text


def test_me_reports_the_ledger(server):
    admin(server, "POST", "/admin/teams", json={"name": "lab", "budgets": {"daily_usd": "1"}, "limits": {"rpm": 100}})
    secret = admin(
        server,
        "POST",
        "/admin/keys",
        json={"name": "me-key", "team": "lab", "budgets": {"daily_usd": "0.5"}, "models": ["chat-model"]},
    ).json()["key"]
    for _ in range(3):
        assert chat(server, secret).status_code == 200
    server.wait_settled()
    me = httpx.get(server.base_url + "/me", headers={"Authorization": f"Bearer {secret}"}, timeout=10)
    assert me.status_code == 200, me.text
    body = me.json()
    assert (body["name"], body["team"], body["models"]) == ("me-key", "lab", ["chat-model"])
    assert body["limits"]["key"] == {"enforce": True}
    assert body["limits"]["team"]["rpm"]["limit"] == 100 and body["limits"]["team"]["rpm"]["remaining"] >= 97
    usage = admin(server, "GET", "/admin/usage").json()["teams"]["lab"]
    windows = {(w["scope"], w["window"]): w for w in body["budgets"]}
    assert windows[("key", "day")]["spent_micros"] == usage["keys"]["me-key"]["spend_micros"] == 3 * COST
    assert windows[("team", "day")]["spent_micros"] == usage["spend_micros"] == 3 * COST
    assert windows[("key", "day")]["remaining_micros"] == 500_000 - 3 * COST
    assert windows[("team", "day")]["remaining_micros"] == 1_000_000 - 3 * COST
    assert windows[("key", "day")]["resets_at"].endswith("Z")
    assert secret not in me.text and sha256_hex(secret) not in me.text
    anonymous = httpx.get(server.base_url + "/me", timeout=10)
    assert error_of(anonymous) == (401, "invalid_request_error", "invalid_api_key")


def cli(server, *argv: str, admin_key: str | None = ADMIN_KEY) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "LLM_PROXY_ADMIN_KEY"}
    if admin_key is not None:
        env["LLM_PROXY_ADMIN_KEY"] = admin_key
    return subprocess.run(
        [sys.executable, "-m", "proxy", *argv, "--url", server.url], capture_output=True, text=True, env=env, timeout=30
    )


def test_the_cli_manages_keys_and_teams(server):
    made = cli(server, "teams", "create", "lab", "--rpm", "60", "--daily-usd", "2", "--share", "2", "--max-queue", "9")
    assert made.returncode == 0, made.stderr
    assert made.stdout.split("\n")[1].split() == ["lab", "api", "rpm", "60", "2", "2.0", "9"]
    created = cli(
        server, "keys", "create", "bot", "--team", "lab", "--tpm", "5000", "--max-wait-ms", "3000",
        "--priority", "low", "--models", "chat-model", "--json",
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    secret = json.loads(created.stdout)["key"]
    assert (
        json.loads(created.stdout)["limits"]["max_wait_ms"] == 3000 and json.loads(created.stdout)["priority"] == "low"
    )
    assert cli(server, "teams", "update", "lab", "--share", "0.5").returncode == 0
    assert json.loads(cli(server, "teams", "show", "lab", "--json").stdout)["share"] == 0.5
    refused = cli(server, "teams", "update", "lab", "--max-queue", "-1")
    assert refused.returncode == 1 and "answered 400" in refused.stderr, refused.stderr
    assert chat(server, secret).status_code == 200
    listing = cli(server, "keys", "list", "--team", "lab")
    assert listing.returncode == 0 and listing.stdout.split("\n")[1].split()[:3] == ["bot", "lab", "api"]
    assert secret not in listing.stdout
    shown = json.loads(cli(server, "keys", "show", "alice", "--json").stdout)
    assert shown["source"] == "config"
    assert cli(server, "keys", "update", "bot", "--rpm", "1").returncode == 0
    rotated = cli(server, "keys", "rotate", "bot", "--grace-s", "0", "--json")
    assert rotated.returncode == 0 and json.loads(rotated.stdout)["key"] != secret
    assert cli(server, "keys", "revoke", "bot").returncode == 0
    assert cli(server, "teams", "delete", "lab").returncode == 0
    assert [t["name"] for t in json.loads(cli(server, "teams", "list", "--json").stdout)] == ["platform", "research"]


def test_cli_errors_are_one_line(server):
    for argv, admin_key, line in (
        (
            ("keys", "update", "alice", "--rpm", "1"),
            ADMIN_KEY,
            "llm-proxy keys update: {url} answered 409 "
            "(managed_by_config): The key 'alice' is defined in the config file; change it there.",
        ),
        (
            ("keys", "show", "ghost"),
            ADMIN_KEY,
            "llm-proxy keys show: {url} answered 404 (not_found): No key named 'ghost'.",
        ),
        (("teams", "list"), None, "llm-proxy teams list: set LLM_PROXY_ADMIN_KEY to an admin key"),
        (
            ("keys", "list"),
            KEYS["alice"],
            "llm-proxy keys list: {url} answered 403 (admin_key_required): This key may not use the admin API.",
        ),
    ):
        result = cli(server, *argv, admin_key=admin_key)
        assert (result.returncode, result.stdout, result.stderr) == (1, "", line.format(url=server.url) + "\n")


def test_an_expired_key_is_refused(server):
    expires = datetime.now(UTC) + timedelta(seconds=1.5)
    made = admin(
        server, "POST", "/admin/keys", json={"name": "temp", "team": "platform", "expires_at": expires.isoformat()}
    )
    assert made.status_code == 201, made.text
    secret = made.json()["key"]
    assert chat(server, secret).status_code == 200
    time.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()) + 0.05)
    assert error_of(chat(server, secret)) == (401, "invalid_request_error", "invalid_api_key")


# -- the queue's settings on runtime keys and teams ------------------------------------------------
SLOW_STREAM = {"chunk_delay_s": 0.25}  # ten words (max_tokens 10): two seconds and more, holding the slot


def in_background(send) -> tuple[threading.Thread, list]:
    """`send()` in a thread; the list gets its response (or exception)."""
    result: list = []

    def run() -> None:
        try:
            result.append(send())
        except BaseException as exc:  # handed to the test
            result.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def until(condition, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def said(content: str) -> dict:
    return {**CHAT, "messages": [{"role": "user", "content": content}]}


def contents(mock) -> list[str]:
    return [request["body"]["messages"][0]["content"] for request in mock.requests]


def test_runtime_keys_and_teams_take_the_queue_settings(server, mock_upstream):
    """A runtime team's `limits.max_wait_ms`, `share` and `max_queue` and a runtime key's `priority`
    and `limits.max_wait_ms` are stored, shown and applied: waiters wait for the team's one parallel
    slot and are served by class, and the queue is bounded by the team's `max_queue`."""
    team = {"name": "lab", "limits": {"max_parallel": 1, "max_wait_ms": 6000}, "share": 2, "max_queue": 5}
    assert admin(server, "POST", "/admin/teams", json=team).status_code == 201
    secrets = {}
    for name, extra in (("holder", {}), ("batch", {"priority": "low"}), ("ci", {"priority": "high"})):
        created = admin(server, "POST", "/admin/keys", json={"name": name, "team": "lab", **extra})
        assert created.status_code == 201, created.text
        secrets[name] = created.json()["key"]
    assert admin(server, "PATCH", "/admin/keys/ci", json={"priority": "normal"}).json()["priority"] == "normal"
    shown_team = admin(server, "GET", "/admin/teams/lab").json()
    assert (shown_team["share"], shown_team["max_queue"], shown_team["limits"]["max_wait_ms"]) == (2, 5, 6000)
    shown_keys = admin(server, "GET", "/admin/keys").json()["keys"]
    assert [shown_keys[n]["priority"] for n in ("holder", "batch", "ci")] == ["normal", "low", "normal"]
    assert shown_keys["alice"]["priority"] == "normal"  # config keys show theirs too
    caller = RuntimeKeys(server.app.state.registry_cache).caller(
        sha256_hex(secrets["batch"]), server.app.state.snapshots.config
    )
    assert (caller.key.priority, caller.team.share, caller.team.max_queue) == ("low", 2, 5)

    # the team's wait: batch (low) comes first, ci (normal) second; ci is served first
    queue = server.app.state.queue
    mock_upstream.add_faults([SLOW_STREAM])
    holder, held = in_background(lambda: chat(server, secrets["holder"], said("holder") | {"stream": True}))
    until(lambda: len(mock_upstream.requests) == 1, "the holder to reach the upstream")
    waiters = []
    for count, name in enumerate(("batch", "ci"), start=1):
        waiters.append(in_background(lambda n=name: chat(server, secrets[n], said(n))))
        until(lambda c=count: queue.depth("lab") == c, f"{name} to wait")
    for thread, result in (*waiters, (holder, held)):
        thread.join(15)
        assert result[0].status_code == 200, result[0]
    assert contents(mock_upstream) == ["holder", "ci", "batch"]

    # the key's own wait, and the team's max_queue: the team no longer waits and holds one waiter
    patched = admin(server, "PATCH", "/admin/teams/lab", json={"limits": {"max_parallel": 1}, "max_queue": 1})
    assert (patched.status_code, patched.json()["max_queue"]) == (200, 1)
    assert admin(server, "PATCH", "/admin/keys/ci", json={"limits": {"max_wait_ms": 6000}}).status_code == 200
    mock_upstream.clear()
    mock_upstream.add_faults([SLOW_STREAM])
    holder, held = in_background(lambda: chat(server, secrets["holder"], said("holder") | {"stream": True}))
    until(lambda: len(mock_upstream.requests) == 1, "the holder to reach the upstream")
    started = time.monotonic()
    assert error_of(chat(server, secrets["batch"])) == (429, "parallel_requests", "rate_limit_exceeded")
    waiter, waited = in_background(lambda: chat(server, secrets["ci"], said("ci")))
    until(lambda: queue.depth("lab") == 1, "ci to wait")
    full = chat(server, secrets["ci"], said("overflow"))
    assert error_of(full) == (429, "parallel_requests", "rate_limit_exceeded")  # max_queue 1: at once
    assert time.monotonic() - started < 1.5, "a refusal waited"  # the holder streams for 2.5 s
    for thread, result in ((waiter, waited), (holder, held)):
        thread.join(15)
        assert result[0].status_code == 200, result[0]
    assert contents(mock_upstream) == ["holder", "ci"]


@pytest.mark.parametrize(
    ("method", "path", "body", "param"),
    [
        ("POST", "/admin/keys", {"name": "k", "team": "platform", "priority": "urgent"}, "priority"),
        ("POST", "/admin/keys", {"name": "k", "team": "platform", "limits": {"max_wait_ms": -1}}, "limits.max_wait_ms"),
        (
            "POST",
            "/admin/keys",
            {"name": "k", "team": "platform", "limits": {"max_wait_ms": 10**9}},
            "limits.max_wait_ms",
        ),
        ("PATCH", "/admin/keys/k0", {"priority": None}, "priority"),
        ("PATCH", "/admin/keys/k0", {"limits": None}, "limits"),
        ("POST", "/admin/teams", {"name": "t", "share": 0}, "share"),
        ("POST", "/admin/teams", {"name": "t", "max_queue": -1}, "max_queue"),
        ("POST", "/admin/teams", {"name": "t", "max_queue": 1.5}, "max_queue"),
        ("PATCH", "/admin/teams/t0", {"share": None}, "share"),
        ("PATCH", "/admin/teams/t0", {"share": -2}, "share"),
    ],
)
def test_bad_queue_settings_are_400_naming_the_field(server, method, path, body, param):
    admin(server, "POST", "/admin/teams", json={"name": "t0"})
    admin(server, "POST", "/admin/keys", json={"name": "k0", "team": "t0"})
    refused = admin(server, method, path, json=body)
    assert error_of(refused)[:2] == (400, "invalid_request_error"), refused.text
    assert refused.json()["error"]["param"] == param
    assert admin(server, "GET", "/admin/keys/k0").json()["priority"] == "normal"  # nothing changed


def test_queue_settings_are_audited(server):
    admin(server, "POST", "/admin/teams", json={"name": "lab", "share": 3, "max_queue": 7})
    admin(server, "PATCH", "/admin/teams/lab", json={"share": 0.5})
    admin(server, "POST", "/admin/keys", json={"name": "k", "team": "lab", "priority": "high"})
    admin(server, "PATCH", "/admin/keys/k", json={"priority": "low", "limits": {"max_wait_ms": 2000}})
    records = list(reversed(admin(server, "GET", "/admin/audit").json()["data"]))
    assert (records[0]["changes"]["share"], records[0]["changes"]["max_queue"]) == (3, 7)
    assert records[1]["changes"] == {"share": 0.5}
    assert records[2]["changes"]["priority"] == "high"
    assert records[3]["changes"]["priority"] == "low"
    assert records[3]["changes"]["limits"]["max_wait_ms"] == 2000
