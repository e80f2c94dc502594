-- Live places per client address and subnet, spliced into join.lua, leave.lua, sweep.lua and
-- admission's admit.lua by waitroom/core/lua_scripts.py ("--!include ...live.lua").
--
-- While a fan waits in line (queue or pre-queue), its entry in `fans` is
-- "<seq> <address> <subnet>" (the counters of waitroom.line.challenge.networks, which hold no
-- space), and the `live` hash counts, per address ("a:IP") and subnet ("n:CIDR"), the fans
-- waiting from there: the hard caps of join.lua read it. A place stops being live when its
-- fan leaves, is dropped as abandoned or is admitted; an admitted fan keeps "<seq>" in
-- `fans` (joining again answers with its pass) and no longer counts. An entry without the
-- two names (written before the caps counted live places) is released without counting.

-- The live places of an address and a subnet.
local function live_counts(live, address, subnet)
  local c = redis.call('HMGET', live, address, subnet)
  return tonumber(c[1]) or 0, tonumber(c[2]) or 0
end

-- A new place for `fan`, numbered `seq`, from `address` in `subnet`.
local function live_take(fans, live, fan, seq, address, subnet)
  redis.call('HSET', fans, fan, seq .. ' ' .. address .. ' ' .. subnet)
  redis.call('HINCRBY', live, address, 1)
  redis.call('HINCRBY', live, subnet, 1)
end

-- `fan`'s place is no longer live. With `keep` (admitted) the fan stays in `fans` as "<seq>";
-- without, it is removed from `fans`.
local function live_release(fans, live, fan, keep)
  local entry = redis.call('HGET', fans, fan)
  if not entry then
    return
  end
  local seq, address, subnet = string.match(entry, '^(%S+) (%S+) (%S+)$')
  if address then
    for _, counter in ipairs({address, subnet}) do
      if redis.call('HINCRBY', live, counter, -1) <= 0 then
        redis.call('HDEL', live, counter)
      end
    end
    if keep then
      redis.call('HSET', fans, fan, seq)
    end
  end
  if not keep then
    redis.call('HDEL', fans, fan)
  end
end
