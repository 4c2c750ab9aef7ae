-- flight_land.lua: the leader lets go of its flight, publishing its answer to the flight's
-- followers and to the response cache first, if it has one: in one step, so that no
-- identical request finds neither a flight nor a cached answer.
-- Minimum Redis 6.2.
--
-- KEYS[1]  the flight (the leader's task id)
-- KEYS[2]  the flight's answer (see flight_join.lua)
-- KEYS[3]  the request's response-cache entry (same hash tag)
-- ARGV[1]  the leader's task id
-- ARGV[2]  the packed Answer, or '' (the call failed: a follower takes the lead instead)
-- ARGV[3]  how long the answer is kept for followers that have yet to poll, ms
-- ARGV[4]  how long the cache keeps it, s (0: the answer is not cacheable)
-- Returns 1 if the flight was still this task's, 0 if its lease had lapsed (the answer is
-- published either way: the followers of whoever leads now may use it).

if ARGV[2] ~= '' then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  redis.call('HSET', KEYS[2], 'at', now, 'answer', ARGV[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
  if ARGV[4] ~= '0' then
    redis.call('SET', KEYS[3], ARGV[2], 'EX', ARGV[4])
  end
end
if KEYS[4] and redis.call('GET', KEYS[4]) == ARGV[1] then
  redis.call('DEL', KEYS[4])
end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
