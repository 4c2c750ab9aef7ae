-- call_record.lua: record a task's answer against the call it answered, and count a paid
-- call in the ledger, in one step. Prepended with ledger_add.lua.
-- Minimum Redis 6.2.
--
-- KEYS[1]  the task's record (pipeline.task_record)
-- KEYS[2]  the day's ledger hash
-- ARGV[1]  the call's binding (request hash, model, max_tokens)
-- ARGV[2]  the answer, packed without its request
-- ARGV[3]  the record's TTL while the task is live (s)
-- ARGV[4]  the claim this answer was paid under (its fence), or '0' if it was not paid:
--          a paid call is counted once per claim (the `paid:<fence>` mark makes a resend
--          after a lost reply harmless), even one whose answer is not the task's: it was
--          billed all the same
-- ARGV[5..] ledger_add's arguments (b = 4), when ARGV[4] is not '0'
-- Returns {0}: recorded; {1, answer}: an answer was recorded first for this call (it is the
-- task's answer: hand that one on); {2}: an answer for another request holds the id;
-- {3}: the record is gone (the task was answered and its result has expired while this call
-- ran, e.g. in a process stalled past its lease): the call is counted, nothing is recorded,
-- so a late answer never revives an id.

if redis.call('EXISTS', KEYS[1]) == 0 then
  if ARGV[4] ~= '0' then
    ledger_add(KEYS[2], 4)
  end
  return {3}
end
if ARGV[4] ~= '0' and redis.call('HSETNX', KEYS[1], 'paid:' .. ARGV[4], '1') == 1 then
  ledger_add(KEYS[2], 4)
end
local r = redis.call('HMGET', KEYS[1], 'answer', 'req')
if r[1] then
  if r[2] == ARGV[1] then
    return {1, r[1]}
  end
  return {2}
end
redis.call('HSET', KEYS[1], 'req', ARGV[1], 'answer', ARGV[2])
if redis.call('TTL', KEYS[1]) < 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[3])
end
return {0}
