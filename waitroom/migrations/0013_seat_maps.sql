-- waitroom schema, version 13: seat maps and the seats of holds (assigned seating).
--
-- An event's seat map is stored as imported (seat_maps.document, the format of docs/seatmap.md)
-- and flattened into one row per seat, so holds can reference seats. seat_holds says which
-- seats a hold took; its status follows the hold's. The partial unique index is the last
-- line of defence behind the inventory actor: a seat is in at most one hold that is 'held' or
-- 'paid', so no seat is held twice or sold twice, whoever writes.
CREATE TABLE seat_maps (
    event_id    text PRIMARY KEY REFERENCES events (id) ON DELETE CASCADE,
    version     integer NOT NULL DEFAULT 1 CHECK (version > 0),
    document    jsonb NOT NULL,
    seats       integer NOT NULL CHECK (seats >= 0),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE seats (
    event_id         text NOT NULL REFERENCES seat_maps (event_id) ON DELETE CASCADE,
    seat_id          text NOT NULL CHECK (length(seat_id) BETWEEN 5 AND 70),
    section          text NOT NULL,
    row_label        text NOT NULL,
    seat_label       text NOT NULL,
    level            text NOT NULL,
    ticket_type      text NOT NULL,
    status           text NOT NULL CHECK (status IN ('open', 'killed', 'held_back')),
    accessible       boolean NOT NULL DEFAULT false,
    restricted_view  boolean NOT NULL DEFAULT false,
    PRIMARY KEY (event_id, seat_id),
    FOREIGN KEY (event_id, ticket_type) REFERENCES ticket_types (event_id, name) ON DELETE CASCADE
);

CREATE TABLE seat_holds (
    hold_id   uuid NOT NULL REFERENCES holds (id) ON DELETE CASCADE,
    event_id  text NOT NULL,
    seat_id   text NOT NULL,
    status    text NOT NULL CHECK (status IN ('held', 'paid', 'expired', 'cancelled')),
    PRIMARY KEY (hold_id, seat_id),
    FOREIGN KEY (event_id, seat_id) REFERENCES seats (event_id, seat_id) ON DELETE CASCADE
);
CREATE UNIQUE INDEX seat_holds_one_live_hold_per_seat
    ON seat_holds (event_id, seat_id) WHERE status IN ('held', 'paid');
