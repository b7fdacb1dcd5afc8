-- admit: check every limit of a key and its team; consume from all of them only if all pass.
-- With upstream quotas, also take the first candidate target whose quotas fit, and consume from it.
-- KEYS and ARGV are laid out by proxy/limits/layout.py (admit_keys, admit_args); the reply is
-- decoded by layout.decode_decision (a peek's, `dry_run`, by layout.decode_peek). Redis runs it,
-- and so does MemoryStore (embedded Lua 5.1), both after prelude.lua (UNLIMITED, UNITS, int,
-- named, clock_ms and the bucket rules).

-- ARGV by name, in the order of proxy/limits/layout.py ADMIT_ARGS (tests/test_layout.py checks
-- that they agree); after them come day_count day labels, then
-- day_count + 1 day starts (epoch seconds), then window_count window budgets (any scope and
-- window beyond the key's and team's enforced day budgets) as {limit, enforce, extra_ttl_ms} each,
-- then quota_count upstream quota scopes (QUOTA_ARG_NAMES each)
local ARG_NAMES = {'now_us', 'request_id', 'tokens', 'cost', 'lease_ttl_ms', 'day_margin_ms',
  'key_rpm', 'key_request_capacity', 'key_tpm', 'key_token_capacity', 'key_max_parallel',
  'key_budget', 'key_enforce', 'team_rpm', 'team_request_capacity', 'team_tpm', 'team_token_capacity',
  'team_max_parallel', 'team_budget', 'team_enforce', 'user_rpm', 'user_request_capacity', 'user_tpm',
  'user_token_capacity', 'user_max_parallel', 'user_budget', 'user_enforce', 'day_count', 'window_count',
  'quota_count', 'candidate_count', 'dry_run', 'team_name', 'share'}
local args = named(ARG_NAMES, ARGV)
local n = tonumber(args.day_count)
-- a peek (`GET /v1/me`): every figure read as this admit would read it, nothing written, the
-- peek's reply returned (see its `return` below)
local dry_run = args.dry_run == '1'

-- KEYS by name, in the order of layout.py ADMIT_KEYS (checked like ARG_NAMES)
local KEY_NAMES = {'key_requests', 'key_tokens', 'key_parallel', 'team_requests', 'team_tokens',
  'team_parallel', 'user_requests', 'user_tokens', 'user_parallel', 'reservation', 'fence', 'settled_marker'}
local K = named(KEY_NAMES, KEYS)
-- after them, for each of the n candidate days, its budgets (layout.py ADMIT_DAY_KEYS)
local DAY_KEY_NAMES = {'key_budget', 'key_budget_holds', 'team_budget', 'team_budget_holds'}
local function day_budgets(d)
  return named(DAY_KEY_NAMES, KEYS, #KEY_NAMES + #DAY_KEY_NAMES * (d - 1))
end
-- after those, for each window budget w and each candidate day d, the budget of w's window that
-- contains d (layout.py ADMIT_WINDOW_KEYS)
local WINDOW_KEY_NAMES = {'budget', 'holds'}
local function window_budget(w, d)
  return named(WINDOW_KEY_NAMES, KEYS, #KEY_NAMES + #DAY_KEY_NAMES * n + #WINDOW_KEY_NAMES * (n * (w - 1) + d - 1))
end
-- after those, for each upstream quota scope q (layout.py ADMIT_QUOTA_KEYS), its buckets and leases;
-- its arguments (ADMIT_QUOTA_ARGS) follow the window budgets' in ARGV
local QUOTA_KEY_NAMES = {'requests', 'tokens', 'parallel', 'fair'}
local QUOTA_ARG_NAMES = {'candidate', 'rpm', 'tpm', 'max_parallel'}
local function quota_scope(q)
  local window_keys = #WINDOW_KEY_NAMES * n * tonumber(args.window_count)
  local sc = named(QUOTA_KEY_NAMES, KEYS, #KEY_NAMES + #DAY_KEY_NAMES * n + window_keys + #QUOTA_KEY_NAMES * (q - 1))
  local at = #ARG_NAMES + n + n + 1 + 3 * tonumber(args.window_count) + #QUOTA_ARG_NAMES * (q - 1)
  for name, value in pairs(named(QUOTA_ARG_NAMES, ARGV, at)) do sc[name] = tonumber(value) end
  return sc
end

-- 0, and nothing changes, when the request id was already settled or abandoned (its marker
-- exists): an admit that reached Redis after its caller gave up on it
if redis.call('EXISTS', K.settled_marker) == 1 then return 0 end

local now_ms = clock_ms(args.now_us)

-- the caller's revocation fence (never written for config keys): a revoked, expired or
-- rotated-out runtime credential is refused from the moment the store says so
local refused_from = tonumber(redis.call('GET', K.fence) or '')
if refused_from ~= nil and now_ms >= refused_from then
  -- the whole reply's shape (see the last line): layout.decode_decision reads every field
  return {0, 'revoked', 'key', 0, 1, UNLIMITED, 0, 0, UNLIMITED, 0, 0, 0, 0, '', 0, UNLIMITED, UNLIMITED, 0, 0, 0, '', '',
    '', 0, {}}
end

local PARALLEL_RETRY_MS = 1000  -- a refusal for max_parallel: retry after this

local function wait_ms(level, cost, rate)
  local need = cost * UNITS
  if level >= need then return 0 end
  return math.ceil((need - level) / rate)
end

local function remaining(level)
  local r = math.floor(level / UNITS)
  if r < 0 then r = 0 end
  return r
end

local function read_bucket(key, rate, capacity)
  local v = redis.call('HMGET', key, 'l', 't')
  return refill(tonumber(v[1]), tonumber(v[2]), rate, capacity, now_ms)
end

local function extend_ttl(key, ms)
  if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, int(ms)) end
end

-- release the holds whose lease expired; a peek only counts them
local function purge_holds(budget, leases)
  local expired = redis.call('ZRANGEBYSCORE', leases, '-inf', int(now_ms))
  local unwritten = 0
  for _, id in ipairs(expired) do
    local held = tonumber(redis.call('HGET', budget, 'h:' .. id))
    if held ~= nil and dry_run then
      unwritten = unwritten + held
    elseif held ~= nil then
      redis.call('HINCRBY', budget, 'held', int(0 - held))
      redis.call('HDEL', budget, 'h:' .. id)
    end
  end
  if #expired > 0 and not dry_run then redis.call('ZREMRANGEBYSCORE', leases, '-inf', int(now_ms)) end
  return unwritten
end

-- a budget's settled spend and live holds
local function read_budget(budget, leases)
  local unwritten = purge_holds(budget, leases)
  local v = redis.call('HMGET', budget, 'spent', 'held')
  return tonumber(v[1]) or 0, (tonumber(v[2]) or 0) - unwritten
end

local id = args.request_id
local tokens = tonumber(args.tokens)
local cost = tonumber(args.cost)
local lease_ttl = tonumber(args.lease_ttl_ms)
local day_margin = tonumber(args.day_margin_ms)

-- the budget day containing now: the last candidate that has started
local labels = #ARG_NAMES  -- day i: label ARGV[labels + i], start ARGV[labels + n + i]
local day = 1
for i = 1, n do
  if now_ms >= tonumber(ARGV[labels + n + i]) * 1000 then day = i end
end
local label = ARGV[labels + day]
local day_left_ms = tonumber(ARGV[labels + n + day + 1]) * 1000 - now_ms
if day_left_ms < 0 then day_left_ms = 0 end

local today = day_budgets(day)
local scopes = {
  {kind = 'key', rq = K.key_requests, tk = K.key_tokens, par = K.key_parallel,
    b = today.key_budget, bl = today.key_budget_holds, p = 'key_'},
  {kind = 'team', rq = K.team_requests, tk = K.team_tokens, par = K.team_parallel,
    b = today.team_budget, bl = today.team_budget_holds, p = 'team_'},
  -- the end user's limits (the team's `end_users.limits`, per end user); its budgets are window budgets
  {kind = 'end_user', rq = K.user_requests, tk = K.user_tokens, par = K.user_parallel, p = 'user_'},
}

for _, sc in ipairs(scopes) do
  sc.rpm, sc.rq_cap = tonumber(args[sc.p .. 'rpm']), tonumber(args[sc.p .. 'request_capacity'])
  sc.tpm, sc.tk_cap = tonumber(args[sc.p .. 'tpm']), tonumber(args[sc.p .. 'token_capacity'])
  sc.max_par, sc.budget = tonumber(args[sc.p .. 'max_parallel']), tonumber(args[sc.p .. 'budget'])
  sc.enforce = args[sc.p .. 'enforce'] ~= '0'  -- '0': its rpm, tpm and max_parallel are in shadow mode
  if sc.rpm ~= UNLIMITED then sc.rq_level = read_bucket(sc.rq, sc.rpm, sc.rq_cap) end
  if sc.tpm ~= UNLIMITED then sc.tk_level = read_bucket(sc.tk, sc.tpm, sc.tk_cap) end
  if sc.max_par ~= UNLIMITED and dry_run then
    sc.in_flight = redis.call('ZCARD', sc.par) - redis.call('ZCOUNT', sc.par, '-inf', int(now_ms))
  elseif sc.max_par ~= UNLIMITED then
    redis.call('ZREMRANGEBYSCORE', sc.par, '-inf', int(now_ms))
    sc.in_flight = redis.call('ZCARD', sc.par)
  end
  if sc.budget ~= UNLIMITED then
    sc.spent, sc.held = read_budget(sc.b, sc.bl)
    sc.committed = sc.spent + sc.held
  end
end

-- window budgets: the one of each containing the chosen day; `enforce` 0 is shadow mode
local windows = {}
for w = 1, tonumber(args.window_count) do
  local at = labels + n + n + 1 + 3 * (w - 1)
  local keys = window_budget(w, day)
  local wb = {b = keys.budget, bl = keys.holds, budget = tonumber(ARGV[at + 1]),
    enforce = ARGV[at + 2] == '1', ttl = day_left_ms + tonumber(ARGV[at + 3]) + day_margin}
  wb.spent, wb.held = read_budget(wb.b, wb.bl)
  wb.committed = wb.spent + wb.held
  windows[w] = wb
end

-- a peek's reply (layout.decode_peek): the day and its ms left; per scope (key, team, end user)
-- its request and token bucket (capacity, remaining, reset_ms), max_parallel and leases in use,
-- day budget, spent and held; then each window budget's spent and held
if dry_run then
  local reply = {'peek', label, day_left_ms}
  local function add(...) for _, x in ipairs({...}) do reply[#reply + 1] = x end end
  for _, sc in ipairs(scopes) do
    if sc.rpm ~= UNLIMITED then
      add(sc.rq_cap, remaining(sc.rq_level), reset_ms(sc.rq_level, sc.rpm, sc.rq_cap))
    else add(UNLIMITED, 0, 0) end
    if sc.tpm ~= UNLIMITED then
      add(sc.tk_cap, remaining(sc.tk_level), reset_ms(sc.tk_level, sc.tpm, sc.tk_cap))
    else add(UNLIMITED, 0, 0) end
    add(sc.max_par, sc.in_flight or 0, sc.budget, sc.spent or 0, sc.held or 0)
  end
  for _, wb in ipairs(windows) do add(wb.spent, wb.held) end
  return reply
end

-- Fair shares of an upstream quota (teams.NAME.share), start-time fair queueing over its `fair`
-- hash: each team's virtual time `v:<team>` (what it took from the quota per unit of share), until
-- when it wants the quota `w:<team>` (a request of its was refused by the quota and will ask again
-- then: it is waiting, for at most about a second after each refusal), and the quota's virtual clock `V` (the latest start of an admission). A
-- request starts at max(v, V): time a team spent idle earns no credit. While another team wants
-- the quota, a team goes only if its start is not past the lowest start of those that want it;
-- with no other team waiting, whoever asks goes (work-conserving). A quota's teams are few.
local WANT_MARGIN_MS, WANT_MAX_MS = 200, 1000
local FAIR_TTL_MS = 600000  -- an idle quota forgets its history
local team_name, share = args.team_name, tonumber(args.share)
local function fair_read(qs)
  local flat = redis.call('HGETALL', qs.fair)
  local v, want, clock = {}, {}, 0
  for i = 1, #flat, 2 do
    local field, value = flat[i], tonumber(flat[i + 1])
    local kind, name = string.sub(field, 1, 2), string.sub(field, 3)
    if kind == 'v:' then v[name] = value elseif kind == 'w:' then want[name] = value elseif field == 'V' then clock = value end
  end
  local low = nil
  for name, untl in pairs(want) do
    if name ~= team_name and untl > now_ms then
      local start = math.max(v[name] or 0, clock)
      if low == nil or start < low then low = start end
    end
  end
  qs.fair_clock, qs.fair_start, qs.fair_low = clock, math.max(v[team_name] or 0, clock), low
  qs.fair_want = want[team_name]
end
-- what a request takes from a quota in the unit its fair share counts: tokens where it has a tpm
local function fair_units(qs)
  if qs.tpm ~= UNLIMITED then return tokens, qs.tpm end
  if qs.rpm ~= UNLIMITED then return 1, qs.rpm end
  return 1, nil
end

-- upstream quotas: each candidate's wait is its longest scope's (never: a scope's tpm is below the
-- request's tokens), or, when it fits, a turn for the teams behind this one ('share'); the first
-- candidate that fits now is chosen
local quotas, candidate_waits = {}, {}
for c = 1, tonumber(args.candidate_count) do candidate_waits[c] = {ms = 0, why = nil, never = false} end
for q = 1, tonumber(args.quota_count) do
  local qs = quota_scope(q)
  local cw = candidate_waits[qs.candidate]
  local function wait(why, ms)
    if ms > 0 then qs.refused = true end  -- this scope itself stands in the request's way
    if ms > cw.ms then cw.ms, cw.why = ms, why end
  end
  if qs.rpm ~= UNLIMITED then
    qs.rq_level = read_bucket(qs.requests, qs.rpm, qs.rpm)
    wait('rpm', wait_ms(qs.rq_level, 1, qs.rpm))
  end
  if qs.tpm ~= UNLIMITED then
    qs.tk_level = read_bucket(qs.tokens, qs.tpm, qs.tpm)
    if tokens > qs.tpm then cw.never = true else wait('tpm', wait_ms(qs.tk_level, tokens, qs.tpm)) end
  end
  if qs.max_parallel ~= UNLIMITED then
    redis.call('ZREMRANGEBYSCORE', qs.parallel, '-inf', int(now_ms))
    qs.in_flight = redis.call('ZCARD', qs.parallel)
    if qs.in_flight >= qs.max_parallel then wait('parallel', PARALLEL_RETRY_MS) end
  end
  quotas[q] = qs
end
for _, qs in ipairs(quotas) do
  local cw = candidate_waits[qs.candidate]
  if not cw.never and cw.ms == 0 then
    fair_read(qs)
    if qs.fair_low ~= nil and qs.fair_start > qs.fair_low then
      -- another team that wants it is behind: look again once the quota has refilled this request
      local units, per_minute = fair_units(qs)
      local ms = 1000
      if per_minute ~= nil then ms = math.min(1000, math.max(10, math.ceil(units * 60000 / per_minute))) end
      cw.ms, cw.why, qs.refused = ms, 'share', true
    end
  end
end
-- the chosen candidate (0: none fits now), else the one that frees first (0: none ever fits)
local chosen, soonest = 0, 0
for c, cw in ipairs(candidate_waits) do
  if not cw.never and cw.ms == 0 then chosen = c break end
  if not cw.never and (soonest == 0 or cw.ms < candidate_waits[soonest].ms) then soonest = c end
end

-- refusal priority: budget, then a request that can never fit, then the longest wait
local reason, scope, retry, never = nil, nil, 0, 0
for _, sc in ipairs(scopes) do
  if reason == nil and sc.budget ~= UNLIMITED and sc.committed + cost > sc.budget then
    reason, scope, retry = 'budget', sc, day_left_ms
    if cost > sc.budget then never = 1 end
  end
end
-- the refusing window budget (1-based; 0: none) and the shadow ones that would have refused
local refused_window, shadow = 0, {}
for w, wb in ipairs(windows) do
  if wb.committed + cost > wb.budget then
    if not wb.enforce then
      shadow[#shadow + 1] = tostring(w)
    elseif reason == nil then
      reason, scope, retry, refused_window = 'budget', {kind = 'window'}, day_left_ms, w
      if cost > wb.budget then never = 1 end
    end
  end
end
-- a scope in shadow mode never refuses: what it would have refused for is reported ('key:rpm'),
-- and a bucket it would have refused is left as it is
local shadow_limits = {}
local function would_refuse(sc, why)
  shadow_limits[#shadow_limits + 1] = sc.kind .. ':' .. why
  if why == 'rpm' then sc.skip_rq = true elseif why == 'tpm' then sc.skip_tk = true end
end
for _, sc in ipairs(scopes) do
  if sc.tpm ~= UNLIMITED and tokens > sc.tk_cap then
    if not sc.enforce then
      would_refuse(sc, 'tpm')
    elseif reason == nil then
      reason, scope, never = 'tpm', sc, 1
    end
  end
end
if reason == nil then
  for _, sc in ipairs(scopes) do
    local waits = {}
    if sc.rpm ~= UNLIMITED then waits[#waits + 1] = {'rpm', wait_ms(sc.rq_level, 1, sc.rpm)} end
    if sc.tpm ~= UNLIMITED and not sc.skip_tk then
      waits[#waits + 1] = {'tpm', wait_ms(sc.tk_level, tokens, sc.tpm)}
    end
    if sc.max_par ~= UNLIMITED and sc.in_flight >= sc.max_par then
      waits[#waits + 1] = {'parallel', PARALLEL_RETRY_MS}
    end
    for _, w in ipairs(waits) do
      if w[2] > 0 and not sc.enforce then
        would_refuse(sc, w[1])
      elseif w[2] > retry then
        reason, scope, retry = w[1], sc, w[2]
      end
    end
  end
end
-- no candidate fits: refused by the upstream quota that frees first, unless a key's or team's limit
-- refuses for longer (or for good)
if #candidate_waits > 0 and chosen == 0 and never == 0 and reason ~= 'budget' then
  if soonest == 0 then
    reason, scope, retry, never = 'tpm', {kind = 'upstream'}, 0, 1
  elseif candidate_waits[soonest].ms > retry then
    reason, scope, retry = candidate_waits[soonest].why, {kind = 'upstream'}, candidate_waits[soonest].ms
  end
end

if reason == nil then
  local expires = now_ms + lease_ttl
  for _, sc in ipairs(scopes) do
    if sc.rpm ~= UNLIMITED and not sc.skip_rq then
      sc.rq_level = sc.rq_level - UNITS
      write_bucket(sc.rq, sc.rq_level, sc.rpm, sc.rq_cap, now_ms)
    end
    if sc.tpm ~= UNLIMITED and not sc.skip_tk then
      sc.tk_level = sc.tk_level - tokens * UNITS
      write_bucket(sc.tk, sc.tk_level, sc.tpm, sc.tk_cap, now_ms)
    end
    if sc.max_par ~= UNLIMITED then
      redis.call('ZADD', sc.par, int(expires), id)
      extend_ttl(sc.par, lease_ttl + TTL_MARGIN_MS)
    end
    if sc.budget ~= UNLIMITED then
      redis.call('HINCRBY', sc.b, 'held', int(cost))
      redis.call('HSET', sc.b, 'h:' .. id, int(cost))
      redis.call('ZADD', sc.bl, int(expires), id)
      sc.committed = sc.committed + cost
      extend_ttl(sc.b, day_left_ms + day_margin)
      extend_ttl(sc.bl, day_left_ms + day_margin)
    end
  end
  for _, wb in ipairs(windows) do
    redis.call('HINCRBY', wb.b, 'held', int(cost))
    redis.call('HSET', wb.b, 'h:' .. id, int(cost))
    redis.call('ZADD', wb.bl, int(expires), id)
    wb.committed = wb.committed + cost
    extend_ttl(wb.b, wb.ttl)
    extend_ttl(wb.bl, wb.ttl)
  end
  for _, qs in ipairs(quotas) do
    if qs.candidate == chosen then
      if qs.rpm ~= UNLIMITED then
        qs.rq_level = qs.rq_level - UNITS
        write_bucket(qs.requests, qs.rq_level, qs.rpm, qs.rpm, now_ms)
      end
      if qs.tpm ~= UNLIMITED then
        qs.tk_level = qs.tk_level - tokens * UNITS
        write_bucket(qs.tokens, qs.tk_level, qs.tpm, qs.tpm, now_ms)
      end
      if qs.max_parallel ~= UNLIMITED then
        redis.call('ZADD', qs.parallel, int(expires), id)
        extend_ttl(qs.parallel, lease_ttl + TTL_MARGIN_MS)
        qs.in_flight = qs.in_flight + 1
      end
      local units = fair_units(qs)
      -- '%.17g': a double written in full (tostring's 14 digits would lose a small share's steps)
      redis.call('HSET', qs.fair, 'v:' .. team_name, string.format('%.17g', qs.fair_start + units / share),
        'V', string.format('%.17g', math.max(qs.fair_clock, qs.fair_start)))
      redis.call('PEXPIRE', qs.fair, FAIR_TTL_MS)
    end
  end
  local kt, tt, ut = '0', '0', '0'
  -- which token buckets this request took from (settlement refunds only those); `q`: the candidate
  -- whose upstream quotas it took from (0: none)
  if scopes[1].tpm ~= UNLIMITED and not scopes[1].skip_tk then kt = '1' end
  if scopes[2].tpm ~= UNLIMITED and not scopes[2].skip_tk then tt = '1' end
  if scopes[3].tpm ~= UNLIMITED and not scopes[3].skip_tk then ut = '1' end
  redis.call('HSET', K.reservation, 'tokens', int(tokens), 'cost', int(cost), 'day', label,
    'exp', int(expires), 'kt', kt, 'tt', tt, 'ut', ut, 'q', int(chosen))
  redis.call('PEXPIRE', K.reservation, int(lease_ttl + TTL_MARGIN_MS))
end

-- refused by the upstream quotas: this team waits for each quota scope that itself refused it (not
-- one that had room while another scope of the candidate was full, nor a candidate it can never
-- fit), until it asks again (the refusal's retry, at most WANT_MAX_MS: a caller that gave up stops
-- counting soon, one that waits asks again sooner) and a little after
if reason ~= nil and scope.kind == 'upstream' and never == 0 then
  local until_ms = now_ms + math.min(retry, WANT_MAX_MS) + WANT_MARGIN_MS
  for _, qs in ipairs(quotas) do
    if qs.refused and not candidate_waits[qs.candidate].never then
      local wants = qs.fair_want
      if qs.fair_start == nil then wants = tonumber(redis.call('HGET', qs.fair, 'w:' .. team_name)) end
      if (wants or 0) < until_ms then redis.call('HSET', qs.fair, 'w:' .. team_name, int(until_ms)) end
      redis.call('PEXPIRE', qs.fair, FAIR_TTL_MS)
    end
  end
end

-- the tightest bucket of each kind (lowest remaining, then longest reset) and budget scope
local rq, tk, budget = nil, nil, nil
local function tighter(best, capacity, level, rate)
  local rem, reset = remaining(level), reset_ms(level, rate, capacity)
  if best == nil or rem < best[2] or (rem == best[2] and reset > best[3]) then
    return {capacity, rem, reset}
  end
  return best
end
for _, sc in ipairs(scopes) do
  if sc.rpm ~= UNLIMITED then rq = tighter(rq, sc.rq_cap, sc.rq_level, sc.rpm) end
  if sc.tpm ~= UNLIMITED then tk = tighter(tk, sc.tk_cap, sc.tk_level, sc.tpm) end
  if sc.budget ~= UNLIMITED and (budget == nil or sc.budget - sc.committed < budget[2] - budget[1]) then
    budget = {sc.committed, sc.budget}
  end
end
if reason == 'budget' and refused_window == 0 then budget = {scope.committed, scope.budget} end
local window_reply = {0, 0}
if refused_window > 0 then window_reply = {windows[refused_window].committed, windows[refused_window].budget} end
rq = rq or {UNLIMITED, 0, 0}
tk = tk or {UNLIMITED, 0, 0}
budget = budget or {0, 0}

local admitted, reason_s, scope_s = 1, '', ''
if reason ~= nil then admitted, reason_s, scope_s = 0, reason, scope.kind end
-- the candidate taken, or (refused) the one that frees first; each quota scope's remaining capacity
local target = chosen
if reason ~= nil then target = soonest end
local left = {}
for _, qs in ipairs(quotas) do
  left[#left + 1] = qs.rq_level and remaining(qs.rq_level) or UNLIMITED
  left[#left + 1] = qs.tk_level and remaining(qs.tk_level) or UNLIMITED
  left[#left + 1] = qs.in_flight and math.max(0, qs.max_parallel - qs.in_flight) or UNLIMITED
end
-- each scope's committed spend (spent + held), UNLIMITED without a budget: the fallback starts from it
local seen = {}
for i, sc in ipairs(scopes) do seen[i] = sc.committed or UNLIMITED end
-- ... and each window budget's, in order, as "c1,c2,...": the fallback starts those from it too
local windows_seen = {}
for w, wb in ipairs(windows) do windows_seen[w] = int(wb.committed) end
return {admitted, reason_s, scope_s, retry, never, rq[1], rq[2], rq[3], tk[1], tk[2], tk[3],
  budget[1], budget[2], label, math.ceil(day_left_ms / 1000), seen[1], seen[2],
  refused_window, window_reply[1], window_reply[2], table.concat(shadow, ','), table.concat(shadow_limits, ','),
  table.concat(windows_seen, ','), target, left}
