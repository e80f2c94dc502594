-- Token bucket, spliced into join.lua by waitroom/core/lua_scripts.py
-- (a line "--!include bucket.lua" is replaced by this file).
--
-- A bucket is a hash {t = tokens left after the last write, ms = time of that write}. It
-- refills at `rate` tokens per second up to `burst`. Time comes from the caller, never from
-- TIME, so tests can drive the clock and the script stays deterministic.

-- The bucket's level now and whether `cost` tokens are there; writes nothing.
local function bucket_assess(key, rate, burst, now_ms, cost)
  local state = redis.call('HMGET', key, 't', 'ms')
  local tokens = tonumber(state[1])
  local at = tonumber(state[2])
  -- A caller whose clock lags the last writer refills nothing and keeps `at`: moving `at`
  -- back would make the next caller count the same interval twice.
  if tokens == nil or at == nil then
    tokens = burst
    at = now_ms
  elseif now_ms > at then
    tokens = tokens + (now_ms - at) * rate / 1000
    at = now_ms
  end
  tokens = math.min(burst, tokens)
  -- The slack absorbs float rounding of the refill (0.1 tokens/s * 10 s is not 1.0 exactly).
  local ok = tokens + 1e-6 >= cost
  local retry_ms = 0
  if not ok then
    retry_ms = math.ceil((cost - tokens) * 1000 / rate)
  end
  return {tokens = tokens, at = at, ok = ok, retry_ms = retry_ms}
end

-- Milliseconds until a bucket holding `tokens` is full again.
local function bucket_reset_ms(tokens, rate, burst)
  return math.ceil((burst - tokens) * 1000 / rate)
end

-- Take `cost` tokens from an assessed bucket; returns tokens left and ms until full.
local function bucket_take(key, assessed, rate, burst, cost)
  local left = assessed.tokens - cost
  redis.call('HSET', key, 't', string.format('%.6f', left), 'ms', string.format('%d', assessed.at))
  local reset_ms = bucket_reset_ms(left, rate, burst)
  -- A full bucket and a missing one behave the same, so the key may go once it is full.
  redis.call('PEXPIRE', key, reset_ms + 1000)
  return left, reset_ms
end

-- Whole tokens a bucket holds, for the X-RateLimit-Remaining header.
local function bucket_whole(tokens)
  return math.floor(tokens + 1e-6)
end
