-- dlq_take.lua: take one letter out of the DLQ, replaying it or not, in one step.
-- Minimum Redis 6.2. Two operators replaying or purging the same letter at once: one takes it,
-- the other finds it gone (the byte count is lowered once, by the letter's own `size`).
--
-- KEYS[1]  the DLQ stream
-- KEYS[2]  its byte count
-- KEYS[3]  replay only: the stream the entry goes back to
-- KEYS[4]  replay only: the task's result
-- KEYS[5]  replay only: the task's record (pipeline.task_record)
-- ARGV[1]  the letter's id
-- ARGV[2]  'purge' or 'replay'
-- replay only:
-- ARGV[3]  '1' to free the task's id for the replayed entry, '0' to leave it (the letter was
--          refused because another task holds the id)
-- ARGV[4]  the ingress entry the letter's task came in by ('' unknown): the id is freed only
--          if the record names no other owner
-- ARGV[5]  the record's TTL while the task is live again (s)
-- ARGV[6..] the entry to add, field, value, ... (none: the caller adds it elsewhere after
--          this step, and KEYS[3] is not touched)
-- Returns 0 if the letter was not in the DLQ, else 1, or 2 if a replay freed the task's id
-- (with partitions the caller then deletes the result producers read, a copy of KEYS[4]).
--
-- Freeing the id removes the failed result and the record's admission and claim, and keeps
-- what the id has paid for (the recorded answer, its call marks, the ledger's mark): the
-- replayed task uses a recorded answer for the same call instead of paying for it again.

local found = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])[1]
if not found then
  return 0
end
local size = 0
for j = 1, #found[2], 2 do
  if found[2][j] == 'size' then size = tonumber(found[2][j + 1]) or 0 end
end
local taken = 1
if ARGV[2] == 'replay' then
  if #ARGV >= 6 then
    redis.call('XADD', KEYS[3], '*', unpack(ARGV, 6))
  end
  if ARGV[3] == '1' then
    local owner = redis.call('HGET', KEYS[5], 'entry')
    if ARGV[4] == '' or not owner or owner == ARGV[4] then
      taken = 2
      redis.call('DEL', KEYS[4])
      redis.call('HDEL', KEYS[5], 'fp', 'entry', 'holder')
      if redis.call('EXISTS', KEYS[5]) == 1 then
        redis.call('EXPIRE', KEYS[5], ARGV[5])
      end
    end
  end
end
redis.call('XDEL', KEYS[1], ARGV[1])
if size ~= 0 then
  redis.call('DECRBY', KEYS[2], size)
end
return taken
