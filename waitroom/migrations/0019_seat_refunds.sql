-- waitroom schema, version 19: a refund of seated tickets gives their seats back (docs/refunds.md).
--
-- A refund's stock return (schema 15) names the seats it returns, and they go back on sale:
--
-- 1. stock_returns.seats: the seats a return gives back (one per ticket, of its hold; empty
--    for general admission), in the order the inventory actor named them, so a ledger rebuilt
--    from PostgreSQL holds exactly the returns it made (a retried return must equal its first).
-- 2. seat_holds.status 'refunded': a returned seat's row leaves the live set ('held', 'paid')
--    that schema 13's partial unique index covers, so the seat can be held and sold again;
--    its own status rather than 'cancelled', because the seat *was* sold (its hold stays
--    'paid') and an order's history, reports and support must tell a refunded seat from a
--    reservation that was let go before paying.
-- 3. The insert trigger of stock_returns also moves the returned seats' rows to 'refunded',
--    in the statement that records the return (the actor's fenced group commit), and refuses a
--    return whose seats are not exactly its quantity of its hold's seats still sold, or a
--    return of a seated hold that names none: whoever writes, counts and seats agree.
-- 4. tickets_one_per_seat covers valid tickets only: a refunded ticket is voided before its
--    seat comes back, and the seat's next buyer gets a ticket for it. A seat still has at most
--    one ticket that admits; reinstating a voided ticket whose seat was sold again is refused.

ALTER TABLE stock_returns ADD COLUMN seats text[] NOT NULL DEFAULT '{}';

ALTER TABLE seat_holds DROP CONSTRAINT seat_holds_status_check;
ALTER TABLE seat_holds ADD CONSTRAINT seat_holds_status_check
    CHECK (status IN ('held', 'paid', 'expired', 'cancelled', 'refunded'));

CREATE OR REPLACE FUNCTION stock_returns_after_insert() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    bad record;
    named bigint;
    freed bigint;
BEGIN
    SELECT r.hold_id INTO bad
      FROM (SELECT hold_id, sum(quantity) AS q FROM stock_returns
             WHERE hold_id IN (SELECT hold_id FROM new_rows) GROUP BY hold_id) r
      LEFT JOIN holds h ON h.id = r.hold_id
     WHERE h.id IS NULL OR h.status <> 'paid' OR r.q > h.quantity
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'stock return for hold % exceeds what it sold', bad.hold_id
            USING ERRCODE = 'check_violation';
    END IF;
    -- A seated hold's return names one seat per ticket; a standing one's names none.
    SELECT n.refund_id INTO bad
      FROM new_rows n
     WHERE cardinality(n.seats) <> CASE
               WHEN EXISTS (SELECT 1 FROM seat_holds s WHERE s.hold_id = n.hold_id)
               THEN n.quantity ELSE 0 END
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'stock return % does not name one seat of its hold per ticket',
            bad.refund_id USING ERRCODE = 'check_violation';
    END IF;
    SELECT coalesce(sum(cardinality(seats)), 0) INTO named FROM new_rows;
    IF named > 0 THEN
        -- A seat named twice, not the hold's, or no longer sold matches no row or one row
        -- for two names: fewer rows change than seats were named.
        UPDATE seat_holds s SET status = 'refunded'
          FROM (SELECT n.hold_id, seat FROM new_rows n, unnest(n.seats) AS seat) r
         WHERE s.hold_id = r.hold_id AND s.seat_id = r.seat AND s.status = 'paid';
        GET DIAGNOSTICS freed = ROW_COUNT;
        IF freed <> named THEN
            RAISE EXCEPTION 'stock returns name % seats but % sold seats of their holds',
                named, freed USING ERRCODE = 'check_violation';
        END IF;
    END IF;
    UPDATE ticket_types t
       SET sold = t.sold - s.q
      FROM (SELECT event_id, ticket_type, sum(quantity) AS q
              FROM new_rows GROUP BY event_id, ticket_type) s
     WHERE t.event_id = s.event_id AND t.name = s.ticket_type;
    RETURN NULL;
END $$;

DROP INDEX tickets_one_per_seat;
CREATE UNIQUE INDEX tickets_one_per_seat ON tickets (event_id, seat_id)
    WHERE seat_id IS NOT NULL AND voided_at IS NULL;
