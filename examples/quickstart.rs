//! The zero-server quickstart: `cargo run --example quickstart`.
//!
//! SQLite in a temporary file and librdkafka's in-process mock cluster (the real Kafka
//! protocol; the same producer and consumer code as production). Two services publish
//! events in business transactions (one rolled back), relays and consumers run, a
//! handler fails once and succeeds on retry, and a poison event goes dead with its
//! reason. Prints a short report and exits 0.
//!
//! With `DATABASE_URL` (postgres://, mysql:// or sqlite://) and `OUTBOX_KAFKA_BROKERS`
//! set, the same code runs against a real database and broker.

use std::time::{Duration, Instant};

use outbox_runtime::Backoff;
use outbox_runtime::{
    outbox_event, outbox_handler, outbox_service, Backend, Catalog, HandlerContext, HandlerError,
    KafkaConfig, Outbox, OutboxConfig, OutboxRuntime, RawEvent, SqlValue, Status,
};
use serde::{Deserialize, Serialize};

/// Owns tasks.
#[outbox_service]
pub struct Task;

/// Sends notifications.
#[outbox_service]
pub struct Notification;

/// A task was created.
#[outbox_event(service = Task, key = task_id)]
#[derive(Debug, Serialize, Deserialize)]
pub struct TaskCreated {
    pub task_id: String,
    pub title: String,
}

/// Someone must be told something.
#[outbox_event(service = Notification, key = user_id)]
#[derive(Debug, Serialize, Deserialize)]
pub struct NotifyUser {
    pub user_id: String,
    pub message: String,
}

/// Runs on every backend: writes the task's read model in the consumer's transaction.
#[outbox_handler]
async fn on_task_created<DB: Backend>(
    ctx: &mut HandlerContext<DB>,
    event: TaskCreated,
) -> Result<(), HandlerError> {
    ctx.execute(
        "INSERT INTO task_view (task_id, title) VALUES (?, ?)",
        &[
            SqlValue::from(event.task_id.as_str()),
            SqlValue::from(event.title.as_str()),
        ],
    )
    .await?;
    println!(
        "  handled TaskCreated {} ({:?}) on attempt {}",
        event.task_id,
        event.title,
        ctx.attempt()
    );
    Ok(())
}

/// Fails the first time (the mail server is "down"), succeeds on the retry.
#[outbox_handler]
async fn on_notify_user<DB: Backend>(
    ctx: &mut HandlerContext<DB>,
    event: NotifyUser,
) -> Result<(), HandlerError> {
    if ctx.attempt() == 1 {
        println!(
            "  NotifyUser {}: mail server down on attempt 1, will retry",
            event.user_id
        );
        return Err(HandlerError::transient("mail server unavailable"));
    }
    ctx.execute(
        "INSERT INTO sent_mail (user_id, message) VALUES (?, ?)",
        &[
            SqlValue::from(event.user_id.as_str()),
            SqlValue::from(event.message.as_str()),
        ],
    )
    .await?;
    println!(
        "  handled NotifyUser {} on attempt {}",
        event.user_id,
        ctx.attempt()
    );
    Ok(())
}

type AnyError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), AnyError> {
    let started = Instant::now();
    let catalog = Catalog::global()?;
    println!("Route catalog:");
    for r in catalog.routes() {
        println!(
            "  {:<13} table {:<20} topic {:<21} group {}",
            r.service(),
            r.table(),
            r.topic(),
            r.group()
        );
    }

    // A broker: the one named in OUTBOX_KAFKA_BROKERS, or an in-process mock cluster.
    let broker = outbox_examples::broker(&catalog)?;
    let kafka = broker.kafka.clone();

    let url = std::env::var("DATABASE_URL").ok();
    match url.as_deref() {
        Some(u) if u.starts_with("postgres") => {
            run(sqlx::PgPool::connect(u).await?, &catalog, kafka).await?
        }
        Some(u) if u.starts_with("mysql") => {
            run(sqlx::MySqlPool::connect(u).await?, &catalog, kafka).await?
        }
        other => {
            let dir = tempfile::tempdir()?;
            let path = match other {
                Some(u) => u
                    .trim_start_matches("sqlite://")
                    .trim_start_matches("sqlite:")
                    .to_owned(),
                None => dir.path().join("quickstart.db").display().to_string(),
            };
            println!("Database: SQLite at {path}");
            let pool = sqlx::SqlitePool::connect_with(
                outbox_runtime::sqlite::sqlite_connect_options(&path),
            )
            .await?;
            run(pool, &catalog, kafka).await?;
        }
    }
    println!("Done in {:.1} s.", started.elapsed().as_secs_f64());
    Ok(())
}

async fn run<DB: Backend>(
    pool: sqlx::Pool<DB>,
    catalog: &Catalog,
    kafka: KafkaConfig,
) -> Result<(), AnyError> {
    let config = OutboxConfig {
        backoff: Backoff {
            base: Duration::from_millis(500),
            cap: Duration::from_secs(5),
        },
        relay_poll_interval: Duration::from_millis(100),
        ..OutboxConfig::default()
    };
    let runtime = OutboxRuntime::new(catalog.clone(), pool.clone(), kafka)
        .config(config.clone())
        .start()
        .await?;
    {
        let mut conn = pool.acquire().await?;
        for ddl in [
            "CREATE TABLE IF NOT EXISTS task_view (task_id VARCHAR(64) PRIMARY KEY, title TEXT NOT NULL)",
            "CREATE TABLE IF NOT EXISTS sent_mail (user_id VARCHAR(64) NOT NULL, message TEXT NOT NULL)",
        ] {
            DB::execute_portable(&mut conn, ddl, &[]).await?;
        }
    }
    let tasks = Outbox::<Task, DB>::with_config(pool.clone(), catalog, config.clone())?;
    let notifications = Outbox::<Notification, DB>::with_config(pool.clone(), catalog, config)?;

    println!("Publishing:");
    // 1. A business write and its event, in one transaction.
    let mut tx = tasks.begin().await?;
    tx.publish(&TaskCreated {
        task_id: "t-1".into(),
        title: "write the quickstart".into(),
    })
    .await?;
    tx.commit().await?;
    println!("  committed TaskCreated t-1");
    // 2. A transaction that rolls back: its event never exists, so it is never delivered.
    let mut tx = tasks.begin().await?;
    tx.publish(&TaskCreated {
        task_id: "t-2".into(),
        title: "never happened".into(),
    })
    .await?;
    tx.rollback().await?;
    println!("  rolled back TaskCreated t-2");
    // 3. An event whose handler fails once.
    let mut tx = notifications.begin().await?;
    tx.publish(&NotifyUser {
        user_id: "ada".into(),
        message: "your task is ready".into(),
    })
    .await?;
    tx.commit().await?;
    println!("  committed NotifyUser ada");
    // 4. A poison event, as a legacy writer might store it: not valid JSON.
    let mut tx = tasks.begin().await?;
    let poison = tx
        .publish_raw(&RawEvent {
            event_type: "TaskCreated".into(),
            version: 1,
            key: Some("t-3".into()),
            payload: "{oops".into(),
            max_retries: None,
        })
        .await?;
    tx.commit().await?;
    println!("  committed a poison TaskCreated ({poison})");

    println!("Relaying and handling:");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let t = DB::counts(&pool, tasks.route().table(), tasks.route().service()).await?;
        let n = DB::counts(
            &pool,
            notifications.route().table(),
            notifications.route().service(),
        )
        .await?;
        if t.consumed + t.dead == 2 && n.consumed == 1 {
            break;
        }
        if Instant::now() > deadline {
            return Err(
                format!("events did not settle in time: task {t:?}, notification {n:?}").into(),
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    runtime.shutdown().await?;

    println!("Report:");
    for route in [tasks.route(), notifications.route()] {
        let service = route.service().as_str();
        for row in DB::fetch_all(&pool, route.table(), route.service()).await? {
            let status = match row.status {
                Status::Consumed => "consumed".to_owned(),
                Status::Dead => format!("DEAD: {}", row.last_error.unwrap_or_default()),
                other => format!("{other:?}"),
            };
            println!(
                "  {:<12} {:<12} key {:<4} attempts {}  {}",
                service,
                row.event_type,
                row.key.unwrap_or_default(),
                row.attempts,
                status
            );
        }
    }
    Ok(())
}
