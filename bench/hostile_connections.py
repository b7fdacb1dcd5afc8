"""What hostile connections cost one proxy process, and whether authorised clients are still served.

    python bench/hostile_connections.py                       # this checkout
    python bench/hostile_connections.py --root /path/to/other/checkout --no-server-section

Starts the mock upstream and `python -m proxy serve` (in-process store), sets the proxy's
open-file limit to `--fd-limit` (soft and hard), then:

1. one connection sends a `--header-mib` MiB header line: the proxy's CPU and RSS growth for it,
   how much it accepted, and the latency of authorised requests sent meanwhile;
2. `--flood` connections each send a request line, then one header line every 5 s, reconnecting
   when closed, for `--seconds`: the proxy's CPU, and how many authorised requests (one every
   0.5 s, 5 s timeout) succeeded.

`--root` runs another checkout's proxy (for a before/after comparison; `--no-server-section`
when that checkout has no `server:` config section).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import httpx
import yaml

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))

from tests.support.configs import KEYS, config_dict
from tests.support.ports import free_port

KEY = KEYS["alice"]
CHAT = b'{"model": "chat-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}'
HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def wait_ready(url: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer")


async def probe(port: int, stop: asyncio.Event, results: list[float | None]) -> None:
    """One authorised request every 0.5 s on a fresh connection: its latency, or None."""
    while not stop.is_set():
        started = time.monotonic()
        try:
            async with httpx.AsyncClient(timeout=5) as client:
                response = await client.post(
                    f"http://127.0.0.1:{port}/v1/chat/completions",
                    content=CHAT,
                    headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"},
                )
            results.append(time.monotonic() - started if response.status_code == 200 else None)
        except httpx.HTTPError:
            results.append(None)
        try:
            await asyncio.wait_for(stop.wait(), 0.5)
        except TimeoutError:
            pass


def summary(results: list[float | None]) -> str:
    ok = sorted(r for r in results if r is not None)
    if not ok:
        return f"authorised: 0/{len(results)} ok"
    return f"authorised: {len(ok)}/{len(results)} ok, p50 {ok[len(ok) // 2] * 1000:.0f} ms, max {ok[-1] * 1000:.0f} ms"


def big_header(port: int, mib: int) -> int:
    line = b"a" * (mib * 1024 * 1024)
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(HEAD + b"x-big: ")
        view = memoryview(line)
        try:
            while sent < len(line):
                sent += sock.send(view[sent : sent + 65536])
            sock.sendall(b"\r\n\r\n")
            sock.recv(1024)
        except OSError:
            pass
    return sent


async def header_attack(port: int, pid: int, mib: int) -> None:
    stop = asyncio.Event()
    results: list[float | None] = []
    cpu0, rss0 = cpu_s(pid), rss_mb(pid)
    prober = asyncio.ensure_future(probe(port, stop, results))
    started = time.monotonic()
    sent = await asyncio.to_thread(big_header, port, mib)
    elapsed = time.monotonic() - started
    await asyncio.sleep(1)
    stop.set()
    await prober
    print(
        f"{mib} MiB header line: accepted {sent / 2**20:.1f} MiB in {elapsed:.2f}s; proxy CPU "
        f"{cpu_s(pid) - cpu0:.2f}s (incl. the probes), RSS +{rss_mb(pid, 'VmHWM') - rss0:.0f} MB peak; "
        f"{summary(results)}"
    )


async def slowloris(port: int, stop: asyncio.Event, counts: dict[str, int]) -> None:
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            counts["connect_failed"] += 1
            await asyncio.sleep(1)
            continue
        counts["connects"] += 1
        try:
            writer.write(HEAD)
            while not stop.is_set():
                try:
                    data = await asyncio.wait_for(reader.read(1024), 5)
                except TimeoutError:
                    writer.write(b"x-a: b\r\n")
                    await writer.drain()
                    continue
                if not data:
                    break
        except OSError:
            pass
        finally:
            writer.close()


async def flood(port: int, pid: int, connections: int, seconds: float) -> None:
    stop = asyncio.Event()
    counts = {"connects": 0, "connect_failed": 0}
    results: list[float | None] = []
    cpu0 = cpu_s(pid)
    attackers = [asyncio.ensure_future(slowloris(port, stop, counts)) for _ in range(connections)]
    await asyncio.sleep(2)  # all connected (or refused)
    prober = asyncio.ensure_future(probe(port, stop, results))
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.gather(prober, *attackers, return_exceptions=True)
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    print(
        f"{connections} trickling connections for {seconds:.0f}s: {counts['connects']} connects, "
        f"{counts['connect_failed']} failed; proxy CPU {cpu_s(pid) - cpu0:.2f}s, fds after {fds}; "
        f"{summary(results)}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=HERE)
    parser.add_argument("--no-server-section", action="store_true")
    parser.add_argument("--max-connections", type=int, default=900)
    parser.add_argument("--fd-limit", type=int, default=1024)
    parser.add_argument("--header-mib", type=int, default=48)
    parser.add_argument("--flood", type=int, default=1100)
    parser.add_argument("--seconds", type=float, default=20)
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the flood client's own sockets

    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"hostile-{os.getpid()}"
    workdir.mkdir(parents=True, exist_ok=True)
    mock_port, proxy_port = free_port(), free_port()
    config = config_dict(f"http://127.0.0.1:{mock_port}/v1")
    config["log_level"] = "error"
    config["upstreams"]["mock"]["max_connections"] = 50
    if not args.no_server_section:
        config["server"] = {"max_connections": args.max_connections}
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))

    with open(workdir / "proxy.log", "wb") as log:
        run(args, config, workdir, log, mock_port, proxy_port)
    return 0


def run(args: argparse.Namespace, config: dict, workdir: Path, log: IO[bytes], mock_port: int, proxy_port: int) -> None:
    env = {**os.environ, "PYTHONPATH": str(args.root)}
    mock = subprocess.Popen(
        [sys.executable, "-m", "proxy.mock_upstream", "--port", str(mock_port)],
        cwd=HERE,
        env={**os.environ, "PYTHONPATH": str(HERE)},
        stdout=log,
        stderr=log,
    )
    proxy = subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve", "--config", str(workdir / "config.yaml"), "--port", str(proxy_port)],
        cwd=args.root,
        env=env,
        stdout=log,
        stderr=log,
    )
    try:
        wait_ready(f"http://127.0.0.1:{mock_port}/_mock/stats")
        wait_ready(f"http://127.0.0.1:{proxy_port}/healthz")
        resource.prlimit(proxy.pid, resource.RLIMIT_NOFILE, (args.fd_limit, args.fd_limit))
        print(
            f"proxy from {args.root}, fd limit {args.fd_limit}, "
            f"server: {'(none)' if args.no_server_section else config['server']}"
        )
        asyncio.run(header_attack(proxy_port, proxy.pid, args.header_mib))
        asyncio.run(flood(proxy_port, proxy.pid, args.flood, args.seconds))
    finally:
        for process in (proxy, mock):
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()


if __name__ == "__main__":
    raise SystemExit(main())
