use bytes::Bytes;
use fhirmesh_fhir::LogicalId;
use fhirmesh_fhir::search::evaluate::evaluate;
use serde_json::json;
use time::macros::datetime;

use super::*;
use crate::endpoint::EndpointPolicy;

const NOW: OffsetDateTime = datetime!(2026-03-01 12:00 UTC);

fn tenant(name: &str) -> TenantId {
    TenantId::parse(name).expect("tenant")
}

fn id(text: &str) -> SubscriptionId {
    LogicalId::parse(text).expect("id")
}

fn subscription(tenant_name: &str, sub_id: &str, version: u64, criteria: &str) -> ActiveSubscription {
    subscription_with(tenant_name, sub_id, version, criteria, "active", None)
}

fn subscription_with(
    tenant_name: &str,
    sub_id: &str,
    version: u64,
    criteria: &str,
    status: &str,
    end: Option<&str>,
) -> ActiveSubscription {
    let mut resource = json!({
        "resourceType": "Subscription",
        "id": sub_id,
        "meta": {"versionId": version.to_string()},
        "status": status,
        "criteria": criteria,
        "channel": {"type": "rest-hook", "endpoint": "https://hooks.example.org/"}
    });
    if let Some(end) = end {
        resource["end"] = json!(end);
    }
    ActiveSubscription::from_resource(tenant(tenant_name), &resource, &EndpointPolicy::strict()).expect("subscription")
}

fn change(tenant_name: &str, resource: &Value, operation: Operation, version: u64) -> ResourceChanged {
    let resource_type = ResourceType::parse(resource["resourceType"].as_str().unwrap_or_default()).expect("type");
    let logical = LogicalId::parse(resource["id"].as_str().unwrap_or_default()).expect("id");
    let tenant = tenant(tenant_name);
    ResourceChanged {
        idempotency_key: ResourceChanged::idempotency_key_for(&tenant, resource_type, &logical, version),
        tenant,
        resource_type,
        id: logical,
        version_id: version,
        operation,
        last_updated: NOW,
        sequence: 7,
        commit_end: 7,
        resource: (operation != Operation::Delete).then(|| Bytes::from(resource.to_string())),
        traceparent: None,
    }
}

fn observation(id: &str, code: &str, status: &str) -> Value {
    json!({
        "resourceType": "Observation",
        "id": id,
        "meta": {"versionId": "1", "lastUpdated": "2026-03-01T11:59:00.000Z"},
        "status": status,
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": {"reference": "Patient/p1"},
        "effectiveDateTime": "2025-06-01",
        "valueQuantity": {"value": 7.2, "unit": "mg/dL", "system": "http://unitsofmeasure.org", "code": "mg/dL"}
    })
}

fn ids(found: Vec<SubscriptionId>) -> Vec<String> {
    found.into_iter().map(LogicalId::into_string).collect()
}

fn matched(matcher: &Matcher, change: &ResourceChanged, resource: Option<&Value>) -> Vec<String> {
    ids(matcher.matches(change, resource, NOW).expect("match"))
}

#[test]
fn a_change_notifies_the_matching_subscriptions_of_its_type() {
    let mut matcher = Matcher::new();
    assert_eq!(
        matcher.upsert(subscription("t1", "bili", 1, "Observation?code=http://loinc.org|1975-2")),
        Upserted::Added
    );
    matcher.upsert(subscription("t1", "all-obs", 1, "Observation"));
    matcher.upsert(subscription("t1", "final", 1, "Observation?status=final"));
    matcher.upsert(subscription("t1", "patients", 1, "Patient"));
    matcher.upsert(subscription("t1", "other-code", 1, "Observation?code=9999-9"));
    assert_eq!(matcher.len(), 5);

    let obs = observation("o1", "1975-2", "final");
    assert_eq!(matched(&matcher, &change("t1", &obs, Operation::Create, 1), Some(&obs)), ["all-obs", "bili", "final"]);

    let preliminary = observation("o1", "1975-2", "preliminary");
    assert_eq!(
        matched(&matcher, &change("t1", &preliminary, Operation::Update, 2), Some(&preliminary)),
        ["all-obs", "bili"]
    );
}

#[test]
fn tenants_never_see_each_others_changes() {
    let mut matcher = Matcher::new();
    matcher.upsert(subscription("t1", "same-id", 1, "Observation"));
    matcher.upsert(subscription("t2", "same-id", 1, "Observation"));
    matcher.upsert(subscription("t2", "t2-only", 1, "Observation?status=final"));

    let obs = observation("o1", "1975-2", "final");
    let in_t1 = matcher.matching(&change("t1", &obs, Operation::Create, 1), Some(&obs), NOW).expect("t1");
    assert_eq!(in_t1.len(), 1);
    assert_eq!(in_t1[0].tenant().as_str(), "t1");
    let in_t2 = matcher.matching(&change("t2", &obs, Operation::Create, 1), Some(&obs), NOW).expect("t2");
    let names: Vec<(&str, &str)> = in_t2.iter().map(|s| (s.tenant().as_str(), s.id().as_str())).collect();
    assert_eq!(names, [("t2", "same-id"), ("t2", "t2-only")]);
    assert!(matched(&matcher, &change("t3", &obs, Operation::Create, 1), Some(&obs)).is_empty());

    // Removing t1's subscription leaves t2's of the same id alone.
    assert!(matcher.remove(&tenant("t1"), &id("same-id"), 2).is_some());
    assert!(matcher.get(&tenant("t2"), &id("same-id")).is_some());
    assert!(matched(&matcher, &change("t1", &obs, Operation::Update, 2), Some(&obs)).is_empty());
}

/// The matcher answers what the reference search evaluator answers on a one-resource corpus.
#[test]
fn matching_agrees_with_search_over_many_criteria() {
    let criteria = [
        "Observation?code=1975-2",
        "Observation?code=http://loinc.org|1975-2",
        "Observation?code=http://snomed.info/sct|1975-2",
        "Observation?code:not=1975-2",
        "Observation?status=final,amended",
        "Observation?subject=Patient/p1",
        "Observation?subject=Patient/p2",
        "Observation?patient=p1",
        "Observation?date=2025-06",
        "Observation?date=gt2025-07-01",
        "Observation?date=le2025-06-01&status=final",
        "Observation?value-quantity=gt7|http://unitsofmeasure.org|mg/dL",
        "Observation?value-quantity=lt7",
        "Observation?performer:missing=true",
        "Observation?performer:missing=false",
        "Observation?_id=o1",
        "Observation?_id=o2",
        "Observation?_lastUpdated=ge2026-03-01",
        "Observation?_lastUpdated=lt2026-03-01",
        "Observation?code-value-quantity=1975-2$gt5",
        "Observation?code-value-quantity=1975-2$gt8",
    ];
    let resources = [observation("o1", "1975-2", "final"), observation("o1", "2345-7", "amended")];
    for resource in &resources {
        let mut matcher = Matcher::new();
        for (index, text) in criteria.iter().enumerate() {
            matcher.upsert(subscription("t1", &format!("s{index:02}"), 1, text));
        }
        let found = matched(&matcher, &change("t1", resource, Operation::Update, 2), Some(resource));

        let doc = Doc {
            resource_type: ResourceType::parse("Observation").expect("type"),
            id: "o1".to_owned(),
            entries: extract(resource),
        };
        let expected: Vec<String> = criteria
            .iter()
            .enumerate()
            .filter(|(index, _)| {
                let held = matcher.get(&tenant("t1"), &id(&format!("s{index:02}"))).expect("held");
                !evaluate(held.criteria().query(), std::slice::from_ref(&doc), NOW).is_empty()
            })
            .map(|(index, _)| format!("s{index:02}"))
            .collect();
        assert_eq!(found, expected);
    }
    // And the expected answers themselves, for the first resource.
    let mut matcher = Matcher::new();
    for (index, text) in criteria.iter().enumerate() {
        matcher.upsert(subscription("t1", &format!("s{index:02}"), 1, text));
    }
    let found = matched(&matcher, &change("t1", &resources[0], Operation::Update, 2), Some(&resources[0]));
    assert_eq!(found, ["s00", "s01", "s04", "s05", "s07", "s08", "s10", "s11", "s13", "s15", "s17", "s19"]);
}

#[test]
fn date_criteria_use_the_given_now() {
    let mut matcher = Matcher::new();
    matcher.upsert(subscription("t1", "ap", 1, "Observation?date=ap2026-01-01"));
    let obs = observation("o1", "1975-2", "final");
    let event = change("t1", &obs, Operation::Create, 1);
    // At 2026-01-01 the window is one day wide: 2025-06-01 is outside it.
    assert!(matcher.matches(&event, Some(&obs), datetime!(2026-01-01 0:00 UTC)).expect("m").is_empty());
    // Ten years later the window widens by a year on each side.
    assert_eq!(ids(matcher.matches(&event, Some(&obs), datetime!(2036-01-01 0:00 UTC)).expect("m")), ["ap"]);
}

#[test]
fn deletes_match_on_the_last_version_or_on_identity_alone() {
    let mut matcher = Matcher::new();
    matcher.upsert(subscription("t1", "all", 1, "Observation"));
    matcher.upsert(subscription("t1", "this-one", 1, "Observation?_id=o1"));
    matcher.upsert(subscription("t1", "that-one", 1, "Observation?_id=o2"));
    matcher.upsert(subscription("t1", "final", 1, "Observation?status=final"));
    matcher.upsert(subscription("t1", "not-final", 1, "Observation?status:not=final"));

    let last = observation("o1", "1975-2", "final");
    let deleted = change("t1", &last, Operation::Delete, 3);
    assert_eq!(deleted.resource, None);
    // Without the last version: only criteria that need no body.
    assert_eq!(matched(&matcher, &deleted, None), ["all", "this-one"]);
    // With it: whatever that version matched.
    assert_eq!(matched(&matcher, &deleted, Some(&last)), ["all", "final", "this-one"]);
}

#[test]
fn live_versions_need_their_body_and_the_right_resource() {
    let mut matcher = Matcher::new();
    matcher.upsert(subscription("t1", "all", 1, "Observation"));
    let obs = observation("o1", "1975-2", "final");
    let event = change("t1", &obs, Operation::Update, 2);
    assert_eq!(matcher.matches(&event, None, NOW), Err(MatchError::BodyRequired));
    let other = observation("o2", "1975-2", "final");
    assert_eq!(
        matcher.matches(&event, Some(&other), NOW),
        Err(MatchError::WrongResource { expected: "Observation/o1".to_owned(), found: "Observation/o2".to_owned() })
    );
    let patient = json!({"resourceType": "Patient", "id": "o1"});
    assert!(matches!(matcher.matches(&event, Some(&patient), NOW), Err(MatchError::WrongResource { .. })));
    // Pre-extracted values: the same answer; none for a live version means no match.
    assert_eq!(matcher.matching_extracted(&event, Some(extract(&obs)), NOW).len(), 1);
    assert!(matcher.matching_extracted(&event, None, NOW).is_empty());
}

#[test]
fn versions_only_move_forward() {
    let mut matcher = Matcher::new();
    assert_eq!(matcher.upsert(subscription("t1", "s", 2, "Observation?status=final")), Upserted::Added);
    assert_eq!(matcher.upsert(subscription("t1", "s", 1, "Observation")), Upserted::Stale);
    assert_eq!(
        matcher.get(&tenant("t1"), &id("s")).map(|s| s.criteria().as_str().to_owned()),
        Some("Observation?status=final".to_owned())
    );
    assert_eq!(matcher.upsert(subscription("t1", "s", 2, "Observation?status=final")), Upserted::Replaced);

    // The criteria type changes: the subscription moves to the other type's bucket.
    assert_eq!(matcher.upsert(subscription("t1", "s", 3, "Patient")), Upserted::Replaced);
    let obs = observation("o1", "1975-2", "final");
    assert!(matched(&matcher, &change("t1", &obs, Operation::Create, 1), Some(&obs)).is_empty());
    let patient = json!({"resourceType": "Patient", "id": "p1"});
    assert_eq!(matched(&matcher, &change("t1", &patient, Operation::Create, 1), Some(&patient)), ["s"]);

    // Deleted at version 4: a redelivered version 3 does not resurrect it.
    assert_eq!(matcher.remove(&tenant("t1"), &id("s"), 4).map(|s| s.version_id()), Some(3));
    assert_eq!(matcher.upsert(subscription("t1", "s", 3, "Patient")), Upserted::Stale);
    assert!(matcher.is_empty());
    // A stale delete does not remove a newer version.
    matcher.upsert(subscription("t1", "s", 6, "Patient"));
    assert!(matcher.remove(&tenant("t1"), &id("s"), 5).is_none());
    assert_eq!(matcher.len(), 1);
}

#[test]
fn off_subscriptions_are_not_held_and_ended_ones_match_nothing() {
    let mut matcher = Matcher::new();
    matcher.upsert(subscription("t1", "s", 1, "Observation"));
    assert_eq!(matcher.upsert(subscription_with("t1", "s", 2, "Observation", "off", None)), Upserted::Removed);
    assert!(matcher.get(&tenant("t1"), &id("s")).is_none());
    assert_eq!(matcher.upsert(subscription_with("t1", "new-off", 1, "Observation", "off", None)), Upserted::Removed);

    matcher.upsert(subscription_with("t1", "ended", 1, "Observation", "active", Some("2026-02-01T00:00:00Z")));
    matcher.upsert(subscription_with("t1", "ending", 1, "Observation", "error", Some("2026-04-01T00:00:00Z")));
    matcher.upsert(subscription_with("t1", "requested", 1, "Observation", "requested", None));
    matcher.upsert(subscription_with("t2", "ended", 1, "Patient", "active", Some("2026-01-01T00:00:00Z")));
    let obs = observation("o1", "1975-2", "final");
    assert_eq!(matched(&matcher, &change("t1", &obs, Operation::Create, 1), Some(&obs)), ["ending", "requested"]);
    assert_eq!(matcher.deliverable_count(&tenant("t1"), NOW), 2);
    assert_eq!(matcher.deliverable_count(&tenant("t2"), NOW), 0);
    assert_eq!(matcher.deliverable_count(&tenant("nobody"), NOW), 0);
    assert_eq!(matcher.expired(NOW), [(tenant("t1"), id("ended")), (tenant("t2"), id("ended"))]);
    assert_eq!(matcher.expired(datetime!(2026-05-01 0:00 UTC)).len(), 3);
}

#[test]
fn match_errors_read_well() {
    assert_eq!(
        MatchError::WrongResource { expected: "Observation/o1".to_owned(), found: "Patient/o1".to_owned() }.to_string(),
        "the resource passed is Patient/o1, not the changed Observation/o1"
    );
}

#[test]
fn a_reload_drops_what_it_no_longer_finds_in_that_tenant_only() {
    let mut matcher = Matcher::new();
    matcher.upsert(subscription("a", "keep", 1, "Observation?status=final"));
    matcher.upsert(subscription("a", "gone", 2, "Observation?status=final"));
    matcher.upsert(subscription("b", "gone", 1, "Observation?status=final"));
    let keep = std::collections::HashSet::from([id("keep")]);
    assert_eq!(ids(matcher.retain(&tenant("a"), &keep)), ["gone"]);
    assert!(matcher.get(&tenant("a"), &id("keep")).is_some());
    assert!(matcher.get(&tenant("a"), &id("gone")).is_none());
    assert!(matcher.get(&tenant("b"), &id("gone")).is_some(), "another tenant's subscriptions are untouched");
    assert!(matcher.retain(&tenant("unknown"), &keep).is_empty());
    // The dropped version stays seen: a late event of it does not bring it back.
    assert_eq!(matcher.upsert(subscription("a", "gone", 1, "Observation?status=final")), Upserted::Stale);
}
