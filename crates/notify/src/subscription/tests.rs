use serde_json::json;
use time::macros::datetime;

use super::*;

fn valid() -> Value {
    json!({
        "resourceType": "Subscription",
        "id": "sub-1",
        "meta": {"versionId": "3", "lastUpdated": "2026-01-01T00:00:00.000Z"},
        "status": "requested",
        "reason": "monitor bilirubin",
        "criteria": "Observation?code=http://loinc.org|1975-2",
        "channel": {
            "type": "rest-hook",
            "endpoint": "https://hooks.example.org/fhir",
            "payload": "application/fhir+json",
            "header": ["Authorization: Bearer secret-token-abc-123", "X-Customer:  mount-auburn "]
        }
    })
}

fn policy() -> EndpointPolicy {
    EndpointPolicy::strict()
}

fn parse(resource: &Value) -> Result<SubscriptionSpec, FhirError> {
    SubscriptionSpec::parse(resource, &policy())
}

/// The issues of a refused resource as (expression, code, diagnostics).
fn issues(resource: &Value) -> Vec<(String, IssueType, String)> {
    match parse(resource) {
        Ok(spec) => panic!("expected a refusal, parsed {spec:?}"),
        Err(error) => {
            assert_eq!(error.category, ErrorCategory::Invalid);
            assert_eq!(error.http_status(), 400);
            error.issues.into_iter().map(|i| (i.expression.unwrap_or_default(), i.code, i.diagnostics)).collect()
        }
    }
}

fn with(mut resource: Value, pointer: &str, value: Value) -> Value {
    match resource.pointer_mut(pointer) {
        Some(slot) => *slot = value,
        None => panic!("no {pointer}"),
    }
    resource
}

fn without(mut resource: Value, parent: &str, key: &str) -> Value {
    if let Some(object) = resource.pointer_mut(parent).and_then(Value::as_object_mut) {
        object.remove(key);
    }
    resource
}

fn criteria_issues(criteria: &str) -> Vec<(String, IssueType, String)> {
    issues(&with(valid(), "/criteria", json!(criteria)))
}

#[test]
fn a_valid_subscription_parses_into_its_parts() {
    let spec = parse(&valid()).expect("valid");
    assert_eq!(spec.status(), SubscriptionStatus::Requested);
    assert_eq!(spec.criteria().as_str(), "Observation?code=http://loinc.org|1975-2");
    assert_eq!(spec.criteria().resource_type().as_str(), "Observation");
    assert_eq!(spec.criteria().query().criteria.len(), 1);
    assert!(!spec.criteria().decidable_without_body());
    let channel = spec.channel();
    assert_eq!(channel.endpoint().as_str(), "https://hooks.example.org/fhir");
    assert_eq!(channel.payload().map(Payload::content_type), Some("application/fhir+json"));
    assert_eq!(
        channel.headers(),
        [
            ("Authorization".to_owned(), "Bearer secret-token-abc-123".to_owned()),
            ("X-Customer".to_owned(), "mount-auburn".to_owned())
        ]
    );
    assert_eq!(channel.signing_secret(), None);
    let debug = format!("{spec:?}");
    assert!(debug.contains(r#"header_names: ["Authorization", "X-Customer"]"#), "{debug}");
    assert!(!debug.contains("secret-token-abc-123"), "header values must not be in Debug output: {debug}");
    assert_eq!(spec.end(), None);
    assert_eq!(spec.error(), None);
}

#[test]
fn every_problem_is_reported_at_once_with_its_expression() {
    let resource = json!({
        "resourceType": "Subscription",
        "status": "paused",
        "criteria": "Observation?foo=bar",
        "channel": {"type": "email", "endpoint": "http://10.0.0.1/", "payload": "application/fhir+xml"},
        "end": "2030-01-01"
    });
    let found = issues(&resource);
    let expressions: Vec<&str> = found.iter().map(|(e, _, _)| e.as_str()).collect();
    assert_eq!(
        expressions,
        [
            "Subscription.status",
            "Subscription.criteria",
            "Subscription.channel.type",
            "Subscription.channel.endpoint",
            "Subscription.channel.payload",
            "Subscription.end"
        ]
    );
    assert_eq!(found[0].1, IssueType::Value);
    assert_eq!(found[0].2, "status must be requested, active, error or off, not 'paused'");
    assert_eq!(found[2].1, IssueType::NotSupported);
    assert_eq!(found[2].2, "channel type 'email' is not supported: this server delivers rest-hook only");
    assert_eq!(found[3].1, IssueType::Security);
    assert_eq!(found[3].2, "endpoint refused: address 10.0.0.1 is private and not allowed by this server");
    assert_eq!(found[4].1, IssueType::NotSupported);
    assert!(
        found[4]
            .2
            .starts_with("payload 'application/fhir+xml' is not supported: this server sends resources as JSON only")
    );
}

#[test]
fn the_error_renders_as_an_operation_outcome() {
    let error = parse(&with(valid(), "/channel/type", json!("websocket"))).expect_err("websocket");
    let outcome = error.to_operation_outcome();
    assert_eq!(
        outcome,
        json!({
            "resourceType": "OperationOutcome",
            "issue": [{
                "severity": "error",
                "code": "not-supported",
                "diagnostics": "channel type 'websocket' is not supported: this server delivers rest-hook only",
                "expression": ["Subscription.channel.type"]
            }]
        })
    );
}

#[test]
fn required_elements_are_named() {
    let resource = json!({"resourceType": "Subscription", "channel": {}});
    let found = issues(&resource);
    assert_eq!(
        found,
        [
            ("Subscription.status".to_owned(), IssueType::Required, "Subscription.status is required".to_owned()),
            ("Subscription.criteria".to_owned(), IssueType::Required, "Subscription.criteria is required".to_owned()),
            (
                "Subscription.channel.type".to_owned(),
                IssueType::Required,
                "Subscription.channel.type is required".to_owned()
            ),
            (
                "Subscription.channel.endpoint".to_owned(),
                IssueType::Required,
                "Subscription.channel.endpoint is required".to_owned()
            ),
        ]
    );
    let no_channel = issues(&without(valid(), "", "channel"));
    assert_eq!(
        no_channel,
        [("Subscription.channel".to_owned(), IssueType::Required, "Subscription.channel is required".to_owned())]
    );
    let not_a_subscription = issues(&json!({"resourceType": "Patient"}));
    assert_eq!(not_a_subscription[0].0, "Subscription");
    assert_eq!(not_a_subscription[0].1, IssueType::Structure);
}

#[test]
fn unknown_channel_types_are_invalid_values() {
    let found = issues(&with(valid(), "/channel/type", json!("carrier-pigeon")));
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].1, IssueType::Value);
    assert!(found[0].2.starts_with("unknown channel type 'carrier-pigeon'"), "{}", found[0].2);
}

#[test]
fn statuses_parse_and_round_trip() {
    for (text, status) in [
        ("requested", SubscriptionStatus::Requested),
        ("active", SubscriptionStatus::Active),
        ("error", SubscriptionStatus::Error),
        ("off", SubscriptionStatus::Off),
    ] {
        assert_eq!(SubscriptionStatus::parse(text), Some(status));
        assert_eq!(status.as_str(), text);
        assert_eq!(parse(&with(valid(), "/status", json!(text))).expect(text).status(), status);
        assert_eq!(status.delivers(), status != SubscriptionStatus::Off);
    }
    assert_eq!(SubscriptionStatus::parse("Active"), None);
}

#[test]
fn criteria_are_parsed_by_the_search_parser() {
    let spec = parse(&with(valid(), "/criteria", json!("Patient?family=O%27Brien&birthdate=ge2000&gender=female")))
        .expect("criteria");
    assert_eq!(spec.criteria().resource_type().as_str(), "Patient");
    let params: Vec<&str> = spec.criteria().query().applied.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(params, ["family", "birthdate", "gender"]);
    assert_eq!(spec.criteria().query().applied[0].1, "O'Brien");

    // A bare type (every change of the type) and a trailing '?' are fine.
    for text in ["Observation", "Observation?", " Observation? "] {
        let spec = parse(&with(valid(), "/criteria", json!(text))).expect(text);
        assert!(spec.criteria().query().criteria.is_empty());
        assert!(spec.criteria().decidable_without_body());
    }
    // _format and _pretty are ignored, as in search.
    let spec = parse(&with(valid(), "/criteria", json!("Observation?_format=json&status=final"))).expect("format");
    assert_eq!(spec.criteria().query().criteria.len(), 1);
}

#[test]
fn criteria_refuse_unknown_types_and_non_type_level_searches() {
    assert_eq!(
        criteria_issues("Observaton?code=1"),
        [(
            "Subscription.criteria".to_owned(),
            IssueType::Value,
            "Subscription.criteria names an unknown resource type 'Observaton'".to_owned()
        )]
    );
    for text in ["?_type=Patient", "Patient/1/Observation?code=1", "https://example.org/fhir/Observation?code=1", ""] {
        let found = criteria_issues(text);
        assert_eq!(found.len(), 1, "{text}");
        assert!(found[0].2.starts_with("Subscription.criteria must be a type-level search"), "{text}: {}", found[0].2);
    }
}

#[test]
fn criteria_refuse_unknown_parameters_and_bad_values_from_the_parser() {
    let found = criteria_issues("Observation?foo=bar&date=yesterday");
    assert_eq!(found.len(), 2);
    assert!(found.iter().all(|(e, _, _)| e == "Subscription.criteria"));
    assert!(found[0].2.contains("'foo'"), "{}", found[0].2);
    assert_eq!(found[0].1, IssueType::NotSupported);
    assert!(found[1].2.contains("'date'"), "{}", found[1].2);
    assert_eq!(found[1].1, IssueType::Invalid);
}

#[test]
fn criteria_refuse_chains_and_has_naming_the_parameter() {
    let found = criteria_issues("Observation?subject:Patient.name=peter&status=final");
    assert_eq!(
        found,
        [(
            "Subscription.criteria".to_owned(),
            IssueType::NotSupported,
            "'subject:Patient.name' is a chained parameter, which Subscription.criteria does not support: it is \
             matched against one resource alone"
                .to_owned()
        )]
    );
    let found = criteria_issues("Patient?_has:Observation:patient:code=1234-5");
    assert_eq!(found.len(), 1);
    assert_eq!(
        found[0].2,
        "'_has:Observation:patient:code' is reverse chaining (_has), which Subscription.criteria does not support: \
         it is matched against one resource alone"
    );
    let found = criteria_issues("Observation?subject.gender:missing=true");
    assert_eq!(found.len(), 1);
    assert!(found[0].2.starts_with("'subject.gender:missing' is a chained parameter"), "{}", found[0].2);
}

#[test]
fn criteria_refuse_result_parameters() {
    let found = criteria_issues("Observation?code=1&_sort=date&_count=5&_include=Observation:subject&_summary=true");
    let names: Vec<&str> = found.iter().map(|(_, _, d)| d.split('\'').nth(1).unwrap_or_default()).collect();
    assert_eq!(names, ["_sort", "_count", "_include", "_summary"]);
    assert!(found.iter().all(|(_, code, _)| *code == IssueType::NotSupported));
    assert_eq!(found[0].2, "'_sort' shapes search results and has no meaning in Subscription.criteria; remove it");
    assert_eq!(criteria_issues("Observation?_revinclude:iterate=Provenance:target").len(), 1);
}

#[test]
fn id_only_criteria_are_decidable_without_a_body() {
    let spec = parse(&with(valid(), "/criteria", json!("Patient?_id=a,b"))).expect("id");
    assert!(spec.criteria().decidable_without_body());
    let spec = parse(&with(valid(), "/criteria", json!("Patient?_id=a&active=true"))).expect("id and more");
    assert!(!spec.criteria().decidable_without_body());
}

#[test]
fn payload_types() {
    let content_type = |payload: Value| {
        parse(&with(valid(), "/channel/payload", payload))
            .map(|s| s.channel().payload().map(|p| p.content_type().to_owned()))
    };
    assert_eq!(content_type(json!("application/json")).expect("json"), Some("application/json".to_owned()));
    assert_eq!(
        content_type(json!("Application/FHIR+JSON;fhirVersion=4.0")).expect("params"),
        Some("application/fhir+json; fhirVersion=4.0".to_owned())
    );
    let no_payload = parse(&without(valid(), "/channel", "payload")).expect("no payload");
    assert_eq!(no_payload.channel().payload(), None);

    for refused in ["application/fhir+xml", "text/plain", "application/fhir+json;"] {
        let found = issues(&with(valid(), "/channel/payload", json!(refused)));
        assert_eq!(found.len(), 1, "{refused}");
        assert_eq!(found[0].0, "Subscription.channel.payload");
    }
    let found = issues(&with(valid(), "/channel/payload", json!("text/plain")));
    assert_eq!(
        found[0].2,
        "payload 'text/plain' is not supported: use application/fhir+json (or leave payload out for a notification \
         without a body)"
    );
}

#[test]
fn headers_are_validated_one_by_one() {
    let headers = json!([
        "Authorization: Bearer ok",
        "no colon here",
        "Bad Name: x",
        "Host: evil.example",
        "content-length: 5",
        "X-Fhirmesh-Event-Id: forged",
        "X-Ok: line\r\nInjected: yes",
        "X-Unicode: caf\u{e9}",
        "X-Empty:",
        42
    ]);
    let found = issues(&with(valid(), "/channel/header", headers));
    let by_index: Vec<(&str, &str)> = found.iter().map(|(e, _, d)| (e.as_str(), d.as_str())).collect();
    assert_eq!(
        by_index,
        [
            ("Subscription.channel.header[1]", "expected 'Name: value', not 'no colon here'"),
            (
                "Subscription.channel.header[2]",
                "'Bad Name' is not a valid header name (letters, digits and !#$%&'*+-.^_`|~ only, no spaces)"
            ),
            (
                "Subscription.channel.header[3]",
                "header 'Host' is set by the server and cannot be set by a subscription"
            ),
            (
                "Subscription.channel.header[4]",
                "header 'content-length' is set by the server and cannot be set by a subscription"
            ),
            (
                "Subscription.channel.header[5]",
                "header 'X-Fhirmesh-Event-Id' is set by the server and cannot be set by a subscription"
            ),
            (
                "Subscription.channel.header[6]",
                "the value of header 'X-Ok' contains '\\r': only visible ASCII characters, spaces and tabs are allowed"
            ),
            (
                "Subscription.channel.header[7]",
                "the value of header 'X-Unicode' contains 'é': only visible ASCII characters, spaces and tabs are \
                 allowed"
            ),
            ("Subscription.channel.header[9]", "each header must be a 'Name: value' string"),
        ]
    );
    // An empty value is a valid header.
    let spec = parse(&with(valid(), "/channel/header", json!(["X-Empty:"]))).expect("empty value");
    assert_eq!(spec.channel().headers(), [("X-Empty".to_owned(), String::new())]);
}

#[test]
fn header_count_and_size_are_capped() {
    let many: Vec<String> = (0..=MAX_HEADERS).map(|i| format!("X-H{i}: v")).collect();
    let found = issues(&with(valid(), "/channel/header", json!(many)));
    assert_eq!(
        found,
        [(
            "Subscription.channel.header".to_owned(),
            IssueType::TooLong,
            "at most 32 headers are allowed, not 33".to_owned()
        )]
    );

    let big = format!("X-Big: {}", "a".repeat(MAX_HEADER_BYTES));
    let found = issues(&with(valid(), "/channel/header", json!([big])));
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].1, IssueType::TooLong);
    assert_eq!(found[0].2, "headers add up to 8199 bytes; at most 8192 are allowed");

    let found = issues(&with(valid(), "/channel/header", json!("Authorization: x")));
    assert_eq!(found[0].2, "header must be an array of 'Name: value' strings");
}

#[test]
fn end_is_an_instant_and_past_ends_mean_off() {
    let mut resource = with(valid(), "/status", json!("active"));
    resource["end"] = json!("2030-06-01T12:00:00+02:00");
    let spec = parse(&resource).expect("end");
    assert_eq!(spec.end(), Some(datetime!(2030-06-01 10:00 UTC)));
    assert_eq!(spec.effective_status(datetime!(2030-06-01 09:59:59 UTC)), SubscriptionStatus::Active);
    assert!(spec.is_deliverable(datetime!(2030-06-01 09:59:59 UTC)));
    assert_eq!(spec.effective_status(datetime!(2030-06-01 10:00 UTC)), SubscriptionStatus::Off);
    assert!(!spec.is_deliverable(datetime!(2031-01-01 0:00 UTC)));

    for bad in ["2030-06-01", "2030-06-01T12:00", "2030-06-01T12:00:00", "2030-13-01T00:00:00Z"] {
        let mut resource = valid();
        resource["end"] = json!(bad);
        let found = issues(&resource);
        assert_eq!(found.len(), 1, "{bad}");
        assert_eq!(found[0].0, "Subscription.end");
        assert!(found[0].2.starts_with("end must be an instant like 2030-01-01T00:00:00Z"), "{}", found[0].2);
    }
}

#[test]
fn signing_secret_comes_from_the_channel_extension() {
    let mut resource = valid();
    resource["channel"]["extension"] = json!([{"url": "http://example.org/other", "valueString": "x"}, {"url": SIGNING_SECRET_EXTENSION, "valueString": "0123456789abcdef-secret"}]);
    let spec = parse(&resource).expect("secret");
    assert_eq!(spec.channel().signing_secret().map(SigningSecret::expose), Some(&b"0123456789abcdef-secret"[..]));
    assert_eq!(format!("{:?}", spec.channel().signing_secret()), "Some(SigningSecret(***))");

    resource["channel"]["extension"] = json!([{"url": SIGNING_SECRET_EXTENSION, "valueString": "short"}]);
    let found = issues(&resource);
    assert_eq!(
        found,
        [(
            "Subscription.channel.extension[0].valueString".to_owned(),
            IssueType::Value,
            "the signing secret must have 16 to 256 characters, not 5".to_owned()
        )]
    );
    resource["channel"]["extension"] = json!([{"url": SIGNING_SECRET_EXTENSION, "valueInteger": 5}]);
    assert_eq!(issues(&resource)[0].1, IssueType::Structure);
}

#[test]
fn stored_subscriptions_need_an_id_and_a_version() {
    let tenant = TenantId::parse("acme").expect("tenant");
    let active = ActiveSubscription::from_resource(tenant.clone(), &valid(), &policy()).expect("stored");
    assert_eq!(active.tenant().as_str(), "acme");
    assert_eq!(active.id().as_str(), "sub-1");
    assert_eq!(active.version_id(), 3);
    assert_eq!(active.criteria().resource_type().as_str(), "Observation");

    let mut resource = without(valid(), "", "id");
    resource["meta"]["versionId"] = json!("three");
    resource["channel"]["type"] = json!("sms");
    let error = ActiveSubscription::from_resource(tenant, &resource, &policy()).expect_err("incomplete");
    let expressions: Vec<&str> = error.issues.iter().filter_map(|i| i.expression.as_deref()).collect();
    assert_eq!(expressions, ["Subscription.id", "Subscription.meta.versionId", "Subscription.channel.type"]);
}

#[test]
fn activation_says_what_to_write_on_load() {
    let tenant = TenantId::default_tenant();
    let load = |status: &str, end: Option<&str>| {
        let mut resource = with(valid(), "/status", json!(status));
        if let Some(end) = end {
            resource["end"] = json!(end);
        }
        ActiveSubscription::from_resource(tenant.clone(), &resource, &policy()).expect("load")
    };
    let now = datetime!(2027-01-01 0:00 UTC);
    assert_eq!(load("requested", None).activation(now), Some(Transition::ToActive));
    assert_eq!(load("active", None).activation(now), None);
    assert_eq!(load("error", None).activation(now), None);
    assert_eq!(load("off", None).activation(now), None);
    assert_eq!(load("requested", Some("2026-12-31T23:59:59Z")).activation(now), Some(Transition::ToOff));
    assert_eq!(load("error", Some("2026-12-31T23:59:59Z")).activation(now), Some(Transition::ToOff));
    assert_eq!(load("off", Some("2026-12-31T23:59:59Z")).activation(now), None);
    assert_eq!(load("requested", Some("2027-01-01T00:00:01Z")).activation(now), Some(Transition::ToActive));
}

#[test]
fn transitions_edit_the_stored_resource() {
    let mut resource = with(valid(), "/status", json!("active"));
    Transition::ToError { reason: "HTTP 500".to_owned() }.apply(&mut resource);
    assert_eq!(resource["status"], "error");
    assert_eq!(resource["error"], "HTTP 500");
    Transition::ToActive.apply(&mut resource);
    assert_eq!(resource["status"], "active");
    assert_eq!(resource.get("error"), None);
    Transition::ToOff.apply(&mut resource);
    assert_eq!(resource["status"], "off");
    assert_eq!(Transition::ToOff.status(), SubscriptionStatus::Off);
}

#[test]
fn the_tenant_limit_counts_the_others() {
    assert_eq!(check_tenant_limit(0, 1), Ok(()));
    assert_eq!(check_tenant_limit(9, 10), Ok(()));
    let error = check_tenant_limit(10, 10).expect_err("at the limit");
    assert_eq!(error.category, ErrorCategory::Unprocessable);
    assert_eq!(error.http_status(), 422);
    assert_eq!(error.issues[0].expression.as_deref(), Some("Subscription.status"));
    assert_eq!(
        error.issues[0].diagnostics,
        "this tenant already has 10 active subscriptions, the most this server allows is 10; turn one off (status \
         'off') or delete it first"
    );
    assert!(check_tenant_limit(0, 0).is_err());
}
