-- Mirror an event's admission settings from PostgreSQL (their source of truth) into the
-- room's live state, where the leader reads them every tick.
--
-- Versioned by room_settings.updated_at: an operator's change and a leader's periodic
-- reconciliation may arrive in any order, and an older reading must never undo a newer one.
-- A room not loaded in Redis is left alone (loading it reads PostgreSQL anyway).
--
-- KEYS  1 meta, 2 news channel
-- ARGV  1 version (microseconds), 2 rate, 3 max_active, 4 paused ('1'|'0'), 5 waitlist
--       ('1'|'0'; absent or '' leaves it as it is)
-- Reply 1 when something changed, else 0
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
local m = redis.call('HMGET', KEYS[1], 'settings_version', 'rate', 'max_active', 'paused')
if tonumber(m[1] or '0') > tonumber(ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], 'settings_version', ARGV[1], 'rate', ARGV[2],
           'max_active', ARGV[3], 'paused', ARGV[4])
local waitlist_changed = false
if ARGV[5] and ARGV[5] ~= '' then
  waitlist_changed = redis.call('HGET', KEYS[1], 'waitlist') ~= ARGV[5]
  redis.call('HSET', KEYS[1], 'waitlist', ARGV[5])
end
if tonumber(m[2]) == tonumber(ARGV[2]) and m[3] == ARGV[3] and m[4] == ARGV[4]
    and not waitlist_changed then
  return 0
end
redis.call('PUBLISH', KEYS[2], cjson.encode({type = 'settings', rate = tonumber(ARGV[2]),
  max_active = tonumber(ARGV[3]), paused = ARGV[4] == '1'}))
return 1
