//! Runtime settings: retries, payload limit, relay and consumer tuning.

use std::time::Duration;

use crate::retry::Backoff;

/// Settings of publishing, relays, consumers and housekeeping. `Default` is
/// production-ready; tests shorten the backoff.
///
/// Given once, to [`crate::OutboxRuntime::config`]: the runtime's relays, consumers and
/// housekeeping read it, and so do the outboxes taken from it
/// ([`crate::OutboxRuntime::outbox`]; publishing reads `default_max_retries` and
/// `max_payload_bytes`). A process that only publishes gives it to
/// [`crate::Outbox::with_config`].
#[derive(Debug, Clone)]
pub struct OutboxConfig {
    /// The design's "max retry": an event is dead when its count of failed handler
    /// runs reaches this, unless the event type (`#[outbox_event(max_retries = N)]`) or
    /// the publish call overrides it. Default 20: 20 attempts in all, the last one
    /// 7 min 59 s after the first with the default [`backoff`](Self::backoff) (plus
    /// the handlers' own time). 0 and 1 both mean a single attempt.
    pub default_max_retries: u32,
    /// Backoff between handler retries (default: 1 s doubling, capped at 32 s: gaps of
    /// 1, 2, 4, 8, 16 s, then 32 s).
    pub backoff: Backoff,
    /// What a consumer does with an event it cannot handle *yet*: an unknown event type,
    /// a type without a handler here, or a version newer than its handler's. That is
    /// what an instance of an older release sees during a rolling deploy; the event
    /// waits (no attempt counted) and goes dead only when no instance handled it within
    /// the grace period.
    pub waiting: Waiting,
    /// Largest serialized payload `publish` accepts, in bytes (default 900 000, under
    /// Kafka's default `message.max.bytes` of 1 000 000 with room for headers). A larger
    /// event is refused inside the business transaction.
    pub max_payload_bytes: usize,
    /// Rows a relay claims per round (default 500).
    pub relay_batch_size: u32,
    /// How long a claim is leased to a relay (default 30 s). A relay that dies holding
    /// a lease delays its rows by at most this long; one that is merely slow is fenced
    /// off when it tries to mark rows another relay has claimed since.
    pub relay_lease: Duration,
    /// How often an idle relay looks for due rows when nothing wakes it (default 1 s).
    /// Wake-ups (in-process after a local commit, LISTEN/NOTIFY on PostgreSQL) make new
    /// rows go out at once; this also picks up rows whose backoff has expired.
    pub relay_poll_interval: Duration,
    /// Backoff of a relay whose broker or database is failing (default 250 ms doubling
    /// up to 30 s). Rows are given back due after this delay; no attempt is counted.
    pub relay_failure_backoff: Backoff,
    /// Backoff of a consumer whose database is failing (default 100 ms doubling up to
    /// 10 s). The message is retried in place: the offset is not stored until its
    /// transaction's outcome is known.
    pub consumer_failure_backoff: Backoff,
    /// Records a consumer settles in parallel (default 4): records are spread over this
    /// many lanes by key, so one key's records stay in order. Each lane holds one
    /// database connection while it handles a record: size the pool for it.
    pub consumer_lanes: usize,
    /// Records one lane settles in one database transaction when they have queued up
    /// (default 32; 1 turns batching off: one transaction per record). Batching only
    /// happens under load (a lane takes what is already waiting, it never waits to fill
    /// a batch) and saves a commit, with its fsync, per record, and most statements: a
    /// batch locks and reads its rows in one statement, reads the open rows of its keys
    /// in one, and marks them consumed in one. The batch is all-or-nothing: if any
    /// record in it fails (handler error, panic, dead letter, database error) the
    /// transaction is rolled back and its records are settled one per transaction, so
    /// each handler's database effects still commit exactly once, together with its
    /// consumed mark. A handler's effects outside the database may therefore run again,
    /// as they may after any failed commit; see [`crate::HandlerContext`] for what
    /// sharing the transaction means to a handler.
    ///
    /// A batch never waits for a row lock while it holds others (its lock skips rows
    /// another transaction holds; it then rolls back and waits for such a row alone), so
    /// it cannot deadlock with a relay marking an overlapping set of rows.
    pub consumer_batch_size: usize,
    /// Publishes again a row still not consumed this long after it was published
    /// (its record was lost to the consumer: offsets reset past it, topic retention
    /// expired), so no event is stranded and its key not held up. Redelivery is safe (the
    /// consumer de-duplicates by event id); set it above your worst consumer lag.
    /// Default 15 min; `None` turns the sweep off.
    pub redeliver_after: Option<Duration>,
    /// How often each service's backlog is sampled into the metrics' gauges (one
    /// statement per service: rows pending, due, published and unconsumed, waiting,
    /// dead, and the oldest ages; see `outbox_runtime::metrics`). Run where the
    /// service's relays run. Default 15 s; `None` turns the sampling off.
    pub metrics_interval: Option<Duration>,
    /// Deleting old rows so the table stays small; `None` keeps every row. Default:
    /// consumed rows after 7 days, dead rows kept, in batches of 1000 every minute.
    pub retention: Option<Retention>,
}

/// How an event waits for a consumer that can handle it ([`OutboxConfig::waiting`]).
///
/// A waiting event is pending, not yet due, with the reason in `last_error` and the time
/// it began waiting in `waiting_since` (database clock); its key's later events wait
/// behind it. Every [`recheck`](Self::recheck) it is published again, so the instance
/// that owns its partition by then (after a deploy, one of the new release) gets it.
/// After [`grace`](Self::grace) of waiting it is dead with the reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Waiting {
    /// How often a waiting event is published again (default 15 s).
    pub recheck: Duration,
    /// How long an event may wait before it is dead (default 1 h: longer than a deploy).
    /// Zero turns waiting off: such an event is dead at once, as if it were poison.
    pub grace: Duration,
}

impl Default for Waiting {
    fn default() -> Self {
        Waiting {
            recheck: Duration::from_secs(15),
            grace: Duration::from_secs(3600),
        }
    }
}

/// How long rows are kept after they settle. Run by the relay side of
/// [`crate::OutboxRuntime`], in bounded batches (one short DELETE each).
///
/// A consumed row is also what makes a late redelivery a no-op: keep consumed rows at
/// least as long as a record can be redelivered (the topic's retention, or your longest
/// replay window). A redelivery after that finds no row and is skipped with a log line;
/// it is still not applied twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Delete consumed rows this long after they were consumed.
    pub consumed_after: Duration,
    /// Delete dead rows this long after they died; `None` keeps them for operators.
    pub dead_after: Option<Duration>,
    /// Rows per DELETE.
    pub batch: u32,
    /// Pause between sweeps.
    pub interval: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            consumed_after: Duration::from_secs(7 * 24 * 3600),
            dead_after: None,
            batch: 1000,
            interval: Duration::from_secs(60),
        }
    }
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig {
            default_max_retries: 20,
            backoff: Backoff::default(),
            waiting: Waiting::default(),
            max_payload_bytes: 900_000,
            relay_batch_size: 500,
            relay_lease: Duration::from_secs(30),
            relay_poll_interval: Duration::from_secs(1),
            relay_failure_backoff: Backoff {
                base: Duration::from_millis(250),
                cap: Duration::from_secs(30),
            },
            consumer_failure_backoff: Backoff {
                base: Duration::from_millis(100),
                cap: Duration::from_secs(10),
            },
            retention: Some(Retention::default()),
            metrics_interval: Some(Duration::from_secs(15)),
            redeliver_after: Some(Duration::from_secs(15 * 60)),
            consumer_lanes: 4,
            consumer_batch_size: 32,
        }
    }
}
