//! What goes on the wire besides the protobuf body: subjects and headers. Pure functions, no I/O.

use std::str::FromStr;

use async_nats::header::{self, HeaderMap, HeaderName, HeaderValue};
use fhirmesh_core::ResourceChanged;

/// W3C trace context, carried beside the body so tooling that never decodes it can follow traces.
pub(crate) const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// The `Nats-Msg-Id` the event was first published with (dead letters get their own).
pub(crate) const ORIGINAL_MSG_ID: HeaderName = HeaderName::from_static("Fhirmesh-Original-Msg-Id");
/// The subject the event was first published to.
pub(crate) const ORIGINAL_SUBJECT: HeaderName = HeaderName::from_static("Fhirmesh-Original-Subject");
/// The stream and stream sequence the event was stored at.
pub(crate) const ORIGINAL_STREAM: HeaderName = HeaderName::from_static("Fhirmesh-Original-Stream");
pub(crate) const ORIGINAL_SEQUENCE: HeaderName = HeaderName::from_static("Fhirmesh-Original-Sequence");
/// The durable consumer that gave up on the event.
pub(crate) const DEAD_LETTER_CONSUMER: HeaderName = HeaderName::from_static("Fhirmesh-Dead-Letter-Consumer");
/// Why it gave up.
pub(crate) const DEAD_LETTER_REASON: HeaderName = HeaderName::from_static("Fhirmesh-Dead-Letter-Reason");
/// How many times the event had been delivered to that consumer.
pub(crate) const DELIVERY_ATTEMPTS: HeaderName = HeaderName::from_static("Fhirmesh-Delivery-Attempts");

/// The subject an event is published to: `{prefix}.{tenant}.{resource_type}`. Both are single
/// subject tokens by construction (`TenantId` is `[A-Za-z0-9_-]`, `ResourceType` alphanumeric).
pub(crate) fn change_subject(prefix: &str, event: &ResourceChanged) -> String {
    format!("{prefix}.{}.{}", event.tenant, event.resource_type)
}

/// The subject a consumer's dead letters go to: `{dead_letter_prefix}.{durable_name}`.
pub(crate) fn dead_letter_subject(dead_letter_prefix: &str, durable_name: &str) -> String {
    format!("{dead_letter_prefix}.{durable_name}")
}

/// A header value, or `None` if it cannot be one (a line break would corrupt the frame).
fn header_value(value: &str) -> Option<HeaderValue> {
    HeaderValue::from_str(value).ok()
}

/// A header value with line breaks replaced by spaces: for free text such as error messages.
fn lossy_header_value(value: &str) -> HeaderValue {
    let cleaned: String = value.chars().map(|c| if c == '\r' || c == '\n' { ' ' } else { c }).collect();
    header_value(&cleaned).unwrap_or_default()
}

/// The key the stream de-duplicates an event on: its idempotency key, or the one derived from
/// its identity when it has none.
pub(crate) fn message_id(event: &ResourceChanged) -> String {
    if event.idempotency_key.is_empty() {
        ResourceChanged::idempotency_key_for(&event.tenant, event.resource_type, &event.id, event.version_id)
    } else {
        event.idempotency_key.clone()
    }
}

/// The headers of a published event: `Nats-Msg-Id` (de-duplication) and, when the event has one,
/// `traceparent`. A traceparent that cannot be a header value is left out (it stays in the body);
/// an idempotency key that cannot be one is an error, since retries would no longer be safe.
pub(crate) fn event_headers(event: &ResourceChanged) -> Result<HeaderMap, String> {
    let mut headers = HeaderMap::new();
    let id = message_id(event);
    let id_value = header_value(&id)
        .ok_or_else(|| "the idempotency key contains a line break and cannot be a Nats-Msg-Id".to_owned())?;
    headers.insert(header::NATS_MESSAGE_ID, id_value);
    if let Some(traceparent) = event.traceparent.as_deref().filter(|t| !t.is_empty()) {
        match header_value(traceparent) {
            Some(value) => headers.insert(TRACEPARENT, value),
            None => tracing::warn!("traceparent contains a line break; sent in the body only"),
        }
    }
    Ok(headers)
}

/// Fills the event's traceparent from the `traceparent` header when the body has none.
pub(crate) fn apply_traceparent_header(event: &mut ResourceChanged, headers: Option<&HeaderMap>) {
    if event.traceparent.as_deref().is_some_and(|t| !t.is_empty()) {
        return;
    }
    if let Some(value) = headers.and_then(|h| h.get(TRACEPARENT)).map(HeaderValue::as_str).filter(|t| !t.is_empty()) {
        event.traceparent = Some(value.to_owned());
    }
}

/// Where a dead letter came from and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DeadLetterOrigin<'a> {
    pub durable_name: &'a str,
    pub stream: &'a str,
    /// The stream sequence of the original message, when known.
    pub stream_sequence: Option<u64>,
    pub subject: &'a str,
    pub attempts: i64,
    pub reason: &'a str,
}

/// The headers of a dead letter: the original ones (so `traceparent` and the like survive),
/// except the publish preconditions and the `Nats-Msg-Id`, which is replaced by one unique to
/// this consumer and stored message. That keeps retrying the dead-letter publish safe while two
/// consumers dead-lettering the same event both land in the dead-letter stream. The original
/// message id and where the message came from are added as `Fhirmesh-*` headers.
pub(crate) fn dead_letter_headers(original: Option<&HeaderMap>, origin: &DeadLetterOrigin<'_>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let mut original_id = None;
    if let Some(original) = original {
        for (name, values) in original.iter() {
            let name_str: &str = name.as_ref();
            if name_str.eq_ignore_ascii_case(header::NATS_MESSAGE_ID.as_ref()) {
                original_id = values.last().cloned();
                continue;
            }
            if name_str.to_ascii_lowercase().starts_with("nats-expected-") {
                continue;
            }
            for value in values {
                headers.append(name.clone(), value.clone());
            }
        }
    }
    if let Some(sequence) = origin.stream_sequence {
        let id = format!("dlq/{}/{}/{sequence}", origin.durable_name, origin.stream);
        headers.insert(header::NATS_MESSAGE_ID, lossy_header_value(&id));
        headers.insert(ORIGINAL_SEQUENCE, HeaderValue::from(sequence));
    }
    if let Some(id) = original_id {
        headers.insert(ORIGINAL_MSG_ID, id);
    }
    headers.insert(ORIGINAL_SUBJECT, lossy_header_value(origin.subject));
    headers.insert(ORIGINAL_STREAM, lossy_header_value(origin.stream));
    headers.insert(DEAD_LETTER_CONSUMER, lossy_header_value(origin.durable_name));
    headers.insert(DEAD_LETTER_REASON, lossy_header_value(origin.reason));
    headers.insert(DELIVERY_ATTEMPTS, HeaderValue::from(origin.attempts));
    headers
}

/// The delivery attempt from the server's delivery count (1 on the first delivery).
pub(crate) fn attempt_from_delivered(delivered: i64) -> u32 {
    u32::try_from(delivered.max(1)).unwrap_or(u32::MAX)
}

/// Whether the server will not deliver again after this attempt (`max_deliver` of -1: no limit).
pub(crate) fn is_last_attempt(attempt: u32, max_deliver: i64) -> bool {
    max_deliver > 0 && i64::from(attempt) >= max_deliver
}

/// The URL with any credentials replaced by `***`, for logs and error messages.
pub(crate) fn redact_url(urls: &str) -> String {
    urls.split(',')
        .map(|url| {
            let url = url.trim();
            let (scheme, rest) = match url.find("://") {
                Some(at) => url.split_at(at + 3),
                None => ("", url),
            };
            let host_end = rest.find(['/', '?']).unwrap_or(rest.len());
            match rest[..host_end].rfind('@') {
                Some(at) => format!("{scheme}***@{}", &rest[at + 1..]),
                None => url.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use fhirmesh_core::{Operation, TenantId};
    use fhirmesh_fhir::{LogicalId, ResourceType};

    use super::*;

    fn event() -> ResourceChanged {
        let tenant = TenantId::parse("acme").expect("valid tenant");
        let resource_type = ResourceType::parse("Observation").expect("Observation is a resource type");
        let id = LogicalId::parse("o1").expect("valid id");
        ResourceChanged {
            idempotency_key: ResourceChanged::idempotency_key_for(&tenant, resource_type, &id, 3),
            tenant,
            resource_type,
            id,
            version_id: 3,
            operation: Operation::Update,
            last_updated: time::OffsetDateTime::UNIX_EPOCH,
            sequence: 9,
            commit_end: 9,
            resource: None,
            traceparent: None,
        }
    }

    fn value(headers: &HeaderMap, name: HeaderName) -> Option<&str> {
        headers.get(name).map(HeaderValue::as_str)
    }

    #[test]
    fn subjects_name_the_tenant_and_resource_type() {
        assert_eq!(change_subject("fhirmesh.changes", &event()), "fhirmesh.changes.acme.Observation");
        assert_eq!(dead_letter_subject("fhirmesh.dlq", "indexer"), "fhirmesh.dlq.indexer");
    }

    #[test]
    fn event_headers_carry_the_idempotency_key_and_traceparent() {
        let mut e = event();
        let headers = event_headers(&e).expect("headers");
        assert_eq!(value(&headers, header::NATS_MESSAGE_ID), Some("acme/Observation/o1/_history/3"));
        assert_eq!(value(&headers, TRACEPARENT), None);

        e.traceparent = Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned());
        let headers = event_headers(&e).expect("headers");
        assert_eq!(value(&headers, TRACEPARENT), e.traceparent.as_deref());

        e.traceparent = Some(String::new());
        assert_eq!(value(&event_headers(&e).expect("headers"), TRACEPARENT), None);
    }

    #[test]
    fn an_empty_idempotency_key_is_derived_and_a_broken_one_is_an_error() {
        let mut e = event();
        e.idempotency_key.clear();
        let headers = event_headers(&e).expect("headers");
        assert_eq!(value(&headers, header::NATS_MESSAGE_ID), Some("acme/Observation/o1/_history/3"));

        e.idempotency_key = "a\r\nb".to_owned();
        assert!(event_headers(&e).is_err());
    }

    #[test]
    fn a_traceparent_with_a_line_break_is_left_out_instead_of_panicking() {
        let mut e = event();
        e.traceparent = Some("00-abc\r\nInjected: yes".to_owned());
        let headers = event_headers(&e).expect("headers");
        assert_eq!(value(&headers, TRACEPARENT), None);
        assert!(headers.get("Injected").is_none());
    }

    #[test]
    fn the_traceparent_header_fills_an_empty_body_field_only() {
        let mut headers = HeaderMap::new();
        headers.insert(TRACEPARENT, "00-from-header");

        let mut e = event();
        apply_traceparent_header(&mut e, Some(&headers));
        assert_eq!(e.traceparent.as_deref(), Some("00-from-header"));

        let mut e = event();
        e.traceparent = Some(String::new());
        apply_traceparent_header(&mut e, Some(&headers));
        assert_eq!(e.traceparent.as_deref(), Some("00-from-header"));

        let mut e = event();
        e.traceparent = Some("00-from-body".to_owned());
        apply_traceparent_header(&mut e, Some(&headers));
        assert_eq!(e.traceparent.as_deref(), Some("00-from-body"));

        let mut e = event();
        apply_traceparent_header(&mut e, None);
        assert_eq!(e.traceparent, None);
    }

    #[test]
    fn dead_letter_headers_keep_the_original_ones_and_say_where_it_came_from() {
        let mut original = HeaderMap::new();
        original.insert(header::NATS_MESSAGE_ID, "acme/Observation/o1/_history/3");
        original.insert(TRACEPARENT, "00-trace");
        original.insert(header::NATS_EXPECTED_STREAM, "FHIRMESH_CHANGES");
        let origin = DeadLetterOrigin {
            durable_name: "indexer",
            stream: "FHIRMESH_CHANGES",
            stream_sequence: Some(42),
            subject: "fhirmesh.changes.acme.Observation",
            attempts: 5,
            reason: "gave up\nafter 5",
        };
        let headers = dead_letter_headers(Some(&original), &origin);
        assert_eq!(value(&headers, header::NATS_MESSAGE_ID), Some("dlq/indexer/FHIRMESH_CHANGES/42"));
        assert_eq!(value(&headers, ORIGINAL_MSG_ID), Some("acme/Observation/o1/_history/3"));
        assert_eq!(value(&headers, TRACEPARENT), Some("00-trace"));
        assert_eq!(value(&headers, header::NATS_EXPECTED_STREAM), None);
        assert_eq!(value(&headers, ORIGINAL_SUBJECT), Some("fhirmesh.changes.acme.Observation"));
        assert_eq!(value(&headers, ORIGINAL_STREAM), Some("FHIRMESH_CHANGES"));
        assert_eq!(value(&headers, ORIGINAL_SEQUENCE), Some("42"));
        assert_eq!(value(&headers, DEAD_LETTER_CONSUMER), Some("indexer"));
        assert_eq!(value(&headers, DEAD_LETTER_REASON), Some("gave up after 5"));
        assert_eq!(value(&headers, DELIVERY_ATTEMPTS), Some("5"));
    }

    #[test]
    fn a_dead_letter_without_original_headers_or_sequence_has_no_message_id() {
        let origin = DeadLetterOrigin {
            durable_name: "indexer",
            stream: "S",
            stream_sequence: None,
            subject: "p.acme.Patient",
            attempts: 1,
            reason: "undecodable",
        };
        let headers = dead_letter_headers(None, &origin);
        assert_eq!(value(&headers, header::NATS_MESSAGE_ID), None);
        assert_eq!(value(&headers, ORIGINAL_MSG_ID), None);
        assert_eq!(value(&headers, DEAD_LETTER_REASON), Some("undecodable"));
    }

    #[test]
    fn attempts_and_the_last_one() {
        assert_eq!(attempt_from_delivered(0), 1);
        assert_eq!(attempt_from_delivered(-3), 1);
        assert_eq!(attempt_from_delivered(4), 4);
        assert_eq!(attempt_from_delivered(i64::MAX), u32::MAX);
        assert!(!is_last_attempt(4, 5));
        assert!(is_last_attempt(5, 5));
        assert!(is_last_attempt(6, 5));
        assert!(!is_last_attempt(u32::MAX, -1));
    }

    #[test]
    fn credentials_never_reach_logs() {
        assert_eq!(redact_url("nats://user:secret@host:4222"), "nats://***@host:4222");
        assert_eq!(redact_url("nats://tok@h1:4222, nats://h2:4222"), "nats://***@h1:4222,nats://h2:4222");
        assert_eq!(redact_url("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
        assert_eq!(redact_url("u:p@host"), "***@host");
        assert_eq!(redact_url("nats://host/path@x"), "nats://host/path@x");
    }
}
