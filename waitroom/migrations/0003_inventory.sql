-- One group commit of an inventory actor in one statement, so one round trip per batch.
--
-- The fence comes first: the owners row is locked and the caller's epoch compared with it,
-- so a stale owner's batch is refused (SQLSTATE WR001) before it writes anything, and a
-- takeover (which bumps the epoch under the same lock) waits for an in-flight batch.
-- Arrays are column-wise: element i of every h_* array describes new hold i, and so on.
CREATE FUNCTION inventory_commit(
    p_event    text,
    p_epoch    bigint,
    h_id       uuid[],
    h_type     text[],
    h_fan      text[],
    h_qty      integer[],
    h_status   text[],
    h_jti      text[],
    h_pref     text[],
    h_expires  timestamptz[],
    h_key      text[],
    h_hash     text[],
    u_id       uuid[],
    u_status   text[],
    u_pref     text[],
    i_fan      text[],
    i_key      text[],
    i_hash     text[],
    i_code     integer[],
    i_response text[],
    o_topic    text[],
    o_payload  text[]
) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    current_epoch bigint;
BEGIN
    SELECT epoch INTO current_epoch FROM inventory_owners WHERE event_id = p_event FOR UPDATE;
    IF current_epoch IS DISTINCT FROM p_epoch THEN
        RAISE EXCEPTION 'inventory of % is owned under epoch %, not %',
            p_event, current_epoch, p_epoch USING ERRCODE = 'WR001';
    END IF;
    IF cardinality(h_id) > 0 THEN
        INSERT INTO holds (id, event_id, ticket_type, fan_id, quantity, status, pass_jti,
                           payment_ref, expires_at, idempotency_key, request_hash)
        SELECT n.id, p_event, n.tt, n.fan, n.qty, n.status, n.jti, n.pref, n.expires, n.key,
               n.hash
          FROM unnest(h_id, h_type, h_fan, h_qty, h_status, h_jti, h_pref, h_expires, h_key,
                      h_hash)
               AS n(id, tt, fan, qty, status, jti, pref, expires, key, hash);
    END IF;
    IF cardinality(u_id) > 0 THEN
        UPDATE holds h SET status = u.status, payment_ref = u.pref, updated_at = now()
          FROM unnest(u_id, u_status, u_pref) AS u(id, status, pref)
         WHERE h.id = u.id AND h.event_id = p_event;
    END IF;
    IF cardinality(i_fan) > 0 THEN
        INSERT INTO idempotency_keys (event_id, fan_id, key, request_hash, status_code, response)
        SELECT p_event, k.fan, k.key, k.hash, k.code, k.response::jsonb
          FROM unnest(i_fan, i_key, i_hash, i_code, i_response)
               AS k(fan, key, hash, code, response);
    END IF;
    IF cardinality(o_topic) > 0 THEN
        INSERT INTO outbox (event_id, topic, payload)
        SELECT p_event, o.topic, o.payload::jsonb FROM unnest(o_topic, o_payload) AS o(topic, payload);
    END IF;
END $$;
