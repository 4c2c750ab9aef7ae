-- drain.lua: take back this worker's own pending entries (after a restart with the same name).
-- Minimum Redis 6.2.
--
-- KEYS[1]  the input stream
-- ARGV[1]  consumer group
-- ARGV[2]  consumer name
-- ARGV[3]  exclusive start id ('-' for the beginning)
-- ARGV[4]  max entries
-- Returns {last_id_seen, {{id, {field, value, …}, deliveries}, …}}; last_id_seen is '' when done.
-- Each entry is re-claimed (delivery count + 1) so a late result from the previous life is fenced.

local stream, group, consumer = KEYS[1], ARGV[1], ARGV[2]
local pending = redis.call('XPENDING', stream, group, ARGV[3], '+', ARGV[4], consumer)
local out = {}
local last = ''
for _, p in ipairs(pending) do
  local id = p[1]
  last = id
  local claimed = redis.call('XCLAIM', stream, group, consumer, 0, id)
  local entry = claimed[1]
  if type(entry) ~= 'table' or type(entry[2]) ~= 'table' then
    redis.call('XACK', stream, group, id)  -- deleted while pending
  else
    out[#out + 1] = {id, entry[2], tonumber(p[4]) + 1}
  end
end
return {last, out}
