-- renew.lua: extend this worker's lease on the entries it is still working on.
-- Minimum Redis 6.2.
--
-- KEYS[1]    the input stream
-- ARGV[1]    consumer group
-- ARGV[2]    consumer name (this worker)
-- ARGV[3]    idle ms to set: 0 renews the lease; the lease length hands the entry back,
--            so that any worker's next reclaim takes it at once (clean shutdown). A hand-back
--            also takes one off the delivery count, which the reclaim adds again: handing
--            back at shutdown is not a delivery, so deploys never push a task to the DLQ.
-- ARGV[4..]  pairs: entry_id, expected_deliveries
-- An entry is renewed (XCLAIM … JUSTID: idle set, delivery count unchanged) only while
-- this worker still owns it with the delivery count it read; an entry another worker has
-- reclaimed is never taken back. Returns the ids that were lost.

local stream, group, consumer = KEYS[1], ARGV[1], ARGV[2]
local lost = {}
for i = 4, #ARGV, 2 do
  local id, expected = ARGV[i], ARGV[i + 1]
  local p = redis.call('XPENDING', stream, group, id, id, 1)
  local e = p[1]
  if e ~= nil and e[2] == consumer and tostring(e[4]) == expected then
    if ARGV[3] == '0' then
      redis.call('XCLAIM', stream, group, consumer, 0, id, 'IDLE', 0, 'JUSTID')
    else
      redis.call('XCLAIM', stream, group, consumer, 0, id, 'IDLE', ARGV[3],
                 'RETRYCOUNT', math.max(0, e[4] - 1), 'JUSTID')
    end
  else
    lost[#lost + 1] = id
  end
end
return lost
