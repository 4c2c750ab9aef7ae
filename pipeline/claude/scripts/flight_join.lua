-- flight_join.lua: lead the one call for identical requests in flight, or follow it, or
-- take the answer the response cache already holds.
-- Minimum Redis 6.2.
--
-- KEYS[1]  the flight (the leader's task id, with a lease: PX)
-- KEYS[2]  the flight's answer: a hash {at = server time µs it was published, answer}
-- KEYS[3]  the request's response-cache entry (same hash tag)
-- ARGV[1]  this task's id
-- ARGV[2]  lease ms
-- ARGV[3]  when this task began to follow (µs, from an earlier reply), or '' on its first try
-- ARGV[4]  '1' if this task may take a cached answer
-- KEYS[4]  (optional) the last task that began to lead and has not landed (flight_land
--          deletes it); ARGV[5] its TTL ms. A new leader is told that task, if not itself:
--          it left without landing (killed), and may have recorded an answer.
-- Returns {1, answer} to a follower once an answer published since it began to follow is
-- there; {3, answer} when the cache holds the answer (it landed with its flight, so a task
-- that arrives a moment after the answer pays nothing); {2, now µs} when this task leads
-- (the flight was free, its leader's lease lapsed or it let go, or this task already led
-- it: its lease is renewed; with KEYS[4], {2, now, previous leader or ''}); {0, now µs, leader's task id} while another live task leads. A task that was
-- not in flight while the answer was being made never takes a published answer (it may be
-- an answer cut at max_tokens, which only the cache's rules may reuse). A leader renews its
-- lease with this script too, as a follower since it began to lead, and asks once more
-- before its call goes out if it has not renewed lately: one whose lease lapsed (a starved
-- worker) must not call once another task leads, or has answered, meanwhile.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
if ARGV[3] ~= '' then
  local a = redis.call('HMGET', KEYS[2], 'at', 'answer')
  if a[2] and tonumber(a[1]) >= tonumber(ARGV[3]) then
    return {1, a[2]}
  end
end
if ARGV[4] == '1' then
  local cached = redis.call('GET', KEYS[3])
  if cached then
    return {3, cached}
  end
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local previous = ''
  if KEYS[4] then
    previous = redis.call('GET', KEYS[4]) or ''
    redis.call('SET', KEYS[4], ARGV[1], 'PX', ARGV[5])
    if previous == ARGV[1] then
      previous = ''
    end
  end
  return {2, now, previous}
end
local leader = redis.call('GET', KEYS[1])
if leader == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {2, now}
end
return {0, now, leader or ''}
