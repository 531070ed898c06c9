//! Runtime settings: retries, payload limit, relay and consumer tuning.

use std::time::Duration;

use crate::retry::Backoff;

/// Settings shared by publishers, relays and consumers. `Default` is production-ready;
/// tests shorten the backoff.
#[derive(Debug, Clone)]
pub struct OutboxConfig {
    /// Retries after the first failed handling before an event goes dead, unless the
    /// event type (`#[outbox_event(max_retries = N)]`) or the publish call overrides it.
    /// Default 20.
    pub default_max_retries: u32,
    /// Backoff between handler retries (default: 1 s doubling, capped at 5 min).
    pub backoff: Backoff,
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
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig {
            default_max_retries: 20,
            backoff: Backoff::default(),
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
        }
    }
}
