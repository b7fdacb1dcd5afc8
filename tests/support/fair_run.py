"""A saturated run of several teams on one upstream quota through several replicas, for the fair
shares test (tests/test_fair_shares.py) and its longer benchmark (bench/fair_shares.py).

Every team sends the same request (so its admitted tokens are its admitted requests times one
reservation) from `clients` clients per replica, each sending again as soon as it is answered, for
as long as its team is active. The quota's token bucket starts empty (written in Redis at Redis'
own time), so the run is contended from its first request instead of after a minute's burst.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import httpx
import redis

from proxy.limits.layout import Layout
from proxy.limits.types import QuotaLimits
from proxy.request.authenticate import sha256_hex
from tests.support.configs import config_dict, exact_store

CHAT = {"model": "chat-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


def key_of(team: str) -> str:
    return f"sk-proxy-{team}-fair-share"


def fair_config(upstream_url: str, redis_url: str, shares: Mapping[str, float], tpm: int, max_wait_ms: int) -> dict:
    """One model on one upstream whose account quota is `tpm`; a team per share, one key each, whose
    requests may wait `max_wait_ms` in the queue."""
    data = exact_store(config_dict(upstream_url, redis_url=redis_url))
    data["shutdown_grace_s"] = 1
    data["upstreams"]["mock"] |= {"limits": {"tpm": tpm}, "max_retries": 0}
    data["teams"] = {team: {"limits": {}, "share": share} for team, share in shares.items()}
    data["keys"] = {
        f"key-{team}": {"team": team, "key_sha256": sha256_hex(key_of(team)), "limits": {"max_wait_ms": max_wait_ms}}
        for team in shares
    }
    return data


def empty_quota(redis_url: str, upstream: str = "mock") -> None:
    """The upstream's token bucket at level 0 now (by Redis' clock, the one the script reads)."""
    client = redis.Redis.from_url(redis_url)
    try:
        seconds, micros = client.time()
        key = Layout().quota(QuotaLimits(upstream)) + ":tk"
        client.hset(key, mapping={"l": 0, "t": seconds * 1000 + micros // 1000})
        client.pexpire(key, 120_000)
    finally:
        client.close()


@dataclass
class Run:
    """When each team's requests were answered 200 (monotonic seconds from the start) and how
    many other answers it had, by status."""

    admitted: dict[str, list[float]] = field(default_factory=dict)
    others: dict[int, int] = field(default_factory=dict)
    waited: dict[str, list[float]] = field(default_factory=dict)  # each 200's time to answer (its queue wait)

    def count(self, team: str, start_s: float, end_s: float) -> int:
        return sum(1 for t in self.admitted.get(team, []) if start_s <= t < end_s)

    def shares(self, teams: list[str], start_s: float, end_s: float) -> dict[str, float]:
        counts = {team: self.count(team, start_s, end_s) for team in teams}
        total = sum(counts.values()) or 1
        return {team: counts[team] / total for team in teams}


async def saturate(urls: list[str], active: Mapping[str, float], clients: int) -> Run:
    """`clients` clients per replica and team, each sending until its team's `active` time ends."""
    run = Run(admitted={team: [] for team in active}, waited={team: [] for team in active})
    https = [httpx.AsyncClient(base_url=url, timeout=30, limits=httpx.Limits(max_connections=200)) for url in urls]
    started = time.monotonic()

    async def client(http: httpx.AsyncClient, team: str, until_s: float) -> None:
        headers = {"Authorization": f"Bearer {key_of(team)}"}
        while (sent := time.monotonic()) - started < until_s:
            response = await http.post("/v1/chat/completions", json=CHAT, headers=headers)
            if response.status_code == 200:
                answered = time.monotonic()
                run.admitted[team].append(answered - started)
                run.waited[team].append(answered - sent)
                continue
            run.others[response.status_code] = run.others.get(response.status_code, 0) + 1
            if response.status_code != 429:
                raise AssertionError(f"{response.status_code}: {response.text}")
            await asyncio.sleep(int(response.headers.get("retry-after-ms", "100")) / 1000)

    try:
        await asyncio.gather(
            *(client(http, team, until) for http in https for team, until in active.items() for _ in range(clients))
        )
    finally:
        for http in https:
            await http.aclose()
    return run
