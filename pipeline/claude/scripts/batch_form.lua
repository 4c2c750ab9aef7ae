-- batch_form.lua: take the oldest queued tasks of a lane into a new batch, recording the
-- intent (its token, its members by number) before anything is sent to the API.
-- Minimum Redis 6.2.
--
-- KEYS[1]  the lane's queue (task id -> ms it arrived)
-- KEYS[2]  the lane's shelf (task id -> the shelved task), for sizes
-- KEYS[3]  the new batch's hash
-- KEYS[4]  the new batch's members (n -> task id)
-- KEYS[5]  the new batch's unanswered set
-- KEYS[6]  the lane's set of open batches
-- ARGV[1]  the most requests
-- ARGV[2]  the most bytes (the shelved tasks' sizes)
-- ARGV[3]  the batch's token
-- ARGV[4]  the lane (family)
-- ARGV[5]  now, ms
-- Returns the number of tasks taken (0: none queued). A task no longer on the shelf is
-- dropped from the queue. At least one task is taken, whatever its size. The batch records
-- when its oldest task arrived ('first_ms'), for the age of what the lane holds.

local queued = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1, 'WITHSCORES')
local limit, total, n, first = tonumber(ARGV[2]), 0, 0, ARGV[5]
for i = 1, #queued, 2 do
  local id = queued[i]
  local size = redis.call('HSTRLEN', KEYS[2], id)
  if size > 0 then
    if n > 0 and total + size > limit then break end
    if n == 0 then first = queued[i + 1] end
    total = total + size
    redis.call('HSET', KEYS[4], n, id) -- one by one: a batch may hold 100,000
    redis.call('SADD', KEYS[5], id)
    n = n + 1
  end
  redis.call('ZREM', KEYS[1], id)
end
if n == 0 then return 0 end
redis.call('HSET', KEYS[3], 'state', 'forming', 'family', ARGV[4], 'formed_ms', ARGV[5],
           'requests', n, 'bytes', total, 'first_ms', first)
redis.call('SADD', KEYS[6], ARGV[3])
return n
