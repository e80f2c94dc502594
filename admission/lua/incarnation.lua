--!include waitroom.line.lua:run_id.lua
-- Mark a room's pass state as written from PostgreSQL under this Redis process (admit.lua
-- admits nobody until it is), and carry its pass numbers on after the highest PostgreSQL
-- has (a restart may have lost the last increments of `admitted_total`).
--
-- KEYS  1 the room's incarnation, 2 meta
-- ARGV  1 the highest pass number PostgreSQL has
-- Reply the run id written
if redis.call('HEXISTS', KEYS[2], 'mode') == 1 then
  local total = tonumber(redis.call('HGET', KEYS[2], 'admitted_total') or '0') or 0
  local last = tonumber(ARGV[1]) or 0
  if total < last then
    redis.call('HSET', KEYS[2], 'admitted_total', string.format('%d', last))
  end
end
local run = run_id()
redis.call('SET', KEYS[1], run)
return run
