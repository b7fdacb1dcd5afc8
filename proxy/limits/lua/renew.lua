-- renew: push the leases of one live request forward, so a request longer than the lease TTL
-- keeps its parallel slots and budget holds. KEYS and ARGV are laid out by proxy/limits/layout.py
-- (renew_keys, renew_args). Renews only while the reservation record exists and has not expired:
-- a settled request, or one whose leases already ran out (and may have been purged), is left
-- alone. Returns 1 if renewed, else 0.
-- Runs after prelude.lua (TTL_MARGIN_MS, int, named, clock_ms).

-- ARGV by name, in the order of proxy/limits/layout.py RENEW_ARGS (tests/test_layout.py checks
-- that they agree)
local ARG_NAMES = {'now_us', 'request_id', 'lease_ttl_ms', 'quota_count'}
local args = named(ARG_NAMES, ARGV)

-- KEYS by name, in the order of layout.py RENEW_KEYS (checked like ARG_NAMES)
local KEY_NAMES = {'reservation', 'key_parallel', 'team_parallel', 'user_parallel', 'key_budget_holds',
  'team_budget_holds'}
local K = named(KEY_NAMES, KEYS)
-- after them, for each window budget, its holds in the request's day (layout.py RENEW_WINDOW_KEYS),
-- then for each upstream quota scope with a max_parallel, its leases (RENEW_QUOTA_KEYS)
local WINDOW_KEY_NAMES = {'holds'}
local QUOTA_KEY_NAMES = {'parallel'}
local quota_count = tonumber(args.quota_count)
local window_count = (#KEYS - #KEY_NAMES - #QUOTA_KEY_NAMES * quota_count) / #WINDOW_KEY_NAMES
local function window_budget(w)
  return named(WINDOW_KEY_NAMES, KEYS, #KEY_NAMES + #WINDOW_KEY_NAMES * (w - 1))
end
local function quota_scope(q)
  return named(QUOTA_KEY_NAMES, KEYS, #KEY_NAMES + #WINDOW_KEY_NAMES * window_count + #QUOTA_KEY_NAMES * (q - 1))
end

local now_ms = clock_ms(args.now_us)

local id = args.request_id
local lease_ttl = tonumber(args.lease_ttl_ms)
local exp = tonumber(redis.call('HGET', K.reservation, 'exp'))
if exp == nil or exp <= now_ms then return 0 end

local expires = now_ms + lease_ttl
redis.call('HSET', K.reservation, 'exp', int(expires))
redis.call('PEXPIRE', K.reservation, int(lease_ttl + TTL_MARGIN_MS))
-- every lease the request holds: parallel slots, then budget holds (the day's, then each window's),
-- then the upstream quotas' slots (only the chosen candidate's hold the request: XX skips the others)
local leases = {K.key_parallel, K.team_parallel, K.user_parallel, K.key_budget_holds, K.team_budget_holds}
for w = 1, window_count do leases[#leases + 1] = window_budget(w).holds end
for q = 1, quota_count do leases[#leases + 1] = quota_scope(q).parallel end
for _, key in ipairs(leases) do
  if redis.call('ZADD', key, 'XX', 'CH', int(expires), id) == 1 then
    if redis.call('PTTL', key) < lease_ttl + TTL_MARGIN_MS then
      redis.call('PEXPIRE', key, int(lease_ttl + TTL_MARGIN_MS))
    end
  end
end
return 1
