-- prelude: what every script here shares, written once. scripts.py puts its code (these comment
-- lines left out) on the first line of each script, so a line number in a script's error is the
-- line of that script's own file (an error inside the prelude says line 1). Its code lines must
-- therefore carry no comment after code and no long string: scripts.py refuses them.

if redis.replicate_commands then pcall(redis.replicate_commands) end

-- layout.UNLIMITED: a limit the scope does not have
local UNLIMITED = -1
-- a bucket's level counts 1/UNITS of a request or token: one of `rate` a minute gains `rate` a ms
local UNITS = 60000
-- a key outlives the moment its data says it ends by this much
local TTL_MARGIN_MS = 1000

-- an integer as Redis takes it (no exponent, no fraction)
local function int(x)
  if x == 0 then return '0' end
  return string.format('%.0f', x)
end

-- values[offset + i] under names[i]: ARGV and KEYS by the names layout.py builds them from
local function named(names, values, offset)
  local t = {}
  offset = offset or 0
  for i, name in ipairs(names) do t[name] = values[offset + i] end
  return t
end

-- now, in ms: the caller's pinned clock when it passed one (tests), else Redis' own (TIME), the one
-- clock all replicas share
local function clock_ms(now_us)
  if now_us ~= '' then return math.floor(tonumber(now_us) / 1000) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- a token bucket's level at now_ms, from the level and time it was last written (full if never)
local function refill(level, ts, rate, capacity, now_ms)
  local cap = capacity * UNITS
  if level == nil or ts == nil then return cap end
  local elapsed = now_ms - ts
  if elapsed < 0 then elapsed = 0 end
  local l = level + elapsed * rate
  if l > cap then l = cap end
  return l
end

-- the ms until a bucket at `level` is full again
local function reset_ms(level, rate, capacity)
  local missing = capacity * UNITS - level
  if missing <= 0 then return 0 end
  return math.ceil(missing / rate)
end

-- a bucket's level written at now_ms; the key lives until the bucket is full again
local function write_bucket(key, level, rate, capacity, now_ms)
  redis.call('HSET', key, 'l', int(level), 't', int(now_ms))
  redis.call('PEXPIRE', key, int(reset_ms(level, rate, capacity) + TTL_MARGIN_MS))
end
