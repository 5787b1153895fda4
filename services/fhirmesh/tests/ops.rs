//! What every service serves its operators, checked on real processes: `/healthz`, `/readyz`
//! (with the dependencies each target checks, failing when one is gone), `/metrics`, the gRPC
//! health service (the gateway's readiness asks the resource service's), and shutdown on
//! SIGTERM: readiness off during the drain delay while requests are still served, in-flight
//! writes finished, nothing acknowledged lost, exit 0.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::Process;

async fn get(client: &reqwest::Client, url: String) -> (u16, String) {
    let response = client.get(url).send().await.expect("request");
    (response.status().as_u16(), response.text().await.expect("body"))
}

async fn readiness(client: &reqwest::Client, process: &Process) -> (u16, Value) {
    let (status, body) = get(client, format!("{}/readyz", process.ops)).await;
    (status, serde_json::from_str(&body).unwrap_or_else(|_| panic!("readyz is JSON: {body}")))
}

fn send_sigterm(process: &Process) {
    let pid = process.child.id().expect("running");
    let status = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status().expect("kill -TERM");
    assert!(status.success());
}

async fn create(client: &reqwest::Client, base: &str, family: &str) -> reqwest::Result<reqwest::Response> {
    client
        .post(format!("{base}/Patient"))
        .header("content-type", "application/fhir+json")
        .body(json!({"resourceType": "Patient", "name": [{"family": family}]}).to_string())
        .send()
        .await
}

#[tokio::test]
async fn every_target_reports_health_readiness_and_metrics() {
    let dir = tempfile::tempdir().expect("data dir");
    let client = reqwest::Client::new();
    let (resource, indexer, gateway) = support::split_on_sqlite(dir.path()).await;

    assert_eq!(get(&client, format!("{}/healthz", resource.ops)).await.0, 200);
    let (status, body) = readiness(&client, &resource).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"status": "ready", "checks": {"store": {"ok": true}, "search index": {"ok": true}}}));
    let (status, body) = readiness(&client, &indexer).await;
    assert_eq!((status, &body["status"]), (200, &json!("ready")), "{body}");
    // The gateway is ready once the resource service's gRPC health service says SERVING.
    let (status, body) = readiness(&client, &gateway).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["checks"], json!({"resource service": {"ok": true}}));

    let created = create(&client, &gateway.address, "Ops").await.expect("create");
    assert_eq!(created.status(), 201);
    let (status, gateway_metrics) = get(&client, format!("{}/metrics", gateway.ops)).await;
    assert_eq!(status, 200);
    assert!(
        gateway_metrics.contains("fhirmesh_gateway_requests_total{interaction=\"create\",code=\"201\"} 1"),
        "{gateway_metrics}"
    );
    assert!(gateway_metrics.contains("fhirmesh_build_info{version=\""), "{gateway_metrics}");
    assert!(gateway_metrics.contains("target=\"gateway\"} 1"), "{gateway_metrics}");
    let (_, resource_metrics) = get(&client, format!("{}/metrics", resource.ops)).await;
    assert!(
        resource_metrics.contains(
            "fhirmesh_grpc_server_requests_total{service=\"fhirmesh.v1.ResourceService\",method=\"Create\",code=\"OK\"} 1"
        ),
        "{resource_metrics}"
    );
    assert!(
        resource_metrics.contains("service=\"grpc.health.v1.Health\",method=\"Check\",code=\"OK\""),
        "the gateway's readiness asked the gRPC health service:\n{resource_metrics}"
    );
    assert!(resource_metrics.ends_with("# EOF\n"));
    // A lone indexer on SQLite (a development split: the store is another process's file) does
    // not report the lag it cannot know; on DynamoDB it does (mesh_pipeline.rs).
    let (_, indexer_metrics) = get(&client, format!("{}/metrics", indexer.ops)).await;
    assert!(indexer_metrics.contains("target=\"indexer\"} 1"), "{indexer_metrics}");
    assert!(!indexer_metrics.contains("fhirmesh_search_index_lag_changes"), "{indexer_metrics}");

    // The resource service gone: the gateway lives on but is not ready, and says why.
    resource.kill_9().await;
    assert_eq!(get(&client, format!("{}/healthz", gateway.ops)).await.0, 200);
    let (status, body) = readiness(&client, &gateway).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], "not_ready");
    assert_eq!(body["checks"]["resource service"]["ok"], false, "{body}");
    assert!(body["checks"]["resource service"]["error"].as_str().is_some_and(|e| !e.is_empty()), "{body}");

    assert!(gateway.terminate().await.success());
    assert!(indexer.terminate().await.success());
}

#[tokio::test]
async fn sigterm_drains_then_stops_without_losing_an_acknowledged_write() {
    let dir = tempfile::tempdir().expect("data dir");
    let client = reqwest::Client::new();
    let env = [("FHIRMESH_OPS__DRAIN_DELAY_SECONDS".to_owned(), "3".to_owned())];
    let server = support::spawn_with_env(&["--listen", "127.0.0.1:0"], Some(dir.path()), &env).await;
    let base = server.address.clone();
    // Ready once the notifier has read the change log for the first time.
    let mut ready = readiness(&client, &server).await;
    for _ in 0..100 {
        if ready.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        ready = readiness(&client, &server).await;
    }
    assert_eq!(ready.0, 200, "{}", ready.1);

    // Writers keep going until the server stops answering; every 201 is an acknowledged write.
    let writers: Vec<_> = (0..8)
        .map(|writer| {
            let (client, base) = (client.clone(), base.clone());
            tokio::spawn(async move {
                let mut acknowledged = Vec::new();
                for n in 0..10_000 {
                    match create(&client, &base, &format!("W{writer}n{n}")).await {
                        Ok(response) => {
                            let status = response.status().as_u16();
                            assert_eq!(status, 201, "a write failed while draining: {status}");
                            let body: Value = response.json().await.expect("json");
                            acknowledged.push(body["id"].as_str().expect("id").to_owned());
                        }
                        // The listener closed: what was not answered was never acknowledged.
                        Err(_) => break,
                    }
                }
                acknowledged
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    send_sigterm(&server);

    // During the drain delay: not ready, yet alive and still serving.
    let mut drained = None;
    for _ in 0..40 {
        let (status, body) = readiness(&client, &server).await;
        if status == 503 {
            drained = Some(body);
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let drained = drained.expect("readiness turned off within a second of SIGTERM");
    assert_eq!(drained["status"], "draining");
    assert_eq!(get(&client, format!("{}/healthz", server.ops)).await.0, 200);
    assert_eq!(create(&client, &base, "During the drain").await.expect("still served").status(), 201);

    let mut acknowledged = Vec::new();
    for writer in writers {
        acknowledged.extend(writer.await.expect("writer"));
    }
    let mut child = server.child;
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait()).await.expect("exits").expect("reaped");
    assert!(status.success(), "a graceful stop exits 0, got {status}");
    assert!(acknowledged.len() > 8, "the writers wrote before the signal: {}", acknowledged.len());

    // Every acknowledged write is there after a restart.
    let again = support::spawn(&["--listen", "127.0.0.1:0"], Some(dir.path())).await;
    for id in &acknowledged {
        let response = client.get(format!("{}/Patient/{id}", again.address)).send().await.expect("read");
        assert_eq!(response.status(), 200, "acknowledged Patient/{id} is missing after the restart");
    }
    assert!(again.terminate().await.success());
}
