//! The five services of the design on PostgreSQL: `cargo run --example services`.
//!
//! `agent` keeps the legacy shared table `outbox_events` (the compatibility route);
//! `memory`, `notification`, `task` and `active-scheduler` have their own tables,
//! topics and consumer groups. Each service publishes in business transactions, one
//! relay and one consumer per service run in this process, and handlers (plain async
//! fns on PostgreSQL) write their effects in the consumer's transaction.
//!
//! `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/test`) and
//! `OUTBOX_KAFKA_BROKERS` (default: an in-process mock cluster) choose where it runs.
//! Tables are created in a fresh schema-less database named `outbox_example_<pid>`,
//! dropped at the end.

use std::time::{Duration, Instant};

use outbox_runtime::{
    outbox_event, outbox_handler, outbox_service, Catalog, HandlerContext, HandlerError, Outbox,
    OutboxRuntime, Postgres, PublishOptions,
};
use serde::{Deserialize, Serialize};
use sqlx::{Connection, PgConnection, PgPool};

/// The agent service, on the legacy shared table (compatibility route).
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

#[outbox_event(service = Agent, key = run_id)]
#[derive(Debug, Serialize, Deserialize)]
pub struct AgentRunRequested {
    pub run_id: String,
    pub prompt: String,
}

#[outbox_event(service = Memory, key = memory_id)]
#[derive(Debug, Serialize, Deserialize)]
pub struct MemoryStored {
    pub memory_id: String,
    pub text: String,
}

#[outbox_event(service = Notification, key = user_id)]
#[derive(Debug, Serialize, Deserialize)]
pub struct NotificationRequested {
    pub user_id: String,
    pub message: String,
}

/// An enum event: one type name, variants in the payload. Enums carry no `key = field`;
/// their key is given at publish time.
#[outbox_event(service = Task)]
#[derive(Debug, Serialize, Deserialize)]
pub enum TaskEvent {
    Created { task_id: String, title: String },
    Completed { task_id: String },
}

#[outbox_event(service = ActiveScheduler, key = job_id, version = 2)]
#[derive(Debug, Serialize, Deserialize)]
pub struct JobScheduled {
    pub job_id: String,
    pub cron: String,
}

async fn log(ctx: &mut HandlerContext<Postgres>, line: String) -> Result<(), HandlerError> {
    sqlx::query("INSERT INTO activity (service, line) VALUES ($1, $2)")
        .bind(ctx.meta().service.clone())
        .bind(&line)
        .execute(ctx.conn())
        .await?;
    println!("  [{}] {line}", ctx.meta().service);
    Ok(())
}

#[outbox_handler]
async fn on_agent_run(
    ctx: &mut HandlerContext<Postgres>,
    e: AgentRunRequested,
) -> Result<(), HandlerError> {
    log(
        ctx,
        format!("agent run {} started: {:?}", e.run_id, e.prompt),
    )
    .await
}

#[outbox_handler]
async fn on_memory_stored(
    ctx: &mut HandlerContext<Postgres>,
    e: MemoryStored,
) -> Result<(), HandlerError> {
    log(
        ctx,
        format!("memory {} indexed ({} chars)", e.memory_id, e.text.len()),
    )
    .await
}

#[outbox_handler]
async fn on_notification(
    ctx: &mut HandlerContext<Postgres>,
    e: NotificationRequested,
) -> Result<(), HandlerError> {
    log(ctx, format!("sent to {}: {}", e.user_id, e.message)).await
}

#[outbox_handler]
async fn on_task_event(
    ctx: &mut HandlerContext<Postgres>,
    e: TaskEvent,
) -> Result<(), HandlerError> {
    let line = match e {
        TaskEvent::Created { task_id, title } => format!("task {task_id} created: {title}"),
        TaskEvent::Completed { task_id } => format!("task {task_id} completed"),
    };
    log(ctx, line).await
}

#[outbox_handler]
async fn on_job_scheduled(
    ctx: &mut HandlerContext<Postgres>,
    e: JobScheduled,
) -> Result<(), HandlerError> {
    log(ctx, format!("job {} scheduled at {}", e.job_id, e.cron)).await
}

type AnyError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), AnyError> {
    let catalog = Catalog::global()?;
    println!(
        "{}",
        serde_json::to_string_pretty(&catalog.to_json()["services"])?
    );

    let admin_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let db = format!("outbox_example_{}", std::process::id());
    let mut admin = PgConnection::connect(&admin_url).await?;
    sqlx::query(&format!("CREATE DATABASE {db}"))
        .execute(&mut admin)
        .await?;
    let url = match admin_url.rsplit_once('/') {
        Some((base, _)) => format!("{base}/{db}"),
        None => return Err("DATABASE_URL has no database part".into()),
    };
    let result = run(&url, &catalog).await;
    sqlx::query(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .execute(&mut admin)
        .await?;
    result
}

async fn run(url: &str, catalog: &Catalog) -> Result<(), AnyError> {
    let pool = PgPool::connect(url).await?;
    sqlx::query("CREATE TABLE activity (id BIGSERIAL PRIMARY KEY, service TEXT, line TEXT)")
        .execute(&pool)
        .await?;

    let broker = outbox_examples::broker(catalog)?;
    let kafka = broker.kafka.clone();
    let runtime = OutboxRuntime::new(catalog.clone(), pool.clone(), kafka)
        .start()
        .await?;

    let agent = Outbox::<Agent, Postgres>::new(pool.clone(), catalog)?;
    let memory = Outbox::<Memory, Postgres>::new(pool.clone(), catalog)?;
    let notification = Outbox::<Notification, Postgres>::new(pool.clone(), catalog)?;
    let task = Outbox::<Task, Postgres>::new(pool.clone(), catalog)?;
    let scheduler = Outbox::<ActiveScheduler, Postgres>::new(pool.clone(), catalog)?;

    println!("Handling:");
    let mut tx = task.begin().await?;
    let keyed = || PublishOptions {
        key: Some("t-7".into()),
        ..PublishOptions::default()
    };
    tx.publish_with(
        &TaskEvent::Created {
            task_id: "t-7".into(),
            title: "ship the outbox".into(),
        },
        keyed(),
    )
    .await?;
    tx.publish_with(
        &TaskEvent::Completed {
            task_id: "t-7".into(),
        },
        keyed(),
    )
    .await?;
    tx.commit().await?;

    let mut tx = agent.begin().await?;
    tx.publish(&AgentRunRequested {
        run_id: "r-1".into(),
        prompt: "summarise t-7".into(),
    })
    .await?;
    tx.commit().await?;

    let mut tx = memory.begin().await?;
    tx.publish(&MemoryStored {
        memory_id: "m-1".into(),
        text: "t-7 shipped on a Monday".into(),
    })
    .await?;
    tx.commit().await?;

    let mut tx = notification.begin().await?;
    tx.publish(&NotificationRequested {
        user_id: "ada".into(),
        message: "t-7 is done".into(),
    })
    .await?;
    tx.rollback().await?; // changed our mind: never delivered

    let mut tx = scheduler.begin().await?;
    tx.publish(&JobScheduled {
        job_id: "digest".into(),
        cron: "0 9 * * MON".into(),
    })
    .await?;
    tx.commit().await?;

    let deadline = Instant::now() + Duration::from_secs(30);
    while sqlx::query_scalar::<_, i64>("SELECT count(*) FROM activity")
        .fetch_one(&pool)
        .await?
        < 5
    {
        if Instant::now() > deadline {
            return Err("events were not handled in time".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    runtime.shutdown().await?;

    println!("Outbox rows by service (pending/published/consumed/dead):");
    for r in catalog.routes() {
        let c =
            <Postgres as outbox_runtime::Backend>::counts(&pool, r.table(), r.service()).await?;
        println!(
            "  {:<17} {:<29} {}/{}/{}/{}",
            r.service(),
            r.table(),
            c.pending,
            c.published,
            c.consumed,
            c.dead
        );
    }
    pool.close().await;
    Ok(())
}
