-- handoff.lua: acknowledge a batch of entries, each in the same atomic step that hands it on.
-- Minimum Redis 6.2 (XACKDEL on 8.2+ when ARGV[3] == '1').
--
-- KEYS[1]      the input stream the entries were read from
-- KEYS[2..n]   every other key a record touches (records refer to them by index)
-- ARGV[1]      consumer group
-- ARGV[2]      consumer name (this worker)
-- ARGV[3]      '1' to use XACKDEL, '0' for XACK + XDEL
-- ARGV[4..]    records, each:
--                entry_id, expected_deliveries ('0' = skip the fence), n_actions, actions...
--              actions:
--                'XADD', key_index, maxlen ('0' = untrimmed), n_fields, field, value, ...
--                'ZADD', key_index, delay_ms, member            (due = server time + delay)
--                'RESULT', key_index, ttl_s, n_fields, field, value, ...,
--                          done_index, done_maxlen, n_done_fields, field, value, ...
--                  (first writer wins: if the result exists, neither it nor the event is written)
-- Returns one status per record: 1 handed on, 2 handed on but the result already existed,
-- 0 fenced (this worker no longer owns the entry: nothing was written, nothing acked).

local stream, group, consumer, xackdel = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
local now = nil
local function now_ms()
  if not now then
    local t = redis.call('TIME')
    now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return now
end

local function owned(id, expected)
  if expected == '0' then return true end
  local p = redis.call('XPENDING', stream, group, id, id, 1)
  local e = p[1]
  return e ~= nil and e[2] == consumer and tostring(e[4]) == expected
end

local statuses = {}
local i = 4
while i <= #ARGV do
  local id, expected, n_actions = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  i = i + 3
  local ok = owned(id, expected)
  local status = ok and 1 or 0
  for _ = 1, n_actions do
    local kind = ARGV[i]
    if kind == 'XADD' then
      local key, maxlen, n = KEYS[tonumber(ARGV[i + 1])], ARGV[i + 2], tonumber(ARGV[i + 3])
      if ok then
        local args = {key}
        if maxlen ~= '0' then
          args[#args + 1] = 'MAXLEN'; args[#args + 1] = '~'; args[#args + 1] = maxlen
        end
        args[#args + 1] = '*'
        for j = i + 4, i + 3 + 2 * n do args[#args + 1] = ARGV[j] end
        redis.call('XADD', unpack(args))
      end
      i = i + 4 + 2 * n
    elseif kind == 'ZADD' then
      if ok then
        redis.call('ZADD', KEYS[tonumber(ARGV[i + 1])], now_ms() + tonumber(ARGV[i + 2]), ARGV[i + 3])
      end
      i = i + 4
    elseif kind == 'RESULT' then
      local key, ttl, n = KEYS[tonumber(ARGV[i + 1])], ARGV[i + 2], tonumber(ARGV[i + 3])
      local f0 = i + 4
      local d = f0 + 2 * n
      local done, done_maxlen, nd = KEYS[tonumber(ARGV[d])], ARGV[d + 1], tonumber(ARGV[d + 2])
      if ok then
        if redis.call('EXISTS', key) == 0 then
          local args = {key}
          for j = f0, f0 + 2 * n - 1 do args[#args + 1] = ARGV[j] end
          redis.call('HSET', unpack(args))
          redis.call('EXPIRE', key, ttl)
          local ev = {done, 'MAXLEN', '~', done_maxlen, '*'}
          for j = d + 3, d + 2 + 2 * nd do ev[#ev + 1] = ARGV[j] end
          redis.call('XADD', unpack(ev))
        else
          status = 2
        end
      end
      i = d + 3 + 2 * nd
    else
      return redis.error_reply('handoff: unknown action ' .. tostring(kind))
    end
  end
  if ok then
    if xackdel == '1' then
      redis.call('XACKDEL', stream, group, 'IDS', 1, id)
    else
      redis.call('XACK', stream, group, id)
      redis.call('XDEL', stream, id)
    end
  end
  statuses[#statuses + 1] = status
end
return statuses
