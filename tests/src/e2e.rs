//! The end-to-end scenario, written once and run for every backend and broker tier.
//!
//! Five services publish events in business transactions (some rolled back), relays
//! and consumers run, and the scenario checks, from the database alone:
//! - every committed event was handled exactly once in effect, in per-key order;
//! - no rolled-back event left a row or an effect;
//! - a poison payload, an unknown event type, a permanent failure and an always-failing
//!   handler each end dead with their reason;
//! - a transient failure and a panic are retried after the backoff, then succeed;
//! - services sharing the legacy table see only their own rows.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::{Duration, Instant};

use outbox_runtime::backend::NewRow;
use outbox_runtime::Catalog;
use outbox_runtime::{
    Backend, EventId, KafkaConfig, Outbox, OutboxConfig, OutboxRow, OutboxRuntime, PublishOptions,
    RawEvent, RuntimeHandle, Status,
};
use outbox_runtime::{Backoff, Waiting};
use sqlx::Pool;

use crate::broker::{unique_suffix, TestBroker};
use crate::services::*;

/// One row of the `effects` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Effect {
    /// Applied order.
    pub id: i64,
    /// The event.
    pub event_id: String,
    /// The service whose handler ran.
    pub service: String,
    /// The key.
    pub event_key: String,
    /// Position in the key's sequence.
    pub seq: i64,
    /// The attempt that succeeded.
    pub attempt: i64,
}

/// What the scenario needs beyond [`Backend`]: reading the `effects` table.
pub trait TestBackend: Backend {
    /// All effects in applied order.
    fn effects(pool: &Pool<Self>) -> impl Future<Output = Vec<Effect>> + Send;
}

macro_rules! effects_impl {
    ($db:ty) => {
        impl TestBackend for $db {
            async fn effects(pool: &Pool<Self>) -> Vec<Effect> {
                let rows: Vec<(i64, String, String, String, i64, i64)> = sqlx::query_as(
                    "SELECT id, event_id, service, event_key, seq, attempt FROM effects ORDER BY id",
                )
                .fetch_all(pool)
                .await
                .expect("reading effects");
                rows.into_iter()
                    .map(|(id, event_id, service, event_key, seq, attempt)| Effect {
                        id,
                        event_id,
                        service,
                        event_key,
                        seq,
                        attempt,
                    })
                    .collect()
            }
        }
    };
}
effects_impl!(sqlx::Postgres);
effects_impl!(sqlx::MySql);
effects_impl!(sqlx::Sqlite);

/// How many effects each event (by id) had: exactly-once means 1 for every committed
/// event and none for a rolled-back or dead one.
pub fn effects_per_event(effects: &[Effect]) -> BTreeMap<String, usize> {
    let mut per_event = BTreeMap::new();
    for e in effects {
        *per_event.entry(e.event_id.clone()).or_default() += 1;
    }
    per_event
}

/// Asserts per-key order: each (service, key)'s effects, in applied order, have
/// increasing sequence numbers.
pub fn assert_key_order(effects: &[Effect]) {
    let mut last_seq: BTreeMap<(&str, &str), i64> = BTreeMap::new();
    for e in effects {
        if let Some(prev) = last_seq.insert((&e.service, &e.event_key), e.seq) {
            assert!(
                prev < e.seq,
                "key {}/{} applied {} after {}",
                e.service,
                e.event_key,
                e.seq,
                prev
            );
        }
    }
}

/// Test settings: the real state machine, shorter waits.
pub fn test_config() -> OutboxConfig {
    OutboxConfig {
        backoff: Backoff {
            base: Duration::from_millis(300),
            cap: Duration::from_secs(2),
        },
        relay_poll_interval: Duration::from_millis(100),
        // Events no consumer can handle wait 2 s, not an hour, before they are dead.
        waiting: Waiting {
            recheck: Duration::from_millis(300),
            grace: Duration::from_secs(2),
        },
        ..OutboxConfig::default()
    }
}

/// A catalog with fresh topics and groups, and those topics created on the broker.
pub async fn fresh_catalog(broker: &TestBroker) -> Catalog {
    let prefix = format!("t{}-", unique_suffix());
    let catalog = Catalog::builder()
        .topic_prefix(&prefix)
        .group_prefix(&prefix)
        .build()
        .expect("the test catalog is valid");
    for route in catalog.routes() {
        broker.create_topic(route.topic().as_str(), 3).await;
    }
    catalog
}

/// A fresh catalog (topics created on `broker`), every outbox table migrated and the
/// `effects` table created: the common start of a test.
pub async fn prepare<DB: Backend>(pool: &Pool<DB>, broker: &TestBroker) -> Catalog {
    let catalog = fresh_catalog(broker).await;
    outbox_runtime::migrate(
        pool,
        &catalog,
        catalog.routes().map(|r| r.service().as_str()),
    )
    .await
    .expect("migrate");
    create_effects(pool).await;
    catalog
}

/// A runtime running the relay and consumer of `service` alone.
pub async fn runtime_of<DB: Backend>(
    pool: &Pool<DB>,
    catalog: &Catalog,
    broker: &TestBroker,
    config: OutboxConfig,
    service: &str,
) -> RuntimeHandle {
    OutboxRuntime::new(
        catalog.clone(),
        pool.clone(),
        KafkaConfig::new(broker.bootstrap_servers()),
    )
    .config(config)
    .services([service])
    .start()
    .await
    .expect("the runtime starts")
}

/// Publishes one `NotificationRequested` for `user_id` (seq 0) in a transaction of its
/// own.
pub async fn publish_notification<DB: Backend>(
    outbox: &Outbox<Notification, DB>,
    user_id: &str,
    script: Script,
) -> EventId {
    let mut tx = outbox.begin().await.expect("begin");
    let id = tx
        .publish(&NotificationRequested {
            user_id: user_id.into(),
            seq: 0,
            script,
        })
        .await
        .expect("publish");
    tx.commit().await.expect("commit");
    id
}

/// Creates the `effects` table.
pub async fn create_effects<DB: Backend>(pool: &Pool<DB>) {
    let mut conn = pool.acquire().await.expect("connection");
    DB::execute_portable(&mut conn, effects_ddl(DB::BACKEND_NAME), &[])
        .await
        .expect("creating effects");
}

/// Polls `check` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every row of every service, by event id.
pub async fn all_rows<DB: Backend>(
    pool: &Pool<DB>,
    catalog: &Catalog,
) -> BTreeMap<EventId, OutboxRow> {
    let mut rows = BTreeMap::new();
    for route in catalog.routes() {
        for row in DB::fetch_all(pool, route.table(), route.service())
            .await
            .expect("fetch_all")
        {
            rows.insert(EventId(row.event_id), row);
        }
    }
    rows
}

struct Published {
    committed: BTreeMap<EventId, (&'static str, String, u32)>,
    rolled_back: BTreeSet<EventId>,
}

/// Publishes `per_key` events for each of `keys` keys of one service, in one
/// transaction per event; every fourth transaction rolls back (its event is also
/// recorded, so the test can prove it never shows up).
macro_rules! publish_series {
    ($pool:expr, $catalog:expr, $config:expr, $out:expr, $svc:ty, $name:literal, $ev:ident, $key:ident, $keys:expr, $per_key:expr) => {{
        let outbox = Outbox::<$svc, DB>::with_config($pool.clone(), $catalog, $config.clone())
            .expect("outbox");
        let mut n = 0u32;
        for k in 0..$keys {
            let key = format!("{}-{k}", $name);
            for seq in 0..$per_key {
                n += 1;
                let mut tx = outbox.begin().await.expect("begin");
                let event = $ev {
                    $key: key.clone(),
                    seq,
                    script: Script::default(),
                };
                let id = tx.publish(&event).await.expect("publish");
                if n % 4 == 0 {
                    // A rolled-back business transaction: its event must never exist.
                    let ghost = $ev {
                        $key: key.clone(),
                        seq: 999,
                        script: Script::default(),
                    };
                    let ghost_id = tx.publish(&ghost).await.expect("publish ghost");
                    tx.rollback().await.expect("rollback");
                    $out.rolled_back.insert(id);
                    $out.rolled_back.insert(ghost_id);
                    // Publish the real one again, committed, to keep the key's sequence whole.
                    let mut tx = outbox.begin().await.expect("begin");
                    let id = tx.publish(&event).await.expect("publish");
                    tx.commit().await.expect("commit");
                    $out.committed.insert(id, ($name, key.clone(), seq));
                } else {
                    tx.commit().await.expect("commit");
                    $out.committed.insert(id, ($name, key.clone(), seq));
                }
            }
        }
        outbox
    }};
}

/// The whole flow on one backend and one broker.
pub async fn full_flow<DB: TestBackend>(pool: Pool<DB>, broker: &TestBroker) {
    let catalog = fresh_catalog(broker).await;
    let config = test_config();
    outbox_runtime::migrate(
        &pool,
        &catalog,
        catalog.routes().map(|r| r.service().as_str()),
    )
    .await
    .expect("migrate");
    create_effects(&pool).await;

    let runtime = OutboxRuntime::new(
        catalog.clone(),
        pool.clone(),
        KafkaConfig::new(broker.bootstrap_servers()),
    )
    .config(config.clone())
    .start()
    .await
    .expect("runtime starts");

    let mut out = Published {
        committed: BTreeMap::new(),
        rolled_back: BTreeSet::new(),
    };
    let agent = publish_series!(
        pool,
        &catalog,
        config,
        out,
        Agent,
        "agent",
        AgentRunRequested,
        run_id,
        3,
        4
    );
    let memory = publish_series!(
        pool,
        &catalog,
        config,
        out,
        Memory,
        "memory",
        MemoryStored,
        memory_id,
        3,
        4
    );
    let notification = publish_series!(
        pool,
        &catalog,
        config,
        out,
        Notification,
        "notification",
        NotificationRequested,
        user_id,
        3,
        4
    );
    let task = publish_series!(
        pool,
        &catalog,
        config,
        out,
        Task,
        "task",
        TaskCreated,
        task_id,
        3,
        4
    );
    let scheduler = publish_series!(
        pool,
        &catalog,
        config,
        out,
        ActiveScheduler,
        "active-scheduler",
        JobScheduled,
        job_id,
        3,
        4
    );

    // The special cases.
    let mut conn = pool.acquire().await.expect("conn");
    let poison = agent
        .publish_raw(
            &mut conn,
            &RawEvent {
                event_type: "AgentRunRequested".into(),
                version: 1,
                key: Some("poison".into()),
                payload: "{this is not json".into(),
                max_retries: None,
            },
        )
        .await
        .expect("publish poison");
    // `publish_raw` refuses a type the catalog does not know, so the row is written
    // straight into the table, as a legacy writer would.
    let unknown = EventId::new();
    DB::insert(
        &mut conn,
        memory.route().table(),
        &NewRow {
            event_id: unknown.0,
            service: memory.route().service(),
            event_type: "MemoryForgotten",
            version: 1,
            key: None,
            payload: "{}",
            max_retries: 20,
            trace_context: None,
        },
    )
    .await
    .expect("insert an unknown type");
    let always_fails = notification
        .publish_with(
            &mut conn,
            &NotificationRequested {
                user_id: "doomed".into(),
                seq: 0,
                script: Script {
                    always_fail: true,
                    ..Script::default()
                },
            },
            PublishOptions {
                max_retries: Some(2),
                ..PublishOptions::default()
            },
        )
        .await
        .expect("publish always-failing");
    let permanent = task
        .publish(
            &mut conn,
            &TaskCreated {
                task_id: "refused".into(),
                seq: 0,
                script: Script {
                    permanent: true,
                    ..Script::default()
                },
            },
        )
        .await
        .expect("publish permanent");
    let flaky = task
        .publish(
            &mut conn,
            &TaskCreated {
                task_id: "flaky".into(),
                seq: 0,
                script: Script {
                    fail_times: 1,
                    ..Script::default()
                },
            },
        )
        .await
        .expect("publish flaky");
    let panics = scheduler
        .publish(
            &mut conn,
            &JobScheduled {
                job_id: "panicky".into(),
                seq: 0,
                script: Script {
                    panic_times: 1,
                    ..Script::default()
                },
            },
        )
        .await
        .expect("publish panicking");
    drop(conn);
    task.notify_committed();

    let expected_dead = [poison, unknown, always_fails, permanent];
    let expected_total = out.committed.len() + 2 + expected_dead.len();
    let rows = eventually(
        "every event to settle (consumed or dead)",
        Duration::from_secs(90),
        || async {
            let rows = all_rows(&pool, &catalog).await;
            let settled = rows.values().filter(|r| r.status.is_terminal()).count();
            (rows.len() == expected_total && settled == expected_total).then_some(rows)
        },
    )
    .await;
    runtime.shutdown().await.expect("clean shutdown");

    // Rolled back: no row, no effect.
    for id in &out.rolled_back {
        assert!(!rows.contains_key(id), "rolled-back event {id} has a row");
    }
    let effects = DB::effects(&pool).await;
    let per_event = effects_per_event(&effects);
    for id in &out.rolled_back {
        assert!(
            !per_event.contains_key(id.to_string().as_str()),
            "rolled-back event {id} had an effect"
        );
    }

    // Committed: consumed, exactly one effect each.
    for (id, (service, key, seq)) in &out.committed {
        let row = &rows[id];
        assert_eq!(
            row.status,
            Status::Consumed,
            "{service} {key}#{seq}: {row:?}"
        );
        assert_eq!(
            per_event.get(id.to_string().as_str()),
            Some(&1),
            "{service} {key}#{seq} effects"
        );
    }
    for id in [flaky, panics] {
        assert_eq!(rows[&id].status, Status::Consumed, "{:?}", rows[&id]);
        assert_eq!(per_event.get(id.to_string().as_str()), Some(&1));
    }

    // Per-key order: each key's effects in sequence order.
    assert_key_order(&effects);

    // Dead, with their reasons.
    let reason = |id: &EventId| rows[id].last_error.clone().unwrap_or_default();
    for id in &expected_dead {
        assert_eq!(rows[id].status, Status::Dead, "{:?}", rows[id]);
        assert!(rows[id].dead_at.is_some());
        assert!(
            !per_event.contains_key(id.to_string().as_str()),
            "a dead event had an effect"
        );
    }
    assert!(
        reason(&poison).contains("undecodable payload"),
        "{}",
        reason(&poison)
    );
    assert!(
        reason(&unknown).contains("unknown event type `MemoryForgotten`"),
        "{}",
        reason(&unknown)
    );
    assert!(
        reason(&permanent).contains("scripted permanent failure"),
        "{}",
        reason(&permanent)
    );
    assert!(
        reason(&always_fails).contains("retries exhausted"),
        "{}",
        reason(&always_fails)
    );
    assert_eq!(
        rows[&always_fails].attempts, 2,
        "dead at the 2nd failure (max_retries 2)"
    );
    assert_eq!(rows[&poison].attempts, 1, "dead at once");

    // Transient failure and panic: retried once, after the backoff (database clock).
    let backoff = config.backoff.base;
    for id in [flaky, panics] {
        let row = &rows[&id];
        assert_eq!(row.attempts, 1, "{row:?}");
        let consumed = row.consumed_at.expect("consumed_at");
        assert!(
            consumed >= row.next_attempt_at,
            "retried before it was due: {row:?}"
        );
        let waited = (row.next_attempt_at - row.created_at)
            .to_std()
            .unwrap_or_default();
        assert!(
            waited >= backoff,
            "backoff {waited:?} shorter than {backoff:?}"
        );
        let effect = effects
            .iter()
            .find(|e| e.event_id == id.to_string())
            .expect("effect");
        assert_eq!(effect.attempt, 2);
    }

    // The shared legacy table: each service sees only its rows.
    for (service, owned) in [("agent", "agent"), ("memory", "memory")] {
        let rows = DB::fetch_all(
            &pool,
            &"outbox_events".parse().unwrap(),
            &service.parse().unwrap(),
        )
        .await
        .expect("fetch");
        assert!(!rows.is_empty());
        assert!(rows.iter().all(|r| r.service == owned));
    }
    let effects_by_service: BTreeSet<&str> = effects.iter().map(|e| e.service.as_str()).collect();
    assert_eq!(
        effects_by_service,
        [
            "active-scheduler",
            "agent",
            "memory",
            "notification",
            "task"
        ]
        .into_iter()
        .collect()
    );
}
