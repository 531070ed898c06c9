//! Worker: the inbox into the subscriber's handlers. Claims due heads of key as a relay
//! does, then settles each claimed row through the consumer's settlement, handed over
//! as the record it would have been: the row is the truth there, and the record built
//! from it agrees with it by construction.

use std::sync::Arc;

use futures::StreamExt;
use rdkafka::message::OwnedMessage;
use rdkafka::Timestamp;

use super::Shared;
use crate::backend::{Backend, ClaimedRow};
use crate::consumer::Consumer;
use crate::envelope::Envelope;
use crate::error::{Error, Result};
use crate::runtime::ShutdownSignal;
use crate::wakeup::Wakeups;

/// Runs the worker until shutdown: claim, settle, and when nothing is due wait for
/// intake (or an operator's replay) to wake it, or the poll interval.
pub(super) async fn run<DB: Backend>(
    shared: Arc<Shared<DB>>,
    consumer: Arc<Consumer<DB>>,
    mut shutdown: ShutdownSignal,
) -> Result<()> {
    let route = shared.sub.route().clone();
    let config = &shared.config;
    let wakeups = Wakeups::new(route.table(), route.service(), config.relay_poll_interval);
    let lanes = config.consumer_lanes.max(1);
    let mut failures = 0u32;
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let armed = wakeups.arm();
        let token = crate::relay::lease_token();
        let claimed = DB::claim(
            &shared.pool,
            route.table(),
            route.service(),
            config.relay_batch_size,
            config.relay_lease,
            token,
        )
        .await;
        let rows = match claimed {
            Ok(rows) => {
                failures = 0;
                rows
            }
            Err(e) => {
                failures += 1;
                let e = Error::db(
                    format!(
                        "claiming due rows of {} from inbox {}",
                        route.service(),
                        route.table()
                    ),
                    e,
                );
                let delay = config.consumer_failure_backoff.delay(failures);
                tracing::warn!(subscriber = %shared.sub.subscriber, error = %e, ?delay,
                    "the inbox worker could not claim; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
        };
        if rows.is_empty() {
            tokio::select! {
                _ = armed.wait() => {}
                _ = shutdown.changed() => {}
            }
            continue;
        }
        drop(armed);
        // Heads of distinct keys (and keyless rows): independent of each other, so
        // settled side by side, each lane a batch per transaction.
        let topic = route.topic().as_str();
        let service = route.service().as_str();
        let batch = config.consumer_batch_size.max(1);
        let mut chunks: Vec<Vec<OwnedMessage>> = Vec::new();
        for row in &rows {
            match chunks.last_mut() {
                Some(chunk) if chunk.len() < batch => chunk.push(as_record(topic, service, row)),
                _ => chunks.push(vec![as_record(topic, service, row)]),
            }
        }
        let settled = futures::stream::iter(chunks)
            .map(|chunk| {
                let consumer = consumer.clone();
                let mut shutdown = shutdown.clone();
                async move { consumer.settle_inbox_rows(&chunk, &mut shutdown).await == chunk.len() }
            })
            .buffer_unordered(lanes)
            .collect::<Vec<_>>()
            .await;
        if settled.iter().any(|done| !done) {
            // Shutdown came mid-settlement: the rows not settled keep their lease,
            // and are claimed again when it expires.
            return Ok(());
        }
    }
}

/// The record a claimed inbox row would have been on the publisher's topic: its
/// headers are the envelope of the row, its offset the row id (for messages).
fn as_record(topic: &str, service: &str, row: &ClaimedRow) -> OwnedMessage {
    record_of(
        topic,
        service,
        Envelope::of_row(service, row),
        row.trace_context.as_deref(),
        row.payload.as_bytes(),
        row.id,
    )
}

/// The record of an inbox row: `envelope` with the row's trace context
/// (`traceparent[;tracestate]`) and payload, at offset `at` (a row id, or 0).
pub(super) fn record_of(
    topic: &str,
    service: &str,
    envelope: Envelope,
    trace_context: Option<&str>,
    payload: &[u8],
    at: i64,
) -> OwnedMessage {
    let (traceparent, tracestate) = match trace_context {
        Some(text) => match text.split_once(';') {
            Some((parent, state)) => (Some(parent.to_owned()), Some(state.to_owned())),
            None => (Some(text.to_owned()), None),
        },
        None => (None, None),
    };
    let envelope = Envelope {
        service: service.to_owned(),
        traceparent,
        tracestate,
        ..envelope
    };
    OwnedMessage::new(
        Some(payload.to_vec()),
        envelope.key.as_ref().map(|k| k.as_bytes().to_vec()),
        topic.to_owned(),
        Timestamp::NotAvailable,
        -1,
        at,
        Some(envelope.headers()),
    )
}
