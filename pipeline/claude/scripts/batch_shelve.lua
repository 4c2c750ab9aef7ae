-- batch_shelve.lua: put a task on its lane's shelf to wait for a batch, once.
-- Minimum Redis 6.2.
--
-- KEYS[1]  the lane's shelf (task id -> the shelved task)
-- KEYS[2]  the lane's queue of tasks not yet in a batch (task id -> ms it arrived)
-- KEYS[3]  the task's record (its answer lands there): it must outlive the wait
-- ARGV[1]  task id
-- ARGV[2]  the shelved task (packed)
-- ARGV[3]  now, ms
-- ARGV[4]  how long the task's record must live at least (s): the lane's worst case
-- Returns 1 if shelved now, 0 if it was already (a redelivered entry: nothing changes).

if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then
  return 0
end
redis.call('ZADD', KEYS[2], 'NX', ARGV[3], ARGV[1])
local ttl = tonumber(ARGV[4])
if redis.call('EXISTS', KEYS[3]) == 1 and redis.call('TTL', KEYS[3]) < ttl then
  redis.call('EXPIRE', KEYS[3], ttl)
end
return 1
