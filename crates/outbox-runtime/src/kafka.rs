//! Kafka client settings: what the relay's producer and the consumers always set, and
//! what users may add.

use std::collections::BTreeMap;

use rdkafka::ClientConfig;

/// How to reach Kafka, plus extra librdkafka properties.
///
/// The framework always sets, on the producer: `enable.idempotence=true` (librdkafka
/// defaults to false), which implies `acks=all` and ordered retries; on consumers:
/// `enable.auto.offset.store=false` (offsets are stored only after the handler's
/// transaction commits), `enable.auto.commit=true` (stored offsets are committed in the
/// background and on rebalance), `auto.offset.reset=earliest`. Extra properties cannot
/// override those.
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

/// Producer defaults users may override.
const PRODUCER_DEFAULTS: &[(&str, &str)] = &[("linger.ms", "2"), ("message.timeout.ms", "30000")];

/// Consumer properties the framework sets and users cannot override.
const CONSUMER_FIXED: &[(&str, &str)] = &[
    ("enable.auto.offset.store", "false"),
    ("enable.auto.commit", "true"),
];

/// Consumer defaults users may override.
const CONSUMER_DEFAULTS: &[(&str, &str)] = &[
    ("auto.offset.reset", "earliest"),
    ("auto.commit.interval.ms", "1000"),
    ("fetch.wait.max.ms", "10"),
    ("session.timeout.ms", "10000"),
    ("heartbeat.interval.ms", "1000"),
];

impl KafkaConfig {
    /// A config for these bootstrap servers.
    pub fn new(bootstrap_servers: impl Into<String>) -> Self {
        KafkaConfig {
            bootstrap_servers: bootstrap_servers.into(),
            ..Default::default()
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

    /// A consumer's configuration for `group`.
    pub fn consumer_config(&self, group: &str) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap_servers);
        c.set("group.id", group);
        apply(&mut c, CONSUMER_DEFAULTS.iter().copied());
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

fn apply<'a>(c: &mut ClientConfig, props: impl Iterator<Item = (&'a str, &'a str)>) {
    for (k, v) in props {
        c.set(k, v);
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
        let c = k.consumer_config("g");
        assert_eq!(c.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(c.get("group.id"), Some("g"));
    }
}
