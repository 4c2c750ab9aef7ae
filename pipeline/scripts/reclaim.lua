-- reclaim.lua: take over entries whose lease lapsed (their worker died or stalled).
-- Minimum Redis 6.2.
--
-- KEYS[1]  the input stream
-- ARGV[1]  consumer group
-- ARGV[2]  consumer name (the claimer)
-- ARGV[3]  min idle ms (the lease)
-- ARGV[4]  start cursor
-- ARGV[5]  max entries to claim
-- Returns {next_cursor, {{id, {field, value, …}, deliveries}, …}}.
-- Entries deleted while pending (6.2 returns them with nil fields; 7.0+ lists them apart and
-- drops them from the pending list) are acknowledged here, so they never come back.

local stream, group, consumer = KEYS[1], ARGV[1], ARGV[2]
local reply = redis.call('XAUTOCLAIM', stream, group, consumer, ARGV[3], ARGV[4], 'COUNT', ARGV[5])
local out = {}
for _, entry in ipairs(reply[2]) do
  local id, fields = entry[1], entry[2]
  if type(fields) ~= 'table' then
    redis.call('XACK', stream, group, id)
  else
    local p = redis.call('XPENDING', stream, group, id, id, 1)
    out[#out + 1] = {id, fields, p[1][4]}
  end
end
return {reply[1], out}
