//! j. Commit → record received at steady rates, relay only: the framework vs the lean
//! hand-written outbox ([`lean`]), on a quiet machine and with a CPU hog ([`Hog`]).
//!
//! Per run: writers publish at `rate`/s for `--latency-secs` (each event its own
//! transaction: lean `INSERT` + COMMIT, then `pg_notify`; framework
//! `OutboxTx` publish + COMMIT), one relay drains (lean: [`lean::spawn_woken`];
//! framework: `OutboxRuntime` with relays only, `OutboxConfig::default()`), and a plain
//! rdkafka StreamConsumer (the framework's consumer settings, no database work) notes
//! when each record arrives. Reported: p50/p99/max of commit → received, the events
//! received within `--steady-deadline` s after the last publish, the rows still pending
//! when publishing stopped, the rate the writers reached, and the relay's claims.

use super::*;

use std::process::{Child, Command, Stdio};

/// A CPU hog: a child `sh` spinning on one core until dropped (then killed). It also
/// exits by itself once its parent (this process) is gone, so an interrupted bench
/// leaves no spinner behind.
pub(crate) struct Hog(Child);

impl Hog {
    /// Starts the spinner.
    pub(crate) fn start() -> Res<Hog> {
        // The parent check runs every 200,000 turns: the loop stays busy.
        let child = Command::new("sh")
            .args([
                "-c",
                "i=0; while :; do i=$((i+1)); if [ $i -ge 200000 ]; then \
                 kill -0 $PPID 2>/dev/null || exit 0; i=0; fi; done",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        Ok(Hog(child))
    }
}

impl Drop for Hog {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The contenders, in table order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Contender {
    Lean,
    Framework,
}

impl Contender {
    const ALL: [Contender; 2] = [Contender::Lean, Contender::Framework];

    fn name(self) -> &'static str {
        match self {
            Contender::Lean => "lean hand-written outbox",
            Contender::Framework => "framework relay",
        }
    }
}

/// One run's figures.
#[derive(Clone, Copy, Default)]
struct Run {
    p50: f64,
    p99: f64,
    max: f64,
    published: usize,
    /// Not received within the deadline.
    missing: usize,
    /// Rows pending when publishing stopped.
    backlog: i64,
    /// Events per second the writers reached.
    writers: f64,
    /// Claims that found rows, and the rows they took.
    rounds: u64,
    claimed: u64,
    /// CPU used per 1,000 events, from the first publish to the last record received.
    cpu: cpu::PerEvents,
}

/// Publishes at `rate` through `publish`, then measures: the writers' rate, the backlog
/// of `table` when publishing stopped, and the latencies within the deadline.
async fn measure<F, Fut>(ctx: &Ctx<Postgres>, table: &str, rate: u64, publish: F) -> Res<Run>
where
    F: Fn(u64) -> Fut + Send + Sync + 'static + Clone,
    Fut: Future<Output = Res<()>> + Send + 'static,
{
    let warm = SEQ.fetch_add(1, Ordering::Relaxed);
    publish(warm).await?;
    wait_handled(warm, "j").await?;
    let before = cpu::Sample::take();
    let start = Instant::now();
    let seqs = steady(rate, ctx.args.latency_secs, publish).await?;
    let writers = seqs.len() as f64 / start.elapsed().as_secs_f64();
    let backlog = Postgres::pending(&ctx.pool, table).await?;
    let wait = Duration::from_secs_f64(ctx.args.steady_deadline);
    let (p50, p99, max, missing) = latencies(&seqs, wait).await;
    let cpu = before.per_events(&cpu::Sample::take(), seqs.len());
    Ok(Run {
        p50,
        p99,
        max,
        published: seqs.len(),
        missing,
        backlog,
        writers,
        cpu,
        ..Run::default()
    })
}

/// The lean outbox at `rate`: its woken loop on a pool of 8, writers on the bench pool.
async fn run_lean(ctx: &Ctx<Postgres>, rate: u64) -> Res<Run> {
    let topic = fresh("bench-steady-lean-");
    ctx.broker.create_topic(&topic, ctx.args.partitions).await?;
    Postgres::exec(&ctx.pool, &Postgres::truncate_sql(lean::LEAN_TABLE)).await?;
    let rt_pool = small_pool(ctx, 8).await?;
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let relay = lean::LeanRelay::new(&ctx.kafka(), rt_pool.clone())?;
    let relay = lean::spawn_woken(relay, stop_rx.clone()).await?;
    let consumer = spawn_plain_consumer(ctx, &topic, true, stop_rx)?;
    let publish = {
        let (pool, topic) = (ctx.pool.clone(), Arc::new(topic));
        move |seq: u64| {
            let (pool, topic) = (pool.clone(), topic.clone());
            async move {
                let (key, payload) = tick_row(seq)?;
                // One connection for the transaction and the NOTIFY after it.
                let mut conn = pool.acquire().await?;
                let mut tx = conn.begin().await?;
                sqlx::query(
                    "INSERT INTO lean_outbox (topic, key, payload) VALUES ($1, $2, $3::jsonb)",
                )
                .bind(topic.as_str())
                .bind(&key)
                .bind(&payload)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                committed(seq);
                sqlx::query(lean::NOTIFY).execute(&mut *conn).await?;
                Ok(())
            }
        }
    };
    let measured = measure(ctx, lean::LEAN_TABLE, rate, publish).await;
    let _ = stop.send(true);
    let relay = relay.await?;
    consumer.await??;
    rt_pool.close().await;
    let relay = relay?;
    log(format!(
        "j: {rate:>5}/s lean relay: rounds {} claimed {} empty claims {}",
        relay.rounds, relay.claimed, relay.empty
    ));
    if ctx.args.stage_times {
        let p = |v: &[f64], q: f64| {
            let mut v = v.to_vec();
            v.sort_by(f64::total_cmp);
            percentile(&v, q)
        };
        log(format!(
            "j: {rate:>5}/s lean: stage times p50/p99 ms:  claim {:.1}/{:.1}  mark {:.1}/{:.1}",
            p(&relay.claim_ms, 50.0),
            p(&relay.claim_ms, 99.0),
            p(&relay.mark_ms, 50.0),
            p(&relay.mark_ms, 99.0)
        ));
    }
    Ok(Run {
        rounds: relay.rounds,
        claimed: relay.claimed,
        ..measured?
    })
}

/// The framework at `rate`: `OutboxRuntime` with relays only on a pool of 8, writers
/// through `OutboxTx` on the bench pool.
async fn run_framework(ctx: &Ctx<Postgres>, rate: u64) -> Res<Run> {
    let (catalog, route) = fresh_catalog(ctx).await?;
    let rt_pool = small_pool(ctx, 8).await?;
    stage_times_start(ctx)?;
    let handle = OutboxRuntime::new(catalog.clone(), rt_pool.clone(), ctx.kafka())
        .config(OutboxConfig::default())
        .services([Bench::NAME])
        .consumers(false)
        .start()
        .await?;
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let consumer = spawn_plain_consumer(ctx, route.topic().as_str(), true, stop_rx)?;
    let publish = outbox_tx_publisher(Outbox::<Bench, Postgres>::new(ctx.pool.clone(), &catalog)?);
    let measured = measure(ctx, route.table().as_str(), rate, publish).await;
    let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let (mut rounds, mut claimed) = (0, 0);
    for r in handle.relay_stats(route.service().as_str()) {
        log(format!(
            "j: {rate:>5}/s framework relay: published {} rounds {} idles {} fenced {} released {} errors {}",
            c(&r.published), c(&r.rounds), c(&r.idles), c(&r.fenced), c(&r.released), c(&r.errors)
        ));
        rounds += c(&r.rounds);
        claimed += c(&r.published);
    }
    let _ = stop.send(true);
    handle.shutdown().await?;
    consumer.await??;
    rt_pool.close().await;
    stage_times_log(ctx, &format!("j: {rate:>5}/s framework"))?;
    Ok(Run {
        rounds,
        claimed,
        ..measured?
    })
}

/// Section j: every `--steady-rates` rate, quiet and/or hogged (`--hog`), contenders
/// alternating, medians of `--repeats`.
pub(crate) async fn section_j(ctx: &Ctx<Postgres>, report: &mut Report) -> Res<()> {
    log("j: commit → record received at steady rates, relay only: lean outbox vs framework");
    lean::LeanDb::lean_create(&ctx.pool).await?;
    let mut rows = Vec::new();
    for &rate in &ctx.args.steady_rates {
        for &hogged in &ctx.args.hog {
            // Started before the runs of this block and killed after them, so both
            // contenders share the same condition.
            let hog = if hogged { Some(Hog::start()?) } else { None };
            let mut runs: [Vec<Run>; 2] = Default::default();
            for rep in 0..ctx.args.repeats {
                for i in 0..Contender::ALL.len() {
                    let who = Contender::ALL[(i + rep) % Contender::ALL.len()];
                    let r = match who {
                        Contender::Lean => run_lean(ctx, rate).await?,
                        Contender::Framework => run_framework(ctx, rate).await?,
                    };
                    log(format!(
                        "j: {rate:>5}/s hog {:<3} {:<9} p50 {:>7.1} ms  p99 {:>7.1} ms  max {:>7.1} ms  \
                         writers {:>5.0}/s  backlog {:>6}  not received {} of {}  CPU ms per 1,000 events {}",
                        if hogged { "on" } else { "off" },
                        if who == Contender::Lean { "lean" } else { "framework" },
                        r.p50, r.p99, r.max, r.writers, r.backlog, r.missing, r.published, r.cpu.cell()
                    ));
                    runs[who as usize].push(r);
                }
            }
            drop(hog);
            rows.extend(table_rows(rate, hogged, &runs));
        }
    }
    report.section(
        &format!(
            "j. Commit → record received at steady rates, relay only: framework vs lean hand-written outbox ({} s per run, ms)",
            ctx.args.latency_secs
        ),
        &[
            "events/s",
            "CPU hog",
            "contender",
            "writers reached /s",
            "p50",
            "p99",
            "max",
            "p50 × lean",
            "p99 × lean",
            &format!("not received in {} s (all repeats)", ctx.args.steady_deadline),
            "backlog when publishing stopped (median)",
            "claims (median)",
            "mean claim (rows)",
            "CPU ms per 1,000 events: all (bench / database / broker)",
        ],
        rows,
        &format!(
            "Goal (#17): at 1,000 and 2,000 events/s, with and without the hog, the framework \
             delivers everything the lean loop delivers, with p50 and p99 ≤ 1.2× its figures. \
             Medians over repeats of each run's p50/p99/max (of the records received); contenders \
             alternate. Writers: one transaction per event, up to 64 at a time on the bench's \
             pool (lean: `INSERT` + COMMIT, then `pg_notify` on the pool, as section c's raw \
             pipeline does: notifying inside the transaction serialises commits; \
             framework: `OutboxTx` publish + COMMIT, which wakes the relay in-process). Relays, \
             each on a pool of 8: the lean loop ({}) and the framework's `OutboxRuntime` with \
             relays only (`OutboxConfig::default()`). Receiver: a plain rdkafka StreamConsumer \
             with the framework's consumer settings that only decodes the payload; latency is \
             commit returned → record received, 1,000 keys, {} partitions. Backlog: rows still \
             pending the moment the last writer committed. CPU hog: a child process spinning \
             on one of the 2 cores for the whole block of runs. {}",
            "claim 500 `FOR UPDATE SKIP LOCKED` → produce → wait for every report → mark; \
             LISTEN + 1 s poll",
            ctx.args.partitions,
            cpu::NOTE,
        ),
    );
    Ok(())
}

/// The table rows of one (rate, hog) block: one per contender, ratios to the lean loop.
fn table_rows(rate: u64, hogged: bool, runs: &[Vec<Run>; 2]) -> Vec<Vec<String>> {
    let med = |v: &[Run], f: fn(&Run) -> f64| median(&mut v.iter().map(f).collect::<Vec<_>>());
    let lean = &runs[Contender::Lean as usize];
    let (lean50, lean99) = (med(lean, |r| r.p50), med(lean, |r| r.p99));
    Contender::ALL
        .iter()
        .map(|&who| {
            let v = &runs[who as usize];
            let (p50, p99) = (med(v, |r| r.p50), med(v, |r| r.p99));
            let rounds: u64 = v.iter().map(|r| r.rounds).sum();
            let claimed: u64 = v.iter().map(|r| r.claimed).sum();
            vec![
                rate.to_string(),
                if hogged { "yes" } else { "no" }.into(),
                who.name().into(),
                format!("{:.0}", med(v, |r| r.writers)),
                format!("{p50:.1}"),
                format!("{p99:.1}"),
                format!("{:.1}", med(v, |r| r.max)),
                format!("{:.2}", p50 / lean50),
                format!("{:.2}", p99 / lean99),
                format!(
                    "{} of {}",
                    v.iter().map(|r| r.missing).sum::<usize>(),
                    v.iter().map(|r| r.published).sum::<usize>()
                ),
                format!("{:.0}", med(v, |r| r.backlog as f64)),
                format!("{:.0}", med(v, |r| r.rounds as f64)),
                format!("{:.0}", claimed as f64 / rounds.max(1) as f64),
                cpu::PerEvents::median(&v.iter().map(|r| r.cpu).collect::<Vec<_>>()).cell(),
            ]
        })
        .collect()
}
