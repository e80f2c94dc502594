-- waitroom schema, version 24: a confirm's payment starts in one round trip.
--
-- start_payment() (inventory/orders.py) was a transaction of a dozen statements (the hold,
-- the order created or found and locked, the confirm's key, a payment under way, the attempt
-- number, the payment, the order's status and e-mail, its history, the NOTIFY), each a round
-- trip holding a pooled connection. On a busy node each reply waits for a turn of the event
-- loop, and in the cluster sale (python -m stress cluster) a confirm held its connection for
-- ~0.5 s: the nodes' pools (10 connections) ran dry during the payment rush and requests got
-- 503 after waiting 2 s for one. payment_start() does the same in one statement.
--
-- The same checks in the same order, with one difference of form: a refusal used to raise
-- inside the transaction, rolling back the order it had just created. Here the refusals that
-- can happen before the hold has an order (paid, cancelled, expired: without an order there
-- is no payment and no confirm key to find) are decided before the order is created, so a
-- refusal writes nothing, as before. It returns the outcome:
--   'started'                 a payment was queued: order_id, payment_id
--   'again'                   this confirm's key started payment_id before: answered with it
--   'hold_not_found'          no such hold, or not this fan's
--   'hold_already_confirmed'  the order is paid
--   'payment_in_progress'     payment_id is pending or processing
--   'hold_cancelled', 'hold_expired'
-- order_id is the hold's order (or the one that would have been made, for a refusal).
CREATE FUNCTION payment_start(
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
    -- Delivered at commit; workers that are idle claim the attempt at once instead of at
    -- their next poll.
    PERFORM pg_notify('waitroom_payments', p_payment_id::text);
    outcome := 'started';
    payment_id := p_payment_id;
END $$;
