//! The metrics a runtime reports through the `metrics` facade, read back from a
//! recording recorder after a scripted run, on every backend with the mock cluster:
//! 10 good events, one that fails once, one that fails until its 2 attempts are used up,
//! one refused permanently, a row with an undecodable payload and a row of a type no
//! consumer knows (grace 1 s). Counters exact, histograms with one sample per handled
//! event, gauges reaching an empty backlog with the 4 dead rows.
//!
//! The recorder is global to the process: nextest runs each test in a process of its
//! own, so the three backends' tests never share one.

use std::collections::HashMap;
use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use outbox_runtime::backend::NewRow;
use outbox_runtime::metrics as m;
use outbox_runtime::{Backend, EventId, OutboxConfig, PublishOptions, Waiting};
use outbox_tests::broker::TestBroker;
use outbox_tests::db::TestDatabase;
use outbox_tests::e2e::{eventually, prepare, runtime_of, test_config, TestBackend};
use outbox_tests::services::{Notification, NotificationRequested, Script};

const SERVICE: &str = "notification";

/// What the recorder recorded, accumulated over snapshots (a `DebuggingRecorder`
/// snapshot drains counters, gauges and histograms): counters summed, histogram
/// samples kept, gauges as of the last snapshot that saw them set.
#[derive(Default)]
struct Recorded {
    counters: HashMap<String, u64>,
    gauges: HashMap<String, f64>,
    histograms: HashMap<String, Vec<f64>>,
}

impl Recorded {
    /// Takes a snapshot of service `SERVICE`'s metrics into this. Returns the gauges it
    /// saw.
    fn take(&mut self, s: &Snapshotter) -> HashMap<String, f64> {
        let mut seen = HashMap::new();
        for (key, _, _, value) in s.snapshot().into_vec() {
            let key = key.key();
            if !key
                .labels()
                .any(|l| l.key() == "service" && l.value() == SERVICE)
            {
                continue;
            }
            let mut id = key.name().to_owned();
            let mut labels: Vec<_> = key
                .labels()
                .filter(|l| l.key() != "service")
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            labels.sort();
            for l in labels {
                id.push(' ');
                id.push_str(&l);
            }
            match value {
                DebugValue::Counter(n) => *self.counters.entry(id).or_default() += n,
                DebugValue::Gauge(g) => {
                    seen.insert(id.clone(), g.into_inner());
                    self.gauges.insert(id, g.into_inner());
                }
                DebugValue::Histogram(h) => self
                    .histograms
                    .entry(id)
                    .or_default()
                    .extend(h.into_iter().map(|v| v.into_inner())),
            }
        }
        seen
    }

    fn counter(&self, id: &str) -> u64 {
        self.counters.get(id).copied().unwrap_or(0)
    }

    fn samples(&self, id: &str) -> &[f64] {
        self.histograms.get(id).map_or(&[], Vec::as_slice)
    }
}

async fn scripted_run<T: TestDatabase>()
where
    T::DB: TestBackend,
{
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    recorder
        .install()
        .expect("the only recorder of this process");

    let db = T::create().await;
    let pool = db.pool().clone();
    let broker = TestBroker::mock().await;
    let catalog = prepare(&pool, &broker).await;
    let config = OutboxConfig {
        waiting: Waiting {
            recheck: Duration::from_millis(300),
            grace: Duration::from_secs(1),
        },
        metrics_interval: Some(Duration::from_millis(200)),
        ..test_config()
    };
    let outbox = outbox_runtime::Outbox::<Notification, T::DB>::with_config(
        pool.clone(),
        &catalog,
        config.clone(),
    )
    .unwrap();
    let mut tx = outbox.begin().await.unwrap();
    let publish = |user: String, script: Script, max_retries: Option<u32>| {
        (
            NotificationRequested {
                user_id: user,
                seq: 0,
                script,
            },
            PublishOptions {
                max_retries,
                ..PublishOptions::default()
            },
        )
    };
    let mut events = Vec::new();
    for i in 0..10 {
        events.push(publish(format!("good-{i}"), Script::default(), None));
    }
    events.push(publish(
        "flaky".into(),
        Script {
            fail_times: 1,
            ..Script::default()
        },
        None,
    ));
    events.push(publish(
        "doomed".into(),
        Script {
            always_fail: true,
            ..Script::default()
        },
        Some(2),
    ));
    events.push(publish(
        "refused".into(),
        Script {
            permanent: true,
            ..Script::default()
        },
        None,
    ));
    for (event, options) in &events {
        tx.publish_with(event, options.clone()).await.unwrap();
    }
    // Rows as a broken or newer writer leaves them.
    for (event_type, payload) in [
        ("NotificationRequested", "{"),
        ("notification.Snoozed", "{}"),
    ] {
        T::DB::insert(
            tx.transaction(),
            &"notification_outbox".parse().unwrap(),
            &NewRow {
                event_id: EventId::new().0,
                service: &SERVICE.parse().unwrap(),
                event_type,
                version: 1,
                key: None,
                payload,
                max_retries: 20,
                trace_context: None,
            },
        )
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();

    let runtime = runtime_of(&pool, &catalog, &broker, config, SERVICE).await;
    eventually("every event settled", Duration::from_secs(60), || async {
        let rows = T::DB::fetch_all(
            &pool,
            &"notification_outbox".parse().unwrap(),
            &SERVICE.parse().unwrap(),
        )
        .await
        .ok()?;
        rows.iter().all(|r| r.status.is_terminal()).then_some(())
    })
    .await;
    // The gauges follow within a sampling interval (one snapshot sees all seven set
    // together by one sample).
    let mut rec = Recorded::default();
    let gauges = eventually(
        "the gauges at an empty backlog",
        Duration::from_secs(30),
        || {
            let seen = rec.take(&snap);
            async move {
                let at = |g: &str| seen.get(g).copied();
                let zero = [
                    m::PENDING,
                    m::DUE,
                    m::UNCONSUMED,
                    m::WAITING_ROWS,
                    m::OLDEST_DUE,
                ]
                .iter()
                .all(|g| at(g) == Some(0.0));
                let caught_up = seen
                    .iter()
                    .any(|(k, v)| k.starts_with(m::CONSUMER_LAG) && *v == 0.0);
                (zero && at(m::DEAD_ROWS) == Some(4.0) && caught_up).then_some(seen)
            }
        },
    )
    .await;
    runtime.shutdown().await.unwrap();

    rec.take(&snap);
    let t = "event_type=NotificationRequested";
    let dead = |reason: &str| rec.counter(&format!("{} reason={reason}", m::DEAD));
    let report = format!(
        "consumed {}, retried {}, dead permanent {} exhausted {} undecodable {} unknown_type {}, \
         waiting {}, published {}, relayed {}; gauges {gauges:?}",
        rec.counter(m::CONSUMED),
        rec.counter(&format!("{} {t}", m::RETRIED)),
        dead("permanent"),
        dead("exhausted"),
        dead("undecodable"),
        dead("unknown_type"),
        rec.counter(&format!("{} reason=unknown_type", m::WAITING)),
        rec.counter(m::PUBLISHED),
        rec.counter(m::RELAYED),
    );
    println!("[{}] {report}", T::LABEL);
    assert_eq!(rec.counter(m::CONSUMED), 11, "{report}");
    assert_eq!(
        rec.counter(&format!("{} {t}", m::RETRIED)),
        2,
        "flaky once, doomed once: {report}"
    );
    assert_eq!(dead("permanent"), 1, "{report}");
    assert_eq!(dead("exhausted"), 1, "{report}");
    assert_eq!(dead("undecodable"), 1, "{report}");
    assert_eq!(dead("unknown_type"), 1, "{report}");
    assert_eq!(dead("too_large"), 0, "{report}");
    assert!(
        rec.counter(&format!("{} reason=unknown_type", m::WAITING)) >= 1,
        "{report}"
    );
    // Every row was claimed and acknowledged at least once; retries and waits again.
    assert!(rec.counter(m::PUBLISHED) >= 15, "{report}");
    assert!(rec.counter(m::RELAYED) >= 15, "{report}");
    // One sample per handled event; latencies positive and plausible.
    for name in [m::COMMIT_TO_HANDLED, m::ACK_TO_HANDLED] {
        let v = rec.samples(name);
        assert_eq!(v.len(), 11, "{name}: {v:?}");
        assert!(v.iter().all(|s| (0.0..60.0).contains(s)), "{name}: {v:?}");
    }
    assert_eq!(rec.samples(&format!("{} {t}", m::HANDLER)).len(), 11);
    assert!(rec.samples(m::COMMIT_TO_ACK).len() >= 15);
    assert!(!rec.samples(m::CLAIM).is_empty());
    assert!(!rec.samples(m::MARK).is_empty());
    assert!(!rec.samples(m::BATCH_SIZE).is_empty());
    // The consumer's lag per partition, from the client's statistics.
    let lag: Vec<_> = rec
        .gauges
        .iter()
        .filter(|(k, _)| k.starts_with(m::CONSUMER_LAG))
        .collect();
    assert!(!lag.is_empty(), "no consumer lag gauge: {:?}", rec.gauges);
    db.cleanup().await;
}

outbox_tests::every_backend!(scripted_run);
