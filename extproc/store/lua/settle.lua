-- settle.lua: swap reservations for actual usage and add one entry to the usage ledger.
--
-- KEYS, per adjustment in order:
--   fixed   -> 1 key: the window hash {v, t0} the reservation went into
--   sliding -> 2 keys: the bucket the reservation went into, then the current bucket
-- then, when ARGV says there is a ledger entry, the ledger hash of (user, day) last.
-- Every key carries the same {userid} hash tag, so the script runs on one Redis Cluster slot.
-- ARGV[1] now_ms; ARGV[2] number of adjustments, then 6 values per adjustment:
--   sliding (0 or 1), window_ms, window_start_ms (fixed: the reserved window's start;
--   sliding: the reserved bucket's start), current_bucket_start_ms (sliding only; else 0),
--   reserved, actual
-- then: ledger_ttl_ms (0: no ledger entry), then field, amount pairs for the ledger hash.
-- While the reserved window is still open it moves by actual - reserved (never below 0); once it
-- has ended, actual is charged to the current window, which starts now if none is open.
-- Returns the number of adjustments applied.

-- now, count, open_window, add_fixed and add_bucket come from windows.lua, prepended at load.

local k = 1
for i = 1, count do
  local base = 2 + (i - 1) * 6
  local window = tonumber(ARGV[base + 2])
  local reserved_start = tonumber(ARGV[base + 3])
  local reserved = tonumber(ARGV[base + 5])
  local actual = tonumber(ARGV[base + 6])
  if ARGV[base + 1] == '1' then
    local held = tonumber(redis.call('GET', KEYS[k]))
    if held and now < reserved_start + 2 * window then
      redis.call('INCRBY', KEYS[k], math.max(actual - reserved, -held))
    elseif actual ~= 0 then
      add_bucket(KEYS[k + 1], window, actual)
    end
    k = k + 2
  else
    local value, t0 = open_window(KEYS[k], window)
    if value and t0 == reserved_start then
      redis.call('HINCRBY', KEYS[k], 'v', math.max(actual - reserved, -value))
    elseif actual ~= 0 then
      add_fixed(KEYS[k], window, actual)
    end
    k = k + 1
  end
end

local ttl_base = 2 + count * 6 + 1
local ledger_ttl = tonumber(ARGV[ttl_base])
if ledger_ttl > 0 then
  local ledger = KEYS[k]
  for j = ttl_base + 1, #ARGV, 2 do
    redis.call('HINCRBY', ledger, ARGV[j], ARGV[j + 1])
  end
  redis.call('PEXPIRE', ledger, ledger_ttl)
end
return count
