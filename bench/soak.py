"""Soak: a long run of mixed traffic through one proxy; does anything grow that should not?

    python bench/soak.py                                  # 200,000 requests, 48 concurrent
    python bench/soak.py --requests 40000 --concurrency 32 --json soak.json

Starts redis-server, the package's mock upstream (`python -m proxy.mock_upstream`, whose
`x-mock-fault` header injects failures) and `llm-proxy serve` with Redis limits and budgets, as
bench/run.py does. An asyncio client with keep-alive sends the mix in KINDS: plain and streamed
calls (some asking for usage), upstream 503s (retried once, then 502), streams the upstream cuts,
clients that leave mid-stream, a key with a tight rpm (429 rate_limit_exceeded) and a key with a
one-cent daily budget (429 insufficient_quota). Every `--every` requests it prints the status
histogram, the proxy's RSS and open fds, Redis DBSIZE and used_memory and the request rate.

At the end: RSS growth after warm-up (from the first checkpoint to the last) against 20 MB; every
Redis key by kind, against the bound the TTLs allow. Settled-request markers
(`llmrl:{team}:d:<request id>`, proxy/limits/layout.py DONE_TTL_S = 15 minutes) are one key per
admitted request, so the key count grows with traffic for 15 minutes before it levels off at
about rate x 900 keys; the bound and the growth per request are printed, not hidden. Leak checks: parallel leases,
reservations and budget holds still present after the last request settled (expected: none).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
import redis

from proxy.limits.layout import DONE_TTL_S  # how long a settled marker lives
from run import CHAT, Stack, cpu_seconds, open_fds, proxy_config, rss_mb

RSS_GROWTH_LIMIT_MB = 20.0
TIGHT_RPM = 600
PENNY_BUDGET_USD = "0.01"
NORMAL_KEYS = ("alpha", "beta", "gamma")
CLIENT_TIMEOUT_S = 60
SETTLE_WAIT_S = 3.0  # after the last response, for streams' settlements to land
DAY_CANDIDATES = 3  # near midnight an admit touches three budget days (proxy/limits/limiter.py)
SAMPLE_KEYS = 200  # MEMORY USAGE is asked of this many settled markers


@dataclass(frozen=True)
class Kind:
    name: str
    weight: float
    key: str  # "normal" (alpha, beta, gamma in turn), "tight" or "penny"
    expect: frozenset[str]
    stream: bool = False
    include_usage: bool = False
    fault: dict | None = None
    leave_after: int | None = None  # the client closes the connection after this many events


KINDS = (
    Kind("plain", 55, "normal", frozenset({"200"})),
    Kind("stream", 13, "normal", frozenset({"200 stream"}), stream=True),
    Kind("stream+usage", 12, "normal", frozenset({"200 stream+usage"}), stream=True, include_usage=True),
    Kind("upstream-503", 5, "normal", frozenset({"502 upstream_error"}), fault={"status": 503, "retry_after_ms": "5"}),
    Kind(
        "upstream-cut",
        2.5,
        "normal",
        frozenset({"200 stream, error event"}),
        stream=True,
        fault={"cut_after_chunks": 8},
    ),
    Kind(
        "client-leaves",
        2.5,
        "normal",
        frozenset({"client left"}),
        stream=True,
        leave_after=4,
        fault={"chunk_delay_s": 0.02},
    ),  # slow enough that the proxy is still relaying when the client goes
    Kind("tight-rpm", 5, "tight", frozenset({"200", "429 rate_limit_exceeded"})),
    Kind("penny-budget", 5, "penny", frozenset({"200 stream", "429 insufficient_quota"}), stream=True),
)


def soak_config(upstream_port: int, redis_url: str, log_level: str) -> dict:
    """bench/run.py's config, retried once, with five keys in two teams."""
    config = proxy_config(upstream_port, redis_url, log_level)
    config["upstreams"]["fake"].update(max_retries=1, max_connections=200, timeout_s=30)
    roomy = {"rpm": 10_000_000, "tpm": 10_000_000_000, "max_parallel": 1_000}
    config["teams"] = {
        "soak": {"daily_budget_usd": 1_000_000, "limits": roomy},
        "frugal": {"daily_budget_usd": 1_000, "limits": roomy},
    }
    keys = {
        name: {"team": "soak", "key": f"sk-soak-{name}", "daily_budget_usd": 1_000_000, "limits": roomy}
        for name in NORMAL_KEYS
    }
    keys["tight"] = {"team": "soak", "key": "sk-soak-tight", "limits": dict(roomy, rpm=TIGHT_RPM)}
    keys["penny"] = {"team": "frugal", "key": "sk-soak-penny", "daily_budget_usd": PENNY_BUDGET_USD, "limits": roomy}
    config["keys"] = keys
    return config


# -- one request ------------------------------------------------------------------------------------


def classify_stream(body: bytes) -> str:
    events = [line[6:] for line in body.split(b"\n") if line.startswith(b"data: ")]
    done = bool(events) and events[-1] == b"[DONE]"
    if any(b'"error"' in event for event in events):
        return "200 stream, error event" + (" + [DONE]" if done else "")
    if not done:
        return "200 stream without [DONE]"
    if any(b'"usage":{' in event for event in events):
        return "200 stream+usage"
    return "200 stream"


async def error_outcome(response: aiohttp.ClientResponse) -> str:
    try:
        error = json.loads(await response.read())["error"]
        return f"{response.status} {error.get('code') or error.get('type')}"
    except (ValueError, KeyError, TypeError):
        return f"{response.status} (not OpenAI's error shape)"


async def one_request(session: aiohttp.ClientSession, url: str, kind: Kind, key: str, body: bytes) -> str:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    if kind.fault is not None:
        headers["x-mock-fault"] = json.dumps(kind.fault)
    try:
        async with session.post(url, data=body, headers=headers) as response:
            if response.status != 200:
                return await error_outcome(response)
            if kind.leave_after is not None:
                seen = 0
                async for line in response.content:
                    seen += line.startswith(b"data: ")
                    if seen >= kind.leave_after:
                        response.close()  # drop the connection mid-stream
                        return "client left"
                return "client meant to leave, but the stream ended first"
            payload = await response.read()
            if kind.stream:
                return classify_stream(payload)
            return "200" if b'"choices"' in payload else "200 without choices"
    except (TimeoutError, aiohttp.ClientError) as exc:
        return f"client error {type(exc).__name__}"


# -- what is watched --------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    requests: int
    elapsed_s: float
    rps: float
    cpu_ms_per_request: float  # the proxy's, over the window since the previous checkpoint
    rss_mb: float
    fds: int
    redis_keys: int
    redis_used_mb: float
    statuses: dict = field(default_factory=dict)


class Watch:
    def __init__(self, stack: Stack, client: redis.Redis):
        self.stack, self.redis = stack, client
        self.started = time.monotonic()
        self.last = (0, self.started, cpu_seconds(stack.proxy.pid))
        self.points: list[Checkpoint] = []

    def sample(self, requests: int, statuses: Counter) -> Checkpoint:
        now = time.monotonic()
        pid = self.stack.proxy.pid
        done_before, at, cpu_before = self.last
        cpu = cpu_seconds(pid)
        self.last = (requests, now, cpu)
        point = Checkpoint(
            requests,
            round(now - self.started, 1),
            round((requests - done_before) / max(1e-9, now - at), 1),
            round((cpu - cpu_before) * 1000 / max(1, requests - done_before), 3),
            round(rss_mb(pid), 1),
            open_fds(pid),
            self.redis.dbsize(),
            round(self.redis.info("memory")["used_memory"] / 2**20, 2),
            dict(statuses),
        )
        self.points.append(point)
        print(
            f"{point.requests:>8} {point.elapsed_s:>8.1f} {point.rps:>7.0f} {point.cpu_ms_per_request:>7.2f} "
            f"{point.rss_mb:>7.1f} {point.fds:>5} "
            f"{point.redis_keys:>10} {point.redis_used_mb:>9.2f}",
            flush=True,
        )
        if statuses:
            print("         " + ", ".join(f"{name}: {count}" for name, count in sorted(statuses.items())), flush=True)
        return point


# -- the run ----------------------------------------------------------------------------------------


async def drive(stack: Stack, watch: Watch, args) -> tuple[Counter, Counter, int]:
    """Send args.requests requests (or stop at args.max_seconds); returns statuses, misses, sent."""
    url = f"http://127.0.0.1:{stack.proxy_port}/v1/chat/completions"
    rng = random.Random(args.seed)
    weights = [kind.weight for kind in KINDS]
    bodies = {
        (False, False): json.dumps(dict(CHAT)).encode(),
        (True, False): json.dumps(dict(CHAT, stream=True)).encode(),
        (True, True): json.dumps(dict(CHAT, stream=True, stream_options={"include_usage": True})).encode(),
    }
    statuses: Counter = Counter()
    unexpected: Counter = Counter()
    deadline = time.monotonic() + args.max_seconds
    sent = done = 0

    def key_for(kind: Kind, index: int) -> str:
        name = NORMAL_KEYS[index % len(NORMAL_KEYS)] if kind.key == "normal" else kind.key
        return f"sk-soak-{name}"

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal sent, done
        while sent < args.requests and time.monotonic() < deadline:
            index, sent = sent, sent + 1
            kind = rng.choices(KINDS, weights)[0]
            outcome = await one_request(
                session, url, kind, key_for(kind, index), bodies[kind.stream, kind.include_usage]
            )
            statuses[outcome] += 1
            if outcome not in kind.expect:
                unexpected[f"{kind.name} -> {outcome}"] += 1
            done += 1
            if done % args.every == 0:
                watch.sample(done, statuses)

    connector = aiohttp.TCPConnector(limit=args.concurrency)
    timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(args.concurrency)))
    return statuses, unexpected, done


def key_census(client: redis.Redis) -> tuple[Counter, list[bytes]]:
    """Every key by kind (from proxy/limits/layout.py's names), and the settled markers' names."""
    kinds: Counter = Counter()
    markers = []
    for name in client.scan_iter(count=2_000):
        text = name.decode()
        if re.search(r"\}:d:", text):
            kinds["d: settled markers"] += 1
            if len(markers) < SAMPLE_KEYS:
                markers.append(name)
        elif re.search(r"\}:r:", text):
            kinds["r: reservations"] += 1
        elif ":ledger:" in text:
            kinds["ledger"] += 1
        elif text.endswith(":leases"):
            kinds["budget holds (zset)"] += 1
        elif re.search(r":b:[^:]+$", text):
            kinds["budget day (hash)"] += 1
        elif text.endswith(":par"):
            kinds["parallel leases (zset)"] += 1
        elif text.endswith((":rq", ":tk")):
            kinds["buckets"] += 1
        else:
            kinds["other: " + text[:60]] += 1
    return kinds, markers


def leftovers(client: redis.Redis) -> dict:
    """What an idle proxy should no longer hold: parallel leases, budget holds, reservations."""
    leases = held = reservations = 0
    for name in client.scan_iter(count=2_000):
        text = name.decode()
        if text.endswith((":par", ":leases")):
            leases += client.zcard(name)
        elif re.search(r":b:[^:]+$", text):
            held += int(client.hget(name, "held") or 0)
        elif re.search(r"\}:r:", text):
            reservations += 1
    return {"leases": leases, "held_micros": held, "reservations": reservations}


def metric_sums(port: int) -> tuple[Counter, float]:
    """llm_proxy_requests_total by status, and llm_proxy_inflight_requests summed over teams."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    by_status: Counter = Counter()
    inflight = 0.0
    for line in text.splitlines():
        if line.startswith("llm_proxy_requests_total{"):
            by_status[re.search(r'status="([^"]*)"', line).group(1)] += float(line.rsplit(" ", 1)[1])
        elif line.startswith("llm_proxy_inflight_requests{"):
            inflight += float(line.rsplit(" ", 1)[1])
    return by_status, inflight


def fixed_key_bound(config: dict) -> int:
    """Keys that do not depend on traffic: per key and team scope rq, tk, par, and per budget day a
    budget hash and its holds zset; per team a ledger per day."""
    scopes = len(config["keys"]) + len(config["teams"])
    return scopes * (3 + 2 * DAY_CANDIDATES) + len(config["teams"]) * DAY_CANDIDATES


def summarize(
    watch: Watch,
    stack: Stack,
    client: redis.Redis,
    config: dict,
    statuses: Counter,
    unexpected: Counter,
    done: int,
    cpu: float,
    args,
) -> dict:
    points = watch.points
    warm = next((p for p in points if p.requests >= args.every), points[0])
    last = points[-1]
    growth = round(last.rss_mb - warm.rss_mb, 1)
    refused = sum(count for outcome, count in statuses.items() if outcome.startswith("429"))
    admitted = done - refused
    kinds, markers = key_census(client)
    left = leftovers(client)
    ttl = client.ttl(markers[0]) if markers else None
    marker_bytes = (sum(client.memory_usage(name) or 0 for name in markers) / len(markers)) if markers else 0
    fixed = fixed_key_bound(config)
    bound = fixed + args.concurrency + admitted  # + reservations in flight + one marker per admitted request
    keys_now = client.dbsize()
    used_delta = last.redis_used_mb - points[0].redis_used_mb
    key_delta = last.redis_keys - points[0].redis_keys
    bytes_per_key = used_delta * 2**20 / key_delta if key_delta else 0
    keys_per_request = (last.redis_keys - warm.redis_keys) / max(1, last.requests - warm.requests)
    print(
        f"\nrequests: {done} in {last.elapsed_s:.0f} s ({done / max(1e-9, last.elapsed_s):.0f} req/s); "
        f"admitted {admitted}, refused by limits {refused}; proxy CPU {cpu * 1000 / max(1, done):.2f} ms/request"
    )
    print("unexpected outcomes: " + (", ".join(f"{k}: {v}" for k, v in unexpected.most_common()) or "none"))
    verdict = "PASS" if growth < RSS_GROWTH_LIMIT_MB else "FAIL"
    print(
        f"RSS: {points[0].rss_mb} MB idle, {warm.rss_mb} MB at {warm.requests} (warm), {last.rss_mb} MB at "
        f"{last.requests}, max {max(p.rss_mb for p in points)} MB"
    )
    print(f"{verdict} RSS growth after warm-up {growth:+.1f} MB (limit < {RSS_GROWTH_LIMIT_MB:.0f} MB)")
    print(
        f"open fds: {points[0].fds} idle, {warm.fds} at {warm.requests}, {last.fds} at the end, "
        f"max {max(p.fds for p in points)}"
    )
    print("Redis keys by kind: " + ", ".join(f"{k}: {v}" for k, v in sorted(kinds.items())))
    print(
        f"Redis keys: max {max(p.redis_keys for p in points)}, last {keys_now}; "
        f"{keys_per_request:.3f} keys per request after warm-up; used_memory "
        f"{points[0].redis_used_mb} -> {last.redis_used_mb} MB, {bytes_per_key:.0f} bytes per key added; "
        f"MEMORY USAGE of a settled marker {marker_bytes:.0f} bytes, its TTL {ttl} s"
    )
    verdict = "PASS" if keys_now <= bound else "FAIL"
    print(
        f"{verdict} Redis keys bounded by the TTLs: {keys_now} <= {bound} = {fixed} fixed (scopes x rq/tk/par + "
        f"budget day and holds x {DAY_CANDIDATES} days, ledgers) + {args.concurrency} reservations in flight + "
        f"{admitted} settled markers (one per admitted request, kept DONE_TTL_S = {DONE_TTL_S} s)"
    )
    plateau = kinds["d: settled markers"] == 0 or keys_per_request < 0.01
    print(
        f"{'PASS' if plateau else 'NOTE'} keys plateau: "
        + (
            "flat after warm-up"
            if plateau
            else f"not within this run: the settled markers grow {keys_per_request:.3f} keys per request for "
            f"{DONE_TTL_S // 60} min before the first expire; at a steady 100 req/s they level off at "
            f"{100 * DONE_TTL_S / 1e3:.0f}k keys, ~{100 * DONE_TTL_S * bytes_per_key / 2**20:.0f} MiB of Redis"
        )
    )
    by_status, inflight = metric_sums(stack.proxy_port)
    counted = sum(by_status.values())
    agree = counted == done and inflight == 0
    print(
        f"{'PASS' if agree else 'FAIL'} /metrics agrees with the client: llm_proxy_requests_total {counted:.0f} "
        f"(client sent {done}; by status "
        + ", ".join(f"{k}: {v:.0f}" for k, v in sorted(by_status.items()))
        + f"), llm_proxy_inflight_requests {inflight:.0f} when idle (expected 0)"
    )
    clean = left["leases"] == 0 and left["held_micros"] == 0 and left["reservations"] == 0
    print(
        f"{'PASS' if clean else 'FAIL'} nothing held after the last settlement: {left['leases']} parallel or "
        f"budget leases, {left['held_micros']} budget micros held, {left['reservations']} reservations"
    )
    return {
        "rss_growth_mb": growth,
        "rss_pass": growth < RSS_GROWTH_LIMIT_MB,
        "admitted": admitted,
        "refused": refused,
        "redis_keys_last": keys_now,
        "redis_key_bound": bound,
        "redis_keys_by_kind": kinds,
        "keys_per_request": round(keys_per_request, 4),
        "bytes_per_key": round(bytes_per_key),
        "settled_marker_bytes": round(marker_bytes),
        "settled_marker_ttl_s": ttl,
        "leftovers": left,
        "unexpected": dict(unexpected),
        "metrics_requests_by_status": dict(by_status),
        "metrics_inflight_idle": inflight,
        "cpu_ms_per_request": round(cpu * 1000 / max(1, done), 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--concurrency", type=int, default=48)
    parser.add_argument("--every", type=int, default=20_000, help="print a checkpoint every this many requests")
    parser.add_argument("--max-seconds", type=float, default=1200, help="stop sending after this long")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--log-level", default="info", help="the proxy's log_level (info: one JSON line a request)")
    parser.add_argument("--redis-url", help="an empty Redis to use instead of starting one (its keys are counted)")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args(argv)
    args.workers = 1
    workdir = Path(tempfile.mkdtemp(prefix="llm-proxy-soak-"))
    stack = Stack(args, workdir)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"{args.requests} requests, {args.concurrency} concurrent, one proxy process"
    )
    print(
        "mix: "
        + ", ".join(f"{kind.name} {kind.weight:g}%" for kind in KINDS)
        + f"; tight rpm {TIGHT_RPM}, penny budget ${PENNY_BUDGET_USD}/day, upstream max_retries 1"
    )
    try:
        stack.start_upstream([sys.executable, "-m", "proxy.mock_upstream"])
        config = soak_config(stack.upstream_port, stack.start_redis(), args.log_level)
        stack.start_proxy(config)
        client = redis.Redis.from_url(stack.redis_url, socket_timeout=10)
        print(
            f"\n{'requests':>8} {'elapsed':>8} {'req/s':>7} {'CPU ms':>7} {'RSS MB':>7} {'fds':>5} "
            f"{'redis keys':>10} {'redis MB':>9}"
        )
        watch = Watch(stack, client)
        watch.sample(0, Counter())
        cpu_before = cpu_seconds(stack.proxy.pid)
        statuses, unexpected, done = asyncio.run(drive(stack, watch, args))
        cpu = cpu_seconds(stack.proxy.pid) - cpu_before
        if done % args.every:
            watch.sample(done, statuses)
        if done < args.requests:
            print(f"stopped at {done} requests: --max-seconds {args.max_seconds:.0f} reached")
        time.sleep(SETTLE_WAIT_S)
        print(
            f"idle after {SETTLE_WAIT_S:.0f} s: RSS {rss_mb(stack.proxy.pid):.1f} MB, "
            f"{open_fds(stack.proxy.pid)} fds, {client.dbsize()} Redis keys"
        )
        summary = summarize(watch, stack, client, config, statuses, unexpected, done, cpu, args)
    finally:
        stack.stop()
    if args.json_path:
        output = {
            "machine": {"arch": platform.machine(), "cores": os.cpu_count(), "python": platform.python_version()},
            "requests": args.requests,
            "concurrency": args.concurrency,
            "checkpoints": [asdict(p) for p in watch.points],
            "summary": summary,
        }
        Path(args.json_path).write_text(json.dumps(output, indent=2))
        print(f"JSON: {args.json_path}")
    print(f"logs: {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
