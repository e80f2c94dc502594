-- waitroom schema, version 9: Redis is a cache of the passes, PostgreSQL their truth.
--
-- When Redis loses an event's data (a restart without persistence, a failover to a replica
-- that lagged), the room is rebuilt from PostgreSQL before it is served again: who was
-- admitted (and with which pass, so a fan who joins again gets the same pass back instead of
-- a second one), which passes still count against max_active, which are revoked or spent,
-- and where the admission sequence goes on. The signed pass itself is kept for that.
ALTER TABLE queue_passes ADD COLUMN token text CHECK (length(token) <= 4096);
