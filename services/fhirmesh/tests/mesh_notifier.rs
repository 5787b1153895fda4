//! The notifier as its own service in the mesh: `--target notifier` replicas share the
//! `notifier` durable consumer on NATS JetStream or SNS + SQS, calling the resource service over
//! gRPC. A replica is killed with SIGKILL while it holds notifications not yet delivered, and two
//! replicas started afterwards take over: every matching change still reaches the receiver (at
//! least once, de-duplicable by its event id), nothing that does not match does, and the replicas
//! serve `/readyz` and `/metrics`.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};
use support::{Process, Shape, mesh_env};

const MATCHING: usize = 30;
const OTHERS: usize = 10;
const CODE: &str = "1234-5";
const RECEIVER_DELAY: Duration = Duration::from_millis(300);

async fn notifier(env: &[(String, String)], resource: &str) -> Process {
    let mut env = env.to_vec();
    env.extend([("FHIRMESH_NOTIFIER__RESOURCE_ENDPOINT".to_owned(), resource.to_owned())]);
    support::spawn_with_env(&["--target", "notifier"], None, &env).await
}

async fn post(client: &reqwest::Client, base: &str, resource: &Value) -> Value {
    let kind = resource["resourceType"].as_str().expect("resourceType");
    let response = client
        .post(format!("{base}/{kind}"))
        .header("content-type", "application/fhir+json")
        .body(resource.to_string())
        .send()
        .await
        .expect("create");
    let status = response.status();
    let body: Value = response.json().await.expect("json");
    assert_eq!(status, 201, "{body}");
    body
}

fn observation(code: &str) -> Value {
    json!({"resourceType": "Observation", "status": "final",
           "code": {"coding": [{"system": "http://loinc.org", "code": code}]}})
}

/// A metric's value from a notifier's `/metrics`, 0 when absent.
async fn metric(client: &reqwest::Client, notifier: &Process, line_prefix: &str) -> f64 {
    let text = client.get(format!("{}/metrics", notifier.ops)).send().await.expect("metrics").text().await;
    let text = text.expect("metrics text");
    assert!(text.ends_with("# EOF\n"), "{text}");
    text.lines().find_map(|l| l.strip_prefix(line_prefix)).and_then(|v| v.trim().parse().ok()).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_notifier_replicas_deliver_every_match_through_a_kill() {
    replicas_deliver_every_match_through_a_kill(Shape::NatsFromChangeLog).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sns_sqs_notifier_replicas_deliver_every_match_through_a_kill() {
    replicas_deliver_every_match_through_a_kill(Shape::SnsSqsFromChangeLog).await;
}

async fn replicas_deliver_every_match_through_a_kill(shape: Shape) {
    let mut env = mesh_env(&shape);
    // A killed replica's changes come back after the ack wait: keep it short here.
    env.extend([
        ("FHIRMESH_NATS__ACK_WAIT_SECONDS".to_owned(), "3".to_owned()),
        ("FHIRMESH_SNS_SQS__VISIBILITY_TIMEOUT_SECONDS".to_owned(), "3".to_owned()),
        // The resource service validates endpoints with the same policy the notifier calls them by.
        ("FHIRMESH_NOTIFIER__ALLOW_ENDPOINTS".to_owned(), "[\"127.0.0.1\"]".to_owned()),
        ("FHIRMESH_NOTIFIER__ALLOW_INSECURE_HTTP".to_owned(), "true".to_owned()),
    ]);
    let dir = tempfile::tempdir().expect("tempdir");
    let resource =
        support::spawn_with_env(&["--target", "resource", "--grpc-listen", "127.0.0.1:0"], Some(dir.path()), &env)
            .await;
    let endpoint = format!("http://{}", resource.address);
    let indexer = support::spawn_with_env(&["--target", "indexer"], Some(dir.path()), &env).await;
    let relay = support::spawn_with_env(&["--target", "relay"], Some(dir.path()), &env).await;
    let gateway = support::spawn_with_env(
        &["--target", "gateway", "--listen", "127.0.0.1:0", "--resource-endpoint", &endpoint],
        None,
        &env,
    )
    .await;
    let first = notifier(&env, &endpoint).await;
    let base = gateway.address.clone();
    let client = reqwest::Client::new();
    let (hook, received) = support::hook_receiver(RECEIVER_DELAY).await;

    let subscription = json!({"resourceType": "Subscription", "status": "requested", "reason": "mesh test",
        "criteria": format!("Observation?code=http://loinc.org|{CODE}"),
        "channel": {"type": "rest-hook", "endpoint": format!("{hook}/hook")}});
    let id = post(&client, &base, &subscription).await["id"].as_str().expect("id").to_owned();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let current: Value =
            client.get(format!("{base}/Subscription/{id}")).send().await.expect("read").json().await.expect("json");
        if current["status"] == "active" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "a replica activates the Subscription: {current}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The load, from four writers at once; the receiver is slower, so the one replica falls behind.
    let mut expected = BTreeSet::new();
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (client, base) = (client.clone(), base.clone());
            tokio::spawn(async move {
                let mut matched = Vec::new();
                for n in (w..MATCHING + OTHERS).step_by(4) {
                    let matching = n % 4 != 3;
                    let created = post(&client, &base, &observation(if matching { CODE } else { "other" })).await;
                    if matching {
                        matched.push(format!("default/Observation/{}/_history/1", created["id"].as_str().expect("id")));
                    }
                }
                matched
            })
        })
        .collect();
    for writer in writers {
        expected.extend(writer.await.expect("writer"));
    }
    assert_eq!(expected.len(), MATCHING);

    // Killed while it holds notifications it has not delivered: their changes are not
    // acknowledged, so the bus gives them to the replicas started afterwards.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while metric(&client, &first, "fhirmesh_notifier_queued_notifications ").await < 3.0 {
        assert!(tokio::time::Instant::now() < deadline, "the first replica never fell behind");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.kill_9().await;
    let second = notifier(&env, &endpoint).await;
    let third = notifier(&env, &endpoint).await;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let seen: BTreeSet<String> = received.lock().expect("received").keys().cloned().collect();
        if seen.is_superset(&expected) || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let received = received.lock().expect("received").clone();
    let seen: BTreeSet<String> = received.keys().cloned().collect();
    assert_eq!(seen, expected, "every matching change notified, nothing else");

    // The later replicas delivered what the first held, and say so on their own endpoints.
    let delivered = metric(&client, &second, "fhirmesh_notifier_notifications_total{outcome=\"delivered\"} ").await
        + metric(&client, &third, "fhirmesh_notifier_notifications_total{outcome=\"delivered\"} ").await;
    assert!(delivered >= 1.0, "the surviving replicas delivered");
    assert_eq!(metric(&client, &second, "fhirmesh_notifier_ready ").await, 1.0);
    let ready = client.get(format!("{}/readyz", second.ops)).send().await.expect("readyz");
    assert_eq!(ready.status(), 200);

    for process in [gateway, relay, indexer, resource, second, third] {
        process.kill_9().await;
    }
}
