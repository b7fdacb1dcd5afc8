"""Where the floor of a relayed event is: the same 1,000-event streams through the proxy and through
two relays that do nothing but relay, side by side, CPU per event split into user and sys.

    python bench/relay_floor.py                    # each event in its own read (2 ms apart)
    python bench/relay_floor.py --delay-ms 0       # events batched by the network
    python bench/relay_floor.py --chat --rounds 5 --json floor.json

The relays, each one process on uvloop, as the proxy:

- `tcp`: bytes from the client's socket to the upstream's and back, `transport.write` from
  `data_received`: no HTTP parsing, no task, no await. What the kernel (recv, send, epoll) and
  one event-loop callback cost per event.
- `asgi`: uvicorn with httptools and an aiohttp client, each upstream chunk one ASGI `send`: the
  frameworks the proxy is built on, with nothing of the proxy's own (no limits, no meter).
- `proxy`: `llm-proxy serve --workers 1` with Redis limits, budgets, metrics and the request log
  on, as bench/responses_stream.py runs it.

The upstream is the mock (`python -m proxy.mock_upstream`), the client bench/responses_stream.py's;
the targets take turns round by round, so a noisy neighbour weighs on all of them alike. Printed:
the median over the rounds of each target's user, sys and total CPU per event.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from responses_stream import FRAME_EVENTS, run_streams
from run import Stack, cpu_split, free_port, proxy_config

# -- the relays (run as `relay_floor.py --serve KIND --port P --upstream-port U`) -----------------


def serve_tcp(port: int, upstream_port: int) -> None:
    import uvloop

    class Upstream(asyncio.Protocol):
        def __init__(self, client: asyncio.Transport) -> None:
            self.client = client

        def data_received(self, data: bytes) -> None:
            self.client.write(data)

        def connection_lost(self, exc: Exception | None) -> None:
            self.client.close()

    class Client(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:  # uvloop's, not an asyncio.Transport subclass
            self.transport, self.pending, self.upstream = transport, [b""], None
            self.connecting = asyncio.ensure_future(self.connect())

        async def connect(self) -> None:
            loop = asyncio.get_running_loop()
            upstream, _ = await loop.create_connection(lambda: Upstream(self.transport), "127.0.0.1", upstream_port)
            self.upstream = upstream
            upstream.write(b"".join(self.pending))

        def data_received(self, data: bytes) -> None:
            if self.upstream is None:
                self.pending.append(data)
            else:
                self.upstream.write(data)

        def connection_lost(self, exc: Exception | None) -> None:
            if self.upstream is not None:
                self.upstream.close()

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Client, "127.0.0.1", port)
        await server.serve_forever()

    uvloop.run(main())


def serve_asgi(port: int, upstream_port: int) -> None:
    import aiohttp
    import uvicorn

    sessions: list[aiohttp.ClientSession] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] == "lifespan.startup":
                timeout = aiohttp.ClientTimeout(total=None, sock_read=60)  # as the proxy reads
                sessions.append(aiohttp.ClientSession(timeout=timeout))
                await send({"type": "lifespan.startup.complete"})
            await sessions[0].close()
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        url = f"http://127.0.0.1:{upstream_port}{scope['path']}"
        async with sessions[0].post(url, data=body, headers={"content-type": "application/json"}) as upstream:
            headers = [(b"content-type", upstream.headers["content-type"].encode())]
            await send({"type": "http.response.start", "status": upstream.status, "headers": headers})
            async for chunk in upstream.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools", log_level="warning")


# -- the measurement -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=20)
    parser.add_argument("--events", type=int, default=1000, help="events per stream (about)")
    parser.add_argument("--delay-ms", type=float, default=2.0, help="the upstream's pause between events")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds per target (the median is printed)")
    parser.add_argument("--chat", action="store_true", help="the same events as a chat stream")
    parser.add_argument("--json", dest="json_path")
    parser.add_argument("--serve", choices=("tcp", "asgi"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--upstream-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        (serve_tcp if args.serve == "tcp" else serve_asgi)(args.port, args.upstream_port)
        return 0
    words = args.events - FRAME_EVENTS
    with tempfile.TemporaryDirectory() as tmp:
        stack = Stack(argparse.Namespace(redis_url=None, log_level="info", workers=1), Path(tmp))
        try:
            delay = str(args.delay_ms / 1000)
            stack.start_upstream(
                [sys.executable, "-m", "proxy.mock_upstream", "--chunks", str(words), "--chunk-delay", delay]
            )
            stack.start_proxy(proxy_config(stack.upstream_port, stack.start_redis(), "info"))
            targets = {"proxy": (stack.proxy.pid, stack.proxy_port)}
            for kind in ("tcp", "asgi"):
                port = free_port()
                argv = [sys.executable, __file__, "--serve", kind, "--port", str(port)]
                relay = stack.spawn([*argv, "--upstream-port", str(stack.upstream_port)], port, f"{kind}.log")
                targets[kind] = (relay.pid, port)
            samples: dict[str, list[tuple[float, float]]] = {name: [] for name in targets}
            for _, port in targets.values():  # warm-up: imports, pools, scripts loaded
                asyncio.run(run_streams(f"http://127.0.0.1:{port}", 3, words, args.chat))
            for round_ in range(args.rounds):
                order = list(targets.items())
                for name, (pid, port) in order if round_ % 2 == 0 else reversed(order):
                    user, system = cpu_split(pid)
                    events = sum(asyncio.run(run_streams(f"http://127.0.0.1:{port}", args.streams, words, args.chat)))
                    time.sleep(0.3)  # the proxy settles after the last byte
                    user_after, system_after = cpu_split(pid)
                    samples[name].append(((user_after - user) / events * 1e6, (system_after - system) / events * 1e6))
        finally:
            stack.stop()
    result: dict[str, Any] = {"api": "chat" if args.chat else "responses", "delay_ms": args.delay_ms}
    result |= {"streams": args.streams, "events_per_stream": args.events, "rounds": args.rounds}
    for name in ("tcp", "asgi", "proxy"):
        users, systems = [u for u, _ in samples[name]], [s for _, s in samples[name]]
        result[name] = {
            "user_us_per_event": round(statistics.median(users), 2),
            "sys_us_per_event": round(statistics.median(systems), 2),
            "total_us_per_event": round(statistics.median(u + s for u, s in samples[name]), 2),
        }
    print(yaml.safe_dump(result, sort_keys=False), end="")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
