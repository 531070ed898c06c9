//! Per-key order with four relays: 20 hot keys on PostgreSQL through the mock cluster,
//! one key's head failing a few times. Checks, from the topic and from the handler
//! effects:
//! - handlers saw every key's events in order, each exactly once;
//! - in the topic, the first record of each event comes in per-key order (later
//!   records of an event are the re-publishes of retries and deferrals);
//! - no row was produced twice except for those re-publishes (no crash here, so no
//!   lost lease; a mark is only fenced when the consumer settled the row first).
//!
//! And: a relay whose claims came back short (so it claims within a window of the
//! oldest due rows) still finds heads of key behind a parked key's long backlog.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use outbox_runtime::{Backend, Outbox, OutboxRuntime, Postgres};
use outbox_tests::broker::TestBroker;
use outbox_tests::db::TestPg;
use outbox_tests::e2e::{create_effects, eventually, fresh_catalog, test_config, TestBackend};
use outbox_tests::services::{Script, Task, TaskCreated};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

const KEYS: u32 = 20;
const PER_KEY: u32 = 15;
const RELAYS: usize = 4;
const HEAD_FAILURES: u32 = 3;
const PARTITIONS: i32 = 3;

async fn publish_round(outbox: &Outbox<Task, Postgres>, seqs: std::ops::Range<u32>) {
    // Round-robin over keys, one transaction per event, so ids of keys interleave.
    for seq in seqs {
        for k in 0..KEYS {
            let script = if k == 0 && seq == 0 {
                Script {
                    fail_times: HEAD_FAILURES,
                    ..Script::default()
                }
            } else {
                Script::default()
            };
            let mut tx = outbox.begin().await.expect("begin");
            tx.publish(&TaskCreated {
                task_id: format!("hot-{k}"),
                seq,
                script,
            })
            .await
            .expect("publish");
            tx.commit().await.expect("commit");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_relays_keep_per_key_order_with_a_failing_head() {
    let broker = TestBroker::mock().await;
    let db = TestPg::create().await;
    let pool = db.pool().clone();
    create_effects(&pool).await;
    let catalog = fresh_catalog(&broker).await;
    let route = catalog.route("task").expect("task route").clone();
    let outbox = Outbox::<Task, Postgres>::with_config(pool.clone(), &catalog, test_config())
        .expect("outbox");
    outbox.migrate().await.expect("migrate");

    // A backlog first, so the four relays start by competing for it...
    publish_round(&outbox, 0..PER_KEY / 2).await;
    let handle = OutboxRuntime::new(catalog.clone(), pool.clone(), broker_config(&broker))
        .config(test_config())
        .services(["task"])
        .relays_per_service(RELAYS)
        .start()
        .await
        .expect("runtime");
    // ...then more while they run.
    publish_round(&outbox, PER_KEY / 2..PER_KEY).await;
    let total = u64::from(KEYS * PER_KEY);

    eventually("every event consumed", Duration::from_secs(45), || {
        let pool = pool.clone();
        let table = route.table().clone();
        async move {
            let c = Postgres::counts(&pool, &table, &"task".parse().unwrap())
                .await
                .expect("counts");
            (c.consumed == total).then_some(())
        }
    })
    .await;
    let relay_stats: Vec<_> = handle.relay_stats("task").to_vec();
    let consumer = handle
        .consumer_stats("task")
        .expect("consumer stats")
        .clone();
    assert_eq!(relay_stats.len(), RELAYS);
    handle.shutdown().await.expect("shutdown");

    // Handler effects: every key in order, every event once.
    let effects = Postgres::effects(&pool).await;
    assert_eq!(effects.len() as u64, total, "one effect per event");
    let mut by_key: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for e in &effects {
        by_key.entry(e.event_key.clone()).or_default().push(e.seq);
    }
    assert_eq!(by_key.len() as u32, KEYS);
    for (key, seqs) in &by_key {
        let expected: Vec<i64> = (0..i64::from(PER_KEY)).collect();
        assert_eq!(seqs, &expected, "handler order of key {key}");
    }
    let head = effects
        .iter()
        .find(|e| e.event_key == "hot-0" && e.seq == 0)
        .expect("the failing head was handled");
    assert_eq!(head.attempt, i64::from(HEAD_FAILURES) + 1);

    // Publish counts: every row once, plus one re-publish per retry and per deferral.
    let published: u64 = relay_stats
        .iter()
        .map(|s| s.published.load(Ordering::Relaxed))
        .sum();
    let fenced: u64 = relay_stats
        .iter()
        .map(|s| s.fenced.load(Ordering::Relaxed))
        .sum();
    let retried = consumer.retried.load(Ordering::Relaxed);
    let deferred = consumer.deferred.load(Ordering::Relaxed);
    assert_eq!(retried, u64::from(HEAD_FAILURES), "the head's retries");
    // A mark finds its lease gone, without any crash, when the consumer settled the
    // row first (handled it, or deferred or retried it, which resets the lease) before
    // the relay's mark landed: that record was still produced once. So every produced
    // record is marked or fenced, and a row produced twice without a retry or a
    // deferral (a lost lease) would break this count.
    assert_eq!(
        published + fenced,
        total + retried + deferred,
        "rows produced more often than retries and deferrals explain (published {published}, fenced {fenced})"
    );
    assert!(
        relay_stats
            .iter()
            .filter(|s| s.published.load(Ordering::Relaxed) > 0)
            .count()
            >= 2,
        "the relays shared the work: {:?}",
        relay_stats
            .iter()
            .map(|s| s.published.load(Ordering::Relaxed))
            .collect::<Vec<_>>()
    );

    // The topic: as many records as were produced, first records in per-key order.
    let produced = published + fenced;
    let records = read_topic(&broker, route.topic().as_str(), produced as usize).await;
    assert_eq!(records.len() as u64, produced, "records in the topic");
    let mut seen: HashSet<String> = HashSet::new();
    let mut first_seq: HashMap<String, i64> = HashMap::new();
    let mut violations = Vec::new();
    for (key, seq, event_id) in &records {
        if !seen.insert(event_id.clone()) {
            continue; // a re-publish after a retry or deferral
        }
        if let Some(prev) = first_seq.insert(key.clone(), *seq) {
            if *seq <= prev {
                violations.push(format!("key {key}: seq {seq} first seen after {prev}"));
            }
        }
    }
    assert_eq!(seen.len() as u64, total, "every event reached the topic");
    assert!(
        violations.is_empty(),
        "per-key order violations: {violations:?}"
    );

    db.cleanup().await;
}

/// The relay's claim fallback (`relay.rs` `claim_batch`): once a claim comes back short,
/// the relay claims among the oldest `4 × batch` due rows only, and runs the full claim
/// again at most once per poll interval. A parked head (not due for an hour) whose key
/// has a backlog longer than that window fills the window with rows that are not heads;
/// new events of other keys behind it must still go out, and none of the parked key's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn heads_behind_a_parked_keys_backlog_go_out() {
    const BATCH: u32 = 10;
    const PARKED_BACKLOG: u32 = 100; // > 4 × BATCH
    const OTHERS: u32 = 20;
    let broker = TestBroker::mock().await;
    let db = TestPg::create().await;
    let pool = db.pool().clone();
    let catalog = fresh_catalog(&broker).await;
    let route = catalog.route("task").expect("task route").clone();
    let config = outbox_runtime::OutboxConfig {
        relay_batch_size: BATCH,
        relay_poll_interval: Duration::from_millis(200),
        ..test_config()
    };
    let outbox = Outbox::<Task, Postgres>::with_config(pool.clone(), &catalog, config.clone())
        .expect("outbox");
    outbox.migrate().await.expect("migrate");
    let publish = |key: String, seq: u32| {
        let outbox = outbox.clone();
        async move {
            let mut tx = outbox.begin().await.expect("begin");
            tx.publish(&TaskCreated {
                task_id: key,
                seq,
                script: Script::default(),
            })
            .await
            .expect("publish");
            tx.commit().await.expect("commit");
        }
    };
    for seq in 0..=PARKED_BACKLOG {
        publish("parked".into(), seq).await;
    }
    // Park the head, as a failed delivery's backoff would.
    let parked = sqlx::query(&format!(
        "UPDATE {} SET next_attempt_at = now() + interval '1 hour' \
          WHERE id = (SELECT min(id) FROM {0} WHERE event_key = $1)",
        route.table()
    ))
    .bind("parked")
    .execute(&pool)
    .await
    .expect("park");
    assert_eq!(parked.rows_affected(), 1);

    let handle = OutboxRuntime::new(catalog.clone(), pool.clone(), broker_config(&broker))
        .config(config)
        .services(["task"])
        .consumers(false)
        .start()
        .await
        .expect("runtime");
    // Nothing is claimable: the first claim comes back short, so the relay is in window
    // mode from then on.
    let stats = handle.relay_stats("task")[0].clone();
    eventually("a short claim", Duration::from_secs(10), || {
        let stats = stats.clone();
        async move { (stats.idles.load(Ordering::Relaxed) > 0).then_some(()) }
    })
    .await;
    for k in 0..OTHERS {
        publish(format!("other-{k}"), 0).await;
    }
    let counts = eventually(
        "the other keys' heads published",
        Duration::from_secs(20),
        || {
            let pool = pool.clone();
            let table = route.table().clone();
            async move {
                let rows: Vec<(String, i16)> =
                    sqlx::query_as(&format!("SELECT event_key, status FROM {table}"))
                        .fetch_all(&pool)
                        .await
                        .expect("rows");
                let published = |prefix: &str| {
                    rows.iter()
                        .filter(|(k, s)| k.starts_with(prefix) && *s != 0)
                        .count()
                };
                let (others, parked) = (published("other-"), published("parked"));
                (others == OTHERS as usize).then_some(parked)
            }
        },
    )
    .await;
    assert_eq!(counts, 0, "nothing of the parked key went out");
    handle.shutdown().await.expect("shutdown");
    db.cleanup().await;
}

fn broker_config(broker: &TestBroker) -> outbox_runtime::KafkaConfig {
    outbox_runtime::KafkaConfig::new(broker.bootstrap_servers())
}

/// Reads `topic` from the beginning until `expect` records arrived (30 s deadline):
/// (key, seq, event id) in partition order, partitions concatenated (a key lives in
/// one partition).
async fn read_topic(broker: &TestBroker, topic: &str, expect: usize) -> Vec<(String, i64, String)> {
    let consumer: BaseConsumer = broker
        .client_config()
        .set("group.id", format!("{topic}.readback"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("read-back consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .expect("partition");
    }
    consumer.assign(&tpl).expect("assign");
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while out.len() < expect && Instant::now() < deadline {
            let Some(m) = consumer.poll(Duration::from_millis(100)) else {
                continue;
            };
            let m = m.expect("read-back record");
            let event: TaskCreated =
                serde_json::from_slice(m.payload().expect("payload")).expect("a TaskCreated");
            let id = m
                .headers()
                .and_then(|h| {
                    h.iter()
                        .find(|h| h.key == "ce_id")
                        .and_then(|h| h.value)
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                })
                .expect("ce_id header");
            out.push((event.task_id, i64::from(event.seq), id));
        }
        out
    })
    .await
    .expect("read-back task")
}
