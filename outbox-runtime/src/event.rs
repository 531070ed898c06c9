//! Events: serde types owned by one service, registered at compile time.
//!
//! `#[outbox_event(service = Task, key = task_id)]` on a struct or enum that derives
//! `Serialize` and `Deserialize` implements [`Event`], [`PublishedThrough`] and
//! [`HandledBy`] for its service and registers an [`EventRegistration`] with
//! `inventory`. Nothing is listed by hand.

use std::fmt;

use serde::de::DeserializeOwned;
use serde::Serialize;
use uuid::Uuid;

use crate::service::Service;

/// A typed outbox event. Implemented by `#[outbox_event]`; do not implement by hand.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an outbox event",
    label = "not an outbox event",
    note = "declare it with `#[outbox_event(service = ...)]` and derive `Serialize` and `Deserialize`"
)]
pub trait Event: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The service that owns the event: its outbox, topic and consumer carry it.
    type Service: Service;
    /// The event type name on the wire (default: the Rust type name).
    const EVENT_TYPE: &'static str;
    /// The schema version (default 1).
    const VERSION: u32;
    /// Retries before the event goes dead, if the event type overrides the runtime
    /// default.
    const MAX_RETRIES: Option<u32>;
    /// The Kafka message key that orders events (`key = field`), if any. `publish`
    /// trims surrounding whitespace and treats an empty key as none.
    fn key(&self) -> Option<String>;

    /// Decodes a payload written at schema `version` into the current type.
    ///
    /// Without `upcast(...)` (the default), any version up to [`VERSION`](Self::VERSION)
    /// is read as the current type. With `#[outbox_event(version = 3, upcast(1 = V1,
    /// 2 = V2))]` the generated decoder reads a version of the chain as its own type and
    /// converts it step by step (`V1` → `V2` → current, through `Into`); a version
    /// below the chain's oldest or above the current one is an error naming the
    /// versions the type knows. Error messages never carry payload values.
    fn decode(version: u32, payload: &[u8]) -> Result<Self, DecodeError>
    where
        Self: Sized,
    {
        if version > Self::VERSION {
            return Err(DecodeError::unknown_version(
                Self::EVENT_TYPE,
                version,
                &[],
                Self::VERSION,
            ));
        }
        decode_version::<Self>(Self::EVENT_TYPE, version, payload)
    }
}

/// A payload that cannot become the current event type: not valid for the type of its
/// version, or of a version the type does not know. The message names the event type
/// and version, and carries serde's error without payload values (`redact.rs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    message: String,
}

impl DecodeError {
    /// A version this type cannot decode: `known` are the older versions of its
    /// upcast chain (oldest first), `current` its own.
    pub fn unknown_version(event_type: &str, version: u32, known: &[u32], current: u32) -> Self {
        let known = known
            .iter()
            .chain(std::iter::once(&current))
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let why = if version > current {
            "newer than the handler's type"
        } else {
            "older than every version the type declares (no upcaster for it)"
        };
        DecodeError {
            message: format!(
                "event type `{event_type}` has no decoder for schema version {version}: \
                 {why}; it decodes versions {known}"
            ),
        }
    }

    /// What went wrong (what ends up in `last_error`).
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for DecodeError {}

/// Reads a payload of schema `version` as `T` (the current type, or an older
/// version's type); serde's error is redacted.
pub fn decode_version<T: DeserializeOwned>(
    event_type: &str,
    version: u32,
    payload: &[u8],
) -> Result<T, DecodeError> {
    serde_json::from_slice(payload).map_err(|e| DecodeError {
        message: format!(
            "undecodable payload for event type `{event_type}` v{version}: {}",
            crate::redact::redact_json_error(&e)
        ),
    })
}

/// One step of an upcast chain: an older version's value into the next version.
/// Generated code calls it spanned at the older type, so a missing `From` impl is
/// reported there, as rustc's "the trait `From<V1>` is not implemented for `V2`"
/// (a trait of ours with its own message would only add a note: rustc reports the
/// unmet `From`).
pub fn upcast<Old: Into<Next>, Next>(old: Old) -> Next {
    old.into()
}

/// An older version an event type still decodes (`upcast(N = Type)`), as registered.
#[derive(Debug, Clone, Copy)]
pub struct OlderVersion {
    /// The schema version.
    pub version: u32,
    /// The Rust type rows of this version are read as.
    pub rust_type: &'static str,
    /// The JSON schema of that type, when it implements `JsonSchema` (feature
    /// `schema`).
    pub schema: fn() -> Option<serde_json::Value>,
}

/// Proof that an event may be published through the outbox of service `S`, that is,
/// `S` owns it. Implemented by `#[outbox_event]` for the owning service only.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be published through the outbox of service `{S}`",
    label = "this event is owned by another service",
    note = "an event travels through the outbox, topic and consumer of the service named in its `#[outbox_event(service = ...)]`; publish it through `Outbox<ThatService, _>`"
)]
pub trait PublishedThrough<S: Service>: Event {}

/// Proof that an event may be handled by the consumer of service `S`, that is, `S`
/// owns it. Implemented by `#[outbox_event]` for the owning service only.
#[diagnostic::on_unimplemented(
    message = "a handler on the consumer of service `{S}` cannot receive `{Self}`",
    label = "this event is owned by another service",
    note = "handlers run in the consumer of the service that owns the event; attach the handler to that service, or drop `service = ...` from `#[outbox_handler]`; for another service to handle it, its owner makes it `public` and that service subscribes with `#[outbox_handler(subscriber = ...)]`"
)]
pub trait HandledBy<S: Service>: Event {}

/// Proof that other services may subscribe to an event: its owner declared it
/// `#[outbox_event(service = ..., public)]`. A subscriber's handler
/// (`#[outbox_handler(subscriber = Notification)]`) compiles only for public events, so
/// a service's internal events stay its own.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a public event: other services cannot subscribe to it",
    label = "not declared `public` by the service that owns it",
    note = "the owner decides: declare it `#[outbox_event(service = ..., public)]` where it is defined, or handle it in the service that owns it with `#[outbox_handler]` (no `subscriber`)"
)]
pub trait PublicEvent: Event {}

/// Types usable as an event key (`key = field`). Implemented for strings, integers,
/// UUIDs and `Option`s of them.
///
/// `publish` trims surrounding whitespace from the key (`str::trim`) and stores a key
/// that is then empty as no key (NULL): `" a "` and `"a"` order together, and blank
/// keys do not all share one ordering key. The length limit applies after trimming.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be an outbox event key",
    label = "the `key = ...` field has this type",
    note = "key fields must be strings, integers, UUIDs or `Option`s of those; implement `outbox_runtime::EventKey` for other types"
)]
pub trait EventKey {
    /// The key, before `publish` trims it; `None` for no key.
    fn to_key(&self) -> Option<String>;
}

macro_rules! key_via_to_string {
    ($($t:ty),*) => {$(
        impl EventKey for $t {
            fn to_key(&self) -> Option<String> { Some(self.to_string()) }
        }
    )*};
}
key_via_to_string!(
    String, str, u8, u16, u32, u64, u128, i8, i16, i32, i64, i128, usize, isize, Uuid
);

impl<T: EventKey + ?Sized> EventKey for &T {
    fn to_key(&self) -> Option<String> {
        (**self).to_key()
    }
}

impl<T: EventKey> EventKey for Option<T> {
    fn to_key(&self) -> Option<String> {
        self.as_ref().and_then(EventKey::to_key)
    }
}

/// One event type as registered at compile time, collected through `inventory`.
#[derive(Debug, Clone, Copy)]
pub struct EventRegistration {
    /// The event type name.
    pub event_type: &'static str,
    /// The schema version.
    pub version: u32,
    /// The owning service's name.
    pub service: &'static str,
    /// The owning service's compile-time table (empty only for hand-written impls).
    pub service_table: &'static str,
    /// The event-type retry override.
    pub max_retries: Option<u32>,
    /// The key field, if any (for docs and the JSON export).
    pub key_field: Option<&'static str>,
    /// Where the type is declared (`crate::module::Type`).
    pub rust_type: &'static str,
    /// The older versions the type decodes (its `upcast(...)` chain), oldest first.
    pub older_versions: &'static [OlderVersion],
    /// The JSON schema of the current type, when it implements `JsonSchema` (feature
    /// `schema`).
    pub schema: fn() -> Option<serde_json::Value>,
    /// Whether other services may subscribe to it (`public`).
    pub public: bool,
}

/// For registrations without a known schema.
pub fn no_schema() -> Option<serde_json::Value> {
    None
}

impl EventRegistration {
    /// The registration of `E` without older versions or schema; `rust_type` names its
    /// declaration, `key_field` its key.
    pub const fn of<E: Event>(rust_type: &'static str, key_field: Option<&'static str>) -> Self {
        EventRegistration {
            event_type: E::EVENT_TYPE,
            version: E::VERSION,
            service: <E::Service as Service>::NAME,
            service_table: <E::Service as Service>::TABLE,
            max_retries: E::MAX_RETRIES,
            key_field,
            rust_type,
            older_versions: &[],
            schema: no_schema,
            public: false,
        }
    }
}

inventory::collect!(EventRegistration);

/// The identity of one published event: the de-duplication key end to end (never the
/// Kafka offset). A UUIDv7, so ids of one service sort by creation time.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct EventId(pub Uuid);

impl EventId {
    /// A fresh, time-ordered id.
    pub fn new() -> Self {
        EventId(Uuid::now_v7())
    }
}

impl Default for EventId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
