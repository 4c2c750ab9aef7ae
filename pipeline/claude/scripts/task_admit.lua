-- task_admit.lua: admit a task whose producer chose its id, or tell a duplicate of it.
-- Minimum Redis 6.2.
--
-- KEYS[1]  the task's record (pipeline.task_record)
-- ARGV[1]  fingerprint of what the producer sent (every field but the trace context)
-- ARGV[2]  this ingress entry's id
-- ARGV[3]  the record's TTL while the task is live (s)
-- Returns 0: admitted (the id was free, or this very entry owns it: a redelivery);
-- 1: another entry already owns the id with the same request (a harmless duplicate);
-- 2: another entry owns the id with a different request (refuse it).

local r = redis.call('HMGET', KEYS[1], 'fp', 'entry')
if not r[1] then
  redis.call('HSET', KEYS[1], 'fp', ARGV[1], 'entry', ARGV[2])
  if redis.call('TTL', KEYS[1]) < 0 then
    redis.call('EXPIRE', KEYS[1], ARGV[3])
  end
  return 0
end
if r[2] == ARGV[2] then
  return 0
end
if r[1] == ARGV[1] then
  return 1
end
return 2
