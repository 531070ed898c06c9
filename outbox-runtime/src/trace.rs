//! The W3C trace context an event carries (CloudEvents' distributed-tracing extension),
//! as text: no OpenTelemetry here. The row stores it as `traceparent[;tracestate]`
//! (one column: a `traceparent` never contains `;`, so the first one splits them, and a
//! `tracestate` may), the envelope as the `ce_traceparent` / `ce_tracestate` headers.
//!
//! A malformed context is ignored wherever it is read, never an error: tracing must not
//! decide what happens to an event. With the `otel` feature, `crate::otel` turns the
//! text into span parents and back; without it the relay forwards a well-formed stored
//! context as it is and the consumer ignores it.

/// The most bytes of trace context stored with an event (the column's size on MySQL):
/// a `traceparent` is 55; a `tracestate` that would not fit is dropped.
pub(crate) const MAX_TRACE_CONTEXT: usize = 1024;

/// A W3C trace context as text: `traceparent`, and `tracestate` if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TraceText<'a> {
    pub traceparent: &'a str,
    pub tracestate: Option<&'a str>,
}

impl<'a> TraceText<'a> {
    /// A context from its two parts; `None` when the `traceparent` is malformed. An
    /// empty `tracestate` is none.
    pub(crate) fn new(traceparent: &'a str, tracestate: Option<&'a str>) -> Option<Self> {
        valid_traceparent(traceparent).then_some(TraceText {
            traceparent,
            tracestate: tracestate.filter(|s| !s.is_empty() && s.len() < MAX_TRACE_CONTEXT),
        })
    }

    /// A context as the row stores it; `None` when it is malformed.
    pub(crate) fn parse(stored: &'a str) -> Option<Self> {
        match stored.split_once(';') {
            Some((traceparent, tracestate)) => Self::new(traceparent, Some(tracestate)),
            None => Self::new(stored, None),
        }
    }

    /// The stored form, `traceparent[;tracestate]`, at most [`MAX_TRACE_CONTEXT`] bytes
    /// (a longer `tracestate` is dropped).
    #[cfg_attr(not(feature = "otel"), allow(dead_code))]
    pub(crate) fn stored(&self) -> String {
        match self.tracestate {
            Some(state) if self.traceparent.len() + 1 + state.len() <= MAX_TRACE_CONTEXT => {
                format!("{};{state}", self.traceparent)
            }
            _ => self.traceparent.to_owned(),
        }
    }
}

/// Whether `s` is a W3C `traceparent`: `version-traceid-spanid-flags` in lowercase hex,
/// ids not all zero, version not `ff`; version `00` has exactly these four fields, a
/// later version may append more after a `-`.
pub(crate) fn valid_traceparent(s: &str) -> bool {
    let b = s.as_bytes();
    let hex = |r: std::ops::Range<usize>| {
        b[r].iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
    };
    let zero = |r: std::ops::Range<usize>| b[r].iter().all(|c| *c == b'0');
    if b.len() < 55 || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return false;
    }
    let version_ok = hex(0..2) && &b[0..2] != b"ff";
    let length_ok = if &b[0..2] == b"00" {
        b.len() == 55
    } else {
        b.len() == 55 || b[55] == b'-'
    };
    version_ok
        && length_ok
        && hex(3..35)
        && !zero(3..35)
        && hex(36..52)
        && !zero(36..52)
        && hex(53..55)
}

/// The trace context of the caller's current span, as the row stores it (publish).
/// Always `None` without the `otel` feature.
pub(crate) fn current() -> Option<String> {
    #[cfg(feature = "otel")]
    return crate::otel::trace_context_of(&tracing::Span::current());
    #[cfg(not(feature = "otel"))]
    None
}

/// Continues `parent` (the stored context of a row) in `span`, which has not been
/// entered, and returns the context to send on as `traceparent` and `tracestate`: the
/// span's own (a child of `parent`), or `parent` as it is when the span has no
/// OpenTelemetry span (no `otel` feature, or no layer).
#[cfg(feature = "kafka")]
pub(crate) fn continue_in(
    span: &tracing::Span,
    parent: Option<TraceText<'_>>,
) -> Option<(String, Option<String>)> {
    #[cfg(feature = "otel")]
    {
        if let Some(parent) = parent {
            crate::otel::set_parent(span, parent);
        }
        if let Some(own) = crate::otel::headers_of(span) {
            return Some(own);
        }
    }
    #[cfg(not(feature = "otel"))]
    let _ = span;
    parent.map(|p| (p.traceparent.to_owned(), p.tracestate.map(str::to_owned)))
}

/// Makes `span`, not yet entered, a child of `parent` (a record's context). Nothing
/// without the `otel` feature.
#[cfg(feature = "kafka")]
pub(crate) fn adopt(span: &tracing::Span, parent: Option<TraceText<'_>>) {
    #[cfg(feature = "otel")]
    if let Some(parent) = parent {
        crate::otel::set_parent(span, parent);
    }
    #[cfg(not(feature = "otel"))]
    let _ = (span, parent);
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparents_are_checked() {
        assert!(valid_traceparent(TP));
        assert!(valid_traceparent(
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra"
        ));
        for bad in [
            "",
            "garbage",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            "00-4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47é-00f067aa0ba902b7-01",
        ] {
            assert!(!valid_traceparent(bad), "{bad}");
        }
    }

    #[test]
    fn stored_form_round_trips() {
        let with_state = format!("{TP};congo=t61rcWkgMzE,rojo=00f067aa0ba902b7;x");
        let t = TraceText::parse(&with_state).unwrap();
        assert_eq!(t.traceparent, TP);
        assert_eq!(
            t.tracestate,
            Some("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7;x")
        );
        assert_eq!(t.stored(), with_state);
        assert_eq!(TraceText::parse(TP).unwrap().stored(), TP);
        assert_eq!(
            TraceText::parse(&format!("{TP};")).unwrap().tracestate,
            None
        );
        assert_eq!(TraceText::parse("not-a-context;a=b"), None);
        let long = "a=".to_owned() + &"b".repeat(MAX_TRACE_CONTEXT);
        assert_eq!(TraceText::new(TP, Some(&long)).unwrap().stored(), TP);
    }
}
