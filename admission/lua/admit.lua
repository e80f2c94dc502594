--!include waitroom.line.lua:live.lua
--!include waitroom.line.lua:run_id.lua
-- Admit fans from the head of an event's line, in order, as the leader of its admission loop.
--
-- The passes are signed before this call (signing is Python's work), for the fans that were
-- at the head a moment ago. This script admits them only while each one is still exactly at
-- the head, in the order given, and only under the caller's lease (fencing: a leader that
-- lost its lease, or a stale copy of one, writes nothing). So no fan is admitted twice and
-- the admission order is the line's order, whichever process leads.
--
-- A candidate whose last sign of life (`seen`) is older than `cutoff` is dropped from the
-- line as abandoned without using a place. A candidate no longer in line (left, swept) is
-- skipped. The batch stops early ('moved') if the head is not the next candidate, or
-- ('stale') if a candidate has no pass or its pass's sequence number is not the next one
-- (a fan predicted abandoned came back): the caller signs afresh on its next tick.
--
-- Nor does it admit anyone ('unreconciled') while the room's `incarnation` is not the run id
-- of the Redis process running it: this Redis restarted (from its append-only file, or a
-- replica was promoted) since the room's pass state was last written from PostgreSQL, and
-- its last second may be lost: a pass issued in it missing from `active` would let one fan
-- too many in. The caller rebuilds the room from PostgreSQL and marks it (incarnation.lua).
--
-- KEYS  1 leader, 2 meta, 3 queue, 4 seen, 5 fans, 6 admitted, 7 active, 8 order,
--       9 live places per address and subnet (waitroom/line/lua/live.lua), 10 incarnation
-- ARGV  1 lease token, 2 cutoff (unix seconds; '' = nobody is abandoned), 3 most to admit,
--       then per candidate, in line order: fan, pass ('' = none), jti, exp, seq
-- Reply {outcome, admitted, abandoned, admitted_total, {candidate numbers admitted (1-based)}}
--       outcome 'done' | 'moved' | 'stale' | 'fenced' | 'unreconciled'
local leader, meta, queue, seen, fans, admitted_h, active, order =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8]
if redis.call('GET', leader) ~= ARGV[1] then
  return {'fenced', 0, 0, 0, {}}
end
if redis.call('GET', KEYS[10]) ~= run_id() then
  return {'unreconciled', 0, 0, 0, {}}
end
local cutoff = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local total = tonumber(redis.call('HGET', meta, 'admitted_total') or '0') or 0
local admitted, abandoned, picked = 0, 0, {}
local outcome = 'done'
local n = 0
for i = 4, #ARGV, 5 do
  if admitted >= limit then
    break
  end
  n = n + 1
  local fan = ARGV[i]
  if redis.call('ZSCORE', queue, fan) then
    if redis.call('ZRANGE', queue, 0, 0)[1] ~= fan then
      outcome = 'moved'
      break
    end
    local last = tonumber(redis.call('ZSCORE', seen, fan))
    if cutoff and last and last < cutoff then
      redis.call('ZREM', queue, fan)
      redis.call('ZREM', seen, fan)
      live_release(fans, KEYS[9], fan, false)
      abandoned = abandoned + 1
    elseif ARGV[i + 1] == '' or tonumber(ARGV[i + 4]) ~= total + 1 then
      outcome = 'stale'
      break
    else
      redis.call('ZREM', queue, fan)
      redis.call('ZREM', seen, fan)
      -- The fan stays in `fans`: joining again answers "admitted" with this same pass.
      live_release(fans, KEYS[9], fan, true)
      redis.call('HSET', admitted_h, fan, ARGV[i + 1])
      redis.call('ZADD', active, ARGV[i + 3], ARGV[i + 2])
      redis.call('RPUSH', order, fan)
      total = total + 1
      admitted = admitted + 1
      picked[#picked + 1] = n
    end
  end
end
if admitted > 0 then
  redis.call('HINCRBY', meta, 'admitted_total', admitted)
end
if abandoned > 0 then
  redis.call('HINCRBY', meta, 'abandoned_total', abandoned)
end
return {outcome, admitted, abandoned, total, picked}
