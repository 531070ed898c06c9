//! One trace from the business transaction to the handler (feature `otel`), on every
//! backend, over librdkafka's mock cluster: an event published inside a `tracing` span
//! stores that span's W3C context in its row; the relay's `outbox.produce` span is its
//! child and sends its own context in `ce_traceparent`; the consumer's `outbox.consume`
//! span is the child of that, and the handler's own span (`handler.effect`, in
//! `services.rs`) runs inside it. Checked with an in-memory span exporter behind a
//! `tracing_opentelemetry` layer, and no global propagator.

use std::sync::OnceLock;
use std::time::Duration;

use opentelemetry::trace::{SpanId, TraceContextExt, TraceId, TracerProvider as _};
use opentelemetry::Value;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use outbox_runtime::backend::NewRow;
use outbox_runtime::{Backend, EventId, Outbox};
use outbox_tests::broker::TestBroker;
use outbox_tests::db::TestDatabase;
use outbox_tests::e2e::{
    eventually, prepare, publish_notification, runtime_of, test_config, TestBackend,
};
use outbox_tests::services::{Notification, Script};
use sqlx::Pool;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

/// The exporter every span of this process goes to. Installed once, globally (the
/// runtime's tasks run on other threads); each test looks only at its own trace id, so
/// tests sharing a process (plain `cargo test`) do not see each other's spans.
fn exporter() -> &'static InMemorySpanExporter {
    static EXPORTER: OnceLock<(InMemorySpanExporter, SdkTracerProvider)> = OnceLock::new();
    &EXPORTER
        .get_or_init(|| {
            let exporter = InMemorySpanExporter::default();
            let provider = SdkTracerProvider::builder()
                .with_simple_exporter(exporter.clone())
                .build();
            let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("outbox-tests"));
            tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer))
                .expect("no other subscriber in this test binary");
            (exporter, provider)
        })
        .0
}

/// The finished spans of `trace`.
fn spans_of(trace: TraceId) -> Vec<SpanData> {
    exporter()
        .get_finished_spans()
        .expect("the in-memory exporter")
        .into_iter()
        .filter(|s| s.span_context.trace_id() == trace)
        .collect()
}

fn named<'a>(spans: &'a [SpanData], name: &str) -> &'a SpanData {
    let found: Vec<_> = spans.iter().filter(|s| s.name == name).collect();
    assert_eq!(found.len(), 1, "one `{name}` span in {:#?}", names(spans));
    found[0]
}

fn names(spans: &[SpanData]) -> Vec<(String, SpanId, SpanId)> {
    spans
        .iter()
        .map(|s| {
            (
                s.name.to_string(),
                s.span_context.span_id(),
                s.parent_span_id,
            )
        })
        .collect()
}

fn attribute<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| &kv.value)
}

/// An attribute as text (numbers may be recorded as either).
fn text(span: &SpanData, key: &str) -> Option<String> {
    attribute(span, key).map(|v| v.as_str().into_owned())
}

async fn one_trace_from_publish_to_handler<T: TestDatabase>() {
    let exporter = exporter();
    let db = T::create().await;
    let pool: Pool<T::DB> = db.pool().clone();
    let broker = TestBroker::mock().await;
    let catalog = prepare(&pool, &broker).await;
    let config = test_config();
    let outbox =
        Outbox::<Notification, T::DB>::with_config(pool.clone(), &catalog, config.clone()).unwrap();

    // The business transaction, in a span of its own.
    let business = tracing::info_span!("business.signup");
    let trace = business.context().span().span_context().trace_id();
    assert_ne!(
        trace,
        TraceId::INVALID,
        "the OpenTelemetry layer is installed"
    );
    let id = publish_notification(&outbox, "ada", Script::default())
        .instrument(business.clone())
        .await;
    let business_id = business.context().span().span_context().span_id();
    drop(business);

    // The row keeps the business span's context.
    let row = T::DB::fetch(&pool, &"notification_outbox".parse().unwrap(), id.0)
        .await
        .unwrap()
        .expect("the row");
    let stored = row.trace_context.expect("a trace context is stored");
    assert!(
        stored.starts_with(&format!("00-{trace}-{business_id}-")),
        "{stored}"
    );

    let runtime = runtime_of(&pool, &catalog, &broker, config, "notification").await;

    let spans = eventually(
        "the publish, produce, consume and handler spans of one trace",
        Duration::from_secs(30),
        || async {
            let spans = spans_of(trace);
            let done = [
                "business.signup",
                "outbox.produce",
                "outbox.consume",
                "handler.effect",
            ]
            .iter()
            .all(|name| spans.iter().any(|s| s.name == *name));
            done.then_some(spans)
        },
    )
    .await;
    runtime.shutdown().await.unwrap();

    let business = named(&spans, "business.signup");
    let produce = named(&spans, "outbox.produce");
    let consume = named(&spans, "outbox.consume");
    let handler = named(&spans, "handler.effect");
    let tree = names(&spans);
    assert_eq!(business.parent_span_id, SpanId::INVALID, "{tree:#?}");
    assert_eq!(
        produce.parent_span_id,
        business.span_context.span_id(),
        "publish → relay: {tree:#?}"
    );
    assert_eq!(
        consume.parent_span_id,
        produce.span_context.span_id(),
        "relay → handler: {tree:#?}"
    );
    assert!(
        consume.parent_span_is_remote,
        "the parent came in the record"
    );
    assert_eq!(
        handler.parent_span_id,
        consume.span_context.span_id(),
        "the handler runs in the consume span: {tree:#?}"
    );

    // Fields an operator filters on.
    let event_id = id.to_string();
    for span in [produce, consume] {
        for (field, value) in [
            ("service", "notification"),
            ("event_type", "NotificationRequested"),
            ("event_id", event_id.as_str()),
            ("key", "ada"),
            ("attempt", "1"),
        ] {
            assert_eq!(
                text(span, field).as_deref(),
                Some(value),
                "{field}: {span:#?}"
            );
        }
        for field in ["partition", "offset"] {
            assert!(attribute(span, field).is_some(), "{field}: {span:#?}");
        }
    }
    // The relay's round is a span of its own (its own trace), with what it did.
    let rounds: Vec<_> = exporter
        .get_finished_spans()
        .unwrap()
        .into_iter()
        .filter(|s| s.name == "outbox.relay.round")
        .filter(|s| text(s, "service").as_deref() == Some("notification"))
        .collect();
    assert!(
        rounds
            .iter()
            .any(|r| text(r, "published").as_deref() == Some("1")),
        "{rounds:#?}"
    );
    db.cleanup().await;
}

/// A row whose stored trace context is malformed (written by hand, or damaged) is
/// relayed and handled as any other: the context is ignored, never an error.
async fn a_malformed_trace_context_is_ignored<T: TestDatabase>()
where
    T::DB: TestBackend,
{
    exporter();
    let db = T::create().await;
    let pool: Pool<T::DB> = db.pool().clone();
    let broker = TestBroker::mock().await;
    let catalog = prepare(&pool, &broker).await;
    let id = EventId::new();
    let mut conn = pool.acquire().await.unwrap();
    T::DB::insert(
        &mut conn,
        &"notification_outbox".parse().unwrap(),
        &NewRow {
            event_id: id.0,
            service: &"notification".parse().unwrap(),
            event_type: "NotificationRequested",
            version: 1,
            key: Some("bob"),
            payload: r#"{"user_id":"bob","seq":0}"#,
            max_retries: 20,
            trace_context: Some("00-not-a-trace-context-01;state=x"),
        },
    )
    .await
    .unwrap();
    drop(conn);
    let runtime = runtime_of(&pool, &catalog, &broker, test_config(), "notification").await;
    eventually(
        "the event to be handled",
        Duration::from_secs(30),
        || async {
            let effects = T::DB::effects(&pool).await;
            effects
                .iter()
                .any(|e| e.event_id == id.to_string())
                .then_some(())
        },
    )
    .await;
    runtime.shutdown().await.unwrap();
    db.cleanup().await;
}

outbox_tests::every_backend!(
    one_trace_from_publish_to_handler,
    a_malformed_trace_context_is_ignored
);
