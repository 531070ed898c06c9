//! Kafka clients: what the relay's producer and the consumers always set, what users
//! may add, and the client context every one of them runs with.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::FutureProducer;
use rdkafka::ClientConfig;

use crate::error::{Error, Result};

/// How to reach Kafka, plus extra librdkafka properties.
///
/// The framework always sets, on the producer: `enable.idempotence=true` (librdkafka
/// defaults to false), which implies `acks=all` and ordered retries; on consumers:
/// `enable.auto.offset.store=false` (offsets are stored only after the handler's
/// transaction commits), `enable.auto.commit=true` (stored offsets are committed in the
/// background and on rebalance), `auto.offset.reset=earliest`. Extra properties cannot
/// override those. It also sets defaults that extra properties do override:
/// `linger.ms=2` (batches records produced within 2 ms; `0` for the lowest latency at a
/// low rate), `message.timeout.ms=30000`, `reconnect.backoff.max.ms=1000`, and on
/// consumers the fetch sizes derived from `max_payload_bytes`, `fetch.wait.max.ms=10`,
/// `session.timeout.ms=10000`, `heartbeat.interval.ms=1000`.
///
/// Start from the application's own rdkafka settings with
/// [`from_client_config`](Self::from_client_config).
#[derive(Debug, Clone, Default)]
pub struct KafkaConfig {
    /// `bootstrap.servers`, e.g. `127.0.0.1:9092`.
    pub bootstrap_servers: String,
    /// Properties for every client.
    pub common: BTreeMap<String, String>,
    /// Properties for the relay's producer only (e.g. `linger.ms`, `compression.type`).
    pub producer: BTreeMap<String, String>,
    /// Properties for consumers only (e.g. `fetch.wait.max.ms`).
    pub consumer: BTreeMap<String, String>,
}

/// Producer properties the framework sets and users cannot override.
const PRODUCER_FIXED: &[(&str, &str)] = &[("enable.idempotence", "true"), ("acks", "all")];

/// Producer defaults users may override. Reconnects back off to at most 1 s (librdkafka:
/// 10 s), so a relay is producing again within seconds of a broker's return.
const PRODUCER_DEFAULTS: &[(&str, &str)] = &[
    ("linger.ms", "2"),
    ("message.timeout.ms", "30000"),
    ("reconnect.backoff.max.ms", "1000"),
];

/// Consumer properties the framework sets and users cannot override.
const CONSUMER_FIXED: &[(&str, &str)] = &[
    ("enable.auto.offset.store", "false"),
    ("enable.auto.commit", "true"),
];

/// Consumer defaults users may override. Reconnects back off to at most 1 s and topic
/// metadata is refreshed every 5 s (librdkafka: 10 s and 5 min), so a consumer finds a
/// restarted broker, and a topic created again on it, within seconds.
const CONSUMER_DEFAULTS: &[(&str, &str)] = &[
    ("auto.offset.reset", "earliest"),
    ("auto.commit.interval.ms", "1000"),
    ("fetch.wait.max.ms", "10"),
    ("session.timeout.ms", "10000"),
    ("heartbeat.interval.ms", "1000"),
    ("reconnect.backoff.max.ms", "1000"),
    ("topic.metadata.refresh.interval.ms", "5000"),
];

/// Extra room for a record's headers and framing beyond its payload, in fetch sizes.
const RECORD_OVERHEAD: usize = 64 * 1024;

/// The largest fetch response a consumer accepts by default (`receive.message.max.bytes`):
/// 1 GiB. A broker always returns the first record batch of a fetch whole, however
/// large, and a response over this limit fails the connection and is fetched again
/// forever, stalling every partition behind it. With this limit, any record a broker
/// will store (Kafka's default `message.max.bytes` is 1 MB) is received, and one larger
/// than `max_payload_bytes` is skipped with a reason. The cost is memory: a hostile
/// writer can make the consumer hold one record of up to this size. Lower it (a
/// consumer property) to what your consumers can hold, and cap the topic's
/// `max.message.bytes`.
const RECEIVE_MAX_BYTES: usize = 1 << 30;

impl KafkaConfig {
    /// A config for these bootstrap servers.
    pub fn new(bootstrap_servers: impl Into<String>) -> Self {
        KafkaConfig {
            bootstrap_servers: bootstrap_servers.into(),
            ..Default::default()
        }
    }

    /// A config from an rdkafka [`ClientConfig`] the application already has (its
    /// security settings, client id, …): `bootstrap.servers` (or
    /// `metadata.broker.list`) becomes [`bootstrap_servers`](Self::bootstrap_servers),
    /// every other property goes to [`common`](Self::common), for the producer and the
    /// consumers alike. The properties the framework fixes still win (see above), and
    /// `group.id` is ignored: each service's consumer group comes from the catalog.
    pub fn from_client_config(config: &ClientConfig) -> Self {
        let map = config.config_map();
        let bootstrap = map
            .get("bootstrap.servers")
            .or_else(|| map.get("metadata.broker.list"))
            .map(|v| v.to_string())
            .unwrap_or_default();
        let common = map
            .iter()
            .filter(|(k, _)| {
                !matches!(
                    &k[..],
                    "bootstrap.servers" | "metadata.broker.list" | "group.id"
                )
            })
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        KafkaConfig {
            bootstrap_servers: bootstrap,
            common,
            ..KafkaConfig::default()
        }
    }

    /// Reads `OUTBOX_KAFKA_BROKERS` (or `KAFKA_BROKERS`).
    pub fn from_env() -> Option<Self> {
        std::env::var("OUTBOX_KAFKA_BROKERS")
            .or_else(|_| std::env::var("KAFKA_BROKERS"))
            .ok()
            .filter(|s| !s.is_empty())
            .map(Self::new)
    }

    /// Adds a property for the producer.
    pub fn producer_property(mut self, key: &str, value: &str) -> Self {
        self.producer.insert(key.into(), value.into());
        self
    }

    /// Adds a property for consumers.
    pub fn consumer_property(mut self, key: &str, value: &str) -> Self {
        self.consumer.insert(key.into(), value.into());
        self
    }

    /// The relay's producer configuration.
    pub fn producer_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap_servers);
        apply(&mut c, PRODUCER_DEFAULTS.iter().copied());
        apply(
            &mut c,
            self.common.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        );
        apply(
            &mut c,
            self.producer.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        );
        apply(&mut c, PRODUCER_FIXED.iter().copied());
        c
    }

    /// A consumer's configuration for `group`. Fetch sizes follow `max_payload_bytes`
    /// (the largest event the outbox accepts): `max.partition.fetch.bytes` holds at least
    /// one such record, and `receive.message.max.bytes` lets a larger foreign record be
    /// received and skipped instead of stalling the consumer (`RECEIVE_MAX_BYTES`, 1 GiB).
    pub fn consumer_config(&self, group: &str, max_payload_bytes: usize) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap_servers);
        c.set("group.id", group);
        apply(&mut c, CONSUMER_DEFAULTS.iter().copied());
        let record = max_payload_bytes.saturating_add(RECORD_OVERHEAD);
        let partition_fetch = record.max(1 << 20);
        let fetch = partition_fetch.saturating_mul(4).max(50 << 20);
        let receive = RECEIVE_MAX_BYTES.max(fetch.saturating_add(1 << 20));
        for (k, v) in [
            ("max.partition.fetch.bytes", partition_fetch),
            ("fetch.max.bytes", fetch),
            ("receive.message.max.bytes", receive),
        ] {
            c.set(k, v.min(i32::MAX as usize).to_string());
        }
        apply(
            &mut c,
            self.common.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        );
        apply(
            &mut c,
            self.consumer.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        );
        apply(&mut c, CONSUMER_FIXED.iter().copied());
        c
    }
}

/// What [`crate::OutboxRuntime::start`] does when no broker answers within
/// [`crate::OutboxRuntime::broker_wait`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnUnreachableBroker {
    /// `start` fails with [`Error::BrokerUnreachable`], naming the address (default): a
    /// wrong address is found at deploy time, not when events pile up.
    #[default]
    Fail,
    /// `start` logs a warning naming the address and runs anyway: relays and consumers
    /// connect when the broker comes (events wait in the table meanwhile).
    Warn,
}

/// The topics [`crate::OutboxRuntime::start`] creates when they are missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TopicSettings {
    /// Partitions of a created topic; `None` (default) takes the broker's default
    /// (`num.partitions`). More partitions let more consumers of a group share the work;
    /// one key's events always go to one partition.
    pub partitions: Option<i32>,
    /// Replication factor of a created topic; `None` (default) takes the broker's
    /// default (`default.replication.factor`).
    pub replication: Option<i32>,
}

/// The longest `start` waits for topics to be created.
const CREATE_TOPICS_WAIT: Duration = Duration::from_secs(5);

/// What `start` asks of the broker before anything runs.
pub(crate) struct BrokerCheck<'a> {
    pub(crate) wait: Duration,
    pub(crate) on_unreachable: OnUnreachableBroker,
    /// `None`: topics are not created here (the broker may auto-create them on the first
    /// produce).
    pub(crate) create: Option<TopicSettings>,
    pub(crate) topics: &'a [String],
}

/// Waits up to `check.wait` for the broker's metadata, then creates the missing topics
/// among `check.topics`. No answer: an error naming the address, or a warning
/// ([`OnUnreachableBroker`]). A topic that cannot be created (no admin API, no
/// permission) is a warning: the broker may still create it on the first produce.
pub(crate) async fn check_broker(kafka: &KafkaConfig, check: BrokerCheck<'_>) -> Result<()> {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &kafka.bootstrap_servers);
    apply(
        &mut config,
        kafka.common.iter().map(|(k, v)| (k.as_str(), v.as_str())),
    );
    let admin: AdminClient<ClientLog> = config
        .create_with_context(ClientLog::new("admin"))
        .map_err(|e| Error::kafka("creating an admin client", e))?;
    let wait = check.wait;
    let (admin, metadata) = tokio::task::spawn_blocking(move || {
        let metadata = admin.inner().fetch_metadata(None, wait);
        (admin, metadata)
    })
    .await
    .map_err(|e| Error::Config(format!("the broker check panicked: {e}")))?;
    let metadata = match metadata {
        Ok(m) => m,
        Err(source) => {
            return match check.on_unreachable {
                OnUnreachableBroker::Fail => Err(Error::BrokerUnreachable {
                    brokers: kafka.bootstrap_servers.clone(),
                    waited: wait,
                    source,
                }),
                OnUnreachableBroker::Warn => {
                    tracing::warn!(brokers = %kafka.bootstrap_servers, waited = ?wait, error = %source,
                        "no Kafka broker answered; starting anyway (OnUnreachableBroker::Warn): \
                         events wait in their tables until a broker answers");
                    Ok(())
                }
            };
        }
    };
    let Some(settings) = check.create else {
        return Ok(());
    };
    let missing: Vec<&String> = check
        .topics
        .iter()
        .filter(|name| {
            !metadata
                .topics()
                .iter()
                .any(|t| t.name() == name.as_str() && t.error().is_none())
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let new: Vec<NewTopic<'_>> = missing
        .iter()
        .map(|name| {
            NewTopic::new(
                name,
                settings.partitions.unwrap_or(-1),
                TopicReplication::Fixed(settings.replication.unwrap_or(-1)),
            )
        })
        .collect();
    // A broker without the admin API (librdkafka's mock cluster has no controller) never
    // answers: bounded apart from the metadata wait, so it delays `start` briefly.
    let create_wait = wait.min(CREATE_TOPICS_WAIT);
    let options = AdminOptions::new()
        .request_timeout(Some(create_wait))
        .operation_timeout(Some(create_wait));
    match admin.create_topics(&new, &options).await {
        Err(e) => {
            tracing::warn!(brokers = %kafka.bootstrap_servers, topics = ?missing, error = %e,
                "could not create the topics (admin API); the broker may create them on the first produce");
        }
        Ok(results) => {
            for result in results {
                match result {
                    Ok(topic) => tracing::info!(topic, "created topic"),
                    Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                    Err((topic, code)) => tracing::warn!(topic, error = %code,
                        "could not create the topic; the broker may create it on the first produce"),
                }
            }
        }
    }
    Ok(())
}

fn apply<'a>(c: &mut ClientConfig, props: impl Iterator<Item = (&'a str, &'a str)>) {
    for (k, v) in props {
        c.set(k, v);
    }
}

/// The relay's producer: the framework's fixed settings (idempotence on) plus the
/// user's, with the runtime's [`ClientLog`] context.
pub(crate) fn create_producer(kafka: &KafkaConfig) -> Result<FutureProducer<ClientLog>> {
    kafka
        .producer_config()
        .create_with_context(ClientLog::new("producer"))
        .map_err(|e| Error::kafka("creating the relay's producer", e))
}

/// How often one kind of client log line or error is written at most; the lines in
/// between are counted and the count is given with the next one.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// The context of every client the runtime creates: librdkafka's log lines and global
/// errors go to `tracing`, each kind at most once per [`LOG_EVERY`] (during an outage
/// librdkafka reports the same failure many times a second), and a consumer counts its
/// rebalances.
pub struct ClientLog {
    client: &'static str,
    last: Mutex<HashMap<String, (Instant, u64)>>,
    rebalances: AtomicU64,
    /// A consumer's service, whose lag per partition its statistics report.
    lag_of: Option<metrics::SharedString>,
}

impl ClientLog {
    pub(crate) fn new(client: &'static str) -> Self {
        ClientLog {
            client,
            last: Mutex::new(HashMap::new()),
            rebalances: AtomicU64::new(0),
            lag_of: None,
        }
    }

    /// A consumer's context that turns librdkafka's statistics (when
    /// `statistics.interval.ms` is set) into the consumer-lag gauge of `service`.
    pub(crate) fn consumer_of(service: &crate::route::ServiceName) -> Self {
        Self::consumer_labelled(service.as_str())
    }

    /// [`consumer_of`](Self::consumer_of) under any `service` label (a subscription's
    /// intake: `<subscriber><-<publisher>`).
    pub(crate) fn consumer_labelled(label: &str) -> Self {
        ClientLog {
            lag_of: Some(metrics::SharedString::from(label.to_owned())),
            ..ClientLog::new("consumer")
        }
    }

    /// Rebalances this consumer has seen (assignments and revocations).
    pub(crate) fn rebalances(&self) -> u64 {
        self.rebalances.load(Ordering::Acquire)
    }

    /// `Some(lines suppressed since the last one)` if a line of `kind` may be written now.
    pub(crate) fn allow(&self, kind: &str) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        match last.get_mut(kind) {
            Some((at, suppressed)) if now.duration_since(*at) < LOG_EVERY => {
                *suppressed += 1;
                None
            }
            Some((at, suppressed)) => {
                *at = now;
                Some(std::mem::take(suppressed))
            }
            None => {
                last.insert(kind.to_owned(), (now, 0));
                Some(0)
            }
        }
    }
}

impl ClientContext for ClientLog {
    fn stats(&self, statistics: rdkafka::Statistics) {
        let Some(service) = &self.lag_of else {
            return;
        };
        for topic in statistics.topics.values() {
            for (partition, p) in &topic.partitions {
                // -1: not known yet (no committed offset, no fetch); the internal
                // partition -1 is the topic's unassigned messages.
                if *partition >= 0 && p.consumer_lag >= 0 {
                    metrics::gauge!(crate::metrics::CONSUMER_LAG,
                        "service" => service.clone(), "partition" => partition.to_string())
                    .set(p.consumer_lag as f64);
                }
            }
        }
    }

    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        let kind = format!("log:{fac}");
        if (level as i32) > (RDKafkaLogLevel::Warning as i32) {
            tracing::debug!(client = self.client, fac, "librdkafka: {log_message}");
            return;
        }
        if let Some(suppressed) = self.allow(&kind) {
            tracing::warn!(
                client = self.client,
                fac,
                suppressed,
                "librdkafka: {log_message}"
            );
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let kind = format!("error:{:?}", error.rdkafka_error_code());
        if let Some(suppressed) = self.allow(&kind) {
            tracing::warn!(client = self.client, %error, suppressed, "kafka client error: {reason}");
        }
    }
}

impl ConsumerContext for ClientLog {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Error(e) = rebalance {
            tracing::warn!(client = self.client, error = %e, "consumer rebalance failed");
        }
        self.rebalances.fetch_add(1, Ordering::AcqRel);
    }
}

/// The producer the relays of one process share, replaced when it can no longer work.
pub(crate) struct Producers {
    kafka: KafkaConfig,
    current: Mutex<(u64, FutureProducer<ClientLog>)>,
}

impl Producers {
    /// A shared producer for `kafka`.
    pub(crate) fn new(kafka: &KafkaConfig) -> Result<Arc<Producers>> {
        Ok(Arc::new(Producers {
            kafka: kafka.clone(),
            current: Mutex::new((0, create_producer(kafka)?)),
        }))
    }

    /// The producer now, with its generation.
    pub(crate) fn current(&self) -> (u64, FutureProducer<ClientLog>) {
        let current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        (current.0, current.1.clone())
    }

    /// Replaces the producer of `generation` with a new one, unless another relay
    /// already did; `Ok(true)` if this call replaced it. The old producer is dropped
    /// off the async threads (dropping purges and may block briefly) once the last
    /// relay holding it lets go.
    pub(crate) fn replace(&self, generation: u64) -> Result<bool> {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if current.0 != generation {
            return Ok(false);
        }
        let fresh = create_producer(&self.kafka)?;
        let old = std::mem::replace(&mut current.1, fresh);
        current.0 += 1;
        drop(current);
        tokio::task::spawn_blocking(move || drop(old));
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotence_and_manual_offset_store_cannot_be_overridden() {
        let k = KafkaConfig::new("b:1")
            .producer_property("enable.idempotence", "false")
            .consumer_property("enable.auto.offset.store", "true")
            .producer_property("linger.ms", "0");
        let p = k.producer_config();
        assert_eq!(p.get("enable.idempotence"), Some("true"));
        assert_eq!(p.get("acks"), Some("all"));
        assert_eq!(p.get("linger.ms"), Some("0"));
        let c = k.consumer_config("g", 900_000);
        assert_eq!(c.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(c.get("group.id"), Some("g"));
    }

    #[test]
    fn an_applications_client_config_is_the_starting_point() {
        let mut mine = ClientConfig::new();
        mine.set("bootstrap.servers", "k1:9093,k2:9093")
            .set("security.protocol", "SASL_SSL")
            .set("client.id", "billing")
            .set("group.id", "ignored")
            .set("enable.idempotence", "false");
        let k = KafkaConfig::from_client_config(&mine);
        assert_eq!(k.bootstrap_servers, "k1:9093,k2:9093");
        let p = k.producer_config();
        let c = k.consumer_config("outbox.billing.consumer", 900_000);
        for cfg in [&p, &c] {
            assert_eq!(cfg.get("bootstrap.servers"), Some("k1:9093,k2:9093"));
            assert_eq!(cfg.get("security.protocol"), Some("SASL_SSL"));
            assert_eq!(cfg.get("client.id"), Some("billing"));
        }
        assert_eq!(p.get("enable.idempotence"), Some("true"));
        assert_eq!(c.get("group.id"), Some("outbox.billing.consumer"));
    }

    #[test]
    fn consumer_fetch_sizes_follow_the_payload_limit() {
        let k = KafkaConfig::new("b:1");
        let c = k.consumer_config("g", 900_000);
        let get = |c: &ClientConfig, k: &str| c.get(k).unwrap().parse::<usize>().unwrap();
        assert!(get(&c, "max.partition.fetch.bytes") >= 900_000 + RECORD_OVERHEAD);
        assert!(get(&c, "receive.message.max.bytes") >= get(&c, "fetch.max.bytes") + 512);
        assert_eq!(get(&c, "receive.message.max.bytes"), RECEIVE_MAX_BYTES);
        let big = k.consumer_config("g", 100 << 20);
        assert!(get(&big, "max.partition.fetch.bytes") > 100 << 20);
        assert!(get(&big, "receive.message.max.bytes") >= get(&big, "fetch.max.bytes") + 512);
        // A user's own limit wins over the default.
        let mine = k
            .consumer_property("receive.message.max.bytes", "200000000")
            .consumer_config("g", 900_000);
        assert_eq!(mine.get("receive.message.max.bytes"), Some("200000000"));
    }

    #[test]
    fn log_lines_of_one_kind_are_rate_limited() {
        let log = ClientLog::new("test");
        assert_eq!(log.allow("a"), Some(0));
        assert_eq!(log.allow("a"), None);
        assert_eq!(log.allow("a"), None);
        assert_eq!(log.allow("b"), Some(0));
    }
}
