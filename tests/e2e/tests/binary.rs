//! Binary content negotiation end to end: raw content in and out (byte-identical, multi-megabyte),
//! the FHIR JSON form, the Accept / Content-Type matrix, versions, the size cap, security context,
//! deletes.

use base64::Engine;
use fhirmesh_testkit::{TestServer, status_and_json};
use serde_json::{Value, json};

/// Deterministic bytes that are not valid UTF-8 (every byte value appears).
fn content(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

async fn post_raw(server: &TestServer, content_type: &str, body: Vec<u8>) -> (u16, Value) {
    let response = server
        .client
        .post(server.url("Binary"))
        .header("content-type", content_type)
        .header("x-security-context", "Patient/p1")
        .body(body)
        .send()
        .await
        .expect("sent");
    status_and_json(response).await
}

/// GETs `path` with `accept`; `None` sends an empty Accept (which is no Accept: reqwest would
/// otherwise send `*/*`).
async fn get(server: &TestServer, path: &str, accept: Option<&str>) -> reqwest::Response {
    server.client.get(server.url(path)).header("accept", accept.unwrap_or("")).send().await.expect("sent")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_content_round_trips_byte_for_byte() {
    let server = TestServer::start().await;
    let bytes = content(3 * 1024 * 1024, 7);
    let (status, created) = post_raw(&server, "application/octet-stream", bytes.clone()).await;
    assert_eq!(status, 201, "{}", created["issue"]);
    let id = created["id"].as_str().expect("id").to_owned();
    assert_eq!(created["contentType"], "application/octet-stream");
    assert_eq!(created["securityContext"]["reference"], "Patient/p1");

    let response = get(&server, &format!("Binary/{id}"), Some("*/*")).await;
    assert_eq!(response.status(), 200);
    let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    assert_eq!(header("content-type").as_deref(), Some("application/octet-stream"));
    assert_eq!(header("etag").as_deref(), Some("W/\"1\""));
    assert_eq!(header("x-security-context").as_deref(), Some("Patient/p1"));
    assert!(header("last-modified").is_some());
    let body = response.bytes().await.expect("body");
    assert!(body.as_ref() == bytes.as_slice(), "byte-identical ({} bytes back)", body.len());

    // The FHIR form carries the same content, base64-encoded.
    let (status, resource) = status_and_json(get(&server, &format!("Binary/{id}"), None).await).await;
    assert_eq!(status, 200);
    let data = base64::engine::general_purpose::STANDARD.decode(resource["data"].as_str().expect("data")).expect("b64");
    assert!(data == bytes, "the JSON form holds the same bytes");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_and_format_choose_between_raw_content_and_the_resource() {
    let server = TestServer::start().await;
    let (_, created) = post_raw(&server, "text/plain; charset=utf-8", b"hello binary".to_vec()).await;
    let id = created["id"].as_str().expect("id").to_owned();
    let path = format!("Binary/{id}");
    for (accept, raw) in [
        (None, false),
        (Some("application/fhir+json"), false),
        (Some("application/json"), false),
        (Some("text/plain"), true),
        (Some("*/*"), true),
        (Some("image/png, */*;q=0.1"), true),
    ] {
        let response = get(&server, &path, accept).await;
        assert_eq!(response.status(), 200, "{accept:?}");
        let content_type = response.headers().get("content-type").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let body = response.bytes().await.expect("body");
        if raw {
            assert_eq!(content_type.as_deref(), Some("text/plain; charset=utf-8"), "{accept:?}");
            assert_eq!(body.as_ref(), b"hello binary", "{accept:?}");
        } else {
            assert!(content_type.is_some_and(|c| c.starts_with("application/fhir+json")), "{accept:?}");
            let resource: Value = serde_json::from_slice(&body).expect("JSON");
            assert_eq!(resource["resourceType"], "Binary", "{accept:?}");
        }
    }
    // `_format` asks for the resource whatever Accept says; FHIR XML is refused as everywhere.
    let response = server.client.get(server.url(&format!("{path}?_format=json"))).header("accept", "*/*").send().await;
    let (status, resource) = status_and_json(response.expect("sent")).await;
    assert_eq!((status, resource["resourceType"].as_str()), (200, Some("Binary")));
    assert_eq!(get(&server, &path, Some("application/fhir+xml")).await.status(), 406);
    // Errors stay OperationOutcomes.
    let (status, outcome) = status_and_json(get(&server, "Binary/missing", Some("*/*")).await).await;
    assert_eq!(status, 404);
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_updates_make_versions_and_deletes_end_the_content() {
    let server = TestServer::start().await;
    let (_, created) = post_raw(&server, "application/pdf", b"%PDF version one".to_vec()).await;
    let id = created["id"].as_str().expect("id").to_owned();
    let response = server
        .client
        .put(server.url(&format!("Binary/{id}")))
        .header("content-type", "application/pdf")
        .body(b"%PDF version two".to_vec())
        .send()
        .await
        .expect("sent");
    let (status, updated) = status_and_json(response).await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(updated["meta"]["versionId"], "2");
    let current = get(&server, &format!("Binary/{id}"), Some("application/pdf")).await;
    assert_eq!(current.bytes().await.expect("body").as_ref(), b"%PDF version two");
    let first = get(&server, &format!("Binary/{id}/_history/1"), Some("application/pdf")).await;
    assert_eq!(first.headers().get("etag").and_then(|v| v.to_str().ok()), Some("W/\"1\""));
    assert_eq!(first.bytes().await.expect("body").as_ref(), b"%PDF version one");

    // A FHIR JSON write is still a FHIR JSON write.
    let data = base64::engine::general_purpose::STANDARD.encode(b"from json");
    let resource = json!({"resourceType": "Binary", "id": id, "contentType": "text/plain", "data": data});
    let response = server
        .client
        .put(server.url(&format!("Binary/{id}")))
        .header("content-type", "application/fhir+json")
        .body(resource.to_string())
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 200);
    let raw = get(&server, &format!("Binary/{id}"), Some("*/*")).await;
    assert_eq!(raw.bytes().await.expect("body").as_ref(), b"from json");

    let response = server.client.delete(server.url(&format!("Binary/{id}"))).send().await.expect("delete");
    assert_eq!(response.status(), 204);
    assert_eq!(get(&server, &format!("Binary/{id}"), Some("*/*")).await.status(), 410);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_past_the_body_limit_is_refused_with_413() {
    let server = TestServer::start_with(|config| config.server.max_body_bytes = 64 * 1024).await;
    // Streamed (no Content-Length): the server stops reading at the cap and answers 413.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        content(64 * 1024 + 1, 1).chunks(4096).map(|c| Ok(c.to_vec())).collect();
    let response = server
        .client
        .post(server.url("Binary"))
        .header("content-type", "application/octet-stream")
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .expect("sent");
    let (status, outcome) = status_and_json(response).await;
    assert_eq!(status, 413, "{outcome}");
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    let limit = (64 * 1024 / 4 * 3 - 1024).to_string();
    assert!(outcome["issue"][0]["diagnostics"].as_str().is_some_and(|d| d.contains(&limit)), "{outcome}");
    let (status, _) = post_raw(&server, "application/octet-stream", content(32 * 1024, 1)).await;
    assert_eq!(status, 201, "under the limit");
    let (status, outcome) = post_raw(&server, "not a media type", b"x".to_vec()).await;
    assert_eq!(status, 400, "{outcome}");
    assert!(outcome["issue"][0]["diagnostics"].as_str().is_some_and(|d| d.contains("not a media type")));
    server.stop().await;
}
