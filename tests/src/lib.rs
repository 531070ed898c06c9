//! The integration-test harness: fresh databases per test ([`db`]), Kafka brokers per
//! test ([`broker`]), the five services of the design with scriptable handlers
//! ([`services`]), the end-to-end scenario run on every backend ([`e2e`]), and the
//! fault suite's ledger oracle ([`oracle`]) and harness ([`chaos`]).

pub mod broker;
pub mod chaos;
pub mod db;
pub mod e2e;
pub mod oracle;
pub mod services;
