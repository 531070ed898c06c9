//! Health: what each relay and consumer of a runtime last did, for readiness probes
//! ([`crate::RuntimeHandle::health`]).
//!
//! Every relay and consumer holds a [`Beat`] and marks on it what happened: a step done
//! (progress), the database or the broker answering, or failing (with the error, until
//! the next answer from the same side). Marks are a relaxed atomic store; a mutex is
//! taken only on the failure path and to clear a problem, so the hot path stays cheap.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

/// Which part of a runtime a [`ComponentHealth`] describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// A relay: claims rows and produces them.
    Relay,
    /// A consumer: settles records in the database.
    Consumer,
}

/// Which side failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// The database.
    Database,
    /// The Kafka broker (or the client talking to it).
    Broker,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Database => "database",
            Side::Broker => "broker",
        })
    }
}

/// A failure that has not been followed by an answer from the same side yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// Which side failed.
    pub side: Side,
    /// How long ago the first failure of this run of failures was.
    pub since: Duration,
    /// The last error.
    pub error: String,
}

/// One relay's or consumer's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ComponentHealth {
    /// The service it works for.
    pub service: String,
    /// Relay or consumer.
    pub role: Role,
    /// Whether its task is still running (false once it returned, failed or panicked).
    pub running: bool,
    /// How long ago it started.
    pub started: Duration,
    /// How long ago it last finished a step: a relay round (also an empty one: it is
    /// caught up), a settled record. `None`: not yet.
    pub last_progress: Option<Duration>,
    /// How long ago the database last answered it.
    pub last_database_ok: Option<Duration>,
    /// How long ago the broker last answered it (a relay: a probe or an acknowledged
    /// record; a consumer: a record received). An idle consumer has no news of the
    /// broker; its client reconnects by itself, and only a client that can no longer
    /// work (replaced by a new one) is a problem.
    pub last_broker_ok: Option<Duration>,
    /// The current problem, if its last contact with one side failed.
    pub problem: Option<Problem>,
}

impl ComponentHealth {
    /// Running, and its last contact with the database and the broker did not fail.
    pub fn is_ready(&self) -> bool {
        self.running && self.problem.is_none()
    }
}

/// The health of a runtime: one entry per relay and consumer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Health {
    /// Relays and consumers, by service, relays first.
    pub components: Vec<ComponentHealth>,
}

impl Health {
    /// Every relay and consumer is running and none has a current problem: the
    /// answer for a readiness probe.
    pub fn is_ready(&self) -> bool {
        self.components.iter().all(ComponentHealth::is_ready)
    }

    /// The components that are not ready, for a probe's message.
    pub fn not_ready(&self) -> impl Iterator<Item = &ComponentHealth> {
        self.components.iter().filter(|c| !c.is_ready())
    }
}

/// What one relay or consumer marks as it works. Times are kept as microseconds since
/// `base` plus one (0 = never).
#[derive(Debug)]
pub(crate) struct Beat {
    base: Instant,
    progress: AtomicU64,
    database_ok: AtomicU64,
    broker_ok: AtomicU64,
    stopped: AtomicBool,
    has_problem: AtomicBool,
    problem: Mutex<Option<(Side, Instant, String)>>,
}

impl Default for Beat {
    fn default() -> Self {
        Beat {
            base: Instant::now(),
            progress: AtomicU64::new(0),
            database_ok: AtomicU64::new(0),
            broker_ok: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
            has_problem: AtomicBool::new(false),
            problem: Mutex::new(None),
        }
    }
}

impl Beat {
    fn now(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_micros())
            .unwrap_or(u64::MAX - 1)
            .saturating_add(1)
    }

    /// A step finished.
    pub(crate) fn progress(&self) {
        self.progress.store(self.now(), Ordering::Relaxed);
    }

    /// The database answered.
    pub(crate) fn database_ok(&self) {
        self.database_ok.store(self.now(), Ordering::Relaxed);
        self.clear(Side::Database);
    }

    /// The broker answered.
    pub(crate) fn broker_ok(&self) {
        self.broker_ok.store(self.now(), Ordering::Relaxed);
        self.clear(Side::Broker);
    }

    /// A call to `side` failed with `error`.
    pub(crate) fn failing(&self, side: Side, error: &dyn fmt::Display) {
        let mut problem = self.problem.lock().unwrap_or_else(|p| p.into_inner());
        let since = match &*problem {
            Some((s, since, _)) if *s == side => *since,
            _ => Instant::now(),
        };
        *problem = Some((side, since, error.to_string()));
        self.has_problem.store(true, Ordering::Release);
    }

    /// What failed on `side` was replaced (a new client), without news from it yet.
    pub(crate) fn recovered(&self, side: Side) {
        self.clear(side);
    }

    fn clear(&self, side: Side) {
        if !self.has_problem.load(Ordering::Acquire) {
            return;
        }
        let mut problem = self.problem.lock().unwrap_or_else(|p| p.into_inner());
        if problem.as_ref().is_some_and(|(s, _, _)| *s == side) {
            *problem = None;
            self.has_problem.store(false, Ordering::Release);
        }
    }

    /// Marks the task ended when dropped: hold it for the task's whole run.
    pub(crate) fn running(self: &Arc<Self>) -> RunningGuard {
        RunningGuard(self.clone())
    }

    fn ago(&self, at: &AtomicU64) -> Option<Duration> {
        match at.load(Ordering::Relaxed) {
            0 => None,
            t => Some(
                self.base
                    .elapsed()
                    .saturating_sub(Duration::from_micros(t - 1)),
            ),
        }
    }

    /// The state now, for `service` and `role`.
    pub(crate) fn snapshot(&self, service: &str, role: Role) -> ComponentHealth {
        let problem = self
            .problem
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|(side, since, error)| Problem {
                side: *side,
                since: since.elapsed(),
                error: error.clone(),
            });
        ComponentHealth {
            service: service.to_owned(),
            role,
            running: !self.stopped.load(Ordering::Relaxed),
            started: self.base.elapsed(),
            last_progress: self.ago(&self.progress),
            last_database_ok: self.ago(&self.database_ok),
            last_broker_ok: self.ago(&self.broker_ok),
            problem,
        }
    }
}

/// Marks its [`Beat`] stopped when dropped (the task returned, failed or panicked).
pub(crate) struct RunningGuard(Arc<Beat>);

impl Drop for RunningGuard {
    fn drop(&mut self) {
        self.0.stopped.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_problem_lasts_until_the_same_side_answers() {
        let beat = Arc::new(Beat::default());
        let guard = beat.running();
        assert!(beat.snapshot("task", Role::Relay).is_ready());
        beat.failing(Side::Broker, &"all brokers down");
        beat.database_ok();
        let s = beat.snapshot("task", Role::Relay);
        assert!(!s.is_ready());
        assert_eq!(s.problem.as_ref().unwrap().side, Side::Broker);
        assert_eq!(s.problem.unwrap().error, "all brokers down");
        assert!(s.last_database_ok.is_some());
        beat.broker_ok();
        beat.progress();
        let s = beat.snapshot("task", Role::Relay);
        assert!(s.is_ready() && s.last_progress.is_some(), "{s:?}");
        drop(guard);
        assert!(!beat.snapshot("task", Role::Relay).running);
    }
}
