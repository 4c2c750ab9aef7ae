-- call_record.lua: record a task's answer against the call it answered, and count a paid
-- call in the ledger, in one step. Prepended with ledger_add.lua.
-- Minimum Redis 6.2.
--
-- KEYS[1]  the task's record (pipeline.task_record)
-- KEYS[2]  the day's ledger hash
-- ARGV[1]  the call's binding (request hash, model, max_tokens)
-- ARGV[2]  the answer, packed without its request
-- ARGV[3]  the record's TTL while the task is live (s)
-- ARGV[4]  '1' if this answer came from a paid call: count it (every paid call is counted,
--          even one whose answer is not the task's: it was billed), '0' if not
-- ARGV[5..] ledger_add's arguments (b = 4), when ARGV[4] is '1'
-- Returns {0}: recorded; {1, answer}: an answer was recorded first for this call (it is the
-- task's answer: hand that one on); {2}: an answer for another request holds the id.

if ARGV[4] == '1' then
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
