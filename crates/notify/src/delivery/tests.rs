use fhirmesh_fhir::{LogicalId, ResourceType};
use serde_json::{Value, json};
use time::macros::datetime;

use super::*;
use crate::endpoint::EndpointPolicy;
use crate::subscription::SIGNING_SECRET_EXTENSION;

const NOW: OffsetDateTime = datetime!(2026-03-01 12:00 UTC);
const SECRET: &str = "whsec-0123456789abcdef";

fn tenant(name: &str) -> TenantId {
    TenantId::parse(name).expect("tenant")
}

fn subscription(endpoint: &str, payload: Option<&str>, secret: Option<&str>) -> ActiveSubscription {
    let mut channel = json!({
        "type": "rest-hook",
        "endpoint": endpoint,
        "header": ["Authorization: Bearer abc", "X-Trace-Me: yes"]
    });
    if let Some(payload) = payload {
        channel["payload"] = json!(payload);
    }
    if let Some(secret) = secret {
        channel["extension"] = json!([{"url": SIGNING_SECRET_EXTENSION, "valueString": secret}]);
    }
    let resource = json!({
        "resourceType": "Subscription",
        "id": "sub-9",
        "meta": {"versionId": "1"},
        "status": "active",
        "criteria": "Patient",
        "channel": channel
    });
    ActiveSubscription::from_resource(tenant("acme"), &resource, &EndpointPolicy::strict()).expect("subscription")
}

fn change(operation: Operation, version: u64) -> (ResourceChanged, Bytes) {
    let body = Bytes::from_static(br#"{"resourceType":"Patient","id":"p-1","meta":{"versionId":"4"}}"#);
    let tenant = tenant("acme");
    let resource_type = ResourceType::parse("Patient").expect("type");
    let id = LogicalId::parse("p-1").expect("id");
    let event = ResourceChanged {
        idempotency_key: ResourceChanged::idempotency_key_for(&tenant, resource_type, &id, version),
        tenant,
        resource_type,
        id,
        version_id: version,
        operation,
        last_updated: NOW,
        sequence: 1,
        commit_end: 1,
        resource: (operation != Operation::Delete).then(|| body.clone()),
        traceparent: None,
    };
    (event, body)
}

fn headers(notification: &Notification) -> Vec<(&str, &str)> {
    notification.headers.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect()
}

#[test]
fn without_payload_a_post_with_no_body_to_the_endpoint() {
    let sub = subscription("https://hooks.example.org/notify?k=1", None, None);
    let (event, body) = change(Operation::Update, 4);
    let notification = plan(&sub, &event, Some(body), NOW).expect("plan");
    assert_eq!(notification.method, Method::Post);
    assert_eq!(notification.url, "https://hooks.example.org/notify?k=1");
    assert_eq!(notification.body, None);
    assert_eq!(
        headers(&notification),
        [
            ("Authorization", "Bearer abc"),
            ("X-Trace-Me", "yes"),
            ("X-Fhirmesh-Event-Id", "acme/Patient/p-1/_history/4"),
            ("X-Fhirmesh-Subscription", "Subscription/sub-9"),
            ("X-Fhirmesh-Timestamp", "1772366400"),
        ]
    );
    assert_eq!(notification.header("content-type"), None);
}

#[test]
fn with_payload_a_put_of_the_resource_to_the_base() {
    let sub = subscription("https://hooks.example.org/fhir/", Some("application/fhir+json; fhirVersion=4.0"), None);
    let (event, body) = change(Operation::Create, 4);
    let notification = plan(&sub, &event, Some(body.clone()), NOW).expect("plan");
    assert_eq!(notification.method, Method::Put);
    assert_eq!(notification.url, "https://hooks.example.org/fhir/Patient/p-1");
    assert_eq!(notification.body, Some(body));
    assert_eq!(notification.header("Content-Type"), Some("application/fhir+json; fhirVersion=4.0"));
    assert_eq!(notification.header("x-fhirmesh-event-id"), Some("acme/Patient/p-1/_history/4"));

    // A base without a trailing slash, and one with a query: the path goes before the query.
    let sub = subscription("https://hooks.example.org/fhir?token=x", Some("application/fhir+json"), None);
    let notification = plan(&sub, &event, event.resource.clone(), NOW).expect("plan");
    assert_eq!(notification.url, "https://hooks.example.org/fhir/Patient/p-1?token=x");
    let sub = subscription("https://hooks.example.org", Some("application/json"), None);
    let notification = plan(&sub, &event, event.resource.clone(), NOW).expect("plan");
    assert_eq!(notification.url, "https://hooks.example.org/Patient/p-1");
    assert_eq!(notification.header("Content-Type"), Some("application/json"));

    assert_eq!(plan(&sub, &event, None, NOW), Err(PlanError::BodyRequired));
}

#[test]
fn deletes_post_without_payload_and_delete_with_one() {
    let (event, _) = change(Operation::Delete, 5);
    let plain = plan(&subscription("https://hooks.example.org/n", None, None), &event, None, NOW).expect("plan");
    assert_eq!(
        (plain.method, plain.url.as_str(), plain.body.as_ref()),
        (Method::Post, "https://hooks.example.org/n", None)
    );
    let mirrored =
        plan(&subscription("https://hooks.example.org/fhir", Some("application/fhir+json"), None), &event, None, NOW)
            .expect("plan");
    assert_eq!(mirrored.method, Method::Delete);
    assert_eq!(mirrored.url, "https://hooks.example.org/fhir/Patient/p-1");
    assert_eq!(mirrored.body, None);
    assert_eq!(mirrored.header("Content-Type"), None);
    assert_eq!(mirrored.header(EVENT_ID_HEADER), Some("acme/Patient/p-1/_history/5"));
}

#[test]
fn never_across_tenants() {
    let sub = subscription("https://hooks.example.org/n", None, None);
    let (mut event, _) = change(Operation::Create, 1);
    event.tenant = tenant("other");
    assert_eq!(
        plan(&sub, &event, None, NOW),
        Err(PlanError::TenantMismatch { subscription: tenant("acme"), change: tenant("other") })
    );
}

#[test]
fn signed_notifications_verify_and_tampering_is_caught() {
    let sub = subscription("https://hooks.example.org/fhir", Some("application/fhir+json"), Some(SECRET));
    let (event, body) = change(Operation::Update, 4);
    let notification = plan(&sub, &event, Some(body.clone()), NOW).expect("plan");
    let signature = notification.header(SIGNATURE_HEADER).expect("signed").to_owned();
    let timestamp = notification.header(TIMESTAMP_HEADER).expect("timestamp").to_owned();
    let event_id = notification.header(EVENT_ID_HEADER).expect("event id").to_owned();
    assert!(signature.starts_with("v1="));
    assert_eq!(signature.len(), 3 + 64);
    let tolerance = Duration::from_secs(300);
    let verify = |body: &[u8], event_id: &str, timestamp: &str, signature: &str, now: OffsetDateTime| {
        verify_signature(SECRET.as_bytes(), timestamp, event_id, body, signature, now, tolerance)
    };

    assert_eq!(verify(&body, &event_id, &timestamp, &signature, NOW), Ok(()));
    assert_eq!(verify(&body, &event_id, &timestamp, &signature, NOW + time::Duration::seconds(300)), Ok(()));
    assert_eq!(
        verify(&body, &event_id, &timestamp, &signature, NOW + time::Duration::seconds(301)),
        Err(SignatureError::OutsideTolerance)
    );
    assert_eq!(verify(b"{}", &event_id, &timestamp, &signature, NOW), Err(SignatureError::Mismatch));
    assert_eq!(
        verify(&body, "acme/Patient/p-1/_history/5", &timestamp, &signature, NOW),
        Err(SignatureError::Mismatch)
    );
    assert_eq!(verify(&body, &event_id, "1772366401", &signature, NOW), Err(SignatureError::Mismatch));
    assert_eq!(verify(&body, &event_id, "soon", &signature, NOW), Err(SignatureError::MalformedTimestamp));
    assert_eq!(verify(&body, &event_id, &timestamp, "v1=zz", NOW), Err(SignatureError::Mismatch));
    assert_eq!(
        verify_signature(b"another-secret-entirely", &timestamp, &event_id, &body, &signature, NOW, tolerance),
        Err(SignatureError::Mismatch)
    );
    // A rotated receiver may list several candidates; one valid is enough.
    let both = format!("v1={}, {signature}", "00".repeat(32));
    assert_eq!(verify(&body, &event_id, &timestamp, &both, NOW), Ok(()));

    // Unsigned subscriptions carry no signature header.
    let unsigned = plan(&subscription("https://hooks.example.org/n", None, None), &event, None, NOW).expect("plan");
    assert_eq!(unsigned.header(SIGNATURE_HEADER), None);
}

#[test]
fn the_signature_is_hmac_sha256_of_the_documented_string() {
    // The header is `v1=` + hex of HMAC-SHA256 over exactly "{timestamp}.{event id}.{body}".
    let secret = SigningSecret::new("Jefe");
    let signed = sign(&secret, 1_700_000_000, "t/Patient/1/_history/2", b"{\"a\":1}");
    let mut direct = <Hmac<Sha256> as KeyInit>::new_from_slice(b"Jefe").expect("key");
    direct.update(b"1700000000.t/Patient/1/_history/2.{\"a\":1}");
    let tag = direct.finalize().into_bytes();
    let hex: String = tag.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(signed, format!("v1={hex}"));

    // And the HMAC itself is the standard one (RFC 4231 test case 2).
    let mut rfc = <Hmac<Sha256> as KeyInit>::new_from_slice(b"Jefe").expect("key");
    rfc.update(b"what do ya want for nothing?");
    let rfc_hex: String = rfc.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(rfc_hex, "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
}

#[test]
fn retry_delays_grow_exponentially_with_full_jitter() {
    let policy = RetryPolicy::new(Duration::from_secs(1), Duration::from_secs(60), 8).with_jitter(|| 1.0);
    let delays: Vec<Option<Duration>> = (0..=9).map(|n| policy.next_delay(n)).collect();
    let secs = |s: u64| Some(Duration::from_secs(s));
    assert_eq!(
        delays,
        [Some(Duration::ZERO), secs(1), secs(2), secs(4), secs(8), secs(16), secs(32), secs(60), None, None]
    );

    let half = policy.with_jitter(|| 0.5);
    assert_eq!(half.next_delay(3), Some(Duration::from_secs(2)));
    assert_eq!(half.next_delay(7), Some(Duration::from_secs(30)));
    let zero = policy.with_jitter(|| 0.0);
    assert_eq!(zero.next_delay(5), Some(Duration::ZERO));
    // Out-of-range jitter is clamped; NaN counts as zero.
    assert_eq!(policy.with_jitter(|| 7.0).next_delay(2), Some(Duration::from_secs(2)));
    assert_eq!(policy.with_jitter(|| -1.0).next_delay(2), Some(Duration::ZERO));
    assert_eq!(policy.with_jitter(|| f64::NAN).next_delay(2), Some(Duration::ZERO));
    // No overflow for absurd attempt numbers.
    let long = RetryPolicy::new(Duration::from_secs(1), Duration::from_secs(60), u32::MAX).with_jitter(|| 1.0);
    assert_eq!(long.next_delay(1000), Some(Duration::from_secs(60)));
}

#[test]
fn random_jitter_stays_under_the_cap() {
    let policy = RetryPolicy::new(Duration::from_millis(200), Duration::from_secs(10), 20);
    for attempt in 1..20 {
        let cap = policy.cap(attempt);
        let delay = policy.next_delay(attempt).expect("attempts left");
        assert!(delay <= cap, "attempt {attempt}: {delay:?} > {cap:?}");
    }
    assert_eq!(policy.cap(1), Duration::from_millis(200));
    assert_eq!(policy.cap(3), Duration::from_millis(800));
    assert_eq!(policy.cap(10), Duration::from_secs(10));
    let default = RetryPolicy::default();
    assert_eq!(
        (default.base, default.max_delay, default.max_attempts),
        (Duration::from_secs(1), Duration::from_secs(300), 10)
    );
}

#[test]
fn retry_after_is_honoured_up_to_the_max_delay() {
    let policy = RetryPolicy::new(Duration::from_secs(1), Duration::from_secs(60), 5).with_jitter(|| 0.5);
    assert_eq!(policy.next_delay_after(1, Some(Duration::from_secs(30))), Some(Duration::from_secs(30)));
    assert_eq!(policy.next_delay_after(1, Some(Duration::from_secs(3600))), Some(Duration::from_secs(60)));
    assert_eq!(policy.next_delay_after(4, Some(Duration::ZERO)), Some(Duration::from_secs(4)));
    assert_eq!(policy.next_delay_after(1, None), Some(Duration::from_millis(500)));
    assert_eq!(policy.next_delay_after(5, Some(Duration::from_secs(1))), None);
}

#[test]
fn outcomes_from_status_codes() {
    assert_eq!(AttemptOutcome::from_status(200), AttemptOutcome::Delivered);
    assert_eq!(AttemptOutcome::from_status(204), AttemptOutcome::Delivered);
    assert_eq!(
        AttemptOutcome::from_status(302),
        AttemptOutcome::Failed { reason: "the endpoint answered HTTP 302".to_owned() }
    );
    assert_eq!(
        AttemptOutcome::from_status(500),
        AttemptOutcome::Failed { reason: "the endpoint answered HTTP 500".to_owned() }
    );
}

fn failed(reason: &str) -> AttemptOutcome {
    AttemptOutcome::Failed { reason: reason.to_owned() }
}

#[test]
fn health_goes_to_error_after_the_threshold_and_back_on_success() {
    let sub = subscription("https://hooks.example.org/n", None, None);
    let (t, id) = (sub.tenant().clone(), sub.id().clone());
    let mut health = HealthTracker::new(3);
    health.track(&sub);
    assert_eq!(health.record(&t, &id, &failed("HTTP 500")), None);
    assert_eq!(health.record(&t, &id, &failed("HTTP 502")), None);
    assert_eq!(health.consecutive_failures(&t, &id), 2);
    assert_eq!(
        health.record(&t, &id, &failed("connection refused")),
        Some(Transition::ToError {
            reason: "3 consecutive delivery attempts failed; last: connection refused".to_owned()
        })
    );
    // Once in error, more failures write nothing.
    assert_eq!(health.record(&t, &id, &failed("timeout")), None);
    assert_eq!(health.consecutive_failures(&t, &id), 4);
    assert_eq!(health.record(&t, &id, &AttemptOutcome::Delivered), Some(Transition::ToActive));
    assert_eq!(health.consecutive_failures(&t, &id), 0);
    assert_eq!(health.record(&t, &id, &AttemptOutcome::Delivered), None);
}

#[test]
fn a_success_resets_the_run_of_failures() {
    let sub = subscription("https://hooks.example.org/n", None, None);
    let (t, id) = (sub.tenant().clone(), sub.id().clone());
    let mut health = HealthTracker::new(2);
    health.track(&sub);
    assert_eq!(health.record(&t, &id, &failed("HTTP 500")), None);
    assert_eq!(health.record(&t, &id, &AttemptOutcome::Delivered), None);
    assert_eq!(health.record(&t, &id, &failed("HTTP 500")), None);
    assert!(matches!(health.record(&t, &id, &failed("HTTP 500")), Some(Transition::ToError { .. })));
}

#[test]
fn loaded_statuses_and_new_versions_are_respected() {
    let t = tenant("acme");
    let load = |status: &str, version: u64| {
        let resource = json!({
            "resourceType": "Subscription", "id": "sub-9", "meta": {"versionId": version.to_string()},
            "status": status, "criteria": "Patient",
            "channel": {"type": "rest-hook", "endpoint": "https://hooks.example.org/n"}
        });
        ActiveSubscription::from_resource(t.clone(), &resource, &EndpointPolicy::strict()).expect("load")
    };
    let mut health = HealthTracker::new(2);
    // Loaded in error (another replica wrote it): the first success writes active.
    let errored = load("error", 5);
    health.track(&errored);
    assert_eq!(health.record(&t, errored.id(), &AttemptOutcome::Delivered), Some(Transition::ToActive));

    // A new version (the subscriber's update) starts the count again.
    let active = load("active", 6);
    health.track(&active);
    assert_eq!(health.record(&t, active.id(), &failed("HTTP 500")), None);
    health.track(&load("active", 7));
    assert_eq!(health.consecutive_failures(&t, active.id()), 0);
    // Reloading the same version keeps it.
    assert_eq!(health.record(&t, active.id(), &failed("HTTP 500")), None);
    health.track(&load("active", 7));
    assert_eq!(health.consecutive_failures(&t, active.id()), 1);

    // Other tenants' subscriptions with the same id are separate.
    assert_eq!(health.consecutive_failures(&tenant("other"), active.id()), 0);
    health.forget(&t, active.id());
    assert_eq!(health.consecutive_failures(&t, active.id()), 0);
}

#[test]
fn error_text_is_bounded_and_threshold_zero_means_one() {
    let t = tenant("acme");
    let id = LogicalId::parse("x").expect("id");
    let mut health = HealthTracker::new(0);
    let long = "e".repeat(2000);
    let Some(Transition::ToError { reason }) = health.record(&t, &id, &failed(&long)) else {
        panic!("first failure must reach a threshold of one");
    };
    assert_eq!(reason.chars().count(), 501);
    assert!(reason.starts_with("1 consecutive delivery attempts failed; last: eee"));
    assert!(reason.ends_with('…'));
}

#[test]
fn the_body_is_sent_as_stored() {
    // The planner sends the stored bytes as they are: no re-serialization that could reorder or
    // reformat the resource the signature covers.
    let sub = subscription("https://hooks.example.org/fhir", Some("application/fhir+json"), Some(SECRET));
    let (event, _) = change(Operation::Update, 4);
    let odd = Bytes::from_static(b"{ \"resourceType\" : \"Patient\", \"id\":\"p-1\" }");
    let notification = plan(&sub, &event, Some(odd.clone()), NOW).expect("plan");
    assert_eq!(notification.body.as_ref(), Some(&odd));
    let parsed: Value = serde_json::from_slice(&odd).expect("json");
    assert_eq!(parsed["id"], "p-1");
}
