"""Real processes for multi-replica tests: `python -m proxy serve` replicas sharing one Redis, and
the mock upstream as its own process (so the test's own event loop never slows it down).

Each process writes its stdout and stderr to a file in a scratch directory (never a pipe: a full
pipe would block a chatty process), read back with `output()`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from .ports import free_port

ROOT = Path(__file__).parent.parent.parent
START_TIMEOUT_S = 60.0  # a safety net: three replicas starting on loaded cores once took more than 30 s
STOP_TIMEOUT_S = 10.0


class Process:
    """One child process on 127.0.0.1:`port`, ready once GET `health_path` answers 200."""

    def __init__(
        self,
        argv: list[str],
        port: int,
        health_path: str,
        *,
        name: str,
        workdir: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.argv = argv
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.health_path = health_path
        self.name = name
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="llm-proxy-proc-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / f"{name}.log"
        self.env = {**os.environ, **(env or {})}
        self.popen: subprocess.Popen | None = None

    def start(self) -> Process:
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=self.env)
        return self

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> Process:
        deadline = time.monotonic() + timeout_s
        # one client for every poll: each new client loads the CA bundle (~40 ms of CPU), which
        # every 50 ms would take a core from the processes starting up
        with httpx.Client(timeout=1) as http:
            while True:
                if self.popen is None or self.popen.poll() is not None:
                    raise RuntimeError(f"{self.name} exited before it was ready:\n{self.output()}")
                try:
                    if http.get(self.url + self.health_path).status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{self.name} did not answer {self.health_path} in {timeout_s}s:\n{self.output()}"
                    )
                time.sleep(0.05)

    def signal(self, signum: int) -> None:
        assert self.popen is not None
        self.popen.send_signal(signum)

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def output(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM, wait, then SIGKILL if it did not exit in time."""
        if self.popen is None:
            return
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout_s)
        self.popen = None


def start_all(processes: list[Process], timeout_s: float = START_TIMEOUT_S) -> list[Process]:
    """Start every process at once, then wait for each (imports run in parallel)."""
    for process in processes:
        process.start()
    try:
        for process in processes:
            process.wait_ready(timeout_s)
    except BaseException:
        stop_all(processes)
        raise
    return processes


def stop_all(processes: list[Process]) -> None:
    for process in processes:
        if process.alive:
            process.signal(signal.SIGTERM)
    for process in processes:
        process.stop()


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def proxy_process(
    config_path: Path,
    *,
    name: str = "proxy",
    port: int | None = None,
    argv0: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> Process:
    """`python -m proxy serve --config FILE --port P` (or `argv0 serve ...`, e.g. the `llm-proxy` script)."""
    port = port or free_port()
    command = argv0 or [sys.executable, "-m", "proxy"]
    argv = [*command, "serve", "--config", str(config_path), "--port", str(port)]
    return Process(argv, port, "/healthz", name=name, workdir=config_path.parent, env=env)


def start_proxies(config_path: Path, count: int) -> list[Process]:
    """`count` replicas of one config file, each on its own free port."""
    return start_all([proxy_process(config_path, name=f"proxy{i}") for i in range(count)])


class MockProcess(Process):
    """`python -m proxy.mock_upstream` in its own process; `stats()` and `clear()` over HTTP."""

    def __init__(self, *, chunk_delay_s: float = 0.0, chunks: int | None = None, workdir: Path | None = None):
        port = free_port()
        argv = [sys.executable, "-m", "proxy.mock_upstream", "--port", str(port), "--chunk-delay", str(chunk_delay_s)]
        if chunks is not None:
            argv += ["--chunks", str(chunks)]
        super().__init__(argv, port, "/_mock/stats", name="mock-upstream", workdir=workdir)

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def stats(self) -> dict[str, int]:
        return httpx.get(self.url + "/_mock/stats", timeout=5).json()

    def clear(self) -> None:
        with httpx.Client(timeout=5) as http:
            for path in ("/_mock/stats", "/_mock/requests", "/_mock/faults"):
                http.delete(self.url + path).raise_for_status()
