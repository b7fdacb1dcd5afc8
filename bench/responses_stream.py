"""What one event of a long Responses stream costs the proxy: CPU per relayed event.

    python bench/responses_stream.py                      # 20 streams of ~1,000 events at once
    python bench/responses_stream.py --streams 50 --delay-ms 0 --json responses.json

Starts the mock upstream (`python -m proxy.mock_upstream`, ~1,000 events per Responses stream,
`--delay-ms` apart: 2 ms by default, so each event reaches the proxy in its own read, the worst
case; 0 lets the network batch them), redis-server and `llm-proxy serve --workers 1` with Redis
limits, budgets, metrics and the request log on, as bench/run.py does. Sends the streams at once,
each read whole by an asyncio client; every stream must end with `response.completed` and be
metered (the proxy's ledger holds its output tokens). Printed: events per stream, the proxy's CPU
(user+sys from /proc) per stream and per event, and its user and sys parts; with `--rounds N`,
the median of N measured rounds (a shared machine moves single rounds by ±25%). The target: 10 µs
per event. `--chat` runs the same events as chat completions, for comparison: the per-event cost
is the relay's (one read from the upstream, one write to the client), the same for both APIs.
bench/relay_floor.py measures what a relay of the same events costs at the least.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx

from run import KEY, Stack, cpu_split, proxy_config

EVENTS_PER_DELTA = 1  # the mock streams one response.output_text.delta per word
FRAME_EVENTS = 8  # created, in_progress, item added, part added, text done, part done, item done, completed
BOUND_US_PER_EVENT = 10.0
ADMIN_KEY = "sk-bench-admin-0001"


async def one_stream(session: aiohttp.ClientSession, url: str, words: int, chat: bool = False) -> int:
    """One stream read whole; returns its event count. `chat`: the same through chat completions,
    for comparison."""
    if chat:
        path, end = "/v1/chat/completions", b"data: [DONE]"
        body: dict[str, object] = {"model": "bench-chat", "messages": [{"role": "user", "content": "Write."}]}
        body |= {"max_tokens": words + 10, "stream": True}
    else:
        path, end = "/v1/responses", b"event: response.completed\n"
        body = {"model": "bench-chat", "input": "Write a long answer.", "max_output_tokens": words + 10, "stream": True}
    async with session.post(url + path, json=body, headers={"authorization": f"Bearer {KEY}"}) as reply:
        payload = await reply.read()
    if reply.status != 200 or end not in payload:
        raise SystemExit(f"stream failed: {reply.status} {payload[-300:]!r}")
    return payload.count(b"\n\n")


async def run_streams(url: str, count: int, words: int, chat: bool = False) -> list[int]:
    """`count` streams at once: with the upstream's pause between events, each event arrives alone."""
    connector = aiohttp.TCPConnector(limit=count)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        return list(await asyncio.gather(*(one_stream(session, url, words, chat) for _ in range(count))))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=20)
    parser.add_argument("--events", type=int, default=1000, help="events per stream (about)")
    parser.add_argument("--delay-ms", type=float, default=2.0, help="the upstream's pause between events")
    parser.add_argument("--json", dest="json_path")
    parser.add_argument("--chat", action="store_true", help="the same events as a chat stream, for comparison")
    parser.add_argument("--rounds", type=int, default=1, help="measured rounds (the median is printed)")
    args = parser.parse_args(argv)
    words = args.events - FRAME_EVENTS
    stack_args = argparse.Namespace(redis_url=None, log_level="info", workers=1)
    with tempfile.TemporaryDirectory() as tmp:
        stack = Stack(stack_args, Path(tmp))
        try:
            delay = str(args.delay_ms / 1000)
            stack.start_upstream(
                [sys.executable, "-m", "proxy.mock_upstream", "--chunks", str(words), "--chunk-delay", delay]
            )
            config = proxy_config(stack.upstream_port, stack.start_redis(), "info")
            config["admin_key_sha256"] = hashlib.sha256(ADMIN_KEY.encode()).hexdigest()
            stack.start_proxy(config)
            url = f"http://127.0.0.1:{stack.proxy_port}"
            asyncio.run(run_streams(url, 3, words, args.chat))  # warm-up: imports, pools, scripts loaded
            rounds: list[tuple[float, float, float, int]] = []  # user s, sys s, wall s, events
            for _ in range(args.rounds):
                user, system = cpu_split(stack.proxy.pid)
                started = time.monotonic()
                events = sum(asyncio.run(run_streams(url, args.streams, words, args.chat)))
                elapsed = time.monotonic() - started
                time.sleep(0.5)  # settlement follows the last byte
                user_after, system_after = cpu_split(stack.proxy.pid)
                rounds.append((user_after - user, system_after - system, elapsed, events))
            usage = httpx.get(url + "/admin/usage", headers={"authorization": f"Bearer {ADMIN_KEY}"}).json()
        finally:
            stack.stop()
    metered = usage["teams"]["bench"]["completion_tokens"]
    per_event = [(user + system) / events * 1e6 for user, system, _, events in rounds]
    user, system, elapsed, events = sorted(rounds, key=lambda r: (r[0] + r[1]) / r[3])[len(rounds) // 2]
    per_event_us = statistics.median(per_event)
    result = {
        "api": "chat" if args.chat else "responses",
        "streams": args.streams,
        "events_per_stream": round(events / args.streams),
        "proxy_cpu_ms_per_stream": round((user + system) / args.streams * 1000, 2),
        "proxy_cpu_us_per_event": round(per_event_us, 2),
        "proxy_user_us_per_event": round(user / events * 1e6, 2),
        "proxy_sys_us_per_event": round(system / events * 1e6, 2),
        "bound_us_per_event": BOUND_US_PER_EVENT,
        "output_tokens_metered": metered,
        "wall_s": round(elapsed, 2),
    }
    if args.rounds > 1:
        result["rounds_us_per_event"] = [round(value, 2) for value in per_event]
    print(json.dumps(result, indent=2))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=2))
    if metered < (args.streams * args.rounds + 3) * words:
        print("error: the streams were not metered in full")
        return 1
    return 0 if per_event_us <= BOUND_US_PER_EVENT else 1


if __name__ == "__main__":
    sys.exit(main())
