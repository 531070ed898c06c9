-- What a subscriber's inbox remembers of the events retention deleted (postgres). Run
-- after outbox_table.sql for an inbox table only (`{table}` is the inbox); idempotent.
--
-- Per publisher and key, the newest event id whose inbox row retention deleted. A
-- delivery of an event with an id at or below it, not in the inbox, is a late repeat
-- of an event already settled (the publisher sends each key's events in order, and
-- UUIDv7 ids order by time), so it is skipped: repeats are detected however late,
-- while the inbox itself stays small. One row per key ever purged.
CREATE TABLE IF NOT EXISTS {table}_seen (
    service       TEXT        NOT NULL,
    event_key     TEXT        NOT NULL,  -- the events' key; '' for events without one
    last_event_id UUID        NOT NULL,  -- the newest event id retention deleted (UUIDv7: time-ordered)
    raised_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (service, event_key)
);
