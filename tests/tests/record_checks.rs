//! The consumer's checks of a record against the row it names, on PostgreSQL, MariaDB
//! and SQLite (one generic body each), driven record by record through
//! `Consumer::process`, so no broker is needed:
//!
//! - the row is the truth: a record whose payload, type, version, key or envelope
//!   disagrees with its row is a counted mismatch, and the row is left as it was; the
//!   faithful record is then handled with the row's own payload;
//! - a copy of a record arriving while its row waits out a retry backoff is left alone;
//! - a record over `max_payload_bytes` is skipped before any lock;
//! - a successor arriving while its predecessor is still *published* (the
//!   predecessor's record was lost) sends the predecessor again, so the key's events
//!   are handled in order without republishing the successor in a loop.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use outbox_runtime::backend::OutboxRow;
use outbox_runtime::envelope::{header, Envelope};
use outbox_runtime::internals::{Consumer, Outcome};
use outbox_runtime::Backoff;
use outbox_runtime::{Backend, Catalog, EventId, Outbox, OutboxConfig, Status};
use outbox_tests::db::TestDatabase;
use outbox_tests::e2e::{create_effects, eventually, TestBackend};
use outbox_tests::services::{Script, Task, TaskCreated};
use rdkafka::message::{Header, Headers, OwnedHeaders, OwnedMessage};
use rdkafka::Timestamp;
use sqlx::Pool;

struct World<T: TestDatabase>
where
    T::DB: TestBackend,
{
    db: T,
    outbox: Outbox<Task, T::DB>,
    consumer: Consumer<T::DB>,
}

fn config() -> OutboxConfig {
    OutboxConfig {
        backoff: Backoff {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(60),
        },
        max_payload_bytes: 4_000,
        ..OutboxConfig::default()
    }
}

async fn world<T: TestDatabase>(config: OutboxConfig) -> World<T>
where
    T::DB: TestBackend,
{
    let db = T::create().await;
    let catalog = Catalog::builder().build().expect("catalog");
    outbox_runtime::migrate(db.pool(), &catalog, ["task"])
        .await
        .expect("migrate");
    create_effects(db.pool()).await;
    let outbox = Outbox::with_config(db.pool().clone(), &catalog, config.clone()).expect("outbox");
    let consumer =
        Consumer::new(db.pool().clone(), &catalog, "task", Arc::new(config)).expect("consumer");
    World {
        db,
        outbox,
        consumer,
    }
}

impl<T: TestDatabase> World<T>
where
    T::DB: TestBackend,
{
    fn pool(&self) -> &Pool<T::DB> {
        self.db.pool()
    }

    async fn publish(&self, key: &str, seq: u32, script: Script) -> EventId {
        let mut tx = self.outbox.begin().await.expect("begin");
        let id = tx
            .publish(&TaskCreated {
                task_id: key.into(),
                seq,
                script,
            })
            .await
            .expect("publish");
        tx.commit().await.expect("commit");
        id
    }

    async fn row(&self, id: EventId) -> OutboxRow {
        let route = self.consumer.route();
        T::DB::fetch(self.pool(), route.table(), id.0)
            .await
            .expect("fetch")
            .expect("row exists")
    }

    /// `(event_id, seq)` of every effect, in applied order.
    async fn effects(&self) -> Vec<(String, i64)> {
        T::DB::effects(self.pool())
            .await
            .into_iter()
            .map(|e| (e.event_id, e.seq))
            .collect()
    }

    /// Marks the rows published as a relay would (claim, then mark).
    async fn publish_to_broker(&self, expect: usize) {
        let route = self.consumer.route();
        let token = 7;
        let rows = T::DB::claim(
            self.pool(),
            route.table(),
            route.service(),
            100,
            Duration::from_secs(60),
            token,
        )
        .await
        .expect("claim");
        assert_eq!(rows.len(), expect, "claimed heads");
        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        T::DB::mark_published(self.pool(), route.table(), &ids, token)
            .await
            .expect("mark");
    }
}

/// The record a relay would produce for `row`.
fn envelope_of(row: &OutboxRow) -> Envelope {
    Envelope {
        event_id: EventId(row.event_id),
        service: row.service.clone(),
        event_type: row.event_type.clone(),
        version: row.version as u32,
        key: row.key.clone(),
        time: row.created_at,
        payload: Vec::new(),
        traceparent: None,
        tracestate: None,
    }
}

fn record(payload: &[u8], key: Option<&str>, headers: OwnedHeaders, offset: i64) -> OwnedMessage {
    OwnedMessage::new(
        Some(payload.to_vec()),
        key.map(|k| k.as_bytes().to_vec()),
        "outbox.task".into(),
        Timestamp::NotAvailable,
        0,
        offset,
        Some(headers),
    )
}

fn faithful(row: &OutboxRow, offset: i64) -> OwnedMessage {
    record(
        row.payload.as_bytes(),
        row.key.as_deref(),
        envelope_of(row).headers(),
        offset,
    )
}

fn with_header(row: &OutboxRow, name: &'static str, value: &'static str) -> OwnedHeaders {
    let mut h = OwnedHeaders::new();
    for original in envelope_of(row).headers().iter() {
        let v = if original.key == name {
            value.as_bytes()
        } else {
            original.value.unwrap_or_default()
        };
        h = h.insert(Header {
            key: original.key,
            value: Some(v),
        });
    }
    h
}

async fn a_forged_record_changes_nothing<T: TestDatabase>()
where
    T::DB: TestBackend,
{
    let w = world::<T>(config()).await;
    let id = w.publish("t1", 1, Script::default()).await;
    let row = w.row(id).await;
    let forged_payload = row.payload.replace("\"seq\":1", "\"seq\":99");
    assert_ne!(forged_payload, row.payload);
    let forgeries = [
        record(
            forged_payload.as_bytes(),
            row.key.as_deref(),
            envelope_of(&row).headers(),
            1,
        ),
        record(
            row.payload.as_bytes(),
            row.key.as_deref(),
            with_header(&row, header::TYPE, "TaskExploded"),
            2,
        ),
        record(
            row.payload.as_bytes(),
            row.key.as_deref(),
            with_header(&row, header::EVENT_VERSION, "4294967296"),
            3,
        ),
        record(
            row.payload.as_bytes(),
            row.key.as_deref(),
            with_header(&row, header::EVENT_VERSION, "2"),
            4,
        ),
        record(
            row.payload.as_bytes(),
            Some("someone-else"),
            envelope_of(&row).headers(),
            5,
        ),
        record(
            row.payload.as_bytes(),
            row.key.as_deref(),
            with_header(&row, header::SOURCE, "billing"),
            6,
        ),
        // Only the id: no type, no version.
        record(
            row.payload.as_bytes(),
            row.key.as_deref(),
            OwnedHeaders::new()
                .insert(Header {
                    key: header::ENVELOPE,
                    value: Some("1"),
                })
                .insert(Header {
                    key: header::ID,
                    value: Some(id.to_string().as_str()),
                }),
            7,
        ),
    ];
    for (i, msg) in forgeries.iter().enumerate() {
        match w.consumer.process(msg).await.expect("process") {
            Outcome::Mismatch { reason } => {
                assert!(!reason.contains("seq"), "no payload in {reason:?}");
            }
            other => panic!("forgery {i}: expected a mismatch, got {other:?}"),
        }
    }
    let after = w.row(id).await;
    assert_eq!(
        (after.status, after.attempts, after.last_error.as_deref()),
        (Status::Pending, 0, None),
        "the stored event is untouched"
    );
    assert!(w.effects().await.is_empty());
    assert_eq!(
        w.consumer.stats().mismatched.load(Ordering::Relaxed),
        forgeries.len() as u64
    );

    // The genuine record is handled, with the row's own payload.
    assert_eq!(
        w.consumer
            .process(&faithful(&row, 8))
            .await
            .expect("process"),
        Outcome::Handled
    );
    assert_eq!(w.effects().await, vec![(id.to_string(), 1)]);
    assert_eq!(w.row(id).await.status, Status::Consumed);
    w.db.cleanup().await;
}

async fn a_copy_during_a_retry_backoff_is_left_alone<T: TestDatabase>()
where
    T::DB: TestBackend,
{
    let mut c = config();
    c.backoff.base = Duration::from_secs(60);
    let w = world::<T>(c).await;
    let id = w
        .publish(
            "t1",
            1,
            Script {
                fail_times: 1,
                ..Script::default()
            },
        )
        .await;
    let row = w.row(id).await;
    assert!(matches!(
        w.consumer
            .process(&faithful(&row, 1))
            .await
            .expect("process"),
        Outcome::Retry { .. }
    ));
    let failed = w.row(id).await;
    assert_eq!((failed.status, failed.attempts), (Status::Pending, 1));
    // A duplicate of the record arrives during the 60 s backoff.
    assert_eq!(
        w.consumer
            .process(&faithful(&row, 2))
            .await
            .expect("process"),
        Outcome::NotDue
    );
    let after = w.row(id).await;
    assert_eq!(
        (after.status, after.attempts, after.next_attempt_at),
        (Status::Pending, 1, failed.next_attempt_at)
    );
    assert!(w.effects().await.is_empty(), "the handler did not run");
    assert_eq!(w.consumer.stats().not_due.load(Ordering::Relaxed), 1);
    w.db.cleanup().await;
}

async fn a_record_over_the_payload_limit_is_skipped<T: TestDatabase>()
where
    T::DB: TestBackend,
{
    let w = world::<T>(config()).await;
    let id = w.publish("t1", 1, Script::default()).await;
    let row = w.row(id).await;
    let big = vec![b' '; 5_000];
    match w
        .consumer
        .process(&record(
            &big,
            row.key.as_deref(),
            envelope_of(&row).headers(),
            1,
        ))
        .await
        .expect("process")
    {
        Outcome::Skipped { reason } => assert!(reason.contains("5000-byte"), "{reason}"),
        other => panic!("expected a skip, got {other:?}"),
    }
    assert_eq!(w.row(id).await.status, Status::Pending);
    assert_eq!(w.consumer.stats().skipped.load(Ordering::Relaxed), 1);
    w.db.cleanup().await;
}

async fn a_successor_sends_its_lost_predecessor_again<T: TestDatabase>()
where
    T::DB: TestBackend,
{
    let w = world::<T>(config()).await;
    let first = w.publish("k", 1, Script::default()).await;
    w.publish_to_broker(1).await;
    let second = w.publish("k", 2, Script::default()).await;
    w.publish_to_broker(1).await;
    // `first`'s record was lost with the broker; `second`'s arrives.
    let second_row = w.row(second).await;
    assert_eq!(
        w.consumer
            .process(&faithful(&second_row, 10))
            .await
            .expect("process"),
        Outcome::Deferred
    );
    assert_eq!(w.row(first).await.status, Status::Pending, "sent again");
    assert_eq!(w.consumer.stats().republished.load(Ordering::Relaxed), 1);
    // Published again, in order: first, then second.
    let first_row = w.row(first).await;
    assert_eq!(
        w.consumer
            .process(&faithful(&first_row, 11))
            .await
            .expect("process"),
        Outcome::Handled
    );
    let second_again = faithful(&second_row, 12);
    eventually("the successor handled", Duration::from_secs(10), || async {
        match w.consumer.process(&second_again).await.expect("process") {
            Outcome::Handled => Some(()),
            Outcome::NotDue => None,
            other => panic!("expected handled, got {other:?}"),
        }
    })
    .await;
    assert_eq!(
        w.effects().await,
        vec![(first.to_string(), 1), (second.to_string(), 2)]
    );
    w.db.cleanup().await;
}

outbox_tests::every_backend!(
    a_forged_record_changes_nothing,
    a_copy_during_a_retry_backoff_is_left_alone,
    a_record_over_the_payload_limit_is_skipped,
    a_successor_sends_its_lost_predecessor_again,
);
