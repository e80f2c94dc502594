-- waitroom schema, version 7: bounded idempotency records and one hold cycle per queue pass.
--
-- 1. The inventory ledger keeps at most a few refusals per fan for replay and forgets the
--    oldest; a forgotten key that comes back is recorded again. inventory_commit() now
--    replaces such a row (newest first result wins, created_at restarts) instead of failing
--    the whole group commit on the primary key.
-- 2. The workers' safety net purges old idempotency records by age (refusals sooner):
--    an index on created_at keeps that a range scan.
-- 3. An actor that (re)loads an event's ledger reads the passes whose holds were all
--    released (cancelled or expired) so that their hold cycle stays over: a partial index
--    on exactly those rows, so the load never scans the settled history of the event.

CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);

CREATE INDEX holds_released_pass ON holds (event_id, fan_id, pass_jti)
    WHERE status IN ('expired', 'cancelled') AND pass_jti IS NOT NULL;

CREATE OR REPLACE FUNCTION inventory_commit(
    p_event        text,
    p_epoch        bigint,
    u_id           uuid[],
    u_status       text[],
    u_payment_ref  text[],
    k_fan          text[],
    k_key          text[],
    k_hash         text[],
    k_status       integer[],
    k_response     text[],
    o_topic        text[],
    o_payload      text[]
) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    current bigint;
BEGIN
    SELECT epoch INTO current FROM inventory_owners WHERE event_id = p_event FOR UPDATE;
    IF current IS DISTINCT FROM p_epoch THEN
        RAISE EXCEPTION 'inventory of % is owned under epoch %, not %', p_event, current, p_epoch
            USING ERRCODE = 'WR001';
    END IF;
    IF cardinality(u_id) > 0 THEN
        UPDATE holds h
           SET status = u.status, payment_ref = u.payment_ref, updated_at = now()
          FROM unnest(u_id, u_status, u_payment_ref) AS u(id, status, payment_ref)
         WHERE h.id = u.id AND h.event_id = p_event;
    END IF;
    IF cardinality(k_fan) > 0 THEN
        INSERT INTO idempotency_keys (event_id, fan_id, key, request_hash, status_code, response)
        SELECT p_event, k.fan, k.key, k.hash, k.status, k.response::jsonb
          FROM unnest(k_fan, k_key, k_hash, k_status, k_response)
               AS k(fan, key, hash, status, response)
        ON CONFLICT (event_id, fan_id, key) DO UPDATE
           SET request_hash = EXCLUDED.request_hash,
               status_code = EXCLUDED.status_code,
               response = EXCLUDED.response,
               created_at = now();
    END IF;
    IF cardinality(o_topic) > 0 THEN
        INSERT INTO outbox (event_id, topic, payload)
        SELECT p_event, o.topic, o.payload::json
          FROM unnest(o_topic, o_payload) AS o(topic, payload);
    END IF;
END $$;
