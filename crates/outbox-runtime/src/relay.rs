//! The relay: moves one service's committed rows from its outbox table to its topic.
//!
//! One round ([`Relay::relay_once`]):
//! 1. **claim** due rows in one short statement (status + due time, `SKIP LOCKED`,
//!    head of key only), leasing them under a fresh random token; no transaction stays
//!    open after it;
//! 2. **produce** them with the idempotent producer, key = the event key, headers =
//!    the [`crate::envelope`], and wait for every delivery report;
//! 3. **mark** the acknowledged rows published in one statement fenced by the token
//!    (a relay that lost its lease changes nothing); give transiently failed rows
//!    back with a backoff (a broker outage never makes an event dead); mark rows the
//!    broker can never take (too large, invalid) dead with the reason.
//!
//! A relay never holds a database transaction across a Kafka round-trip, never
//! reads by id cursor (ids commit out of order), and never marks a row published
//! before the broker acknowledged it.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use sqlx::Pool;
use tokio::sync::watch;

use crate::backend::{Backend, ClaimedRow};
use crate::catalog::Route;
use crate::config::OutboxConfig;
use crate::envelope::Envelope;
use crate::error::{Error, Result};
use crate::event::EventId;
use crate::kafka::KafkaConfig;
use crate::wakeup;

/// Counters of one relay, for tests, examples and metrics.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Rows marked published.
    pub published: AtomicU64,
    /// Rows given back after a transient broker failure.
    pub released: AtomicU64,
    /// Rows made dead by a permanent broker error.
    pub dead: AtomicU64,
    /// Rows whose mark found the lease gone (another relay or a consumer got there
    /// first); nothing was overwritten.
    pub fenced: AtomicU64,
    /// Claim rounds that found rows.
    pub rounds: AtomicU64,
    /// Rounds that failed on the database or the broker.
    pub errors: AtomicU64,
    /// Times the relay found nothing due and went idle (waiting for a wake-up or the
    /// poll interval).
    pub idles: AtomicU64,
    /// Producers this relay replaced because the old one could no longer work (a fatal
    /// or fenced client error, or one that kept failing while the broker answered).
    pub producer_restarts: AtomicU64,
    /// Broker probes that failed while the relay waited, without claiming, for its
    /// producer to be able to deliver.
    pub failed_probes: AtomicU64,
}

/// What one round did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RoundReport {
    /// Rows claimed.
    pub claimed: usize,
    /// Rows marked published.
    pub published: u64,
    /// Rows given back for later.
    pub released: u64,
    /// Rows made dead.
    pub dead: u64,
}

/// A shutdown signal for long-running loops: `true` once shutdown was requested.
pub type ShutdownSignal = watch::Receiver<bool>;

/// The relay of one service.
pub struct Relay<DB: Backend> {
    pool: Pool<DB>,
    route: Route,
    producer: FutureProducer,
    config: Arc<OutboxConfig>,
    stats: Arc<RelayStats>,
    consecutive_failures: AtomicU32,
    claim: Mutex<ClaimState>,
}

/// How the relay claims next (see [`Relay::claim_batch`]).
#[derive(Debug, Default)]
struct ClaimState {
    /// The last claim came back short: claim within a window of the oldest due rows.
    bounded: bool,
    /// When the relay last fell back from the window to the full claim.
    last_full: Option<Instant>,
    /// Whether that fallback found rows the window had missed.
    full_productive: bool,
}

/// Tries of one mark-published before the round fails.
const MARK_ATTEMPTS: u32 = 4;

/// The bounded claim looks at this many due rows per row it may claim.
const CLAIM_WINDOW: u32 = 4;

impl<DB: Backend> Relay<DB> {
    /// A relay for `route`, with its own producer.
    pub fn new(
        pool: Pool<DB>,
        route: Route,
        kafka: &KafkaConfig,
        config: Arc<OutboxConfig>,
    ) -> Result<Self> {
        let producer = create_producer(kafka)?;
        Ok(Self::with_producer(pool, route, producer, config))
    }

    /// A relay for `route` sharing `producer` with other relays of this process.
    pub fn with_producer(
        pool: Pool<DB>,
        route: Route,
        producer: FutureProducer,
        config: Arc<OutboxConfig>,
    ) -> Self {
        Relay {
            pool,
            route,
            producer,
            config,
            stats: Arc::new(RelayStats::default()),
            consecutive_failures: AtomicU32::new(0),
            claim: Mutex::new(ClaimState::default()),
        }
    }

    /// The relay's counters.
    pub fn stats(&self) -> Arc<RelayStats> {
        self.stats.clone()
    }

    /// One claim → produce → mark round. Returns what it did; `claimed == 0` means
    /// nothing was due. ([`run`](Self::run) pipelines these rounds: it claims the next
    /// batch while the previous one's delivery reports come back.)
    pub async fn relay_once(&self) -> Result<RoundReport> {
        match self.claim_batch().await? {
            None => Ok(RoundReport::default()),
            Some(batch) => {
                let batch = self.enqueue(batch).await;
                self.finish(batch).await
            }
        }
    }

    /// Claims due rows under a fresh lease token; `None` when nothing is due.
    async fn claim_batch(&self) -> Result<Option<Claimed>> {
        let route = &self.route;
        let token = lease_token();
        let limit = self.config.relay_batch_size;
        let lease = self.config.relay_lease;
        let context = |e| {
            Error::db(
                format!(
                    "claiming due rows of service {} from {}",
                    route.service(),
                    route.table()
                ),
                e,
            )
        };
        // The full claim (heads of key among every due row) while it fills batches: it
        // is the cheapest way through a backlog of many keys. When it comes back short,
        // the next claims are bounded to a window of the oldest due rows: with many
        // relays on few keys, the heads are mostly leased to the other relays, and a
        // full claim would walk the whole backlog to find almost nothing.
        let bounded = DB::BOUNDED_CLAIM && self.claim_state().bounded;
        let mut rows = if bounded {
            DB::claim_window(
                &self.pool,
                route.table(),
                route.service(),
                limit,
                limit.saturating_mul(CLAIM_WINDOW),
                lease,
                token,
            )
            .await
        } else {
            DB::claim(
                &self.pool,
                route.table(),
                route.service(),
                limit,
                lease,
                token,
            )
            .await
        }
        .map_err(context)?;
        let full = rows.len() == limit as usize;
        if bounded && !full && self.full_scan_due() {
            // The window can hide heads behind a long run of waiting rows (a parked
            // head's successors): a full claim finds them. Run again at once while it
            // keeps finding rows, else at most once per poll interval.
            let more = DB::claim(
                &self.pool,
                route.table(),
                route.service(),
                limit - rows.len() as u32,
                lease,
                token,
            )
            .await
            .map_err(context)?;
            self.full_scan_done(!more.is_empty());
            rows.extend(more);
            rows.sort_by_key(|r| r.id);
        }
        if DB::BOUNDED_CLAIM {
            // Bounded from now on while claims come back short.
            self.claim_state().bounded = rows.len() < limit as usize;
        }
        if rows.is_empty() {
            return Ok(None);
        }
        self.stats.rounds.fetch_add(1, Ordering::Relaxed);
        failpoint!("relay.after_claim");
        Ok(Some(Claimed { rows, token }))
    }

    fn claim_state(&self) -> std::sync::MutexGuard<'_, ClaimState> {
        self.claim.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn full_scan_due(&self) -> bool {
        let state = self.claim_state();
        state.full_productive
            || state
                .last_full
                .is_none_or(|t| t.elapsed() >= self.config.relay_poll_interval)
    }

    fn full_scan_done(&self, productive: bool) {
        let mut state = self.claim_state();
        state.last_full = Some(Instant::now());
        state.full_productive = productive;
    }

    /// Enqueues a claimed batch on the producer, in id order (no waiting for delivery).
    async fn enqueue(&self, batch: Claimed) -> InFlight {
        let pending = self.produce(&batch.rows).await;
        InFlight {
            rows: batch.rows,
            token: batch.token,
            pending,
        }
    }

    /// Waits for a batch's delivery reports, then marks it: acknowledged rows published
    /// (fenced by the lease token), transient failures given back after a backoff,
    /// permanent ones dead.
    async fn finish(&self, batch: InFlight) -> Result<RoundReport> {
        let route = &self.route;
        let InFlight {
            rows,
            token,
            pending,
        } = batch;
        let outcomes = wait_for_reports(pending).await;
        failpoint!("relay.after_produce");

        let mut acked = Vec::with_capacity(rows.len());
        let mut retry: Vec<i64> = Vec::new();
        let mut retry_error = String::new();
        let mut dead: Vec<(i64, String)> = Vec::new();
        for (row, outcome) in rows.iter().zip(outcomes) {
            match outcome {
                Produced::Acked => acked.push(row.id),
                Produced::Transient(e) => {
                    retry.push(row.id);
                    retry_error = e;
                }
                Produced::Permanent(e) => dead.push((row.id, e)),
            }
        }

        let mut report = RoundReport {
            claimed: rows.len(),
            ..Default::default()
        };
        if !acked.is_empty() {
            let marked = self.mark_published(&acked, token).await?;
            report.published = marked;
            failpoint!("relay.after_mark");
            self.stats.published.fetch_add(marked, Ordering::Relaxed);
            self.stats.fenced.fetch_add(
                acked.len() as u64 - marked.min(acked.len() as u64),
                Ordering::Relaxed,
            );
            if marked > 0 {
                // Marking unblocks the next event of each of these keys: wake the
                // service's other relays in this process that went idle because every
                // head of key was leased (they would otherwise wait for the poll).
                wakeup::local_waker(route.table(), route.service()).notify_waiters();
            }
        }
        for (id, reason) in &dead {
            let changed = DB::mark_dead_leased(&self.pool, route.table(), *id, token, reason)
                .await
                .map_err(|e| Error::db(format!("marking row {id} of {} dead", route.table()), e))?;
            if changed {
                report.dead += 1;
                self.stats.dead.fetch_add(1, Ordering::Relaxed);
                tracing::error!(service = %route.service(), row = id, %reason, "outbox event is dead: the broker refuses it");
            }
        }
        if retry.is_empty() {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        } else {
            let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
            let delay = self.config.relay_failure_backoff.delay(failures);
            let released = DB::release(
                &self.pool,
                route.table(),
                &retry,
                token,
                delay,
                &retry_error,
            )
            .await
            .map_err(|e| {
                Error::db(
                    format!("giving back {} rows of {}", retry.len(), route.table()),
                    e,
                )
            })?;
            report.released = released;
            self.stats.released.fetch_add(released, Ordering::Relaxed);
            tracing::warn!(service = %route.service(), rows = retry.len(), ?delay, error = %retry_error,
                "broker failed to take events; they are due again after the delay");
        }
        Ok(report)
    }

    /// Marks acknowledged rows published, retrying a few times: the records are in the
    /// topic already, and a mark given up leaves the rows leased until the lease ends
    /// (then they are published a second time). A deadlock victim or a dropped
    /// connection succeeds on the next try; the mark is fenced, so a retry is safe.
    async fn mark_published(&self, ids: &[i64], token: i64) -> Result<u64> {
        let route = &self.route;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match DB::mark_published(&self.pool, route.table(), ids, token).await {
                Ok(marked) => return Ok(marked),
                Err(e) if attempt < MARK_ATTEMPTS => {
                    let delay = self.config.relay_failure_backoff.delay(attempt);
                    tracing::warn!(service = %route.service(), error = %e, ?delay, "marking rows published failed; retrying");
                    tokio::time::sleep(delay).await;
                }
                Err(e) => {
                    return Err(Error::db(
                        format!("marking {} rows of {} published", ids.len(), route.table()),
                        e,
                    ))
                }
            }
        }
    }

    /// Enqueues every row in id order; the delivery reports are awaited by
    /// [`wait_for_reports`].
    async fn produce(&self, rows: &[ClaimedRow]) -> Vec<Pending> {
        let mut pending = Vec::with_capacity(rows.len());
        for row in rows {
            let envelope = Envelope {
                event_id: EventId(row.event_id),
                service: self.route.service().to_string(),
                event_type: row.event_type.clone(),
                version: u32::try_from(row.version).unwrap_or(0),
                key: row.key.clone(),
                time: row.created_at,
                payload: Vec::new(),
            };
            let mut record = FutureRecord::to(self.route.topic().as_str())
                .payload(row.payload.as_bytes())
                .headers(envelope.headers());
            if let Some(key) = &row.key {
                record = record.key(key.as_bytes());
            }
            // Enqueue strictly in order: on a full queue, wait and retry the SAME record,
            // so no later record overtakes it.
            let enqueued = loop {
                match self.producer.send_result(record) {
                    Ok(delivery) => break Ok(delivery),
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        record = back;
                        self.producer.poll(Duration::from_millis(5));
                        tokio::task::yield_now().await;
                    }
                    Err((e, _)) => break Err(e),
                }
            };
            pending.push(enqueued);
        }
        pending
    }

    /// Runs until `shutdown` turns true: relays due rows, sleeps until a wake-up (a
    /// local commit, a NOTIFY on PostgreSQL) or the poll interval, backs off on errors.
    ///
    /// # Cancel safety
    ///
    /// Shutdown is checked between rounds only: a round in progress finishes (its
    /// delivery reports arrive or time out after `message.timeout.ms`, and its rows are
    /// marked or given back), so shutting down loses and duplicates nothing. Dropping
    /// the future instead (cancelling it) is safe too but may leave a round's rows
    /// leased: they are relayed again after the lease, possibly a second time.
    pub async fn run(self, mut shutdown: ShutdownSignal) -> Result<()> {
        let route = self.route.clone();
        let waker = wakeup::local_waker(route.table(), route.service());
        let mut hints = match DB::listen(&self.pool, wakeup::CHANNEL).await {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!(service = %route.service(), error = %e, "LISTEN failed; relying on polling");
                None
            }
        };
        let my_hint = wakeup::hint(route.table(), route.service());
        let mut error_streak = 0u32;
        // Pipelining: the batch whose delivery reports are still coming is finished
        // (awaited, then marked) while the next batch is claimed. Per-key order holds:
        // until it is marked, every row of the batch in flight is still pending under
        // our lease, so the claim (head of key only) cannot take a successor of any of
        // its keys; a successor claimed after the mark is enqueued after the
        // predecessor's acknowledgement. At most two batches are leased at a time.
        let mut in_flight: Option<InFlight> = None;
        loop {
            if *shutdown.borrow() {
                if let Some(batch) = in_flight.take() {
                    if let Err(e) = self.finish(batch).await {
                        self.stats.errors.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(service = %route.service(), error = %e, "last relay round failed at shutdown");
                    }
                }
                break;
            }
            // Registered before claiming, so a wake-up that comes while the claim runs
            // (a sibling relay marked rows and unblocked their keys) is not lost.
            let woken = waker.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let (finished, claimed) = match in_flight.take() {
                Some(batch) => {
                    let (f, c) = tokio::join!(self.finish(batch), self.claim_batch());
                    (Some(f), c)
                }
                None => (None, self.claim_batch().await),
            };
            let mut failed = false;
            match finished {
                Some(Ok(_)) | None => {}
                Some(Err(e)) => {
                    failed = true;
                    tracing::warn!(service = %route.service(), error = %e, "relay round failed; retrying");
                }
            }
            match claimed {
                Ok(Some(batch)) => in_flight = Some(self.enqueue(batch).await),
                Ok(None) => {}
                Err(e) => {
                    failed = true;
                    tracing::warn!(service = %route.service(), error = %e, "relay claim failed; retrying");
                }
            }
            if failed {
                error_streak += 1;
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                let delay = self.config.relay_failure_backoff.delay(error_streak);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
            error_streak = 0;
            if in_flight.is_some() {
                continue;
            }
            // Idle: wait for a wake-up, the poll interval or shutdown.
            self.stats.idles.fetch_add(1, Ordering::Relaxed);
            let poll = tokio::time::sleep(self.config.relay_poll_interval);
            tokio::pin!(poll);
            loop {
                tokio::select! {
                    _ = &mut poll => break,
                    _ = woken.as_mut() => break,
                    _ = shutdown.changed() => break,
                    hint = next_hint(&mut hints) => match hint {
                        Some(Ok(h)) if h == my_hint => break,
                        Some(Ok(_)) => continue,
                        Some(Err(e)) => {
                            tracing::debug!(error = %e, "LISTEN connection failed; it reconnects");
                            continue;
                        }
                        None => {
                            hints = None;
                            continue;
                        }
                    },
                }
            }
        }
        // Deliver what is already enqueued before returning.
        let _ = self.producer.flush(Duration::from_secs(5));
        Ok(())
    }
}

/// A claimed batch, not yet produced.
struct Claimed {
    rows: Vec<ClaimedRow>,
    token: i64,
}

/// One record's enqueue result: its delivery report to come, or the enqueue error.
type Pending = std::result::Result<DeliveryFuture, KafkaError>;

/// A batch enqueued on the producer whose delivery reports are still coming.
struct InFlight {
    rows: Vec<ClaimedRow>,
    token: i64,
    pending: Vec<Pending>,
}

/// Waits for every delivery report of a batch, in order.
async fn wait_for_reports(pending: Vec<Pending>) -> Vec<Produced> {
    let mut outcomes = Vec::with_capacity(pending.len());
    for p in pending {
        outcomes.push(match p {
            Err(e) => classify(&e),
            Ok(delivery) => match delivery.await {
                Ok(Ok(_)) => Produced::Acked,
                Ok(Err((e, _))) => classify(&e),
                Err(_canceled) => {
                    Produced::Transient("producer dropped before the delivery report".into())
                }
            },
        });
    }
    outcomes
}

async fn next_hint(
    hints: &mut Option<crate::backend::WakeStream>,
) -> Option<Result<String, sqlx::Error>> {
    match hints {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

/// The outcome of producing one row.
enum Produced {
    Acked,
    Transient(String),
    Permanent(String),
}

/// Permanent: the broker will never accept this record. Everything else (timeouts,
/// brokers down, unknown topic while it is being created, ...) is transient.
fn classify(e: &KafkaError) -> Produced {
    let code = match e {
        KafkaError::MessageProduction(code) => Some(*code),
        other => other.rdkafka_error_code(),
    };
    match code {
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidMessageSize
            | RDKafkaErrorCode::InvalidMessage
            | RDKafkaErrorCode::InvalidRecord
            | RDKafkaErrorCode::MessageBatchTooLarge,
        ) => Produced::Permanent(format!("the broker refuses the record: {e}")),
        _ => Produced::Transient(format!("produce failed: {e}")),
    }
}

/// A fresh non-zero lease token (0 means "no lease").
fn lease_token() -> i64 {
    loop {
        let t: i64 = rand::random();
        if t != 0 {
            return t;
        }
    }
}

/// The relay's producer: the framework's fixed settings (idempotence on) plus the
/// user's.
pub fn create_producer(kafka: &KafkaConfig) -> Result<FutureProducer> {
    kafka
        .producer_config()
        .create()
        .map_err(|e| Error::kafka("creating the relay's producer", e))
}
