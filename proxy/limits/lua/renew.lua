-- renew: push the leases of one live request forward, so a request longer than the lease TTL
-- keeps its parallel slots and budget holds. KEYS and ARGV are laid out by proxy/limits/layout.py
-- (renew_keys, renew_args). Renews only while the reservation record exists and has not expired:
-- a settled request, or one whose leases already ran out (and may have been purged), is left
-- alone. Returns 1 if renewed, else 0.
if redis.replicate_commands then pcall(redis.replicate_commands) end

-- ARGV by name, in the order of proxy/limits/layout.py RENEW_ARGS (tests/test_layout.py checks
-- that they agree)
local ARG_NAMES = {'now_us', 'request_id', 'lease_ttl_ms'}
local args = {}
for i, name in ipairs(ARG_NAMES) do args[name] = ARGV[i] end

local TTL_MARGIN_MS = 1000

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

local id = args.request_id
local lease_ttl = tonumber(args.lease_ttl_ms)
local exp = tonumber(redis.call('HGET', KEYS[1], 'exp'))
if exp == nil or exp <= now_ms then return 0 end

local expires = now_ms + lease_ttl
redis.call('HSET', KEYS[1], 'exp', int(expires))
redis.call('PEXPIRE', KEYS[1], int(lease_ttl + TTL_MARGIN_MS))
for i = 2, #KEYS do  -- parallel leases of key and team, then budget holds (day, then windows)
  if redis.call('ZADD', KEYS[i], 'XX', 'CH', int(expires), id) == 1 then
    if redis.call('PTTL', KEYS[i]) < lease_ttl + TTL_MARGIN_MS then
      redis.call('PEXPIRE', KEYS[i], int(lease_ttl + TTL_MARGIN_MS))
    end
  end
end
return 1
