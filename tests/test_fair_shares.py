"""Fair shares of a contended upstream quota (issue 16): three teams with shares 1:2:3 saturate one
upstream's tokens-per-minute quota through three real `llm-proxy serve` replicas on one real Redis,
their requests waiting in each replica's queue (max_wait_ms). Each team's admitted tokens are its
share's fraction of the quota within 10%; when the largest team goes idle, the other two split the
whole quota by their shares (work-conserving) within seconds. The longer run of the criterion (60 s)
is bench/fair_shares.py.
"""

from __future__ import annotations

import asyncio

from tests.support.fair_run import empty_quota, fair_config, saturate
from tests.support.processes import start_proxies, stop_all, write_config

REPLICAS = 3
SHARES = {"small": 1.0, "middle": 2.0, "large": 3.0}
TPM = 18_000  # about 20 requests a second of this test's size: the run is contended from its start
CLIENTS = 3  # per replica and team
ALL_S, ALONE_S = 10.0, 18.0  # every team sends until ALL_S; small and middle until ALONE_S


def within(measured: dict[str, float], weights: dict[str, float], tolerance: float = 0.10) -> bool:
    total = sum(weights.values())
    return all(abs(measured[team] - w / total) <= tolerance * w / total for team, w in weights.items())


def test_teams_get_their_weighted_share_and_split_an_idle_teams_share(own_mock_process, redis_url, tmp_path):
    config = write_config(
        tmp_path / "config.yaml", fair_config(own_mock_process.base_url, redis_url, SHARES, TPM, 2000)
    )
    replicas = start_proxies(config, REPLICAS)
    try:
        empty_quota(redis_url)
        run = asyncio.run(
            saturate([r.url for r in replicas], {"small": ALONE_S, "middle": ALONE_S, "large": ALL_S}, CLIENTS)
        )
    finally:
        stop_all(replicas)
    for process in replicas:
        assert "Traceback" not in process.output(), process.output()
    assert own_mock_process.stats()["rate_limited"] == 0

    together = run.shares(list(SHARES), 2.0, ALL_S)
    counts = {team: run.count(team, 2.0, ALL_S) for team in SHARES}
    # the large team's last waiters leave the queue (max_wait_ms 2 s), then its want of the quota lapses
    alone = run.shares(["small", "middle"], ALL_S + 3.0, ALONE_S)
    alone_counts = {team: run.count(team, ALL_S + 3.0, ALONE_S) for team in ("small", "middle")}
    print(f"\nall three, 2-{ALL_S:.0f} s: {counts} -> {together}; refusals {run.others}")
    print(f"without large, {ALL_S + 3:.0f}-{ALONE_S:.0f} s: {alone_counts} -> {alone}")
    assert sum(counts.values()) >= 100, "too few admissions to judge"
    assert within(together, SHARES), together
    assert within(alone, {"small": 1.0, "middle": 2.0}), alone
    # work-conserving: the two take the whole quota, not their old shares of it
    rate_together = sum(counts.values()) / (ALL_S - 2.0)
    rate_alone = sum(alone_counts.values()) / (ALONE_S - ALL_S - 3.0)
    assert rate_alone >= 0.85 * rate_together, (rate_together, rate_alone)
