-- windows.lua: the window operations admit.lua and settle.lua share; prepended to each at load.
-- ARGV[1] is always now_ms (the caller's clock), ARGV[2] the number of counters that follow.

local now = tonumber(ARGV[1])
local count = tonumber(ARGV[2])

-- The open fixed window of a hash, or nil when there is none or it has ended at `now`.
local function open_window(key, window)
  local stored = redis.call('HMGET', key, 'v', 't0')
  local t0 = tonumber(stored[2])
  if stored[1] and t0 and now < t0 + window then
    return tonumber(stored[1]), t0
  end
  return nil
end

-- Add to a fixed window, opening one that starts now when none is open.
local function add_fixed(key, window, amount)
  if open_window(key, window) then
    redis.call('HINCRBY', key, 'v', amount)
  else
    redis.call('HSET', key, 'v', amount, 't0', ARGV[1])
    redis.call('PEXPIRE', key, window)
  end
end

-- Add to a sliding-window bucket; a new bucket lives two windows.
local function add_bucket(key, window, amount)
  redis.call('INCRBY', key, amount)
  if redis.call('PTTL', key) == -1 then
    redis.call('PEXPIRE', key, 2 * window)
  end
end


-- Add to a calendar period's counter (its key names the period); it expires an hour after the
-- period ends at end_ms, an allowance for replicas whose clocks differ.
local function add_period(key, end_ms, amount)
  redis.call('INCRBY', key, amount)
  if redis.call('PTTL', key) == -1 then
    redis.call('PEXPIRE', key, math.max(1, end_ms - now) + 3600000)
  end
end
