-- waitroom schema, version 17: seats sold through the inventory actor (assigned seating).
--
-- The actor's group commit writes a seated hold's seats into seat_holds in the transaction
-- that writes the hold, and moves their status with the hold's (inventory/store.py). Schema
-- 13's partial unique index already refuses a seat in two holds that are 'held' or 'paid';
-- this adds the rest of the last line of defence, whoever writes:
--
-- 1. seat_holds.position: the order of a hold's seats as the ledger chose them (a pick's
--    order, or best-available's left to right), so a ledger rebuilt from PostgreSQL answers
--    a retried reserve with exactly the seats of its first answer.
-- 2. A statement trigger refuses a seat that is not on sale (killed or held back in the
--    map), a seat of another ticket type than its hold's, or of another event: one pass over
--    the statement's new rows per group commit, not a trigger per row.
-- 3. tickets.seat_id: the seat a ticket admits to (NULL for general admission), unique per
--    event, so no seat is ever ticketed twice either.
ALTER TABLE seat_holds ADD COLUMN position smallint NOT NULL DEFAULT 0;

CREATE FUNCTION seat_holds_after_insert() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    bad record;
BEGIN
    SELECT n.seat_id, n.hold_id, s.status AS seat_status, s.ticket_type AS seat_type,
           h.ticket_type AS hold_type, h.event_id AS hold_event, n.event_id
      INTO bad
      FROM new_rows n
      JOIN seats s ON s.event_id = n.event_id AND s.seat_id = n.seat_id
      JOIN holds h ON h.id = n.hold_id
     WHERE s.status <> 'open' OR s.ticket_type <> h.ticket_type OR h.event_id <> n.event_id
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'seat %/% cannot go to hold % (seat %, ticket type %, hold of %/%)',
            bad.event_id, bad.seat_id, bad.hold_id, bad.seat_status, bad.seat_type,
            bad.hold_event, bad.hold_type
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER seat_holds_checked AFTER INSERT ON seat_holds
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION seat_holds_after_insert();

ALTER TABLE tickets ADD COLUMN seat_id text;
CREATE UNIQUE INDEX tickets_one_per_seat ON tickets (event_id, seat_id)
    WHERE seat_id IS NOT NULL;
