--!include live.lua
-- Close the line of a sold-out room: every waiting fan (queue and pre-queue) leaves it, and
-- the passes still counted against max_active stop counting (nobody can reserve any more).
-- Runs only while the room's meta says sold_out (nothing left, nothing held that could
-- come back), so a room whose tickets came back meanwhile is left alone. Bounded work per
-- call; call again while `more` is 1.
--
-- KEYS  1 meta, 2 queue, 3 prequeue, 4 fans, 5 seen, 6 live places (live.lua), 7 active
-- ARGV  1 most fans to remove in this call
-- Reply {removed, more}
local meta, queue, prequeue, fans, seen, active =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[7]
if redis.call('HGET', meta, 'sold_out') ~= '1' then
  return {0, 0}
end
local limit = tonumber(ARGV[1])
local removed = 0
for _, line in ipairs({queue, prequeue}) do
  local batch = redis.call('ZRANGE', line, 0, limit - removed - 1)
  for _, fan in ipairs(batch) do
    redis.call('ZREM', line, fan)
    redis.call('ZREM', seen, fan)
    -- Out of `fans` too (status says sold out, a join is refused as sold out), and the
    -- address's live-place count goes down.
    live_release(fans, KEYS[6], fan, false)
    removed = removed + 1
  end
  if removed >= limit then
    return {removed, 1}
  end
end
redis.call('DEL', active)
return {removed, 0}
