//! The one error type of the runtime.

use crate::catalog::CatalogError;

/// Everything the runtime can fail with. Each variant carries what was being done, so a
/// log line alone says where to look.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A database statement failed.
    #[error("database error while {context}: {source}")]
    Database {
        /// What was being done (`claiming due rows of service task from task_outbox`).
        context: String,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// A Kafka client call failed.
    #[cfg(feature = "kafka")]
    #[error("kafka error while {context}: {source}")]
    Kafka {
        /// What was being done.
        context: String,
        /// The client's error.
        #[source]
        source: rdkafka::error::KafkaError,
    },
    /// An event could not be serialized.
    #[error("cannot serialize event `{event_type}`: {source}")]
    Serialize {
        /// The event type.
        event_type: String,
        /// serde's error.
        #[source]
        source: serde_json::Error,
    },
    /// An event is larger than the configured limit; refused inside the business
    /// transaction, before it could poison the relay.
    #[error("event `{event_type}` is {size} bytes; the limit is {limit} bytes (OutboxConfig::max_payload_bytes)")]
    PayloadTooLarge {
        /// The event type.
        event_type: String,
        /// The serialized size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// An event key is longer than every backend can index.
    #[error("event `{event_type}` has a key of {len} bytes; the limit is {limit} bytes")]
    KeyTooLong {
        /// The event type.
        event_type: String,
        /// The key's length in bytes.
        len: usize,
        /// The limit ([`crate::backend::MAX_KEY_LEN`]).
        limit: usize,
    },
    /// `publish_raw` was given an event type the route catalog does not know: no
    /// consumer could handle it, so it is refused before it is stored.
    #[error(
        "event type `{event_type}` is not in the route catalog, so no consumer could handle it; \
         publish one of the types of service `{service}` ({known}) or declare this one with \
         #[outbox_event(service = ...)]",
        known = list_or_none(.known)
    )]
    UnknownEventType {
        /// The event type that was given.
        event_type: String,
        /// The service whose outbox was asked to publish it.
        service: String,
        /// The event types that service owns.
        known: Vec<String>,
    },
    /// `publish_raw` was given an event type that another service owns: it would be
    /// stored in the wrong outbox and reach the wrong consumer.
    #[error(
        "event type `{event_type}` belongs to service `{owner}`, not `{service}`; publish it \
         through the outbox of `{owner}` (`Outbox<{owner_type}, _>`)"
    )]
    EventOfOtherService {
        /// The event type that was given.
        event_type: String,
        /// The service that owns it.
        owner: String,
        /// Where the owner is declared (`crate::module::Type`).
        owner_type: String,
        /// The service whose outbox was asked to publish it.
        service: String,
    },
    /// `publish_raw` was given a schema version newer than the catalog's, which the
    /// consumer would dead-letter (its handler only knows the catalog's version).
    #[error(
        "event `{event_type}` has schema version {version}, newer than the route catalog's \
         {known}, so its handler could not read it; publish version {known} or lower, or \
         deploy the event type's version {version} first"
    )]
    EventVersionTooNew {
        /// The event type.
        event_type: String,
        /// The version that was given.
        version: u32,
        /// The catalog's (registered) version.
        known: u32,
    },
    /// The route catalog is invalid; lists every problem at once.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// A service is not in the catalog.
    #[error("service `{0}` is not in the route catalog; declare it with #[outbox_service]")]
    UnknownService(String),
    /// A name failed the grammar of [`crate::names`].
    #[error("invalid name: {0}")]
    InvalidName(String),
    /// Invalid configuration.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// An operator's request is invalid (an event key too long, a zero page size).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// A relay or consumer task panicked or was cancelled.
    #[error("outbox task {task} ended abnormally: {source}")]
    Join {
        /// Which task.
        task: String,
        /// The join error (the panic).
        #[source]
        source: tokio::task::JoinError,
    },
    /// A service's outbox table does not exist (found at `start` with
    /// `migrate(false)`, or when publishing).
    #[error(
        "the outbox table {table} of service `{service}` does not exist; create it with \
         `OutboxRuntime::migrate(true)` (the default) or `Outbox::migrate()`, or run \
         `Backend::migration_sql` in your own migrations ({source})"
    )]
    MissingTable {
        /// The table.
        table: String,
        /// The service it belongs to.
        service: String,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    #[cfg(feature = "kafka")]
    /// No Kafka broker answered at `start` within [`crate::OutboxRuntime::broker_wait`].
    #[error(
        "no Kafka broker answered at {brokers} within {waited:?} (OutboxRuntime::broker_wait); \
         check the address (KafkaConfig, OUTBOX_KAFKA_BROKERS), or start anyway with \
         .on_unreachable_broker(OnUnreachableBroker::Warn): {source}"
    )]
    BrokerUnreachable {
        /// The bootstrap servers that were tried.
        brokers: String,
        /// How long `start` waited.
        waited: std::time::Duration,
        /// The client's error.
        #[source]
        source: rdkafka::error::KafkaError,
    },
    /// The backend cannot do what was asked.
    #[error("the {backend} backend does not support {what}")]
    Unsupported {
        /// The backend name.
        backend: &'static str,
        /// What it cannot do.
        what: String,
    },
}

impl Error {
    #[cfg(feature = "kafka")]
    /// Which side an error came from, for health: the broker for Kafka errors, the
    /// database for everything else a relay or consumer meets.
    pub(crate) fn side(&self) -> crate::health::Side {
        match self {
            Error::Kafka { .. } => crate::health::Side::Broker,
            _ => crate::health::Side::Database,
        }
    }

    /// A database error with context.
    pub fn db(context: impl Into<String>, source: sqlx::Error) -> Self {
        Error::Database {
            context: context.into(),
            source,
        }
    }

    /// A Kafka error with context.
    #[cfg(feature = "kafka")]
    pub fn kafka(context: impl Into<String>, source: rdkafka::error::KafkaError) -> Self {
        Error::Kafka {
            context: context.into(),
            source,
        }
    }
}

/// Whether `e` says a table does not exist (PostgreSQL 42P01, MySQL 42S02 / 1146,
/// SQLite "no such table").
pub(crate) fn is_missing_table(e: &sqlx::Error) -> bool {
    let Some(db) = e.as_database_error() else {
        return false;
    };
    matches!(db.code().as_deref(), Some("42P01" | "42S02" | "1146"))
        || db.message().starts_with("no such table")
}

/// `a`, `b` for a message; `it declares none` when empty.
fn list_or_none(names: &[String]) -> String {
    if names.is_empty() {
        return "it declares none".to_owned();
    }
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `Result` with the runtime's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
