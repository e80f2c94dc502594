-- Renew or give up a lease, only while the caller still holds it; the one lease script of
-- waitroom (the admission leader of an event, the owner of an event's inventory actor).
--
-- KEYS  1 the lease, 2 (optional) a HASH the holder publishes figures into
-- ARGV  1 token, 2 'renew' | 'release', 3 lease ms (renew),
--       4.. field, value pairs to HSET into KEYS[2] on renew, when KEYS[2] exists
-- Reply 1 when the caller held the lease (renewed or released), 0 when it did not
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
if ARGV[2] == 'release' then
  redis.call('DEL', KEYS[1])
  return 1
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
-- Only the holder writes its figures, so two processes never fight over them; a hash that
-- is gone (the room was reset) is not brought back by a renewal.
if #ARGV > 3 and KEYS[2] and redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('HSET', KEYS[2], unpack(ARGV, 4))
end
return 1
