//! Kafka brokers for tests, in two tiers.
//!
//! * [`TestBroker::mock`] / [`TestBroker::mock_with_brokers`]: librdkafka's in-process
//!   mock cluster. Always available, fast, supports fault injection
//!   ([`TestBroker::mock_cluster`]) and is the place for rebalance storms.
//! * [`TestBroker::tansu`]: a real Kafka-protocol broker (tansu 0.6.0, memory storage)
//!   whose address comes from `OUTBOX_TEST_KAFKA_BROKERS`. `scripts/test.sh` starts
//!   one and also sets `OUTBOX_TEST_REQUIRE_KAFKA=1`, which turns a missing broker
//!   into a test failure instead of a skip.
//!
//! Known limits of tansu 0.6.0 with memory storage: high-watermark / lag answers are
//! wrong (never assert on them); when several group members leave at once a new
//! member can wait forever (keep rebalance storms on the mock tier); it enforces no
//! broker- or topic-level message size limit (a topic created with
//! `max.message.bytes=10000` accepted 50 kB, and 2 MB records are accepted), so only
//! librdkafka's client-side `message.max.bytes` check produces `MessageSizeTooLarge`.
//! Checked to work (`tests/tests/broker_smoke.rs`): CreateTopics, the idempotent
//! producer (InitProducerId), consumer groups with OffsetCommit/OffsetFetch, headers.
//!
//! [`PrivateTansu`] is a tansu of one test's own (a fixed port, memory storage) that the
//! test SIGKILLs and starts again on the same port with empty memory: the broker-restart
//! scenario of the fault suite (`tests/tests/chaos_broker.rs`).
//!
//! Every test should use fresh names from [`unique_name`] / [`unique_suffix`]: the
//! tansu broker is shared by all tests of a run.

use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::types::RDKafkaErrorCode;

/// Environment variable with the bootstrap servers of the real broker (tansu).
pub const BROKERS_ENV: &str = "OUTBOX_TEST_KAFKA_BROKERS";
/// When `1`, [`TestBroker::tansu`] panics instead of returning `None` if
/// [`BROKERS_ENV`] is unset.
pub const REQUIRE_ENV: &str = "OUTBOX_TEST_REQUIRE_KAFKA";

/// Default deadline for broker-side set-up steps (topic creation, metadata).
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(30);

/// A Kafka broker for one test.
pub enum TestBroker {
    /// librdkafka's in-process mock cluster, dropped (shut down) with this value.
    Mock(MockBroker),
    /// An external real broker, shared by all tests of the run.
    Tansu { bootstrap: String },
}

/// Owner of a librdkafka mock cluster.
///
/// Derefs to [`MockCluster`] for fault injection (`broker_down`, `request_errors`, ...).
pub struct MockBroker {
    cluster: MockCluster<'static, DefaultProducerContext>,
    brokers: i32,
}

// SAFETY: `MockCluster` is `!Send`/`!Sync` only because it holds a raw
// `rd_kafka_mock_cluster_t*`. The owned client is `Send + Sync`, and librdkafka's
// `rd_kafka_mock_*` functions are thread-safe: they either take the cluster lock or
// post an op to the mock cluster's own thread and wait for the reply, and the
// bootstrap string is immutable after creation. Destruction happens once, in `Drop`.
unsafe impl Send for MockBroker {}
unsafe impl Sync for MockBroker {}

impl MockBroker {
    /// Number of brokers in the mock cluster.
    pub fn broker_count(&self) -> i32 {
        self.brokers
    }
}

impl Deref for MockBroker {
    type Target = MockCluster<'static, DefaultProducerContext>;

    fn deref(&self) -> &Self::Target {
        &self.cluster
    }
}

impl std::fmt::Debug for TestBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TestBroker::Mock(m) => f
                .debug_struct("Mock")
                .field("brokers", &m.brokers)
                .field("bootstrap", &m.cluster.bootstrap_servers())
                .finish(),
            TestBroker::Tansu { bootstrap } => f
                .debug_struct("Tansu")
                .field("bootstrap", bootstrap)
                .finish(),
        }
    }
}

impl TestBroker {
    /// A fresh single-broker mock cluster.
    pub async fn mock() -> TestBroker {
        Self::mock_with_brokers(1).await
    }

    /// A fresh mock cluster with `brokers` brokers (use 3 for replication / leader moves).
    pub async fn mock_with_brokers(brokers: i32) -> TestBroker {
        assert!(brokers >= 1, "a mock cluster needs at least one broker");
        let cluster = MockCluster::new(brokers).unwrap_or_else(|e| {
            panic!("creating a librdkafka mock cluster ({brokers} brokers): {e}")
        });
        TestBroker::Mock(MockBroker { cluster, brokers })
    }

    /// The real broker named by `OUTBOX_TEST_KAFKA_BROKERS`, or `None` (test should
    /// skip) when it is unset. Panics when it is unset and `OUTBOX_TEST_REQUIRE_KAFKA=1`.
    pub fn tansu() -> Option<TestBroker> {
        match std::env::var(BROKERS_ENV) {
            Ok(v) if !v.trim().is_empty() => Some(TestBroker::Tansu {
                bootstrap: v.trim().to_string(),
            }),
            _ => {
                if require_kafka() {
                    panic!(
                        "{REQUIRE_ENV}=1 but {BROKERS_ENV} is not set: run the tests through \
                         `scripts/test.sh` (it installs and starts tansu), or start a broker with \
                         `scripts/tansu.sh start` and export {BROKERS_ENV}=<host:port>"
                    );
                }
                None
            }
        }
    }

    /// Like [`TestBroker::tansu`], but prints a skip notice naming `test` when there is
    /// no broker. Use as `let Some(broker) = TestBroker::tansu_or_skip("name") else { return };`.
    pub fn tansu_or_skip(test: &str) -> Option<TestBroker> {
        let broker = Self::tansu();
        if broker.is_none() {
            eprintln!(
                "SKIPPED {test}: {BROKERS_ENV} is not set (set {REQUIRE_ENV}=1 to make this a failure)"
            );
        }
        broker
    }

    /// `"mock"` or `"tansu"`, for messages.
    pub fn tier(&self) -> &'static str {
        match self {
            TestBroker::Mock(_) => "mock",
            TestBroker::Tansu { .. } => "tansu",
        }
    }

    pub fn is_mock(&self) -> bool {
        matches!(self, TestBroker::Mock(_))
    }

    /// The mock cluster, for fault injection; `None` on the real broker.
    pub fn mock_cluster(&self) -> Option<&MockCluster<'static, DefaultProducerContext>> {
        match self {
            TestBroker::Mock(m) => Some(&m.cluster),
            TestBroker::Tansu { .. } => None,
        }
    }

    /// The `bootstrap.servers` value for clients.
    pub fn bootstrap_servers(&self) -> String {
        match self {
            TestBroker::Mock(m) => m.cluster.bootstrap_servers(),
            TestBroker::Tansu { bootstrap } => bootstrap.clone(),
        }
    }

    /// A client config with `bootstrap.servers` set (and nothing else).
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", self.bootstrap_servers());
        config
    }

    /// Creates `name` with `partitions` partitions (an existing topic is accepted) and
    /// waits until its metadata shows every partition with a leader. Panics on failure.
    pub async fn create_topic(&self, name: &str, partitions: i32) {
        assert!(partitions >= 1, "a topic needs at least one partition");
        match self {
            TestBroker::Mock(m) => {
                // The mock broker has no CreateTopics API; this creates it directly.
                m.cluster
                    .create_topic(name, partitions, m.brokers.min(3))
                    .unwrap_or_else(|e| panic!("mock: creating topic {name:?}: {e}"));
            }
            TestBroker::Tansu { bootstrap } => {
                let admin: AdminClient<DefaultClientContext> = self
                    .client_config()
                    .create()
                    .unwrap_or_else(|e| panic!("tansu ({bootstrap}): creating admin client: {e}"));
                let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
                let opts = AdminOptions::new()
                    .request_timeout(Some(SETUP_TIMEOUT))
                    .operation_timeout(Some(SETUP_TIMEOUT));
                let results = admin
                    .create_topics([&topic], &opts)
                    .await
                    .unwrap_or_else(|e| panic!("tansu ({bootstrap}): CreateTopics {name:?}: {e}"));
                for result in results {
                    match result {
                        Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                        Err((topic, code)) => {
                            panic!("tansu ({bootstrap}): CreateTopics {topic:?} failed: {code:?} ({code})")
                        }
                    }
                }
            }
        }
        self.wait_for_topic(name, partitions, SETUP_TIMEOUT).await;
    }

    /// How many partitions `name` has now, per the broker's metadata (an error names why
    /// there is no answer: the request failed, no such topic, ...).
    pub async fn partitions(&self, name: &str) -> Result<usize, String> {
        let client: BaseConsumer = self
            .client_config()
            .set("allow.auto.create.topics", "false")
            .create()
            .map_err(|e| format!("creating metadata client: {e}"))?;
        let name = name.to_owned();
        tokio::task::spawn_blocking(move || {
            let md = client
                .fetch_metadata(Some(&name), Duration::from_secs(5))
                .map_err(|e| format!("metadata request failed: {e}"))?;
            match md.topics().iter().find(|t| t.name() == name) {
                None => Err("topic not in metadata".to_owned()),
                Some(t) if t.error().is_some() => Err(format!(
                    "topic error {:?}",
                    RDKafkaErrorCode::from(t.error().unwrap())
                )),
                Some(t) => Ok(t.partitions().len()),
            }
        })
        .await
        .map_err(|e| format!("metadata task: {e}"))?
    }

    /// Polls metadata until `name` exists with at least `partitions` partitions, each
    /// with a leader. Panics with the last observation when `timeout` passes.
    pub async fn wait_for_topic(&self, name: &str, partitions: i32, timeout: Duration) {
        // A consumer-type client: it never asks the broker to auto-create the topic.
        let client: BaseConsumer = self
            .client_config()
            .set("allow.auto.create.topics", "false")
            .create()
            .unwrap_or_else(|e| panic!("{}: creating metadata client: {e}", self.tier()));
        let name_owned = name.to_string();
        let deadline = Instant::now() + timeout;
        let tier = self.tier();
        let result = tokio::task::spawn_blocking(move || {
            let mut last;
            loop {
                last = match client.fetch_metadata(Some(&name_owned), Duration::from_secs(5)) {
                    Err(e) => format!("metadata request failed: {e}"),
                    Ok(md) => match md.topics().iter().find(|t| t.name() == name_owned) {
                        None => "topic not in metadata".to_string(),
                        Some(t) if t.error().is_some() => {
                            format!(
                                "topic error {:?}",
                                RDKafkaErrorCode::from(t.error().unwrap())
                            )
                        }
                        Some(t) if (t.partitions().len() as i32) < partitions => {
                            format!("{} of {partitions} partitions", t.partitions().len())
                        }
                        Some(t) if t.partitions().iter().any(|p| p.leader() < 0) => {
                            "a partition has no leader yet".to_string()
                        }
                        Some(_) => return Ok(()),
                    },
                };
                if Instant::now() >= deadline {
                    return Err(last);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
        .await
        .expect("metadata polling task panicked");
        if let Err(last) = result {
            panic!("{tier}: topic {name:?} not usable after {timeout:?}: {last}");
        }
    }
}

/// `true` when `OUTBOX_TEST_REQUIRE_KAFKA=1`.
pub fn require_kafka() -> bool {
    std::env::var(REQUIRE_ENV).is_ok_and(|v| v.trim() == "1")
}

/// A suffix unique across tests, processes and runs, usable in topic and group
/// names (`[a-z0-9-]`).
pub fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("{}-{:x}-{}-{}", std::process::id(), nanos, n, &random[..8])
}

/// `prefix` followed by [`unique_suffix`].
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}-{}", unique_suffix())
}

/// Where `scripts/tansu.sh` is (it installs the pinned tansu binary).
fn tansu_script() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("scripts")
        .join("tansu.sh")
}

/// The tansu binary (`scripts/tansu.sh install`, once per process), or why not.
pub fn tansu_binary() -> Result<std::path::PathBuf, String> {
    static BIN: std::sync::OnceLock<Result<std::path::PathBuf, String>> =
        std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let script = tansu_script();
        let out = std::process::Command::new("bash")
            .arg(&script)
            .arg("install")
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| format!("running {}: {e}", script.display()))?;
        if !out.status.success() {
            return Err(format!(
                "{} install failed ({}): {}",
                script.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if path.is_empty() {
            return Err(format!("{} install printed no path", script.display()));
        }
        Ok(std::path::PathBuf::from(path))
    })
    .clone()
}

/// A tansu broker of one test's own (memory storage, one broker on 127.0.0.1 at a port
/// fixed for its life), which the test may SIGKILL and start again on the same port with
/// fresh, empty memory: every topic, record, group offset and producer id is gone, as on
/// a broker that lost its disk. The binary comes from `scripts/tansu.sh install`. The
/// process is SIGKILLed on drop, even when the test panics.
pub struct PrivateTansu {
    bin: std::path::PathBuf,
    port: u16,
    dir: tempfile::TempDir,
    child: Option<std::process::Child>,
    starts: u32,
}

impl PrivateTansu {
    /// Starts one on a free port and waits until it answers a metadata request.
    /// `None` (the test should skip) when tansu cannot be installed; a panic instead
    /// when `OUTBOX_TEST_REQUIRE_KAFKA=1`.
    pub async fn start() -> Option<PrivateTansu> {
        let bin = match tokio::task::spawn_blocking(tansu_binary)
            .await
            .expect("tansu install task")
        {
            Ok(bin) => bin,
            Err(e) if require_kafka() => panic!("{REQUIRE_ENV}=1 but tansu is unavailable: {e}"),
            Err(e) => {
                eprintln!("no private tansu: {e}");
                return None;
            }
        };
        let dir = tempfile::Builder::new()
            .prefix("outbox-tansu-")
            .tempdir()
            .expect("temp dir");
        let mut tansu = PrivateTansu {
            bin,
            port: crate::chaos::free_port(),
            dir,
            child: None,
            starts: 0,
        };
        tansu.spawn();
        tansu.wait_ready(SETUP_TIMEOUT).await;
        Some(tansu)
    }

    /// Like [`PrivateTansu::start`], printing a skip notice naming `test` when there is
    /// no tansu.
    pub async fn start_or_skip(test: &str) -> Option<PrivateTansu> {
        let t = Self::start().await;
        if t.is_none() {
            eprintln!(
                "SKIPPED {test}: tansu is unavailable (set {REQUIRE_ENV}=1 to make this a failure)"
            );
        }
        t
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "tansu is already running");
        self.starts += 1;
        let log = self.dir.path().join(format!("tansu-{}.log", self.starts));
        let out = std::fs::File::create(&log).expect("tansu log file");
        let err = out.try_clone().expect("tansu log file");
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let child = std::process::Command::new(&self.bin)
            .args(["broker", "--cluster-id", "outbox-private"])
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"])
            // Flags win over tansu's environment defaults; drop the rest it reads.
            .env_remove("SCHEMA_REGISTRY")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .stdin(std::process::Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.bin.display()));
        self.child = Some(child);
    }

    /// `127.0.0.1:PORT`, the same across restarts.
    pub fn bootstrap_servers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// A [`TestBroker`] for this broker (topic creation and metadata helpers).
    pub fn broker(&self) -> TestBroker {
        TestBroker::Tansu {
            bootstrap: self.bootstrap_servers(),
        }
    }

    /// The broker process's id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// How many times it was started.
    pub fn starts(&self) -> u32 {
        self.starts
    }

    /// SIGKILL (no shutdown of any kind), and reap it. A no-op when it is not running.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port with empty memory and waits until it answers;
    /// returns the moment it first answered.
    pub async fn restart(&mut self, timeout: Duration) -> Instant {
        self.kill();
        self.spawn();
        self.wait_ready(timeout).await
    }

    /// Waits until the broker answers a metadata request (a TCP connect first, then a
    /// fresh client each try, so no reconnect backoff of an old client delays the
    /// answer); returns the moment it did. Panics with the broker's log when it exits
    /// or does not answer within `timeout`.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Instant {
        let deadline = Instant::now() + timeout;
        let addr: std::net::SocketAddr = self.bootstrap_servers().parse().expect("address");
        loop {
            if let Some(c) = &mut self.child {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!(
                        "private tansu on {addr} exited ({status}) during start-up:\n{}",
                        self.log_tail()
                    );
                }
            } else {
                panic!("private tansu is not running");
            }
            let last = if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200))
                .is_ok()
            {
                let bootstrap = self.bootstrap_servers();
                let probe = tokio::task::spawn_blocking(move || {
                    let client: BaseConsumer = ClientConfig::new()
                        .set("bootstrap.servers", &bootstrap)
                        .set("allow.auto.create.topics", "false")
                        .set("log_level", "0")
                        .create()
                        .map_err(|e| e.to_string())?;
                    client
                        .fetch_metadata(None, Duration::from_secs(2))
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                })
                .await
                .expect("metadata probe task");
                match probe {
                    Ok(()) => return Instant::now(),
                    Err(e) => format!("metadata request failed: {e}"),
                }
            } else {
                "connection refused".to_owned()
            };
            assert!(
                Instant::now() < deadline,
                "private tansu on {addr} did not answer within {timeout:?} ({last}):\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The last lines of the current run's log.
    pub fn log_tail(&self) -> String {
        let log = self.dir.path().join(format!("tansu-{}.log", self.starts));
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for PrivateTansu {
    fn drop(&mut self) {
        self.kill();
    }
}
