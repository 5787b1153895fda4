//! Traces across the change stream, without an OpenTelemetry dependency in the domain.
//!
//! A write keeps the W3C `traceparent` of its request with the change ([`crate::ports::VersionWrite`]);
//! the change's consumers (the indexer, the notifier) open their span as a child of it, so one
//! trace follows a request from the gateway to the index and out to a rest-hook receiver. How a
//! span is made a child of a remote context, and turned back into a `traceparent`, is the tracing
//! adapter's business: the process installs it once with [`install`] (`fhirmesh_ops::trace` does).
//! Without it the spans are plain `tracing` spans and a change's `traceparent` is passed on as it
//! came.

use std::sync::OnceLock;

use tracing::Span;

use crate::events::ResourceChanged;

/// How spans meet remote trace contexts: `set_parent` makes a span a child of a `traceparent`
/// (ignoring a malformed one); `traceparent_of` is a span's own `traceparent`, `None` when spans
/// are not exported.
#[derive(Debug, Clone, Copy)]
pub struct Propagation {
    pub set_parent: fn(&Span, Option<&str>),
    pub traceparent_of: fn(&Span) -> Option<String>,
}

static PROPAGATION: OnceLock<Propagation> = OnceLock::new();

/// Installs the process's propagation; a second call leaves the first in place.
pub fn install(propagation: Propagation) {
    let _ = PROPAGATION.set(propagation);
}

/// Makes `span` a child of `traceparent` (a no-op without an installed propagation).
pub fn set_parent(span: &Span, traceparent: Option<&str>) {
    if let Some(propagation) = PROPAGATION.get() {
        (propagation.set_parent)(span, traceparent);
    }
}

/// The `traceparent` to send on from inside `span`: its own when spans are exported, else the
/// one it continues (`inherited`), unchanged — a hop that does not trace passes the caller's on.
pub fn outgoing_traceparent(span: &Span, inherited: Option<&str>) -> Option<String> {
    PROPAGATION
        .get()
        .and_then(|propagation| (propagation.traceparent_of)(span))
        .or_else(|| inherited.map(str::to_owned))
}

/// The span of a consumer's work on `change` (`otel.name` = `name`), a child of the write's
/// trace; `None` when the change carries no trace context (for consumers that handle changes in
/// bulk and trace only what a traced request wrote).
pub fn change_span(name: &'static str, change: &ResourceChanged) -> Option<Span> {
    let traceparent = change.traceparent.as_deref()?;
    let span = tracing::info_span!(
        "change",
        otel.name = name,
        event = %change.idempotency_key,
        sequence = change.sequence,
        trace_id = tracing::field::Empty,
    );
    set_parent(&span, Some(traceparent));
    Some(span)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_propagation_the_inherited_traceparent_passes_on_unchanged() {
        // No test in this crate installs a propagation.
        let span = tracing::info_span!("test");
        set_parent(&span, Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
        assert_eq!(outgoing_traceparent(&span, Some("00-abc-def-01")).as_deref(), Some("00-abc-def-01"));
        assert_eq!(outgoing_traceparent(&span, None), None);
    }
}
