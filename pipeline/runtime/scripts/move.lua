-- move.lua: put ingress entries into one partition, each once (pipeline.runtime.partitions).
-- Minimum Redis 6.2.
--
-- KEYS[1]     the partition's first stream
-- KEYS[2..n]  the partition's marker for each ingress entry, in order
-- ARGV[1]     the markers' ttl, s
-- ARGV[2..]   per entry: its number of field/value pairs, then the pairs
-- Returns how many were moved now (the others had been moved before: their mover died
-- before the ack).

local ttl, at, moved = ARGV[1], 2, 0
for i = 2, #KEYS do
  local pairs = tonumber(ARGV[at])
  local first, last = at + 1, at + 2 * pairs
  at = last + 1
  if redis.call('SET', KEYS[i], 1, 'NX', 'EX', ttl) then
    redis.call('XADD', KEYS[1], '*', unpack(ARGV, first, last))
    moved = moved + 1
  end
end
return moved
