-- The pass gate of a checkout write in one round trip (admission/passes.py, ADR 0011): the
-- pass the admission loop stored for this fan, the pass's revoked and spent markers, and,
-- when the pass sent is the very one stored and no marker is set, one token from the pass's
-- bucket of checkout writes (waitroom/line/buckets.py, take.lua's arithmetic). Any other
-- pass is charged later by the caller, once its signature is checked: a forged pass must
-- not empty anyone's bucket. (The comparison leaks nothing worth having: the caller is
-- authenticated as this fan already, and the pass compared is that fan's own.)
--
-- KEYS  1 the event's admitted passes (hash fan -> pass), 2 the revoked marker, 3 the spent
--       marker (the revoked marker again when a spent pass may pass), 4 the pass's bucket
-- ARGV  1 fan id, 2 the pass as sent, 3 rate (tokens/s), 4 burst, 5 now_ms, 6 charge (1|0)
-- Reply {known (1|0), same (1|0), flag (0 none | 1 revoked | 2 spent),
--        charged (1 taken | 0 refused | -1 not charged), whole tokens left, retry_ms, reset_ms}
--!include waitroom.line.lua:bucket.lua

local issued = redis.call('HGET', KEYS[1], ARGV[1])
local known, same = 0, 0
if issued then
  known = 1
  if issued == ARGV[2] then
    same = 1
  end
end
local flag = 0
if redis.call('EXISTS', KEYS[2]) == 1 then
  flag = 1
elseif KEYS[3] ~= KEYS[2] and redis.call('EXISTS', KEYS[3]) == 1 then
  flag = 2
end
if same == 0 or flag ~= 0 or ARGV[6] ~= '1' then
  return {known, same, flag, -1, 0, 0, 0}
end
local rate, burst, now_ms = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local assessed = bucket_assess(KEYS[4], rate, burst, now_ms, 1)
if not assessed.ok then
  return {known, same, flag, 0, bucket_whole(assessed.tokens), assessed.retry_ms,
          bucket_reset_ms(assessed.tokens, rate, burst)}
end
local left, reset_ms = bucket_take(KEYS[4], assessed, rate, burst, 1)
return {known, same, flag, 1, bucket_whole(left), 0, reset_ms}
