-- promote.lua: move due entries from a delayed-retry set back onto their stream.
-- Minimum Redis 6.2. Any number of workers may run it at once: each entry moves exactly once.
--
-- KEYS[1]  the delayed sorted set (score = due time, ms; member = a packed envelope)
-- KEYS[2]  the stream the entries go back to
-- ARGV[1]  the field name the member is stored under
-- ARGV[2]  max entries to move
-- Returns {moved, ms until the next entry is due (-1 if none)}.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
for _, member in ipairs(due) do
  redis.call('XADD', KEYS[2], '*', ARGV[1], member)
  redis.call('ZREM', KEYS[1], member)
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local wait = -1
if nxt[2] then wait = math.max(0, tonumber(nxt[2]) - now) end
return {#due, wait}
