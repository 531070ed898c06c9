//! Subscriptions: a service handling another service's public events, in its own
//! database, through an inbox.
//!
//! One [`Subscriber`] per (subscriber, publisher) pair, in two halves that share the
//! subscriber's inbox table (an outbox-shaped table: the same columns, statuses and
//! state machine):
//!
//! * **Intake** ([`intake`]) reads the publisher's topic in the subscription's own
//!   consumer group and writes what it has received as inbox rows keyed by the event id
//!   (`ce_id`), a batch per transaction: a repeated delivery is skipped by the unique
//!   index, in the same statement. When every row of the batch is new, their handlers
//!   run in that same transaction (the consumer's batch settlement): inbox rows,
//!   effects and consumed marks commit together, one commit per batch, as a
//!   hand-written inbox does. Then the offsets are stored: a crash before the commit
//!   re-reads the records, one after it finds them in the inbox. A record that cannot
//!   be used (no envelope, another source, a payload that is not text, a key over the
//!   limit) is written dead with the reason; the publisher's events this subscriber does
//!   not subscribe to are counted and left (the topic carries all of them, its own
//!   consumer's too).
//! * **Lanes** ([`lanes`]): when a batch's handlers cannot all run in the intake's
//!   transaction (one failed, a row was held elsewhere), the batch is written alone and
//!   its new rows go to lanes by key, which settle them at once, one key's rows in
//!   order. A row they cannot take (a full lane) is left to the worker.
//! * **Worker** ([`worker`]) runs the handlers from the inbox for what is left: it
//!   claims due heads of key exactly as a relay does (`Backend::claim`, lease token,
//!   database clock) and settles them through the consumer's settlement, as if the rows
//!   had arrived as records: row lock, checks, handler, consumed mark, one transaction;
//!   after a failure the same retry, backoff, dead-letter and waiting rules as the
//!   outbox. A key's later events wait behind its failing head (head of key), other
//!   keys flow.
//!
//! Exactly-once effect rests on the inbox row: it exists once per event id, and its
//! `consumed` mark commits with the handler's effects. Any later delivery of the same
//! event finds the row, or, once retention deleted it, the key's watermark
//! ([`retention`]): the newest event id of that key (publisher and key) that retention
//! deleted. The publisher sends each key's events in order and its ids are UUIDv7
//! (time-ordered), so an event at or below the watermark that is not in the inbox was
//! settled before: skipped, however late it comes.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use sqlx::Pool;

use crate::backend::Backend;
use crate::catalog::{Catalog, SubscriptionInfo};
use crate::config::OutboxConfig;
use crate::consumer::{Consumer, ConsumerStats};
use crate::error::Result;
use crate::kafka::KafkaConfig;
use crate::runtime::ShutdownSignal;

mod intake;
mod lanes;
mod retention;
mod worker;

pub(crate) use retention::{retention, settle_time};

/// Counters of one subscription's intake (its settlement counts in
/// [`ConsumerStats`]).
#[derive(Debug, Default)]
pub struct IntakeStats {
    /// Records read from the publisher's topic.
    pub received: AtomicU64,
    /// Records written into the inbox as new rows (pending or dead).
    pub inboxed: AtomicU64,
    /// Records whose event id was already in the inbox (repeated deliveries).
    pub duplicates: AtomicU64,
    /// Records of event types this subscriber does not subscribe to: counted and left.
    pub ignored: AtomicU64,
    /// Records written dead at once (unusable: the reason is in the row).
    pub unusable: AtomicU64,
    /// Database failures retried in place.
    pub db_retries: AtomicU64,
}

/// What a subscription's intake and worker share.
struct Shared<DB: Backend> {
    pool: Pool<DB>,
    sub: SubscriptionInfo,
    catalog: Catalog,
    config: Arc<OutboxConfig>,
    intake: Arc<IntakeStats>,
    /// What the subscription last did (intake's broker and database answers, the
    /// settlement's), for [`crate::RuntimeHandle::health`].
    beat: Arc<crate::health::Beat>,
}

/// One subscription: the publisher's topic into the subscriber's inbox, and the
/// inbox into the subscriber's handlers.
pub struct Subscriber<DB: Backend> {
    shared: Arc<Shared<DB>>,
    consumer: Arc<Consumer<DB>>,
}

impl<DB: Backend> Subscriber<DB> {
    /// The subscription of `subscriber` to `publisher`'s events, on the subscriber's
    /// database `pool`. Fails if the catalog has no such subscription or a handler was
    /// written for another backend.
    pub fn new(
        pool: Pool<DB>,
        catalog: &Catalog,
        subscriber: &str,
        publisher: &str,
        config: Arc<OutboxConfig>,
    ) -> Result<Self> {
        let sub = catalog
            .subscription(subscriber, publisher)
            .ok_or_else(|| {
                crate::error::Error::Config(format!(
                    "service `{subscriber}` has no subscription to `{publisher}` (no handler \
                     with `#[outbox_handler(subscriber = ...)]` for its public events)"
                ))
            })?
            .clone();
        let consumer = Consumer::for_subscription(pool.clone(), catalog, &sub, config.clone())?;
        Ok(Subscriber {
            shared: Arc::new(Shared {
                pool,
                sub,
                catalog: catalog.clone(),
                config,
                intake: Arc::default(),
                beat: consumer.beat(),
            }),
            consumer: Arc::new(consumer),
        })
    }

    /// The subscription.
    pub fn subscription(&self) -> &SubscriptionInfo {
        &self.shared.sub
    }

    /// The intake's counters.
    pub fn intake_stats(&self) -> Arc<IntakeStats> {
        self.shared.intake.clone()
    }

    /// The settlement's counters (handled, retried, dead, ... from the inbox).
    pub fn stats(&self) -> Arc<ConsumerStats> {
        self.consumer.stats()
    }

    /// What the settlement last did, for [`crate::RuntimeHandle::health`].
    pub(crate) fn beat(&self) -> Arc<crate::health::Beat> {
        self.consumer.beat()
    }

    /// Runs intake and worker until `shutdown` turns true.
    ///
    /// # Cancel safety
    ///
    /// Intake stores offsets only for records whose rows committed; the worker settles
    /// each row in one transaction. Stopping (or dropping the future) at any point
    /// leaves the inbox consistent: re-read records are skipped as repeats, and rows
    /// leased by a stopped worker are claimed again when the lease expires.
    pub async fn run(self, kafka: &KafkaConfig, shutdown: ShutdownSignal) -> Result<()> {
        let _running = self.shared.beat.running();
        let (lanes, lane_tasks) =
            lanes::start(&self.shared.config, self.consumer.clone(), shutdown.clone());
        let intake = intake::run(
            self.shared.clone(),
            self.consumer.clone(),
            lanes,
            kafka,
            shutdown.clone(),
        );
        let worker = worker::run(self.shared.clone(), self.consumer.clone(), shutdown);
        let (intake, worker) = tokio::join!(intake, worker);
        for task in lane_tasks {
            let _ = task.await;
        }
        intake.and(worker)
    }
}
