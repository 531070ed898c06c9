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
//!    back (a broker outage never makes an event dead); mark rows the broker can never
//!    take (too large, invalid) dead with the reason.
//!
//! A relay never holds a database transaction across a Kafka round-trip, never
//! reads by id cursor (ids commit out of order), and never marks a row published
//! before the broker acknowledged it.
//!
//! ## When the producer cannot deliver
//!
//! Every failure is classified ([`Produced`]): *retriable* (timeouts, brokers down),
//! *permanent* for the record (too large, invalid: the row goes dead), or the producer
//! is *unusable* (librdkafka's fatal error, or the broker fenced or forgot the
//! idempotent producer: `ProducerFenced`, `UnknownProducerId`, out-of-order sequence).
//! librdkafka's rule is that a producer in a fatal state never works again, so an
//! unusable producer is replaced ([`Producers::replace`]), once per failure however
//! many relays share it. After any round that delivered nothing, after a replacement,
//! and at start, a relay claims nothing until a probe
//! (a metadata request for its topic) shows the broker answering with a leader for
//! every partition: rows it cannot produce stay unleased, due at once, for relays that
//! can. Rows of such a round are given back due now; the relay itself is what waits.
//! A producer that lived through an outage (the probe failed), or that keeps failing
//! whole rounds while the probes pass, is replaced too: an idempotent producer whose
//! broker lost its state times its records out instead of failing them.
//!
//! ## Records lost with the broker
//!
//! A relay remembers the highest offset acknowledged per partition. An acknowledgement
//! below it means the partition's log went back (a broker restarted without its data,
//! the topic deleted and created again): the records of rows marked published before
//! are gone, so those rows (published, not consumed) are made pending again at once,
//! in bounded batches, and published again. Consumers de-duplicate by event id.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use sqlx::Pool;
use tracing::field::Empty;
use tracing::{Instrument, Span};

use crate::backend::{Backend, ClaimScope, ClaimedRow};
use crate::catalog::Route;
use crate::config::OutboxConfig;
use crate::envelope::Envelope;
use crate::error::{Error, Result};
use crate::health::Side;
use crate::kafka::{ClientLog, KafkaConfig, Producers};
use crate::retry::Backoff;
use crate::runtime::ShutdownSignal;
use crate::trace::{self, TraceText};
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
    /// Rows made pending again because the partition log they were published to went
    /// back (records lost with the broker).
    pub redelivered_lost: AtomicU64,
    /// Claims not bounded by the window (full claims, and claims past the window) on
    /// PostgreSQL and MySQL: each may walk every due row. 0 on SQLite, whose claims
    /// are all full.
    pub full_claims: AtomicU64,
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

/// The relay of one service.
pub struct Relay<DB: Backend> {
    pool: Pool<DB>,
    route: Route,
    producers: Arc<Producers>,
    config: Arc<OutboxConfig>,
    stats: Arc<RelayStats>,
    beat: Arc<crate::health::Beat>,
    metrics: crate::metrics::RelayMetrics,
    consecutive_failures: AtomicU32,
    claim: Mutex<ClaimState>,
    /// Highest offset acknowledged per partition of the route's topic.
    high_water: Mutex<HashMap<i32, i64>>,
}

/// How the relay claims next (see [`Relay::claim_batch`]).
#[derive(Debug, Default)]
struct ClaimState {
    /// The last claim came back short: claim within a window of the oldest due rows.
    bounded: bool,
    /// Full claims in a row (in full mode or as the window's fallback) that came back
    /// short: each doubles the wait before the next one ([`FULL_CLAIM_BACKOFF`]).
    short_fulls: u32,
    /// No full claim before this instant; `None`: one may run now.
    full_not_before: Option<Instant>,
}

impl ClaimState {
    fn full_due(&self) -> bool {
        self.full_not_before.is_none_or(|t| Instant::now() >= t)
    }

    /// A full claim found rows: full claims may run again at once.
    fn full_found(&mut self) {
        self.short_fulls = 0;
        self.full_not_before = None;
    }

    /// A full claim came back short (it walked every due row): the next one waits
    /// `poll × 2^(n-1)`, at most `poll ×` [`FULL_CLAIM_BACKOFF`], after the `n`-th in a row.
    fn full_came_back_short(&mut self, poll: Duration) {
        self.short_fulls = self.short_fulls.saturating_add(1);
        let backoff = Backoff {
            base: poll,
            cap: poll.saturating_mul(FULL_CLAIM_BACKOFF),
        };
        self.full_not_before = Instant::now().checked_add(backoff.delay(self.short_fulls));
    }
}

/// The longest wait between full claims that keep coming back short, in poll intervals.
/// A full claim that cannot fill its batch walks every due row (hundreds of
/// milliseconds on a backlog of 100,000, under the service's claim turn): with several
/// relays on few keys, where most heads are leased to the other relays, retrying it
/// every poll interval took most of the claim turn's time.
const FULL_CLAIM_BACKOFF: u32 = 16;

/// Tries of one mark-published before the round fails.
const MARK_ATTEMPTS: u32 = 4;

/// The bounded claim looks at this many due rows per row it may claim.
const CLAIM_WINDOW: u32 = 4;

/// How long a broker probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The wait between failed probes: short, so a relay is producing again within seconds
/// of a broker's return (a probe is one small metadata request).
const PROBE_BACKOFF: Backoff = Backoff {
    base: Duration::from_millis(100),
    cap: Duration::from_secs(2),
};

/// Whole rounds that may fail, with the broker answering probes in between, before
/// the producer is taken to be stuck and replaced.
const STUCK_ROUNDS: u32 = 2;

/// Rows per statement when making rows lost with the broker pending again.
const LOST_BATCH: u32 = 1000;

/// After a broker lost its log: how long after the loss the records a consumer may have
/// skipped were published ([`Relay::redeliver_lost`]).
const LOST_WINDOW: Duration = Duration::from_secs(60);

/// ... and how long they get to be consumed before they are sent again.
const LOST_GRACE: Duration = Duration::from_secs(30);

/// Makes published, unconsumed rows pending again in batches until a batch comes back
/// short; `window()` gives the publish-age bounds (`older_than`, `newer_than`) for each
/// statement. Returns how many rows changed; gives up after repeated failures (the
/// housekeeping sweep remains).
async fn sweep_published<DB: Backend>(
    pool: &Pool<DB>,
    route: &Route,
    stats: &RelayStats,
    window: impl Fn() -> (Duration, Option<Duration>),
) -> u64 {
    let mut total = 0;
    let mut failures = 0;
    loop {
        let (older_than, newer_than) = window();
        match DB::redeliver_stale(
            pool,
            route.table(),
            route.service(),
            older_than,
            newer_than,
            LOST_BATCH,
        )
        .await
        {
            Ok(n) => {
                total += n;
                stats.redelivered_lost.fetch_add(n, Ordering::Relaxed);
                wakeup::wake_local(route.table(), route.service());
                if n < u64::from(LOST_BATCH) {
                    return total;
                }
            }
            Err(e) if failures < 10 => {
                failures += 1;
                tracing::warn!(service = %route.service(), error = %e,
                    "making lost rows pending failed; retrying");
                tokio::time::sleep(PROBE_BACKOFF.delay(failures)).await;
            }
            Err(e) => {
                tracing::error!(service = %route.service(), error = %e,
                    "giving up making lost rows pending; the housekeeping sweep will");
                return total;
            }
        }
    }
}

impl<DB: Backend> Relay<DB> {
    /// A relay for `route`, with its own producer.
    pub fn new(
        pool: Pool<DB>,
        route: Route,
        kafka: &KafkaConfig,
        config: Arc<OutboxConfig>,
    ) -> Result<Self> {
        Ok(Self::with_producers(
            pool,
            route,
            Producers::new(kafka)?,
            config,
        ))
    }

    /// A relay for `route` sharing `producers` with other relays of this process.
    pub(crate) fn with_producers(
        pool: Pool<DB>,
        route: Route,
        producers: Arc<Producers>,
        config: Arc<OutboxConfig>,
    ) -> Self {
        Relay {
            metrics: crate::metrics::RelayMetrics::new(route.service()),
            pool,
            route,
            producers,
            config,
            stats: Arc::new(RelayStats::default()),
            beat: Arc::default(),
            consecutive_failures: AtomicU32::new(0),
            claim: Mutex::new(ClaimState::default()),
            high_water: Mutex::new(HashMap::new()),
        }
    }

    /// The relay's counters.
    pub fn stats(&self) -> Arc<RelayStats> {
        self.stats.clone()
    }
    /// What it last did, for [`crate::RuntimeHandle::health`].
    pub(crate) fn beat(&self) -> Arc<crate::health::Beat> {
        self.beat.clone()
    }

    /// One claim → produce → mark round. Returns what it did; `claimed == 0` means
    /// nothing was due. ([`run`](Self::run) pipelines these rounds: it claims the next
    /// batch while the previous one's delivery reports come back, and probes the broker
    /// before claiming after a failure.)
    pub async fn relay_once(&self) -> Result<RoundReport> {
        match self.claim_batch().await? {
            None => Ok(RoundReport::default()),
            Some(batch) => {
                let batch = self.enqueue(batch).await;
                Ok(self.finish(batch).await?.report)
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
        // full claim would walk the whole backlog to find almost nothing. Full claims
        // that come back short are retried after a growing wait (see [`ClaimState`]).
        let poll = self.config.relay_poll_interval;
        let window = limit.saturating_mul(CLAIM_WINDOW);
        let bounded = DB::BOUNDED_CLAIM && self.claim_state().bounded;
        let started = Instant::now();
        let mut rows = if bounded {
            DB::claim_in(
                &self.pool,
                route.table(),
                route.service(),
                limit,
                ClaimScope::Window(window),
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
        self.metrics.claim.record(started.elapsed().as_secs_f64());
        let full = rows.len() == limit as usize;
        if DB::BOUNDED_CLAIM && !bounded {
            self.stats.full_claims.fetch_add(1, Ordering::Relaxed);
            let mut state = self.claim_state();
            if full {
                state.full_found();
            } else {
                state.full_came_back_short(poll);
            }
        }
        if bounded && !full && self.claim_state().full_due() {
            // The window can hide heads behind a long run of waiting rows (a parked
            // head's successors): a claim past the window finds them. Run again at once
            // while it keeps finding rows. (Past the window only: heads that appeared
            // inside it since, as a mark committed, are the next window's, and finding
            // them here would make every claim walk the backlog.)
            let more = DB::claim_in(
                &self.pool,
                route.table(),
                route.service(),
                limit - rows.len() as u32,
                ClaimScope::PastWindow(window),
                lease,
                token,
            )
            .await
            .map_err(context)?;
            self.stats.full_claims.fetch_add(1, Ordering::Relaxed);
            let mut state = self.claim_state();
            if more.is_empty() {
                state.full_came_back_short(poll);
            } else {
                state.full_found();
            }
            drop(state);
            rows.extend(more);
            rows.sort_by_key(|r| r.id);
        }
        if DB::BOUNDED_CLAIM {
            // Bounded while claims come back short; full again once a claim fills and
            // a full claim is due.
            let mut state = self.claim_state();
            state.bounded = rows.len() < limit as usize || !state.full_due();
        }
        if rows.is_empty() {
            return Ok(None);
        }
        self.metrics.published.increment(rows.len() as u64);
        self.stats.rounds.fetch_add(1, Ordering::Relaxed);
        failpoint!("relay.after_claim");
        let span = tracing::info_span!("outbox.relay.round", service = %route.service(),
            claimed = rows.len(), published = Empty);
        Ok(Some(Claimed { rows, token, span }))
    }

    /// Claims the next batch and, if the broker was `ready` when the round began,
    /// enqueues it at once; otherwise (the broker was failing) returns it unproduced,
    /// for the caller to give back. A batch enqueued while the round before turns out
    /// to fail is not taken back: the next round settles it from its own delivery
    /// reports like any batch (published if acknowledged, given back if not).
    async fn claim_next(&self, ready: bool) -> Result<Option<Next>> {
        Ok(match self.claim_batch().await? {
            None => None,
            Some(batch) if ready => Some(Next::Enqueued(self.enqueue(batch).await)),
            Some(batch) => Some(Next::Held(batch)),
        })
    }

    fn claim_state(&self) -> std::sync::MutexGuard<'_, ClaimState> {
        self.claim.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Enqueues a claimed batch on the current producer, in id order (no waiting for
    /// delivery).
    async fn enqueue(&self, batch: Claimed) -> InFlight {
        let (generation, producer) = self.producers.current();
        let (pending, spans) = self
            .produce(&producer, &batch.rows, &batch.span)
            .instrument(batch.span.clone())
            .await;
        InFlight {
            rows: batch.rows,
            token: batch.token,
            pending,
            producer,
            generation,
            span: batch.span,
            spans,
        }
    }

    /// Waits for a batch's delivery reports, then marks it ([`Relay::mark_round`]), in
    /// the round's span.
    async fn finish(&self, batch: InFlight) -> Result<Finished> {
        let span = batch.span.clone();
        let finished = self.mark_round(batch).instrument(span.clone()).await;
        if let Ok(f) = &finished {
            span.record("published", f.report.published);
        }
        finished
    }

    /// Waits for a batch's delivery reports, then marks it: acknowledged rows published
    /// (fenced by the lease token), permanent failures dead, the rest given back.
    async fn mark_round(&self, batch: InFlight) -> Result<Finished> {
        let route = &self.route;
        let InFlight {
            rows,
            token,
            pending,
            producer,
            generation,
            span: _,
            spans,
        } = batch;
        let outcomes = wait_for_reports(pending).await;
        failpoint!("relay.after_produce");

        let mut acked = Vec::with_capacity(rows.len());
        let mut retry: Vec<i64> = Vec::new();
        let mut retry_error = String::new();
        let mut dead: Vec<(i64, String)> = Vec::new();
        let mut unusable = producer
            .client()
            .fatal_error()
            .map(|(code, reason)| format!("fatal error {code:?}: {reason}"));
        let mut log_went_back = false;
        for ((row, outcome), span) in rows.iter().zip(outcomes).zip(&spans) {
            match outcome {
                Produced::Acked { partition, offset } => {
                    self.metrics.acked(row.created_at);
                    span.record("partition", partition);
                    span.record("offset", offset);
                    acked.push(row.id);
                    log_went_back |= self.acknowledged(partition, offset);
                }
                Produced::Retriable(e) => {
                    retry.push(row.id);
                    retry_error = e;
                }
                Produced::Unusable(e) => {
                    retry.push(row.id);
                    unusable.get_or_insert_with(|| e.clone());
                    retry_error = e;
                }
                Produced::Permanent(e) => dead.push((row.id, e)),
            }
        }
        drop(spans); // the produce spans end with their delivery reports
        if log_went_back {
            self.redeliver_lost();
        }

        let mut finished = Finished {
            report: RoundReport {
                claimed: rows.len(),
                ..Default::default()
            },
            unusable: unusable.map(|why| (generation, why)),
            delivered_none: acked.is_empty() && dead.is_empty() && !rows.is_empty(),
        };
        let report = &mut finished.report;
        if !acked.is_empty() {
            let started = Instant::now();
            let marked = self.mark_published(&acked, token).await?;
            self.metrics.mark.record(started.elapsed().as_secs_f64());
            self.metrics.relayed.increment(marked);
            report.published = marked;
            failpoint!("relay.after_mark");
            self.stats.published.fetch_add(marked, Ordering::Relaxed);
            // Fewer marked than acknowledged: a consumer got there first (the usual case
            // under load), or another relay took the lease over. Neither says anything
            // about the producer.
            let fenced = acked.len() as u64 - marked.min(acked.len() as u64);
            self.stats.fenced.fetch_add(fenced, Ordering::Relaxed);
            self.metrics.fenced.increment(fenced);
            if marked > 0 {
                // Marking unblocks the next event of each of these keys: wake the
                // service's other relays in this process that went idle because every
                // head of key was leased (they would otherwise wait for the poll).
                wakeup::wake_siblings(route.table(), route.service());
            }
        }
        for (id, reason) in &dead {
            let changed = DB::mark_dead_leased(&self.pool, route.table(), *id, token, reason)
                .await
                .map_err(|e| Error::db(format!("marking row {id} of {} dead", route.table()), e))?;
            if changed {
                report.dead += 1;
                self.stats.dead.fetch_add(1, Ordering::Relaxed);
                self.metrics.too_large.increment(1);
                tracing::error!(service = %route.service(), row = id, %reason, "outbox event is dead: the broker refuses it");
            }
        }
        if retry.is_empty() {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        } else {
            // A round that delivered nothing, or a producer that cannot work: the relay
            // stops claiming until a probe passes, so its rows are due again at once for
            // any relay that can deliver them. Some records failing among acknowledged
            // ones (one partition without a leader): those wait out a backoff.
            let delay = if finished.delivered_none || finished.unusable.is_some() {
                Duration::ZERO
            } else {
                let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
                self.config.relay_failure_backoff.delay(failures)
            };
            report.released = self.give_back(&retry, token, delay, &retry_error).await?;
        }
        Ok(finished)
    }

    /// Gives leased rows back, due after `delay`, fenced by the lease token.
    async fn give_back(&self, ids: &[i64], token: i64, delay: Duration, why: &str) -> Result<u64> {
        let route = &self.route;
        let released = DB::release(&self.pool, route.table(), ids, token, delay, why)
            .await
            .map_err(|e| {
                Error::db(
                    format!("giving back {} rows of {}", ids.len(), route.table()),
                    e,
                )
            })?;
        self.stats.released.fetch_add(released, Ordering::Relaxed);
        tracing::warn!(service = %route.service(), rows = ids.len(), ?delay, error = %why,
            "events not delivered are given back; they are due again after the delay");
        Ok(released)
    }

    /// Records an acknowledged offset; `true` if it is below one acknowledged before on
    /// that partition. (A relay's acknowledgements of one partition arrive in offset
    /// order: it produces in order and finishes its batches one after another.)
    fn acknowledged(&self, partition: i32, offset: i64) -> bool {
        let mut high = self.high_water.lock().unwrap_or_else(|p| p.into_inner());
        let seen = high.entry(partition).or_insert(offset);
        let went_back = offset < *seen;
        *seen = offset;
        went_back
    }

    /// Rows lost with a broker's log are published again, on this schedule, in a task
    /// of its own, in bounded batches:
    /// 1. at once: every row published before the loss was seen and not consumed;
    /// 2. once, [`LOST_WINDOW`] + [`LOST_GRACE`] later: rows published in the
    ///    [`LOST_WINDOW`] after the loss and still not consumed. A consumer that was
    ///    paused through the restart resumes at its old position in the new log and
    ///    skips the records before it; this sends those again (a row at most once).
    ///
    /// Anything later is the housekeeping sweep's ([`OutboxConfig::redeliver_after`]).
    fn redeliver_lost(&self) {
        let detected = Instant::now();
        let pool = self.pool.clone();
        let route = self.route.clone();
        let stats = self.stats.clone();
        tracing::warn!(service = %route.service(), topic = %route.topic(),
            "the broker acknowledged an offset below one it acknowledged before: records were \
             lost with its log; publishing the events not yet consumed again");
        tokio::spawn(async move {
            // Times are delays on the database clock, measured from this one's instants.
            let total =
                sweep_published::<DB>(&pool, &route, &stats, || (detected.elapsed(), None)).await;
            tracing::info!(service = %route.service(), rows = total, "rows lost with the broker's log are pending again");
            tokio::time::sleep(LOST_WINDOW + LOST_GRACE).await;
            let skipped = sweep_published::<DB>(&pool, &route, &stats, || {
                let since = detected.elapsed();
                (
                    since.saturating_sub(LOST_WINDOW),
                    Some(since + Duration::from_secs(5)),
                )
            })
            .await;
            if skipped > 0 {
                tracing::warn!(service = %route.service(), rows = skipped,
                    "events published just after the broker lost its log were still not consumed \
                     (a consumer resumed past them?); publishing them again");
            }
        });
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
                    self.metrics.db_retries.increment(1);
                    // Logged as a warning once, by the caller, if every try fails.
                    let delay = self.config.relay_failure_backoff.delay(attempt);
                    tracing::debug!(service = %route.service(), error = %e, ?delay, "marking rows published failed; retrying");
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
    /// [`wait_for_reports`]. Each row has an `outbox.produce` span under `round`, a
    /// child of the trace context the row stores (feature `otel`), whose own context
    /// the record carries; it ends with the row's delivery report.
    async fn produce(
        &self,
        producer: &FutureProducer<ClientLog>,
        rows: &[ClaimedRow],
        round: &Span,
    ) -> (Vec<Pending>, Vec<Span>) {
        let mut pending = Vec::with_capacity(rows.len());
        let mut spans = Vec::with_capacity(rows.len());
        let service = self.route.service().to_string();
        for row in rows {
            let span = tracing::info_span!(parent: round, "outbox.produce",
                service = %self.route.service(), event_type = %row.event_type,
                event_id = %row.event_id, key = row.key.as_deref(), attempt = row.attempts + 1,
                partition = Empty, offset = Empty);
            let stored = row.trace_context.as_deref().and_then(TraceText::parse);
            let (traceparent, tracestate) = trace::continue_in(&span, stored).unzip();
            spans.push(span);
            let envelope = Envelope {
                traceparent,
                tracestate: tracestate.flatten(),
                ..Envelope::of_row(&service, row)
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
                match producer.send_result(record) {
                    Ok(delivery) => break Ok(delivery),
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        record = back;
                        producer.poll(Duration::from_millis(5));
                        tokio::task::yield_now().await;
                    }
                    Err((e, _)) => break Err(e),
                }
            };
            pending.push(enqueued);
        }
        (pending, spans)
    }

    /// Whether the broker answers for this relay's topic: a metadata request on the
    /// current producer's connections, every partition with a leader.
    async fn probe(&self) -> std::result::Result<(), String> {
        let (_, producer) = self.producers.current();
        let topic = self.route.topic().to_string();
        let answer = tokio::task::spawn_blocking(move || {
            let metadata = producer
                .client()
                .fetch_metadata(Some(&topic), PROBE_TIMEOUT)
                .map_err(|e| format!("metadata request failed: {e}"))?;
            let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) else {
                return Err(format!("topic {topic} is not in the broker's metadata"));
            };
            if let Some(e) = t.error() {
                return Err(format!("topic {topic}: {:?}", RDKafkaErrorCode::from(e)));
            }
            if t.partitions().is_empty() || t.partitions().iter().any(|p| p.leader() < 0) {
                return Err(format!("topic {topic} has a partition without a leader"));
            }
            Ok(())
        })
        .await;
        answer.unwrap_or_else(|e| Err(format!("probe task failed: {e}")))
    }

    /// Replaces the producer of `generation` (unless another relay did), logging why.
    fn replace_producer(&self, generation: u64, why: &str) {
        match self.producers.replace(generation) {
            Ok(true) => {
                self.stats.producer_restarts.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(service = %self.route.service(), reason = %why,
                    "the Kafka producer can no longer deliver; replaced it with a new one");
            }
            Ok(false) => {}
            Err(e) => {
                tracing::error!(service = %self.route.service(), error = %e,
                    "the Kafka producer can no longer deliver and a new one could not be created; retrying");
            }
        }
    }

    /// Runs until `shutdown` turns true: relays due rows, sleeps until a wake-up (a
    /// local commit, a NOTIFY on PostgreSQL) or the poll interval once a claim finds
    /// nothing after its last round was marked, and after a failure probes the broker
    /// before it claims again.
    ///
    /// # Cancel safety
    ///
    /// Shutdown is checked between rounds only: a round in progress finishes (its
    /// delivery reports arrive or time out after `message.timeout.ms`, and its rows are
    /// marked or given back), so shutting down loses and duplicates nothing. Dropping
    /// the future instead (cancelling it) is safe too but may leave a round's rows
    /// leased: they are relayed again after the lease, possibly a second time.
    pub async fn run(self, mut shutdown: ShutdownSignal) -> Result<()> {
        let _running = self.beat.running();
        let route = self.route.clone();
        let wakeups = wakeup::Wakeups::new(
            route.table(),
            route.service(),
            self.config.relay_poll_interval,
        );
        let mut error_streak = 0u32;
        // Whether the broker was seen answering since the last failure: only then are
        // rows claimed. Unknown at start.
        let mut ready = false;
        let mut probe_failures = 0u32;
        // The producer that was current when the broker stopped answering: replaced once
        // it answers again. An idempotent producer that lived through an outage can be
        // stuck in a state of the broker's that is gone (a restarted broker that lost its
        // producer ids times its records out instead of failing them).
        let mut outage_generation: Option<u64> = None;
        let mut failed_rounds = 0u32;
        // Pipelining: the batch whose delivery reports are still coming is finished
        // (awaited, then marked) while the next batch is claimed and enqueued. Per-key
        // order holds: until it is marked, every row of the batch in flight is still
        // pending under our lease, so the claim (head of key only) cannot take a
        // successor of any of its keys, and the two batches share no key; a successor
        // claimed after the mark is enqueued after the predecessor's acknowledgement.
        // The next batch is enqueued as soon as it is claimed, not after the batch
        // before is marked: a steady trickle of commits then waits for one claim, not
        // for a claim plus the previous round's delivery reports and mark. At most two
        // batches are leased at a time.
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
            if in_flight.is_none() {
                let (generation, producer) = self.producers.current();
                if let Some((code, reason)) = producer.client().fatal_error() {
                    self.replace_producer(generation, &format!("fatal error {code:?}: {reason}"));
                    ready = false;
                }
            }
            if !ready && in_flight.is_none() {
                // Never claim rows that cannot be produced.
                let probe = tokio::select! {
                    p = self.probe() => p,
                    _ = shutdown.changed() => continue,
                };
                match probe {
                    Ok(()) => {
                        self.beat.broker_ok();
                        if probe_failures > 0 {
                            tracing::info!(service = %route.service(), failed_probes = probe_failures,
                                "the broker answers again; relaying");
                        }
                        if let Some(generation) = outage_generation.take() {
                            self.replace_producer(generation, "it lived through a broker outage");
                        }
                        ready = true;
                        probe_failures = 0;
                    }
                    Err(why) => {
                        self.beat.failing(Side::Broker, &why);
                        probe_failures += 1;
                        outage_generation.get_or_insert(self.producers.current().0);
                        self.stats.failed_probes.fetch_add(1, Ordering::Relaxed);
                        if probe_failures == 1 || probe_failures.is_power_of_two() {
                            tracing::warn!(service = %route.service(), failed_probes = probe_failures, %why,
                                "the broker cannot take events now; claiming nothing until it can");
                        }
                        tokio::select! {
                            _ = tokio::time::sleep(PROBE_BACKOFF.delay(probe_failures)) => {}
                            _ = shutdown.changed() => {}
                        }
                        continue;
                    }
                }
            }
            let woken = wakeups.arm();
            let (finished, claimed) = match in_flight.take() {
                Some(batch) => {
                    let (f, c) = tokio::join!(self.finish(batch), self.claim_next(ready));
                    (Some(f), c)
                }
                None => (None, self.claim_next(ready).await),
            };
            let mut failed = false;
            // Whether the finished round settled rows, unblocking their keys' next events.
            let mut unblocked = false;
            match finished {
                None => {}
                Some(Ok(f)) => {
                    self.beat.database_ok();
                    unblocked = f.report.published > 0 || f.report.dead > 0;
                    if let Some((generation, why)) = &f.unusable {
                        self.beat.failing(Side::Broker, why);
                        self.replace_producer(*generation, why);
                        ready = false;
                        failed_rounds = 0;
                    } else if f.delivered_none {
                        self.beat.failing(
                            Side::Broker,
                            &"the broker acknowledged none of a round's records",
                        );
                        ready = false;
                        failed_rounds += 1;
                        if failed_rounds >= STUCK_ROUNDS {
                            // The broker answers probes, yet nothing was delivered
                            // round after round: the producer is stuck.
                            let (generation, _) = self.producers.current();
                            self.replace_producer(
                                generation,
                                &format!("{failed_rounds} rounds delivered nothing while the broker answered"),
                            );
                            failed_rounds = 0;
                        }
                    } else {
                        self.beat.broker_ok();
                        failed_rounds = 0;
                    }
                }
                Some(Err(e)) => {
                    self.beat.failing(e.side(), &e);
                    failed = true;
                    tracing::warn!(service = %route.service(), error = %e, "relay round failed; its rows not marked are relayed again when their lease ends");
                }
            }
            if claimed.is_ok() {
                self.beat.database_ok();
            }
            match claimed {
                Ok(Some(Next::Enqueued(batch))) => in_flight = Some(batch),
                Ok(Some(Next::Held(batch))) => {
                    // Claimed while the broker was not known to be ready (`ready` only
                    // turns false during a round): give it back untouched.
                    if let Err(e) = self
                        .give_back(
                            &batch.ids(),
                            batch.token,
                            Duration::ZERO,
                            "not produced: the relay's producer was failing",
                        )
                        .await
                    {
                        failed = true;
                        tracing::warn!(service = %route.service(), error = %e, "giving back a claim failed; its lease runs out");
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    self.beat.failing(Side::Database, &e);
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
            self.beat.progress();
            if in_flight.is_some() || !ready {
                continue;
            }
            if unblocked {
                // The claim beside the round ran while the round's rows were still
                // leased, so it could not take their keys' next events: claim once more
                // before going idle. Without this, a backlog on fewer keys than a batch
                // drained one round per poll interval (300 keys: 281 events/s).
                continue;
            }
            // Idle until a wake-up, the poll interval or shutdown.
            self.stats.idles.fetch_add(1, Ordering::Relaxed);
            tokio::select! {
                _ = woken.wait() => {}
                _ = shutdown.changed() => {}
            }
        }
        // Deliver what is already enqueued before returning.
        let (_, producer) = self.producers.current();
        let _ = tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(5))).await;
        Ok(())
    }
}

/// What [`Relay::claim_next`] did with the batch it claimed.
enum Next {
    /// Enqueued on the producer: in flight.
    Enqueued(InFlight),
    /// Claimed while the broker was not known to be ready: not produced.
    Held(Claimed),
}

/// A claimed batch, not yet produced.
struct Claimed {
    rows: Vec<ClaimedRow>,
    token: i64,
    /// The round's span (`outbox.relay.round`), until the batch is marked.
    span: Span,
}

impl Claimed {
    fn ids(&self) -> Vec<i64> {
        self.rows.iter().map(|r| r.id).collect()
    }
}

/// One record's enqueue result: its delivery report to come, or the enqueue error.
type Pending = std::result::Result<DeliveryFuture, KafkaError>;

/// A batch enqueued on a producer whose delivery reports are still coming.
struct InFlight {
    rows: Vec<ClaimedRow>,
    token: i64,
    pending: Vec<Pending>,
    /// The producer it was enqueued on, and that producer's generation.
    producer: FutureProducer<ClientLog>,
    generation: u64,
    /// The round's span.
    span: Span,
    /// Each row's `outbox.produce` span, ended by its delivery report.
    spans: Vec<Span>,
}

/// What finishing a batch found besides its [`RoundReport`].
struct Finished {
    report: RoundReport,
    /// The producer (of this generation) can no longer work, and why.
    unusable: Option<(u64, String)>,
    /// Rows were claimed and the broker took none of them.
    delivered_none: bool,
}

/// Waits for every delivery report of a batch, in order.
async fn wait_for_reports(pending: Vec<Pending>) -> Vec<Produced> {
    let mut outcomes = Vec::with_capacity(pending.len());
    for p in pending {
        outcomes.push(match p {
            Err(e) => classify(&e),
            Ok(delivery) => match delivery.await {
                Ok(Ok(d)) => Produced::Acked {
                    partition: d.partition,
                    offset: d.offset,
                },
                Ok(Err((e, _))) => classify(&e),
                Err(_canceled) => {
                    Produced::Retriable("producer dropped before the delivery report".into())
                }
            },
        });
    }
    outcomes
}

/// The outcome of producing one row.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Produced {
    /// In the log at this partition and offset.
    Acked { partition: i32, offset: i64 },
    /// Not delivered this time (timeouts, brokers down, no leader, unknown topic while
    /// it is being created): give the row back.
    Retriable(String),
    /// The broker will never accept this record: the row is dead.
    Permanent(String),
    /// The producer itself can no longer deliver: give the row back, replace the
    /// producer.
    Unusable(String),
}

/// Sorts a produce error into [`Produced`]'s classes. (librdkafka's fatal-error state is
/// also read from the client after each batch.)
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
        Some(
            RDKafkaErrorCode::Fatal
            | RDKafkaErrorCode::Fenced
            | RDKafkaErrorCode::ProducerFenced
            | RDKafkaErrorCode::InvalidProducerEpoch
            | RDKafkaErrorCode::UnknownProducerId
            | RDKafkaErrorCode::OutOfOrderSequenceNumber
            | RDKafkaErrorCode::InvalidProducerIdMapping,
        ) => Produced::Unusable(format!("the producer can no longer deliver: {e}")),
        _ => Produced::Retriable(format!("produce failed: {e}")),
    }
}

/// A fresh non-zero lease token (0 means "no lease").
pub(crate) fn lease_token() -> i64 {
    loop {
        let t: i64 = rand::random();
        if t != 0 {
            return t;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_classified() {
        let produce = |code| KafkaError::MessageProduction(code);
        assert!(matches!(
            classify(&produce(RDKafkaErrorCode::MessageSizeTooLarge)),
            Produced::Permanent(_)
        ));
        for code in [
            RDKafkaErrorCode::Fatal,
            RDKafkaErrorCode::ProducerFenced,
            RDKafkaErrorCode::InvalidProducerEpoch,
            RDKafkaErrorCode::UnknownProducerId,
            RDKafkaErrorCode::OutOfOrderSequenceNumber,
        ] {
            assert!(
                matches!(classify(&produce(code)), Produced::Unusable(_)),
                "{code:?}"
            );
        }
        for code in [
            RDKafkaErrorCode::MessageTimedOut,
            RDKafkaErrorCode::AllBrokersDown,
            RDKafkaErrorCode::UnknownTopicOrPartition,
            RDKafkaErrorCode::NotLeaderForPartition,
        ] {
            assert!(
                matches!(classify(&produce(code)), Produced::Retriable(_)),
                "{code:?}"
            );
        }
    }
}
