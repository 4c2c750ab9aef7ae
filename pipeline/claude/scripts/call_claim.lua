-- call_claim.lua: before a task's paid call, take its claim, or learn why not to call.
-- Minimum Redis 6.2.
--
-- KEYS[1]  the task's record (pipeline.task_record)
-- KEYS[2]  the stream of the entry asking (its lease is the claim's); absent when it has
--          none (outside a worker), so that every key lies in the record's slot
-- ARGV[1]  the call's binding: request hash, model and max_tokens it would send
-- ARGV[2]  this entry's lease token: stream \n group \n entry id \n consumer \n deliveries
-- ARGV[3]  the lease (ms)
-- ARGV[4]  the record's TTL while the task is live (s)
-- Returns {1, answer}: an answer is recorded for this very call (hand it on, pay nothing);
-- {3}: an answer is recorded for another request under this id (refuse this entry);
-- {2}: another entry of this task holds a live claim (it will answer; drop this one);
-- {0, fence}: this entry holds the claim now (call), fence = the claim's number.
--
-- A claim is as live as the stream entry named in it: pending to the same consumer with the
-- same delivery count, idle for less than a lease. The runtime renews that lease while the
-- call runs; a worker that dies or stalls past it loses the entry and the claim together.

local r = redis.call('HMGET', KEYS[1], 'answer', 'req', 'holder')
if r[1] then
  if r[2] == ARGV[1] then
    return {1, r[1]}
  end
  return {3}
end
local me = ARGV[2]
if r[3] and r[3] ~= me then
  local stream, group, id, consumer, deliveries =
    string.match(r[3], '^(.-)\n(.-)\n(.-)\n(.-)\n(.-)$')
  -- Only a holder on the asking entry's own stream (a declared key) can be live: a task's
  -- entries stay on one stream; a claim named on another one is treated as lapsed.
  if stream and stream ~= '' and KEYS[2] and stream == KEYS[2] then
    local ok, p = pcall(redis.call, 'XPENDING', stream, group, id, id, 1)
    local e = ok and p[1]
    if e and e[2] == consumer and tostring(e[4]) == deliveries
        and tonumber(e[3]) < tonumber(ARGV[3]) then
      return {2}
    end
  end
end
redis.call('HSET', KEYS[1], 'holder', me)
local fence = redis.call('HINCRBY', KEYS[1], 'fence', 1)
if redis.call('TTL', KEYS[1]) < 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[4])
end
return {0, fence}
