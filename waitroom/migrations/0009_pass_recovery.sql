-- waitroom schema, version 9: Redis is a cache of the passes, PostgreSQL their truth.
--
-- When Redis loses an event's data (a restart without persistence, a failover to a replica
-- that lagged), the room is rebuilt from PostgreSQL before it is served again: who was
-- admitted (and with which pass, so a fan who joins again gets the same pass back instead of
-- a second one), which passes still count against max_active, which are revoked or spent,
-- and where the admission sequence goes on. The signed pass itself is kept for that.
ALTER TABLE queue_passes ADD COLUMN token text CHECK (length(token) <= 4096);

-- The line itself lives in Redis only; what PostgreSQL keeps is its generation: one more
-- each time the room is built in Redis (first load, or after Redis lost it). Join numbers
-- of generation g start at g * 2^40, so a fan who comes back with a place receipt of an
-- earlier generation is put back ahead of everyone who joined since, in the original order,
-- and a receipt of the current generation (a fan who left, or was dropped) restores nothing.
ALTER TABLE room_settings ADD COLUMN line_generation integer NOT NULL DEFAULT 0
    CHECK (line_generation BETWEEN 0 AND 8000);
