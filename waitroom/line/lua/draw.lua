-- Apply (part of) a lottery draw: move pre-queue fans to their drawn places in the queue.
--
-- Idempotent and safe to repeat or to run from two callers: a fan moves only while it is
-- still in the pre-queue, and every caller derives the same places from the one draw list
-- stored in PostgreSQL. A fan who left since the pre-queue was read is simply skipped.
--
-- KEYS  1 meta, 2 queue, 3 prequeue, 4 draw lease
-- ARGV  1 now (unix seconds), 2 lease token, 3 final (1 on the last batch), then place, fan...
-- Reply number of fans moved
local moved = 0
for i = 4, #ARGV, 2 do
  local fan = ARGV[i + 1]
  if redis.call('ZREM', KEYS[3], fan) == 1 then
    redis.call('ZADD', KEYS[2], ARGV[i], fan)
    moved = moved + 1
  end
end
if ARGV[3] == '1' then
  -- The pre-queue is frozen once the room opens, so every fan left in it is in the draw
  -- list. Should one ever be missing (a Redis restored from an older snapshot), it still
  -- keeps a place: behind the drawn fans, ahead of every FIFO place.
  for _, fan in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1)) do
    redis.call('ZADD', KEYS[2], 0, fan)
    moved = moved + 1
  end
  redis.call('DEL', KEYS[3])
  redis.call('HSET', KEYS[1], 'drawn', '1', 'drawn_at', ARGV[1])
  if redis.call('GET', KEYS[4]) == ARGV[2] then
    redis.call('DEL', KEYS[4])
  end
end
return moved
