-- The state of many fans of one event at once: one call per broadcaster tick for all of a
-- process's connected fans, and for a single fan polling GET .../queue/me.
--
-- Every fan still waiting (queue or pre-queue) has its `seen` time refreshed: being asked
-- about is what "connected or polling" means to the abandonment sweep.
--
-- KEYS  1 meta, 2 queue, 3 prequeue, 4 fans, 5 seen, 6 admitted
-- ARGV  1 now (unix seconds), 2.. fan ids
-- Reply {room, codes, passes}
--   room   {mode, opens_at, opened, drawn, paused, sold_out, admitted_total, waiting,
--           commitment, waitlisted, returned} (missing fields are nil; the whole reply is
--           {} without a room). With the room's waitlist on, sold_out is never '1': a
--           sold-out sale keeps its line as a waitlist (waitlisted 1, admission/waitlist.py)
--   codes  one integer per fan, in ARGV order:
--          >= 0 waiting, that many fans ahead
--          -1   in the lottery pre-queue (no place until the draw)
--          -2   admitted: its pass is the next entry of `passes`
--          -3   not in line (never joined, left, or dropped as abandoned)
--          -4   being admitted right now (in `fans`, but neither waiting nor admitted yet)
--   passes the passes of the admitted fans, in order
local meta, queue, prequeue, fans, seen, admitted = KEYS[1], KEYS[2], KEYS[3], KEYS[4],
  KEYS[5], KEYS[6]
-- A meta without its mode was never loaded or was lost (see admission/recovery.py).
if redis.call('HEXISTS', meta, 'mode') == 0 then
  return {}
end
local now = ARGV[1]
local m = redis.call('HMGET', meta, 'mode', 'opens_at', 'opened', 'drawn', 'paused',
                     'sold_out', 'admitted_total', 'commitment', 'waitlist', 'waitlisting',
                     'returned')
local waitlisted = 0
if m[9] == '1' then
  if m[6] == '1' or m[10] == '1' then
    waitlisted = 1
  end
  m[6] = '0'
end
local unplaced = redis.call('ZCARD', prequeue)
local waiting = redis.call('ZCARD', queue) + unplaced

local codes, passes, touch = {}, {}, {}
local function flush()
  if #touch > 0 then
    redis.call('ZADD', seen, unpack(touch))
    touch = {}
  end
end
for i = 2, #ARGV do
  local fan = ARGV[i]
  local rank = redis.call('ZRANK', queue, fan)
  local code
  if rank then
    code = rank
    -- While a draw is being applied, the pre-queue fans it has not placed yet will all go
    -- ahead of the FIFO fans (positive places) and behind those already drawn (negative).
    if unplaced > 0 and tonumber(redis.call('ZSCORE', queue, fan)) > 0 then
      code = rank + unplaced
    end
  elseif redis.call('ZSCORE', prequeue, fan) then
    code = -1
  else
    local pass = redis.call('HGET', admitted, fan)
    if pass then
      code = -2
      passes[#passes + 1] = pass
    elseif redis.call('HEXISTS', fans, fan) == 1 then
      code = -4
    else
      code = -3
    end
  end
  codes[#codes + 1] = code
  if code >= -1 then
    touch[#touch + 1] = now
    touch[#touch + 1] = fan
    -- unpack() is bounded by Lua's C stack (about 8000 values): write in batches.
    if #touch >= 1000 then
      flush()
    end
  end
end
flush()
return {{m[1], m[2], m[3], m[4], m[5], m[6], m[7], waiting, m[8], waitlisted,
         tonumber(m[11]) or 0}, codes, passes}
