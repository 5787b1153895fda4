//! Binary content negotiation end to end: raw content in and out (byte-identical, multi-megabyte,
//! larger than the request body limit: streamed to the blob store), the FHIR JSON form (inline
//! data, or the pointer to stored content), who may set a pointer, the Accept / Content-Type
//! matrix, versions, the size caps, security context, deletes.

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine;
use fhirmesh_testkit::{TestServer, status_and_json};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const CONTENT_EXTENSION: &str = "https://fhirmesh.dev/fhir/StructureDefinition/binary-content";

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

/// POSTs `body` as a raw Binary in chunks of `chunk` bytes, without a Content-Length.
async fn post_chunked(server: &TestServer, content_type: &str, body: &[u8], chunk: usize) -> (u16, Value) {
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = body.chunks(chunk).map(|c| Ok(c.to_vec())).collect();
    let response = server
        .client
        .post(server.url("Binary"))
        .header("content-type", content_type)
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
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

/// The content files of the default tenant's stored Binaries.
fn stored_contents(server: &TestServer) -> usize {
    let dir: PathBuf = server.config.storage.data_dir.join("blobs").join("default").join("binary");
    std::fs::read_dir(dir).map(|entries| entries.count()).unwrap_or(0)
}

/// The `binary-content` pointer of a Binary's JSON form: (key, size, sha256).
fn pointer(resource: &Value) -> Option<(String, u64, String)> {
    let extension = resource["_data"]["extension"].as_array()?.iter().find(|e| e["url"] == CONTENT_EXTENSION)?;
    let part = |name: &str| extension["extension"].as_array()?.iter().find(|p| p["url"] == name).cloned();
    Some((
        part("key")?["valueString"].as_str()?.to_owned(),
        part("size")?["valueUnsignedInt"].as_u64()?,
        part("sha256")?["valueBase64Binary"].as_str()?.to_owned(),
    ))
}

async fn send_json(request: reqwest::RequestBuilder, resource: &Value) -> (u16, Value) {
    let response = request.header("content-type", "application/fhir+json").body(resource.to_string()).send().await;
    status_and_json(response.expect("sent")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_content_round_trips_byte_for_byte() {
    let server = TestServer::start().await;
    // Larger than the request body limit (16 MiB): only a streamed upload can take it.
    let bytes = content(20 * 1024 * 1024 + 3, 7);
    let (status, created) = post_raw(&server, "application/octet-stream", bytes.clone()).await;
    assert_eq!(status, 201, "{}", created["issue"]);
    let id = created["id"].as_str().expect("id").to_owned();
    assert_eq!(created["contentType"], "application/octet-stream");
    assert_eq!(created["securityContext"]["reference"], "Patient/p1");
    assert_eq!(stored_contents(&server), 1, "the content is in the blob store");

    let response = get(&server, &format!("Binary/{id}"), Some("*/*")).await;
    assert_eq!(response.status(), 200);
    let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    assert_eq!(header("content-type").as_deref(), Some("application/octet-stream"));
    assert_eq!(header("content-length"), Some(bytes.len().to_string()));
    assert_eq!(header("etag").as_deref(), Some("W/\"1\""));
    assert_eq!(header("x-security-context").as_deref(), Some("Patient/p1"));
    assert!(header("last-modified").is_some());
    let body = response.bytes().await.expect("body");
    assert!(body.as_ref() == bytes.as_slice(), "byte-identical ({} bytes back)", body.len());

    // The FHIR form points to the content: no data, its size and SHA-256.
    let (status, resource) = status_and_json(get(&server, &format!("Binary/{id}"), None).await).await;
    assert_eq!(status, 200);
    assert!(resource.get("data").is_none(), "{resource}");
    let (key, size, sha256) = pointer(&resource).expect("a content pointer");
    assert!(key.starts_with("binary/"), "{key}");
    // With a link to the content: this version's raw URL.
    let parts = resource["_data"]["extension"][0]["extension"].as_array().expect("parts");
    let link = parts.iter().find(|p| p["url"] == "url").expect("a url part")["valueUrl"].as_str().expect("a URL");
    assert_eq!(link, server.url(&format!("Binary/{id}/_history/1")));
    let linked = server.client.get(link).header("accept", "*/*").send().await.expect("sent");
    assert!(linked.bytes().await.expect("body").as_ref() == bytes.as_slice(), "the link serves the content");
    assert_eq!(size, bytes.len() as u64);
    assert_eq!(sha256, base64::engine::general_purpose::STANDARD.encode(Sha256::digest(&bytes)));

    // Small announced content stays inline, base64 in the resource.
    let small = content(1000, 3);
    let (status, created) = post_raw(&server, "image/png", small.clone()).await;
    assert_eq!(status, 201);
    let data = base64::engine::general_purpose::STANDARD.decode(created["data"].as_str().expect("data")).expect("b64");
    assert!(data == small && pointer(&created).is_none(), "inline");
    assert_eq!(stored_contents(&server), 1, "nothing more in the blob store");

    // Unannounced content (chunked) is streamed, however small.
    let (status, created) = post_chunked(&server, "text/plain", b"chunked content", 8).await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(pointer(&created).map(|(_, size, _)| size), Some(15));
    let id = created["id"].as_str().expect("id");
    let raw = get(&server, &format!("Binary/{id}"), Some("text/plain")).await;
    assert_eq!(raw.bytes().await.expect("body").as_ref(), b"chunked content");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_server_sets_a_content_pointer() {
    let server = TestServer::start_with(|config| config.binary.inline_max_bytes = 0).await;
    let (status, first) = post_raw(&server, "application/pdf", b"%PDF first".to_vec()).await;
    assert_eq!(status, 201, "{first}");
    let first_id = first["id"].as_str().expect("id").to_owned();
    let (_, second) = post_raw(&server, "application/pdf", b"%PDF second".to_vec()).await;
    let second_id = second["id"].as_str().expect("id").to_owned();
    assert!(pointer(&first).is_some() && pointer(&second).is_some());

    // A client copying a pointer onto a new Binary, or onto another one, is refused.
    let mut forged = json!({"resourceType": "Binary", "contentType": "application/pdf"});
    forged["_data"] = first["_data"].clone();
    let (status, outcome) = send_json(server.client.post(server.url("Binary")), &forged).await;
    assert_eq!(status, 400, "{outcome}");
    assert_eq!(outcome["issue"][0]["expression"][0], "Binary.data.extension");
    forged["id"] = json!(second_id);
    let path = format!("Binary/{second_id}");
    let (status, _) = send_json(server.client.put(server.url(&path)), &forged).await;
    assert_eq!(status, 400);
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [{
        "request": {"method": "POST", "url": "Binary"},
        "resource": {"resourceType": "Binary", "contentType": "text/plain", "_data": first["_data"]}}]});
    let (status, _) = send_json(server.client.post(server.url("")), &bundle).await;
    assert_eq!(status, 400, "in a transaction too");
    let second_raw = get(&server, &path, Some("*/*")).await;
    assert_eq!(second_raw.bytes().await.expect("body").as_ref(), b"%PDF second", "unchanged");

    // Keeping a Binary's own pointer (a JSON update of its metadata) is fine.
    let mut renamed = first.clone();
    renamed["contentType"] = json!("application/octet-stream");
    let (status, updated) = send_json(server.client.put(server.url(&format!("Binary/{first_id}"))), &renamed).await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(pointer(&updated), pointer(&first));
    let raw = get(&server, &format!("Binary/{first_id}"), Some("*/*")).await;
    assert_eq!(raw.headers().get("content-type").and_then(|v| v.to_str().ok()), Some("application/octet-stream"));
    assert_eq!(raw.bytes().await.expect("body").as_ref(), b"%PDF first");

    // A raw write that fails leaves no content behind.
    assert_eq!(stored_contents(&server), 2);
    let response = server
        .client
        .put(server.url(&path))
        .header("content-type", "application/pdf")
        .header("if-match", "W/\"7\"")
        .body(b"%PDF never stored".to_vec())
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 412);
    // The clean-up runs after the answer; bounded wait.
    let mut left = stored_contents(&server);
    for _ in 0..100 {
        if left == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        left = stored_contents(&server);
    }
    assert_eq!(left, 2, "the failed write's content was removed");
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
async fn content_past_the_caps_is_refused_with_413() {
    let server = TestServer::start_with(|config| {
        config.binary.inline_max_bytes = 16 * 1024;
        config.binary.max_bytes = 64 * 1024;
    })
    .await;
    // Streamed (no Content-Length): the server stops reading at the cap, answers 413 and keeps
    // nothing.
    let (status, outcome) = post_chunked(&server, "application/octet-stream", &content(64 * 1024 + 1, 1), 4096).await;
    assert_eq!(status, 413, "{outcome}");
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    assert!(outcome["issue"][0]["diagnostics"].as_str().is_some_and(|d| d.contains("65536-byte limit")), "{outcome}");
    assert_eq!(stored_contents(&server), 0);
    // Announced as too large: refused before reading.
    let (status, outcome) = post_raw(&server, "application/octet-stream", content(64 * 1024 + 1, 1)).await;
    assert_eq!(status, 413, "{outcome}");
    assert_eq!(stored_contents(&server), 0);
    let (status, _) = post_raw(&server, "application/octet-stream", content(64 * 1024, 1)).await;
    assert_eq!(status, 201, "at the limit");
    let (status, outcome) = post_raw(&server, "not a media type", b"x".to_vec()).await;
    assert_eq!(status, 400, "{outcome}");
    assert!(outcome["issue"][0]["diagnostics"].as_str().is_some_and(|d| d.contains("not a media type")));
    assert_eq!(stored_contents(&server), 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_content_is_capped_by_the_body_limit() {
    let server = TestServer::start_with(|config| {
        config.server.max_body_bytes = 64 * 1024;
        config.binary.inline_max_bytes = 1024 * 1024;
    })
    .await;
    // Announced small enough to be inline, but past what fits a request body as base64.
    let (status, outcome) = post_raw(&server, "application/octet-stream", content(64 * 1024 + 1, 1)).await;
    assert_eq!(status, 413, "{outcome}");
    let limit = (64 * 1024 / 4 * 3 - 1024).to_string();
    assert!(outcome["issue"][0]["diagnostics"].as_str().is_some_and(|d| d.contains(&limit)), "{outcome}");
    let (status, _) = post_raw(&server, "application/octet-stream", content(32 * 1024, 1)).await;
    assert_eq!(status, 201, "under the limit");
    server.stop().await;
}
