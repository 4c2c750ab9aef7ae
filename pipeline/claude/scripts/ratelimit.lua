-- Shared rate limits per (API key, model family): continuously refilled buckets of
-- requests, input tokens and output tokens per minute, a cool-down, and concurrency slots.
--
-- ARGV[1] is the operation: "admit", "settle" or "renew". One file, so the bucket
-- arithmetic exists once. Levels are refilled lazily from the last update time `t`; Redis's
-- own clock (TIME) is the only clock, so workers on skewed hosts agree.
--
-- Bucket hash fields: r i o (levels), t (ms), lr li lo (limits learned from headers),
-- learned ("1" once the API answered), cool (ms: no calls before), probe (ms: a probing call
-- holds it), and counters: admitted ok failed n429 res_i res_o ref_i ref_o.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local op = ARGV[1]
local DIMS = {'r', 'i', 'o'}
local LEARNED = {'lr', 'li', 'lo'}

-- Limits in force (configured, else learned; nil: unlimited) and levels refilled to now.
local function load(hkey, cfg)
  local h = redis.call('HMGET', hkey, 'r', 'i', 'o', 't', 'lr', 'li', 'lo', 'learned', 'cool', 'probe')
  local s = {lim = {}, lv = {}, learned = h[8] == '1', known = true,
             cool = tonumber(h[9]) or 0, probe = tonumber(h[10]) or 0}
  local last = tonumber(h[4]) or now
  for d = 1, 3 do
    local limit = cfg[d]
    if limit == 0 then limit = tonumber(h[4 + d]) end
    if limit == nil and not s.learned then s.known = false end
    s.lim[d] = limit
    if limit ~= nil then
      local level = tonumber(h[d]) or limit
      s.lv[d] = math.min(limit, level + (now - last) * limit / 60000)
    end
  end
  return s
end

local function save(hkey, s)
  local args = {'t', now}
  for d = 1, 3 do
    if s.lv[d] ~= nil then
      table.insert(args, DIMS[d])
      table.insert(args, s.lv[d])
    end
  end
  redis.call('HSET', hkey, unpack(args))
end

if op == 'admit' then
  -- KEYS: per API key its bucket hash and slots set, then the index of bucket hashes.
  -- ARGV: n, need_i, need_o, token, lease_ms, probe_ms, start; then per key: rpm itpm otpm maxc
  local n = tonumber(ARGV[2])
  local need = {1, tonumber(ARGV[3]), tonumber(ARGV[4])}
  local token, lease, probe_ms, start = ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
  local best, why = nil, ''
  for j = 0, n - 1 do
    local k = (start + j) % n + 1
    local hkey, skey, base = KEYS[2 * k - 1], KEYS[2 * k], 8 + (k - 1) * 4
    local cfg = {tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3])}
    local maxc = tonumber(ARGV[base + 4])
    local s = load(hkey, cfg)
    local wait, reason = 0, ''
    if s.cool > now then wait, reason = s.cool - now, 'cool-down' end
    local probing = false
    if not s.known then
      if s.probe > now then
        -- The probe ends when its call settles, any moment now: ask again soon.
        local w = math.min(s.probe - now, 50)
        if w > wait then wait, reason = w, 'probe' end
      else
        probing = true
      end
    end
    for d = 1, 3 do
      local limit = s.lim[d]
      if limit ~= nil then
        -- A request larger than a whole bucket goes when the bucket is full (and leaves
        -- it in debt), as the API does: slow, never impossible.
        local want = math.min(need[d], limit)
        if s.lv[d] < want then
          local w = math.ceil((want - s.lv[d]) * 60000 / limit)
          if w > wait then wait, reason = w, DIMS[d] end
        end
      end
    end
    redis.call('ZREMRANGEBYSCORE', skey, '-inf', now)  -- leases of dead workers
    if maxc > 0 then
      if redis.call('ZCARD', skey) >= maxc then
        -- Slots free up whenever a call ends: ask again soon.
        if wait < 20 then wait, reason = 20, 'slots' end
      end
    end
    if wait == 0 then
      for d = 1, 3 do
        if s.lv[d] ~= nil then s.lv[d] = s.lv[d] - need[d] end
      end
      save(hkey, s)
      if probing then redis.call('HSET', hkey, 'probe', now + probe_ms) end
      redis.call('HINCRBY', hkey, 'admitted', 1)
      redis.call('HINCRBY', hkey, 'res_i', need[2])
      redis.call('HINCRBY', hkey, 'res_o', need[3])
      redis.call('SADD', KEYS[2 * n + 1], hkey)  -- the index `pipeline status` reads
      redis.call('ZADD', skey, now + lease, token)
      redis.call('PEXPIRE', skey, lease * 2)
      return {1, k, probing and 1 or 0}
    end
    if best == nil or wait < best then best, why = wait, reason end
  end
  return {0, best, why}
end

if op == 'settle' then
  -- ARGV: token, res_i, res_o, used_i, used_o, status, cool_ms, cfg r i o,
  --       header limits r i o, header remaining r i o ('' when absent), was_probe
  local hkey, skey = KEYS[1], KEYS[2]
  local res = {0, tonumber(ARGV[3]), tonumber(ARGV[4])}
  local used = {0, tonumber(ARGV[5]), tonumber(ARGV[6])}
  local status, cool_ms = tonumber(ARGV[7]), tonumber(ARGV[8])
  local cfg = {tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])}
  local s = load(hkey, cfg)
  for d = 2, 3 do
    if s.lv[d] ~= nil then s.lv[d] = math.min(s.lim[d], s.lv[d] + res[d] - used[d]) end
  end
  if status == 200 or status == 429 then
    -- The API answered: learn the limits it states, and let its `remaining` correct drift
    -- (another client spending the same key) downwards, never upwards.
    if not s.learned then redis.call('HSET', hkey, 'learned', '1') end
    for d = 1, 3 do
      local hl, hr = tonumber(ARGV[11 + d]), tonumber(ARGV[14 + d])
      if hl ~= nil and cfg[d] == 0 then
        if s.lim[d] == nil then s.lv[d] = hr or hl end
        s.lim[d] = hl
        redis.call('HSET', hkey, LEARNED[d], hl)
      end
      if hr ~= nil and s.lv[d] ~= nil and hr < s.lv[d] then s.lv[d] = hr end
    end
  end
  save(hkey, s)
  if cool_ms > 0 and now + cool_ms > s.cool then redis.call('HSET', hkey, 'cool', now + cool_ms) end
  if ARGV[18] == '1' then redis.call('HDEL', hkey, 'probe') end
  redis.call('HINCRBY', hkey, status == 200 and 'ok' or 'failed', 1)
  if status == 429 then redis.call('HINCRBY', hkey, 'n429', 1) end
  redis.call('HINCRBY', hkey, 'ref_i', res[2] - used[2])
  redis.call('HINCRBY', hkey, 'ref_o', res[3] - used[3])
  return redis.call('ZREM', skey, ARGV[2])
end

if op == 'renew' then
  -- KEYS[1] one key's slots; ARGV: lease_ms, tokens...
  local lease, renewed = tonumber(ARGV[2]), 0
  for j = 3, #ARGV do
    renewed = renewed + redis.call('ZADD', KEYS[1], 'XX', 'CH', now + lease, ARGV[j])
  end
  redis.call('PEXPIRE', KEYS[1], lease * 2)
  return renewed
end

return redis.error_reply('ratelimit.lua: unknown operation ' .. tostring(op))
