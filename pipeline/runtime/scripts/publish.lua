-- publish.lua: mirror a result from its partition to the key producers read
-- (pipeline.runtime.partitions), replacing whatever was there: the partition's copy was
-- written first-writer-wins, so it is the task's, and writing it again changes nothing.
-- Minimum Redis 6.2.
--
-- KEYS[1]  <prefix>:result:<id>
-- ARGV[1]  its remaining ttl, ms (the partition copy's)
-- ARGV[2..] the result's fields
-- Returns 1.

redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
