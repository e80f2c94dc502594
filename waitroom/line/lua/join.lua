--!include bucket.lua
--!include live.lua
-- Join an event's line, in one round trip: rate limits, idempotency, the proof-of-work
-- challenge (single use), the caps per address and subnet, and the new place.
--
-- KEYS  1 meta, 2 queue, 3 prequeue, 4 seq, 5 fans, 6 seen, 7 admitted,
--       8 the client IP's bucket, 9 the fan's bucket, 10 the used-challenge marker,
--       11 live places per address and subnet (live.lua)
-- ARGV  1 fan, 2 now (unix seconds), 3 now_ms, 4 IP rate, 5 IP burst, 6 fan rate, 7 fan burst
--       (a fan rate of 0 skips the fan's bucket: a visitor created by this very request
--       has no history to limit), 8 the verified challenge ('' when none), 9 ms until it
--       expires, 10 whether a new place needs a challenge (1/0), 11 address cap,
--       12 subnet cap, 13 the address's counter, 14 the subnet's counter, 15 ms a capped
--       fan is told to wait, 16 the place a verified receipt proves ('' when none)
--
-- A fan already in line gets its place back without paying again: the challenge and the caps
-- are only for a new place, and a challenge is spent only when it buys one.
--
-- Reply {'no_room'} when the room is not in Redis yet (the caller loads it and retries), else
-- {outcome, state, rank, created, pass, paused, sold_out, admitted_total, draw_due,
--  limit, remaining, retry_after_ms, reset_ms, place, restored, waitlisted, returned}
--   outcome  'joined' | 'limited' | 'challenge_required' | 'challenge_replayed' | 'capped'
--            | 'receipt_stale' (a receipt of the current line: nothing was lost to restore)
--   state    'waiting' (rank = fans ahead) | 'prequeue' | 'admitted' (pass) | 'none'
--            ('none': not in line, because the sale is sold out or the request was refused);
--            for 'capped': 'address' or 'subnet' (its live places are at the cap)
--   created  1 when this call gave the fan a new place
--   draw_due 1 when a lottery room has opened but its draw has not been applied yet
--   limit..  the rate-limit figures of the bucket that decided (the fan's when both pass)
--   place    the fan's score in the queue (its join number, or its drawn place), for its
--            receipt; false when not in the queue
--   restored 1 when a receipt put the fan back where it was (Redis had lost the line)
--   waitlisted 1 when the room's waitlist holds the line of a sold-out sale, and returned
--            the tickets that came back since (admission/waitlist.py)
local meta, queue, prequeue = KEYS[1], KEYS[2], KEYS[3]
-- A meta without its mode was never loaded or was lost (see admission/recovery.py).
if redis.call('HEXISTS', meta, 'mode') == 0 then
  return {'no_room'}
end
local fan = ARGV[1]
local now = tonumber(ARGV[2])
local now_ms = tonumber(ARGV[3])
local ip_rate, ip_burst = tonumber(ARGV[4]), tonumber(ARGV[5])
local fan_rate, fan_burst = tonumber(ARGV[6]), tonumber(ARGV[7])

-- Both buckets are assessed before either is charged, so a request refused by one limit
-- does not spend the other's tokens.
local ip = bucket_assess(KEYS[8], ip_rate, ip_burst, now_ms, 1)
local own = nil
if fan_rate > 0 then
  own = bucket_assess(KEYS[9], fan_rate, fan_burst, now_ms, 1)
end
if not ip.ok or (own and not own.ok) then
  local shown, rate, burst = ip, ip_rate, ip_burst
  if own and not own.ok and (ip.ok or own.retry_ms > ip.retry_ms) then
    shown, rate, burst = own, fan_rate, fan_burst
  end
  return {'limited', 'none', false, 0, false, '0', 0, 0, 0, burst, bucket_whole(shown.tokens),
          shown.retry_ms, bucket_reset_ms(shown.tokens, rate, burst)}
end
local ip_left, ip_reset = bucket_take(KEYS[8], ip, ip_rate, ip_burst, 1)
local limit, remaining, reset_ms = ip_burst, ip_left, ip_reset
if own then
  local own_left, own_reset = bucket_take(KEYS[9], own, fan_rate, fan_burst, 1)
  limit, remaining, reset_ms = fan_burst, own_left, own_reset
end

local m = redis.call('HMGET', meta, 'mode', 'opens_at', 'opened', 'drawn', 'paused',
                     'sold_out', 'admitted_total', 'waitlist', 'waitlisting', 'returned')
local mode, opens_at, opened, drawn = m[1], tonumber(m[2]) or 0, m[3], m[4]
local paused, sold_out, admitted_total = m[5] or '0', m[6] == '1' and 1 or 0, tonumber(m[7]) or 0
-- A room with the waitlist on is never sold out to fans: they join (or stay on) the waitlist
-- instead (admission/waitlist.py); `waitlisted` says the sale has sold out meanwhile.
local waitlisted, returned = 0, tonumber(m[10]) or 0
if m[8] == '1' then
  if sold_out == 1 or m[9] == '1' then
    waitlisted = 1
  end
  sold_out = 0
end

-- The first join at or after opening time freezes the lottery's pre-queue: from here on
-- every newcomer lines up FIFO behind the pre-queue, whichever process's clock says what.
if mode == 'lottery' and opened ~= '1' and now >= opens_at then
  redis.call('HSET', meta, 'opened', '1', 'opened_at', ARGV[2])
  opened = '1'
end
local draw_due = (mode == 'lottery' and opened == '1' and drawn ~= '1') and 1 or 0

local function reply(state, rank, created, pass, place, restored)
  return {'joined', state, rank, created, pass, paused, sold_out, admitted_total, draw_due,
          limit, bucket_whole(remaining), 0, reset_ms, place or false, restored or 0,
          waitlisted, returned}
end

if redis.call('HEXISTS', KEYS[5], fan) == 1 then
  local rank = redis.call('ZRANK', queue, fan)
  if rank then
    redis.call('ZADD', KEYS[6], now, fan)
    -- As in positions.lua: unplaced pre-queue fans go ahead of FIFO places only.
    local unplaced = redis.call('ZCARD', prequeue)
    local place = tonumber(redis.call('ZSCORE', queue, fan))
    if unplaced > 0 and place > 0 then
      rank = rank + unplaced
    end
    return reply('waiting', rank, 0, false, string.format('%d', place))
  end
  if redis.call('ZSCORE', prequeue, fan) then
    redis.call('ZADD', KEYS[6], now, fan)
    return reply('prequeue', false, 0, false)
  end
  local pass = redis.call('HGET', KEYS[7], fan)
  if pass then
    return reply('admitted', false, 0, pass)
  end
  -- In `fans` but nowhere else: the admission loop is admitting this fan right now.
  return reply('waiting', 0, 0, false)
end

if sold_out == 1 then
  return reply('none', false, 0, false)
end

local function refused(outcome, state, retry_ms)
  return {outcome, state, false, 0, false, paused, sold_out, admitted_total, draw_due,
          limit, bucket_whole(remaining), retry_ms, reset_ms}
end
-- A receipt of a place in an earlier generation of the line (one Redis lost): the fan goes
-- back exactly there, ahead of everyone who joined since, without paying for it again.
if ARGV[16] ~= '' then
  local place = tonumber(ARGV[16])
  local base = tonumber(redis.call('HGET', meta, 'seq_base') or '0') or 0
  if place >= base then
    return refused('receipt_stale', 'none', 0)
  end
  local text = string.format('%d', place)
  redis.call('HSET', KEYS[5], fan, text)  -- no address: a restored place is not counted
  redis.call('ZADD', KEYS[6], now, fan)
  redis.call('ZADD', queue, text, fan)
  local rank = redis.call('ZRANK', queue, fan)
  if place > 0 then
    rank = rank + redis.call('ZCARD', prequeue)
  end
  return reply('waiting', rank, 1, false, text, 1)
end

local challenge, need = ARGV[8], ARGV[10] == '1'
if need and challenge == '' then
  return refused('challenge_required', 'none', 0)
end
-- The caps are looked at before the challenge is spent: a fan told to wait may come back
-- with the same solution while it lasts. A place frees up whenever a fan of the address
-- leaves the line or is admitted, which nobody can date: the wait is a fixed hint.
local address, subnet = ARGV[13], ARGV[14]
local live_address, live_subnet = live_counts(KEYS[11], address, subnet)
if live_address >= tonumber(ARGV[11]) then
  return refused('capped', 'address', tonumber(ARGV[15]))
end
if live_subnet >= tonumber(ARGV[12]) then
  return refused('capped', 'subnet', tonumber(ARGV[15]))
end
if challenge ~= '' then
  if not redis.call('SET', KEYS[10], '1', 'NX', 'PX', tonumber(ARGV[9])) then
    return refused('challenge_replayed', 'none', 0)
  end
end
local seq = redis.call('INCR', KEYS[4])
live_take(KEYS[5], KEYS[11], fan, seq, address, subnet)
redis.call('ZADD', KEYS[6], now, fan)
if mode == 'lottery' and opened ~= '1' then
  redis.call('ZADD', prequeue, seq, fan)
  return reply('prequeue', false, 1, false)
end
redis.call('ZADD', queue, seq, fan)
-- Pre-queue fans not yet placed by a draw will all go ahead of this fan.
local rank = redis.call('ZRANK', queue, fan) + redis.call('ZCARD', prequeue)
return reply('waiting', rank, 1, false, string.format('%d', seq))
