//! Services: the owners of events, each with one outbox table, one topic and one
//! consumer group.
//!
//! A service is declared once, on a unit struct, with `#[outbox_service]`:
//!
//! ```ignore
//! #[outbox_service]                                   // name "task" from the type name
//! pub struct Task;
//! #[outbox_service(name = "agent", table = "outbox_events")] // legacy shared table
//! pub struct Agent;
//! ```
//!
//! The table, topic and group derive from the name by a fixed rule (see
//! [`crate::names`]): table `<name with - as _>_outbox`, topic `outbox.<name>`,
//! group `outbox.<name>.consumer`. Each can be overridden in the attribute, and again at
//! startup through [`crate::catalog::CatalogBuilder`].

/// A declared outbox service. Implemented by `#[outbox_service]`; do not implement by hand.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a declared outbox service",
    label = "not an outbox service",
    note = "declare the service once on a unit struct: `#[outbox_service] pub struct {Self};` (options: `name`, `table`, `topic`, `group`)"
)]
pub trait Service: Send + Sync + 'static {
    /// The service name (`task`, `active-scheduler`).
    const NAME: &'static str;
    /// The outbox table its events are written to (compile-time default).
    const TABLE: &'static str;
    /// The Kafka topic its relay produces to (compile-time default).
    const TOPIC: &'static str;
    /// The Kafka consumer group its consumer joins (compile-time default).
    const GROUP: &'static str;
}

/// One service as registered at compile time, collected through `inventory`.
#[derive(Debug, Clone, Copy)]
pub struct ServiceRegistration {
    /// The service name.
    pub name: &'static str,
    /// The compile-time table.
    pub table: &'static str,
    /// The compile-time topic.
    pub topic: &'static str,
    /// The compile-time consumer group.
    pub group: &'static str,
    /// Where it was declared (`crate::module::Type`), for error messages.
    pub rust_type: &'static str,
}

impl ServiceRegistration {
    /// The registration of service `S`; `rust_type` names its declaration.
    pub const fn of<S: Service>(rust_type: &'static str) -> Self {
        ServiceRegistration {
            name: S::NAME,
            table: S::TABLE,
            topic: S::TOPIC,
            group: S::GROUP,
            rust_type,
        }
    }
}

inventory::collect!(ServiceRegistration);
