-- One outbox table (MySQL 8.0.1+ / MariaDB 10.6+: SKIP LOCKED). The service's table
-- name, checked against the name grammar first, replaces the placeholder. The table is
-- a single statement with the indexes inline, so it is idempotent on MySQL and MariaDB
-- alike (MySQL has no CREATE INDEX IF NOT EXISTS) and no one ever sees the table
-- without its indexes; the view after it needs the CREATE VIEW privilege. Used by
-- outbox_runtime's migrate call; usable as-is by your own migration tool after the
-- replacement (see `Backend::migration_sql`).
--
-- Upgrading a table made by an earlier release: outbox_runtime's migrate adds the
-- columns it lacks first; with your own tool, run once before this script those of
-- the following that the table lacks:
--   ALTER TABLE {table} ADD COLUMN waiting_since DATETIME(6) NULL;
--   ALTER TABLE {table} ADD COLUMN trace_context VARCHAR(1024) CHARACTER SET ascii NULL;
--   ALTER TABLE {table} ADD COLUMN dead_reason VARCHAR(32) CHARACTER SET ascii NULL;
--   ALTER TABLE {table} ADD COLUMN parked_at DATETIME(6) NULL;
--
-- Times are DATETIME(6) in UTC, always written from UTC_TIMESTAMP(6) (the database
-- clock, independent of the session time zone); there are deliberately no time
-- defaults, because CURRENT_TIMESTAMP would follow the session time zone.
-- Names and keys compare byte-wise (utf8mb4_bin): Kafka keys `A` and `a` differ.
CREATE TABLE IF NOT EXISTS {table} (
    id              BIGINT       NOT NULL AUTO_INCREMENT,
    event_id        BINARY(16)   NOT NULL,
    service         VARCHAR(64)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    event_type      VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    event_version   INT          NOT NULL,
    event_key       VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL,
    payload         LONGTEXT     CHARACTER SET utf8mb4 NOT NULL,
    status          SMALLINT     NOT NULL DEFAULT 0,  -- 0 pending, 1 published, 2 consumed, 3 dead, 4 discarded
    attempts        INT          NOT NULL DEFAULT 0,  -- failures so far
    max_retries     INT          NOT NULL,
    next_attempt_at DATETIME(6)  NOT NULL,
    lease_token     BIGINT       NOT NULL DEFAULT 0,  -- fences relays; 0 = no lease
    locked_until    DATETIME(6)  NULL,
    last_error      TEXT         CHARACTER SET utf8mb4 NULL,
    created_at      DATETIME(6)  NOT NULL,
    updated_at      DATETIME(6)  NOT NULL,
    published_at    DATETIME(6)  NULL,
    consumed_at     DATETIME(6)  NULL,
    dead_at         DATETIME(6)  NULL,
    waiting_since   DATETIME(6)  NULL,  -- waiting for a consumer that can handle it
    trace_context   VARCHAR(1024) CHARACTER SET ascii NULL,  -- W3C traceparent[;tracestate] of the publisher (feature otel)
    dead_reason     VARCHAR(32)  CHARACTER SET ascii NULL,  -- the class of a dead row's last_error (undecodable, exhausted, ...)
    parked_at       DATETIME(6)  NULL,  -- an operator holds this pending row's key
    PRIMARY KEY (id),
    UNIQUE KEY uq_event_id (event_id),
    -- The claim walks pending rows of one service in id order (InnoDB appends the
    -- primary key to every secondary index; it is spelled out for clarity).
    KEY ix_claim (service, status, id),
    -- Head-of-key (relay) and open-predecessor (consumer) checks.
    KEY ix_key (service, event_key, status, id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
-- The rows with their status as text, for people and tools reading the outbox in SQL
-- (`SELECT * FROM {table}_view WHERE status = 'dead'`): the names are those of
-- outbox_runtime::Status, plus `waiting` for a pending event that waits for a consumer
-- able to handle it (`waiting_since` set), `parked` for one whose key an
-- operator holds. A view, so existing rows read the same and nothing is
-- migrated; the table keeps its numbers. Replaced on every migrate.
CREATE OR REPLACE VIEW {table}_view AS
SELECT id, event_id, service, event_type, event_version, event_key, payload,
       CASE status WHEN 0 THEN CASE WHEN parked_at IS NOT NULL THEN 'parked'
                                        WHEN waiting_since IS NULL THEN 'pending' ELSE 'waiting' END
                   WHEN 1 THEN 'published' WHEN 2 THEN 'consumed'
                   WHEN 3 THEN 'dead' WHEN 4 THEN 'discarded' ELSE CAST(status AS CHAR) END AS status,
       attempts, max_retries, next_attempt_at, lease_token, locked_until, last_error,
       created_at, updated_at, published_at, consumed_at, dead_at, waiting_since,
       trace_context, dead_reason, parked_at
FROM {table};
-- What operators did (outbox_runtime::Admin: replay, discard, park, unpark): who, when,
-- on what, how many rows. Written in the transaction of the change it records.
CREATE TABLE IF NOT EXISTS {table}_audit (
    id       BIGINT       NOT NULL AUTO_INCREMENT,
    ref      BINARY(16)   NOT NULL,          -- the action, across the transactions of a bulk replay
    at       DATETIME(6)  NOT NULL,
    actor    VARCHAR(255) CHARACTER SET utf8mb4 NOT NULL,
    action   VARCHAR(32)  CHARACTER SET ascii NOT NULL,  -- replay, replay_matching, discard, park, unpark
    service  VARCHAR(64)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    target   TEXT         CHARACTER SET utf8mb4 NOT NULL, -- an event id, a key, or a filter as JSON
    affected BIGINT       NOT NULL,          -- rows changed
    PRIMARY KEY (id),
    KEY ix_ref (ref)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
