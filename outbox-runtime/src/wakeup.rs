//! Waking relays when rows are committed, without ever signalling inside the business
//! transaction.
//!
//! Two paths, both after commit:
//! - in-process: [`wake_local`] wakes the relays of that table and service running in
//!   this process (a `tokio::sync::Notify`; relays listen from before each claim, so a
//!   wake during a claim is not lost, and none is stored for later: one commit, one
//!   claim);
//! - cross-process (PostgreSQL): [`Notifier`] sends `pg_notify('outbox_wakeup',
//!   '<table>:<service>:<origin>')` on its own connection (the sending process ignores
//!   its own hints), at most one round every 5 ms,
//!   coalescing every commit in between into one. The payload is a hint only: the
//!   relay re-reads the table. NOTIFY is never sent inside the business transaction:
//!   PostgreSQL takes a global lock at commit for every transaction that notified,
//!   which would serialise all writers.
//!
//! Relays also poll ([`crate::OutboxConfig::relay_poll_interval`]) so a lost wake-up
//! delays a row, never strands it.

use std::collections::{BTreeSet, HashMap};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use sqlx::Pool;
use tokio::sync::futures::Notified;
use tokio::sync::{mpsc, Notify};

use crate::backend::Backend;
use crate::route::{ServiceName, TableName};

/// The shortest time between two NOTIFY rounds of one notifier: bounds the extra
/// statements under load, and costs other processes' relays at most this much latency
/// (relays in this process are woken at once, in process).
const NOTIFY_INTERVAL: Duration = Duration::from_millis(5);

/// The LISTEN/NOTIFY channel; payload `<table>:<service>:<origin>`.
pub(crate) const CHANNEL: &str = "outbox_wakeup";

type Key = (String, String);

/// The wake-up of the relays of one `(table, service)` in this process, and how many
/// relays listen to it.
#[derive(Default)]
struct Waker {
    notify: Arc<Notify>,
    relays: Arc<AtomicUsize>,
}

fn registry() -> &'static Mutex<HashMap<Key, Waker>> {
    static REG: OnceLock<Mutex<HashMap<Key, Waker>>> = OnceLock::new();
    REG.get_or_init(Default::default)
}

fn with_waker<T>(table: &TableName, service: &ServiceName, f: impl FnOnce(&Waker) -> T) -> T {
    let mut reg = registry().lock().unwrap_or_else(|p| p.into_inner());
    f(reg
        .entry((table.to_string(), service.to_string()))
        .or_default())
}

/// The wake-up of the relays of `(table, service)` in this process.
pub(crate) fn local_waker(table: &TableName, service: &ServiceName) -> Arc<Notify> {
    with_waker(table, service, |w| Arc::clone(&w.notify))
}

/// After a relay marked rows published (which unblocks their keys' next events): wakes
/// the other relays of `(table, service)` in this process, if there are others. A lone
/// relay claims again by itself after a round that settled rows (`Relay::run`); waking
/// it too cost it a second empty claim per round.
pub(crate) fn wake_siblings(table: &TableName, service: &ServiceName) {
    let (notify, relays) = with_waker(table, service, |w| {
        (Arc::clone(&w.notify), w.relays.load(Ordering::Relaxed))
    });
    if relays > 1 {
        notify.notify_waiters();
    }
}

/// Wakes the relays of `(table, service)` in this process: every relay listening
/// ([`Wakeups::arm`], which each does before it claims, so one mid-claim claims again).
/// No permit is stored for a relay that is not listening: it is about to arm and claim
/// anyway, and a stored permit cost every commit a second, empty claim (with the echo below
/// and [`wake_siblings`]' self-wake: 2.0–2.2 idle claims per commit on PostgreSQL).
pub(crate) fn wake_local(table: &TableName, service: &ServiceName) {
    local_waker(table, service).notify_waiters();
}

/// This process's mark on its hints, so its listener ignores the NOTIFYs it sent
/// itself: their relays were already woken in process, and the echo cost each commit
/// another empty claim.
fn origin() -> &'static str {
    static ORIGIN: OnceLock<String> = OnceLock::new();
    ORIGIN.get_or_init(|| format!("{:016x}", rand::random::<u64>()))
}

/// What wakes an idle relay of `(table, service)`: a commit in this process or a NOTIFY
/// relayed by the runtime's listener (both through [`local_waker`]), or the poll
/// interval, whichever comes first.
pub(crate) struct Wakeups {
    notify: Arc<Notify>,
    /// The count of relays listening here, which this one is part of until dropped.
    relays: Arc<AtomicUsize>,
    poll: Duration,
}

impl Drop for Wakeups {
    fn drop(&mut self) {
        self.relays.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Wakeups {
    /// The wake-ups of a relay of `(table, service)`, polling every `poll`.
    pub(crate) fn new(table: &TableName, service: &ServiceName, poll: Duration) -> Self {
        let (notify, relays) = with_waker(table, service, |w| {
            w.relays.fetch_add(1, Ordering::Relaxed);
            (Arc::clone(&w.notify), Arc::clone(&w.relays))
        });
        Wakeups {
            notify,
            relays,
            poll,
        }
    }

    /// Starts listening, before the relay claims: a wake-up that comes while the claim
    /// runs (a sibling relay marked rows and unblocked their keys) is then not lost.
    pub(crate) fn arm(&self) -> Armed<'_> {
        let mut notified = Box::pin(self.notify.notified());
        notified.as_mut().enable();
        Armed {
            notified,
            poll: self.poll,
        }
    }
}

/// A wake-up listened for since [`Wakeups::arm`].
pub(crate) struct Armed<'a> {
    notified: Pin<Box<Notified<'a>>>,
    poll: Duration,
}

impl Armed<'_> {
    /// Waits for the wake-up, or the poll interval.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: nothing is consumed but the wake-up itself.
    pub(crate) async fn wait(mut self) {
        tokio::select! {
            _ = tokio::time::sleep(self.poll) => {}
            _ = self.notified.as_mut() => {}
        }
    }
}

/// Wakes the relays of `(table, service)` in this process and, where the database has
/// NOTIFY, in every other process now (an operator's replay from another binary).
/// Best effort: relays poll anyway.
pub(crate) async fn wake_everywhere<DB: Backend>(
    pool: &Pool<DB>,
    table: &TableName,
    service: &ServiceName,
) {
    wake_local(table, service);
    if DB::HAS_NOTIFY {
        if let Err(e) = DB::notify(pool, CHANNEL, &hint(table, service)).await {
            tracing::debug!(error = %e, "outbox wake-up NOTIFY failed");
        }
    }
}

/// The hint payload for a table and service: `<table>:<service>:<origin>`. (A process
/// of a release before the origin tag reads it as naming no relay of its own: during a
/// rolling deploy, its relays fall back to their poll interval for other processes'
/// commits.)
pub(crate) fn hint(table: &TableName, service: &ServiceName) -> String {
    format!("{table}:{service}:{}", origin())
}

/// Wakes the relays in this process that a hint payload names, if there are any (a
/// hint for relays that do not run here creates nothing, and this process's own hints
/// are ignored). A payload without an origin (`<table>:<service>`) is another
/// process's.
fn wake_hinted(payload: &str) {
    let mut parts = payload.splitn(3, ':');
    let (Some(table), Some(service)) = (parts.next(), parts.next()) else {
        return;
    };
    if parts.next() == Some(origin()) {
        return;
    }
    let reg = registry().lock().unwrap_or_else(|p| p.into_inner());
    if let Some(w) = reg.get(&(table.to_owned(), service.to_owned())) {
        w.notify.notify_waiters();
    }
}

/// Until `shutdown`: LISTENs for wake-up hints on one connection of its own (outside
/// `pool`, so it never takes a connection from the application), and wakes the relays
/// of this process they name. Reconnects with a backoff when the connection fails;
/// meanwhile relays poll. A no-op on databases without LISTEN.
///
/// # Cancel safety
///
/// Holds no state but the connection: stopping it only costs wake-up latency.
pub(crate) async fn listen_for_wakeups<DB: Backend>(
    pool: &Pool<DB>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    use futures::StreamExt;
    const BACKOFF: crate::retry::Backoff = crate::retry::Backoff {
        base: std::time::Duration::from_millis(500),
        cap: std::time::Duration::from_secs(30),
    };
    let mut failures = 0u32;
    while !*shutdown.borrow() {
        let stream = match DB::listen(pool, CHANNEL).await {
            Ok(Some(stream)) => Some(stream),
            Ok(None) => return,
            Err(e) => {
                failures += 1;
                tracing::warn!(error = %e, "LISTEN for relay wake-ups failed; relays poll meanwhile");
                None
            }
        };
        if let Some(mut stream) = stream {
            failures = 0;
            loop {
                tokio::select! {
                    _ = shutdown.changed() => return,
                    hint = stream.next() => match hint {
                        Some(Ok(h)) => wake_hinted(&h),
                        Some(Err(e)) => {
                            tracing::debug!(error = %e, "LISTEN connection failed; it reconnects");
                        }
                        None => break,
                    },
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(BACKOFF.delay(failures.max(1))) => {}
            _ = shutdown.changed() => {}
        }
    }
}

/// Sends coalesced cross-process wake-ups after commits (PostgreSQL only; a no-op
/// elsewhere). Its task ends when the last clone is dropped.
#[derive(Clone)]
pub(crate) struct Notifier {
    sender: Arc<OnceLock<mpsc::UnboundedSender<String>>>,
}

impl Notifier {
    pub(crate) fn new() -> Self {
        Notifier {
            sender: Arc::new(OnceLock::new()),
        }
    }

    /// Queues a wake-up for `(table, service)`; it is sent soon, on its own connection.
    /// Hints queued while a NOTIFY is in flight are merged into the next round.
    pub(crate) fn signal<DB: Backend>(
        &self,
        pool: &Pool<DB>,
        table: &TableName,
        service: &ServiceName,
    ) {
        if !DB::HAS_NOTIFY {
            return;
        }
        let sender = self.sender.get_or_init(|| {
            let (tx, mut rx) = mpsc::unbounded_channel::<String>();
            let pool = pool.clone();
            tokio::spawn(async move {
                while let Some(first) = rx.recv().await {
                    let mut batch = BTreeSet::from([first]);
                    while let Ok(more) = rx.try_recv() {
                        batch.insert(more);
                    }
                    for h in &batch {
                        if let Err(e) = DB::notify(&pool, CHANNEL, h).await {
                            // Relays poll as a fallback; a lost hint only costs latency.
                            tracing::debug!(error = %e, "outbox wake-up NOTIFY failed");
                        }
                    }
                    // At most one round per interval: under load, every commit in the
                    // interval shares one NOTIFY instead of each paying a statement.
                    // (Rate limiting, not synchronisation.)
                    tokio::time::sleep(NOTIFY_INTERVAL).await;
                }
            });
            tx
        });
        let _ = sender.send(hint(table, service));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_process_ignores_its_own_hints_and_takes_others() {
        let table = TableName::new("hint_test_outbox").unwrap();
        let service = ServiceName::new("hint-test").unwrap();
        let waker = local_waker(&table, &service);
        let woken = |payload: String| {
            let waker = Arc::clone(&waker);
            async move {
                let mut n = Box::pin(waker.notified());
                n.as_mut().enable();
                wake_hinted(&payload);
                tokio::time::timeout(Duration::from_millis(50), n)
                    .await
                    .is_ok()
            }
        };
        assert!(!woken(hint(&table, &service)).await);
        assert!(woken(format!("{table}:{service}:0000000000000000")).await);
        assert!(woken(format!("{table}:{service}")).await);
        assert!(!woken(format!("{table}:other")).await);
    }
}
