//! Batches: a lane's queued records settled in ONE transaction when all of them take
//! the happy path ([`OutboxConfig::consumer_batch_size`]). The records go through the
//! same steps as alone ([`Consumer::step`]); the [`Batch`] scope answers from what it
//! locked and read up front and writes one consumed mark for all before COMMIT.
//!
//! [`OutboxConfig::consumer_batch_size`]: crate::OutboxConfig::consumer_batch_size

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;

use rdkafka::message::{Message, OwnedMessage};
use sqlx::Transaction;
use tracing::{Instrument, Span};
use uuid::Uuid;

use super::record::Record;
use super::settle::{Located, Scope, Step};
use super::{Consumer, Outcome};
use crate::backend::{Backend, RowState};
use crate::error::{Error, Result};
use crate::event::EventId;
use crate::handler::HandlerContext;
use crate::runtime::ShutdownSignal;

/// How many times a batch retries its up-front lock after waiting for a row another
/// transaction held, before settling its records one by one.
const BATCH_LOCK_ATTEMPTS: usize = 3;

/// What a batch transaction knows besides what it wrote.
pub(super) struct Batch {
    /// The rows' states as locked at the start, by event id; taken by the first record
    /// of each event (a repeat sees what the first one did).
    locked: HashMap<Uuid, RowState>,
    /// Each row the batch locked, by id: its key's nearest older open row when locked
    /// ([`RowState::open_before`]). A row's open predecessors are that row and, if the
    /// batch holds it too, its own, and so on down the chain.
    before: HashMap<i64, Option<i64>>,
    /// Rows handled so far; they are marked consumed in one statement before COMMIT.
    handled: HashSet<i64>,
    /// Events handled so far, so a repeat in the same batch is a duplicate.
    handled_events: HashSet<Uuid>,
    /// What the records' steps log once the batch commits, each in its record's span.
    logs: Vec<(Span, Box<dyn FnOnce() + Send>)>,
}

impl<DB: Backend> Scope<DB> for Batch {
    async fn row(
        &mut self,
        c: &Consumer<DB>,
        tx: &mut Transaction<'static, DB>,
        event_id: EventId,
    ) -> Result<Located> {
        if self.handled_events.contains(&event_id.0) {
            return Ok(Located::Repeat);
        }
        match self.locked.remove(&event_id.0) {
            Some(row) => Ok(Located::Row(row)),
            // A repeat of an event the batch did not handle: ask again.
            None => {
                let located = super::settle::Alone.row(c, tx, event_id).await?;
                if let Located::Row(row) = &located {
                    self.before.insert(row.id, row.open_before);
                }
                Ok(located)
            }
        }
    }

    fn open_predecessor(&self, row: &RowState) -> bool {
        // Down the chain of open predecessors while this batch has handled them: the
        // first one it has not handled is still open. (Ids only go down, so it ends.)
        let mut below = row.open_before;
        while let Some(id) = below {
            match self.before.get(&id) {
                Some(next) if self.handled.contains(&id) => below = *next,
                _ => return true,
            }
        }
        false
    }

    async fn handled(
        &mut self,
        _c: &Consumer<DB>,
        _tx: &mut Transaction<'static, DB>,
        row: &RowState,
        event_id: EventId,
    ) -> Result<()> {
        self.handled.insert(row.id);
        self.handled_events.insert(event_id.0);
        Ok(())
    }

    fn log_after_commit(&mut self, log: impl FnOnce() + Send + 'static) {
        // The steps run in their records' spans.
        self.logs.push((Span::current(), Box::new(log)));
    }
}

impl<DB: Backend> Consumer<DB> {
    /// Settles a lane's queued records: in one transaction when there are several and
    /// all of them take the happy path, otherwise one by one. Returns how many records,
    /// from the front, settled (fewer than all only when shutdown came first).
    pub(super) async fn settle_batch(
        &self,
        msgs: &[OwnedMessage],
        shutdown: &mut ShutdownSignal,
    ) -> usize {
        let records: Vec<_> = msgs
            .iter()
            .map(|m| Record::read(m, self.config.max_payload_bytes, self.route.service()))
            .collect();
        self.metrics.batch_size.record(records.len() as f64);
        if records.len() > 1 {
            match self.process_batch(&records).await {
                Ok(Some(_)) => {
                    self.beat.database_ok();
                    self.beat.progress();
                    return records.len();
                }
                Ok(None) => {}
                Err(e) => {
                    self.beat.failing(crate::health::Side::Database, &e);
                    // One by one next, where each record is retried in place with a
                    // backoff: a record that fails every time then holds up only itself
                    // (and is logged there, where its fate is decided).
                    self.stats.db_retries.fetch_add(1, Ordering::Relaxed);
                    self.metrics.db_retries.increment(1);
                    tracing::debug!(service = %self.route.service(), records = records.len(), error = %e,
                        "a batch failed on the database; settling its records one by one");
                }
            }
        }
        for (i, record) in records.iter().enumerate() {
            if *shutdown.borrow() || self.settle(record, shutdown).await.is_none() {
                return i;
            }
        }
        records.len()
    }

    /// Processes several records of one lane in ONE transaction. `Ok(None)` when a
    /// record needs more than the happy path (a handler failed, a dead letter, a record
    /// with no row) or its rows stayed locked by others: the transaction was rolled
    /// back and the records must be processed one by one.
    ///
    /// Statements per batch: the lock (which also reads the rows and each one's nearest
    /// open predecessor), one consumed mark for all, COMMIT; plus the handlers' own.
    async fn process_batch<M: Message>(
        &self,
        records: &[Record<'_, M>],
    ) -> Result<Option<Vec<Outcome>>> {
        let Some(first) = records.first() else {
            return Ok(Some(Vec::new()));
        };
        let mut event_ids: Vec<_> = records
            .iter()
            .filter_map(|r| r.event_id())
            .map(|id| id.0)
            .collect();
        event_ids.sort_unstable();
        event_ids.dedup();
        let Some((tx, locked)) = self.lock_batch(first, &event_ids).await? else {
            return Ok(None);
        };
        self.run_batch(tx, locked, records).await
    }

    /// Settles inbox rows in `tx`, the subscriber's intake transaction that has just
    /// inserted them (still open): their handlers run and they are marked consumed in
    /// it, and it commits; inbox row and effects in one transaction, as a hand-written
    /// inbox does. `Ok(None)` when a record needs more than the happy path or a row is
    /// held elsewhere: the transaction was rolled back (the inserts too), and intake
    /// writes the rows alone instead.
    pub(crate) async fn settle_in_intake(
        &self,
        mut tx: Transaction<'static, DB>,
        msgs: &[OwnedMessage],
    ) -> Result<Option<usize>> {
        let records: Vec<_> = msgs
            .iter()
            .map(|m| Record::read(m, usize::MAX, self.route.service()))
            .collect();
        let Some(first) = records.first() else {
            tx.commit()
                .await
                .map_err(|e| Error::db("committing the intake of a subscription", e))?;
            return Ok(Some(0));
        };
        let mut event_ids: Vec<_> = records
            .iter()
            .filter_map(|r| r.event_id())
            .map(|id| id.0)
            .collect();
        event_ids.sort_unstable();
        event_ids.dedup();
        let route = &self.route;
        let locked: HashMap<_, _> =
            DB::lock_batch_for_consume(&mut tx, route.table(), route.service(), &event_ids)
                .await
                .map_err(|e| self.db_error("locking the rows of a batch with", first, e))?
                .into_iter()
                .collect();
        if event_ids.iter().any(|id| !locked.contains_key(id)) {
            let _ = tx.rollback().await;
            return Ok(None);
        }
        self.metrics.batch_size.record(records.len() as f64);
        Ok(self
            .run_batch(tx, locked, &records)
            .await?
            .map(|outcomes| outcomes.len()))
    }

    /// The records' steps in `tx`, whose rows `locked` holds; then the consumed mark and
    /// COMMIT (see [`process_batch`](Self::process_batch)).
    async fn run_batch<M: Message>(
        &self,
        tx: Transaction<'static, DB>,
        locked: HashMap<Uuid, RowState>,
        records: &[Record<'_, M>],
    ) -> Result<Option<Vec<Outcome>>> {
        let Some(first) = records.first() else {
            return Ok(Some(Vec::new()));
        };
        let mut work = HandlerContext::begin(tx);
        let before = locked.values().map(|r| (r.id, r.open_before)).collect();
        let mut batch = Batch {
            locked,
            before,
            handled: HashSet::new(),
            handled_events: HashSet::new(),
            logs: Vec::new(),
        };
        let mut outcomes = Vec::with_capacity(records.len());
        for record in records {
            let step = self.step(&mut work, record, &mut batch);
            match step.instrument(record.span.clone()).await? {
                Step::InTx(outcome) => outcomes.push(outcome),
                Step::Abort(_) => {
                    let _ = work.into_transaction().rollback().await;
                    return Ok(None);
                }
            }
        }
        if !batch.handled.is_empty() {
            let ids: Vec<i64> = batch.handled.iter().copied().collect();
            DB::mark_consumed(work.transaction(), self.route.table(), &ids)
                .await
                .map_err(|e| self.db_error("marking consumed the batch starting with", first, e))?;
        }
        self.commit(work, first).await?;
        for (span, log) in batch.logs {
            span.in_scope(log);
        }
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
        first: &Record<'_, M>,
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
}
