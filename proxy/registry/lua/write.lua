-- write: create, replace or delete one registry entry if it is as the caller last read it, bump
-- the registry version and append the audit record, all at once.
-- KEYS: entries hash, revs hash, version, audit zset, changed zset (proxy/registry/layout.py)
-- ARGV: name, expected rev ('' = must not exist), entry json ('' = delete), audit json, now ms,
--       audit retention ms
-- Reply: {1, new version}, or {0, current rev (-1: absent)} when the entry is not as expected.
local exists = redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1
local current = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '-1')
if not exists then current = -1 end
if (ARGV[2] == '' and exists) or (ARGV[2] ~= '' and current ~= tonumber(ARGV[2])) then
  return {0, current}
end
local version = redis.call('INCR', KEYS[3])
if ARGV[3] == '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('HDEL', KEYS[2], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
  redis.call('HSET', KEYS[2], ARGV[1], version)
end
redis.call('ZADD', KEYS[5], version, ARGV[1])
local now = tonumber(ARGV[5])
redis.call('ZADD', KEYS[4], now, string.format('%012d', version) .. ' ' .. ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', '(' .. string.format('%.0f', now - tonumber(ARGV[6])))
return {1, version}
