//! Noticing the commit of a transaction the outbox did not begin, so the relays wake
//! at once by default instead of at their next poll.
//!
//! [`crate::Outbox::publish`] on the caller's own sqlx transaction cannot see the
//! COMMIT (sqlx has no commit hook). [`crate::OutboxTx`] wakes the relays itself after
//! its commit; for the caller's own transaction, the outbox hands the event id to its
//! [`CommitWatch`], whose task asks the database which of the ids it holds have become
//! visible ([`Backend::committed_events`]: one primary-key lookup per id, all ids in
//! one statement) after 1 ms, then 2, 4, … while none has, at most one check per
//! [`MIN_CHECK_INTERVAL`]. When some have, it wakes the relays as `notify_committed`
//! would (in process, and through the coalesced NOTIFY on PostgreSQL) and forgets those
//! ids. An id not visible after the relays' poll interval is forgotten too: its
//! transaction rolled back, or is still open and the relays' poll finds the row.
//!
//! Why a check and not a NOTIFY in the transaction (a trigger): PostgreSQL serialises
//! the commits of every transaction that notified; measured with 16 writers, it halved
//! their commits per second. The check costs a read of committed index entries, on a
//! connection of the pool, outside every business transaction.
//!
//! A caller that wakes the relays itself ([`crate::Outbox::notify_committed`]) turns
//! the watch off for that outbox: it would only repeat the wake-ups.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use sqlx::Pool;
use tokio::sync::mpsc;
use tokio::time::Instant;
use uuid::Uuid;

use crate::backend::Backend;
use crate::route::{ServiceName, TableName};
use crate::wakeup::{self, Notifier};

/// The shortest time between two checks: bounds the extra statements under load (200
/// a second at most, each for every id published meanwhile).
pub(crate) const MIN_CHECK_INTERVAL: Duration = Duration::from_millis(5);

/// The first check's delay after a publish: most transactions commit within it.
const FIRST_CHECK: Duration = Duration::from_millis(1);

/// Most ids one check asks about; more wait for the next check.
const MAX_IDS_PER_CHECK: usize = 500;

/// Most ids held; beyond it new ones are not watched (the relays' poll finds them).
const MAX_WATCHED: usize = 100_000;

/// The commit watch of one outbox (shared by its clones). Its task starts with the
/// first watched id and ends once the last clone is dropped and the ids it still
/// watches are found or given up.
#[derive(Clone)]
pub(crate) struct CommitWatch {
    sender: Arc<OnceLock<mpsc::UnboundedSender<Uuid>>>,
    /// Turned off by a caller that wakes the relays itself.
    off: Arc<AtomicBool>,
}

/// What the watch's task needs.
struct Target<DB: Backend> {
    pool: Pool<DB>,
    table: TableName,
    service: ServiceName,
    notifier: Notifier,
    /// How long an id is watched: the relays' poll interval.
    give_up: Duration,
}

impl CommitWatch {
    pub(crate) fn new() -> Self {
        CommitWatch {
            sender: Arc::new(OnceLock::new()),
            off: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The caller wakes the relays itself from now on: stop watching.
    pub(crate) fn turn_off(&self) {
        self.off.store(true, Ordering::Relaxed);
    }

    /// Watches for the commit of the transaction that wrote `event_id`.
    pub(crate) fn watch<DB: Backend>(
        &self,
        event_id: Uuid,
        pool: &Pool<DB>,
        table: &TableName,
        service: &ServiceName,
        notifier: &Notifier,
        give_up: Duration,
    ) {
        if self.off.load(Ordering::Relaxed) {
            return;
        }
        let sender = self.sender.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            let target = Target {
                pool: pool.clone(),
                table: table.clone(),
                service: service.clone(),
                notifier: notifier.clone(),
                give_up,
            };
            tokio::spawn(run(target, rx, Arc::clone(&self.off)));
            tx
        });
        let _ = sender.send(event_id);
    }
}

/// The watch's task: until every sender is gone.
async fn run<DB: Backend>(
    target: Target<DB>,
    mut ids: mpsc::UnboundedReceiver<Uuid>,
    off: Arc<AtomicBool>,
) {
    // Watched ids with the time they were handed over, oldest first.
    let mut watched: Vec<(Uuid, Instant)> = Vec::new();
    let mut delay = FIRST_CHECK;
    let mut last_check: Option<Instant> = None;
    // Every outbox clone is gone: the ids still watched are watched to the end (their
    // transactions may commit after the outbox was dropped), then the task ends.
    let mut closed = false;
    loop {
        // Wait for the next check: `delay` after the last one (FIRST_CHECK again after
        // a new id), never sooner than MIN_CHECK_INTERVAL after it. Rate limiting, not
        // synchronisation.
        loop {
            if closed && watched.is_empty() {
                return;
            }
            let due = if watched.is_empty() {
                None
            } else {
                let at = Instant::now() + delay;
                Some(last_check.map_or(at, |last| at.max(last + MIN_CHECK_INTERVAL)))
            };
            let next = async {
                match due {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = next => break,
                id = ids.recv(), if !closed => match id {
                    Some(id) => {
                        if watched.len() < MAX_WATCHED {
                            watched.push((id, Instant::now()));
                        }
                        delay = FIRST_CHECK;
                    }
                    None => closed = true,
                },
            }
        }
        if off.load(Ordering::Relaxed) {
            watched.clear();
            continue;
        }
        last_check = Some(Instant::now());
        let asked: Vec<Uuid> = watched
            .iter()
            .take(MAX_IDS_PER_CHECK)
            .map(|(id, _)| *id)
            .collect();
        match DB::committed_events(&target.pool, &target.table, &target.service, &asked).await {
            Ok(found) if !found.is_empty() => {
                wakeup::wake_local(&target.table, &target.service);
                target
                    .notifier
                    .signal(&target.pool, &target.table, &target.service);
                let found: HashSet<Uuid> = found.into_iter().collect();
                watched.retain(|(id, _)| !found.contains(id));
                delay = FIRST_CHECK;
            }
            Ok(_) => delay = (delay * 2).min(target.give_up),
            Err(e) => {
                // Only latency is at stake: the relays poll.
                tracing::debug!(error = %e, "outbox commit watch: check failed");
                delay = (delay * 2).min(target.give_up);
            }
        }
        let now = Instant::now();
        watched.retain(|(_, since)| now.duration_since(*since) < target.give_up);
    }
}
