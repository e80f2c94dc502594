-- waitroom schema, version 6: where an operator's change came from.
--
-- An audit row said who (the actor) and what; it now also says from which client address
-- and in which request (the X-Request-ID of its log lines). Both are null for changes made
-- from the CLI, and for rows written before this version.
ALTER TABLE audit_log
    ADD COLUMN client_address inet,
    ADD COLUMN request_id text;
