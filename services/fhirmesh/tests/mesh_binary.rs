//! Binary content in the mesh: a gateway streams raw uploads to the binary service (its own
//! process, on S3 in moto) and raw reads back from it, while the Binary resources live in the
//! resource service (DynamoDB). Content larger than the request body limit round-trips byte for
//! byte; a pointer a client forges is refused by the resource service; with the binary service
//! gone, stored content answers 503 and inline content is still served.

mod support;

use base64::Engine;
use fhirmesh_testinfra::{aws_endpoint, unique_name};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use support::{Process, Shape, mesh_env};

const CONTENT_EXTENSION: &str = "https://fhirmesh.dev/fhir/StructureDefinition/binary-content";

fn content(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(37).wrapping_add(11)).collect()
}

async fn post_raw(client: &reqwest::Client, base: &str, content_type: &str, body: Vec<u8>) -> (u16, Value) {
    let response = client
        .post(format!("{base}/Binary"))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .expect("sent");
    let status = response.status().as_u16();
    (status, response.json().await.expect("json"))
}

async fn get_raw(client: &reqwest::Client, base: &str, id: &str) -> reqwest::Response {
    client.get(format!("{base}/Binary/{id}")).header("accept", "*/*").send().await.expect("sent")
}

/// A resource service (DynamoDB), a binary service (S3 in a fresh bucket) and a gateway on both,
/// each its own process, all configured with `setting` besides.
struct Mesh {
    resource: Process,
    binary: Process,
    gateway: Process,
}

async fn mesh(setting: (&str, &str)) -> Mesh {
    let mut env = mesh_env(&Shape::NatsFromChangeLog);
    env.extend(
        [
            ("FHIRMESH_BLOB__BACKEND", "s3".to_owned()),
            ("FHIRMESH_BLOB__BUCKET", unique_name("binary")),
            ("FHIRMESH_AWS__ENDPOINT_URL", aws_endpoint()),
            (setting.0, setting.1.to_owned()),
        ]
        .map(|(k, v)| (k.to_owned(), v)),
    );
    let provisioned = support::provision(&env);
    assert!(provisioned.contains("S3 bucket"), "{provisioned}");
    let resource = support::spawn_with_env(&["--target", "resource", "--grpc-listen", "127.0.0.1:0"], None, &env).await;
    let mut binary_env = env.clone();
    binary_env.push(("FHIRMESH_BINARY__GRPC_LISTEN".to_owned(), "127.0.0.1:0".to_owned()));
    let binary = support::spawn_with_env(&["--target", "binary"], None, &binary_env).await;
    let endpoint = format!("http://{}", binary.address);
    let gateway = support::gateway(&env, &resource, &[("FHIRMESH_GATEWAY__BINARY_ENDPOINT", endpoint)]).await;
    Mesh { resource, binary, gateway }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_content_goes_through_the_binary_service_to_s3() {
    let Mesh { resource, binary, gateway } = mesh(("FHIRMESH_BINARY__INLINE_MAX_BYTES", "1024")).await;
    let base = gateway.address.clone();
    let client = reqwest::Client::new();

    // Larger than the request body limit (16 MiB): streamed through the gateway and the binary
    // service into S3.
    let large = content(18 * 1024 * 1024 + 5);
    let (status, created) = post_raw(&client, &base, "application/octet-stream", large.clone()).await;
    assert_eq!(status, 201, "{created}");
    let large_id = created["id"].as_str().expect("id").to_owned();
    assert!(created.get("data").is_none(), "{created}");
    let pointer = &created["_data"]["extension"][0];
    assert_eq!(pointer["url"], CONTENT_EXTENSION);
    let part = |name: &str| pointer["extension"].as_array().expect("parts").iter().find(|p| p["url"] == name).cloned();
    assert_eq!(part("size").expect("size")["valueUnsignedInt"], large.len());
    let sha256 = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(&large));
    assert_eq!(part("sha256").expect("sha256")["valueBase64Binary"], sha256);

    let response = get_raw(&client, &base, &large_id).await;
    assert_eq!(response.status(), 200);
    let length = response.headers().get("content-length").and_then(|v| v.to_str().ok()).map(str::to_owned);
    assert_eq!(length, Some(large.len().to_string()));
    let body = response.bytes().await.expect("body");
    assert!(body.as_ref() == large.as_slice(), "byte-identical ({} bytes back)", body.len());

    // Small content stays inline in the resource.
    let (status, small) = post_raw(&client, &base, "text/plain", b"inline content".to_vec()).await;
    assert_eq!(status, 201, "{small}");
    assert!(small["data"].is_string(), "{small}");
    let small_id = small["id"].as_str().expect("id").to_owned();

    // The resource service refuses a pointer the gateway did not upload for this request.
    let forged = json!({"resourceType": "Binary", "contentType": "text/plain", "_data": created["_data"]});
    let response = client
        .post(format!("{base}/Binary"))
        .header("content-type", "application/fhir+json")
        .body(forged.to_string())
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 400);

    // Without the binary service: stored content is unavailable (503, an OperationOutcome),
    // inline content is still served, and a large upload is refused as unavailable.
    binary.kill_9().await;
    let response = get_raw(&client, &base, &large_id).await;
    assert_eq!(response.status(), 503);
    let outcome: Value = response.json().await.expect("json");
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    let response = get_raw(&client, &base, &small_id).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.bytes().await.expect("body").as_ref(), b"inline content");
    let (status, outcome) = post_raw(&client, &base, "application/pdf", content(4096)).await;
    assert_eq!(status, 503, "{outcome}");

    for process in [gateway, resource] {
        process.kill_9().await;
    }
}

/// Presigned mode (as FHIR Works on AWS had it): a FHIR JSON create of a Binary without content
/// answers a presigned S3 PUT URL, the client uploads there itself, and reads answer a presigned
/// GET URL; the raw read through the gateway serves the same bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presigned_mode_hands_out_s3_urls_for_upload_and_download() {
    let Mesh { resource, binary, gateway } = mesh(("FHIRMESH_BINARY__PRESIGNED_URL_SECONDS", "300")).await;
    let base = gateway.address.clone();
    let client = reqwest::Client::new();
    let send_json = |request: reqwest::RequestBuilder, body: Value| async move {
        let response = request.header("content-type", "application/fhir+json").body(body.to_string()).send().await;
        let response = response.expect("sent");
        let status = response.status().as_u16();
        (status, response.json::<Value>().await.expect("json"))
    };

    let metadata = json!({"resourceType": "Binary", "contentType": "application/pdf"});
    let (status, created) = send_json(client.post(format!("{base}/Binary")), metadata).await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().expect("id").to_owned();
    let put_url = created["presignedPutUrl"].as_str().expect("a presigned upload URL").to_owned();
    assert!(put_url.starts_with(&aws_endpoint()) && put_url.contains("X-Amz-Expires=300"), "{put_url}");
    assert_eq!(created["_data"]["extension"][0]["url"], CONTENT_EXTENSION, "{created}");

    // Before the upload there is nothing to read.
    assert_eq!(get_raw(&client, &base, &id).await.status(), 410);
    let bytes = content(6 * 1024 * 1024 + 1);
    let upload = client.put(&put_url).header("content-type", "application/pdf").body(bytes.clone()).send().await;
    assert_eq!(upload.expect("uploaded").status(), 200);

    let read = client.get(format!("{base}/Binary/{id}")).header("accept", "application/fhir+json").send().await;
    let response = read.expect("read");
    assert_eq!(response.status(), 200);
    let read: Value = response.json().await.expect("json");
    let get_url = read["presignedGetUrl"].as_str().expect("a presigned download URL");
    assert!(get_url.contains("X-Amz-Signature="), "{get_url}");
    let direct = client.get(get_url).send().await.expect("direct download");
    assert_eq!(direct.status(), 200);
    assert!(direct.bytes().await.expect("body").as_ref() == bytes.as_slice(), "from S3, byte-identical");
    let through = get_raw(&client, &base, &id).await;
    assert_eq!(through.status(), 200);
    assert!(through.bytes().await.expect("body").as_ref() == bytes.as_slice(), "through the gateway");

    // Content in the JSON stays inline, with no URL to upload to.
    let inline = json!({"resourceType": "Binary", "contentType": "text/plain", "data": "aGk="});
    let (status, created) = send_json(client.post(format!("{base}/Binary")), inline).await;
    assert_eq!(status, 201, "{created}");
    assert!(created.get("presignedPutUrl").is_none() && created["data"] == "aGk=", "{created}");
    // A Binary without contentType is refused: the upload needs one.
    let (status, outcome) = send_json(client.post(format!("{base}/Binary")), json!({"resourceType": "Binary"})).await;
    assert_eq!(status, 400, "{outcome}");

    for process in [gateway, binary, resource] {
        process.kill_9().await;
    }
}
