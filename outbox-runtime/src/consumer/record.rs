//! Intake's reading of one Kafka record, done once per record: its size against the
//! limit, its envelope (the headers) and the event id it names. Settlement works from
//! this reading and never parses the headers again.

use rdkafka::message::Message;
use tracing::field::Empty;
use tracing::Span;

use crate::backend::RowState;
use crate::catalog::Route;
use crate::envelope::{Envelope, EnvelopeError};
use crate::event::EventId;
use crate::route::ServiceName;
use crate::trace::{self, TraceText};

/// One record as intake read it.
pub(super) struct Record<'m, M> {
    /// The Kafka record.
    pub(super) msg: &'m M,
    /// What it names.
    pub(super) read: Read,
    /// Its `outbox.consume` span, which every step of its settlement (and the handler)
    /// runs in: a child of the record's trace context (feature `otel`). That comes from
    /// the record's headers, not the row: it is the relay's produce span (the row holds
    /// only the publisher's), it is known before any lock, and it decides nothing, so a
    /// forged one can only misfile a trace. `event_type`, `key` and `attempt` are
    /// recorded from the row once it is locked.
    pub(super) span: Span,
}

/// What a record names.
pub(super) enum Read {
    /// An event id; the rest of its envelope, or why that is unreadable (then the
    /// record is a mismatch if the row exists: the row is the truth either way).
    Event {
        event_id: EventId,
        envelope: Result<Envelope, EnvelopeError>,
    },
    /// Not an event of this outbox: skipped with the reason (no row to act on).
    Skip(String),
}

impl<'m, M: Message> Record<'m, M> {
    /// Reads `msg` once: a record over `max_payload_bytes`, or one without a readable
    /// event id, is a skip.
    pub(super) fn read(msg: &'m M, max_payload_bytes: usize, service: &ServiceName) -> Self {
        let size = msg.payload().map_or(0, <[u8]>::len);
        let read = if size > max_payload_bytes {
            Read::Skip(format!(
                "record at {} has a {size}-byte payload, over the {max_payload_bytes}-byte \
                 limit (OutboxConfig::max_payload_bytes): not an event of this outbox",
                at(msg)
            ))
        } else {
            let envelope = Envelope::decode(msg);
            let event_id = match &envelope {
                Ok(e) => Some(e.event_id),
                // The id alone may still be readable: the row it names is then checked.
                Err(_) => Envelope::event_id_of(msg),
            };
            match (event_id, &envelope) {
                (Some(event_id), _) => Read::Event { event_id, envelope },
                (None, Err(e)) => Read::Skip(format!(
                    "record at {} is not an outbox envelope: {e}",
                    at(msg)
                )),
                (None, Ok(_)) => Read::Skip("record has no readable event id".to_owned()),
            }
        };
        let span = tracing::info_span!("outbox.consume", service = %service,
            event_type = Empty, event_id = Empty, key = Empty, attempt = Empty,
            partition = msg.partition(), offset = msg.offset());
        if let Read::Event { event_id, envelope } = &read {
            span.record("event_id", tracing::field::display(event_id));
            if let Ok(Envelope {
                traceparent: Some(traceparent),
                tracestate,
                ..
            }) = envelope
            {
                trace::adopt(&span, TraceText::new(traceparent, tracestate.as_deref()));
            }
        }
        Record { msg, read, span }
    }

    /// Records what the locked `row` says in the record's span.
    pub(super) fn record_row(&self, row: &RowState) {
        self.span.record("event_type", row.event_type.as_str());
        if let Some(key) = &row.key {
            self.span.record("key", key.as_str());
        }
        self.span.record("attempt", row.attempts.saturating_add(1));
    }

    /// The event id the record names, if any.
    pub(super) fn event_id(&self) -> Option<EventId> {
        match &self.read {
            Read::Event { event_id, .. } => Some(*event_id),
            Read::Skip(_) => None,
        }
    }

    /// Where the record is, for messages: `topic:partition@offset`.
    pub(super) fn at(&self) -> String {
        at(self.msg)
    }

    /// How the record disagrees with `row`, the outbox row its event id names, or
    /// `None` if it is a faithful copy. Names the fields that differ and sizes, never
    /// values from the payload.
    pub(super) fn disagreement(&self, row: &RowState, route: &Route) -> Option<String> {
        let envelope = match &self.read {
            Read::Event {
                envelope: Ok(e), ..
            } => e,
            Read::Event {
                envelope: Err(e), ..
            } => return Some(format!("has an unreadable envelope ({e})")),
            Read::Skip(reason) => return Some(reason.clone()),
        };
        let mut differs = Vec::new();
        if envelope.service != route.service().as_str() {
            differs.push("ce_source".to_owned());
        }
        if envelope.event_type != row.event_type {
            differs.push("ce_type".to_owned());
        }
        if i64::from(envelope.version) != i64::from(row.version) {
            differs.push("ce_eventversion".to_owned());
        }
        if envelope.key != row.key {
            differs.push("key".to_owned());
        }
        let payload = self.msg.payload().unwrap_or_default();
        if payload != row.payload.as_bytes() {
            differs.push(format!(
                "payload ({} bytes; the row's has {})",
                payload.len(),
                row.payload.len()
            ));
        }
        (!differs.is_empty())
            .then(|| format!("disagrees with the stored event in: {}", differs.join(", ")))
    }
}

fn at<M: Message>(msg: &M) -> String {
    format!("{}:{}@{}", msg.topic(), msg.partition(), msg.offset())
}
