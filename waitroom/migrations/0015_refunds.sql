-- waitroom schema, version 15: refunds (docs/refunds.md).
--
-- 1. refund_policies: an event's refund policy, set by an operator. tiers is a JSON array of
--    {"until_days_before": N, "percent": P}; the pure rules (inventory/refund_policy.py) read
--    it. An event without a row takes no refunds.
-- 2. refunds: one request to give back (part of) an order, with its state machine
--    pending_approval -> approved | rejected, approved <-> processing -> succeeded | failed
--    ('requested' is the moment before the policy decides; it never outlives the request's
--    transaction). Like payments, attempts is the fencing token of a worker's claim.
-- 3. refund_tickets: the tickets a refund covers. The partial unique index is what keeps a
--    ticket out of two live refunds, whoever writes: a rejected refund lets its tickets go.
-- 4. stock_returns: tickets the inventory actor gave back to stock, once per refund (the
--    refund id is the key), written in the actor's fenced group commit. ticket_types.sold is
--    still never written by the application: the triggers below derive it, so
--    held + sold <= quantity stays checked by PostgreSQL, and a return can never take back
--    more than its hold sold (the insert trigger checks it against the paid hold).

CREATE TABLE refund_policies (
    event_id           text PRIMARY KEY REFERENCES events (id) ON DELETE CASCADE,
    tiers              jsonb NOT NULL CHECK (jsonb_typeof(tiers) = 'array'),
    requires_approval  boolean NOT NULL DEFAULT false,
    updated_by         text NOT NULL,
    updated_at         timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE refunds (
    id               uuid PRIMARY KEY,
    order_id         uuid NOT NULL REFERENCES orders (id) ON DELETE CASCADE,
    event_id         text NOT NULL,
    fan_id           text NOT NULL,
    hold_id          uuid NOT NULL,
    ticket_type      text NOT NULL,
    tickets          text[] NOT NULL CHECK (cardinality(tickets) > 0),
    amount_minor     bigint NOT NULL CHECK (amount_minor >= 0),
    currency         char(3) NOT NULL,
    percent          integer NOT NULL CHECK (percent BETWEEN 0 AND 100),
    state            text NOT NULL CHECK (state IN ('requested', 'pending_approval', 'approved',
                         'rejected', 'processing', 'succeeded', 'failed')),
    idempotency_key  text CHECK (length(idempotency_key) BETWEEN 1 AND 200),
    request_hash     text,
    charge_id        text,
    provider_ref     text,
    attempts         integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at  timestamptz,
    last_error       text,
    reconcile        text CHECK (reconcile IN ('due', 'found', 'not_found')),
    reconcile_after  timestamptz,
    requested_by     text NOT NULL,
    decided_by       text,
    decided_at       timestamptz,
    reason           text CHECK (length(reason) <= 200),
    stock_returned_at timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX refunds_idempotency ON refunds (fan_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX refunds_order ON refunds (order_id);
CREATE INDEX refunds_event_state ON refunds (event_id, state, created_at);
CREATE INDEX refunds_due ON refunds (next_attempt_at) WHERE state IN ('approved', 'processing');

CREATE TABLE refund_tickets (
    refund_id  uuid NOT NULL REFERENCES refunds (id) ON DELETE CASCADE,
    code       text NOT NULL REFERENCES tickets (code) ON DELETE CASCADE,
    live       boolean NOT NULL DEFAULT true,
    PRIMARY KEY (refund_id, code)
);
-- A ticket is in at most one refund that is not rejected.
CREATE UNIQUE INDEX refund_tickets_one_live ON refund_tickets (code) WHERE live;

CREATE TABLE stock_returns (
    refund_id    text PRIMARY KEY CHECK (length(refund_id) BETWEEN 1 AND 200),
    event_id     text NOT NULL,
    hold_id      uuid NOT NULL REFERENCES holds (id) ON DELETE CASCADE,
    ticket_type  text NOT NULL,
    fan_id       text NOT NULL,
    quantity     integer NOT NULL CHECK (quantity > 0),
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX stock_returns_event ON stock_returns (event_id);
CREATE INDEX stock_returns_hold ON stock_returns (hold_id);

-- Returned tickets are no longer sold; once per statement, as the holds' triggers do.
CREATE FUNCTION stock_returns_after_insert() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    bad record;
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
    UPDATE ticket_types t
       SET sold = t.sold - s.q
      FROM (SELECT event_id, ticket_type, sum(quantity) AS q
              FROM new_rows GROUP BY event_id, ticket_type) s
     WHERE t.event_id = s.event_id AND t.name = s.ticket_type;
    RETURN NULL;
END $$;

-- Only when its hold goes (an event purged, waitroom/purge.py): the returns go first (the
-- row trigger on holds below), then the hold's own delete trigger takes its whole quantity
-- off sold. Not by the foreign key's cascade: that runs after the holds' statement trigger,
-- which would see sold below zero for a moment and fail the purge.
CREATE FUNCTION stock_returns_after_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE ticket_types t
       SET sold = t.sold + s.q
      FROM (SELECT event_id, ticket_type, sum(quantity) AS q
              FROM old_rows GROUP BY event_id, ticket_type) s
     WHERE t.event_id = s.event_id AND t.name = s.ticket_type;
    RETURN NULL;
END $$;

CREATE FUNCTION stock_returns_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'stock returns are never changed' USING ERRCODE = 'check_violation';
END $$;

CREATE TRIGGER stock_returns_count_insert AFTER INSERT ON stock_returns
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION stock_returns_after_insert();
CREATE TRIGGER stock_returns_count_delete AFTER DELETE ON stock_returns
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION stock_returns_after_delete();
CREATE TRIGGER stock_returns_no_update BEFORE UPDATE ON stock_returns
    FOR EACH ROW EXECUTE FUNCTION stock_returns_immutable();

CREATE FUNCTION holds_drop_returns() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM stock_returns WHERE hold_id = OLD.id;
    RETURN OLD;
END $$;
-- Per row, but only deletes fire it, and only a purge deletes holds.
CREATE TRIGGER holds_drop_returns BEFORE DELETE ON holds
    FOR EACH ROW EXECUTE FUNCTION holds_drop_returns();
