//! The integration-test harness: fresh databases per test ([`db`]), Kafka brokers per
//! test ([`broker`]), and the five example services with test-oriented handlers.

pub mod broker;
pub mod db;
