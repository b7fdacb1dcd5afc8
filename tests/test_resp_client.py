"""The lean hot-path Redis connection: replies in order, errors, timeouts, reconnects, AUTH, SELECT."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis

from proxy.errors import RespConnectionError, RespReplyError
from proxy.limits.resp import RespClient
from tests.support.stalls import Stalls


async def test_pipelined_replies_arrive_in_order(redis_url):
    client = RespClient(redis_url, timeout_s=2)
    try:
        replies = await asyncio.gather(*(client.call("ECHO", str(i)) for i in range(500)))
        assert replies == [str(i).encode() for i in range(500)]
        assert await client.call("INCRBY", "counter", 5) == 5
        with pytest.raises(RespReplyError, match="NOSCRIPT"):
            await client.call("EVALSHA", "0" * 40, 0)
        assert await client.call("PING") == b"PONG"  # an error reply leaves the connection usable
    finally:
        await client.close()


async def test_selects_the_database_of_the_url(redis_url):
    client = RespClient(redis_url.rsplit("/", 1)[0] + "/3", timeout_s=2)
    try:
        await client.call("SET", "in-db-3", "yes")
    finally:
        await client.close()
    check = redis.Redis.from_url(redis_url.rsplit("/", 1)[0] + "/3")
    assert check.get("in-db-3") == b"yes"
    assert redis.Redis.from_url(redis_url).get("in-db-3") is None
    check.close()


async def test_auth_with_password(redis_server, redis_url):
    admin = redis.Redis.from_url(redis_url)
    admin.config_set("requirepass", "s3cret")
    try:
        host = redis_url.split("//")[1]
        good = RespClient(f"redis://:s3cret@{host}", timeout_s=2)
        assert await good.call("PING") == b"PONG"
        await good.close()
        bad = RespClient(f"redis://:wrong@{host}", timeout_s=2)
        with pytest.raises(RespReplyError):
            await bad.call("PING")
        await bad.close()
    finally:
        authed = redis.Redis.from_url(redis_url, password="s3cret")
        authed.config_set("requirepass", "")
        authed.close()
        admin.close()


async def test_a_silent_server_times_out_and_the_next_call_reconnects():
    accepted = []

    async def silent(reader, writer):
        accepted.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = RespClient(f"redis://127.0.0.1:{port}/0", timeout_s=0.2)
    try:
        started = time.monotonic()
        results = await asyncio.gather(client.call("PING"), client.call("PING"), return_exceptions=True)
        assert all(isinstance(r, RespConnectionError) for r in results)
        assert time.monotonic() - started < 1.0
        with pytest.raises(RespConnectionError):
            await client.call("PING")
        assert len(accepted) == 2, "a timed-out connection is dropped and a new one made"
    finally:
        await client.close()
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_connection_refused_is_a_connection_error():
    from tests.support.ports import free_port

    client = RespClient(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.5)
    with pytest.raises(RespConnectionError):
        await client.call("PING")
    await client.close()


async def test_server_restart_is_survived(redis_server, redis_url):
    client = RespClient(redis_url, timeout_s=0.5)
    try:
        assert await client.call("PING") == b"PONG"
        redis_server.kill()
        with pytest.raises(RespConnectionError):
            await client.call("PING")
        redis_server.start()
        assert await client.call("PING") == b"PONG"
    finally:
        await client.close()


async def test_db_in_the_query_string_as_redis_py_reads_it(redis_url):
    base = redis_url.rsplit("/", 1)[0]
    client = RespClient(base + "/?db=5", timeout_s=2)
    try:
        await client.call("SET", "via-query", "1")
    finally:
        await client.close()
    check = redis.Redis.from_url(base + "/?db=5")
    assert check.get("via-query") == b"1"
    check.close()


async def test_a_refused_auth_closes_its_socket():
    """A server that refuses every AUTH: each attempt's socket must be closed by the client."""
    opened, closed = [], []

    async def refuse(reader, writer):
        opened.append(writer)
        await reader.read(1024)
        writer.write(b"-WRONGPASS invalid username-password pair\r\n")
        await writer.drain()
        if not await reader.read(1024):  # EOF: the client hung up
            closed.append(writer)
        writer.close()

    server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = RespClient(f"redis://:wrong@127.0.0.1:{port}/0", timeout_s=2)
    try:
        for _ in range(5):
            with pytest.raises(RespReplyError):
                await client.call("PING")
        await asyncio.sleep(0.1)
        assert len(opened) == 5 and len(closed) == 5
    finally:
        await client.close()
        server.close()
        await server.wait_closed()


async def test_a_reply_nobody_asked_for_fails_the_call_and_names_it(caplog):
    """Redis in protected mode answers a connection with DENIED before any command: the call fails
    as a connection error that quotes it (no IndexError, no transport traceback)."""
    denied = b"-DENIED Redis is running in protected mode because protected mode is enabled\r\n"

    async def deny(reader, writer):
        writer.write(denied)
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.close()

    server = await asyncio.start_server(deny, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = RespClient(f"redis://127.0.0.1:{port}/0", timeout_s=2)
    try:
        for _ in range(3):
            with pytest.raises((RespConnectionError, RespReplyError), match="DENIED"):
                await client.call("PING")
                await asyncio.sleep(0.05)  # DENIED may arrive before or after the PING is written
                await client.call("PING")
            await asyncio.sleep(0.6)  # past the reconnect back-off
        assert not [r for r in caplog.records if "Fatal error" in r.getMessage() or r.exc_info], caplog.text
    finally:
        await client.close()
        server.close()
        await server.wait_closed()


async def test_a_peer_that_closes_between_calls_is_a_connection_error():
    """The server closes the socket right after a reply: the next call must raise
    RespConnectionError (uvloop raised RuntimeError writing to the closed transport)."""

    async def reply_then_close(reader, writer):
        await reader.read(1024)
        writer.write(b"+PONG\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(reply_then_close, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = RespClient(f"redis://127.0.0.1:{port}/0", timeout_s=1)
    try:
        assert await client.call("PING") == b"PONG"
        for _ in range(20):  # whether or not connection_lost has run yet, never anything else
            try:
                assert await client.call("PING") == b"PONG"
            except RespConnectionError:
                pass
    finally:
        await client.close()
        server.close()
        await server.wait_closed()


CONCURRENT = 30
TIMEOUT_S = 0.25
BOUND_S = TIMEOUT_S + 0.1


async def _timed_calls(client: RespClient, count: int) -> list[tuple[object, float, float]]:
    """`count` PINGs at once: (result or error, started, ended) each, by time.monotonic()."""

    async def one() -> tuple[object, float, float]:
        started = time.monotonic()
        try:
            result: object = await client.call("PING")
        except RespConnectionError as exc:
            result = exc
        return result, started, time.monotonic()

    return await asyncio.gather(*(one() for _ in range(count)))


def _slowest(results: list[tuple[object, float, float]], stalls: Stalls) -> list[float]:
    """The three longest calls, less the time this process was not scheduled during each (a
    loaded machine's, not the client's: 30 callers once took 0.70 s together, one stall)."""
    return sorted(ended - started - stalls.within(started, ended) for _, started, ended in results)[-3:]


async def test_waiting_callers_share_one_connect_then_back_off():
    """A server that accepts and never answers AUTH: 30 callers at once make one connection and
    all fail within their timeout (they used to reconnect one after the other, a timeout each);
    right after, calls fail at once without connecting, until the back-off ends."""
    accepted = []

    async def silent(reader, writer):
        accepted.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = RespClient(f"redis://:secret@127.0.0.1:{port}/0", timeout_s=TIMEOUT_S)
    try:
        with Stalls() as stalls:
            results = await _timed_calls(client, CONCURRENT)
            assert all(isinstance(result, RespConnectionError) for result, _, _ in results)
            assert max(slowest := _slowest(results, stalls)) <= BOUND_S, slowest
            assert len(accepted) == 1, "the callers did not share one connect attempt"
            started = time.monotonic()
            with pytest.raises(RespConnectionError, match="next connect attempt"):
                await client.call("PING")
            failed_in = time.monotonic() - started - stalls.within(started, time.monotonic())
        assert failed_in < 0.05 and len(accepted) == 1, "no back-off"
        await asyncio.sleep(0.15)  # past the first back-off (0.1 s): one new attempt
        await _timed_calls(client, CONCURRENT)
        assert len(accepted) == 2
    finally:
        await client.close()
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("fault", ["partition", "refused"])
async def test_an_unreachable_redis_fails_each_caller_within_its_timeout(fault, redis_server, redis_url):
    """30 callers at a time, for 2 s of outage: each fails within its timeout + 0.1 s; then Redis
    returns and calls succeed again."""
    from tests.support.relay import Relay

    relay = Relay(redis_server.port) if fault == "partition" else None
    client = RespClient(relay.url() if relay else redis_url, timeout_s=TIMEOUT_S)
    try:
        assert await client.call("PING") == b"PONG"
        relay.partition() if relay else redis_server.kill()
        try:
            results = []
            deadline = time.monotonic() + 2
            with Stalls() as stalls:
                while time.monotonic() < deadline:
                    results += await _timed_calls(client, CONCURRENT)
        finally:
            relay.heal() if relay else redis_server.start()
        assert all(isinstance(result, RespConnectionError) for result, _, _ in results)
        assert max(slowest := _slowest(results, stalls)) <= BOUND_S, slowest
        deadline = time.monotonic() + 1.5  # at most one back-off (0.5 s) and one timeout away
        while (await _timed_calls(client, 1))[0][0] != b"PONG":
            assert time.monotonic() < deadline, "no reconnect after the outage"
            await asyncio.sleep(0.02)
    finally:
        await client.close()
        if relay:
            relay.close()
