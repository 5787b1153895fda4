//! Rest-hook Subscriptions end to end against the embedded server: a receiver on 127.0.0.1 records
//! every callback; the tests assert exactly which notifications arrive, with which method, URL,
//! headers and body (R4 rest-hook channel), and how deliveries behave when receivers fail, hang or
//! recover.

use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use fhirmesh_testkit::{TestServer, status_and_json};
use serde_json::{Value, json};

/// One callback as the receiver saw it.
#[derive(Debug, Clone)]
struct Callback {
    method: Method,
    path: String,
    headers: HeaderMap,
    body: Bytes,
}

impl Callback {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
}

/// A local receiver: records callbacks, answers `status`, after `delay_ms`.
struct Receiver {
    base: String,
    state: Arc<ReceiverState>,
}

#[derive(Default)]
struct ReceiverState {
    callbacks: Mutex<Vec<Callback>>,
    status: AtomicU16,
    delay_ms: AtomicU64,
}

async fn record(
    State(state): State<Arc<ReceiverState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let delay = state.delay_ms.load(Ordering::Acquire);
    state.callbacks.lock().expect("callbacks").push(Callback { method, path: uri.path().to_owned(), headers, body });
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    StatusCode::from_u16(state.status.load(Ordering::Acquire)).expect("a status")
}

impl Receiver {
    async fn start() -> Receiver {
        let state = Arc::new(ReceiverState { status: AtomicU16::new(200), ..ReceiverState::default() });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the receiver");
        let base = format!("http://{}", listener.local_addr().expect("receiver address"));
        let router = axum::Router::new().fallback(record).with_state(state.clone());
        tokio::spawn(async move { axum::serve(listener, router).await });
        Receiver { base, state }
    }

    fn callbacks(&self) -> Vec<Callback> {
        self.state.callbacks.lock().expect("callbacks").clone()
    }

    fn answer(&self, status: u16) {
        self.state.status.store(status, Ordering::Release);
    }

    /// Waits (at most 20 s) until at least `count` callbacks arrived, then a little longer so that
    /// an unexpected extra one would show; returns them all.
    async fn wait_for(&self, count: usize) -> Vec<Callback> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.callbacks().len() < count && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
        self.callbacks()
    }
}

/// An embedded server whose notifier may call 127.0.0.1 over http, retrying fast.
async fn server(adjust: impl FnOnce(&mut fhirmesh::Config)) -> TestServer {
    TestServer::start_with(|config| {
        config.notifier.allow_endpoints = vec!["127.0.0.1".into()];
        config.notifier.allow_insecure_http = true;
        config.notifier.retry_base_ms = 50;
        config.notifier.retry_max_delay_ms = 200;
        adjust(config);
    })
    .await
}

async fn send(server: &TestServer, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let mut request =
        server.client.request(reqwest::Method::from_bytes(method.as_bytes()).expect("method"), server.url(path));
    if let Some(body) = body {
        request = request.header("content-type", "application/fhir+json").json(body);
    }
    status_and_json(request.send().await.expect("request sent")).await
}

/// Creates a rest-hook Subscription; returns its id.
async fn subscribe(server: &TestServer, prefix: &str, criteria: &str, channel: Value) -> String {
    let mut channel = channel;
    channel["type"] = json!("rest-hook");
    let subscription = json!({"resourceType": "Subscription", "status": "requested", "reason": "test",
                              "criteria": criteria, "channel": channel});
    let (status, created) = send(server, "POST", &format!("{prefix}Subscription"), Some(&subscription)).await;
    assert_eq!(status, 201, "{created}");
    created["id"].as_str().expect("id").to_owned()
}

/// Waits (at most 10 s) until the Subscription's status is `status`; returns the resource.
async fn wait_for_status(server: &TestServer, prefix: &str, id: &str, status: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, subscription) = send(server, "GET", &format!("{prefix}Subscription/{id}"), None).await;
        if subscription["status"] == status || Instant::now() > deadline {
            assert_eq!(subscription["status"], status, "{subscription}");
            return subscription;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The dead letters written (waiting at most 20 s for `at_least`, then a little longer so that an
/// unexpected extra one would show).
async fn dead_letters(server: &TestServer, at_least: usize) -> Vec<Value> {
    let file = server.data_dir().join("dead-letters.ndjson");
    let read = || -> Vec<Value> {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        text.lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while read().len() < at_least && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    read()
}

fn observation(code: &str) -> Value {
    json!({"resourceType": "Observation", "status": "final",
           "code": {"coding": [{"system": "http://loinc.org", "code": code}]}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_follow_the_r4_rest_hook_channel() {
    let receiver = Receiver::start().await;
    let server = server(|_| {}).await;
    let bare = subscribe(
        &server,
        "",
        "Observation?code=http://loinc.org|1234-5",
        json!({"endpoint": format!("{}/hook", receiver.base), "header": ["Authorization: Bearer s3cret"]}),
    )
    .await;
    let full = subscribe(
        &server,
        "",
        "Patient?family=Hooked",
        json!({"endpoint": format!("{}/fhir", receiver.base), "payload": "application/fhir+json"}),
    )
    .await;
    let bare_subscription = wait_for_status(&server, "", &bare, "active").await;
    assert!(bare_subscription.get("error").is_none());
    wait_for_status(&server, "", &full, "active").await;

    // Matching and non-matching writes: create, update, delete, and a transaction.
    let (_, matching) = send(&server, "POST", "Observation", Some(&observation("1234-5"))).await;
    let (status, _) = send(&server, "POST", "Observation", Some(&observation("9999-9"))).await;
    assert_eq!(status, 201);
    let (_, hooked) =
        send(&server, "POST", "Patient", Some(&json!({"resourceType": "Patient", "name": [{"family": "Hooked"}]})))
            .await;
    let hooked_id = hooked["id"].as_str().expect("id").to_owned();
    let mut updated = hooked.clone();
    updated["gender"] = json!("female");
    let (status, _) = send(&server, "PUT", &format!("Patient/{hooked_id}"), Some(&updated)).await;
    assert_eq!(status, 200);
    let (status, _) =
        send(&server, "POST", "Patient", Some(&json!({"resourceType": "Patient", "name": [{"family": "Other"}]})))
            .await;
    assert_eq!(status, 201);
    let (status, _) = send(&server, "DELETE", &format!("Patient/{hooked_id}"), None).await;
    assert_eq!(status, 204);
    let transaction = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": observation("1234-5"), "request": {"method": "POST", "url": "Observation"}},
        {"resource": {"resourceType": "Patient", "name": [{"family": "Hooked"}]}, "request": {"method": "POST", "url": "Patient"}},
        {"resource": observation("0000-0"), "request": {"method": "POST", "url": "Observation"}},
    ]});
    let (status, answer) = send(&server, "POST", "", Some(&transaction)).await;
    assert_eq!(status, 200, "{answer}");
    let in_transaction = |n: usize| {
        let location = answer["entry"][n]["response"]["location"].as_str().expect("location");
        location.split('/').nth(1).expect("id").to_owned()
    };

    // Expected: bare ← 2 Observations; full ← Patient v1, v2, delete, and the transaction's Patient.
    let callbacks = receiver.wait_for(6).await;
    assert_eq!(callbacks.len(), 6, "{callbacks:#?}");
    let to_bare: Vec<&Callback> = callbacks.iter().filter(|c| c.path == "/hook").collect();
    let to_full: Vec<&Callback> = callbacks.iter().filter(|c| c.path.starts_with("/fhir")).collect();
    assert_eq!((to_bare.len(), to_full.len()), (2, 4), "{callbacks:#?}");

    // No payload: POST to the endpoint, no body, the channel's header, the event id.
    let observation_ids = [matching["id"].as_str().expect("id").to_owned(), in_transaction(0)];
    for (callback, id) in to_bare.iter().zip(&observation_ids) {
        assert_eq!(callback.method, Method::POST);
        assert!(callback.body.is_empty(), "no payload, no body");
        assert_eq!(callback.header("authorization"), Some("Bearer s3cret"));
        assert_eq!(
            callback.header("x-fhirmesh-event-id"),
            Some(format!("default/Observation/{id}/_history/1").as_str())
        );
        assert_eq!(callback.header("x-fhirmesh-subscription"), Some(format!("Subscription/{bare}").as_str()));
    }

    // Payload: PUT [endpoint]/Patient/[id] with the resource; a delete is DELETE.
    let methods: Vec<(Method, &str)> = to_full.iter().map(|c| (c.method.clone(), c.path.as_str())).collect();
    let path = format!("/fhir/Patient/{hooked_id}");
    let transaction_path = format!("/fhir/Patient/{}", in_transaction(1));
    assert_eq!(
        methods,
        vec![
            (Method::PUT, path.as_str()),
            (Method::PUT, path.as_str()),
            (Method::DELETE, path.as_str()),
            (Method::PUT, transaction_path.as_str())
        ]
    );
    assert_eq!(to_full[0].header("content-type"), Some("application/fhir+json"));
    let (first, second) = (to_full[0].json(), to_full[1].json());
    assert_eq!((first["meta"]["versionId"].as_str(), second["meta"]["versionId"].as_str()), (Some("1"), Some("2")));
    assert_eq!(second["gender"], "female");
    assert!(to_full[2].body.is_empty());
    assert_eq!(
        to_full[2].header("x-fhirmesh-event-id"),
        Some(format!("default/Patient/{hooked_id}/_history/3").as_str())
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writers_trace_context_reaches_the_receiver() {
    // The store keeps a write's traceparent with its change; the notifier sends it on (here no
    // spans are exported, so the client's own, unchanged: W3C for a hop that does not trace).
    let receiver = Receiver::start().await;
    let server = server(|_| {}).await;
    let id = subscribe(
        &server,
        "",
        "Observation?code=http://loinc.org|1234-5",
        json!({"endpoint": format!("{}/hook", receiver.base)}),
    )
    .await;
    wait_for_status(&server, "", &id, "active").await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let traced = server
        .client
        .post(server.url("Observation"))
        .header("content-type", "application/fhir+json")
        .header("traceparent", traceparent)
        .json(&observation("1234-5"))
        .send()
        .await
        .expect("sent");
    let (status, traced) = status_and_json(traced).await;
    assert_eq!(status, 201, "{traced}");
    let (status, untraced) = send(&server, "POST", "Observation", Some(&observation("1234-5"))).await;
    assert_eq!(status, 201);

    let callbacks = receiver.wait_for(2).await;
    assert_eq!(callbacks.len(), 2, "{callbacks:#?}");
    let of = |resource: &Value| {
        let event = format!("default/Observation/{}/_history/1", resource["id"].as_str().expect("id"));
        callbacks.iter().find(|c| c.header("x-fhirmesh-event-id") == Some(event.as_str())).expect("its callback")
    };
    assert_eq!(of(&traced).header("traceparent"), Some(traceparent));
    assert_eq!(of(&untraced).header("traceparent"), None);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_deliveries_are_retried_set_error_and_recover() {
    let receiver = Receiver::start().await;
    receiver.answer(500);
    let server = server(|config| config.notifier.error_after_failures = 2).await;
    let id = subscribe(&server, "", "Observation", json!({"endpoint": format!("{}/flaky", receiver.base)})).await;
    wait_for_status(&server, "", &id, "active").await;

    let (status, _) = send(&server, "POST", "Observation", Some(&observation("1"))).await;
    assert_eq!(status, 201);
    let failing = wait_for_status(&server, "", &id, "error").await;
    assert!(failing["error"].as_str().is_some_and(|e| e.contains("500")), "{failing}");
    assert!(receiver.callbacks().len() >= 2, "retried");

    receiver.answer(200);
    wait_for_status(&server, "", &id, "active").await;
    let recovered = send(&server, "GET", &format!("Subscription/{id}"), None).await.1;
    assert!(recovered.get("error").is_none(), "{recovered}");
    // Every attempt carried the same event id: one notification, retried.
    let callbacks = receiver.callbacks();
    let event_ids: std::collections::BTreeSet<&str> =
        callbacks.iter().filter_map(|c| c.header("x-fhirmesh-event-id")).collect();
    assert_eq!(event_ids.len(), 1, "{event_ids:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_endpoint_never_delays_another_subscription() {
    let hanging = Receiver::start().await;
    hanging.state.delay_ms.store(20_000, Ordering::Release);
    let prompt = Receiver::start().await;
    let server = server(|config| config.notifier.timeout_ms = 30_000).await;
    let slow = subscribe(&server, "", "Observation", json!({"endpoint": format!("{}/slow", hanging.base)})).await;
    let fast = subscribe(&server, "", "Observation", json!({"endpoint": format!("{}/fast", prompt.base)})).await;
    wait_for_status(&server, "", &slow, "active").await;
    wait_for_status(&server, "", &fast, "active").await;

    let started = Instant::now();
    for code in ["1", "2", "3"] {
        let (status, _) = send(&server, "POST", "Observation", Some(&observation(code))).await;
        assert_eq!(status, 201);
    }
    let callbacks = prompt.wait_for(3).await;
    assert_eq!(callbacks.len(), 3);
    assert!(started.elapsed() < Duration::from_secs(15), "the prompt receiver waited for the hanging one");
    assert_eq!(hanging.callbacks().len(), 1, "the hanging endpoint holds its own first notification");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_never_fires_on_another_tenants_data() {
    let receiver = Receiver::start().await;
    let server = server(|config| config.tenancy.enabled = true).await;
    let id = subscribe(&server, "tenant/a/", "Patient", json!({"endpoint": format!("{}/a", receiver.base)})).await;
    wait_for_status(&server, "tenant/a/", &id, "active").await;
    let patient = json!({"resourceType": "Patient", "name": [{"family": "Same"}]});
    let (status, _) = send(&server, "POST", "tenant/b/Patient", Some(&patient)).await;
    assert_eq!(status, 201);
    let (status, created) = send(&server, "POST", "tenant/a/Patient", Some(&patient)).await;
    assert_eq!(status, 201);
    let callbacks = receiver.wait_for(1).await;
    assert_eq!(callbacks.len(), 1, "{callbacks:#?}");
    let id = created["id"].as_str().expect("id");
    assert_eq!(callbacks[0].header("x-fhirmesh-event-id"), Some(format!("a/Patient/{id}/_history/1").as_str()));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_in_flight_when_the_notifier_stops_are_sent_after_a_restart() {
    let receiver = Receiver::start().await;
    receiver.answer(503);
    let server = server(|config| config.notifier.error_after_failures = 100).await;
    let id = subscribe(&server, "", "Observation", json!({"endpoint": format!("{}/later", receiver.base)})).await;
    wait_for_status(&server, "", &id, "active").await;
    let mut written = std::collections::BTreeSet::new();
    for code in ["1", "2"] {
        let (status, created) = send(&server, "POST", "Observation", Some(&observation(code))).await;
        assert_eq!(status, 201);
        written.insert(format!("default/Observation/{}/_history/1", created["id"].as_str().expect("id")));
    }
    // Both are being retried (the receiver refuses) when the server stops.
    receiver.wait_for(2).await;
    let server = server.restart().await;
    let refused = receiver.callbacks().len();
    receiver.answer(200);

    let deadline = Instant::now() + Duration::from_secs(20);
    let delivered = loop {
        let callbacks = receiver.callbacks();
        let delivered: std::collections::BTreeSet<String> =
            callbacks[refused..].iter().filter_map(|c| c.header("x-fhirmesh-event-id").map(str::to_owned)).collect();
        if delivered.len() >= written.len() || Instant::now() > deadline {
            break delivered;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert_eq!(delivered, written, "every notification pending at the stop is sent after the restart");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_is_dead_lettered_after_its_last_attempt() {
    let receiver = Receiver::start().await;
    receiver.answer(410);
    let server = server(|config| config.notifier.max_attempts = 3).await;
    let id = subscribe(&server, "", "Observation", json!({"endpoint": format!("{}/gone", receiver.base)})).await;
    wait_for_status(&server, "", &id, "active").await;
    let (_, created) = send(&server, "POST", "Observation", Some(&observation("1"))).await;
    let letters = dead_letters(&server, 1).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = &letters[0];
    let event = format!("default/Observation/{}/_history/1", created["id"].as_str().expect("id"));
    assert_eq!(letter["eventId"], event.as_str());
    assert_eq!(letter["subscription"], format!("Subscription/{id}"));
    assert_eq!(letter["attempts"], 3);
    assert!(letter["lastError"].as_str().is_some_and(|e| e.contains("410")), "{letter}");
    assert_eq!(receiver.callbacks().len(), 3, "three attempts, then no more");
    let failed = send(&server, "GET", &format!("Subscription/{id}"), None).await.1;
    assert_eq!(failed["status"], "error", "{failed}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_endpoints_backlog_is_bounded_and_overflow_is_dead_lettered() {
    let hanging = Receiver::start().await;
    hanging.state.delay_ms.store(20_000, Ordering::Release);
    let server = server(|config| {
        config.notifier.timeout_ms = 30_000;
        config.notifier.max_queued_per_subscription = 2;
    })
    .await;
    let id = subscribe(&server, "", "Observation", json!({"endpoint": format!("{}/stuck", hanging.base)})).await;
    wait_for_status(&server, "", &id, "active").await;
    let mut written = Vec::new();
    for code in ["1", "2", "3", "4", "5"] {
        let (status, created) = send(&server, "POST", "Observation", Some(&observation(code))).await;
        assert_eq!(status, 201);
        written.push(format!("default/Observation/{}/_history/1", created["id"].as_str().expect("id")));
    }
    // Two wait (the first of them in delivery); the other three are dead-lettered unattempted.
    let letters = dead_letters(&server, 3).await;
    let dead: Vec<&str> = letters.iter().filter_map(|l| l["eventId"].as_str()).collect();
    assert_eq!(dead, written[2..].iter().map(String::as_str).collect::<Vec<_>>(), "{letters:?}");
    for letter in &letters {
        assert_eq!(letter["attempts"], 0, "{letter}");
        assert!(letter["lastError"].as_str().is_some_and(|e| e.contains("2 notifications")), "{letter}");
    }
    assert_eq!(hanging.callbacks().len(), 1, "only the head of the queue was attempted");
    let metrics = server.client.get(format!("{}/metrics", server.base)).send().await.expect("metrics");
    let text = metrics.text().await.expect("text");
    assert!(text.lines().any(|l| l == "fhirmesh_notifier_notifications_total{outcome=\"overflowed\"} 3"), "{text}");
    assert!(text.lines().any(|l| l == "fhirmesh_notifier_queued_notifications 2"), "{text}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_in_error_holds_one_probe_and_dead_letters_the_rest_at_once() {
    let receiver = Receiver::start().await;
    receiver.answer(500);
    let server = server(|config| {
        config.notifier.error_after_failures = 1;
        config.notifier.max_attempts = 40;
    })
    .await;
    let id = subscribe(&server, "", "Observation", json!({"endpoint": format!("{}/down", receiver.base)})).await;
    wait_for_status(&server, "", &id, "active").await;
    let (_, probe) = send(&server, "POST", "Observation", Some(&observation("probe"))).await;
    let probe = format!("default/Observation/{}/_history/1", probe["id"].as_str().expect("id"));
    wait_for_status(&server, "", &id, "error").await;

    // While the first notification is retried as the probe, later ones are not queued behind it.
    let mut refused = Vec::new();
    for code in ["1", "2", "3"] {
        let (status, created) = send(&server, "POST", "Observation", Some(&observation(code))).await;
        assert_eq!(status, 201);
        refused.push(format!("default/Observation/{}/_history/1", created["id"].as_str().expect("id")));
    }
    let letters = dead_letters(&server, refused.len()).await;
    let dead: Vec<&str> = letters.iter().filter_map(|l| l["eventId"].as_str()).collect();
    assert_eq!(dead, refused.iter().map(String::as_str).collect::<Vec<_>>(), "{letters:?}");
    assert!(letters.iter().all(|l| l["attempts"] == 0), "{letters:?}");
    let attempted: std::collections::BTreeSet<String> =
        receiver.callbacks().iter().filter_map(|c| c.header("x-fhirmesh-event-id").map(str::to_owned)).collect();
    assert_eq!(attempted, std::collections::BTreeSet::from([probe.clone()]), "only the probe was attempted");

    // The endpoint recovers: the probe gets through and the subscription is active again.
    receiver.answer(200);
    wait_for_status(&server, "", &id, "active").await;
    let (_, after) = send(&server, "POST", "Observation", Some(&observation("after"))).await;
    let after = format!("default/Observation/{}/_history/1", after["id"].as_str().expect("id"));
    let callbacks = receiver.wait_for(1).await;
    assert!(callbacks.iter().any(|c| c.header("x-fhirmesh-event-id") == Some(after.as_str())), "delivered again");
    server.stop().await;
}
