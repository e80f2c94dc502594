-- Create a room's live state in Redis from what PostgreSQL holds, without overwriting it.
--
-- Every field is written with HSETNX: when two processes load the same room at once, or a
-- field has since been changed live (paused, admitted_total...), the first value stays.
--
-- KEYS[1] meta, KEYS[2] seed
-- ARGV    seed ('' for a FIFO room), then field, value, field, value...
-- Reply   1
for i = 2, #ARGV, 2 do
  redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1])
end
if ARGV[1] ~= '' then
  redis.call('SET', KEYS[2], ARGV[1], 'NX')
end
return 1
