-- settle: reconcile one admitted request, once per request id.
-- KEYS and ARGV are laid out by proxy/limits/layout.py (settle_keys, settle_args). Returns
-- {1, key spent, team spent, key crossed, team crossed}, or 0 (and changes nothing) when this
-- request id was already settled. "Crossed" is 1 for exactly one settlement per scope and day: the
-- one that pushed the day's spend to the alert threshold (HSETNX, so one alert across replicas).
-- `abandon` = 1 abandons the request instead (its admit's reply was lost): the marker is set and
-- whatever the admit reserved is released, but nothing is booked.
-- Runs after prelude.lua (UNLIMITED, UNITS, int, named, clock_ms and the bucket rules).

-- ARGV by name, in the order of proxy/limits/layout.py SETTLE_ARGS (tests/test_layout.py checks
-- that they agree); after them come window_count alert thresholds (one comma-separated list of
-- spend thresholds per window budget), then quota_count upstream quota scopes (QUOTA_ARG_NAMES
-- each), then the request's tags, `name=value`.
-- The reply then carries each window budget's spent and crossed flag.
local ARG_NAMES = {'now_us', 'request_id', 'done_ttl_s', 'ledger_ttl_s', 'late_budget_ttl_s',
  'key_tpm', 'key_token_capacity', 'team_tpm', 'team_token_capacity', 'user_tpm', 'user_token_capacity', 'cost', 'prompt_tokens',
  'completion_tokens', 'cached_tokens', 'cache_write_tokens', 'reasoning_tokens', 'key_name', 'model', 'key_alert', 'team_alert',
  'ledger_max_fields', 'abandon', 'window_count', 'end_user', 'quota_count'}
local args = named(ARG_NAMES, ARGV)

-- KEYS by name, in the order of layout.py SETTLE_KEYS (checked like ARG_NAMES)
local KEY_NAMES = {'settled_marker', 'reservation', 'key_tokens', 'team_tokens', 'user_tokens', 'key_parallel',
  'team_parallel', 'user_parallel', 'key_budget', 'key_budget_holds', 'team_budget', 'team_budget_holds', 'ledger'}
local K = named(KEY_NAMES, KEYS)
-- after them, for each of the window_count window budgets, its budget in the request's day
-- (layout.py SETTLE_WINDOW_KEYS)
local WINDOW_KEY_NAMES = {'budget', 'holds'}
local function window_budget(w)
  return named(WINDOW_KEY_NAMES, KEYS, #KEY_NAMES + #WINDOW_KEY_NAMES * (w - 1))
end
-- after those, for each upstream quota scope q of each candidate the admission had, its token
-- bucket and leases (layout.py SETTLE_QUOTA_KEYS); its arguments follow the alert thresholds
local QUOTA_KEY_NAMES = {'tokens', 'parallel'}
local QUOTA_ARG_NAMES = {'candidate', 'tpm'}
local function quota_scope(q)
  local window_count = tonumber(args.window_count)
  local sc = named(QUOTA_KEY_NAMES, KEYS, #KEY_NAMES + #WINDOW_KEY_NAMES * window_count + #QUOTA_KEY_NAMES * (q - 1))
  local at = #ARG_NAMES + window_count + #QUOTA_ARG_NAMES * (q - 1)
  for name, value in pairs(named(QUOTA_ARG_NAMES, ARGV, at)) do sc[name] = tonumber(value) end
  return sc
end

local SEP = '\031'

local now_ms = clock_ms(args.now_us)

local function credit(level, amount, capacity)
  local l = level + amount * UNITS
  if l > capacity * UNITS then l = capacity * UNITS end
  return l
end

local id = args.request_id
if not redis.call('SET', K.settled_marker, '1', 'NX', 'EX', args.done_ttl_s) then return 0 end

local function refund(key, amount, rate, capacity)
  local v = redis.call('HMGET', key, 'l', 't')
  local level = credit(refill(tonumber(v[1]), tonumber(v[2]), rate, capacity, now_ms), amount, capacity)
  write_bucket(key, level, rate, capacity, now_ms)
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
local rec = redis.call('HMGET', K.reservation, 'tokens', 'exp', 'kt', 'tt', 'ut', 'q')
local reserved, expires = tonumber(rec[1]), tonumber(rec[2])
if reserved ~= nil and expires > now_ms then
  local diff = reserved - prompt - completion
  local key_tpm, team_tpm = tonumber(args.key_tpm), tonumber(args.team_tpm)
  if rec[3] == '1' and key_tpm ~= UNLIMITED then
    refund(K.key_tokens, diff, key_tpm, tonumber(args.key_token_capacity))
  end
  if rec[4] == '1' and team_tpm ~= UNLIMITED then
    refund(K.team_tokens, diff, team_tpm, tonumber(args.team_token_capacity))
  end
  local user_tpm = tonumber(args.user_tpm)
  if rec[5] == '1' and user_tpm ~= UNLIMITED then
    refund(K.user_tokens, diff, user_tpm, tonumber(args.user_token_capacity))
  end
  redis.call('ZREM', K.key_parallel, id)
  redis.call('ZREM', K.team_parallel, id)
  redis.call('ZREM', K.user_parallel, id)
  -- the upstream quotas of the candidate the admission chose: its unused tokens back, its slot free
  local chosen = tonumber(rec[6]) or 0
  for q = 1, tonumber(args.quota_count) do
    local qs = quota_scope(q)
    if qs.candidate == chosen then
      if qs.tpm ~= UNLIMITED then refund(qs.tokens, diff, qs.tpm, qs.tpm) end
      redis.call('ZREM', qs.parallel, id)
    end
  end
  release_hold(K.key_budget, K.key_budget_holds)
  release_hold(K.team_budget, K.team_budget_holds)
  for w = 1, window_count do
    local wk = window_budget(w)
    release_hold(wk.budget, wk.holds)
  end
end
redis.call('DEL', K.reservation)
if args.abandon == '1' then
  local key_spent = tonumber(redis.call('HGET', K.key_budget, 'spent')) or 0
  local team_spent = tonumber(redis.call('HGET', K.team_budget, 'spent')) or 0
  local reply = {1, key_spent, team_spent, 0, 0}
  for w = 1, window_count do
    reply[#reply + 1] = tonumber(redis.call('HGET', window_budget(w).budget, 'spent')) or 0
    reply[#reply + 1] = 0
  end
  return reply
end

local reply = {1, 0, 0, 0, 0}
local alerts = {args.key_alert, args.team_alert}
for i, budget in ipairs({K.key_budget, K.team_budget}) do
  local spent = redis.call('HINCRBY', budget, 'spent', args.cost)
  if redis.call('TTL', budget) < 0 then redis.call('EXPIRE', budget, args.late_budget_ttl_s) end
  local alert = tonumber(alerts[i])
  reply[1 + i] = spent
  if alert ~= UNLIMITED and spent >= alert and redis.call('HSETNX', budget, 'alerted', '1') == 1 then
    reply[3 + i] = 1
  end
end

for w = 1, window_count do
  local budget = window_budget(w).budget
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
  for _, m in ipairs(metrics) do redis.call('HINCRBY', K.ledger, prefix .. SEP .. m[1], m[2]) end
end
book('team')
book('key' .. SEP .. args.key_name)
book('model' .. SEP .. args.key_name .. SEP .. args.model)
-- tags come from clients: past `ledger_max_fields` fields, a team-day's ledger books new tags as one
-- 'other=overflow' tag, so a unique `user` per request cannot grow the hash without bound
local tags_fit = redis.call('HLEN', K.ledger) < tonumber(args.ledger_max_fields)
-- the end user (if the request named one) is booked like a tag: past the cap, as 'other=overflow'
if args.end_user ~= '' then
  local who = 'end_user' .. SEP .. args.end_user
  if tags_fit or redis.call('HEXISTS', K.ledger, who .. SEP .. 'requests') == 1 then
    book(who)
  else
    book('tag' .. SEP .. 'other=overflow')
  end
end
for i = #ARG_NAMES + window_count + #QUOTA_ARG_NAMES * tonumber(args.quota_count) + 1, #ARGV do
  local tag = 'tag' .. SEP .. ARGV[i]
  if tags_fit or redis.call('HEXISTS', K.ledger, tag .. SEP .. 'requests') == 1 then
    book(tag)
  else
    book('tag' .. SEP .. 'other=overflow')
  end
end
redis.call('EXPIRE', K.ledger, args.ledger_ttl_s)
return reply
