//! OpenTelemetry trace propagation through the outbox (feature `otel`), through
//! [`tracing_opentelemetry`]: one trace from the business transaction that publishes to
//! the handler.
//!
//! - `publish` stores the W3C trace context of the caller's current `tracing` span in
//!   the row (column `trace_context`, `traceparent[;tracestate]`);
//! - the relay's `outbox.produce` span of the row is a child of that context, and its
//!   own context travels in the record's `ce_traceparent` / `ce_tracestate` headers
//!   (CloudEvents' distributed-tracing extension);
//! - the consumer's `outbox.consume` span, inside which the handler runs, is a child of
//!   the record's context.
//!
//! The W3C propagator is used directly: no global propagator needs installing. All it
//! takes is a `tracing_opentelemetry` layer in the application's subscriber (see the
//! README, "Traces"); without one, nothing is stored and nothing is sent. A malformed
//! context is ignored, never an error.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry::Context;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::trace::TraceText;

// The versions this crate was built with, so an application wires the same ones.
pub use opentelemetry;
pub use opentelemetry_sdk;
pub use tracing_opentelemetry;

const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";

/// The two W3C fields, as the propagator reads and writes them.
#[derive(Default)]
struct W3c {
    traceparent: Option<String>,
    tracestate: Option<String>,
}

impl Injector for W3c {
    fn set(&mut self, key: &str, value: String) {
        match key {
            TRACEPARENT => self.traceparent = Some(value),
            TRACESTATE => self.tracestate = Some(value),
            _ => {}
        }
    }
}

impl Extractor for W3c {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            TRACEPARENT => self.traceparent.as_deref(),
            TRACESTATE => self.tracestate.as_deref(),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT, TRACESTATE]
    }
}

/// The W3C context of `span` as the row stores it (`traceparent[;tracestate]`), or
/// `None` when the span has no OpenTelemetry span (disabled, or no
/// `tracing_opentelemetry` layer).
pub fn trace_context_of(span: &Span) -> Option<String> {
    let (traceparent, tracestate) = headers_of(span)?;
    TraceText::new(&traceparent, tracestate.as_deref()).map(|t| t.stored())
}

/// The OpenTelemetry context a stored `trace_context` names (for a span of your own
/// that should continue an event's trace); `None` when it is malformed.
pub fn parent_context(stored: &str) -> Option<Context> {
    TraceText::parse(stored).and_then(context_of)
}

/// The context `text` names, if valid.
fn context_of(text: TraceText<'_>) -> Option<Context> {
    let carrier = W3c {
        traceparent: Some(text.traceparent.to_owned()),
        tracestate: text.tracestate.map(str::to_owned),
    };
    // Extracted onto an empty context: nothing of the caller's leaks in.
    let cx = TraceContextPropagator::new().extract_with_context(&Context::new(), &carrier);
    cx.span().span_context().is_valid().then_some(cx)
}

/// `span`'s context as `traceparent` and `tracestate` header values.
pub(crate) fn headers_of(span: &Span) -> Option<(String, Option<String>)> {
    if span.is_disabled() {
        return None;
    }
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = W3c::default();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    let tracestate = carrier.tracestate.filter(|s| !s.is_empty());
    carrier.traceparent.map(|tp| (tp, tracestate))
}

/// Makes `span` (not yet entered) a child of `parent`. A context that does not parse
/// leaves the span where it was.
pub(crate) fn set_parent(span: &Span, parent: TraceText<'_>) {
    if span.is_disabled() {
        return;
    }
    if let Some(cx) = context_of(parent) {
        // Fails only when the span has no OpenTelemetry layer or already started.
        let _ = span.set_parent(cx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_contexts_parse_or_are_ignored() {
        let stored =
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01;rojo=00f067aa0ba902b7";
        let cx = parent_context(stored).expect("a valid context");
        let span = cx.span();
        let sc = span.span_context();
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert!(sc.is_remote() && sc.is_sampled());
        assert_eq!(sc.trace_state().header(), "rojo=00f067aa0ba902b7");
        for bad in [
            "",
            "garbage",
            "00-zz-yy-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        ] {
            assert!(parent_context(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn nothing_is_captured_without_a_layer() {
        let span = tracing::info_span!("no subscriber");
        assert_eq!(trace_context_of(&span), None);
        assert_eq!(headers_of(&span), None);
    }
}
