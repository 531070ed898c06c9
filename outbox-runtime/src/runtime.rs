//! Running relays and consumers: any subset of services in one process.
//!
//! ```ignore
//! let handle = OutboxRuntime::new(catalog, pool, KafkaConfig::new(brokers))
//!     .services(["task", "memory"])   // default: every service in the catalog
//!     .start()
//!     .await?;
//! // ...
//! handle.shutdown().await?;            // finishes in-flight work, commits offsets
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;

use sqlx::Pool;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::backend::Backend;
use crate::catalog::Catalog;
use crate::config::OutboxConfig;
use crate::consumer::{Consumer, ConsumerStats};
use crate::error::{Error, Result};
use crate::health::{Beat, Health, Role};
use crate::kafka::{BrokerCheck, KafkaConfig, OnUnreachableBroker, Producers, TopicSettings};
use crate::outbox::Outbox;
use crate::relay::{Relay, RelayStats};
use crate::service::Service;

/// A shutdown signal for long-running loops: `true` once shutdown was requested.
pub type ShutdownSignal = watch::Receiver<bool>;

/// What to run, and where.
pub struct OutboxRuntime<DB: Backend> {
    catalog: Catalog,
    pool: Pool<DB>,
    kafka: KafkaConfig,
    // One Arc shared with every outbox taken from this runtime: a setting is given once
    // and every component that reads it sees the same value.
    config: Arc<OutboxConfig>,
    // Whether `outbox` was called: if not, the publish settings in `config` reach no
    // outbox of this process, and `start` says so.
    outbox_taken: std::sync::atomic::AtomicBool,
    services: Option<Vec<String>>,
    relays_per_service: usize,
    run_relays: bool,
    run_consumers: bool,
    migrate: bool,
    broker_wait: std::time::Duration,
    on_unreachable: OnUnreachableBroker,
    create_topics: Option<TopicSettings>,
}

impl<DB: Backend> OutboxRuntime<DB> {
    /// Relays and consumers for every service in `catalog`, one relay each.
    pub fn new(catalog: Catalog, pool: Pool<DB>, kafka: KafkaConfig) -> Self {
        OutboxRuntime {
            catalog,
            pool,
            kafka,
            config: Arc::new(OutboxConfig::default()),
            outbox_taken: std::sync::atomic::AtomicBool::new(false),
            services: None,
            relays_per_service: 1,
            run_relays: true,
            run_consumers: true,
            migrate: true,
            broker_wait: std::time::Duration::from_secs(10),
            on_unreachable: OnUnreachableBroker::Fail,
            create_topics: Some(TopicSettings::default()),
        }
    }

    /// Settings, given once for the relays, consumers and housekeeping this runtime
    /// runs and for the outboxes taken from it with [`outbox`](Self::outbox)
    /// (`default_max_retries`, `max_payload_bytes`). Give it before taking outboxes.
    pub fn config(mut self, config: OutboxConfig) -> Self {
        self.config = Arc::new(config);
        self
    }

    /// The outbox of service `S`, publishing with this runtime's pool, catalog and
    /// [`config`](Self::config): the publish settings (`default_max_retries`,
    /// `max_payload_bytes`) are the ones its relays and consumers run with. Take it
    /// before [`start`](Self::start); it stays usable after.
    pub fn outbox<S: Service>(&self) -> Result<Outbox<S, DB>> {
        self.outbox_taken
            .store(true, std::sync::atomic::Ordering::Relaxed);
        Outbox::with_shared_config(self.pool.clone(), &self.catalog, self.config.clone())
    }

    /// Runs only these services.
    pub fn services<I: IntoIterator<Item = S>, S: Into<String>>(mut self, services: I) -> Self {
        self.services = Some(services.into_iter().map(Into::into).collect());
        self
    }

    /// Relay instances per service in this process (default 1). More than one needs a
    /// backend with row locks (not SQLite).
    ///
    /// A second relay is for availability first. It adds throughput only when keys far
    /// outnumber the events one relay keeps in flight (two batches of
    /// [`OutboxConfig::relay_batch_size`]) and the database has CPU to spare: a key
    /// has at most one event in flight, so with few keys the relays only compete for
    /// the same heads (BENCHMARKS.md, table d).
    pub fn relays_per_service(mut self, n: usize) -> Self {
        self.relays_per_service = n;
        self
    }

    /// Whether to run relays (default true).
    pub fn relays(mut self, on: bool) -> Self {
        self.run_relays = on;
        self
    }

    /// Whether to run consumers (default true).
    pub fn consumers(mut self, on: bool) -> Self {
        self.run_consumers = on;
        self
    }

    /// Whether `start` creates missing outbox tables first (default true). With
    /// `false`, `start` checks that they exist and fails with [`Error::MissingTable`]
    /// if one does not.
    pub fn migrate(mut self, on: bool) -> Self {
        self.migrate = on;
        self
    }

    /// How long `start` waits for a broker to answer a metadata request (default
    /// 10 s) before it fails or warns, as [`on_unreachable_broker`](Self::on_unreachable_broker)
    /// says. Only when relays or consumers run.
    pub fn broker_wait(mut self, wait: std::time::Duration) -> Self {
        self.broker_wait = wait;
        self
    }

    /// What `start` does when no broker answers within
    /// [`broker_wait`](Self::broker_wait): fail naming the address (default), or warn
    /// and run anyway.
    pub fn on_unreachable_broker(mut self, then: OnUnreachableBroker) -> Self {
        self.on_unreachable = then;
        self
    }

    /// Whether and how `start` creates the missing topics of the services it runs
    /// (default: created with the broker's default partitions and replication).
    /// `None` leaves topics to the broker's auto-creation on the first produce (the
    /// consumer then logs `UnknownTopicOrPartition` until it exists). A broker without
    /// the admin API, or a refusal, is a warning, never fatal; one that does not answer
    /// the request (librdkafka's mock cluster) delays `start` by up to 5 s first.
    pub fn create_topics(mut self, topics: Option<TopicSettings>) -> Self {
        self.create_topics = topics;
        self
    }

    /// Validates the selection, creates missing tables, and spawns the relays and
    /// consumers.
    pub async fn start(self) -> Result<RuntimeHandle> {
        let services: Vec<String> = match &self.services {
            Some(s) => s.clone(),
            None => self
                .catalog
                .routes()
                .map(|r| r.service().to_string())
                .collect(),
        };
        for s in &services {
            if self.catalog.route(s).is_none() {
                return Err(Error::UnknownService(s.clone()));
            }
        }
        if self.relays_per_service > 1 && !DB::CONCURRENT_RELAYS {
            return Err(Error::Unsupported {
                backend: DB::BACKEND_NAME,
                what: format!(
                    "{} relays per service in one process (no row locks: claims serialise, so more relays add nothing)",
                    self.relays_per_service
                ),
            });
        }
        if self.migrate {
            migrate(
                &self.pool,
                &self.catalog,
                services.iter().map(String::as_str),
            )
            .await?;
        } else {
            check_tables(&self.pool, &self.catalog, &services).await?;
        }
        // The subscriptions whose subscriber runs here: their inboxes are in this
        // database, their topics are the publishers'.
        let subscriptions: Vec<crate::catalog::SubscriptionInfo> = if self.run_consumers {
            services
                .iter()
                .flat_map(|s| self.catalog.subscriptions_of(s))
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        self.warn_unhandled(&services);
        self.warn_publish_settings();
        if (self.run_relays || self.run_consumers) && !services.is_empty() {
            let mut topics: Vec<String> = services
                .iter()
                .filter_map(|s| self.catalog.route(s))
                .map(|r| r.topic().to_string())
                .chain(subscriptions.iter().map(|s| s.topic.clone()))
                .collect();
            topics.sort();
            topics.dedup();
            crate::kafka::check_broker(
                &self.kafka,
                BrokerCheck {
                    wait: self.broker_wait,
                    on_unreachable: self.on_unreachable,
                    create: self.create_topics,
                    topics: &topics,
                },
            )
            .await?;
        }

        let config = self.config.clone();
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks: Vec<(String, JoinHandle<Result<()>>)> = Vec::new();
        let mut relay_stats = BTreeMap::new();
        let mut consumer_stats = BTreeMap::new();
        let mut beats = Vec::new();
        let producer = if self.run_relays && !services.is_empty() {
            Some(Producers::new(&self.kafka)?)
        } else {
            None
        };
        for s in &services {
            let route = self
                .catalog
                .route(s)
                .cloned()
                .ok_or_else(|| Error::UnknownService(s.clone()))?;
            if self.run_consumers {
                let consumer = Consumer::new(self.pool.clone(), &self.catalog, s, config.clone())?;
                consumer_stats.insert(s.clone(), consumer.stats());
                beats.push((s.clone(), Role::Consumer, consumer.beat()));
                let kafka = self.kafka.clone();
                let rx = stop_rx.clone();
                tasks.push((
                    format!("consumer {s}"),
                    tokio::spawn(async move { consumer.run(&kafka, rx).await }),
                ));
            }
            if let Some(producer) = &producer {
                let mut stats = Vec::new();
                for _ in 0..self.relays_per_service {
                    let relay = Relay::with_producers(
                        self.pool.clone(),
                        route.clone(),
                        producer.clone(),
                        config.clone(),
                    );
                    stats.push(relay.stats());
                    beats.push((s.clone(), Role::Relay, relay.beat()));
                    let rx = stop_rx.clone();
                    tasks.push((format!("relay {s}"), tokio::spawn(relay.run(rx))));
                }
                relay_stats.insert(s.clone(), stats);
                if let Some(every) = config.metrics_interval {
                    let rx = stop_rx.clone();
                    let pool = self.pool.clone();
                    let route = route.clone();
                    tasks.push((
                        format!("backlog sampler {s}"),
                        tokio::spawn(async move {
                            sample_backlog::<DB>(pool, route, every, rx).await;
                            Ok(())
                        }),
                    ));
                }
                if config.retention.is_some() || config.redeliver_after.is_some() {
                    let rx = stop_rx.clone();
                    let pool = self.pool.clone();
                    let route = route.clone();
                    let config = config.clone();
                    tasks.push((
                        format!("housekeeping {s}"),
                        tokio::spawn(
                            async move { housekeeping::<DB>(pool, route, config, rx).await },
                        ),
                    ));
                }
            }
        }
        let mut subscriber_stats = BTreeMap::new();
        for sub in &subscriptions {
            let subscriber = crate::subscriber::Subscriber::new(
                self.pool.clone(),
                &self.catalog,
                &sub.subscriber,
                &sub.publisher,
                config.clone(),
            )?;
            let name = format!("{}<-{}", sub.subscriber, sub.publisher);
            subscriber_stats.insert(
                (sub.subscriber.clone(), sub.publisher.clone()),
                (subscriber.intake_stats(), subscriber.stats()),
            );
            beats.push((name.clone(), Role::Consumer, subscriber.beat()));
            let kafka = self.kafka.clone();
            let rx = stop_rx.clone();
            tasks.push((
                format!("subscriber {name}"),
                tokio::spawn(async move { subscriber.run(&kafka, rx).await }),
            ));
            if let Some(retention) = config.retention {
                let rx = stop_rx.clone();
                let pool = self.pool.clone();
                let route = sub.route().clone();
                tasks.push((
                    format!("inbox retention {name}"),
                    tokio::spawn(async move {
                        crate::subscriber::retention::<DB>(pool, route, retention, rx).await;
                        Ok(())
                    }),
                ));
            }
        }
        if producer.is_some() && DB::HAS_NOTIFY {
            // One LISTEN connection for the whole runtime, outside the pool: it wakes
            // this process's relays when another process commits events.
            let pool = self.pool.clone();
            let rx = stop_rx.clone();
            tasks.push((
                "wake-up listener".to_owned(),
                tokio::spawn(async move {
                    crate::wakeup::listen_for_wakeups(&pool, rx).await;
                    Ok(())
                }),
            ));
        }
        // Relays first, then consumers, each by service.
        beats.sort_by(|a, b| (a.1 == Role::Consumer, &a.0).cmp(&(b.1 == Role::Consumer, &b.0)));
        Ok(RuntimeHandle {
            stop,
            tasks,
            relay_stats,
            consumer_stats,
            subscriber_stats,
            beats,
        })
    }
}

impl<DB: Backend> OutboxRuntime<DB> {
    /// One warning listing the handlers in this binary whose service's consumer does
    /// not run in this process: their events are handled only where it runs (another
    /// process), or never.
    fn warn_unhandled(&self, services: &[String]) {
        let unhandled: Vec<String> = self
            .catalog
            .routes()
            .map(|r| r.service().as_str())
            .filter(|s| !self.run_consumers || !services.iter().any(|r| r == s))
            .flat_map(|s| self.catalog.handlers_of(s))
            .map(|h| format!("{} (service {})", h.name, h.service))
            .collect();
        if !unhandled.is_empty() {
            tracing::warn!(
                handlers = %unhandled.join(", "),
                "handlers whose service's consumer does not run in this process; their events \
                 are handled only where that consumer runs (OutboxRuntime::services / consumers)"
            );
        }
    }
}

impl<DB: Backend> OutboxRuntime<DB> {
    /// A warning when publish settings were given to this runtime but no outbox was
    /// taken from it: outboxes built with `Outbox::new` would publish with the defaults.
    fn warn_publish_settings(&self) {
        if self.outbox_taken.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let default = OutboxConfig::default();
        let mut given = Vec::new();
        if self.config.default_max_retries != default.default_max_retries {
            given.push(format!(
                "default_max_retries = {}",
                self.config.default_max_retries
            ));
        }
        if self.config.max_payload_bytes != default.max_payload_bytes {
            given.push(format!(
                "max_payload_bytes = {}",
                self.config.max_payload_bytes
            ));
        }
        if !given.is_empty() {
            tracing::warn!(
                settings = %given.join(", "),
                "publish settings given to the runtime, but no outbox was taken from it: \
                 take outboxes with OutboxRuntime::outbox so they publish with them \
                 (Outbox::new publishes with the defaults)"
            );
        }
    }
}

/// Checks that the outbox tables of `services` exist (`start` with `migrate(false)`).
async fn check_tables<DB: Backend>(
    pool: &Pool<DB>,
    catalog: &Catalog,
    services: &[String],
) -> Result<()> {
    let mut routes = Vec::new();
    for s in services {
        let route = catalog
            .route(s)
            .ok_or_else(|| Error::UnknownService(s.clone()))?;
        routes.push((s, route));
        routes.extend(catalog.subscriptions_of(s).map(|sub| (s, sub.route())));
    }
    for (s, route) in routes {
        // An indexed lookup of an id that never exists: cheap, and fails only if the
        // table (or the database) is not there.
        if let Err(e) = DB::fetch(pool, route.table(), uuid::Uuid::nil()).await {
            if crate::error::is_missing_table(&e) {
                return Err(Error::MissingTable {
                    table: route.table().to_string(),
                    service: s.clone(),
                    source: e,
                });
            }
            return Err(Error::db(
                format!("checking outbox table {}", route.table()),
                e,
            ));
        }
    }
    Ok(())
}

/// One service's housekeeping until `shutdown`: redelivers rows published long ago and
/// never consumed ([`OutboxConfig::redeliver_after`]), and deletes settled rows
/// ([`OutboxConfig::retention`]), each in bounded batches.
///
/// # Cancel safety
///
/// Each batch is one statement: stopping between or during batches leaves the table
/// consistent.
async fn housekeeping<DB: Backend>(
    pool: Pool<DB>,
    route: crate::catalog::Route,
    config: Arc<OutboxConfig>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    const BATCH: u32 = 1000;
    let interval = config
        .retention
        .map(|r| r.interval)
        .unwrap_or(std::time::Duration::from_secs(60));
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        if let Some(after) = config.redeliver_after {
            match DB::redeliver_stale(&pool, route.table(), route.service(), after, None, BATCH)
                .await
            {
                Ok(0) => {}
                Ok(n) => {
                    tracing::warn!(service = %route.service(), rows = n, "published events never consumed; publishing them again");
                    crate::wakeup::wake_local(route.table(), route.service());
                }
                Err(e) => {
                    tracing::warn!(service = %route.service(), error = %e, "redelivery sweep failed; trying again later")
                }
            }
        }
        if let Some(retention) = config.retention {
            loop {
                match DB::purge(
                    &pool,
                    route.table(),
                    route.service(),
                    retention.consumed_after,
                    retention.dead_after,
                    retention.batch,
                )
                .await
                {
                    Ok(n) if n >= u64::from(retention.batch) && !*shutdown.borrow() => continue,
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(service = %route.service(), error = %e, "retention sweep failed; trying again later");
                        break;
                    }
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.changed() => {}
        }
    }
}

/// Samples one service's backlog into the metrics' gauges every `every` until
/// `shutdown`. A failed sample is logged at debug and tried again next time.
async fn sample_backlog<DB: Backend>(
    pool: Pool<DB>,
    route: crate::catalog::Route,
    every: std::time::Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let gauges = crate::metrics::BacklogGauges::new(route.service());
    loop {
        if *shutdown.borrow() {
            return;
        }
        match DB::backlog(&pool, route.table(), route.service()).await {
            Ok(backlog) => gauges.set(&backlog),
            Err(e) => {
                tracing::debug!(service = %route.service(), error = %e, "sampling the backlog failed")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => {}
        }
    }
}

/// Creates the outbox tables of `services` if missing (each distinct table once).
pub async fn migrate<'a, DB: Backend>(
    pool: &Pool<DB>,
    catalog: &Catalog,
    services: impl IntoIterator<Item = &'a str>,
) -> Result<()> {
    let mut tables = std::collections::BTreeSet::new();
    let mut inboxes = std::collections::BTreeSet::new();
    for s in services {
        let route = catalog
            .route(s)
            .ok_or_else(|| Error::UnknownService(s.to_owned()))?;
        tables.insert(route.table().clone());
        // A subscriber's inbox: the outbox table's shape, and its memory of purged events.
        for sub in catalog.subscriptions_of(s) {
            inboxes.insert(sub.route().table().clone());
        }
    }
    for t in &inboxes {
        let started = std::time::Instant::now();
        DB::migrate_inbox(pool, t)
            .await
            .map_err(|e| Error::db(format!("migrating inbox table {t}"), e))?;
        tracing::info!(table = %t, took = ?started.elapsed(), "inbox table migrated (created, upgraded or already current)");
    }
    for t in tables {
        let started = std::time::Instant::now();
        DB::migrate(pool, &t)
            .await
            .map_err(|e| Error::db(format!("migrating outbox table {t}"), e))?;
        // Said every time, so a start that migrates is never silent about it; a table
        // already current costs a catalog read and the idempotent DDL, under a lock.
        tracing::info!(table = %t, took = ?started.elapsed(), "outbox table migrated (created, upgraded or already current); OutboxRuntime::migrate(false) only checks it");
    }
    Ok(())
}

/// Running relays and consumers.
pub struct RuntimeHandle {
    stop: watch::Sender<bool>,
    tasks: Vec<(String, JoinHandle<Result<()>>)>,
    relay_stats: BTreeMap<String, Vec<Arc<RelayStats>>>,
    consumer_stats: BTreeMap<String, Arc<ConsumerStats>>,
    subscriber_stats: BTreeMap<(String, String), SubscriberStats>,
    beats: Vec<(String, Role, Arc<Beat>)>,
}

/// A subscription's counters: its intake's, and its settlement's.
type SubscriberStats = (Arc<crate::subscriber::IntakeStats>, Arc<ConsumerStats>);

impl RuntimeHandle {
    /// The counters of a service's relays.
    pub fn relay_stats(&self, service: &str) -> &[Arc<RelayStats>] {
        self.relay_stats
            .get(service)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// The counters of a service's consumer.
    pub fn consumer_stats(&self, service: &str) -> Option<&Arc<ConsumerStats>> {
        self.consumer_stats.get(service)
    }

    /// The counters of the subscription of `subscriber` to `publisher`, if it runs
    /// here: its intake's (records read, inboxed, repeated, ignored, unusable) and its
    /// settlement's (handled, retried, dead, ... from the inbox).
    pub fn subscriber_stats(
        &self,
        subscriber: &str,
        publisher: &str,
    ) -> Option<(&Arc<crate::subscriber::IntakeStats>, &Arc<ConsumerStats>)> {
        self.subscriber_stats
            .get(&(subscriber.to_owned(), publisher.to_owned()))
            .map(|(intake, settled)| (intake, settled))
    }

    /// What every relay and consumer of this runtime last did: whether it runs, how
    /// long ago it finished a step, how long ago the database and the broker answered
    /// it, and its current problem if its last contact with one of them failed.
    /// [`Health::is_ready`] is the answer for a readiness probe. Cheap: a few atomic
    /// loads per component, no I/O.
    ///
    /// ```ignore
    /// // e.g. in an HTTP handler
    /// let health = handle.health();
    /// if health.is_ready() { (200, "ready") } else { (503, format!("{:?}", health.not_ready().collect::<Vec<_>>())) }
    /// ```
    pub fn health(&self) -> Health {
        Health {
            components: self
                .beats
                .iter()
                .map(|(service, role, beat)| beat.snapshot(service, *role))
                .collect(),
        }
    }

    /// Runs until `signal` completes, then shuts down like [`shutdown`](Self::shutdown):
    /// the application's own stop signal, e.g. `tokio::signal::ctrl_c()` (mapped to
    /// `()`), a `CancellationToken::cancelled()`, or a oneshot receiver.
    ///
    /// ```ignore
    /// let token = tokio_util::sync::CancellationToken::new();
    /// let outbox = runtime.start().await?.run_until(token.clone().cancelled_owned());
    /// tokio::try_join!(serve_http(token.clone()), outbox)?;
    /// ```
    ///
    /// # Cancel safety
    ///
    /// Dropping the future before `signal` completes drops the handle, which leaves the
    /// relays and consumers running detached (as dropping a [`RuntimeHandle`] does);
    /// after it, the shutdown may be partial (what stopped stays stopped).
    pub async fn run_until(self, signal: impl std::future::Future<Output = ()>) -> Result<()> {
        signal.await;
        tracing::info!("outbox runtime: stop signal received, shutting down");
        self.shutdown().await
    }

    /// Asks every relay and consumer to stop after its current round or record, and
    /// waits for them. Returns the first error any of them ended with.
    pub async fn shutdown(self) -> Result<()> {
        let _ = self.stop.send(true);
        let mut first = None;
        for (name, task) in self.tasks {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::error!(task = %name, error = %e, "outbox task failed");
                    first.get_or_insert(e);
                }
                Err(join) => {
                    first.get_or_insert(Error::Join {
                        task: name,
                        source: join,
                    });
                }
            }
        }
        first.map_or(Ok(()), Err)
    }
}
