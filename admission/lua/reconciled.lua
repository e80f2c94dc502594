--!include waitroom.line.lua:run_id.lua
-- Whether a room's pass state was written from PostgreSQL under this Redis process (see
-- incarnation.lua): until it is, the room's `admitted_total` and `active` may lack what this
-- Redis lost of its last second before a restart.
--
-- KEYS  1 the room's incarnation
-- Reply 1 reconciled, 0 not
if redis.call('GET', KEYS[1]) == run_id() then
  return 1
end
return 0
