//! The wire format: CloudEvents' Kafka binary mode, envelope version 1.
//!
//! One outbox event is one Kafka record:
//!
//! | part | content |
//! |---|---|
//! | key | the event's key (`key = field`), UTF-8; no key when the event has none |
//! | value | the event as JSON (serde), exactly the `payload` column |
//! | header `ce_specversion` | `1.0` |
//! | header `ce_id` | the event id, a UUID: the de-duplication key |
//! | header `ce_source` | the owning service (`task`) |
//! | header `ce_type` | the event type name (`TaskCreated`) |
//! | header `ce_time` | when it was published, RFC 3339, database clock |
//! | header `content-type` | `application/json` |
//! | header `ce_eventversion` | the schema version, decimal (`1`) |
//! | header `ce_outboxenvelope` | the envelope version, decimal (`1`) |
//! | header `ce_partitionkey` | the key again, when there is one (CloudEvents partitioning extension) |
//! | header `ce_traceparent` | the W3C `traceparent` of the relay's produce span (a child of the publisher's), when the event has one (CloudEvents distributed-tracing extension) |
//! | header `ce_tracestate` | the W3C `tracestate` with it, when there is one |
//!
//! Any CloudEvents-aware consumer can read it without this crate. A record whose
//! envelope version is newer than [`ENVELOPE_VERSION`] is refused with a reason rather
//! than guessed at. Changes that old readers can ignore (a new header) keep the
//! version; anything else bumps it.

use chrono::{DateTime, SecondsFormat, Utc};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use uuid::Uuid;

use crate::event::EventId;

/// The envelope version this crate writes and the newest it reads.
pub const ENVELOPE_VERSION: u32 = 1;

/// Header names.
pub mod header {
    /// CloudEvents spec version (`1.0`).
    pub const SPEC_VERSION: &str = "ce_specversion";
    /// The event id.
    pub const ID: &str = "ce_id";
    /// The owning service.
    pub const SOURCE: &str = "ce_source";
    /// The event type name.
    pub const TYPE: &str = "ce_type";
    /// Publish time, RFC 3339.
    pub const TIME: &str = "ce_time";
    /// `application/json`.
    pub const CONTENT_TYPE: &str = "content-type";
    /// The event's schema version.
    pub const EVENT_VERSION: &str = "ce_eventversion";
    /// The envelope version.
    pub const ENVELOPE: &str = "ce_outboxenvelope";
    /// The ordering key.
    pub const PARTITION_KEY: &str = "ce_partitionkey";
    /// W3C `traceparent` (distributed-tracing extension).
    pub const TRACEPARENT: &str = "ce_traceparent";
    /// W3C `tracestate` (distributed-tracing extension).
    pub const TRACESTATE: &str = "ce_tracestate";
}

/// One event as it travels through Kafka.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The event id.
    pub event_id: EventId,
    /// The owning service.
    pub service: String,
    /// The event type name.
    pub event_type: String,
    /// The schema version.
    pub version: u32,
    /// The ordering key.
    pub key: Option<String>,
    /// Publish time.
    pub time: DateTime<Utc>,
    /// The JSON payload.
    pub payload: Vec<u8>,
    /// The W3C `traceparent` the event's trace continues from, if any. Read as sent:
    /// a malformed one is ignored by the consumer, never an error.
    pub traceparent: Option<String>,
    /// The W3C `tracestate` that goes with it, if any.
    pub tracestate: Option<String>,
}

/// Why a record is not a readable envelope. Each is a permanent condition of the record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// A required header is absent.
    #[error("missing header `{0}`")]
    MissingHeader(&'static str),
    /// A header is present but unreadable.
    #[error("invalid header `{name}`: {reason}")]
    InvalidHeader {
        /// The header.
        name: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// Written by a newer version of the framework.
    #[error("envelope version {0} is newer than the supported {ENVELOPE_VERSION}")]
    UnsupportedEnvelope(u32),
    /// No value.
    #[error("record has no payload")]
    MissingPayload,
}

impl Envelope {
    /// The envelope of an outbox row of `service`, without a trace context: the
    /// record a relay produces for it (with the payload as the record's value).
    pub(crate) fn of_row(service: &str, row: &crate::backend::ClaimedRow) -> Envelope {
        Envelope {
            event_id: EventId(row.event_id),
            service: service.to_owned(),
            event_type: row.event_type.clone(),
            version: u32::try_from(row.version).unwrap_or(0),
            key: row.key.clone(),
            time: row.created_at,
            payload: Vec::new(),
            traceparent: None,
            tracestate: None,
        }
    }

    /// The Kafka headers of this envelope.
    pub fn headers(&self) -> OwnedHeaders {
        let id = self.event_id.to_string();
        let version = self.version.to_string();
        let envelope = ENVELOPE_VERSION.to_string();
        let time = self.time.to_rfc3339_opts(SecondsFormat::Micros, true);
        let mut h = OwnedHeaders::new_with_capacity(11)
            .insert(hdr(header::SPEC_VERSION, "1.0"))
            .insert(hdr(header::ID, &id))
            .insert(hdr(header::SOURCE, &self.service))
            .insert(hdr(header::TYPE, &self.event_type))
            .insert(hdr(header::TIME, &time))
            .insert(hdr(header::CONTENT_TYPE, "application/json"))
            .insert(hdr(header::EVENT_VERSION, &version))
            .insert(hdr(header::ENVELOPE, &envelope));
        if let Some(key) = &self.key {
            h = h.insert(hdr(header::PARTITION_KEY, key));
        }
        if let Some(traceparent) = &self.traceparent {
            h = h.insert(hdr(header::TRACEPARENT, traceparent));
            if let Some(tracestate) = &self.tracestate {
                h = h.insert(hdr(header::TRACESTATE, tracestate));
            }
        }
        h
    }

    /// Reads an envelope from a Kafka record. Only the event id is needed to find the
    /// outbox row; [`EnvelopeError`] says what else is wrong.
    pub fn decode<M: Message>(msg: &M) -> Result<Envelope, EnvelopeError> {
        let headers = msg.headers();
        let get = |name: &'static str| -> Result<Option<String>, EnvelopeError> {
            let Some(headers) = headers else {
                return Ok(None);
            };
            for h in headers.iter() {
                if h.key == name {
                    return match h.value {
                        None => Ok(None),
                        Some(v) => {
                            std::str::from_utf8(v)
                                .map(|s| Some(s.to_owned()))
                                .map_err(|e| EnvelopeError::InvalidHeader {
                                    name,
                                    reason: format!("not UTF-8: {e}"),
                                })
                        }
                    };
                }
            }
            Ok(None)
        };
        let require = |name: &'static str| get(name)?.ok_or(EnvelopeError::MissingHeader(name));
        let number = |name: &'static str, s: String| -> Result<u32, EnvelopeError> {
            s.parse::<u32>().map_err(|e| EnvelopeError::InvalidHeader {
                name,
                reason: format!("`{s}` is not a version number: {e}"),
            })
        };

        let envelope = number(header::ENVELOPE, require(header::ENVELOPE)?)?;
        if envelope > ENVELOPE_VERSION {
            return Err(EnvelopeError::UnsupportedEnvelope(envelope));
        }
        let id = require(header::ID)?;
        let event_id =
            Uuid::parse_str(&id)
                .map(EventId)
                .map_err(|e| EnvelopeError::InvalidHeader {
                    name: header::ID,
                    reason: format!("`{id}` is not a UUID: {e}"),
                })?;
        let service = require(header::SOURCE)?;
        let event_type = require(header::TYPE)?;
        let version = number(header::EVENT_VERSION, require(header::EVENT_VERSION)?)?;
        let time = match get(header::TIME)? {
            Some(t) => DateTime::parse_from_rfc3339(&t)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|e| EnvelopeError::InvalidHeader {
                    name: header::TIME,
                    reason: format!("`{t}` is not RFC 3339: {e}"),
                })?,
            None => return Err(EnvelopeError::MissingHeader(header::TIME)),
        };
        let key = match msg.key() {
            Some(k) => Some(
                std::str::from_utf8(k)
                    .map_err(|e| EnvelopeError::InvalidHeader {
                        name: "key",
                        reason: format!("record key is not UTF-8: {e}"),
                    })?
                    .to_owned(),
            ),
            None => None,
        };
        let payload = msg.payload().ok_or(EnvelopeError::MissingPayload)?.to_vec();
        // Tracing only: an unreadable trace header is no trace, not a bad envelope.
        let traceparent = get(header::TRACEPARENT).ok().flatten();
        let tracestate = get(header::TRACESTATE).ok().flatten();
        Ok(Envelope {
            event_id,
            service,
            event_type,
            version,
            key,
            time,
            payload,
            traceparent,
            tracestate,
        })
    }

    /// The event id of a record, if it has a readable one: enough to find and
    /// dead-letter the outbox row of a record that is otherwise unreadable.
    pub fn event_id_of<M: Message>(msg: &M) -> Option<EventId> {
        let headers = msg.headers()?;
        let h = headers.iter().find(|h| h.key == header::ID)?;
        let s = std::str::from_utf8(h.value?).ok()?;
        Uuid::parse_str(s).ok().map(EventId)
    }
}

fn hdr<'a>(key: &'a str, value: &'a str) -> Header<'a, &'a str> {
    Header {
        key,
        value: Some(value),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::OwnedMessage;
    use rdkafka::Timestamp;

    fn sample(key: Option<&str>) -> Envelope {
        Envelope {
            event_id: EventId::new(),
            service: "active-scheduler".into(),
            event_type: "JobScheduled".into(),
            version: 3,
            key: key.map(Into::into),
            time: DateTime::parse_from_rfc3339("2026-11-30T04:09:25.123456Z")
                .unwrap()
                .with_timezone(&Utc),
            payload: br#"{"job":"x","n":1}"#.to_vec(),
            traceparent: None,
            tracestate: None,
        }
    }

    fn record(env: &Envelope, headers: Option<OwnedHeaders>) -> OwnedMessage {
        OwnedMessage::new(
            Some(env.payload.clone()),
            env.key.clone().map(String::into_bytes),
            "outbox.active-scheduler".into(),
            Timestamp::NotAvailable,
            0,
            7,
            headers,
        )
    }

    #[test]
    fn round_trips_with_and_without_key() {
        for key in [Some("job-42"), None] {
            let env = sample(key);
            let back = Envelope::decode(&record(&env, Some(env.headers()))).unwrap();
            assert_eq!(back, env);
            assert_eq!(
                Envelope::event_id_of(&record(&env, Some(env.headers()))),
                Some(env.event_id)
            );
        }
    }

    #[test]
    fn trace_context_travels_in_the_tracing_extension() {
        let mut env = sample(Some("k"));
        env.traceparent =
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned());
        env.tracestate = Some("rojo=00f067aa0ba902b7".to_owned());
        let h = env.headers();
        let names: Vec<&str> = h.iter().map(|h| h.key).collect();
        assert_eq!(names[9..], ["ce_traceparent", "ce_tracestate"]);
        let back = Envelope::decode(&record(&env, Some(h))).unwrap();
        assert_eq!(back, env);
    }

    #[test]
    fn headers_are_cloudevents_binary_mode() {
        let env = sample(Some("k"));
        let h = env.headers();
        let names: Vec<&str> = h.iter().map(|h| h.key).collect();
        assert_eq!(
            names,
            [
                "ce_specversion",
                "ce_id",
                "ce_source",
                "ce_type",
                "ce_time",
                "content-type",
                "ce_eventversion",
                "ce_outboxenvelope",
                "ce_partitionkey"
            ]
        );
    }

    #[test]
    fn unreadable_records_say_why() {
        let env = sample(None);
        assert_eq!(
            Envelope::decode(&record(&env, None)),
            Err(EnvelopeError::MissingHeader(header::ENVELOPE))
        );
        let newer = OwnedHeaders::new()
            .insert(hdr(header::ENVELOPE, "2"))
            .insert(hdr(header::ID, &env.event_id.to_string()));
        assert_eq!(
            Envelope::decode(&record(&env, Some(newer))),
            Err(EnvelopeError::UnsupportedEnvelope(2))
        );
        let bad_id = OwnedHeaders::new()
            .insert(hdr(header::ENVELOPE, "1"))
            .insert(hdr(header::ID, "not-a-uuid"));
        assert!(matches!(
            Envelope::decode(&record(&env, Some(bad_id))),
            Err(EnvelopeError::InvalidHeader { name: "ce_id", .. })
        ));
        let non_utf8 = OwnedHeaders::new().insert(Header {
            key: header::ENVELOPE,
            value: Some(&[0xff, 0xfe][..]),
        });
        assert!(matches!(
            Envelope::decode(&record(&env, Some(non_utf8))),
            Err(EnvelopeError::InvalidHeader { .. })
        ));
    }
}
