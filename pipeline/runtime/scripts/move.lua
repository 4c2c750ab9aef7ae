-- move.lua: put an ingress entry into its task's partition, once (pipeline.runtime.partitions).
-- Minimum Redis 6.2.
--
-- KEYS[1]  the partition's marker for this ingress entry
-- KEYS[2]  the partition's first stream
-- ARGV[1]  the marker's ttl, s
-- ARGV[2..] the partition entry's fields
-- Returns 1 if moved now, 0 if it had been moved before (its mover died before the ack).

if redis.call('SET', KEYS[1], 1, 'NX', 'EX', ARGV[1]) == false then
  return 0
end
redis.call('XADD', KEYS[2], '*', unpack(ARGV, 2))
return 1
