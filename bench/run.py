"""The proxy's own cost, measured side by side with the upstream alone.

    python bench/run.py                 # every scenario, ~3 minutes
    python bench/run.py --quick         # shorter runs
    python bench/run.py --scenarios plain-c1,stream-c32 --workers 2 --json results.json

Starts its own fake upstream (bench/fake_upstream.py), its own redis-server on a free port (or
--redis-url) and `llm-proxy serve` with Redis limits, budgets, metrics and the request log on, as
a user runs it. Load comes from `wrk` (Debian's package) when installed, else an asyncio client.
Each scenario runs once directly against the fake upstream and once through the proxy. Printed
per scenario: requests/s, p50/p99 latency, latency added over direct, proxy CPU ms per request
(user+sys of the proxy processes from /proc, divided by requests) and proxy RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

HERE = Path(__file__).parent
ROOT = HERE.parent
KEY = "sk-bench-key-0001"
CHAT = {
    "model": "bench-chat",
    "messages": [{"role": "user", "content": "Write one short sentence about load tests."}],
    "max_tokens": 64,
}
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Scenario:
    name: str
    stream: bool
    connections: int
    delay_ms: int = 0  # per-chunk delay of the fake upstream (slow streams)


SCENARIOS = {
    "plain-c1": Scenario("plain-c1", False, 1),
    "plain-c64": Scenario("plain-c64", False, 64),
    "stream-c1": Scenario("stream-c1", True, 1),
    "stream-c32": Scenario("stream-c32", True, 32),
    "slow-streams-1000": Scenario("slow-streams-1000", True, 1000, delay_ms=100),
}


@dataclass
class Result:
    scenario: str
    target: str  # direct | proxy
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_ms_per_request: float | None = None
    rss_mb: float | None = None
    added_p50_ms: float | None = None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on port {port}") from None
            time.sleep(0.05)


# -- /proc ------------------------------------------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                todo += [int(child) for child in (task / "children").read_text().split()]
            except OSError:
                pass
    return pids


def cpu_seconds(pid: int) -> float:
    return sum(cpu_split(pid))


def cpu_split(pid: int) -> tuple[float, float]:
    """User and sys CPU seconds of a process and its children."""
    user = system = 0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user, system = user + int(fields[11]), system + int(fields[12])  # utime, stime
    return user / CLK_TCK, system / CLK_TCK


def rss_mb(pid: int) -> float:
    total = 0
    for p in process_tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def open_fds(pid: int) -> int:
    total = 0
    for p in process_tree(pid):
        try:
            total += sum(1 for _ in Path(f"/proc/{p}/fd").iterdir())
        except OSError:
            pass
    return total


# -- load -------------------------------------------------------------------------------------------

WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {key}"
{delay}
"""


def run_wrk(url: str, scenario: Scenario, seconds: float, workdir: Path) -> tuple[int, float, float, float, int]:
    body = dict(CHAT, stream=scenario.stream)
    delay = f'wrk.headers["x-bench-delay-ms"] = "{scenario.delay_ms}"' if scenario.delay_ms else ""
    script = workdir / "wrk.lua"
    script.write_text(WRK_SCRIPT.format(body=json.dumps(json.dumps(body)), key=KEY, delay=delay))
    threads = min(2, scenario.connections)
    timeout = "30s"
    duration = f"{max(1, round(seconds))}s"
    out = subprocess.run(
        [
            "wrk",
            "-t",
            str(threads),
            "-c",
            str(scenario.connections),
            "-d",
            duration,
            "--timeout",
            timeout,
            "--latency",
            "-s",
            str(script),
            url + "/v1/chat/completions",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    requests = int(re.search(r"(\d+) requests in ([\d.]+)(\w+)", out).group(1))
    duration = float(re.search(r"requests in ([\d.]+)(m?s|m)", out).group(1))
    unit = re.search(r"requests in [\d.]+(\w+)", out).group(1)
    duration = duration / 1000 if unit == "ms" else duration * 60 if unit == "m" else duration

    def pct(name: str) -> float:
        match = re.search(rf"\s{name}%\s+([\d.]+)(us|ms|s)", out)
        value, unit = float(match.group(1)), match.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    errors = 0
    if match := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors += int(match.group(1))
    if match := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors += sum(int(x) for x in match.groups())
    return requests, duration, pct("50"), pct("99"), errors


async def _asyncio_load(url: str, scenario: Scenario, seconds: float) -> tuple[int, float, float, float, int]:
    import httpx

    headers = {"Authorization": f"Bearer {KEY}"}
    if scenario.delay_ms:
        headers["x-bench-delay-ms"] = str(scenario.delay_ms)
    latencies, errors = [], 0
    limits = httpx.Limits(max_connections=scenario.connections, max_keepalive_connections=scenario.connections)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=30) as client:
        deadline = time.monotonic() + seconds

        async def worker():
            nonlocal errors
            while time.monotonic() < deadline:
                started = time.monotonic()
                async with client.stream("POST", "/v1/chat/completions", json=dict(CHAT, stream=scenario.stream)) as r:
                    await r.aread()
                    errors += r.status_code != 200
                latencies.append(time.monotonic() - started)

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(scenario.connections)))
        elapsed = time.monotonic() - started
    latencies.sort()
    return (
        len(latencies),
        elapsed,
        latencies[len(latencies) // 2] * 1000,
        latencies[int(len(latencies) * 0.99)] * 1000,
        errors,
    )


def load(url: str, scenario: Scenario, seconds: float, workdir: Path):
    if shutil.which("wrk"):
        return run_wrk(url, scenario, seconds, workdir)
    return asyncio.run(_asyncio_load(url, scenario, seconds))


# -- the processes under test -----------------------------------------------------------------------


def proxy_config(upstream_port: int, redis_url: str, log_level: str) -> dict:
    return {
        "log_level": log_level,
        "store": {"redis_url": redis_url, "on_redis_error": "allow"},
        "upstreams": {
            "fake": {
                "base_url": f"http://127.0.0.1:{upstream_port}/v1",
                "api_key": "sk-upstream-bench",
                "max_connections": 2000,
                "timeout_s": 60,
            }
        },
        "models": {
            "bench-chat": {
                "targets": [{"upstream": "fake", "model": "bench-model"}],
                "context_window": 128000,
                "price_per_mtok": {"input": "0.27", "output": "1.10", "cached_input": "0.07"},
            }
        },
        "teams": {
            "bench": {
                "daily_budget_usd": 1_000_000,
                "limits": {"rpm": 100_000_000, "tpm": 10_000_000_000, "max_parallel": 100_000},
            }
        },
        "keys": {
            "bench-key": {
                "team": "bench",
                "key": KEY,
                "daily_budget_usd": 1_000_000,
                "limits": {"rpm": 100_000_000, "tpm": 10_000_000_000, "max_parallel": 100_000},
            }
        },
    }


async def load_runtime_keys(redis_url: str, count: int) -> str:
    """`count` runtime keys of team bench in the registry (as `POST /admin/keys` makes them, with
    the bench key's limits and budget); returns the last one's plain key."""
    from proxy.registry import KeySpec, RedisRegistryBackend, Registry

    backend = RedisRegistryBackend.from_url(redis_url, timeout_ms=5000)
    registry = Registry(backend, config_keys=["bench-key"], config_teams=["bench"])
    limits = {"rpm": 100_000_000, "tpm": 10_000_000_000, "max_parallel": 100_000}
    last = ""
    try:
        for start in range(0, count, 50):
            specs = [
                KeySpec(name=f"rt-{i:06d}", team="bench", limits=limits, budgets={"daily_usd": 1_000_000})
                for i in range(start, min(count, start + 50))
            ]
            created = await asyncio.gather(*(registry.create_key(spec, admin="bench") for spec in specs))
            last = created[-1].key
    finally:
        await backend.close()
    return last


class Stack:
    def __init__(self, args, workdir: Path):
        self.args, self.workdir, self.processes = args, workdir, []

    def spawn(self, argv: list[str], port: int, log: str, env: dict | None = None) -> subprocess.Popen:
        with open(self.workdir / log, "wb") as handle:  # the child keeps its own descriptor
            process = subprocess.Popen(
                argv, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **(env or {})}
            )
        self.processes.append(process)
        wait_port(port)
        return process

    def start(self) -> None:
        global KEY
        self.start_upstream([sys.executable, str(HERE / "fake_upstream.py")])
        redis_url = self.start_redis()
        if self.args.runtime_keys:  # loaded before the proxy starts: it loads them before serving
            started = time.monotonic()
            KEY = asyncio.run(load_runtime_keys(redis_url, self.args.runtime_keys))
            took = time.monotonic() - started
            print(f"{self.args.runtime_keys} runtime keys created in {took:.1f} s; the load uses the last")
        self.start_proxy(proxy_config(self.upstream_port, redis_url, self.args.log_level))

    def start_upstream(self, argv: list[str]) -> None:
        """`argv --port P`: the fake upstream, or any server that takes --port."""
        self.upstream_port = free_port()
        self.upstream = self.spawn([*argv, "--port", str(self.upstream_port)], self.upstream_port, "upstream.log")

    def start_redis(self) -> str:
        """--redis-url when given, else a fresh redis-server on a free port; returns its URL."""
        self.redis_url = self.args.redis_url
        if self.redis_url is None:
            port = free_port()
            self.spawn(
                ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no", "--dir", str(self.workdir)],
                port,
                "redis.log",
            )
            self.redis_url = f"redis://127.0.0.1:{port}/0"
        return self.redis_url

    def start_proxy(self, config: dict) -> None:
        path = self.workdir / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        self.proxy_port = free_port()
        self.proxy = self.spawn(
            [
                sys.executable,
                "-m",
                "proxy",
                "serve",
                "--config",
                str(path),
                "--port",
                str(self.proxy_port),
                "--workers",
                str(self.args.workers),
            ],
            self.proxy_port,
            "proxy.log",
            env={"PROMETHEUS_MULTIPROC_DIR": str(self.workdir / "metrics")} if self.args.workers > 1 else None,
        )

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.terminate()
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()


def measure(stack: Stack, scenario: Scenario, target: str, args) -> Result:
    port = stack.upstream_port if target == "direct" else stack.proxy_port
    url = f"http://127.0.0.1:{port}"
    load(url, scenario, args.warmup, stack.workdir)
    cpu_before = cpu_seconds(stack.proxy.pid)
    requests, seconds, p50, p99, errors = load(url, scenario, args.seconds, stack.workdir)
    cpu = cpu_seconds(stack.proxy.pid) - cpu_before
    result = Result(
        scenario.name,
        target,
        requests,
        round(seconds, 2),
        round(requests / seconds, 1),
        round(p50, 3),
        round(p99, 3),
        errors,
    )
    if target == "proxy":
        result.cpu_ms_per_request = round(cpu * 1000 / max(1, requests), 3)
        result.rss_mb = round(rss_mb(stack.proxy.pid), 1)
    return result


def slow_stream_memory(stack: Stack, scenario: Scenario, args) -> dict:
    """RSS of the proxy with `connections` slow streams open, against its idle RSS."""
    idle = rss_mb(stack.proxy.pid)
    url = f"http://127.0.0.1:{stack.proxy_port}"
    peak = [idle]

    async def sample():
        for _ in range(int(args.seconds * 10)):
            await asyncio.sleep(0.1)
            peak[0] = max(peak[0], rss_mb(stack.proxy.pid))

    async def both():
        loop = asyncio.get_running_loop()
        sampler = asyncio.ensure_future(sample())
        result = await loop.run_in_executor(None, load, url, scenario, args.seconds, stack.workdir)
        sampler.cancel()
        return result

    requests, _seconds, p50, _p99, errors = asyncio.run(both())
    return {
        "idle_rss_mb": round(idle, 1),
        "peak_rss_mb": round(peak[0], 1),
        "kb_per_open_stream": round((peak[0] - idle) * 1024 / scenario.connections, 1),
        "streams_completed": requests,
        "errors": errors,
        "p50_ms": round(p50, 1),
    }


def print_table(results: list[Result]) -> None:
    print(
        f"\n{'scenario':<18} {'target':<7} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'added p50':>9} "
        f"{'CPU ms/req':>10} {'RSS MB':>7} {'errors':>6}"
    )
    for r in results:
        added = "" if r.added_p50_ms is None else f"{r.added_p50_ms:.3f}"
        cpu = "" if r.cpu_ms_per_request is None else f"{r.cpu_ms_per_request:.3f}"
        rss = "" if r.rss_mb is None else f"{r.rss_mb:.0f}"
        print(
            f"{r.scenario:<18} {r.target:<7} {r.rps:>9.1f} {r.p50_ms:>8.3f} {r.p99_ms:>8.3f} {added:>9} {cpu:>10} "
            f"{rss:>7} {r.errors:>6}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="llm-ratelimit-proxy benchmark")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--quick", action="store_true", help="4 s runs, 1 s warm-up")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--log-level", default="info", help="the proxy's log_level (info: one JSON line a request)")
    parser.add_argument("--redis-url")
    parser.add_argument(
        "--runtime-keys", type=int, default=0, metavar="N", help="load N runtime keys first; the load uses one of them"
    )
    parser.add_argument("--json", dest="json_path", default=str(HERE / "results" / "latest.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.warmup = 4.0, 1.0
    workdir = Path(tempfile.mkdtemp(prefix="llm-proxy-bench-"))
    stack = Stack(args, workdir)
    results: list[Result] = []
    memory = None
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"load: {'wrk' if shutil.which('wrk') else 'asyncio client'}, proxy workers: {args.workers}"
    )
    try:
        stack.start()
        for name in args.scenarios.split(","):
            scenario = SCENARIOS[name]
            if scenario.delay_ms:
                memory = slow_stream_memory(stack, scenario, args)
                print(f"{name}: {memory}")
                continue
            direct = measure(stack, scenario, "direct", args)
            through = measure(stack, scenario, "proxy", args)
            through.added_p50_ms = round(through.p50_ms - direct.p50_ms, 3)
            results += [direct, through]
            print_table(results[-2:])
    finally:
        stack.stop()
    print_table(results)
    output = {
        "machine": {"arch": platform.machine(), "cores": os.cpu_count(), "python": platform.python_version()},
        "workers": args.workers,
        "runtime_keys": args.runtime_keys,
        "seconds": args.seconds,
        "results": [asdict(r) for r in results],
        "slow_streams": memory,
    }
    Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_path).write_text(json.dumps(output, indent=2))
    print(f"\nJSON: {args.json_path}; logs: {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
