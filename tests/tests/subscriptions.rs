//! Subscriptions across databases: each service on its own database, handling the
//! others' public events through its inbox.
//!
//! `task` runs on PostgreSQL, `notification` on MariaDB, `memory` on SQLite, each in a
//! runtime of its own (as three processes would), sharing only the broker. `task`'s
//! events reach `notification` and `memory`; theirs reach `task`. The scenario checks,
//! from each subscriber's database alone:
//! - every committed event was handled once in effect by every subscriber, in per-key
//!   order, also behind a head that failed twice;
//! - an event whose handler fails permanently is dead in each inbox with its reason;
//! - records written onto the publisher's topic by an outsider — no envelope, another
//!   source, a type nobody declared, a copy of a real event — end dead with a reason,
//!   or (the copy) change nothing.

use std::time::Duration;

use outbox_runtime::envelope::Envelope;
use outbox_runtime::{
    outbox_handler, Backend, Catalog, EventId, HandlerContext, HandlerError, KafkaConfig, Outbox,
    OutboxRow, OutboxRuntime, RuntimeHandle, Status,
};
use outbox_tests::broker::TestBroker;
use outbox_tests::db::{TestMySql, TestPg, TestSqlite};
use outbox_tests::e2e::{
    assert_key_order, create_effects, effects_per_event, eventually, fresh_catalog, test_config,
    Effect, TestBackend,
};
use outbox_tests::services::*;
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::Pool;

#[outbox_handler(subscriber = Notification)]
async fn notification_on_task_created<DB: Backend>(
    ctx: &mut HandlerContext<DB>,
    event: TaskCreated,
) -> Result<(), HandlerError> {
    record(ctx, &event.task_id, event.seq, &event.script).await
}

#[outbox_handler(subscriber = Memory)]
async fn memory_on_task_created<DB: Backend>(
    ctx: &mut HandlerContext<DB>,
    event: TaskCreated,
) -> Result<(), HandlerError> {
    record(ctx, &event.task_id, event.seq, &event.script).await
}

#[outbox_handler(subscriber = Task)]
async fn task_on_notification_requested<DB: Backend>(
    ctx: &mut HandlerContext<DB>,
    event: NotificationRequested,
) -> Result<(), HandlerError> {
    record(ctx, &event.user_id, event.seq, &event.script).await
}

#[outbox_handler(subscriber = Task)]
async fn task_on_memory_stored<DB: Backend>(
    ctx: &mut HandlerContext<DB>,
    event: MemoryStored,
) -> Result<(), HandlerError> {
    record(ctx, &event.memory_id, event.seq, &event.script).await
}

const KEYS: u32 = 4;
const PER_KEY: u32 = 6;

/// The script of event `seq` of key `k`: key 1's head fails twice, key 2's event 3
/// fails permanently (dead in every inbox, and its key's later events still flow).
fn script(k: u32, seq: u32) -> Script {
    match (k, seq) {
        (1, 0) => Script {
            fail_times: 2,
            ..Script::default()
        },
        (2, 3) => Script {
            permanent: true,
            ..Script::default()
        },
        _ => Script::default(),
    }
}

/// What one service published: (event id, key, seq), and the id of its permanent
/// failure.
struct Published {
    events: Vec<(EventId, String, u32)>,
    permanent: EventId,
}

macro_rules! publish {
    ($pool:expr, $catalog:expr, $svc:ty, $ev:ident, $key:ident, $prefix:literal) => {{
        let outbox =
            Outbox::<$svc, _>::with_config($pool.clone(), $catalog, test_config()).expect("outbox");
        let mut events = Vec::new();
        let mut permanent = None;
        for seq in 0..PER_KEY {
            for k in 0..KEYS {
                let key = format!("{}-{k}", $prefix);
                let mut tx = outbox.begin().await.expect("begin");
                let script = script(k, seq);
                let is_permanent = script.permanent;
                let id = tx
                    .publish(&$ev {
                        $key: key.clone(),
                        seq,
                        script,
                    })
                    .await
                    .expect("publish");
                tx.commit().await.expect("commit");
                if is_permanent {
                    permanent = Some(id);
                }
                events.push((id, key, seq));
            }
        }
        Published {
            events,
            permanent: permanent.expect("one permanent failure"),
        }
    }};
}

async fn start<DB: Backend>(
    pool: &Pool<DB>,
    catalog: &Catalog,
    broker: &TestBroker,
    service: &str,
) -> RuntimeHandle {
    outbox_runtime::migrate(pool, catalog, [service])
        .await
        .expect("migrate");
    create_effects(pool).await;
    OutboxRuntime::new(
        catalog.clone(),
        pool.clone(),
        KafkaConfig::new(broker.bootstrap_servers()),
    )
    .config(test_config())
    .services([service])
    .start()
    .await
    .expect("the runtime starts")
}

/// The inbox rows of `publisher`'s events in `subscriber`'s inbox.
async fn inbox<DB: Backend>(
    pool: &Pool<DB>,
    catalog: &Catalog,
    subscriber: &str,
    publisher: &str,
) -> Vec<OutboxRow> {
    let sub = catalog
        .subscription(subscriber, publisher)
        .expect("the subscription is in the catalog");
    let route = sub.route();
    DB::fetch_all(pool, route.table(), route.service())
        .await
        .expect("reading the inbox")
}

/// Waits until `subscriber` (on `pool`) has settled everything `published` by
/// `publisher` (plus `extra_dead` outsider records), then checks exactly-once effect,
/// per-key order and the dead rows' reasons.
async fn check_subscriber<DB: TestBackend>(
    pool: &Pool<DB>,
    catalog: &Catalog,
    subscriber: &str,
    publisher: &str,
    published: &Published,
    extra_dead: &[(&str, &str)],
) {
    let expected_dead = 1 + extra_dead.len();
    let what = format!("{subscriber} to settle {publisher}'s events");
    let rows = eventually(&what, Duration::from_secs(90), || async {
        let rows = inbox(pool, catalog, subscriber, publisher).await;
        let settled = rows.iter().all(|r| r.status.is_terminal());
        let dead = rows.iter().filter(|r| r.status == Status::Dead).count();
        (settled
            && rows.len() == published.events.len() + extra_dead.len()
            && dead == expected_dead)
            .then_some(rows)
    })
    .await;

    // Exactly once in effect, in key order.
    let effects: Vec<Effect> = DB::effects(pool)
        .await
        .into_iter()
        .filter(|e| e.service == publisher)
        .collect();
    let per_event = effects_per_event(&effects);
    for (id, key, seq) in &published.events {
        let n = per_event.get(&id.to_string()).copied().unwrap_or(0);
        let want = usize::from(*id != published.permanent);
        assert_eq!(
            n, want,
            "{subscriber}: event {id} ({key} #{seq}) of {publisher} had {n} effects, want {want}"
        );
    }
    assert_eq!(
        effects.len(),
        published.events.len() - 1,
        "{subscriber}: effects of events {publisher} never published"
    );
    assert_key_order(&effects);
    // Key 1's head failed twice before it was handled, and its successors waited.
    let head = effects
        .iter()
        .find(|e| e.event_key.ends_with("-1") && e.seq == 0)
        .expect("key 1's head was handled");
    assert_eq!(head.attempt, 3, "{subscriber}: the failing head's attempts");

    // Dead rows, each with its reason.
    let dead: Vec<&OutboxRow> = rows.iter().filter(|r| r.status == Status::Dead).collect();
    let permanent = dead
        .iter()
        .find(|r| r.event_id == published.permanent.0)
        .expect("the permanent failure is dead in the inbox");
    assert_eq!(permanent.dead_reason.as_deref(), Some("permanent"));
    for (reason, text) in extra_dead {
        assert!(
            dead.iter()
                .any(|r| r.dead_reason.as_deref() == Some(*reason)
                    && r.last_error.as_deref().unwrap_or_default().contains(text)),
            "{subscriber}: no dead inbox row with reason {reason} and `{text}`: {:#?}",
            dead.iter()
                .map(|r| (&r.dead_reason, &r.last_error))
                .collect::<Vec<_>>()
        );
    }
}

/// Writes records onto `topic` as an outsider would: no envelope, another source, an
/// undeclared type, and a copy of a real event (`copy`: id, key and payload).
async fn outsider_records(broker: &TestBroker, topic: &str, copy: (EventId, &str, String)) {
    let producer: FutureProducer = broker
        .client_config()
        .create()
        .expect("an outsider's producer");
    let envelope = |id: EventId, service: &str, event_type: &str, key: &str| Envelope {
        event_id: id,
        service: service.to_owned(),
        event_type: event_type.to_owned(),
        version: 1,
        key: Some(key.to_owned()),
        time: chrono::Utc::now(),
        payload: Vec::new(),
        traceparent: None,
        tracestate: None,
    };
    let send = |record| send(&producer, record);
    // No headers at all.
    send(FutureRecord::to(topic).key("x-0").payload("not an event")).await;
    // Another service's name as its source.
    let other = envelope(EventId::new(), "agent", "TaskCreated", "x-1");
    send(
        FutureRecord::to(topic)
            .key("x-1")
            .payload(r#"{"task_id":"x-1","seq":0}"#)
            .headers(other.headers()),
    )
    .await;
    // A type nobody declared: it waits for a release that knows it, then is dead.
    let unknown = envelope(EventId::new(), "task", "TaskArchived", "x-2");
    send(
        FutureRecord::to(topic)
            .key("x-2")
            .payload(r#"{"task_id":"x-2"}"#)
            .headers(unknown.headers()),
    )
    .await;
    // A copy of a real event: a repeat.
    let (id, key, payload) = copy;
    let again = envelope(id, "task", "TaskCreated", key);
    send(
        FutureRecord::to(topic)
            .key(key)
            .payload(payload.as_str())
            .headers(again.headers()),
    )
    .await;
}

async fn send(producer: &FutureProducer, record: FutureRecord<'_, str, str>) {
    producer
        .send(record, Duration::from_secs(10))
        .await
        .expect("the outsider's record is written");
}

async fn scenario(broker: TestBroker) {
    let pg = TestPg::create().await;
    let my = TestMySql::create().await;
    let lite = TestSqlite::create().await;
    let catalog = fresh_catalog(&broker).await;

    // What the catalog says of the subscriptions.
    let sub = catalog.subscription("notification", "task").unwrap();
    assert_eq!(sub.inbox, "notification_inbox");
    assert!(sub.group.ends_with("outbox.task.subscriber.notification"));
    assert_eq!(sub.topic, catalog.route("task").unwrap().topic().as_str());
    let export = catalog.to_json();
    assert_eq!(export["subscriptions"].as_array().unwrap().len(), 4);

    let task = start(pg.pool(), &catalog, &broker, "task").await;
    let notification = start(my.pool(), &catalog, &broker, "notification").await;
    let memory = start(lite.pool(), &catalog, &broker, "memory").await;

    let tasks = publish!(pg.pool(), &catalog, Task, TaskCreated, task_id, "task");
    let notifications = publish!(
        my.pool(),
        &catalog,
        Notification,
        NotificationRequested,
        user_id,
        "user"
    );
    let memories = publish!(
        lite.pool(),
        &catalog,
        Memory,
        MemoryStored,
        memory_id,
        "mem"
    );

    let (copy_id, copy_key, _) = &tasks.events[0];
    let copy_row =
        sqlx::query_scalar::<_, String>("SELECT payload FROM task_outbox WHERE event_id = $1")
            .bind(copy_id.0)
            .fetch_one(pg.pool())
            .await
            .unwrap();
    let topic = catalog.route("task").unwrap().topic().as_str().to_owned();
    outsider_records(&broker, &topic, (*copy_id, copy_key, copy_row)).await;

    let outsiders = [
        ("undecodable", "is not an outbox envelope"),
        ("undecodable", "says it comes from service \"agent\""),
        ("unknown_type", "unknown event type `TaskArchived`"),
    ];
    check_subscriber(
        my.pool(),
        &catalog,
        "notification",
        "task",
        &tasks,
        &outsiders,
    )
    .await;
    check_subscriber(lite.pool(), &catalog, "memory", "task", &tasks, &outsiders).await;
    check_subscriber(
        pg.pool(),
        &catalog,
        "task",
        "notification",
        &notifications,
        &[],
    )
    .await;
    check_subscriber(pg.pool(), &catalog, "task", "memory", &memories, &[]).await;

    // An operator sees the inbox's dead letters and replays one, through `Admin`.
    let admin = outbox_runtime::Admin::new(my.pool().clone(), catalog.clone())
        .inbox("notification")
        .expect("notification has an inbox");
    let dead = admin
        .dead_letters("task", &Default::default(), outbox_runtime::Page::first(50))
        .await
        .expect("listing the inbox's dead letters");
    assert_eq!(dead.rows.len(), 1 + outsiders.len());
    let before = dead
        .rows
        .iter()
        .find(|r| r.event_id == tasks.permanent.0)
        .and_then(|r| r.dead_at)
        .expect("the permanent failure is a dead letter");
    assert!(admin.replay("task", tasks.permanent).await.unwrap());
    eventually(
        "the replayed event handled again (and dead again)",
        Duration::from_secs(30),
        || async {
            let rows = inbox(my.pool(), &catalog, "notification", "task").await;
            let row = rows.iter().find(|r| r.event_id == tasks.permanent.0)?;
            (row.status == Status::Dead && row.dead_at.is_some_and(|at| at > before)).then_some(())
        },
    )
    .await;

    // The copy was seen and skipped by both of task's subscribers.
    for (handle, name) in [(&notification, "notification"), (&memory, "memory")] {
        let (intake, _) = handle.subscriber_stats(name, "task").expect("it runs");
        assert!(
            intake.duplicates.load(std::sync::atomic::Ordering::Relaxed) >= 1,
            "{name}: the copy of a real event was not counted as a repeat"
        );
    }

    task.shutdown().await.expect("task shuts down cleanly");
    notification
        .shutdown()
        .await
        .expect("notification shuts down cleanly");
    memory.shutdown().await.expect("memory shuts down cleanly");
    pg.cleanup().await;
    my.cleanup().await;
    lite.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn across_databases_on_the_mock_cluster() {
    scenario(TestBroker::mock().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn across_databases_on_tansu() {
    let Some(broker) = TestBroker::tansu_or_skip("across_databases_on_tansu") else {
        return;
    };
    scenario(broker).await;
}

/// No forgetting window: the subscriber's retention deletes every settled inbox row,
/// then the publisher sends all its events again (its safety valve, as after records
/// lost to the broker, however late). Each is recognised by its key's watermark and
/// skipped: still one effect per event. Newer events of the same keys still flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_repeat_after_retention_deleted_the_inbox_row_is_still_a_repeat() {
    use outbox_runtime::Retention;
    let broker = TestBroker::mock().await;
    let pg = TestPg::create().await;
    let my = TestMySql::create().await;
    let catalog = fresh_catalog(&broker).await;
    for (pool, service) in [(pg.pool(), "task")] {
        outbox_runtime::migrate(pool, &catalog, [service])
            .await
            .unwrap();
        create_effects(pool).await;
    }
    outbox_runtime::migrate(my.pool(), &catalog, ["notification"])
        .await
        .unwrap();
    create_effects(my.pool()).await;
    // The publisher: relay only, so its rows stay `published` for the safety valve.
    let task = OutboxRuntime::new(
        catalog.clone(),
        pg.pool().clone(),
        KafkaConfig::new(broker.bootstrap_servers()),
    )
    .config(test_config())
    .services(["task"])
    .consumers(false)
    .start()
    .await
    .unwrap();
    // The subscriber deletes settled inbox rows at once (sweeps every 200 ms; a
    // watermark settles for 1 s before the rows it covers go).
    let retention = Retention {
        consumed_after: Duration::ZERO,
        dead_after: Some(Duration::ZERO),
        batch: 1000,
        interval: Duration::from_millis(200),
    };
    let notification = OutboxRuntime::new(
        catalog.clone(),
        my.pool().clone(),
        KafkaConfig::new(broker.bootstrap_servers()),
    )
    .config(outbox_runtime::OutboxConfig {
        retention: Some(retention),
        ..test_config()
    })
    .services(["notification"])
    .start()
    .await
    .unwrap();

    let outbox =
        Outbox::<Task, _>::with_config(pg.pool().clone(), &catalog, test_config()).unwrap();
    let publish = |from: u32, to: u32| {
        let outbox = outbox.clone();
        async move {
            let mut tx = outbox.begin().await.unwrap();
            let events: Vec<TaskCreated> = (from..to)
                .map(|seq| TaskCreated {
                    task_id: format!("task-{}", seq % 3),
                    seq,
                    script: Script::default(),
                })
                .collect();
            let ids = tx.publish_all(&events).await.unwrap();
            tx.commit().await.unwrap();
            ids
        }
    };
    let first = publish(0, 30).await;
    let effects_of_task = || async {
        let effects: Vec<Effect> = <sqlx::MySql as TestBackend>::effects(my.pool())
            .await
            .into_iter()
            .filter(|e| e.service == "task")
            .collect();
        effects
    };
    eventually(
        "the first events handled and their inbox rows deleted",
        Duration::from_secs(60),
        || async {
            let handled = effects_of_task().await.len() == first.len();
            let left = inbox(my.pool(), &catalog, "notification", "task")
                .await
                .len();
            (handled && left == 0).then_some(())
        },
    )
    .await;

    // The publisher sends everything again.
    let table = "task_outbox".parse().unwrap();
    let service = "task".parse().unwrap();
    let again = <sqlx::Postgres as Backend>::redeliver_stale(
        pg.pool(),
        &table,
        &service,
        Duration::ZERO,
        None,
        1000,
    )
    .await
    .unwrap();
    assert_eq!(again, first.len() as u64);
    let (intake, _) = notification
        .subscriber_stats("notification", "task")
        .unwrap();
    eventually(
        "the repeats read and skipped",
        Duration::from_secs(60),
        || async {
            (intake.duplicates.load(std::sync::atomic::Ordering::Relaxed) >= first.len() as u64)
                .then_some(())
        },
    )
    .await;
    // Newer events of the same keys are not held by the watermarks.
    let second = publish(30, 36).await;
    let effects = eventually(
        "the newer events handled",
        Duration::from_secs(60),
        || async {
            let effects = effects_of_task().await;
            (effects.len() >= first.len() + second.len()).then_some(effects)
        },
    )
    .await;
    let per_event = effects_per_event(&effects);
    for id in first.iter().chain(&second) {
        assert_eq!(per_event.get(&id.to_string()), Some(&1), "event {id}");
    }
    assert_eq!(effects.len(), first.len() + second.len());
    assert_key_order(&effects);

    task.shutdown().await.unwrap();
    notification.shutdown().await.unwrap();
    pg.cleanup().await;
    my.cleanup().await;
}
