-- ledger: count one answered task in its day's cost ledger, exactly once per task id.
--
-- KEYS[1]  the task's marker (<prefix>:ledgered:<task id>), set here with a TTL
-- KEYS[2]  the day's ledger hash (<prefix>:ledger:<YYYY-MM-DD>)
-- ARGV[1]  marker TTL (s)
-- ARGV[2]  ledger TTL (s)
-- ARGV[3]  most fields the day's hash may hold before new groups fold into ARGV[5]
-- ARGV[4]  group "<model>|<type>"
-- ARGV[5]  overflow group "<model>|other"
-- ARGV[6]  minute bucket "@HHMM" (UTC), for the current-rate projection
-- ARGV[7]  the task's spend (pico-dollars)
-- ARGV[8..] metric, value pairs to add to the group
--
-- Returns 1 if counted, 0 if the task was counted before (a redelivered store entry).
-- Redis 6.2+.

if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
  return 0
end
local group = ARGV[4]
if redis.call('HEXISTS', KEYS[2], group .. '|requests') == 0
    and redis.call('HEXISTS', KEYS[2], group .. '|hits') == 0
    and redis.call('HLEN', KEYS[2]) >= tonumber(ARGV[3]) then
  group = ARGV[5]
end
for i = 8, #ARGV, 2 do
  redis.call('HINCRBY', KEYS[2], group .. '|' .. ARGV[i], ARGV[i + 1])
end
redis.call('HINCRBY', KEYS[2], ARGV[6] .. '|tasks', 1)
if ARGV[7] ~= '0' then
  redis.call('HINCRBY', KEYS[2], ARGV[6] .. '|cost_pico', ARGV[7])
end
redis.call('EXPIRE', KEYS[2], ARGV[2])
return 1
