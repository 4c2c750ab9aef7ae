-- reclaim.lua: take over entries whose lease lapsed (their worker died or stalled).
-- Minimum Redis 6.2.
--
-- KEYS[1]  the input stream
-- KEYS[2]  the stream's reclaim clock: a hash {seen = server ms of the last reclaim here,
--          resume = server ms before which reclaims take nothing}
-- ARGV[1]  consumer group
-- ARGV[2]  consumer name (the claimer)
-- ARGV[3]  min idle ms (the lease)
-- ARGV[4]  start cursor
-- ARGV[5]  max entries to claim (0: only tell the clock this worker is here; a worker with
--          no free slot calls so, or a busy fleet would look like a stalled Redis)
-- ARGV[6]  gap ms: reclaims run every second or so; a longer silence means Redis itself
--          was stalled (a slow script, CLIENT PAUSE, a restart): nobody could renew then,
--          so every lease looks lapsed. Reclaims then take nothing for another two gaps
--          (about a lease), which lets the owners renew first (they back off at most a
--          quarter lease while Redis is away); only entries of the dead stay lapsed.
-- Returns {next_cursor, {{id, {field, value, …}, deliveries}, …}}.
-- XAUTOCLAIM … JUSTID gives ids only (6.2 would put a bare nil, with no id, in place of an
-- entry deleted while pending); each id is then read and claimed again without JUSTID so its
-- delivery count goes up by one, as a plain reclaim would. Deleted entries are acknowledged
-- here so they never come back (7.0+ drops them from the pending list by itself).

local stream, group, consumer = KEYS[1], ARGV[1], ARGV[2]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local gap = tonumber(ARGV[6])
local clock = redis.call('HMGET', KEYS[2], 'seen', 'resume')
local seen, resume = tonumber(clock[1]), tonumber(clock[2]) or 0
redis.call('HSET', KEYS[2], 'seen', now)
if seen and now - seen > gap then
  resume = now + 2 * gap
  redis.call('HSET', KEYS[2], 'resume', resume)
end
if now < resume or tonumber(ARGV[5]) == 0 then
  return {'0-0', {}}
end
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
