--!include bucket.lua
-- Charge one request to a client address's bucket (polls, WebSocket handshakes).
--
-- KEYS  1 the bucket
-- ARGV  1 now_ms, 2 rate, 3 burst, 4 cost
--
-- Reply {allowed (1|0), burst, whole tokens left, retry_ms, reset_ms}
local now_ms = tonumber(ARGV[1])
local rate, burst, cost = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local b = bucket_assess(KEYS[1], rate, burst, now_ms, cost)
if not b.ok then
  return {0, burst, bucket_whole(b.tokens), b.retry_ms, bucket_reset_ms(b.tokens, rate, burst)}
end
local left, reset_ms = bucket_take(KEYS[1], b, rate, burst, cost)
return {1, burst, bucket_whole(left), 0, reset_ms}
