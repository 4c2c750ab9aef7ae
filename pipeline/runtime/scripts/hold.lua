-- hold.lua: take or keep a consumer name for one live process.
-- Minimum Redis 6.2.
--
-- KEYS[1]  the name's key
-- ARGV[1]  this process's token
-- ARGV[2]  ttl ms
-- Returns 1 if the name is (still or now) ours, 0 if another process holds it.

local current = redis.call('GET', KEYS[1])
if current == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not current then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
