-- Claim, renew or give up a lease; the one lease script of waitroom (the admission leader of
-- an event, the owner of an event's inventory actor).
--
-- KEYS  1 the lease, 2 (optional) on renew: a HASH the holder publishes figures into;
--       on claim: a STREAM the new holder will read, whose last entry id is replied
-- ARGV  1 token, 2 'claim' | 'renew' | 'release', 3 lease ms (claim, renew),
--       4.. field, value pairs to HSET into KEYS[2] on renew, when KEYS[2] exists
-- Reply renew, release: 1 when the caller held the lease (renewed or released), 0 when not.
--       claim: {0, ''} when someone else holds the lease; {1, mark} when the caller took it
--       now, {2, mark} when it held it already (then it is only extended: claiming is
--       idempotent for the holder); mark is the last entry id of KEYS[2] ('0-0' when empty
--       or not given), read in the same atomic step as the claim, so every entry after it
--       was written by someone who could already see the new holder.
local holder = redis.call('GET', KEYS[1])
if ARGV[2] == 'claim' then
  if holder and holder ~= ARGV[1] then
    return {0, ''}
  end
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
  local mark = '0-0'
  if KEYS[2] then
    local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
    if last[1] then
      mark = last[1][1]
    end
  end
  if holder then
    return {2, mark}
  end
  return {1, mark}
end
if holder ~= ARGV[1] then
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
