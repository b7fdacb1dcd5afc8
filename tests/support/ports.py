"""Free loopback ports for the servers a test starts, which bind them a moment later.

A port from `bind(0)` comes from the kernel's ephemeral range, where every outgoing connection takes
its source port too: between the check and the server's own bind, one of the thousands of client
connections the tests make (from several pytest-xdist workers at once) can take it, and the server
fails with "address already in use". So ports come from below the ephemeral range, each worker from
its own block, handed out in turn (a port comes round again only after the whole block), and each
checked free when handed out. Where the ephemeral range leaves no room below it, `bind(0)` it is.

    [10000, 11000)  Redis Cluster nodes     (their cluster bus listens on the port + 10000)
    [20000, 21000)  those nodes' buses
    [21000, start of the ephemeral range)   every other server
"""

from __future__ import annotations

import os
import random
import socket

EPHEMERAL_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"
CLUSTER_BUS_OFFSET = 10_000  # fixed by Redis: a node's cluster bus listens on its port + 10000
CLUSTER_NODES = range(10_000, 11_000)
FIRST_SERVER_PORT = CLUSTER_NODES.stop + CLUSTER_BUS_OFFSET
MIN_BLOCK = 100  # fewer ports than this per worker: use bind(0)


def bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ephemeral_start() -> int:
    try:
        with open(EPHEMERAL_RANGE, encoding="ascii") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return FIRST_SERVER_PORT  # unknown: leaves no room, so bind(0)


def _worker_block(ports: range) -> range:
    """This process's share of `ports`: xdist worker gwN of M gets the N-th of M blocks."""
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    index = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
    size = len(ports) // count
    return ports[index * size : (index + 1) * size]


class PortBlock:
    """A block of ports handed out in turn, from a random one (another test session may be using
    the same block: it most likely started elsewhere in it), each checked free when handed out."""

    def __init__(self, ports: range) -> None:
        self.ports = ports
        self.next = random.randrange(len(ports)) if ports else 0

    def take(self, *, bus: bool = False) -> int:
        """The next free port (and, with `bus`, whose port + 10000 is free as well)."""
        for _ in range(len(self.ports)):
            port = self.ports[self.next]
            self.next = (self.next + 1) % len(self.ports)
            if bindable(port) and (not bus or bindable(port + CLUSTER_BUS_OFFSET)):
                return port
        raise RuntimeError(f"no free port in {self.ports}")


class _Blocks:
    """This process's blocks: one for servers, one for Redis Cluster nodes."""

    def __init__(self) -> None:
        self.servers = PortBlock(_worker_block(range(FIRST_SERVER_PORT, _ephemeral_start())))
        self.cluster_nodes = PortBlock(_worker_block(CLUSTER_NODES))


_blocks: _Blocks | None = None  # one per process: each xdist worker hands out its own blocks


def _own_blocks() -> _Blocks:
    global _blocks
    if _blocks is None:
        _blocks = _Blocks()
    return _blocks


def free_port() -> int:
    servers = _own_blocks().servers
    if len(servers.ports) < MIN_BLOCK:  # no room below the ephemeral range
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])
    return servers.take()


def cluster_node_ports(count: int) -> list[int]:
    """`count` free ports for Redis Cluster nodes whose bus ports (+10000) are free too."""
    nodes = _own_blocks().cluster_nodes
    return [nodes.take(bus=True) for _ in range(count)]
