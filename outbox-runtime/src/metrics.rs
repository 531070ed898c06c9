//! Metrics through the [`metrics`] facade: the application installs a recorder
//! (Prometheus, StatsD, OpenTelemetry, ...) and every relay, consumer and housekeeping
//! task of a runtime reports to it. Without a recorder every call is a no-op.
//!
//! Handles are registered once per relay, consumer and event type (labels `service`,
//! `event_type`, `reason`), so the hot path does no allocation and no label lookup:
//! install the recorder **before** `OutboxRuntime::start`. Names are the constants
//! below; README "Metrics" has the table. Times are in seconds. Latencies from the
//! commit are the app's clock at the moment measured minus the row's `created_at` (the
//! database clock): they assume the two clocks agree (NTP) to the precision you read.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram, SharedString};

use crate::backend::Backlog;
use crate::route::ServiceName;

/// Counter: rows a relay claimed to produce (committed events seen by the relay).
pub const PUBLISHED: &str = "outbox_events_published_total";
/// Counter: rows the broker acknowledged and the relay marked published.
pub const RELAYED: &str = "outbox_events_relayed_total";
/// Counter: acknowledged rows the relay could not mark (fenced: a consumer got there
/// first, or another relay took the lease over).
pub const FENCED: &str = "outbox_relay_fenced_total";
/// Counter: records whose handler committed.
pub const CONSUMED: &str = "outbox_events_consumed_total";
/// Counter, by `event_type`: handler failures scheduled for a retry.
pub const RETRIED: &str = "outbox_events_retried_total";
/// Counter: records deferred behind an open predecessor of their key.
pub const DEFERRED: &str = "outbox_events_deferred_total";
/// Counter, by `reason` (`unknown_type`, `no_handler`, `version`): events sent back to
/// wait for a consumer that can handle them.
pub const WAITING: &str = "outbox_events_waiting_total";
/// Counter, by `reason` ([`DeadReason`]): events made dead.
pub const DEAD: &str = "outbox_events_dead_total";
/// Counter: records of an event already consumed or dead (duplicate deliveries).
pub const DUPLICATES: &str = "outbox_records_duplicate_total";
/// Counter: records with no outbox row to act on (no id, no row, too large), skipped.
pub const SKIPPED: &str = "outbox_records_skipped_total";
/// Counter, by `component` (`relay`, `consumer`): database failures retried.
pub const DB_RETRIES: &str = "outbox_db_retries_total";
/// Histogram: commit (the row's `created_at`) to the broker's acknowledgement.
pub const COMMIT_TO_ACK: &str = "outbox_commit_to_ack_seconds";
/// Histogram: the broker's acknowledgement (`published_at`) to the handler's success.
pub const ACK_TO_HANDLED: &str = "outbox_ack_to_handled_seconds";
/// Histogram: commit (`created_at`) to the handler's success.
pub const COMMIT_TO_HANDLED: &str = "outbox_commit_to_handled_seconds";
/// Histogram, by `event_type`: how long handlers run.
pub const HANDLER: &str = "outbox_handler_seconds";
/// Histogram: how long a relay's claim statement takes.
pub const CLAIM: &str = "outbox_claim_seconds";
/// Histogram: how long a relay's mark-published statement takes.
pub const MARK: &str = "outbox_mark_seconds";
/// Histogram: records a consumer lane settled in one transaction.
pub const BATCH_SIZE: &str = "outbox_consumer_batch_size";
/// Gauge: pending rows (due or not).
pub const PENDING: &str = "outbox_pending_rows";
/// Gauge: pending rows that are due now.
pub const DUE: &str = "outbox_due_rows";
/// Gauge: age of the oldest due pending row (since it became due), 0 if none.
pub const OLDEST_DUE: &str = "outbox_oldest_due_seconds";
/// Gauge: rows published and not consumed yet.
pub const UNCONSUMED: &str = "outbox_unconsumed_rows";
/// Gauge: age of the oldest published, unconsumed row (since its publication), 0 if
/// none.
pub const OLDEST_UNCONSUMED: &str = "outbox_oldest_unconsumed_seconds";
/// Gauge: pending rows waiting for a consumer that can handle them.
pub const WAITING_ROWS: &str = "outbox_waiting_rows";
/// Gauge, by `partition`: the consumer's lag (records behind the partition's end), from
/// librdkafka's statistics every `metrics_interval`.
pub const CONSUMER_LAG: &str = "outbox_consumer_lag";
/// Gauge: dead rows.
pub const DEAD_ROWS: &str = "outbox_dead_rows";

pub use crate::backend::DeadReason;

/// Seconds from `at` (database clock) to now (this process's clock), never negative.
fn since(at: DateTime<Utc>) -> f64 {
    (Utc::now() - at)
        .to_std()
        .unwrap_or(Duration::ZERO)
        .as_secs_f64()
}

fn label(service: &ServiceName) -> SharedString {
    SharedString::from(service.as_str().to_owned())
}

/// A relay's handles.
pub(crate) struct RelayMetrics {
    pub published: Counter,
    pub relayed: Counter,
    pub fenced: Counter,
    pub too_large: Counter,
    pub db_retries: Counter,
    pub claim: Histogram,
    pub mark: Histogram,
    commit_to_ack: Histogram,
}

impl RelayMetrics {
    pub(crate) fn new(service: &ServiceName) -> Self {
        let s = label(service);
        RelayMetrics {
            published: counter!(PUBLISHED, "service" => s.clone()),
            relayed: counter!(RELAYED, "service" => s.clone()),
            fenced: counter!(FENCED, "service" => s.clone()),
            too_large: counter!(DEAD, "service" => s.clone(), "reason" => DeadReason::TooLarge.as_str()),
            db_retries: counter!(DB_RETRIES, "service" => s.clone(), "component" => "relay"),
            claim: histogram!(CLAIM, "service" => s.clone()),
            mark: histogram!(MARK, "service" => s.clone()),
            commit_to_ack: histogram!(COMMIT_TO_ACK, "service" => s),
        }
    }

    /// A row committed at `created_at` was acknowledged now.
    pub(crate) fn acked(&self, created_at: DateTime<Utc>) {
        self.commit_to_ack.record(since(created_at));
    }
}

/// One event type's handles in a consumer.
pub(crate) struct TypeMetrics {
    pub retried: Counter,
    pub handler: Histogram,
}

/// A consumer's handles.
pub(crate) struct ConsumerMetrics {
    pub consumed: Counter,
    pub deferred: Counter,
    pub duplicates: Counter,
    pub skipped: Counter,
    pub db_retries: Counter,
    pub batch_size: Histogram,
    ack_to_handled: Histogram,
    commit_to_handled: Histogram,
    waiting: [Counter; 3],
    dead: HashMap<DeadReason, Counter>,
    types: HashMap<String, TypeMetrics>,
}

impl ConsumerMetrics {
    /// The handles of `service`'s consumer, with per-type handles for `event_types`
    /// (the types it handles).
    pub(crate) fn new<'a>(
        service: &ServiceName,
        event_types: impl IntoIterator<Item = &'a String>,
    ) -> Self {
        Self::labelled(service.as_str(), event_types)
    }

    /// [`new`](Self::new) under any `service` label: a subscription's settlement is
    /// labelled `<subscriber><-<publisher>`, apart from the publisher's own consumer.
    pub(crate) fn labelled<'a>(
        service: &str,
        event_types: impl IntoIterator<Item = &'a String>,
    ) -> Self {
        let s = SharedString::from(service.to_owned());
        let types = event_types
            .into_iter()
            .map(|t| {
                let m = TypeMetrics {
                    retried: counter!(RETRIED, "service" => s.clone(), "event_type" => t.clone()),
                    handler: histogram!(HANDLER, "service" => s.clone(), "event_type" => t.clone()),
                };
                (t.clone(), m)
            })
            .collect();
        let waiting = ["unknown_type", "no_handler", "version"]
            .map(|r| counter!(WAITING, "service" => s.clone(), "reason" => r));
        let dead = DeadReason::ALL
            .into_iter()
            .map(|r| {
                (
                    r,
                    counter!(DEAD, "service" => s.clone(), "reason" => r.as_str()),
                )
            })
            .collect();
        ConsumerMetrics {
            consumed: counter!(CONSUMED, "service" => s.clone()),
            deferred: counter!(DEFERRED, "service" => s.clone()),
            duplicates: counter!(DUPLICATES, "service" => s.clone()),
            skipped: counter!(SKIPPED, "service" => s.clone()),
            db_retries: counter!(DB_RETRIES, "service" => s.clone(), "component" => "consumer"),
            batch_size: histogram!(BATCH_SIZE, "service" => s.clone()),
            ack_to_handled: histogram!(ACK_TO_HANDLED, "service" => s.clone()),
            commit_to_handled: histogram!(COMMIT_TO_HANDLED, "service" => s),
            waiting,
            dead,
            types,
        }
    }

    /// The handles of `event_type`, if this consumer handles it.
    pub(crate) fn of_type(&self, event_type: &str) -> Option<&TypeMetrics> {
        self.types.get(event_type)
    }

    /// A handler of an event committed at `created_at` and acknowledged at
    /// `published_at` succeeded after running `took`.
    pub(crate) fn handled(
        &self,
        event_type: &str,
        created_at: DateTime<Utc>,
        published_at: Option<DateTime<Utc>>,
        took: Duration,
    ) {
        self.commit_to_handled.record(since(created_at));
        if let Some(at) = published_at {
            self.ack_to_handled.record(since(at));
        }
        if let Some(t) = self.of_type(event_type) {
            t.handler.record(took.as_secs_f64());
        }
    }

    /// An event sent back to wait, for `reason`.
    pub(crate) fn waiting(&self, reason: DeadReason) {
        let i = match reason {
            DeadReason::UnknownType => 0,
            DeadReason::NoHandler => 1,
            _ => 2,
        };
        self.waiting[i].increment(1);
    }

    /// An event made dead, for `reason`.
    pub(crate) fn dead(&self, reason: DeadReason) {
        if let Some(c) = self.dead.get(&reason) {
            c.increment(1);
        }
    }
}

/// The gauges of one service.
pub(crate) struct BacklogGauges([Gauge; 7]);

impl BacklogGauges {
    pub(crate) fn new(service: &ServiceName) -> Self {
        let s = label(service);
        BacklogGauges(
            [
                PENDING,
                DUE,
                OLDEST_DUE,
                UNCONSUMED,
                OLDEST_UNCONSUMED,
                WAITING_ROWS,
                DEAD_ROWS,
            ]
            .map(|name| gauge!(name, "service" => s.clone())),
        )
    }

    pub(crate) fn set(&self, b: &Backlog) {
        let values = [
            b.pending as f64,
            b.due as f64,
            b.oldest_due,
            b.unconsumed as f64,
            b.oldest_unconsumed,
            b.waiting as f64,
            b.dead as f64,
        ];
        for (g, v) in self.0.iter().zip(values) {
            g.set(v);
        }
    }
}
