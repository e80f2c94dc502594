-- Renew or give up an admission lease, only while the caller still holds it.
--
-- KEYS  1 leader (the lease), 2 meta
-- ARGV  1 token, 2 'renew' | 'release', 3 lease ms (renew),
--       4 observed admission rate ('' = leave it), 5 unix time of that figure
-- Reply 1 when the caller held the lease (renewed or released), 0 when it did not
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
if ARGV[2] == 'release' then
  redis.call('DEL', KEYS[1])
  return 1
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
-- Only the leader's figure is written, so two processes never fight over it.
if ARGV[4] ~= '' and redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('HSET', KEYS[2], 'observed_rate', ARGV[4], 'observed_at', ARGV[5])
end
return 1
