-- waitroom schema, version 12: tickets checked in at the door, and tickets voided.
--
-- A ticket is used once: the check-in sets used_at (with who scanned it and at which gate) in
-- one conditional UPDATE (inventory/tickets.py), so two scans racing at two gates leave one
-- check-in. voided_at is set when a ticket stops being valid (an operator today; refunds
-- later), and check-in refuses it. Nullable columns without defaults: adding them rewrites
-- nothing, and the checks are NOT VALID (every existing row has NULLs, which pass; new writes
-- are checked), so the table is not scanned under the migration's lock on a live database.
ALTER TABLE tickets
    ADD COLUMN used_at     timestamptz,
    ADD COLUMN used_by     text,
    ADD COLUMN used_gate   text,
    ADD COLUMN voided_at   timestamptz,
    ADD COLUMN voided_by   text,
    ADD COLUMN void_reason text;
ALTER TABLE tickets ADD CONSTRAINT tickets_used_by_whom
    CHECK ((used_at IS NULL) = (used_by IS NULL)) NOT VALID;
ALTER TABLE tickets ADD CONSTRAINT tickets_voided_by_whom
    CHECK ((voided_at IS NULL) = (voided_by IS NULL)) NOT VALID;
