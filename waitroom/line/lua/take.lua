-- Take tokens from one token bucket: the per-pass limit of checkout writes
-- (waitroom/line/buckets.py). The bucket arithmetic is bucket.lua's, as in join.lua.
--
-- KEYS[1] the bucket (a hash, see bucket.lua)
-- ARGV    rate (tokens/s), burst, now_ms (the caller's clock), cost
-- Reply   {allowed (1|0), whole tokens left, retry_after_ms, reset_ms}
--!include bucket.lua

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
