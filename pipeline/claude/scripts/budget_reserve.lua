-- budget_reserve.lua: reserve a call's worst-case cost, unless it would overrun a budget.
-- Minimum Redis 6.2.
--
-- KEYS[1]  the window's hash: 'committed' and 'spent' (micro-USD, all types), and the same
--          per task type as 'committed:<type>' and 'spent:<type>'
-- ARGV[1]  the worst-case cost, micro-USD
-- ARGV[2]  the daily budget, micro-USD ('' for none)
-- ARGV[3]  the task type
-- ARGV[4]  the type's daily budget, micro-USD ('' for none)
-- ARGV[5]  the hash's ttl, s
-- Committed = settled cost + reservations of calls in flight. Returns {1} when reserved;
-- {0, scope, committed, spent} when refused, scope 'all' or 'type'. Checking and reserving
-- in one script is what keeps concurrent workers from overshooting together.

local key, worst, type_name = KEYS[1], tonumber(ARGV[1]), ARGV[3]
local function field(name)
  return tonumber(redis.call('HGET', key, name) or '0')
end
local checks = {{'all', '', ARGV[2]}, {'type', ':' .. type_name, ARGV[4]}}
for _, check in ipairs(checks) do
  local scope, suffix, limit = check[1], check[2], check[3]
  if limit ~= '' then
    local committed = field('committed' .. suffix)
    if committed + worst > tonumber(limit) then
      return {0, scope, committed, field('spent' .. suffix)}
    end
  end
end
redis.call('HINCRBY', key, 'committed', worst)
redis.call('HINCRBY', key, 'committed:' .. type_name, worst)
redis.call('EXPIRE', key, ARGV[5])
return {1}
