-- waitroom schema, version 20: a reservation's payment settling is announced.
--
-- A fan whose payment is under way asks for the reservation with `?wait=N` (long poll:
-- waitroom/reservation_changes.py) instead of every half second. The server answers when
-- the order is paid or its payment failed, which it learns from these notifications on the
-- channel `waitroom_reservations` (payload: the hold's id), sent at the commit of the change
-- whoever makes it (payment workers, reconciler, refunds, an operator). Only those two
-- changes, and only when they happen: the actor's hold writes, the hot path, notify nothing.
CREATE FUNCTION orders_notify_status() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('waitroom_reservations', NEW.hold_id::text);
    RETURN NULL;
END;
$$;
CREATE TRIGGER orders_status_changed AFTER UPDATE OF status ON orders
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION orders_notify_status();

CREATE FUNCTION payments_notify_failed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('waitroom_reservations', o.hold_id::text)
        FROM orders o WHERE o.id = NEW.order_id;
    RETURN NULL;
END;
$$;
CREATE TRIGGER payments_failed AFTER UPDATE OF state ON payments
    FOR EACH ROW WHEN (NEW.state = 'failed' AND OLD.state IS DISTINCT FROM 'failed')
    EXECUTE FUNCTION payments_notify_failed();
