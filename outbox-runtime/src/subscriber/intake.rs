//! Intake: the publisher's topic into the subscriber's inbox. Records are taken as
//! they come (what is already received, up to [`BATCH`]), written in one transaction
//! (a repeated event id skipped by the unique index), and their offsets stored only
//! after that commit.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use futures::FutureExt;
use rdkafka::consumer::{CommitMode, Consumer as _, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Message, OwnedMessage};
use uuid::Uuid;

use super::lanes::Lanes;
use super::Shared;
use crate::backend::{Backend, DeadReason, NewInboxRow, NewRow, MAX_KEY_LEN};
use crate::consumer::Consumer;
use crate::envelope::Envelope;
use crate::error::{Error, Result};
use crate::kafka::{ClientLog, KafkaConfig};
use crate::runtime::ShutdownSignal;

/// Most records written in one intake transaction.
const BATCH: usize = 256;

/// What intake does with one record.
enum Take {
    /// Into the inbox (pending, or dead with a reason).
    Row(OwnedRow),
    /// An event type this subscriber does not subscribe to.
    Ignore,
}

/// An inbox row as intake builds it from a record.
struct OwnedRow {
    event_id: Uuid,
    event_type: String,
    version: i32,
    key: Option<String>,
    payload: String,
    max_retries: i32,
    trace_context: Option<String>,
    dead: Option<(String, DeadReason)>,
}

/// Runs intake until shutdown; a Kafka client that can no longer work is replaced.
pub(super) async fn run<DB: Backend>(
    shared: Arc<Shared<DB>>,
    consumer: Arc<Consumer<DB>>,
    lanes: Lanes,
    kafka: &KafkaConfig,
    mut shutdown: ShutdownSignal,
) -> Result<()> {
    let mut replaced = 0u32;
    loop {
        match session(&shared, &consumer, &lanes, kafka, &mut shutdown).await? {
            None => return Ok(()),
            Some(why) => {
                shared.beat.failing(crate::health::Side::Broker, &why);
                replaced += 1;
                tracing::warn!(subscriber = %shared.sub.subscriber, publisher = %shared.sub.publisher,
                    reason = %why, "the subscription's Kafka consumer can no longer work; replacing it");
                let delay = shared.config.consumer_failure_backoff.delay(replaced);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.changed() => {}
                }
                if *shutdown.borrow() {
                    return Ok(());
                }
            }
        }
    }
}

/// One client's life. `Ok(None)` on shutdown, `Ok(Some(why))` when the client can no
/// longer work.
async fn session<DB: Backend>(
    shared: &Shared<DB>,
    settlement: &Consumer<DB>,
    lanes: &Lanes,
    kafka: &KafkaConfig,
    shutdown: &mut ShutdownSignal,
) -> Result<Option<String>> {
    let sub = &shared.sub;
    let route = sub.route();
    let label = format!("{}<-{}", sub.subscriber, sub.publisher);
    let client = kafka.consumer_config(route.group().as_str(), shared.config.max_payload_bytes);
    let consumer: StreamConsumer<ClientLog> = client
        .create_with_context(ClientLog::consumer_labelled(&label))
        .map_err(|e| Error::kafka(format!("creating the consumer of subscription {label}"), e))?;
    consumer
        .subscribe(&[route.topic().as_str()])
        .map_err(|e| Error::kafka(format!("subscribing to {}", route.topic()), e))?;
    shared.beat.recovered(crate::health::Side::Broker);
    let mut batch: Vec<OwnedMessage> = Vec::with_capacity(BATCH);
    let mut end = None;
    loop {
        let first = tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            msg = consumer.recv() => msg,
        };
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Ok(m) => {
                    shared.beat.broker_ok();
                    batch.push(m.detach());
                }
                Err(KafkaError::MessageConsumptionFatal(code)) => {
                    end = Some(format!("fatal consumer error {code:?}"));
                }
                Err(e) => {
                    if let Some((code, reason)) = consumer.client().fatal_error() {
                        end = Some(format!("fatal error {code:?}: {reason}"));
                    } else {
                        let kind = format!("recv:{:?}", e.rdkafka_error_code());
                        if let Some(suppressed) = consumer.context().allow(&kind) {
                            tracing::warn!(subscription = %label, error = %e, suppressed,
                                "consumer error event; the client recovers by itself");
                        }
                    }
                }
            }
            // Take what is already received; never wait to fill a batch.
            if end.is_none() && batch.len() < BATCH {
                next = consumer.recv().now_or_never();
            }
        }
        if !batch.is_empty() {
            let Some(fresh) = write(shared, settlement, &batch, shutdown).await else {
                break; // shutting down: the records' offsets stay unstored
            };
            for m in &batch {
                if let Err(e) = consumer.store_offset(m.topic(), m.partition(), m.offset()) {
                    // Stale after a rebalance; the new owner re-reads the records and
                    // finds them in the inbox.
                    tracing::debug!(error = %e, "storing the offset failed");
                }
            }
            batch.clear();
            // The new rows go to the lanes at once; the worker is woken only for what
            // they could not take (it polls for retries and deferrals anyway).
            let mut all_taken = true;
            if let Some(fresh) = fresh {
                for msg in fresh {
                    all_taken &= lanes.offer(msg);
                }
            } else {
                all_taken = false;
            }
            if !all_taken {
                crate::wakeup::wake_local(route.table(), route.service());
            }
        }
        if end.is_some() {
            break;
        }
    }
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) | Err(KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)) => {}
        Err(e) => tracing::warn!(subscription = %label, error = %e, "final offset commit failed"),
    }
    Ok(end)
}

/// The pending rows intake has just written, as records for the lanes; `None` when
/// some of the batch was not new (the worker sorts those out).
type Fresh = Option<Vec<OwnedMessage>>;

/// A database error while writing into the inbox.
fn inbox_error(e: sqlx::Error) -> Error {
    Error::db("writing records into the inbox", e)
}

/// How one attempt at writing a batch ended.
enum Written {
    /// Committed: rows new, whether all were, whether their handlers ran in the same
    /// transaction.
    Committed {
        inserted: u64,
        all_new: bool,
        handled: bool,
    },
    /// The handlers could not all run in the intake's transaction (a failure, a row
    /// held elsewhere): rolled back; write the rows alone.
    Alone,
}

/// Writes the batch's rows in one transaction, retrying database failures in place
/// until it commits. When every row is new, their handlers run in that same
/// transaction first (inbox rows, effects and consumed marks commit together: one
/// commit for the batch); if any of them leaves the happy path, the batch is written
/// alone and the new rows go to the lanes. `None` if shutdown came first.
async fn write<DB: Backend>(
    shared: &Shared<DB>,
    consumer: &Consumer<DB>,
    batch: &[OwnedMessage],
    shutdown: &mut ShutdownSignal,
) -> Option<Fresh> {
    let stats = &shared.intake;
    stats
        .received
        .fetch_add(batch.len() as u64, Ordering::Relaxed);
    let mut rows = Vec::with_capacity(batch.len());
    for m in batch {
        match take(shared, m) {
            Take::Row(row) => rows.push(row),
            Take::Ignore => {
                stats.ignored.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    if rows.is_empty() {
        return Some(Some(Vec::new()));
    }
    let route = shared.sub.route();
    let topic = route.topic().as_str();
    let service = route.service().as_str();
    // The records the settlement sees: built from the rows as written.
    let msgs: Vec<OwnedMessage> = rows
        .iter()
        .filter(|r| r.dead.is_none())
        .map(|r| {
            let envelope = Envelope {
                event_id: crate::event::EventId(r.event_id),
                service: String::new(),
                event_type: r.event_type.clone(),
                version: u32::try_from(r.version).unwrap_or(0),
                key: r.key.clone(),
                time: chrono::Utc::now(),
                payload: Vec::new(),
                traceparent: None,
                tracestate: None,
            };
            super::worker::record_of(
                topic,
                service,
                envelope,
                r.trace_context.as_deref(),
                r.payload.as_bytes(),
                0,
            )
        })
        .collect();
    // Keys as the watermarks hold them: "" for events without a key.
    let mut keys: Vec<String> = rows
        .iter()
        .map(|r| r.key.clone().unwrap_or_default())
        .collect();
    keys.sort();
    keys.dedup();
    // A sweep deletes rows only once their watermark has stood for the settle time:
    // a batch that took half of it from reading the watermarks to writing is given up
    // and written again (with fresh watermarks), so it cannot bring back a row a
    // sweep forgot meanwhile.
    let budget = crate::subscriber::settle_time(&shared.config.retention.unwrap_or_default()) / 2;
    let mut failures = 0u32;
    let mut together = !msgs.is_empty();
    loop {
        let attempt = async {
            let started = std::time::Instant::now();
            let mut tx = DB::begin(&shared.pool).await.map_err(inbox_error)?;
            let marks: std::collections::HashMap<String, Uuid> =
                DB::watermarks(&mut tx, route.table(), route.service(), &keys, None)
                    .await
                    .map_err(inbox_error)?
                    .into_iter()
                    .collect();
            // At or below its key's watermark and so not in the inbox: settled, and
            // deleted by retention since. A late repeat.
            let fresh: Vec<NewInboxRow<'_>> = rows
                .iter()
                .filter(|r| {
                    marks
                        .get(r.key.as_deref().unwrap_or_default())
                        .is_none_or(|mark| r.event_id > *mark)
                })
                .map(|r| NewInboxRow {
                    row: NewRow {
                        event_id: r.event_id,
                        service: route.service(),
                        event_type: &r.event_type,
                        version: r.version,
                        key: r.key.as_deref(),
                        payload: &r.payload,
                        max_retries: r.max_retries,
                        trace_context: r.trace_context.as_deref(),
                    },
                    dead: r.dead.as_ref().map(|(why, class)| (why.as_str(), *class)),
                })
                .collect();
            let inserted = if fresh.is_empty() {
                0
            } else {
                DB::insert_inbox(&mut tx, route.table(), &fresh)
                    .await
                    .map_err(inbox_error)?
            };
            let all_new = inserted == rows.len() as u64;
            if started.elapsed() > budget {
                let _ = tx.rollback().await;
                return Err(inbox_error(sqlx::Error::Protocol(format!(
                    "the batch took {:?} from reading the watermarks to writing, over {budget:?}",
                    started.elapsed()
                ))));
            }
            failpoint!("subscriber.before_intake_commit");
            if together && all_new {
                return match consumer.settle_in_intake(tx, &msgs).await? {
                    Some(_) => Ok(Written::Committed {
                        inserted,
                        all_new,
                        handled: true,
                    }),
                    None => Ok(Written::Alone),
                };
            }
            tx.commit().await.map_err(inbox_error)?;
            Ok(Written::Committed {
                inserted,
                all_new,
                handled: false,
            })
        };
        match attempt.await {
            Ok(Written::Alone) => together = false,
            Ok(Written::Committed {
                inserted,
                all_new,
                handled,
            }) => {
                failpoint!("subscriber.after_intake_commit");
                shared.beat.database_ok();
                shared.beat.progress();
                stats.inboxed.fetch_add(inserted, Ordering::Relaxed);
                stats.duplicates.fetch_add(
                    rows.len() as u64 - inserted.min(rows.len() as u64),
                    Ordering::Relaxed,
                );
                let unusable = rows.iter().filter(|r| r.dead.is_some()).count() as u64;
                if unusable > 0 {
                    stats.unusable.fetch_add(unusable, Ordering::Relaxed);
                    for r in rows.iter().filter(|r| r.dead.is_some()) {
                        if let Some((why, _)) = &r.dead {
                            tracing::error!(subscriber = %shared.sub.subscriber, publisher = %shared.sub.publisher,
                                event_id = %r.event_id, reason = %why, "unusable record written dead into the inbox");
                        }
                    }
                }
                return Some(match (handled, all_new) {
                    (true, _) => Some(Vec::new()),
                    (false, true) => Some(msgs),
                    (false, false) => None,
                });
            }
            Err(e) => {
                shared.beat.failing(crate::health::Side::Database, &e);
                failures += 1;
                // Written alone next: a failure in a handler's statements must not
                // hold the intake up.
                together = false;
                stats.db_retries.fetch_add(1, Ordering::Relaxed);
                let delay = shared.config.consumer_failure_backoff.delay(failures);
                tracing::warn!(subscriber = %shared.sub.subscriber, publisher = %shared.sub.publisher,
                    table = %route.table(), error = %e, ?delay,
                    "writing records into the inbox failed; retrying the same records");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.changed() => {}
                }
                if *shutdown.borrow() {
                    return None;
                }
            }
        }
    }
}

/// What intake does with one record: the events of subscribed types (and of types
/// this binary does not know: the worker makes them wait for a release that does, as
/// the outbox's consumer does) become pending rows; the publisher's other events are
/// left; an unusable record becomes a dead row with the reason.
fn take<DB: Backend>(shared: &Shared<DB>, msg: &OwnedMessage) -> Take {
    let sub = &shared.sub;
    let config = &shared.config;
    let at = || format!("{}[{}]@{}", msg.topic(), msg.partition(), msg.offset());
    let size = msg.payload().map_or(0, <[u8]>::len);
    let payload_text = || match msg.payload().map(std::str::from_utf8) {
        Some(Ok(text)) if !text.contains('\0') => Some(text.to_owned()),
        _ => None,
    };
    let envelope = (size <= config.max_payload_bytes).then(|| Envelope::decode(msg));
    let event_id = match &envelope {
        Some(Ok(e)) => e.event_id.0,
        _ => Envelope::event_id_of(msg)
            .map(|id| id.0)
            .unwrap_or_else(|| derived_id(msg)),
    };
    let dead = |why: String, class: DeadReason, event_type: String, payload: String| {
        Take::Row(OwnedRow {
            event_id,
            event_type,
            version: 0,
            key: None,
            payload,
            max_retries: 0,
            trace_context: None,
            dead: Some((why, class)),
        })
    };
    let envelope = match envelope {
        None => {
            return dead(
                format!(
                    "record at {} has a {size}-byte payload, over the {}-byte limit \
                     (OutboxConfig::max_payload_bytes); not stored",
                    at(),
                    config.max_payload_bytes
                ),
                DeadReason::TooLarge,
                String::new(),
                String::new(),
            )
        }
        Some(Err(e)) => {
            return dead(
                format!("record at {} is not an outbox envelope: {e}", at()),
                DeadReason::Undecodable,
                String::new(),
                payload_text().unwrap_or_default(),
            )
        }
        Some(Ok(envelope)) => envelope,
    };
    if envelope.service != sub.publisher {
        return dead(
            format!(
                "record at {} says it comes from service {:?}, but topic {} is service `{}`'s",
                at(),
                truncated(&envelope.service),
                sub.topic,
                sub.publisher
            ),
            DeadReason::Undecodable,
            valid_type(&envelope.event_type),
            payload_text().unwrap_or_default(),
        );
    }
    let subscribed = sub
        .handlers
        .iter()
        .any(|h| h.event_type == envelope.event_type);
    if !subscribed {
        match shared.catalog.event(&envelope.event_type) {
            // The publisher's own traffic (private events, public ones this subscriber
            // does not take): the topic carries them all.
            Some(info) if info.service == sub.publisher => return Take::Ignore,
            Some(info) => {
                return dead(
                    format!(
                        "record at {} is of event type `{}`, which belongs to service `{}`, \
                         not to `{}`",
                        at(),
                        envelope.event_type,
                        info.service,
                        sub.publisher
                    ),
                    DeadReason::UnknownType,
                    envelope.event_type.clone(),
                    payload_text().unwrap_or_default(),
                )
            }
            // Unknown here: perhaps a type a newer release of this subscriber takes.
            // It waits in the inbox for one (dead after the waiting grace).
            None => {}
        }
    }
    if crate::names::check_name(crate::names::NameKind::EventType, &envelope.event_type).is_err() {
        return dead(
            format!("record at {} has an invalid event type name", at()),
            DeadReason::Undecodable,
            String::new(),
            payload_text().unwrap_or_default(),
        );
    }
    let Some(payload) = payload_text() else {
        return dead(
            format!("record at {} has a payload that is not UTF-8 text", at()),
            DeadReason::Undecodable,
            envelope.event_type.clone(),
            String::new(),
        );
    };
    let key = envelope
        .key
        .as_deref()
        .map(str::trim)
        .filter(|k| !k.is_empty());
    if key.is_some_and(|k| k.len() > MAX_KEY_LEN) {
        return dead(
            format!(
                "record at {} has a key over {MAX_KEY_LEN} bytes; its order cannot be kept",
                at()
            ),
            DeadReason::Undecodable,
            envelope.event_type.clone(),
            payload,
        );
    }
    let max_retries = shared
        .catalog
        .event(&envelope.event_type)
        .and_then(|e| e.max_retries)
        .unwrap_or(config.default_max_retries);
    let trace_context = envelope
        .traceparent
        .as_ref()
        .map(|p| match &envelope.tracestate {
            Some(state) => format!("{p};{state}"),
            None => p.clone(),
        });
    Take::Row(OwnedRow {
        event_id,
        event_type: envelope.event_type.clone(),
        version: i32::try_from(envelope.version).unwrap_or(i32::MAX),
        key: key.map(str::to_owned),
        payload,
        max_retries: i32::try_from(max_retries).unwrap_or(i32::MAX),
        trace_context,
        dead: None,
    })
}

/// The id of a record without a readable event id: derived from where it is in the
/// log (UUID v5 of topic, partition and offset), so reading it again finds its row.
fn derived_id(msg: &OwnedMessage) -> Uuid {
    let name = format!("{}/{}/{}", msg.topic(), msg.partition(), msg.offset());
    Uuid::new_v5(&Uuid::NAMESPACE_URL, name.as_bytes())
}

/// A header value as shown in a reason: at most 64 characters (shown escaped).
fn truncated(s: &str) -> String {
    s.chars().take(64).collect()
}

/// An event type name for a dead row's column: the record's if it is a valid name,
/// else empty (the reason says what the record held).
fn valid_type(name: &str) -> String {
    match crate::names::check_name(crate::names::NameKind::EventType, name) {
        Ok(()) => name.to_owned(),
        Err(_) => String::new(),
    }
}
