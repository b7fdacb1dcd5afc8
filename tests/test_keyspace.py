"""The in-process keyspace answers the scripts' Redis commands exactly as a real redis-server does.

Each case runs the same commands on a real Redis (EVAL of a tiny script, so replies pass
through Lua's conversions as they do for our scripts) and on `MemoryStore`'s embedded Lua over
`Keyspace`, and compares every reply.
"""

from __future__ import annotations

import time

import pytest
import redis

from proxy.limits.keyspace import Keyspace
from proxy.limits.memory_store import _Lua

# each case: a list of commands; every reply is compared (PTTL/TTL within the test's own slack)
CASES = {
    "hash": [
        ["HSET", "h", "a", "1", "b", "2"],
        ["HSET", "h", "a", "3"],
        ["HMGET", "h", "a", "b", "c"],
        ["HINCRBY", "h", "a", "-5"],
        ["HGET", "h", "a"],
        ["HGET", "h", "zz"],
        ["HSETNX", "h", "a", "9"],
        ["HSETNX", "h", "n", "9"],
        ["HLEN", "h"],
        ["HEXISTS", "h", "n"],
        ["HEXISTS", "h", "q"],
        ["HDEL", "h", "a", "b", "n", "q"],
        ["EXISTS", "h"],
        ["HGETALL", "h"],
    ],
    "hash gone with its last field": [
        ["HSET", "h", "a", "1"],
        ["PEXPIRE", "h", "100000"],
        ["HDEL", "h", "a"],
        ["PTTL", "h"],
        ["HSET", "h", "a", "1"],
        ["PTTL", "h"],
    ],
    "sorted set": [
        ["ZADD", "z", "5", "a", "3", "b", "3", "c"],
        ["ZADD", "z", "4", "a"],
        ["ZCARD", "z"],
        ["ZRANGEBYSCORE", "z", "-inf", "3"],
        ["ZRANGEBYSCORE", "z", "(3", "+inf"],
        ["ZCOUNT", "z", "-inf", "3"],
        ["ZCOUNT", "z", "(3", "+inf"],
        ["ZCOUNT", "missing", "-inf", "+inf"],
        ["ZSCORE", "z", "a"],
        ["ZSCORE", "z", "x"],
        ["ZADD", "z", "XX", "9", "x"],
        ["ZADD", "z", "XX", "9", "a"],
        ["ZADD", "z", "GT", "1", "a"],
        ["ZADD", "z", "CH", "GT", "10", "a"],
        ["ZADD", "z", "NX", "1", "a"],
        ["ZSCORE", "z", "a"],
        ["ZREMRANGEBYSCORE", "z", "-inf", "3"],
        ["ZRANGEBYSCORE", "z", "-inf", "+inf"],
        ["ZREM", "z", "a", "nope"],
        ["EXISTS", "z"],
    ],
    "strings and expiry": [
        ["SET", "s", "1", "NX", "EX", "100"],
        ["SET", "s", "2", "NX", "EX", "100"],
        ["GET", "s"],
        ["TTL", "s"],
        ["SET", "s", "3"],
        ["PTTL", "s"],
        ["INCRBY", "s", "4"],
        ["EXPIRE", "s", "50"],
        ["TTL", "s"],
        ["PEXPIRE", "missing", "10"],
        ["PTTL", "missing"],
        ["DEL", "s", "missing"],
        ["GET", "s"],
    ],
    "wrong type": [["SET", "s", "1"], ["HGET", "s", "a"]],
}

SCRIPT = """
local out = {}
for i, command in ipairs(cjson.decode(ARGV[1])) do
  local ok, reply = pcall(redis.call, unpack(command))
  if not ok then reply = 'ERR'
  elseif reply == false then reply = 'NIL'
  elseif type(reply) == 'table' and reply.ok then reply = 'STATUS:' .. reply.ok end
  if type(reply) == 'table' then
    local items = {}
    for j, item in ipairs(reply) do items[j] = item == false and 'NIL' or item end
    reply = items
  end
  out[i] = reply
end
return cjson.encode(out)
"""


def _in_memory(commands: list[list[str]]) -> list:
    """The same loop in Python, through the embedded runtime's conversions."""
    lua = _Lua(Keyspace())
    lua.runtime.execute("function __run(command) return redis.call(unpack(command)) end")
    run = lua.runtime.globals().__run
    now_ms = time.time_ns() // 1_000_000
    lua.now_ms = now_ms
    replies = []
    for command in commands:
        try:
            reply = run(lua.runtime.table_from(command))
        except Exception:
            replies.append("ERR")
            continue
        replies.append(_plain(reply))
    return replies


def _plain(reply):
    if reply is False:
        return "NIL"
    if isinstance(reply, (int, float, str)):
        return reply
    if reply["ok"] is not None:
        return "STATUS:" + reply["ok"]
    return [("NIL" if item is False else item) for item in reply.values()]


def _close(a, b) -> bool:
    return a == b or (isinstance(a, int) and isinstance(b, int) and abs(a - b) <= 50)


@pytest.mark.parametrize("name", CASES)
def test_keyspace_replies_as_redis_does(redis_url, name):
    import json

    commands = CASES[name]
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        expected = json.loads(client.eval(SCRIPT, 0, json.dumps(commands)))
    finally:
        client.close()
    got = _in_memory(commands)
    assert len(got) == len(expected)
    for command, want, have in zip(commands, expected, got, strict=True):
        want = [] if want == {} else want  # cjson writes an empty table as an object
        if command[0] in ("PTTL", "TTL"):
            assert _close(want, have), (command, want, have)
        else:
            assert want == have, (command, want, have)
