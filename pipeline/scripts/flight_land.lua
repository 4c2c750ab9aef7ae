-- flight_land.lua: the leader lets go of its flight, publishing its answer first if it has one.
-- Minimum Redis 6.2.
--
-- KEYS[1]  the flight (the leader's task id)
-- KEYS[2]  the flight's answer
-- ARGV[1]  the leader's task id
-- ARGV[2]  the packed Answer, or '' (the call failed: a follower takes the lead instead)
-- ARGV[3]  how long the answer is kept, ms
-- Returns 1 if the flight was still this task's, 0 if its lease had lapsed (the answer is
-- published either way: followers of a newer leader may use it).

if ARGV[2] ~= '' then
  redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
