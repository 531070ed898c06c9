//! The five services, split: each with its own database, reacting to each other's
//! events through subscriptions. `cargo run --example services-split`.
//!
//! Each service runs on a SQLite file of its own (as five processes on five databases
//! would), with one runtime each; they share only the broker (`OUTBOX_KAFKA_BROKERS`,
//! or an in-process mock cluster). The chain:
//!
//! 1. `task` creates tasks and publishes `TaskCreated` (public);
//! 2. `active-scheduler` subscribes to it, schedules the task and publishes
//!    `TaskScheduled` (public) in the same transaction as its own write;
//! 3. `agent` subscribes to `TaskScheduled`, runs, publishes `AgentRunFinished`
//!    (public);
//! 4. `memory` subscribes to `AgentRunFinished` and stores what was learnt;
//! 5. `notification` subscribes to `TaskCreated` and `AgentRunFinished` and mails the
//!    user (its mail server fails once: the inbox retries it, in key order).
//!
//! Each subscriber's inbox lives in its own database; the report at the end is read
//! from the five databases alone.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use outbox_runtime::{
    outbox_event, outbox_handler, outbox_service, Backoff, Catalog, HandlerContext, HandlerError,
    Outbox, OutboxConfig, OutboxRuntime, SqlValue, Sqlite,
};
use serde::{Deserialize, Serialize};
use sqlx::SqlitePool;

/// The agent service (its table keeps the legacy name).
#[outbox_service(table = "outbox_events")]
pub struct Agent;
/// The memory service.
#[outbox_service]
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

/// A task was created (task's, public: other services may subscribe).
#[outbox_event(service = Task, key = task_id, public)]
#[derive(Debug, Serialize, Deserialize)]
pub struct TaskCreated {
    pub task_id: String,
    pub title: String,
    pub owner: String,
}

/// A task was scheduled (active-scheduler's, public).
#[outbox_event(service = ActiveScheduler, key = task_id, public)]
#[derive(Debug, Serialize, Deserialize)]
pub struct TaskScheduled {
    pub task_id: String,
    pub owner: String,
    pub slot: u32,
}

/// An agent run finished (agent's, public).
#[outbox_event(service = Agent, key = task_id, public)]
#[derive(Debug, Serialize, Deserialize)]
pub struct AgentRunFinished {
    pub task_id: String,
    pub owner: String,
    pub summary: String,
}

/// The outboxes handlers publish through (one per publishing subscriber).
static SCHEDULER: OnceLock<Outbox<ActiveScheduler, Sqlite>> = OnceLock::new();
static AGENT: OnceLock<Outbox<Agent, Sqlite>> = OnceLock::new();

fn missing(what: &str) -> HandlerError {
    HandlerError::permanent(format!("{what} is not set up"))
}

/// active-scheduler: books a slot and announces it, in one transaction.
#[outbox_handler(subscriber = ActiveScheduler)]
async fn schedule_task(
    ctx: &mut HandlerContext<Sqlite>,
    event: TaskCreated,
) -> Result<(), HandlerError> {
    let slot =
        sqlx::query_scalar::<_, i64>("INSERT INTO slots (task_id) VALUES (?) RETURNING slot")
            .bind(&event.task_id)
            .fetch_one(ctx.conn())
            .await?;
    let outbox = SCHEDULER
        .get()
        .ok_or_else(|| missing("the scheduler's outbox"))?;
    outbox
        .publish(
            ctx.conn(),
            &TaskScheduled {
                task_id: event.task_id,
                owner: event.owner,
                slot: u32::try_from(slot).unwrap_or(0),
            },
        )
        .await
        .map_err(HandlerError::transient)?;
    Ok(())
}

/// agent: runs on the task and reports, in one transaction.
#[outbox_handler(subscriber = Agent)]
async fn run_agent(
    ctx: &mut HandlerContext<Sqlite>,
    event: TaskScheduled,
) -> Result<(), HandlerError> {
    let summary = format!("ran {} in slot {}", event.task_id, event.slot);
    ctx.execute(
        "INSERT INTO runs (task_id, summary) VALUES (?, ?)",
        &[
            SqlValue::from(event.task_id.as_str()),
            SqlValue::from(summary.as_str()),
        ],
    )
    .await?;
    let outbox = AGENT.get().ok_or_else(|| missing("the agent's outbox"))?;
    outbox
        .publish(
            ctx.conn(),
            &AgentRunFinished {
                task_id: event.task_id,
                owner: event.owner,
                summary,
            },
        )
        .await
        .map_err(HandlerError::transient)?;
    Ok(())
}

/// memory: keeps what the agent learnt.
#[outbox_handler(subscriber = Memory)]
async fn remember(
    ctx: &mut HandlerContext<Sqlite>,
    event: AgentRunFinished,
) -> Result<(), HandlerError> {
    ctx.execute(
        "INSERT INTO memories (task_id, text) VALUES (?, ?)",
        &[
            SqlValue::from(event.task_id.as_str()),
            SqlValue::from(event.summary.as_str()),
        ],
    )
    .await?;
    Ok(())
}

/// notification: mails the owner when a task is created (the mail server is down on
/// the first attempt: the inbox retries, the task's later mail waits behind it).
#[outbox_handler(subscriber = Notification)]
async fn mail_task_created(
    ctx: &mut HandlerContext<Sqlite>,
    event: TaskCreated,
) -> Result<(), HandlerError> {
    if ctx.attempt() == 1 && event.task_id == "t-1" {
        return Err(HandlerError::transient("mail server unavailable"));
    }
    mail(
        ctx,
        &event.owner,
        &format!("task {} created", event.task_id),
    )
    .await
}

/// notification: mails the owner when the agent finished.
#[outbox_handler(subscriber = Notification)]
async fn mail_run_finished(
    ctx: &mut HandlerContext<Sqlite>,
    event: AgentRunFinished,
) -> Result<(), HandlerError> {
    mail(
        ctx,
        &event.owner,
        &format!("{}: {}", event.task_id, event.summary),
    )
    .await
}

async fn mail(ctx: &mut HandlerContext<Sqlite>, to: &str, text: &str) -> Result<(), HandlerError> {
    ctx.execute(
        "INSERT INTO outgoing_mail (recipient, text) VALUES (?, ?)",
        &[SqlValue::from(to), SqlValue::from(text)],
    )
    .await?;
    Ok(())
}

type AnyError = Box<dyn std::error::Error + Send + Sync>;

/// Each service's own tables.
const TABLES: &[(&str, &str)] = &[
    ("task", "CREATE TABLE tasks (task_id TEXT PRIMARY KEY, title TEXT NOT NULL)"),
    (
        "active-scheduler",
        "CREATE TABLE slots (slot INTEGER PRIMARY KEY AUTOINCREMENT, task_id TEXT NOT NULL)",
    ),
    ("agent", "CREATE TABLE runs (task_id TEXT NOT NULL, summary TEXT NOT NULL)"),
    ("memory", "CREATE TABLE memories (task_id TEXT NOT NULL, text TEXT NOT NULL)"),
    (
        "notification",
        "CREATE TABLE outgoing_mail (id INTEGER PRIMARY KEY AUTOINCREMENT, recipient TEXT NOT NULL, text TEXT NOT NULL)",
    ),
];

#[tokio::main]
async fn main() -> Result<(), AnyError> {
    let started = Instant::now();
    let catalog = Catalog::global()?;
    println!("Subscriptions (publisher topic -> subscriber's group and inbox):");
    for s in catalog.subscriptions() {
        let types: Vec<&str> = s.handlers.iter().map(|h| h.event_type.as_str()).collect();
        println!(
            "  {:<16} <- {:<16} topic {:<22} group {:<44} inbox {} ({})",
            s.subscriber,
            s.publisher,
            s.topic,
            s.group,
            s.inbox,
            types.join(", ")
        );
    }
    let broker = outbox_examples::broker(&catalog)?;
    let dir = tempfile::tempdir()?;
    let config = OutboxConfig {
        backoff: Backoff {
            base: Duration::from_millis(300),
            cap: Duration::from_secs(2),
        },
        relay_poll_interval: Duration::from_millis(100),
        ..OutboxConfig::default()
    };

    // One database and one runtime per service.
    let mut pools = Vec::new();
    let mut runtimes = Vec::new();
    for (service, ddl) in TABLES {
        let path = dir.path().join(format!("{service}.db"));
        let pool = SqlitePool::connect_with(outbox_runtime::sqlite::sqlite_connect_options(
            &path.display().to_string(),
        ))
        .await?;
        sqlx::query(ddl).execute(&pool).await?;
        let runtime = OutboxRuntime::new(catalog.clone(), pool.clone(), broker.kafka.clone())
            .config(config.clone())
            .services([*service])
            .start()
            .await?;
        match *service {
            "active-scheduler" => {
                let _ = SCHEDULER.set(Outbox::with_config(pool.clone(), &catalog, config.clone())?);
            }
            "agent" => {
                let _ = AGENT.set(Outbox::with_config(pool.clone(), &catalog, config.clone())?);
            }
            _ => {}
        }
        println!("  {service:<16} database {}", path.display());
        pools.push((*service, pool));
        runtimes.push(runtime);
    }
    let pool_of = |name: &str| {
        pools
            .iter()
            .find(|(s, _)| *s == name)
            .map(|(_, p)| p.clone())
            .ok_or_else(|| format!("no database for {name}"))
    };

    println!("Publishing (task's database):");
    let tasks = Outbox::<Task, Sqlite>::with_config(pool_of("task")?, &catalog, config)?;
    for (id, title, owner) in [
        ("t-1", "write the split example", "ada"),
        ("t-2", "review it", "grace"),
        ("t-3", "ship it", "ada"),
    ] {
        let mut tx = tasks.begin().await?;
        sqlx::query("INSERT INTO tasks (task_id, title) VALUES (?, ?)")
            .bind(id)
            .bind(title)
            .execute(&mut **tx.transaction())
            .await?;
        tx.publish(&TaskCreated {
            task_id: id.into(),
            title: title.into(),
            owner: owner.into(),
        })
        .await?;
        tx.commit().await?;
        println!("  committed TaskCreated {id}");
    }

    // Done when every service's database shows its part (3 tasks: 3 slots, 3 runs,
    // 3 memories, 6 mails).
    let count = |name: &'static str, table: &'static str| {
        let pool = pool_of(name);
        async move {
            let pool = pool?;
            let n: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table}"))
                .fetch_one(&pool)
                .await?;
            Ok::<i64, AnyError>(n)
        }
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let done = count("active-scheduler", "slots").await? == 3
            && count("agent", "runs").await? == 3
            && count("memory", "memories").await? == 3
            && count("notification", "outgoing_mail").await? == 6;
        if done {
            break;
        }
        if Instant::now() > deadline {
            return Err("the services did not finish within 60 s".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    println!("Each database, read on its own:");
    for (service, table) in [
        ("active-scheduler", "slots"),
        ("agent", "runs"),
        ("memory", "memories"),
        ("notification", "outgoing_mail"),
    ] {
        let pool = pool_of(service)?;
        let inbox = catalog
            .subscriptions_of(service)
            .next()
            .map(|s| s.inbox.clone())
            .unwrap_or_default();
        let (consumed, retried): (i64, i64) = sqlx::query_as(&format!(
            "SELECT COUNT(*), COALESCE(SUM(CASE WHEN attempts > 0 THEN 1 ELSE 0 END), 0) \
             FROM {inbox} WHERE status = 2"
        ))
        .fetch_one(&pool)
        .await?;
        println!(
            "  {service:<16} {} rows in {table}; inbox {inbox}: {consumed} events handled, \
             {retried} after a retry",
            count(service, table).await?
        );
    }
    let mails: Vec<(String, String)> =
        sqlx::query_as("SELECT recipient, text FROM outgoing_mail ORDER BY id")
            .fetch_all(&pool_of("notification")?)
            .await?;
    println!("Mail sent by notification, in order:");
    for (to, text) in mails {
        println!("  to {to}: {text}");
    }
    for runtime in runtimes {
        runtime.shutdown().await?;
    }
    println!("Done in {:.1} s.", started.elapsed().as_secs_f64());
    Ok(())
}
