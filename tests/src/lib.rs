//! The integration-test harness: fresh databases per test ([`db`]), Kafka brokers per
//! test ([`broker`]), the five services of the design with scriptable handlers
//! ([`services`]) and the end-to-end scenario run on every backend ([`e2e`]).

pub mod broker;
pub mod db;
pub mod e2e;
pub mod services;
