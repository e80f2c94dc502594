--!include bucket.lua
-- Take `cost` tokens from one token bucket if it holds them.
--
-- KEYS[1]  the bucket
-- ARGV     rate (tokens/s), burst, now_ms, cost
-- Reply    {allowed (1|0), remaining (whole tokens), retry_after_ms, reset_ms}
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local now_ms = tonumber(ARGV[3])
local cost = tonumber(ARGV[4])

local assessed = bucket_assess(KEYS[1], rate, burst, now_ms, cost)
if not assessed.ok then
  return {0, bucket_whole(assessed.tokens), assessed.retry_ms,
          bucket_reset_ms(assessed.tokens, rate, burst)}
end
local left, reset_ms = bucket_take(KEYS[1], assessed, rate, burst, cost)
return {1, bucket_whole(left), 0, reset_ms}
