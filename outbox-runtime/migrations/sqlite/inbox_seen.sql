-- What a subscriber's inbox remembers of the events retention deleted (sqlite). Run
-- after outbox_table.sql for an inbox table only (`{table}` is the inbox); idempotent.
--
-- Per publisher and key, the newest event id whose inbox row retention deleted. A
-- delivery of an event with an id at or below it, not in the inbox, is a late repeat
-- of an event already settled (the publisher sends each key's events in order, and
-- UUIDv7 ids order by time), so it is skipped: repeats are detected however late,
-- while the inbox itself stays small. One row per key ever purged.
CREATE TABLE IF NOT EXISTS {table}_seen (
    service       VARCHAR(64)  NOT NULL,
    event_key     VARCHAR(255) NOT NULL,  -- '' for events without a key
    last_event_id BLOB         NOT NULL,  -- 16 bytes: the newest event id retention deleted (UUIDv7: time-ordered)
    raised_at     TEXT         NOT NULL,
    PRIMARY KEY (service, event_key)
);
