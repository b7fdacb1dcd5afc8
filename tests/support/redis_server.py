"""A private Redis per test session: a real redis-server on a free port when the binary exists,
else fakeredis' TCP server (with Lua) on a free port, so every test runs the same way anywhere.

`LLM_PROXY_REQUIRE_REDIS=1` (set by .ci/run) turns the fakeredis fallback into a failure, so
CI always tests real Redis.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time

import redis

from .ports import free_port


def redis_required() -> bool:
    return os.environ.get("LLM_PROXY_REQUIRE_REDIS", "") not in ("", "0")


class RedisServer:
    """One Redis on 127.0.0.1:`port` that tests may kill and restart."""

    def __init__(self, persistent: bool = False) -> None:
        self.persistent = persistent  # data survives kill() + start() (AOF, fsync always)
        self.real = shutil.which("redis-server") is not None
        if not self.real and redis_required():
            raise RuntimeError("LLM_PROXY_REQUIRE_REDIS is set but redis-server is not installed")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.workdir = tempfile.mkdtemp(prefix="llm-proxy-redis-")
        self._process: subprocess.Popen | None = None
        self._fake = None
        self._fake_data = None
        self.start()

    @property
    def running(self) -> bool:
        if self.real:
            return self._process is not None and self._process.poll() is None
        return self._fake is not None

    def start(self) -> None:
        if self.running:
            return
        if self.real:
            durability = (
                ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else ["--appendonly", "no"]
            )
            self._process = subprocess.Popen(
                [
                    "redis-server",
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    *durability,
                    "--dir",
                    self.workdir,
                    "--protected-mode",
                    "no",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        else:
            from fakeredis import TcpFakeServer

            TcpFakeServer.allow_reuse_address = True
            self._fake = TcpFakeServer(("127.0.0.1", self.port), server_type="redis")
            if self.persistent and self._fake_data is not None:
                self._fake.fake_server = self._fake_data
            self._fake_data = self._fake.fake_server
            threading.Thread(target=self._fake.serve_forever, daemon=True).start()
        self._wait_ready()

    def kill(self) -> None:
        """Stop the server abruptly (outage tests); `start()` brings it back on the same port."""
        if self._process is not None:
            self._process.kill()
            self._process.wait(10)
            self._process = None
        if self._fake is not None:
            self._fake.shutdown()
            self._fake.server_close()
            self._fake = None

    def pause(self) -> None:
        """SIGSTOP: connections are still accepted by the kernel, nothing is answered."""
        if self._process is None:
            raise RuntimeError("only a real redis-server can be paused")
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self._process is not None:
            self._process.send_signal(signal.SIGCONT)

    def flush(self) -> None:
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)
        client.flushall()
        client.script_flush()
        client.close()

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _wait_ready(self) -> None:
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.2)
        deadline = time.monotonic() + 10
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.RedisError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"redis did not start on port {self.port}") from None
                    time.sleep(0.02)
        finally:
            client.close()
