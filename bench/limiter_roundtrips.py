"""What one request costs the limiter: Redis round trips, admit/settle latency and client CPU.

Drives N admit+settle pairs for one key and its team, with every limit and budget on (rpm, tpm,
max_parallel, daily budget, on both scopes, set high enough never to refuse), sequentially and
with a concurrency of 64, against RedisStore and, for comparison, MemoryStore.

Round trips are counted by Redis itself: the calls of client-issued commands (EVALSHA, EVAL,
SCRIPT ...) in `INFO commandstats`, before and after; the commands the scripts run inside Redis
are shown separately. Starts its own redis-server on a free port unless given --redis-url.

    python bench/limiter_roundtrips.py [-n 5000] [--concurrency 64] [--redis-url URL] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from zoneinfo import ZoneInfo

import redis

from proxy.limits.days import candidate_days
from proxy.limits.memory_store import MemoryStore
from proxy.limits.redis_store import RedisStore
from proxy.limits.types import Admission, ScopeLimits, Settlement, Usage, WindowBudget

CLIENT_COMMANDS = ("evalsha", "eval", "evalsha_ro", "eval_ro", "script")  # one call = one round trip
NOT_COUNTED = ("info",)  # this script's own INFO calls
WARMUP_PAIRS = 20
HUGE = 10**12
WINDOWS = False  # --windows


@dataclass
class Result:
    store: str
    mode: str
    pairs: int
    round_trips_per_request: float | None
    script_commands_per_request: float | None
    redis_us_per_request: float | None  # Redis' own time running the scripts, per pair
    admit_us: dict
    settle_us: dict
    pair_us: dict
    cpu_us_per_pair: float
    pairs_per_s: float


def scopes(run: str, concurrency: int) -> tuple[ScopeLimits, ScopeLimits]:
    def limits(kind: str, name: str) -> ScopeLimits:
        return ScopeLimits(
            kind,
            name,
            rpm=HUGE,
            rpm_burst=HUGE,
            tpm=HUGE,
            tpm_burst=HUGE,
            max_parallel=max(1000, concurrency * 2),
            budget_micros=HUGE,
        )

    return limits("key", f"bench-key-{run}"), limits("team", f"bench-team-{run}")


def summary_us(samples_ns: list[int]) -> dict:
    ordered = sorted(samples_ns)
    return {
        "mean": statistics.fmean(ordered) / 1000,
        "p50": ordered[len(ordered) // 2] / 1000,
        "p99": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] / 1000,
    }


class Driver:
    """admit+settle pairs for one fresh key and team (fresh names, so buckets start full)."""

    def __init__(self, store, concurrency: int) -> None:
        self.store = store
        self.key, self.team = scopes(uuid.uuid4().hex[:8], concurrency)
        # with --windows: week and month budgets of key and team, the org's month, an end user's day
        self.windows: tuple[WindowBudget, ...] = ()
        if WINDOWS:
            self.windows = (
                WindowBudget("key", self.key.name, "week", HUGE),
                WindowBudget("key", self.key.name, "month", HUGE),
                WindowBudget("team", self.team.name, "week", HUGE),
                WindowBudget("team", self.team.name, "month", HUGE),
                WindowBudget("org", "", "month", HUGE),
                WindowBudget("end_user", "bench-user", "day", HUGE),
            )
        self.days = candidate_days(ZoneInfo("UTC"))
        self.admit_ns: list[int] = []
        self.settle_ns: list[int] = []
        self.pair_ns: list[int] = []

    async def pair(self, record: bool = True) -> None:
        request_id = uuid.uuid4().hex
        started = time.perf_counter_ns()
        decision = await self.store.admit(
            Admission(request_id, self.team, self.key, 60, 1_000, self.days, windows=self.windows)
        )
        admitted = time.perf_counter_ns()
        if not decision.admitted:
            raise RuntimeError(f"bench request refused: {decision}")
        settlement = Settlement(
            request_id,
            self.team,
            self.key,
            "bench-model",
            decision.day,
            Usage(prompt_tokens=10, completion_tokens=20),
            400,
            windows=self.windows,
        )
        if not await self.store.settle(settlement):
            raise RuntimeError("bench settlement was a duplicate")
        settled = time.perf_counter_ns()
        if record:
            self.admit_ns.append(admitted - started)
            self.settle_ns.append(settled - admitted)
            self.pair_ns.append(settled - started)

    async def run(self, pairs: int, concurrency: int) -> None:
        left = pairs

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await self.pair()

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def command_stats(client: redis.Redis) -> dict[str, tuple[int, int]]:
    """{command: (calls, usec)} from INFO commandstats."""
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"])) for name, v in stats.items()}


def measure(store_name: str, make_store, pairs: int, concurrency: int, stats_client: redis.Redis | None) -> Result:
    async def go():
        store = make_store()
        driver = Driver(store, concurrency)
        for _ in range(WARMUP_PAIRS):  # script loads, connections
            await driver.pair(record=False)
        before = command_stats(stats_client) if stats_client else None
        cpu, wall = time.process_time(), time.perf_counter()
        await driver.run(pairs, concurrency)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        after = command_stats(stats_client) if stats_client else None
        await store.close()
        return driver, before, after, cpu, wall

    driver, before, after, cpu, wall = asyncio.run(go())
    round_trips = inside = server_us = None
    if before is not None and after is not None:
        delta = {name: [a - b for a, b in zip(after[name], before.get(name, (0, 0)), strict=True)] for name in after}
        client = [v for name, v in delta.items() if name.split("|")[0] in CLIENT_COMMANDS]
        inside_calls = sum(v[0] for name, v in delta.items() if name.split("|")[0] not in CLIENT_COMMANDS + NOT_COUNTED)
        round_trips, inside = sum(v[0] for v in client) / pairs, inside_calls / pairs
        server_us = sum(v[1] for v in client) / pairs
    return Result(
        store_name,
        "sequential" if concurrency == 1 else f"concurrency {concurrency}",
        pairs,
        round_trips,
        inside,
        server_us,
        summary_us(driver.admit_ns),
        summary_us(driver.settle_ns),
        summary_us(driver.pair_ns),
        cpu * 1e6 / pairs,
        pairs / wall,
    )


class OwnRedis:
    """A throwaway redis-server on a free port (no persistence)."""

    def __init__(self) -> None:
        if shutil.which("redis-server") is None:
            raise SystemExit("redis-server is not installed: pass --redis-url")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.workdir = tempfile.mkdtemp(prefix="bench-redis-")
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.workdir,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.url = f"redis://127.0.0.1:{self.port}/0"
        client = redis.Redis.from_url(self.url, socket_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.RedisError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise SystemExit("redis-server did not start") from None
                time.sleep(0.02)
        client.close()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        shutil.rmtree(self.workdir, ignore_errors=True)


def report(results: list[Result], redis_version: str) -> str:
    lines = [
        f"limiter cost per request: admit + settle, key and team, every limit and budget on "
        f"(Python {sys.version.split()[0]}, redis-server {redis_version})",
        "",
    ]
    header = (
        f"{'store':<7} {'mode':<15} {'pairs':>6} {'RTT/req':>7} {'in-script':>9} {'redis us':>8} "
        f"{'admit mean/p50/p99 us':>23} {'settle mean/p50/p99 us':>24} {'pair mean/p50/p99 us':>22} "
        f"{'CPU us/pair':>11} {'pairs/s':>8}"
    )
    lines.append(header)
    for r in results:

        def three(s: dict) -> str:
            return f"{s['mean']:.0f}/{s['p50']:.0f}/{s['p99']:.0f}"

        rtt = "-" if r.round_trips_per_request is None else f"{r.round_trips_per_request:.2f}"
        inside = "-" if r.script_commands_per_request is None else f"{r.script_commands_per_request:.1f}"
        server = "-" if r.redis_us_per_request is None else f"{r.redis_us_per_request:.0f}"
        lines.append(
            f"{r.store:<7} {r.mode:<15} {r.pairs:>6} {rtt:>7} {inside:>9} {server:>8} {three(r.admit_us):>23} "
            f"{three(r.settle_us):>24} {three(r.pair_us):>22} {r.cpu_us_per_pair:>11.0f} "
            f"{r.pairs_per_s:>8.0f}"
        )
    lines += [
        "",
        "RTT/req: client-issued Redis commands (EVALSHA/EVAL/SCRIPT) per admit+settle pair, from INFO commandstats;",
        "in-script: commands the two scripts run inside Redis per pair; redis us: "
        "Redis' time executing those scripts per pair (commandstats usec);",
        "latencies in microseconds, client side; CPU: this process's CPU time per pair (time.process_time).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--pairs", type=int, default=5000, help="admit+settle pairs per run")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--redis-url", help="use this Redis instead of starting one (keys are left behind)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--windows", action="store_true", help="also six window budgets (week, month, org, end user)")
    args = parser.parse_args(argv)
    global WINDOWS
    WINDOWS = args.windows

    own = None if args.redis_url else OwnRedis()
    url = args.redis_url or own.url
    stats_client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        version = stats_client.info("server")["redis_version"]
        results = []
        for concurrency in (1, args.concurrency):
            results.append(
                measure(
                    "redis", lambda: RedisStore.from_url(url, timeout_ms=2000), args.pairs, concurrency, stats_client
                )
            )
            results.append(measure("memory", MemoryStore, args.pairs, concurrency, None))
    finally:
        stats_client.close()
        if own is not None:
            own.stop()
    if args.json:
        print(json.dumps({"redis_version": version, "results": [asdict(r) for r in results]}, indent=2))
    else:
        print(report(results, version))
    return 0


if __name__ == "__main__":
    sys.exit(main())
