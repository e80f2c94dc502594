-- waitroom schema, version 16: a room may keep its line as a waitlist once the event sells out.
--
-- With waitlist on, a sold-out sale does not send the fans in line away: they stay, are told
-- they are on the waitlist, and tickets that come back (expired holds, cancellations, refunds)
-- are offered to them in line order through the normal admission (admission/waitlist.py).
-- Off by default: without it a sold-out sale closes its line as before. waitlist_until, when
-- set, ends the waitlist at that time (the line of a sold-out sale then closes); NULL keeps it
-- until an operator turns it off. Constant defaults add the columns without a table rewrite.
ALTER TABLE room_settings
    ADD COLUMN waitlist       boolean NOT NULL DEFAULT false,
    ADD COLUMN waitlist_until timestamptz;
