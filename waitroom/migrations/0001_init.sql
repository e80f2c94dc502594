-- waitroom schema, version 1.
--
-- The invariants are enforced here as the last line of defence: the inventory actor keeps
-- them in memory, but a bug or a write behind its back must still fail in PostgreSQL.
-- ticket_types.held/sold are never written by the application: statement-level triggers
-- derive them from holds, so "held + sold <= quantity" is checked on every change to holds,
-- once per statement (a group commit of a thousand holds fires each trigger once).

CREATE TABLE events (
    id          text PRIMARY KEY CHECK (id ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    venue       text NOT NULL DEFAULT '' CHECK (length(venue) <= 200),
    starts_at   timestamptz,
    status      text NOT NULL DEFAULT 'scheduled'
                CHECK (status IN ('scheduled', 'open', 'closed')),
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX events_created_at ON events (created_at DESC, id);

-- The waiting room's rules for one event; operators change them live.
CREATE TABLE room_settings (
    event_id         text PRIMARY KEY REFERENCES events (id) ON DELETE CASCADE,
    queue_mode       text NOT NULL CHECK (queue_mode IN ('fifo', 'lottery')),
    opens_at         timestamptz NOT NULL,
    rate_per_second  double precision NOT NULL CHECK (rate_per_second > 0 AND rate_per_second <= 100000),
    max_active       integer NOT NULL CHECK (max_active > 0),
    paused           boolean NOT NULL DEFAULT false,
    pass_ttl_s       integer NOT NULL CHECK (pass_ttl_s BETWEEN 10 AND 86400),
    -- The API asks for at least 10 s; the schema allows 1 s so tests can watch holds expire.
    hold_ttl_s       integer NOT NULL CHECK (hold_ttl_s BETWEEN 1 AND 86400),
    abandon_grace_s  integer NOT NULL CHECK (abandon_grace_s BETWEEN 5 AND 86400),
    per_fan_limit    integer NOT NULL CHECK (per_fan_limit > 0),
    updated_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE ticket_types (
    event_id       text NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    name           text NOT NULL CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9 _-]{0,63}$'),
    quantity       integer NOT NULL CHECK (quantity > 0),
    price_minor    bigint NOT NULL CHECK (price_minor >= 0),
    currency       char(3) NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    per_fan_limit  integer NOT NULL CHECK (per_fan_limit > 0),
    position       integer NOT NULL DEFAULT 0,
    held           integer NOT NULL DEFAULT 0 CHECK (held >= 0),
    sold           integer NOT NULL DEFAULT 0 CHECK (sold >= 0),
    PRIMARY KEY (event_id, name),
    CONSTRAINT no_oversell CHECK (held + sold <= quantity)
);

CREATE TABLE holds (
    id               uuid PRIMARY KEY,
    event_id         text NOT NULL,
    ticket_type      text NOT NULL,
    fan_id           text NOT NULL CHECK (length(fan_id) BETWEEN 1 AND 200),
    quantity         integer NOT NULL CHECK (quantity > 0),
    status           text NOT NULL CHECK (status IN ('held', 'paid', 'expired', 'cancelled')),
    pass_jti         text,
    payment_ref      text,
    -- The Idempotency-Key of the reserve that created the hold, with the request's digest:
    -- its first result is this hold as created, so no separate idempotency row is needed.
    idempotency_key  text CHECK (length(idempotency_key) BETWEEN 1 AND 200),
    request_hash     text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    expires_at       timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL DEFAULT now()
    -- No per-row FOREIGN KEY to ticket_types: a group commit inserts thousands of holds at a
    -- time and per-row RI checks would dominate it. holds_after_insert checks the same thing
    -- once per statement.
);
-- The actor loads an event's live holds; the safety net finds holds past their deadline.
CREATE INDEX holds_live ON holds (event_id, expires_at) WHERE status = 'held';
CREATE UNIQUE INDEX holds_idempotency ON holds (event_id, fan_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- A retried write returns the first result: one row per (event, fan, key), with that result.
-- Scoped by event because each event's actor keeps its own keys.
CREATE TABLE idempotency_keys (
    event_id      text NOT NULL,  -- no per-row FK: written by group commits, see holds
    fan_id        text NOT NULL,
    key           text NOT NULL CHECK (length(key) BETWEEN 1 AND 200),
    request_hash  text NOT NULL,
    status_code   integer NOT NULL,
    response      jsonb NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (event_id, fan_id, key)
);

CREATE TABLE orders (
    id            uuid PRIMARY KEY,
    hold_id       uuid NOT NULL UNIQUE REFERENCES holds (id),
    event_id      text NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    fan_id        text NOT NULL,
    amount_minor  bigint NOT NULL CHECK (amount_minor >= 0),
    currency      char(3) NOT NULL,
    status        text NOT NULL CHECK (status IN ('awaiting_payment', 'paid', 'failed', 'cancelled')),
    created_at    timestamptz NOT NULL DEFAULT now(),
    paid_at       timestamptz
);
CREATE INDEX orders_fan ON orders (fan_id, created_at DESC);
CREATE INDEX orders_event ON orders (event_id, status);

CREATE TABLE payments (
    id            uuid PRIMARY KEY,
    order_id      uuid NOT NULL REFERENCES orders (id),
    state         text NOT NULL CHECK (state IN ('pending', 'processing', 'succeeded', 'failed')),
    method        text NOT NULL,
    attempts      integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    charge_key    text NOT NULL UNIQUE,
    provider_ref  text,
    last_error    text,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
-- An order is charged successfully at most once.
CREATE UNIQUE INDEX payments_one_success ON payments (order_id) WHERE state = 'succeeded';
CREATE INDEX payments_due ON payments (next_attempt_at) WHERE state IN ('pending', 'processing');

CREATE TABLE tickets (
    id           uuid PRIMARY KEY,
    order_id     uuid NOT NULL REFERENCES orders (id),
    event_id     text NOT NULL,
    ticket_type  text NOT NULL,
    fan_id       text NOT NULL,
    code         text NOT NULL UNIQUE CHECK (length(code) >= 16),
    issued_at    timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (event_id, ticket_type) REFERENCES ticket_types (event_id, name)
);
CREATE INDEX tickets_order ON tickets (order_id);

-- Written in the same transaction as the change it announces; the relay publishes it.
CREATE TABLE outbox (
    id            bigserial PRIMARY KEY,
    event_id      text NOT NULL,
    topic         text NOT NULL,
    -- json, not jsonb: stored as sent (a batch's holds), never queried inside; converting a
    -- group commit's payload to jsonb would cost the commit more than the rows themselves.
    payload       json NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    published_at  timestamptz,
    attempts      integer NOT NULL DEFAULT 0,
    dead          boolean NOT NULL DEFAULT false
);
CREATE INDEX outbox_pending ON outbox (id) WHERE published_at IS NULL AND NOT dead;

CREATE TABLE audit_log (
    id        bigserial PRIMARY KEY,
    at        timestamptz NOT NULL DEFAULT now(),
    actor     text NOT NULL,
    action    text NOT NULL,
    event_id  text,
    old       jsonb,
    new       jsonb
);
CREATE INDEX audit_log_event ON audit_log (event_id, at);

-- Fencing for the inventory actor: the owner's epoch is checked inside every commit.
CREATE TABLE inventory_owners (
    event_id  text PRIMARY KEY REFERENCES events (id) ON DELETE CASCADE,
    epoch     bigint NOT NULL CHECK (epoch >= 0),
    owner     text NOT NULL,
    since     timestamptz NOT NULL DEFAULT now()
);

-- held/sold derived from holds, once per statement.
CREATE FUNCTION holds_after_insert() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    missing record;
BEGIN
    SELECT n.event_id, n.ticket_type INTO missing
      FROM (SELECT DISTINCT event_id, ticket_type FROM new_rows) n
     WHERE NOT EXISTS (SELECT 1 FROM ticket_types t
                        WHERE t.event_id = n.event_id AND t.name = n.ticket_type)
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'hold for unknown ticket type %/%', missing.event_id, missing.ticket_type
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    UPDATE ticket_types t
       SET held = t.held + coalesce(s.held, 0), sold = t.sold + coalesce(s.sold, 0)
      FROM (SELECT event_id, ticket_type,
                   sum(quantity) FILTER (WHERE status = 'held') AS held,
                   sum(quantity) FILTER (WHERE status = 'paid') AS sold
              FROM new_rows GROUP BY event_id, ticket_type) s
     WHERE t.event_id = s.event_id AND t.name = s.ticket_type;
    RETURN NULL;
END $$;

CREATE FUNCTION holds_after_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE ticket_types t
       SET held = t.held + s.d_held, sold = t.sold + s.d_sold
      FROM (SELECT event_id, ticket_type, sum(d_held) AS d_held, sum(d_sold) AS d_sold
              FROM (SELECT event_id, ticket_type,
                           CASE WHEN status = 'held' THEN quantity ELSE 0 END AS d_held,
                           CASE WHEN status = 'paid' THEN quantity ELSE 0 END AS d_sold
                      FROM new_rows
                    UNION ALL
                    SELECT event_id, ticket_type,
                           CASE WHEN status = 'held' THEN -quantity ELSE 0 END,
                           CASE WHEN status = 'paid' THEN -quantity ELSE 0 END
                      FROM old_rows) u
             GROUP BY event_id, ticket_type) s
     WHERE t.event_id = s.event_id AND t.name = s.ticket_type
       AND (s.d_held <> 0 OR s.d_sold <> 0);
    RETURN NULL;
END $$;

CREATE FUNCTION holds_after_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE ticket_types t
       SET held = t.held - coalesce(s.held, 0), sold = t.sold - coalesce(s.sold, 0)
      FROM (SELECT event_id, ticket_type,
                   sum(quantity) FILTER (WHERE status = 'held') AS held,
                   sum(quantity) FILTER (WHERE status = 'paid') AS sold
              FROM old_rows GROUP BY event_id, ticket_type) s
     WHERE t.event_id = s.event_id AND t.name = s.ticket_type;
    RETURN NULL;
END $$;

CREATE TRIGGER holds_count_insert AFTER INSERT ON holds
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION holds_after_insert();
CREATE TRIGGER holds_count_update AFTER UPDATE ON holds
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION holds_after_update();
CREATE TRIGGER holds_count_delete AFTER DELETE ON holds
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION holds_after_delete();

-- A hold may only move on from 'held'; paid, expired and cancelled are final.
CREATE FUNCTION holds_guard_transition() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.status <> NEW.status AND OLD.status <> 'held' THEN
        RAISE EXCEPTION 'hold % cannot move from % to %', OLD.id, OLD.status, NEW.status
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.quantity <> OLD.quantity OR NEW.ticket_type <> OLD.ticket_type
       OR NEW.event_id <> OLD.event_id OR NEW.fan_id <> OLD.fan_id THEN
        RAISE EXCEPTION 'hold % is immutable except for its status', OLD.id
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER holds_transition BEFORE UPDATE ON holds
    FOR EACH ROW EXECUTE FUNCTION holds_guard_transition();
