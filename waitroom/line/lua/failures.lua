--!include bucket.lua
-- A token bucket charged by failures only (failed admin logins of one client address).
--
-- KEYS  1 the subject's bucket
-- ARGV  1 rate (tokens per second), 2 burst, 3 now_ms, 4 '1' when this attempt failed
--
-- Reply {allowed, retry_after_ms}. An empty bucket refuses every attempt, a right one as
-- well: otherwise an attacker's guesses would still be checked at full speed and the right
-- one let in. A refused attempt is not charged (the bucket refills while it is refused); an
-- allowed failure takes one token; an allowed success writes nothing.
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local now_ms, failed = tonumber(ARGV[3]), ARGV[4] == '1'
local assessed = bucket_assess(KEYS[1], rate, burst, now_ms, 1)
if not assessed.ok then
  return {0, assessed.retry_ms}
end
if failed then
  bucket_take(KEYS[1], assessed, rate, burst, 1)
end
return {1, 0}
