-- hold: one replica's new or longer hold of a target (an upstream and the model asked of it),
-- shared with every replica through one hash (layout.py: Layout.holds, HOLD_KEYS, HOLD_ARGS).
-- The hold ends at now + hold_ms by the store's clock; of that end and the one already stored for
-- the target, the later is kept. A field is "<end ms> <kind>"; fields whose hold has ended are
-- dropped, and the hash lives until its latest end + TTL_MARGIN_MS. Returns the end kept (ms).
-- Runs after prelude.lua (TTL_MARGIN_MS, int, named, clock_ms).

-- ARGV by name, in the order of proxy/limits/layout.py HOLD_ARGS (tests/test_layout.py checks
-- that they agree)
local ARG_NAMES = {'now_us', 'target', 'hold_ms', 'kind'}
local args = named(ARG_NAMES, ARGV)

-- KEYS by name, in the order of layout.py HOLD_KEYS (checked like ARG_NAMES)
local KEY_NAMES = {'holds'}
local K = named(KEY_NAMES, KEYS)

local now_ms = clock_ms(args.now_us)
local ends, kind = now_ms + tonumber(args.hold_ms), args.kind
local stored = redis.call('HGETALL', K.holds)
local latest = ends
for i = 1, #stored, 2 do
  local at, was = string.match(stored[i + 1], '^(%d+) (%a+)$')
  at = tonumber(at)
  if at == nil or at <= now_ms then
    redis.call('HDEL', K.holds, stored[i])
  else
    if stored[i] == args.target and at >= ends then ends, kind = at, was end
    if at > latest then latest = at end
  end
end
redis.call('HSET', K.holds, args.target, int(ends) .. ' ' .. kind)
redis.call('PEXPIRE', K.holds, int(latest - now_ms + TTL_MARGIN_MS))
return ends
