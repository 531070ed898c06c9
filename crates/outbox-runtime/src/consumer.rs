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
//! locks and reads all their rows, skipping rows another transaction holds (a relay
//! marking them, usually: the batch then rolls back, waits for that row alone and tries
//! again, so it never waits while holding locks and cannot deadlock with a relay), one
//! reads the open rows of their keys for step 3, one marks them all consumed. Anything
//! off the happy path (step 5, a dead letter, a database error) rolls the whole batch
//! back and its records are settled one per transaction as above, so every handler's
//! database effects commit exactly once with its consumed mark.
//!
//! The record's offset is stored only after its transaction's outcome is known. When
//! the database itself fails (even at COMMIT, where the outcome is ambiguous) the same
//! record is processed again after a backoff: the row lock and status check make that
//! safe, so an ambiguous commit is retried and de-duplicated, never dead-lettered.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::FutureExt;
use rdkafka::consumer::{CommitMode, Consumer as _, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Message, OwnedMessage};
use sqlx::{Pool, Transaction};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::backend::{AttemptsFence, Backend, RowState, Status};
use crate::catalog::{Catalog, Route};
use crate::config::OutboxConfig;
use crate::envelope::{Envelope, EnvelopeError};
use crate::error::{Error, Result};
use crate::handler::{EventMeta, FailureKind, HandlerContext, HandlerFn};
use crate::kafka::{ClientLog, KafkaConfig};
use crate::relay::ShutdownSignal;
use crate::retry::{decide, Decision};

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

/// How `record` (the Kafka message `msg`, decoded) disagrees with `row`, the outbox row
/// its event id names, or `None` if it is a faithful copy. Names the fields that differ
/// and sizes, never values from the payload.
fn disagreement<M: Message>(
    record: &std::result::Result<Envelope, EnvelopeError>,
    msg: &M,
    row: &RowState,
    route: &Route,
) -> Option<String> {
    let envelope = match record {
        Ok(e) => e,
        Err(e) => return Some(format!("has an unreadable envelope ({e})")),
    };
    let mut differs = Vec::new();
    if envelope.service != route.service().as_str() {
        differs.push("ce_source".to_owned());
    }
    if envelope.event_type != row.event_type {
        differs.push("ce_type".to_owned());
    }
    if i64::from(envelope.version) != i64::from(row.version) {
        differs.push("ce_eventversion".to_owned());
    }
    if envelope.key != row.key {
        differs.push("key".to_owned());
    }
    let payload = msg.payload().unwrap_or_default();
    if payload != row.payload.as_bytes() {
        differs.push(format!(
            "payload ({} bytes; the row's has {})",
            payload.len(),
            row.payload.len()
        ));
    }
    (!differs.is_empty())
        .then(|| format!("disagrees with the stored event in: {}", differs.join(", ")))
}

/// What [`Consumer::step`] did with one record inside the transaction.
enum Step {
    /// Settled inside the transaction (handled, duplicate, deferred): commit it.
    InTx(Outcome),
    /// Roll the transaction back, then settle the record outside it.
    Abort(Abort),
}

/// What a batch transaction knows besides what it wrote (see [`Consumer::process_batch`]).
struct BatchState {
    /// The rows' states as locked at the start, by event id; taken by the first record
    /// of each event (a repeat sees what the first one did).
    locked: HashMap<Uuid, RowState>,
    /// Open rows of the batch's keys below its highest row id, by key, as read after the
    /// lock; `None` when there were too many to read (then each record asks the database).
    open: Option<HashMap<String, Vec<i64>>>,
    /// Rows handled so far; they are marked consumed in one statement before COMMIT.
    handled: HashSet<i64>,
    /// Events handled so far, so a repeat in the same batch is a duplicate.
    handled_events: HashSet<Uuid>,
}

impl BatchState {
    /// Whether a row of `key` older than `id` is still open: open when the batch began
    /// and not handled in it since. `None` when the batch does not know.
    fn has_open_predecessor(&self, key: &str, id: i64) -> Option<bool> {
        let open = self.open.as_ref()?;
        Some(
            open.get(key)
                .is_some_and(|ids| ids.iter().any(|j| *j < id && !self.handled.contains(j))),
        )
    }
}

/// How many times a batch retries its up-front lock after waiting for a row another
/// transaction held, before settling its records one by one.
const BATCH_LOCK_ATTEMPTS: usize = 3;

/// Most open rows of its keys a batch reads up front (beyond that, a parked key's
/// backlog: each record asks the database).
const BATCH_OPEN_ROWS: u32 = 1024;

/// What must be recorded after a rollback.
enum Abort {
    /// No outbox row to act on.
    Skip(String),
    /// Dead at once, with the reason.
    Dead(RowState, String),
    /// The handler failed or panicked.
    Failed {
        row: RowState,
        kind: FailureKind,
        error: String,
    },
}

struct Handler<DB: Backend> {
    call: HandlerFn<DB>,
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
        let mut handlers = HashMap::new();
        let mut problems = Vec::new();
        for info in catalog.handlers_of(service) {
            let Some(reg) = catalog.handler_registration(service, &info.event_type) else {
                continue;
            };
            match reg.for_backend::<DB>() {
                Some(call) => {
                    handlers.insert(
                        info.event_type.clone(),
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
                    service,
                    DB::BACKEND_NAME
                )),
            }
        }
        if !problems.is_empty() {
            return Err(Error::Config(problems.join("; ")));
        }
        Ok(Consumer {
            pool,
            route,
            catalog: catalog.clone(),
            handlers,
            config,
            stats: Arc::new(ConsumerStats::default()),
        })
    }

    /// The consumer's counters.
    pub fn stats(&self) -> Arc<ConsumerStats> {
        self.stats.clone()
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
        let this = Arc::new(self);
        let mut replaced = 0u32;
        loop {
            match this.session(kafka, &mut shutdown).await? {
                SessionEnd::Shutdown => return Ok(()),
                SessionEnd::Unusable(why) => {
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
        let consumer: StreamConsumer<ClientLog> = kafka
            .consumer_config(self.route.group().as_str(), self.config.max_payload_bytes)
            .create_with_context(ClientLog::new("consumer"))
            .map_err(|e| {
                Error::kafka(
                    format!("creating the consumer of service {}", self.route.service()),
                    e,
                )
            })?;
        consumer
            .subscribe(&[self.route.topic().as_str()])
            .map_err(|e| Error::kafka(format!("subscribing to {}", self.route.topic()), e))?;

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

    /// Settles a lane's queued records: in one transaction when there are several and
    /// all of them take the happy path, otherwise one by one. Returns how many records,
    /// from the front, settled (fewer than all only when shutdown came first).
    async fn settle_batch(&self, msgs: &[OwnedMessage], shutdown: &mut ShutdownSignal) -> usize {
        if msgs.len() > 1 {
            match self.process_batch(msgs).await {
                Ok(Some(_)) => return msgs.len(),
                Ok(None) => {}
                Err(e) => {
                    // One by one next, where each record is retried in place with a
                    // backoff: a record that fails every time then holds up only itself.
                    self.stats.db_retries.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(service = %self.route.service(), records = msgs.len(), error = %e,
                        "a batch failed on the database; settling its records one by one");
                }
            }
        }
        for (i, msg) in msgs.iter().enumerate() {
            if *shutdown.borrow() || self.settle(msg, shutdown).await.is_none() {
                return i;
            }
        }
        msgs.len()
    }

    /// Processes `msg` until its outcome is settled in the database, retrying database
    /// failures in place. `None` if shutdown came first.
    async fn settle<M: Message>(&self, msg: &M, shutdown: &mut ShutdownSignal) -> Option<Outcome> {
        let mut failures = 0u32;
        loop {
            match self.process(msg).await {
                Ok(outcome) => return Some(outcome),
                Err(e) => {
                    failures += 1;
                    self.stats.db_retries.fetch_add(1, Ordering::Relaxed);
                    let delay = self.config.consumer_failure_backoff.delay(failures);
                    tracing::warn!(service = %self.route.service(), offset = msg.offset(), error = %e, ?delay,
                        "processing failed on the database; retrying the same record");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.changed() => {}
                    }
                    if *shutdown.borrow() {
                        return None;
                    }
                }
            }
        }
    }

    /// Processes one record (any `rdkafka` message) in its own transaction. `Err` only
    /// for database failures, after which the same record must be processed again.
    pub async fn process<M: Message>(&self, msg: &M) -> Result<Outcome> {
        let tx = DB::begin(&self.pool)
            .await
            .map_err(|e| self.db_error("beginning to consume", msg, e))?;
        let (tx, step) = self.step(tx, msg, None).await?;
        match step {
            Step::InTx(outcome) => {
                self.commit(tx, msg).await?;
                self.count(&outcome);
                Ok(outcome)
            }
            Step::Abort(abort) => {
                let _ = tx.rollback().await;
                self.settle_outside(abort).await
            }
        }
    }

    /// Processes several records of one lane in ONE transaction (see
    /// [`OutboxConfig::consumer_batch_size`]). `Ok(None)` when a record needs more
    /// than the happy path (a handler failed, a dead letter, a record with no row) or
    /// its rows stayed locked by others: the transaction was rolled back and the
    /// records must be processed one by one.
    ///
    /// Statements per batch: the lock (which also reads the rows), one read of the open
    /// rows of its keys, one consumed mark for all, COMMIT; plus the handlers' own.
    async fn process_batch<M: Message>(&self, msgs: &[M]) -> Result<Option<Vec<Outcome>>> {
        let Some(first) = msgs.first() else {
            return Ok(Some(Vec::new()));
        };
        let mut event_ids: Vec<_> = msgs
            .iter()
            .filter_map(|m| Envelope::event_id_of(m).map(|id| id.0))
            .collect();
        event_ids.sort_unstable();
        event_ids.dedup();
        let Some((mut tx, locked)) = self.lock_batch(first, &event_ids).await? else {
            return Ok(None);
        };
        let open = self.open_rows(&mut tx, first, &locked).await?;
        let mut state = BatchState {
            locked,
            open,
            handled: HashSet::new(),
            handled_events: HashSet::new(),
        };
        let mut outcomes = Vec::with_capacity(msgs.len());
        for msg in msgs {
            let (t, step) = self.step(tx, msg, Some(&mut state)).await?;
            tx = t;
            match step {
                Step::InTx(outcome) => outcomes.push(outcome),
                Step::Abort(_) => {
                    let _ = tx.rollback().await;
                    return Ok(None);
                }
            }
        }
        if !state.handled.is_empty() {
            let ids: Vec<i64> = state.handled.iter().copied().collect();
            DB::mark_consumed(&mut tx, self.route.table(), &ids)
                .await
                .map_err(|e| self.db_error("marking consumed the batch starting with", first, e))?;
        }
        self.commit(tx, first).await?;
        for outcome in &outcomes {
            self.count(outcome);
        }
        self.stats
            .batched
            .fetch_add(outcomes.len() as u64, Ordering::Relaxed);
        Ok(Some(outcomes))
    }

    /// Begins a batch's transaction and locks the rows of `event_ids` without waiting
    /// (`Backend::lock_batch_for_consume`). When another transaction holds one (a relay
    /// marking it published, usually), rolls back, waits for that row in a statement of
    /// its own, holding no other lock, and tries again: a batch never waits for a row
    /// while holding others, so it cannot deadlock with a relay's mark. `None` when a
    /// row does not exist or the rows stayed busy.
    async fn lock_batch<M: Message>(
        &self,
        first: &M,
        event_ids: &[Uuid],
    ) -> Result<Option<(Transaction<'static, DB>, HashMap<Uuid, RowState>)>> {
        let route = &self.route;
        for _ in 0..BATCH_LOCK_ATTEMPTS {
            let mut tx = DB::begin(&self.pool)
                .await
                .map_err(|e| self.db_error("beginning to consume", first, e))?;
            let locked: HashMap<_, _> =
                DB::lock_batch_for_consume(&mut tx, route.table(), route.service(), event_ids)
                    .await
                    .map_err(|e| self.db_error("locking the rows of a batch with", first, e))?
                    .into_iter()
                    .collect();
            let Some(busy) = event_ids.iter().find(|id| !locked.contains_key(id)) else {
                return Ok(Some((tx, locked)));
            };
            let _ = tx.rollback().await;
            self.stats.batch_lock_waits.fetch_add(1, Ordering::Relaxed);
            let mut conn = self
                .pool
                .acquire()
                .await
                .map_err(|e| self.db_error("waiting for a row of a batch with", first, e))?;
            // Autocommit: the lock is taken once the holder commits, and let go at once.
            let exists = DB::lock_for_consume(&mut conn, route.table(), route.service(), *busy)
                .await
                .map_err(|e| self.db_error("waiting for a row of a batch with", first, e))?
                .is_some();
            if !exists {
                return Ok(None);
            }
        }
        Ok(None)
    }

    /// The open rows of the keys of a batch's `locked` rows, below the highest of them
    /// (`None` if there are more than [`BATCH_OPEN_ROWS`]).
    async fn open_rows<M: Message>(
        &self,
        tx: &mut Transaction<'static, DB>,
        first: &M,
        locked: &HashMap<Uuid, RowState>,
    ) -> Result<Option<HashMap<String, Vec<i64>>>> {
        let mut keys: Vec<String> = locked.values().filter_map(|r| r.key.clone()).collect();
        keys.sort_unstable();
        keys.dedup();
        let mut open: HashMap<String, Vec<i64>> = HashMap::new();
        let Some(below) = locked.values().map(|r| r.id).max() else {
            return Ok(Some(open));
        };
        if keys.is_empty() {
            return Ok(Some(open));
        }
        let rows = DB::open_rows_of_keys(
            &mut **tx,
            self.route.table(),
            self.route.service(),
            &keys,
            below,
            BATCH_OPEN_ROWS,
        )
        .await
        .map_err(|e| self.db_error("reading the open rows of the batch with", first, e))?;
        if rows.len() >= BATCH_OPEN_ROWS as usize {
            return Ok(None);
        }
        for (key, id) in rows {
            open.entry(key).or_default().push(id);
        }
        Ok(Some(open))
    }

    /// Does what can be done for `msg` inside `tx`: the row lock, the checks of the
    /// record against its row, the predecessor check, the handler and the consumed
    /// mark. Returns the transaction (to commit on [`Step::InTx`], to roll back on
    /// [`Step::Abort`]). In a batch, `batch` supplies the row's locked state and its
    /// key's open rows, and collects the consumed mark for one statement at the end.
    ///
    /// The row is the truth: it was written in the business transaction, and the
    /// handler receives its type, version and payload. A record only says which row is
    /// ready; one that disagrees with its row changes nothing.
    async fn step<M: Message>(
        &self,
        mut tx: Transaction<'static, DB>,
        msg: &M,
        mut batch: Option<&mut BatchState>,
    ) -> Result<(Transaction<'static, DB>, Step)> {
        let route = &self.route;
        let size = msg.payload().map_or(0, <[u8]>::len);
        if size > self.config.max_payload_bytes {
            let reason = format!(
                "record at {}:{}@{} has a {size}-byte payload, over the {}-byte limit \
                 (OutboxConfig::max_payload_bytes): not an event of this outbox",
                msg.topic(),
                msg.partition(),
                msg.offset(),
                self.config.max_payload_bytes
            );
            return Ok((tx, Step::Abort(Abort::Skip(reason))));
        }
        let record = Envelope::decode(msg);
        let Some(event_id) = record
            .as_ref()
            .ok()
            .map(|e| e.event_id)
            .or_else(|| Envelope::event_id_of(msg))
        else {
            let reason = match &record {
                Err(e) => format!(
                    "record at {}:{}@{} is not an outbox envelope: {e}",
                    msg.topic(),
                    msg.partition(),
                    msg.offset()
                ),
                Ok(_) => "record has no readable event id".to_owned(),
            };
            return Ok((tx, Step::Abort(Abort::Skip(reason))));
        };
        let ctx = |what: &str| {
            format!(
                "{what} event {event_id} of service {} in {}",
                route.service(),
                route.table()
            )
        };
        let locked = match batch.as_deref_mut() {
            Some(b) if b.handled_events.contains(&event_id.0) => {
                return Ok((tx, Step::InTx(Outcome::Duplicate)));
            }
            Some(b) => b.locked.remove(&event_id.0),
            None => None,
        };
        let row = match locked {
            Some(row) => Some(row),
            None => DB::lock_for_consume(&mut tx, route.table(), route.service(), event_id.0)
                .await
                .map_err(|e| Error::db(ctx("locking"), e))?,
        };
        let Some(row) = row else {
            let reason = format!(
                "no outbox row for event {event_id} in service {} (table {})",
                route.service(),
                route.table()
            );
            return Ok((tx, Step::Abort(Abort::Skip(reason))));
        };
        if let Some(differs) = disagreement(&record, msg, &row, route) {
            let reason = format!(
                "record at {}:{}@{} names event {event_id} but {differs}; the stored \
                 event is left as it is",
                msg.topic(),
                msg.partition(),
                msg.offset()
            );
            return Ok((tx, Step::InTx(Outcome::Mismatch { reason })));
        }
        if row.status.is_terminal() {
            return Ok((tx, Step::InTx(Outcome::Duplicate)));
        }
        if row.status == Status::Pending && !row.due {
            // Waiting out a retry backoff or a deferral: a stale copy of its record. The
            // relay publishes the row again when it is due.
            return Ok((tx, Step::InTx(Outcome::NotDue)));
        }
        if let Some(key) = &row.key {
            let known = batch
                .as_deref()
                .and_then(|b| b.has_open_predecessor(key, row.id));
            let open = match known {
                Some(open) => open,
                None => {
                    DB::has_open_predecessor(&mut tx, route.table(), route.service(), key, row.id)
                        .await
                        .map_err(|e| Error::db(ctx("checking the predecessors of"), e))?
                }
            };
            if open {
                let republished = DB::defer(
                    &mut tx,
                    route.table(),
                    route.service(),
                    key,
                    row.id,
                    self.config.backoff.base,
                )
                .await
                .map_err(|e| Error::db(ctx("deferring"), e))?;
                if republished > 0 {
                    self.stats
                        .republished
                        .fetch_add(republished, Ordering::Relaxed);
                    tracing::warn!(service = %route.service(), row = row.id, predecessors = republished,
                        "published predecessors of this event never reached the consumer before it \
                         (lost with the broker?); publishing them again");
                }
                return Ok((tx, Step::InTx(Outcome::Deferred)));
            }
        }
        let Some(handler) = self.handlers.get(&row.event_type) else {
            let reason = if self.catalog.event(&row.event_type).is_none() {
                format!("unknown event type `{}`", row.event_type)
            } else {
                format!(
                    "no handler for event type `{}` in service `{}`",
                    row.event_type,
                    route.service()
                )
            };
            return Ok((tx, Step::Abort(Abort::Dead(row, reason))));
        };
        let version = u32::try_from(row.version).unwrap_or(0);
        if version > handler.version {
            let reason = format!(
                "event `{}` has schema version {}, newer than the handler's {}",
                row.event_type, row.version, handler.version
            );
            return Ok((tx, Step::Abort(Abort::Dead(row, reason))));
        }

        let meta = EventMeta {
            event_id,
            event_type: row.event_type.clone(),
            version,
            service: route.service().to_string(),
            key: row.key.clone(),
            attempt: u32::try_from(row.attempts).unwrap_or(0) + 1,
        };
        let mut hctx = HandlerContext::new(tx, meta);
        let result = AssertUnwindSafe((handler.call)(&mut hctx, row.payload.as_bytes()))
            .catch_unwind()
            .await;
        let mut tx = hctx.into_transaction();
        let (kind, error) = match result {
            Ok(Ok(())) => {
                match batch {
                    Some(b) => {
                        b.handled.insert(row.id);
                        b.handled_events.insert(event_id.0);
                    }
                    None => DB::mark_consumed(&mut tx, route.table(), &[row.id])
                        .await
                        .map_err(|e| Error::db(ctx("marking consumed"), e))?,
                }
                return Ok((tx, Step::InTx(Outcome::Handled)));
            }
            Ok(Err(e)) => (e.kind(), e.message().to_owned()),
            Err(panic) => (
                FailureKind::Transient,
                format!("handler panicked: {}", panic_message(&panic)),
            ),
        };
        Ok((tx, Step::Abort(Abort::Failed { row, kind, error })))
    }

    /// Commits the transaction of one record or one batch (`msg` names it in errors).
    async fn commit<M: Message>(&self, tx: Transaction<'_, DB>, msg: &M) -> Result<()> {
        failpoint!("consumer.before_commit");
        tx.commit()
            .await
            .map_err(|e| self.db_error("committing the handler of", msg, e))?;
        failpoint!("consumer.after_commit");
        Ok(())
    }

    /// Counts an outcome settled inside a committed transaction.
    fn count(&self, outcome: &Outcome) {
        let counter = match outcome {
            Outcome::Handled => &self.stats.handled,
            Outcome::Duplicate => &self.stats.duplicates,
            Outcome::Deferred => &self.stats.deferred,
            Outcome::NotDue => &self.stats.not_due,
            Outcome::Mismatch { reason } => {
                tracing::warn!(service = %self.route.service(), %reason, "record does not match its outbox row");
                &self.stats.mismatched
            }
            _ => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Records, after the rollback, what could not be done inside the transaction.
    async fn settle_outside(&self, abort: Abort) -> Result<Outcome> {
        let route = &self.route;
        match abort {
            Abort::Skip(reason) => Ok(self.skipped(reason)),
            Abort::Dead(row, reason) => self.dead(&row, reason).await,
            Abort::Failed {
                row,
                kind: FailureKind::Transient,
                error,
            } => match decide(row.attempts, row.max_retries, &self.config.backoff) {
                Decision::RetryAfter(delay) => {
                    DB::retry_later(
                        &self.pool,
                        route.table(),
                        row.id,
                        AttemptsFence(row.attempts),
                        delay,
                        &error,
                    )
                    .await
                    .map_err(|e| {
                        Error::db(
                            format!("scheduling a retry of row {} of {}", row.id, route.table()),
                            e,
                        )
                    })?;
                    self.stats.retried.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(service = %route.service(), row = row.id, ?delay, %error, "handler failed; retrying later");
                    Ok(Outcome::Retry { error })
                }
                Decision::Dead => {
                    let reason = crate::backend::error_with_note(
                        &error,
                        &format!(" [retries exhausted: failed {} times]", row.attempts + 1),
                    );
                    self.dead(&row, reason).await
                }
            },
            Abort::Failed { row, error, .. } => self.dead(&row, error).await,
        }
    }

    fn db_error<M: Message>(&self, what: &str, msg: &M, e: sqlx::Error) -> Error {
        Error::db(
            format!(
                "{what} the record at {}:{}@{} of service {} in {}",
                msg.topic(),
                msg.partition(),
                msg.offset(),
                self.route.service(),
                self.route.table()
            ),
            e,
        )
    }

    async fn dead(&self, row: &RowState, reason: String) -> Result<Outcome> {
        let route = &self.route;
        DB::mark_dead(
            &self.pool,
            route.table(),
            row.id,
            AttemptsFence(row.attempts),
            &reason,
        )
        .await
        .map_err(|e| {
            Error::db(
                format!("marking row {} of {} dead", row.id, route.table()),
                e,
            )
        })?;
        self.stats.dead.fetch_add(1, Ordering::Relaxed);
        tracing::error!(service = %route.service(), row = row.id, %reason, "outbox event is dead");
        Ok(Outcome::Dead { reason })
    }

    fn skipped(&self, reason: String) -> Outcome {
        self.stats.skipped.fetch_add(1, Ordering::Relaxed);
        tracing::error!(service = %self.route.service(), %reason, "record skipped");
        Outcome::Skipped { reason }
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

/// Records queued per lane before the receive loop waits (at least; a lane's queue
/// also holds one batch). Small, because every queued record is one a crash makes
/// Kafka deliver again (as a duplicate).
const LANE_DEPTH: usize = 16;

/// The lane of a record: by key, so one key's records stay in order; keyless records by
/// partition.
fn lane_of<M: Message>(msg: &M, lanes: usize) -> usize {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    match msg.key() {
        Some(k) => k.hash(&mut h),
        None => msg.partition().hash(&mut h),
    }
    (h.finish() % lanes.max(1) as u64) as usize
}

/// Which offsets may be stored: per partition of the consumer's one topic, up to just
/// before the oldest record received and not yet settled.
///
/// Each record is tagged with its partition's *epoch* when received. A rebalance, or a
/// partition whose offsets go back without one (its position was reset: the broker lost
/// its log, or the records it held), starts a new epoch, and settlements tagged with an
/// older one are not stored: an offset of one log must never be stored against
/// another, where it would skip records nobody has read.
#[derive(Debug, Default)]
struct OffsetTracker {
    partitions: HashMap<i32, PartitionOffsets>,
    /// The last epoch handed out; epochs never repeat.
    epochs: u64,
}

#[derive(Debug, Default)]
struct PartitionOffsets {
    epoch: u64,
    in_flight: BTreeSet<i64>,
    highest_received: Option<i64>,
    highest_settled: Option<i64>,
    stored: Option<i64>,
}

impl OffsetTracker {
    /// Records a received record; returns the epoch to tag it with.
    fn received(&mut self, partition: i32, offset: i64) -> u64 {
        let p = self.partitions.entry(partition).or_default();
        if p.epoch == 0 || p.highest_received.is_some_and(|h| offset <= h) {
            // New, or the position went back: a fresh epoch, from this record on.
            self.epochs += 1;
            *p = PartitionOffsets {
                epoch: self.epochs,
                ..Default::default()
            };
        }
        p.highest_received = Some(offset);
        p.in_flight.insert(offset);
        p.epoch
    }

    /// After a rebalance: every partition starts a new epoch with its next record.
    fn rebalanced(&mut self) {
        self.partitions.clear();
    }

    /// Marks `offset` (received in `epoch`) settled; returns the offset to store (the
    /// last record of an unbroken settled prefix) if it moved forward.
    fn settled(&mut self, partition: i32, epoch: u64, offset: i64) -> Option<i64> {
        let p = self.partitions.get_mut(&partition)?;
        if p.epoch != epoch || !p.in_flight.remove(&offset) {
            return None;
        }
        p.highest_settled = p.highest_settled.max(Some(offset));
        let upto = match p.in_flight.first() {
            Some(&oldest) => oldest - 1,
            None => p.highest_settled?,
        };
        if upto >= 0 && p.stored.is_none_or(|s| upto > s) {
            p.stored = Some(upto);
            Some(upto)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_are_stored_only_up_to_the_oldest_unsettled_record() {
        let mut t = OffsetTracker::default();
        let mut e = 0;
        for o in 10..15 {
            e = t.received(0, o);
        }
        let e1 = t.received(1, 3);
        // 10 and 11 are still in flight: nothing past 9 (the committed position stays 10).
        assert_eq!(t.settled(0, e, 12), Some(9));
        assert_eq!(t.settled(0, e, 11), None);
        assert_eq!(t.settled(0, e, 10), Some(12));
        assert_eq!(t.settled(1, e1, 3), Some(3));
        assert_eq!(t.settled(0, e, 14), None);
        assert_eq!(t.settled(0, e, 13), Some(14));
        assert_eq!(
            t.settled(0, e, 13),
            None,
            "a repeated settlement changes nothing"
        );
        assert_eq!(t.settled(9, e, 1), None, "unknown partition");
    }

    #[test]
    fn a_position_that_goes_back_starts_a_new_epoch() {
        let mut t = OffsetTracker::default();
        let old = t.received(0, 5000);
        t.received(0, 5001);
        assert_eq!(t.settled(0, old, 5000), Some(5000));
        // The broker lost its log: the partition starts again at 0 while 5001 is still
        // being settled. Its settlement must not be stored against the new log.
        let new = t.received(0, 0);
        assert_ne!(new, old);
        assert_eq!(t.settled(0, old, 5001), None, "an offset of the old log");
        assert_eq!(t.settled(0, new, 0), Some(0));
        t.received(0, 1);
        assert_eq!(t.settled(0, new, 1), Some(1));
    }

    #[test]
    fn settlements_from_before_a_rebalance_are_not_stored() {
        let mut t = OffsetTracker::default();
        let old = t.received(0, 7);
        t.rebalanced();
        // The group resumed from the committed offset 7: the same record again.
        let new = t.received(0, 7);
        assert_ne!(new, old);
        assert_eq!(t.settled(0, old, 7), None);
        assert_eq!(t.settled(0, new, 7), Some(7));
    }

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
