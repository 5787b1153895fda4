//! The exporter as its own service in the mesh, on DynamoDB (moto) with its files in S3: a
//! gateway calls one exporter's gRPC API (no workers of its own) while other exporters do the
//! work. The only working exporter is SIGKILLed in the middle of a job; one started afterwards
//! takes over its chunk when the lease runs out, and the job completes with every resource of the
//! snapshot exactly once, each equal to its stored version at `transactionTime`, none written
//! after the kick-off.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use fhirmesh_testinfra::{aws_endpoint, unique_name};
use serde_json::{Value, json};
use support::{Process, Shape, mesh_env};

const PATIENTS: usize = 48;
const OBSERVATIONS_PER_PATIENT: usize = 3;
const SEGMENTS: usize = 6;

async fn exporter(env: &[(String, String)], workers: usize) -> Process {
    let mut env = env.to_vec();
    env.extend([
        ("FHIRMESH_EXPORT__GRPC_LISTEN".to_owned(), "127.0.0.1:0".to_owned()),
        ("FHIRMESH_EXPORT__WORKERS".to_owned(), workers.to_string()),
    ]);
    support::spawn_with_env(&["--target", "exporter"], None, &env).await
}

/// A transaction creating `patients` with their Observations; returns the created (type, id).
async fn load(client: &reqwest::Client, base: &str, first: usize, patients: usize) -> Vec<(String, String)> {
    let mut entries = Vec::new();
    for p in first..first + patients {
        let patient = format!("urn:uuid:00000000-0000-0000-0000-{p:012}");
        entries.push(json!({"fullUrl": patient, "request": {"method": "POST", "url": "Patient"},
            "resource": {"resourceType": "Patient", "name": [{"family": format!("Export{p}")}]}}));
        for o in 0..OBSERVATIONS_PER_PATIENT {
            entries.push(json!({"request": {"method": "POST", "url": "Observation"},
                "resource": {"resourceType": "Observation", "status": "final", "code": {"text": format!("o{o}")},
                             "subject": {"reference": patient}}}));
        }
    }
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": entries});
    let response = client
        .post(base)
        .header("content-type", "application/fhir+json")
        .body(bundle.to_string())
        .send()
        .await
        .expect("transaction");
    let status = response.status();
    let body: Value = response.json().await.expect("json");
    assert_eq!(status, 200, "{body}");
    body["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|entry| {
            let location = entry["response"]["location"].as_str().expect("location");
            let mut parts = location.split('/');
            (parts.next().expect("type").to_owned(), parts.next().expect("id").to_owned())
        })
        .collect()
}

async fn send(request: reqwest::RequestBuilder) -> (u16, Value) {
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

async fn update_patient(client: &reqwest::Client, base: &str, id: &str, family: &str) {
    let body = json!({"resourceType": "Patient", "id": id, "name": [{"family": family}]});
    let request = client
        .put(format!("{base}/Patient/{id}"))
        .header("content-type", "application/fhir+json")
        .body(body.to_string());
    let (status, body) = send(request).await;
    assert_eq!(status, 200, "{body}");
}

async fn delete(client: &reqwest::Client, base: &str, kind: &str, id: &str) {
    let (status, body) = send(client.delete(format!("{base}/{kind}/{id}"))).await;
    assert!(status == 200 || status == 204, "{status} {body}");
}

/// The resource as stored now (the test writes nothing to it after the snapshot).
async fn stored(client: &reqwest::Client, base: &str, kind: &str, id: &str) -> Value {
    let (status, body) =
        send(client.get(format!("{base}/{kind}/{id}")).header("accept", "application/fhir+json")).await;
    assert_eq!(status, 200, "{body}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_exporter_s_chunk_is_taken_over_and_the_export_is_exact() {
    let mut env = mesh_env(&Shape::NatsFromChangeLog);
    env.extend(
        [
            ("FHIRMESH_BLOB__BACKEND", "s3".to_owned()),
            ("FHIRMESH_BLOB__BUCKET", unique_name("export")),
            ("FHIRMESH_AWS__ENDPOINT_URL", aws_endpoint()),
            ("FHIRMESH_EXPORT__SEGMENTS", SEGMENTS.to_string()),
            // Small pages make a segment take many requests; a short lease makes the takeover quick.
            ("FHIRMESH_EXPORT__PAGE_SIZE", "4".to_owned()),
            ("FHIRMESH_EXPORT__LEASE_SECONDS", "3".to_owned()),
        ]
        .map(|(k, v)| (k.to_owned(), v)),
    );
    let provisioned = support::provision(&env);
    assert!(provisioned.contains("DynamoDB export job table"), "{provisioned}");
    let resource = support::spawn_with_env(&["--target", "resource", "--grpc-listen", "127.0.0.1:0"], None, &env).await;
    let api = exporter(&env, 0).await;
    let gateway = export_gateway(&env, &resource, &api).await;
    let base = gateway.address.clone();
    let client = reqwest::Client::new();

    // The data: patients with observations; some updated and some deleted before the kick-off.
    let mut created = Vec::new();
    for first in (0..PATIENTS).step_by(8) {
        created.extend(load(&client, &base, first, 8).await);
    }
    let patients: Vec<String> = created.iter().filter(|(t, _)| t == "Patient").map(|(_, id)| id.clone()).collect();
    let observations: Vec<String> =
        created.iter().filter(|(t, _)| t == "Observation").map(|(_, id)| id.clone()).collect();
    assert_eq!((patients.len(), observations.len()), (PATIENTS, PATIENTS * OBSERVATIONS_PER_PATIENT));
    for id in &patients[..5] {
        update_patient(&client, &base, id, "Renamed").await;
    }
    for id in &observations[..3] {
        delete(&client, &base, "Observation", id).await;
    }
    // What the export must hold: every live resource, as stored now.
    let mut expected: BTreeMap<(String, String), Value> = BTreeMap::new();
    for id in &patients {
        expected.insert(("Patient".into(), id.clone()), stored(&client, &base, "Patient", id).await);
    }
    for id in &observations[3..] {
        expected.insert(("Observation".into(), id.clone()), stored(&client, &base, "Observation", id).await);
    }

    // One working exporter; the kick-off goes through the gateway to the API-only exporter.
    let worker = exporter(&env, 1).await;
    let kick_off = client
        .get(format!("{base}/$export?_type=Patient,Observation"))
        .header("prefer", "respond-async")
        .header("accept", "application/fhir+json");
    let response = kick_off.send().await.expect("kick-off");
    assert_eq!(response.status(), 202, "{:?}", response.text().await);
    let status_url = response.headers()["content-location"].to_str().expect("ascii").to_owned();

    // Writes after the kick-off are not in the export.
    for id in &patients[5..10] {
        update_patient(&client, &base, id, "TooLate").await;
    }
    delete(&client, &base, "Observation", &observations[10]).await;
    load(&client, &base, 1_000, 1).await;

    // Killed with a chunk in hand: some segments done, not all.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let progress = loop {
        let response = client.get(&status_url).send().await.expect("status");
        assert_eq!(response.status(), 202, "the job is still running");
        let progress = response.headers()["x-progress"].to_str().expect("ascii").to_owned();
        let done: usize = progress.split(' ').next().and_then(|n| n.parse().ok()).expect("a count first");
        if done >= 1 {
            assert!(done < SEGMENTS, "the worker finished before it could be killed: {progress}");
            break progress;
        }
        assert!(tokio::time::Instant::now() < deadline, "no segment done within 60 s: {progress}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(progress.ends_with(&format!("of {SEGMENTS} segments exported")), "{progress}");
    worker.kill_9().await;
    let successor = exporter(&env, 1).await;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let manifest = loop {
        let response = client.get(&status_url).send().await.expect("status");
        match response.status().as_u16() {
            200 => break response.json::<Value>().await.expect("manifest"),
            202 => {}
            other => panic!("status {other}: {:?}", response.text().await),
        }
        assert!(tokio::time::Instant::now() < deadline, "the job completes after the takeover");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    // Every file, downloaded through the gateway (streamed from S3 by the exporter).
    let mut exported: BTreeMap<(String, String), Value> = BTreeMap::new();
    let mut files: Vec<(Value, String)> = Vec::new();
    let mut counted = 0;
    for file in manifest["output"].as_array().expect("output") {
        let url = file["url"].as_str().expect("url");
        assert!(url.starts_with(&format!("{base}/$export-file/")), "{url}");
        let response = client.get(url).send().await.expect("download");
        assert_eq!(response.status(), 200, "{url}");
        let text = response.text().await.expect("ndjson");
        files.push((file.clone(), text.clone()));
        let mut lines = 0;
        for line in text.lines() {
            let resource: Value = serde_json::from_str(line).expect("one resource per line");
            let kind = resource["resourceType"].as_str().expect("type").to_owned();
            assert_eq!(kind, file["type"], "{url}");
            let id = resource["id"].as_str().expect("id").to_owned();
            assert!(exported.insert((kind, id.clone()), resource).is_none(), "{id} exported twice");
            lines += 1;
        }
        assert_eq!(file["count"], lines, "{url}");
        counted += lines;
    }
    assert_eq!(counted, expected.len());
    assert_eq!(exported.keys().collect::<Vec<_>>(), expected.keys().collect::<Vec<_>>());
    assert_eq!(exported, expected, "every resource as stored at transactionTime");

    // The successor's /metrics count what it did: the segments left, none of the whole export.
    let metrics = client.get(format!("{}/metrics", successor.ops)).send().await.expect("metrics");
    let metrics = metrics.text().await.expect("text");
    let value = |series: &str| -> u64 {
        let line = metrics.lines().find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')));
        line.and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{series} missing from:\n{metrics}"))
    };
    let completed = value("fhirmesh_export_chunks_total{outcome=\"completed\"}");
    assert!((1..SEGMENTS as u64).contains(&completed), "{completed} segments by the successor");
    let written = value("fhirmesh_export_resources_total");
    assert!(written > 0 && written <= counted as u64, "{written} of {counted} resources by the successor");
    assert_eq!(value("fhirmesh_export_chunks_in_progress"), 0);

    // The same job through an exporter configured for presigned downloads: the manifest names S3
    // URLs that serve the same bytes to a client without any token.
    let (presigning, presigning_gateway) = presigning_exporter_and_gateway(&env, &resource).await;
    let presigned_status = status_url.replacen(&base, &presigning_gateway.address, 1);
    let (status, presigned) = send(client.get(&presigned_status)).await;
    assert_eq!(status, 200, "{presigned}");
    assert_eq!(presigned["requiresAccessToken"], false, "presigned URLs carry their own authorization");
    assert_eq!(presigned["transactionTime"], manifest["transactionTime"]);
    let outputs = presigned["output"].as_array().expect("output");
    assert_eq!(outputs.len(), files.len());
    for ((file, text), output) in files.iter().zip(outputs) {
        assert_eq!((&output["type"], &output["count"]), (&file["type"], &file["count"]));
        let url = output["url"].as_str().expect("url");
        assert!(url.starts_with(&aws_endpoint()) && url.contains("X-Amz-Signature="), "{url}");
        let response = client.get(url).send().await.expect("presigned download");
        assert_eq!(response.status(), 200, "{url}");
        assert_eq!(&response.text().await.expect("ndjson"), text, "{url}");
    }

    // Cancelling a finished job removes it and its files, wherever they are fetched from.
    let (status, _) = send(client.delete(&status_url)).await;
    assert_eq!(status, 202);
    let first_file = manifest["output"][0]["url"].as_str().expect("url");
    let (status, _) = send(client.get(first_file)).await;
    assert_eq!(status, 404);
    let first_presigned = outputs[0]["url"].as_str().expect("url");
    let (status, _) = send(client.get(first_presigned)).await;
    assert_eq!(status, 404, "the object is gone from S3");

    for process in [gateway, presigning_gateway, api, presigning, successor, resource] {
        process.kill_9().await;
    }
}

/// An API-only exporter whose manifests presign downloads, and a gateway in front of it.
async fn presigning_exporter_and_gateway(env: &[(String, String)], resource: &Process) -> (Process, Process) {
    let mut env = env.to_vec();
    env.push(("FHIRMESH_EXPORT__PRESIGNED_DOWNLOAD_SECONDS".to_owned(), "300".to_owned()));
    let exporter = exporter(&env, 0).await;
    let gateway = export_gateway(&env, resource, &exporter).await;
    (exporter, gateway)
}

/// A gateway on `resource` that calls `exporter` for `$export`.
async fn export_gateway(env: &[(String, String)], resource: &Process, exporter: &Process) -> Process {
    support::gateway(env, resource, &[("FHIRMESH_GATEWAY__EXPORT_ENDPOINT", format!("http://{}", exporter.address))])
        .await
}
