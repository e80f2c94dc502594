-- waitroom schema, version 2: the verifiable lottery of a room's pre-queue.
--
-- One row per lottery room, written when the room is first loaded into Redis. The seed stays
-- secret (only its commitment sha256(seed) is shown) until the draw; the draw writes the
-- entries (sha256(fan_id) in hex) in draw order exactly once: the first writer's list is the
-- draw, and every later caller applies that same list. See waitroom/lottery.py.
CREATE TABLE room_lottery (
    event_id    text PRIMARY KEY REFERENCES events (id) ON DELETE CASCADE,
    seed        text NOT NULL CHECK (seed ~ '^[0-9a-f]{64}$'),
    commitment  text NOT NULL CHECK (commitment ~ '^[0-9a-f]{64}$'),
    created_at  timestamptz NOT NULL DEFAULT now(),
    drawn_at    timestamptz,
    entries     text[],
    CONSTRAINT drawn_with_entries CHECK ((drawn_at IS NULL) = (entries IS NULL))
);
