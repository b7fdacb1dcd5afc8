"""Every window of every scope holds across replicas: three `llm-proxy serve` processes on one
real Redis, 100 concurrent streaming clients (the OpenAI SDK), a small budget on one scope and
window: an end user's day budget from the team default (end users racing on it), a key's week, a
team's month, the org's month across two teams. Clients stream until the budget refuses them, then
one client spends what is left, so the test ends with the budget used up whatever the machine's
speed. Recorded spend, read from the window's own record in Redis, ends at or under the budget and
equals what the ledger booked. (A week's and a month's boundary follow Redis time, which a serve
process cannot set: tests/test_store_conformance.py crosses them on a settable clock.)"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC

import httpx2
import openai
import pytest
import redis

from proxy.budgets.refusal import budget_refusal
from proxy.budgets.windows import Window, window_at
from tests.support.configs import ADMIN_KEY, KEYS, config_dict, exact_store
from tests.support.processes import MockProcess, start_proxies, stop_all, write_config

CLIENTS = 100
BUDGET_USD, BUDGET_MICROS = "0.001", 1000
END_USER_USD, END_USER_MICROS = "0.0003", 300
END_USERS = 4
RESERVED_MICROS = 14  # ceil(8 estimated prompt tokens × $0.27 + 10 × $1.10 per Mtok)
RUN_S = 30.0
DRAIN_MAX = 100  # the most one client may spend of what the racing left (a handful at most)
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
def mock(tmp_path):
    process = MockProcess(chunk_delay_s=0.01, workdir=tmp_path).start().wait_ready()
    yield process
    process.stop()


def sdk(url: str, key: str) -> openai.AsyncOpenAI:
    # pooled connections expire before the server's 5 s keep-alive timeout (the SDK's also expire at
    # 5 s): one the server closes just as it is reused fails with a ReadError (it did, under load)
    limits = httpx2.Limits(max_connections=1000, max_keepalive_connections=100, keepalive_expiry=2)
    http = openai.DefaultAsyncHttpxClient(limits=limits)
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEYS[key], max_retries=0, timeout=20, http_client=http)


async def stream_once(client: openai.AsyncOpenAI, user: str | None) -> bool:
    """One streamed call to the end; False when the budget refused it (and says not to retry)."""
    extra = {"user": user} if user else {}
    try:
        stream = await client.chat.completions.create(
            model="chat-model", messages=MESSAGES, max_tokens=10, stream=True, **extra
        )
        async for _ in stream:
            pass
        return True
    except openai.RateLimitError as refused:
        assert refused.code == "insufficient_quota", refused.body
        assert refused.response.headers["x-should-retry"] == "false"
        return False


async def race(urls: list[str], keys: list[str], users: list[str | None]) -> tuple[int, list[str]]:
    """100 clients stream until refused; then one client spends what is left. Returns the
    admitted count and the refusal messages."""
    clients = [sdk(url, key) for url in urls for key in keys]
    messages: list[str] = []
    deadline = time.monotonic() + RUN_S

    async def client_loop(i: int) -> int:
        client, user, admitted = clients[i % len(clients)], users[i % len(users)], 0
        while time.monotonic() < deadline:
            if not await stream_once(client, user):
                break
            admitted += 1
        return admitted

    admitted = sum(await asyncio.gather(*(client_loop(i) for i in range(CLIENTS))))
    for i, user in enumerate(users):  # every hold released now: spend what is left, to the last refusal
        client = clients[i % len(clients)]
        for _ in range(DRAIN_MAX):
            if not await stream_once(client, user):
                break
            admitted += 1
        try:
            await client.chat.completions.create(model="chat-model", messages=MESSAGES, max_tokens=10, user=user or "")
        except openai.RateLimitError as refused:
            messages.append(str(refused.body["message"]))  # type: ignore[index]
    for client in clients:
        await client.close()
    return admitted, messages


def window_record(redis_url: str, key: str, deadline_s: float = 10.0) -> tuple[int, int]:
    """(spent, held) of a window budget once nothing is held any more (every stream settled)."""
    client = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + deadline_s
    while True:
        spent, held = (int(v or 0) for v in client.hmget(key, "spent", "held"))
        if held == 0 or time.monotonic() > deadline:
            return spent, held


def ledger_spend(url: str, team: str) -> int:
    import httpx

    report = httpx.get(url + "/admin/usage", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()
    return int(report["teams"][team]["spend_micros"])


def label(window: Window) -> str:
    return window_at(window, UTC, time.time()).label  # type: ignore[arg-type]


CASES = {
    # scope: (where the budget goes, the keys racing, the teams booked, the window records)
    "end_user": ("day", ["alice", "bob"], ["platform"]),
    "key_week": ("week", ["alice"], ["platform"]),
    "team_month": ("month", ["alice", "bob"], ["platform"]),
    "org_month": ("month", ["alice", "carol"], ["platform", "research"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_window_of_every_scope_ends_at_or_under_its_budget(case, mock, tmp_path, redis_url):
    window, keys, teams = CASES[case]
    data = exact_store(config_dict(mock.base_url, redis_url=redis_url))
    data.update(log_level="warning", shutdown_grace_s=1)
    budget = [{"window": window, "usd": BUDGET_USD}]
    users: list[str | None] = [None]
    prefix = "llmrl"
    if case == "end_user":
        data["teams"]["platform"]["end_users"] = {"budgets": [{"window": "day", "usd": END_USER_USD}]}
        users = [f"user-{i}" for i in range(END_USERS)]
        records = [f"{prefix}:{{platform}}:u:{user}:w:{label('day')}" for user in users]
    elif case == "key_week":
        data["keys"]["alice"]["budgets"] = budget
        records = [f"{prefix}:{{platform}}:k:alice:w:{label('week')}"]
    elif case == "team_month":
        data["teams"]["platform"]["budgets"] = budget
        records = [f"{prefix}:{{platform}}:t:w:{label('month')}"]
    else:
        data["org"] = {"budgets": budget}
        records = [f"{prefix}:{{org}}:w:{label('month')}"]
    limit = END_USER_MICROS if case == "end_user" else BUDGET_MICROS
    replicas = start_proxies(write_config(tmp_path / "config.yaml", data), 3)
    try:
        admitted, messages = asyncio.run(race([r.url for r in replicas], keys, users))
        spent = [window_record(redis_url, record) for record in records]
        booked = sum(ledger_spend(replicas[0].url, team) for team in teams)
        print(f"{case}: {admitted} streams admitted, window spend {spent}, ledger {booked} µ$")
        for record_spent, held in spent:
            assert held == 0
            assert limit - RESERVED_MICROS < record_spent <= limit  # used up, never past
        assert sum(record_spent for record_spent, _ in spent) == booked
        kind = {"end_user": "end_user", "key_week": "key", "team_month": "team", "org_month": "org"}[case]
        names = {"end_user": users, "key_week": ["alice"], "team_month": ["platform"], "org_month": [""]}[case]
        resets_at = window_at(window, UTC, time.time()).end  # type: ignore[arg-type]
        assert messages == [
            budget_refusal(kind, str(name), record_spent, limit, window, resets_at)  # type: ignore[arg-type]
            for name, (record_spent, _) in zip(names, spent, strict=True)
        ]
    finally:
        stop_all(replicas)
