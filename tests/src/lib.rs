//! The integration-test harness: fresh databases per test ([`db`]), Kafka brokers per
//! test ([`broker`]), the five services of the design with scriptable handlers
//! ([`services`]), the end-to-end scenario run on every backend ([`e2e`]), and the
//! fault suite's ledger oracle ([`oracle`]) and harness ([`chaos`]), and captured log
//! lines ([`logs`]).

pub mod broker;
pub mod browser;
pub mod chaos;
pub mod db;
pub mod e2e;
pub mod logs;
pub mod oracle;
pub mod services;

/// One `#[tokio::test]` per backend for each listed generic test body
/// (`async fn check<T: TestDatabase>()`), in modules `postgres`, `mysql` and `sqlite`:
/// one body per behaviour, run on every database.
///
/// ```ignore
/// outbox_tests::every_backend!(publish_raw_refusals, keys_are_trimmed);
/// ```
#[macro_export]
macro_rules! every_backend {
    ($($check:ident),* $(,)?) => {
        $crate::every_backend!(@one postgres, $crate::db::TestPg, [$($check),*]);
        $crate::every_backend!(@one mysql, $crate::db::TestMySql, [$($check),*]);
        $crate::every_backend!(@one sqlite, $crate::db::TestSqlite, [$($check),*]);
    };
    (@one $module:ident, $db:ty, [$($check:ident),*]) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $check() {
                    super::$check::<$db>().await
                }
            )*
        }
    };
}
