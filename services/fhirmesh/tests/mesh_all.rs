//! The whole mesh, every service its own process — gateway, resource, relay, indexer, notifier,
//! exporter, binary — on the scale-out backends (DynamoDB and S3 in moto, NATS JetStream,
//! OpenSearch), and the core flows through its one gateway: CRUD, a search that finds what was
//! just written, a transaction, a rest-hook Subscription with a local receiver, a Bulk Data
//! export, a Binary upload. The services call each other over mTLS (`[grpc] tls_*`), each with
//! its own certificate of one CA made for the test; the other mesh tests call in the clear.

mod support;

use std::time::Duration;

use fhirmesh_testinfra::tls::TestCa;
use fhirmesh_testinfra::{aws_endpoint, opensearch_url, unique_name};
use serde_json::{Value, json};
use support::{Shape, mesh_env};

/// Sends `request`; the status, the `X-Consistency-Token` when there is one, and the JSON body
/// (`Null` when there is none).
async fn send(request: reqwest::RequestBuilder) -> (u16, Option<String>, Value) {
    let response = request.send().await.expect("sent");
    let status = response.status().as_u16();
    let token = response.headers().get("x-consistency-token").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let body = response.bytes().await.expect("body");
    let json = if body.is_empty() { Value::Null } else { serde_json::from_slice(&body).expect("a JSON body") };
    (status, token, json)
}

fn fhir_json(request: reqwest::RequestBuilder, body: &Value) -> reqwest::RequestBuilder {
    request.header("content-type", "application/fhir+json").body(body.to_string())
}

/// `env` with the mesh's TLS settings and `name`'s own certificate (written to `dir`).
fn with_tls(env: &[(String, String)], ca: &TestCa, dir: &std::path::Path, name: &str) -> Vec<(String, String)> {
    let files = ca.write(dir, name);
    let mut env = env.to_vec();
    for (key, path) in [("CA", files.ca), ("CERT", files.cert), ("KEY", files.key)] {
        env.push((format!("FHIRMESH_GRPC__TLS_{key}_FILE"), path.display().to_string()));
    }
    env
}

/// Waits (at most 60 s) until `done`.
async fn until(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !done().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn ids(bundle: &Value) -> Vec<String> {
    let entries = bundle["entry"].as_array().cloned().unwrap_or_default();
    let mut ids: Vec<String> = entries.iter().map(|e| e["resource"]["id"].as_str().expect("id").to_owned()).collect();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_core_flows_work_through_a_mesh_of_separate_services() {
    let mut env = mesh_env(&Shape::NatsFromChangeLog);
    env.extend(
        [
            ("FHIRMESH_BLOB__BACKEND", "s3".to_owned()),
            ("FHIRMESH_BLOB__BUCKET", unique_name("mesh-all")),
            ("FHIRMESH_AWS__ENDPOINT_URL", aws_endpoint()),
            ("FHIRMESH_SEARCH__BACKEND", "opensearch".to_owned()),
            ("FHIRMESH_OPENSEARCH__URL", opensearch_url()),
            ("FHIRMESH_OPENSEARCH__PREFIX", unique_name("meshall")),
            ("FHIRMESH_NOTIFIER__ALLOW_ENDPOINTS", "[\"127.0.0.1\"]".to_owned()),
            ("FHIRMESH_NOTIFIER__ALLOW_INSECURE_HTTP", "true".to_owned()),
            ("FHIRMESH_BINARY__INLINE_MAX_BYTES", "1024".to_owned()),
            ("FHIRMESH_EXPORT__GRPC_LISTEN", "127.0.0.1:0".to_owned()),
            ("FHIRMESH_BINARY__GRPC_LISTEN", "127.0.0.1:0".to_owned()),
        ]
        .map(|(k, v)| (k.to_owned(), v)),
    );
    support::provision(&env);
    let (ca, certs) = (TestCa::new("fhirmesh test mesh"), tempfile::tempdir().expect("a certificate directory"));
    let tls = |name: &str| with_tls(&env, &ca, certs.path(), name);
    let resource =
        support::spawn_with_env(&["--target", "resource", "--grpc-listen", "127.0.0.1:0"], None, &tls("resource"))
            .await;
    let resource_endpoint = format!("https://{}", resource.address);
    let relay = support::spawn_with_env(&["--target", "relay"], None, &env).await;
    let indexer = support::spawn_with_env(&["--target", "indexer"], None, &env).await;
    let binary = support::spawn_with_env(&["--target", "binary"], None, &tls("binary")).await;
    let exporter = support::spawn_with_env(&["--target", "exporter"], None, &tls("exporter")).await;
    let mut notifier_env = tls("notifier");
    notifier_env.push(("FHIRMESH_NOTIFIER__RESOURCE_ENDPOINT".to_owned(), resource_endpoint.clone()));
    let notifier = support::spawn_with_env(&["--target", "notifier"], None, &notifier_env).await;
    let mut gateway_env = tls("gateway");
    gateway_env.push(("FHIRMESH_GATEWAY__EXPORT_ENDPOINT".to_owned(), format!("https://{}", exporter.address)));
    gateway_env.push(("FHIRMESH_GATEWAY__BINARY_ENDPOINT".to_owned(), format!("https://{}", binary.address)));
    let gateway_args = ["--target", "gateway", "--listen", "127.0.0.1:0", "--resource-endpoint", &resource_endpoint];
    let gateway = support::spawn_with_env(&gateway_args, None, &gateway_env).await;
    let base = gateway.address.clone();
    let client = reqwest::Client::new();

    // Every service becomes ready (the notifier once it has read from the bus).
    for process in [&resource, &relay, &indexer, &binary, &exporter, &notifier, &gateway] {
        until(&format!("{} to be ready", process.ops), async || {
            let ready = client.get(format!("{}/readyz", process.ops)).send().await.expect("readyz");
            ready.status() == 200
        })
        .await;
    }

    // The gRPC servers take TLS callers with a certificate of the mesh's CA, and no one else.
    for process in [&resource, &binary, &exporter] {
        let plain = fhirmesh_ops::grpc::health_check_endpoint(&format!("http://{}", process.address), "", None)
            .expect("endpoint");
        assert!(plain().await.is_err(), "{} answers a call in the clear", process.address);
        let issued = ca.issue("test");
        let member = fhirmesh_ops::grpc::GrpcTls::from_pem(ca.pem(), issued.cert, issued.key, true, None).expect("tls");
        let https = format!("https://{}", process.address);
        let check = fhirmesh_ops::grpc::health_check_endpoint(&https, "", Some(&member)).expect("endpoint");
        assert_eq!(check().await, Ok(()), "{https}");
        let other = TestCa::new("another CA");
        let issued = other.issue("stranger");
        let stranger =
            fhirmesh_ops::grpc::GrpcTls::from_pem(ca.pem(), issued.cert, issued.key, true, None).expect("tls");
        let check = fhirmesh_ops::grpc::health_check_endpoint(&https, "", Some(&stranger)).expect("endpoint");
        let answer = check().await;
        assert!(answer.is_err(), "{https} takes a stranger's certificate: {answer:?}");
    }

    // A rest-hook Subscription, made active by the notifier.
    let (hook, received) = support::hook_receiver(Duration::ZERO).await;
    let subscription = json!({"resourceType": "Subscription", "status": "requested", "reason": "mesh",
        "criteria": "Observation?code=http://loinc.org|1234-5",
        "channel": {"type": "rest-hook", "endpoint": format!("{hook}/hook")}});
    let (status, _, created) = send(fhir_json(client.post(format!("{base}/Subscription")), &subscription)).await;
    assert_eq!(status, 201, "{created}");
    let subscription_id = created["id"].as_str().expect("id").to_owned();
    until("the Subscription to be active", async || {
        let (_, _, current) = send(client.get(format!("{base}/Subscription/{subscription_id}"))).await;
        current["status"] == "active"
    })
    .await;

    // CRUD, vread and history.
    let family = unique_name("Meshall");
    let patient = json!({"resourceType": "Patient", "name": [{"family": family}], "gender": "female"});
    let (status, _, created) = send(fhir_json(client.post(format!("{base}/Patient")), &patient)).await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().expect("id").to_owned();
    let (status, _, read) = send(client.get(format!("{base}/Patient/{id}"))).await;
    assert_eq!((status, &read["name"][0]["family"]), (200, &json!(family)));
    let mut changed = read.clone();
    changed["gender"] = json!("other");
    let update = fhir_json(client.put(format!("{base}/Patient/{id}")), &changed).header("if-match", "W/\"1\"");
    let (status, _, updated) = send(update).await;
    assert_eq!((status, &updated["meta"]["versionId"]), (200, &json!("2")), "{updated}");
    let (status, _, stale) =
        send(fhir_json(client.put(format!("{base}/Patient/{id}")), &changed).header("if-match", "W/\"1\"")).await;
    assert_eq!(status, 412, "{stale}");
    let (status, _, first) = send(client.get(format!("{base}/Patient/{id}/_history/1"))).await;
    assert_eq!((status, &first["gender"]), (200, &json!("female")));
    let (_, _, history) = send(client.get(format!("{base}/Patient/{id}/_history"))).await;
    assert_eq!(history["entry"].as_array().map(Vec::len), Some(2), "{history}");

    // $validate crosses to the resource service: the update as it would be, and a bad one.
    let (status, _, outcome) =
        send(fhir_json(client.post(format!("{base}/Patient/{id}/$validate?mode=update")), &changed)).await;
    assert_eq!((status, &outcome["issue"][0]["severity"]), (200, &json!("information")), "{outcome}");
    let bad = json!({"resourceType": "Patient", "birthDate": "soon"});
    let (status, _, outcome) = send(fhir_json(client.post(format!("{base}/Patient/$validate")), &bad)).await;
    assert_eq!((status, &outcome["issue"][0]["expression"]), (200, &json!(["Patient.birthDate"])), "{outcome}");

    // A second Patient, found by a search sent right after the write (its consistency token).
    let (status, token, second) = send(fhir_json(client.post(format!("{base}/Patient")), &patient)).await;
    assert_eq!(status, 201);
    let second_id = second["id"].as_str().expect("id").to_owned();
    let search = client
        .get(format!("{base}/Patient?family={family}"))
        .header("x-consistency-token", token.expect("a write returns its consistency token"));
    let (status, _, found) = send(search).await;
    assert_eq!(status, 200, "{found}");
    let mut both = vec![id.clone(), second_id.clone()];
    both.sort();
    assert_eq!(ids(&found), both, "{found}");

    // A transaction: a Patient and an Observation referring to it, all or nothing; the
    // Observation matches the Subscription.
    let transaction = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:2c1b3f7e-8d5a-4c41-9f0e-6a7b8c9d0e1f",
         "resource": {"resourceType": "Patient", "name": [{"family": family}]},
         "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Observation", "status": "final",
                      "code": {"coding": [{"system": "http://loinc.org", "code": "1234-5"}]},
                      "subject": {"reference": "urn:uuid:2c1b3f7e-8d5a-4c41-9f0e-6a7b8c9d0e1f"}},
         "request": {"method": "POST", "url": "Observation"}}]});
    let (status, token, answer) = send(fhir_json(client.post(base.clone()), &transaction)).await;
    assert_eq!(status, 200, "{answer}");
    let location = |n: usize| answer["entry"][n]["response"]["location"].as_str().expect("location").to_owned();
    let third_id = location(0).split('/').nth(1).expect("id").to_owned();
    let observation_id = location(1).split('/').nth(1).expect("id").to_owned();
    let search = client
        .get(format!("{base}/Observation?subject=Patient/{third_id}"))
        .header("x-consistency-token", token.expect("a transaction returns its consistency token"));
    let (_, _, found) = send(search).await;
    assert_eq!(ids(&found), vec![observation_id.clone()], "{found}");
    let (_, _, observation) = send(client.get(format!("{base}/Observation/{observation_id}"))).await;
    assert_eq!(observation["subject"]["reference"], format!("Patient/{third_id}"), "references resolved");

    // The notification reaches the receiver.
    let event = format!("default/Observation/{observation_id}/_history/1");
    until("the notification", async || received.lock().expect("received").contains_key(&event)).await;

    // The first Patient deleted: gone for reads and searches.
    let (status, token, _) = send(client.delete(format!("{base}/Patient/{id}"))).await;
    assert_eq!(status, 204);
    let (status, _, _) = send(client.get(format!("{base}/Patient/{id}"))).await;
    assert_eq!(status, 410);
    let search = client
        .get(format!("{base}/Patient?family={family}"))
        .header("x-consistency-token", token.expect("a delete returns its consistency token"));
    let (_, _, found) = send(search).await;
    let mut live = vec![second_id.clone(), third_id.clone()];
    live.sort();
    assert_eq!(ids(&found), live, "{found}");

    // A Binary larger than the inline limit: stored by the binary service, read back raw.
    let content: Vec<u8> = (0..256 * 1024).map(|i: u32| (i.wrapping_mul(31) % 251) as u8).collect();
    let upload = client.post(format!("{base}/Binary")).header("content-type", "application/pdf").body(content.clone());
    let (status, _, binary_resource) = send(upload).await;
    assert_eq!(status, 201, "{binary_resource}");
    assert!(binary_resource.get("data").is_none(), "stored, not inline: {binary_resource}");
    let binary_id = binary_resource["id"].as_str().expect("id");
    let raw = client.get(format!("{base}/Binary/{binary_id}")).header("accept", "*/*").send().await.expect("read");
    assert_eq!(raw.status(), 200);
    assert_eq!(raw.headers()["content-type"], "application/pdf");
    assert!(raw.bytes().await.expect("bytes").as_ref() == content.as_slice(), "the same bytes come back");

    // A Patient-type export: the live Patients, as stored.
    let kick_off = client
        .get(format!("{base}/$export?_type=Patient"))
        .header("prefer", "respond-async")
        .header("accept", "application/fhir+json");
    let response = kick_off.send().await.expect("kick-off");
    assert_eq!(response.status(), 202, "{:?}", response.text().await);
    let status_url = response.headers()["content-location"].to_str().expect("ascii").to_owned();
    let mut manifest = Value::Null;
    until("the export", async || {
        let (status, _, body) = send(client.get(&status_url)).await;
        assert!(status == 200 || status == 202, "export status {status}: {body}");
        manifest = body;
        status == 200
    })
    .await;
    let mut exported = Vec::new();
    for file in manifest["output"].as_array().expect("output") {
        let text = client.get(file["url"].as_str().expect("url")).send().await.expect("download").text().await;
        for line in text.expect("ndjson").lines() {
            let resource: Value = serde_json::from_str(line).expect("one resource per line");
            if resource["name"][0]["family"] == json!(family) {
                exported.push(resource["id"].as_str().expect("id").to_owned());
            }
        }
    }
    exported.sort();
    assert_eq!(exported, live, "the export holds the live Patients");

    for process in [gateway, notifier, exporter, binary, indexer, relay, resource] {
        process.kill_9().await;
    }
}
