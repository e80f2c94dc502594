-- waitroom schema, version 25: wake-ups are sent after the commit, not in it.
--
-- A transaction that NOTIFYs takes one lock for the whole database cluster at its commit
-- (PostgreSQL's async.c: the notification queue's heavyweight lock), and holds it until the
-- commit is over, its WAL flush included: every notifying transaction commits one after
-- the other, each with its own flush. In the cluster sale (python -m stress cluster) every
-- confirm (payment_start, the workers' wake-up) and every settled payment (the orders
-- trigger, the fans' long polls' wake-up) notified, ~150 a second: sampled in
-- pg_stat_activity, most of the confirms' time was a wait for that lock ("Lock: object"),
-- in payment_start and at COMMIT.
--
-- The hot writers now send the wake-up after their commit, in a transaction of its own
-- whose commit is asynchronous (waitroom_hint): it holds the lock for microseconds, not
-- for a flush. A wake-up is a hint: the workers also poll, and a long poll also ends at its
-- deadline, so one lost in a crash between the two commits only delays an answer.
--   payment_start()          notifies nothing; its caller hints 'waitroom_payments'.
--   the payment workers      set waitroom.hint_after_commit for their transaction, which
--                            the triggers below honour, and hint 'waitroom_reservations'.
-- Every other writer (reconciler, refunds, operators) is notified by the triggers as before.

-- The wake-up ``p_payload`` on ``p_channel``, in a transaction that has written nothing
-- (refused otherwise): its commit is made asynchronous, which loses nothing but the hint.
CREATE FUNCTION waitroom_hint(p_channel text, p_payload text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF txid_current_if_assigned() IS NOT NULL THEN
        RAISE EXCEPTION 'waitroom_hint runs in a transaction of its own (this one wrote)';
    END IF;
    PERFORM set_config('synchronous_commit', 'off', true);
    PERFORM pg_notify(p_channel, p_payload);
END;
$$;

-- Whether the current transaction's writer sends its wake-ups itself, after the commit.
CREATE FUNCTION waitroom_hints_after_commit() RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT coalesce(current_setting('waitroom.hint_after_commit', true), '') = 'on'
$$;

CREATE OR REPLACE FUNCTION orders_notify_status() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT waitroom_hints_after_commit() THEN
        PERFORM pg_notify('waitroom_reservations', NEW.hold_id::text);
    END IF;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE FUNCTION payments_notify_failed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT waitroom_hints_after_commit() THEN
        PERFORM pg_notify('waitroom_reservations', o.hold_id::text)
            FROM orders o WHERE o.id = NEW.order_id;
    END IF;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE FUNCTION payment_start(
    p_hold         uuid,
    p_fan          text,
    p_method       text,
    p_email        text,
    p_key          text,
    p_traceparent  text,
    p_order_id     uuid,
    p_payment_id   uuid,
    OUT outcome    text,
    OUT order_id   uuid,
    OUT payment_id uuid
) LANGUAGE plpgsql AS $$
DECLARE
    h        record;
    o        record;
    v_found  uuid;
    v_try    bigint;
BEGIN
    order_id := p_order_id;
    SELECT hd.id, hd.event_id, hd.fan_id, hd.quantity, hd.status,
           hd.expires_at <= now() AS lapsed, t.price_minor, t.currency
      INTO h
      FROM holds hd JOIN ticket_types t ON t.event_id = hd.event_id AND t.name = hd.ticket_type
     WHERE hd.id = p_hold;
    IF NOT FOUND OR h.fan_id <> p_fan THEN
        outcome := 'hold_not_found';
        RETURN;
    END IF;
    SELECT od.id, od.status INTO o FROM orders od WHERE od.hold_id = h.id FOR UPDATE;
    IF NOT FOUND THEN
        -- No order yet: no payment and no confirm key either. Refused on the hold alone
        -- (paid, cancelled, expired: in this order), or the order is made.
        IF h.status = 'paid' THEN
            outcome := 'hold_already_confirmed';
            RETURN;
        ELSIF h.status = 'cancelled' THEN
            outcome := 'hold_cancelled';
            RETURN;
        ELSIF h.status = 'expired' OR h.lapsed THEN
            outcome := 'hold_expired';
            RETURN;
        END IF;
        INSERT INTO orders (id, hold_id, event_id, fan_id, amount_minor, currency, status)
        VALUES (p_order_id, h.id, h.event_id, p_fan, h.price_minor * h.quantity, h.currency,
                'awaiting_payment')
        ON CONFLICT (hold_id) DO NOTHING;
        SELECT od.id, od.status INTO o FROM orders od WHERE od.hold_id = h.id FOR UPDATE;
    END IF;
    order_id := o.id;
    IF p_key IS NOT NULL THEN
        SELECT p.id INTO v_found FROM payments p WHERE p.order_id = o.id AND p.request_key = p_key;
        IF FOUND THEN
            outcome := 'again';
            payment_id := v_found;
            RETURN;
        END IF;
    END IF;
    IF o.status = 'paid' OR h.status = 'paid' THEN
        outcome := 'hold_already_confirmed';
        RETURN;
    END IF;
    SELECT p.id INTO v_found FROM payments p
     WHERE p.order_id = o.id AND p.state IN ('pending', 'processing') LIMIT 1;
    IF FOUND THEN
        outcome := 'payment_in_progress';
        payment_id := v_found;
        RETURN;
    END IF;
    IF h.status = 'cancelled' THEN
        outcome := 'hold_cancelled';
        RETURN;
    ELSIF h.status = 'expired' OR h.lapsed THEN
        outcome := 'hold_expired';
        RETURN;
    END IF;
    SELECT count(*) + 1 INTO v_try FROM payments p WHERE p.order_id = o.id;
    INSERT INTO payments (id, order_id, state, method, charge_key, next_attempt_at,
                          traceparent, request_key)
    VALUES (p_payment_id, o.id, 'pending', p_method, o.id::text || ':' || v_try, now(),
            p_traceparent, p_key);
    UPDATE orders SET status = 'awaiting_payment'
     WHERE id = o.id AND status <> 'awaiting_payment';
    IF p_email IS NOT NULL THEN
        UPDATE orders SET email = p_email WHERE id = o.id;
    END IF;
    INSERT INTO order_events (order_id, payment_id, kind, detail)
    VALUES (o.id, p_payment_id, 'payment.started',
            jsonb_build_object('attempt', v_try, 'method', p_method));
    -- No NOTIFY here: the caller sends it after the commit (waitroom_hint, above).
    outcome := 'started';
    payment_id := p_payment_id;
END $$;
