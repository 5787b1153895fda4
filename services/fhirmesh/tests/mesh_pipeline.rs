//! The mesh as separate processes on the scale-out backends: resource (DynamoDB on moto), relay
//! (from the change log or from DynamoDB Streams), indexer (NATS JetStream or SNS + SQS) and
//! gateway. The relay and then the indexer are killed with SIGKILL in
//! the middle of a write load and restarted; afterwards the search index holds exactly what the
//! store holds.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Value, json};

const WRITES: usize = 120;
const WRITERS: usize = 4;

use fhirmesh_testinfra::unique_name as unique;
use support::{Shape, mesh_env};

async fn total(client: &reqwest::Client, base: &str, family: &str) -> u64 {
    let answer: Value = client
        .get(format!("{base}/Patient?family={family}&_summary=count"))
        .send()
        .await
        .expect("search")
        .json()
        .await
        .expect("json");
    answer["total"].as_u64().unwrap_or_else(|| panic!("no total in {answer}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_mesh_loses_nothing_when_relay_and_indexer_are_killed() {
    killing_the_relay_and_the_indexer_mid_load_loses_nothing(Shape::NatsFromChangeLog).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_relay_mesh_loses_nothing_when_relay_and_indexer_are_killed() {
    killing_the_relay_and_the_indexer_mid_load_loses_nothing(Shape::NatsFromStreams).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sns_sqs_mesh_loses_nothing_when_relay_and_indexer_are_killed() {
    killing_the_relay_and_the_indexer_mid_load_loses_nothing(Shape::SnsSqsFromChangeLog).await;
}

async fn killing_the_relay_and_the_indexer_mid_load_loses_nothing(shape: Shape) {
    let mut env = mesh_env(&shape);
    // What the killed indexer held comes back to its successor after the ack wait: keep it short.
    env.extend([
        ("FHIRMESH_NATS__ACK_WAIT_SECONDS".to_owned(), "3".to_owned()),
        ("FHIRMESH_SNS_SQS__VISIBILITY_TIMEOUT_SECONDS".to_owned(), "3".to_owned()),
    ]);
    let dir = tempfile::tempdir().expect("tempdir");
    let resource =
        support::spawn_with_env(&["--target", "resource", "--grpc-listen", "127.0.0.1:0"], Some(dir.path()), &env)
            .await;
    let indexer = support::spawn_with_env(&["--target", "indexer"], Some(dir.path()), &env).await;
    let relay = support::spawn_with_env(&["--target", "relay"], Some(dir.path()), &env).await;
    let endpoint = format!("http://{}", resource.address);
    let gateway = support::spawn_with_env(
        &["--target", "gateway", "--listen", "127.0.0.1:0", "--resource-endpoint", &endpoint],
        None,
        &env,
    )
    .await;
    let base = gateway.address.clone();
    let client = reqwest::Client::new();
    let family = unique("Mesh");

    // The load: WRITERS clients creating WRITES Patients in total.
    let written = Arc::new(AtomicUsize::new(0));
    let load: Vec<_> = (0..WRITERS)
        .map(|_| {
            let (client, base, family, written) = (client.clone(), base.clone(), family.clone(), Arc::clone(&written));
            tokio::spawn(async move {
                while written.fetch_add(1, Ordering::SeqCst) < WRITES {
                    let response = client
                        .post(format!("{base}/Patient"))
                        .header("content-type", "application/fhir+json")
                        .body(json!({"resourceType": "Patient", "name": [{"family": family}]}).to_string())
                        .send()
                        .await
                        .expect("create");
                    assert_eq!(response.status(), 201, "{}", response.text().await.unwrap_or_default());
                }
            })
        })
        .collect();

    let wait_for = |count: usize| {
        let written = Arc::clone(&written);
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
            while written.load(Ordering::SeqCst) < count {
                assert!(tokio::time::Instant::now() < deadline, "the load stalled below {count} writes");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    wait_for(WRITES / 4).await;
    relay.kill_9().await;
    wait_for(WRITES / 2).await;
    let relay = support::spawn_with_env(&["--target", "relay"], Some(dir.path()), &env).await;
    indexer.kill_9().await;
    wait_for(3 * WRITES / 4).await;
    let indexer = support::spawn_with_env(&["--target", "indexer"], Some(dir.path()), &env).await;
    for writer in load {
        writer.await.expect("writer");
    }

    // Everything written is found, and nothing twice.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut found = total(&client, &base, &family).await;
    while found != WRITES as u64 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        found = total(&client, &base, &family).await;
    }
    assert_eq!(found, WRITES as u64, "the index holds every acknowledged write exactly once");
    // The restarted indexer, caught up, says so on its own /metrics (and is ready).
    let metrics = client.get(format!("{}/metrics", indexer.ops)).send().await.expect("metrics");
    let metrics = metrics.text().await.expect("text");
    let gauge = |name: &str| -> u64 {
        let line = metrics.lines().find_map(|l| l.strip_prefix(&format!("{name} ")));
        line.and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{name} missing from:\n{metrics}"))
    };
    assert!(gauge("fhirmesh_store_latest_sequence") >= WRITES as u64, "{metrics}");
    assert_eq!(gauge("fhirmesh_search_index_watermark"), gauge("fhirmesh_store_latest_sequence"), "{metrics}");
    assert_eq!(gauge("fhirmesh_search_index_lag_changes"), 0, "{metrics}");
    let ready = client.get(format!("{}/readyz", indexer.ops)).send().await.expect("readyz");
    assert_eq!(ready.status(), 200);
    // Its calls to the index are counted, and its bus consumer drains (the bus's own count).
    assert!(counter(&metrics, "fhirmesh_search_index_requests_total{operation=\"apply\",code=\"ok\"}") > 0.0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let metrics = client.get(format!("{}/metrics", indexer.ops)).send().await.expect("metrics");
        let metrics = metrics.text().await.expect("text");
        if counter(&metrics, "fhirmesh_bus_consumer_lag_messages{consumer=\"indexer\"}") == 0.0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the indexer's consumer does not drain:\n{metrics}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The resource service counted every commit.
    let metrics = client.get(format!("{}/metrics", resource.ops)).send().await.expect("metrics");
    let metrics = metrics.text().await.expect("text");
    let commits = counter(&metrics, "fhirmesh_store_requests_total{operation=\"commit\",code=\"ok\"}");
    assert!(commits >= WRITES as f64, "{commits} commits counted:\n{metrics}");

    for process in [gateway, relay, indexer, resource] {
        process.kill_9().await;
    }
}

/// The value of the series `series` (name and labels) in a metrics text; a panic when absent.
fn counter(metrics: &str, series: &str) -> f64 {
    let value = metrics.lines().find_map(|line| line.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')));
    value.and_then(|v| v.trim().parse().ok()).unwrap_or_else(|| panic!("{series} missing from:\n{metrics}"))
}
