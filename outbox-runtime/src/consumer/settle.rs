//! Settlement: what one record does in the database. Inside the transaction: the row
//! lock, the record's checks against its row, the predecessor check, the handler and
//! the consumed mark ([`Consumer::step`]); after a rollback, what could not be done
//! inside it: a skip, a dead letter or a retry ([`Consumer::settle_outside`]).
//!
//! A record is settled either alone, in a transaction of its own ([`Alone`]), or as one
//! of a lane's batch ([`super::batch::Batch`]); both go through the same steps, and the
//! [`Scope`] supplies what differs: where the locked row comes from, how a predecessor
//! is known, when the consumed mark is written.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;

use futures::FutureExt;
use rdkafka::message::Message;
use sqlx::Transaction;
use tracing::Instrument;

use super::record::{Read, Record};
use super::{Consumer, Outcome};
use crate::backend::DeadReason;
use crate::backend::{AttemptsFence, Backend, RowState, Status};
use crate::error::{Error, Result};
use crate::event::EventId;
use crate::handler::{EventMeta, FailureKind, HandlerContext, Succeeded};
use crate::retry::{decide, Decision};
use crate::runtime::ShutdownSignal;

/// What [`Consumer::step`] did with one record inside the transaction.
pub(super) enum Step {
    /// Settled inside the transaction (handled, duplicate, deferred, ...): commit it.
    InTx(Outcome),
    /// Roll the transaction back, then settle the record outside it.
    Abort(Abort),
}

/// What must be recorded after a rollback.
pub(super) enum Abort {
    /// No outbox row to act on.
    Skip(String),
    /// Dead at once, with the reason and its class.
    Dead(RowState, String, DeadReason),
    /// The handler failed or panicked.
    Failed {
        row: RowState,
        kind: FailureKind,
        error: String,
    },
}

/// Where the row of a record's event id was found.
pub(super) enum Located {
    /// Locked in this transaction.
    Row(RowState),
    /// The event was already handled earlier in this transaction (a batch's repeat).
    Repeat,
    /// No such row.
    Missing,
}

/// What differs between settling a record alone and as one of a batch.
pub(super) trait Scope<DB: Backend> {
    /// The row `event_id` names, locked in `tx`.
    async fn row(
        &mut self,
        c: &Consumer<DB>,
        tx: &mut Transaction<'static, DB>,
        event_id: EventId,
    ) -> Result<Located>;

    /// Whether an older row of `row`'s key is still open, from what its lock read
    /// ([`RowState::open_before`]) and what this transaction has handled since.
    fn open_predecessor(&self, row: &RowState) -> bool;

    /// Records that the handler of `row` (event `event_id`) succeeded in `tx`.
    async fn handled(
        &mut self,
        c: &Consumer<DB>,
        tx: &mut Transaction<'static, DB>,
        row: &RowState,
        event_id: EventId,
    ) -> Result<()>;

    /// Logs what a step did in the transaction once it commits: a batch that rolls
    /// back settles its records again one by one, and they log then (once).
    fn log_after_commit(&mut self, log: impl FnOnce() + Send + 'static);
}

/// One record in a transaction of its own.
pub(super) struct Alone;

impl<DB: Backend> Scope<DB> for Alone {
    async fn row(
        &mut self,
        c: &Consumer<DB>,
        tx: &mut Transaction<'static, DB>,
        event_id: EventId,
    ) -> Result<Located> {
        let route = &c.route;
        let row = DB::lock_for_consume(tx, route.table(), route.service(), event_id.0)
            .await
            .map_err(|e| c.event_error("locking", event_id, e))?;
        Ok(row.map_or(Located::Missing, Located::Row))
    }

    fn open_predecessor(&self, row: &RowState) -> bool {
        row.open_before.is_some()
    }

    async fn handled(
        &mut self,
        c: &Consumer<DB>,
        tx: &mut Transaction<'static, DB>,
        row: &RowState,
        event_id: EventId,
    ) -> Result<()> {
        DB::mark_consumed(tx, c.route.table(), &[row.id])
            .await
            .map_err(|e| c.event_error("marking consumed", event_id, e))
    }

    /// Alone, the transaction commits right after the step.
    fn log_after_commit(&mut self, log: impl FnOnce() + Send + 'static) {
        log();
    }
}

impl<DB: Backend> Consumer<DB> {
    /// Processes `record` until its outcome is settled in the database, retrying
    /// database failures in place. `None` if shutdown came first.
    pub(super) async fn settle<M: Message>(
        &self,
        record: &Record<'_, M>,
        shutdown: &mut ShutdownSignal,
    ) -> Option<Outcome> {
        let mut failures = 0u32;
        loop {
            match self.process_record(record).await {
                Ok(outcome) => {
                    self.beat.database_ok();
                    self.beat.progress();
                    return Some(outcome);
                }
                Err(e) => {
                    self.beat.failing(crate::health::Side::Database, &e);
                    failures += 1;
                    self.stats.db_retries.fetch_add(1, Ordering::Relaxed);
                    self.metrics.db_retries.increment(1);
                    let delay = self.config.consumer_failure_backoff.delay(failures);
                    tracing::warn!(service = %self.route.service(), offset = record.msg.offset(), error = %e, ?delay,
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
        let record = Record::read(msg, self.config.max_payload_bytes, self.route.service());
        self.process_record(&record).await
    }

    /// [`process`](Self::process) for a record intake has read, in the record's span.
    pub(super) async fn process_record<M: Message>(
        &self,
        record: &Record<'_, M>,
    ) -> Result<Outcome> {
        self.process_alone(record)
            .instrument(record.span.clone())
            .await
    }

    /// Processes one record in its own transaction.
    async fn process_alone<M: Message>(&self, record: &Record<'_, M>) -> Result<Outcome> {
        if let Read::Skip(reason) = &record.read {
            // Nothing in the database to act on: no transaction.
            return Ok(self.skipped(reason.clone()));
        }
        let tx = DB::begin(&self.pool)
            .await
            .map_err(|e| self.db_error("beginning to consume", record, e))?;
        let mut work = HandlerContext::begin(tx);
        match self.step(&mut work, record, &mut Alone).await? {
            Step::InTx(outcome) => {
                self.commit(work, record).await?;
                self.count(&outcome);
                Ok(outcome)
            }
            Step::Abort(abort) => {
                let _ = work.into_transaction().rollback().await;
                self.settle_outside(abort).await
            }
        }
    }

    /// Does what can be done for `record` inside the transaction `work` holds: the row
    /// lock, the checks of the record against its row, the predecessor check, the
    /// handler and the consumed mark (when, is the `scope`'s to say). Commit on
    /// [`Step::InTx`], roll back on [`Step::Abort`].
    ///
    /// The row is the truth: it was written in the business transaction, and the
    /// handler receives its type, version and payload. A record only says which row is
    /// ready; one that disagrees with its row changes nothing.
    pub(super) async fn step<M: Message, S: Scope<DB>>(
        &self,
        work: &mut HandlerContext<DB>,
        record: &Record<'_, M>,
        scope: &mut S,
    ) -> Result<Step> {
        let route = &self.route;
        let event_id = match &record.read {
            Read::Event { event_id, .. } => *event_id,
            Read::Skip(reason) => return Ok(Step::Abort(Abort::Skip(reason.clone()))),
        };
        let row = match scope.row(self, work.transaction(), event_id).await? {
            Located::Row(row) => row,
            Located::Repeat => return Ok(Step::InTx(Outcome::Duplicate)),
            Located::Missing => {
                let reason = format!(
                    "no outbox row for event {event_id} in service {} (table {})",
                    route.service(),
                    route.table()
                );
                return Ok(Step::Abort(Abort::Skip(reason)));
            }
        };
        record.record_row(&row);
        if let Some(differs) = record.disagreement(&row, route) {
            let reason = format!(
                "record at {} names event {event_id} but {differs}; the stored event is \
                 left as it is",
                record.at()
            );
            return Ok(Step::InTx(Outcome::Mismatch { reason }));
        }
        if row.status.is_terminal() {
            return Ok(Step::InTx(Outcome::Duplicate));
        }
        if row.status == Status::Pending && !row.due {
            // Waiting out a retry backoff or a deferral: a stale copy of its record. The
            // relay publishes the row again when it is due.
            return Ok(Step::InTx(Outcome::NotDue));
        }
        if let Some(key) = &row.key {
            if scope.open_predecessor(&row) {
                self.defer(work.transaction(), scope, key, &row, event_id)
                    .await?;
                return Ok(Step::InTx(Outcome::Deferred));
            }
        }
        // An event this consumer cannot handle yet is not the event's fault: during a
        // rolling deploy an instance of the older release gets events of the newer one.
        // It waits for an instance that can, and is dead only after the grace period.
        let version = u32::try_from(row.version).unwrap_or(0);
        let handler = match self.handlers.get(&row.event_type) {
            Some(handler) if version <= handler.version => handler,
            Some(handler) => {
                let reason = format!(
                    "event `{}` has schema version {}, newer than the handler's {}",
                    row.event_type, row.version, handler.version
                );
                let why = (reason, DeadReason::Version);
                return self
                    .wait(work.transaction(), scope, row, event_id, why)
                    .await;
            }
            None if self.catalog.event(&row.event_type).is_none() => {
                let reason = format!("unknown event type `{}`", row.event_type);
                let why = (reason, DeadReason::UnknownType);
                return self
                    .wait(work.transaction(), scope, row, event_id, why)
                    .await;
            }
            None => {
                let reason = format!(
                    "no handler for event type `{}` in service `{}`",
                    row.event_type,
                    route.service()
                );
                let why = (reason, DeadReason::NoHandler);
                return self
                    .wait(work.transaction(), scope, row, event_id, why)
                    .await;
            }
        };

        work.set_meta(EventMeta {
            event_id,
            event_type: row.event_type.clone(),
            version,
            service: route.service().to_string(),
            key: row.key.clone(),
            attempt: u32::try_from(row.attempts).unwrap_or(0) + 1,
        });
        let started = std::time::Instant::now();
        let result = AssertUnwindSafe((handler.call)(work, version, row.payload.as_bytes()))
            .catch_unwind()
            .await;
        let (kind, error) = match result {
            Ok(Ok(())) => {
                work.succeeded.push(Succeeded {
                    event_type: row.event_type.clone(),
                    created_at: row.created_at,
                    published_at: row.published_at,
                    took: started.elapsed(),
                });
                scope
                    .handled(self, work.transaction(), &row, event_id)
                    .await?;
                return Ok(Step::InTx(Outcome::Handled));
            }
            Ok(Err(e)) => (e.kind(), e.message().to_owned()),
            Err(panic) => (
                FailureKind::Transient,
                format!("handler panicked: {}", panic_message(&panic)),
            ),
        };
        Ok(Step::Abort(Abort::Failed { row, kind, error }))
    }

    /// Sends `row`, which this consumer cannot handle yet, back to wait for one that can
    /// ([`crate::OutboxConfig::waiting`]); dead (after the rollback) once it has waited
    /// out the grace period.
    async fn wait(
        &self,
        tx: &mut Transaction<'static, DB>,
        scope: &mut impl Scope<DB>,
        row: RowState,
        event_id: EventId,
        (reason, class): (String, DeadReason),
    ) -> Result<Step> {
        let waiting = self.config.waiting;
        if waiting.grace.is_zero() {
            return Ok(Step::Abort(Abort::Dead(row, reason, class)));
        }
        let note = " (waiting for a consumer that can handle it; see OutboxConfig::waiting)";
        let text = crate::backend::error_with_note(&reason, note);
        let waits = DB::wait(
            tx,
            self.route.table(),
            row.id,
            waiting.recheck,
            waiting.grace,
            &text,
        )
        .await
        .map_err(|e| self.event_error("sending back to wait", event_id, e))?;
        if !waits {
            let reason = crate::backend::error_with_note(
                &reason,
                &format!(
                    " [no consumer handled it within the grace period of {:?}]",
                    waiting.grace
                ),
            );
            return Ok(Step::Abort(Abort::Dead(row, reason, class)));
        }
        self.metrics.waiting(class);
        let (service, id, first) = (self.route.service().clone(), row.id, !row.waiting);
        scope.log_after_commit(move || {
            if first {
                tracing::warn!(%service, row = id, %event_id, %reason, recheck = ?waiting.recheck, grace = ?waiting.grace,
                    "this consumer cannot handle the event yet (an older release during a deploy?); it waits for one that can");
            } else {
                tracing::debug!(%service, row = id, %event_id, %reason, "event still waits");
            }
        });
        Ok(Step::InTx(Outcome::Waiting { reason: text }))
    }

    /// Sends `row` back to pending behind its open predecessor, and publishes again
    /// those of its predecessors that were published but never reached this consumer.
    async fn defer(
        &self,
        tx: &mut Transaction<'static, DB>,
        scope: &mut impl Scope<DB>,
        key: &str,
        row: &RowState,
        event_id: EventId,
    ) -> Result<()> {
        let route = &self.route;
        let republished = DB::defer(
            tx,
            route.table(),
            route.service(),
            key,
            row.id,
            self.config.backoff.base,
        )
        .await
        .map_err(|e| self.event_error("deferring", event_id, e))?;
        if republished > 0 {
            self.stats
                .republished
                .fetch_add(republished, Ordering::Relaxed);
            let (service, id) = (route.service().clone(), row.id);
            scope.log_after_commit(move || {
                tracing::warn!(%service, row = id, predecessors = republished,
                    "published predecessors of this event never reached the consumer before it \
                     (lost with the broker?); publishing them again");
            });
        }
        Ok(())
    }

    /// Commits the transaction of one record or one batch (`record` names it in errors).
    pub(super) async fn commit<M: Message>(
        &self,
        mut work: HandlerContext<DB>,
        record: &Record<'_, M>,
    ) -> Result<()> {
        failpoint!("consumer.before_commit");
        let succeeded = std::mem::take(&mut work.succeeded);
        work.into_transaction()
            .commit()
            .await
            .map_err(|e| self.db_error("committing the handler of", record, e))?;
        failpoint!("consumer.after_commit");
        for h in &succeeded {
            self.metrics
                .handled(&h.event_type, h.created_at, h.published_at, h.took);
        }
        Ok(())
    }

    /// Counts an outcome settled inside a committed transaction.
    pub(super) fn count(&self, outcome: &Outcome) {
        let counter = match outcome {
            Outcome::Handled => {
                self.metrics.consumed.increment(1);
                &self.stats.handled
            }
            Outcome::Duplicate => {
                self.metrics.duplicates.increment(1);
                &self.stats.duplicates
            }
            Outcome::Deferred => {
                self.metrics.deferred.increment(1);
                &self.stats.deferred
            }
            Outcome::NotDue => &self.stats.not_due,
            Outcome::Waiting { .. } => &self.stats.waiting,
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
            Abort::Dead(row, reason, class) => self.dead(&row, reason, class).await,
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
                    if let Some(t) = self.metrics.of_type(&row.event_type) {
                        t.retried.increment(1);
                    }
                    tracing::info!(service = %route.service(), row = row.id, ?delay, %error, "handler failed; retrying later");
                    Ok(Outcome::Retry { error })
                }
                Decision::Dead => {
                    let reason = crate::backend::error_with_note(
                        &error,
                        &format!(" [retries exhausted: failed {} times]", row.attempts + 1),
                    );
                    self.dead(&row, reason, DeadReason::Exhausted).await
                }
            },
            Abort::Failed { row, error, kind } => {
                let class = match kind {
                    FailureKind::Undecodable => DeadReason::Undecodable,
                    _ => DeadReason::Permanent,
                };
                self.dead(&row, error, class).await
            }
        }
    }

    /// A database error while acting on the record at `record`.
    pub(super) fn db_error<M: Message>(
        &self,
        what: &str,
        record: &Record<'_, M>,
        e: sqlx::Error,
    ) -> Error {
        Error::db(
            format!(
                "{what} the record at {} of service {} in {}",
                record.at(),
                self.route.service(),
                self.route.table()
            ),
            e,
        )
    }

    /// A database error while acting on the row of `event_id`.
    pub(super) fn event_error(&self, what: &str, event_id: EventId, e: sqlx::Error) -> Error {
        Error::db(
            format!(
                "{what} event {event_id} of service {} in {}",
                self.route.service(),
                self.route.table()
            ),
            e,
        )
    }

    async fn dead(&self, row: &RowState, reason: String, class: DeadReason) -> Result<Outcome> {
        let route = &self.route;
        DB::mark_dead(
            &self.pool,
            route.table(),
            row.id,
            AttemptsFence(row.attempts),
            &reason,
            class,
        )
        .await
        .map_err(|e| {
            Error::db(
                format!("marking row {} of {} dead", row.id, route.table()),
                e,
            )
        })?;
        self.stats.dead.fetch_add(1, Ordering::Relaxed);
        self.metrics.dead(class);
        tracing::error!(service = %route.service(), row = row.id, %reason, "outbox event is dead");
        Ok(Outcome::Dead { reason })
    }

    fn skipped(&self, reason: String) -> Outcome {
        self.stats.skipped.fetch_add(1, Ordering::Relaxed);
        self.metrics.skipped.increment(1);
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
