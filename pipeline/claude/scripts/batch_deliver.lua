-- batch_deliver.lua: hand one batched task on, exactly once: its answer to the store, or the
-- task to the standard lane; it leaves the batch and the shelf in the same step.
-- Minimum Redis 6.2.
--
-- KEYS[1]  the batch's unanswered set
-- KEYS[2]  the lane's shelf
-- KEYS[3]  the stream it goes to ('' fields: nowhere, it is only taken off)
-- ARGV[1]  task id
-- ARGV[2..] the entry's fields
-- Returns 1 if handed on now, 0 if it had been already.

if redis.call('SREM', KEYS[1], ARGV[1]) == 0 then
  return 0
end
redis.call('HDEL', KEYS[2], ARGV[1])
if #ARGV > 1 then
  redis.call('XADD', KEYS[3], '*', unpack(ARGV, 2))
end
return 1
