//! Subscriptions are validated on every write path — create, update, conditional create and
//! update, PATCH, transaction and batch entries — with a 400 naming each problem's element, and a
//! tenant may have at most `notifier.max_active_per_tenant` Subscriptions that are not `off`
//! (422). The notifier is disabled: this is the resource service's validation, nothing is sent.

use fhirmesh_testkit::{TestServer, status_and_json};
use serde_json::{Value, json};

const FHIR_JSON: &str = "application/fhir+json";
const JSON_PATCH: &str = "application/json-patch+json";

/// A server whose notifier does not run, adjusted by `adjust`.
async fn start(adjust: impl FnOnce(&mut fhirmesh::Config)) -> TestServer {
    TestServer::start_with(|config| {
        config.notifier.enabled = false;
        adjust(config);
    })
    .await
}

async fn send(server: &TestServer, method: &str, path: &str, content_type: &str, body: &Value) -> (u16, Value) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("a method");
    let request = server.client.request(method, server.url(path)).header("content-type", content_type);
    status_and_json(request.body(body.to_string()).send().await.expect("sent")).await
}

fn subscription(endpoint: &str) -> Value {
    json!({
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "lab results",
        "criteria": "Observation?code=1234-5",
        "channel": {"type": "rest-hook", "endpoint": endpoint, "payload": "application/fhir+json"}
    })
}

fn valid() -> Value {
    subscription("https://hooks.example.com/x")
}

/// `resource` with the element at `path` (`/channel/endpoint`, objects only) set to `value`.
fn with(mut resource: Value, path: &str, value: Value) -> Value {
    let slot = path.split('/').skip(1).fold(&mut resource, |parent, key| &mut parent[key]);
    *slot = value;
    resource
}

fn with_status(resource: Value, status: &str) -> Value {
    with(resource, "/status", json!(status))
}

/// The (expression, diagnostics) of every issue of an OperationOutcome.
fn issues(outcome: &Value) -> Vec<(String, String)> {
    assert_eq!(outcome["resourceType"], "OperationOutcome", "not an OperationOutcome: {outcome}");
    outcome["issue"]
        .as_array()
        .expect("issues")
        .iter()
        .map(|issue| {
            assert_eq!(issue["severity"], "error", "{outcome}");
            let expression = issue["expression"][0].as_str().unwrap_or_default().to_owned();
            (expression, issue["diagnostics"].as_str().unwrap_or_default().to_owned())
        })
        .collect()
}

/// Asserts a 400 with exactly one issue, at `expression`, whose message contains `message`.
fn assert_refused(case: &str, (status, outcome): &(u16, Value), expression: &str, message: &str) {
    assert_eq!(*status, 400, "{case}: {outcome}");
    let found = issues(outcome);
    assert_eq!(found.len(), 1, "{case}: one issue per problem: {outcome}");
    assert_eq!(found[0].0, expression, "{case}: {outcome}");
    assert!(found[0].1.contains(message), "{case}: {:?} should contain {message:?}", found[0].1);
}

/// Asserts a 422 naming the limit of 2.
fn assert_over_limit(case: &str, (status, outcome): &(u16, Value)) {
    assert_eq!(*status, 422, "{case}: {outcome}");
    let found = issues(outcome);
    assert!(found[0].1.contains("the most this server allows is 2"), "{case}: {outcome}");
    assert!(found[0].0.ends_with("status"), "{case}: {outcome}");
}

/// How many Subscriptions the tenant at `prefix` has (with `status`, if given).
async fn count(server: &TestServer, prefix: &str, status: Option<&str>) -> u64 {
    let filter = status.map(|status| format!("&status={status}")).unwrap_or_default();
    let (code, bundle) = server.get(&format!("{prefix}Subscription?_summary=count{filter}")).await;
    assert_eq!(code, 200, "{bundle}");
    bundle["total"].as_u64().expect("a total")
}

/// Each invalid Subscription with the element the 400 must name and a word of its message.
fn invalid_cases() -> Vec<(&'static str, Value, &'static str, &'static str)> {
    vec![
        (
            "unknown criteria parameter",
            with(valid(), "/criteria", json!("Observation?flavour=sweet")),
            "Subscription.criteria",
            "flavour",
        ),
        (
            "chained criteria",
            with(valid(), "/criteria", json!("Observation?subject:Patient.name=peter")),
            "Subscription.criteria",
            "chained",
        ),
        (
            "unknown criteria type",
            with(valid(), "/criteria", json!("Unicorn?name=x")),
            "Subscription.criteria",
            "Unicorn",
        ),
        (
            "websocket channel",
            with(valid(), "/channel/type", json!("websocket")),
            "Subscription.channel.type",
            "websocket",
        ),
        (
            "http endpoint",
            subscription("http://hooks.example.com/x"),
            "Subscription.channel.endpoint",
            "endpoint refused",
        ),
        ("loopback endpoint", subscription("https://127.0.0.1/"), "Subscription.channel.endpoint", "endpoint refused"),
        ("private endpoint", subscription("https://10.0.0.1/"), "Subscription.channel.endpoint", "endpoint refused"),
        ("IPv6 loopback endpoint", subscription("https://[::1]/"), "Subscription.channel.endpoint", "endpoint refused"),
        (
            "bad header",
            with(valid(), "/channel/header", json!(["X-Good: yes", "Bad Header: x"])),
            "Subscription.channel.header[1]",
            "Bad Header",
        ),
        (
            "xml payload",
            with(valid(), "/channel/payload", json!("application/fhir+xml")),
            "Subscription.channel.payload",
            "JSON only",
        ),
    ]
}

#[tokio::test]
async fn invalid_subscriptions_are_refused_on_create_update_and_conditional_writes() {
    let server = start(|_| {}).await;
    let (status, created) = server.create(&valid()).await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["channel"]["endpoint"], "https://hooks.example.com/x");
    let id = created["id"].as_str().expect("an id").to_owned();

    for (case, resource, expression, message) in invalid_cases() {
        assert_refused(case, &server.create(&resource).await, expression, message);
        let update = with(resource.clone(), "/id", json!(id));
        assert_refused(
            &format!("{case} (update)"),
            &send(&server, "PUT", &format!("Subscription/{id}"), FHIR_JSON, &update).await,
            expression,
            message,
        );
        assert_refused(
            &format!("{case} (update as create)"),
            &send(&server, "PUT", "Subscription/new-one", FHIR_JSON, &with(resource.clone(), "/id", json!("new-one")))
                .await,
            expression,
            message,
        );
        assert_refused(
            &format!("{case} (conditional update)"),
            &send(&server, "PUT", "Subscription?url=https://hooks.example.com/x", FHIR_JSON, &resource).await,
            expression,
            message,
        );
        let request = server
            .client
            .post(server.url("Subscription"))
            .header("content-type", FHIR_JSON)
            .header("if-none-exist", "url=https://nowhere.example.com/")
            .body(resource.to_string());
        let response = status_and_json(request.send().await.expect("sent")).await;
        assert_refused(&format!("{case} (conditional create)"), &response, expression, message);
    }

    // Several problems: one issue each, every element named.
    let (status, outcome) =
        server.create(&with(subscription("https://10.0.0.1/"), "/channel/type", json!("sms"))).await;
    assert_eq!(status, 400, "{outcome}");
    let expressions: Vec<String> = issues(&outcome).into_iter().map(|(expression, _)| expression).collect();
    assert_eq!(expressions, ["Subscription.channel.type", "Subscription.channel.endpoint"], "{outcome}");

    // Nothing was written: the valid one is there, unchanged.
    assert_eq!(count(&server, "", None).await, 1);
    let (_, stored) = server.get(&format!("Subscription/{id}")).await;
    assert_eq!(stored["meta"]["versionId"], "1", "{stored}");
    server.stop().await;
}

#[tokio::test]
async fn allow_listed_endpoints_are_accepted_and_nothing_else_is() {
    let server = start(|config| config.notifier.allow_endpoints = vec!["127.0.0.1".into()]).await;
    let (status, created) = server.create(&subscription("http://127.0.0.1:9/")).await;
    assert_eq!(status, 201, "an allow-listed host, http included: {created}");
    let (status, created) = server.create(&subscription("https://127.0.0.1/hooks")).await;
    assert_eq!(status, 201, "{created}");
    for endpoint in ["https://10.0.0.1/", "https://127.0.0.2/", "http://hooks.example.com/x"] {
        let response = server.create(&subscription(endpoint)).await;
        assert_refused(endpoint, &response, "Subscription.channel.endpoint", "endpoint refused");
    }
    server.stop().await;

    // allow_insecure_http opens http to public hosts, never to private ones.
    let server = start(|config| config.notifier.allow_insecure_http = true).await;
    let (status, created) = server.create(&subscription("http://hooks.example.com/x")).await;
    assert_eq!(status, 201, "{created}");
    let response = server.create(&subscription("http://127.0.0.1:9/")).await;
    assert_refused("loopback over http", &response, "Subscription.channel.endpoint", "endpoint refused");
    server.stop().await;
}

#[tokio::test]
async fn a_patch_is_validated_on_its_result() {
    let server = start(|_| {}).await;
    let (status, created) = server.create(&valid()).await;
    assert_eq!(status, 201, "{created}");
    let path = format!("Subscription/{}", created["id"].as_str().expect("an id"));

    let breaks = json!([{"op": "replace", "path": "/channel/endpoint", "value": "https://10.0.0.1/"}]);
    let response = send(&server, "PATCH", &path, JSON_PATCH, &breaks).await;
    assert_refused("patched to a private endpoint", &response, "Subscription.channel.endpoint", "endpoint refused");
    let chains = json!([{"op": "replace", "path": "/criteria", "value": "Observation?patient.name=x"}]);
    let response = send(&server, "PATCH", &path, JSON_PATCH, &chains).await;
    assert_refused("patched to a chain", &response, "Subscription.criteria", "chained");
    let (_, stored) = server.get(&path).await;
    assert_eq!(stored["meta"]["versionId"], "1", "nothing written: {stored}");

    let fine = json!([{"op": "replace", "path": "/channel/endpoint", "value": "https://hooks.example.com/y"}]);
    let (status, patched) = send(&server, "PATCH", &path, JSON_PATCH, &fine).await;
    assert_eq!(status, 200, "{patched}");
    assert_eq!(patched["channel"]["endpoint"], "https://hooks.example.com/y");
    server.stop().await;
}

fn entry(method: &str, url: &str, resource: Option<Value>) -> Value {
    let mut entry = json!({"request": {"method": method, "url": url}});
    if let Some(resource) = resource {
        entry["resource"] = resource;
    }
    entry
}

fn bundle(kind: &str, entries: Vec<Value>) -> Value {
    json!({"resourceType": "Bundle", "type": kind, "entry": entries})
}

fn statuses(response: &Value) -> Vec<String> {
    let entries = response["entry"].as_array().expect("entries");
    entries.iter().map(|e| e["response"]["status"].as_str().expect("a status").to_owned()).collect()
}

#[tokio::test]
async fn bundles_validate_every_subscription_entry() {
    let server = start(|_| {}).await;
    let patient = json!({"resourceType": "Patient", "name": [{"family": "Bundle"}]});

    // A transaction with one bad Subscription is refused whole, the entry named.
    for (case, resource, expression, message) in invalid_cases() {
        let transaction = bundle(
            "transaction",
            vec![
                entry("POST", "Patient", Some(patient.clone())),
                entry("POST", "Subscription", Some(valid())),
                entry("POST", "Subscription", Some(resource)),
            ],
        );
        let response = send(&server, "POST", "", FHIR_JSON, &transaction).await;
        let expression = expression.replacen("Subscription", "Bundle.entry[2].resource", 1);
        assert_refused(&format!("{case} (transaction)"), &response, &expression, message);
    }
    assert_eq!(count(&server, "", None).await, 0, "no Subscription of a refused transaction was written");
    let (_, patients) = server.get("Patient?_summary=count").await;
    assert_eq!(patients["total"], 0, "nor anything else: {patients}");

    // A batch: only the bad entries fail.
    let email = with(valid(), "/channel/type", json!("email"));
    let batch = bundle(
        "batch",
        vec![
            entry("POST", "Subscription", Some(valid())),
            entry("POST", "Subscription", Some(subscription("https://[::1]/"))),
            entry("POST", "Patient", Some(patient.clone())),
            entry("PUT", "Subscription/batch-put", Some(with(email.clone(), "/id", json!("batch-put")))),
        ],
    );
    let (status, response) = send(&server, "POST", "", FHIR_JSON, &batch).await;
    assert_eq!(status, 200, "{response}");
    assert_eq!(statuses(&response), ["201 Created", "400 Bad Request", "201 Created", "400 Bad Request"], "{response}");
    let expression =
        |index: usize| response["entry"][index]["response"]["outcome"]["issue"][0]["expression"][0].clone();
    assert_eq!(expression(1), "Bundle.entry[1].resource.channel.endpoint", "{response}");
    assert_eq!(expression(3), "Bundle.entry[3].resource.channel.type", "{response}");
    assert_eq!(count(&server, "", None).await, 1);
    server.stop().await;
}

#[tokio::test]
async fn a_tenant_has_at_most_the_configured_active_subscriptions() {
    let server = start(|config| config.notifier.max_active_per_tenant = 2).await;
    let create = |resource: Value| {
        let server = &server;
        async move { server.create(&resource).await }
    };
    let (status, first) = create(valid()).await;
    assert_eq!(status, 201, "{first}");
    let (status, second) = create(with_status(valid(), "active")).await;
    assert_eq!(status, 201, "{second}");
    let first_id = first["id"].as_str().expect("an id").to_owned();
    let second_id = second["id"].as_str().expect("an id").to_owned();

    // The third that is not off is one too many, right after the second (read-your-writes).
    assert_over_limit("third requested", &create(valid()).await);
    assert_over_limit("third error", &create(with_status(valid(), "error")).await);
    // An invalid one is invalid first.
    assert_eq!(create(subscription("https://10.0.0.1/")).await.0, 400);
    // Off ones do not count, and past the end is off.
    let (status, off) = create(with_status(valid(), "off")).await;
    assert_eq!(status, 201, "{off}");
    let off_id = off["id"].as_str().expect("an id").to_owned();

    // Updating one that already counts is fine at the limit.
    let update = with(with_status(second.clone(), "active"), "/channel/endpoint", json!("https://hooks.example.com/z"));
    let (status, updated) = send(&server, "PUT", &format!("Subscription/{second_id}"), FHIR_JSON, &update).await;
    assert_eq!(status, 200, "{updated}");
    // Turning an off one on is not, by PUT or PATCH, nor creating one by update-as-create.
    let off_path = format!("Subscription/{off_id}");
    let on = with_status(off.clone(), "requested");
    assert_over_limit("off → requested", &send(&server, "PUT", &off_path, FHIR_JSON, &on).await);
    let patch = json!([{"op": "replace", "path": "/status", "value": "active"}]);
    assert_over_limit("patched on", &send(&server, "PATCH", &off_path, JSON_PATCH, &patch).await);
    let put_new = with(valid(), "/id", json!("put-new"));
    assert_over_limit("update as create", &send(&server, "PUT", "Subscription/put-new", FHIR_JSON, &put_new).await);
    // In Bundles: a transaction is judged as a whole; a batch entry fails alone.
    let two_more = bundle(
        "transaction",
        vec![entry("POST", "Subscription", Some(valid())), entry("POST", "Subscription", Some(valid()))],
    );
    let response = send(&server, "POST", "", FHIR_JSON, &two_more).await;
    assert_eq!(response.0, 422, "{}", response.1);
    assert_eq!(issues(&response.1)[0].0, "Bundle.entry[0].resource.status", "{}", response.1);
    let swap = bundle(
        "transaction",
        vec![
            entry("PUT", &format!("Subscription/{first_id}"), Some(with_status(first.clone(), "off"))),
            entry("POST", "Subscription", Some(valid())),
        ],
    );
    let (status, swapped) = send(&server, "POST", "", FHIR_JSON, &swap).await;
    assert_eq!(status, 200, "one off and one on stays at the limit: {swapped}");
    let batch = bundle(
        "batch",
        vec![
            entry("POST", "Subscription", Some(valid())),
            entry("POST", "Subscription", Some(with_status(valid(), "off"))),
        ],
    );
    let (status, response) = send(&server, "POST", "", FHIR_JSON, &batch).await;
    assert_eq!(status, 200, "{response}");
    assert_eq!(statuses(&response), ["422 Unprocessable Entity", "201 Created"], "{response}");
    assert_eq!(count(&server, "", Some("requested,active,error")).await, 2);

    // Off, one frees a place; deleted, too.
    let off_again = with_status(second.clone(), "off");
    let (status, _) = send(&server, "PUT", &format!("Subscription/{second_id}"), FHIR_JSON, &off_again).await;
    assert_eq!(status, 200);
    let (status, third) = create(valid()).await;
    assert_eq!(status, 201, "{third}");
    let third_path = format!("Subscription/{}", third["id"].as_str().expect("an id"));
    let response = server.client.delete(server.url(&third_path)).send().await.expect("sent");
    assert_eq!(response.status().as_u16(), 204);
    let (status, fourth) = create(valid()).await;
    assert_eq!(status, 201, "{fourth}");
    assert_eq!(count(&server, "", Some("requested,active,error")).await, 2);
    // One whose end has passed is effectively off: accepted at the limit. (It counts among the
    // others, by its status, until the notifier writes it `off`.)
    let (status, ended) = create(with(valid(), "/end", json!("2020-01-01T00:00:00Z"))).await;
    assert_eq!(status, 201, "{ended}");
    server.stop().await;
}

#[tokio::test]
async fn each_tenant_has_its_own_count() {
    let server = start(|config| {
        config.tenancy.enabled = true;
        config.notifier.max_active_per_tenant = 1;
    })
    .await;
    let post = |tenant: &'static str| {
        let server = &server;
        async move { send(server, "POST", &format!("tenant/{tenant}/Subscription"), FHIR_JSON, &valid()).await }
    };
    assert_eq!(post("a").await.0, 201);
    let (status, outcome) = post("a").await;
    assert_eq!(status, 422, "{outcome}");
    assert!(issues(&outcome)[0].1.contains("the most this server allows is 1"), "{outcome}");
    assert_eq!(post("b").await.0, 201, "tenant a's subscription does not count in tenant b");
    assert_eq!(post("b").await.0, 422);
    assert_eq!(count(&server, "tenant/a/", None).await, 1);
    assert_eq!(count(&server, "tenant/b/", None).await, 1);
    server.stop().await;
}
