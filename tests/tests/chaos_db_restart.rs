//! Fault suite: the database restarts (`pg_ctl restart -m immediate`) under load, on a
//! PRIVATE PostgreSQL server (initdb in a temporary directory, a free port): every
//! component reconnects by itself, nothing is lost or applied twice, and a commit whose
//! outcome was unknown is retried and de-duplicated, not dead-lettered. See
//! RELIABILITY.md.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox_runtime::ConsumerStats;
use outbox_runtime::{Outbox, PublishOptions};
use outbox_tests::broker::TestBroker;
use outbox_tests::chaos::{
    chaos_config, chaos_kafka, init_tracing, poll, prepare, relay_sum, settled, soak,
    start_runtime, PrivatePg,
};
use outbox_tests::oracle::{self, publish_ledgered, Written};
use outbox_tests::services::{Script, Task};
use sqlx::postgres::PgPoolOptions;
use sqlx::Postgres;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_g_database_restart() {
    init_tracing();
    let Some(pg) = tokio::task::spawn_blocking(PrivatePg::start).await.unwrap() else {
        eprintln!("SKIPPED chaos_g_database_restart: no PostgreSQL server binaries");
        return;
    };
    let pool = PgPoolOptions::new()
        .max_connections(24)
        .acquire_timeout(Duration::from_secs(30))
        .connect(&pg.url())
        .await
        .expect("private server");
    let broker = TestBroker::mock().await;
    let (catalog, _prefix) = prepare(&pool, &broker, 3).await;
    let table = catalog.route("task").unwrap().table().clone();
    let kafka = chaos_kafka(&broker.bootstrap_servers());
    let runtime = start_runtime(&pool, &catalog, &kafka, 2, true, chaos_config()).await;
    let outbox: Outbox<Task, Postgres> =
        Outbox::with_config(pool.clone(), &catalog, chaos_config()).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4u64 {
        let outbox = outbox.clone();
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let (mut ok, mut failed, mut i) = (0u64, 0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let key = format!("k{}", (i * 4 + w) % 60);
                match publish_ledgered(
                    &outbox,
                    &key,
                    Script::default(),
                    PublishOptions::default(),
                    !i.is_multiple_of(20),
                )
                .await
                {
                    Written::Committed(..) => ok += 1,
                    Written::RolledBack => {}
                    Written::Failed => {
                        failed += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await; // back off
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await; // load pacing
            }
            (ok, failed)
        }));
    }
    let restarts = soak(1, 3);
    for r in 0..restarts {
        // Let traffic flow, then crash-restart the server under it.
        let pool2 = pool.clone();
        let table2 = table.clone();
        let target = 150 * (r + 1);
        poll("traffic to flow", Duration::from_secs(60), || async {
            let c = <Postgres as outbox_runtime::Backend>::counts(
                &pool2,
                &table2,
                &"task".parse().unwrap(),
            )
            .await
            .ok()?;
            (c.consumed >= target).then_some(())
        })
        .await;
        let t = Instant::now();
        let pg_ref = &pg;
        tokio::task::block_in_place(|| pg_ref.restart_immediate());
        println!("restart {} took {:?}", r + 1, t.elapsed());
    }
    // Traffic after the restart too.
    let pool2 = pool.clone();
    let table2 = table.clone();
    let target = 150 * (restarts + 1);
    poll(
        "traffic after the restart",
        Duration::from_secs(60),
        || async {
            let c = <Postgres as outbox_runtime::Backend>::counts(
                &pool2,
                &table2,
                &"task".parse().unwrap(),
            )
            .await
            .ok()?;
            (c.consumed >= target).then_some(())
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let (mut ok, mut failed) = (0, 0);
    for w in writers {
        let (o, f) = w.await.unwrap();
        ok += o;
        failed += f;
    }
    settled(&pool, table.as_str(), Duration::from_secs(90)).await;
    let stats: Arc<ConsumerStats> = runtime.consumer_stats("task").unwrap().clone();
    let relay_errors = relay_sum(&runtime, |s| &s.errors);
    runtime.shutdown().await.expect("shutdown");
    let report = oracle::check(
        "g-database-restart",
        &pool,
        table.as_str(),
        stats.duplicates.load(Ordering::Relaxed),
    )
    .await;
    println!(
        "g-database-restart: {restarts} immediate restart(s); writers committed {ok}, failed {failed} \
         (their fate is in the ledger); consumer database retries {}, relay failed rounds {relay_errors}",
        stats.db_retries.load(Ordering::Relaxed)
    );
    report.assert_pass();
    assert!(
        report.dead.is_empty(),
        "a database restart made events dead"
    );
    assert_eq!(report.unledgered_rows, 0);
    assert!(report.committed as u64 >= ok);
    pool.close().await;
    drop(pg);
}
