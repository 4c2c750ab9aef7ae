-- promote.lua: move due entries from a delayed-retry set back onto their stream.
-- Minimum Redis 6.2. Any number of workers may run it at once: each entry moves exactly once.
--
-- KEYS[1]  the delayed sorted set (score = due time, ms; member = "<n>:<task id><envelope>",
--          n the task id's length in bytes; or, from an older worker, a bare envelope)
-- KEYS[2]  the stream the entries go back to
-- ARGV[1]  the field name of the envelope
-- ARGV[2]  the field name of the task id (readable without decoding the envelope)
-- ARGV[3]  max entries to move
-- Returns {moved, ms until the next entry is due (-1 if none)}.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
for _, member in ipairs(due) do
  local colon = string.find(member, ':', 1, true)
  local n = colon and colon <= 11 and tonumber(string.sub(member, 1, colon - 1))
  if n then
    redis.call('XADD', KEYS[2], '*', ARGV[1], string.sub(member, colon + n + 1),
               ARGV[2], string.sub(member, colon + 1, colon + n))
  else
    redis.call('XADD', KEYS[2], '*', ARGV[1], member)
  end
  redis.call('ZREM', KEYS[1], member)
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local wait = -1
if nxt[2] then wait = math.max(0, tonumber(nxt[2]) - now) end
return {#due, wait}
