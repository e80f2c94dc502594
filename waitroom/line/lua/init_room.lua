--!include run_id.lua
-- Create a room's live state in Redis from what PostgreSQL holds, without overwriting it.
--
-- Every field is written with HSETNX: when two processes load the same room at once, or a
-- field has since been changed live (paused, admitted_total...), the first value stays.
--
-- The join counter starts at the room's generation base (waitroom/line/receipts.py), and
-- never goes back: a counter that survived while the meta was lost keeps its higher value.
--
-- The room's state is now PostgreSQL's as of this Redis process: its incarnation is marked
-- (admission/lua/admit.lua).
--
-- KEYS[1] meta, KEYS[2] seed, KEYS[3] seq, KEYS[4] incarnation
-- ARGV    seed ('' for a FIFO room), then field, value, field, value...
-- Reply   1
for i = 2, #ARGV, 2 do
  redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1])
end
if ARGV[1] ~= '' then
  redis.call('SET', KEYS[2], ARGV[1], 'NX')
end
local base = tonumber(redis.call('HGET', KEYS[1], 'seq_base') or '0') or 0
if (tonumber(redis.call('GET', KEYS[3]) or '0') or 0) < base then
  redis.call('SET', KEYS[3], string.format('%d', base))
end
redis.call('SET', KEYS[4], run_id())
return 1
