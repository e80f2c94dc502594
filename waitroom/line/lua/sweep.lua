--!include live.lua
-- Drop abandoned fans: those waiting (queue or pre-queue) whose last sign of life is older
-- than the room's grace period. Bounded work per call; call again while `more` is 1.
--
-- KEYS  1 meta, 2 queue, 3 prequeue, 4 fans, 5 seen, 6 live places (live.lua)
-- ARGV  1 now (unix seconds), 2 most fans to look at in this call
-- Reply {dropped, more}
local meta, queue, prequeue, fans, seen = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local grace = tonumber(redis.call('HGET', meta, 'grace_s'))
if not grace then
  return {0, 0}
end
local limit = tonumber(ARGV[2])
local stale = redis.call('ZRANGEBYSCORE', seen, '-inf', '(' .. (tonumber(ARGV[1]) - grace),
                         'LIMIT', 0, limit)
local dropped = 0
for _, fan in ipairs(stale) do
  -- `seen` may still list a fan the admission loop has just admitted: such a fan is in
  -- neither line, keeps its place in `fans`, and only loses its stale `seen` entry.
  if redis.call('ZREM', queue, fan) + redis.call('ZREM', prequeue, fan) > 0 then
    live_release(fans, KEYS[6], fan, false)
    dropped = dropped + 1
  end
  redis.call('ZREM', seen, fan)
end
if dropped > 0 then
  redis.call('HINCRBY', meta, 'abandoned_total', dropped)
end
return {dropped, #stale == limit and 1 or 0}
