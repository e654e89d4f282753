-- admit.lua: check every window counter; only if all are under their limit, add each one's hits.
--
-- KEYS, per counter in order:
--   fixed   -> 1 key: the window hash {v = value, t0 = window start ms}, TTL = window
--   sliding -> 2 keys: the current aligned bucket, then the previous one (integers, TTL = 2 x window)
--   period  -> 1 key: the calendar period's counter, named after the period (an integer, TTL =
--              until an hour after the period's end)
-- ARGV[1] now_ms (the caller's clock, so every replica and the memory store agree)
-- ARGV[2] number of counters, then 7 values per counter:
--   limit, window_ms, hits, mode (0 fixed, 1 sliding, 2 period),
--   start_ms (sliding: the current bucket's start; period: the period's start; else 0),
--   end_ms (period: its end; else 0), enforce (1; 0: shadow, counted but never denying)
-- then the hold: ttl_ms (0: none), number of pairs, then field, amount pairs added to the
-- ledger hash of (user, day), the key after the counters', only when every counter admits (the
-- request's unsettled reservation, released by settle.lua);
-- then the request state's TTL in ms (0: no request id); the state key is the last key.
-- The state key holds 'held' once this admission applied, 'settled' once settle.lua ran. An
-- admission that arrives after its own settle (it timed out at the caller, who let the request
-- through, and Redis ran it late) changes nothing: its request is over.
-- Returns {allowed (1/0), denied index (0-based, -1 when allowed),
--          then value, window_start_ms, reset_ms for every counter checked}.
-- A counter denies when its value has reached its limit (value + 1 > limit, as Limitador checks);
-- the value returned is after this admission's hits when allowed, before them when denied.
-- A shadow counter never denies: the caller reads "would deny" from its value.

-- now, count, open_window, add_fixed and add_bucket come from windows.lua, prepended at load.

local h = 2 + count * 7 + 1
local hold_ttl = tonumber(ARGV[h])
local hold_pairs = tonumber(ARGV[h + 1])
local state_ttl = tonumber(ARGV[h + 2 + 2 * hold_pairs])
local state_key = KEYS[#KEYS]

local reply = {1, -1}
if state_ttl > 0 and redis.call('GET', state_key) == 'settled' then
  for _ = 1, count do
    table.insert(reply, 0)
    table.insert(reply, now)
    table.insert(reply, 0)
  end
  return reply
end

local k = 1
for i = 1, count do
  local base = 2 + (i - 1) * 7
  local limit = tonumber(ARGV[base + 1])
  local window = tonumber(ARGV[base + 2])
  local hits = tonumber(ARGV[base + 3])
  local mode = ARGV[base + 4]
  local value, start, reset
  if mode == '2' then
    value = tonumber(redis.call('GET', KEYS[k]) or '0')
    start, reset = tonumber(ARGV[base + 5]), tonumber(ARGV[base + 6]) - now
    k = k + 1
  elseif mode == '1' then
    local bucket_start = tonumber(ARGV[base + 5])
    local current = tonumber(redis.call('GET', KEYS[k]) or '0')
    local previous = tonumber(redis.call('GET', KEYS[k + 1]) or '0')
    value = current + math.floor(previous * ((window - (now - bucket_start)) / window))
    start, reset = bucket_start, bucket_start + window - now
    k = k + 2
  else
    value, start = open_window(KEYS[k], window)
    if value then
      reset = start + window - now
    else
      value, start, reset = 0, now, window
    end
    k = k + 1
  end
  if value >= limit and ARGV[base + 7] == '1' then
    reply[1], reply[2] = 0, i - 1
    table.insert(reply, value)
    table.insert(reply, start)
    table.insert(reply, reset)
    return reply
  end
  table.insert(reply, value + hits)
  table.insert(reply, start)
  table.insert(reply, reset)
end

k = 1
for i = 1, count do
  local base = 2 + (i - 1) * 7
  local window = tonumber(ARGV[base + 2])
  local hits = tonumber(ARGV[base + 3])
  local mode = ARGV[base + 4]
  if mode == '2' then
    add_period(KEYS[k], tonumber(ARGV[base + 6]), hits)
    k = k + 1
  elseif mode == '1' then
    add_bucket(KEYS[k], window, hits)
    k = k + 2
  else
    add_fixed(KEYS[k], window, hits)
    k = k + 1
  end
end

if hold_ttl > 0 then
  for j = h + 2, h + 1 + 2 * hold_pairs, 2 do
    redis.call('HINCRBY', KEYS[k], ARGV[j], ARGV[j + 1])
  end
  redis.call('PEXPIRE', KEYS[k], hold_ttl)
end
if state_ttl > 0 then
  redis.call('SET', state_key, 'held', 'PX', state_ttl)
end
return reply
