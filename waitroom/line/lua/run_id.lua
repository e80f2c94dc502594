-- The run id of the Redis process running the script: new each time a Redis starts, so a
-- key holding it tells whether this process wrote it (admission/recovery.py's incarnation).
local function run_id()
  return string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
end
