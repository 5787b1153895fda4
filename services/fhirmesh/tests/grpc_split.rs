//! The gateway and the resource service in separate processes, talking real gRPC.

mod support;

use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_serves_fhir_through_a_remote_resource_service() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (resource, indexer, gateway) = support::split_on_sqlite(dir.path()).await;
    let base = gateway.address.clone();
    let client = reqwest::Client::new();

    let response = client
        .post(format!("{base}/Patient"))
        .header("content-type", "application/fhir+json")
        .body(json!({ "resourceType": "Patient", "name": [{ "family": "Remote" }] }).to_string())
        .send()
        .await
        .expect("create");
    assert_eq!(response.status(), 201);
    assert_eq!(response.headers().get("etag").and_then(|v| v.to_str().ok()), Some("W/\"1\""));
    let created: Value = response.json().await.expect("json");
    let id = created["id"].as_str().expect("id");

    let read: Value =
        client.get(format!("{base}/Patient/{id}")).send().await.expect("read").json().await.expect("json");
    assert_eq!(read, created);

    let deleted = client.delete(format!("{base}/Patient/{id}")).send().await.expect("delete");
    assert_eq!(deleted.status(), 204);
    let gone = client.get(format!("{base}/Patient/{id}")).send().await.expect("read");
    assert_eq!(gone.status(), 410, "Gone survives the gRPC hop");
    let outcome: Value = gone.json().await.expect("json");
    assert_eq!(outcome["resourceType"], "OperationOutcome");

    let invalid = client
        .post(format!("{base}/Patient"))
        .header("content-type", "application/fhir+json")
        .body(r#"{"resourceType":"Patient","birthDate":"yesterday"}"#)
        .send()
        .await
        .expect("create");
    assert_eq!(invalid.status(), 400);
    let outcome: Value = invalid.json().await.expect("json");
    assert_eq!(outcome["issue"][0]["expression"][0], "Patient.birthDate", "the expression survives the gRPC hop");

    let (_, history) = (
        200,
        client
            .get(format!("{base}/Patient/{id}/_history"))
            .send()
            .await
            .expect("history")
            .json::<Value>()
            .await
            .expect("json"),
    );
    assert_eq!(history["entry"].as_array().map(Vec::len), Some(2));

    // A batch crosses the gRPC hop too: a written entry, a failed one with its outcome, and a
    // search answered inline.
    let batch = serde_json::json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": {"resourceType": "Patient", "active": true}, "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Patient", "gender": 1}, "request": {"method": "POST", "url": "Patient"}},
        {"request": {"method": "GET", "url": "Patient?active=true"}}]});
    let response = client
        .post(format!("{base}/"))
        .header("content-type", "application/fhir+json")
        .body(batch.to_string())
        .send()
        .await
        .expect("batch");
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.expect("json");
    let statuses: Vec<&str> =
        answer["entry"].as_array().expect("entries").iter().filter_map(|e| e["response"]["status"].as_str()).collect();
    assert_eq!(statuses, ["201 Created", "400 Bad Request", "200 OK"], "{answer}");
    assert_eq!(
        answer["entry"][1]["response"]["outcome"]["issue"][0]["expression"][0],
        "Bundle.entry[1].resource.gender"
    );
    assert_eq!(answer["entry"][2]["resource"]["type"], "searchset");

    // With the resource service gone, the gateway answers 503 with an OperationOutcome.
    resource.kill_9().await;
    let response = client.get(format!("{base}/Patient/{id}")).send().await.expect("read");
    assert_eq!(response.status(), 503);
    let outcome: Value = response.json().await.expect("json");
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    assert!(gateway.terminate().await.success());
    assert!(indexer.terminate().await.success());
}
