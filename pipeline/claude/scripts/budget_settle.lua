-- budget_settle.lua: replace a reservation by the call's real cost (0 if it failed).
-- Minimum Redis 6.2.
--
-- KEYS[1]  the window's hash (see budget_reserve.lua)
-- ARGV[1]  the task type
-- ARGV[2]  the reserved worst case, micro-USD
-- ARGV[3]  the real cost, micro-USD
-- Returns 1, or 0 when the window's hash has expired (nothing left to settle).

local key, type_name = KEYS[1], ARGV[1]
if redis.call('EXISTS', key) == 0 then
  return 0
end
local delta = tonumber(ARGV[3]) - tonumber(ARGV[2])
redis.call('HINCRBY', key, 'committed', delta)
redis.call('HINCRBY', key, 'committed:' .. type_name, delta)
redis.call('HINCRBY', key, 'spent', ARGV[3])
redis.call('HINCRBY', key, 'spent:' .. type_name, ARGV[3])
return 1
