-- Open a room's sale. FIFO rooms only record it. A lottery room freezes its pre-queue
-- (newcomers line up FIFO from now on) and hands the pre-queue and the seed to one caller
-- at a time (a lease), which computes the draw and applies it with draw.lua.
--
-- KEYS  1 meta, 2 prequeue, 3 seed, 4 draw lease
-- ARGV  1 now (unix seconds), 2 lease token, 3 lease ms
-- Reply {'no_room'} | {'fifo'} | {'drawn'} (already done) | {'busy'} (another caller draws)
--       | {'draw', seed, {fans of the pre-queue...}}
local meta = KEYS[1]
local m = redis.call('HMGET', meta, 'mode', 'opened', 'drawn')
if not m[1] then
  return {'no_room'}
end
if m[2] ~= '1' then
  redis.call('HSET', meta, 'opened', '1', 'opened_at', ARGV[1])
end
if m[1] ~= 'lottery' then
  return {'fifo'}
end
if m[3] == '1' then
  return {'drawn'}
end
if not redis.call('SET', KEYS[4], ARGV[2], 'NX', 'PX', ARGV[3]) then
  return {'busy'}
end
return {'draw', redis.call('GET', KEYS[3]), redis.call('ZRANGE', KEYS[2], 0, -1)}
