"""Thousands of concurrent slow streams through ONE proxy process: do all finish, and what does each cost?

    python bench/streams.py                               # 2,000 streams, 16 events 200 ms apart
    python bench/streams.py --streams 500 --delay-ms 100 --json streams.json

Starts bench/fake_upstream.py, redis-server and `llm-proxy serve --workers 1` (Redis limits,
budgets, metrics and the request log on) as bench/run.py does, with the open-file limit raised to
its hard limit first so every child inherits it. Then opens every stream at once from one asyncio
client; the fake upstream sleeps `--delay-ms` before each of its 16 events, so a stream ideally
lasts 16 x delay. Each stream must answer 200 with the 16 chunks and `data: [DONE]`, no error.

Printed: completed and failed streams, the proxy's idle and peak RSS and the memory per open
stream (RSS with the most streams open at once, minus idle, over that count), stream durations
against the ideal, the proxy's CPU, and what is left held afterwards (parallel leases, in-flight
gauge).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import aiohttp
import redis

from run import CHAT, KEY, Stack, cpu_seconds, open_fds, proxy_config, rss_mb
from soak import leftovers, metric_sums

CHUNKS = 16  # bench/fake_upstream.py's default: a role event, 14 words, a stop event
SAMPLE_INTERVAL_S = 0.05
WARMUP_STREAMS = 50
CLIENT_TIMEOUT_S = 120
FDS_PER_STREAM = 2  # the client's connection and the upstream's, in the proxy


def raise_fd_limit(needed: int) -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit, for this process and every child it starts."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < needed:
        print(f"warning: the hard open-file limit {hard} is below the {needed} this run needs")
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def max_open_files(pid: int) -> str:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return line.split()[3]
    return "?"


def check_stream(body: bytes) -> str | None:
    """None for a complete stream, else what is wrong with it."""
    events = [line[6:] for line in body.split(b"\n") if line.startswith(b"data: ")]
    if not events or events[-1] != b"[DONE]":
        return "no [DONE]"
    chunks = events[:-1]
    if any(b'"error"' in event for event in chunks):
        return "error event"
    if len(chunks) != CHUNKS:
        return f"{len(chunks)} events, not {CHUNKS}"
    try:
        if not all(json.loads(event)["choices"] for event in chunks):
            return "an event without choices"
    except (ValueError, KeyError):
        return "an event that is not a chunk"
    return None


class Sampler(threading.Thread):
    """The proxy's RSS and fds every SAMPLE_INTERVAL_S, with how many streams were open then.

    A thread, not a task: the client's event loop is busy with thousands of streams."""

    def __init__(self, pid: int, open_streams):
        super().__init__(daemon=True)
        self.pid, self.open_streams = pid, open_streams
        self.samples: list[tuple[float, int, float, int, float]] = []  # time, open streams, RSS MB, fds, CPU s
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(SAMPLE_INTERVAL_S):
            self.samples.append(
                (time.monotonic(), self.open_streams(), rss_mb(self.pid), open_fds(self.pid), cpu_seconds(self.pid))
            )

    def stop(self) -> None:
        self.stopping.set()
        self.join()


async def run_streams(url: str, count: int, delay_ms: int, on_open, on_close) -> list[tuple[float, str | None]]:
    """Open `count` streams at once; (seconds from request to [DONE], problem or None) for each."""
    body = json.dumps(dict(CHAT, stream=True)).encode()
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    if delay_ms:
        headers["x-bench-delay-ms"] = str(delay_ms)
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S)
    start = asyncio.Event()

    async def one(session: aiohttp.ClientSession) -> tuple[float, str | None]:
        await start.wait()
        began = time.monotonic()
        opened = False
        try:
            async with session.post(url, data=body, headers=headers) as response:
                if response.status != 200:
                    return time.monotonic() - began, f"status {response.status}"
                on_open()
                opened = True
                payload = await response.read()
                return time.monotonic() - began, check_stream(payload)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return time.monotonic() - began, f"client error {type(exc).__name__}"
        finally:
            if opened:
                on_close()

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = [asyncio.ensure_future(one(session)) for _ in range(count)]
        await asyncio.sleep(0)  # every task is waiting on `start`: release them together
        start.set()
        return await asyncio.gather(*tasks)


def runqueue_wait_s(pid: int) -> float:
    """Seconds the proxy's threads were runnable but waiting for a CPU (/proc/<pid>/task/*/schedstat)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            total += int((task / "schedstat").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            pass
    return total / 1e9


def client_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def proxy_durations(log: Path, floor_ms: float) -> tuple[float, float, float, float] | None:
    """p50/p99 duration and time to first byte of the slow streams, from the proxy's JSON lines."""
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    slow = [line for line in lines if line.get("duration_ms", 0) >= floor_ms / 2 and line.get("ttft_ms")]
    if not slow:
        return None
    durations = [line["duration_ms"] / 1000 for line in slow]
    ttft = [line["ttft_ms"] / 1000 for line in slow]
    return percentile(durations, 0.5), percentile(durations, 0.99), percentile(ttft, 0.5), percentile(ttft, 0.99)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--delay-ms", type=int, default=200, help="the fake upstream's wait before each event")
    parser.add_argument("--log-level", default="info", help="the proxy's log_level (info: one JSON line a request)")
    parser.add_argument("--redis-url")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args(argv)
    args.workers = 1
    limit = raise_fd_limit(args.streams * (FDS_PER_STREAM + 1) + 200)
    workdir = Path(tempfile.mkdtemp(prefix="llm-proxy-streams-"))
    stack = Stack(args, workdir)
    ideal_s = CHUNKS * args.delay_ms / 1000
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"{args.streams} streams at once, {CHUNKS} events {args.delay_ms} ms apart (ideal {ideal_s:.1f} s), "
        f"one proxy process; open-file limit {limit[0]}"
    )
    try:
        stack.start_upstream([sys.executable, str(Path(__file__).parent / "fake_upstream.py"), "--chunks", str(CHUNKS)])
        config = proxy_config(stack.upstream_port, stack.start_redis(), args.log_level)
        config["upstreams"]["fake"]["max_connections"] = max(2000, args.streams)
        config["upstreams"]["fake"]["timeout_s"] = max(60, 4 * ideal_s)
        stack.start_proxy(config)
        pid = stack.proxy.pid
        url = f"http://127.0.0.1:{stack.proxy_port}/v1/chat/completions"
        print(
            f"proxy pid {pid}: max open files {max_open_files(pid)}, "
            f"key max_parallel {config['keys']['bench-key']['limits']['max_parallel']}, "
            f"upstream max_connections {config['upstreams']['fake']['max_connections']}"
        )

        warm = asyncio.run(run_streams(url, WARMUP_STREAMS, 0, lambda: None, lambda: None))
        direct_url = f"http://127.0.0.1:{stack.upstream_port}/v1/chat/completions"
        began = time.monotonic()
        direct = asyncio.run(run_streams(direct_url, args.streams, args.delay_ms, lambda: None, lambda: None))
        direct_s = [seconds for seconds, problem in direct if problem is None]
        print(
            f"direct to the fake upstream, same client (the floor of this machine and client): "
            f"{len(direct_s)}/{args.streams} complete in {time.monotonic() - began:.1f} s, "
            f"p50 {percentile(direct_s, 0.5):.2f} s, p99 {percentile(direct_s, 0.99):.2f} s"
        )
        time.sleep(1.0)
        idle = rss_mb(pid)
        idle_fds = open_fds(pid)
        print(
            f"warm-up: {sum(problem is None for _, problem in warm)}/{WARMUP_STREAMS} fast streams complete; "
            f"idle RSS {idle:.1f} MB, {idle_fds} fds"
        )

        open_now = [0]

        def opened() -> None:
            open_now[0] += 1

        def closed() -> None:
            open_now[0] -= 1

        sampler = Sampler(pid, lambda: open_now[0])
        sampler.start()
        cpu_before, began = cpu_seconds(pid), time.monotonic()
        upstream_before, client_before = cpu_seconds(stack.upstream.pid), client_cpu()
        waited_before = runqueue_wait_s(pid)
        results = asyncio.run(run_streams(url, args.streams, args.delay_ms, opened, closed))
        wall = time.monotonic() - began
        cpu = cpu_seconds(pid) - cpu_before
        waited = runqueue_wait_s(pid) - waited_before
        upstream_cpu, own_cpu = cpu_seconds(stack.upstream.pid) - upstream_before, client_cpu() - client_before
        sampler.stop()
        time.sleep(2.0)
        after_rss, after_fds = rss_mb(pid), open_fds(pid)
        client = redis.Redis.from_url(stack.redis_url, socket_timeout=10)
        left = leftovers(client)
        by_status, inflight = metric_sums(stack.proxy_port)
    finally:
        stack.stop()

    durations = [seconds for seconds, problem in results if problem is None]
    problems = Counter(problem for _, problem in results if problem is not None)
    peak_time, peak_open, _, _, peak_cpu = max(sampler.samples, key=lambda s: (s[1], s[2]))
    at_most_open = max(s[2] for s in sampler.samples if s[1] == peak_open)
    peak_rss = max(s[2] for s in sampler.samples)
    peak_fds = max(s[3] for s in sampler.samples)
    all_open_s = next((s[0] - began for s in sampler.samples if s[1] == args.streams), None)
    per_stream_kb = (at_most_open - idle) * 1024 / max(1, peak_open)
    print(
        f"\ncompleted {len(durations)}/{args.streams}, failed {sum(problems.values())}"
        + (": " + ", ".join(f"{k}: {v}" for k, v in problems.most_common()) if problems else "")
    )
    opening_s = peak_time - began
    print(
        f"open at once: max {peak_open}, {opening_s:.2f} s after the start; the proxy's CPU until then "
        f"{peak_cpu - cpu_before:.2f} s ({(peak_cpu - cpu_before) / opening_s:.0%} of one core)"
        + (f"; all {args.streams} open {all_open_s:.2f} s after the start" if all_open_s is not None else "")
    )
    print(
        f"proxy RSS: idle {idle:.1f} MB, {at_most_open:.1f} MB with {peak_open} streams open, "
        f"peak {peak_rss:.1f} MB, {after_rss:.1f} MB 2 s after the last stream"
    )
    print(f"memory per open stream: {per_stream_kb:.1f} KB")
    print(f"proxy fds: idle {idle_fds}, peak {peak_fds}, after {after_fds}")
    if durations:
        p50, p99 = percentile(durations, 0.5), percentile(durations, 0.99)
        print(
            f"stream duration: p50 {p50:.2f} s, p99 {p99:.2f} s, max {max(durations):.2f} s; ideal {ideal_s:.2f} s "
            f"(p50 +{(p50 - ideal_s) * 1000:.0f} ms, p99 +{(p99 - ideal_s) * 1000:.0f} ms)"
        )
    print(
        f"proxy CPU: {cpu:.2f} s over {wall:.1f} s ({cpu / wall:.0%} of one core), "
        f"{cpu * 1000 / max(1, args.streams):.2f} ms per stream; meanwhile the client used {own_cpu:.2f} s, "
        f"the fake upstream {upstream_cpu:.2f} s; the proxy waited {waited:.2f} s for a CPU (run queue)"
    )
    proxy_view = proxy_durations(workdir / "proxy.log", args.delay_ms * CHUNKS)
    if proxy_view:
        print(
            f"the proxy's own request log: duration p50 {proxy_view[0]:.2f} s, p99 {proxy_view[1]:.2f} s; "
            f"time to first byte p50 {proxy_view[2]:.2f} s, p99 {proxy_view[3]:.2f} s"
        )
    print(
        f"after: {left['leases']} parallel/budget leases, {left['held_micros']} budget micros held, "
        f"{left['reservations']} reservations in Redis; llm_proxy_inflight_requests {inflight:.0f}"
    )
    if args.json_path:
        output = {
            "machine": {"arch": platform.machine(), "cores": os.cpu_count(), "python": platform.python_version()},
            "streams": args.streams,
            "delay_ms": args.delay_ms,
            "ideal_s": ideal_s,
            "completed": len(durations),
            "failed": dict(problems),
            "max_open": peak_open,
            "idle_rss_mb": round(idle, 1),
            "rss_mb_at_max_open": round(at_most_open, 1),
            "peak_rss_mb": round(peak_rss, 1),
            "after_rss_mb": round(after_rss, 1),
            "kb_per_open_stream": round(per_stream_kb, 1),
            "p50_s": round(percentile(durations, 0.5), 3) if durations else None,
            "p99_s": round(percentile(durations, 0.99), 3) if durations else None,
            "cpu_s": round(cpu, 2),
            "wall_s": round(wall, 2),
            "peak_fds": peak_fds,
            "leftovers": left,
            "metrics_inflight_after": inflight,
            "metrics_requests_by_status": dict(by_status),
        }
        Path(args.json_path).write_text(json.dumps(output, indent=2))
        print(f"JSON: {args.json_path}")
    print(f"logs: {workdir}")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
