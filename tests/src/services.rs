//! The five services of the design, as the integration tests use them.
//!
//! `agent` is the compatibility route: it keeps the legacy shared table
//! `outbox_events`, and `memory` still shares it mid-migration, so the tests also prove
//! that services sharing one table never touch each other's rows. The other three have
//! tables of their own.
//!
//! Every handler is generic over the backend (one handler serves PostgreSQL, MariaDB
//! and SQLite), records its effect in the `effects` table inside the handler's
//! transaction, and follows the [`Script`] the event carries, so a test can make a
//! handler fail, panic or refuse.

use outbox_runtime::{
    outbox_event, outbox_handler, outbox_service, Backend, HandlerContext, HandlerError, SqlValue,
};
use serde::{Deserialize, Serialize};
use tracing::Instrument;

/// The agent service: compatibility route over the legacy shared table.
#[outbox_service(table = "outbox_events")]
pub struct Agent;

/// The memory service: still on the legacy shared table during its migration.
#[outbox_service(table = "outbox_events")]
pub struct Memory;

/// The notification service.
#[outbox_service]
pub struct Notification;

/// The task service.
#[outbox_service]
pub struct Task;

/// The active-scheduler service.
#[outbox_service]
pub struct ActiveScheduler;

/// What a handler does with an event, decided by the test that published it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Script {
    /// Fail (transiently) on the first N attempts, then succeed.
    #[serde(default)]
    pub fail_times: u32,
    /// Fail (transiently) on every attempt.
    #[serde(default)]
    pub always_fail: bool,
    /// Panic on the first N attempts.
    #[serde(default)]
    pub panic_times: u32,
    /// Fail permanently (dead at once).
    #[serde(default)]
    pub permanent: bool,
    /// Fail permanently until a row for the event's key exists in the `fixes` table
    /// (`CREATE TABLE fixes (event_key .., hits ..)`): an operator's fix, then a replay.
    #[serde(default)]
    pub needs_fix: bool,
}

impl Script {
    /// Succeeds, fails or panics as scripted for this attempt (1-based).
    pub fn apply(&self, attempt: u32) -> Result<(), HandlerError> {
        if attempt <= self.panic_times {
            panic!("scripted panic on attempt {attempt}");
        }
        if self.permanent {
            return Err(HandlerError::permanent("scripted permanent failure"));
        }
        if self.always_fail {
            return Err(HandlerError::transient(format!(
                "scripted failure on attempt {attempt} (always)"
            )));
        }
        if attempt <= self.fail_times {
            return Err(HandlerError::transient(format!(
                "scripted failure on attempt {attempt}"
            )));
        }
        Ok(())
    }
}

/// An agent run was requested.
#[outbox_event(service = Agent, key = run_id)]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentRunRequested {
    /// The run.
    pub run_id: String,
    /// Position in the key's sequence.
    pub seq: u32,
    /// What the handler does.
    #[serde(default)]
    pub script: Script,
}

/// A memory was stored.
#[outbox_event(service = Memory, key = memory_id, public)]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemoryStored {
    /// The memory.
    pub memory_id: String,
    /// Position in the key's sequence.
    pub seq: u32,
    /// What the handler does.
    #[serde(default)]
    pub script: Script,
}

/// A notification must be sent.
#[outbox_event(service = Notification, key = user_id, public)]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NotificationRequested {
    /// The recipient.
    pub user_id: String,
    /// Position in the key's sequence.
    pub seq: u32,
    /// What the handler does.
    #[serde(default)]
    pub script: Script,
}

/// A task was created.
#[outbox_event(service = Task, key = task_id, public)]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskCreated {
    /// The task.
    pub task_id: String,
    /// Position in the key's sequence.
    pub seq: u32,
    /// What the handler does.
    #[serde(default)]
    pub script: Script,
}

/// A job was scheduled (the string form of `service`, which names `ActiveScheduler`).
#[outbox_event(service = "active-scheduler", key = job_id, name = "scheduler.JobScheduled", version = 2)]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobScheduled {
    /// The job.
    pub job_id: String,
    /// Position in the key's sequence.
    pub seq: u32,
    /// What the handler does.
    #[serde(default)]
    pub script: Script,
}

/// The DDL of the `effects` table for a backend.
pub fn effects_ddl(backend: &str) -> &'static str {
    match backend {
        "postgres" => {
            "CREATE TABLE IF NOT EXISTS effects (id BIGSERIAL PRIMARY KEY, event_id TEXT NOT NULL, \
             service TEXT NOT NULL, event_type TEXT NOT NULL, event_key TEXT NOT NULL, seq BIGINT NOT NULL, \
             attempt BIGINT NOT NULL)"
        }
        "mysql" => {
            "CREATE TABLE IF NOT EXISTS effects (id BIGINT AUTO_INCREMENT PRIMARY KEY, event_id VARCHAR(64) NOT NULL, \
             service VARCHAR(64) NOT NULL, event_type VARCHAR(128) NOT NULL, event_key VARCHAR(255) NOT NULL, \
             seq BIGINT NOT NULL, attempt BIGINT NOT NULL)"
        }
        _ => {
            "CREATE TABLE IF NOT EXISTS effects (id INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT NOT NULL, \
             service TEXT NOT NULL, event_type TEXT NOT NULL, event_key TEXT NOT NULL, seq INTEGER NOT NULL, \
             attempt INTEGER NOT NULL)"
        }
    }
}

/// Runs the script, then records the effect in the handler's transaction (also used
/// by the subscriptions' handlers, `tests/subscriptions.rs`).
pub async fn record<DB: Backend>(
    ctx: &mut HandlerContext<DB>,
    key: &str,
    seq: u32,
    script: &Script,
) -> Result<(), HandlerError> {
    script.apply(ctx.attempt())?;
    if script.needs_fix {
        let fixed = ctx
            .execute(
                "UPDATE fixes SET hits = hits + 1 WHERE event_key = ?",
                &[SqlValue::from(key)],
            )
            .await?;
        if fixed == 0 {
            return Err(HandlerError::permanent(format!("no fix for {key} yet")));
        }
    }
    let meta = ctx.meta().clone();
    // A span of the handler's own, under the consumer's (tests/tracing.rs).
    ctx.execute(
        "INSERT INTO effects (event_id, service, event_type, event_key, seq, attempt) VALUES (?, ?, ?, ?, ?, ?)",
        &[
            SqlValue::from(meta.event_id.to_string()),
            SqlValue::from(meta.service),
            SqlValue::from(meta.event_type),
            SqlValue::from(key),
            SqlValue::from(seq),
            SqlValue::from(meta.attempt),
        ],
    )
    .instrument(tracing::info_span!("handler.effect"))
    .await?;
    Ok(())
}

#[outbox_handler]
async fn on_agent_run_requested<DB: Backend>(
    ctx: &mut HandlerContext<DB>,
    event: AgentRunRequested,
) -> Result<(), HandlerError> {
    record(ctx, &event.run_id, event.seq, &event.script).await
}

#[outbox_handler]
async fn on_memory_stored<DB: Backend>(
    ctx: &mut HandlerContext<DB>,
    event: MemoryStored,
) -> Result<(), HandlerError> {
    record(ctx, &event.memory_id, event.seq, &event.script).await
}

#[outbox_handler]
async fn on_notification_requested<DB: Backend>(
    ctx: &mut HandlerContext<DB>,
    event: NotificationRequested,
) -> Result<(), HandlerError> {
    record(ctx, &event.user_id, event.seq, &event.script).await
}

#[outbox_handler]
async fn on_task_created<DB: Backend>(
    ctx: &mut HandlerContext<DB>,
    event: TaskCreated,
) -> Result<(), HandlerError> {
    record(ctx, &event.task_id, event.seq, &event.script).await
}

#[outbox_handler(service = ActiveScheduler)]
async fn on_job_scheduled<DB: Backend>(
    ctx: &mut HandlerContext<DB>,
    event: JobScheduled,
) -> Result<(), HandlerError> {
    record(ctx, &event.job_id, event.seq, &event.script).await
}
