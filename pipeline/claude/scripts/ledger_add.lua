-- ledger_add.lua: add one charge to a day's cost ledger. Not a script of its own: it is
-- prepended to the scripts that count (ledger.lua, call_record.lua), which say where its
-- arguments start (b).
--
-- ARGV[b+1]  ledger TTL (s)
-- ARGV[b+2]  most fields the day's hash may hold before new groups fold into ARGV[b+4]
-- ARGV[b+3]  group "<model>|<type>"
-- ARGV[b+4]  overflow group "<model>|other"
-- ARGV[b+5]  minute bucket "@HHMM" (UTC), for the current-rate projection
-- ARGV[b+6]  tasks to add to the minute bucket (1 for a task, 0 for a paid call)
-- ARGV[b+7]  spend to add to the minute bucket (pico-dollars)
-- ARGV[b+8..] metric, value pairs to add to the group
-- Redis 6.2+.

local function ledger_add(day, b)
  local group = ARGV[b + 3]
  if redis.call('HEXISTS', day, group .. '|requests') == 0
      and redis.call('HEXISTS', day, group .. '|hits') == 0
      and redis.call('HEXISTS', day, group .. '|baseline_pico') == 0
      and redis.call('HLEN', day) >= tonumber(ARGV[b + 2]) then
    group = ARGV[b + 4]
  end
  for i = b + 8, #ARGV, 2 do
    redis.call('HINCRBY', day, group .. '|' .. ARGV[i], ARGV[i + 1])
  end
  if ARGV[b + 6] ~= '0' then
    redis.call('HINCRBY', day, ARGV[b + 5] .. '|tasks', ARGV[b + 6])
  end
  if ARGV[b + 7] ~= '0' then
    redis.call('HINCRBY', day, ARGV[b + 5] .. '|cost_pico', ARGV[b + 7])
  end
  redis.call('EXPIRE', day, ARGV[b + 1])
end
