-- flight_join.lua: lead the one call for identical requests in flight, or follow it.
-- Minimum Redis 6.2.
--
-- KEYS[1]  the flight (the leader's task id, with a lease: PX)
-- KEYS[2]  the flight's answer (the leader's packed Answer, kept a few seconds)
-- ARGV[1]  this task's id
-- ARGV[2]  lease ms
-- Returns {1, answer} once the leader has answered; {2} when this task leads (the flight was
-- free, its leader's lease lapsed or it let go, or this task already led it); {0} while
-- another live task leads. One script, so a follower never takes the lead in the instant
-- between the leader publishing its answer and letting go.

local answer = redis.call('GET', KEYS[2])
if answer then
  return {1, answer}
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {2}
end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {2}
end
return {0}
