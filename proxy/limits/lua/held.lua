-- held: the store's now and every target hold that has not ended by it (hold.lua writes them), for
-- each replica's poll. Reads only. KEYS and ARGV are laid out by proxy/limits/layout.py
-- (Layout.holds, HELD_KEYS, HELD_ARGS). Returns {now ms, target, end ms, kind, target, ...}.
-- Runs after prelude.lua (named, clock_ms).

-- ARGV by name, in the order of proxy/limits/layout.py HELD_ARGS (tests/test_layout.py checks
-- that they agree)
local ARG_NAMES = {'now_us'}
local args = named(ARG_NAMES, ARGV)

-- KEYS by name, in the order of layout.py HELD_KEYS (checked like ARG_NAMES)
local KEY_NAMES = {'holds'}
local K = named(KEY_NAMES, KEYS)

local now_ms = clock_ms(args.now_us)
local reply = {now_ms}
local stored = redis.call('HGETALL', K.holds)
for i = 1, #stored, 2 do
  local at, kind = string.match(stored[i + 1], '^(%d+) (%a+)$')
  at = tonumber(at)
  if at ~= nil and at > now_ms then
    reply[#reply + 1] = stored[i]
    reply[#reply + 1] = at
    reply[#reply + 1] = kind
  end
end
return reply
