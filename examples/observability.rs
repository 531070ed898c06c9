//! Metrics, traces and health: `cargo run --example observability`.
//!
//! The five services of the design (`agent` on the legacy shared table, `memory`,
//! `notification`, `task`, `active-scheduler`), SQLite in a temporary file and
//! librdkafka's in-process mock cluster (or `OUTBOX_KAFKA_BROKERS`), with:
//! - a Prometheus exporter on 127.0.0.1 (`metrics-exporter-prometheus`; port from
//!   `OBSERVABILITY_PORT`, else a free one), scraped over HTTP after some traffic;
//! - OpenTelemetry through `tracing-opentelemetry` (the runtime's feature `otel`) into
//!   an in-memory exporter, printing the trace of one event: the business transaction
//!   that published it, the relay's produce span, the consumer's span and the handler;
//! - `RuntimeHandle::health()`, as a readiness probe would read it.

use std::time::{Duration, Instant};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use outbox_runtime::{
    outbox_event, outbox_handler, outbox_service, Backend, Catalog, HandlerContext, HandlerError,
    OutboxConfig, OutboxRuntime, SqlValue, Sqlite,
};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;

/// The agent service, on the legacy shared table.
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
/// The active scheduler.
#[outbox_service]
pub struct ActiveScheduler;

/// One event per service, all alike: a key and a number.
macro_rules! events {
    ($($service:ident => $event:ident),* $(,)?) => {$(
        /// Something happened in this service.
        #[outbox_event(service = $service, key = id)]
        #[derive(Debug, Clone, Serialize, Deserialize)]
        pub struct $event {
            /// The key.
            pub id: String,
            /// Its number.
            pub n: u32,
        }
    )*};
}

events!(
    Agent => AgentRunRequested,
    Memory => MemoryStored,
    Notification => NotificationRequested,
    Task => TaskCreated,
    ActiveScheduler => JobScheduled,
);

/// Records the event in the consumer's transaction; the notification handler fails the
/// first attempt of every tenth event, so the retry counter moves.
async fn record<DB: Backend>(
    ctx: &mut HandlerContext<DB>,
    id: &str,
    n: u32,
) -> Result<(), HandlerError> {
    if ctx.meta().service == "notification" && n.is_multiple_of(10) && ctx.attempt() == 1 {
        return Err(HandlerError::transient("mail server busy"));
    }
    let meta = ctx.meta().clone();
    ctx.execute(
        "INSERT INTO effects (event_type, event_key) VALUES (?, ?)",
        &[SqlValue::from(meta.event_type), SqlValue::from(id)],
    )
    .await?;
    Ok(())
}

macro_rules! handlers {
    ($($name:ident: $event:ident),* $(,)?) => {$(
        #[outbox_handler]
        async fn $name<DB: Backend>(
            ctx: &mut HandlerContext<DB>,
            e: $event,
        ) -> Result<(), HandlerError> {
            record(ctx, &e.id, e.n).await
        }
    )*};
}

handlers!(
    on_agent_run: AgentRunRequested,
    on_memory: MemoryStored,
    on_notification: NotificationRequested,
    on_task: TaskCreated,
    on_job: JobScheduled,
);

type AnyError = Box<dyn std::error::Error + Send + Sync>;

/// Publishes `$event` through `$outbox` in a business transaction of its own.
macro_rules! publish {
    ($outbox:expr, $event:expr) => {{
        let mut tx = $outbox.begin().await?;
        let id = tx.publish(&$event).await?;
        tx.commit().await?;
        id
    }};
}

/// Events published per service.
const PER_SERVICE: u32 = 40;

#[tokio::main]
async fn main() -> Result<(), AnyError> {
    let started = Instant::now();
    // Traces: every span goes to OpenTelemetry, kept in memory to print one trace.
    let spans = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(spans.clone())
        .build();
    let otel = tracing_opentelemetry::layer().with_tracer(provider.tracer("observability"));
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(otel))?;

    // Metrics: the Prometheus exporter, installed before the runtime starts.
    let port = match std::env::var("OBSERVABILITY_PORT") {
        Ok(p) => p.parse()?,
        Err(_) => std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port(),
    };
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(([127, 0, 0, 1], port))
        .install()?;
    println!("Prometheus exporter on http://127.0.0.1:{port}/metrics");

    let catalog = Catalog::global()?;
    let broker = outbox_examples::broker(&catalog)?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("observability.db").display().to_string();
    let pool =
        sqlx::SqlitePool::connect_with(outbox_runtime::sqlite::sqlite_connect_options(&path))
            .await?;
    let mut conn = pool.acquire().await?;
    Sqlite::execute_portable(
        &mut conn,
        "CREATE TABLE effects (event_type TEXT NOT NULL, event_key TEXT NOT NULL)",
        &[],
    )
    .await?;
    drop(conn);
    let runtime = OutboxRuntime::new(catalog.clone(), pool.clone(), broker.kafka.clone()).config(
        OutboxConfig {
            relay_poll_interval: Duration::from_millis(100),
            metrics_interval: Some(Duration::from_millis(500)),
            ..OutboxConfig::default()
        },
    );
    let outboxes = (
        runtime.outbox::<Agent>()?,
        runtime.outbox::<Memory>()?,
        runtime.outbox::<Notification>()?,
        runtime.outbox::<Task>()?,
        runtime.outbox::<ActiveScheduler>()?,
    );
    let handle = runtime.start().await?;

    // Traffic: each event in a business transaction of its own, inside a span, as a
    // request handler would publish it.
    let mut traced = None;
    for n in 0..PER_SERVICE {
        let id = format!("k{}", n % 8);
        let span = tracing::info_span!("business transaction", n);
        async {
            let e = publish!(outboxes.0, AgentRunRequested { id: id.clone(), n });
            publish!(outboxes.1, MemoryStored { id: id.clone(), n });
            publish!(outboxes.2, NotificationRequested { id: id.clone(), n });
            publish!(outboxes.3, TaskCreated { id: id.clone(), n });
            publish!(outboxes.4, JobScheduled { id, n });
            traced.get_or_insert(e);
            Ok::<_, AnyError>(())
        }
        .instrument(span)
        .await?;
    }
    let total = i64::from(PER_SERVICE) * 5;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut conn = pool.acquire().await?;
        let done: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM effects")
            .fetch_one(&mut *conn)
            .await?;
        if done >= total {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("only {done} of {total} events handled in 60 s").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // One more backlog sample, so the gauges show the empty backlog.
    tokio::time::sleep(Duration::from_millis(700)).await;
    println!(
        "Handled {total} events of 5 services in {:.1} s.",
        started.elapsed().as_secs_f64()
    );

    println!("\nA few lines of the scrape (service=\"notification\"):");
    let scrape = scrape(port).await?;
    for line in scrape.lines().filter(|l| {
        l.contains("service=\"notification\"")
            && [
                "outbox_events_consumed_total",
                "outbox_events_retried_total",
                "outbox_commit_to_handled_seconds{",
                "outbox_pending_rows",
                "outbox_dead_rows",
            ]
            .iter()
            .any(|m| l.starts_with(m))
            && !l.contains("quantile=\"0.5\"")
    }) {
        println!("  {line}");
    }

    println!("\nHealth (readiness: {}):", handle.health().is_ready());
    for c in handle.health().components {
        println!(
            "  {:<17} {:<8} running {}  last progress {:?} ago  problem {:?}",
            c.service,
            format!("{:?}", c.role),
            c.running,
            c.last_progress.unwrap_or_default(),
            c.problem
        );
    }
    handle.shutdown().await?;
    drop(provider);

    // The trace of the first agent event: publish -> relay -> handler.
    let finished = spans.get_finished_spans()?;
    if let Some(event) = traced {
        let id = event.to_string();
        let consume = finished.iter().find(|s| {
            s.name == "outbox.consume"
                && s.attributes
                    .iter()
                    .any(|kv| kv.key.as_str() == "event_id" && kv.value.as_str() == id)
        });
        if let Some(consume) = consume {
            let trace = consume.span_context.trace_id();
            let mut in_trace: Vec<&SpanData> = finished
                .iter()
                .filter(|s| s.span_context.trace_id() == trace)
                .collect();
            in_trace.sort_by_key(|s| s.start_time);
            println!("\nOne trace ({trace}), event {id}:");
            for s in in_trace {
                let parent = in_trace_name(&finished, s);
                println!(
                    "  {:<22} span {}  parent {}",
                    s.name,
                    s.span_context.span_id(),
                    parent
                );
            }
        }
    }
    println!("\nDone in {:.1} s.", started.elapsed().as_secs_f64());
    Ok(())
}

/// The name of `s`'s parent span, if it was recorded.
fn in_trace_name(all: &[SpanData], s: &SpanData) -> String {
    all.iter()
        .find(|p| p.span_context.span_id() == s.parent_span_id)
        .map_or_else(|| "-".to_owned(), |p| p.name.to_string())
}

/// GET /metrics from the exporter, over a plain TCP connection.
async fn scrape(port: u16) -> Result<String, AnyError> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await?;
    Ok(body)
}
