use fhirmesh_core::ErrorCategory;
use serde_json::json;
use time::macros::datetime;

use super::*;

const NOW: OffsetDateTime = datetime!(2026-06-01 12:00 UTC);

fn rules() -> SubscriptionWriteRules {
    SubscriptionWriteRules::new(EndpointPolicy::strict(), 2)
}

fn subscription(status: &str, endpoint: &str) -> Value {
    json!({
        "resourceType": "Subscription",
        "status": status,
        "reason": "test",
        "criteria": "Observation?code=1234-5",
        "channel": {"type": "rest-hook", "endpoint": endpoint}
    })
}

fn subscription_type() -> ResourceType {
    ResourceType::parse("Subscription").expect("a type")
}

#[test]
fn subscriptions_are_validated_with_the_policy_and_other_types_pass() {
    let rules = rules();
    assert_eq!(rules.check(subscription_type(), &subscription("requested", "https://hooks.example.com/x")), Ok(()));
    let refused = rules
        .check(subscription_type(), &subscription("requested", "https://10.0.0.1/"))
        .expect_err("a private address is refused");
    assert_eq!(refused.category, ErrorCategory::Invalid);
    assert_eq!(refused.issues[0].expression.as_deref(), Some("Subscription.channel.endpoint"));
    // A Basic that looks nothing like a Subscription is not this adapter's business.
    let basic = ResourceType::parse("Basic").expect("a type");
    assert_eq!(rules.check(basic, &json!({"resourceType": "Basic", "status": "x"})), Ok(()));
    assert_eq!(rules.tenant_limit(basic, &json!({"resourceType": "Basic"}), NOW), None);
}

#[test]
fn only_deliverable_subscriptions_count_against_the_limit() {
    let rules = rules();
    let endpoint = "https://hooks.example.com/x";
    let limit = TenantLimit { counted: vec![("status".into(), "requested,active,error".into())], max: 2 };
    for status in ["requested", "active", "error"] {
        assert_eq!(rules.tenant_limit(subscription_type(), &subscription(status, endpoint), NOW), Some(limit.clone()));
    }
    assert_eq!(rules.tenant_limit(subscription_type(), &subscription("off", endpoint), NOW), None);
    let mut ended = subscription("active", endpoint);
    ended["end"] = json!("2026-06-01T11:59:59Z");
    assert_eq!(rules.tenant_limit(subscription_type(), &ended, NOW), None, "end passed: effectively off");
    ended["end"] = json!("2026-06-01T12:00:01Z");
    assert!(rules.tenant_limit(subscription_type(), &ended, NOW).is_some(), "end ahead: counts");
    // A stored version the policy now refuses still counts by its status.
    assert!(rules.tenant_limit(subscription_type(), &subscription("active", "https://10.0.0.1/"), NOW).is_some());
}

#[test]
fn the_limit_is_judged_by_check_tenant_limit() {
    let rules = rules();
    let limit = TenantLimit { counted: Vec::new(), max: 2 };
    assert_eq!(rules.check_limit(subscription_type(), 1, &limit), Ok(()));
    let refused = rules.check_limit(subscription_type(), 2, &limit).expect_err("at the limit");
    assert_eq!(refused.http_status(), 422);
    assert!(refused.issues[0].diagnostics.contains("already has 2 active subscriptions"), "{refused:?}");
    assert!(refused.issues[0].diagnostics.contains("allows is 2"), "{refused:?}");
}
