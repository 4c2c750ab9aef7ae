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
-- XAUTOCLAIM … JUSTID gives ids only (6.2 would put a bare nil, with no id, in place of an
-- entry deleted while pending); each id is then read and claimed again without JUSTID so its
-- delivery count goes up by one, as a plain reclaim would. Deleted entries are acknowledged
-- here so they never come back (7.0+ drops them from the pending list by itself).

local stream, group, consumer = KEYS[1], ARGV[1], ARGV[2]
local reply = redis.call('XAUTOCLAIM', stream, group, consumer, ARGV[3], ARGV[4],
                         'COUNT', ARGV[5], 'JUSTID')
local out = {}
for _, id in ipairs(reply[2]) do
  local entry = redis.call('XCLAIM', stream, group, consumer, 0, id)[1]
  if type(entry) ~= 'table' or type(entry[2]) ~= 'table' then
    redis.call('XACK', stream, group, id)
  else
    local p = redis.call('XPENDING', stream, group, id, id, 1)
    out[#out + 1] = {id, entry[2], p[1][4]}
  end
end
return {reply[1], out}
