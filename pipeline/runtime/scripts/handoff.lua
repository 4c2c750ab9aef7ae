-- handoff.lua: acknowledge a batch of entries, each in the same atomic step that hands it on.
-- Minimum Redis 6.2 (XACKDEL on 8.2+ when ARGV[3] == '1').
--
-- KEYS[1]      the input stream the entries were read from
-- KEYS[2..n]   every other key a record touches (actions refer to them by index)
-- ARGV[1]      consumer group
-- ARGV[2]      consumer name (this worker)
-- ARGV[3]      '1' to use XACKDEL, '0' for XACK + XDEL
-- ARGV[4]      msgpack array of records (one argument, so a batch costs one cheap parse);
--              Redis's cmsgpack cannot read msgpack bin, so binary values (envelopes) travel
--              as ARGV[5..] and appear in the records as their integer ARGV index:
--                [entry_id, expected_deliveries (0 = skip the fence), [action, ...]]
--              actions:
--                ['XADD', key_index, maxlen (0 = untrimmed), [field, value, ...]]
--                ['ZADD', key_index, delay_ms, member_argv_index]   (due = server time + delay)
--                ['RESULT', key_index, ttl_s, [field, value, ...],
--                           done_index, done_maxlen, [field, value, ...], record_index, owner]
--                  (first writer wins: if the result exists, neither it nor the event is
--                  written; else the task's record, if any, expires with the result.
--                  `owner`: the ingress entry the task came in by, or '' if it is not known:
--                  if the task's record names another entry as the id's owner, this entry
--                  is a stray copy and writes no result under the id)
--                ['LETTER', dlq_index, bytes_index, maxlen, max_bytes, size, [field, value, ...]]
--                  (a dead letter of `size` bytes; then the oldest letters go while the DLQ
--                  holds more than maxlen letters or max_bytes bytes, never the newest)
-- Returns one status per record: 1 handed on, 2 handed on but the result already existed
-- (or the id is another entry's), 0 fenced (this worker no longer owns the entry: nothing
-- was written, nothing acked). Ownership of the whole batch is checked before anything is
-- written, so an error there (NOGROUP after a restart) leaves no record half done.

local stream, group, consumer, xackdel = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
local records = cmsgpack.unpack(ARGV[4])
local now = nil
local function now_ms()
  if not now then
    local t = redis.call('TIME')
    now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return now
end

local function owned(id, expected)
  if expected == 0 then return true end
  local e = redis.call('XPENDING', stream, group, id, id, 1)[1]
  return e ~= nil and e[2] == consumer and e[4] == expected
end

local function deref(list)
  for j = 1, #list do
    if type(list[j]) == 'number' then list[j] = ARGV[list[j]] end
  end
  return list
end

local function xadd(key, maxlen, fields)
  fields = deref(fields)
  if maxlen ~= 0 then
    redis.call('XADD', key, 'MAXLEN', '~', maxlen, '*', unpack(fields))
  else
    redis.call('XADD', key, '*', unpack(fields))
  end
end

local function size_of(fields)
  for j = 1, #fields, 2 do
    if fields[j] == 'size' then return tonumber(fields[j + 1]) or 0 end
  end
  return 0
end

local function letter(dlq, counter, maxlen, max_bytes, size, fields)
  redis.call('XADD', dlq, '*', unpack(deref(fields)))
  local total = redis.call('INCRBY', counter, size)
  local n = redis.call('XLEN', dlq)
  while n > 1 and (n > maxlen or total > max_bytes) do
    local oldest = redis.call('XRANGE', dlq, '-', '+', 'COUNT', 1)[1]
    redis.call('XDEL', dlq, oldest[1])
    total = redis.call('INCRBY', counter, -size_of(oldest[2]))
    n = n - 1
  end
end

local function stray(record, owner)
  if owner == nil or owner == '' then return false end
  local e = redis.call('HGET', record, 'entry')
  return e and e ~= owner
end

local statuses, acked = {}, {}
for r = 1, #records do
  statuses[r] = owned(records[r][1], records[r][2]) and 1 or 0
end
for r = 1, #records do
  local rec = records[r]
  local id = rec[1]
  local status = statuses[r]
  if status == 1 then
    for _, a in ipairs(rec[3]) do
      local kind = a[1]
      if kind == 'XADD' then
        xadd(KEYS[a[2]], a[3], a[4])
      elseif kind == 'ZADD' then
        redis.call('ZADD', KEYS[a[2]], now_ms() + a[3], ARGV[a[4]])
      elseif kind == 'RESULT' then
        local key = KEYS[a[2]]
        if redis.call('EXISTS', key) == 0 and not stray(KEYS[a[8]], a[9]) then
          redis.call('HSET', key, unpack(deref(a[4])))
          redis.call('EXPIRE', key, a[3])
          redis.call('EXPIRE', KEYS[a[8]], a[3])
          xadd(KEYS[a[5]], a[6], a[7])
        else
          status = 2
        end
      elseif kind == 'LETTER' then
        letter(KEYS[a[2]], KEYS[a[3]], a[4], a[5], a[6], a[7])
      else
        return redis.error_reply('handoff: unknown action ' .. tostring(kind))
      end
    end
    acked[#acked + 1] = id
  end
  statuses[r] = status
end
-- One acknowledgement for the whole batch: fewer calls, same atomicity (one script).
if #acked > 0 then
  if xackdel == '1' then
    redis.call('XACKDEL', stream, group, 'IDS', #acked, unpack(acked))
  else
    redis.call('XACK', stream, group, unpack(acked))
    redis.call('XDEL', stream, unpack(acked))
  end
end
return statuses
