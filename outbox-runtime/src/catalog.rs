//! The route catalog: `event type -> service -> table / topic / consumer group`, and
//! which handler each consumer runs.
//!
//! Built once from what `#[outbox_service]`, `#[outbox_event]` and `#[outbox_handler]`
//! registered at compile time (through `inventory`), plus runtime overrides, and
//! validated as a whole: what only linking reveals (two crates declaring the same event
//! type name, an event whose service has no route, two handlers for one event) fails at
//! startup with ONE error that lists every problem.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::{Arc, OnceLock};

use serde::Serialize;

use crate::event::{Event, EventRegistration};
use crate::handler::HandlerRegistration;
use crate::names::{check_name, NameKind};
use crate::route::{GroupName, ServiceName, TableName, TopicName};
use crate::service::{Service, ServiceRegistration};

pub use crate::route::Route;

/// One event type in the catalog.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EventInfo {
    /// The event type name.
    pub event_type: String,
    /// The schema version.
    pub version: u32,
    /// The owning service.
    pub service: String,
    /// The event type's retry override.
    pub max_retries: Option<u32>,
    /// The key field.
    pub key_field: Option<String>,
    /// Where the type is declared.
    pub rust_type: String,
    /// Every version the consumer decodes, oldest first, the current one last: the
    /// older ones come from the type's `upcast(...)` chain.
    pub versions: Vec<VersionInfo>,
    /// Whether other services may subscribe to it (`#[outbox_event(public)]`).
    pub public: bool,
}

/// One schema version of an event type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VersionInfo {
    /// The schema version.
    pub version: u32,
    /// The Rust type payloads of this version are read as.
    pub rust_type: String,
    /// Its JSON schema, when the type implements `JsonSchema` (feature `schema`);
    /// `null` in the export otherwise.
    pub schema: Option<serde_json::Value>,
}

/// One handler in the catalog.
#[derive(Debug, Clone, Serialize)]
pub struct HandlerInfo {
    /// The service whose consumer runs it.
    pub service: String,
    /// The event type it handles.
    pub event_type: String,
    /// Its path.
    pub name: String,
    /// The backends it runs on (`any` for generic handlers).
    pub backends: Vec<String>,
    /// The subscribing service, for a subscription's handler.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subscriber: Option<String>,
    #[serde(skip)]
    registration: Option<&'static HandlerRegistration>,
}

/// One subscription in the catalog: a service (the subscriber) handling public events
/// of another (the publisher), read from the publisher's topic into the subscriber's
/// inbox table in the subscriber's own database.
#[derive(Debug, Clone, Serialize)]
pub struct SubscriptionInfo {
    /// The subscribing service.
    pub subscriber: String,
    /// The service whose events it handles.
    pub publisher: String,
    /// The publisher's topic, which the subscriber reads.
    pub topic: String,
    /// The subscriber's consumer group on that topic (default
    /// `outbox.<publisher>.subscriber.<subscriber>`, see
    /// [`crate::names::default_subscription_group`]).
    pub group: String,
    /// The subscriber's inbox table (default `<subscriber>_inbox`, see
    /// [`crate::names::default_inbox_table`]).
    pub inbox: String,
    /// The event types it handles, each with its handler.
    pub handlers: Vec<HandlerInfo>,
    /// The inbox as a route: service = the publisher (the rows' `service`), table =
    /// the inbox, topic = the publisher's, group = the subscription's.
    #[serde(skip)]
    route: Route,
}

impl SubscriptionInfo {
    /// The inbox route: what the subscriber's intake, worker and [`crate::Admin`]
    /// act on (service = the publisher, table = the inbox).
    pub fn route(&self) -> &Route {
        &self.route
    }

    /// The registration behind the handler of `event_type`.
    pub(crate) fn handler_registration(
        &self,
        event_type: &str,
    ) -> Option<&'static HandlerRegistration> {
        self.handlers
            .iter()
            .find(|h| h.event_type == event_type)
            .and_then(|h| h.registration)
    }
}

/// Every problem found while building the catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogError {
    /// One line per problem, sorted.
    pub problems: Vec<String>,
}

impl fmt::Display for CatalogError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "the outbox route catalog has {} problem(s):",
            self.problems.len()
        )?;
        for p in &self.problems {
            writeln!(f, "  - {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for CatalogError {}

/// The validated route catalog. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Catalog {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    routes: BTreeMap<String, Route>,
    events: BTreeMap<String, EventInfo>,
    handlers: BTreeMap<(String, String), HandlerInfo>,
    /// By (subscriber, publisher).
    subscriptions: BTreeMap<(String, String), SubscriptionInfo>,
}

impl Catalog {
    /// The catalog of everything registered in this binary, without overrides; built
    /// and validated once.
    pub fn global() -> Result<Catalog, CatalogError> {
        static GLOBAL: OnceLock<Result<Catalog, CatalogError>> = OnceLock::new();
        GLOBAL.get_or_init(|| Catalog::builder().build()).clone()
    }

    /// A builder over everything registered in this binary, for overrides.
    pub fn builder() -> CatalogBuilder {
        CatalogBuilder::default()
    }

    /// The route of a service by name (consumer and operator side).
    pub fn route(&self, service: &str) -> Option<&Route> {
        self.inner.routes.get(service)
    }

    /// The route of service `S` (the typed publish side: no strings).
    pub fn route_of<S: Service>(&self) -> Result<&Route, CatalogError> {
        self.route(S::NAME).ok_or_else(|| CatalogError {
            problems: vec![format!(
                "service `{}` is not in this route catalog (built without it?)",
                S::NAME
            )],
        })
    }

    /// All routes, by service name.
    pub fn routes(&self) -> impl Iterator<Item = &Route> {
        self.inner.routes.values()
    }

    /// The distinct outbox tables (services may share one).
    pub fn tables(&self) -> BTreeSet<&str> {
        self.inner
            .routes
            .values()
            .map(|r| r.table().as_str())
            .collect()
    }

    /// An event type by name (consumer side).
    pub fn event(&self, event_type: &str) -> Option<&EventInfo> {
        self.inner.events.get(event_type)
    }

    /// The catalog entry of event `E`.
    pub fn event_of<E: Event>(&self) -> Option<&EventInfo> {
        self.event(E::EVENT_TYPE)
    }

    /// All event types, by name.
    pub fn events(&self) -> impl Iterator<Item = &EventInfo> {
        self.inner.events.values()
    }

    /// The event types owned by a service.
    pub fn events_of_service<'a>(
        &'a self,
        service: &'a str,
    ) -> impl Iterator<Item = &'a EventInfo> + 'a {
        self.inner
            .events
            .values()
            .filter(move |e| e.service == service)
    }

    /// The handlers a service's consumer runs.
    pub fn handlers_of<'a>(
        &'a self,
        service: &'a str,
    ) -> impl Iterator<Item = &'a HandlerInfo> + 'a {
        self.inner
            .handlers
            .values()
            .filter(move |h| h.service == service)
    }

    /// The registration behind a handler of `(service, event_type)`.
    pub(crate) fn handler_registration(
        &self,
        service: &str,
        event_type: &str,
    ) -> Option<&'static HandlerRegistration> {
        self.inner
            .handlers
            .get(&(service.to_owned(), event_type.to_owned()))
            .and_then(|h| h.registration)
    }

    /// Every subscription, by subscriber then publisher.
    pub fn subscriptions(&self) -> impl Iterator<Item = &SubscriptionInfo> {
        self.inner.subscriptions.values()
    }

    /// The subscriptions of one subscribing service.
    pub fn subscriptions_of<'a>(
        &'a self,
        subscriber: &'a str,
    ) -> impl Iterator<Item = &'a SubscriptionInfo> + 'a {
        self.subscriptions()
            .filter(move |s| s.subscriber == subscriber)
    }

    /// The subscription of `subscriber` to `publisher`'s events.
    pub fn subscription(&self, subscriber: &str, publisher: &str) -> Option<&SubscriptionInfo> {
        self.inner
            .subscriptions
            .get(&(subscriber.to_owned(), publisher.to_owned()))
    }

    /// The whole catalog as JSON (for docs and CI diffs): services with their table,
    /// topic and group; events with version, key, owner, whether they are public and
    /// every version they decode (`versions: [{version, rust_type, schema}]`, what
    /// [`crate::compat::check`] compares); handlers; subscriptions with the
    /// publisher's topic, the subscriber's group and inbox table, and their handlers.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "services": self.inner.routes.values().collect::<Vec<_>>(),
            "events": self.inner.events.values().collect::<Vec<_>>(),
            "handlers": self.inner.handlers.values().collect::<Vec<_>>(),
            "subscriptions": self.inner.subscriptions.values().collect::<Vec<_>>(),
        })
    }
}

/// A service's route as an operator tool is given it, without the application's types
/// ([`Catalog::from_routes`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct RouteSpec {
    /// The service name.
    pub service: String,
    /// Its outbox table.
    pub table: String,
    /// Its topic (default: `outbox.<service>`, as `#[outbox_service]` derives it).
    #[serde(default)]
    pub topic: Option<String>,
    /// Its consumer group (default: `outbox.<service>.consumer`).
    #[serde(default)]
    pub group: Option<String>,
}

impl Catalog {
    /// A catalog of routes only, without event types or handlers: what an operator
    /// tool outside the application needs (the standalone `outbox` command line). Names
    /// are checked like every other; every problem is reported at once.
    pub fn from_routes(
        routes: impl IntoIterator<Item = RouteSpec>,
    ) -> Result<Catalog, CatalogError> {
        let mut problems = BTreeSet::new();
        let mut map = BTreeMap::new();
        for spec in routes {
            let topic = spec
                .topic
                .clone()
                .unwrap_or_else(|| crate::names::default_topic(&spec.service));
            let group = spec
                .group
                .clone()
                .unwrap_or_else(|| crate::names::default_group(&spec.service));
            let checked = (
                ServiceName::checked(&spec.service),
                TableName::checked(&spec.table),
                TopicName::checked(&topic),
                GroupName::checked(&group),
            );
            match checked {
                (Ok(service), Ok(table), Ok(topic), Ok(group)) => {
                    if map.contains_key(&spec.service) {
                        problems.insert(format!("service `{}` is given twice", spec.service));
                        continue;
                    }
                    map.insert(
                        spec.service.clone(),
                        Route::new(service, table, topic, group, ""),
                    );
                }
                (service, table, topic, group) => {
                    for e in [service.err(), table.err(), topic.err(), group.err()]
                        .into_iter()
                        .flatten()
                    {
                        problems.insert(format!("service `{}`: {}", spec.service, e));
                    }
                }
            }
        }
        if !problems.is_empty() {
            return Err(CatalogError {
                problems: problems.into_iter().collect(),
            });
        }
        Ok(Catalog {
            inner: Arc::new(Inner {
                routes: map,
                events: BTreeMap::new(),
                handlers: BTreeMap::new(),
                subscriptions: BTreeMap::new(),
            }),
        })
    }

    /// The routes of a catalog export ([`Catalog::to_json`], its `services`), as
    /// [`from_routes`](Self::from_routes) builds them: an operator tool's view of an
    /// application it was not compiled with.
    pub fn from_export(json: &serde_json::Value) -> Result<Catalog, CatalogError> {
        let services = json
            .get("services")
            .cloned()
            .unwrap_or(serde_json::Value::Null);
        let specs: Vec<RouteSpec> = serde_json::from_value(services).map_err(|e| CatalogError {
            problems: vec![format!(
                "not a catalog export (`services: [{{service, table, topic, group}}]`): {e}"
            )],
        })?;
        let catalog = Catalog::from_routes(specs)?;
        // The subscriptions, for an operator tool's `--inbox`: names only, no handlers.
        #[derive(serde::Deserialize)]
        struct SubscriptionSpec {
            subscriber: String,
            publisher: String,
            topic: String,
            group: String,
            inbox: String,
        }
        let subs: Vec<SubscriptionSpec> = match json.get("subscriptions") {
            None | Some(serde_json::Value::Null) => Vec::new(),
            Some(v) => serde_json::from_value(v.clone()).map_err(|e| CatalogError {
                problems: vec![format!(
                    "the export's `subscriptions` are not `[{{subscriber, publisher, topic, group, inbox}}]`: {e}"
                )],
            })?,
        };
        let mut problems = BTreeSet::new();
        let mut subscriptions = BTreeMap::new();
        for s in subs {
            let checked = (
                ServiceName::checked(&s.publisher),
                TableName::checked(&s.inbox),
                TopicName::checked(&s.topic),
                GroupName::checked(&s.group),
            );
            match checked {
                (Ok(service), Ok(table), Ok(topic), Ok(group)) => {
                    subscriptions.insert(
                        (s.subscriber.clone(), s.publisher.clone()),
                        SubscriptionInfo {
                            route: Route::new(service, table, topic, group, ""),
                            subscriber: s.subscriber,
                            publisher: s.publisher,
                            topic: s.topic,
                            group: s.group,
                            inbox: s.inbox,
                            handlers: Vec::new(),
                        },
                    );
                }
                (service, table, topic, group) => {
                    for e in [service.err(), table.err(), topic.err(), group.err()]
                        .into_iter()
                        .flatten()
                    {
                        problems.insert(format!(
                            "subscription of `{}` to `{}`: {e}",
                            s.subscriber, s.publisher
                        ));
                    }
                }
            }
        }
        if !problems.is_empty() {
            return Err(CatalogError {
                problems: problems.into_iter().collect(),
            });
        }
        Ok(Catalog {
            inner: Arc::new(Inner {
                routes: catalog.inner.routes.clone(),
                events: BTreeMap::new(),
                handlers: BTreeMap::new(),
                subscriptions,
            }),
        })
    }
}

/// Runtime overrides on top of the compile-time registry.
#[derive(Debug, Clone, Default)]
pub struct CatalogBuilder {
    topic_prefix: String,
    group_prefix: String,
    tables: BTreeMap<String, String>,
    topics: BTreeMap<String, String>,
    groups: BTreeMap<String, String>,
    /// Inbox tables by subscriber.
    inboxes: BTreeMap<String, String>,
    /// Subscription groups by (subscriber, publisher).
    subscription_groups: BTreeMap<(String, String), String>,
    /// `OUTBOX_<X>_TABLE|TOPIC|GROUP|INBOX` variables whose `<X>` is no declared service:
    /// reported by `build`, since a misspelt override silently ignored routes events
    /// to the default table or topic.
    unknown_env: BTreeSet<String>,
}

/// The per-service environment variables' suffixes and what they override.
const ENV_SUFFIXES: [&str; 4] = ["_TABLE", "_TOPIC", "_GROUP", "_INBOX"];

/// Variable families that are not service overrides even when they end like one (the
/// broker settings, and the test suite's, fault suite's, tansu's and bench's
/// variables), unless a service with that stem is declared.
const TOOL_ENV_PREFIXES: &[&str] = &[
    "OUTBOX_TEST_",
    "OUTBOX_CHAOS_",
    "OUTBOX_TANSU_",
    "OUTBOX_BENCH_",
    "OUTBOX_KAFKA_",
];

/// A service's stem in environment variable names: upper-cased, `-` as `_`
/// (`active-scheduler` → `ACTIVE_SCHEDULER`).
fn env_stem(service: &str) -> String {
    service.replace('-', "_").to_uppercase()
}

impl CatalogBuilder {
    /// Prefixes every topic (e.g. per environment: `staging.`).
    pub fn topic_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.topic_prefix = prefix.into();
        self
    }

    /// Prefixes every consumer group.
    pub fn group_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.group_prefix = prefix.into();
        self
    }

    /// Overrides a service's table.
    pub fn table(mut self, service: &str, table: impl Into<String>) -> Self {
        self.tables.insert(service.to_owned(), table.into());
        self
    }

    /// Overrides a service's topic (the prefix still applies).
    pub fn topic(mut self, service: &str, topic: impl Into<String>) -> Self {
        self.topics.insert(service.to_owned(), topic.into());
        self
    }

    /// Overrides a service's consumer group (the prefix still applies).
    pub fn group(mut self, service: &str, group: impl Into<String>) -> Self {
        self.groups.insert(service.to_owned(), group.into());
        self
    }

    /// Overrides a subscriber's inbox table (default `<subscriber>_inbox`).
    pub fn inbox(mut self, subscriber: &str, table: impl Into<String>) -> Self {
        self.inboxes.insert(subscriber.to_owned(), table.into());
        self
    }

    /// Overrides the consumer group `subscriber` reads `publisher`'s topic in (default
    /// `outbox.<publisher>.subscriber.<subscriber>`; the group prefix still applies).
    pub fn subscription_group(
        mut self,
        subscriber: &str,
        publisher: &str,
        group: impl Into<String>,
    ) -> Self {
        self.subscription_groups
            .insert((subscriber.to_owned(), publisher.to_owned()), group.into());
        self
    }

    /// Reads overrides from the environment: `OUTBOX_TOPIC_PREFIX`,
    /// `OUTBOX_GROUP_PREFIX`, and per service `OUTBOX_<SERVICE>_TABLE`, `_TOPIC`,
    /// `_GROUP`, `_INBOX` (service name upper-cased, `-` as `_`: `OUTBOX_ACTIVE_SCHEDULER_TOPIC`).
    /// A variable of that form naming no declared service (`OUTBOX_TASKS_TABLE` when
    /// the service is `task`) is a problem [`build`](Self::build) reports. See
    /// [`from_vars`](Self::from_vars).
    pub fn from_env(self) -> Self {
        // `vars_os`, lossily converted: `std::env::vars` panics on a non-Unicode
        // variable, even one of another program; a mangled value of ours fails the
        // name grammar with a message instead.
        self.from_vars(std::env::vars_os().map(|(k, v)| {
            (
                k.to_string_lossy().into_owned(),
                v.to_string_lossy().into_owned(),
            )
        }))
    }

    /// [`from_env`](Self::from_env) over explicit variables (name, value), for tests
    /// and for configuration that does not live in the process environment. Variables
    /// not starting with `OUTBOX_` are ignored, and so are other `OUTBOX_*` variables
    /// (`OUTBOX_KAFKA_BROKERS`, `OUTBOX_TEST_*`, ...) unless they end in `_TABLE`,
    /// `_TOPIC` or `_GROUP`; those must name a declared service.
    pub fn from_vars(mut self, vars: impl IntoIterator<Item = (String, String)>) -> Self {
        let stems: BTreeMap<String, &'static str> = inventory::iter::<ServiceRegistration>
            .into_iter()
            .map(|s| (env_stem(s.name), s.name))
            .collect();
        for (var, value) in vars {
            match var.as_str() {
                "OUTBOX_TOPIC_PREFIX" => self.topic_prefix = value,
                "OUTBOX_GROUP_PREFIX" => self.group_prefix = value,
                _ => {
                    let Some(rest) = var.strip_prefix("OUTBOX_") else {
                        continue;
                    };
                    let Some((stem, suffix)) = ENV_SUFFIXES
                        .iter()
                        .find_map(|suffix| Some((rest.strip_suffix(suffix)?, *suffix)))
                    else {
                        continue;
                    };
                    let Some(service) = stems.get(stem) else {
                        if !TOOL_ENV_PREFIXES.iter().any(|p| var.starts_with(p)) {
                            self.unknown_env.insert(var);
                        }
                        continue;
                    };
                    let map = match suffix {
                        "_TABLE" => &mut self.tables,
                        "_TOPIC" => &mut self.topics,
                        "_INBOX" => &mut self.inboxes,
                        _ => &mut self.groups,
                    };
                    map.insert((*service).to_owned(), value);
                }
            }
        }
        self
    }

    /// Builds and validates the catalog from everything registered in this binary.
    pub fn build(self) -> Result<Catalog, CatalogError> {
        let services: Vec<ServiceRegistration> = inventory::iter::<ServiceRegistration>
            .into_iter()
            .copied()
            .collect();
        let events: Vec<EventRegistration> = inventory::iter::<EventRegistration>
            .into_iter()
            .copied()
            .collect();
        let handlers: Vec<&'static HandlerRegistration> =
            inventory::iter::<HandlerRegistration>.into_iter().collect();
        self.build_from(&services, &events, &handlers)
    }

    /// Builds and validates a catalog from explicit registrations (what
    /// [`build`](Self::build) does with the registry; public for tools and tests).
    pub fn build_from(
        self,
        services: &[ServiceRegistration],
        events: &[EventRegistration],
        handlers: &[&'static HandlerRegistration],
    ) -> Result<Catalog, CatalogError> {
        let mut problems = BTreeSet::new();

        // Services and their routes.
        let mut routes: BTreeMap<String, Route> = BTreeMap::new();
        let mut invalid: BTreeSet<&str> = BTreeSet::new();
        for s in services {
            if let Some(existing) = routes.get(s.name) {
                problems.insert(format!(
                    "service `{}` is declared twice: by `{}` and by `{}`",
                    s.name,
                    existing.rust_type(),
                    s.rust_type
                ));
                continue;
            }
            let table = self
                .tables
                .get(s.name)
                .map(String::as_str)
                .unwrap_or(s.table);
            let topic = format!(
                "{}{}",
                self.topic_prefix,
                self.topics
                    .get(s.name)
                    .map(String::as_str)
                    .unwrap_or(s.topic)
            );
            let group = format!(
                "{}{}",
                self.group_prefix,
                self.groups
                    .get(s.name)
                    .map(String::as_str)
                    .unwrap_or(s.group)
            );
            let checked = (
                ServiceName::checked(s.name),
                TableName::checked(table),
                TopicName::checked(&topic),
                GroupName::checked(&group),
            );
            match checked {
                (Ok(service), Ok(table), Ok(topic), Ok(group)) => {
                    routes.insert(
                        s.name.to_owned(),
                        Route::new(service, table, topic, group, s.rust_type),
                    );
                }
                (service, table, topic, group) => {
                    for e in [service.err(), table.err(), topic.err(), group.err()]
                        .into_iter()
                        .flatten()
                    {
                        problems.insert(format!("service `{}`: {}", s.name, e));
                    }
                    // Still known as declared, so events of it are not reported as
                    // belonging to an undeclared service.
                    invalid.insert(s.name);
                }
            }
        }
        if !self.unknown_env.is_empty() {
            let declared = services
                .iter()
                .map(|s| format!("`OUTBOX_{}_`", env_stem(s.name)))
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect::<Vec<_>>();
            let declared = if declared.is_empty() {
                "none are declared".to_owned()
            } else {
                format!(
                    "the declared services' variables are {} followed by TABLE, TOPIC or GROUP",
                    declared.join(", ")
                )
            };
            for var in &self.unknown_env {
                problems.insert(format!(
                    "environment variable `{var}` names no declared service ({declared}); fix its name or unset it"
                ));
            }
        }
        for overridden in self
            .tables
            .keys()
            .chain(self.topics.keys())
            .chain(self.groups.keys())
        {
            if !routes.contains_key(overridden) && !invalid.contains(overridden.as_str()) {
                problems.insert(format!(
                    "an override names service `{overridden}`, which is not declared"
                ));
            }
        }
        let mut by_topic: BTreeMap<&str, &str> = BTreeMap::new();
        let mut by_group: BTreeMap<&str, &str> = BTreeMap::new();
        for r in routes.values() {
            if let Some(other) = by_topic.insert(r.topic().as_str(), r.service().as_str()) {
                problems.insert(format!(
                    "services `{}` and `{}` share topic `{}`; each service needs its own",
                    other,
                    r.service(),
                    r.topic()
                ));
            }
            if let Some(other) = by_group.insert(r.group().as_str(), r.service().as_str()) {
                problems.insert(format!(
                    "services `{}` and `{}` share consumer group `{}`; each service needs its own",
                    other,
                    r.service(),
                    r.group()
                ));
            }
        }

        // Events.
        let mut event_map: BTreeMap<String, EventInfo> = BTreeMap::new();
        for e in events {
            if let Some(existing) = event_map.get(e.event_type) {
                problems.insert(format!(
                    "event type `{}` is declared twice: by `{}` and by `{}`; rename one with #[outbox_event(name = \"...\")]",
                    e.event_type, existing.rust_type, e.rust_type
                ));
                continue;
            }
            if let Err(why) = check_name(NameKind::EventType, e.event_type) {
                problems.insert(format!("event `{}`: {}", e.rust_type, why));
            }
            if let Some(why) = chain_problem(e) {
                problems.insert(format!(
                    "event type `{}` (`{}`): {why}",
                    e.event_type, e.rust_type
                ));
            }
            match routes.get(e.service) {
                None if invalid.contains(e.service) => {}
                None => {
                    problems.insert(format!(
                        "event `{}` (`{}`) belongs to service `{}`, which has no route (no table, topic or group); declare it with #[outbox_service]",
                        e.event_type, e.rust_type, e.service
                    ));
                }
                Some(_) => {}
            }
            event_map.insert(
                e.event_type.to_owned(),
                EventInfo {
                    event_type: e.event_type.to_owned(),
                    version: e.version,
                    service: e.service.to_owned(),
                    max_retries: e.max_retries,
                    key_field: e.key_field.map(str::to_owned),
                    rust_type: e.rust_type.to_owned(),
                    versions: e
                        .older_versions
                        .iter()
                        .map(|o| VersionInfo {
                            version: o.version,
                            rust_type: o.rust_type.to_owned(),
                            schema: (o.schema)(),
                        })
                        .chain(std::iter::once(VersionInfo {
                            version: e.version,
                            rust_type: e.rust_type.to_owned(),
                            schema: (e.schema)(),
                        }))
                        .collect(),
                    public: e.public,
                },
            );
        }

        // Handlers.
        let mut handler_map: BTreeMap<(String, String), HandlerInfo> = BTreeMap::new();
        let mut subscription_handlers: Vec<&'static HandlerRegistration> = Vec::new();
        for h in handlers {
            if h.subscriber.is_some() {
                subscription_handlers.push(h);
                continue;
            }
            let key = (h.service.to_owned(), h.event_type.to_owned());
            if let Some(existing) = handler_map.get(&key) {
                problems.insert(format!(
                    "event type `{}` has two handlers in service `{}`: `{}` and `{}`; keep one",
                    h.event_type, h.service, existing.name, h.name
                ));
                continue;
            }
            match event_map.get(h.event_type) {
                None => {
                    problems.insert(format!(
                        "handler `{}` handles event type `{}`, which is not registered",
                        h.name, h.event_type
                    ));
                }
                Some(e) if e.service != h.service => {
                    problems.insert(format!(
                        "handler `{}` is attached to service `{}`, but event `{}` belongs to `{}`",
                        h.name, h.service, h.event_type, e.service
                    ));
                }
                Some(_) => {}
            }
            handler_map.insert(
                key,
                HandlerInfo {
                    service: h.service.to_owned(),
                    event_type: h.event_type.to_owned(),
                    name: h.name.to_owned(),
                    backends: h
                        .factory
                        .backends()
                        .iter()
                        .map(|b| (*b).to_owned())
                        .collect(),
                    subscriber: None,
                    registration: Some(h),
                },
            );
        }

        let subscriptions = self.subscriptions(
            &mut problems,
            &routes,
            &invalid,
            &event_map,
            &subscription_handlers,
        );

        if !problems.is_empty() {
            return Err(CatalogError {
                problems: problems.into_iter().collect(),
            });
        }
        Ok(Catalog {
            inner: Arc::new(Inner {
                routes,
                events: event_map,
                handlers: handler_map,
                subscriptions,
            }),
        })
    }

    /// The subscriptions, from the handlers registered with `subscriber = ...`: one per
    /// (subscriber, publisher), validated (a public event of a declared service, no
    /// service subscribing to itself, one handler per event and subscriber, inbox and
    /// group names checked and distinct from every outbox table and group).
    fn subscriptions(
        &self,
        problems: &mut BTreeSet<String>,
        routes: &BTreeMap<String, Route>,
        invalid: &BTreeSet<&str>,
        events: &BTreeMap<String, EventInfo>,
        handlers: &[&'static HandlerRegistration],
    ) -> BTreeMap<(String, String), SubscriptionInfo> {
        let mut out: BTreeMap<(String, String), SubscriptionInfo> = BTreeMap::new();
        for h in handlers {
            let Some(subscriber) = h.subscriber else {
                continue;
            };
            let Some(event) = events.get(h.event_type) else {
                problems.insert(format!(
                    "handler `{}` subscribes to event type `{}`, which is not registered",
                    h.name, h.event_type
                ));
                continue;
            };
            if !event.public {
                problems.insert(format!(
                    "handler `{}` of service `{subscriber}` subscribes to `{}`, which service `{}` has not made public (`#[outbox_event(..., public)]`)",
                    h.name, h.event_type, event.service
                ));
                continue;
            }
            if subscriber == event.service {
                problems.insert(format!(
                    "handler `{}` subscribes service `{subscriber}` to its own event `{}`; handle it with `#[outbox_handler]` (no `subscriber`)",
                    h.name, h.event_type
                ));
                continue;
            }
            if invalid.contains(subscriber) || invalid.contains(event.service.as_str()) {
                continue;
            }
            let (Some(sub_route), Some(publisher)) =
                (routes.get(subscriber), routes.get(&event.service))
            else {
                problems.insert(format!(
                    "handler `{}` subscribes service `{subscriber}`, which is not declared with #[outbox_service]",
                    h.name
                ));
                continue;
            };
            let key = (subscriber.to_owned(), event.service.clone());
            if !out.contains_key(&key) {
                let inbox = self
                    .inboxes
                    .get(subscriber)
                    .cloned()
                    .unwrap_or_else(|| crate::names::default_inbox_table(subscriber));
                let group = format!(
                    "{}{}",
                    self.group_prefix,
                    self.subscription_groups
                        .get(&key)
                        .cloned()
                        .unwrap_or_else(|| {
                            crate::names::default_subscription_group(&event.service, subscriber)
                        })
                );
                match (TableName::checked(&inbox), GroupName::checked(&group)) {
                    (Ok(table), Ok(group_name)) => {
                        out.insert(
                            key.clone(),
                            SubscriptionInfo {
                                subscriber: subscriber.to_owned(),
                                publisher: event.service.clone(),
                                topic: publisher.topic().to_string(),
                                group,
                                inbox,
                                handlers: Vec::new(),
                                route: Route::new(
                                    publisher.service().clone(),
                                    table,
                                    publisher.topic().clone(),
                                    group_name,
                                    sub_route.rust_type(),
                                ),
                            },
                        );
                    }
                    (table, group) => {
                        for e in [table.err(), group.err()].into_iter().flatten() {
                            problems.insert(format!(
                                "subscription of `{subscriber}` to `{}`: {e}",
                                event.service
                            ));
                        }
                        continue;
                    }
                }
            }
            let Some(sub) = out.get_mut(&key) else {
                continue;
            };
            if let Some(existing) = sub.handlers.iter().find(|x| x.event_type == h.event_type) {
                problems.insert(format!(
                    "event type `{}` has two handlers in subscriber `{subscriber}`: `{}` and `{}`; keep one",
                    h.event_type, existing.name, h.name
                ));
                continue;
            }
            sub.handlers.push(HandlerInfo {
                service: event.service.clone(),
                event_type: h.event_type.to_owned(),
                name: h.name.to_owned(),
                backends: h
                    .factory
                    .backends()
                    .iter()
                    .map(|b| (*b).to_owned())
                    .collect(),
                subscriber: Some(subscriber.to_owned()),
                registration: Some(h),
            });
        }
        for (subscriber, _) in self
            .inboxes
            .iter()
            .filter(|(s, _)| !routes.contains_key(*s))
        {
            problems.insert(format!(
                "an inbox override names service `{subscriber}`, which is not declared"
            ));
        }
        for sub in out.values() {
            for r in routes.values() {
                if r.table().as_str() == sub.inbox {
                    problems.insert(format!(
                        "the inbox of `{}` is table `{}`, which is also the outbox table of service `{}`; give the inbox its own table",
                        sub.subscriber, sub.inbox, r.service()
                    ));
                }
                if r.group().as_str() == sub.group {
                    problems.insert(format!(
                        "the subscription of `{}` to `{}` uses consumer group `{}`, which is also the group of service `{}`",
                        sub.subscriber, sub.publisher, sub.group, r.service()
                    ));
                }
            }
        }
        let mut groups: BTreeMap<&str, (&str, &str)> = BTreeMap::new();
        for sub in out.values() {
            if let Some((s, p)) = groups.insert(&sub.group, (&sub.subscriber, &sub.publisher)) {
                problems.insert(format!(
                    "subscriptions `{s}` <- `{p}` and `{}` <- `{}` share consumer group `{}`; each needs its own",
                    sub.subscriber, sub.publisher, sub.group
                ));
            }
        }
        out
    }
}

/// What is wrong with an event's upcast chain, if anything: every older version below
/// the current one, none twice, and no gap up to the current one (each converts into
/// the next).
fn chain_problem(e: &EventRegistration) -> Option<String> {
    if e.older_versions.is_empty() {
        return None;
    }
    let mut why = Vec::new();
    let mut seen = BTreeSet::new();
    for o in e.older_versions {
        if o.version >= e.version {
            why.push(format!(
                "older version {} (`{}`) is not below the current version {}",
                o.version, o.rust_type, e.version
            ));
        } else if !seen.insert(o.version) {
            why.push(format!("older version {} is declared twice", o.version));
        }
    }
    if let Some(&oldest) = seen.first() {
        let missing: Vec<String> = (oldest..e.version)
            .filter(|v| !seen.contains(v))
            .map(|v| v.to_string())
            .collect();
        if !missing.is_empty() {
            why.push(format!(
                "the upcast chain from version {oldest} to {} has a gap: no type for version(s) {}",
                e.version,
                missing.join(", ")
            ));
        }
    }
    (!why.is_empty()).then(|| why.join("; "))
}
