--!include live.lua
-- Leave an event's line.
--
-- KEYS  1 meta, 2 queue, 3 prequeue, 4 fans, 5 seen, 6 admitted, 7 live places (live.lua)
-- ARGV  1 fan
-- Reply 'left' | 'not_in_line' (never joined, left already, or dropped as abandoned)
--       | 'admitted' (a fan holding a pass is out of the line; the pass stays valid)
--       | 'no_room' (the room is not in Redis: the caller checks the event exists)
local fan = ARGV[1]
if redis.call('HEXISTS', KEYS[1], 'mode') == 0 then
  return 'no_room'
end
if redis.call('HEXISTS', KEYS[6], fan) == 1 then
  return 'admitted'
end
local removed = redis.call('ZREM', KEYS[2], fan) + redis.call('ZREM', KEYS[3], fan)
  + redis.call('HEXISTS', KEYS[4], fan)
live_release(KEYS[4], KEYS[7], fan, false)
redis.call('ZREM', KEYS[5], fan)
if removed > 0 then
  return 'left'
end
return 'not_in_line'
