//! The whole flow, for real: five services, business transactions (some rolled back),
//! relays and consumers, on every backend, through librdkafka's mock cluster and
//! through a real Kafka-protocol broker (tansu, started by `scripts/test.sh`).
//!
//! One scenario ([`outbox_tests::e2e::full_flow`]), parametrised, not copied.

use outbox_tests::broker::TestBroker;
use outbox_tests::db::{TestMySql, TestPg, TestSqlite};
use outbox_tests::e2e::full_flow;

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("OUTBOX_TEST_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

macro_rules! e2e {
    ($name:ident, $db:ty, $broker:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $name() {
            init_tracing();
            let Some(broker) = $broker else { return };
            let db = <$db>::create().await;
            full_flow(db.pool().clone(), &broker).await;
            db.cleanup().await;
        }
    };
}

e2e!(postgres_mock_broker, TestPg, Some(TestBroker::mock().await));
e2e!(mysql_mock_broker, TestMySql, Some(TestBroker::mock().await));
e2e!(
    sqlite_mock_broker,
    TestSqlite,
    Some(TestBroker::mock().await)
);
e2e!(
    postgres_real_broker,
    TestPg,
    TestBroker::tansu_or_skip("postgres_real_broker")
);
e2e!(
    mysql_real_broker,
    TestMySql,
    TestBroker::tansu_or_skip("mysql_real_broker")
);
e2e!(
    sqlite_real_broker,
    TestSqlite,
    TestBroker::tansu_or_skip("sqlite_real_broker")
);
