//! Waking relays when rows are committed, without ever signalling inside the business
//! transaction.
//!
//! Two paths, both after commit:
//! - in-process: [`wake_local`] wakes the relays of that table and service running in
//!   this process (a `tokio::sync::Notify`; a wake with no waiter is kept as a permit,
//!   so coalesced wakes cost one claim);
//! - cross-process (PostgreSQL): [`Notifier`] sends `pg_notify('outbox_wakeup',
//!   '<table>:<service>')` on its own connection, at most one round every 5 ms,
//!   coalescing every commit in between into one. The payload is a hint only: the
//!   relay re-reads the table. NOTIFY is never sent inside the business transaction:
//!   PostgreSQL takes a global lock at commit for every transaction that notified,
//!   which would serialise all writers.
//!
//! Relays also poll ([`crate::OutboxConfig::relay_poll_interval`]) so a lost wake-up
//! delays a row, never strands it.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, OnceLock};

use sqlx::Pool;
use tokio::sync::{mpsc, Notify};

use crate::backend::Backend;
use crate::route::{ServiceName, TableName};

/// The shortest time between two NOTIFY rounds of one notifier: bounds the extra
/// statements under load, and costs other processes' relays at most this much latency
/// (relays in this process are woken at once, in process).
const NOTIFY_INTERVAL: std::time::Duration = std::time::Duration::from_millis(5);

/// The LISTEN/NOTIFY channel; payload `<table>:<service>`.
pub(crate) const CHANNEL: &str = "outbox_wakeup";

type Key = (String, String);

fn registry() -> &'static Mutex<HashMap<Key, Arc<Notify>>> {
    static REG: OnceLock<Mutex<HashMap<Key, Arc<Notify>>>> = OnceLock::new();
    REG.get_or_init(Default::default)
}

/// The wake-up of the relays of `(table, service)` in this process.
pub(crate) fn local_waker(table: &TableName, service: &ServiceName) -> Arc<Notify> {
    let mut reg = registry().lock().unwrap_or_else(|p| p.into_inner());
    reg.entry((table.to_string(), service.to_string()))
        .or_insert_with(|| Arc::new(Notify::new()))
        .clone()
}

/// Wakes the relays of `(table, service)` in this process.
pub(crate) fn wake_local(table: &TableName, service: &ServiceName) {
    let n = local_waker(table, service);
    n.notify_waiters();
    n.notify_one();
}

/// The hint payload for a table and service.
pub(crate) fn hint(table: &TableName, service: &ServiceName) -> String {
    format!("{table}:{service}")
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
