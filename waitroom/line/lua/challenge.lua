--!include bucket.lua
--!include decay.lua
-- The pressure behind the next challenge of one client, in one round trip: charges the
-- address's bucket, counts the request per address, per subnet and for the whole event,
-- and samples how fast the line grows. The difficulty itself is computed in Python
-- (waitroom/line/challenge.py, pure) from this reply.
--
-- KEYS  1 meta, 2 seq, 3 join-rate hash, 4 crowd counter, 5 address counter,
--       6 subnet counter, 7 the address's bucket
-- ARGV  1 now_ms, 2 half-life ms, 3 bucket rate, 4 bucket burst
--
-- Reply {'no_room'} when the room is not in Redis yet; {'limited', retry_ms, burst, left}
-- when the address's bucket is empty; else {'ok', crowd, address, subnet, join_rate} with the
-- numbers as strings (Lua numbers would be truncated to integers in a reply).
if redis.call('HEXISTS', KEYS[1], 'mode') == 0 then
  return {'no_room'}
end
local now_ms = tonumber(ARGV[1])
local half_ms = tonumber(ARGV[2])
local rate, burst = tonumber(ARGV[3]), tonumber(ARGV[4])

local b = bucket_assess(KEYS[7], rate, burst, now_ms, 1)
if not b.ok then
  return {'limited', b.retry_ms, burst, bucket_whole(b.tokens)}
end
bucket_take(KEYS[7], b, rate, burst, 1)

local crowd = decay_add(KEYS[4], now_ms, half_ms, 1)
local address = decay_add(KEYS[5], now_ms, half_ms, 1)
local subnet = decay_add(KEYS[6], now_ms, half_ms, 1)

-- Joins per second: an exponentially weighted average of `seq`'s growth, sampled at most
-- once a second by whichever challenge comes (time constant 10 s).
local seq = tonumber(redis.call('GET', KEYS[2]) or '0')
local r = redis.call('HMGET', KEYS[3], 'seq', 'ms', 'rate')
local last_seq, last_ms, join_rate = tonumber(r[1]), tonumber(r[2]), tonumber(r[3]) or 0
if last_seq == nil or last_ms == nil then
  redis.call('HSET', KEYS[3], 'seq', seq, 'ms', now_ms, 'rate', '0')
elseif now_ms - last_ms >= 1000 then
  local dt = (now_ms - last_ms) / 1000
  local observed = math.max(0, seq - last_seq) / dt
  local weight = math.min(1, dt / 10)
  join_rate = join_rate + weight * (observed - join_rate)
  redis.call('HSET', KEYS[3], 'seq', seq, 'ms', now_ms, 'rate', string.format('%.6f', join_rate))
end
redis.call('PEXPIRE', KEYS[3], 3600000)
return {'ok', string.format('%.6f', crowd), string.format('%.6f', address),
        string.format('%.6f', subnet), string.format('%.6f', join_rate)}
