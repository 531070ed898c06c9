//! Fault suite, the broker's side as production sees it: relays and consumers in worker
//! processes of their own (`chaos-worker`), a real broker (a private tansu) SIGKILLed and
//! started again with empty memory, a zombie relay whose producer gets fenced, a round
//! that fails while the next batch is in flight, and records written onto the task topic
//! by outsiders (a record too big to fetch, forged records carrying real event ids). Each scenario ends with the ledger oracle's check
//! and "stuck 0" (every committed event consumed, or dead with a reason, within a
//! deadline), prints its `ORACLE ...` line and the figures RELIABILITY.md reports.
//!
//! The bodies are generic over the backend (`ChaosBackend`); they run on PostgreSQL.
//! Scenarios k, m, n and q's tansu variant need tansu (`scripts/tansu.sh install`;
//! skipped without it unless `OUTBOX_TEST_REQUIRE_KAFKA=1`); l and q run on librdkafka's
//! mock cluster too, whose fault injection can fence a producer or fail every produce.
//!
//! Every check that fails is collected and reported together, naming the counter or the
//! rows that broke the expectation.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox_runtime::envelope::{header, Envelope};
use outbox_runtime::{EventId, PublishOptions, Status};
use outbox_tests::broker::{PrivateTansu, TestBroker};
use outbox_tests::chaos::{
    init_tracing, poll, soak, ChaosBackend, ChaosEnv, Load, Worker, WorkerStats,
};
use outbox_tests::chaos_tests;
use outbox_tests::db::TestDatabase;
use outbox_tests::oracle::{publish_ledgered, Report, Written};
use outbox_tests::services::Script;
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use sqlx::Postgres;

const WORKER: &str = env!("CARGO_BIN_EXE_chaos-worker");

/// Relay lease of the workers: long enough for a round to wait out a produce timeout
/// (5 s, `chaos_kafka`) without another relay taking its rows over.
const LEASE: Duration = Duration::from_secs(5);

/// The goal: relays and consumers active again within this long of the broker's return.
const BACK_GOAL: Duration = Duration::from_secs(10);
/// What the tests assert (generously); the figures say exactly how long it took.
const BACK_LIMIT: Duration = Duration::from_secs(30);

/// Failed expectations of one scenario, reported together at the end.
#[derive(Default)]
struct Failures(Vec<String>);

impl Failures {
    fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            self.0.push(what());
        }
    }

    /// The oracle's pass criteria, each broken one named with its rows.
    fn oracle(&mut self, report: &Report) {
        let sample = |v: &[String]| v.iter().take(5).cloned().collect::<Vec<_>>().join("; ");
        self.check(report.lost.is_empty(), || {
            format!("lost {}: {}", report.lost.len(), sample(&report.lost))
        });
        self.check(report.phantom.is_empty(), || {
            format!(
                "phantom {}: {}",
                report.phantom.len(),
                sample(&report.phantom)
            )
        });
        self.check(report.effect_duplicates == 0, || {
            format!(
                "effect duplicates {}: {}",
                report.effect_duplicates,
                sample(&report.duplicated)
            )
        });
        self.check(report.order_violations.is_empty(), || {
            format!(
                "order violations {}: {}",
                report.order_violations.len(),
                sample(&report.order_violations)
            )
        });
        self.check(report.wrong_effects.is_empty(), || {
            format!(
                "wrong effects {}: {}",
                report.wrong_effects.len(),
                sample(&report.wrong_effects)
            )
        });
        self.check(report.dead_without_reason == 0, || {
            format!("dead rows without a reason: {}", report.dead_without_reason)
        });
    }

    /// "Stuck 0": the quiesce result.
    fn stuck(&mut self, quiesced: &Result<Duration, String>) {
        if let Err(stuck) = quiesced {
            self.0.push(stuck.clone());
        }
    }

    fn assert_none(self, scenario: &str) {
        assert!(
            self.0.is_empty(),
            "{scenario} FAILED {} check(s):\n- {}",
            self.0.len(),
            self.0.join("\n- ")
        );
    }
}

fn secs(d: Option<Duration>) -> String {
    d.map_or("never".into(), |d| format!("{:.2} s", d.as_secs_f64()))
}

/// The relay and consumer counters a figure line shows.
fn counters(s: &WorkerStats) -> String {
    format!(
        "published {} released {} fenced {} rounds {} errors {} producer_restarts {} \
         failed_probes {} redelivered_lost {} | handled {} duplicates {} deferred {} retried {} \
         dead {} skipped {} mismatched {} not_due {} republished {} db_retries {}",
        s.published,
        s.released,
        s.fenced,
        s.rounds,
        s.relay_errors,
        s.producer_restarts,
        s.failed_probes,
        s.redelivered_lost,
        s.handled,
        s.duplicates,
        s.deferred,
        s.retried,
        s.consumer_dead,
        s.skipped,
        s.mismatched,
        s.not_due,
        s.republished,
        s.db_retries
    )
}

/// The outbox rows of the events the oracle found applied twice (up to 5), for the
/// failure message: their state tells which path sent them again.
async fn duplicated_rows<B: ChaosBackend>(env: &ChaosEnv<B>, report: &Report) -> String {
    if report.duplicated.is_empty() {
        return String::new();
    }
    let rows = B::fetch_all(
        env.pool(),
        &env.table.parse().unwrap(),
        &"task".parse().unwrap(),
    )
    .await
    .expect("reading the outbox");
    let mut text = String::from("rows of events applied twice:");
    for d in report.duplicated.iter().take(5) {
        let id = d.split_whitespace().nth(1).unwrap_or_default();
        if let Some(r) = rows.iter().find(|r| r.event_id.to_string() == id) {
            text.push_str(&format!(
                "\n  {d}: row {} {:?} attempts {} created {} published {:?} consumed {:?} \
                 updated {}",
                r.id,
                r.status,
                r.attempts,
                r.created_at,
                r.published_at,
                r.consumed_at,
                r.updated_at
            ));
        }
    }
    text
}

/// A private tansu for `test` when `real` (with its broker), else the mock cluster;
/// `None` when tansu is wanted and not installed (the test is skipped).
async fn tansu_or_mock(real: bool, test: &str) -> Option<(Option<PrivateTansu>, TestBroker)> {
    if !real {
        return Some((None, TestBroker::mock().await));
    }
    let tansu = PrivateTansu::start_or_skip(test).await?;
    let broker = tansu.broker();
    Some((Some(tansu), broker))
}

/// The last counters of a worker, after a graceful stop (or what it wrote last).
async fn last_stats(w: &mut Worker) -> WorkerStats {
    match w.terminate(Duration::from_secs(15)).await {
        Some(s) => s,
        None => w.stats().unwrap_or_default(),
    }
}

/// k. A real broker's restart: a private tansu (memory storage) SIGKILLed under paced
/// load while a relay worker and a consumer worker run (the consumer SIGSTOPped just
/// before, until 300 acknowledged records wait unconsumed), held down (15 s; 30 s soak),
/// started again on the same port with empty memory. Acknowledged records are gone with
/// it (and the consumer group's offsets, and the producers' ids): the runtime must
/// publish again what was never consumed. Measured from the moment the restarted broker
/// answers: until the relay publishes again, until the consumer handles again, until
/// everything is consumed.
///
/// The topic is recreated (3 partitions, as before) by the test the moment the broker
/// answers, as an operator would. Not auto-created: tansu creates a topic on a metadata
/// request that allows it, with its own default of 4 partitions (the relay's broker probe
/// did, 0.2 s before the operator, while the producer asked for it), which moves keys to
/// other partitions; production clusters usually turn auto-creation off, and the
/// scenarios' producers do not ask for it (`chaos_kafka`).
async fn broker_restart<B: ChaosBackend>() {
    init_tracing();
    let Some(mut tansu) = PrivateTansu::start_or_skip("chaos_k_broker_restart").await else {
        return;
    };
    let broker = tansu.broker();
    let env = ChaosEnv::<B>::new(&broker, 3).await;
    let mut relay = env.worker(&broker, "relay").lease(LEASE).spawn(WORKER);
    let mut consumer = env.worker(&broker, "consumer").spawn(WORKER);
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Load::new(u64::MAX, 50);
    load.writers = 2;
    load.pace = Duration::from_millis(10); // ~150 events/s in all
    let t_load = Instant::now();
    let running = load.spawn_until(&env.outbox(), stop.clone());

    // Traffic flows end to end first.
    consumer
        .wait_stats("events to flow", Duration::from_secs(60), |s| {
            s.handled >= 300
        })
        .await;
    // The consumer falls behind (SIGSTOP) until 300 acknowledged records wait
    // unconsumed: records the broker will lose.
    consumer.stop();
    poll(
        "300 acknowledged records waiting",
        Duration::from_secs(30),
        || async { (env.counts().await.published >= 300).then_some(()) },
    )
    .await;
    let before = (
        relay.fresh_stats(Duration::from_secs(5)).await,
        consumer.stats().unwrap_or_default(),
    );
    let at_kill = env.counts().await;

    tansu.kill();
    consumer.cont();
    let outage = soak(Duration::from_secs(15), Duration::from_secs(30));
    tokio::time::sleep(outage).await; // holds the broker down for the set time
    let t_restart = Instant::now();
    let back = tansu.restart(Duration::from_secs(30)).await;
    let answered_in = back - t_restart;
    // The operator recreates the topic at once.
    let existed = broker.partitions(&env.topic).await;
    broker.create_topic(&env.topic, 3).await;
    let topic_after = back.elapsed();
    let partitions = broker.partitions(&env.topic).await;
    let (r0, c0) = (
        relay.stats().unwrap_or_default(),
        consumer.stats().unwrap_or_default(),
    );

    // Until both work again (or the limit passed), writers still writing.
    let (mut relay_back, mut consumer_back) = (None, None);
    while back.elapsed() < BACK_LIMIT && (relay_back.is_none() || consumer_back.is_none()) {
        let (r, c) = (
            relay.stats().unwrap_or_default(),
            consumer.stats().unwrap_or_default(),
        );
        if relay_back.is_none() && r.published > r0.published {
            relay_back = Some(back.elapsed());
        }
        if consumer_back.is_none() && c.handled > c0.handled {
            consumer_back = Some(back.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Keep writing a while after the return (10 s; 30 s soak).
    let write_after = soak(Duration::from_secs(10), Duration::from_secs(30));
    if let Some(rest) = write_after.checked_sub(back.elapsed()) {
        tokio::time::sleep(rest).await; // load keeps flowing for the set time
    }
    stop.store(true, Ordering::Relaxed);
    let load = running.await.expect("load");
    let wrote_for = t_load.elapsed();
    let quiesced = env.quiesce(Duration::from_secs(45)).await;
    let quiesce_after = back.elapsed();

    let r = last_stats(&mut relay).await;
    let c = last_stats(&mut consumer).await;
    let name = format!("k-broker-restart[{}]", B::BACKEND_NAME);
    let report = env.check(&name, c.duplicates).await;
    println!("{report}");
    // Records the broker acknowledged: marked published, or fenced (the consumer had
    // consumed the row before the relay's mark). A record lost with the broker and
    // published again is counted twice.
    let acked = r.published + r.fenced;
    let per_event = |n: u64| n as f64 / report.committed.max(1) as f64;
    println!(
        "{name}: load {load:?} over {wrote_for:?}; before the kill relay published {} consumer \
         handled {}; at the kill {} rows published and not consumed (lost with the broker), \
         {} pending; broker down {outage:?}, answered {:.2} s after the restart, topic \
         recreated {:.2} s after it answered (before: {existed:?}; after: {partitions:?} \
         partitions); relay publishing again after {} (goal {BACK_GOAL:?}), \
         consumer handling again after {}; quiesced {} after the broker's return ({:.1} s; \
         {} after the writers stopped); \
         records acknowledged {acked} for {} committed events ({:.2} per event; {} marks \
         published, {} fenced), given back after failures {} ({:.2} per event); consumer \
         deferred {}, duplicates {}, not_due {}",
        before.0.published,
        before.1.handled,
        at_kill.published,
        at_kill.pending,
        answered_in.as_secs_f64(),
        topic_after.as_secs_f64(),
        secs(relay_back),
        secs(consumer_back),
        if quiesced.is_ok() { "yes" } else { "NOT" },
        quiesce_after.as_secs_f64(),
        secs(quiesced.as_ref().ok().copied()),
        report.committed,
        per_event(acked),
        r.published,
        r.fenced,
        r.released,
        per_event(r.released),
        c.deferred,
        c.duplicates,
        c.not_due
    );
    println!("{name}: relay worker: {}", counters(&r));
    println!("{name}: consumer worker: {}", counters(&c));
    let twice = duplicated_rows(&env, &report).await;
    if !twice.is_empty() {
        println!("{name}: {twice}");
    }

    let mut f = Failures::default();
    f.check(relay_back.is_some(), || {
        format!(
            "relay never published again within {BACK_LIMIT:?} of the broker's return: \
             published stayed at {} (producer_restarts {}, failed_probes {}, failed rounds {}, \
             released {})",
            r0.published, r.producer_restarts, r.failed_probes, r.relay_errors, r.released
        )
    });
    f.check(consumer_back.is_some(), || {
        format!(
            "consumer never handled again within {BACK_LIMIT:?} of the broker's return: \
             handled stayed at {} (db_retries {}, skipped {})",
            c0.handled, c.db_retries, c.skipped
        )
    });
    f.stuck(&quiesced);
    f.oracle(&report);
    f.check(report.dead.is_empty(), || {
        format!(
            "a broker restart made {} events dead: {:?}",
            report.dead.len(),
            &report.dead[..report.dead.len().min(5)]
        )
    });
    f.check(report.unledgered_rows == 0, || {
        format!("unledgered rows: {}", report.unledgered_rows)
    });
    f.assert_none(&name);
    env.db.cleanup().await;
}

chaos_tests!(broker_restart() {
    chaos_k_broker_restart: Postgres,
});

/// l. A zombie relay whose producer is fenced: relay worker Z freezes right after a
/// claim and is SIGSTOPped past its lease; relay worker H takes its rows over and
/// publishes everything. With the load paused (H idle, so only Z produces), the mock
/// cluster answers Produce requests with `error`; Z is SIGCONTinued and produces its
/// stale batch into them. The errors stop once Z is past that batch, and the load
/// resumes.
///
/// `ProducerFenced` (as a transactional producer would get it) fails the records but
/// leaves librdkafka's idempotent producer usable (it bumps its epoch);
/// `OutOfOrderSequenceNumber` on the head-of-line request is fatal: that producer never
/// delivers again (the state a broker that lost the producer's sequence leaves).
///
/// Expected: nothing stays pending (every event consumed within a bounded time), Z
/// replaced its producer (`producer_restarts >= 1`) and publishes again after the errors
/// stop instead of claiming rows it cannot publish.
///
/// With `error` `None` the same runs on a private tansu with no injected error: the probe
/// for a natural fence (see `probe_l_zombie_on_tansu`); then only the oracle and "stuck
/// 0" are checked, and the figures say what became of Z's stale batch.
async fn zombie_fenced_producer<B: ChaosBackend>(error: Option<RDKafkaRespErr>) {
    init_tracing();
    let Some((_tansu, broker)) = tansu_or_mock(error.is_none(), "probe_l_zombie_on_tansu").await
    else {
        return;
    };
    let env = ChaosEnv::<B>::new(&broker, 3).await;
    let lease = Duration::from_millis(2_000);
    let mut consumer = env.worker(&broker, "consumer").spawn(WORKER);
    let mut load = Load::new(300, 30);
    load.pace = Duration::from_millis(5);
    let running = load.spawn(&env.outbox());

    // Z publishes two batches, freezes after its 3rd claim, and is stopped there.
    let mut z = env
        .worker(&broker, "relay")
        .lease(lease)
        .freeze("relay.after_claim", 2, 3_000)
        .spawn(WORKER);
    z.wait_frozen(Duration::from_secs(30)).await;
    // Its stats thread still runs while the runtime is frozen: a snapshot from now.
    let z_frozen = z.fresh_stats(Duration::from_secs(5)).await;
    z.stop();
    let z_leased = env.leased(false).await;

    // H takes over once Z's lease expired; everything is consumed.
    let mut h = env.worker(&broker, "relay").lease(lease).spawn(WORKER);
    let load1 = running.await.expect("load");
    env.quiesce(Duration::from_secs(60))
        .await
        .unwrap_or_else(|stuck| panic!("H did not take Z's rows over: {stuck}"));

    // Produce answers `error` while Z resumes with its stale batch.
    let dups_before = consumer
        .fresh_stats(Duration::from_secs(5))
        .await
        .duplicates;
    if let (Some(error), Some(mock)) = (error, broker.mock_cluster()) {
        mock.request_errors(RDKafkaApiKey::Produce, &[error; 64]);
    }
    let t_fault = Instant::now();
    z.cont();
    let z_resumed = z
        .wait_stats("Z past its stale batch", Duration::from_secs(30), |s| {
            s.writes > z_frozen.writes
                && (s.idles > z_frozen.idles
                    || s.producer_restarts > z_frozen.producer_restarts
                    || s.failed_probes > z_frozen.failed_probes
                    || s.relay_errors > z_frozen.relay_errors
                    || s.released > z_frozen.released)
        })
        .await;
    if let Some(mock) = broker.mock_cluster() {
        mock.clear_request_errors(RDKafkaApiKey::Produce);
    }
    let fault_for = t_fault.elapsed();
    // Z's stale records that reached the consumer anyway (all their rows are consumed).
    // (Given 2 s to arrive; none do when the errors failed them.)
    let stale_delivered = consumer
        .poll_stats(Duration::from_secs(2), |s| s.duplicates > dups_before)
        .await
        .or(consumer.stats())
        .map_or(0, |s| s.duplicates - dups_before);

    // The load resumes: both relays claim.
    let z_at_clear = z.fresh_stats(Duration::from_secs(5)).await;
    let h_at_clear = h.fresh_stats(Duration::from_secs(5)).await;
    let mut load = Load::new(300, 30);
    load.pace = Duration::from_millis(5);
    load.key_prefix = "after".into();
    let t_resume = Instant::now();
    let load2 = load.run(&env.outbox()).await;
    let quiesced = env.quiesce(Duration::from_secs(60)).await;
    let settle = t_resume.elapsed();
    let pending_left = env.stuck_rows().await;

    let zs = last_stats(&mut z).await;
    let hs = last_stats(&mut h).await;
    let cs = last_stats(&mut consumer).await;
    let fault = match error {
        Some(e) => format!("{e:?}")
            .trim_start_matches("RD_KAFKA_RESP_ERR_")
            .to_owned(),
        None => "tansu, nothing injected".to_owned(),
    };
    let name = format!("l-zombie-fenced-producer({fault})[{}]", B::BACKEND_NAME);
    let report = env.check(&name, cs.duplicates).await;
    println!("{report}");
    let z_after = zs.published - z_at_clear.published;
    println!(
        "{name}: load {load1:?} then {load2:?}; Z froze holding {z_leased} leased rows after \
         publishing {}; errors injected for {:.2} s, Z's stale records delivered anyway \
         {stale_delivered}; after the errors stopped Z published {z_after} (H {}), Z gave \
         back {} and failed {} rounds; second load consumed {} after it began ({:.2} s)",
        z_frozen.published,
        fault_for.as_secs_f64(),
        hs.published - h_at_clear.published,
        zs.released - z_at_clear.released,
        zs.relay_errors - z_at_clear.relay_errors,
        if quiesced.is_ok() { "entirely" } else { "NOT" },
        settle.as_secs_f64()
    );
    println!(
        "{name}: Z when past its stale batch: {}",
        counters(&z_resumed)
    );
    println!("{name}: Z: {}", counters(&zs));
    println!("{name}: H: {}", counters(&hs));
    println!("{name}: consumer: {}", counters(&cs));

    let mut f = Failures::default();
    f.stuck(&quiesced);
    f.oracle(&report);
    f.check(report.dead.is_empty(), || {
        format!(
            "{} events dead: {:?}",
            report.dead.len(),
            &report.dead[..report.dead.len().min(5)]
        )
    });
    if error.is_none() {
        // The probe: only the oracle and "stuck 0".
        f.assert_none(&name);
        env.db.cleanup().await;
        return;
    }
    f.check(zs.producer_restarts >= 1, || {
        format!(
            "Z's producer_restarts is {} after {error:?} (want >= 1); Z: {}",
            zs.producer_restarts,
            counters(&zs)
        )
    });
    f.check(z_after > 0, || {
        format!(
            "Z published nothing after the errors stopped (published stayed at {}; it gave \
             back {} rows and failed {} rounds meanwhile: claiming rows it cannot publish)",
            z_at_clear.published,
            zs.released - z_at_clear.released,
            zs.relay_errors - z_at_clear.relay_errors
        )
    });
    if quiesced.is_ok() {
        println!("{name}: open rows at the end: {pending_left}");
    }
    f.assert_none(&name);
    env.db.cleanup().await;
}

chaos_tests!(zombie_fenced_producer(Some(RDKafkaRespErr::RD_KAFKA_RESP_ERR_PRODUCER_FENCED)) {
    chaos_l_zombie_fenced_producer: Postgres,
});

chaos_tests!(zombie_fenced_producer(Some(RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER)) {
    chaos_l_zombie_fatal_producer: Postgres,
});

/// The probe for a natural fence: scenario l on a private tansu with nothing injected.
/// An idempotent producer without a `transactional.id` is never fenced by another one,
/// and tansu 0.6.0 takes the zombie's stale batch (its records reach the consumer as
/// duplicates): hence l runs on the mock cluster. Not part of the suite (`--run-ignored`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "probe: shows that tansu does not fence a zombie's producer by itself"]
async fn probe_l_zombie_on_tansu() {
    zombie_fenced_producer::<Postgres>(None).await;
}

/// How scenario q makes the broker fail and come back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outage {
    /// Mock cluster: every Produce request answers `NotEnoughReplicas` (retriable:
    /// librdkafka retries until the 5 s `message.timeout.ms`), then the errors stop.
    ProduceErrors,
    /// A private tansu SIGKILLed, then started again with empty memory (its topic
    /// recreated at once, as an operator would).
    TansuRestart,
}

/// q. A round fails while the next batch is already in flight, and the broker comes
/// back while that batch waits for its delivery reports. A relay worker process, 600
/// events on 300 keys waiting (a backlog of two claims: heads of key only, 200 per
/// claim). Its first batch A is enqueued while the broker fails; its second claim, B,
/// pipelined beside A's finish, is held 4 s at `relay.after_claim`, so B is enqueued
/// after A and before A times out; A times out and is given back; the broker comes
/// back at once, while B is in flight.
///
/// - `ProduceErrors` (mock cluster): the errors are on when the relay starts; B's claim
///   is the freeze.
/// - `TansuRestart` (a real broker): A's claim is held 3 s (`FAILPOINTS`: the first two
///   claims sleep 3 s, then 4 s) while the test kills tansu; started again when A is
///   given back. The restarted broker has lost the producer's id, so B may fail too and
///   be given back: only the outcome is checked, not the path.
///
/// No consumer runs until the relay alone has published every row: a consumer in the
/// same database would consume B's rows from its records and hide a batch the relay
/// never settled. The relay's lease is 120 s, so a batch left leased (dropped with the
/// failed round, or never marked from its own reports) keeps its rows pending past the
/// `BACK_LIMIT` deadline. Then a consumer worker runs and the oracle checks the whole.
/// Checked: every row published within `BACK_LIMIT` of the broker's return, A given
/// back, the oracle, "stuck 0", nothing dead; on the mock, B delivered from flight (not
/// given back).
async fn pipelined_round_fails<B: ChaosBackend>(outage: Outage) {
    init_tracing();
    let Some((mut tansu, broker)) = tansu_or_mock(
        outage == Outage::TansuRestart,
        "chaos_q_pipelined_round_fails_tansu",
    )
    .await
    else {
        return;
    };
    let env = ChaosEnv::<B>::new(&broker, 3).await;
    let load = Load::new(600, 300).run(&env.outbox()).await;

    let relay = env.worker(&broker, "relay").lease(Duration::from_secs(120));
    // Without a tansu the broker is the mock cluster, whose faults are injected.
    let mock = || broker.mock_cluster().expect("the mock cluster");
    let mut relay = match &mut tansu {
        None => {
            mock().request_errors(
                RDKafkaApiKey::Produce,
                &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 2_000],
            );
            let mut relay = relay.freeze("relay.after_claim", 1, 4_000).spawn(WORKER);
            relay.wait_frozen(Duration::from_secs(30)).await;
            relay
        }
        Some(t) => {
            let relay = relay
                .env(
                    "FAILPOINTS",
                    "relay.after_claim=1*sleep(3000)->1*sleep(4000)",
                )
                .spawn(WORKER);
            // A's claim counted (`rounds` rises just before the failpoint): the broker
            // dies while A waits to be enqueued.
            relay
                .wait_stats("A claimed", Duration::from_secs(30), |s| s.rounds >= 1)
                .await;
            t.kill();
            relay
        }
    };
    let t_fault = Instant::now();
    let failed = relay
        .wait_stats("batch A given back", Duration::from_secs(30), |s| {
            s.released > 0
        })
        .await;
    let a_failed_after = t_fault.elapsed();
    let back = match &mut tansu {
        Some(t) => {
            let back = t.restart(Duration::from_secs(30)).await;
            broker.create_topic(&env.topic, 3).await;
            back
        }
        None => {
            mock().clear_request_errors(RDKafkaApiKey::Produce);
            Instant::now()
        }
    };
    let deadline = back + BACK_LIMIT;
    let mut left = env.counts().await;
    while left.pending > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await; // polling the table
        left = env.counts().await;
    }
    let published_in = back.elapsed();
    let r = last_stats(&mut relay).await;

    let mut consumer = env.worker(&broker, "consumer").spawn(WORKER);
    let quiesced = env.quiesce(Duration::from_secs(60)).await;
    let c = last_stats(&mut consumer).await;

    let name = format!("q-pipelined-round-fails({outage:?})[{}]", B::BACKEND_NAME);
    let report = env.check(&name, c.duplicates).await;
    println!("{report}");
    println!(
        "{name}: load {load:?}; A given back {:.2} s after the fault began (released {} \
         then); every row published {:.2} s after the broker's return ({} left pending)",
        a_failed_after.as_secs_f64(),
        failed.released,
        published_in.as_secs_f64(),
        left.pending
    );
    println!("{name}: relay when A was given back: {}", counters(&failed));
    println!("{name}: relay: {}", counters(&r));
    println!("{name}: consumer: {}", counters(&c));

    let mut f = Failures::default();
    f.check(left.pending == 0, || {
        format!(
            "{} rows still pending {BACK_LIMIT:?} after the broker's return: a batch was \
             left leased (the lease is 120 s); relay: {}",
            left.pending,
            counters(&r)
        )
    });
    // A (200 heads of key) failed: B's claim was held until after A had been sent, so
    // the fault was still on when A's round ended.
    f.check(failed.released >= 200, || {
        format!(
            "the relay gave back {} rows, not batch A's 200",
            failed.released
        )
    });
    if outage == Outage::ProduceErrors {
        // B was settled from its own delivery reports once the errors stopped: the
        // only rows given back are A's, twice (once failed, once claimed again while
        // the relay knew its producer was failing, and handed back unproduced).
        f.check(r.released <= 400, || {
            format!(
                "the relay gave back {} rows in all: B's too, not delivered from flight",
                r.released
            )
        });
    }
    f.stuck(&quiesced);
    f.oracle(&report);
    f.check(report.dead.is_empty(), || {
        format!("{} events dead", report.dead.len())
    });
    f.assert_none(&name);
    env.db.cleanup().await;
}

chaos_tests!(pipelined_round_fails(Outage::ProduceErrors) {
    chaos_q_pipelined_round_fails: Postgres,
});

chaos_tests!(pipelined_round_fails(Outage::TansuRestart) {
    chaos_q_pipelined_round_fails_tansu: Postgres,
});

/// The size of the outsider's record in scenario m: above librdkafka's default
/// `receive.message.max.bytes` (100,000,000), which tansu accepts.
const BIG_RECORD: usize = 120 << 20;

/// m. An outsider producer writes a 120 MiB record onto partition 0 of the task topic
/// (tansu accepts it; librdkafka's consumer cannot receive a fetch response that large
/// with its default `receive.message.max.bytes`) while ledgered load flows on all
/// partitions. The consumer must handle every event behind it on every partition and
/// skip the big record with a reason (`skipped` rises) instead of stalling.
async fn oversized_record<B: ChaosBackend>() {
    init_tracing();
    let Some(tansu) = PrivateTansu::start_or_skip("chaos_m_oversized_record").await else {
        return;
    };
    let broker = tansu.broker();
    let env = ChaosEnv::<B>::new(&broker, 3).await;
    let mut relay = env.worker(&broker, "relay").lease(LEASE).spawn(WORKER);
    let mut consumer = env.worker(&broker, "consumer").spawn(WORKER);
    let mut before = Load::new(300, 30);
    before.pace = Duration::from_millis(5);
    let load_before = before.run(&env.outbox()).await;
    consumer
        .wait_stats("events to flow", Duration::from_secs(60), |s| {
            s.handled >= 100
        })
        .await;

    // The outsider.
    let producer: FutureProducer = broker
        .client_config()
        .set("message.max.bytes", "200000000")
        .set("message.timeout.ms", "60000")
        .create()
        .expect("outsider producer");
    let payload = vec![b'x'; BIG_RECORD];
    let t = Instant::now();
    let delivery = producer
        .send(
            FutureRecord::<str, [u8]>::to(&env.topic)
                .partition(0)
                .key("outsider")
                .payload(&payload[..]),
            Duration::from_secs(60),
        )
        .await
        .map_err(|(e, _)| e)
        .expect("tansu takes the 120 MiB record");
    let produced_in = t.elapsed();
    drop(payload);
    drop(producer);

    // Events behind it, on every partition.
    let t_behind = Instant::now();
    let mut behind = Load::new(soak(600, 3_000), 30);
    behind.pace = Duration::from_millis(5);
    behind.key_prefix = "behind".into();
    let load_behind = behind.run(&env.outbox()).await;
    let quiesced = env.quiesce(Duration::from_secs(60)).await;
    let settled_after = t_behind.elapsed();
    // The skip is counted once the consumer got past the record.
    let _ = consumer
        .poll_stats(Duration::from_secs(10), |s| s.skipped >= 1)
        .await;
    let r = last_stats(&mut relay).await;
    let c = last_stats(&mut consumer).await;
    let name = format!("m-oversized-record[{}]", B::BACKEND_NAME);
    let report = env.check(&name, c.duplicates).await;
    println!("{report}");
    println!(
        "{name}: {} MiB record at partition {} offset {} (produced in {:.2} s); load before \
         {load_before:?}, behind it {load_behind:?}; everything consumed {} {:.2} s after the \
         load behind it began; consumer skipped {}, handled {}",
        BIG_RECORD >> 20,
        delivery.partition,
        delivery.offset,
        produced_in.as_secs_f64(),
        if quiesced.is_ok() {
            "after"
        } else {
            "NOT after"
        },
        settled_after.as_secs_f64(),
        c.skipped,
        c.handled
    );
    println!("{name}: relay worker: {}", counters(&r));
    println!("{name}: consumer worker: {}", counters(&c));

    let mut f = Failures::default();
    f.stuck(&quiesced);
    f.oracle(&report);
    f.check(c.skipped >= 1, || {
        format!(
            "the consumer's skipped counter is {} (want >= 1: the big record skipped with a reason)",
            c.skipped
        )
    });
    f.check(report.dead.is_empty(), || {
        format!(
            "{} events dead: {:?}",
            report.dead.len(),
            &report.dead[..report.dead.len().min(5)]
        )
    });
    f.assert_none(&name);
    drop(tansu);
    env.db.cleanup().await;
}

chaos_tests!(oversized_record() {
    chaos_m_oversized_record: Postgres,
});

/// How a forged record differs from the genuine one of the same event.
#[derive(Debug, Clone, Copy)]
enum Forgery {
    /// Another payload (key and sequence of another task) under the real headers.
    Payload,
    /// `ce_type` of no known event.
    UnknownType,
    /// `ce_eventversion` 4294967296 (does not fit the envelope's u32).
    VersionOverflow,
    /// `ce_eventversion` 2 (the row's is 1).
    NewerVersion,
    /// Another record key (headers and payload genuine).
    Key,
}

const FORGERIES: [Forgery; 5] = [
    Forgery::Payload,
    Forgery::UnknownType,
    Forgery::VersionOverflow,
    Forgery::NewerVersion,
    Forgery::Key,
];

/// The genuine headers of `row`'s record with `replace` applied.
fn forged_headers(row: &outbox_runtime::OutboxRow, replace: &[(&str, &str)]) -> OwnedHeaders {
    let genuine = Envelope {
        event_id: EventId(row.event_id),
        service: row.service.clone(),
        event_type: row.event_type.clone(),
        version: u32::try_from(row.version).expect("version"),
        key: row.key.clone(),
        time: row.created_at,
        payload: Vec::new(),
        traceparent: None,
        tracestate: None,
    }
    .headers();
    let mut out = OwnedHeaders::new();
    for h in genuine.iter() {
        let value = replace
            .iter()
            .find(|(k, _)| *k == h.key)
            .map(|(_, v)| v.as_bytes())
            .or(h.value);
        out = out.insert(Header { key: h.key, value });
    }
    out
}

/// n. Forged records carrying real event ids: rows committed through the outbox, some
/// already published and consumed, some not yet relayed (no relay runs while the forged
/// records arrive); an outsider writes, for each, records with its `ce_id` but another
/// payload, an unknown `ce_type`, `ce_eventversion` 4294967296 or 2, or another key.
/// Then a relay publishes the genuine records.
///
/// Expected: every genuine event is handled exactly once with its own payload (the
/// effect's key and sequence match the ledger), none goes dead, and the consumer counts
/// the forged records as `mismatched`.
async fn forged_records<B: ChaosBackend>() {
    init_tracing();
    // A private tansu when it can be had, else the mock cluster (both are reached over
    // TCP by the workers and the outsider alike).
    let tansu = PrivateTansu::start().await;
    let broker = match &tansu {
        Some(t) => t.broker(),
        None => TestBroker::mock().await,
    };
    let env = ChaosEnv::<B>::new(&broker, 3).await;
    let mut consumer = env.worker(&broker, "consumer").spawn(WORKER);
    let outbox = env.outbox();
    let events = 10;
    let publish = |prefix: &'static str| {
        let outbox = outbox.clone();
        async move {
            let mut ids = Vec::new();
            for i in 0..events {
                match publish_ledgered(
                    &outbox,
                    &format!("{prefix}{i}"),
                    Script::default(),
                    PublishOptions::default(),
                    true,
                )
                .await
                {
                    Written::Committed(id, _) => ids.push(id),
                    other => panic!("publish {prefix}{i}: {other:?}"),
                }
            }
            ids
        }
    };

    // Published and consumed.
    let mut relay = env.worker(&broker, "relay").lease(LEASE).spawn(WORKER);
    let consumed = publish("done").await;
    env.quiesce(Duration::from_secs(60))
        .await
        .unwrap_or_else(|stuck| panic!("the first events were not consumed: {stuck}"));
    let _ = relay.terminate(Duration::from_secs(15)).await;
    // Committed, not relayed.
    let pending = publish("open").await;

    let rows = B::fetch_all(
        env.pool(),
        &env.table.parse().unwrap(),
        &"task".parse().unwrap(),
    )
    .await
    .unwrap();
    let producer: FutureProducer = broker.client_config().create().expect("outsider");
    let c0 = consumer.fresh_stats(Duration::from_secs(5)).await;
    let mut forged = 0u64;
    for (i, id) in consumed.iter().chain(&pending).enumerate() {
        let row = rows.iter().find(|r| r.event_id == id.0).expect("row");
        let key = row.key.clone().expect("key");
        // Each kind comes first for some events: a runtime that acts on the first
        // forged record of a pending row shows what each kind does to it.
        for k in 0..FORGERIES.len() {
            let forgery = FORGERIES[(i + k) % FORGERIES.len()];
            let payload = match forgery {
                Forgery::Payload => format!(r#"{{"task_id":"forged-{key}","seq":777}}"#),
                _ => row.payload.clone(),
            };
            let (record_key, headers) = match forgery {
                Forgery::Payload => (key.clone(), forged_headers(row, &[])),
                Forgery::UnknownType => (
                    key.clone(),
                    forged_headers(row, &[(header::TYPE, "TaskForged")]),
                ),
                Forgery::VersionOverflow => (
                    key.clone(),
                    forged_headers(row, &[(header::EVENT_VERSION, "4294967296")]),
                ),
                Forgery::NewerVersion => (
                    key.clone(),
                    forged_headers(row, &[(header::EVENT_VERSION, "2")]),
                ),
                Forgery::Key => (format!("forged-{key}"), forged_headers(row, &[])),
            };
            producer
                .send(
                    FutureRecord::to(&env.topic)
                        .key(&record_key)
                        .payload(&payload)
                        .headers(headers),
                    Duration::from_secs(10),
                )
                .await
                .map_err(|(e, _)| e)
                .unwrap_or_else(|e| panic!("producing a forged record ({forgery:?}): {e}"));
            forged += 1;
        }
    }
    let forged_open = pending.len() as u64 * FORGERIES.len() as u64;
    // The consumer settles each forged record one way or another.
    let settled = |s: &WorkerStats| {
        s.handled
            + s.duplicates
            + s.deferred
            + s.retried
            + s.consumer_dead
            + s.skipped
            + s.mismatched
            + s.not_due
    };
    let before_forged = settled(&c0);
    let after_forged = consumer
        .wait_stats(
            "every forged record settled",
            Duration::from_secs(60),
            |s| settled(s) >= before_forged + forged,
        )
        .await;
    let rows_after_forged = B::fetch_all(
        env.pool(),
        &env.table.parse().unwrap(),
        &"task".parse().unwrap(),
    )
    .await
    .unwrap();
    let touched: Vec<String> = rows_after_forged
        .iter()
        .filter(|r| pending.iter().any(|id| id.0 == r.event_id) && r.status != Status::Pending)
        .map(|r| format!("row {} ({:?}, {:?})", r.id, r.status, r.last_error))
        .collect();

    // The genuine records.
    let mut relay = env.worker(&broker, "relay").lease(LEASE).spawn(WORKER);
    let quiesced = env.quiesce(Duration::from_secs(60)).await;
    let r = last_stats(&mut relay).await;
    let c = last_stats(&mut consumer).await;
    let name = format!("n-forged-records[{}]", B::BACKEND_NAME);
    let report = env.check(&name, c.duplicates).await;
    println!("{report}");
    println!(
        "{name}: broker {}; {forged} forged records ({forged_open} naming {} pending rows, the \
         rest {} consumed ones; {} kinds each); while no relay ran the consumer counted: {}; \
         pending rows the forgeries changed: {}; at the end: mismatched {}, handled {}, \
         duplicates {}, dead {}, skipped {}",
        broker.tier(),
        pending.len(),
        consumed.len(),
        FORGERIES.len(),
        counters(&after_forged),
        touched.len(),
        c.mismatched,
        c.handled,
        c.duplicates,
        c.consumer_dead,
        c.skipped
    );
    println!("{name}: relay worker: {}", counters(&r));

    let mut f = Failures::default();
    f.stuck(&quiesced);
    f.oracle(&report);
    f.check(report.dead.is_empty(), || {
        format!(
            "{} genuine events dead because of forged records: {:?}",
            report.dead.len(),
            &report.dead[..report.dead.len().min(5)]
        )
    });
    f.check(touched.is_empty(), || {
        format!(
            "{} pending rows changed by forged records before their genuine record came: {}",
            touched.len(),
            touched
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join("; ")
        )
    });
    f.check(report.applied == report.committed, || {
        format!(
            "applied {} of {} committed events",
            report.applied, report.committed
        )
    });
    f.check(c.mismatched >= forged_open, || {
        format!(
            "the consumer's mismatched counter is {} (want >= {forged_open}, the forged records \
             naming pending rows; {forged} forged in all)",
            c.mismatched
        )
    });
    f.assert_none(&name);
    drop(tansu);
    env.db.cleanup().await;
}

chaos_tests!(forged_records() {
    chaos_n_forged_record: Postgres,
});
