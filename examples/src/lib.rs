//! What the examples share: where their Kafka comes from.

use outbox_runtime::{Catalog, KafkaConfig};
use rdkafka::error::KafkaError;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

/// The broker an example talks to: the one named in `OUTBOX_KAFKA_BROKERS`, or
/// librdkafka's in-process mock cluster (the real Kafka protocol, no server) with a
/// topic of 3 partitions per service. Keep it alive while the example runs.
pub struct ExampleBroker {
    /// How to reach it.
    pub kafka: KafkaConfig,
    /// Whether it is the in-process mock cluster.
    pub is_mock: bool,
    _mock: Option<MockCluster<'static, DefaultProducerContext>>,
}

/// Connects to the configured broker, or starts a mock cluster with `catalog`'s topics.
pub fn broker(catalog: &Catalog) -> Result<ExampleBroker, KafkaError> {
    if let Some(kafka) = KafkaConfig::from_env() {
        return Ok(ExampleBroker {
            kafka,
            is_mock: false,
            _mock: None,
        });
    }
    let mock = MockCluster::new(1)?;
    for r in catalog.routes() {
        mock.create_topic(r.topic().as_str(), 3, 1)?;
    }
    Ok(ExampleBroker {
        kafka: KafkaConfig::new(mock.bootstrap_servers()),
        is_mock: true,
        _mock: Some(mock),
    })
}
