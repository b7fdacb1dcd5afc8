"""A private Redis Cluster per test session: three `redis-server --cluster-enabled yes` masters on
free loopback ports (tests/support/ports.py), joined with `redis-cli --cluster create ... --cluster-replicas 0`.

Needs `redis-server` and `redis-cli` (Debian: redis-server brings redis-tools). Without them the
`redis_cluster` fixture skips, unless `LLM_PROXY_REQUIRE_CLUSTER=1` (set by .ci/run) makes it fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time

import redis

from .ports import cluster_node_ports

MASTERS = 3
READY_TIMEOUT_S = 20.0


def cluster_available() -> bool:
    return shutil.which("redis-server") is not None and shutil.which("redis-cli") is not None


def cluster_required() -> bool:
    return os.environ.get("LLM_PROXY_REQUIRE_CLUSTER", "") not in ("", "0")


class RedisCluster:
    """Three masters on 127.0.0.1, every slot covered, no replicas."""

    def __init__(self, masters: int = MASTERS) -> None:
        self.workdir = tempfile.mkdtemp(prefix="llm-proxy-cluster-")
        self.ports = cluster_node_ports(masters)
        self.url = f"redis+cluster://127.0.0.1:{self.ports[0]}"
        self._processes: list[subprocess.Popen] = []
        try:
            for port in self.ports:
                self._processes.append(self._start_node(port))
            for port in self.ports:
                self._wait_ping(port)
            self._create()
            self._wait_state_ok()
        except BaseException:
            self.stop()
            raise

    def _start_node(self, port: int) -> subprocess.Popen:
        node_dir = os.path.join(self.workdir, str(port))
        os.makedirs(node_dir, exist_ok=True)  # a restarted node rejoins from its nodes.conf
        with open(os.path.join(node_dir, "redis.log"), "ab") as log:
            return subprocess.Popen(
                [
                    "redis-server",
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--protected-mode",
                    "no",
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    os.path.join(node_dir, "nodes.conf"),
                    "--cluster-node-timeout",
                    "5000",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    node_dir,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def _create(self) -> None:
        nodes = [f"127.0.0.1:{port}" for port in self.ports]
        result = subprocess.run(
            ["redis-cli", "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if result.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{result.stdout}\n{result.stderr}")

    def _client(self, port: int, timeout: float = 2.0) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=timeout)

    def _wait_ping(self, port: int) -> None:
        process = self._processes[self.ports.index(port)]

        def ready(client: redis.Redis) -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"redis cluster node {port} exited:\n{self.log(port)}")
            return client.ping()

        self._wait(port, ready, "answer PING")

    def _wait_state_ok(self) -> None:
        for port in self.ports:
            self._wait(port, self._state_ok, "reach cluster_state:ok")

    def _state_ok(self, client: redis.Redis) -> bool:
        info = client.execute_command("CLUSTER", "INFO")
        info = info.decode() if isinstance(info, bytes) else info
        fields = dict(line.split(":", 1) for line in info.split() if ":" in line)
        return fields.get("cluster_state") == "ok" and fields.get("cluster_known_nodes") == str(len(self.ports))

    def _wait(self, port: int, ready, what: str) -> None:
        client = self._client(port, timeout=0.5)
        deadline = time.monotonic() + READY_TIMEOUT_S
        try:
            while True:
                try:
                    if ready(client):
                        return
                except redis.RedisError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"redis cluster node {port} did not {what} in {READY_TIMEOUT_S}s:\n{self.log(port)}"
                    )
                time.sleep(0.05)
        finally:
            client.close()

    def log(self, port: int) -> str:
        try:
            with open(os.path.join(self.workdir, str(port), "redis.log"), encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def kill(self, port: int) -> None:
        """Stop one master abruptly (outage tests); `restart(port)` brings it back, empty."""
        process = self._processes[self.ports.index(port)]
        process.kill()
        process.wait(10)

    def restart(self, port: int) -> None:
        """Start a killed master again and wait until every node says cluster_state:ok."""
        self._processes[self.ports.index(port)] = self._start_node(port)
        self._wait_ping(port)
        self._wait_state_ok()

    def flush(self) -> None:
        """FLUSHALL and SCRIPT FLUSH on every master."""
        for port in self.ports:
            client = self._client(port)
            try:
                client.flushall()
                client.script_flush()
            finally:
                client.close()

    def stop(self) -> None:
        for process in self._processes:
            if process.poll() is None:
                process.kill()
        for process in self._processes:
            process.wait(10)
        self._processes = []
        shutil.rmtree(self.workdir, ignore_errors=True)
