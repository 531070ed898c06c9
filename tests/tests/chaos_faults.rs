//! Fault suite, faults around a running runtime: a broker outage, failing and
//! panicking handlers, malformed records in the topic, and consumer-group churn. Each
//! prints the ledger oracle's figures. See RELIABILITY.md.
//!
//! Handler failures (e) and malformed records (f) run on PostgreSQL, MariaDB and SQLite
//! (one generic body each, `chaos_tests!`); the outage (d, which watches PostgreSQL's
//! `pg_stat_activity`) and the group churn (h) on PostgreSQL.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox_runtime::backend::NewRow;
use outbox_runtime::envelope::{header, Envelope};
use outbox_runtime::{
    Backend, EventId, OutboxConfig, PublishOptions, ServiceName, SqlValue, Status, TableName,
    Waiting,
};
use outbox_tests::broker::TestBroker;
use outbox_tests::chaos::{
    chaos_config, consumer_duplicates, init_tracing, poll, relay_sum, soak, ChaosBackend, ChaosEnv,
    Load,
};
use outbox_tests::chaos_tests;
use outbox_tests::db::TestDatabase;
use outbox_tests::oracle::{publish_ledgered, Written};
use outbox_tests::services::Script;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use sqlx::{MySql, Postgres, Sqlite};

/// A background writer loop until `stop`: ledgered publishes paced by `pace`, recording
/// the slowest committed transaction and the failures.
fn paced_writer(
    outbox: outbox_runtime::Outbox<outbox_tests::services::Task, Postgres>,
    keys: u32,
    pace: Duration,
    stop: Arc<AtomicBool>,
    slowest_ms: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<(u64, u64)> {
    tokio::spawn(async move {
        let (mut ok, mut failed) = (0, 0);
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            i += 1;
            let key = format!("w{}", i % u64::from(keys));
            let t = Instant::now();
            match publish_ledgered(
                &outbox,
                &key,
                Script::default(),
                PublishOptions::default(),
                !i.is_multiple_of(20),
            )
            .await
            {
                Written::Committed(..) => {
                    ok += 1;
                    slowest_ms.fetch_max(t.elapsed().as_millis() as u64, Ordering::Relaxed);
                }
                Written::RolledBack => {}
                Written::Failed => failed += 1,
            }
            tokio::time::sleep(pace).await; // load pacing
        }
        (ok, failed)
    })
}

/// d. The mock cluster's only broker down for 10 s (30 s soak) under load: business
/// writes keep working at their latency, the relay backs off (bounded rounds and
/// errors, no transaction held open), everything arrives afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_d_broker_outage() {
    init_tracing();
    let broker = TestBroker::mock().await;
    let env = ChaosEnv::<Postgres>::new(&broker, 3).await;
    let runtime = env.runtime(&broker, 1, true, chaos_config()).await;
    let stop = Arc::new(AtomicBool::new(false));
    let slowest_before = Arc::new(AtomicU64::new(0));
    let writer = paced_writer(
        env.outbox(),
        30,
        Duration::from_millis(10),
        stop.clone(),
        slowest_before.clone(),
    );
    // Normal traffic first.
    let pool = env.pool().clone();
    let table = env.table.clone();
    poll("traffic to flow", Duration::from_secs(30), || async {
        let c = Postgres::counts(&pool, &table.parse().unwrap(), &"task".parse().unwrap())
            .await
            .ok()?;
        (c.consumed >= 100).then_some(())
    })
    .await;
    let before_ms = slowest_before.load(Ordering::Relaxed);

    // Outage.
    let outage = Duration::from_secs(soak(10, 30));
    let slowest_during = Arc::new(AtomicU64::new(0));
    stop.store(true, Ordering::Relaxed);
    let (ok_before, failed_before) = writer.await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = paced_writer(
        env.outbox(),
        30,
        Duration::from_millis(10),
        stop.clone(),
        slowest_during.clone(),
    );
    let rounds0 = relay_sum(&runtime, |s| &s.rounds);
    let errors0 = relay_sum(&runtime, |s| &s.errors);
    let released0 = relay_sum(&runtime, |s| &s.released);
    broker.mock_cluster().unwrap().broker_down(1).unwrap();
    let t = Instant::now();
    let mut idle_in_tx_max = 0i64;
    while t.elapsed() < outage {
        // No relay holds a transaction across the outage.
        let (n,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND state = 'idle in transaction' AND now() - xact_start > interval '1 second'",
        )
        .fetch_one(env.pool())
        .await
        .unwrap();
        idle_in_tx_max = idle_in_tx_max.max(n);
        tokio::time::sleep(Duration::from_millis(250)).await; // keeps the fault on
    }
    let rounds = relay_sum(&runtime, |s| &s.rounds) - rounds0;
    let errors = relay_sum(&runtime, |s| &s.errors) - errors0;
    let released = relay_sum(&runtime, |s| &s.released) - released0;
    broker.mock_cluster().unwrap().broker_up(1).unwrap();
    stop.store(true, Ordering::Relaxed);
    let (ok_during, failed_during) = writer.await.unwrap();
    let during_ms = slowest_during.load(Ordering::Relaxed);

    env.settled(Duration::from_secs(90)).await;
    let dups = consumer_duplicates(&[&runtime]);
    runtime.shutdown().await.expect("shutdown");
    let report = env.check("d-broker-outage", dups).await;
    println!(
        "d-broker-outage: {outage:?} down; writes before {ok_before} (failed {failed_before}, slowest {before_ms} ms), \
         during {ok_during} (failed {failed_during}, slowest {during_ms} ms); relay during the outage: \
         {rounds} rounds, {errors} failed rounds, {released} rows given back; idle-in-transaction sessions > 1 s: {idle_in_tx_max}"
    );
    report.assert_pass();
    assert!(report.dead.is_empty(), "an outage made events dead");
    assert_eq!(failed_before + failed_during, 0, "business writes failed");
    assert!(ok_during > 100, "business writes stalled during the outage");
    assert!(during_ms < 2_000, "a business write took {during_ms} ms");
    // At most one claim round per produce timeout (5 s) or backoff step: no hot loop.
    let bound = 4 * outage.as_secs() + 10;
    assert!(
        rounds + errors <= bound,
        "hot loop: {rounds} rounds, {errors} errors"
    );
    assert_eq!(
        idle_in_tx_max, 0,
        "a transaction stayed open during the outage"
    );
    env.db.cleanup().await;
}

/// e. Transient failure, permanent failure, panic and retries exhausted, among normal
/// traffic on other keys: retries follow the backoff (database clock), the dead end
/// dead with their reason, a panic is retried and the consumer keeps going, other keys
/// flow while one is parked.
async fn handler_failures<B: ChaosBackend>() {
    init_tracing();
    let broker = TestBroker::mock().await;
    let env = ChaosEnv::<B>::new(&broker, 3).await;
    let config = chaos_config(); // backoff 200 ms doubling, cap 2 s
    let runtime = env.runtime(&broker, 1, true, config.clone()).await;
    let outbox = env.outbox();
    let publish = |key: &'static str, script: Script, max_retries: Option<u32>| {
        let outbox = outbox.clone();
        async move {
            match publish_ledgered(
                &outbox,
                key,
                script,
                PublishOptions {
                    max_retries,
                    ..PublishOptions::default()
                },
                true,
            )
            .await
            {
                Written::Committed(id, _) => id,
                other => panic!("publish {key}: {other:?}"),
            }
        }
    };
    let flaky = publish(
        "flaky",
        Script {
            fail_times: 2,
            ..Script::default()
        },
        None,
    )
    .await;
    let flaky_next = publish("flaky", Script::default(), None).await;
    let doomed = publish(
        "doomed",
        Script {
            always_fail: true,
            ..Script::default()
        },
        Some(5),
    )
    .await;
    let doomed_next = publish("doomed", Script::default(), None).await;
    let refused = publish(
        "refused",
        Script {
            permanent: true,
            ..Script::default()
        },
        None,
    )
    .await;
    let panicky = publish(
        "panicky",
        Script {
            panic_times: 1,
            ..Script::default()
        },
        None,
    )
    .await;
    let load = Load::new(300, 20).run(&outbox).await;

    // Other keys flow while "doomed" is still retrying (its 5 attempts take >= 3.0 s).
    let pool = env.pool().clone();
    let table = env.table.clone();
    let doomed_open = poll(
        "the other keys to be consumed",
        Duration::from_secs(60),
        || async {
            let rows = B::fetch_all(&pool, &table.parse().unwrap(), &"task".parse().unwrap())
                .await
                .ok()?;
            let others_done = rows
                .iter()
                .filter(|r| r.key.as_deref().is_some_and(|k| k.starts_with('k')))
                .all(|r| r.status == Status::Consumed);
            let doomed_row = rows.iter().find(|r| r.event_id == doomed.0)?;
            others_done.then_some(!doomed_row.status.is_terminal())
        },
    )
    .await;
    env.settled(Duration::from_secs(60)).await;
    let dups = consumer_duplicates(&[&runtime]);
    runtime.shutdown().await.expect("shutdown");

    let name = format!("e-handler-failures[{}]", B::BACKEND_NAME);
    let report = env.check(&name, dups).await;
    report.assert_pass();
    let row = |id: EventId| {
        let pool = env.pool().clone();
        let table = env.table.clone();
        async move {
            B::fetch(&pool, &table.parse().unwrap(), id.0)
                .await
                .unwrap()
                .expect("row")
        }
    };
    let secs = |a: chrono::DateTime<chrono::Utc>, b: chrono::DateTime<chrono::Utc>| {
        (b - a).num_milliseconds() as f64 / 1000.0
    };
    // Backoff schedule 0.2, 0.4, 0.8, 1.6, 2.0 (cap) s; max_retries 5: dead at the 5th failure.
    let f = row(flaky).await;
    assert_eq!((f.status, f.attempts), (Status::Consumed, 2), "{f:?}");
    let flaky_took = secs(f.created_at, f.consumed_at.unwrap());
    assert!(flaky_took >= 0.6, "flaky consumed after {flaky_took}s");
    let d = row(doomed).await;
    assert_eq!((d.status, d.attempts), (Status::Dead, 5), "{d:?}");
    let reason = d.last_error.clone().unwrap_or_default();
    assert!(reason.contains("retries exhausted"), "{reason}");
    let doomed_took = secs(d.created_at, d.dead_at.unwrap());
    assert!(
        (3.0..20.0).contains(&doomed_took),
        "dead after {doomed_took}s, expected 0.2+0.4+0.8+1.6 = 3.0 s plus processing"
    );
    let r = row(refused).await;
    assert_eq!((r.status, r.attempts), (Status::Dead, 1), "{r:?}");
    assert!(r
        .last_error
        .as_deref()
        .unwrap_or_default()
        .contains("scripted permanent failure"));
    let p = row(panicky).await;
    assert_eq!((p.status, p.attempts), (Status::Consumed, 1), "{p:?}");
    for id in [flaky_next, doomed_next] {
        assert_eq!(row(id).await.status, Status::Consumed);
    }
    assert!(
        doomed_open,
        "other keys only flowed after the doomed key settled"
    );
    let dn = row(doomed_next).await;
    assert!(
        dn.consumed_at.unwrap() >= d.dead_at.unwrap(),
        "the doomed key's next event overtook it"
    );
    println!(
        "{name}: load {load:?}; flaky consumed after {flaky_took:.2}s (2 failures, \
         backoff 0.2+0.4), doomed dead after {doomed_took:.2}s (5 attempts, backoff 3.0 s), \
         refused dead at once, panicky consumed on attempt 2; other keys done while doomed open: {doomed_open}"
    );
    env.db.cleanup().await;
}

chaos_tests!(handler_failures() {
    chaos_e_handler_failures: Postgres,
    chaos_e_handler_failures_mysql: MySql,
    chaos_e_handler_failures_sqlite: Sqlite,
});

/// f. Malformed records produced straight to the topic (one partition), between good
/// ones. The row is the truth: poison *rows* (written as a legacy writer would: bad
/// JSON, wrong shape, unknown type, newer version) go dead with their specific reason
/// when their faithful record arrives (the consumer runs with no waiting grace); records that disagree with a valid row (no type
/// header, a non-UTF-8 key) are counted mismatches and leave the row alone; records
/// with no readable id, no row, or over the payload limit are skipped. No panic, the
/// offset moves past every one, the neighbours are handled, and once a relay runs the
/// rows the bad records named are delivered for real and handled.
async fn malformed_records<B: ChaosBackend>() {
    init_tracing();
    let broker = TestBroker::mock().await;
    let env = ChaosEnv::<B>::new(&broker, 1).await;
    let table: TableName = env.table.parse().unwrap();
    let service: ServiceName = "task".parse().unwrap();
    // Rows written the way a legacy writer would, bypassing `publish`'s checks. No
    // relay runs yet: they stay pending.
    let rows_to_write: [(&str, i32, String); 7] = [
        ("TaskCreated", 1, "{not json".to_owned()),
        (
            "TaskCreated",
            1,
            r#"{"task_id": 5, "sequence": "x"}"#.to_owned(),
        ),
        (
            "TaskExploded",
            1,
            r#"{"task_id":"raw-2","seq":1}"#.to_owned(),
        ),
        (
            "TaskCreated",
            7,
            r#"{"task_id":"raw-3","seq":1}"#.to_owned(),
        ),
        (
            "TaskCreated",
            1,
            r#"{"task_id":"raw-4","seq":1}"#.to_owned(),
        ),
        (
            "TaskCreated",
            1,
            r#"{"task_id":"raw-5","seq":1}"#.to_owned(),
        ),
        (
            "TaskCreated",
            1,
            r#"{"task_id":"raw-6","seq":1}"#.to_owned(),
        ),
    ];
    let mut raw = Vec::new();
    for (i, (event_type, version, payload)) in rows_to_write.iter().enumerate() {
        let id = EventId::new();
        let key = format!("raw-{i}");
        let mut tx = B::begin(env.pool()).await.unwrap();
        B::insert(
            &mut *tx,
            &table,
            &NewRow {
                event_id: id.0,
                service: &service,
                event_type,
                version: *version,
                key: Some(&key),
                payload,
                max_retries: 20,
                trace_context: None,
            },
        )
        .await
        .unwrap();
        // In the ledger like any committed event (the oracle then knows these rows).
        B::execute_portable(
            &mut *tx,
            "INSERT INTO ledger (event_id, service, event_key, seq) VALUES (?, 'task', ?, 1)",
            &[SqlValue::from(id.to_string()), SqlValue::from(key.as_str())],
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
        raw.push(id);
    }
    let mut good = Vec::new();
    for i in 0..4 {
        let key: &'static str = ["n0", "n1", "n2", "n3"][i];
        match publish_ledgered(
            &env.outbox(),
            key,
            Script::default(),
            PublishOptions::default(),
            true,
        )
        .await
        {
            Written::Committed(id, seq) => good.push((id, key, seq)),
            other => panic!("{other:?}"),
        }
    }
    let rows = B::fetch_all(env.pool(), &table, &service).await.unwrap();
    let row_of = |id: EventId| rows.iter().find(|r| r.event_id == id.0).unwrap().clone();
    let envelope = |id: EventId, key: &str, event_type: &str, version: u32| Envelope {
        event_id: id,
        service: "task".into(),
        event_type: event_type.into(),
        version,
        key: Some(key.into()),
        time: chrono::Utc::now(),
        payload: Vec::new(),
        traceparent: None,
        tracestate: None,
    };
    // The record a relay produces for a row.
    let faithful = |id: EventId| {
        let r = row_of(id);
        (
            r.key.clone().map(String::into_bytes),
            r.payload.clone().into_bytes(),
            Some(
                envelope(
                    id,
                    r.key.as_deref().unwrap(),
                    &r.event_type,
                    r.version as u32,
                )
                .headers(),
            ),
        )
    };

    let producer: FutureProducer = broker
        .client_config()
        .set("message.max.bytes", "2000000")
        .create()
        .unwrap();
    let topic = env.topic.clone();
    let send = |(key, payload, headers): (Option<Vec<u8>>, Vec<u8>, Option<OwnedHeaders>)| {
        let producer = producer.clone();
        let topic = topic.clone();
        async move {
            let mut rec: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(&topic).partition(0).payload(&payload[..]);
            if let Some(k) = &key {
                rec = rec.key(&k[..]);
            }
            if let Some(h) = headers {
                rec = rec.headers(h);
            }
            producer
                .send(rec, Duration::from_secs(10))
                .await
                .map_err(|(e, _)| e)
                .expect("produce");
        }
    };
    let h = |k: &'static str, v: &'static [u8]| Header {
        key: k,
        value: Some(v),
    };

    send(faithful(good[0].0)).await;
    // Poison rows, faithfully relayed: bad JSON, wrong shape, unknown type, newer version.
    send(faithful(raw[0])).await;
    send(faithful(good[1].0)).await;
    send(faithful(raw[1])).await;
    send(faithful(raw[2])).await;
    send(faithful(raw[3])).await;
    send(faithful(good[2].0)).await;
    // No headers at all.
    send((Some(b"x".to_vec()), b"{}".to_vec(), None)).await;
    // A valid id of a valid row, but no source or type header: a mismatch.
    let id4: &'static str = Box::leak(raw[4].to_string().into_boxed_str());
    send((
        Some(b"raw-4".to_vec()),
        row_of(raw[4]).payload.into_bytes(),
        Some(
            OwnedHeaders::new()
                .insert(h(header::ENVELOPE, b"1"))
                .insert(h(header::ID, id4.as_bytes())),
        ),
    ))
    .await;
    // Non-UTF-8 event id header.
    send((
        Some(b"x".to_vec()),
        b"{}".to_vec(),
        Some(
            OwnedHeaders::new()
                .insert(h(header::ENVELOPE, b"1"))
                .insert(h(header::ID, &[0xff, 0xfe, 0x00])),
        ),
    ))
    .await;
    // Non-UTF-8 record key, valid id of a valid row: a mismatch.
    let (_, p5, h5) = faithful(raw[5]);
    send((Some(vec![0xff, 0xfe]), p5, h5)).await;
    // A well-formed envelope whose event has no row.
    send((
        Some(b"ghost".to_vec()),
        b"{}".to_vec(),
        Some(envelope(EventId::new(), "ghost", "TaskCreated", 1).headers()),
    ))
    .await;
    // Over the payload limit (950 kB > 900 kB), naming a valid row: skipped.
    let (k6, _, h6) = faithful(raw[6]);
    send((k6, format!("\"{}\"", "x".repeat(950_000)).into_bytes(), h6)).await;
    send(faithful(good[3].0)).await;
    const RECORDS: i64 = 14;

    // No relay runs yet, so nothing would publish a waiting row again: with no grace,
    // the unknown type and the newer version are dead at once, as poison from a legacy
    // writer. (Waiting for a newer consumer is tests/tests/waiting.rs and
    // rolling_deploy.rs.)
    let no_grace = OutboxConfig {
        waiting: Waiting {
            grace: Duration::ZERO,
            ..Waiting::default()
        },
        ..chaos_config()
    };
    let runtime = env.runtime(&broker, 0, true, no_grace).await;
    let stats = runtime.consumer_stats("task").unwrap().clone();
    let pool = env.pool().clone();
    let (t, s) = (table.clone(), service.clone());
    let (poison, forged) = (raw[..4].to_vec(), raw[4..].to_vec());
    poll(
        "the neighbours handled, the poison rows dead, every record looked at",
        Duration::from_secs(60),
        || async {
            let rows = B::fetch_all(&pool, &t, &s).await.ok()?;
            let status = |id: &EventId| rows.iter().find(|r| r.event_id == id.0).unwrap().status;
            let poisoned = poison.iter().all(|id| status(id) == Status::Dead);
            let neighbours = rows.iter().filter(|r| r.status == Status::Consumed).count() == 4;
            let looked_at = stats.skipped.load(Ordering::Relaxed) >= 4
                && stats.mismatched.load(Ordering::Relaxed) >= 2;
            (poisoned && neighbours && looked_at).then_some(())
        },
    )
    .await;
    let rows = B::fetch_all(env.pool(), &table, &service).await.unwrap();
    for id in &forged {
        let r = rows.iter().find(|r| r.event_id == id.0).unwrap();
        assert_eq!(
            (r.status, r.attempts, r.last_error.as_deref()),
            (Status::Pending, 0, None),
            "a bad record changed row {id}"
        );
    }
    assert_eq!(
        stats.skipped.load(Ordering::Relaxed),
        4,
        "no headers, bad id, no row, oversized"
    );
    assert_eq!(
        stats.mismatched.load(Ordering::Relaxed),
        2,
        "no type header, non-UTF-8 key"
    );
    let group = env.catalog.route("task").unwrap().group().clone();

    // The committed offset is past the last record.
    poll("the offsets committed", Duration::from_secs(30), || {
        let broker = &broker;
        let topic = env.topic.clone();
        let group = group.clone();
        async move {
            let consumer: BaseConsumer = broker
                .client_config()
                .set("group.id", group.as_str())
                .create()
                .unwrap();
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(&topic, 0);
            let committed = tokio::task::spawn_blocking(move || {
                consumer
                    .committed_offsets(tpl, Duration::from_secs(10))
                    .ok()
            })
            .await
            .unwrap()?;
            let offset = committed.find_partition(&topic, 0)?.offset();
            (offset == Offset::Offset(RECORDS)).then_some(offset)
        }
    })
    .await;

    // A relay delivers the rows the bad records named, for real: handled.
    let relay = env.runtime(&broker, 1, false, chaos_config()).await;
    poll(
        "the rows named by bad records handled",
        Duration::from_secs(60),
        || async {
            let rows = B::fetch_all(env.pool(), &table, &service).await.ok()?;
            forged
                .iter()
                .all(|id| {
                    rows.iter()
                        .any(|r| r.event_id == id.0 && r.status == Status::Consumed)
                })
                .then_some(())
        },
    )
    .await;
    relay.shutdown().await.expect("relay shutdown");
    let dups = consumer_duplicates(&[&runtime]);
    runtime.shutdown().await.expect("shutdown");

    let name = format!("f-malformed-records[{}]", B::BACKEND_NAME);
    let report = env.check(&name, dups).await;
    report.assert_pass();
    let reasons = report.dead_reasons();
    let expect = [
        (raw[0], "undecodable payload"),
        (raw[1], "undecodable payload"),
        (raw[2], "unknown event type `TaskExploded`"),
        (raw[3], "schema version 7, newer than the handler's 1"),
    ];
    for (id, want) in expect {
        let got = reasons.get(id.to_string().as_str()).copied().unwrap_or("");
        assert!(got.contains(want), "row {id}: `{got}` lacks `{want}`");
        println!("  dead {id}: {got}");
    }
    assert_eq!(
        report.applied,
        4 + 3,
        "the four neighbours and the three rows bad records named"
    );
    assert_eq!(report.dead.len(), 4);
    println!(
        "{name}: {RECORDS} records, 4 good handled, 4 poison rows dead with reasons, 2 mismatches \
         and 1 oversized record left their rows alone (handled once relayed), 4 skipped"
    );
    env.db.cleanup().await;
}

chaos_tests!(malformed_records() {
    chaos_f_malformed_records: Postgres,
    chaos_f_malformed_records_mysql: MySql,
    chaos_f_malformed_records_sqlite: Sqlite,
});

/// h. Consumer group churn on the mock cluster: one of two consumers is stopped and a
/// new one started every 2-4 s for 30 s (2 min soak), under load: effects once,
/// everything consumed after.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_h_consumer_group_churn() {
    init_tracing();
    let broker = TestBroker::mock().await;
    let env = ChaosEnv::<Postgres>::new(&broker, 3).await;
    let relay = env.runtime(&broker, 1, false, chaos_config()).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = paced_writer(
        env.outbox(),
        40,
        Duration::from_millis(20),
        stop.clone(),
        Arc::new(AtomicU64::new(0)),
    );
    let mut consumers = vec![
        env.runtime(&broker, 0, true, chaos_config()).await,
        env.runtime(&broker, 0, true, chaos_config()).await,
    ];
    let mut dups = 0;
    let mut handled = 0;
    let mut restarts = 0;
    let t = Instant::now();
    let churn = Duration::from_secs(soak(30, 120));
    while t.elapsed() < churn {
        let pause = Duration::from_millis(2_000 + rand::random::<u64>() % 2_000);
        tokio::time::sleep(pause).await; // keeps the fault pattern going
        let i = rand::random::<usize>() % consumers.len();
        let old = consumers.swap_remove(i);
        let s = old.consumer_stats("task").unwrap().clone();
        old.shutdown().await.expect("consumer shutdown");
        dups += s.duplicates.load(Ordering::Relaxed);
        handled += s.handled.load(Ordering::Relaxed);
        consumers.push(env.runtime(&broker, 0, true, chaos_config()).await);
        restarts += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let (written, failed) = writer.await.unwrap();
    env.settled(Duration::from_secs(90)).await;
    for c in consumers {
        let s = c.consumer_stats("task").unwrap().clone();
        c.shutdown().await.expect("consumer shutdown");
        dups += s.duplicates.load(Ordering::Relaxed);
        handled += s.handled.load(Ordering::Relaxed);
    }
    relay.shutdown().await.expect("relay shutdown");
    let report = env.check("h-consumer-churn", dups).await;
    println!(
        "h-consumer-churn: {churn:?}, {restarts} consumer restarts, {written} events written \
         ({failed} failed), {handled} handled, {dups} duplicate deliveries"
    );
    report.assert_pass();
    assert!(report.dead.is_empty());
    assert_eq!(report.unledgered_rows, 0);
    assert_eq!(failed, 0);
    env.db.cleanup().await;
}
