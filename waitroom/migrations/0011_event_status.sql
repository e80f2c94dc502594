-- waitroom schema, version 11: an event's status follows its sale.
--
-- 'scheduled' until its room opens, 'open' while it sells, 'sold_out' once nothing is left and
-- nothing held could come back (and 'open' again if tickets return, e.g. a refund), 'closed'
-- when operators close it. The admission leader of the event writes the first three
-- (admission/loop.py), from the room's state in Redis.
ALTER TABLE events DROP CONSTRAINT events_status_check;
ALTER TABLE events ADD CONSTRAINT events_status_check
    CHECK (status IN ('scheduled', 'open', 'sold_out', 'closed'));
