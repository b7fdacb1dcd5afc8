-- settle: reconcile one admitted request, once per request id.
-- KEYS and ARGV are laid out by proxy/limits/layout.py (settle_keys, settle_args). Returns
-- {1, key spent, team spent, key crossed, team crossed}, or 0 (and changes nothing) when this
-- request id was already settled. "Crossed" is 1 for exactly one settlement per scope and day: the
-- one that pushed the day's spend to the alert threshold (HSETNX, so one alert across replicas).
-- `abandon` = 1 abandons the request instead (its admit's reply was lost): the marker is set and
-- whatever the admit reserved is released, but nothing is booked.
if redis.replicate_commands then pcall(redis.replicate_commands) end

-- ARGV by name, in the order of proxy/limits/layout.py SETTLE_ARGS (tests/test_layout.py checks
-- that they agree); after them come window_count alert thresholds (one comma-separated list of
-- spend thresholds per window budget, whose
-- budget hash and holds are KEYS 12 onwards, two each), then the request's tags, `name=value`.
-- The reply then carries each window budget's spent and crossed flag.
local ARG_NAMES = {'now_us', 'request_id', 'done_ttl_s', 'ledger_ttl_s', 'late_budget_ttl_s',
  'key_tpm', 'key_token_capacity', 'team_tpm', 'team_token_capacity', 'user_tpm', 'user_token_capacity', 'cost', 'prompt_tokens',
  'completion_tokens', 'cached_tokens', 'cache_write_tokens', 'reasoning_tokens', 'key_name', 'model', 'key_alert', 'team_alert',
  'ledger_max_fields', 'abandon', 'window_count', 'end_user'}
local args = {}
for i, name in ipairs(ARG_NAMES) do args[name] = ARGV[i] end
local UNLIMITED = -1  -- layout.UNLIMITED: a limit the scope does not have

local UNITS = 60000
local TTL_MARGIN_MS = 1000
local SEP = '\031'

local function int(x)
  if x == 0 then return '0' end
  return string.format('%.0f', x)
end

local now_ms
if args.now_us ~= '' then
  now_ms = math.floor(tonumber(args.now_us) / 1000)
else
  local t = redis.call('TIME')
  now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function refill(level, ts, rate, capacity)
  local cap = capacity * UNITS
  if level == nil or ts == nil then return cap end
  local elapsed = now_ms - ts
  if elapsed < 0 then elapsed = 0 end
  local l = level + elapsed * rate
  if l > cap then l = cap end
  return l
end

local function reset_ms(level, rate, capacity)
  local missing = capacity * UNITS - level
  if missing <= 0 then return 0 end
  return math.ceil(missing / rate)
end

local function credit(level, amount, capacity)
  local l = level + amount * UNITS
  if l > capacity * UNITS then l = capacity * UNITS end
  return l
end

local id = args.request_id
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', args.done_ttl_s) then return 0 end

local function refund(key, amount, rate, capacity)
  local v = redis.call('HMGET', key, 'l', 't')
  local level = credit(refill(tonumber(v[1]), tonumber(v[2]), rate, capacity), amount, capacity)
  redis.call('HSET', key, 'l', int(level), 't', int(now_ms))
  redis.call('PEXPIRE', key, int(reset_ms(level, rate, capacity) + TTL_MARGIN_MS))
end

local function release_hold(budget, leases)
  local held = tonumber(redis.call('HGET', budget, 'h:' .. id))
  if held ~= nil then
    redis.call('HINCRBY', budget, 'held', int(0 - held))
    redis.call('HDEL', budget, 'h:' .. id)
  end
  redis.call('ZREM', leases, id)
end

local prompt, completion = tonumber(args.prompt_tokens), tonumber(args.completion_tokens)
local window_count = tonumber(args.window_count)
local rec = redis.call('HMGET', KEYS[2], 'tokens', 'exp', 'kt', 'tt', 'ut')
local reserved, expires = tonumber(rec[1]), tonumber(rec[2])
if reserved ~= nil and expires > now_ms then
  local diff = reserved - prompt - completion
  local key_tpm, team_tpm = tonumber(args.key_tpm), tonumber(args.team_tpm)
  if rec[3] == '1' and key_tpm ~= UNLIMITED then refund(KEYS[3], diff, key_tpm, tonumber(args.key_token_capacity)) end
  if rec[4] == '1' and team_tpm ~= UNLIMITED then
    refund(KEYS[4], diff, team_tpm, tonumber(args.team_token_capacity))
  end
  local user_tpm = tonumber(args.user_tpm)
  if rec[5] == '1' and user_tpm ~= UNLIMITED then
    refund(KEYS[#KEYS - 1], diff, user_tpm, tonumber(args.user_token_capacity))
  end
  redis.call('ZREM', KEYS[5], id)
  redis.call('ZREM', KEYS[6], id)
  redis.call('ZREM', KEYS[#KEYS], id)  -- the end user's parallel leases
  release_hold(KEYS[7], KEYS[8])
  release_hold(KEYS[9], KEYS[10])
  for w = 1, window_count do release_hold(KEYS[10 + 2 * w], KEYS[11 + 2 * w]) end
end
redis.call('DEL', KEYS[2])
if args.abandon == '1' then
  local key_spent = tonumber(redis.call('HGET', KEYS[7], 'spent')) or 0
  local team_spent = tonumber(redis.call('HGET', KEYS[9], 'spent')) or 0
  local reply = {1, key_spent, team_spent, 0, 0}
  for w = 1, window_count do
    reply[#reply + 1] = tonumber(redis.call('HGET', KEYS[10 + 2 * w], 'spent')) or 0
    reply[#reply + 1] = 0
  end
  return reply
end

local reply = {1, 0, 0, 0, 0}
local alerts = {args.key_alert, args.team_alert}
for i, budget in ipairs({KEYS[7], KEYS[9]}) do
  local spent = redis.call('HINCRBY', budget, 'spent', args.cost)
  if redis.call('TTL', budget) < 0 then redis.call('EXPIRE', budget, args.late_budget_ttl_s) end
  local alert = tonumber(alerts[i])
  reply[1 + i] = spent
  if alert ~= UNLIMITED and spent >= alert and redis.call('HSETNX', budget, 'alerted', '1') == 1 then
    reply[3 + i] = 1
  end
end

for w = 1, window_count do
  local budget = KEYS[10 + 2 * w]
  local spent = redis.call('HINCRBY', budget, 'spent', args.cost)
  if redis.call('TTL', budget) < 0 then redis.call('EXPIRE', budget, args.late_budget_ttl_s) end
  -- each threshold fires once per budget window across replicas: the highest one crossed first here
  local crossed, i = 0, 0
  for threshold in string.gmatch(ARGV[#ARG_NAMES + w], '[^,]+') do
    i = i + 1
    if spent >= tonumber(threshold) and redis.call('HSETNX', budget, 'alerted:' .. i, '1') == 1 then crossed = i end
  end
  reply[#reply + 1] = spent
  reply[#reply + 1] = crossed
end

local metrics = {
  {'spend_micros', args.cost}, {'requests', '1'}, {'prompt_tokens', args.prompt_tokens},
  {'completion_tokens', args.completion_tokens}, {'cached_tokens', args.cached_tokens},
  {'cache_write_tokens', args.cache_write_tokens}, {'reasoning_tokens', args.reasoning_tokens},
}
local function book(prefix)
  for _, m in ipairs(metrics) do redis.call('HINCRBY', KEYS[11], prefix .. SEP .. m[1], m[2]) end
end
book('team')
book('key' .. SEP .. args.key_name)
book('model' .. SEP .. args.key_name .. SEP .. args.model)
-- tags come from clients: past `ledger_max_fields` fields, a team-day's ledger books new tags as one
-- 'other=overflow' tag, so a unique `user` per request cannot grow the hash without bound
local tags_fit = redis.call('HLEN', KEYS[11]) < tonumber(args.ledger_max_fields)
-- the end user (if the request named one) is booked like a tag: past the cap, as 'other=overflow'
if args.end_user ~= '' then
  local who = 'end_user' .. SEP .. args.end_user
  if tags_fit or redis.call('HEXISTS', KEYS[11], who .. SEP .. 'requests') == 1 then
    book(who)
  else
    book('tag' .. SEP .. 'other=overflow')
  end
end
for i = #ARG_NAMES + window_count + 1, #ARGV do
  local tag = 'tag' .. SEP .. ARGV[i]
  if tags_fit or redis.call('HEXISTS', KEYS[11], tag .. SEP .. 'requests') == 1 then
    book(tag)
  else
    book('tag' .. SEP .. 'other=overflow')
  end
end
redis.call('EXPIRE', KEYS[11], args.ledger_ttl_s)
return reply
