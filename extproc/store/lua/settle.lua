-- settle.lua: apply one response's charge once: swap reservations for actual usage, add the usage
-- to the ledger and release the admission's hold on it.
--
-- KEYS[1] the request's state (user-tagged; see admit.lua); then, per adjustment in order:
--   fixed   -> 1 key: the window hash {v, t0} the reservation went into
--   sliding -> 2 keys: the bucket the reservation went into, then the current bucket
--   period  -> 2 keys: the calendar period the reservation went into, then the current period
-- then the ledger hash of (user, settle day) when there is an entry, then the ledger hash of
-- (user, admission day) when there is a hold to release.
-- Every key carries the same {userid} hash tag, so the script runs on one Redis Cluster slot.
-- ARGV[1] now_ms; ARGV[2] number of adjustments; ARGV[3] the request state's TTL in ms (0: the
-- settle has no id: apply it, release included, without the at-most-once check); then 6 values
-- per adjustment:
--   mode (0 fixed, 1 sliding, 2 period), window_ms, window_start_ms (fixed: the reserved
--   window's start; sliding: the reserved bucket's start), current_bucket_start_ms (sliding
--   only; else 0), reserved, actual. A period's are: 2, the current period's end_ms, 1 when the
--   reserved period is the current one (else 0), 0, reserved, actual.
-- then two ledger parts, each: ttl_ms (0: none), number of pairs, then field, amount pairs:
--   the entry (added to the settle day), then the release (added to the admission day). With an
--   id, the release applies only if the admission's hold did (state 'held'): an admission that
--   timed out at the caller may or may not have run.
-- While the reserved window is still open it moves by actual - reserved (never below 0); once it
-- has ended, actual is charged to the current window, which starts now if none is open (a
-- period: the current period, whose counter the key names).
-- Returns the number of adjustments applied, or -1 when this id was settled already; the state
-- is then 'settled', so a late admission of the same request is void.

-- now, count, open_window, add_fixed and add_bucket come from windows.lua, prepended at load.

local state_ttl = tonumber(ARGV[3])
local held = true
if state_ttl > 0 then
  local state = redis.call('GET', KEYS[1])
  if state == 'settled' then
    return -1
  end
  held = state == 'held'
  redis.call('SET', KEYS[1], 'settled', 'PX', state_ttl)
end

local k = 2
for i = 1, count do
  local base = 3 + (i - 1) * 6
  local window = tonumber(ARGV[base + 2])
  local reserved_start = tonumber(ARGV[base + 3])
  local reserved = tonumber(ARGV[base + 5])
  local actual = tonumber(ARGV[base + 6])
  if ARGV[base + 1] == '2' then
    local held = tonumber(redis.call('GET', KEYS[k]))
    if held and ARGV[base + 3] == '1' then
      redis.call('INCRBY', KEYS[k], math.max(actual - reserved, -held))
    elseif actual ~= 0 then
      add_period(KEYS[k + 1], window, actual)
    end
    k = k + 2
  elseif ARGV[base + 1] == '1' then
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

local a = 3 + count * 6 + 1
for part = 1, 2 do
  local ttl = tonumber(ARGV[a])
  local npairs = tonumber(ARGV[a + 1])
  if ttl > 0 then
    if part == 1 or held then
      for j = a + 2, a + 1 + 2 * npairs, 2 do
        redis.call('HINCRBY', KEYS[k], ARGV[j], ARGV[j + 1])
      end
      redis.call('PEXPIRE', KEYS[k], ttl)
    end
    k = k + 1
  end
  a = a + 2 + 2 * npairs
end

-- Export (appended last, so the settle above stays as it is): the charge's record goes to the
-- export stream in this same script, so a record exists if and only if its charge was applied;
-- a replay returned -1 above and adds none. ARGV[#ARGV] the record ('' : none),
-- ARGV[#ARGV - 1] the stream's approximate MAXLEN (0: no trimming); KEYS[#KEYS] the stream.
local record = ARGV[#ARGV]
if record ~= '' then
  if ARGV[#ARGV - 1] == '0' then
    redis.call('XADD', KEYS[#KEYS], '*', 'r', record)
  else
    redis.call('XADD', KEYS[#KEYS], 'MAXLEN', '~', ARGV[#ARGV - 1], '*', 'r', record)
  end
end
return count
