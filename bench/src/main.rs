//! `outbox-bench`: the outbox against hand-written baselines, measured in the same run.
//!
//! Run it with `scripts/bench.sh` (release build, a private tansu broker, writes
//! `BENCHMARKS.md`). Every figure is a ratio to a baseline measured in the same run,
//! with medians over repeats, and variants are interleaved (a, b, a, b, ...) because
//! this machine's fsync speed changes every few minutes.
//!
//! Sections (`--only a,b,c,d,e,h,i,j`):
//! - **a** business transaction (one UPDATE) with no outbox row / a hand-written INSERT
//!   / `Outbox::publish` (own transaction and `OutboxTx`), commits/s at 1, 4, 16 writers;
//! - **b** relay drain of a backlog: the framework's relay vs a hand-written
//!   claim → produce → wait → mark loop;
//! - **c** commit → handler latency at steady rates, framework (relay + consumer) vs a
//!   raw pipeline (LISTEN/NOTIFY-woken claim loop, rdkafka produce, plain consumer), the
//!   raw one with librdkafka's defaults, with the framework's Kafka settings, and with a
//!   transactional consumer ([`txconsumer`]: the baseline of the goal's ratios);
//! - **d** 1 vs 2 vs 4 relays on many keys and on few keys (`--relay-keys`): throughput
//!   and per-key order violations read back from the topic;
//! - **e** drain rate with a large table (mostly consumed rows) vs a small one;
//! - **f** peak RSS (VmHWM, reset per phase) of relay and consumer phases;
//! - **g** the cost of metrics: the framework's drain (b) and latency at 1,000/s (c)
//!   with a Prometheus recorder installed and without, interleaved ([`Toggle`]);
//! - **h** subscriptions: `task` publishes [`TaskCreated`] (outbox + relay), and
//!   `notification`, on a database of its own, handles it: the framework's subscriber
//!   (intake → inbox → handler) vs a hand-written inbox consumer ([`subscriber`]),
//!   backlog drain throughput and commit → effect commit latency;
//! - **i** relay drain of a backlog: the framework's relay vs a lean hand-written outbox
//!   on a minimal table of its own ([`lean`]), with claims and log bytes per event;
//! - **j** commit → record received at steady rates, relay only, quiet and with a CPU
//!   hog: the framework vs the lean outbox ([`steady`]): percentiles, what was delivered,
//!   the backlog when publishing stopped.
//!
//! Databases (`--db postgres|mysql|both`): every section runs on PostgreSQL; sections a,
//! b and i also run on MariaDB (reported as "a (MariaDB)", "b (MariaDB)", "i (MariaDB)").
//! What differs per database (the hand-written baselines' SQL, bulk loads, setup) is the
//! [`BenchDb`] trait (and [`LeanDb`] for the lean outbox); the sections are generic over
//! it.
//!
//! Not a test and never run in CI (CI only compiles it).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::future::Future;
use std::rc::Rc;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use outbox_runtime::internals::Relay;
use outbox_runtime::{
    outbox_event, outbox_handler, outbox_service, Backend, Catalog, Event, HandlerContext,
    HandlerError, KafkaConfig, MySql, Outbox, OutboxConfig, OutboxRuntime, Postgres, Service,
};
use outbox_runtime::{RelayStats, Route};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DefaultProducerContext, DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use sqlx::mysql::{MySqlConnectOptions, MySqlConnection, MySqlPool, MySqlPoolOptions, MySqlRow};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, Pool, QueryBuilder, Row};

mod cpu;
mod lean;
mod steady;
mod subscriber;
mod txconsumer;

use lean::LeanDb;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Res<T> = std::result::Result<T, BoxError>;

/// The benchmark's service: table `bench_outbox`, topic `outbox.bench` (prefixed per run).
#[outbox_service]
pub struct Bench;

/// The benchmark's event: a key and its position in the key's sequence.
#[outbox_event(service = Bench, key = key)]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Tick {
    /// The ordering key.
    pub key: String,
    /// Position in the key's sequence (unique per run in latency runs).
    pub seq: u64,
}

/// Where handlers and raw consumers report when they saw an event (latency runs).
#[derive(Default)]
struct Clock {
    committed: Mutex<HashMap<u64, Instant>>,
    handled: Mutex<HashMap<u64, Instant>>,
}

fn clock() -> &'static Clock {
    static C: OnceLock<Clock> = OnceLock::new();
    C.get_or_init(Clock::default)
}

fn saw(seq: u64) {
    let now = Instant::now();
    clock().handled.lock().unwrap().entry(seq).or_insert(now);
}

#[outbox_handler]
async fn on_tick(_ctx: &mut HandlerContext<Postgres>, e: Tick) -> Result<(), HandlerError> {
    saw(e.seq);
    Ok(())
}

/// Section h's publisher (on the bench's database): table `task_outbox`, topic
/// `outbox.task` (prefixed per run).
#[outbox_service]
pub struct Task;

/// Section h's subscriber, on a database of its own: inbox `notification_inbox`.
#[outbox_service]
pub struct Notification;

/// Section h's event: public, so other services may subscribe to it.
#[outbox_event(service = Task, key = task_id, public)]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskCreated {
    /// The ordering key (1,000 keys).
    pub task_id: String,
    /// Unique per run.
    pub seq: u64,
    /// The publisher's database clock, µs since the epoch, read in the publishing
    /// transaction just before its COMMIT (latency runs; 0 in the drain's backlog).
    pub published_us: i64,
}

/// The effect both of section h's subscribers write, once per event, in the
/// transaction that settles it (`written_at` defaults to `clock_timestamp()`).
const EFFECT_INSERT: &str = "INSERT INTO effects (seq, published_us) VALUES ($1, $2)";

/// The framework's subscriber handler of section h: the effect, through `ctx`.
#[outbox_handler(subscriber = Notification)]
async fn notification_on_task_created(
    ctx: &mut HandlerContext<Postgres>,
    e: TaskCreated,
) -> Result<(), HandlerError> {
    sqlx::query(EFFECT_INSERT)
        .bind(e.seq as i64)
        .bind(e.published_us)
        .execute(ctx.conn())
        .await?;
    Ok(())
}

// ------------------------------------------------------------------------------------
// Settings
// ------------------------------------------------------------------------------------

/// The databases to run on (`--db`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dbs {
    Postgres,
    Mysql,
    Both,
}

impl Dbs {
    fn postgres(self) -> bool {
        matches!(self, Dbs::Postgres | Dbs::Both)
    }

    fn mysql(self) -> bool {
        matches!(self, Dbs::Mysql | Dbs::Both)
    }
}

impl FromStr for Dbs {
    type Err = String;

    fn from_str(s: &str) -> Result<Dbs, String> {
        match s {
            "postgres" | "pg" => Ok(Dbs::Postgres),
            "mysql" | "mariadb" => Ok(Dbs::Mysql),
            "both" => Ok(Dbs::Both),
            other => Err(format!("--db {other}: expected postgres, mysql or both")),
        }
    }
}

#[derive(Debug, Clone)]
struct Args {
    pg_url: String,
    mysql_url: String,
    db: Dbs,
    broker: String,
    only: String,
    repeats: usize,
    backlog: i64,
    large: i64,
    small: i64,
    order_rows: i64,
    order_keys: Vec<i64>,
    txn_secs: f64,
    latency_secs: f64,
    rates: Vec<u64>,
    out: Option<String>,
    partitions: i32,
    /// `OutboxConfig::consumer_batch_size` of section c's framework (None: the default).
    consumer_batch: Option<usize>,
    /// `OutboxConfig::consumer_lanes` of section c's framework (None: the default).
    consumer_lanes: Option<usize>,
    /// Log the framework's stage histograms (claim, mark, commit → ack, ack → handled)
    /// after each framework run of sections c and j.
    stage_times: bool,
    /// Section h: records in the drain's backlog.
    sub_backlog: u64,
    /// Section h: publish rates of the latency runs.
    sub_rates: Vec<u64>,
    /// Section j: publish rates.
    steady_rates: Vec<u64>,
    /// Section j: the CPU-hog conditions to run (false: quiet, true: hogged).
    hog: Vec<bool>,
    /// Section j: seconds after the last publish within which records count as received.
    steady_deadline: f64,
}

/// Parses a comma-separated list (`--rates 100,1000`).
fn list<T: FromStr>(s: &str) -> Res<Vec<T>>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    s.split(',')
        .map(|x| {
            x.trim()
                .parse::<T>()
                .map_err(|e| format!("{s:?}: {x:?}: {e}").into())
        })
        .collect()
}

impl Args {
    fn parse() -> Res<Args> {
        let mut a = Args {
            pg_url: std::env::var("OUTBOX_BENCH_PG_URL")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into()),
            mysql_url: std::env::var("OUTBOX_BENCH_MYSQL_URL")
                .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into()),
            db: Dbs::Postgres,
            broker: std::env::var("OUTBOX_BENCH_BROKERS").unwrap_or_else(|_| "mock".into()),
            only: "a,b,i,c,j,d,e,h".into(),
            repeats: 3,
            backlog: 200_000,
            large: 2_000_000,
            small: 10_000,
            order_rows: 100_000,
            order_keys: vec![10_000, 1_000],
            txn_secs: 3.0,
            latency_secs: 10.0,
            rates: vec![100, 1000, 5000],
            out: None,
            partitions: 6,
            consumer_batch: None,
            consumer_lanes: None,
            stage_times: false,
            sub_backlog: 20_000,
            sub_rates: vec![500, 1000],
            steady_rates: vec![1000, 2000, 5000],
            hog: vec![false, true],
            steady_deadline: 10.0,
        };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            let mut val = || it.next().ok_or_else(|| format!("{flag} needs a value"));
            match flag.as_str() {
                "--pg-url" => a.pg_url = val()?,
                "--mysql-url" => a.mysql_url = val()?,
                "--db" => a.db = val()?.parse()?,
                "--broker" => a.broker = val()?,
                "--only" => a.only = val()?,
                "--repeats" => a.repeats = val()?.parse()?,
                "--backlog" => a.backlog = val()?.parse()?,
                "--large" => a.large = val()?.parse()?,
                "--small" => a.small = val()?.parse()?,
                "--order-rows" => a.order_rows = val()?.parse()?,
                "--relay-keys" | "--order-keys" => a.order_keys = list(&val()?)?,
                "--txn-secs" => a.txn_secs = val()?.parse()?,
                "--latency-secs" => a.latency_secs = val()?.parse()?,
                "--rates" => a.rates = list(&val()?)?,
                "--partitions" => a.partitions = val()?.parse()?,
                "--out" => a.out = Some(val()?),
                "--consumer-batch" => a.consumer_batch = Some(val()?.parse()?),
                "--consumer-lanes" => a.consumer_lanes = Some(val()?.parse()?),
                "--stage-times" => a.stage_times = true,
                "--sub-backlog" => a.sub_backlog = val()?.parse()?,
                "--sub-rates" => a.sub_rates = list(&val()?)?,
                "--steady-rates" => a.steady_rates = list(&val()?)?,
                "--steady-deadline" => a.steady_deadline = val()?.parse()?,
                "--hog" => {
                    a.hog = match val()?.as_str() {
                        "off" => vec![false],
                        "on" => vec![true],
                        "both" => vec![false, true],
                        other => {
                            return Err(format!("--hog {other}: expected off, on or both").into())
                        }
                    }
                }
                "--quick" => {
                    a.repeats = 3;
                    a.backlog = 20_000;
                    a.large = 200_000;
                    a.order_rows = 20_000;
                    a.txn_secs = 1.0;
                    a.latency_secs = 3.0;
                    a.rates = vec![100, 1000];
                    a.sub_backlog = 5_000;
                    a.steady_rates = vec![1000];
                }
                "-h" | "--help" => {
                    println!("{}", HELP);
                    std::process::exit(0);
                }
                other => return Err(format!("unknown flag {other}; see --help").into()),
            }
        }
        if a.order_keys.iter().any(|&k| k <= 0) {
            return Err("--relay-keys: key counts must be positive".into());
        }
        if a.backlog <= 0 {
            return Err("--backlog must be positive".into());
        }
        if a.steady_rates.contains(&0) || a.rates.contains(&0) {
            return Err("--rates, --steady-rates: rates must be positive".into());
        }
        if !(a.steady_deadline.is_finite() && a.steady_deadline >= 0.0) {
            return Err("--steady-deadline: seconds, 0 or more".into());
        }
        Ok(a)
    }

    fn wants(&self, section: &str) -> bool {
        self.only.split(',').any(|s| s.trim() == section)
    }
}

const HELP: &str = "outbox-bench [flags]   (normally run through scripts/bench.sh)
  --db D              postgres (default), mysql or both: every section runs on PostgreSQL;
                      sections a, b and i also run on MariaDB/MySQL, reported as their own
                      sections (\"a (MariaDB)\", \"b (MariaDB)\", \"i (MariaDB)\")
  --pg-url URL        admin URL (default $OUTBOX_BENCH_PG_URL or
                      postgres://postgres@127.0.0.1:5432/postgres)
  --mysql-url URL     admin URL (default $OUTBOX_BENCH_MYSQL_URL or mysql://root@127.0.0.1:3306);
                      each run creates a fresh database on each server and drops it at the end
  --broker B          host:port of a Kafka broker, or `mock` (librdkafka mock cluster);
                      default $OUTBOX_BENCH_BROKERS or mock
  --only a,b,c,d,e,g,h,i,j  sections to run (default a,b,i,c,j,d,e,h; f, peak memory,
                      comes with b and c; g, the cost of a metrics recorder, is not in the
                      default set; h, a subscriber vs a hand-written inbox consumer on a
                      second database; i, drain vs a lean hand-written outbox; j, steady-rate
                      commit -> received vs the lean outbox, relay only, quiet and hogged)
  --repeats N         repeats per variant (median reported; default 3)
  --backlog N         relay drain backlog of b and i (default 200000)
  --large N           consumed rows in the large table (default 2000000)
  --small N           rows in the small table (default 10000)
  --order-rows N      backlog of the many-relays run (default 100000)
  --relay-keys K1,K2  key counts of the many-relays run, one 1/2/4-relay comparison each
                      (default 10000,1000; --order-keys is an alias)
  --txn-secs S        seconds per business-transaction measurement (default 3)
  --latency-secs S    seconds of steady load per latency measurement, c, h and j (default 10)
  --rates R1,R2       section c: latency rates in events/s (default 100,1000,5000)
  --partitions N      partitions of every topic (default 6)
  --out FILE          write the markdown report there (e.g. BENCHMARKS.md)
  --consumer-batch N  consumer_batch_size of section c's framework (default: the library's)
  --consumer-lanes N  consumer_lanes of section c's framework (default: the library's)
  --stage-times       c and j: install a metrics recorder for the framework's runs and log
                      its stage times after each (claim, mark, commit -> acknowledged,
                      acknowledged -> handled: p50/p99 in ms); the figures cost a little
  --sub-backlog N     section h: events in the subscriber's drain (default 20000)
  --sub-rates R1,R2   section h: latency rates in events/s (default 500,1000)
  --steady-rates R1,R2  section j: rates in events/s (default 1000,2000,5000; --latency-secs
                      per run)
  --hog H             section j: off, on or both (default): run each rate on a quiet
                      machine and/or with a child process spinning on one core
  --steady-deadline S section j: seconds after the last publish within which a record
                      counts as received (default 10)
  --quick             small sizes, for trying the harness
Environment: OUTBOX_BENCH_PENDING_KEY_INDEX=1 adds a partial index (service, event_key, id)
WHERE status = 0 to every PostgreSQL outbox table (an experiment on the head-of-key probe).";

// ------------------------------------------------------------------------------------
// Helpers
// ------------------------------------------------------------------------------------

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// Resets the peak RSS (VmHWM) of this process (Linux `clear_refs` 5).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Peak RSS since the last reset, in MiB.
fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn log(msg: impl AsRef<str>) {
    eprintln!(
        "[bench {}] {}",
        chrono::Utc::now().format("%H:%M:%S"),
        msg.as_ref()
    );
}

/// The broker: an external one, or a mock cluster kept alive for the run.
struct Broker {
    bootstrap: String,
    mock: Option<MockCluster<'static, DefaultProducerContext>>,
}

impl Broker {
    fn new(spec: &str) -> Res<Broker> {
        if spec == "mock" {
            let mock = MockCluster::new(1)?;
            Ok(Broker {
                bootstrap: mock.bootstrap_servers(),
                mock: Some(mock),
            })
        } else {
            Ok(Broker {
                bootstrap: spec.to_owned(),
                mock: None,
            })
        }
    }

    fn tier(&self) -> &'static str {
        if self.mock.is_some() {
            "librdkafka mock cluster"
        } else {
            "tansu 0.6.0 (memory storage)"
        }
    }

    async fn create_topic(&self, name: &str, partitions: i32) -> Res<()> {
        if let Some(mock) = &self.mock {
            mock.create_topic(name, partitions, 1)?;
            return Ok(());
        }
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .create()?;
        let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        for r in admin.create_topics([&topic], &opts).await? {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((t, code)) => return Err(format!("creating topic {t}: {code}").into()),
            }
        }
        // Wait for metadata with leaders.
        let md: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("allow.auto.create.topics", "false")
            .create()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let name = name.to_owned();
        tokio::task::spawn_blocking(move || loop {
            if let Ok(m) = md.fetch_metadata(Some(&name), Duration::from_secs(5)) {
                if let Some(t) = m.topics().iter().find(|t| t.name() == name) {
                    if t.error().is_none()
                        && t.partitions().len() as i32 >= partitions
                        && t.partitions().iter().all(|p| p.leader() >= 0)
                    {
                        return Ok(());
                    }
                }
            }
            if Instant::now() > deadline {
                return Err(format!("topic {name} not ready"));
            }
            std::thread::sleep(Duration::from_millis(50));
        })
        .await??;
        Ok(())
    }
}

static RUN_COUNTER: AtomicU64 = AtomicU64::new(0);

fn fresh(prefix: &str) -> String {
    format!(
        "{prefix}{}-{}",
        std::process::id(),
        RUN_COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

// ------------------------------------------------------------------------------------
// Databases: what the bench does differently on each
// ------------------------------------------------------------------------------------

/// A row the hand-written relay loop claimed.
struct RawRow {
    id: i64,
    event_id: uuid::Uuid,
    key: Option<String>,
    payload: String,
}

/// What the bench does differently per database: its own SQL (the hand-written
/// baselines, bulk loads, setup). The sections are generic over it; everything the
/// framework does goes through [`Backend`].
trait BenchDb: Backend {
    /// The server's name, in the machine block (and in section titles if
    /// [`IN_TITLES`](Self::IN_TITLES)).
    const LABEL: &'static str;
    /// Whether section titles name the server ("a (MariaDB)"); PostgreSQL's sections
    /// keep their plain titles ("a").
    const IN_TITLES: bool;
    /// The section-a note's sentence on what `OutboxTx` does at commit here.
    const WAKE_NOTE: &'static str;

    /// Creates database `name` on the server `args` points at.
    fn create_database(args: &Args, name: &str) -> impl Future<Output = Res<()>>;
    /// A pool on database `name`.
    fn connect(args: &Args, name: &str) -> impl Future<Output = Res<Pool<Self>>>;
    /// Drops database `name`.
    fn drop_database(args: &Args, name: &str) -> impl Future<Output = Res<()>>;
    /// The server's version (and the setting that bounds commit rates, if any).
    fn describe(pool: &Pool<Self>) -> impl Future<Output = Res<String>>;
    /// Runs one statement without parameters (DDL, TRUNCATE, ANALYZE).
    fn exec(pool: &Pool<Self>, sql: &str) -> impl Future<Output = Res<()>> + Send;
    /// Creates the `accounts` table of section a with [`ACCOUNTS`] rows.
    fn create_accounts(pool: &Pool<Self>) -> impl Future<Output = Res<()>>;
    /// Empties `table` and restarts its ids.
    fn truncate_sql(table: &str) -> String;
    /// Refreshes `table`'s statistics after a bulk load.
    fn analyze_sql(table: &str) -> String;
    /// Appends rows `start..end` of `service` to `table` in status `status` (0 pending,
    /// 2 consumed): key `k{i % keys}`, payload a [`Tick`] with `seq = i / keys`.
    fn insert_rows(
        pool: &Pool<Self>,
        table: &str,
        service: &str,
        keys: i64,
        status: i16,
        start: i64,
        end: i64,
    ) -> impl Future<Output = Res<()>>;
    /// Section a's business write: one account's balance + 1.
    fn update_account(conn: &mut Self::Connection, id: i32)
        -> impl Future<Output = Res<()>> + Send;
    /// The hand-written outbox INSERT into [`RAW_TABLE`], in the caller's transaction.
    fn raw_insert(
        conn: &mut Self::Connection,
        key: &str,
        payload: &str,
    ) -> impl Future<Output = Res<()>> + Send;
    /// The hand-written loop's claim: up to 500 pending rows with a free lease, in id
    /// order, `FOR UPDATE SKIP LOCKED`, leased to `token` for 30 s.
    fn raw_claim(
        pool: &Pool<Self>,
        table: &str,
        service: &str,
        token: i64,
    ) -> impl Future<Output = Res<Vec<RawRow>>> + Send;
    /// The hand-written loop's mark: `ids` published, fenced by `token`.
    fn raw_mark(
        pool: &Pool<Self>,
        table: &str,
        ids: &[i64],
        token: i64,
    ) -> impl Future<Output = Res<()>> + Send;
    /// The sections that run on this database only (after a and b).
    fn more_sections(ctx: &Ctx<Self>, report: &mut Report) -> impl Future<Output = Res<()>>;
}

/// "a" or "a (MariaDB)": a section's name in titles.
fn section_name<DB: BenchDb>(letter: &str) -> String {
    if DB::IN_TITLES {
        format!("{letter} ({})", DB::LABEL)
    } else {
        letter.to_owned()
    }
}

/// "b" or "b, MariaDB": a section's tag in section f's phase names.
fn section_tag<DB: BenchDb>(letter: &str) -> String {
    if DB::IN_TITLES {
        format!("{letter}, {}", DB::LABEL)
    } else {
        letter.to_owned()
    }
}

impl BenchDb for Postgres {
    const LABEL: &'static str = "PostgreSQL";
    const IN_TITLES: bool = false;
    const WAKE_NOTE: &'static str = "`OutboxTx` also wakes the relays after commit \
         (in-process notify + a coalesced `pg_notify` on another connection); no relay runs here.";

    async fn create_database(args: &Args, name: &str) -> Res<()> {
        let mut c = PgConnectOptions::from_str(&args.pg_url)?.connect().await?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut c)
            .await?;
        c.close().await?;
        Ok(())
    }

    async fn connect(args: &Args, name: &str) -> Res<PgPool> {
        let opts = PgConnectOptions::from_str(&args.pg_url)?.database(name);
        Ok(PgPoolOptions::new()
            .max_connections(24)
            .connect_with(opts)
            .await?)
    }

    async fn drop_database(args: &Args, name: &str) -> Res<()> {
        let mut c = PgConnectOptions::from_str(&args.pg_url)?.connect().await?;
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&mut c)
            .await?;
        c.close().await?;
        Ok(())
    }

    async fn describe(pool: &PgPool) -> Res<String> {
        let v: String = sqlx::query_scalar("SELECT version()")
            .fetch_one(pool)
            .await?;
        Ok(v.split(" on ").next().unwrap_or_default().to_owned())
    }

    async fn exec(pool: &PgPool, sql: &str) -> Res<()> {
        sqlx::query(sql).execute(pool).await?;
        Ok(())
    }

    async fn create_accounts(pool: &PgPool) -> Res<()> {
        sqlx::query("CREATE TABLE accounts (id INT PRIMARY KEY, balance BIGINT NOT NULL)")
            .execute(pool)
            .await?;
        sqlx::query("INSERT INTO accounts SELECT i, 0 FROM generate_series(0, $1 - 1) i")
            .bind(ACCOUNTS)
            .execute(pool)
            .await?;
        Ok(())
    }

    fn truncate_sql(table: &str) -> String {
        format!("TRUNCATE {table} RESTART IDENTITY")
    }

    fn analyze_sql(table: &str) -> String {
        format!("VACUUM ANALYZE {table}")
    }

    async fn insert_rows(
        pool: &PgPool,
        table: &str,
        service: &str,
        keys: i64,
        status: i16,
        start: i64,
        end: i64,
    ) -> Res<()> {
        sqlx::query(&format!(
            "INSERT INTO {table} (event_id, service, event_type, event_version, event_key, payload, \
                max_retries, status, published_at, consumed_at) \
             SELECT gen_random_uuid(), $1, $2, 1, 'k' || (i % $3), \
                    json_build_object('key', 'k' || (i % $3), 'seq', i / $3)::text, 20, $4, \
                    CASE WHEN $4 = 2 THEN now() END, CASE WHEN $4 = 2 THEN now() END \
               FROM generate_series($5::bigint, $6::bigint - 1) AS i"
        ))
        .bind(service)
        .bind(Tick::EVENT_TYPE)
        .bind(keys)
        .bind(status)
        .bind(start)
        .bind(end)
        .execute(pool)
        .await?;
        Ok(())
    }

    async fn update_account(conn: &mut PgConnection, id: i32) -> Res<()> {
        sqlx::query("UPDATE accounts SET balance = balance + 1 WHERE id = $1")
            .bind(id)
            .execute(conn)
            .await?;
        Ok(())
    }

    async fn raw_insert(conn: &mut PgConnection, key: &str, payload: &str) -> Res<()> {
        sqlx::query(
            "INSERT INTO raw_outbox (event_id, service, event_type, event_version, event_key, payload, max_retries) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(uuid::Uuid::now_v7())
        .bind(Bench::NAME)
        .bind(Tick::EVENT_TYPE)
        .bind(1i32)
        .bind(key)
        .bind(payload)
        .bind(20i32)
        .execute(conn)
        .await?;
        Ok(())
    }

    async fn raw_claim(pool: &PgPool, table: &str, service: &str, token: i64) -> Res<Vec<RawRow>> {
        // Due order over the due index (service, next_attempt_at, id) WHERE status = 0,
        // as the framework claims: with `ORDER BY id` the planner walked the primary key
        // past every row claimed before (2,086 rows/s on a 1,000,000-row backlog,
        // quadratic in its size), a cliff that is not what this baseline is for.
        let rows = sqlx::query(&format!(
            "UPDATE {table} SET lease_token = $1, locked_until = now() + interval '30 seconds' \
              WHERE id IN (SELECT id FROM {table} WHERE service = $2 AND status = 0 \
                             AND next_attempt_at <= now() \
                             AND (locked_until IS NULL OR locked_until <= now()) \
                           ORDER BY next_attempt_at, id LIMIT 500 FOR UPDATE SKIP LOCKED) \
              RETURNING id, event_id, event_key, payload"
        ))
        .bind(token)
        .bind(service)
        .fetch_all(pool)
        .await?;
        let mut out: Vec<RawRow> = rows
            .iter()
            .map(|r| RawRow {
                id: r.get("id"),
                event_id: r.get("event_id"),
                key: r.get("event_key"),
                payload: r.get("payload"),
            })
            .collect();
        out.sort_by_key(|r| r.id);
        Ok(out)
    }

    async fn raw_mark(pool: &PgPool, table: &str, ids: &[i64], token: i64) -> Res<()> {
        sqlx::query(&format!(
            "UPDATE {table} SET status = 1, published_at = now(), locked_until = NULL, lease_token = 0 \
              WHERE id = ANY($1) AND lease_token = $2"
        ))
        .bind(ids)
        .bind(token)
        .execute(pool)
        .await?;
        Ok(())
    }

    async fn more_sections(ctx: &Ctx<Postgres>, report: &mut Report) -> Res<()> {
        if ctx.args.wants("d") {
            section_d(ctx, report).await?;
            report.write(&ctx.args, &ctx.broker, false)?;
        }
        if ctx.args.wants("e") {
            section_e(ctx, report).await?;
            report.write(&ctx.args, &ctx.broker, false)?;
        }
        if ctx.args.wants("c") {
            section_c(ctx, report).await?;
            report.write(&ctx.args, &ctx.broker, false)?;
        }
        if ctx.args.wants("j") {
            steady::section_j(ctx, report).await?;
            report.write(&ctx.args, &ctx.broker, false)?;
        }
        if ctx.args.wants("g") {
            section_g(ctx, report).await?;
            report.write(&ctx.args, &ctx.broker, false)?;
        }
        if ctx.args.wants("h") {
            subscriber::section_h(ctx, report).await?;
            report.write(&ctx.args, &ctx.broker, false)?;
        }
        Ok(())
    }
}

/// Decodes a text column as bytes: MySQL may flag `utf8mb4_bin` columns binary, and sqlx
/// refuses to decode binary-flagged columns as `String` (the framework does the same).
fn mysql_text(r: &MySqlRow, col: &str) -> Res<Option<String>> {
    let bytes: Option<Vec<u8>> = r.try_get(col)?;
    Ok(bytes.map(String::from_utf8).transpose()?)
}

/// Appends `(?, ?, …)` binding `ids` to `q` (MySQL has no `= ANY($1)`).
fn push_ids(q: &mut QueryBuilder<'_, MySql>, ids: impl IntoIterator<Item = i64>) {
    q.push("(");
    let mut list = q.separated(", ");
    for id in ids {
        list.push_bind(id);
    }
    list.push_unseparated(")");
}

/// A claim on MySQL/MariaDB, which has no `UPDATE … RETURNING`: in one READ COMMITTED
/// transaction, `select` locks and reads the rows (`… FOR UPDATE SKIP LOCKED`), `row`
/// decodes each, and `lease` (an UPDATE ending in `WHERE id IN `) leases them by
/// primary key (`id` of each). Nothing found: rolled back, empty.
async fn mysql_claim<'q, T>(
    pool: &MySqlPool,
    select: sqlx::query::Query<'q, MySql, sqlx::mysql::MySqlArguments>,
    row: impl Fn(&MySqlRow) -> Res<T>,
    id: impl Fn(&T) -> i64,
    mut lease: QueryBuilder<'q, MySql>,
) -> Res<Vec<T>> {
    let mut tx = pool.begin_with(MYSQL_BEGIN_RC).await?;
    let rows = select.fetch_all(&mut *tx).await?;
    if rows.is_empty() {
        tx.rollback().await?;
        return Ok(Vec::new());
    }
    let out = rows.iter().map(row).collect::<Res<Vec<_>>>()?;
    push_ids(&mut lease, out.iter().map(id));
    lease.build().execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(out)
}

/// `SET TRANSACTION … READ COMMITTED; START TRANSACTION`: what the framework's MySQL
/// backend begins with (`Backend::begin`); the hand-written loop uses the same, so the
/// comparison is about the loop, not the isolation level.
const MYSQL_BEGIN_RC: &str = "SET TRANSACTION ISOLATION LEVEL READ COMMITTED; START TRANSACTION";

impl BenchDb for MySql {
    const LABEL: &'static str = "MariaDB";
    const IN_TITLES: bool = true;
    const WAKE_NOTE: &'static str = "`OutboxTx` also wakes the relays of this process after \
         commit (MariaDB has no LISTEN/NOTIFY: other processes' relays poll); no relay runs here. \
         Every variant begins its transaction with `Backend::begin` (READ COMMITTED, as `OutboxTx` \
         does), so only the outbox write differs.";

    async fn create_database(args: &Args, name: &str) -> Res<()> {
        let mut c = MySqlConnectOptions::from_str(&args.mysql_url)?
            .connect()
            .await?;
        sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
            .execute(&mut c)
            .await?;
        c.close().await?;
        Ok(())
    }

    async fn connect(args: &Args, name: &str) -> Res<MySqlPool> {
        let opts = MySqlConnectOptions::from_str(&args.mysql_url)?.database(name);
        Ok(MySqlPoolOptions::new()
            .max_connections(24)
            .connect_with(opts)
            .await?)
    }

    async fn drop_database(args: &Args, name: &str) -> Res<()> {
        let mut c = MySqlConnectOptions::from_str(&args.mysql_url)?
            .connect()
            .await?;
        sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS {name}"))
            .execute(&mut c)
            .await?;
        c.close().await?;
        Ok(())
    }

    async fn describe(pool: &MySqlPool) -> Res<String> {
        let (version, flush): (String, String) = sqlx::query_as(
            "SELECT CAST(VERSION() AS CHAR), CAST(@@innodb_flush_log_at_trx_commit AS CHAR)",
        )
        .fetch_one(pool)
        .await?;
        Ok(format!(
            "{version} (innodb_flush_log_at_trx_commit = {flush})"
        ))
    }

    async fn exec(pool: &MySqlPool, sql: &str) -> Res<()> {
        sqlx::raw_sql(sql).execute(pool).await?;
        Ok(())
    }

    async fn create_accounts(pool: &MySqlPool) -> Res<()> {
        sqlx::raw_sql(
            "CREATE TABLE accounts (id INT PRIMARY KEY, balance BIGINT NOT NULL) ENGINE = InnoDB",
        )
        .execute(pool)
        .await?;
        QueryBuilder::<MySql>::new("INSERT INTO accounts (id, balance) ")
            .push_values(0..ACCOUNTS, |mut b, i| {
                b.push_bind(i).push("0");
            })
            .build()
            .execute(pool)
            .await?;
        Ok(())
    }

    fn truncate_sql(table: &str) -> String {
        // Resets AUTO_INCREMENT too.
        format!("TRUNCATE TABLE {table}")
    }

    fn analyze_sql(table: &str) -> String {
        format!("ANALYZE TABLE {table}")
    }

    async fn insert_rows(
        pool: &MySqlPool,
        table: &str,
        service: &str,
        keys: i64,
        status: i16,
        start: i64,
        end: i64,
    ) -> Res<()> {
        // No generate_series: rows are built here, 1,000 per statement.
        const ROWS: i64 = 1000;
        let done = if status == 2 {
            "UTC_TIMESTAMP(6)"
        } else {
            "NULL"
        };
        let mut i = start;
        while i < end {
            let stop = (i + ROWS).min(end);
            QueryBuilder::<MySql>::new(format!(
                "INSERT INTO {table} (event_id, service, event_type, event_version, event_key, \
                    payload, max_retries, status, next_attempt_at, created_at, updated_at, \
                    published_at, consumed_at) "
            ))
            .push_values(i..stop, |mut b, i| {
                let key = format!("k{}", i % keys);
                let payload = serde_json::json!({ "key": key, "seq": i / keys }).to_string();
                b.push_bind(uuid::Uuid::new_v4())
                    .push_bind(service)
                    .push_bind(Tick::EVENT_TYPE)
                    .push("1")
                    .push_bind(key)
                    .push_bind(payload)
                    .push("20")
                    .push_bind(status)
                    .push("UTC_TIMESTAMP(6)")
                    .push("UTC_TIMESTAMP(6)")
                    .push("UTC_TIMESTAMP(6)")
                    .push(done)
                    .push(done);
            })
            .build()
            .execute(pool)
            .await?;
            i = stop;
        }
        Ok(())
    }

    async fn update_account(conn: &mut MySqlConnection, id: i32) -> Res<()> {
        sqlx::query("UPDATE accounts SET balance = balance + 1 WHERE id = ?")
            .bind(id)
            .execute(conn)
            .await?;
        Ok(())
    }

    async fn raw_insert(conn: &mut MySqlConnection, key: &str, payload: &str) -> Res<()> {
        // The table has no time defaults (they would follow the session time zone).
        sqlx::query(
            "INSERT INTO raw_outbox (event_id, service, event_type, event_version, event_key, payload, \
                max_retries, next_attempt_at, created_at, updated_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6), UTC_TIMESTAMP(6))",
        )
        .bind(uuid::Uuid::now_v7())
        .bind(Bench::NAME)
        .bind(Tick::EVENT_TYPE)
        .bind(1i32)
        .bind(key)
        .bind(payload)
        .bind(20i32)
        .execute(conn)
        .await?;
        Ok(())
    }

    async fn raw_claim(
        pool: &MySqlPool,
        table: &str,
        service: &str,
        token: i64,
    ) -> Res<Vec<RawRow>> {
        // `service = ?` lets the claim walk the framework's (service, status, id) index.
        let select = format!(
            "SELECT id, event_id, event_key, payload FROM {table} \
              WHERE service = ? AND status = 0 \
                AND (locked_until IS NULL OR locked_until <= UTC_TIMESTAMP(6)) \
              ORDER BY id LIMIT 500 FOR UPDATE SKIP LOCKED"
        );
        let mut lease = QueryBuilder::<MySql>::new(format!("UPDATE {table} SET lease_token = "));
        lease
            .push_bind(token)
            .push(", locked_until = UTC_TIMESTAMP(6) + INTERVAL 30 SECOND WHERE id IN ");
        mysql_claim(
            pool,
            sqlx::query(&select).bind(service),
            |r| {
                Ok(RawRow {
                    id: r.try_get("id")?,
                    event_id: r.try_get("event_id")?,
                    key: mysql_text(r, "event_key")?,
                    payload: mysql_text(r, "payload")?.unwrap_or_default(),
                })
            },
            |r| r.id,
            lease,
        )
        .await
    }

    async fn raw_mark(pool: &MySqlPool, table: &str, ids: &[i64], token: i64) -> Res<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut q = QueryBuilder::<MySql>::new(format!(
            "UPDATE {table} SET status = 1, published_at = UTC_TIMESTAMP(6), locked_until = NULL, \
                lease_token = 0 WHERE id IN "
        ));
        push_ids(&mut q, ids.iter().copied());
        q.push(" AND lease_token = ").push_bind(token);
        q.build().execute(pool).await?;
        Ok(())
    }

    async fn more_sections(ctx: &Ctx<MySql>, _report: &mut Report) -> Res<()> {
        let skipped: Vec<&str> = ["c", "d", "e", "g", "h", "j"]
            .into_iter()
            .filter(|s| ctx.args.wants(s))
            .collect();
        if !skipped.is_empty() {
            log(format!(
                "{}: sections {} run on PostgreSQL only",
                Self::LABEL,
                skipped.join(", ")
            ));
        }
        Ok(())
    }
}

/// The bench's context on one database: pool, broker, catalog.
struct Ctx<DB: BenchDb> {
    args: Args,
    pool: Pool<DB>,
    broker: Rc<Broker>,
    catalog: Catalog,
    route: Route,
}

const RAW_TABLE: &str = "raw_outbox";
const LARGE_TABLE: &str = "large_outbox";
const SMALL_TABLE: &str = "small_outbox";
const ACCOUNTS: i32 = 10_000;

impl<DB: BenchDb> Ctx<DB> {
    /// The framework's route with a fresh topic (created) and group, and `table`.
    async fn route_with_fresh_topic(&self, table: &str) -> Res<Route> {
        let service = self.route.service().as_str();
        let topic = fresh("bench-");
        let catalog = Catalog::builder()
            .table(service, table)
            .topic(service, &topic)
            .group(service, format!("{topic}.g"))
            .build()?;
        let r = catalog
            .route(service)
            .cloned()
            .ok_or("the bench service has no route")?;
        self.broker
            .create_topic(r.topic().as_str(), self.args.partitions)
            .await?;
        Ok(r)
    }

    fn kafka(&self) -> KafkaConfig {
        KafkaConfig::new(self.broker.bootstrap.clone())
    }

    /// Empties `table` and loads `n` pending rows with `keys` keys (`seq` = position in
    /// the key), preceded by `consumed` consumed rows; then refreshes statistics.
    async fn load(&self, table: &str, consumed: i64, n: i64, keys: i64) -> Res<()> {
        DB::exec(&self.pool, &DB::truncate_sql(table)).await?;
        if consumed > 0 {
            self.insert_rows(table, consumed, keys, 2).await?;
        }
        self.insert_rows(table, n, keys, 0).await?;
        DB::exec(&self.pool, &DB::analyze_sql(table)).await
    }

    /// Appends `n` rows in status `status` (0 pending, 2 consumed), in chunks.
    async fn insert_rows(&self, table: &str, n: i64, keys: i64, status: i16) -> Res<()> {
        const CHUNK: i64 = 100_000;
        let mut start = 0;
        while start < n {
            let end = (start + CHUNK).min(n);
            DB::insert_rows(
                &self.pool,
                table,
                self.route.service().as_str(),
                keys,
                status,
                start,
                end,
            )
            .await?;
            start = end;
        }
        Ok(())
    }
}

// ------------------------------------------------------------------------------------
// a. business transaction
// ------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TxVariant {
    None,
    RawInsert,
    PublishOwnTx,
    PublishOutboxTx,
}

impl TxVariant {
    const ALL: [TxVariant; 4] = [
        TxVariant::None,
        TxVariant::RawInsert,
        TxVariant::PublishOwnTx,
        TxVariant::PublishOutboxTx,
    ];
    fn name(self) -> &'static str {
        match self {
            TxVariant::None => "UPDATE only",
            TxVariant::RawInsert => "UPDATE + hand-written INSERT",
            TxVariant::PublishOwnTx => "UPDATE + Outbox::publish (own tx)",
            TxVariant::PublishOutboxTx => "UPDATE + OutboxTx::publish (wakes relays)",
        }
    }
}

/// One business transaction of variant `v`. Every variant begins with `Backend::begin`
/// (what `OutboxTx` uses: plain BEGIN on PostgreSQL, READ COMMITTED on MariaDB).
async fn one_txn<DB: BenchDb>(
    pool: &Pool<DB>,
    outbox: &Outbox<Bench, DB>,
    v: TxVariant,
    n: u64,
) -> Res<()> {
    let account = (rand::random::<u32>() % ACCOUNTS as u32) as i32;
    let key = format!("k{}", n % 1000);
    match v {
        TxVariant::None => {
            let mut tx = DB::begin(pool).await?;
            DB::update_account(&mut *tx, account).await?;
            tx.commit().await?;
        }
        TxVariant::RawInsert => {
            let mut tx = DB::begin(pool).await?;
            DB::update_account(&mut *tx, account).await?;
            let (key, payload) = tick_row(n)?;
            DB::raw_insert(&mut *tx, &key, &payload).await?;
            tx.commit().await?;
        }
        TxVariant::PublishOwnTx => {
            let mut tx = DB::begin(pool).await?;
            DB::update_account(&mut *tx, account).await?;
            outbox.publish(&mut *tx, &Tick { key, seq: n }).await?;
            tx.commit().await?;
        }
        TxVariant::PublishOutboxTx => {
            let mut tx = outbox.begin().await?;
            DB::update_account(&mut *tx, account).await?;
            tx.publish(&Tick { key, seq: n }).await?;
            tx.commit().await?;
        }
    }
    Ok(())
}

async fn txn_rate<DB: BenchDb>(
    ctx: &Ctx<DB>,
    outbox: &Outbox<Bench, DB>,
    v: TxVariant,
    writers: usize,
) -> Res<f64> {
    let dur = Duration::from_secs_f64(ctx.args.txn_secs);
    let start = Instant::now();
    let count = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..writers {
        let pool = ctx.pool.clone();
        let outbox = outbox.clone();
        let count = count.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = w as u64 * 1_000_000_000;
            while start.elapsed() < dur {
                one_txn(&pool, &outbox, v, n).await?;
                n += 1;
                count.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, BoxError>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(count.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64())
}

async fn section_a<DB: BenchDb>(ctx: &Ctx<DB>, report: &mut Report) -> Res<()> {
    let name = section_name::<DB>("a");
    log(format!(
        "{name}: business transaction, 4 variants interleaved"
    ));
    let outbox = Outbox::<Bench, DB>::new(ctx.pool.clone(), &ctx.catalog)?;
    let mut rows = Vec::new();
    for writers in [1usize, 4, 16] {
        for t in [RAW_TABLE, ctx.route.table().as_str()] {
            DB::exec(&ctx.pool, &DB::truncate_sql(t)).await?;
        }
        let mut rates: HashMap<&str, Vec<f64>> = HashMap::new();
        for rep in 0..ctx.args.repeats {
            // Rotate the starting variant too, so no variant always runs first.
            for i in 0..TxVariant::ALL.len() {
                let v = TxVariant::ALL[(i + rep) % TxVariant::ALL.len()];
                let r = txn_rate(ctx, &outbox, v, writers).await?;
                log(format!(
                    "{name}: {writers:>2} writers  {:<45} {r:>8.0} commits/s",
                    v.name()
                ));
                rates.entry(v.name()).or_default().push(r);
            }
        }
        let none = median(rates.get_mut(TxVariant::None.name()).unwrap());
        let raw = median(rates.get_mut(TxVariant::RawInsert.name()).unwrap());
        for v in TxVariant::ALL {
            let m = median(rates.get_mut(v.name()).unwrap());
            rows.push(vec![
                writers.to_string(),
                v.name().to_owned(),
                format!("{m:.0}"),
                format!("{:.2}", m / none),
                format!("{:.2}", m / raw),
            ]);
        }
    }
    report.section(
        &format!("{name}. Business transaction (one UPDATE of a row, 10,000 rows) — commits/s"),
        &[
            "writers",
            "variant",
            "commits/s (median)",
            "× UPDATE only",
            "× hand-written INSERT",
        ],
        rows,
        &format!(
            "Goal: publish ≥ 0.90× the hand-written INSERT. {}",
            DB::WAKE_NOTE
        ),
    );
    Ok(())
}

// ------------------------------------------------------------------------------------
// b. relay drain: framework vs raw loop
// ------------------------------------------------------------------------------------

/// A hand-written producer: librdkafka defaults plus idempotence (acks=all), the
/// durability the framework also uses.
fn raw_producer(bootstrap: &str) -> Res<FutureProducer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .create()?)
}

/// Time the raw loop spent in each phase (µs): claim, produce + wait, mark.
static RAW_PHASES: [AtomicU64; 3] = [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];

fn phase(i: usize, since: Instant) -> Instant {
    RAW_PHASES[i].fetch_add(since.elapsed().as_micros() as u64, Ordering::Relaxed);
    Instant::now()
}

/// Enqueues `rec` on `producer`, waiting 1 ms whenever librdkafka's queue is full
/// (what a hand-written loop does with a batch larger than the queue).
async fn send_retrying<'a>(
    producer: &FutureProducer,
    mut rec: FutureRecord<'a, [u8], [u8]>,
) -> Res<DeliveryFuture> {
    loop {
        match producer.send_result(rec) {
            Ok(f) => return Ok(f),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                rec = back;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Err((e, _)) => return Err(e.into()),
        }
    }
}

/// Deadlock victims the hand-written loops and consumers ran again (logged by section c).
static DEADLOCKS: AtomicU64 = AtomicU64::new(0);

/// Whether `e` is a deadlock or serialization failure: what ran can simply run again.
fn is_deadlock(e: &BoxError) -> bool {
    matches!(
        e.downcast_ref::<sqlx::Error>(),
        Some(sqlx::Error::Database(d)) if matches!(d.code().as_deref(), Some("40P01" | "40001"))
    )
}

/// Runs `op` again while it is a deadlock victim (up to 10 times), as a hand-written
/// loop must: the transaction's row locks meet the relay's mark in another order (the
/// mark walks the rows in whatever order its plan reads them).
async fn retry_deadlocks<T, F, Fut>(mut op: F) -> Res<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Res<T>>,
{
    let mut tries = 0;
    loop {
        match op().await {
            Err(e) if is_deadlock(&e) && tries < 10 => {
                tries += 1;
                DEADLOCKS.fetch_add(1, Ordering::Relaxed);
            }
            r => return r,
        }
    }
}

/// Awaits the delivery reports `futs` of the rows `ids` (in the same order): the ids
/// the broker acknowledged.
async fn acknowledged(ids: impl Iterator<Item = i64>, futs: Vec<DeliveryFuture>) -> Vec<i64> {
    let mut ok = Vec::with_capacity(futs.len());
    for (id, f) in ids.zip(futs) {
        if let Ok(Ok(_)) = f.await {
            ok.push(id);
        }
    }
    ok
}

/// One claim → produce → wait → mark round of the hand-written loop. Rows claimed.
async fn raw_round<DB: BenchDb>(
    pool: &Pool<DB>,
    producer: &FutureProducer,
    table: &str,
    topic: &str,
) -> Res<usize> {
    let token: i64 = rand::random::<i64>() | 1;
    let t = Instant::now();
    let rows = DB::raw_claim(pool, table, Bench::NAME, token).await?;
    let t = phase(0, t);
    if rows.is_empty() {
        return Ok(0);
    }
    let mut futs = Vec::with_capacity(rows.len());
    for row in &rows {
        let id = row.event_id.to_string();
        let mut rec = FutureRecord::to(topic)
            .payload(row.payload.as_bytes())
            .headers(OwnedHeaders::new().insert(Header {
                key: "ce_id",
                value: Some(id.as_bytes()),
            }));
        if let Some(k) = &row.key {
            rec = rec.key(k.as_bytes());
        }
        futs.push(send_retrying(producer, rec).await?);
    }
    let ok = acknowledged(rows.iter().map(|r| r.id), futs).await;
    let t = phase(1, t);
    retry_deadlocks(|| DB::raw_mark(pool, table, &ok, token)).await?;
    phase(2, t);
    if ok.len() != rows.len() {
        return Err(format!(
            "{} of {} rows not acknowledged",
            rows.len() - ok.len(),
            rows.len()
        )
        .into());
    }
    Ok(rows.len())
}

async fn raw_drain<DB: BenchDb>(ctx: &Ctx<DB>, n: i64) -> Res<f64> {
    let topic = fresh("bench-raw-");
    ctx.broker.create_topic(&topic, ctx.args.partitions).await?;
    let producer = raw_producer(&ctx.broker.bootstrap)?;
    let start = Instant::now();
    let mut done = 0usize;
    loop {
        let got = raw_round(&ctx.pool, &producer, RAW_TABLE, &topic).await?;
        if got == 0 {
            break;
        }
        done += got;
    }
    let el = start.elapsed().as_secs_f64();
    if done as i64 != n {
        return Err(format!("raw loop drained {done} of {n}").into());
    }
    Ok(n as f64 / el)
}

/// What a framework drain did: its rate and the relays' counters summed.
struct Drained {
    /// Events per second, from the relays' start to the last row published.
    per_sec: f64,
    /// Rows whose mark found the lease gone.
    fenced: u64,
    /// Claims that found rows.
    rounds: u64,
}

/// Runs `relays` framework relays (own producers, as separate processes would) on
/// `route` until `n` rows are published.
async fn framework_drain<DB: BenchDb>(
    ctx: &Ctx<DB>,
    route: &Route,
    n: i64,
    relays: usize,
) -> Res<Drained> {
    let config = Arc::new(OutboxConfig::default());
    let (stop, rx) = tokio::sync::watch::channel(false);
    let mut stats = Vec::new();
    let mut tasks = Vec::new();
    let start = Instant::now();
    for _ in 0..relays {
        let relay = Relay::<DB>::new(
            ctx.pool.clone(),
            route.clone(),
            &ctx.kafka(),
            config.clone(),
        )?;
        stats.push(relay.stats());
        tasks.push(tokio::spawn(relay.run(rx.clone())));
    }
    let deadline = start + Duration::from_secs(3600);
    loop {
        let published: u64 = stats
            .iter()
            .map(|s| s.published.load(Ordering::Relaxed))
            .sum();
        if published >= n as u64 {
            break;
        }
        if Instant::now() > deadline {
            return Err("framework drain did not finish".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let el = start.elapsed().as_secs_f64();
    let _ = stop.send(true);
    for t in tasks {
        t.await??;
    }
    let sum = |f: fn(&RelayStats) -> &AtomicU64| {
        stats
            .iter()
            .map(|s| f(s).load(Ordering::Relaxed))
            .sum::<u64>()
    };
    Ok(Drained {
        per_sec: n as f64 / el,
        fenced: sum(|s| &s.fenced),
        rounds: sum(|s| &s.rounds),
    })
}

async fn section_b<DB: BenchDb>(ctx: &Ctx<DB>, report: &mut Report) -> Res<()> {
    let n = ctx.args.backlog;
    let name = section_name::<DB>("b");
    log(format!(
        "{name}: relay drain of {n} rows (10,000 keys), raw loop and framework interleaved"
    ));
    for p in &RAW_PHASES {
        p.store(0, Ordering::Relaxed);
    }
    let (mut raw, mut fw) = (Vec::new(), Vec::new());
    let (mut raw_mem, mut fw_mem) = (0f64, 0f64);
    for rep in 0..ctx.args.repeats {
        for which in if rep % 2 == 0 { [0, 1] } else { [1, 0] } {
            if which == 0 {
                ctx.load(RAW_TABLE, 0, n, 10_000).await?;
                reset_peak_rss();
                let r = raw_drain(ctx, n).await?;
                raw_mem = raw_mem.max(peak_rss_mib());
                log(format!("{name}: raw loop   {r:>8.0} events/s"));
                raw.push(r);
            } else {
                ctx.load(ctx.route.table().as_str(), 0, n, 10_000).await?;
                let route = ctx
                    .route_with_fresh_topic(ctx.route.table().as_str())
                    .await?;
                reset_peak_rss();
                let r = framework_drain(ctx, &route, n, 1).await?.per_sec;
                fw_mem = fw_mem.max(peak_rss_mib());
                log(format!("{name}: framework  {r:>8.0} events/s"));
                fw.push(r);
            }
        }
    }
    let (r, f) = (median(&mut raw), median(&mut fw));
    let ph: Vec<f64> = RAW_PHASES
        .iter()
        .map(|a| a.load(Ordering::Relaxed) as f64)
        .collect();
    let total: f64 = ph.iter().sum::<f64>().max(1.0);
    let isolation = if DB::IN_TITLES {
        " Both claim in READ COMMITTED (`SELECT … FOR UPDATE SKIP LOCKED`, then the lease \
         `UPDATE` by id); the framework's claim also skips rows whose key has an older pending \
         row and reads the claimed rows back after the `UPDATE`."
    } else {
        ""
    };
    report.section(
        &format!("{name}. Relay drain of a {n}-row backlog into the broker — events/s"),
        &["variant", "events/s (median)", "× raw loop"],
        vec![
            vec![
                "raw loop (claim 500 SKIP LOCKED → produce → wait → mark)".into(),
                format!("{r:.0}"),
                "1.00".into(),
            ],
            vec![
                "framework relay (1 instance)".into(),
                format!("{f:.0}"),
                format!("{:.2}", f / r),
            ],
        ],
        &format!(
            "Goal: ≥ 1.0× the raw loop. Both tables have the framework's DDL and indexes; both \
             producers are idempotent (acks=all).{isolation} Where the raw loop's time goes (all \
             repeats): claim {:.0}%, produce + wait for delivery reports {:.0}%, mark {:.0}%; it \
             does one at a time, the framework's relay overlaps the claim of the next batch with \
             the delivery reports and mark of the previous one.",
            100.0 * ph[0] / total,
            100.0 * ph[1] / total,
            100.0 * ph[2] / total
        ),
    );
    let tag = section_tag::<DB>("b");
    report.mem.push(vec![
        format!("raw relay loop ({tag})"),
        format!("{raw_mem:.0}"),
    ]);
    report.mem.push(vec![
        format!("framework relay ({tag})"),
        format!("{fw_mem:.0}"),
    ]);
    Ok(())
}

// ------------------------------------------------------------------------------------
// d. many relays: throughput and per-key order
// ------------------------------------------------------------------------------------

/// Reads `topic` back from the beginning: (records, per-key order violations,
/// duplicated (key, seq) pairs).
async fn read_back<DB: BenchDb>(
    ctx: &Ctx<DB>,
    topic: &str,
    expect: usize,
) -> Res<(usize, usize, usize)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &ctx.broker.bootstrap)
        .set("group.id", format!("{topic}.readback"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..ctx.args.partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    tokio::task::spawn_blocking(move || {
        let mut last: HashMap<Vec<u8>, i64> = HashMap::new();
        let (mut n, mut violations, mut dups) = (0usize, 0usize, 0usize);
        let deadline = Instant::now() + Duration::from_secs(300);
        while n < expect && Instant::now() < deadline {
            let Some(m) = consumer.poll(Duration::from_millis(200)) else {
                continue;
            };
            let m = m?;
            n += 1;
            let seq = m
                .payload()
                .and_then(|p| serde_json::from_slice::<serde_json::Value>(p).ok())
                .and_then(|v| v.get("seq").and_then(|s| s.as_i64()))
                .unwrap_or(-1);
            let key = m.key().unwrap_or_default().to_vec();
            match last.get(&key) {
                Some(&prev) if seq < prev => violations += 1,
                Some(&prev) if seq == prev => dups += 1,
                _ => {}
            }
            let e = last.entry(key).or_insert(seq);
            *e = (*e).max(seq);
        }
        Ok::<_, BoxError>((n, violations, dups))
    })
    .await?
}

/// Section d: for each key count of `--relay-keys`, 1 vs 2 vs 4 relays on the same
/// backlog, interleaved.
async fn section_d(ctx: &Ctx<Postgres>, report: &mut Report) -> Res<()> {
    let n = ctx.args.order_rows;
    let counts = [1usize, 2, 4];
    let mut rows = Vec::new();
    for &keys in &ctx.args.order_keys {
        log(format!("d: 1 vs 2 vs 4 relays on {n} rows, {keys} keys"));
        let mut rates: Vec<Vec<f64>> = vec![Vec::new(); 3];
        let mut viol = [0usize; 3];
        let mut dups = [0usize; 3];
        let mut missing = [0usize; 3];
        let mut fenced = [0u64; 3];
        for rep in 0..ctx.args.repeats {
            for j in 0..3 {
                let i = (j + rep) % 3;
                ctx.load(ctx.route.table().as_str(), 0, n, keys).await?;
                let route = ctx
                    .route_with_fresh_topic(ctx.route.table().as_str())
                    .await?;
                let Drained {
                    per_sec: r,
                    fenced: f,
                    rounds,
                } = framework_drain(ctx, &route, n, counts[i]).await?;
                let (got, v, d) = read_back(ctx, route.topic().as_str(), n as usize).await?;
                log(format!(
                    "d: {keys} keys, {} relay(s) {r:>8.0} events/s in {rounds} rounds; read back {got}, order violations {v}, duplicates {d}, fenced {f}",
                    counts[i]
                ));
                if got < n as usize {
                    log(format!(
                        "d: read back only {got} of {n} records within 300 s"
                    ));
                    missing[i] += n as usize - got;
                }
                rates[i].push(r);
                viol[i] += v;
                dups[i] += d;
                fenced[i] += f;
            }
        }
        let base = median(&mut rates[0].clone());
        for i in 0..3 {
            let m = median(&mut rates[i]);
            rows.push(vec![
                keys.to_string(),
                counts[i].to_string(),
                format!("{m:.0}"),
                format!("{:.2}", m / base),
                viol[i].to_string(),
                dups[i].to_string(),
                missing[i].to_string(),
                fenced[i].to_string(),
            ]);
        }
    }
    let keys = ctx
        .args
        .order_keys
        .iter()
        .map(|k| k.to_string())
        .collect::<Vec<_>>()
        .join(" and ");
    report.section(
        &format!("d. Many relays: {n}-row backlog, {keys} keys, one process per relay simulated by one producer each"),
        &["keys", "relays", "events/s (median)", "× 1 relay", "order violations (all repeats)", "duplicate records", "not read back in 300 s", "fenced marks"],
        rows,
        "Order violations: a record whose per-key `seq` is lower than an earlier record of the \
         same key in the topic (read back from every partition). Goal: ≥ 1.6× at 4 relays where \
         the broker is not the limit; 0 violations. `× 1 relay` compares relay counts on the \
         same key count. With few keys (many events per key) the relays compete for the same \
         heads of key (a claim may only take a key's oldest pending row): the case that shows \
         whether more relays still add throughput.",
    );
    Ok(())
}

// ------------------------------------------------------------------------------------
// e. large vs small table
// ------------------------------------------------------------------------------------

async fn section_e(ctx: &Ctx<Postgres>, report: &mut Report) -> Res<()> {
    let backlog = 20_000i64;
    log(format!(
        "e: loading {} consumed rows into {LARGE_TABLE} and {} into {SMALL_TABLE}",
        ctx.args.large, ctx.args.small
    ));
    let t = Instant::now();
    ctx.load(LARGE_TABLE, ctx.args.large, 0, 10_000).await?;
    ctx.load(SMALL_TABLE, ctx.args.small, 0, 10_000).await?;
    log(format!("e: loaded in {:.0}s", t.elapsed().as_secs_f64()));
    let (mut large, mut small) = (Vec::new(), Vec::new());
    for rep in 0..ctx.args.repeats {
        for which in if rep % 2 == 0 { [0, 1] } else { [1, 0] } {
            let table = if which == 0 { LARGE_TABLE } else { SMALL_TABLE };
            ctx.insert_rows(table, backlog, 1000, 0).await?;
            sqlx::query(&format!("ANALYZE {table}"))
                .execute(&ctx.pool)
                .await?;
            let route = ctx.route_with_fresh_topic(table).await?;
            let r = framework_drain(ctx, &route, backlog, 1).await?.per_sec;
            // The drained rows join the consumed mass, as the consumer would make them
            // (dead tuples included, as in production; autovacuum runs as configured).
            sqlx::query(&format!(
                "UPDATE {table} SET status = 2, consumed_at = now() WHERE status = 1"
            ))
            .execute(&ctx.pool)
            .await?;
            log(format!("e: {table:<13} {r:>8.0} events/s"));
            if which == 0 {
                large.push(r)
            } else {
                small.push(r)
            }
        }
    }
    let (l, s) = (median(&mut large), median(&mut small));
    report.section(
        "e. Drain rate with a large table vs a small one (framework relay, 20,000-row backlog per repeat)",
        &["table", "rows besides the backlog (consumed)", "events/s (median)", "× small"],
        vec![
            vec![SMALL_TABLE.into(), ctx.args.small.to_string(), format!("{s:.0}"), "1.00".into()],
            vec![LARGE_TABLE.into(), ctx.args.large.to_string(), format!("{l:.0}"), format!("{:.2}", l / s)],
        ],
        "Goal: ≥ 0.9×. Consumed rows were bulk-loaded then VACUUM ANALYZEd once; each drained \
         backlog is then marked consumed in place (dead tuples left to autovacuum).",
    );
    Ok(())
}

// ------------------------------------------------------------------------------------
// c. commit → handler latency
// ------------------------------------------------------------------------------------

static SEQ: AtomicU64 = AtomicU64::new(1);

/// Publishes at `rate`/s for `secs`; `publish` is one business transaction.
async fn steady<F, Fut>(rate: u64, secs: f64, publish: F) -> Res<Vec<u64>>
where
    F: Fn(u64) -> Fut + Send + Sync + 'static + Clone,
    Fut: std::future::Future<Output = Res<()>> + Send + 'static,
{
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let start = Instant::now();
    let total = (rate as f64 * secs) as u64;
    let mut sent = 0u64;
    let mut seqs = Vec::with_capacity(total as usize);
    let mut tasks = Vec::new();
    while sent < total {
        let due = ((start.elapsed().as_secs_f64() * rate as f64) as u64 + 1).min(total);
        while sent < due {
            let seq = SEQ.fetch_add(1, Ordering::Relaxed);
            seqs.push(seq);
            sent += 1;
            let permit = sem.clone().acquire_owned().await?;
            let p = publish.clone();
            tasks.push(tokio::spawn(async move {
                let r = p(seq).await;
                drop(permit);
                r
            }));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    for t in tasks {
        t.await??;
    }
    Ok(seqs)
}

/// How long section c waits for the last events to be handled.
const HANDLED_WAIT: Duration = Duration::from_secs(30);

/// The key and JSON payload of the [`Tick`] `seq` (1,000 keys), as the hand-written
/// writers insert it.
fn tick_row(seq: u64) -> Res<(String, String)> {
    let key = format!("k{}", seq % 1000);
    let payload = serde_json::to_string(&Tick {
        key: key.clone(),
        seq,
    })?;
    Ok((key, payload))
}

fn committed(seq: u64) {
    clock()
        .committed
        .lock()
        .unwrap()
        .insert(seq, Instant::now());
}

/// Waits until every seq was handled (or `wait`), then computes latencies in ms:
/// (p50, p99, max, missing).
async fn latencies(seqs: &[u64], wait: Duration) -> (f64, f64, f64, usize) {
    let deadline = Instant::now() + wait;
    loop {
        let all = {
            let h = clock().handled.lock().unwrap();
            seqs.iter().all(|s| h.contains_key(s))
        };
        if all || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let c = clock().committed.lock().unwrap();
    let h = clock().handled.lock().unwrap();
    let mut ms = Vec::with_capacity(seqs.len());
    let mut missing = 0;
    for s in seqs {
        match (c.get(s), h.get(s)) {
            (Some(c), Some(h)) => ms.push(h.saturating_duration_since(*c).as_secs_f64() * 1000.0),
            _ => missing += 1,
        }
    }
    ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (
        percentile(&ms, 50.0),
        percentile(&ms, 99.0),
        ms.last().copied().unwrap_or(f64::NAN),
        missing,
    )
}

async fn wait_handled(seq: u64, what: &str) -> Res<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !clock().handled.lock().unwrap().contains_key(&seq) {
        if Instant::now() > deadline {
            return Err(format!("{what}: warm-up event not handled in 60 s").into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

async fn small_pool(ctx: &Ctx<Postgres>, n: u32) -> Res<PgPool> {
    Ok(PgPoolOptions::new()
        .max_connections(n)
        .connect_with(ctx.pool.connect_options().as_ref().clone())
        .await?)
}

/// A catalog whose topic and group carry a fresh prefix (the topic created) and the
/// bench service's route in it, its table emptied: a latency run's start.
async fn fresh_catalog(ctx: &Ctx<Postgres>) -> Res<(Catalog, Route)> {
    let prefix = fresh("lat");
    let catalog = Catalog::builder()
        .topic_prefix(format!("{prefix}."))
        .group_prefix(format!("{prefix}."))
        .build()?;
    let route = catalog.route_of::<Bench>()?.clone();
    ctx.broker
        .create_topic(route.topic().as_str(), ctx.args.partitions)
        .await?;
    sqlx::query(&format!("TRUNCATE {}", route.table()))
        .execute(&ctx.pool)
        .await?;
    Ok((catalog, route))
}

/// The framework's publisher of the latency runs: per event, one `OutboxTx` (publish,
/// COMMIT, which wakes the relays), then the commit time noted ([`committed`]).
fn outbox_tx_publisher(
    outbox: Outbox<Bench, Postgres>,
) -> impl Fn(u64) -> futures::future::BoxFuture<'static, Res<()>> + Clone + Send + Sync + 'static {
    move |seq: u64| {
        let outbox = outbox.clone();
        Box::pin(async move {
            let mut tx = outbox.begin().await?;
            tx.publish(&Tick {
                key: format!("k{}", seq % 1000),
                seq,
            })
            .await?;
            tx.commit().await?;
            committed(seq);
            Ok(())
        })
    }
}

/// The framework: runtime (relay + consumer, own pool), publishers via `OutboxTx`.
async fn latency_framework(
    ctx: &Ctx<Postgres>,
    rate: u64,
) -> Res<((f64, f64, f64, usize), f64, cpu::PerEvents)> {
    let (catalog, route) = fresh_catalog(ctx).await?;
    let rt_pool = small_pool(ctx, 8).await?;
    reset_peak_rss();
    let mut config = OutboxConfig::default();
    if let Some(n) = ctx.args.consumer_batch {
        config.consumer_batch_size = n;
    }
    if let Some(n) = ctx.args.consumer_lanes {
        config.consumer_lanes = n;
    }
    stage_times_start(ctx)?;
    let handle = OutboxRuntime::new(catalog.clone(), rt_pool.clone(), ctx.kafka())
        .config(config)
        .services(["bench"])
        .start()
        .await?;
    let publish = outbox_tx_publisher(Outbox::<Bench, Postgres>::new(ctx.pool.clone(), &catalog)?);
    let warm = SEQ.fetch_add(1, Ordering::Relaxed);
    publish(warm).await?;
    wait_handled(warm, "framework").await?;
    let before = cpu::Sample::take();
    let seqs = steady(rate, ctx.args.latency_secs, publish).await?;
    let l = latencies(&seqs, HANDLED_WAIT).await;
    let cpu = before.per_events(&cpu::Sample::take(), seqs.len());
    let mem = peak_rss_mib();
    // Counters, for reading a slow run.
    let c = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    for r in handle.relay_stats(route.service().as_str()) {
        log(format!(
            "c: {rate:>5}/s framework relay: published {} rounds {} idles {} fenced {} released {} errors {}",
            c(&r.published), c(&r.rounds), c(&r.idles), c(&r.fenced), c(&r.released), c(&r.errors)
        ));
    }
    if let Some(s) = handle.consumer_stats(route.service().as_str()) {
        log(format!(
            "c: {rate:>5}/s framework consumer: handled {} batched {} batch lock waits {} deferred {} duplicates {} db retries {}",
            c(&s.handled), c(&s.batched), c(&s.batch_lock_waits), c(&s.deferred), c(&s.duplicates), c(&s.db_retries)
        ));
    }
    handle.shutdown().await?;
    rt_pool.close().await;
    stage_times_log(ctx, &format!("c: {rate:>5}/s framework"))?;
    Ok((l, mem, cpu))
}

/// The pipelines of section c, in table order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pipeline {
    /// The raw pipeline with librdkafka's defaults (kept for reference).
    RawDefaults,
    /// The raw pipeline with the framework's Kafka settings, its consumer doing no
    /// database work: the price of the framework's relay and consumer with nothing for
    /// exactly-once effect.
    RawTuned,
    /// The tuned raw pipeline whose consumer settles each batch in a transaction
    /// ([`txconsumer`]): the baseline of the ratios, the same work the framework does.
    RawTransactional,
    /// `OutboxTx` + `OutboxRuntime`.
    Framework,
}

impl Pipeline {
    const ALL: [Pipeline; 4] = [
        Pipeline::RawDefaults,
        Pipeline::RawTuned,
        Pipeline::RawTransactional,
        Pipeline::Framework,
    ];

    fn name(self) -> &'static str {
        match self {
            Pipeline::RawDefaults => "raw pipeline (librdkafka defaults)",
            Pipeline::RawTuned => "raw pipeline (tuned)",
            Pipeline::RawTransactional => "raw pipeline (tuned, transactional consumer)",
            Pipeline::Framework => "framework",
        }
    }

    fn short(self) -> &'static str {
        match self {
            Pipeline::RawDefaults => "raw",
            Pipeline::RawTuned => "raw tuned",
            Pipeline::RawTransactional => "raw tx",
            Pipeline::Framework => "framework",
        }
    }
}

/// A plain rdkafka consumer of `topic` in a group of its own that notes when each
/// [`Tick`] arrived ([`saw`]) and does no other work, until `stop` changes. `tuned`: the
/// framework's consumer settings (`KafkaConfig::consumer_config`) with offsets stored
/// as records are returned; else librdkafka's defaults.
fn spawn_plain_consumer<DB: BenchDb>(
    ctx: &Ctx<DB>,
    topic: &str,
    tuned: bool,
    mut stop_rx: tokio::sync::watch::Receiver<bool>,
) -> Res<tokio::task::JoinHandle<Res<()>>> {
    let group = format!("{topic}.g");
    let config = if tuned {
        let mut c = ctx
            .kafka()
            .consumer_config(&group, OutboxConfig::default().max_payload_bytes);
        // A plain consumer: offsets stored as records are returned (the framework
        // stores them after the handler's commit).
        c.set("enable.auto.offset.store", "true");
        c
    } else {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &ctx.broker.bootstrap)
            .set("group.id", &group)
            .set("auto.offset.reset", "earliest");
        c
    };
    let c: StreamConsumer = config.create()?;
    c.subscribe(&[topic])?;
    Ok(tokio::spawn(async move {
        loop {
            tokio::select! {
                m = c.recv() => {
                    let m = m?;
                    if let Some(seq) = m.payload()
                        .and_then(|p| serde_json::from_slice::<Tick>(p).ok()).map(|t| t.seq) {
                        saw(seq);
                    }
                    let _ = m.headers().map(|h| h.count());
                }
                _ = stop_rx.changed() => return Ok::<_, BoxError>(()),
            }
        }
    }))
}

/// The raw pipeline `pipeline` (not the framework): INSERT + commit + NOTIFY; a
/// LISTEN-woken claim loop; a plain rdkafka consumer, or the transactional one. Tuned:
/// producer and consumer take the framework's Kafka settings
/// (`KafkaConfig::producer_config` / `consumer_config`), else librdkafka's defaults
/// (producer: plus idempotence).
async fn latency_raw(
    ctx: &Ctx<Postgres>,
    rate: u64,
    pipeline: Pipeline,
) -> Res<((f64, f64, f64, usize), f64, cpu::PerEvents)> {
    let tuned = pipeline != Pipeline::RawDefaults;
    DEADLOCKS.store(0, Ordering::Relaxed);
    txconsumer::BUSY.store(0, Ordering::Relaxed);
    let topic = fresh("bench-lat-raw-");
    ctx.broker.create_topic(&topic, ctx.args.partitions).await?;
    Postgres::exec(&ctx.pool, &format!("TRUNCATE {RAW_TABLE}")).await?;
    let rt_pool = small_pool(ctx, 8).await?;
    reset_peak_rss();
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    // Relay loop.
    let relay = {
        let pool = rt_pool.clone();
        let producer: FutureProducer = if tuned {
            ctx.kafka().producer_config().create()?
        } else {
            raw_producer(&ctx.broker.bootstrap)?
        };
        let topic = topic.clone();
        let mut stop_rx = stop_rx.clone();
        let mut listener = PgListener::connect_with(&rt_pool).await?;
        listener.listen("raw_wakeup").await?;
        tokio::spawn(async move {
            loop {
                while raw_round(&pool, &producer, RAW_TABLE, &topic).await? > 0 {}
                tokio::select! {
                    _ = listener.recv() => {}
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = stop_rx.changed() => return Ok::<_, BoxError>(()),
                }
            }
        })
    };
    let consumer = match pipeline {
        Pipeline::RawTransactional => txconsumer::spawn(ctx, &topic, rt_pool.clone(), stop_rx),
        _ => spawn_plain_consumer(ctx, &topic, tuned, stop_rx)?,
    };
    let publish = {
        let pool = ctx.pool.clone();
        move |seq: u64| {
            let pool = pool.clone();
            async move {
                let (key, payload) = tick_row(seq)?;
                let mut tx = pool.begin().await?;
                Postgres::raw_insert(&mut *tx, &key, &payload).await?;
                tx.commit().await?;
                committed(seq);
                sqlx::query("SELECT pg_notify('raw_wakeup', '')")
                    .execute(&pool)
                    .await?;
                Ok(())
            }
        }
    };
    let warm = SEQ.fetch_add(1, Ordering::Relaxed);
    publish(warm).await?;
    wait_handled(warm, "raw").await?;
    let before = cpu::Sample::take();
    let seqs = steady(rate, ctx.args.latency_secs, publish).await?;
    let l = latencies(&seqs, HANDLED_WAIT).await;
    let cpu = before.per_events(&cpu::Sample::take(), seqs.len());
    let mem = peak_rss_mib();
    let _ = stop.send(true);
    relay.await??;
    consumer.await??;
    rt_pool.close().await;
    let (deadlocks, busy) = (
        DEADLOCKS.load(Ordering::Relaxed),
        txconsumer::BUSY.load(Ordering::Relaxed),
    );
    if deadlocks + busy > 0 {
        log(format!(
            "c: {rate:>5}/s {}: {deadlocks} deadlock victims run again, {busy} consumer batches found rows locked",
            pipeline.short()
        ));
    }
    Ok((l, mem, cpu))
}

/// A recorder that hands out real Prometheus handles while on and no-op handles while
/// off: the runtime registers its handles when a relay or consumer is created, so each
/// variant of section g gets what was current when it started. Installed once per
/// process, by section g only.
struct Toggle {
    on: std::sync::atomic::AtomicBool,
    inner: metrics_exporter_prometheus::PrometheusRecorder,
}

impl metrics::Recorder for Toggle {
    fn describe_counter(
        &self,
        k: metrics::KeyName,
        u: Option<metrics::Unit>,
        d: metrics::SharedString,
    ) {
        self.inner.describe_counter(k, u, d)
    }
    fn describe_gauge(
        &self,
        k: metrics::KeyName,
        u: Option<metrics::Unit>,
        d: metrics::SharedString,
    ) {
        self.inner.describe_gauge(k, u, d)
    }
    fn describe_histogram(
        &self,
        k: metrics::KeyName,
        u: Option<metrics::Unit>,
        d: metrics::SharedString,
    ) {
        self.inner.describe_histogram(k, u, d)
    }
    fn register_counter(&self, k: &metrics::Key, m: &metrics::Metadata<'_>) -> metrics::Counter {
        if self.on.load(Ordering::SeqCst) {
            self.inner.register_counter(k, m)
        } else {
            metrics::Counter::noop()
        }
    }
    fn register_gauge(&self, k: &metrics::Key, m: &metrics::Metadata<'_>) -> metrics::Gauge {
        if self.on.load(Ordering::SeqCst) {
            self.inner.register_gauge(k, m)
        } else {
            metrics::Gauge::noop()
        }
    }
    fn register_histogram(
        &self,
        k: &metrics::Key,
        m: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        if self.on.load(Ordering::SeqCst) {
            self.inner.register_histogram(k, m)
        } else {
            metrics::Histogram::noop()
        }
    }
}

static TOGGLE: OnceLock<&'static Toggle> = OnceLock::new();

/// Turns the metrics recorder on or off for what starts next (installs it once).
fn metrics_on(on: bool) -> Res<()> {
    let toggle = match TOGGLE.get() {
        Some(t) => *t,
        None => {
            let t: &'static Toggle = Box::leak(Box::new(Toggle {
                on: std::sync::atomic::AtomicBool::new(false),
                inner: metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder(),
            }));
            metrics::set_global_recorder(t).map_err(|e| format!("installing the recorder: {e}"))?;
            let _ = TOGGLE.set(t);
            t
        }
    };
    toggle.on.store(on, Ordering::SeqCst);
    Ok(())
}

/// With `--stage-times`: turns the recorder on for the framework run about to start.
fn stage_times_start(ctx: &Ctx<Postgres>) -> Res<()> {
    if ctx.args.stage_times {
        metrics_on(true)?;
    }
    Ok(())
}

/// With `--stage-times`: logs the p50/p99 of the framework's stage histograms
/// accumulated so far, prefixed by `what`, and turns the recorder off.
fn stage_times_log(ctx: &Ctx<Postgres>, what: &str) -> Res<()> {
    if !ctx.args.stage_times {
        return Ok(());
    }
    let Some(toggle) = TOGGLE.get() else {
        return Ok(());
    };
    let text = toggle.inner.handle().render();
    let stages = [
        "outbox_claim_seconds",
        "outbox_mark_seconds",
        "outbox_commit_to_ack_seconds",
        "outbox_ack_to_handled_seconds",
        "outbox_commit_to_handled_seconds",
    ];
    let mut line = String::new();
    for stage in stages {
        let q = |quantile: &str| {
            text.lines()
                .find(|l| l.starts_with(stage) && l.contains(&format!("quantile=\"{quantile}\"")))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse::<f64>().ok())
        };
        if let (Some(p50), Some(p99)) = (q("0.5"), q("0.99")) {
            let short = stage
                .trim_start_matches("outbox_")
                .trim_end_matches("_seconds");
            let _ = write!(line, "  {short} {:.1}/{:.1}", p50 * 1e3, p99 * 1e3);
        }
    }
    log(format!(
        "{what}: stage times p50/p99 ms (cumulative over this process):{line}"
    ));
    metrics_on(false)
}

/// Section g: the framework's drain and its latency at 1,000 events/s with a Prometheus
/// recorder installed and without, interleaved (on, off, off, on, ...).
async fn section_g(ctx: &Ctx<Postgres>, report: &mut Report) -> Res<()> {
    let n = ctx.args.backlog;
    log(format!(
        "g: metrics recorder on vs off: drain of {n} rows, latency at 1000/s"
    ));
    let (mut drain, mut p50, mut p99) = (
        [Vec::new(), Vec::new()],
        [Vec::new(), Vec::new()],
        [Vec::new(), Vec::new()],
    );
    for rep in 0..ctx.args.repeats {
        for on in if rep % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        } {
            metrics_on(on)?;
            let i = usize::from(on);
            ctx.load(ctx.route.table().as_str(), 0, n, 10_000).await?;
            let route = ctx
                .route_with_fresh_topic(ctx.route.table().as_str())
                .await?;
            let r = framework_drain(ctx, &route, n, 1).await?.per_sec;
            let (l, _, _) = latency_framework(ctx, 1000).await?;
            log(format!(
                "g: recorder {:<3} drain {r:>8.0} events/s  1000/s p50 {:>6.1} ms p99 {:>6.1} ms",
                if on { "on" } else { "off" },
                l.0,
                l.1
            ));
            drain[i].push(r);
            p50[i].push(l.0);
            p99[i].push(l.1);
        }
    }
    metrics_on(false)?;
    let range = |v: &[f64]| {
        let (lo, hi) = v
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(*x), b.max(*x)));
        format!("{lo:.1}–{hi:.1}")
    };
    let mut rows = Vec::new();
    for (what, v, higher_is_better) in [
        ("drain, events/s", &mut drain, true),
        ("latency at 1,000/s, p50 ms", &mut p50, false),
        ("latency at 1,000/s, p99 ms", &mut p99, false),
    ] {
        let (off_range, on_range) = (range(&v[0]), range(&v[1]));
        let (off, on) = (median(&mut v[0]), median(&mut v[1]));
        let cost = if higher_is_better { off / on } else { on / off };
        rows.push(vec![
            what.into(),
            format!("{off:.1} ({off_range})"),
            format!("{on:.1} ({on_range})"),
            format!("{cost:.3}"),
        ]);
    }
    report.section(
        "g. The cost of metrics: a Prometheus recorder installed vs none",
        &[
            "figure",
            "no recorder: median (range)",
            "recorder: median (range)",
            "cost (> 1 = slower with it)",
        ],
        rows,
        "Goal: ≤ 1.03. Same process, variants interleaved; the recorder is \
         `metrics-exporter-prometheus`'s, installed for the whole run and handing out no-op \
         handles to the variant without it (handles are registered when a relay or consumer \
         starts). Each latency figure is one 1,000 events/s run of section c's framework \
         pipeline.",
    );
    Ok(())
}

async fn section_c(ctx: &Ctx<Postgres>, report: &mut Report) -> Res<()> {
    log("c: commit → handler latency, raw pipelines (defaults, tuned, transactional) and framework interleaved");
    let mut rows = Vec::new();
    let n = Pipeline::ALL.len();
    let mut mem = [0f64; Pipeline::ALL.len()];
    for &rate in &ctx.args.rates {
        let mut res: [Vec<(f64, f64, f64, usize)>; Pipeline::ALL.len()] = Default::default();
        let mut cpus: [Vec<cpu::PerEvents>; Pipeline::ALL.len()] = Default::default();
        for rep in 0..ctx.args.repeats {
            // Rotate the starting pipeline, so none always runs first.
            for i in 0..n {
                let p = Pipeline::ALL[(i + rep) % n];
                let (l, m, c) = match p {
                    Pipeline::Framework => latency_framework(ctx, rate).await?,
                    raw => latency_raw(ctx, rate, raw).await?,
                };
                mem[p as usize] = mem[p as usize].max(m);
                log(format!(
                    "c: {rate:>5}/s {:<10} p50 {:>7.1} ms  p99 {:>7.1} ms  max {:>7.1} ms  missing {}  peak RSS {m:.0} MiB  \
                     CPU ms per 1,000 events {}",
                    p.short(), l.0, l.1, l.2, l.3, c.cell()
                ));
                res[p as usize].push(l);
                cpus[p as usize].push(c);
            }
        }
        let med = |v: &Vec<(f64, f64, f64, usize)>, f: fn(&(f64, f64, f64, usize)) -> f64| {
            median(&mut v.iter().map(f).collect::<Vec<_>>())
        };
        let stats: Vec<[f64; 4]> = res
            .iter()
            .map(|v| {
                [
                    med(v, |x| x.0),
                    med(v, |x| x.1),
                    med(v, |x| x.2),
                    v.iter().map(|x| x.3).sum::<usize>() as f64,
                ]
            })
            .collect();
        let tuned = stats[Pipeline::RawTuned as usize];
        let tx = stats[Pipeline::RawTransactional as usize];
        for p in Pipeline::ALL {
            let s = stats[p as usize];
            rows.push(vec![
                rate.to_string(),
                p.name().into(),
                format!("{:.1}", s[0]),
                format!("{:.1}", s[1]),
                format!("{:.1}", s[2]),
                format!("{:.2}", s[0] / tuned[0]),
                format!("{:.2}", s[1] / tuned[1]),
                format!("{:.2}", s[0] / tx[0]),
                format!("{:.2}", s[1] / tx[1]),
                format!("{}", s[3]),
                cpu::PerEvents::median(&cpus[p as usize]).cell(),
            ]);
        }
    }
    // The settings the tuned raw pipeline shares with the framework, as configured now.
    let kafka = ctx.kafka();
    let (producer, consumer) = (
        kafka.producer_config(),
        kafka.consumer_config("g", OutboxConfig::default().max_payload_bytes),
    );
    let setting = |c: &ClientConfig, k: &str| format!("`{k}` {}", c.get(k).unwrap_or("unset"));
    report.section(
        &format!(
            "c. Commit → handler latency at steady rates ({} s per measurement, ms)",
            ctx.args.latency_secs
        ),
        &[
            "events/s",
            "pipeline",
            "p50",
            "p99",
            "max",
            "p50 × raw (tuned)",
            "p99 × raw (tuned)",
            "p50 × raw (transactional)",
            "p99 × raw (transactional)",
            "not handled in 30 s",
            "CPU ms per 1,000 events: all (bench / database / broker)",
        ],
        rows,
        &format!(
            "Goal: the framework ≤ 1.2× the transactional raw pipeline's p50 and p99 at 1,000 and \
             5,000 events/s, and keeps up at 5,000/s. Medians over repeats of each run's \
             p50/p99/max; the ratios compare with the tuned raw pipeline (same Kafka settings as \
             the framework, a consumer that does no database work: what exactly-once effect costs \
             is in the gap) and with the transactional raw pipeline (the same relay loop; its \
             consumer does what the framework's does for exactly-once effect: {}). Raw: INSERT + \
             COMMIT, then `pg_notify` per event; a LISTEN-woken claim loop (claim 500 SKIP LOCKED, \
             produce, wait, mark); a plain rdkafka StreamConsumer that only decodes the payload. \
             Raw (librdkafka defaults), for reference: idempotent producer, otherwise librdkafka's \
             defaults (`linger.ms` 5, `fetch.wait.max.ms` 500). Raw (tuned): producer and consumer \
             built from the framework's own `KafkaConfig` (producer {}, {}, {}, {}; consumer {}, \
             {}, {}), offsets stored automatically (the transactional one stores them by hand \
             after its COMMIT). Framework: `OutboxTx` publish + commit; `OutboxRuntime` (one \
             relay, one consumer, own pool of 8); the handler runs in the consumer's transaction \
             (row lock, predecessor check, consumed mark, COMMIT, shared by the records queued \
             in a lane, up to `consumer_batch_size`). Latency is measured at handler entry (the \
             transactional raw consumer: once its batch's rows are locked, before the mark and \
             COMMIT). 1,000 keys. {}",
            txconsumer::DESCRIPTION,
            setting(&producer, "linger.ms"),
            setting(&producer, "enable.idempotence"),
            setting(&producer, "acks"),
            setting(&producer, "message.timeout.ms"),
            setting(&consumer, "fetch.wait.max.ms"),
            setting(&consumer, "session.timeout.ms"),
            setting(&consumer, "heartbeat.interval.ms"),
            cpu::NOTE,
        ),
    );
    for p in Pipeline::ALL {
        let what = match p {
            Pipeline::RawDefaults => "raw pipeline, librdkafka defaults: relay loop + consumer (c)",
            Pipeline::RawTuned => "raw pipeline, tuned: relay loop + consumer (c)",
            Pipeline::RawTransactional => {
                "raw pipeline, tuned: relay loop + transactional consumer (c)"
            }
            Pipeline::Framework => "framework: OutboxRuntime relay + consumer (c)",
        };
        report
            .mem
            .push(vec![what.into(), format!("{:.0}", mem[p as usize])]);
    }
    Ok(())
}

// ------------------------------------------------------------------------------------
// Report
// ------------------------------------------------------------------------------------

/// The markdown report, rewritten to `--out` after every section.
struct Report {
    md: String,
    /// Section f's rows: phase, peak RSS in MiB.
    mem: Vec<Vec<String>>,
    /// One machine-block line per database server used: "PostgreSQL: 15.x".
    servers: Vec<String>,
    started: Instant,
}

impl Report {
    fn new() -> Report {
        Report {
            md: String::new(),
            mem: Vec::new(),
            servers: Vec::new(),
            started: Instant::now(),
        }
    }

    fn section(&mut self, title: &str, head: &[&str], rows: Vec<Vec<String>>, note: &str) {
        let mut s = format!(
            "\n### {title}\n\n| {} |\n|{}\n",
            head.join(" | "),
            "---|".repeat(head.len())
        );
        for r in &rows {
            let _ = writeln!(s, "| {} |", r.join(" | "));
        }
        let _ = writeln!(s, "\n{note}");
        println!("{s}");
        self.md.push_str(&s);
    }

    /// Writes the report to `--out` (if given); `done` once every section ran.
    fn write(&self, args: &Args, broker: &Broker, done: bool) -> Res<()> {
        let Some(out) = &args.out else { return Ok(()) };
        let header = format!(
            "# Benchmarks\n\nGenerated by `scripts/bench.sh` (the `outbox-bench` binary, `bench/`) in {:.0} s{}. \
             Every figure is a median over repeats, and every ratio compares variants measured in the same \
             run, interleaved (this machine's fsync speed flips between modes every few minutes: never \
             compare figures across runs).\n\n{}",
            self.started.elapsed().as_secs_f64(),
            if done { "" } else { " (run still in progress or failed: sections missing)" },
            machine(
                &self.servers,
                &format!("{} at {}", broker.tier(), broker.bootstrap),
                args
            )
        );
        let analysis = std::env::var("OUTBOX_BENCH_NOTES")
            .ok()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default();
        std::fs::write(
            out,
            format!("{header}\n## Results\n{}\n{analysis}", self.md),
        )?;
        Ok(())
    }
}

fn machine(servers: &[String], broker: &str, args: &Args) -> String {
    let cmd = |c: &str, a: &[&str]| {
        std::process::Command::new(c)
            .args(a)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .nth(1)
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| format!("{:.1} GiB", kb / 1024.0 / 1024.0))
        .unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or_default()
        .trim()
        .to_owned();
    let (_, rdk) = rdkafka::util::get_rdkafka_version();
    let servers: String = servers.iter().map(|s| format!("- {s}\n")).collect();
    format!(
        "- date: {}\n- machine: {} cores ({cpu}), {mem} RAM, {}\n{servers}\
         - broker: {broker}; librdkafka {rdk}; {}\n- settings: repeats {}, backlog {}, large table {}, \
         small table {}, many-relays backlog {} on {:?} keys, {} s per transaction measurement, {} s \
         per latency measurement, rates {:?} (c), {:?} (j, CPU hog {}, records counted within {} s of the \
         last publish), {} partitions per topic; framework: `OutboxConfig::default()`{} and the \
         framework's Kafka defaults\n",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        cmd("uname", &["-sr"]),
        cmd("rustc", &["--version"]),
        args.repeats,
        args.backlog,
        args.large,
        args.small,
        args.order_rows,
        args.order_keys,
        args.txn_secs,
        args.latency_secs,
        args.rates,
        args.steady_rates,
        match args.hog.as_slice() {
            [false] => "off",
            [true] => "on",
            _ => "off and on",
        },
        args.steady_deadline,
        args.partitions,
        [
            args.consumer_batch.map(|n| format!("`consumer_batch_size` {n}")),
            args.consumer_lanes.map(|n| format!("`consumer_lanes` {n}")),
        ]
        .into_iter()
        .flatten()
        .reduce(|a, b| format!("{a} and {b}"))
        .map(|s| format!(" except {s} in section c"))
        .unwrap_or_default(),
    )
}

// ------------------------------------------------------------------------------------
// main
// ------------------------------------------------------------------------------------

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("OUTBOX_BENCH_LOG")
                .unwrap_or_else(|_| "error".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let args = match Args::parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("outbox-bench: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(args).await {
        eprintln!("outbox-bench: failed: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Res<()> {
    let broker = Rc::new(Broker::new(&args.broker)?);
    let mut report = Report::new();
    if args.db.postgres() {
        run_on::<Postgres>(&args, &broker, &mut report).await?;
    }
    if args.db.mysql() {
        run_on::<MySql>(&args, &broker, &mut report).await?;
    }
    if !report.mem.is_empty() {
        let mem = std::mem::take(&mut report.mem);
        report.section(
            "f. Peak RSS of the bench process during each phase (VmHWM, reset before each measurement)",
            &["phase", "peak RSS MiB (max over repeats)"],
            mem,
            "One process runs both the publishers and the relay/consumer; the figure is its peak \
             resident set while that phase ran.",
        );
    }
    report.write(&args, &broker, true)?;
    if let Some(out) = &args.out {
        log(format!("wrote {out}"));
    }
    Ok(())
}

/// Runs the sections `args` asks for on `DB` in a fresh database, dropped at the end
/// (also when a section failed).
async fn run_on<DB: LeanDb>(args: &Args, broker: &Rc<Broker>, report: &mut Report) -> Res<()> {
    let db = fresh("outbox_bench_").replace('-', "_");
    DB::create_database(args, &db).await?;
    log(format!("{} database {db} created", DB::LABEL));
    let result = async {
        let pool = DB::connect(args, &db).await?;
        let result = sections(args, broker, pool.clone(), report).await;
        pool.close().await;
        result
    }
    .await;
    DB::drop_database(args, &db).await?;
    log(format!("{} database {db} dropped", DB::LABEL));
    result
}

/// Creates the tables, then runs sections a, b and i and the database's own sections.
async fn sections<DB: LeanDb>(
    args: &Args,
    broker: &Rc<Broker>,
    pool: Pool<DB>,
    report: &mut Report,
) -> Res<()> {
    let catalog = Catalog::builder().build()?;
    let route = catalog.route_of::<Bench>()?.clone();
    for t in [route.table().as_str(), RAW_TABLE, LARGE_TABLE, SMALL_TABLE] {
        DB::migrate(&pool, &outbox_runtime::TableName::new(t)?).await?;
        if DB::BACKEND_NAME == "postgres"
            && std::env::var("OUTBOX_BENCH_PENDING_KEY_INDEX").is_ok_and(|v| v == "1")
        {
            // Experiment: a partial index the head-of-key probe can use without walking
            // a key's published rows.
            DB::exec(
                &pool,
                &format!(
                    "CREATE INDEX IF NOT EXISTS {t}_pending_key_idx ON {t} (service, event_key, id) \
                     WHERE status = 0"
                ),
            )
            .await?;
        }
    }
    DB::create_accounts(&pool).await?;
    report
        .servers
        .push(format!("{}: {}", DB::LABEL, DB::describe(&pool).await?));
    let ctx = Ctx {
        args: args.clone(),
        pool,
        broker: broker.clone(),
        catalog,
        route,
    };
    if args.wants("a") {
        section_a(&ctx, report).await?;
        report.write(args, broker, false)?;
    }
    if args.wants("b") {
        section_b(&ctx, report).await?;
        report.write(args, broker, false)?;
    }
    if args.wants("i") {
        lean::section_i(&ctx, report).await?;
        report.write(args, broker, false)?;
    }
    DB::more_sections(&ctx, report).await
}
