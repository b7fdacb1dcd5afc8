"""Upstream quotas end to end: three real `llm-proxy serve` replicas on one real Redis, clients of
several teams hammering one model with two targets, each target a mock upstream (its own process)
with a quota of its own that answers 429 past it.

With the proxy's upstream quotas configured equal to the mocks' (requests per minute; the mocks'
window is a fixed minute, and the proxy's buckets refill one request every 60/N s, longer than the
run: a client stops at its first refusal), the mocks never answer 429, the first target takes
exactly its quota and the traffic beyond it goes to the second, which takes exactly its own; then
the proxy refuses, in OpenAI's shape, with the retry-after of the quota that frees first.
"""

from __future__ import annotations

import asyncio
import math
import re
import time

import httpx
import pytest

from proxy.request.authenticate import sha256_hex
from tests.support.configs import config_dict, exact_store
from tests.support.processes import MockProcess, start_all, start_proxies, stop_all, write_config

REPLICAS = 3
TEAMS = 4
CLIENTS = 24
FIRST_RPM, SECOND_RPM = 10, 5  # a request back every 6 s and 12 s: longer than the run
CHAT = {"model": "chat-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}


def key_of(i: int) -> str:
    return f"sk-proxy-team{i}-quota-test"


@pytest.fixture
def mocks(tmp_path):
    started = [MockProcess(workdir=tmp_path / name) for name in ("first", "second")]
    start_all(started)
    yield started
    stop_all(started)


def quota_config(first: MockProcess, second: MockProcess, redis_url: str) -> dict:
    data = exact_store(config_dict(first.base_url, redis_url=redis_url, second_upstream=second.base_url))
    data["shutdown_grace_s"] = 1
    # following the provider off: the mocks' last answers show 0 requests left until their window
    # ends, and a replica that saw one would refuse by its hold (reason `upstream` too) instead
    # and no retries: a 429 (there should be none) goes on to the next target at once
    data["upstreams"]["mock"] |= {"limits": {"rpm": FIRST_RPM}, "max_hold_s": 0, "max_retries": 0}
    data["upstreams"]["backup"] |= {"limits": {"rpm": SECOND_RPM}, "max_hold_s": 0}
    data["teams"] = {f"team{i}": {"limits": {}} for i in range(TEAMS)}
    data["keys"] = {f"key{i}": {"team": f"team{i}", "key_sha256": sha256_hex(key_of(i))} for i in range(TEAMS)}
    return data


async def hammer(urls: list[str], run_s: float | None = None) -> tuple[list[httpx.Response], float]:
    """CLIENTS clients over the replicas and teams. Without `run_s`, each sends until the proxy first
    refuses it; with it, each sends for `run_s` seconds, a refused one waiting its retry-after (at
    most 0.1 s) before the next request. Returns the answers and the seconds the run took."""
    answers: list[httpx.Response] = []
    clients = [httpx.AsyncClient(base_url=url, timeout=10) for url in urls]
    go = asyncio.Event()

    async def client(i: int) -> None:
        http = clients[i % REPLICAS]
        (await http.get("/healthz")).raise_for_status()
        await go.wait()
        headers = {"Authorization": f"Bearer {key_of(i % TEAMS)}"}
        deadline = time.monotonic() + (run_s if run_s is not None else math.inf)
        while time.monotonic() < deadline:
            response = await http.post("/v1/chat/completions", json=CHAT, headers=headers)
            answers.append(response)
            if response.status_code != 200:
                if run_s is None:
                    return
                await asyncio.sleep(min(0.1, int(response.headers.get("retry-after-ms", "100")) / 1000))

    tasks = [asyncio.create_task(client(i)) for i in range(CLIENTS)]
    await asyncio.sleep(0.5)  # every client has warmed its connection
    started = time.perf_counter()
    go.set()
    try:
        await asyncio.gather(*tasks)
    finally:
        for http in clients:
            await http.aclose()
    return answers, time.perf_counter() - started


def test_the_mocks_never_answer_429_and_each_target_takes_exactly_its_quota(mocks, redis_url, tmp_path):
    first, second = mocks
    for mock, rpm in ((first, FIRST_RPM), (second, SECOND_RPM)):
        httpx.post(mock.url + "/_mock/quota", json={"requests": rpm, "window_s": 60}).raise_for_status()
    config = write_config(tmp_path / "config.yaml", quota_config(first, second, redis_url))
    replicas = start_proxies(config, REPLICAS)
    try:
        answers, elapsed_s = asyncio.run(hammer([r.url for r in replicas]))
        metrics = [httpx.get(r.url + "/metrics").text for r in replicas]
    finally:
        stop_all(replicas)
    for process in replicas:
        assert "Traceback" not in process.output(), process.output()
    assert elapsed_s < 60 / FIRST_RPM, f"the run took {elapsed_s:.1f}s: the buckets refilled, the bound moved"

    served = [a.json()["model"] for a in answers if a.status_code == 200]
    refused = [a for a in answers if a.status_code != 200]
    print(f"\n{len(served)} admitted, {len(refused)} refused in {elapsed_s:.2f}s")
    assert (first.stats()["rate_limited"], second.stats()["rate_limited"]) == (0, 0)
    assert (first.stats()["requests"], second.stats()["requests"]) == (FIRST_RPM, SECOND_RPM)
    # the first target's quota, then the second's
    assert (served.count("gpt-4o-mini"), served.count("gpt-4o")) == (FIRST_RPM, SECOND_RPM)
    assert len(refused) == CLIENTS  # each client's last answer
    for answer in refused:
        assert answer.status_code == 429
        error = answer.json()["error"]
        assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
        assert error["message"].startswith(
            "Rate limit reached for the upstream quota of 'mock' (model 'gpt-4o-mini') (and every other target"
        )
        # the first target frees first (a request every 6 s): the retry-after is its wait, not the second's
        assert 0 < int(answer.headers["retry-after-ms"]) <= 60_000 // FIRST_RPM
    rejected = sum(_sample(text, "llm_proxy_rejections_total{", 'reason="upstream"') for text in metrics)
    assert rejected == CLIENTS
    left = [_sample(text, "llm_proxy_upstream_quota_remaining{", 'upstream="backup"') for text in metrics]
    assert min(left) == 0  # the replica that admitted or refused last saw the second target's quota empty


def _sample(exposition: str, metric: str, label: str) -> float:
    """The sum of `metric`'s samples carrying `label`."""
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in exposition.splitlines() if line.startswith(metric) and label in line
    )


# Tokens per minute: the mock's token quota is a bucket like the proxy's (a minute's worth, refilled
# continuously), counting the usage it reports (prompt 1 + completion 10 here), while the proxy
# reserves its prompt estimate (8) + max_tokens and gives back the difference at settlement: its
# bucket never holds more than the mock's, so clients that keep sending past the quota for a few
# seconds meet the proxy's 429, never the mock's. The request quota is far from binding.
MOCK_TPM, MOCK_RPM = 600, 1000
TOKEN_RUN_S = 4.0
# the quota's refusal, or (with fair shares between teams) its refusal of a team past its share
QUOTA_REFUSAL = re.compile(
    r"Rate limit reached for the upstream quota of 'mock' \(model 'gpt-4o-mini'\)"
    r"( on tokens per minute|: other teams are waiting for it and team 'team\d' has had its share for now)\. "
    r"Please try again in .+\."
)


def run_past_the_token_quota(mock: MockProcess, redis_url: str, tmp_path, proxy_tpm: int) -> tuple[list, list[str]]:
    quota = {"requests": MOCK_RPM, "tokens": MOCK_TPM, "window_s": 60}
    httpx.post(mock.url + "/_mock/quota", json=quota).raise_for_status()
    data = exact_store(config_dict(mock.base_url, redis_url=redis_url))
    data["shutdown_grace_s"] = 1
    # following the provider off, so that a refusal here is the quota's own; no retries
    data["upstreams"]["mock"] |= {"limits": {"rpm": MOCK_RPM, "tpm": proxy_tpm}, "max_hold_s": 0, "max_retries": 0}
    data["teams"] = {f"team{i}": {"limits": {}} for i in range(TEAMS)}
    data["keys"] = {f"key{i}": {"team": f"team{i}", "key_sha256": sha256_hex(key_of(i))} for i in range(TEAMS)}
    replicas = start_proxies(write_config(tmp_path / "config.yaml", data), REPLICAS)
    try:
        answers, _ = asyncio.run(hammer([r.url for r in replicas], TOKEN_RUN_S))
        metrics = [httpx.get(r.url + "/metrics").text for r in replicas]
    finally:
        stop_all(replicas)
    for process in replicas:
        assert "Traceback" not in process.output(), process.output()
    return answers, metrics


def test_with_the_mocks_token_quota_the_proxy_refuses_and_the_mock_never_answers_429(
    own_mock_process, redis_url, tmp_path
):
    answers, metrics = run_past_the_token_quota(own_mock_process, redis_url, tmp_path, proxy_tpm=MOCK_TPM)
    stats = own_mock_process.stats()
    served = [a for a in answers if a.status_code == 200]
    refused = [a for a in answers if a.status_code != 200]
    used = stats["prompt_tokens"] + stats["completion_tokens"]
    print(f"\n{len(served)} served ({used} tokens at the mock), {len(refused)} refused by the proxy")
    assert stats["rate_limited"] == 0
    assert used >= MOCK_TPM and refused, "the clients did not get past the quota"
    for answer in refused:
        assert answer.status_code == 429
        error = answer.json()["error"]
        assert (error["type"], error["code"]) == ("tokens", "rate_limit_exceeded"), error
        assert QUOTA_REFUSAL.fullmatch(error["message"]), error["message"]
        assert int(answer.headers["retry-after-ms"]) > 0
    assert sum(_sample(text, "llm_proxy_rejections_total{", 'reason="upstream"') for text in metrics) == len(refused)
