-- Decayed counters, spliced into challenge.lua and join.lua by waitroom/core/lua_scripts.py
-- (a line "--!include decay.lua" is replaced by this file).
--
-- A counter is a hash {v = value at the last write, ms = time of that write}; it halves every
-- `half_ms`. Recent activity weighs most, and a subnet that stops asking comes back down by
-- itself. Time comes from the caller, never from TIME (tests drive the clock).

-- The counter's value at now_ms; writes nothing.
local function decay_read(key, now_ms, half_ms)
  local state = redis.call('HMGET', key, 'v', 'ms')
  local v, at = tonumber(state[1]), tonumber(state[2])
  if v == nil or at == nil then
    return 0, now_ms
  end
  -- A caller whose clock lags the last writer decays nothing (as bucket.lua refills nothing).
  if now_ms > at then
    v = v * math.pow(0.5, (now_ms - at) / half_ms)
    at = now_ms
  end
  return v, at
end

-- Add `amount` to the counter at now_ms; returns the new value. The key expires once the
-- count has decayed below 1/4096 of a unit from any plausible level.
local function decay_add(key, now_ms, half_ms, amount)
  local v, at = decay_read(key, now_ms, half_ms)
  v = v + amount
  redis.call('HSET', key, 'v', string.format('%.6f', v), 'ms', string.format('%d', at))
  redis.call('PEXPIRE', key, math.ceil(half_ms * 24))
  return v
end
