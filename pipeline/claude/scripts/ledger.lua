-- ledger.lua: count one task in its day's cost ledger, exactly once per task id: whether it
-- was served without a call of its own (a hit, and what that saved) and what it would have
-- cost on the baseline model. Paid calls are counted as they are recorded (call_record.lua).
-- Prepended with ledger_add.lua.
--
-- KEYS[1]  the task's record (pipeline.task_record); its `counted` field is the mark
-- KEYS[2]  the day's ledger hash (<prefix>:ledger:<YYYY-MM-DD>)
-- ARGV[1]  the record's TTL if this creates it (s); the store's hand-off then sets the
--          result's TTL on it
-- ARGV[2..] ledger_add's arguments (b = 1)
-- Returns 1 if counted, 0 if the task was counted before (a redelivered store entry).

if redis.call('HSETNX', KEYS[1], 'counted', '1') == 0 then
  return 0
end
if redis.call('TTL', KEYS[1]) < 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[1])
end
ledger_add(KEYS[2], 1)
return 1
