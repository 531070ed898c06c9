//! Typed consumer dispatch: one consumer per service, in the service's consumer group.
//!
//! For each record, in partition order ([`Consumer::process`]):
//! 1. read the event id from the envelope (no readable id: skipped with the reason,
//!    logged and counted; there is no row to mark);
//! 2. open a database transaction and lock the event's outbox row; a consumed or dead
//!    row means a duplicate delivery: a no-op;
//! 3. if an older event of the same key is still open, defer this one (it goes back
//!    to pending and the relay re-publishes it after its predecessor), so handlers see
//!    each key's events in order even across retries;
//! 4. find the handler by event type and run it inside the transaction; on success mark
//!    the row consumed and commit, handler effects and mark together;
//! 5. on a handler error roll back, then record the failure: transient → pending again
//!    with exponential backoff (the relay re-delivers it), dead after max retries;
//!    permanent, undecodable payload, unknown event type, no handler, unreadable
//!    envelope → dead at once with the reason. A panicking handler counts as a
//!    transient failure and does not stop the consumer.
//!
//! Under load a lane settles the records queued behind each other in one transaction
//! (steps 2–4 for each, one COMMIT: [`OutboxConfig::consumer_batch_size`]): one statement
//! locks and reads all their rows, each with its key's nearest older open row for step 3
//! (the lock of a record alone reads it too), skipping rows another transaction holds (a
//! relay marking them, usually: the batch then rolls back, waits for that row alone and
//! tries again, so it never waits while holding locks and cannot deadlock with a relay),
//! one marks them all consumed. Anything
//! off the happy path (step 5, a dead letter, a database error) rolls the whole batch
//! back and its records are settled one per transaction as above, so every handler's
//! database effects commit exactly once with its consumed mark.
//!
//! Intake (this module) owns the Kafka client, spreads records over lanes and stores
//! offsets ([`offsets`]); each record is read once ([`record`]); settlement does the
//! steps above in the database, alone ([`settle`]) or as a batch ([`batch`]).
//!
//! The record's offset is stored only after its transaction's outcome is known. When
//! the database itself fails (even at COMMIT, where the outcome is ambiguous) the same
//! record is processed again after a backoff: the row lock and status check make that
//! safe, so an ambiguous commit is retried and de-duplicated, never dead-lettered.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use rdkafka::consumer::{CommitMode, Consumer as _, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Message, OwnedMessage};
use sqlx::Pool;
use tokio::sync::mpsc;

use crate::backend::Backend;
use crate::catalog::{Catalog, Route};
use crate::config::OutboxConfig;
use crate::error::{Error, Result};
use crate::handler::HandlerFn;
use crate::kafka::{ClientLog, KafkaConfig};
use crate::runtime::ShutdownSignal;

mod batch;
mod offsets;
mod record;
mod settle;

use offsets::OffsetTracker;

/// Counters of one consumer.
#[derive(Debug, Default)]
pub struct ConsumerStats {
    /// Records whose handler committed.
    pub handled: AtomicU64,
    /// Records whose row was already consumed or dead (duplicate deliveries).
    pub duplicates: AtomicU64,
    /// Records deferred behind an open predecessor of the same key.
    pub deferred: AtomicU64,
    /// Handler failures scheduled for retry.
    pub retried: AtomicU64,
    /// Events made dead.
    pub dead: AtomicU64,
    /// Records that could not be tied to an outbox row (no readable event id, or no
    /// row for it): skipped with a logged reason.
    pub skipped: AtomicU64,
    /// Database failures retried in place.
    pub db_retries: AtomicU64,
    /// Records settled in a transaction shared with other records (a batch that
    /// committed); the rest had one transaction each.
    pub batched: AtomicU64,
    /// Times a batch found one of its rows locked by another transaction (a relay
    /// marking it published, usually), rolled back and waited for it holding no lock.
    pub batch_lock_waits: AtomicU64,
    /// Records whose headers, key or payload disagree with the outbox row their event id
    /// names (a forged or corrupted record): counted, logged without payload, and the
    /// row left as it was. The row, written in the business transaction, is the truth.
    pub mismatched: AtomicU64,
    /// Records for a row that is pending and not yet due (a stale copy arriving during
    /// a retry backoff or a deferral): left alone; the relay publishes the row again
    /// when it is due.
    pub not_due: AtomicU64,
    /// Published predecessors made pending again because a later event of their key
    /// arrived first (their records were lost, e.g. with a broker's log).
    pub republished: AtomicU64,
    /// Records this consumer could not handle yet (unknown event type, no handler here,
    /// a version newer than its handler's: an instance of an older release during a
    /// rolling deploy), sent back to wait for one that can
    /// ([`crate::OutboxConfig::waiting`]). No attempt is counted.
    pub waiting: AtomicU64,
}

/// What processing one record did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// The handler ran and its transaction committed with the consumed mark.
    Handled,
    /// The row was already consumed or dead.
    Duplicate,
    /// An older event of the same key is still open; this one goes back to pending.
    Deferred,
    /// The handler failed; the event is due again later.
    Retry {
        /// Why.
        error: String,
    },
    /// This consumer cannot handle the event yet (unknown type, no handler, newer
    /// version); it waits, pending, for one that can, within the grace period.
    Waiting {
        /// Why.
        reason: String,
    },
    /// The event is dead.
    Dead {
        /// Why.
        reason: String,
    },
    /// The record has no outbox row to act on.
    Skipped {
        /// Why.
        reason: String,
    },
    /// The record disagrees with the row its event id names (type, version, source, key
    /// or payload); the row was left as it was.
    Mismatch {
        /// What differs (names of fields and sizes, never payload values).
        reason: String,
    },
    /// The row is pending and not yet due (in a retry backoff or deferred): the record
    /// is a stale copy and was left alone.
    NotDue,
}

/// How one consumer client's session ended.
enum SessionEnd {
    /// Shutdown was requested.
    Shutdown,
    /// The client can no longer work (a fatal error); a new one takes over.
    Unusable(String),
}

/// A handler of the consumer's service, resolved for its backend.
struct Handler<DB: Backend> {
    call: HandlerFn<DB>,
    /// The event version it was written for.
    version: u32,
}

/// The consumer of one service.
pub struct Consumer<DB: Backend> {
    pool: Pool<DB>,
    route: Route,
    catalog: Catalog,
    handlers: HashMap<String, Handler<DB>>,
    config: Arc<OutboxConfig>,
    stats: Arc<ConsumerStats>,
    beat: Arc<crate::health::Beat>,
    metrics: crate::metrics::ConsumerMetrics,
}

impl<DB: Backend> Consumer<DB> {
    /// The consumer of `service`, with the handlers the catalog lists for it. Fails if a
    /// handler was written for another backend.
    pub fn new(
        pool: Pool<DB>,
        catalog: &Catalog,
        service: &str,
        config: Arc<OutboxConfig>,
    ) -> Result<Self> {
        let route = catalog
            .route(service)
            .ok_or_else(|| Error::UnknownService(service.to_owned()))?
            .clone();
        let registrations = catalog.handlers_of(service).filter_map(|info| {
            catalog
                .handler_registration(service, &info.event_type)
                .map(|reg| (info.event_type.clone(), reg))
        });
        let handlers = resolve::<DB>(registrations, service)?;
        let metrics = crate::metrics::ConsumerMetrics::new(route.service(), handlers.keys());
        Ok(Self::with(pool, route, catalog, handlers, config, metrics))
    }

    /// The settlement side of a subscription: the handlers `sub.subscriber` registered
    /// for `sub.publisher`'s public events, run on the rows of the subscriber's inbox
    /// (route: service = the publisher, table = the inbox). The subscriber's intake and
    /// worker ([`crate::subscriber`]) feed it.
    pub(crate) fn for_subscription(
        pool: Pool<DB>,
        catalog: &Catalog,
        sub: &crate::catalog::SubscriptionInfo,
        config: Arc<OutboxConfig>,
    ) -> Result<Self> {
        let route = sub.route().clone();
        let registrations = sub.handlers.iter().filter_map(|info| {
            sub.handler_registration(&info.event_type)
                .map(|reg| (info.event_type.clone(), reg))
        });
        let handlers = resolve::<DB>(registrations, &sub.subscriber)?;
        let metrics = crate::metrics::ConsumerMetrics::labelled(
            &format!("{}<-{}", sub.subscriber, sub.publisher),
            handlers.keys(),
        );
        Ok(Self::with(pool, route, catalog, handlers, config, metrics))
    }

    fn with(
        pool: Pool<DB>,
        route: Route,
        catalog: &Catalog,
        handlers: HashMap<String, Handler<DB>>,
        config: Arc<OutboxConfig>,
        metrics: crate::metrics::ConsumerMetrics,
    ) -> Self {
        Consumer {
            metrics,
            pool,
            route,
            catalog: catalog.clone(),
            handlers,
            config,
            stats: Arc::new(ConsumerStats::default()),
            beat: Arc::default(),
        }
    }

    /// Settles inbox rows handed over as the records built from them (the subscriber's
    /// worker): the same steps as records from the broker, in one transaction when
    /// they all take the happy path (else one by one), database failures retried in
    /// place. Returns how many settled, from the front (fewer only on shutdown).
    pub(crate) async fn settle_inbox_rows(
        &self,
        msgs: &[OwnedMessage],
        shutdown: &mut ShutdownSignal,
    ) -> usize {
        self.settle_batch(msgs, shutdown).await
    }

    /// The consumer's counters.
    pub fn stats(&self) -> Arc<ConsumerStats> {
        self.stats.clone()
    }
    /// What it last did, for [`crate::RuntimeHandle::health`].
    pub(crate) fn beat(&self) -> Arc<crate::health::Beat> {
        self.beat.clone()
    }

    /// The service's route.
    pub fn route(&self) -> &Route {
        &self.route
    }

    /// Subscribes to the service's topic in its group and processes records until
    /// `shutdown` turns true.
    ///
    /// Records are spread over [`OutboxConfig::consumer_lanes`] lanes by key (keyless
    /// records by partition): one key's records are settled one after another, in
    /// partition order, while different keys proceed in parallel. A partition's offset
    /// is stored only up to its oldest record not yet settled, so a crash never skips a
    /// record whose transaction had not committed.
    ///
    /// Error events from the client (brokers down, transport errors) are logged,
    /// rate-limited, and never slow the receive loop: the consumer resumes as soon as
    /// the broker is back. A client that reports a fatal error is replaced.
    ///
    /// # Cancel safety
    ///
    /// Shutdown is checked between transactions: each lane settles the batch or record
    /// in progress, offsets are stored for what settled, then committed synchronously. Records still
    /// queued are not processed and are delivered again later (and found settled if they
    /// were). Dropping the future instead is safe too, with more redeliveries.
    pub async fn run(self, kafka: &KafkaConfig, mut shutdown: ShutdownSignal) -> Result<()> {
        let _running = self.beat.running();
        let this = Arc::new(self);
        let mut replaced = 0u32;
        loop {
            match this.session(kafka, &mut shutdown).await? {
                SessionEnd::Shutdown => return Ok(()),
                SessionEnd::Unusable(why) => {
                    this.beat.failing(crate::health::Side::Broker, &why);
                    replaced += 1;
                    tracing::warn!(service = %this.route.service(), reason = %why,
                        "the Kafka consumer can no longer work; replacing it with a new one");
                    let delay = this.config.consumer_failure_backoff.delay(replaced);
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.changed() => {}
                    }
                    if *shutdown.borrow() {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// One client's life: subscribe, receive and settle until shutdown, or until the
    /// client reports that it can no longer work.
    async fn session(
        self: &Arc<Self>,
        kafka: &KafkaConfig,
        shutdown: &mut ShutdownSignal,
    ) -> Result<SessionEnd> {
        let mut client =
            kafka.consumer_config(self.route.group().as_str(), self.config.max_payload_bytes);
        if let (Some(every), None) = (
            self.config.metrics_interval,
            client.get("statistics.interval.ms"),
        ) {
            // The lag per partition, for the metrics (ClientLog::stats).
            client.set(
                "statistics.interval.ms",
                every.as_millis().clamp(1, i32::MAX as u128).to_string(),
            );
        }
        let consumer: StreamConsumer<ClientLog> = client
            .create_with_context(ClientLog::consumer_of(self.route.service()))
            .map_err(|e| {
                Error::kafka(
                    format!("creating the consumer of service {}", self.route.service()),
                    e,
                )
            })?;
        consumer
            .subscribe(&[self.route.topic().as_str()])
            .map_err(|e| Error::kafka(format!("subscribing to {}", self.route.topic()), e))?;
        // A new client replaced the one that could no longer work.
        self.beat.recovered(crate::health::Side::Broker);

        let (settled_tx, mut settled_rx) = mpsc::unbounded_channel::<(i32, u64, i64)>();
        let mut lanes = Vec::new();
        let mut lane_tasks = Vec::new();
        let batch_size = self.config.consumer_batch_size.max(1);
        for _ in 0..self.config.consumer_lanes.max(1) {
            let (tx, mut rx) = mpsc::channel::<(u64, OwnedMessage)>(LANE_DEPTH.max(batch_size));
            let this = self.clone();
            let settled_tx = settled_tx.clone();
            let mut shutdown = shutdown.clone();
            lane_tasks.push(tokio::spawn(async move {
                let mut batch = Vec::with_capacity(batch_size);
                let mut epochs = Vec::with_capacity(batch_size);
                while let Some((epoch, msg)) = rx.recv().await {
                    // Take what is already queued; never wait to fill a batch.
                    batch.push(msg);
                    epochs.push(epoch);
                    while batch.len() < batch_size {
                        match rx.try_recv() {
                            Ok((epoch, msg)) => {
                                batch.push(msg);
                                epochs.push(epoch);
                            }
                            Err(_) => break,
                        }
                    }
                    let settled = if *shutdown.borrow() {
                        0
                    } else {
                        this.settle_batch(&batch, &mut shutdown).await
                    };
                    for (msg, epoch) in batch[..settled].iter().zip(&epochs) {
                        let _ = settled_tx.send((msg.partition(), *epoch, msg.offset()));
                    }
                    if settled < batch.len() {
                        break; // shutting down; what did not settle keeps its offset unstored
                    }
                    batch.clear();
                    epochs.clear();
                }
            }));
            lanes.push(tx);
        }
        drop(settled_tx);

        let mut offsets = OffsetTracker::default();
        // One topic per consumer (its route's): offsets are tracked by partition.
        let topic = self.route.topic().as_str();
        let store = |offsets: &mut OffsetTracker, partition: i32, epoch: u64, offset: i64| {
            if let Some(upto) = offsets.settled(partition, epoch, offset) {
                failpoint!("consumer.before_offset_store");
                if let Err(e) = consumer.store_offset(topic, partition, upto) {
                    // Stale after a rebalance; the new owner re-reads the record and finds
                    // it settled.
                    tracing::debug!(error = %e, "storing the offset failed");
                }
            }
        };
        let mut rebalances = consumer.context().rebalances();
        let mut end = SessionEnd::Shutdown;
        loop {
            if *shutdown.borrow() {
                break;
            }
            tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                Some((partition, epoch, offset)) = settled_rx.recv() => {
                    store(&mut offsets, partition, epoch, offset);
                }
                msg = consumer.recv() => {
                    let seen = consumer.context().rebalances();
                    if seen != rebalances {
                        // Records received from now on may come from another position (the
                        // committed offset) or another log (a broker that lost its own):
                        // settlements of records received before are not stored.
                        rebalances = seen;
                        offsets.rebalanced();
                    }
                    match msg {
                        Ok(m) => {
                            self.beat.broker_ok();
                            let m = m.detach();
                            let epoch = offsets.received(m.partition(), m.offset());
                            let lane = lane_of(&m, lanes.len());
                            // Waits when the lane is full (backpressure); other lanes go
                            // on, and settled offsets queue up unboundedly meanwhile.
                            if lanes[lane].send((epoch, m)).await.is_err() {
                                break; // the lane stopped: shutting down
                            }
                        }
                        Err(KafkaError::MessageConsumptionFatal(code)) => {
                            end = SessionEnd::Unusable(format!("fatal consumer error {code:?}"));
                            break;
                        }
                        Err(e) => {
                            if let Some((code, reason)) = consumer.client().fatal_error() {
                                end = SessionEnd::Unusable(format!("fatal error {code:?}: {reason}"));
                                break;
                            }
                            // An error event (brokers down, a transport error, a topic
                            // not there yet): librdkafka recovers by itself and queues many
                            // of these during an outage. Never wait on them.
                            let kind = format!("recv:{:?}", e.rdkafka_error_code());
                            if let Some(suppressed) = consumer.context().allow(&kind) {
                                tracing::warn!(service = %self.route.service(), error = %e, suppressed,
                                    "consumer error event; the client recovers by itself");
                            }
                        }
                    }
                },
            }
        }
        // Let every lane settle its record in progress, then store what settled.
        drop(lanes);
        for task in lane_tasks {
            let _ = task.await;
        }
        while let Some((partition, epoch, offset)) = settled_rx.recv().await {
            store(&mut offsets, partition, epoch, offset);
        }
        match consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(())
            | Err(rdkafka::error::KafkaError::ConsumerCommit(
                rdkafka::types::RDKafkaErrorCode::NoOffset,
            )) => {}
            Err(e) => {
                tracing::warn!(service = %self.route.service(), error = %e, "final offset commit failed")
            }
        }
        Ok(end)
    }
}

/// The handlers of `owner` (a service, or a subscriber), resolved for backend `DB`: one
/// error listing every handler written for another backend.
fn resolve<DB: Backend>(
    registrations: impl Iterator<Item = (String, &'static crate::handler::HandlerRegistration)>,
    owner: &str,
) -> Result<HashMap<String, Handler<DB>>> {
    let mut handlers = HashMap::new();
    let mut problems = Vec::new();
    for (event_type, reg) in registrations {
        match reg.for_backend::<DB>() {
            Some(call) => {
                handlers.insert(
                    event_type,
                    Handler {
                        call,
                        version: reg.event_version,
                    },
                );
            }
            None => problems.push(format!(
                "handler `{}` runs on {:?}, but the consumer of service `{}` runs on {}",
                reg.name,
                reg.factory.backends(),
                owner,
                DB::BACKEND_NAME
            )),
        }
    }
    if problems.is_empty() {
        Ok(handlers)
    } else {
        Err(Error::Config(problems.join("; ")))
    }
}

/// Records queued per lane before the receive loop waits (at least; a lane's queue
/// also holds one batch). Small, because every queued record is one a crash makes
/// Kafka deliver again (as a duplicate).
const LANE_DEPTH: usize = 16;

/// The lane of a record: by key, so one key's records stay in order; keyless records by
/// partition.
pub(crate) fn lane_of<M: Message>(msg: &M, lanes: usize) -> usize {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    match msg.key() {
        Some(k) => k.hash(&mut h),
        None => msg.partition().hash(&mut h),
    }
    (h.finish() % lanes.max(1) as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_key_always_lands_in_one_lane() {
        let msg = |key: &str, partition: i32| {
            OwnedMessage::new(
                None,
                Some(key.as_bytes().to_vec()),
                "t".into(),
                rdkafka::Timestamp::NotAvailable,
                partition,
                0,
                None,
            )
        };
        assert_eq!(lane_of(&msg("k1", 0), 8), lane_of(&msg("k1", 2), 8));
        assert!(lane_of(&msg("k1", 0), 8) < 8);
        assert_eq!(lane_of(&msg("k1", 0), 1), 0);
    }
}
